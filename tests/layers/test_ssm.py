"""Mamba-1 / Mamba-2 layers against Hugging Face's MambaMixer / Mamba2Mixer, and state continuation."""

import pytest
import torch

from bmojo.layers import Mamba, Mamba2


def _hf_out(mixer, x):
    out = mixer(x)
    return out[0] if isinstance(out, tuple) else out


def test_mamba_matches_transformers_mamba_mixer():
    from transformers import MambaConfig
    from transformers.models.mamba.modeling_mamba import MambaMixer

    torch.manual_seed(0)
    ours = Mamba(48, state_size=8, expand=2, conv_kernel=4, dt_rank=5)
    hf = MambaMixer(MambaConfig(hidden_size=48, state_size=8, intermediate_size=96, time_step_rank=5), 0)
    hf.load_state_dict(ours.state_dict())  # same names and shapes, strict
    x = torch.randn(2, 37, 48)
    with torch.no_grad():
        torch.testing.assert_close(ours(x)[0], _hf_out(hf, x), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("n_groups", [1, 2])
def test_mamba2_matches_transformers_mamba2_mixer(n_groups):
    from transformers import Mamba2Config
    from transformers.models.mamba2.modeling_mamba2 import Mamba2Mixer

    torch.manual_seed(0)
    ours = Mamba2(32, state_size=16, expand=2, head_dim=16, n_groups=n_groups, chunk_size=8)
    cfg = Mamba2Config(
        hidden_size=32, state_size=16, expand=2, head_dim=16, num_heads=4, n_groups=n_groups, chunk_size=8,
        layer_norm_epsilon=1e-5,
    )  # fmt: skip
    hf = Mamba2Mixer(cfg, 0)
    hf.load_state_dict(ours.state_dict())
    x = torch.randn(2, 37, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours(x)[0], _hf_out(hf, x), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("cls", [Mamba, Mamba2])
@pytest.mark.parametrize("split", [1, 5, 16])
def test_continuation_in_pieces_equals_one_pass(cls, split):
    torch.manual_seed(0)
    layer = cls(32, state_size=8, **({"head_dim": 16, "chunk_size": 8} if cls is Mamba2 else {}))
    x = torch.randn(2, 29, 32)
    with torch.no_grad():
        full, final = layer(x)
        first, state = layer(x[:, :split])
        steps = [first]
        t = split
        while t < 29:  # alternate single steps and multi-token pieces
            n = 1 if (t % 2) else 3
            y, state = layer(x[:, t : t + n], state)
            steps.append(y)
            t += n
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(state.ssm, final.ssm, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(state.conv, final.conv)


@pytest.mark.parametrize("cls", [Mamba, Mamba2])
@pytest.mark.parametrize("segment", [1, 7, 16])
def test_segmented_pass_equals_one_pass_with_gradients(monkeypatch, cls, segment):
    """Long inputs run as segments carrying the state: same outputs, final state and gradients as one pass."""
    torch.manual_seed(0)
    layer = cls(32, state_size=8, **({"head_dim": 16, "chunk_size": 8} if cls is Mamba2 else {}))
    x = torch.randn(2, 29, 32)
    results = []
    for length in (10**9, segment):
        monkeypatch.setattr(cls, "segment_length", length)
        xi = x.clone().requires_grad_()
        y, state = layer(xi)
        loss = (y * torch.linspace(-1, 1, 32)).sum() + state.ssm.sum()
        results.append((y, state.ssm, state.conv, *torch.autograd.grad(loss, [xi, *layer.parameters()])))
    for got, want in zip(results[1], results[0]):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("cls", [Mamba, Mamba2])
@pytest.mark.parametrize("segment", [7, 10**9])
def test_padding_before_the_tokens_leaves_their_outputs_and_state_as_alone(monkeypatch, cls, segment):
    """``tokens`` marks the positions that are tokens: rows with padding (random values) before 20 and 9 tokens give
    the tokens' outputs and the state after them of each row alone, across segments too; a wrong shape raises."""
    monkeypatch.setattr(cls, "segment_length", segment)
    torch.manual_seed(0)
    layer = cls(32, state_size=8, **({"head_dim": 16, "chunk_size": 8} if cls is Mamba2 else {}))
    x = torch.randn(2, 29, 32)
    tokens = torch.arange(29) >= torch.tensor([[9], [20]])
    with torch.no_grad():
        y, state = layer(x, tokens=tokens)
        for row, pad in enumerate((9, 20)):
            alone, final = layer(x[row : row + 1, pad:])
            torch.testing.assert_close(y[row, pad:], alone[0], atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(state.ssm[row], final.ssm[0], atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(state.conv[row], final.conv[0])
    with pytest.raises(ValueError, match=r"tokens must be \[batch, length\] \(2, 29\), got \(2, 28\)"):
        layer(x, tokens=tokens[:, 1:])


def test_bad_mamba2_shapes_raise():
    with pytest.raises(ValueError, match="head_dim"):
        Mamba2(30, head_dim=16)
    with pytest.raises(ValueError, match="n_groups"):
        Mamba2(32, head_dim=16, n_groups=3)


@pytest.mark.parametrize("cls", [Mamba, Mamba2])
@pytest.mark.parametrize(
    "shape,match",
    [
        ((2, 5), "expected hidden states"),
        ((2, 5, 16), "expected hidden states"),
        ((1, 0, 32), "empty sequence"),
        ((0, 5, 32), "empty batch"),
    ],
)
def test_bad_hidden_states_raise(cls, shape, match):
    with pytest.raises(ValueError, match=match):
        cls(32)(torch.randn(*shape))


@pytest.mark.parametrize("cls", [Mamba, Mamba2])
def test_a_state_of_another_batch_raises(cls):
    layer = cls(32)
    _, state = layer(torch.randn(2, 5, 32))
    with pytest.raises(ValueError, match=r"state.conv must have shape \(3, "):
        layer(torch.randn(3, 1, 32), state)


@pytest.mark.parametrize("cls", [Mamba, Mamba2])
def test_hidden_states_of_another_dtype_raise_outside_autocast(cls):
    layer = cls(32)
    for dtype in (torch.float64, torch.long):
        with pytest.raises(TypeError, match="the layer's weights are torch.float32"):
            layer(torch.zeros(1, 5, 32, dtype=dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, _ = layer(torch.randn(1, 5, 32, dtype=torch.bfloat16))
    assert y.shape == (1, 5, 32)


@pytest.mark.parametrize(
    "cls,kw,match",
    [
        (Mamba, dict(expand=0), "expand must be a positive integer"),
        (Mamba, dict(state_size=0), "state_size must be a positive integer"),
        (Mamba, dict(conv_kernel=0), "conv_kernel must be a positive integer"),
        (Mamba2, dict(head_dim=0), "head_dim must be a positive integer"),
        (Mamba2, dict(n_groups=0), "n_groups must be a positive integer"),
        (Mamba2, dict(chunk_size=0), "chunk_size must be a positive integer"),
    ],
)
def test_sizes_below_one_raise(cls, kw, match):
    with pytest.raises(ValueError, match=match):
        cls(32, **kw)


@pytest.mark.parametrize("cls", [Mamba, Mamba2])
@pytest.mark.parametrize("length", [1, 3])
def test_inplace_continuation_writes_the_given_state(cls, length):
    """``inplace=True`` writes the state after the tokens into the given state's tensors (their storage kept, as a
    compiled decoding step needs) and returns it; by default the given state is left as it was and a new one, equal,
    comes back."""
    torch.manual_seed(0)
    layer = cls(32, state_size=8, **({"head_dim": 16, "chunk_size": 8} if cls is Mamba2 else {}))
    x = torch.randn(2, 12 + length, 32)
    with torch.no_grad():
        _, state = layer(x[:, :12])
        before = (state.conv.clone(), state.ssm.clone())
        y, new = layer(x[:, 12:], state)
        assert new is not state and torch.equal(state.conv, before[0]) and torch.equal(state.ssm, before[1])
        addresses = (state.conv.data_ptr(), state.ssm.data_ptr())
        y_inplace, same = layer(x[:, 12:], state, inplace=True)
    assert same is state and (state.conv.data_ptr(), state.ssm.data_ptr()) == addresses
    assert torch.equal(y_inplace, y) and torch.equal(state.conv, new.conv) and torch.equal(state.ssm, new.ssm)
