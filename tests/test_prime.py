"""Priming a Transformer into B'MOJO: weights moved, fresh parameters exact, behaviour kept where it must be."""

from __future__ import annotations

import re

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from typer.testing import CliRunner

import bmojo.prime
from bmojo.cli import app
from bmojo.data import MARKER, ByteTokenizer
from bmojo.models import BMojoConfig, BMojoForCausalLM
from bmojo.models.convert import from_hf
from bmojo.prime import fresh_parameter_names, prime, resolve_layers

# Hugging Face Mamba / Mamba-2 parameter names of the fresh SSM, the eidetic predictor, untied fading projections
MAMBA2 = {"in_proj.weight", "conv1d.weight", "conv1d.bias", "dt_bias", "A_log", "D", "norm.weight", "out_proj.weight"}
MAMBA = {"in_proj.weight", "conv1d.weight", "conv1d.bias", "x_proj.weight", "dt_proj.weight", "dt_proj.bias",
         "A_log", "D", "out_proj.weight"}  # fmt: skip
SMALL = {"window_size": 8, "chunk_size": 8, "eidetic_size": 4, "mamba2_head_dim": 16, "ssm_chunk_size": 8,
         "attention_block_size": 8}  # fmt: skip


def _llama(layers: int = 4, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=99, hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, initializer_range=0.01, tie_word_embeddings=False,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def hf() -> LlamaForCausalLM:
    return _llama()


@pytest.fixture(scope="module")
def source(hf: LlamaForCausalLM) -> BMojoForCausalLM:
    return from_hf(hf)


def _ids(length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 99, (2, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(
    ("kind", "ssm", "tie", "extra"),
    [
        ("bmojo", "mamba2", True, {"memory.predictor.weight"}),
        ("bmojo", "mamba", False, {"memory.predictor.weight", "fading_k_proj.weight", "fading_v_proj.weight"}),
        ("bmojo-f", "mamba2", True, set()),
        ("bmojo-f", "mamba2", False, {"fading_k_proj.weight", "fading_v_proj.weight"}),
    ],
)
def test_weights_are_copied_exactly_and_only_the_expected_parameters_are_fresh(source, kind, ssm, tie, extra):
    primed = prime(source, [1, 3], kind, bmojo_ssm=ssm, tie_fading_kv=tie, **SMALL)
    assert primed.config.layer_pattern == ["attention", kind, "attention", kind]
    before, after = source.state_dict(), primed.state_dict()
    for name, tensor in before.items():
        assert torch.equal(after[name], tensor), name
    ssm_names = {f"ssm.{n}" for n in (MAMBA2 if ssm == "mamba2" else MAMBA)}
    expected = {f"model.layers.{i}.mixer.{n}" for i in (1, 3) for n in ssm_names | extra}
    assert set(after) - set(before) == expected
    assert set(fresh_parameter_names(primed, [1, 3])) == expected
    assert fresh_parameter_names(primed, [0, 2]) == []


def test_fresh_parameters_follow_the_model_initialisation(source):
    primed = prime(source, [1], "bmojo", tie_fading_kv=False, **SMALL)
    mixer = primed.model.layers[1].mixer
    assert primed.config.initializer_range == 0.01  # far from nn.Linear's default (std about 0.1 here)
    for linear in (mixer.ssm.in_proj, mixer.ssm.out_proj, mixer.memory.predictor, mixer.fading_k_proj):
        assert abs(linear.weight.std().item() - 0.01) < 0.002
    assert torch.equal(mixer.ssm.D, torch.ones_like(mixer.ssm.D))
    assert torch.equal(mixer.ssm.norm.weight, torch.ones_like(mixer.ssm.norm.weight))
    a = torch.exp(mixer.ssm.A_log)  # Mamba-2 init: A uniform in [1, 16]
    assert bool(((a >= 1 - 1e-5) & (a <= 16 + 1e-4)).all())


def test_unreplaced_layers_compute_what_they_computed_before(source):
    primed = prime(source, "every-second", **SMALL)
    outputs = {}
    for name, model in (("source", source), ("primed", primed)):
        hook = model.model.layers[0].register_forward_hook(lambda m, i, o, name=name: outputs.__setitem__(name, o[0]))
        with torch.no_grad():
            model(_ids(40), use_cache=False)
        hook.remove()
    assert torch.equal(outputs["primed"], outputs["source"])
    x = torch.randn(2, 40, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(primed.model.layers[2](x)[0], source.model.layers[2](x)[0])


@pytest.mark.parametrize("kind", ["bmojo", "bmojo-f"])
def test_primed_layers_equal_the_attention_they_replace_when_the_window_covers_the_input(hf, source, kind):
    """window >= L: no fading band and no eidetic token, so the mixer is the original attention (q/k/v/o moved)."""
    ids = _ids(40)
    primed = prime(source, [1, 3], kind, **{**SMALL, "window_size": 40})
    x = torch.randn(2, 40, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(primed.model.layers[1].mixer(x)[0], source.model.layers[1].mixer(x)[0])
        torch.testing.assert_close(primed(ids, use_cache=False).logits, hf(ids).logits)
        # with a shorter window the band and the memory do change the output: the check above is not vacuous
        short = prime(source, [1, 3], kind, **{**SMALL, "window_size": 8})
        assert (short(ids, use_cache=False).logits - hf(ids).logits).abs().max() > 1e-3


def test_primed_model_decodes_with_a_cache_exactly_as_in_parallel(source):
    primed = prime(source, "every-second", "bmojo", **SMALL)
    ids = _ids(37)
    with torch.no_grad():
        full = primed(ids, use_cache=False).logits
        out = primed(ids[:, :13], use_cache=True)
        steps = [out.logits] + [primed(ids[:, t : t + 1], cache=out.cache).logits for t in range(13, 37)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)


def test_every_second_picks_every_second_attention_layer():
    assert resolve_layers(["attention"] * 5, "every-second") == [1, 3]
    assert resolve_layers(["mamba", "attention", "mamba", "swa", "attention"], "every-second") == [3]
    assert resolve_layers(["attention"] * 4, (3, 0)) == [0, 3]


def test_folders_and_models_give_the_same_primed_model(tmp_path, hf, source):
    hf.save_pretrained(tmp_path / "hf")
    source.save_pretrained(tmp_path / "bmojo")
    results = []
    for src in (hf, source, tmp_path / "hf", str(tmp_path / "bmojo")):
        results.append(prime(src, seed=5, **SMALL).state_dict())
    for other in results[1:]:
        assert other.keys() == results[0].keys()
        assert all(torch.equal(other[k], results[0][k]) for k in other)


@pytest.mark.parametrize(
    ("pattern", "layers", "kind", "overrides", "error", "message"),
    [
        (["attention", "mamba"], [1], "bmojo", {}, ValueError, "layer 1 is a 'mamba' layer, not attention"),
        (["attention", "bmojo"], [1], "bmojo", {}, ValueError, "layer 1 is a 'bmojo' layer, not attention"),
        (["attention"] * 2, [2], "bmojo", {}, ValueError, "layer index 2 is out of range"),
        (["attention"] * 2, [-1], "bmojo", {}, ValueError, "layer index -1 is out of range"),
        (["attention"] * 2, [1, 1], "bmojo", {}, ValueError, "repeat"),
        (["attention"] * 2, [], "bmojo", {}, ValueError, "layers is empty"),
        (["attention"] * 2, [1.0], "bmojo", {}, TypeError, "must be integers"),
        (["attention"] * 2, "all", "bmojo", {}, ValueError, "'every-second' or a list"),
        (["attention", "mamba"], "every-second", "bmojo", {}, ValueError, "the model has 1 attention layers"),
        (["attention"] * 2, [1], "mamba", {}, ValueError, "unknown kind 'mamba'"),
        (["attention"] * 2, [1], "bmojo", {"hidden_size": 64}, ValueError, "['hidden_size'] cannot be overridden"),
        (["swa", "attention"], [1], "bmojo", {"window_size": 4}, ValueError, "change the unreplaced ['swa'] layers"),
        (["mamba", "attention"], [1], "bmojo", {"state_size": 4}, ValueError, "change the unreplaced ['mamba']"),
    ],
)
def test_bad_requests_raise_clear_errors(pattern, layers, kind, overrides, error, message):
    config = BMojoConfig.from_preset("transformer", "tiny", num_hidden_layers=len(pattern), layer_pattern=pattern)
    with pytest.raises(error, match=re.escape(message)):
        prime(BMojoForCausalLM(config), layers, kind, **overrides)


def test_a_tensor_left_neither_copied_nor_fresh_is_refused(source, monkeypatch):
    monkeypatch.setattr(bmojo.prime, "FRESH_MODULES", ("ssm",))
    with pytest.raises(ValueError, match=re.escape("missing ['model.layers.1.mixer.memory.predictor.weight']")):
        prime(source, [1], "bmojo", **SMALL)


def test_window_override_is_allowed_when_every_sliding_window_layer_is_primed():
    config = BMojoConfig.from_preset("swa", "tiny", num_hidden_layers=2, window_size=6)
    primed = prime(BMojoForCausalLM(config), [0, 1], "bmojo-f", window_size=4)
    assert primed.config.layer_pattern == ["bmojo-f", "bmojo-f"] and primed.config.window_size == 4


def test_missing_source_folder_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        prime(tmp_path / "nowhere")


def test_cli_primes_a_hugging_face_folder(tmp_path, hf):
    src, dst = tmp_path / "llama", tmp_path / "primed"
    hf.save_pretrained(src)
    ByteTokenizer().save(src)
    args = ["prime", str(src), str(dst), "--layers", "1,3", "--kind", "bmojo-f", "--window-size", "16",
            "--mamba2-head-dim", "16", "--seed", "3"]  # fmt: skip
    result = CliRunner().invoke(app, args, terminal_width=200)
    assert result.exit_code == 0, result.output
    primed = BMojoForCausalLM.from_pretrained(dst)
    assert primed.config.layer_pattern == ["attention", "bmojo-f", "attention", "bmojo-f"]
    assert primed.config.window_size == 16 and (dst / MARKER).is_file()
    fresh = sum(dict(primed.named_parameters())[n].numel() for n in fresh_parameter_names(primed, [1]))
    assert f"{fresh:,}" in result.output and "bmojo-f" in result.output
    expected = prime(hf, [1, 3], "bmojo-f", seed=3, window_size=16, mamba2_head_dim=16).state_dict()
    assert all(torch.equal(t, expected[k]) for k, t in primed.state_dict().items())

    bad = CliRunner().invoke(app, ["prime", str(src), str(tmp_path / "bad"), "--layers", "0,9"])
    assert bad.exit_code != 0 and "out of range" in bad.output
