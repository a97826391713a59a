#!/usr/bin/env bash
# Priming experiment of benchmarks/RESULTS.md ("Priming a Transformer into B'MOJO"), from the repository root.
# One CPU thread throughout (the machine is shared); about 25 minutes in all on a loaded machine.
set -euo pipefail
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
DATA=../shared/data/shakespeare/eight_plays.txt
MIXER="--kind bmojo --eidetic-size 8 --chunk-size 16 --window-size 16 --state-size 16 --mamba2-head-dim 32
       --ssm-chunk-size 64 --attention-block-size 64"

# 1. the "pretrained" Transformer (about 7 minutes)
bmojo train --config examples/prime/transformer.yaml
# 2. prime: every second attention layer (1, 3), and all four layers; and layers 1, 3 with a 64-token window
bmojo prime runs/prime/transformer/final runs/prime/primed-w16 $MIXER
bmojo prime runs/prime/transformer/final runs/prime/primed-w64 $MIXER --window-size 64 --eidetic-size 16 --chunk-size 64
bmojo prime runs/prime/transformer/final runs/prime/primed-all-w16 --layers 0,1,2,3 $MIXER
# 3. recovery by distillation from the original (2-3 CPU minutes, about 4 wall minutes each on the shared machine);
#    the control fine-tunes the original with the same recipe
bmojo train --config examples/prime/recover.yaml
bmojo train --config examples/prime/recover.yaml model=runs/prime/primed-all-w16 init_from=runs/prime/primed-all-w16 \
    out_dir=runs/prime/recovered-all-w16
bmojo train --config examples/prime/recover.yaml model=runs/prime/transformer/final \
    init_from=runs/prime/transformer/final out_dir=runs/prime/control-original
# 4. validation perplexity (the training run's 5% split), context 256
for m in transformer/final primed-w64 primed-w16 primed-all-w16 recovered-w16/final recovered-all-w16/final \
         control-original/final; do
    bmojo eval runs/prime/$m --data $DATA --split val --context-length 256
done
# 5. decode memory: cache bytes after a prefill of N tokens and one decode step
python examples/prime/decode_memory.py 1024,16384 runs/prime/transformer/final runs/prime/primed-w16 \
    runs/prime/primed-all-w16
