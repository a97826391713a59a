#!/usr/bin/env bash
# The equal-wall-clock variant of examples/lm/run.sh (benchmarks/RESULTS.md, "Language modelling on CPU"):
# every model trains for the time B'MOJO needs for 200 steps, i.e. 200 * (its tokens/s) / (B'MOJO's tokens/s)
# steps, with the tokens/s that run.sh measured with the models taking turns in one process
# (runs/lm/throughput.json). Run examples/lm/run.sh first. From the repository root.
set -euo pipefail
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
MODELS=(transformer swa mamba jamba bmojo-f bmojo)
DATA=../shared/data/shakespeare/eight_plays.txt
mkdir -p runs/lm_time
cp runs/lm/throughput.json runs/lm_time/throughput.json
for m in "${MODELS[@]}"; do
  steps=$(python -c "import json; t = json.load(open('runs/lm/throughput.json'))['tokens_per_s']; print(round(200 * t['$m'] / t['bmojo']))")
  echo "$m: $steps steps"
  /usr/bin/time -f "%e s wall" -o "runs/lm_time/$m.time" \
    bmojo train --config "examples/lm/$m.yaml" steps="$steps" eval_every="$steps" out_dir="runs/lm_time/$m"
  bmojo eval "runs/lm_time/$m/final" --data "$DATA" --split val --max-tokens 16384 --batch-size 1 \
    --lengths 256,512,1024,2048 --train-length 256 --out "runs/lm_time/$m/eval"
done
python benchmarks/lm_experiment.py report --runs runs/lm_time --figure benchmarks/figures/lm_ppl_vs_length_equal_time.png
