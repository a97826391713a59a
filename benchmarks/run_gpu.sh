#!/usr/bin/env bash
# GPU checks and benchmarks as run for benchmarks/RESULTS.md (a CUDA machine with torch and triton; the project is
# used from the checkout). Optional wheels in .whl/ (fla-core for the SSD kernels) are installed first; the GPU
# machine reaches no package index, so fetch them beforehand where one is reachable:
#   pip download --no-deps -d .whl fla-core==0.6.0 transformers==5.24.0
#   bash benchmarks/run_gpu.sh OUT tests   # tests/test_cuda.py (TESTS_K="expr": only the tests pytest -k selects)
#   bash benchmarks/run_gpu.sh OUT probe   # 130m bf16 training steps, B'MOJO then its Transformer: step times, graphs
#                                          # dynamo compiled, a profile
#   bash benchmarks/run_gpu.sh OUT probe-compiled  # the same with the model through torch.compile
#   bash benchmarks/run_gpu.sh OUT train   # 130m training and prefill at 2K (batch 8) and 8K (batch 2), bf16
#   bash benchmarks/run_gpu.sh OUT train-compiled  # the 2K training point with both models through torch.compile
#   bash benchmarks/run_gpu.sh OUT train-compiled-flex  # the same with the read-out through FlexAttention
#   bash benchmarks/run_gpu.sh OUT train-compiled-8k    # the same at 8K (batch 2), where the window saves attention
#   bash benchmarks/run_gpu.sh OUT train-compiled-logits  # train-compiled with the loss through the batch's logits
#                                                         # (loss_chunk_size=0, as before the chunked loss)
#   bash benchmarks/run_gpu.sh OUT decode  # decode tokens/s and cache memory at 4K and 32K
#   bash benchmarks/run_gpu.sh OUT decode-compiled  # decode at 32K with both models through torch.compile, batch 1 and 8
#   bash benchmarks/run_gpu.sh OUT decode-graphs    # the same with --compile-mode reduce-overhead (CUDA graphs)
#   bash benchmarks/run_gpu.sh OUT decode-combo     # the same with inductor's combo kernels (independent kernels,
#                                                   # such as a step's writes to several state buffers, as one)
#   bash benchmarks/run_gpu.sh OUT decode-profile   # ms, host ms, device-busy ms and kernels per token at 32K, CUDA
#                                                   # graphs (batch 1 with where the host's time goes and B'MOJO
#                                                   # also without our step kernels; batch 8; with combo kernels;
#                                                   # with products as reductions)
#   bash benchmarks/run_gpu.sh OUT generate         # Hugging Face generate at 32K, batch 1: eager against a static
#                                                   # cache with its steps compiled as CUDA graphs, both models
#   bash benchmarks/run_gpu.sh OUT ssd     # the Mamba-2 SSD's paths (PyTorch eager / compiled, our Triton kernels at
#                                          # their own and other chunk sizes and head dims per program, fla;
#                                          # then at state 128)
#   bash benchmarks/run_gpu.sh OUT flex    # the read-out's kernels (ours, FlexAttention) against FlashAttention, tiles
#   bash benchmarks/run_gpu.sh OUT tiles   # our read-out kernels' tile sweep (forward + backward); exports the fastest
#                                          # as BMOJO_TRITON_TILES to the stages after it (and in OUT/tiles_best.txt)
#   bash benchmarks/run_gpu.sh OUT flex-warm     # compile the flex-sweep rows, one process each, in parallel
#   bash benchmarks/run_gpu.sh OUT flex-sweep    # forward times of the sweep's kernel options; exports the fastest
#                                                # as BMOJO_FLEX_OPTIONS to the stages after it (and in OUT/flex_best.txt)
#   bash benchmarks/run_gpu.sh OUT warm-STAGE  # STAGE run to fill the compile caches for a later STAGE, its output
#                                              # under OUT/warm (training and ssd: one step or repeat, no memory
#                                              # probe; decode stages in full: their graphs' shapes depend on the runs)
# STAGE:SECONDS runs a stage under a time limit (a process of its own, killed with its children when the limit
# passes; the next stage runs either way), e.g. `bash benchmarks/run_gpu.sh OUT tests:180 tiles:90 ssd:60`.
# A+B,C runs lanes side by side (here A, and B then C), each lane's output in OUT/lane-<its stages>.log: compiles
# warming caches beside the tests, e.g. `tests+warm-train-compiled,warm-decode-graphs:200 train-compiled:60` (the
# limit covers the whole group; what a stage exports, such as tiles' BMOJO_TRITON_TILES, stays in its lane).
# TESTS_WORKERS=N runs the tests in N processes (pytest-xdist, which the GPU machine's image has).
set -uo pipefail
sweep=(fwd_num_warps=8 BLOCK_M=128,BLOCK_N=64 BLOCK_M=128,BLOCK_N=64,fwd_num_warps=8 BLOCK_M=64,BLOCK_N=64
       BLOCK_M=128,BLOCK_N=32 fwd_num_warps=8,fwd_num_stages=2)
out=${1:?output directory}
mkdir -p "$out"
if compgen -G ".whl/*.whl" >/dev/null; then
  [ -d /tmp/site ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
[ -n "${RUN_GPU_CHILD:-}" ] || python3 -c "import torch, triton, transformers; print('torch', torch.__version__,
  'triton', triton.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())"
export RUN_GPU_CHILD=1
bench() { python3 -m bmojo.cli bench --device cuda --dtype bfloat16 --size 130m --presets bmojo \
  --set window_size=512 --set chunk_size=512 "$@"; }
for stage in "${@:2}"; do
  if [[ $stage == *:* ]]; then
    timeout --kill-after=10 "${stage#*:}" bash "$0" "$out" "${stage%%:*}" || echo "stage $stage: exit status $?"
    case ${stage%%:*} in  # what the stage exported, for the stages after it
      tiles) [ -s "$out/tiles_best.txt" ] && export BMOJO_TRITON_TILES=$(cat "$out/tiles_best.txt") ;;
      flex-sweep) [ -s "$out/flex_best.txt" ] && export BMOJO_FLEX_OPTIONS=$(cat "$out/flex_best.txt") ;;
    esac
    continue
  fi
  if [[ $stage == *[+,]* ]]; then
    IFS=+ read -ra lanes <<<"$stage"
    pids=()
    for lane in "${lanes[@]}"; do
      IFS=, read -ra steps <<<"$lane"
      bash "$0" "$out" "${steps[@]}" >"$out/lane-${lane//,/_}.log" 2>&1 &
      pids+=($!)
    done
    for i in "${!pids[@]}"; do wait "${pids[i]}" || echo "lane ${lanes[i]}: exit status $?"; done
    continue
  fi
  case $stage in
    warm-*) WARM=1 bash "$0" "$out/warm" "${stage#warm-}" ;;
    tests) python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py ${TESTS_WORKERS:+-n "$TESTS_WORKERS"} \
             ${TESTS_K:+-k "$TESTS_K"} 2>&1 | tee "$out/test_cuda.log" ;;
    probe|probe-compiled) python3 - "$stage" <<'PY' 2>&1 | tee "$out/$stage.log"
import sys, time, torch
from torch._dynamo.utils import counters
from torch.profiler import ProfilerActivity, profile
from bmojo import BMojoConfig, BMojoForCausalLM
from bmojo.bench import matched_transformer
overrides = {"window_size": 512, "chunk_size": 512}
config = BMojoConfig.from_preset("bmojo", "130m", **overrides)
for name, cfg in (("bmojo", config), ("transformer", matched_transformer(config, "130m", overrides))):
    torch._dynamo.reset()
    counters.clear()
    model = BMojoForCausalLM(cfg).cuda()
    forward = torch.compile(model) if sys.argv[1] == "probe-compiled" else model
    ids = torch.randint(0, cfg.vocab_size, (8, 2048), device="cuda")
    for step in range(4):
        t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = forward(ids, labels=ids).loss
        loss.backward()
        torch.cuda.synchronize()
        print(f"{name} step {step}: {time.perf_counter() - t0:.3f} s, loss {loss.item():.3f}")
    print("dynamo:", {k: dict(v) for k, v in counters.items() if k in ("stats", "recompiles", "graph_break")})
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = forward(ids, labels=ids).loss
        loss.backward()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=80, max_name_column_width=90))
    del model, forward, loss
    torch.cuda.empty_cache()
PY
    ;;
    train)
      bench --lengths 2048 --modes train,prefill --batch 8 --repeats 5 --warmup 2 --out "$out/train_2k"
      bench --lengths 8192 --modes train,prefill --batch 2 --repeats 5 --warmup 2 --out "$out/train_8k" ;;
    train-compiled|train-compiled-flex|train-compiled-8k|train-compiled-logits)
      impl=$([ "$stage" = train-compiled-flex ] && echo flex || echo auto)
      shape=$([ "$stage" = train-compiled-8k ] && echo "--lengths 8192 --batch 2" || echo "--lengths 2048 --batch 8")
      logits=$([ "$stage" = train-compiled-logits ] && echo "--set loss_chunk_size=0")
      bench $shape --modes train --repeats 5 --warmup 2 --compile --set attention_impl=$impl $logits \
        ${WARM:+--repeats 1 --warmup 0 --no-memory} --out "$out/${stage//-/_}" ;;
    decode) bench --lengths 4096,32768 --modes decode --batch 1 --decode-steps 32 --repeats 3 --out "$out/decode" ;;
    decode-compiled|decode-graphs|decode-combo)
      mode=$([ "$stage" = decode-compiled ] && echo default || echo reduce-overhead)
      combo=$([ "$stage" = decode-combo ] && echo "--compile-option combo_kernels=true")
      for b in 1 8; do
        bench --lengths 32768 --modes decode --batch $b --decode-steps 32 --repeats 3 --compile --compile-mode $mode \
          $combo --no-memory --out "$out/${stage}_b$b"
      done ;;
    decode-profile) for args in "--host-profile 30 --reference-steps" "--batch 8" "--option combo_kernels=true" \
                                "--products reduction"; do
                      python3 benchmarks/decode_profile.py $args
                    done 2>&1 | tee "$out/decode_profile.log" ;;
    generate) python3 benchmarks/generate_speed.py --size 130m --length 32768 --set window_size=512 \
                --set chunk_size=512 --repeats 2 2>&1 | tee "$out/generate.log" ;;
    ssd) { python3 benchmarks/bench_ssd.py --chunks 64 --bwd-block-p 16,32 ${WARM:+--repeats 1}
           python3 benchmarks/bench_ssd.py --state 128 --bwd-block-p 32,64 ${WARM:+--repeats 1}; } 2>&1 | tee "$out/ssd.log" ;;
    flex) python3 benchmarks/bench_flex.py --options BLOCK_M=64,BLOCK_N=64 --options BLOCK_M=128,BLOCK_N=64 \
            --options BLOCK_M=128,BLOCK_N=128,num_warps=8 2>&1 | tee "$out/flex.log" ;;  # ~45 s of compiling a row
    tiles)
      python3 benchmarks/bench_flex.py --ours 2>&1 | tee "$out/tiles.log"
      sed -n 's/^best tiles: *//p' "$out/tiles.log" >"$out/tiles_best.txt"
      export BMOJO_TRITON_TILES=$(cat "$out/tiles_best.txt")
      echo "BMOJO_TRITON_TILES=$BMOJO_TRITON_TILES" ;;
    flex-warm)
      for i in "${!sweep[@]}"; do python3 benchmarks/bench_flex.py --forward-only --repeats 1 \
        --options "${sweep[i]}" >"$out/flex_warm_$i.log" 2>&1 & done
      wait ;;
    flex-sweep)
      python3 benchmarks/bench_flex.py --forward-only "${sweep[@]/#/--options=}" 2>&1 | tee "$out/flex_sweep.log"
      sed -n 's/^best kernel options: *//p' "$out/flex_sweep.log" >"$out/flex_best.txt"
      export BMOJO_FLEX_OPTIONS=$(cat "$out/flex_best.txt")
      echo "BMOJO_FLEX_OPTIONS=$BMOJO_FLEX_OPTIONS" ;;
    *) echo "unknown stage $stage"; exit 2 ;;
  esac
done
