"""Banded attention and the LSE merge against dense masked softmax."""

import pytest
import torch

import bmojo.ops.attention as attention
from bmojo.ops.attention import (
    Band,
    ChunkMemory,
    attention_with_lse,
    banded_attention,
    banded_attention_ref,
    causal_attention,
    flex_union_attention,
    merge_attention,
    parse_kernel_options,
    parse_triton_tiles,
    step_attention,
    union_attention,
    union_attention_ref,
)


def _qkv(b, hq, hkv, length, d, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, length, d, generator=g).to(dtype)
    k = torch.randn(b, hkv, length, d, generator=g).to(dtype)
    v = torch.randn(b, hkv, length, d, generator=g).to(dtype)
    return q, k, v


@pytest.mark.parametrize("length", [1, 5, 8, 9, 16, 17, 33])
@pytest.mark.parametrize("lo,hi", [(0, 0), (0, 3), (0, 7), (4, 7), (8, 15), (0, None), (3, None), (40, 50)])
@pytest.mark.parametrize("block", [1, 4, 8, 64])
def test_banded_matches_dense_mask(length, lo, hi, block):
    q, k, v = _qkv(2, 4, 2, length, 8)
    o, lse = banded_attention(q, k, v, lo, hi, block_size=block)
    o_ref, lse_ref = banded_attention_ref(q, k, v, lo, hi)
    print("max diff", (o - o_ref).abs().max().item())
    torch.testing.assert_close(o, o_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, lse_ref, atol=1e-5, rtol=1e-5)


def test_banded_gradients_match_dense():
    q, k, v = _qkv(2, 4, 4, 23, 8)
    for t in (q, k, v):
        t.requires_grad_(True)
    o, lse = banded_attention(q, k, v, 2, 9, block_size=4)
    grads = torch.autograd.grad((o.sum() + lse.sum()), (q, k, v))
    o_ref, lse_ref = banded_attention_ref(q, k, v, 2, 9)
    lse_ref = lse_ref.masked_fill(torch.isinf(lse_ref), 0.0)
    grads_ref = torch.autograd.grad((o_ref.sum() + lse_ref.sum()), (q, k, v))
    for g, gr in zip(grads, grads_ref):
        torch.testing.assert_close(g, gr, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("segment_bytes", [1, 3000, 1 << 30])
@pytest.mark.parametrize("length,lo,hi,block", [(1, 0, 3, 4), (23, 0, 6, 4), (30, 7, 13, 4), (17, 0, None, 8)])
def test_banded_segments_forward_and_gradients_match_dense(monkeypatch, segment_bytes, length, lo, hi, block):
    """Any split of the query blocks into segments (1 block each, a few, all) gives the dense result and grads."""
    monkeypatch.setattr("bmojo.ops.attention.SEGMENT_BYTES", segment_bytes)
    q, k, v = _qkv(2, 4, 2, length, 8, seed=length)
    g = torch.Generator().manual_seed(1)
    do, dlse = torch.randn(2, 4, length, 8, generator=g), torch.randn(2, 4, length, generator=g)
    outs = []
    for fn in (lambda *t: banded_attention(*t, lo, hi, block_size=block), lambda *t: banded_attention_ref(*t, lo, hi)):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        o, lse = fn(*leaves)
        seen = torch.isfinite(lse)
        loss = (o * do).sum() + (lse.masked_fill(~seen, 0.0) * dlse).sum()
        outs.append((o, lse, *torch.autograd.grad(loss, leaves)))
    for got, want in zip(*outs):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_banded_gradcheck_float64():
    q, k, v = (t.double().requires_grad_() for t in _qkv(1, 2, 1, 11, 4, seed=3))

    def fn(*t):
        o, lse = banded_attention(*t, 2, 6, block_size=4)
        return o, lse.masked_fill(torch.isinf(lse), 0.0)  # the first two queries see no key: lse = -inf

    assert torch.autograd.gradcheck(fn, (q, k, v))


def test_banded_bf16_close_to_fp32():
    q, k, v = _qkv(1, 2, 2, 40, 16, dtype=torch.bfloat16)
    o, _ = banded_attention(q, k, v, 0, 7, block_size=8)
    o_ref, _ = banded_attention_ref(q.float(), k.float(), v.float(), 0, 7)
    assert o.dtype == torch.bfloat16
    torch.testing.assert_close(o.float(), o_ref, atol=3e-2, rtol=5e-2)


def test_banded_memory_is_linear_in_length():
    """The score tensor for a window of 8 at L=4096 has L*(block+band) entries, not L*L."""
    q, k, v = _qkv(1, 1, 1, 4096, 4)
    seen = []

    def hook(t):
        seen.append(t.numel())

    import bmojo.ops.attention as att

    orig = att._softmax_lse

    def spy(scores, vv):
        hook(scores)
        return orig(scores, vv)

    att._softmax_lse = spy
    try:
        banded_attention(q, k, v, 0, 7, block_size=16)
    finally:
        att._softmax_lse = orig
    assert max(seen) <= 4096 * (16 + 8)


def test_merge_equals_one_softmax_over_union():
    """Window + fading band + a third key set merged by LSE equals one masked softmax over all keys."""
    b, h, length, d, m = 2, 4, 19, 8, 5
    q, k, v = _qkv(b, h, 2, length, d, seed=1)
    _, kf, vf = _qkv(b, h, 2, length, d, seed=2)
    _, ke, ve = _qkv(b, h, 2, m, d, seed=3)
    w = 4
    emask = torch.rand(b, m, generator=torch.Generator().manual_seed(4)) > 0.3
    parts = [
        banded_attention(q, k, v, 0, w - 1, block_size=4),
        banded_attention(q, kf, vf, w, 2 * w - 1, block_size=4),
        attention_with_lse(q, ke, ve, emask[:, None, None, None, :]),
    ]
    o, lse = merge_attention(parts)
    i = torch.arange(length).view(-1, 1)
    j = torch.arange(length).view(1, -1)
    win = (i - j >= 0) & (i - j < w)
    band = (i - j >= w) & (i - j < 2 * w)
    mask = torch.cat([win.expand(b, -1, -1), band.expand(b, -1, -1), emask[:, None, :].expand(b, length, m)], dim=-1)[
        :, None, None
    ]
    o_ref, lse_ref = attention_with_lse(q, torch.cat([k, kf, ke], 2), torch.cat([v, vf, ve], 2), mask)
    torch.testing.assert_close(o, o_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, lse_ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("hkv", [1, 2, 6])
@pytest.mark.parametrize("with_extra", [False, True])
@pytest.mark.parametrize("all_visible", [False, True])
def test_step_attention_matches_a_per_query_loop(dtype, hkv, with_extra, all_visible):
    """A decoding step's attention (window keys, plus each query head's own ``extra`` keys, retrieved candidates)
    equals a softmax per query head over the visible keys (all of them for ``visible=None``) and its valid extra
    keys."""
    b, hq, n_keys, n, d = 2, 6, 7, 5, 4
    q, k, v = _qkv(b, hq, hkv, n_keys, d, dtype, seed=5)
    q = q[:, :, :1]
    g = torch.Generator().manual_seed(6)
    ek, ev = (torch.randn(b, hq, 1, n, d, generator=g).to(dtype) for _ in range(2))
    valid = torch.rand(b, hq, 1, n, generator=g) > 0.4
    visible = torch.rand(b, n_keys, generator=g) > 0.3
    visible[:, 0] = True
    if all_visible:
        visible.fill_(True)
    o = step_attention(q, k, v, None if all_visible else visible, (ek, ev, valid) if with_extra else None)
    assert o.shape == q.shape and o.dtype == dtype
    for bi in range(b):
        for h in range(hq):
            keys, vals = k[bi, h // (hq // hkv)][visible[bi]], v[bi, h // (hq // hkv)][visible[bi]]
            if with_extra:
                keys = torch.cat([keys, ek[bi, h, 0][valid[bi, h, 0]]])
                vals = torch.cat([vals, ev[bi, h, 0][valid[bi, h, 0]]])
            s = keys.double() @ q[bi, h, 0].double() * d**-0.5
            tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else {}
            torch.testing.assert_close(o[bi, h, 0].double(), torch.softmax(s, 0) @ vals.double(), **tol)
    with pytest.raises(ValueError, match="one query per head"):
        step_attention(q.expand(-1, -1, 2, -1), k, v, visible)


def test_step_attention_rejects_inputs_that_do_not_fit():
    """A float mask would be added to the scores, and a batch-1 key or mask broadcast: both silently, once."""
    q, k, v = _qkv(2, 4, 2, 1, 8)
    _, k, v = _qkv(2, 4, 2, 6, 8)
    visible = torch.ones(2, 6, dtype=torch.bool)
    for args, match in [
        ((q, k, v, visible.float()), "visible must be bool"),
        ((q, k, v, visible[:1]), r"visible must have shape \(2, 6\)"),
        ((q, k[:1], v, visible), r"k must have shape \(2, 2, 6, 8\)"),
        ((q, k, v[:, :, :5], visible), "v must have shape"),
    ]:
        with pytest.raises(ValueError, match=match):
            step_attention(*args)


def test_step_attention_takes_outputs_laid_out_as_cuda_returns_them(monkeypatch):
    """CUDA's memory-efficient SDPA kernel returns ``[B, H, M, d]`` as a transposed view of ``[B, M, H, d]``: the
    grouped step still gives the per-head result (a stand-in SDPA returns that layout on CPU)."""
    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(attention.F, "scaled_dot_product_attention",
                        lambda *a, **kw: sdpa(*a, **kw).transpose(1, 2).contiguous().transpose(1, 2))  # fmt: skip
    q, k, v = _qkv(2, 6, 2, 7, 4, torch.float32, seed=5)
    q = q[:, :, :1]
    o = attention.step_attention(q, k, v, None)
    monkeypatch.undo()
    torch.testing.assert_close(o, step_attention(q, k, v, None))


def test_merge_with_empty_sets_gives_zero_and_ignores_them():
    q, k, v = _qkv(1, 2, 2, 6, 4)
    full = banded_attention(q, k, v, 0, None)
    empty = banded_attention(q, k, v, 10, 20)
    assert torch.isinf(empty[1]).all() and (empty[0] == 0).all()
    torch.testing.assert_close(merge_attention([full, empty]), full)
    o, lse = merge_attention([empty, empty])
    assert (o == 0).all() and torch.isinf(lse).all()


@pytest.mark.parametrize("in_place", [True, False])
def test_causal_sdpa_matches_reference_with_gqa(in_place, monkeypatch):
    """Grouped key heads read in place by SDPA's CPU flash kernel (``enable_gqa``; only that kernel is allowed, so a
    fallback to the unfused path fails) or repeated per query head: outputs and gradients."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if in_place and not attention._FLASH_CPU_GROUPS:
        pytest.skip("this torch's CPU flash kernel does not take grouped heads")
    monkeypatch.setattr("bmojo.ops.attention._FLASH_CPU_GROUPS", in_place)
    leaves = [x.requires_grad_() for x in _qkv(2, 6, 2, 13, 8)]
    do = torch.randn(2, 6, 13, 8)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        o = causal_attention(*leaves)
        grads = [torch.autograd.grad((o * do).sum(), leaves)]
    ref = banded_attention_ref(*leaves, 0, None)[0]
    grads.append(torch.autograd.grad((ref * do).sum(), leaves))
    torch.testing.assert_close(o, ref, atol=1e-5, rtol=1e-5)
    for a, r in zip(*grads):
        torch.testing.assert_close(a, r, atol=1e-5, rtol=1e-5)


def test_bad_band_and_heads_raise():
    q, k, v = _qkv(1, 3, 2, 4, 4)
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        banded_attention(q, k, v, 0, 2)
    q, k, v = _qkv(2, 2, 2, 4, 4)
    with pytest.raises(ValueError, match="invalid band"):
        banded_attention(q, k, v, 3, 1)
    for attend in (lambda *x: banded_attention(*x, 0, 2), causal_attention):  # a batch-1 key would broadcast
        with pytest.raises(ValueError, match=r"bands\[0\].k must have shape \(2, 2, 4, 4\)"):
            attend(q, k[:1], v)
        with pytest.raises(ValueError, match=r"bands\[0\].v must have shape"):
            attend(q, k, v[:, :, :3])
        with pytest.raises(ValueError, match="batch >= 1"):
            attend(q[:0], k[:0], v[:0])
    with pytest.raises(ValueError, match="at least one part"):
        merge_attention([])


def test_integer_inputs_raise():
    """Integer queries and keys overflowed converting the scale (``-inf`` masking, once they got past it)."""
    q, k, v = _qkv(1, 2, 2, 4, 8)
    for impl in ("auto", "merge", "triton"):
        with pytest.raises(TypeError, match="must be floating point, got torch.int64"):
            union_attention(q.long(), [Band(k.long(), v.long(), 0, 3)], impl=impl)
    with pytest.raises(TypeError, match="must be floating point"):
        banded_attention(q.int(), k.int(), v.int(), 0, 2)


def test_triton_impl_on_cpu_tensors_says_it_needs_cuda(monkeypatch):
    """``impl="triton"`` on CPU tensors outside Triton's interpreter: Triton failed with "0 active drivers"."""
    kernels = pytest.importorskip("bmojo.ops.triton")
    pytest.importorskip("bmojo.ops.triton.attention")
    monkeypatch.setattr(kernels, "interpreting", lambda: False)
    q, k, v = _qkv(1, 2, 2, 8, 16)
    with pytest.raises(ValueError, match="Triton kernels take CUDA tensors, got cpu ones"):
        union_attention(q, [Band(k, v, 0, 3)], impl="triton")


def _union_inputs(b, hq, hkv, length, d, w, fading, m, chunk, seed=0):
    """Window band (``w=None``: full causal), optional fading band, optional memory of ``m`` slots per chunk."""
    q, k, v = _qkv(b, hq, hkv, length, d, seed=seed)
    bands = [Band(k, v, 0, None if w is None else w - 1)]
    if fading:
        _, kf, vf = _qkv(b, hq, hkv, length, d, seed=seed + 1)
        bands.append(Band(kf, vf, w, 2 * w - 1))
    memory = None
    if m:
        n = -(-length // chunk)
        g = torch.Generator().manual_seed(seed + 2)
        ek, ev = torch.randn(2, b, hkv, n, m, d, generator=g)
        memory = ChunkMemory(ek, ev, torch.rand(b, n, m, generator=g) > 0.3, chunk)
    return q, bands, memory


UNION_CASES = [  # length, w, fading, m, chunk
    (1, 4, True, 3, 4),
    (7, 4, True, 0, 4),
    (33, 4, True, 5, 4),
    (33, 8, True, 5, 6),
    (64, 16, True, 8, 16),
    (130, 16, False, 8, 16),
    (29, None, False, 0, 4),
    (40, 1, True, 2, 3),
]


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("impl", ["merge", "flex", "blocks"])
@pytest.mark.parametrize("block", [1, 8, 64])
@pytest.mark.parametrize("length,w,fading,m,chunk", UNION_CASES)
def test_union_matches_dense_reference(impl, block, length, w, fading, m, chunk):
    """Every implementation of one softmax over window, fading band and chunk memories equals the dense mask
    (FlexAttention runs its eager forward on CPU here; its compiled CUDA kernel is checked in tests/test_cuda.py).
    Blocks (fused SDPA, no LSE) needs a finite window; blocks of 8 and 64 queries meet one or two chunks."""
    if impl == "blocks" and w is None:
        pytest.skip("blocks needs a finite window")
    q, bands, memory = _union_inputs(2, 4, 2, length, 16, w, fading, m, chunk, seed=length)
    o, lse = union_attention(q, bands, memory, block_size=block, impl=impl)
    o_ref, lse_ref = union_attention_ref(q, bands, memory)
    torch.testing.assert_close(o, o_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, lse_ref, atol=1e-5, rtol=1e-5)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("length,w,m,chunk", [(1, 4, 3, 4), (33, 4, 5, 4), (40, 1, 2, 3), (64, 16, 0, 16)])
def test_flex_interleaved_window_and_fading_band_equal_the_concatenated_layout(length, w, m, chunk):
    """The window and its fading band as one sliding window over interleaved keys (what the model's FlexAttention
    call uses) and as two bands over concatenated keys both give the dense reference."""
    from bmojo.ops.attention import _paired_window

    q, bands, memory = _union_inputs(2, 4, 2, length, 16, w, True, m, chunk, seed=length + w)
    assert _paired_window(bands) == w
    assert _paired_window(bands[:1]) is None
    assert _paired_window([bands[0], Band(bands[1].k, bands[1].v, w, 2 * w)]) is None
    o_ref, lse_ref = union_attention_ref(q, bands, memory)
    for interleave in (True, False):
        o, lse = flex_union_attention(q, bands, memory, interleave=interleave)
        torch.testing.assert_close(o, o_ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(lse, lse_ref, atol=1e-5, rtol=1e-5)


def test_parse_kernel_options():
    assert parse_kernel_options("BLOCK_M=128, BLOCK_N=64,fwd_num_warps=8") == {
        "BLOCK_M": 128,
        "BLOCK_N": 64,
        "fwd_num_warps": 8,
    }
    assert parse_kernel_options("") == {}
    for bad in ("BLOCK_M", "BLOCK_M=big", "=64"):
        with pytest.raises(ValueError, match="NAME=INTEGER"):
            parse_kernel_options(bad)


def test_parse_triton_tiles():
    tiles = parse_triton_tiles("block_m=128,num_warps=8,bwd_num_warps=4")
    assert tiles == {"block_m": 128, "num_warps": 8, "bwd_num_warps": 4}
    with pytest.raises(ValueError, match=r"tiles take .* got \['BLOCK_M'\]"):
        parse_triton_tiles("BLOCK_M=128")


def test_union_attention_passes_the_triton_tiles(monkeypatch):
    """``impl="triton"`` calls our kernels with ``TRITON_TILES`` (``BMOJO_TRITON_TILES``)."""
    kernel = pytest.importorskip("bmojo.ops.triton.attention")
    seen = []
    monkeypatch.setattr(kernel, "union_attention_triton", lambda q, bands, memory, **tiles: seen.append(tiles))
    monkeypatch.setattr(attention, "TRITON_TILES", {"block_m": 128, "num_warps": 8})
    q = torch.randn(1, 1, 4, 16)
    attention.union_attention(q, [Band(q, q, 0, 1)], impl="triton")
    assert seen == [{"block_m": 128, "num_warps": 8}]


@pytest.mark.parametrize("device,dtype,d,tiles", [("cuda", torch.bfloat16, 64, {"block_n": 32}),
                                                  ("cuda", torch.float16, 32, {"block_n": 32}),
                                                  ("cuda", torch.float32, 64, {}), ("cuda", torch.bfloat16, 128, {}),
                                                  ("cpu", torch.bfloat16, 64, {})])  # fmt: skip
def test_triton_tiles_default_to_the_tuned_ones_where_measured(monkeypatch, device, dtype, d, tiles):
    """Without ``BMOJO_TRITON_TILES``, 16-bit CUDA queries of head dim <= 64 take 64 x 32 tiles (timed faster on an
    H100), everything else the kernels' defaults; the setting, when given, wins (fake tensors: no GPU needed)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    monkeypatch.setattr(attention, "TRITON_TILES", {})
    with FakeTensorMode():
        q = torch.empty(1, 2, 8, d, device=device, dtype=dtype)
        assert attention._triton_tile_options(q) == tiles
        monkeypatch.setattr(attention, "TRITON_TILES", {"block_m": 128})
        assert attention._triton_tile_options(q) == {"block_m": 128}


def test_triton_tiles_keep_the_kernels_defaults_on_rocm(monkeypatch):
    """The 64 x 32 tiles were timed on NVIDIA only: a ROCm build's CUDA tensors keep the kernels' defaults."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    monkeypatch.setattr(attention, "TRITON_TILES", {})
    monkeypatch.setattr(torch.version, "hip", "6.2")
    with FakeTensorMode():
        assert attention._triton_tile_options(torch.empty(1, 2, 8, 64, device="cuda", dtype=torch.bfloat16)) == {}


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_kernel_options_default_to_the_module_setting(monkeypatch):
    """A call without ``kernel_options`` passes ``FLEX_KERNEL_OPTIONS`` (``BMOJO_FLEX_OPTIONS``) to FlexAttention;
    explicit options, even empty ones, win."""
    from torch.nn.attention import flex_attention as fa

    seen = []
    real = fa.flex_attention

    def spy(*args, **kwargs):
        seen.append(kwargs["kernel_options"])
        return real(*args, **kwargs)

    monkeypatch.setattr(fa, "flex_attention", spy)
    monkeypatch.setattr("bmojo.ops.attention.FLEX_KERNEL_OPTIONS", {"BLOCK_M": 64})
    q, bands, memory = _union_inputs(1, 2, 2, 9, 8, 4, True, 2, 4)
    flex_union_attention(q, bands, memory)
    flex_union_attention(q, bands, memory, {"BLOCK_N": 32})
    flex_union_attention(q, bands, memory, {})
    monkeypatch.setattr("bmojo.ops.attention.FLEX_KERNEL_OPTIONS", {})
    flex_union_attention(q, bands, memory)  # tuned tiles apply to CUDA only
    assert seen == [{"BLOCK_M": 64}, {"BLOCK_N": 32}, None, None]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("impl,block,groups", [("merge", 4, True), ("blocks", 4, True), ("blocks", 3, True),
                                               ("blocks", 64, True), ("blocks", 4, False)])  # fmt: skip
def test_union_gradients_match_reference(impl, block, groups, dtype, monkeypatch):
    """Gradients of the output and of the LSE, 4 query heads on 2 key heads; blocks of 3 queries run as one kernel
    call per block (pieces of one block), so the key gradients of neighbouring calls overlap on the slots; the CPU
    kernel reads grouped key heads in place (``groups``, where this torch's kernel takes them) or repeated."""
    monkeypatch.setattr("bmojo.ops.attention.SEGMENT_BYTES", 1 if block == 3 else 1 << 20)
    monkeypatch.setattr("bmojo.ops.attention._FLASH_CPU_GROUPS", groups and attention._FLASH_CPU_GROUPS)
    key_heads = []
    kernel = attention._blocks_attention
    monkeypatch.setattr(
        attention, "_blocks_attention", lambda q, k, *a: key_heads.append(k.shape[1]) or kernel(q, k, *a)
    )
    q, bands, memory = _union_inputs(2, 4, 2, 37, 8, 5, True, 4, 5)
    memory.k, memory.v = memory.k.to(dtype), memory.v.to(dtype)
    leaves = [q.to(dtype)] + [t.to(dtype) for band in bands for t in (band.k, band.v)] + [memory.k, memory.v]
    q, bands = leaves[0], [Band(leaves[1], leaves[2], 0, 4), Band(leaves[3], leaves[4], 5, 9)]
    for t in leaves:
        t.requires_grad_(True)
    g = torch.Generator().manual_seed(9)
    do, dlse = torch.randn(q.shape, generator=g).to(dtype), torch.randn(q.shape[:3], generator=g).to(dtype)
    grads = []
    for fn in (lambda: union_attention(q, bands, memory, block_size=block, impl=impl),
               lambda: union_attention_ref(q, bands, memory)):  # fmt: skip
        o, lse = fn()
        grads.append(torch.autograd.grad((o * do).sum() + (lse * dlse).sum(), leaves))
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    for a, r in zip(*grads):
        torch.testing.assert_close(a, r, atol=tol, rtol=tol)
    assert key_heads == ([] if impl == "merge" else [2 if attention._FLASH_CPU_GROUPS else 4])


def test_blocks_bf16_close_to_fp32():
    q, bands, memory = _union_inputs(1, 4, 4, 100, 16, 8, True, 4, 16)
    o, lse = union_attention(q, bands, memory, block_size=8, impl="blocks")
    half = [Band(band.k.bfloat16(), band.v.bfloat16(), band.lo, band.hi) for band in bands]
    memory16 = ChunkMemory(memory.k.bfloat16(), memory.v.bfloat16(), memory.valid, memory.chunk)
    o16, lse16 = union_attention(q.bfloat16(), half, memory16, block_size=8, impl="blocks")
    assert o16.dtype == torch.bfloat16 and lse16.dtype == torch.float32
    torch.testing.assert_close(o16.float(), o, atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(lse16, lse, atol=3e-2, rtol=3e-2)


def test_blocks_refuse_lse_gradient_without_output_gradient():
    """The LSE gradient rides on the output gradient of the same query; a query with only the former is refused."""
    q, bands, _ = _union_inputs(1, 2, 2, 9, 4, 4, True, 0, 4)
    q.requires_grad_(True)
    o, lse = union_attention(q, bands, impl="blocks")
    with pytest.raises(RuntimeError, match="impl='merge'"):
        lse.sum().backward()


def test_union_auto_picks_blocks_on_cpu_and_raises_on_bad_requests(monkeypatch):
    q, bands, memory = _union_inputs(1, 2, 2, 12, 8, 2, True, 2, 4)
    full = [Band(bands[0].k, bands[0].v, 0, None)]
    with pytest.raises(ValueError, match="impl must be"):
        union_attention(q, bands, memory, impl="cuda")
    with pytest.raises(ValueError, match="finite bands"):
        union_attention(q, full, memory, impl="blocks")
    calls = []
    monkeypatch.setattr("bmojo.ops.attention.blocks_union_attention", lambda *a: calls.append(a) or (q, q[..., 0]))
    union_attention(q, bands, memory)
    assert len(calls) == 1
    monkeypatch.setattr("bmojo.ops.triton._mode", "reference")
    union_attention(q, bands, memory)  # merge
    monkeypatch.setattr("bmojo.ops.triton._mode", "auto")
    union_attention(q, full, memory)  # merge: blocks needs finite bands
    assert len(calls) == 1


@pytest.mark.parametrize("impl", ["auto", "merge", "blocks"])
def test_union_attention_rejects_inputs_that_do_not_fit(impl):
    """Every implementation checks its inputs first (the CPU default once gave wrong rows for band keys shorter than
    the queries)."""
    q, bands, memory = _union_inputs(1, 2, 2, 12, 8, 2, True, 2, 4)
    short = Band(bands[0].k[:, :, :8], bands[0].v[:, :, :8], 0, 1)
    for args, match in [
        ((q, [short, bands[1]], memory), r"bands\[0\].k must have shape \(1, 2, 12, 8\)"),
        ((q, [bands[0], Band(bands[1].k, bands[1].v[:, :1], 2, 3)], memory), r"bands\[1\].v must have shape"),
        ((q, [], None), "at least one band or a memory"),
        ((q[:, :, :0], bands, memory), "length >= 1"),
        ((q.double(), bands, memory), "must share one dtype"),
        ((q, bands, ChunkMemory(memory.k, memory.v, memory.valid.float(), 4)), "memory.valid must be bool"),
        ((q, bands, ChunkMemory(memory.k, memory.v, memory.valid, 2)), "fewer than the 12 queries need"),
        ((q, [Band(bands[0].k, bands[0].v, 3, 2)], memory), "0 <= lo <= hi"),
        ((q[:, :1].expand(1, 3, 12, 8), bands, memory), "multiple of key/value heads"),
    ]:
        with pytest.raises(ValueError, match=match):
            union_attention(*args, impl=impl)


@pytest.mark.parametrize("w", [8, 20])
def test_union_attention_cuts_bands_to_the_sequence(monkeypatch, w):
    """Of 12 queries, a window of 8 sees a fading band reaching to 15 (cut to 11), one of 20 none (left out, and the
    window cut to 11): the implementation gets the cut bands, and the reference's result."""
    q, bands, memory = _union_inputs(1, 2, 2, 12, 8, w, True, 2, 4)
    seen = []
    blocks = attention.blocks_union_attention
    monkeypatch.setattr(attention, "blocks_union_attention", lambda q, b, *a: seen.append(b) or blocks(q, b, *a))
    o, lse = union_attention(q, bands, memory)
    assert [(band.lo, band.hi) for band in seen[0]] == ([(0, 7), (8, 11)] if w == 8 else [(0, 11)])
    o_ref, lse_ref = union_attention_ref(q, bands, memory)
    torch.testing.assert_close(o, o_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, lse_ref, atol=1e-5, rtol=1e-5)


def test_blocks_kernel_ops_pass_opcheck():
    """The custom ops behind the CPU read-out have consistent fake (meta) implementations, autograd registration and
    schemas (``torch.library.opcheck``), so ``torch.compile`` can keep them whole."""
    from bmojo.ops.attention import _blocks_attention, _blocks_keys, _blocks_layout, _blocks_mask

    q, bands, _ = _union_inputs(2, 4, 2, 16, 8, 4, True, 0, 4)  # grouped heads: keys of 2 for queries of 4
    shifts, t = _blocks_layout(bands, 4)
    keys = (_blocks_keys([getattr(band, x) for band in bands], shifts, 4, 4, t) for x in "kv")
    (k, v), _ = attention._sdpa_heads(q, *keys)  # repeated for every query head where the kernel takes no groups
    k, v = k.requires_grad_(), v.requires_grad_()
    mask = _blocks_mask(bands, shifts, 4, 4, t, q.dtype, q.device)
    torch.library.opcheck(_blocks_attention, (q.requires_grad_(), k, v, mask, t, 8**-0.5, 3))
