"""Sequences packed into one row (Hugging Face's ``DataCollatorWithFlattening``, padding-free training): where they
lie, and the batch of one sequence a row, padded on the right, that the layers run instead."""

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

# the keywords that mark packing (Hugging Face's flash-attention ones, mamba_ssm's ``seq_idx``) or come with it
PACKING_KEYS = ("position_ids", "seq_idx", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


@dataclass
class PackedSequences:
    """Token ``i`` of a flattened ``[B, L]`` batch is token ``pos[i]`` of sequence ``seq[i]`` (``[B * L]`` each);
    ``lengths [n]`` the sequences' lengths, ``starts [B, L]`` (bool) their first tokens."""

    seq: torch.Tensor
    pos: torch.Tensor
    lengths: torch.Tensor
    starts: torch.Tensor
    longest: int

    @classmethod
    def from_starts(cls, starts: torch.Tensor) -> "PackedSequences":
        """The sequences that begin where ``starts [B, L]`` (bool) is set and at every row's first token."""
        flat = starts.clone()
        flat[:, 0] = True
        first = flat.flatten().nonzero().squeeze(1)
        lengths = torch.diff(first, append=first.new_tensor([flat.numel()]))
        seq = flat.flatten().cumsum(0) - 1
        pos = torch.arange(flat.numel(), device=flat.device) - first[seq]
        return cls(seq, pos, lengths, flat, int(lengths.max()))

    @classmethod
    def find(
        cls, kwargs: dict[str, Any], inputs: torch.Tensor | None, attention_mask: torch.Tensor | None = None
    ) -> "PackedSequences | None":
        """The packing that a forward call's keywords mark in its inputs (``input_ids [B, L]`` or ``inputs_embeds
        [B, L, D]``), read from
        ``cu_seq_lens_q`` (offsets of the sequences in the flattened batch, ``[n + 1]``), else ``seq_idx [B, L]``
        (each token's sequence), else ``position_ids [B, L]`` (restarting at 0); ``None`` where each row holds one
        sequence. Pops those keywords from ``kwargs``. Positions that neither restart at 0 nor count up by one, and
        packing together with padding, raise."""
        given = {key: kwargs.pop(key) for key in PACKING_KEYS if key in kwargs}
        if inputs is None or inputs.dim() < 2 or inputs.shape[1] < 2:
            return None
        shape = inputs.shape[:2]
        if given.get("cu_seq_lens_q") is not None:
            starts = _starts_from_offsets(given["cu_seq_lens_q"], given.get("cu_seq_lens_k"), shape)
        elif given.get("seq_idx") is not None:
            seq_idx = _batch_shaped(given["seq_idx"], shape, "seq_idx")
            starts = F.pad(seq_idx.diff(dim=1) != 0, (1, 0))
        elif given.get("position_ids") is not None:
            starts = _starts_from_positions(_batch_shaped(given["position_ids"], shape, "position_ids"), attention_mask)
        else:
            return None
        if not bool(starts[:, 1:].any()):
            return None
        if attention_mask is not None and not bool(attention_mask.all()):
            raise NotImplementedError("packed sequences with padding (attention_mask zeros) are not supported: pack "
                                      "the sequences or pad them, not both")  # fmt: skip
        return cls.from_starts(starts.to(inputs.device))

    @property
    def valid(self) -> torch.Tensor | None:
        """``[n, longest]`` (bool): each sequence's tokens in :meth:`unpack`'s batch; ``None`` if none is padded."""
        if bool((self.lengths == self.longest).all()):
            return None
        return torch.arange(self.longest, device=self.lengths.device) < self.lengths[:, None]

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        """``x [B, L, ...]`` -> ``[n, longest, ...]``: one sequence a row, zeros after its tokens."""
        out = x.new_zeros(len(self.lengths), self.longest, *x.shape[2:])
        out[self.seq, self.pos] = x.flatten(0, 1)
        return out

    def pack(self, y: torch.Tensor) -> torch.Tensor:
        """:meth:`unpack`'s inverse: ``y [n, longest, ...]`` -> ``[B, L, ...]``."""
        return y[self.seq, self.pos].unflatten(0, self.starts.shape)

    def last_tokens(self) -> torch.Tensor:
        """``[B * L]`` (bool): each sequence's last token, whose next token in its row is another sequence's."""
        return F.pad(self.starts[:, 1:], (0, 1)).flatten()


def _batch_shaped(x: torch.Tensor, shape: torch.Size, name: str) -> torch.Tensor:
    """``x`` as ``[B, L]`` integers: given so, or as ``[L]`` / ``[1, L]`` for every row."""
    if not isinstance(x, torch.Tensor) or x.dtype.is_floating_point or x.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got {getattr(x, 'dtype', type(x).__name__)}")
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
    restart = both & (positions[:, 1:] == 0)
    jump = both & ~restart & (steps != 1)
    if bool(jump.any()):
        row, t = (int(i) for i in jump.nonzero()[0])
        raise ValueError(f"position_ids jump from {int(positions[row, t])} to {int(positions[row, t + 1])} in row "
                         f"{row}: positions must count up by one, restarting at 0 where a packed sequence begins")  # fmt: skip
    return F.pad(restart, (1, 0))


def _starts_from_offsets(offsets: torch.Tensor, offsets_k: torch.Tensor | None, shape: torch.Size) -> torch.Tensor:
    """The first tokens of the sequences at ``offsets [n + 1]`` into the flattened ``[B, L]`` batch (0, ..., B * L)."""
    if offsets_k is not None and not torch.equal(offsets_k, offsets):
        raise ValueError("cu_seq_lens_k differs from cu_seq_lens_q: the sequences are packed the same way for the "
                         "queries and the keys")  # fmt: skip
    if offsets.dim() != 1 or offsets.dtype.is_floating_point or len(offsets) < 2:
        raise ValueError(f"cu_seq_lens_q must be 1-D integer offsets [number of sequences + 1], got {offsets.dtype} "
                         f"of shape {tuple(offsets.shape)}")  # fmt: skip
    total = shape[0] * shape[1]
    if int(offsets[0]) != 0 or int(offsets[-1]) != total or not bool((offsets.diff() > 0).all()):
        raise ValueError(f"cu_seq_lens_q must rise from 0 to the batch's {total} tokens, got {offsets.tolist()}")
    starts = torch.zeros(total, dtype=torch.bool, device=offsets.device)
    starts[offsets[:-1].long()] = True
    return starts.view(shape)
