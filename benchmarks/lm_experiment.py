"""Glue for the language-modelling experiment (``examples/lm/run.sh``; results in ``benchmarks/RESULTS.md``).

Subcommands, from the repository root:

- ``params``: the parameter count and layer pattern of each ``examples/lm/<model>.yaml``; fails if one is more
  than 5% away from the Transformer's.
- ``throughput``: training-step tokens/s of every model in one process, models alternating (order rotated each
  round) so that a change in machine load hits all of them alike; the median over rounds, with the load average.
- ``report``: one table (parameters, validation perplexity / bits per byte at T, perplexity at 2T, 4T, 8T, training
  tokens/s, wall time) from the runs' ``metrics.jsonl``, ``eval/length_generalisation.csv`` and ``<model>.time``,
  and two figures: perplexity vs evaluation length and training loss vs step, all models on one plot each.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from bmojo.data import ByteTokenizer
from bmojo.models import BMojoConfig, BMojoForCausalLM
from bmojo.models.modeling import count_parameters
from bmojo.train import TrainConfig, build_model_config, load_config, read_metrics

MODELS = ("transformer", "swa", "mamba", "jamba", "bmojo-f", "bmojo")
LABELS = {"transformer": "Transformer", "swa": "SWA", "mamba": "Mamba", "jamba": "Jamba-style",
          "bmojo-f": "B'MOJO-F", "bmojo": "B'MOJO"}  # fmt: skip
ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = ROOT / "examples" / "lm"
MAX_PARAM_GAP = 0.05


def model_config(name: str) -> tuple[TrainConfig, BMojoConfig]:
    """The training config ``examples/lm/<name>.yaml`` and the model config it builds (byte tokenizer)."""
    cfg = load_config(CONFIG_DIR / f"{name}.yaml")
    tok = ByteTokenizer()
    return cfg, build_model_config(cfg, tok.vocab_size, tok.eos_id)


def params() -> dict[str, int]:
    """Print each model's parameter count and pattern; raise if one is more than 5% from the Transformer's."""
    counts = {name: count_parameters(model_config(name)[1]) for name in MODELS}
    base = counts["transformer"]
    for name in MODELS:
        pattern = model_config(name)[1].layer_pattern
        print(f"{LABELS[name]:12s} {counts[name]:>10,d} params ({counts[name] / base - 1:+.1%})  {pattern}")
    far = [n for n in MODELS if abs(counts[n] / base - 1) > MAX_PARAM_GAP]
    if far:
        raise SystemExit(f"parameter counts of {far} are more than {MAX_PARAM_GAP:.0%} from the Transformer's")
    return counts


def _train_step(model: BMojoForCausalLM, optimizer: torch.optim.Optimizer, ids: torch.Tensor) -> None:
    """One training step on ``ids [B, L]``: loss (cross-entropy + weighted aux loss), backward, clip, AdamW."""
    model(ids, labels=ids).loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def throughput(rounds: int, steps: int, out: Path | None) -> dict[str, Any]:
    """Median training-step tokens/s per model over ``rounds`` rounds of ``steps`` timed steps (after one warm-up
    step per model), all models in this process and alternating; the training configs' batch and length."""
    torch.manual_seed(0)
    setups = {}
    for name in MODELS:
        cfg, config = model_config(name)
        model = BMojoForCausalLM(config).train()
        setups[name] = (model, torch.optim.AdamW(model.parameters(), lr=1e-4), cfg.batch_size, cfg.seq_len)
    ids = {name: torch.randint(0, 256, (b, n)) for name, (_, _, b, n) in setups.items()}
    for name, (model, opt, _, _) in setups.items():
        _train_step(model, opt, ids[name])
    rates: dict[str, list[float]] = {name: [] for name in MODELS}
    load_before = os.getloadavg()
    for r in range(rounds):
        for name in MODELS[r % len(MODELS) :] + MODELS[: r % len(MODELS)]:
            model, opt, b, n = setups[name]
            t0 = time.perf_counter()
            for _ in range(steps):
                _train_step(model, opt, ids[name])
            rates[name].append(steps * b * n / (time.perf_counter() - t0))
    result = {
        "threads": torch.get_num_threads(), "rounds": rounds, "steps": steps,
        "load_before": load_before, "load_after": os.getloadavg(),
        "tokens_per_s": {name: statistics.median(v) for name, v in rates.items()}, "all": rates,
    }  # fmt: skip
    base = result["tokens_per_s"]["transformer"]
    for name in MODELS:
        tps = result["tokens_per_s"][name]
        print(f"{LABELS[name]:12s} {tps:8.0f} tokens/s ({tps / base:.2f}x the Transformer)")
    print(f"load average before {load_before}, after {result['load_after']}; {result['threads']} thread(s)")
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1))
    return result


def _eval_rows(run: Path) -> list[dict[str, float]]:
    """The rows of a run's length-generalisation table (``bmojo eval --lengths``), numbers parsed."""
    with open(run / "eval" / "length_generalisation.csv") as f:
        return [{k: float(v) if v else math.nan for k, v in row.items()} for row in csv.DictReader(f)]


def report(runs: Path, figure: Path) -> str:
    """The Markdown results table of the runs under ``runs``; writes ``runs/results.md`` and the two figures."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    quiet_path = runs / "throughput.json"
    quiet = json.loads(quiet_path.read_text())["tokens_per_s"] if quiet_path.is_file() else {}
    header = ["model", "params", "val ppl @T", "bits/byte @T", "ppl @2T", "ppl @4T", "ppl @8T", "ppl 8T / T",
              "final train loss", "train tok/s (log)", "tok/s (alternating)", "train wall s"]  # fmt: skip
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    fig2, ax2 = plt.subplots(figsize=(6.5, 4.2))
    train_length = None
    for name in MODELS:
        run, (cfg, config) = runs / name, model_config(name)
        train_length = cfg.seq_len
        rows = sorted(_eval_rows(run), key=lambda r: r["context_length"])
        ppl = {int(r["context_length"]): r["ppl"] for r in rows}
        at_t = next(r for r in rows if int(r["context_length"]) == cfg.seq_len)
        records = read_metrics(run)
        logs = [r for r in records if "loss" in r]
        wall = (run.parent / f"{name}.time").read_text().split()[0] if (run.parent / f"{name}.time").is_file() else ""
        t = cfg.seq_len
        cells = [LABELS[name], f"{count_parameters(config):,}", f"{ppl[t]:.3f}", f"{at_t['bits_per_byte']:.3f}",
                 f"{ppl[2 * t]:.3f}", f"{ppl[4 * t]:.3f}", f"{ppl[8 * t]:.3f}", f"{ppl[8 * t] / ppl[t]:.2f}",
                 f"{logs[-1]['loss']:.3f}", f"{logs[-1]['tokens_per_s']:,.0f}",
                 f"{quiet[name]:,.0f}" if name in quiet else "", wall]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
        ax.plot(list(ppl), list(ppl.values()), marker="o", label=LABELS[name])
        ax2.plot([r["step"] for r in logs], [r["loss"] for r in logs], label=LABELS[name])
    ax.axvline(train_length, color="gray", linestyle="--", label=f"training length {train_length}")
    ax.set_xscale("log", base=2)
    lengths = [train_length * k for k in (1, 2, 4, 8)]
    ax.set_xticks(lengths, [str(n) for n in lengths])
    ax.minorticks_off()
    ax.set_xlabel("evaluation context length (bytes)")
    ax.set_ylabel("validation perplexity (per byte)")
    ax.set_yscale("log")
    ax.set_title("Perplexity vs context length, ~1.3M-parameter byte LMs")
    ax2.set_xlabel("step")
    ax2.set_ylabel("training loss (nats / byte)")
    ax2.set_title("Training loss")
    for a, f, path in ((ax, fig, figure), (ax2, fig2, figure.with_name(figure.name.replace("ppl_vs_length", "loss_curves")))):
        a.grid(alpha=0.3)
        a.legend(fontsize=8)
        f.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        f.savefig(path, dpi=120)
        plt.close(f)
    table = "\n".join(lines) + "\n"
    (runs / "results.md").write_text(table)
    print(table)
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("params", help="parameter counts of the six configs")
    p = sub.add_parser("throughput", help="alternating training-step tokens/s")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--out", type=Path, default=None)
    p = sub.add_parser("report", help="results table and figures from the runs")
    p.add_argument("--runs", type=Path, default=Path("runs/lm"))
    p.add_argument("--figure", type=Path, default=Path("benchmarks/figures/lm_ppl_vs_length.png"))
    args = parser.parse_args()
    if args.command == "params":
        params()
    elif args.command == "throughput":
        if args.rounds < 1 or args.steps < 1:
            parser.error("--rounds and --steps must be >= 1")
        throughput(args.rounds, args.steps, args.out)
    else:
        report(args.runs, args.figure)


if __name__ == "__main__":
    main()
