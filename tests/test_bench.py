"""``bmojo bench`` on tiny sizes: it runs, pairs each preset with an equal-size Transformer, and its JSON holds the
fields. Speeds are not tested."""

from __future__ import annotations

import json
import mmap
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from rich.console import Console
from typer.testing import CliRunner

import bmojo
import bmojo.ops.triton as kernels
from bmojo.bench import (
    BenchSettings,
    _Memory,
    compile_kwargs,
    inference_model,
    make_runner,
    matched_transformer,
    memory_point,
    parse_device,
    results_table,
    run_bench,
    write_outputs,
)
from bmojo.cli import app
from bmojo.models import BMojoConfig, BMojoForCausalLM
from bmojo.models.modeling import count_parameters
from bmojo.train import parse_overrides


def tiny_settings(**changes) -> BenchSettings:
    base = {"lengths": [16, 32], "repeats": 2, "warmup": 0, "decode_steps": 2, "threads": 1, "memory": False}
    return BenchSettings(**{**base, **changes})


@pytest.mark.parametrize(("preset", "size"), [("bmojo", "tiny"), ("mamba2", "tiny"), ("jamba", "tiny"),
                                              ("bmojo", "130m")])  # fmt: skip
def test_matched_transformer_is_full_attention_within_5_percent(preset, size):
    target = BMojoConfig.from_preset(preset, size)
    config = matched_transformer(target, size)
    assert set(config.layer_pattern) == {"attention"} and config.hidden_size == target.hidden_size
    if size == "tiny":  # count real parameters (tied embedding once), independently of count_parameters
        goal = sum(p.numel() for p in BMojoForCausalLM(target).parameters())
        got = sum(p.numel() for p in BMojoForCausalLM(config).parameters())
    else:
        goal, got = count_parameters(target), count_parameters(config)
    assert abs(got - goal) <= 0.05 * goal


def test_bench_json_holds_points_with_repeats_medians_and_ratios(tmp_path):
    result = run_bench(tiny_settings())
    paths = write_outputs(result, tmp_path)
    assert {p.name for p in paths} == {"bench.json", "bench.md", "tokens_per_s_vs_length.png"}
    data = json.loads((tmp_path / "bench.json").read_text())
    assert data["date"].startswith("20") and data["matmul_peak_flops"] > 0
    for key in ("cpu", "cores", "threads", "torch", "device"):
        assert data["machine"][key]
    assert data["machine"]["threads"] == 1 and data["machine"]["torch"] == torch.__version__
    assert set(data["models"]) == {"bmojo", "transformer~bmojo"}
    assert data["models"]["bmojo"]["baseline"] == "transformer~bmojo"
    assert data["models"]["transformer~bmojo"]["config"]["layer_pattern"] == ["attention"] * 4
    assert len(data["points"]) == 2 * 2 * 3  # models x lengths x modes
    points = {(p["model"], p["mode"], p["length"]): p for p in data["points"]}
    for (model, mode, length), p in points.items():
        assert len(p["seconds"]) == 2 and p["median_s"] == statistics.median(p["seconds"])
        assert p["tokens"] == (2 if mode == "decode" else length)
        assert p["tokens_per_s"] == pytest.approx(p["tokens"] / p["median_s"])
        if model == "bmojo":
            base = points[("transformer~bmojo", mode, length)]
            assert p["vs_baseline"] == pytest.approx(p["tokens_per_s"] / base["tokens_per_s"])
        if mode == "train":
            assert p["flops"] > 0 and p["flops_per_s"] == pytest.approx(p["flops"] / p["median_s"])
    # the Transformer's cache holds every key (16 more per layer); B'MOJO's (window 8) does not grow with the context
    cache = {(m, n): points[(m, "decode", n)]["cache_bytes"] for m in ("bmojo", "transformer~bmojo") for n in (16, 32)}
    assert cache[("bmojo", 16)] == cache[("bmojo", 32)]
    per_token = 4 * (2 * 2 * 16 * 4 + 8)  # 4 layers x (k, v x 2 kv heads x head dim 16 x float32 + int64 position)
    assert cache[("transformer~bmojo", 32)] - cache[("transformer~bmojo", 16)] == 16 * per_token
    md = (tmp_path / "bench.md").read_text()
    assert data["machine"]["device"] in md and "| bmojo | " in md
    # what measured: this checkout's commit (tests run from it), the kernel path, the optional kernel packages
    code = data["code"]
    assert code["bmojo"] == bmojo.__version__ and code["kernels"] == kernels.kernels()
    assert set(code) == {"bmojo", "commit", "kernels", "env", "triton", "fla-core"}
    if shutil.which("git") and (Path(bmojo.__file__).parents[2] / ".git").exists():
        head = subprocess.run(["git", "-C", str(Path(bmojo.__file__).parent), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
        assert code["commit"].rstrip("+") == head and f"commit {code['commit']}" in md
    assert f"kernels {code['kernels']}" in md


@pytest.mark.parametrize("modes", [["decode"], ["train"], ["train", "prefill", "decode"]])
def test_terminal_table_leaves_out_empty_columns_and_fits_80_characters(modes):
    """In 80 columns nothing is cut and the model names show whole; a table of one mode fits unwrapped (a training
    table has the FLOP/s columns too), one of three modes wraps its numbers."""
    result = run_bench(tiny_settings(lengths=[16], modes=modes))
    table = results_table(result)
    extra = {"decode": ["cache"], "train": ["GFLOP/s\n(of peak)", "MFU"]}
    expected = ["model", "params", "mode", "L", "tokens/s", "vs\nbaseline", *(extra[modes[0]] if len(modes) == 1 else
                ["cache", "GFLOP/s\n(of peak)", "MFU"])]  # fmt: skip
    assert [c.header for c in table.columns] == expected
    console = Console(width=80, record=True)
    console.print(table)
    text = console.export_text()
    assert "…" not in text and all(len(line) <= 80 for line in text.splitlines())
    body = text.split("━\n", 1)[1].splitlines()  # the rows, below the header's rule
    names = [line.split("│")[0].strip() for line in body]
    assert [name for name in names if name] == ["transformer~bmojo", "bmojo"] * len(modes)
    assert len(body) == 2 * len(modes) or len(modes) > 1  # one line a row where the table fits


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="a peak since a reset: Linux's VmHWM")
def test_peak_memory_probe_sees_an_allocation():
    probe = _Memory(torch.device("cpu"))
    before = probe.current()
    probe.reset()
    with mmap.mmap(-1, 64 << 20) as pages:  # 64 MiB of new pages (freed memory the allocator kept could be reused)
        pages.write(b"x" * (64 << 20))
        assert probe.peak() - before >= 60 << 20


# A fresh process whose bench module sees no /proc (macOS, Windows): the probe's current size and peak.
NO_PROC = """
import torch
import bmojo.bench as bench
def no_proc(path, *args, **kwargs):
    if str(path).startswith("/proc/"):
        raise FileNotFoundError(path)
    return open(path, *args, **kwargs)
bench.open = no_proc
probe = bench._Memory(torch.device("cpu"))
probe.reset()
print(probe.current(), probe.peak())
"""


def test_no_cpu_peak_memory_without_proc(tmp_path):
    """macOS and Windows have no /proc: a point's memory is None, and the outputs leave it out."""
    code = subprocess.run([sys.executable, "-c", NO_PROC], capture_output=True, text=True, check=True)
    assert code.stdout.split() == ["None", "None"]
    result = run_bench(tiny_settings(presets=["transformer"], lengths=[16], modes=["decode"], repeats=1))
    for point in result["points"]:
        point["peak_mem_bytes"] = None
    assert "peak memory" not in [c.header for c in results_table(result).columns]
    assert (tmp_path / "memory_vs_length.png") not in write_outputs(result, tmp_path)


def test_devices_this_machine_lacks_are_refused_and_others_have_no_memory_probe():
    for name in ("cuda", "mps", "xpu"):
        if not getattr(torch, name).is_available():
            with pytest.raises(ValueError, match=f"{name.upper()} is not available"):
                parse_device(name)
    with pytest.raises(ValueError, match="unknown device"):
        parse_device("gpu")
    with pytest.raises(ValueError, match="META is not available"):
        parse_device("meta")
    assert parse_device("cpu") == torch.device("cpu")
    probe = _Memory(torch.device("mps"))
    assert probe.current() is None and probe.peak() is None


def test_memory_point_is_none_without_a_peak(monkeypatch):
    config = BMojoConfig.from_preset("transformer", "tiny")
    monkeypatch.setattr(_Memory, "current", lambda self: None)
    assert memory_point(config, "prefill", 1, 8, 1, 0, "cpu") is None


def test_bench_and_cli_import_without_the_resource_module():
    """Windows has no ``resource`` module (transformers, imported first, takes it where it exists, not there)."""
    code = "import sys, transformers.generation.utils\nsys.modules['resource'] = None\nimport bmojo.cli"
    subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)


def test_memory_measured_in_a_subprocess(tmp_path):
    """One model (the transformer preset is its own baseline), so one fresh process."""
    result = run_bench(tiny_settings(presets=["transformer"], lengths=[64], modes=["prefill"], repeats=1, memory=True))
    assert (tmp_path / "memory_vs_length.png") in write_outputs(result, tmp_path)
    [point] = result["points"]
    assert point["model"] == "transformer" and "vs_baseline" not in point
    assert point["peak_mem_bytes"] >= 4 * 64 * 2 * 2 * 16 * 4  # at least the cache: 4 layers x 64 tokens x k, v


def test_cli_bench_writes_outputs_and_rejects_bad_settings(tmp_path):
    args = ["bench", "--lengths", "16", "--modes", "train,decode", "--repeats", "1", "--warmup", "0",
            "--decode-steps", "2", "--threads", "1", "--no-memory", "--set", "window_size=4", "--out", str(tmp_path)]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "bmojo train:" in result.output and "bmojo decode:" in result.output
    rows = [line for line in result.output.splitlines() if "│" in line]  # not a terminal: the table at its own width
    assert any(line.startswith(" transformer~bmojo ") for line in rows) and any(" bmojo " in line for line in rows)
    data = json.loads((tmp_path / "bench.json").read_text())
    assert data["models"]["bmojo"]["config"]["window_size"] == 4
    assert data["settings"]["overrides"] == {"window_size": 4}
    bad = CliRunner().invoke(app, ["bench", "--modes", "fly", "--out", str(tmp_path)])
    assert bad.exit_code != 0 and "modes" in bad.output
    args = ["bench", "--compile", "--compile-option", "combo_kernel=true", "--out", str(tmp_path)]
    bad = CliRunner().invoke(app, args)
    assert bad.exit_code != 0 and "combo_kernel" in bad.output


def test_settings_and_overrides_are_checked():
    assert parse_overrides(["window_size=64", "selection=random", "use_mlp=false"]) == {
        "window_size": 64, "selection": "random", "use_mlp": False}  # fmt: skip
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_overrides(["window_size"])
    for bad, match in [({"presets": ["gpt"]}, "presets"), ({"lengths": [0]}, "lengths"), ({"repeats": 0}, "repeats"),
                       ({"size": "7b"}, "size"), ({"overrides": {"windw_size": 8}}, "windw_size"),
                       ({"overrides": {"mamba2_head_dim": 0}}, "mamba2_head_dim must be a positive integer"),
                       ({"device": "banana"}, "unknown device 'banana'"), ({"device": "cuda:7"}, "CUDA")]:  # fmt: skip
        if bad.get("device") and torch.cuda.is_available():
            continue
        with pytest.raises(ValueError, match=match):
            tiny_settings(**bad).validate()


def _brute_keys(length, window, fading, eidetic, chunk):
    """Keys each query sees, counted one query at a time from the definitions (window, band, memory fill)."""
    total = 0
    for i in range(length):
        total += min(i + 1, window or length)
        if fading:
            total += sum(1 for j in range(i + 1) if window <= i - j < 2 * window)
        if eidetic:
            total += min(eidetic, len(range(0, max(0, i // chunk * chunk - window))))
    return total


@pytest.mark.parametrize("preset", ["transformer", "bmojo", "swa", "mamba2", "jamba"])
def test_model_flops_counts_weights_and_visible_keys(preset):
    from bmojo.bench import model_flops
    from bmojo.layers.bmojo import BMojoMixer

    model = BMojoForCausalLM(BMojoConfig.from_preset(preset, "tiny"))
    length, batch = 50, 3
    weights = sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n)
    weights += model.config.vocab_size * model.config.hidden_size  # the tied LM head is a matmul
    attention = 0
    for m in model.modules():
        if isinstance(m, BMojoMixer) and m.attn is not None:
            mem = m.memory
            keys = _brute_keys(length, m.window, m.fading, mem.size if mem else 0, mem.chunk_size if mem else 1)
            attention += 12 * m.attn.num_heads * m.attn.head_dim * keys
    assert model_flops(model, batch, length) == batch * (6 * weights * length + attention)


def test_bench_bfloat16_autocast_reports_mfu():
    result = run_bench(tiny_settings(lengths=[16], modes=["train", "decode"], dtype="bfloat16"))
    assert result["settings"]["dtype"] == "bfloat16"
    train = [p for p in result["points"] if p["mode"] == "train"]
    assert train and all(0 < p["mfu"] and p["model_flops"] > 0 for p in train)
    with pytest.raises(ValueError, match="dtype must be one of"):
        tiny_settings(dtype="float16").validate()


def test_bfloat16_inference_runs_on_a_bfloat16_copy_and_training_under_autocast():
    """Prefill and decode time the model with bfloat16 weights (no per-step weight casts), training keeps the
    float32 weights; the caller's model is left as it was."""
    config = BMojoConfig.from_preset("bmojo", "tiny", vocab_size=64, hidden_size=32, num_hidden_layers=1)
    model = BMojoForCausalLM(config)
    ids = torch.randint(0, 64, (1, 12))
    run = make_runner(model, "decode", ids, 2, "bfloat16")
    run()
    floats = {t.dtype for state in run.cache.layers for t in state.tensors() if t.is_floating_point()}
    assert torch.bfloat16 in floats and run.cache.get_seq_length() == 14
    train = make_runner(model, "train", ids, 2, "bfloat16")
    train()
    assert all(p.dtype == torch.float32 and p.grad is not None for p in model.parameters() if p.requires_grad)
    assert inference_model(model, "float32") is model


def test_decode_runner_steps_under_inference_mode_compiled_as_eager():
    """``decode`` prefills and steps under ``torch.inference_mode``; compiled (one graph for every position, the
    cache marked static), its steps leave the eager runner's cache, and a second run continues it."""
    config = BMojoConfig.from_preset("bmojo", "tiny", vocab_size=64, hidden_size=32, num_hidden_layers=1,
                                     window_size=4, chunk_size=4, eidetic_size=2)  # fmt: skip
    model = BMojoForCausalLM(config)
    ids = torch.randint(0, 64, (1, 12))
    eager, compiled = (make_runner(model, "decode", ids, 3, compile=c, runs=2) for c in (False, True))
    for run in (eager, compiled, eager, compiled):
        run()
    assert all(t.is_inference() for state in compiled.cache.layers for t in state.tensors())
    for a, b in zip(*([t for state in run.cache.layers for t in state.tensors()] for run in (eager, compiled))):
        torch.testing.assert_close(a, b)
    assert compiled.cache.get_seq_length() == 18


@pytest.mark.slow  # about a minute of compilation on 2 CPU cores
def test_compiled_train_step_matches_eager_and_bench_runs_compiled():
    """``compile=True``: the compiled training step gives the eager step's gradients; the bench records it."""
    config = BMojoConfig.from_preset("bmojo", "tiny", vocab_size=64, hidden_size=32, num_hidden_layers=1,
                                     window_size=4, eidetic_size=2, chunk_size=4, attention_block_size=4)  # fmt: skip
    ids = torch.randint(0, 64, (1, 12), generator=torch.Generator().manual_seed(0))
    grads = []
    for compiled in (False, True):
        torch.manual_seed(0)
        model = BMojoForCausalLM(config)
        make_runner(model, "train", ids, 1, compile=compiled)()
        grads.append([p.grad for p in model.parameters()])
    for eager, compiled in zip(*grads):
        torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-4)
    overrides = {k: getattr(config, k) for k in ("hidden_size", "num_hidden_layers")}
    result = run_bench(tiny_settings(lengths=[12], modes=["train"], repeats=1, compile=True, overrides=overrides))
    assert result["settings"]["compile"] and all(p["flops"] > 0 for p in result["points"])


def test_bench_decodes_compiled_with_room_reserved_and_static_cache_addresses():
    """``compile=True`` for ``decode``: the full-attention cache gets exactly the room of the planned runs' steps, so
    no state tensor moves while the compiled steps run (what ``compile_mode="reduce-overhead"``'s CUDA graphs need);
    a run beyond the plan reserves its own."""
    config = BMojoConfig.from_preset("transformer", "tiny", vocab_size=64, hidden_size=32, num_hidden_layers=1)
    model = BMojoForCausalLM(config)
    ids = torch.randint(0, 64, (1, 12))
    run = make_runner(model, "decode", ids, 5, compile=True, compile_mode="reduce-overhead", runs=2)
    run()
    ptrs = [t.data_ptr() for state in run.cache.layers for t in state.tensors()]
    run()
    assert [t.data_ptr() for state in run.cache.layers for t in state.tensors()] == ptrs
    assert run.cache.get_seq_length() == 22 and run.cache.layers[0].win_k.shape[2] == 22
    run()
    assert run.cache.get_seq_length() == 27 and run.cache.layers[0].win_k.shape[2] == 27
    with pytest.raises(ValueError, match="compile_mode must be one of"):
        tiny_settings(compile_mode="fastest").validate()


def test_options_parse_as_yaml_with_whole_names():
    items = ["window_size=64", "name=abc", "combo_kernels=true", "triton.cudagraphs=False"]
    assert parse_overrides(items, nested=False) == {
        "window_size": 64, "name": "abc", "combo_kernels": True, "triton.cudagraphs": False}  # fmt: skip
    with pytest.raises(ValueError, match="'window' is not of the form KEY=VALUE"):
        parse_overrides(["window"], nested=False)


def test_compile_options_go_to_torch_compile_on_top_of_the_mode(monkeypatch):
    """Inductor options join the mode's own (``torch.compile`` takes a mode or options, not both); unknown names
    are refused before anything runs."""
    assert compile_kwargs("reduce-overhead") == {"mode": "reduce-overhead"}
    assert compile_kwargs("reduce-overhead", {"combo_kernels": True}) == {
        "options": {"triton.cudagraphs": True, "combo_kernels": True}}  # fmt: skip
    assert compile_kwargs("default", {"combo_kernels": True}) == {"options": {"combo_kernels": True}}
    seen = []
    monkeypatch.setattr(torch, "compile", lambda model, **kwargs: seen.append(kwargs) or model)
    config = BMojoConfig.from_preset("transformer", "tiny", vocab_size=64, hidden_size=32, num_hidden_layers=1)
    make_runner(BMojoForCausalLM(config), "train", torch.zeros(1, 4, dtype=torch.long), 1, compile=True,
                compile_options={"combo_kernels": True})  # fmt: skip
    assert seen == [{"dynamic": False, "options": {"combo_kernels": True}}]
    tiny_settings(compile=True, compile_options={"combo_kernels": True, "triton.cudagraphs": False}).validate()
    with pytest.raises(ValueError, match=r"unknown inductor options in compile_options: \['combo_kernel'\]"):
        tiny_settings(compile=True, compile_options={"combo_kernel": True}).validate()
    with pytest.raises(ValueError, match="compile_options need compile=True"):
        tiny_settings(compile_options={"combo_kernels": True}).validate()
