"""The B'MOJO read-out through our Triton kernels and FlexAttention against FlashAttention, at the 130m preset's
shapes (CUDA, bf16).

    python benchmarks/bench_flex.py                         # B=8, H=12, L=2048, d=64, window 512, 64 eidetic
    python benchmarks/bench_flex.py --options BLOCK_M=64,BLOCK_N=64 --options BLOCK_M=128,BLOCK_N=128,num_warps=8
    python benchmarks/bench_flex.py --forward-only --options fwd_num_warps=8   # inputs without grad: forward only
    python benchmarks/bench_flex.py --ours --tiles block_m=128,block_n=64 --tiles block_m=64,block_n=64,num_warps=8

Rows: causal SDPA over the whole sequence (FlashAttention; as many keys per query as the read-out on average at
L=2048); our kernels (``union_attention_triton``, the model's choice on CUDA) with each ``--tiles`` (default: the
sweep ``TILE_SWEEP``, whose first row is the kernels' own defaults, 64 x 64, where the model takes 64 x 32 for these
inputs; ``--ours``: these rows alone), the line ``best tiles: ...`` naming the fastest by forward + backward time in
the form ``BMOJO_TRITON_TILES`` takes; ``flex_union_attention`` with FlexAttention's default tiles and as the model
calls it (tuned tiles, or ``BMOJO_FLEX_OPTIONS``; window and fading band over concatenated keys, the eidetic memory as
per-chunk keys with a per-batch validity mask), the same with the two bands as one sliding window over interleaved
keys (``interleave=True``), the bands alone; the kernel alone (keys and block mask made beforehand), then with the
same key blocks under a mask that lets every score through and with every visited block full (no mask evaluated): what
the mask costs; and the call with each ``--options`` (FlexAttention kernel options such as tile sizes and warps; the
default forward tile on an H100 / H200 for bf16 at d=64 is 128 x 128 with 4 warps, where the mask's integer arithmetic
spills registers). Each row: forward (inputs requiring grad, as in training) and forward + backward, medians of
``--repeats`` runs after warm-up, and on CUDA the device time and kernel count of one forward + backward (the
benchmark's loss and its gradient included; one forward with ``--forward-only``); then CUDA profiles of one forward +
backward of ours and of FlexAttention. The last line names the fastest FlexAttention option set by forward time
(``best kernel options: ...``, empty for FlexAttention's defaults), in the form ``BMOJO_FLEX_OPTIONS`` takes.
``--forward-only``: inputs without grad, no backward (nor its compilation), no profile. On a CPU it runs the
FlexAttention rows on tiny shapes, forward only (FlexAttention has no CPU backward), to check the script.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention import flex_attention as fa

from bmojo.bench import device_column, median_ms
from bmojo.ops.attention import (
    AttnOut,
    Band,
    ChunkMemory,
    _union_keys,
    _union_mask_mod,
    flex_call,
    flex_union_attention,
    parse_kernel_options,
    parse_triton_tiles,
)

# tile sets of our kernels timed by default ("": the kernels' defaults, 64 x 64 with Triton's warps and stages)
TILE_SWEEP = ["", "block_m=64,block_n=64,num_warps=8", "block_m=128,block_n=64", "block_m=128,block_n=64,num_warps=8",
              "block_m=64,block_n=32", "block_m=128,block_n=32", "block_m=64,block_n=64,num_stages=2",
              "block_m=128,block_n=64,num_warps=8,bwd_block_m=64,bwd_block_n=64,bwd_num_warps=8"]  # fmt: skip


def run(fn: Callable[[], AttnOut], backward: bool) -> Callable[[], None]:
    """``fn``, and the backward of ``o.sum() + lse.sum()`` when ``backward``."""

    def once() -> None:
        o, lse = fn()
        if backward:
            (o.float().sum() + lse.sum()).backward()

    return once


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--options", action="append", default=[], help="kernel options, e.g. BLOCK_M=64,BLOCK_N=64")
    parser.add_argument(
        "--tiles",
        action="append",
        default=[],
        help="tiles of our kernels, e.g. block_m=128,block_n=64,num_warps=8 (default: a sweep)",
    )
    parser.add_argument("--ours", action="store_true", help="only our kernels (and the SDPA row): a tile sweep")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--forward-only", action="store_true", help="inputs without grad; no backward, no profile")
    args = parser.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = dev.type == "cuda"
    backward = cuda and not args.forward_only
    b, h, length, d, w, m, c = (8, 12, 2048, 64, 512, 64, 512) if cuda else (1, 2, 256, 16, 64, 8, 64)
    dtype = torch.bfloat16 if cuda else torch.float32
    torch.manual_seed(0)

    def tensor(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, device=dev, dtype=dtype, requires_grad=backward)

    q, k, v, kf, vf = (tensor(b, h, length, d) for _ in range(5))
    n = -(-length // c)
    memory = ChunkMemory(tensor(b, h, n, m, d), tensor(b, h, n, m, d), torch.rand(b, n, m, device=dev) < 0.9, c)
    bands = [Band(k, v, 0, w - 1), Band(kf, vf, w, 2 * w - 1)]
    keys, values = _union_keys(bands, memory)
    block_mask = fa.create_block_mask(_union_mask_mod(length, bands, memory), b, None, length, keys.shape[2],
                                      device=dev)  # fmt: skip
    print(f"{torch.cuda.get_device_name() if cuda else 'cpu'}, torch {torch.__version__}; B={b} H={h} L={length} "
          f"d={d}, window {w}, band {w}, {m} eidetic per {c}-chunk; block mask {tuple(block_mask.shape)}, "
          f"sparsity {block_mask.sparsity():.1f}%")  # fmt: skip

    # the same key blocks with a mask that lets every score through (no mask evaluated in effect), and with every
    # block full (no mask evaluated at all): what evaluating the mask costs in the partial blocks
    dense = block_mask.to_dense()
    all_full = fa.BlockMask.from_kv_blocks(
        torch.zeros_like(dense[..., 0], dtype=torch.int32), torch.zeros_like(dense, dtype=torch.int32),
        dense.sum(-1).to(torch.int32), torch.argsort(dense, dim=-1, descending=True, stable=True).to(torch.int32),
        BLOCK_SIZE=block_mask.BLOCK_SIZE, mask_mod=fa.noop_mask, seq_lengths=block_mask.seq_lengths)  # fmt: skip
    noop = fa.BlockMask.from_kv_blocks(block_mask.kv_num_blocks, block_mask.kv_indices, block_mask.full_kv_num_blocks,
                                       block_mask.full_kv_indices, BLOCK_SIZE=block_mask.BLOCK_SIZE,
                                       mask_mod=fa.noop_mask, seq_lengths=block_mask.seq_lengths)  # fmt: skip

    def with_options(text: str) -> Callable[[], AttnOut]:
        options = parse_kernel_options(text)
        return lambda: flex_union_attention(q, bands, memory, options)

    def ours(text: str) -> Callable[[], AttnOut]:
        from bmojo.ops.triton.attention import union_attention_triton

        tiles = parse_triton_tiles(text)
        return lambda: union_attention_triton(q, bands, memory, **tiles)

    def ours_label(text: str) -> str:
        return "ours (Triton), " + (text or "the kernels' defaults (64 x 64)")

    tiles = (args.tiles or TILE_SWEEP) if cuda else []
    rows: list[tuple[str, Callable[[], AttnOut]]] = [
        ("causal SDPA, whole sequence", lambda: (F.scaled_dot_product_attention(q, k, v, is_causal=True), q[..., 0])),
        *((ours_label(text), ours(text)) for text in tiles),
    ]
    rows += (
        []
        if args.ours
        else [
            ("flex_union_attention, FlexAttention's default tiles", lambda: flex_union_attention(q, bands, memory, {})),
            ("flex_union_attention (the model's call)", lambda: flex_union_attention(q, bands, memory)),
            ("the model's call, bands interleaved", lambda: flex_union_attention(q, bands, memory, interleave=True)),
            ("flex_union_attention, bands only", lambda: flex_union_attention(q, bands, None)),
            ("kernel alone (keys and block mask made beforehand)", lambda: flex_call(q, keys, values, block_mask)),
            ("kernel alone, mask_mod always true", lambda: flex_call(q, keys, values, noop)),
            ("kernel alone, every visited block full", lambda: flex_call(q, keys, values, all_full)),
        ]
        + [(f"the model's call, {text}", with_options(text)) for text in args.options]
    )
    forward_ms, both_ms = {}, {}
    for name, fn in rows:
        try:
            forward_ms[name] = median_ms(run(fn, False), dev, args.repeats)
            both_ms[name] = median_ms(run(fn, True), dev, args.repeats) if backward else float("nan")
        except Exception as error:  # a row whose kernels do not compile or launch here: the sweep goes on
            forward_ms[name] = both_ms[name] = float("inf")
            print(f"{name:60s} failed: {type(error).__name__}: {str(error)[:300]}", flush=True)
            continue
        print(f"{name:60s} forward {forward_ms[name]:9.3f} ms   forward+backward {both_ms[name]:9.3f} ms"
              f"{device_column(run(fn, backward))}", flush=True)  # fmt: skip
    timed = both_ms if backward else forward_ms
    ran = [text for text in tiles if math.isfinite(timed[ours_label(text)])]
    if ran:
        print("best tiles:", min(ran, key=lambda text: timed[ours_label(text)]))
    if not args.ours:
        candidates = {"": forward_ms["flex_union_attention, FlexAttention's default tiles"]}
        candidates.update({text: forward_ms[f"the model's call, {text}"] for text in args.options})
        candidates = {text: ms for text, ms in candidates.items() if math.isfinite(ms)}
        if candidates:
            print("best kernel options:", min(candidates, key=candidates.__getitem__))
    if backward:
        profiled = [("ours", ours(""))] + (
            [] if args.ours else [("FlexAttention", lambda: flex_union_attention(q, bands, memory))]
        )
        for name, fn in profiled:
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                run(fn, True)()
                torch.cuda.synchronize()
            print(f"{name}:")
            print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=8, max_name_column_width=60))


if __name__ == "__main__":
    main()
