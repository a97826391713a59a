"""Language-model training: config loading, optimiser groups, distillation, checkpoints, kill-and-resume."""

import hashlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

from bmojo.cli import app
from bmojo.layers.norm import RMSNorm
from bmojo.models import BMojoConfig, BMojoForCausalLM
from bmojo.train import (
    CheckpointError,
    ConfigError,
    DivergedError,
    TrainConfig,
    _objective,
    build_model_config,
    distill_kl,
    list_checkpoints,
    load_config,
    param_groups,
    read_metrics,
    run,
    sample_windows,
    train,
)

VOCAB = 64
SUBPROCESS_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
TINY_MODEL = {"window_size": 8, "chunk_size": 8, "eidetic_size": 4}


def periodic_tokens(n: int, period: int = 37, seed: int = 0) -> np.ndarray:
    """A repeated random permutation of ``period`` distinct ids: the next token is a function of the current one."""
    pattern = np.random.default_rng(seed).permutation(VOCAB)[:period]
    return np.tile(pattern, n // period + 1)[:n]


def tiny(tmp_path: Path, **kw) -> TrainConfig:
    """A tiny B'MOJO run on CPU with logging every step, no validation and no periodic checkpoints."""
    base = dict(
        model="bmojo", size="tiny", model_args=TINY_MODEL, steps=20, batch_size=8, seq_len=32, lr=3e-3,
        warmup_steps=2, eval_every=0, save_every=0, log_every=1, progress=False, device="cpu",
        out_dir=str(tmp_path / "run"),
    )  # fmt: skip
    return TrainConfig(**{**base, **kw})


@pytest.fixture(autouse=True)
def one_thread():
    """The same thread count as the subprocesses, so in-process and subprocess runs agree bitwise."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ------------------------------------------------------------------------------------------------------ config


def test_yaml_config_with_overrides(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump({"steps": 50, "lr": "1e-3", "model_args": {"window_size": 16}, "data": "a.txt"}))
    cfg = load_config(path, ["steps=7", "model_args.eidetic_size=2", "teacher=null", "weight_decay=0"])
    assert cfg.steps == 7 and cfg.lr == 1e-3 and cfg.weight_decay == 0.0 and cfg.data == ["a.txt"]
    assert cfg.model_args == {"window_size": 16, "eidetic_size": 2} and cfg.teacher is None
    with pytest.raises(ConfigError, match="unknown training config keys.*'stpes'"):
        load_config(path, ["stpes=3"])
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_config(path, ["steps"])
    with pytest.raises(ConfigError, match="steps must be of type int"):
        load_config(path, ["steps=many"])
    with pytest.raises(ConfigError, match="dtype must be one of"):
        load_config(None, ["dtype=float16"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "binary").write_bytes(bytes(range(256)))
    with pytest.raises(ConfigError, match="binary is not a UTF-8 text file"):
        load_config(tmp_path / "binary")


def test_unknown_model_args_fields_raise(tmp_path):
    """A misspelt ``model_args`` field is an error naming it, not a setting stored and ignored."""
    with pytest.raises(ConfigError, match=r"unknown model_args fields \['windw_size'\]"):
        load_config(None, ["model_args.windw_size=4"])
    with pytest.raises(ConfigError, match=r"unknown model_args fields \['bogus', 'windw_size'\]"):
        tiny(tmp_path, model_args={"windw_size": 4, "bogus": 1, "eidetic_size": 2})
    # BMojoConfig's own fields and those it inherits from PretrainedConfig are accepted
    cfg = load_config(
        None, ["model_args.window_size=4", "model_args.tie_word_embeddings=false", "model_args.dtype=null"]
    )
    assert build_model_config(cfg, 257).window_size == 4 and not build_model_config(cfg, 257).tie_word_embeddings


def test_cli_reports_bad_config_and_missing_checkpoint(tmp_path):
    result = CliRunner().invoke(app, ["train", "stpes=3"])
    assert result.exit_code == 1 and "unknown training config keys" in result.output
    config = write_text_run(tmp_path)
    result = CliRunner().invoke(app, ["train", "--config", str(config), f"out_dir={tmp_path / 'new'}", "--resume"])
    assert result.exit_code == 1 and "holds no checkpoint" in result.output


def test_model_from_preset_or_config_file(tmp_path):
    cfg = tiny(tmp_path, model_args={"window_size": 16})
    config = build_model_config(cfg, vocab_size=257, eos_token_id=256)
    assert config.vocab_size == 257 and config.window_size == 16 and config.eos_token_id == 256
    config.save_pretrained(tmp_path / "model")
    from_file = build_model_config(tiny(tmp_path, model=str(tmp_path / "model" / "config.json"), model_args={}), 257)
    assert from_file.to_dict() == config.to_dict()
    with pytest.raises(ConfigError, match="vocab_size=100 is smaller than the tokenizer's 257"):
        build_model_config(tiny(tmp_path, model_args={"vocab_size": 100}), 257)
    with pytest.raises(ConfigError, match="vocab_size=257 is smaller than the tokenizer's 300"):
        build_model_config(tiny(tmp_path, model=str(tmp_path / "model"), model_args={}), 300)
    with pytest.raises(ConfigError, match="unknown preset"):
        build_model_config(tiny(tmp_path, model="gpt9"), 257)


# ------------------------------------------------------------------------------------------- optimiser, losses


@pytest.mark.parametrize("preset", ["bmojo", "mamba"])
def test_weight_decay_groups(preset):
    """Linear and conv weights decay; embeddings (tied head), norms, biases and SSM A_log / D / dt_bias do not."""
    model = BMojoForCausalLM(BMojoConfig.from_preset(preset, "tiny", attention_bias=True))
    decay, no_decay = (set(map(id, g["params"])) for g in param_groups(model, 0.1))
    expect_decay, expect_none = set(), {id(model.get_input_embeddings().weight)}
    for module in model.modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv1d)) and module.weight is not model.lm_head.weight:
            expect_decay.add(id(module.weight))
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv1d)) and module.bias is not None:
            expect_none.add(id(module.bias))
        if isinstance(module, RMSNorm) or hasattr(module, "A_log"):
            expect_none |= {id(p) for p in module.parameters(recurse=False)}
    all_params = {id(p) for p in model.parameters()}
    assert decay == expect_decay and no_decay == all_params - decay
    assert expect_none <= no_decay and any(n.endswith("A_log") for n, _ in model.named_parameters())

    # behaviour: with zero gradients, AdamW only shrinks the decayed group, by exactly (1 - lr * wd)
    opt = torch.optim.AdamW(param_groups(model, 0.1), lr=0.5)
    before = {id(p): p.detach().clone() for p in model.parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    for p in model.parameters():
        factor = 1 - 0.5 * 0.1 if id(p) in decay else 1.0
        torch.testing.assert_close(p.detach(), before[id(p)] * factor, rtol=0, atol=0)


def test_distill_kl_matches_hand_computation():
    torch.manual_seed(0)
    student, teacher, temperature = torch.randn(2, 3, 5), torch.randn(2, 3, 5), 2.0
    s, t = student.double().numpy() / temperature, teacher.double().numpy() / temperature
    total = 0.0
    for row_s, row_t in zip(s.reshape(-1, 5), t.reshape(-1, 5)):
        p = np.exp(row_t) / np.exp(row_t).sum()
        q = np.exp(row_s) / np.exp(row_s).sum()
        total += sum(p[v] * math.log(p[v] / q[v]) for v in range(5))
    expected = total / 6 * temperature**2
    assert distill_kl(student, teacher, temperature).item() == pytest.approx(expected, rel=1e-5)
    assert distill_kl(teacher, teacher).item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="do not match"):
        distill_kl(student, teacher[..., :4])


def test_objective_is_next_token_cross_entropy_plus_innovation_loss(tmp_path):
    """A training micro-batch's loss (the model's, through its chunked LM head) on windows ``[b, L + 1]``: the
    cross-entropy of each window's next tokens from the logits, plus the weighted innovation loss."""
    torch.manual_seed(0)
    model = BMojoForCausalLM(
        BMojoConfig.from_preset("bmojo", "tiny", vocab_size=VOCAB, loss_chunk_size=9, **TINY_MODEL)
    )
    windows = torch.randint(0, VOCAB, (3, 33))
    loss, kl = _objective(model.train(), windows, tiny(tmp_path), None, 0.5)
    assert kl is None
    with torch.no_grad():
        out = model(windows[:, :-1], use_cache=False)
        ce = torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), windows[:, 1:].flatten())
    torch.testing.assert_close(loss, ce + model.config.innovation_loss_weight * out.aux_loss)


def test_distillation_term_is_logged_and_falls(tmp_path):
    """The logged KL at step 1 equals KL(teacher || initial student) on the first batch, and training lowers it."""
    torch.manual_seed(123)  # a teacher close to a sharp bigram model: far from the near-uniform initial student
    teacher = BMojoForCausalLM(BMojoConfig.from_preset("bmojo", "tiny", vocab_size=VOCAB, **TINY_MODEL))
    teacher.model.norm.weight.data.fill_(20.0)
    teacher.save_pretrained(tmp_path / "teacher")
    tokens, kls = periodic_tokens(2000), {}
    for weight in (0.0, 5.0):
        out = str(tmp_path / f"run{weight}")
        cfg = tiny(
            tmp_path, teacher=str(tmp_path / "teacher"), distill_weight=weight, distill_temperature=1.5, out_dir=out
        )
        train(cfg, tokens, tokens, vocab_size=VOCAB)
        kls[weight] = [r["kl"] for r in read_metrics(cfg.out_dir)]
    kl = kls[5.0]

    torch.manual_seed(cfg.seed)
    student = BMojoForCausalLM(build_model_config(cfg, VOCAB))
    batch = sample_windows(tokens, 8, 32, torch.Generator().manual_seed(cfg.seed))[:, :-1]
    with torch.no_grad():
        s = student(batch, use_cache=False).logits.double() / 1.5
        t = teacher(batch, use_cache=False).logits.double() / 1.5
    expected = (t.softmax(-1) * (t.log_softmax(-1) - s.log_softmax(-1))).sum(-1).mean().item() * 1.5**2
    assert kl[0] == pytest.approx(expected, rel=1e-4)
    assert kls[0.0][0] == kl[0] and kl[-1] < 0.8 * kl[0] and kl[-1] < 0.8 * kls[0.0][-1], kls


# ---------------------------------------------------------------------------------------------------- training


def test_loss_falls_and_run_folder_is_complete(tmp_path):
    cfg = tiny(tmp_path, steps=40, eval_every=20, eval_batches=2)
    tokens = periodic_tokens(3000)
    result = train(cfg, tokens[:2500], tokens[2500:], vocab_size=VOCAB)
    records = list(read_metrics(cfg.out_dir))
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 40 and losses[0] > math.log(VOCAB) - 0.5
    assert losses[-1] < 0.25 * losses[0], losses
    val = [r["val_loss"] for r in records if "val_loss" in r]
    assert len(val) == 2 and val[1] < val[0] and result["val_loss"] == val[1]
    assert all(r["tokens_per_s"] > 0 and r["lr"] > 0 for r in records if "loss" in r)
    out = Path(cfg.out_dir)
    assert (out / "loss_curve.png").stat().st_size > 0 and (out / "train_config.yaml").is_file()
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["step_00000040"]
    model = BMojoForCausalLM.from_pretrained(out / "final")
    window = torch.as_tensor(tokens[2500:2533]).long()[None]
    with torch.no_grad():
        logits = model(window[:, :-1], use_cache=False).logits
    assert torch.nn.functional.cross_entropy(logits[0], window[0, 1:]).item() < losses[0] / 2


def test_bfloat16_autocast_follows_float32(tmp_path):
    tokens, curves = periodic_tokens(1000), {}
    for dtype in ("float32", "bfloat16"):
        cfg = tiny(tmp_path, steps=4, dtype=dtype, out_dir=str(tmp_path / dtype))
        train(cfg, tokens, tokens, vocab_size=VOCAB)
        curves[dtype] = np.array([r["loss"] for r in read_metrics(cfg.out_dir)])
    assert np.abs(curves["float32"] - curves["bfloat16"]).max() < 0.05
    assert not np.array_equal(curves["float32"], curves["bfloat16"])  # autocast did change the arithmetic


def test_activation_checkpointing_follows_the_plain_run(tmp_path):
    """``activation_checkpointing: true``: each block recomputed in the backward, the same loss curve."""
    tokens, curves = periodic_tokens(1000), {}
    for on in (False, True):
        cfg = tiny(tmp_path, steps=4, activation_checkpointing=on, out_dir=str(tmp_path / str(on)))
        train(cfg, tokens, tokens, vocab_size=VOCAB)
        curves[on] = np.array([r["loss"] for r in read_metrics(cfg.out_dir)])
    np.testing.assert_allclose(curves[True], curves[False], rtol=1e-5)


@pytest.mark.slow
def test_compiled_training_follows_eager(tmp_path):
    """``compile: true`` (torch.compile of the model) gives the eager loss curve to float rounding, as one graph
    without breaks (~1 min on CPU)."""
    from torch._dynamo.utils import counters

    tokens, curves = periodic_tokens(1000), {}
    torch._dynamo.reset()
    counters.clear()  # earlier compiled tests in the session leave counts behind
    for compiled in (False, True):
        cfg = tiny(tmp_path, steps=3, compile=compiled, out_dir=str(tmp_path / str(compiled)))
        train(cfg, tokens, tokens, vocab_size=VOCAB)
        curves[compiled] = np.array([r["loss"] for r in read_metrics(cfg.out_dir)])
        assert (counters["stats"]["unique_graphs"] > 0) == compiled  # dynamo traced the model only when asked
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert len(curves[True]) == 3
    np.testing.assert_allclose(curves[True], curves[False], rtol=1e-4, atol=1e-5)


def test_a_run_whose_loss_is_not_finite_stops_before_saving(tmp_path):
    """Weights that make the loss NaN stop the run at its first check (a log or a checkpoint), naming the step,
    before a checkpoint keeps them; the CLI prints one error line."""
    torch.manual_seed(7)
    saved = BMojoForCausalLM(BMojoConfig.from_preset("bmojo", "tiny", vocab_size=VOCAB, **TINY_MODEL))
    with torch.no_grad():
        saved.model.norm.weight.fill_(float("nan"))
    saved.save_pretrained(tmp_path / "saved")
    cfg = tiny(tmp_path, model_args={}, model=str(tmp_path / "saved"), init_from=str(tmp_path / "saved"), steps=4,
               log_every=10, save_every=2)  # fmt: skip
    with pytest.raises(DivergedError, match="the training loss is nan at step 2"):
        train(cfg, periodic_tokens(200), periodic_tokens(200), vocab_size=VOCAB)
    assert not (Path(cfg.out_dir) / "checkpoints").exists() or not list_checkpoints(Path(cfg.out_dir) / "checkpoints")


def test_init_from_a_saved_model(tmp_path):
    torch.manual_seed(7)
    saved = BMojoForCausalLM(BMojoConfig.from_preset("bmojo", "tiny", vocab_size=VOCAB, **TINY_MODEL))
    saved.save_pretrained(tmp_path / "saved")
    cfg = tiny(
        tmp_path, model=str(tmp_path / "saved"), model_args={}, init_from=str(tmp_path / "saved"), steps=1, lr=1e-9
    )
    train(cfg, periodic_tokens(200), periodic_tokens(200), vocab_size=VOCAB)
    final = BMojoForCausalLM.from_pretrained(Path(cfg.out_dir) / "final").state_dict()
    for k, v in saved.state_dict().items():
        torch.testing.assert_close(final[k], v, rtol=0, atol=1e-6)
    wider = tiny(
        tmp_path,
        model_args={**TINY_MODEL, "hidden_size": 96},
        init_from=str(tmp_path / "saved"),
        out_dir=str(tmp_path / "w"),
    )
    with pytest.raises(ConfigError, match="does not match the configured model"):
        train(wider, periodic_tokens(200), periodic_tokens(200), vocab_size=VOCAB)


def test_bad_data_raises(tmp_path):
    with pytest.raises(ConfigError, match="needs more than seq_len"):
        train(tiny(tmp_path), periodic_tokens(20), periodic_tokens(200), vocab_size=VOCAB)
    with pytest.raises(ConfigError, match="outside"):
        train(tiny(tmp_path), periodic_tokens(200) + VOCAB, periodic_tokens(200), vocab_size=VOCAB)
    with pytest.raises(ConfigError, match="micro_batch_size=3 does not divide"):
        train(tiny(tmp_path, micro_batch_size=3), periodic_tokens(200), periodic_tokens(200), vocab_size=VOCAB)
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(ConfigError, match="a_file/run cannot be a folder: .*a_file exists and is not a folder"):
        train(tiny(tmp_path, out_dir=str(tmp_path / "a_file" / "run")), periodic_tokens(200), periodic_tokens(200),
              vocab_size=VOCAB)  # fmt: skip


def test_checkpoints_rotate_and_bad_checkpoints_raise(tmp_path):
    cfg = tiny(tmp_path, steps=4, save_every=1, keep_checkpoints=2)
    tokens = periodic_tokens(500)
    train(cfg, tokens, tokens, vocab_size=VOCAB)
    root = Path(cfg.out_dir) / "checkpoints"
    assert [p.name for p in list_checkpoints(root)] == ["step_00000003", "step_00000004"]
    assert not any(p.name.startswith(".tmp") for p in root.iterdir())

    with pytest.raises(CheckpointError, match="already holds checkpoints"):
        train(cfg, tokens, tokens, vocab_size=VOCAB)
    with pytest.raises(CheckpointError, match="holds no checkpoint"):
        train(tiny(tmp_path, out_dir=str(tmp_path / "empty")), tokens, tokens, vocab_size=VOCAB, resume=True)
    with pytest.raises(CheckpointError, match="different model: .*window_size"):
        wider = tiny(tmp_path, steps=4, model_args={**TINY_MODEL, "window_size": 16})
        train(wider, tokens, tokens, vocab_size=VOCAB, resume=True)
    with pytest.raises(CheckpointError, match="other training settings: .*lr"):
        train(tiny(tmp_path, steps=4, lr=1e-3), tokens, tokens, vocab_size=VOCAB, resume=True)
    with pytest.raises(CheckpointError, match="different token data"):
        train(cfg, tokens[1:], tokens, vocab_size=VOCAB, resume=True)

    weights = root / "step_00000004" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])  # truncated
    with pytest.raises(CheckpointError, match="model.safetensors is corrupt"):
        train(cfg, tokens, tokens, vocab_size=VOCAB, resume=True)
    state = json.loads((root / "step_00000004" / "state.json").read_text())
    weights.write_bytes(b"\x00" * 64)  # unreadable, with a matching checksum
    state["files"]["model.safetensors"] = hashlib.sha256(weights.read_bytes()).hexdigest()
    (root / "step_00000004" / "state.json").write_text(json.dumps(state))
    with pytest.raises(CheckpointError, match="cannot read model.safetensors"):
        train(cfg, tokens, tokens, vocab_size=VOCAB, resume=True)
    (root / "step_00000004" / "state.json").unlink()
    with pytest.raises(CheckpointError, match="no state.json"):
        train(cfg, tokens, tokens, vocab_size=VOCAB, resume=True)


def test_resume_checks_the_fields_of_state_json(tmp_path):
    """Fields of ``state.json`` that resuming reads, of the wrong type, missing or out of range, raise
    :class:`CheckpointError` naming the field (the SHA-256 checks cover the tensor files only)."""
    cfg, tokens = tiny(tmp_path, steps=2), periodic_tokens(500)
    train(cfg, tokens, tokens, vocab_size=VOCAB)
    state_path = list_checkpoints(Path(cfg.out_dir) / "checkpoints")[-1] / "state.json"
    good = json.loads(state_path.read_text())
    assert good["step"] == 2 and good["scheduler"]["last_epoch"] == 2
    missing = object()  # a field left out of state.json
    cases = [
        ({"files": ["model.safetensors"]}, r"'files' must be a mapping of \*.safetensors file names"),
        ({"files": {}}, r"'files' lacks \['model.safetensors', 'optimizer.safetensors', 'rng.safetensors'\]"),
        ({"files": {**good["files"], "../x.safetensors": "0"}}, "'files' must be a mapping"),
        ({"step": missing}, "has no 'step' field"),
        ({"tokens": missing}, "has no 'tokens' field"),
        ({"step": "3"}, "'step' must be an integer >= 1, got '3'"),
        ({"step": True}, "'step' must be an integer >= 1, got True"),
        ({"step": -5}, "'step' must be an integer >= 1, got -5"),
        ({"step": 1}, "'scheduler' is at step 2, not at the checkpoint's step 1"),
        ({"tokens": -1}, "'tokens' must be an integer >= 0, got -1"),
        ({"scheduler": 5}, "'scheduler' must be a mapping"),
        ({"optimizer_groups": {}}, "'optimizer_groups' must be a list of mappings"),
        ({"model_config": []}, "'model_config' must be a mapping"),
        ({"train_config": missing}, "has no 'train_config' field"),
        ({"data": 3}, "'data' must be a string"),
    ]
    for change, message in cases:
        state = {k: v for k, v in {**good, **change}.items() if v is not missing}
        state_path.write_text(json.dumps(state))
        with pytest.raises(CheckpointError, match=message):
            train(cfg, tokens, tokens, vocab_size=VOCAB, resume=True)
    state_path.write_text(json.dumps([good]))
    with pytest.raises(CheckpointError, match="not a bmojo checkpoint"):
        train(cfg, tokens, tokens, vocab_size=VOCAB, resume=True)
    state_path.write_text(json.dumps(good))
    assert train(cfg, tokens, tokens, vocab_size=VOCAB, resume=True)["step"] == 2  # the untouched state resumes


def write_text_run(tmp_path: Path, **overrides) -> Path:
    """A YAML config for ``bmojo train`` on a small repetitive text file with the byte tokenizer."""
    text = tmp_path / "corpus.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 60 + "\n" + "a stitch in time saves nine.\n" * 40)
    spec = dict(
        data=[str(text)], tokenizer="byte", cache_dir=str(tmp_path / "cache"), val_fraction=0.1, model="bmojo",
        size="tiny", model_args=TINY_MODEL, steps=20, batch_size=8, seq_len=32, lr=3e-3, warmup_steps=3,
        eval_every=10, eval_batches=1, save_every=5, keep_checkpoints=3, log_every=1, progress=False, device="cpu",
    )  # fmt: skip
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump({**spec, **overrides}))
    return path


def without_speed(records) -> list[dict]:
    """Metrics records without the wall-clock field."""
    return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in records]


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "bmojo.cli", "train", *args]


def test_killed_and_resumed_run_ends_with_the_same_weights(tmp_path):
    """SIGKILL a ``bmojo train`` subprocess after its first checkpoint; ``--resume`` must end bitwise equal."""
    config = write_text_run(tmp_path)
    full, cut = tmp_path / "full", tmp_path / "cut"
    proc = subprocess.Popen(cli("--config", str(config), f"out_dir={cut}"), env=SUBPROCESS_ENV)
    deadline = time.monotonic() + 240
    while not list_checkpoints(cut / "checkpoints") and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (cut / "final").exists()
    assert int(list_checkpoints(cut / "checkpoints")[-1].name.split("_")[1]) < 20

    run(load_config(config, [f"out_dir={full}"]))  # the uninterrupted run
    result = CliRunner().invoke(app, ["train", "--config", str(config), f"out_dir={cut}", "--resume"])
    assert result.exit_code == 0, result.output
    a, b = load_file(full / "final" / "model.safetensors"), load_file(cut / "final" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert without_speed(read_metrics(cut)) == without_speed(read_metrics(full))
    assert (cut / "final" / "bmojo_tokenizer.json").is_file()


@pytest.mark.parametrize("mode", ["ddp", pytest.param("fsdp", marks=pytest.mark.slow)])
def test_two_processes_match_one_with_the_same_global_batch(tmp_path, mode):
    """``torchrun --nproc_per_node 2`` (gloo) vs one process accumulating two micro-batches: same loss curve (the
    two processes with activation checkpointing, which must not change it)."""
    config = write_text_run(tmp_path, steps=8, eval_every=4, save_every=4)
    two, one = tmp_path / "two", tmp_path / "one"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command = [*launcher, "-m", "bmojo.cli", "train", "--config", str(config), f"out_dir={two}", f"distributed={mode}",
               "activation_checkpointing=true"]  # fmt: skip
    subprocess.run(command, env=SUBPROCESS_ENV, check=True, timeout=300)
    run(load_config(config, [f"out_dir={one}", "micro_batch_size=4"]))

    a, b = without_speed(read_metrics(two)), without_speed(read_metrics(one))
    assert [sorted(r) for r in a] == [sorted(r) for r in b]
    for ra, rb in zip(a, b):
        for key in ("loss", "val_loss", "grad_norm"):
            if key in ra:
                assert ra[key] == pytest.approx(rb[key], rel=1e-4, abs=1e-5), (key, ra, rb)
    wa, wb = load_file(two / "final" / "model.safetensors"), load_file(one / "final" / "model.safetensors")
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-5)
    checkpoint = list_checkpoints(two / "checkpoints")[0]
    assert json.loads((checkpoint / "state.json").read_text())["world_size"] == 2

    # a 2-process checkpoint resumes in one process
    three = tmp_path / "three"
    shutil.copytree(checkpoint, three / "checkpoints" / checkpoint.name)
    run(load_config(config, [f"out_dir={three}", "micro_batch_size=4"]), resume=True)
    wc = load_file(three / "final" / "model.safetensors")
    for k in wa:
        torch.testing.assert_close(wc[k], wa[k], rtol=1e-4, atol=1e-5)


def test_example_configs_load():
    from bmojo.models.modeling import count_parameters

    examples = Path(__file__).parents[1] / "examples" / "train"
    sizes = {}
    for path in sorted(examples.glob("*.yaml")):
        cfg = load_config(path)
        sizes[path.stem] = count_parameters(build_model_config(cfg, vocab_size=257))
    assert sizes["tiny"] < 500_000 and 2_000_000 < sizes["shakespeare"] < 10_000_000, sizes
