#!/usr/bin/env bash
# How tests/golden/mdm and ar were trained (once; the weights are committed so the recorded answers
# do not hang on training being bit-identical across machines). Run from the repository root.
set -euo pipefail
work=$(mktemp -d)
python3 -c "
import sys; sys.path.insert(0, 'tests'); from conftest import POEM_LINES
open('$work/poems.txt', 'w', encoding='utf-8').write('\n%\n'.join(POEM_LINES * 6) + '\n')"
for objective in mdm ar; do
  steps=$([ "$objective" = mdm ] && echo 800 || echo 150)
  .venv/bin/remask pretrain --data "$work/poems.txt" --objective "$objective" --preset tiny --model.d-model 32 \
    --model.n-layers 2 --model.n-heads 2 --model.mlp-hidden-size 64 --model.max-sequence-length 96 --seq-len 32 \
    --batch-size 8 --max-steps "$steps" --lr 0.01 --optim.warmup-steps 10 --data.val-fraction 0.1 \
    --out "$work/$objective" --seed 0
  rm -rf "tests/golden/$objective" && cp -r "$work/$objective/final" "tests/golden/$objective"
done
