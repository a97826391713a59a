"""The ``bmojo`` command line."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import typer
import typer.core
from huggingface_hub.errors import StrictDataclassError
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, track
from rich.table import Table

from bmojo.bench import BenchSettings, parse_device, ratio_summary, results_table, run_bench, write_outputs
from bmojo.data import MARKER as TOKENIZER_MARKER
from bmojo.data import DataError, Tokenizer, load_corpus, load_tokenizer
from bmojo.evaluate import length_generalisation, perplexity, plot_length_generalisation, write_rows
from bmojo.malloc import keep_freed_memory
from bmojo.models import BMojoConfig, BMojoForCausalLM
from bmojo.models.config import PRESETS, SIZES
from bmojo.models.convert import convert_checkpoint, pattern_summary
from bmojo.models.modeling import compile_steps_config, count_parameters, left_padded, new_tokens
from bmojo.prime import copy_tokenizer, fresh_parameter_names, load_source
from bmojo.prime import prime as prime_model
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
from bmojo.train import CheckpointError, ConfigError, DivergedError, load_config, parse_overrides, read_yaml_mapping
from bmojo.train import run as run_training

# Exceptions that bad input raises (missing or unreadable files, invalid configs, corrupt weights or checkpoints),
# and a training run that diverged: a command ends in one "error: ..." line for them, never a traceback. Hugging Face
# configs raise StrictDataclassError for a field of the wrong type.
USER_ERRORS = (OSError, UnicodeDecodeError, ConfigError, CheckpointError, DataError, DivergedError,
               StrictDataclassError)  # fmt: skip


class _Commands(typer.core.TyperGroup):
    """The command group; a command's :data:`USER_ERRORS` become ``error: <message>`` on stderr and exit status 1."""

    def invoke(self, ctx: typer.Context) -> Any:
        try:
            return super().invoke(ctx)
        except USER_ERRORS as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(1) from e


app = typer.Typer(help="B'MOJO hybrid state-space language models.", no_args_is_help=True, cls=_Commands)
# Output that is not a terminal (a log, a pipe) gets room for the widest table, where rich would take 80 columns and
# squeeze a table's wrapping columns (model names) to nothing; COLUMNS, where set, still rules.
console = Console(width=None if sys.stdout.isatty() or "COLUMNS" in os.environ else 160)


@app.callback()
def _startup() -> None:
    """B'MOJO hybrid state-space language models."""
    keep_freed_memory()  # a training step reuses the last one's memory (bmojo.malloc; BMOJO_KEEP_FREED_MEMORY=0: off)


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
        steps = [out.logits] + [model(short[:, t : t + 1], past_key_values=out.cache).logits for t in range(20, 64)]
        row["parity"] = (torch.cat(steps, 1) - full).abs().max().item()
        for n in lengths:
            t0 = time.perf_counter()
            row[f"cache@{n}"] = model(ids[:, :n], use_cache=True).cache.nbytes()
            row[f"time@{n}"] = time.perf_counter() - t0
    return row


@app.command()
def archs(lengths: str = typer.Option("256,2048", help="context lengths for the cache-size columns")) -> None:
    """Build every architecture, check parallel == recurrent, and show how its cache grows with context."""
    ctx = tuple(_csv_ints(lengths, "--lengths"))
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
    if size not in SIZES:
        raise typer.BadParameter(f"unknown size {size!r}; expected one of {', '.join(SIZES)}")
    table = Table(title=f"presets at size {size}")
    for col in ["preset", "layers", "hidden", "params"]:
        table.add_column(col)
    for name in PRESETS:
        cfg = BMojoConfig.from_preset(name, size)
        table.add_row(name, str(cfg.num_hidden_layers), str(cfg.hidden_size), f"{count_parameters(cfg) / 1e6:.1f}M")
    console.print(table)


PROGRESS_COLUMNS = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())


@contextlib.contextmanager
def _progress(description: str) -> Iterator[Callable[[int, int], None]]:
    """A transient progress bar; yields ``update(done, total)``."""
    with Progress(*PROGRESS_COLUMNS, console=console, transient=True) as progress:
        bar = progress.add_task(description, total=None)
        yield lambda done, total: progress.update(bar, completed=done, total=total)


def _train_all(runs: list[RecallRun]) -> tuple[list[dict[str, Any]], dict[str, list[tuple[int, float]]]]:
    """Train every run in turn with a progress bar per run; return result rows and accuracy-vs-step curves."""
    rows, curves = [], {}
    with Progress(*PROGRESS_COLUMNS, console=console) as progress:
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


def _csv_ints(text: str, option: str, minimum: int = 1) -> list[int]:
    """Comma-separated integers of at least ``minimum``; ``typer.BadParameter`` naming ``option`` otherwise."""
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        values = []
    if not values or min(values) < minimum:
        raise typer.BadParameter(f"{option} takes comma-separated integers >= {minimum}, got {text!r}")
    return values


def _device(name: str) -> torch.device:
    """:func:`bmojo.bench.parse_device`, its ``ValueError`` as ``typer.BadParameter``."""
    try:
        return parse_device(name)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from e


@app.command()
def demo(
    steps: int | None = typer.Option(None, min=1, help=f"training steps per model (default {DEMO_BASE['steps']})"),
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
    steps: int | None = typer.Option(None, min=1, help="training steps per run"),
    out: Path = typer.Option(Path("runs/recall"), help="output directory"),
) -> None:
    """Sweep architectures x sequence lengths x memory budgets x seeds on a recall task."""
    spec = read_yaml_mapping(config, "recall sweep keys") if config else {}
    base = dict(spec.get("base", {}))
    if steps is not None:
        base["steps"] = steps
    arch_list = archs.split(",") if archs else spec.get("archs", ["swa", "mamba", "jamba", "bmojo-f", "bmojo"])
    lengths = _csv_ints(seq_lens, "--seq-lens") if seq_lens else spec.get("seq_lens", [base.get("seq_len", 128)])
    seed_list = _csv_ints(seeds, "--seeds", minimum=0) if seeds else spec.get("seeds", [0])
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
        plot_accuracy(rows, x, out / f"accuracy_vs_{x.removeprefix('model.')}.png", f"accuracy vs {x}") for x in plots
    ]
    console.print(_results_table(rows, f"recall sweep ({len(runs)} runs)", varied))
    console.print(f"wrote {csv_path}, {md_path}" + "".join(f", {f}" for f in figures))


def _tokenizer_for(model_dir: Path, tokenizer: str | None) -> Tokenizer:
    """``tokenizer`` ('byte' or a path) if given, else the one saved in the model folder; checked to fit the
    model's vocabulary."""
    if not (model_dir / "config.json").is_file():
        raise typer.BadParameter(f"{model_dir} is not a saved model folder (no config.json)")
    if tokenizer is None and not any((model_dir / f).is_file() for f in (TOKENIZER_MARKER, "tokenizer.json")):
        raise typer.BadParameter(f"no tokenizer saved in {model_dir}: pass --tokenizer ('byte' or a path)")
    try:
        tok = load_tokenizer(tokenizer if tokenizer is not None else model_dir)
    except DataError as e:
        raise typer.BadParameter(str(e)) from e
    try:
        vocab_size = BMojoConfig.from_pretrained(model_dir).vocab_size
    except (ValueError, TypeError) as e:  # a field BMojoConfig's validation refuses
        raise typer.BadParameter(f"{model_dir / 'config.json'}: {e}") from e
    if tok.vocab_size > vocab_size:
        raise typer.BadParameter(
            f"tokenizer {tok.name} has {tok.vocab_size} tokens but the model's vocabulary has {vocab_size}"
        )
    return tok


@app.command(name="eval")
def eval_command(
    model_dir: Path = typer.Argument(..., help="saved model folder (BMojoForCausalLM.save_pretrained)"),
    data: list[Path] = typer.Option(..., help="text source: a file or a directory (repeat for several)"),
    split: str = typer.Option("all", help="all: every token of --data; val or train: that split of the corpus"),
    tokenizer: str | None = typer.Option(None, help="'byte' or a tokenizer path (default: the model folder's)"),
    context_length: int = typer.Option(256, help="tokens per evaluation window"),
    stride: int | None = typer.Option(None, help="window step (default: the context length, no overlap)"),
    batch_size: int = typer.Option(4, help="windows per forward pass"),
    max_tokens: int | None = typer.Option(None, min=2, help="evaluate only the first this many tokens"),
    lengths: str | None = typer.Option(None, help="comma-separated context lengths: a length-generalisation sweep"),
    train_length: int | None = typer.Option(None, help="training context length, marked on the sweep's plot"),
    val_fraction: float = typer.Option(0.05, help="validation fraction of the corpus split (as in training)"),
    seed: int = typer.Option(0, help="seed of the corpus split (as in training)"),
    errors: str = typer.Option("strict", help="invalid UTF-8: strict, replace or ignore"),
    cache_dir: Path | None = typer.Option(None, help="token cache root (default $BMOJO_CACHE or ~/.cache/bmojo)"),
    out: Path | None = typer.Option(None, help="output folder (eval.json; the sweep's table and plot)"),
    device: str = typer.Option("cpu", help="torch device"),
) -> None:
    """Perplexity and bits per byte of a saved model on text, or perplexity vs context length (--lengths)."""
    if split not in ("all", "train", "val"):
        raise typer.BadParameter(f"--split must be all, train or val, got {split!r}")
    tok = _tokenizer_for(model_dir, tokenizer)
    try:
        corpus = load_corpus(data, tok, cache_dir, 0.0 if split == "all" else val_fraction, seed, errors)
    except (DataError, FileNotFoundError) as e:
        raise typer.BadParameter(str(e)) from e
    model = BMojoForCausalLM.from_pretrained(model_dir).to(_device(device)).eval()
    tokens = corpus.val if split == "val" else corpus.train
    num_bytes = corpus.num_bytes_val if split == "val" else corpus.num_bytes_train
    if max_tokens is not None and max_tokens < len(tokens):
        tokens = tokens[:max_tokens]
        num_bytes = len(tok.decode(tokens).encode("utf-8"))
    with _progress(f"evaluating {len(tokens):,} tokens") as on_batch:
        try:
            if lengths:
                rows = length_generalisation(model, tokens, _csv_ints(lengths, "--lengths"), batch_size, num_bytes,
                                             on_batch)  # fmt: skip
            else:
                rows = [perplexity(model, tokens, context_length, batch_size, stride, num_bytes, on_batch)]
        except ValueError as e:
            raise typer.BadParameter(str(e)) from e
    table = Table(title=f"{model_dir} on {', '.join(map(str, data))} ({split}, tokenizer {tok.name})")
    for col in ("context", "stride", "tokens", "loss", "perplexity", "bits/byte"):
        table.add_column(col, justify="right")
    for r in rows:
        bpb = "" if r["bits_per_byte"] is None else f"{r['bits_per_byte']:.4f}"
        table.add_row(*map(str, (r["context_length"], r["stride"], f"{r['tokens']:,}")), f"{r['loss']:.4f}",
                      f"{r['ppl']:.3f}", bpb)  # fmt: skip
    console.print(table)
    if lengths:
        out = out or Path("runs/eval")
        csv_path, md_path = write_rows(rows, out / "length_generalisation")
        figure = plot_length_generalisation(rows, out / "length_generalisation.png", train_length,
                                            f"{model_dir}: perplexity vs context length")  # fmt: skip
        console.print(f"wrote {csv_path}, {md_path}, {figure}")
    elif out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "eval.json").write_text(json.dumps({"model": str(model_dir), "split": split, **rows[0]}, indent=1))
        console.print(f"wrote {out / 'eval.json'}")


@app.command()
def generate(
    model_dir: Path = typer.Argument(..., help="saved model folder (BMojoForCausalLM.save_pretrained)"),
    prompt: list[str] = typer.Option(
        ..., help="text to continue ('' starts from the end-of-text token); repeat for several, one batch"
    ),
    max_new_tokens: int = typer.Option(100, help="tokens to generate at most (fewer if eos comes first)"),
    greedy: bool = typer.Option(False, "--greedy", help="always take the most likely token instead of sampling"),
    beams: int = typer.Option(1, help="beam search over this many beams (with --greedy: the most likely sequence)"),
    temperature: float = typer.Option(1.0, help="sampling temperature (> 0)"),
    top_k: int = typer.Option(0, help="sample among the k most likely tokens (0: all)"),
    top_p: float = typer.Option(1.0, help="sample among the most likely tokens holding this probability (nucleus)"),
    seed: int = typer.Option(0, help="sampling seed"),
    tokenizer: str | None = typer.Option(None, help="'byte' or a tokenizer path (default: the model folder's)"),
    device: str = typer.Option("cpu", help="torch device"),
    compile: bool = typer.Option(
        False,
        "--compile",
        help="decoding steps through torch.compile (CUDA graphs on CUDA): pays off on long continuations",
    ),
) -> None:
    """Continue prompts with a saved model; prints each prompt followed by its generated text. Several prompts are
    generated as one batch, padded on the left (greedy or beam search: each gets the tokens it gets alone)."""
    if temperature <= 0 or not 0 < top_p <= 1 or top_k < 0 or max_new_tokens < 1 or beams < 1:
        raise typer.BadParameter("need temperature > 0, 0 < top_p <= 1, top_k >= 0, max_new_tokens >= 1, beams >= 1")
    tok = _tokenizer_for(model_dir, tokenizer)
    model = BMojoForCausalLM.from_pretrained(model_dir).to(_device(device)).eval()
    rows = [tok.encode(text) or ([] if tok.eos_id is None else [tok.eos_id]) for text in prompt]
    if not all(rows):
        raise typer.BadParameter("the prompt is empty and the tokenizer has no end-of-text token to start from")
    ids, mask = left_padded(rows, device=device)
    torch.manual_seed(seed)
    options = {} if greedy else {"temperature": temperature, "top_k": top_k, "top_p": top_p}
    if compile:  # a static cache, whose steps generate compiles (one graph for every position; prefill eager)
        options.update(cache_implementation="static", compile_config=compile_steps_config(model.device))
    with torch.inference_mode():  # (eager steps take about a sixth less time than under generate's no_grad)
        out = model.generate(
            ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=not greedy, num_beams=beams,
            eos_token_id=tok.eos_id, pad_token_id=tok.eos_id, **options,
        )  # fmt: skip
    for text, new in zip(prompt, new_tokens(out, ids.shape[1], tok.eos_id)):
        typer.echo(text + tok.decode(new))


@app.command()
def train(
    overrides: list[str] | None = typer.Argument(None, help="KEY=VALUE overrides: steps=100 model_args.window_size=32"),
    config: Path | None = typer.Option(None, help="YAML training config (see examples/train/)"),
    resume: bool = typer.Option(False, "--resume", help="continue from the latest checkpoint in out_dir"),
) -> None:
    """Train a language model (AdamW, warmup + cosine, checkpoints, DDP/FSDP under torchrun, distillation)."""
    result = run_training(load_config(config, overrides or []), resume=resume)
    losses = [f"{name} loss {result[key]:.4f}" for key, name in (("loss", "training"), ("val_loss", "validation"))
              if result[key] is not None]  # fmt: skip
    console.print(f"step {result['step']}: {', '.join(losses) or 'no new steps'}; model in {result['final']}")


@app.command()
def convert(
    src: Path = typer.Argument(..., help="checkpoint folder (config.json + safetensors): Hugging Face or bmojo"),
    dst: Path = typer.Argument(..., help="output folder"),
) -> None:
    """Convert a Llama, Mistral, Qwen2, Qwen3, Mamba, Mamba-2 or Jamba checkpoint to bmojo, or a bmojo one back."""
    with _progress(f"converting {src}") as on_tensor:
        try:
            result = convert_checkpoint(src, dst, on_tensor)
        except (ValueError, FileNotFoundError) as e:
            raise typer.BadParameter(str(e)) from e
    kinds = result.bmojo_config.layer_pattern
    console.print(
        f"{result.source.model_type} -> {result.target.model_type}: {result.num_tensors} tensors written to {dst}\n"
        f"{len(kinds)} layers: {pattern_summary(kinds)}"
    )


@app.command()
def prime(
    src: Path = typer.Argument(..., help="pretrained model folder: bmojo or Hugging Face (Llama, Qwen...)"),
    dst: Path = typer.Argument(..., help="output folder for the primed model"),
    layers: str = typer.Option("every-second", help="'every-second' attention layer, or indices like 1,3,5"),
    kind: str = typer.Option("bmojo", help="bmojo or bmojo-f"),
    window_size: int | None = typer.Option(None, help="sliding window w of the new layers"),
    eidetic_size: int | None = typer.Option(None, help="eidetic memory slots (bmojo)"),
    chunk_size: int | None = typer.Option(None, help="eidetic selection period (bmojo; default w)"),
    bmojo_ssm: str | None = typer.Option(None, help="SSM of the new layers: mamba or mamba2"),
    state_size: int | None = typer.Option(None, help="SSM state size"),
    mamba2_state_size: int | None = typer.Option(None, help="Mamba-2 state size (default: --state-size)"),
    mamba2_head_dim: int | None = typer.Option(None, help="Mamba-2 head dimension"),
    ssm_chunk_size: int | None = typer.Option(None, help="chunk length of the Mamba-2 scan (speed only)"),
    attention_block_size: int | None = typer.Option(None, help="block of the banded attention (speed only)"),
    seed: int = typer.Option(0, help="seed of the fresh parameters"),
) -> None:
    """Replace attention layers of a pretrained Transformer by B'MOJO mixers (q/k/v/o kept, SSM fresh); save it."""
    given = {"window_size": window_size, "eidetic_size": eidetic_size, "chunk_size": chunk_size,
             "bmojo_ssm": bmojo_ssm, "state_size": state_size, "mamba2_state_size": mamba2_state_size,
             "mamba2_head_dim": mamba2_head_dim, "ssm_chunk_size": ssm_chunk_size,
             "attention_block_size": attention_block_size}  # fmt: skip
    overrides = {k: v for k, v in given.items() if v is not None}
    try:
        chosen = layers if layers == "every-second" else _csv_ints(layers, "--layers", minimum=0)
        source = load_source(src)
        primed = prime_model(source, chosen, kind, seed, **overrides)
    except (ValueError, TypeError, FileNotFoundError) as e:
        raise typer.BadParameter(str(e)) from e
    primed.save_pretrained(dst)
    copied = copy_tokenizer(src, dst)
    table = Table(title=f"{src} -> {dst}")
    for col in ("layer", "old kind", "new kind", "fresh parameters"):
        table.add_column(col, justify="right")
    total = 0
    params = dict(primed.named_parameters())
    for i, (old, new) in enumerate(zip(source.config.layer_pattern, primed.config.layer_pattern)):
        fresh = sum(params[name].numel() for name in fresh_parameter_names(primed, [i]))
        total += fresh
        table.add_row(str(i), old, new, f"{fresh:,}")
    console.print(table)
    console.print(
        f"{total:,} fresh of {sum(p.numel() for p in params.values()):,} parameters; the rest copied. "
        f"Tokenizer files copied: {', '.join(copied) or 'none found'}"
    )


@app.command()
def bench(
    presets: str = typer.Option("bmojo", help="comma-separated presets, each measured against its own Transformer"),
    size: str = typer.Option("tiny", help=f"one of {', '.join(SIZES)}"),
    lengths: str = typer.Option("512,1024,2048", help="comma-separated context lengths"),
    modes: str = typer.Option("train,prefill,decode", help="comma-separated: train, prefill, decode"),
    batch: int = typer.Option(1, help="sequences per step"),
    repeats: int = typer.Option(3, help="timed runs per point (the median is reported)"),
    warmup: int = typer.Option(1, help="untimed runs per point first"),
    decode_steps: int = typer.Option(16, help="single-token steps timed per decode run"),
    threads: int | None = typer.Option(None, help="torch CPU threads (default: torch's)"),
    device: str = typer.Option("cpu", help="torch device"),
    dtype: str = typer.Option("float32", help="float32, or bfloat16 (training under autocast, inference in bf16)"),
    compile: bool = typer.Option(False, "--compile/--eager", help="time every mode through torch.compile"),
    compile_mode: str = typer.Option("default", help="torch.compile mode; reduce-overhead: CUDA graphs on CUDA"),
    compile_options: list[str] | None = typer.Option(
        None, "--compile-option", help="inductor option on top of the mode's: NAME=VALUE (e.g. combo_kernels=true)"
    ),
    overrides: list[str] | None = typer.Option(None, "--set", help="config field of every model: KEY=VALUE"),
    memory: bool = typer.Option(True, "--memory/--no-memory", help="measure peak memory (CPU: a process per point)"),
    out: Path = typer.Option(Path("runs/bench"), help="output directory"),
) -> None:
    """Training, prefill and decode tokens/s and peak memory vs context length, against an equal-size Transformer."""
    try:
        settings = BenchSettings(
            presets=presets.split(","), size=size, lengths=_csv_ints(lengths, "--lengths"),
            modes=modes.split(","), batch=batch, repeats=repeats, warmup=warmup, decode_steps=decode_steps,
            threads=threads, device=device,
            overrides=parse_overrides(overrides or []), memory=memory, dtype=dtype, compile=compile,
            compile_mode=compile_mode, compile_options=parse_overrides(compile_options or [], nested=False),
        )  # fmt: skip
        settings.validate()
    except ValueError as e:
        raise typer.BadParameter(str(e)) from e
    with console.status("measuring") as status:
        result = run_bench(settings, lambda p: status.update(f"measured {p['model']} {p['mode']} L={p['length']}"))
    console.print(results_table(result))
    for line in ratio_summary(result):
        console.print(line)
    if memory and not any(p.get("peak_mem_bytes") is not None for p in result["points"]):
        console.print("peak memory: not measured (on a CPU it needs Linux's /proc; on accelerators, CUDA)")
    console.print("wrote " + ", ".join(map(str, write_outputs(result, out))))


if __name__ == "__main__":
    app()
