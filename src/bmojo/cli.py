"""The ``bmojo`` command line."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
import typer
import yaml
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, track
from rich.table import Table

from bmojo.models import BMojoConfig, BMojoForCausalLM
from bmojo.models.config import PRESETS, SIZES
from bmojo.models.modeling import count_parameters
from bmojo.recall import (
    DEMO_BASE,
    RecallRun,
    conclusion,
    demo_runs,
    plot_accuracy,
    plot_lines,
    train_recall,
    write_results,
)

app = typer.Typer(help="B'MOJO hybrid state-space language models.", no_args_is_help=True)
console = Console()


def _parity_and_cache(name: str, lengths: tuple[int, ...], seed: int = 0) -> dict[str, float]:
    """Build a tiny model; measure full-forward vs cached-decode logits and cache bytes at several lengths."""
    torch.manual_seed(seed)
    model = BMojoForCausalLM(BMojoConfig.from_preset(name, "tiny", window_size=16, chunk_size=16)).eval()
    ids = torch.randint(0, model.config.vocab_size, (1, max(lengths)))
    row: dict[str, float] = {"params": sum(p.numel() for p in model.parameters())}
    with torch.no_grad():
        short = ids[:, :64]
        full = model(short, use_cache=False).logits
        out = model(short[:, :20], use_cache=True)
        steps = [out.logits] + [
            model(short[:, t : t + 1], past_key_values=out.cache).logits for t in range(20, 64)
        ]
        row["parity"] = (torch.cat(steps, 1) - full).abs().max().item()
        for n in lengths:
            t0 = time.perf_counter()
            row[f"cache@{n}"] = model(ids[:, :n], use_cache=True).cache.nbytes()
            row[f"time@{n}"] = time.perf_counter() - t0
    return row


@app.command()
def archs(lengths: str = typer.Option("256,2048", help="context lengths for the cache-size columns")) -> None:
    """Build every architecture, check parallel == recurrent, and show how its cache grows with context."""
    ctx = tuple(int(x) for x in lengths.split(","))
    table = Table(title="bmojo architectures (tiny size, window 16)")
    for col in ["preset", "layers", "params", "max |full - cached|", *[f"cache @ {n}" for n in ctx]]:
        table.add_column(col, justify="right" if col != "preset" else "left")
    for name in track(PRESETS, description="building and decoding", console=console):
        row = _parity_and_cache(name, ctx)
        kinds = BMojoConfig.from_preset(name, "tiny").layer_pattern
        table.add_row(
            name,
            "+".join(kinds),
            f"{int(row['params']):,}",
            f"{row['parity']:.1e}",
            *[f"{row[f'cache@{n}'] / 1024:.1f} KiB" for n in ctx],
        )
    console.print(table)
    console.print(
        "Every architecture is one BMojoMixer configuration; cached decoding reproduces the parallel forward, "
        "and only full-attention layers grow their cache with context."
    )


@app.command()
def info(size: str = typer.Option("130m", help=f"one of {', '.join(SIZES)}")) -> None:
    """Parameter count and layer pattern of every preset at a size (counted without allocating weights)."""
    table = Table(title=f"presets at size {size}")
    for col in ["preset", "layers", "hidden", "params"]:
        table.add_column(col)
    for name in PRESETS:
        cfg = BMojoConfig.from_preset(name, size)
        table.add_row(name, str(cfg.num_hidden_layers), str(cfg.hidden_size), f"{count_parameters(cfg) / 1e6:.1f}M")
    console.print(table)


def _train_all(runs: list[RecallRun]) -> tuple[list[dict[str, Any]], dict[str, list[tuple[int, float]]]]:
    """Train every run in turn with a progress bar per run; return result rows and accuracy-vs-step curves."""
    rows, curves = [], {}
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    with Progress(*columns, console=console) as progress:
        for run in runs:
            label = f"{run.label or run.arch} L={run.seq_len} seed={run.seed}"
            bar = progress.add_task(label, total=run.steps)
            curve = curves.setdefault(label, [])

            def on_step(step: int, loss: float, acc: float | None, bar: int = bar, label: str = label) -> None:
                if acc is not None:
                    curve.append((step, acc))
                last = curve[-1][1] if curve else 0.0
                progress.update(bar, completed=step, description=f"{label} loss {loss:6.3f} acc {last:.3f}")

            rows.append(train_recall(run, on_step))
            progress.update(bar, completed=run.steps)
    return rows, curves


def _results_table(rows: list[dict[str, Any]], title: str, varied: list[str] | None = None) -> Table:
    """Result rows as a rich table; ``varied`` names the ``model.*`` fields that differ between runs."""
    table, varied = Table(title=title), varied or []
    cols = ["arch", "seq_len", *[k.removeprefix("model.") for k in varied], "params", "state bytes/layer", "accuracy",
            "steps", "seconds"]  # fmt: skip
    for col in cols:
        table.add_column(col, justify="left" if col == "arch" else "right")
    for r in rows:
        table.add_row(
            r["arch"], str(r["seq_len"]), *[str(r.get(k, "")) for k in varied], f"{r['params']:,}",
            f"{r['state_bytes_per_layer']:,}", f"{r['accuracy']:.3f}", str(r["steps"]), f"{r['seconds']:.0f}",
        )  # fmt: skip
    return table


def _csv_ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


@app.command()
def demo(
    steps: int | None = typer.Option(None, help=f"training steps per model (default {DEMO_BASE['steps']})"),
    seed: int = typer.Option(0, help="seed of data and initialisation"),
    out: Path = typer.Option(Path("runs/demo"), help="output directory"),
) -> None:
    """Train 2-layer SWA, Mamba-2, Jamba-style, B'MOJO-F and B'MOJO models on MQAR at equal state; compare recall."""
    runs = demo_runs(steps, seed)
    b = runs[0]
    console.print(
        f"MQAR: {b.num_kv_pairs} key-value pairs, then queries spread over a sequence of {b.seq_len} tokens "
        f"(vocabulary {b.vocab_size}); every model (jamba: one mamba2 and one swa layer) has 2 layers and "
        f"about 24 KiB of inference state per layer, so no window reaches back to every key. "
        f"Up to {b.steps} steps of batch {b.batch_size} each."
    )
    rows, curves = _train_all(runs)
    csv_path, md_path = write_results(rows, out)
    figure = plot_lines(curves, out / "accuracy_vs_step.png", "training step", "MQAR test accuracy", "bmojo demo")
    console.print(_results_table(rows, "MQAR recall at equal state size"))
    sentence = conclusion(rows)
    (out / "conclusion.txt").write_text(sentence + "\n")
    console.print(sentence)
    console.print(f"wrote {csv_path}, {md_path}, {figure}")


@app.command()
def recall(
    config: Path | None = typer.Option(None, help="YAML with keys base, archs, seq_lens, budgets, seeds, plot"),
    archs: str | None = typer.Option(None, help="comma-separated presets, e.g. swa,mamba,bmojo"),
    seq_lens: str | None = typer.Option(None, help="comma-separated sequence lengths"),
    seeds: str | None = typer.Option(None, help="comma-separated seeds"),
    steps: int | None = typer.Option(None, help="training steps per run"),
    out: Path = typer.Option(Path("runs/recall"), help="output directory"),
) -> None:
    """Sweep architectures x sequence lengths x memory budgets x seeds on a recall task."""
    spec: dict[str, Any] = yaml.safe_load(config.read_text()) if config else {}
    if not isinstance(spec, dict):
        raise typer.BadParameter(f"{config} must hold a YAML mapping")
    base = dict(spec.get("base", {}))
    if steps is not None:
        base["steps"] = steps
    arch_list = archs.split(",") if archs else spec.get("archs", ["swa", "mamba", "jamba", "bmojo-f", "bmojo"])
    lengths = _csv_ints(seq_lens) if seq_lens else spec.get("seq_lens", [base.get("seq_len", 128)])
    seed_list = _csv_ints(seeds) if seeds else spec.get("seeds", [0])
    budgets = spec.get("budgets", [{}])
    runs = []
    for a in arch_list:
        entry = {"arch": a} if isinstance(a, str) else dict(a)  # a preset name, or {arch, label, model}
        for n, b, sd in ((n, b, sd) for n in lengths for b in budgets for sd in seed_list):
            model = {**base.get("model", {}), **entry.get("model", {}), **b}
            runs.append(RecallRun.from_dict({**base, **entry, "seq_len": n, "seed": sd, "model": model}))
    arch_models = [a.get("model", {}) for a in arch_list if isinstance(a, dict)]
    varied = [f"model.{k}" for k in sorted({k for m in [*budgets, *arch_models] for k in m})]
    plots = spec.get("plot") or (["seq_len"] if len(lengths) > 1 else []) + (
        ["state_bytes_per_layer"] if len(budgets) > 1 else []
    )
    plottable = ["seq_len", "state_bytes_per_layer", "params", "steps", "seconds", "seed", *varied]
    unknown = [x for x in plots if x not in plottable]
    if unknown:
        raise typer.BadParameter(f"cannot plot {unknown}: plottable fields are {plottable}")
    rows, _ = _train_all(runs)
    csv_path, md_path = write_results(rows, out)
    figures = [
        plot_accuracy(rows, x, out / f"accuracy_vs_{x.removeprefix('model.')}.png", f"accuracy vs {x}")
        for x in plots
    ]
    console.print(_results_table(rows, f"recall sweep ({len(runs)} runs)", varied))
    console.print(f"wrote {csv_path}, {md_path}" + "".join(f", {f}" for f in figures))


if __name__ == "__main__":
    app()
