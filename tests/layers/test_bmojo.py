"""The B'MOJO mixer: special cases, a naive one-softmax reference, and parallel == recurrent."""

import random

import pytest
import torch

from bmojo.layers import BMojoMixer, MixerState

D, H, HKV = 32, 4, 2


def make(seed=0, **kw) -> BMojoMixer:
    torch.manual_seed(seed)
    base = dict(
        num_heads=H, num_kv_heads=HKV, ssm="mamba2", window=4, fading=True, eidetic_size=3, chunk_size=4,
        block_size=4, ssm_kwargs=dict(state_size=8, head_dim=16, chunk_size=8),
    )  # fmt: skip
    base.update(kw)
    if base["ssm"] == "mamba":
        base["ssm_kwargs"] = dict(state_size=8)
    return BMojoMixer(D, **base).eval()


def naive_mixer(m: BMojoMixer, h: torch.Tensor) -> torch.Tensor:
    """One softmax per query over [raw window | fading band | eidetic tokens], selection by brute force."""
    b, length, _ = h.shape
    pos = torch.arange(length)
    f = m.ssm(h)[0] if m.ssm is not None else None
    if m.attn is None:
        return f
    rope = m.attn.rope(pos)
    q = m.attn.queries(h, rope)
    k, v = m.attn.keys_values(h, rope)
    keys, values = [k], [v]
    i, j = pos.view(-1, 1), pos.view(1, -1)
    w = m.window if m.window is not None else length
    masks = [((i - j >= 0) & (i - j < w)).expand(b, -1, -1)]
    if m.fading:
        kf, vf = m.attn.keys_values(f, rope, m.fading_k_proj, m.fading_v_proj)
        keys.append(kf)
        values.append(vf)
        masks.append(((i - j >= w) & (i - j < 2 * w)).expand(b, -1, -1))
    if m.memory is not None:
        f_prev = torch.cat([torch.zeros_like(f[:, :1]), f[:, :-1]], 1)
        scores, _ = m.memory.score(h, f_prev, pos)
        emask = torch.zeros(b, length, length, dtype=torch.bool)
        c, k_mem = m.memory.chunk_size, m.memory.size
        for bi in range(b):
            s = scores[bi].tolist()
            for qi in range(length):
                limit = max(0, (qi // c) * c - w)
                for p in sorted(range(limit), key=lambda p: (-s[p], p))[:k_mem]:
                    emask[bi, qi, p] = True
        keys.append(k)
        values.append(v)
        masks.append(emask)
    K, V, M = torch.cat(keys, 2), torch.cat(values, 2), torch.cat(masks, 2)
    g = H // k.shape[1]
    K, V = K.repeat_interleave(g, 1), V.repeat_interleave(g, 1)
    att = (q @ K.transpose(-1, -2)) * q.shape[-1] ** -0.5
    att = att.masked_fill(~M[:, None], float("-inf")).softmax(-1)
    return m.attn.output(att @ V)


CONFIGS = {
    "transformer": dict(ssm=None, window=None, fading=False, eidetic_size=0),
    "swa": dict(ssm=None, fading=False, eidetic_size=0),
    "mamba": dict(ssm="mamba", attention=False, fading=False, eidetic_size=0),
    "mamba2": dict(attention=False, fading=False, eidetic_size=0),
    "bmojo-f": dict(eidetic_size=0),
    "bmojo": dict(),
    "bmojo-mamba1": dict(ssm="mamba"),
    "bmojo-random": dict(selection="random"),
    "bmojo-recency": dict(selection="recency", chunk_size=3),
    "bmojo-untied": dict(tie_fading_kv=False),
    "bmojo-qknorm": dict(qk_norm=True, eidetic_size=5, chunk_size=2),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_mixer_matches_naive_union_softmax(name):
    m = make(**CONFIGS[name])
    h = torch.randn(2, 29, D)
    with torch.no_grad():
        out, _, _ = m(h)
        ref = naive_mixer(m, h)
    print(name, "max diff", (out - ref).abs().max().item())
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", ["bmojo", "bmojo-f", "swa"])
@pytest.mark.parametrize("length", [6, 12])
def test_a_window_holding_the_whole_sequence_reads_out_by_causal_attention(monkeypatch, name, length):
    """With a window of 12 and no more tokens, nothing leaves the window (empty memories, no fading key seen): the
    read-out is causal attention, not the union, with the naive union's output, and decoding continues it exactly."""
    import bmojo.layers.bmojo as mixer_module

    m = make(**CONFIGS[name], window=12)
    h = torch.randn(2, 16, D)
    unions = []
    union = mixer_module.union_attention
    monkeypatch.setattr(mixer_module, "union_attention", lambda *a: unions.append(1) or union(*a))
    with torch.no_grad():
        out, _, _ = m(h[:, :length])
        assert not unions
        torch.testing.assert_close(out, naive_mixer(m, h[:, :length]), atol=1e-5, rtol=1e-4)
        state = MixerState()
        first, _, _ = m(h[:, :length], state)
        rest = [m(h[:, t : t + 1], state)[0] for t in range(length, 16)]
        torch.testing.assert_close(torch.cat([first, *rest], 1), m(h)[0], atol=1e-5, rtol=1e-4)
    assert unions  # 16 tokens: the window no longer holds them all


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("prefill", [1, 3, 4, 5, 8, 9, 16])
def test_prefill_then_steps_equals_parallel(name, prefill):
    """Window, fading band and eidetic memory active; several chunk boundaries crossed while decoding."""
    m = make(**CONFIGS[name])
    h = torch.randn(2, 30, D)
    with torch.no_grad():
        full, _, _ = m(h)
        state = MixerState()
        first, _, _ = m(h[:, :prefill], state)
        rest = [m(h[:, t : t + 1], state)[0] for t in range(prefill, 30)]
    out = torch.cat([first, *rest], 1)
    print(name, prefill, "max diff", (out - full).abs().max().item())
    torch.testing.assert_close(out, full, atol=1e-5, rtol=1e-4)
    assert state.seen == 30


def test_full_attention_cache_grows_while_decoding():
    """The full-attention key buffer grows by an eighth (at least 64 slots) when full: three growths here; room
    reserved ``exact`` is what is missing, no more."""
    m = make(**CONFIGS["transformer"])
    h = torch.randn(1, 200, D)
    with torch.no_grad():
        full, _, _ = m(h)
        state = MixerState()
        outs = [m(h[:, :1], state)[0]] + [m(h[:, t : t + 1], state)[0] for t in range(1, 200)]
    torch.testing.assert_close(torch.cat(outs, 1), full, atol=1e-5, rtol=1e-4)
    assert state.win_k.shape[2] == 257 and state.win_pos[:, 200:].eq(-1).all()
    state.reserve(50, exact=True)
    assert state.win_k.shape[2] == 257
    state.reserve(60, exact=True)
    assert state.win_k.shape[2] == state.win_v.shape[2] == state.win_pos.shape[1] == 260


@pytest.mark.parametrize("name", ["bmojo", "transformer"])
def test_compiled_decoding_equals_eager_with_one_graph_for_every_position(name):
    """Ring slots and chunk boundaries come from the state's position tensor: after a first graph for the first
    position, one graph serves every later one (the full-attention buffer's growth adds one); the compiled steps
    leave the eager steps' state (the compiled step writes the slots' positions as a whole-ring pass)."""
    from torch._dynamo.utils import counters

    m = make(**CONFIGS[name])
    h = torch.randn(2, 20, D)
    torch.compiler.reset()
    counters.clear()
    step = torch.compile(m)
    with torch.no_grad():
        eager, compiled = MixerState(), MixerState()
        m(h[:, :5], eager), m(h[:, :5], compiled)
        for t in range(5, 20):  # crosses chunk boundaries (chunk 4) and a full ring (window 4)
            torch.testing.assert_close(step(h[:, t : t + 1], compiled)[0], m(h[:, t : t + 1], eager)[0])
    assert compiled.seen == 20 and counters["stats"]["unique_graphs"] <= (2 if name == "bmojo" else 3)
    for a, b in zip(compiled.tensors(), eager.tensors(), strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("name", ["bmojo", "bmojo-mamba1", "swa", "mamba2"])
def test_decoding_updates_the_state_in_place(name):
    """Every state tensor keeps its storage while decoding (what a CUDA graph replaying the step needs)."""
    m = make(**CONFIGS[name])
    h = torch.randn(2, 20, D)
    state = MixerState()
    with torch.no_grad():
        m(h[:, :5], state)
        ptrs = [t.data_ptr() for t in state.tensors()]
        for t in range(5, 20):  # crosses chunk boundaries (chunk 4) and a full ring (window 4)
            m(h[:, t : t + 1], state)
    assert [t.data_ptr() for t in state.tensors()] == ptrs and state.pos.item() == state.seen == 20


def test_multi_token_continuation_equals_parallel():
    m = make()
    h = torch.randn(1, 27, D)
    with torch.no_grad():
        full, _, _ = m(h)
        state = MixerState()
        parts = [m(h[:, :6], state)[0], m(h[:, 6:19], state)[0], m(h[:, 19:], state)[0]]
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("cuts", [(1, 3, 7, 30), (3, 8, 9, 21, 30), (5, 6, 22, 30), (8, 30), (12, 13, 17, 30)])
@pytest.mark.parametrize("batch", [1, 2])
def test_continuing_a_state_in_parallel_equals_one_pass(name, cuts, batch, monkeypatch):
    """Calls of several tokens after a state run as one parallel pass (the window 4 and chunks of 4 crossed inside
    and between calls, from states shorter than the window and than two, the eidetic memory changing at the
    boundaries); their outputs and the states they leave (the steps after them) equal one pass over the sequence,
    and only calls of one token step."""
    m = make(**CONFIGS[name])
    steps, step = [], m._step
    monkeypatch.setattr(m, "_step", lambda h, *a: steps.append(h.shape[1]) or step(h, *a))
    h = torch.randn(batch, 34, D)
    with torch.no_grad():
        full, _, _ = m(h)
        state = MixerState()
        outs = [m(h[:, : cuts[0]], state)[0]]
        outs += [m(h[:, a:b], state)[0] for a, b in zip(cuts, cuts[1:])]
        assert len(steps) == sum(b - a == 1 for a, b in zip(cuts, cuts[1:]))
        outs += [m(h[:, t : t + 1], state)[0] for t in range(cuts[-1], 34)]
    torch.testing.assert_close(torch.cat(outs, 1), full, atol=1e-5, rtol=1e-4)
    assert state.seen == state.pos.item() == 34


@pytest.mark.parametrize("seed", range(40))
def test_continuations_of_random_configurations_equal_one_pass(seed):
    """Random windows (down to 1), chunks (down to 1), memory sizes, SSMs, head groupings, fading projections and
    selections, cut at random points, then stepped: one pass over the sequence."""
    rng = random.Random(seed)
    ssm = rng.choice(["mamba2", "mamba"])
    kw = dict(num_heads=4, num_kv_heads=rng.choice([1, 2, 4]), ssm=ssm, window=rng.choice([1, 2, 3, 5, 8]),
              fading=rng.random() < 0.7, eidetic_size=rng.choice([0, 1, 2, 5]), chunk_size=rng.choice([1, 2, 3, 7]),
              block_size=rng.choice([2, 8]), tie_fading_kv=rng.random() < 0.5,
              selection=rng.choice(["innovation", "recency", "random"]),
              ssm_kwargs=dict(state_size=8, head_dim=16, chunk_size=8) if ssm == "mamba2" else dict(state_size=8))  # fmt: skip
    m = make(seed, **kw)
    n = rng.randint(5, 40)
    cuts = [*sorted(rng.sample(range(1, n), min(n - 1, rng.randint(1, 4)))), n]
    h = torch.randn(rng.choice([1, 2]), n + 5, D, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        full, _, _ = m(h)
        state = MixerState()
        outs = [m(h[:, : cuts[0]], state)[0]] + [m(h[:, a:b], state)[0] for a, b in zip(cuts, cuts[1:])]
        outs += [m(h[:, t : t + 1], state)[0] for t in range(n, n + 5)]
    torch.testing.assert_close(torch.cat(outs, 1), full, atol=1e-5, rtol=1e-4, msg=lambda e: f"{kw} {cuts}: {e}")


def test_steps_left_to_the_caller_enter_the_next_chunk_when_it_advances():
    """With ``advance=False`` the state has not counted the tokens (the caller advances its position tensor, as
    ``BMojoCache.advance_positions`` does, then its count), and the eidetic memory built so far comes into use at the
    chunk boundary only when the caller advances the count (``BMojoCache.advance``, outside compiled code): a step
    ending at a boundary leaves the memory in use as it was; the outputs then equal the parallel pass."""
    m = make()  # chunk 4
    h = torch.randn(2, 14, D)
    with torch.no_grad():
        full, _, _ = m(h)
        state = MixerState()
        outs = [m(h[:, :5], state)[0], m(h[:, 5:7], state, advance=False)[0]]  # 5 + 2 tokens seen
        assert state.pos.item() == 5
        state.pos.add_(2)
        state.advance(2)
        outs.append(m(h[:, 7:8], state, advance=False)[0])  # position 7: the next one starts a chunk
        before = state.mem_pos.clone()
        assert not torch.equal(before, state.stage_pos) and state.seen == 7
        state.pos.add_(1)
        state.advance(1)
        torch.testing.assert_close(state.mem_pos, state.stage_pos)
        torch.testing.assert_close(state.mem_k, state.stage_k)
        outs.append(m(h[:, 8:], state)[0])  # 6 tokens crossing the boundary at 12 within the call
    torch.testing.assert_close(torch.cat(outs, 1), full, atol=1e-5, rtol=1e-4)
    assert state.seen == 14 and state.pos.item() == 14


def test_state_size_does_not_grow_with_context():
    m = make()
    sizes = {}
    with torch.no_grad():
        for n in (20, 60):
            state = MixerState()
            m(torch.randn(1, n, D), state)
            for _ in range(3):
                m(torch.randn(1, 1, D), state)
            sizes[n] = state.nbytes()
    assert sizes[20] == sizes[60]
    full = make(**CONFIGS["transformer"])
    with torch.no_grad():
        s20, s60 = MixerState(), MixerState()
        full(torch.randn(1, 20, D), s20)
        full(torch.randn(1, 60, D), s60)
    assert s60.nbytes() > s20.nbytes()


def test_eidetic_zero_equals_bmojo_f():
    a = make(eidetic_size=0)
    b = make(eidetic_size=3)
    b.load_state_dict(a.state_dict(), strict=False)
    short = torch.randn(1, 8, D)  # nothing has left the window of any chunk yet
    with torch.no_grad():
        torch.testing.assert_close(a(short)[0], b(short)[0])
        longer = torch.randn(1, 30, D)
        assert not torch.allclose(a(longer)[0], b(longer)[0])
    c = make(eidetic_size=3, selection="none")
    c.load_state_dict(a.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(a(longer)[0], c(longer)[0])


def test_window_covering_sequence_equals_transformer():
    full = make(**CONFIGS["transformer"])
    swa = make(ssm=None, window=64, fading=False, eidetic_size=0)
    swa.load_state_dict(full.state_dict())
    h = torch.randn(2, 40, D)
    with torch.no_grad():
        torch.testing.assert_close(swa(h)[0], full(h)[0], atol=1e-5, rtol=1e-4)


def test_transformer_equals_hand_written_causal_attention():
    m = make(**CONFIGS["transformer"])
    h = torch.randn(1, 11, D)
    a = m.attn
    d = D // H
    pos = torch.arange(11).float()
    inv = 1.0 / 10000 ** (torch.arange(0, d, 2).float() / d)
    ang = torch.cat([pos[:, None] * inv, pos[:, None] * inv], -1)

    def rope(x):
        x1, x2 = x[..., : d // 2], x[..., d // 2 :]
        return x * ang.cos() + torch.cat([-x2, x1], -1) * ang.sin()

    q = rope((h @ a.q_proj.weight.T).view(1, 11, H, d).transpose(1, 2))
    k = rope((h @ a.k_proj.weight.T).view(1, 11, HKV, d).transpose(1, 2)).repeat_interleave(H // HKV, 1)
    v = (h @ a.v_proj.weight.T).view(1, 11, HKV, d).transpose(1, 2).repeat_interleave(H // HKV, 1)
    s = (q @ k.transpose(-1, -2)) / d**0.5 + torch.full((11, 11), float("-inf")).triu(1)
    ref = (s.softmax(-1) @ v).transpose(1, 2).reshape(1, 11, D) @ a.o_proj.weight.T
    with torch.no_grad():
        torch.testing.assert_close(m(h)[0], ref, atol=1e-5, rtol=1e-4)


def test_gradients_reach_selected_tokens_and_predictor():
    m = make().train()
    h = torch.randn(1, 24, D, requires_grad=True)
    out, aux, _ = m(h)
    (out.sum() + aux).backward()
    assert m.memory.predictor.weight.grad.abs().sum() > 0
    assert h.grad[:, :8].abs().sum() > 0


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(window=0), "window_size"),
        (dict(eidetic_size=-1), "eidetic_size"),
        (dict(ssm="s4"), "unknown ssm"),
        (dict(ssm=None, attention=False), "needs an SSM"),
        (dict(ssm=None), "fading band"),
        (dict(window=None, fading=False), "finite window"),
        (dict(num_heads=3), "must divide"),
        (dict(selection="best"), "unknown selection"),
    ],
)
def test_bad_configuration_raises(kw, match):
    with pytest.raises(ValueError, match=match):
        make(**kw)


def test_bad_input_raises():
    m = make()
    with pytest.raises(ValueError, match="expected hidden states"):
        m(torch.randn(4, D))
    with pytest.raises(ValueError, match="empty sequence"):
        m(torch.randn(1, 0, D))
    with pytest.raises(ValueError, match="empty batch"):
        m(torch.randn(0, 3, D))
    with pytest.raises(ValueError, match=rf"expected hidden states \[batch, length, {D}\]"):
        m(torch.randn(1, 3, D + 1))
    with pytest.raises(TypeError, match="hidden states are torch.float64"):
        m(torch.randn(1, 3, D, dtype=torch.float64))
    state = MixerState()
    m(torch.randn(1, 3, D), state)
    with pytest.raises(ValueError, match="valid positions are for passes from an empty state"):
        m(torch.randn(1, 3, D), state, valid=torch.ones(1, 3, dtype=torch.bool))


def test_norms_refuse_integers_and_a_gate_of_another_shape():
    from bmojo.layers import GatedRMSNorm, RMSNorm

    with pytest.raises(TypeError, match="floating point"):
        RMSNorm(D)(torch.ones(2, D, dtype=torch.long))
    with pytest.raises(ValueError, match="the gate z must have x's shape"):
        GatedRMSNorm(D)(torch.randn(2, 3, D), torch.randn(1, 3, D))
    with pytest.raises(ValueError, match="must be >= 1 and divide dim"):
        GatedRMSNorm(D, n_groups=3)


def test_bad_layer_sizes_and_valid_masks_raise():
    from bmojo.layers import RMSNorm
    from bmojo.layers.eidetic import EideticMemory
    from bmojo.layers.rotary import RotaryEmbedding
    from bmojo.models.cache import BMojoCache

    for build, match in [(lambda: make(window=1.5), "window_size must be an integer >= 1"),
                         (lambda: RMSNorm(0), "dim must be a positive integer"),
                         (lambda: EideticMemory(D, 0, 4, 4, "innovation"), "eidetic_size must be a positive integer"),
                         (lambda: EideticMemory(D, 2, 0, 4, "innovation"), "window must be a positive integer"),
                         (lambda: RotaryEmbedding(8, theta=0.0), "rope_theta must be a finite number > 0"),
                         (lambda: BMojoCache(-1), "num_layers must be >= 0"),
                         (lambda: BMojoCache(2).reserve(-1), "tokens must be >= 0")]:  # fmt: skip
        with pytest.raises(ValueError, match=match):
            build()
    with pytest.raises(ValueError, match=r"valid must be bool \[batch, length\] \(2, 20\)"):
        make()(torch.randn(2, 20, D), valid=torch.ones(2, 5, dtype=torch.bool))


def test_a_chunk_of_zero_raises_rather_than_taking_the_window():
    with pytest.raises(ValueError, match="chunk_size must be a positive integer"):
        make(chunk_size=0)


@pytest.mark.parametrize("window", [None, 4])
def test_a_state_of_another_batch_raises(window):
    """Attention without an SSM (whose state the SSM checks): a state filled for 2 sequences, stepped with 1."""
    m = make(ssm=None, fading=False, window=window, eidetic_size=0)
    state = MixerState()
    m(torch.randn(2, 6, D), state)
    with pytest.raises(ValueError, match="the state holds 2 sequences but the input 1"):
        m(torch.randn(1, 1, D), state)
