"""B'MOJO's read-out (``bmojo.ops.attention.union_attention``) as Triton kernels, forward and backward.

One softmax of each query over up to two bands of aligned keys (query ``i`` sees key ``j`` of a band iff ``lo <= i -
j <= hi``: the window and the fading band) and its chunk's memory (the eidetic tokens), as in FlashAttention: a
program per block of queries walks only the key blocks its bands and chunks can reach, with a running max and sum,
and writes ``o`` and the LSE; nothing ``L x L`` is built, and visibility is tested only in the blocks at a band's
edges (the blocks every query of a tile sees skip it). Backward:
``dq`` by the same walk; ``dk, dv`` by a program per block of band keys (or per chunk of memory) walking the query
blocks that see it, over every query head of its group, so no atomics. The LSE's gradient enters as ``D = rowsum(do *
o) - dlse``. Scores are kept in log2 units (``exp2``); arithmetic in float32, products in the inputs' dtype (full
float32 products for float32 inputs).

The calls are ``torch.library.triton_op`` custom ops, so ``torch.compile`` keeps the kernels and differentiates
through them. On a GPU, the tiles are first cut down where the kernels could need more shared memory than it has
(:func:`fit_tiles`: float32 inputs of head dim 128 at the default tiles need about 190 KiB, where an A100 has 163
and a consumer Ampere or Ada GPU 99). Importing this module imports ``triton``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from bmojo.ops.attention import AttnOut, Band, ChunkMemory, check_union_inputs
from bmojo.ops.triton import check_inputs, dot_precision, dot_tile, kernel_op

LOG2E = math.log2(math.e)
TRITON_STAGES = 3  # Triton's num_stages on CUDA where a launch names none
Tiles = tuple[int, int, int, int, int, int, int, int]  # block_m, block_n, num_warps, num_stages, then the backward's


@triton.jit
def _attend(q, k, v, visible, acc, m_i, l_i, qk_scale, MASKED: tl.constexpr, PRECISION: tl.constexpr):
    """One block of keys ``k, v [N, D]`` into the running softmax of ``q [M, D]``: ``(acc, max, sum)``."""
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
    if MASKED:
        s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that see nothing yet
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return acc, m_new, l_i * alpha + tl.sum(p, 1)


@triton.jit
def _grad_q(q, do, k, v, visible, lse2, delta, dq, qk_scale, MASKED: tl.constexpr, PRECISION: tl.constexpr):
    """``dq [M, D]`` plus one block of keys' share (in units of the softmax scale)."""
    p = tl.exp2(tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale - lse2[:, None])
    if MASKED:
        p = tl.where(visible, p, 0.0)
    ds = p * (tl.dot(do, tl.trans(v), input_precision=PRECISION) - delta[:, None])
    return dq + tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)


@triton.jit
def _grad_kv(k, v, q, do, visible, lse2, delta, dk, dv, qk_scale, MASKED: tl.constexpr, PRECISION: tl.constexpr):
    """``dk, dv [N, D]`` plus one block of queries' share; ``visible [N, M]`` (keys by queries)."""
    p = tl.exp2(tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale - lse2[None, :])
    if MASKED:
        p = tl.where(visible, p, 0.0)
    dv += tl.dot(p.to(do.dtype), do, input_precision=PRECISION)
    ds = p * (tl.dot(v, tl.trans(do), input_precision=PRECISION) - delta[None, :])
    return dk + tl.dot(ds.to(q.dtype), q, input_precision=PRECISION), dv


@triton.jit
def _band_reach(band, lo0, hi0, lo1, hi1):
    """``(lo, hi)`` of band 0 or 1."""
    return tl.where(band == 0, lo0, lo1), tl.where(band == 0, hi0, hi1)


@triton.jit
def _full_blocks(first, end, low, high, BLOCK: tl.constexpr):
    """``(full_lo, full_hi)``: the blocks of ``BLOCK`` steps from ``first`` (a multiple of ``BLOCK``) below ``end``
    that lie within ``[low, high)``, as ``[first, full_lo) | [full_lo, full_hi) | [full_hi, end)``."""
    full_lo = tl.minimum(tl.maximum(first, (tl.maximum(low, 0) + BLOCK - 1) // BLOCK * BLOCK), end)
    return full_lo, tl.maximum(full_lo, tl.minimum(tl.maximum(high, 0) // BLOCK * BLOCK, end))


@triton.jit
def _key_blocks(
    q, do, lse2, delta, acc, m_i, l_i, k_base, v_base, sk_t, sv_t, i, d_ok, lo, hi, first, end, length, qk_scale,
    BACKWARD: tl.constexpr, MASKED: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """Key blocks ``first, first + BLOCK_N, ...`` below ``end`` of a band seen by queries ``i`` at distances ``lo..hi``
    into the running softmax ``(acc, m_i, l_i)``, or (``BACKWARD``) into ``dq`` (``acc``). Without ``MASKED`` every
    query sees every key of these blocks: no visibility is evaluated."""
    for key in range(first, end, BLOCK_N):
        j = key + tl.arange(0, BLOCK_N)
        kv_ok = (j < length)[:, None] & d_ok[None, :]
        k = tl.load(k_base + j[:, None] * sk_t, mask=kv_ok, other=0.0)
        v = tl.load(v_base + j[:, None] * sv_t, mask=kv_ok, other=0.0)
        dist = i[:, None] - j[None, :]
        visible = (dist >= lo) & (dist <= hi) & (j < length)[None, :]
        if BACKWARD:
            acc = _grad_q(q, do, k, v, visible, lse2, delta, acc, qk_scale, MASKED, PRECISION)
        else:
            acc, m_i, l_i = _attend(q, k, v, visible, acc, m_i, l_i, qk_scale, MASKED, PRECISION)
    return acc, m_i, l_i


@triton.jit
def _query_kernel(
    q_ptr, k_ptr, v_ptr, mk_ptr, mv_ptr, valid_ptr, do_ptr, lse_ptr, delta_ptr, out_ptr,
    length, heads, group, head_dim, lo0, hi0, lo1, hi1, chunk, slots, qk_scale, sm_scale,
    sq_b, sq_h, sq_t, sq_d, sk_s, sk_b, sk_h, sk_t, sk_d, sv_s, sv_b, sv_h, sv_t, sv_d,
    smk_b, smk_h, smk_c, smk_m, smk_d, smv_b, smv_h, smv_c, smv_m, smv_d, sva_b, sva_c, sva_m,
    sdo_b, sdo_h, sdo_t, sdo_d,
    BACKWARD: tl.constexpr, BANDS: tl.constexpr, HAS_MEMORY: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """One block of queries over the key blocks its bands and chunks reach: ``o`` into ``out`` and the LSE into
    ``lse``, or (``BACKWARD``) ``dq`` into ``out`` from ``do``, the LSE and ``delta``. ``k, v [bands, b, Hkv, L, D]``
    (``s*_s`` the band stride); ``out [b, H, L, D]`` and ``lse, delta [b, H, L]`` contiguous."""
    # float arguments reach the kernel as float64 from torch.compile's launches: keep the arithmetic float32
    qk_scale, sm_scale = tl.cast(qk_scale, tl.float32), tl.cast(sm_scale, tl.float32)
    start = tl.program_id(0) * BLOCK_M  # axes: query blocks, batch, heads (each under CUDA's 65,535 for axes 1, 2)
    batch, head = tl.program_id(1).to(tl.int64), tl.program_id(2).to(tl.int64)
    kv_head = head // group
    i = start + tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    i_ok, d_ok = i < length, d < head_dim
    q_ok = i_ok[:, None] & d_ok[None, :]
    row = (batch * heads + head) * length + i
    q = tl.load(q_ptr + batch * sq_b + head * sq_h + i[:, None] * sq_t + d[None, :] * sq_d, mask=q_ok, other=0.0)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)  # o's numerator, or dq
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    if BACKWARD:
        do = tl.load(do_ptr + batch * sdo_b + head * sdo_h + i[:, None] * sdo_t + d[None, :] * sdo_d, mask=q_ok,
                     other=0.0)  # fmt: skip
        lse2 = tl.load(lse_ptr + row, mask=i_ok, other=0.0) * 1.4426950408889634
        lse2 = tl.where(lse2 == float("-inf"), 0.0, lse2)  # rows that see no key: every p is masked to 0
        delta = tl.load(delta_ptr + row, mask=i_ok, other=0.0)
    else:
        do, lse2, delta = q, m_i, m_i  # (not read)
    for band in tl.static_range(BANDS):
        lo, hi = _band_reach(band, lo0, hi0, lo1, hi1)
        k_base = k_ptr + band * sk_s + batch * sk_b + kv_head * sk_h + d[None, :] * sk_d
        v_base = v_ptr + band * sv_s + batch * sv_b + kv_head * sv_h + d[None, :] * sv_d
        first = tl.maximum(start - hi, 0) // BLOCK_N * BLOCK_N
        end = tl.minimum(start + BLOCK_M - lo, length)
        # keys every query of the block sees: from (last query - hi) to (first query - lo), inside the sequence
        full_lo, full_hi = _full_blocks(first, end, start + BLOCK_M - 1 - hi, tl.minimum(start - lo + 1, length),
                                        BLOCK_N)  # fmt: skip
        reach = (k_base, v_base, sk_t, sv_t, i, d_ok, lo, hi)
        acc, m_i, l_i = _key_blocks(q, do, lse2, delta, acc, m_i, l_i, *reach, first, full_lo, length, qk_scale,
                                    BACKWARD, True, BLOCK_N, PRECISION)  # fmt: skip
        acc, m_i, l_i = _key_blocks(q, do, lse2, delta, acc, m_i, l_i, *reach, full_lo, full_hi, length, qk_scale,
                                    BACKWARD, False, BLOCK_N, PRECISION)  # fmt: skip
        acc, m_i, l_i = _key_blocks(q, do, lse2, delta, acc, m_i, l_i, *reach, full_hi, end, length, qk_scale,
                                    BACKWARD, True, BLOCK_N, PRECISION)  # fmt: skip
    if HAS_MEMORY:
        s = tl.arange(0, BLOCK_S)
        s_ok = s < slots
        kv_ok = s_ok[:, None] & d_ok[None, :]
        mk_base = mk_ptr + batch * smk_b + kv_head * smk_h + s[:, None] * smk_m + d[None, :] * smk_d
        mv_base = mv_ptr + batch * smv_b + kv_head * smv_h + s[:, None] * smv_m + d[None, :] * smv_d
        for c in range(start // chunk, (tl.minimum(start + BLOCK_M, length) - 1) // chunk + 1):
            ok = tl.load(valid_ptr + batch * sva_b + c * sva_c + s * sva_m, mask=s_ok, other=0) != 0
            k = tl.load(mk_base + c * smk_c, mask=kv_ok, other=0.0)
            v = tl.load(mv_base + c * smv_c, mask=kv_ok, other=0.0)
            visible = (i // chunk == c)[:, None] & ok[None, :]
            if BACKWARD:
                acc = _grad_q(q, do, k, v, visible, lse2, delta, acc, qk_scale, True, PRECISION)
            else:
                acc, m_i, l_i = _attend(q, k, v, visible, acc, m_i, l_i, qk_scale, True, PRECISION)
    out = out_ptr + row[:, None] * head_dim + d[None, :]
    if BACKWARD:
        tl.store(out, (acc * sm_scale).to(out_ptr.dtype.element_ty), mask=q_ok)
    else:
        seen = l_i > 0
        l_safe = tl.where(seen, l_i, 1.0)
        tl.store(out, (acc / l_safe[:, None]).to(out_ptr.dtype.element_ty), mask=q_ok)
        tl.store(lse_ptr + row, tl.where(seen, (m_i + tl.log2(l_safe)) / 1.4426950408889634, float("-inf")), mask=i_ok)


@triton.jit
def _query_blocks(
    k, v, dk, dv, key_ok, j, q_base, do_base, row_base, lse_ptr, delta_ptr, sq_t, sdo_t, d_ok, lo, hi, first, end,
    qk_scale, MASKED: tl.constexpr, BLOCK_M: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """Query blocks ``first, first + BLOCK_M, ...`` below ``end`` (of one head) into ``dk, dv`` of keys ``j`` (seen at
    distances ``lo..hi``, and where ``key_ok``). Without ``MASKED`` every query sees every key: nothing evaluated."""
    for start in range(first, end, BLOCK_M):
        i = start + tl.arange(0, BLOCK_M)
        i_ok = i < end
        q_ok = i_ok[:, None] & d_ok[None, :]
        q = tl.load(q_base + i[:, None] * sq_t, mask=q_ok, other=0.0)
        do = tl.load(do_base + i[:, None] * sdo_t, mask=q_ok, other=0.0)
        lse2 = tl.load(lse_ptr + row_base + i, mask=i_ok, other=0.0) * 1.4426950408889634
        delta = tl.load(delta_ptr + row_base + i, mask=i_ok, other=0.0)
        dist = i[None, :] - j[:, None]
        visible = key_ok[:, None] & i_ok[None, :] & (dist >= lo) & (dist <= hi)
        dk, dv = _grad_kv(k, v, q, do, visible, lse2, delta, dk, dv, qk_scale, MASKED, PRECISION)
    return dk, dv


@triton.jit
def _bwd_kv_kernel(
    q_ptr, k_ptr, v_ptr, valid_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
    batch_size, length, heads, group, head_dim, lo0, hi0, lo1, hi1, chunk, n_keys, qk_scale, sm_scale,
    sq_b, sq_h, sq_t, sq_d, sk_s, sk_b, sk_h, sk_t, sk_d, sv_s, sv_b, sv_h, sv_t, sv_d, sva_b, sva_c, sva_m,
    sdo_b, sdo_h, sdo_t, sdo_d,
    MEMORY: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    """``dk, dv`` over every query head of a group: of one block of a band's keys (``k [bands, b, Hkv, L, D]``,
    ``s*_s`` the band stride; program axes: key blocks, ``(band, batch)``, kv heads), or of one chunk's memory
    (``MEMORY``: ``k [b, Hkv, chunks, n_keys slots, D]``, ``s*_s`` the chunk stride, ``s*_t`` the slot stride; axes:
    chunks, batch, kv heads). ``dk, dv`` are contiguous like ``k``."""
    # float arguments reach the kernel as float64 from torch.compile's launches: keep the arithmetic float32
    qk_scale, sm_scale = tl.cast(qk_scale, tl.float32), tl.cast(sm_scale, tl.float32)
    pid, band_batch, kv_head = tl.program_id(0), tl.program_id(1).to(tl.int64), tl.program_id(2).to(tl.int64)
    kv_heads = heads // group
    band, batch = band_batch // batch_size, band_batch % batch_size
    bh = band_batch * kv_heads + kv_head  # (band, batch, kv head) in the contiguous dk, dv
    d = tl.arange(0, BLOCK_D)
    d_ok = d < head_dim
    if MEMORY:
        j = tl.arange(0, BLOCK_N)
        j_ok = j < n_keys
        k_base = k_ptr + batch * sk_b + kv_head * sk_h + pid * sk_s
        v_base = v_ptr + batch * sv_b + kv_head * sv_h + pid * sv_s
        key_ok = j_ok & (tl.load(valid_ptr + batch * sva_b + pid * sva_c + j * sva_m, mask=j_ok, other=0) != 0)
        first, end = pid * chunk, tl.minimum(pid * chunk + chunk, length)
        lo, hi = -BLOCK_N, length  # every query of the chunk sees every valid slot
        full_lo, full_hi = end, end  # (validity is tested everywhere)
        out = (bh * tl.num_programs(0) + pid) * n_keys + j
    else:
        j = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        j_ok = j < n_keys
        k_base = k_ptr + band * sk_s + batch * sk_b + kv_head * sk_h
        v_base = v_ptr + band * sv_s + batch * sv_b + kv_head * sv_h
        key_ok = j_ok
        lo, hi = _band_reach(band, lo0, hi0, lo1, hi1)
        key = pid * BLOCK_N
        first = tl.maximum(key + lo, 0) // BLOCK_M * BLOCK_M
        end = tl.minimum(key + BLOCK_N + hi, length)
        # queries that see every key of the block: from (last key + lo) to (first key + hi), when the block is whole
        high = tl.where(key + BLOCK_N <= n_keys, tl.minimum(key + hi + 1, length), 0)
        full_lo, full_hi = _full_blocks(first, end, key + BLOCK_N - 1 + lo, high, BLOCK_M)
        out = bh * n_keys + j
    kv_ok = j_ok[:, None] & d_ok[None, :]
    k = tl.load(k_base + j[:, None] * sk_t + d[None, :] * sk_d, mask=kv_ok, other=0.0)
    v = tl.load(v_base + j[:, None] * sv_t + d[None, :] * sv_d, mask=kv_ok, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for g in range(group):
        head = kv_head * group + g
        q_base = q_ptr + batch * sq_b + head * sq_h + d[None, :] * sq_d
        do_base = do_ptr + batch * sdo_b + head * sdo_h + d[None, :] * sdo_d
        reach = (key_ok, j, q_base, do_base, (batch * heads + head) * length, lse_ptr, delta_ptr, sq_t, sdo_t, d_ok,
                 lo, hi)  # fmt: skip
        dk, dv = _query_blocks(k, v, dk, dv, *reach, first, full_lo, qk_scale, True, BLOCK_M, PRECISION)
        dk, dv = _query_blocks(k, v, dk, dv, *reach, full_lo, full_hi, qk_scale, False, BLOCK_M, PRECISION)
        dk, dv = _query_blocks(k, v, dk, dv, *reach, full_hi, end, qk_scale, True, BLOCK_M, PRECISION)
    tl.store(dk_ptr + out[:, None] * head_dim + d[None, :], (dk * sm_scale).to(dk_ptr.dtype.element_ty), mask=kv_ok)
    tl.store(dv_ptr + out[:, None] * head_dim + d[None, :], dv.to(dv_ptr.dtype.element_ty), mask=kv_ok)


def readout_kernels(backward: bool, bands: int, slots: int, block_m: int, block_n: int, d: int,
                    precision: str) -> list[tuple[str, Any, dict[str, Any]]]:  # fmt: skip
    """``(name, kernel, compile-time arguments)`` of each launch of the read-out's forward (``"forward"``) or backward
    (``"dq"``, ``"dk, dv"`` and, with memory, ``"memory"``) over ``bands`` bands and memories of ``slots`` tokens (0:
    none) at head dim ``d``: what the launches pass, and what ``benchmarks/kernel_registers.py`` compiles."""
    common = dict(BLOCK_M=block_m, BLOCK_D=dot_tile(d), PRECISION=precision)
    query = dict(BACKWARD=backward, BANDS=bands, HAS_MEMORY=slots > 0, BLOCK_N=block_n, BLOCK_S=dot_tile(slots),
                 **common)  # fmt: skip
    if not backward:
        return [("forward", _query_kernel, query)]
    keys = dict(MEMORY=False, BLOCK_N=block_n, **common)
    memory = [("memory", _bwd_kv_kernel, {**keys, "MEMORY": True, "BLOCK_N": dot_tile(slots)})] if slots else []
    return [("dq", _query_kernel, query), ("dk, dv", _bwd_kv_kernel, keys), *memory]


def _memory_args(q: torch.Tensor, mk: torch.Tensor | None, mv: torch.Tensor | None, valid: torch.Tensor | None):
    """``(tensors, strides, slots)`` of the memory for the kernels (``q``, zero strides and no slots when absent)."""
    if mk is None:
        return (q, q, q), (0,) * 13, 0
    return (mk, mv, valid), (*mk.stride(), *mv.stride(), *valid.stride()), mk.shape[3]


def _empty(x: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor of ``x``'s shape, dtype and device (the kernels write their outputs contiguous)."""
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


def _launch(num_warps: int, num_stages: int) -> dict[str, int]:
    """Launch options given (non-zero) for the kernels."""
    return {k: v for k, v in (("num_warps", num_warps), ("num_stages", num_stages)) if v}


def _run_query_kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mk: torch.Tensor | None,
                      mv: torch.Tensor | None, valid: torch.Tensor | None, spans: tuple[int, ...], scale: float,
                      out: torch.Tensor, lse: torch.Tensor, block_m: int, block_n: int, launch: dict[str, int],
                      do: torch.Tensor | None = None, delta: torch.Tensor | None = None) -> None:  # fmt: skip
    """:func:`_query_kernel` over every block of queries: the forward (``o`` into ``out``, the LSE into ``lse``), or
    with ``do`` and ``delta`` the queries' gradient into ``out``. ``spans``: ``lo0, hi0, lo1, hi1, chunk``."""
    b, hq, length, d = q.shape
    (mk_, mv_, valid_), mem_strides, slots = _memory_args(q, mk, mv, valid)
    backward = do is not None
    (_, _, constexprs), *_ = readout_kernels(backward, k.shape[0], slots, block_m, block_n, d, dot_precision(q))
    wrap_triton(_query_kernel)[(triton.cdiv(length, block_m), b, hq)](
        q, k, v, mk_, mv_, valid_, do if backward else q, lse, delta if backward else lse, out, length, hq,
        hq // k.shape[2], d, *spans, slots, scale * LOG2E, scale, *q.stride(), *k.stride(), *v.stride(), *mem_strides,
        *(do.stride() if backward else (0,) * 4), **constexprs, **launch,
    )  # fmt: skip


@kernel_op("bmojo::union_attention_fwd")
def _union_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mk: torch.Tensor | None, mv: torch.Tensor | None,
               valid: torch.Tensor | None, lo0: int, hi0: int, lo1: int, hi1: int, chunk: int, scale: float,
               block_m: int, block_n: int, num_warps: int, num_stages: int, bwd_block_m: int, bwd_block_n: int,
               bwd_num_warps: int, bwd_num_stages: int) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """``(o [B, Hq, L, d] in q's dtype, lse [B, Hq, L] float32)`` of ``q`` over the bands ``k, v [bands, B, Hkv, L,
    d]`` and the chunk memories ``mk, mv [B, Hkv, chunks, slots, d]``, ``valid [B, chunks, slots]`` (uint8);
    ``num_warps, num_stages`` 0: Triton's defaults; the ``bwd_`` tiles are the backward's (:func:`_setup` passes them
    on)."""
    o = _empty(q)
    lse = torch.empty(q.shape[:3], dtype=torch.float32, device=q.device)
    _run_query_kernel(q, k, v, mk, mv, valid, (lo0, hi0, lo1, hi1, chunk), scale, o, lse, block_m, block_n,
                      _launch(num_warps, num_stages))  # fmt: skip
    return o, lse


@kernel_op("bmojo::union_attention_bwd")
def _union_bwd(do: torch.Tensor, dlse: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               mk: torch.Tensor | None, mv: torch.Tensor | None, valid: torch.Tensor | None, o: torch.Tensor,
               lse: torch.Tensor, lo0: int, hi0: int, lo1: int, hi1: int, chunk: int, scale: float, block_m: int,
               block_n: int, num_warps: int, num_stages: int) -> list[torch.Tensor]:  # fmt: skip
    """Gradients of :func:`_union_fwd` with respect to ``q, k, v, mk, mv`` (the last two empty without memory)."""
    b, hq, length, d = q.shape
    hkv = k.shape[2]
    delta = ((do.float() * o.float()).sum(-1) - dlse).contiguous()
    lse = lse.contiguous()
    dq, dk, dv = _empty(q), _empty(k), _empty(v)
    launch = _launch(num_warps, num_stages)
    _run_query_kernel(q, k, v, mk, mv, valid, (lo0, hi0, lo1, hi1, chunk), scale, dq, lse, block_m, block_n,
                      launch, do, delta)  # fmt: skip
    slots = 0 if mk is None else mk.shape[3]
    _, (_, _, keys), *memory = readout_kernels(True, k.shape[0], slots, block_m, block_n, d, dot_precision(q))
    group_args = (hq, hq // hkv, d, lo0, hi0, lo1, hi1, chunk)
    wrap_triton(_bwd_kv_kernel)[(triton.cdiv(length, block_n), k.shape[0] * b, hkv)](
        q, k, v, q, do, lse, delta, dk, dv, b, length, *group_args, length, scale * LOG2E, scale,
        *q.stride(), *k.stride(), *v.stride(), 0, 0, 0, *do.stride(), **keys, **launch,
    )  # fmt: skip
    if mk is None:
        return [dq, dk, dv, q.new_empty(0), q.new_empty(0)]
    dmk, dmv = _empty(mk), _empty(mv)
    for _, kernel, constexprs in memory:  # none for memories of no slots
        wrap_triton(kernel)[(mk.shape[2], b, hkv)](
            q, mk, mv, valid, do, lse, delta, dmk, dmv, b, length, *group_args, slots, scale * LOG2E, scale,
            *q.stride(), mk.stride(2), *mk.stride()[:2], *mk.stride()[3:], mv.stride(2), *mv.stride()[:2],
            *mv.stride()[3:], *valid.stride(), *do.stride(), **constexprs, **launch,
        )  # fmt: skip
    return [dq, dk, dv, dmk, dmv]


def _setup(ctx, inputs, output) -> None:
    q, k, v, mk, mv, valid, lo0, hi0, lo1, hi1, chunk, scale, *tiles = inputs
    ctx.save_for_backward(q, k, v, mk, mv, valid, *output)
    backward_tiles = tiles[4:]  # after the forward's block_m, block_n, num_warps, num_stages
    ctx.args = (lo0, hi0, lo1, hi1, chunk, scale, *backward_tiles)
    ctx.inputs = len(inputs)


def _backward(ctx, do: torch.Tensor, dlse: torch.Tensor):
    q, k, v, mk, mv, valid, o, lse = ctx.saved_tensors
    dq, dk, dv, dmk, dmv = _union_bwd(do, dlse, q, k, v, mk, mv, valid, o, lse, *ctx.args)
    memory_grads = (None, None) if mk is None else (dmk, dmv)
    return dq, dk, dv, *memory_grads, *(None,) * (ctx.inputs - 5)


_union_fwd.register_autograd(_backward, setup_context=_setup)


def shared_bound(backward: bool, block_m: int, block_n: int, stages: int, d: int, slots: int, itemsize: int) -> int:
    """Bytes of shared memory the forward's kernel, or the most any of the backward's kernels, needs at most at these
    tiles, for head dim ``d`` in ``itemsize``-byte inputs and memories of ``slots`` tokens: tiles of ``BLOCK_D =
    dot_tile(d)`` columns and as many rows as the kernel holds at once (its own block, ``stages`` of the blocks it
    walks, of keys ``n = max(block_n, memory slots)`` or queries). It bounds what Triton 3.9 compiles for an A100,
    an RTX 3090 and an H100 (by 2-3x for 16-bit inputs, closer for float32; ``benchmarks/kernel_registers.py
    --shared`` checks it), 1 KiB more for what Triton adds."""
    n = max(block_n, dot_tile(slots))
    if backward:  # dq: queries and their gradients, stages of keys and values; dk, dv: the reverse (2 stages at least)
        rows = max(2 * block_m + 2 * stages * n, 2 * n + 2 * max(stages, 2) * block_m)
    else:
        rows = block_m + 2 * stages * n
    return rows * dot_tile(d) * itemsize + 1024


def _smaller(block_m: int, block_n: int, stages: int) -> list[tuple[int, int, int]]:
    """``(block_m, block_n, stages)`` to try, from those given: fewer stages, then the larger block halved (the key
    block first), down to 16 x 16 at one stage."""
    out = []
    while True:
        out += [(block_m, block_n, s) for s in range(stages, 0, -1)]
        if block_m == block_n == 16:
            return out
        if block_n >= block_m:
            block_n //= 2
        else:
            block_m //= 2


def fit_tiles(tiles: Tiles, d: int, slots: int, itemsize: int, limit: int) -> Tiles | None:
    """``tiles`` (as :func:`union_attention_triton` launches them; 0: Triton's defaults) with the forward's and the
    backward's ``block_m, block_n, num_stages`` cut down (:func:`_smaller`) until their kernels need at most
    ``limit`` bytes of shared memory (:func:`shared_bound`) at head dim ``d`` in ``itemsize``-byte inputs; ``None``
    when no tiles do."""
    fitted: list[int] = []
    for backward, (block_m, block_n, warps, stages) in ((False, tiles[:4]), (True, tiles[4:])):
        for m, n, s in _smaller(block_m, block_n, stages or TRITON_STAGES):
            if shared_bound(backward, m, n, s, d, slots, itemsize) <= limit:
                fitted += [m, n, warps, s]
                break
        else:
            return None
    return tuple(fitted)


_SHARED_MEMORY: dict[torch.device, int] = {}


@torch.compiler.assume_constant_result
def _shared_memory(device: torch.device) -> int:
    """Bytes of shared memory a block may use on a CUDA ``device`` (what Triton checks a launch against); a constant
    of a ``torch.compile`` graph."""
    if device not in _SHARED_MEMORY:
        index = torch.cuda.current_device() if device.index is None else device.index
        _SHARED_MEMORY[device] = triton.runtime.driver.active.utils.get_device_properties(index)["max_shared_mem"]
    return _SHARED_MEMORY[device]


def launch_tiles(q: torch.Tensor, bands: list[Band], memory: ChunkMemory | None = None, block_m: int = 64,
                 block_n: int = 64, num_warps: int = 0, num_stages: int = 0, bwd_block_m: int = 0,
                 bwd_block_n: int = 0, bwd_num_warps: int = 0, bwd_num_stages: int = 0) -> Tiles | None:  # fmt: skip
    """The tiles :func:`union_attention_triton` launches its kernels with for these inputs and options: as given
    (the ``bwd_`` ones, 0: the forward's), on a GPU cut down to fit its shared memory (:func:`fit_tiles`; ``None``
    when nothing fits)."""
    bwd_block_m, bwd_block_n = bwd_block_m or block_m, bwd_block_n or block_n
    for name, value in (("block_m", block_m), ("block_n", block_n), ("bwd_block_m", bwd_block_m),
                        ("bwd_block_n", bwd_block_n)):  # fmt: skip
        if value < 16 or value & (value - 1):
            raise ValueError(f"{name} must be a power of two >= 16, got {value}")
    tiles = (block_m, block_n, num_warps, num_stages, bwd_block_m, bwd_block_n, bwd_num_warps or num_warps,
             bwd_num_stages or num_stages)  # fmt: skip
    if not q.is_cuda or torch.version.hip is not None:  # the bound is NVIDIA's (ROCm: Triton's own defaults)
        return tiles
    slots = 0 if memory is None else memory.k.shape[3]
    return fit_tiles(tiles, q.shape[-1], slots, q.element_size(), _shared_memory(q.device))


def union_attention_triton(
    q: torch.Tensor,
    bands: list[Band],
    memory: ChunkMemory | None = None,
    block_m: int = 64,
    block_n: int = 64,
    num_warps: int = 0,
    num_stages: int = 0,
    bwd_block_m: int = 0,
    bwd_block_n: int = 0,
    bwd_num_warps: int = 0,
    bwd_num_stages: int = 0,
    scale: float | None = None,
) -> AttnOut:
    """``bmojo.ops.attention.union_attention`` of ``q [B, Hq, L, d]`` over one or two ``bands`` and the per-chunk
    ``memory`` in the Triton kernels: ``(o [B, Hq, L, d], lse [B, Hq, L] float32)``, differentiable.

    ``block_m`` queries and ``block_n`` keys per tile, powers of two >= 16, and ``num_warps``, ``num_stages`` (0:
    Triton's defaults) of the forward kernel; the ``bwd_`` ones of the backward's two kernels (0: the forward's); on
    a GPU, cut down where they would need more shared memory than it has (:func:`launch_tiles`; ``ValueError`` when
    nothing fits). Two bands' keys (values) are stacked into one ``[2, B, Hkv, L, d]`` tensor (a copy) for the
    kernels.
    """
    if not 1 <= len(bands) <= 2:
        raise ValueError(f"union_attention_triton takes one or two bands, got {len(bands)}")
    check_union_inputs(q, bands, memory)
    d, length = q.shape[3], q.shape[2]
    band_tensors = [x for band in bands for x in (band.k, band.v)]
    check_inputs(q, *band_tensors, *([] if memory is None else [memory.k, memory.v, memory.valid]))
    spans = [(band.lo, length if band.hi is None else band.hi) for band in bands] + [(0, -1)]
    k, v = (torch.stack(xs) if len(xs) > 1 else xs[0].unsqueeze(0) for xs in (band_tensors[::2], band_tensors[1::2]))
    mk, mv, valid, chunk = (None, None, None, 1) if memory is None else (memory.k, memory.v, memory.valid, memory.chunk)
    if valid is not None:  # the kernels read bytes; a copy, since inductor cannot lower viewing bool as uint8
        valid = valid.to(torch.uint8)
    scale = d**-0.5 if scale is None else scale
    tiles = launch_tiles(q, bands, memory, block_m, block_n, num_warps, num_stages, bwd_block_m, bwd_block_n,
                         bwd_num_warps, bwd_num_stages)  # fmt: skip
    if tiles is None:
        raise ValueError(f"no tiles of our read-out kernels fit this GPU's shared memory for head dim {d} in {q.dtype}: "
                         "use 16-bit inputs (autocast) or another attention_impl ('flex')")  # fmt: skip
    return _union_fwd(q, k, v, mk, mv, valid, *spans[0], *spans[1], chunk, scale, *tiles)
