"""Sequences packed into one row (Hugging Face's ``DataCollatorWithFlattening``, padding-free training), or padded
rows: where the sequences lie, and the batches of one sequence a row, in groups of similar lengths padded on the
right, that the layers run instead."""

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from bmojo.ops import check_integers

# the keywords that mark packing (Hugging Face's flash-attention ones, mamba_ssm's ``seq_idx``) or come with it
PACKING_KEYS = ("position_ids", "seq_idx", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


@dataclass
class Group:
    """Sequences of similar lengths, run as one batch ``[n, width]`` padded on the right: token ``i`` of it is token
    ``tokens[i]`` of the flattened packed batch, at ``[rows[i], pos[i]]``; ``valid [n, width]`` (bool) marks the
    sequences' tokens (``None`` where they are all ``width`` long)."""

    tokens: torch.Tensor
    rows: torch.Tensor
    pos: torch.Tensor
    valid: torch.Tensor | None
    n: int
    width: int


@dataclass
class PackedSequences:
    """Sequences lying in the rows of a ``[B, L]`` batch (``shape``), packed several to a row or one a row among
    padding, cut into :class:`Group` s of similar lengths (see :func:`_bands`), the longest first. The layers run each
    group as a batch (:meth:`unpack`), whose outputs :meth:`pack` puts back in place. ``last [B * L]`` (bool, packed
    rows only): the tokens followed in their row by another sequence."""

    shape: torch.Size
    groups: list[Group]
    last: torch.Tensor | None = None

    @classmethod
    def from_spans(cls, first: torch.Tensor, lengths: torch.Tensor, shape: torch.Size) -> "PackedSequences":
        """The sequences of ``lengths [n]`` tokens from flat positions ``first [n]`` of the ``[B, L]`` batch."""
        sizes = lengths.tolist()
        groups = []
        for band in _bands(sizes):
            members = torch.tensor(band, device=first.device)
            counts = lengths[members]
            rows = torch.repeat_interleave(torch.arange(len(band), device=first.device), counts)
            pos = torch.arange(len(rows), device=first.device) - (counts.cumsum(0) - counts)[rows]
            width = sizes[band[0]]
            valid = None if sizes[band[-1]] == width else torch.arange(width, device=first.device) < counts[:, None]
            groups.append(Group(first[members][rows] + pos, rows, pos, valid, len(band), width))
        return cls(shape, groups)

    @classmethod
    def from_starts(cls, starts: torch.Tensor) -> "PackedSequences":
        """The sequences that begin where ``starts [B, L]`` (bool) is set and at every row's first token."""
        starts = starts.clone()
        starts[:, 0] = True
        first = starts.flatten().nonzero().squeeze(1)
        packed = cls.from_spans(first, torch.diff(first, append=first.new_tensor([starts.numel()])), starts.shape)
        packed.last = F.pad(starts[:, 1:], (0, 1)).flatten()
        return packed

    @classmethod
    def from_mask(cls, keep: torch.Tensor) -> "PackedSequences":
        """Each row's tokens, one run of ``keep [B, L]`` (bool) a row, padding on either side of it."""
        rows, length = keep.shape
        first = keep.int().argmax(1) + torch.arange(rows, device=keep.device) * length
        return cls.from_spans(first, keep.sum(1), keep.shape)

    @classmethod
    def find(
        cls, kwargs: dict[str, Any], inputs: torch.Tensor | None, attention_mask: torch.Tensor | None = None
    ) -> "PackedSequences | None":
        """The packing that a forward call's keywords mark in its inputs (``input_ids [B, L]`` or ``inputs_embeds
        [B, L, D]``), read from ``cu_seq_lens_q`` (offsets of the sequences in the flattened batch, ``[n + 1]``),
        ``seq_idx [B, L]`` (each token's sequence) or ``position_ids [B, L]`` (restarting at 0), whichever are given;
        ``None`` where each row holds one sequence. Pops those keywords from ``kwargs``. Markings that disagree,
        negative positions or ones that neither restart at 0 nor count up by one, falling ``seq_idx``, offsets that
        run a sequence across rows, and packing together with padding, raise."""
        given = {key: kwargs.pop(key) for key in PACKING_KEYS if kwargs.get(key) is not None}
        if not given or inputs is None or inputs.dim() != (3 if inputs.is_floating_point() else 2):
            return None  # (inputs of the wrong shape: the model names them)
        return None if inputs.shape[1] < 2 else cls._read(given, inputs, attention_mask)

    @classmethod
    @torch.compiler.disable  # reads the markings (data-dependent groups): run eagerly, not traced, under torch.compile
    def _read(
        cls, given: dict[str, Any], inputs: torch.Tensor, attention_mask: torch.Tensor | None
    ) -> "PackedSequences | None":
        """:meth:`find` for the keywords ``given``: each marking given must mark the same sequences."""
        shape = inputs.shape[:2]
        check_mask_shape(attention_mask, shape)
        if "cu_seq_lens_k" in given and "cu_seq_lens_q" not in given:
            raise ValueError("cu_seq_lens_k without cu_seq_lens_q: pass the offsets as cu_seq_lens_q (and _k)")
        marked = {}
        if "cu_seq_lens_q" in given:
            marked["cu_seq_lens_q"] = _starts_from_offsets(given["cu_seq_lens_q"], given.get("cu_seq_lens_k"), shape)
        if "seq_idx" in given:
            marked["seq_idx"] = _starts_from_ids(_batch_shaped(given["seq_idx"], shape, "seq_idx"))
        if "position_ids" in given:
            positions = _batch_shaped(given["position_ids"], shape, "position_ids")
            marked["position_ids"] = _starts_from_positions(positions, attention_mask)
        if not marked:
            return None
        (name, starts), *others = marked.items()
        for other, theirs in others:
            if not torch.equal(theirs[:, 1:].to(starts.device), starts[:, 1:]):
                raise ValueError(f"{name} and {other} mark different sequences")
        if not bool(starts[:, 1:].any()):
            return None
        if attention_mask is not None and not bool(attention_mask.all()):
            raise NotImplementedError("packed sequences with padding (attention_mask zeros) are not supported: pack "
                                      "the sequences or pad them, not both")  # fmt: skip
        return cls.from_starts(starts.to(inputs.device))

    def unpack(self, x: torch.Tensor, group: Group) -> torch.Tensor:
        """``x [B, L, ...]`` -> the group's sequences ``[n, width, ...]``, one a row, zeros after its tokens."""
        out = x.new_zeros(group.n, group.width, *x.shape[2:])
        out[group.rows, group.pos] = x.flatten(0, 1)[group.tokens]
        return out

    def pack(self, ys: list[torch.Tensor]) -> torch.Tensor:
        """:meth:`unpack`'s inverse: every group's ``[n, width, ...]`` -> ``[B, L, ...]``, zeros at the padding."""
        flat = torch.cat([y[g.rows, g.pos] for y, g in zip(ys, self.groups)])
        tokens = torch.cat([g.tokens for g in self.groups])
        return flat.new_zeros(self.shape.numel(), *flat.shape[1:]).index_copy(0, tokens, flat).unflatten(0, self.shape)

    def mean(self, values: list[torch.Tensor]) -> torch.Tensor:
        """The mean over every token of per-group means ``values``."""
        counts = [len(g.tokens) for g in self.groups]
        return sum(v * n for v, n in zip(values, counts)) / sum(counts)


def _bands(sizes: list[int]) -> list[list[int]]:
    """The sequences of lengths ``sizes`` cut into groups, each listing its sequences longest first, that minimise the
    tokens the groups' batches hold (each sequence padded to its group's longest) plus, for each group, the longest
    sequence's length, for what a pass of the layers over one more batch costs (of costs from 1/4 to 4 times that
    length, on four mixed-length batches with the tiny B'MOJO on a CPU, within 8% of the fastest on each;
    ``benchmarks/RESULTS.md``). Sorted by length, the best cut of the longest ``j`` adds one group to the best cut of
    the longest ``i < j``: a dynamic programme over ``j``."""
    order = sorted(range(len(sizes)), key=lambda s: -sizes[s])
    lengths = np.array([sizes[s] for s in order], dtype=np.float64)
    best, cut = np.zeros(len(order) + 1), np.zeros(len(order) + 1, dtype=np.int64)
    for j in range(1, len(order) + 1):
        cost = best[:j] + (j - np.arange(j)) * lengths[:j] + lengths[0]
        cut[j] = cost.argmin()
        best[j] = cost[cut[j]]
    bands, j = [], len(order)
    while j:
        bands.append(order[cut[j] : j])
        j = cut[j]
    return bands[::-1]


def check_mask_shape(attention_mask: torch.Tensor | None, shape: torch.Size) -> None:
    """Raise ``ValueError`` unless ``attention_mask`` (if any) is ``[B, L]``, ``shape``."""
    if attention_mask is not None and attention_mask.shape != shape:
        raise ValueError(f"attention_mask must be [batch, length] {tuple(shape)}, got {tuple(attention_mask.shape)}")


def _batch_shaped(x: torch.Tensor, shape: torch.Size, name: str) -> torch.Tensor:
    """``x`` as ``[B, L]`` integers: given so, or as ``[L]`` / ``[1, L]`` for every row."""
    check_integers(name, x)
    if x.shape[-1:] != shape[1:] or x.dim() > 2 or (x.dim() == 2 and x.shape[0] not in (1, shape[0])):
        raise ValueError(f"{name} must be [batch, length] {tuple(shape)}, got {tuple(x.shape)}")
    return x.expand(shape)


def _starts_from_positions(positions: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Where ``positions [B, L]`` restart at 0 between two tokens (padding ignored, whatever positions it has);
    other jumps raise."""
    steps = positions.diff(dim=1)
    both = torch.ones_like(steps, dtype=torch.bool)
    if attention_mask is not None:
        both = attention_mask[:, 1:].bool() & attention_mask[:, :-1].bool()
    real = positions if attention_mask is None else positions[attention_mask.bool()]
    if bool((real < 0).any()):
        raise ValueError(f"position_ids must be >= 0, got {int(real.min())}")
    restart = both & (positions[:, 1:] == 0)
    jump = both & ~restart & (steps != 1)
    if bool(jump.any()):
        row, t = (int(i) for i in jump.nonzero()[0])
        raise ValueError(f"position_ids jump from {int(positions[row, t])} to {int(positions[row, t + 1])} in row "
                         f"{row}: positions must count up by one, restarting at 0 where a packed sequence "
                         f"begins")  # fmt: skip
    return F.pad(restart, (1, 0))


def _starts_from_offsets(offsets: torch.Tensor, offsets_k: torch.Tensor | None, shape: torch.Size) -> torch.Tensor:
    """The first tokens of the sequences at ``offsets [n + 1]`` into the flattened ``[B, L]`` batch (0, ..., B * L)."""
    check_integers("cu_seq_lens_q", offsets)
    if offsets_k is not None:
        check_integers("cu_seq_lens_k", offsets_k)
        if offsets_k.shape != offsets.shape or not bool((offsets_k == offsets).all()):
            raise ValueError("cu_seq_lens_k differs from cu_seq_lens_q: the sequences are packed the same way for "
                             "the queries and the keys")  # fmt: skip
    if offsets.dim() != 1 or len(offsets) < 2:
        raise ValueError(f"cu_seq_lens_q must be 1-D offsets [number of sequences + 1], got shape "
                         f"{tuple(offsets.shape)}")  # fmt: skip
    total = shape[0] * shape[1]
    if int(offsets[0]) != 0 or int(offsets[-1]) != total or not bool((offsets.diff() > 0).all()):
        raise ValueError(f"cu_seq_lens_q must rise from 0 to the batch's {total} tokens, got {offsets.tolist()}")
    rows = torch.arange(0, total, shape[1], device=offsets.device)
    if not bool(torch.isin(rows, offsets).all()):
        raise ValueError(f"cu_seq_lens_q {offsets.tolist()} runs a sequence across rows of length {shape[1]}: each "
                         f"row must begin a sequence")  # fmt: skip
    starts = torch.zeros(total, dtype=torch.bool, device=offsets.device)
    starts[offsets[:-1].long()] = True
    return starts.view(shape)


def _starts_from_ids(seq_idx: torch.Tensor) -> torch.Tensor:
    """Where ``seq_idx [B, L]`` (each token's sequence, rising along a row) changes between two tokens."""
    steps = seq_idx.diff(dim=1)
    if bool((steps < 0).any()):
        row = int((steps < 0).nonzero()[0, 0])
        raise ValueError(f"seq_idx falls along row {row}: a row's sequences must be numbered in order")
    return F.pad(steps != 0, (1, 0))
