"""Eidetic memory: which past tokens a B'MOJO layer keeps verbatim, chosen by an innovation test.

Every token ``t`` gets a score ``s_t``. With ``selection="innovation"`` it is the error of
predicting the (normalised) token from the fading state just before it,
``s_t = ||n(h_t) - P f_{t-1}||^2 / D``, where ``P`` is a learned linear predictor trained by an
auxiliary mean-squared loss on the detached target. ``"random"`` and ``"recency"`` give scores
without a selection signal (ablations).

Selection works at chunk boundaries: before chunk ``j`` (start ``s = j * chunk``) the memory is
the ``size`` highest-scoring tokens among positions ``< s - window`` (ties: earlier position first).
:func:`chunk_memories` computes this for a whole sequence with :func:`merge_topk`; recurrent decoding adds one
token at a time by the same rule (:func:`insert_slot`), so the two modes select identical tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bmojo.layers.checks import check_sizes
from bmojo.layers.linear import Linear
from bmojo.ops.triton import use_triton

SELECTIONS = ("innovation", "random", "recency", "none")


def position_hash(pos: torch.Tensor, seed: int) -> torch.Tensor:
    """Deterministic pseudo-random scores in ``[0, 1)`` for integer positions (a 32-bit integer mix)."""
    x = (pos.long() * 0x9E3779B1 + seed * 0x85EBCA77 + 0x165667B1) & 0xFFFFFFFF
    x = ((x ^ (x >> 16)) * 0x45D9F3B) & 0xFFFFFFFF
    x = ((x ^ (x >> 16)) * 0x45D9F3B) & 0xFFFFFFFF
    x = x ^ (x >> 16)
    return x.float() / 2**32


def merge_topk(
    mem_score: torch.Tensor, mem_pos: torch.Tensor, new_score: torch.Tensor, new_pos: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keep the ``k`` best of a memory ``[B, k]`` and newer candidates ``[B, n]``.

    The memory is sorted by (score desc, position asc) and every candidate is newer than every
    memory entry, so a stable descending sort breaks ties by earlier position. Empty slots have
    score ``-inf`` and position ``-1``. Returns ``(score, pos, index)``, where ``index [B, k]``
    points into the concatenation ``[memory, candidates]``.
    """
    score = torch.cat([mem_score, new_score], dim=1)
    pos = torch.cat([mem_pos, new_pos], dim=1)
    order = torch.sort(score, dim=1, descending=True, stable=True).indices[:, :k]
    return score.gather(1, order), pos.gather(1, order), order


def insert_slot(score: torch.Tensor, pos: torch.Tensor, new_score: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Where one candidate, newer than every entry of a memory ``score, pos [B, k]`` (in any order), goes by
    :func:`merge_topk`'s rule: ``(slot [B, 1], enter [B, 1])``. It replaces the entry that rule drops (the lowest
    score, the newest among equal scores) where it scores strictly higher (a tie keeps the earlier position)."""
    worst = score.min(1, keepdim=True).values
    slot = torch.where(score == worst, pos, -2).argmax(1, keepdim=True)
    return slot, new_score > worst


def stage_evicted(keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor, win_score: torch.Tensor,
                  pos: torch.Tensor, window: int, stage_k: torch.Tensor, stage_v: torch.Tensor,
                  stage_score: torch.Tensor, stage_pos: torch.Tensor) -> None:  # fmt: skip
    """A decoding step's eidetic candidate, the token leaving the window as the one at position ``pos [1]`` enters
    it: the one in ring slot ``pos % window`` of ``keys, values [B, Hkv, S, d]``, ``positions [B, S]`` and
    ``win_score [B, window]`` (none if its position is negative, a slot still empty) joins the staging memory
    ``stage_k, stage_v [B, Hkv, k, d]``, ``stage_score, stage_pos [B, k]`` by :func:`insert_slot`'s rule, in place.
    CUDA inputs take one Triton kernel (``bmojo.ops.triton.eidetic.stage_evicted_triton``)."""
    stage = (stage_k, stage_v, stage_score, stage_pos)
    if use_triton(keys, values, positions, win_score, pos, *stage):
        from bmojo.ops.triton.eidetic import stage_evicted_triton

        stage_evicted_triton(keys, values, positions, win_score, pos, window, *stage)
        return
    slot = pos % window
    cand_pos = positions.index_select(1, slot)
    cand_score = win_score.index_select(1, slot).masked_fill(cand_pos < 0, float("-inf"))
    at_slot, enter = insert_slot(stage_score, stage_pos, cand_score)  # [B, 1] each
    if enter.device.type == "cpu" and not torch.compiler.is_compiling() and not enter.any():
        return  # eager on a CPU, where reading the flag costs less than the writes: most candidates do not enter
    cand_k, cand_v = keys.index_select(2, slot), values.index_select(2, slot)
    replace = (torch.arange(stage_pos.shape[1], device=slot.device) == at_slot) & enter  # [B, k]: the slot it takes
    for stage, cand in ((stage_score, cand_score), (stage_pos, cand_pos)):
        stage.copy_(torch.where(replace, cand, stage))
    for stage, cand in ((stage_k, cand_k), (stage_v, cand_v)):  # [B, Hkv, k, d]; cand [B, Hkv, 1, d]
        stage.copy_(torch.where(replace[:, None, :, None], cand, stage))


def empty_memory(batch: int, k: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores ``-inf`` and positions ``-1`` for an empty memory ``[B, k]``."""
    return (
        torch.full((batch, k), float("-inf"), device=device),
        torch.full((batch, k), -1, dtype=torch.long, device=device),
    )


def chunk_memories(
    scores: torch.Tensor, window: int, chunk: int, k: int, n_chunks: int
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """Memory positions for chunks ``0..n_chunks-1`` of a sequence with ``scores [B, L]``.

    Returns ``pos [B, n_chunks, k]`` (``-1`` = empty slot) and the running memory over every
    position ``< L - window`` as ``(score, pos)``: the staging memory recurrent decoding continues.
    """
    b, length = scores.shape
    positions = torch.arange(length, device=scores.device).expand(b, length)
    mem_score, mem_pos = empty_memory(b, k, scores.device)
    done, out = 0, []
    for j in range(n_chunks + 1):
        limit = min(length, max(0, j * chunk - window)) if j < n_chunks else max(0, length - window)
        if limit > done:
            mem_score, mem_pos, _ = merge_topk(mem_score, mem_pos, scores[:, done:limit], positions[:, done:limit], k)
            done = limit
        if j < n_chunks:
            out.append(mem_pos)
    return torch.stack(out, dim=1), (mem_score, mem_pos)


def memory_before(scores: torch.Tensor, limit: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` best of each row's positions below ``limit [B]`` by :func:`merge_topk`'s rule (score descending,
    earlier position first), from ``scores [B, L]``: ``(score, pos) [B, k]`` (empty slots ``-inf``, ``-1``): the
    running memory of :func:`chunk_memories` for rows whose tokens end at different positions."""
    positions = torch.arange(scores.shape[1], device=scores.device)
    masked = scores.masked_fill(positions >= limit[:, None], float("-inf"))
    score, pos = torch.sort(F.pad(masked, (0, max(0, k - scores.shape[1])), value=float("-inf")), dim=1,
                            descending=True, stable=True)  # fmt: skip
    return score[:, :k], pos[:, :k].masked_fill(score[:, :k] == float("-inf"), -1)


class EideticMemory(nn.Module):
    """Scores tokens for the eidetic memory of one layer; owns the innovation predictor ``P``."""

    def __init__(self, hidden_size: int, size: int, window: int, chunk_size: int, selection: str, seed: int = 0):
        super().__init__()
        if selection not in SELECTIONS:
            raise ValueError(f"unknown selection {selection!r}; expected one of {SELECTIONS}")
        check_sizes(eidetic_size=size, window=window, chunk_size=chunk_size)
        self.size, self.window, self.chunk_size = size, window, chunk_size
        self.selection, self.seed = selection, seed
        self.predictor = Linear(hidden_size, hidden_size, bias=False) if selection == "innovation" else None

    def score(
        self, h: torch.Tensor, f_prev: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Scores ``[B, L]`` (float32, detached) of tokens ``h [B, L, D]`` at ``positions [L]``.

        ``f_prev [B, L, D]`` is the fading token before each position (zeros before position 0).
        Returns the scores and, for ``innovation``, the auxiliary predictor loss (a scalar): the mean over the
        positions, or over those ``valid [B, L]`` marks (padding left out).
        """
        b, length, d = h.shape
        if self.selection == "innovation":
            target = F.rms_norm(h.float(), (d,)).detach()
            err = (target - self.predictor(f_prev).float()).pow(2).mean(-1)
            return err.detach(), err.mean() if valid is None else (err * valid).sum() / valid.sum()
        if self.selection == "recency":
            return positions.float().expand(b, length), None
        return position_hash(positions, self.seed).expand(b, length), None
