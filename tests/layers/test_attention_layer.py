"""Attention projections with RoPE: full and partial rotation against a per-dimension-pair rotation (the model's
parallel = recurrent check with partial RoPE is in tests/models/test_model.py)."""

import math

import pytest
import torch

from bmojo.layers.attention import Attention
from bmojo.layers.rotary import TABLE_ROWS, RotaryEmbedding, apply_rotary, rotary_table


def rotate_pairs(x: torch.Tensor, positions: torch.Tensor, rotary_dim: int, theta: float = 10000.0) -> torch.Tensor:
    """Rotate-half RoPE written out pair by pair: dims ``(i, i + r/2)`` turn by ``pos / theta^(2i/r)``."""
    out, half = x.clone(), rotary_dim // 2
    for i in range(half):
        angle = positions.float() / theta ** (2 * i / rotary_dim)
        a, b = x[..., i], x[..., i + half]
        out[..., i] = a * torch.cos(angle) - b * torch.sin(angle)
        out[..., i + half] = b * torch.cos(angle) + a * torch.sin(angle)
    return out


@pytest.mark.parametrize("fraction,rotary_dim", [(1.0, 16), (0.5, 8), (0.3, 4)])
def test_partial_rotary_rotates_the_first_dims_and_passes_the_rest(fraction, rotary_dim):
    torch.manual_seed(0)
    attn = Attention(32, num_heads=2, head_dim=16, rotary_fraction=fraction)
    h, pos = torch.randn(1, 5, 32), torch.tensor([0, 3, 7, 100, 4096])
    raw = attn.q_proj(h).unflatten(-1, (2, 16)).transpose(1, 2)
    torch.testing.assert_close(
        attn.queries(h, attn.rope(pos)), rotate_pairs(raw, pos, rotary_dim), atol=1e-5, rtol=1e-5
    )
    assert attn.rotary.head_dim == rotary_dim


def test_partial_rotary_keeps_a_content_part_that_ignores_distance():
    """With half the dims rotated, the unrotated half of q.k is the same at every distance."""
    cos, sin = RotaryEmbedding(8)(torch.tensor([0, 70000]))
    q = torch.randn(1, 1, 1, 16)
    near, far = apply_rotary(q, cos[:1], sin[:1]), apply_rotary(q, cos[1:], sin[1:])
    torch.testing.assert_close(near[..., 8:], far[..., 8:], atol=0, rtol=0)
    assert not torch.allclose(near[..., :8], far[..., :8])
    assert math.isclose(near[..., :8].norm().item(), far[..., :8].norm().item(), rel_tol=1e-5)  # a rotation


def test_rotary_frequencies_are_cached_in_eager_mode_only():
    """Eager calls reuse one frequency tensor (a decoding step would recompute it per token); compiled code gets
    the same values without writing the cache (so a later call does not see a changed module and recompile)."""
    rotary = RotaryEmbedding(8, theta=500.0)
    expected = torch.tensor([500.0 ** (-2 * i / 8) for i in range(4)])
    first = rotary.inv_freq(torch.device("cpu"))
    torch.testing.assert_close(first, expected)
    assert rotary.inv_freq(torch.device("cpu")) is first
    rotary._inv_freq = None
    compiled = torch.compile(lambda p: rotary(p), backend="eager", fullgraph=True)
    cos, _ = compiled(torch.tensor([3]))
    torch.testing.assert_close(cos, torch.cos(3 * expected).repeat(2)[None])
    assert rotary._inv_freq is None


def test_rotary_table_op_equals_the_angles_cos_and_sin():
    """The opaque table op: its values (against the angles' cosines and sines written out) and its registration
    (``opcheck``: fake tensor, schema, dispatch)."""
    positions, inv_freq = torch.tensor([0, 5, 2047, 70000]), RotaryEmbedding(8).inv_freq(torch.device("cpu"))
    angles = (positions[:, None].float() * inv_freq).double()  # (float32 angles, as RoPE everywhere)
    cos, sin = rotary_table(positions, inv_freq)
    assert cos.dtype == sin.dtype == torch.float32 and cos.shape == (4, 8)
    torch.testing.assert_close(cos, angles.cos().repeat(1, 2).float())
    torch.testing.assert_close(sin, angles.sin().repeat(1, 2).float())
    torch.library.opcheck(rotary_table, (positions, inv_freq))


@pytest.mark.parametrize("length,table", [(1, False), (TABLE_ROWS - 1, False), (TABLE_ROWS, True), (64, True)])
def test_compiled_rope_reads_a_table_except_at_decoding_steps(length, table):
    """Compiled, the rotations of a sequence read cos/sin from the table op's buffers (inductor would compute them
    for every rotated element); a decoding step's few positions stay inline. Outputs and gradients equal eager."""
    from torch._inductor.utils import run_and_get_code

    torch.manual_seed(0)
    attn = Attention(32, num_heads=2, num_kv_heads=1, head_dim=16, rotary_fraction=0.5)
    h, pos = torch.randn(2, length, 32, requires_grad=True), torch.arange(100, 100 + length)

    def qk(h, pos):
        rope = attn.rope(pos)
        return attn.queries(h, rope).sum() + attn.keys_values(h, rope)[0].square().sum()

    torch._dynamo.reset()
    out, codes = run_and_get_code(torch.compile(qk, fullgraph=True), h, pos)
    (grad,) = torch.autograd.grad(out, h)
    ref = qk(h, pos)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(grad, torch.autograd.grad(ref, h)[0])
    assert any("bmojo.rotary_table" in code for code in codes) == table


@pytest.mark.skipif(
    not hasattr(torch.compiler, "is_exporting"), reason="torch.compiler.is_exporting needs torch >= 2.5"
)
def test_exported_rope_keeps_the_cos_and_sin_inline():
    """``torch.export`` graphs run elsewhere, without our ops: they compute the angles' cos/sin themselves."""
    graph = torch.export.export(RotaryEmbedding(8), (torch.arange(16),)).graph_module
    ops = {str(node.target) for node in graph.graph.nodes if node.op == "call_function"}
    assert "aten.cos.default" in ops and not any("rotary_table" in op for op in ops)


def test_bad_rotary_fraction_raises():
    with pytest.raises(ValueError, match="partial_rotary_factor"):
        Attention(32, num_heads=2, rotary_fraction=0.0)
    with pytest.raises(ValueError, match="partial_rotary_factor 0.1 of a head of 16 dimensions rotates 0"):
        Attention(32, num_heads=2, head_dim=16, rotary_fraction=0.1)  # one dimension: nothing to rotate in pairs


def test_head_counts_below_one_raise():
    for kw in (dict(num_heads=0), dict(num_heads=4, num_kv_heads=0), dict(num_heads=4, head_dim=-8)):
        with pytest.raises(ValueError, match="must be a positive integer"):
            Attention(32, **kw)
