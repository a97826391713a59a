#!/usr/bin/env bash
# The language-modelling experiment of benchmarks/RESULTS.md ("Language modelling on CPU"), from the
# repository root: six trainings one after another on one thread, then each final model's perplexity on
# the validation split at T, 2T, 4T and 8T (T = 256), then the alternating throughput measurement and
# the combined table and figure. The machine load (uptime) before and after each step goes to runs/lm/load.log.
set -euo pipefail
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
MODELS=(transformer swa mamba jamba bmojo-f bmojo)
DATA=../shared/data/shakespeare/eight_plays.txt
mkdir -p runs/lm
load() { echo "$(date -u +%FT%TZ) $1 $(uptime | sed 's/.*load average: //')" >> runs/lm/load.log; }

python benchmarks/lm_experiment.py params
for m in "${MODELS[@]}"; do
  load "train-$m-start"
  /usr/bin/time -f "%e s wall" -o "runs/lm/$m.time" bmojo train --config "examples/lm/$m.yaml"
  load "train-$m-end"
done
for m in "${MODELS[@]}"; do
  load "eval-$m-start"
  bmojo eval "runs/lm/$m/final" --data "$DATA" --split val --max-tokens 16384 --batch-size 1 \
    --lengths 256,512,1024,2048 --train-length 256 --out "runs/lm/$m/eval"
  load "eval-$m-end"
done
load "throughput-start"
python benchmarks/lm_experiment.py throughput --rounds 3 --steps 2 --out runs/lm/throughput.json
load "throughput-end"
python benchmarks/lm_experiment.py report --runs runs/lm --figure benchmarks/figures/lm_ppl_vs_length.png
