#!/usr/bin/env bash
# The language-modelling experiment of benchmarks/RESULTS.md ("Language modelling on CPU"), from the
# repository root: six trainings one after another on one thread, then each final model's perplexity on
# the validation split at T, 2T, 4T and 8T (T = 256), then the alternating throughput measurement and
# the combined table and figure. The machine load (uptime) before and after each step goes to $RUNS/load.log.
# SEED=1 ./examples/lm/run.sh repeats it with another initialisation and batch order (same data split) into
# runs/lm_seed1, figures there, without the throughput measurement.
set -euo pipefail
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
MODELS=(transformer swa mamba jamba bmojo-f bmojo)
DATA=../shared/data/shakespeare/eight_plays.txt
SEED=${SEED:-0}
RUNS=runs/lm FIGURE=benchmarks/figures/lm_ppl_vs_length.png
if [ "$SEED" != 0 ]; then RUNS=runs/lm_seed$SEED FIGURE=runs/lm_seed$SEED/lm_ppl_vs_length.png; fi
mkdir -p "$RUNS"
load() { echo "$(date -u +%FT%TZ) $1 $(uptime | sed 's/.*load average: //')" >> "$RUNS/load.log"; }

python benchmarks/lm_experiment.py params
for m in "${MODELS[@]}"; do
  load "train-$m-start"
  /usr/bin/time -f "%e s wall" -o "$RUNS/$m.time" bmojo train --config "examples/lm/$m.yaml" "seed=$SEED" \
    "out_dir=$RUNS/$m"
  load "train-$m-end"
done
for m in "${MODELS[@]}"; do
  load "eval-$m-start"
  bmojo eval "$RUNS/$m/final" --data "$DATA" --split val --max-tokens 16384 --batch-size 1 \
    --lengths 256,512,1024,2048 --train-length 256 --out "$RUNS/$m/eval"
  load "eval-$m-end"
done
if [ "$SEED" = 0 ]; then
  load "throughput-start"
  python benchmarks/lm_experiment.py throughput --rounds 3 --steps 2 --out "$RUNS/throughput.json"
  load "throughput-end"
fi
python benchmarks/lm_experiment.py report --runs "$RUNS" --figure "$FIGURE"
