"""bmojo.convert against transformers: tiny random models of every supported family give the same logits and
greedy generations once converted, convert back to the same tensors, and unsupported features are refused."""

import json

import pytest
import torch
import transformers
from typer.testing import CliRunner

from bmojo import BMojoConfig, BMojoForCausalLM
from bmojo.cli import app
from bmojo.convert import convert_checkpoint, from_hf, pattern_summary, to_hf

VOCAB = 97
ATTN = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2)
SSM = dict(vocab_size=VOCAB, hidden_size=32, state_size=8, num_hidden_layers=2)
MAMBA2 = dict(SSM, head_dim=16, num_heads=4, n_groups=2, chunk_size=16, layer_norm_epsilon=1e-5, use_bias=True)
QWEN2 = dict(ATTN, num_hidden_layers=3, use_sliding_window=True, sliding_window=24, max_window_layers=1)
JAMBA = dict(ATTN, num_hidden_layers=4, attn_layer_period=2, attn_layer_offset=1, num_experts=1, mamba_d_state=8)

# family -> (config class, fields): GQA everywhere, and each family's particular features switched on
FAMILIES = {
    "llama": ("LlamaConfig", dict(ATTN, num_hidden_layers=2, rope_theta=500.0, rms_norm_eps=1e-5)),
    "mistral": ("MistralConfig", dict(ATTN, num_hidden_layers=2, sliding_window=24, head_dim=16)),
    "qwen2": ("Qwen2Config", QWEN2),  # layer 0 full attention, layers 1-2 sliding window
    "qwen3": ("Qwen3Config", dict(ATTN, num_hidden_layers=2, head_dim=16, tie_word_embeddings=True, rms_norm_eps=1e-5)),
    "mamba": ("MambaConfig", dict(SSM, time_step_rank=3, use_bias=True, use_conv_bias=False)),
    "mamba2": ("Mamba2Config", MAMBA2),
    "jamba": ("JambaConfig", dict(JAMBA, mamba_dt_rank=3, mamba_proj_bias=True)),  # mamba, attention, mamba, attention
}
CAUSAL_LM = {
    "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM", "mamba": "MambaForCausalLM", "mamba2": "Mamba2ForCausalLM",
    "jamba": "JambaForCausalLM",
}  # fmt: skip


def hf_model(family: str, seed: int = 0, **overrides) -> transformers.PreTrainedModel:
    """A tiny fp32 Hugging Face model with every parameter perturbed (so norms and biases are not 1 or 0)."""
    config_cls, fields = FAMILIES[family]
    torch.manual_seed(seed)
    model = getattr(transformers, CAUSAL_LM[family])(getattr(transformers, config_cls)(**{**fields, **overrides}))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def tiny_gpt2() -> transformers.GPT2LMHeadModel:
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=2))


@pytest.mark.parametrize("family", FAMILIES)
def test_converted_model_gives_the_same_logits(family):
    hf = hf_model(family)
    ours = from_hf(hf)
    assert isinstance(ours, BMojoForCausalLM)
    ids = torch.randint(0, VOCAB, (2, 256), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, got = hf(ids).logits, ours(ids, use_cache=False).logits
    print(family, "max |logits diff|", (got - expected).abs().max().item())
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() <= 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_converted_model_generates_the_same_greedy_tokens(family):
    hf = hf_model(family)
    ours = from_hf(hf)
    prompt = torch.randint(0, VOCAB, (1, 30), generator=torch.Generator().manual_seed(2))  # longer than window 24
    kw = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        runs = {
            (name, cache): model.generate(prompt, use_cache=cache, **kw)
            for name, model in (("hf", hf), ("bmojo", ours))
            for cache in (True, False)
        }
    expected = runs[("hf", True)]
    assert expected.shape == (1, 36)
    for key, out in runs.items():
        assert torch.equal(out, expected), key


@pytest.mark.parametrize("family", FAMILIES)
def test_round_trip_reproduces_weights_and_config(family):
    hf = hf_model(family)
    back = to_hf(from_hf(hf))
    assert type(back) is type(hf)
    original, restored = hf.state_dict(), back.state_dict()
    assert restored.keys() == original.keys()
    for name, tensor in original.items():
        assert restored[name].dtype == tensor.dtype and torch.equal(restored[name], tensor), name
    ignore = {"transformers_version", "architectures", "dtype"}
    expected = {k: v for k, v in hf.config.to_dict().items() if k not in ignore}
    assert {k: v for k, v in back.config.to_dict().items() if k not in ignore} == expected


def test_round_trip_keeps_bfloat16_weights_exactly():
    hf = hf_model("jamba").to(torch.bfloat16)
    ours = from_hf(hf)
    assert ours.dtype == torch.bfloat16
    restored = to_hf(ours).state_dict()
    for name, tensor in hf.state_dict().items():
        assert restored[name].dtype == torch.bfloat16 and torch.equal(restored[name], tensor), name


@pytest.mark.parametrize("family", FAMILIES)
def test_from_saved_folder_equals_from_model(family, tmp_path):
    hf = hf_model(family)
    hf.save_pretrained(tmp_path)
    ids = torch.randint(0, VOCAB, (1, 40))
    with torch.no_grad():
        assert torch.equal(from_hf(tmp_path)(ids).logits, from_hf(hf)(ids).logits)


def test_jamba_layer_period_round_trips_and_non_periodic_patterns_are_refused():
    hf = hf_model("jamba", num_hidden_layers=2, attn_layer_period=4, attn_layer_offset=1)
    back = to_hf(from_hf(hf))
    assert (back.config.attn_layer_period, back.config.attn_layer_offset) == (4, 1)
    kinds = ["attention", "attention", "mamba"]
    cfg = BMojoConfig.from_preset("jamba", "tiny", layer_pattern=kinds, num_hidden_layers=3, use_rope=False)
    cfg.mamba_dt_bc_norm = True
    with pytest.raises(ValueError, match="not periodic"):
        to_hf(BMojoForCausalLM(cfg))


def test_converted_config_expresses_each_family():
    assert from_hf(hf_model("qwen2")).config.layer_pattern == ["attention", "swa", "swa"]
    assert from_hf(hf_model("jamba")).config.layer_pattern == ["mamba", "attention"] * 2
    cfg = from_hf(hf_model("jamba")).config
    assert (cfg.use_rope, cfg.mamba_dt_bc_norm, cfg.use_mlp) == (False, True, True)
    cfg = from_hf(hf_model("mistral")).config
    assert (cfg.layer_pattern, cfg.window_size, cfg.head_dim) == (["swa", "swa"], 24, 16)
    assert from_hf(hf_model("mamba")).config.use_mlp is False
    assert pattern_summary(["mamba"] * 3 + ["attention"] + ["mamba"] * 2) == "mamba x3, attention, mamba x2"


@pytest.mark.parametrize(
    "family, overrides, feature",
    [
        ("llama", dict(rope_scaling={"rope_type": "linear", "factor": 2.0}), "rope_type='linear'"),
        ("llama", dict(rope_scaling={"rope_type": "dynamic", "factor": 2.0}), "rope_type='dynamic'"),
        ("llama", dict(rope_parameters={"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}),
         "partial_rotary_factor"),
        ("llama", dict(hidden_act="gelu"), "hidden_act='gelu'"),
        ("llama", dict(attention_bias=True), "attention_bias"),
        ("llama", dict(mlp_bias=True), "mlp_bias"),
        ("qwen2", dict(attention_dropout=0.1), "attention_dropout"),
        ("qwen3", dict(attention_bias=True), "attention_bias"),
        ("mistral", dict(hidden_act="relu"), "hidden_act='relu'"),
        ("mamba", dict(hidden_act="gelu"), "hidden_act='gelu'"),
        ("mamba2", dict(time_step_limit=(0.0, 1.0)), "time_step_limit"),
        ("jamba", dict(num_experts=4, num_experts_per_tok=2, expert_layer_period=2, expert_layer_offset=1), "MoE"),
    ],
)  # fmt: skip
def test_unsupported_features_are_refused_by_name(family, overrides, feature):
    with pytest.raises(ValueError, match=feature.replace("(", r"\(").replace(")", r"\)")):
        from_hf(hf_model(family, **overrides))


def test_unsupported_families_and_classes_are_refused():
    with pytest.raises(ValueError, match="'gpt2' is not supported"):
        from_hf(tiny_gpt2())
    base = transformers.LlamaModel(transformers.LlamaConfig(**ATTN, num_hidden_layers=1))
    with pytest.raises(ValueError, match="expected a LlamaForCausalLM"):
        from_hf(base)


def test_to_hf_refuses_what_the_family_cannot_express():
    bmojo = BMojoForCausalLM(BMojoConfig.from_preset("bmojo", "tiny"))
    with pytest.raises(ValueError, match="no supported Hugging Face family"):
        to_hf(bmojo)
    with pytest.raises(ValueError, match="B'MOJO layers"):
        to_hf(bmojo, "llama")
    with pytest.raises(ValueError, match="use_rope=True"):  # our jamba preset uses RoPE, HF Jamba does not
        to_hf(BMojoForCausalLM(BMojoConfig.from_preset("jamba", "tiny", num_hidden_layers=4)))
    with pytest.raises(ValueError, match="qk_norm"):
        to_hf(BMojoForCausalLM(BMojoConfig.from_preset("transformer", "tiny", qk_norm=True)), "llama")
    with pytest.raises(ValueError, match=r"layer kinds \['swa'\]"):
        to_hf(from_hf(hf_model("mistral")), "llama")


def test_to_hf_infers_family_of_a_native_model():
    cfg = BMojoConfig.from_preset("swa", "tiny", window_size=12, qk_norm=True, tie_word_embeddings=False)
    torch.manual_seed(0)
    ours = BMojoForCausalLM(cfg).eval()
    hf = to_hf(ours)
    assert type(hf).__name__ == "Qwen3ForCausalLM" and hf.config.layer_types == ["sliding_attention"] * 2
    ids = torch.randint(0, 128, (1, 50))
    with torch.no_grad():
        assert (hf(ids).logits - ours(ids).logits).abs().max().item() <= 1e-4


def test_cli_converts_sharded_checkpoint_both_ways(tmp_path):
    hf = hf_model("jamba")
    src, dst, back = tmp_path / "src", tmp_path / "dst", tmp_path / "back"
    hf.save_pretrained(src, max_shard_size="40KB")
    (src / "tokenizer_config.json").write_text("{}")
    result = CliRunner().invoke(app, ["convert", str(src), str(dst)])
    assert result.exit_code == 0, result.output
    assert "mamba, attention, mamba, attention" in result.output
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1 and (dst / "tokenizer_config.json").is_file()
    ours = BMojoForCausalLM.from_pretrained(dst).eval()
    ids = torch.randint(0, VOCAB, (1, 64))
    with torch.no_grad():
        assert (ours(ids).logits - hf(ids).logits).abs().max().item() <= 1e-4

    result = CliRunner().invoke(app, ["convert", str(dst), str(back)])
    assert result.exit_code == 0, result.output
    restored = transformers.JambaForCausalLM.from_pretrained(back).state_dict()
    for name, tensor in hf.state_dict().items():
        assert torch.equal(restored[name], tensor), name


def test_convert_checkpoint_single_file_with_tied_embeddings(tmp_path):
    hf = hf_model("qwen3")  # tied: save_pretrained writes no lm_head.weight
    hf.save_pretrained(tmp_path / "src")
    progress = []
    result = convert_checkpoint(tmp_path / "src", tmp_path / "dst", lambda done, total: progress.append((done, total)))
    assert progress[-1] == (result.num_tensors, result.num_tensors) and len(progress) == result.num_tensors
    ours = BMojoForCausalLM.from_pretrained(tmp_path / "dst").eval()
    assert ours.lm_head.weight is ours.model.embed_tokens.weight
    ids = torch.randint(0, VOCAB, (1, 64))
    with torch.no_grad():
        assert (ours(ids).logits - hf(ids).logits).abs().max().item() <= 1e-4
    convert_checkpoint(tmp_path / "dst", tmp_path / "back")
    restored = transformers.Qwen3ForCausalLM.from_pretrained(tmp_path / "back").state_dict()
    for name, tensor in hf.state_dict().items():
        assert torch.equal(restored[name], tensor), name


def test_cli_refuses_unsupported_checkpoint(tmp_path):
    tiny_gpt2().save_pretrained(tmp_path / "gpt2")
    result = CliRunner().invoke(app, ["convert", str(tmp_path / "gpt2"), str(tmp_path / "out")])
    assert result.exit_code != 0 and "gpt2" in result.output
