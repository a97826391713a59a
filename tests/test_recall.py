"""Recall training: a tiny run learns an easy MQAR setting; the sweep CLI writes its outputs."""

import csv

import pytest
import yaml
from typer.testing import CliRunner

from bmojo.cli import app
from bmojo.optim import cosine_lr
from bmojo.recall import RecallRun, train_recall


def run_sweep(spec: dict, tmp_path, out):
    """``bmojo recall`` on ``spec`` written as YAML under ``tmp_path``."""
    cfg = tmp_path / "sweep.yaml"
    cfg.write_text(yaml.safe_dump(spec))
    return CliRunner().invoke(app, ["recall", "--config", str(cfg), "--out", str(out)])


def test_cosine_schedule_shape():
    assert cosine_lr(0, 100, 10) == pytest.approx(0.1)
    assert cosine_lr(9, 100, 10) == pytest.approx(1.0)
    assert cosine_lr(100, 100, 10) == pytest.approx(0.1)
    assert cosine_lr(55, 100, 10) < cosine_lr(20, 100, 10)


def test_attention_learns_easy_mqar():
    """Full attention, 4 key-value pairs, length 32: must reach high accuracy within a few hundred steps."""
    run = RecallRun(
        arch="transformer", seq_len=32, vocab_size=64, num_kv_pairs=4, hidden_size=64, steps=800,
        batch_size=64, lr=1e-3, num_train=4000, num_test=200, eval_every=50, target_accuracy=0.95,
    )  # fmt: skip
    result = train_recall(run)
    assert result["accuracy"] >= 0.95, result


def test_unknown_fields_and_tasks_raise():
    with pytest.raises(ValueError, match="unknown recall run fields"):
        RecallRun.from_dict({"arch": "bmojo", "sequence_length": 12})
    with pytest.raises(ValueError, match="unknown task"):
        train_recall(RecallRun(task="sorting", steps=1))


def test_recall_cli_tiny_sweep_writes_csv_and_figure(tmp_path):
    spec = {
        "base": {"vocab_size": 64, "num_kv_pairs": 2, "hidden_size": 32, "steps": 4, "batch_size": 4,
                 "num_train": 64, "num_test": 16, "eval_every": 2, "model": {"window_size": 8}},
        "archs": ["swa", "bmojo"],
        "seq_lens": [16, 32],
    }  # fmt: skip
    out = tmp_path / "out"
    result = run_sweep(spec, tmp_path, out)
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert len(rows) == 4 and {r["arch"] for r in rows} == {"swa", "bmojo"}
    assert all(0.0 <= float(r["accuracy"]) <= 1.0 and int(r["state_bytes_per_layer"]) > 0 for r in rows)
    assert (out / "accuracy_vs_seq_len.png").stat().st_size > 0
    assert (out / "results.md").read_text().startswith("| arch")


def test_demo_runs_have_comparable_state_and_a_window_shorter_than_the_sequence():
    from bmojo.models import BMojoForCausalLM
    from bmojo.recall import demo_runs, state_bytes_per_layer

    runs = demo_runs(steps=1)
    assert [r.label for r in runs] == ["swa", "mamba2", "jamba", "bmojo-f", "bmojo"]
    sizes = [state_bytes_per_layer(BMojoForCausalLM(r.config()), r.seq_len) for r in runs]
    assert max(sizes) <= 1.25 * min(sizes), sizes
    for r in runs:
        assert r.config().window_size < r.seq_len and r.steps == 1


def test_conclusion_names_the_best_and_the_runner_up():
    from bmojo.recall import conclusion

    rows = [
        {"arch": "swa", "seq_len": 128, "accuracy": 0.25, "state_bytes_per_layer": 2048},
        {"arch": "bmojo", "seq_len": 128, "accuracy": 0.99, "state_bytes_per_layer": 3072},
        {"arch": "mamba2", "seq_len": 128, "accuracy": 0.5, "state_bytes_per_layer": 1024},
    ]
    text = conclusion(rows)
    assert text.startswith("At sequence length 128, bmojo recalls best: 99.0% accuracy with 3.0 KiB")
    assert "50.0% for the runner-up mamba2 with 1.0 KiB" in text


def test_demo_cli_writes_table_figure_and_conclusion(tmp_path):
    out = tmp_path / "demo"
    result = CliRunner().invoke(app, ["demo", "--steps", "2", "--out", str(out)])
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [r["arch"] for r in rows] == ["swa", "mamba2", "jamba", "bmojo-f", "bmojo"]
    assert (out / "accuracy_vs_step.png").stat().st_size > 0
    sentence = (out / "conclusion.txt").read_text()
    assert "recalls best" in sentence and sentence.strip() in " ".join(result.output.split())


def test_recall_cli_arch_entries_with_their_own_model_and_a_categorical_plot(tmp_path):
    spec = {
        "base": {"vocab_size": 32, "num_kv_pairs": 2, "hidden_size": 32, "steps": 2, "batch_size": 4,
                 "num_train": 32, "num_test": 8, "eval_every": 2, "seq_len": 24},
        "archs": [{"arch": "swa", "label": "swa-12", "model": {"window_size": 12}},
                  {"arch": "bmojo", "model": {"window_size": 4, "eidetic_size": 2}}],
        "budgets": [{"selection": "innovation"}, {"selection": "random"}],
        "plot": ["model.selection"],
    }  # fmt: skip
    out = tmp_path / "out"
    result = run_sweep(spec, tmp_path, out)
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [(r["arch"], r["model.window_size"], r["model.selection"]) for r in rows] == [
        ("swa-12", "12", "innovation"), ("swa-12", "12", "random"), ("bmojo", "4", "innovation"), ("bmojo", "4", "random")
    ]  # fmt: skip
    assert (out / "accuracy_vs_selection.png").stat().st_size > 0
    spec["plot"] = ["nonsense"]
    result = run_sweep(spec, tmp_path, out)
    assert result.exit_code != 0 and "cannot plot" in result.output
