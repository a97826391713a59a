"""BMojoForCausalLM: presets, parity of full forward vs cached decoding, save/load, generate, loss, errors."""

import os
import re

import pytest
import torch
from transformers import CompileConfig

from bmojo import BMojoCache, BMojoConfig, BMojoForCausalLM
from bmojo.layers import MixerState
from bmojo.models.config import PRESETS
from bmojo.models.modeling import compile_steps_config, count_parameters, left_padded, new_tokens

# window 8, chunk 4, eidetic 4: at L=40 the window, fading band and eidetic memory are all active
OVERRIDES = dict(window_size=8, chunk_size=4, eidetic_size=4)


def tiny(name: str, seed: int = 0, **kw) -> BMojoForCausalLM:
    torch.manual_seed(seed)
    return BMojoForCausalLM(BMojoConfig.from_preset(name, "tiny", **{**OVERRIDES, **kw})).eval()


def test_preset_layer_patterns():
    assert BMojoConfig.from_preset("transformer").layer_pattern == ["attention", "attention"]
    assert (
        BMojoConfig.from_preset("jamba", num_hidden_layers=8).layer_pattern
        == ["mamba"] * 4 + ["attention"] + ["mamba"] * 3
    )
    assert BMojoConfig.from_preset("bmojo").layer_pattern == ["bmojo", "bmojo"]
    assert BMojoConfig.from_preset("mamba").use_mlp is False
    cfg = BMojoConfig.from_preset("bmojo", window_size=16, eidetic_size=2, selection="recency", state_size=4)
    assert (cfg.window_size, cfg.eidetic_size, cfg.selection, cfg.state_size) == (16, 2, "recency", 4)


@pytest.mark.parametrize("name", PRESETS)
@pytest.mark.parametrize("size", ["130m", "370m", "790m", "1.4b"])
def test_paper_sizes_within_ten_percent(name, size):
    target = {"130m": 130e6, "370m": 370e6, "790m": 790e6, "1.4b": 1.4e9}[size]
    n = count_parameters(BMojoConfig.from_preset(name, size))
    assert abs(n - target) / target < 0.10, f"{name} {size}: {n / 1e6:.1f}M"


@pytest.mark.parametrize("name,extra", [(name, {}) for name in PRESETS] + [("bmojo", {"partial_rotary_factor": 0.5})])
def test_full_forward_equals_prefill_plus_decode(name, extra):
    model = tiny(name, **extra)
    ids = torch.randint(0, 128, (2, 40))
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        out = model(ids[:, :13], use_cache=True)
        cache, logits = out.cache, [out.logits]
        assert out.past_key_values is cache and len(cache) == len(model.model.layers)
        for t in range(13, 40):
            out = model(ids[:, t : t + 1], past_key_values=cache, use_cache=True)
            logits.append(out.logits)
    step = torch.cat(logits, 1)
    print(name, "max diff", (step - full).abs().max().item())
    torch.testing.assert_close(step, full, atol=1e-4, rtol=1e-4)
    assert cache.get_seq_length() == 40


@pytest.mark.parametrize("name", PRESETS)
def test_a_cache_continued_by_long_inputs_equals_the_full_forward(name):
    """A prompt appended to a cache in pieces of several tokens (a chat's turns; each piece one parallel pass per
    layer), then single-token steps, give the logits of one forward over everything."""
    model = tiny(name)
    ids = torch.randint(0, 128, (2, 74))
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        out = model(ids[:, :9], use_cache=True)
        logits = [out.logits]
        for a, b in ((9, 30), (30, 33), (33, 70), *((t, t + 1) for t in range(70, 74))):
            out = model(ids[:, a:b], past_key_values=out.cache, use_cache=True)
            logits.append(out.logits)
    torch.testing.assert_close(torch.cat(logits, 1), full, atol=1e-4, rtol=1e-4)
    assert out.cache.get_seq_length() == 74


@pytest.mark.parametrize("name", ["bmojo", "transformer"])
def test_compiled_decoding_with_static_cache_addresses_equals_eager(name):
    """The cache marked static (what a CUDA-graph replay of the step needs) keeps its tensors' storage through
    compiled decoding, and the compiled steps give the eager logits (full attention: with room reserved first)."""
    model = tiny(name)
    ids = torch.randint(0, 128, (2, 30))
    step = torch.compile(model)
    with torch.no_grad():
        eager, compiled = (model(ids[:, :13], use_cache=True).cache for _ in range(2))
        compiled.reserve(17)
        compiled.mark_static_addresses()
        ptrs = [t.data_ptr() for state in compiled.layers for t in state.tensors()]
        for t in range(13, 30):
            a = step(ids[:, t : t + 1], past_key_values=compiled, use_cache=True).logits
            torch.testing.assert_close(a, model(ids[:, t : t + 1], past_key_values=eager, use_cache=True).logits)
    assert [t.data_ptr() for state in compiled.layers for t in state.tensors()] == ptrs


@pytest.mark.parametrize("name", ["bmojo", "jamba"])
def test_layers_share_one_position_tensor_advanced_once_a_call(name):
    """After a prefill the cache's layers hold one position tensor (a step then adds to it once, not once a layer);
    it counts every token of the steps and of a multi-token continuation, as the token count does."""
    model = tiny(name, window_size=64)
    ids = torch.randint(0, 128, (2, 40))
    with torch.no_grad():
        cache = model(ids[:, :13], use_cache=True).cache
        assert len({id(state.pos) for state in cache.layers}) == 1
        for t in range(13, 20):
            model(ids[:, t : t + 1], past_key_values=cache, use_cache=True)
        model(ids[:, 20:23], past_key_values=cache, use_cache=True)  # steps: fewer than a sixteenth of the window
        model(ids[:, 23:40], past_key_values=cache, use_cache=True)  # one parallel pass a layer
    assert all(state.pos.item() == state.seen == 40 for state in cache.layers)
    assert len({id(state.pos) for state in cache.layers}) == 1


@pytest.mark.parametrize("name", ["bmojo", "transformer"])
def test_compiled_decoding_graphs_take_no_ints_and_have_static_shapes(name):
    """Every position's step is the same graph: no int inputs (the cache's token count is advanced outside it) and
    no dynamic shapes (full attention reads its whole reserved buffer, masked), as one CUDA graph replay needs
    (CUDA graphs record a graph per distinct int input or shape)."""
    graphs = []

    def backend(gm: torch.fx.GraphModule, example_inputs):
        values = [n.meta.get("example_value") for n in gm.graph.nodes if n.op == "placeholder"]
        graphs.append([v for v in values if isinstance(v, torch.SymInt)])
        graphs[-1] += [
            v for v in values if isinstance(v, torch.Tensor) and not all(isinstance(d, int) for d in v.shape)
        ]
        return gm.forward

    model = tiny(name)
    ids = torch.randint(0, 128, (1, 24))
    torch._dynamo.reset()
    step = torch.compile(model, backend=backend)
    with torch.no_grad():
        cache = model(ids[:, :13], use_cache=True).cache
        cache.reserve(11)
        for t in range(13, 24):
            step(ids[:, t : t + 1], past_key_values=cache, use_cache=True)
    assert cache.get_seq_length() == 24
    assert 0 < len(graphs) <= 4 and all(not dynamic for dynamic in graphs), graphs


def test_compiled_decoding_step_writes_each_state_tensor_once():
    """Each in-place write of a compiled step is a kernel on a GPU: the step writes every state tensor once (the
    eidetic memory's chunk-boundary copy, once a masked write of the keys, values and positions at every step, is
    left to ``BMojoCache.advance``, outside the graph), and the boundary positions still decode as eager does."""
    writes: list[dict[str, int]] = []

    def backend(gm: torch.fx.GraphModule, example_inputs):
        counts: dict[str, int] = {}
        for node in gm.graph.nodes:
            name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
            if node.op in ("call_method", "call_function") and name.endswith("_") and not name.startswith("_"):
                target = node.args[0]
                if isinstance(target, torch.fx.Node) and target.op == "placeholder":
                    counts[target.name] = counts.get(target.name, 0) + 1
        writes.append(counts)
        return gm.forward

    model = tiny("bmojo")  # chunks of 4: boundaries at 16 and 20
    ids = torch.randint(0, 128, (1, 22))
    torch._dynamo.reset()
    step = torch.compile(model, backend=backend)
    with torch.no_grad():
        compiled, eager = (model(ids[:, :14], use_cache=True).cache for _ in range(2))
        for t in range(14, 22):
            got = step(ids[:, t : t + 1], past_key_values=compiled, use_cache=True).logits
            torch.testing.assert_close(got, model(ids[:, t : t + 1], past_key_values=eager, use_cache=True).logits)
    keys = [name for counts in writes for name in counts if name.endswith("_keys")]
    assert writes and len(keys) == 2 * len(writes)  # (two layers)
    assert all(n == 1 for counts in writes for n in counts.values()), writes


@pytest.mark.parametrize("name", PRESETS)
def test_compiled_prefill_and_decoding_step_are_one_graph_each(name):
    """The whole model's prefill and step are a graph each: a frame dynamo cannot trace whole runs eager with a graph
    per layer, one CUDA-graph replay each (torch 2.11 could not trace ``bool(list)`` in ``BMojoCache.started``: 10
    replays a step of the 8-layer 130m model, whose host work bound batch-1 decoding on a GPU), and a selection by a
    mask (a data-dependent size) broke the prefill at every layer."""
    model = tiny(name)
    ids = torch.randint(0, 128, (1, 14))
    with torch.no_grad():
        prefill = torch._dynamo.explain(model)(ids[:, :13], use_cache=True)
        cache = model(ids[:, :13], use_cache=True).cache
        step = torch._dynamo.explain(model)(ids[:, 13:], past_key_values=cache, use_cache=True)
    assert model.config.num_hidden_layers > 1
    assert prefill.graph_count == 1, prefill.break_reasons
    assert step.graph_count == 1, step.break_reasons


def test_compiled_decoding_updates_the_state_buffers_in_place():
    """Inductor writes the joined key/value/position buffers, the pending fading tokens and the eidetic staging
    keys/values in place: the compiled step allocates no buffer of their shape and dtype (it copies a whole buffer at
    every step where the step reads the buffer after writing it, or through a view of it, or scatters into it)."""
    from torch._inductor.utils import run_and_get_code

    model = tiny("bmojo")
    ids = torch.randint(0, 128, (1, 40))
    torch._dynamo.reset()
    step = torch.compile(model)
    with torch.no_grad():
        cache = model(ids[:, :30], use_cache=True).cache
        cache.mark_static_addresses()
        step(ids[:, 30:31], past_key_values=cache, use_cache=True)  # the first position has a graph of its own
        _, codes = run_and_get_code(step, ids[:, 31:32], past_key_values=cache, use_cache=True)
    updated = ("keys", "values", "positions", "f_pend", "stage_k", "stage_v")
    buffers = {(tuple(t.shape), str(t.dtype)) for s in cache.layers for t in (getattr(s, name) for name in updated)}
    pattern = r"empty_strided_\w+\(\(([^)]*)\), \([^)]*\), (torch\.\w+)\)"
    allocated = {(tuple(int(x) for x in shape.split(",") if x.strip()), dtype)
                 for code in codes for shape, dtype in re.findall(pattern, code)}  # fmt: skip
    assert codes and allocated and not buffers & allocated, buffers & allocated


def test_base_model_continues_and_counts_like_the_lm():
    """``BMojoModel`` advances a continued cache's token count itself; ``BMojoForCausalLM`` does it last."""
    model = tiny("bmojo")
    ids = torch.randint(0, 128, (1, 20))
    with torch.no_grad():
        base, lm = (model(ids[:, :12], use_cache=True).cache for _ in range(2))
        for t in range(12, 20):
            hidden = model.model(ids[:, t : t + 1], cache=base).last_hidden_state
            logits = model(ids[:, t : t + 1], past_key_values=lm, use_cache=True).logits
            torch.testing.assert_close(model.lm_head(hidden).float(), logits)
    assert base.get_seq_length() == lm.get_seq_length() == 20 and base.started


@pytest.mark.parametrize("name", PRESETS)
def test_cache_size_constant_in_context_except_full_attention(name):
    """Also the same size counted under ``inference_mode`` (the joined buffers' views counted once)."""
    model = tiny(name)
    sizes = []
    with torch.no_grad():
        for n in (24, 72):
            sizes.append(model(torch.randint(0, 128, (1, n)), use_cache=True).cache.nbytes())
    with torch.inference_mode():
        assert model(torch.randint(0, 128, (1, 72)), use_cache=True).cache.nbytes() == sizes[1]
    grows = any(k == "attention" for k in model.config.layer_pattern)
    assert (sizes[1] > sizes[0]) if grows else (sizes[1] == sizes[0])


@pytest.mark.parametrize("name", ["bmojo", "jamba", "mamba"])
def test_save_load_round_trip(name, tmp_path):
    model = tiny(name)
    ids = torch.randint(0, 128, (1, 30))
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    loaded = BMojoForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.layer_pattern == model.config.layer_pattern
    in_memory = BMojoForCausalLM.from_pretrained(None, config=model.config, state_dict=model.state_dict()).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, atol=0, rtol=0)
        torch.testing.assert_close(in_memory(ids).logits, model(ids).logits, atol=0, rtol=0)


def test_saved_model_loads_through_auto_classes_in_a_process_without_bmojo_imported(tmp_path):
    """``save_pretrained`` writes ``auto_map`` and its loader, so plain ``transformers`` code (``trust_remote_code``)
    gets the bmojo class and the same logits; without ``trust_remote_code`` it refuses."""
    import subprocess
    import sys

    model = tiny("bmojo")
    ids = torch.randint(0, 128, (1, 30))
    model.save_pretrained(tmp_path / "model")
    with torch.no_grad():
        torch.save((ids, model(ids).logits), tmp_path / "expected.pt")
    code = f"""
import sys, torch
from transformers import AutoModelForCausalLM
assert "bmojo" not in sys.modules
try:
    AutoModelForCausalLM.from_pretrained({str(tmp_path / "model")!r})
    raise SystemExit("loaded without trust_remote_code")
except ValueError as e:
    assert "trust_remote_code" in str(e), e
model = AutoModelForCausalLM.from_pretrained({str(tmp_path / "model")!r}, trust_remote_code=True).eval()
assert type(model).__module__ == "bmojo.models.modeling", type(model)
ids, expected = torch.load({str(tmp_path / "expected.pt")!r})
with torch.no_grad():
    torch.testing.assert_close(model(ids).logits, expected, atol=0, rtol=0)
print("ok")
"""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


@pytest.mark.parametrize("name", ["bmojo", "transformer", "mamba2"])
def test_generate_greedy_matches_manual_loop(name):
    model = tiny(name)
    prompt = torch.randint(0, 128, (2, 11))
    with torch.no_grad():
        out = model.generate(prompt, max_new_tokens=15, do_sample=False, pad_token_id=0)
        seq = prompt
        for _ in range(15):
            nxt = model(seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], 1)
    assert torch.equal(out, seq)


def test_generate_from_embeddings_a_given_cache_and_a_returned_one():
    """A prompt as ``inputs_embeds``, a cache passed in, and a returned cache continued by a second call all give the
    tokens of one greedy ``generate`` from the ids (a cache passed in once failed on ``is_linear``, an embedded prompt
    at the second step)."""
    model = tiny("bmojo")
    prompt = torch.randint(0, 128, (2, 10))
    with torch.no_grad():
        ref = model.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
        embedded = model.generate(inputs_embeds=model.model.embed_tokens(prompt), max_new_tokens=6, do_sample=False,
                                  pad_token_id=0)  # fmt: skip
        given = model.generate(prompt, cache=BMojoCache(len(model.model.layers)), max_new_tokens=6, do_sample=False,
                               pad_token_id=0)  # fmt: skip
        first = model.generate(prompt, max_new_tokens=3, do_sample=False, pad_token_id=0, return_dict_in_generate=True)
        second = model.generate(first.sequences, cache=first.cache, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert torch.equal(embedded, ref[:, 10:]) and torch.equal(given, ref) and torch.equal(second, ref)


def _compile_anywhere() -> CompileConfig:
    """``compile_steps_config`` (which makes ``generate`` compile off CUDA too) with dynamo's ``eager`` backend, which
    traces and guards as inductor's does, without its compile time."""
    config = compile_steps_config("cpu")
    config.backend, config.mode = "eager", None
    return config


@pytest.mark.parametrize("name", ["bmojo", "transformer"])
def test_generate_with_a_static_cache_compiles_its_steps_into_two_graphs_and_keeps_the_tokens(name):
    """``generate(cache_implementation="static")`` makes a static cache for the generation's length: the prefill
    reserves the full-attention buffers' room for every token and marks the state's addresses static, and the
    compiled steps (12 of them, crossing chunk boundaries) are two graphs (the first position's and every later
    one's), which a second call, with a cache of its own, takes again; the tokens are eager generation's. Without a
    compile config, off CUDA, nothing is compiled."""
    from torch._dynamo.utils import counters

    model = tiny(name)
    prompts = torch.randint(0, 128, (2, 2, 13))
    kwargs = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        refs = [model.generate(prompt, **kwargs) for prompt in prompts]
        torch._dynamo.reset()
        counters.clear()
        plain = model.generate(prompts[0], cache_implementation="static", **kwargs)
        assert counters["stats"]["unique_graphs"] == 0
        outs = [model.generate(prompt, cache_implementation="static", compile_config=_compile_anywhere(),
                               return_dict_in_generate=True, **kwargs) for prompt in prompts]  # fmt: skip
    assert torch.equal(plain, refs[0]) and all(torch.equal(out.sequences, ref) for out, ref in zip(outs, refs))
    assert counters["stats"]["unique_graphs"] == 2
    cache = outs[1].cache
    assert cache.is_compileable and cache.max_length == 13 + 12 - 1 == cache.get_seq_length()
    assert all(t._dynamo_static_input_type for state in cache.layers for t in state.tensors())
    if name == "transformer":  # room for every token, made once
        assert {state.win_k.shape[2] for state in cache.layers} == {cache.max_length}


@pytest.mark.parametrize("name", ["bmojo", "jamba"])
def test_beam_search_and_sampling_with_a_static_cache_and_compiled_steps_keep_the_eager_tokens(name):
    """Beam search reorders the static cache's rows in place between compiled steps; seeded sampling draws the same
    tokens."""
    model = tiny(name)
    prompt = torch.randint(1, 128, (2, 21))  # (no token 0: generate would take it for padding)
    with torch.no_grad():
        for kwargs in (dict(num_beams=3, do_sample=False), dict(do_sample=True, top_k=5)):
            kwargs.update(max_new_tokens=10, pad_token_id=0)
            torch.manual_seed(1)
            ref = model.generate(prompt, **kwargs)
            torch.manual_seed(1)
            out = model.generate(prompt, cache_implementation="static", compile_config=_compile_anywhere(), **kwargs)
            assert torch.equal(out, ref)


def test_static_cache_bad_sizes_and_cache_implementations_raise():
    model = tiny("bmojo")
    with pytest.raises(ValueError, match="max_length must be >= 1"):
        BMojoCache(2, max_length=0)
    with pytest.raises(ValueError, match=r"prompt \(10 tokens\) is longer than the static cache's max_length \(9\)"):
        model(torch.randint(0, 128, (1, 10)), cache=BMojoCache(len(model.model.layers), max_length=9), use_cache=True)
    assert not BMojoCache(2).is_compileable
    with pytest.raises(ValueError, match="cache_implementation must be None, 'dynamic' .* got 'offloaded'"):
        model.generate(torch.randint(1, 128, (1, 5)), max_new_tokens=2, cache_implementation="offloaded")
    prompt = torch.randint(1, 128, (1, 5))
    assert torch.equal(model.generate(prompt, max_new_tokens=2, cache_implementation="dynamic"),
                       model.generate(prompt, max_new_tokens=2))  # fmt: skip


@pytest.mark.parametrize("grad_mode", [torch.no_grad, torch.inference_mode])
@pytest.mark.parametrize("name", PRESETS)
def test_reordered_cache_continues_as_a_prefill_of_the_reordered_batch(name, grad_mode):
    """``reorder_cache`` (beam search) makes row ``i`` the former row ``rows[i]``, repeats included, in place: the
    steps after it give the logits of a cache prefilled with the prompts in that order. Under ``inference_mode`` too,
    where the views of the joined key buffers do not know their base (they were reordered twice)."""
    model = tiny(name)
    prompts, rows = torch.randint(0, 128, (3, 22)), torch.tensor([2, 0, 0])
    steps = torch.randint(0, 128, (3, 6))
    with grad_mode():
        cache = model(prompts, use_cache=True).cache
        ptrs = [t.data_ptr() for state in cache.layers for t in state.tensors()]
        cache.reorder_cache(rows)
        assert [t.data_ptr() for state in cache.layers for t in state.tensors()] == ptrs
        ref = model(prompts[rows], use_cache=True).cache
        for t in range(steps.shape[1]):
            got = model(steps[:, t : t + 1], past_key_values=cache, use_cache=True).logits
            want = model(steps[:, t : t + 1], past_key_values=ref, use_cache=True).logits
            torch.testing.assert_close(got, want)


@pytest.mark.parametrize("name", ["bmojo", "jamba"])
def test_beam_search_with_the_cache_equals_beam_search_recomputing_the_prefix(name):
    """Hugging Face beam search reorders the cache (``reorder_cache``) after every step; here its beams do change
    places (the kept sequences' tokens come from different beam rows over the steps), so a cache left in order would
    fail."""
    model = tiny(name)
    prompt = torch.randint(0, 128, (2, 18))
    beams = dict(max_new_tokens=20, num_beams=5, do_sample=False, pad_token_id=0, return_dict_in_generate=True,
                 output_scores=True)  # fmt: skip
    with torch.no_grad():
        cached, recomputed = model.generate(prompt, **beams), model.generate(prompt, use_cache=False, **beams)
    assert cached.sequences.shape == (2, 38) and torch.equal(cached.sequences, recomputed.sequences)
    rows = cached.beam_indices[:, :20]
    assert (rows[:, 1:] != rows[:, :-1]).any()


def test_reordering_rows_that_do_not_fit_the_batch_raises():
    model = tiny("bmojo")
    with torch.no_grad():
        cache = model(torch.randint(0, 128, (2, 10)), use_cache=True).cache
    for rows, match in [(torch.tensor([0]), r"2 integer batch indices \[B\], got torch.int64 \(1,\)"),
                        (torch.tensor([[0, 1]]), "2 integer batch indices"), (torch.tensor([0.0, 1.0]), "integer"),
                        (torch.tensor([0, 2]), r"lie in \[0, 2\), got \[0, 2\]"), (torch.tensor([-1, 0]), "lie in")]:  # fmt: skip
        with pytest.raises(ValueError, match=match):
            cache.reorder_cache(rows)
    with pytest.raises(NotImplementedError, match="long-term storage"):
        MixerState(store_ids=torch.tensor([0, 1])).select_rows(torch.tensor([1, 1]))


def _padded(seqs: list[torch.Tensor], side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequences ``[1, n]`` padded with zeros to one length on the ``side`` given: ``(ids, attention_mask) [B, L]``."""
    length = max(seq.shape[1] for seq in seqs)
    ids = torch.zeros(len(seqs), length, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, seq in enumerate(seqs):
        at = slice(0, seq.shape[1]) if side == "right" else slice(length - seq.shape[1], length)
        ids[row, at], mask[row, at] = seq[0], 1
    return ids, mask


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("name", ["bmojo", "jamba", "transformer"])
def test_padded_batch_equals_each_sequence_alone(name, side):
    """Sequences of different lengths padded on the right (as Hugging Face collators pad for training) or on the left:
    every token's logits are those of its sequence alone, and the loss (labels -100 at the padding, and on the left at
    each sequence's first token, which a padding position would predict) and the innovation loss average over the
    tokens, as over the sequences concatenated."""
    model = tiny(name).train()
    lengths = [23, 9, 16]
    seqs = [torch.randint(0, 128, (1, n)) for n in lengths]
    ids, mask = _padded(seqs, side)
    labels = ids.masked_fill(mask == 0, -100)
    if side == "left":
        labels[torch.arange(3), 23 - torch.tensor(lengths)] = -100
    out = model(ids, attention_mask=mask, labels=labels)  # in training, the loss without the logits
    alone = [model(seq, labels=seq) for seq in seqs]
    with torch.no_grad():
        logits = model(ids, attention_mask=mask).logits
        for row, (seq, n) in enumerate(zip(seqs, lengths)):
            at = slice(0, n) if side == "right" else slice(23 - n, 23)
            torch.testing.assert_close(logits[row, at], model(seq).logits[0], atol=1e-5, rtol=1e-5)
    targets = [n - 1 for n in lengths]  # next-token targets per sequence
    ce = sum((one.loss - (0 if one.aux_loss is None else model.config.innovation_loss_weight * one.aux_loss)) * k
             for one, k in zip(alone, targets)) / sum(targets)  # fmt: skip
    if out.aux_loss is None:
        torch.testing.assert_close(out.loss, ce)
    else:
        aux = sum(one.aux_loss * n for one, n in zip(alone, lengths)) / sum(lengths)
        torch.testing.assert_close(out.aux_loss, aux)
        torch.testing.assert_close(out.loss, ce + model.config.innovation_loss_weight * aux)
        out.loss.backward()
        assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("name,extra", [(name, {}) for name in PRESETS] + [
    ("bmojo", dict(chunk_size=3, selection="random")),
    ("bmojo", dict(bmojo_ssm="mamba", tie_fading_kv=False, num_key_value_heads=1, selection="recency")),
])  # fmt: skip
def test_padded_prompts_prefill_and_decode_as_each_alone(name, extra, side):
    """Prompts of 23, 9, 16 and 1 tokens padded on either side fill a cache in one pass whose rows then decode
    together, each from its own end at its own positions: 30 tokens, 5 in one call and then one a call (through each
    row's own chunk boundaries, after a reordering of the rows, which differ in padding), give every row the logits of
    its prompt alone."""
    model = tiny(name, **extra)
    seqs = [torch.randint(0, 128, (1, n)) for n in (23, 9, 16, 1)]
    ids, mask = _padded(seqs, side)
    steps = torch.randint(0, 128, (4, 30))
    calls, order = [slice(0, 5), *(slice(t, t + 1) for t in range(5, 30))], [2, 0, 3, 1]
    with torch.no_grad():
        out = model(ids, attention_mask=mask, use_cache=True)
        out.cache.reorder_cache(torch.tensor(order))
        stepped = torch.cat([model(steps[:, at], past_key_values=out.cache, use_cache=True).logits for at in calls], 1)
        for row, seq in enumerate(seqs):
            alone, n = model(seq, use_cache=True), seq.shape[1]
            at = slice(0, n) if side == "right" else slice(23 - n, 23)
            torch.testing.assert_close(out.logits[row, at], alone.logits[0], atol=1e-5, rtol=1e-5)
        for row, src in enumerate(order):
            cache = model(seqs[src], use_cache=True).cache
            ref = torch.cat([model(steps[row : row + 1, at], past_key_values=cache, use_cache=True).logits
                             for at in calls], 1)  # fmt: skip
            torch.testing.assert_close(stepped[row], ref[0], atol=1e-5, rtol=1e-5)
    assert out.cache.get_seq_length() == 23 + 30


@pytest.mark.parametrize("name", ["bmojo", "jamba", "transformer"])
def test_generate_from_left_padded_prompts_gives_each_prompt_its_own_tokens(name):
    """Hugging Face ``generate`` on a batch of prompts padded on the left (on the right, it would read the first new
    token's logits at the padding, and warns): greedy, beam search, and a static cache with compiled steps each give
    every prompt the tokens it gets alone."""
    model = tiny(name)
    seqs = [torch.randint(1, 128, (1, n)) for n in (13, 5, 9)]  # (no token 0: generate would take it for padding)
    ids, mask = _padded(seqs, "left")
    with torch.no_grad():
        for kwargs in (dict(do_sample=False), dict(num_beams=3, do_sample=False),
                       dict(do_sample=False, cache_implementation="static", compile_config=_compile_anywhere())):  # fmt: skip
            kwargs.update(max_new_tokens=12, pad_token_id=0)
            out = model.generate(ids, attention_mask=mask, **kwargs)
            for row, seq in enumerate(seqs):
                assert torch.equal(out[row, 13:], model.generate(seq, **kwargs)[0, seq.shape[1] :]), (kwargs, row)


def test_left_padded_lists_are_generate_inputs_and_new_tokens_end_at_eos():
    ids, mask = left_padded([[5, 6, 7], [8]], pad_id=9)
    assert ids.tolist() == [[5, 6, 7], [9, 9, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    out = torch.tensor([[5, 6, 7, 2, 0, 0], [9, 9, 8, 3, 4, 1]])
    assert new_tokens(out, 3, eos_id=0) == [[2, 0], [3, 4, 1]] and new_tokens(out, 3, None) == [[2, 0, 0], [3, 4, 1]]


def test_unsupported_padding_raises():
    model = tiny("bmojo")
    ids = torch.randint(0, 128, (2, 8))
    for mask in ([[0, 1, 1, 1, 1, 1, 1, 0], [1] * 8], [[1, 1, 0, 1, 1, 1, 1, 1], [1] * 8],
                 [[0, 1, 1, 1, 1, 1, 1, 1], [1] * 7 + [0]]):  # fmt: skip
        with pytest.raises(NotImplementedError, match="between tokens or on both sides"):
            model(ids, attention_mask=torch.tensor(mask))
    with pytest.raises(ValueError, match="keeps no token of sequence 1"):
        model(ids, attention_mask=torch.tensor([[1] * 8, [0] * 8]))
    with pytest.raises(ValueError, match=r"attention_mask must be \[batch, length\] \(2, 8\)"):
        model(ids, attention_mask=torch.ones(2, 7, dtype=torch.long).tril())
    with torch.no_grad():
        cache = model(ids, attention_mask=torch.ones(2, 8, dtype=torch.long), use_cache=True).cache
        with pytest.raises(NotImplementedError, match="pads some of the tokens that continue this cache"):
            model(ids[:, :3], attention_mask=torch.tensor([[1] * 11, [1] * 9 + [0] * 2]), past_key_values=cache)
    stored = tiny("bmojo", storage=True)
    with pytest.raises(NotImplementedError, match="padded rows with long-term storage"):
        stored(ids, attention_mask=torch.tensor([[0] * 3 + [1] * 5, [1] * 8]), use_cache=True)


def test_generate_sampling_is_seeded():
    model = tiny("bmojo")
    prompt = torch.randint(0, 128, (1, 5))
    runs = []
    for _ in range(2):
        torch.manual_seed(123)
        runs.append(model.generate(prompt, max_new_tokens=12, do_sample=True, top_k=20, pad_token_id=0))
    assert runs[0].shape == (1, 17) and torch.equal(runs[0], runs[1])
    assert ((runs[0] >= 0) & (runs[0] < 128)).all()


def test_loss_is_cross_entropy_plus_weighted_innovation_loss():
    model = tiny("bmojo", innovation_loss_weight=0.5)
    ids = torch.randint(0, 128, (2, 30))
    labels = ids.clone()
    labels[:, :5] = -100
    out = model(ids, labels=labels)
    ce = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, 128), labels[:, 1:].reshape(-1))
    assert out.aux_loss is not None and out.aux_loss.item() > 0
    torch.testing.assert_close(out.loss, ce + 0.5 * out.aux_loss)
    out.loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "predictor" in n)
    plain = tiny("transformer")(ids, labels=labels)
    assert plain.aux_loss is None


@pytest.mark.parametrize("name", ["bmojo", "transformer"])
def test_training_loss_without_logits_matches_the_loss_of_the_logits(name):
    """In training, ``loss_chunk_size``: the loss through the chunked LM head and no logits; the loss and every
    gradient of the logits' loss (``loss_chunk_size=0``), with ignored labels."""
    ids = torch.randint(0, 128, (2, 30))
    labels = ids.masked_fill(torch.arange(30) < torch.tensor([[4], [0]]), -100)
    results = []
    for chunk in (7, 0):
        model = tiny(name, loss_chunk_size=chunk).train()
        out = model(ids, labels=labels)
        out.loss.backward()
        assert (out.logits is None) == (chunk > 0)
        results.append([out.loss.detach()] + [p.grad for p in model.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_trainer_finds_labels_alone():
    """Hugging Face ``Trainer`` takes every ``forward`` argument with "label" in its name as labels that a batch must
    hold for an evaluation loss: ``shift_labels`` is a keyword (as in Hugging Face's models), not an argument."""
    from transformers.utils import find_labels

    assert find_labels(BMojoForCausalLM) == ["labels"]


def test_shift_labels_and_num_items_in_batch():
    """``shift_labels`` are each position's own targets; ``num_items_in_batch`` divides the summed cross-entropy and
    weighs the innovation loss by the batch's share of the targets."""
    model = tiny("bmojo")
    ids = torch.randint(0, 128, (2, 30))
    out = model(ids, labels=ids)
    shifted = torch.cat([ids[:, 1:], torch.full((2, 1), -100)], dim=1)
    torch.testing.assert_close(model(ids, shift_labels=shifted).loss, out.loss)
    total = torch.nn.functional.cross_entropy(out.logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="sum")
    weight = model.config.innovation_loss_weight
    got = model(ids, labels=ids, num_items_in_batch=100).loss
    targets = ids[:, 1:].numel()
    torch.testing.assert_close(got, total / 100 + weight * out.aux_loss * targets / 100)


@pytest.mark.parametrize(
    ("labels", "kwargs", "error", "message"),
    [
        (lambda ids: ids.masked_fill(ids == ids[0, 3], 128), {}, ValueError, "labels holds 128, outside the vocab"),
        (lambda ids: ids.masked_fill(ids == ids[0, 3], -1), {}, ValueError, "labels holds -1, outside the vocab"),
        (lambda ids: ids.float(), {}, TypeError, "labels must be an integer tensor"),
        (lambda ids: ids[:, 1:], {}, ValueError, r"labels must have shape \(2, 30\)"),
        (lambda ids: ids, {"logits_to_keep": 1}, ValueError, "logits_to_keep=0"),
    ],
)
def test_bad_labels_raise(labels, kwargs, error, message):
    model = tiny("bmojo")
    ids = torch.randint(0, 128, (2, 30))
    with pytest.raises(error, match=message):
        model(ids, labels=labels(ids), **kwargs)
    if not kwargs:  # in training too, where the loss is the chunked one
        with pytest.raises(error, match=message.replace("labels", "shift_labels")):
            model.train()(ids, shift_labels=labels(ids))


def test_hf_trainer_gradient_accumulation_takes_the_steps_mean(tmp_path):
    """Hugging Face ``Trainer`` passes ``num_items_in_batch`` to a model whose ``forward`` takes ``**kwargs`` and then
    leaves the loss of each micro-batch as it is: one step over 4 sequences (different counts of ignored labels) as 2
    micro-batches moves the weights as one batch of 4 does (it moved them twice as far before)."""
    pytest.importorskip("accelerate")
    from transformers import Trainer, TrainingArguments

    ids = torch.randint(0, 128, (4, 24))
    labels = ids.masked_fill(torch.arange(24) < torch.tensor([[0], [15], [3], [20]]), -100)
    data = [{"input_ids": i, "labels": t} for i, t in zip(ids, labels)]
    moved = []
    for accumulate in (1, 2):
        model = tiny("transformer").train()
        before = [p.detach().clone() for p in model.parameters()]
        args = TrainingArguments(
            output_dir=str(tmp_path / str(accumulate)), per_device_train_batch_size=4 // accumulate,
            gradient_accumulation_steps=accumulate, max_steps=1, learning_rate=1.0, optim="sgd",
            lr_scheduler_type="constant", max_grad_norm=0, report_to=[], save_strategy="no", use_cpu=True,
        )  # fmt: skip
        trainer = Trainer(model=model, args=args, train_dataset=data, eval_dataset=data)
        trainer.train()
        moved.append([p.detach() - b for p, b in zip(model.parameters(), before)])
    for a, b in zip(*moved):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)
    with torch.no_grad():  # evaluation finds the labels (the only forward argument named so) and reports the loss
        loss = model.eval()(ids, labels=labels).loss
    predictions = []  # and gives metrics the logits alone (config.keys_to_ignore_at_inference)
    trainer.compute_metrics = lambda p: predictions.append(p.predictions) or {}
    assert trainer.evaluate()["eval_loss"] == pytest.approx(loss.item(), rel=1e-5)
    assert len(predictions) == 1 and predictions[0].shape == (4, 24, 128)


@pytest.mark.parametrize("name", ["bmojo", "jamba", "transformer", "mamba"])
def test_activation_checkpointing_gives_the_same_gradients_from_fewer_saved_tensors(name):
    """``activation_checkpointing_enable()`` (Hugging Face's): every block keeps only its input and is recomputed in
    the backward pass; the loss and every gradient are those without it, and autograd holds far fewer bytes."""
    ids = torch.randint(0, 128, (2, 40))
    results = []
    for on in (False, True):
        model = tiny(name).train()
        if on:
            model.activation_checkpointing_enable()
        assert model.is_activation_checkpointing == on
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.nbytes) or t, lambda t: t):
            out = model(ids, labels=ids)
        out.loss.backward()
        results.append(([out.loss.detach()] + [p.grad for p in model.parameters()], sum(saved)))
    (with_all, bytes_all), (recomputed, bytes_recomputed) = results
    for a, b in zip(recomputed, with_all):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert bytes_recomputed < bytes_all / 4


def test_activation_checkpointing_refuses_a_cache_in_training():
    model = tiny("bmojo").train()
    model.activation_checkpointing_enable()
    ids = torch.randint(0, 128, (1, 20))
    with pytest.raises(ValueError, match="fill a cache twice"):
        model(ids, use_cache=True)
    with torch.no_grad():  # no backward, nothing recomputed: a cache as usual
        assert model(ids, use_cache=True).cache.get_seq_length() == 20
    assert model.eval()(ids, use_cache=True).cache.get_seq_length() == 20


@pytest.mark.parametrize("name", ["bmojo", "jamba", "transformer"])
def test_hidden_states_are_the_embeddings_and_each_blocks_output(name):
    """``output_hidden_states=True``: the embeddings, then each block's output (the blocks run by hand), the last
    through the final norm, as Hugging Face models give them; in a left-padded batch each row's are those of its
    sequence alone at its positions; through a cache the step's; through ``generate``, one tuple a call."""
    model = tiny(name)
    ids = torch.randint(0, 128, (2, 21))
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
        x, expected = model.model.embed_tokens(ids), []
        for block in model.model.layers:
            expected.append(x)
            x = block(x)[0]
        expected.append(model.model.norm(x))
        assert len(out.hidden_states) == model.config.num_hidden_layers + 1
        for got, want in zip(out.hidden_states, expected):
            torch.testing.assert_close(got, want)
        torch.testing.assert_close(model.lm_head(out.hidden_states[-1]), out.logits)
        assert model(ids).hidden_states is None and model.model(ids).hidden_states is None

        seqs = [torch.randint(0, 128, (1, n)) for n in (21, 8)]
        padded, mask = _padded(seqs, "left")
        rows = model(padded, attention_mask=mask, output_hidden_states=True).hidden_states
        for row, seq in enumerate(seqs):
            alone = model(seq, output_hidden_states=True).hidden_states
            for got, want in zip(rows, alone):
                torch.testing.assert_close(got[row, 21 - seq.shape[1] :], want[0], atol=1e-5, rtol=1e-5)

        cache = model(ids[:, :20], use_cache=True).cache
        step = model(ids[:, 20:], past_key_values=cache, use_cache=True, output_hidden_states=True).hidden_states
        for got, want in zip(step, out.hidden_states):
            torch.testing.assert_close(got, want[:, 20:], atol=1e-5, rtol=1e-5)

        gen = model.generate(ids[:1, :9], max_new_tokens=3, do_sample=False, output_hidden_states=True,
                             return_dict_in_generate=True)  # fmt: skip
        assert [tuple(h[0].shape) for h in gen.hidden_states] == [(1, 9, 64), (1, 1, 64), (1, 1, 64)]


def test_attention_weights_and_selected_hidden_states_raise():
    model = tiny("bmojo")
    ids = torch.randint(0, 128, (1, 5))
    with pytest.raises(NotImplementedError, match="output_attentions"):
        model(ids, output_attentions=True)
    with pytest.raises(TypeError, match="output_hidden_states must be True or False"):
        model(ids, output_hidden_states=[-1])
    model.config.output_hidden_states = True  # the config's choice, when the call makes none
    assert len(model(ids).hidden_states) == model.config.num_hidden_layers + 1
    assert model(ids, output_hidden_states=False).hidden_states is None


def test_untied_embeddings():
    model = tiny("bmojo", tie_word_embeddings=False)
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert not torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)


def test_tied_embeddings_share_storage():
    model = tiny("bmojo")
    assert model.lm_head.weight is model.model.embed_tokens.weight


@pytest.mark.parametrize(
    "ids,err,match",
    [
        (torch.tensor([[1, 2, 128]]), ValueError, "outside the vocabulary"),
        (torch.tensor([[1, -1]]), ValueError, "outside the vocabulary"),
        (torch.zeros(1, 0, dtype=torch.long), ValueError, "empty sequence"),
        (torch.zeros(0, 3, dtype=torch.long), ValueError, "empty batch"),
        (torch.tensor([1, 2, 3]), ValueError, "2-D"),
        (torch.tensor([[1.0, 2.0]]), TypeError, "integer"),
    ],
)
def test_bad_input_ids(ids, err, match):
    with pytest.raises(err, match=match):
        tiny("bmojo")(ids)


def test_small_integer_ids_are_taken():
    model, ids = tiny("bmojo"), torch.randint(0, 128, (2, 7))
    for dtype in (torch.int8, torch.int16, torch.int32, torch.uint8):
        torch.testing.assert_close(model(ids.to(dtype)).logits, model(ids).logits)


def test_bad_masks_logits_to_keep_and_item_counts_raise():
    """An additive mask (0 and -inf), a mask of other values or of another shape, a negative ``logits_to_keep`` or one
    outside the positions, and a count of targets below 1 or of several, raise, naming the problem; ``logits_to_keep``
    as a tensor keeps those positions."""
    model, ids = tiny("bmojo"), torch.randint(0, 128, (2, 12))
    mask = torch.ones(2, 12)
    mask[0, :3] = 0
    with pytest.raises(ValueError, match="not an additive mask"):
        model(ids, attention_mask=torch.zeros(2, 12).masked_fill(mask == 0, float("-inf")))
    with pytest.raises(ValueError, match="1 for the tokens and 0 for the padding"):
        model(ids, attention_mask=mask * 2)
    with pytest.raises(ValueError, match=r"attention_mask must be \[batch, length\] \(2, 12\)"):
        model(ids, attention_mask=torch.ones(2, 20))
    torch.testing.assert_close(model(ids, attention_mask=mask).logits, model(ids, attention_mask=mask.bool()).logits)
    with pytest.raises(ValueError, match="logits_to_keep must be a count >= 0"):
        model(ids, logits_to_keep=-1)
    torch.testing.assert_close(model(ids, logits_to_keep=torch.tensor([0, 5])).logits, model(ids).logits[:, [0, 5]])
    torch.testing.assert_close(model(ids, logits_to_keep=torch.tensor([-12])).logits, model(ids).logits[:, [0]])
    with pytest.raises(ValueError, match="logits_to_keep holds position 12, outside the 12 positions"):
        model(ids, logits_to_keep=torch.tensor([3, 12]))
    with pytest.raises(ValueError, match="num_items_in_batch .* must be >= 1"):
        model(ids, labels=ids, num_items_in_batch=0)
    with pytest.raises(ValueError, match=r"num_items_in_batch must be one count, got shape \(2,\)"):
        model(ids, labels=ids, num_items_in_batch=torch.tensor([3, 3]))


def test_generate_refuses_right_padding_and_a_cache_that_saw_the_whole_input():
    model, ids = tiny("bmojo"), torch.randint(1, 128, (2, 12))
    mask = torch.ones_like(ids)
    mask[0, -3:] = 0
    with pytest.raises(ValueError, match="pad the prompts on the left"):
        model.generate(ids, attention_mask=mask, max_new_tokens=3, pad_token_id=0)
    with pytest.raises(ValueError, match="the cache has seen 12 tokens and input_ids holds 12"):
        model.generate(ids, cache=model(ids, use_cache=True).cache, max_new_tokens=3)


@pytest.mark.parametrize("filled_by,used_by", [("transformer", "bmojo"), ("swa", "transformer"),
                                               ("bmojo", "mamba2"), ("bmojo", "swa"), ("bmojo-f", "bmojo")])  # fmt: skip
def test_a_cache_filled_by_another_kind_of_model_raises(filled_by, used_by):
    ids = torch.randint(0, 128, (2, 12))
    cache = tiny(filled_by)(ids, use_cache=True).cache
    with pytest.raises(ValueError, match="this cache was filled by another kind of model: layer_pattern"):
        tiny(used_by)(ids[:, :1], past_key_values=cache)
    with pytest.raises(ValueError, match="window_size 8 there, 16 here"):
        tiny(filled_by, window_size=16)(ids[:, :1], past_key_values=cache)


def test_from_pretrained_names_a_missing_folder_and_unreadable_weights(tmp_path):
    with pytest.raises(FileNotFoundError, match="no model folder at"):
        BMojoForCausalLM.from_pretrained(tmp_path / "missing")
    tiny("bmojo").save_pretrained(tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(OSError, match=f"the weights in {tmp_path / 'm'} are unreadable .*truncated or corrupt"):
        BMojoForCausalLM.from_pretrained(tmp_path / "m")
    with pytest.raises(NotADirectoryError, match="is a file: from_pretrained takes the folder"):
        BMojoForCausalLM.from_pretrained(weights)
    (tmp_path / "m" / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="no config.json in"):
        BMojoForCausalLM.from_pretrained(tmp_path / "m")


def test_bad_cache_type():
    with pytest.raises(TypeError, match="BMojoCache"):
        tiny("bmojo")(torch.tensor([[1, 2]]), past_key_values=object())
    with pytest.raises(ValueError, match="layers"):
        tiny("bmojo")(torch.tensor([[1, 2]]), past_key_values=BMojoCache(5))


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(window_size=0), "window_size"),
        (dict(window_size=8.0), "window_size must be a positive integer"),
        (dict(eidetic_size=2.5), "eidetic_size"),
        (dict(num_key_value_heads=0), "num_key_value_heads must be a positive integer"),
        (dict(mamba2_head_dim=0), "mamba2_head_dim"),
        (dict(n_groups=0), "n_groups"),
        (dict(ssm_chunk_size=0), "ssm_chunk_size"),
        (dict(conv_kernel=0), "conv_kernel"),
        (dict(mamba2_state_size=-4), "mamba2_state_size"),
        (dict(head_dim=-8), "head_dim"),
        (dict(intermediate_size=-1), "intermediate_size"),
        (dict(attention_block_size=0), "attention_block_size"),
        (dict(rope_theta=0.0), "rope_theta"),
        (dict(rms_norm_eps=-1e-6), "rms_norm_eps"),
        (dict(initializer_range=-0.1), "initializer_range"),
        (dict(eidetic_size=-2), "eidetic_size"),
        (dict(hidden_size=30, num_attention_heads=4), "must divide"),
        (dict(num_key_value_heads=3), "num_key_value_heads"),
        (dict(selection="oracle"), "selection"),
        (dict(attention_impl="cudnn"), "attention_impl"),
        (dict(layer_pattern=["bmojo", "lstm"]), "unknown layer kind"),
        (dict(layer_pattern=["bmojo"]), "num_hidden_layers"),
        (dict(use_rope="false"), "use_rope must be true or false"),
        (dict(tie_fading_kv=1), "tie_fading_kv must be true or false"),
        (dict(windw_size=4), "unknown config field.*windw_size"),
        (dict(innovation_loss_weight="0.1"), "innovation_loss_weight must be a finite number"),
        (dict(innovation_loss_weight=float("nan")), "innovation_loss_weight"),
        (dict(intermediate_size=0), "intermediate_size must be a positive integer"),
        (dict(partial_rotary_factor=1.5), "partial_rotary_factor must be in"),
        (dict(storage_topk="3"), "storage_topk must be a positive integer"),
        (dict(hidden_size=True), "hidden_size must be a positive integer"),
        (dict(initializer_range=float("inf")), "initializer_range must be a finite number"),
    ],
)
def test_invalid_config(kw, match):
    with pytest.raises(ValueError, match=match):
        BMojoConfig.from_preset("bmojo", **kw)


@pytest.mark.parametrize("impl", ["merge", "blocks"])
def test_attention_impl_selects_the_read_out_and_keeps_the_logits(impl, monkeypatch):
    """``attention_impl`` reaches every B'MOJO layer's ``union_attention`` call, and each implementation gives the
    default path's logits."""
    import bmojo.layers.bmojo as mixer_module

    seen = []
    union = mixer_module.union_attention
    monkeypatch.setattr(mixer_module, "union_attention", lambda *a: seen.append(a[-1]) or union(*a))
    ids = torch.randint(0, 64, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = tiny("bmojo")(ids).logits
        logits = tiny("bmojo", attention_impl=impl)(ids).logits
    assert seen == ["auto"] * (len(seen) // 2) + [impl] * (len(seen) // 2) and seen
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


def test_unknown_preset_and_size():
    with pytest.raises(ValueError, match="unknown preset"):
        BMojoConfig.from_preset("rwkv")
    with pytest.raises(ValueError, match="unknown size"):
        BMojoConfig.from_preset("bmojo", "7b")


def test_compiled_model_continues_a_cache_by_long_inputs_eagerly_in_one_pass():
    """Under ``torch.compile`` several tokens after a cache run the layers' parallel continuation eagerly (a graph
    break each; compiled, its shapes would follow the cache's length), not as unrolled steps."""
    model = tiny("bmojo")
    ids = torch.randint(0, 128, (1, 50))
    torch._dynamo.reset()
    step = torch.compile(model)
    with torch.no_grad():
        compiled, eager = (model(ids[:, :12], use_cache=True).cache for _ in range(2))
        got = step(ids[:, 12:50], past_key_values=compiled, use_cache=True).logits
        want = model(ids[:, 12:50], past_key_values=eager, use_cache=True).logits
        explained = torch._dynamo.explain(model)(ids[:, 12:50], past_key_values=eager, use_cache=True)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert compiled.get_seq_length() == 50 and explained.graph_break_count >= model.config.num_hidden_layers
