"""The ``bmojo`` command line."""

from __future__ import annotations

import time

import torch
import typer
from rich.console import Console
from rich.progress import track
from rich.table import Table

from bmojo.models import BMojoConfig, BMojoForCausalLM
from bmojo.models.config import PRESETS, SIZES
from bmojo.models.modeling import count_parameters

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
def demo(lengths: str = typer.Option("256,2048", help="context lengths for the cache-size columns")) -> None:
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


if __name__ == "__main__":
    app()
