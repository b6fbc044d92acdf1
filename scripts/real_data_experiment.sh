#!/usr/bin/env bash
# The README's real-data experiment: does a foundation pre-trained on real chest X-rays help LoRA adapt to
# MURA humerus (real, 64 px) with equal budgets? Compared with LoRA from a random-init foundation of the
# same architecture, and with training from scratch. CPU, about 10 minutes on 2 cores.
#   bash scripts/real_data_experiment.sh [OUT] [DATA]
set -euo pipefail
OUT=${1:-runs/real}
DATA=${2:-../shared/data}
X=${XRAYFM:-.venv/bin/xrayfm}
MODEL=(--model vit_tiny_patch16_224 --model-kwargs '{"patch_size": 8, "depth": 4, "embed_dim": 192, "num_heads": 3, "global_pool": "avg"}' --size 64)
COMMON=(--no-progress-bar --json --seed 0)

# 1. Foundation (skipped when OUT/foundation/best exists, so an interrupted run can go on): PneumoniaMNIST (real paediatric chest X-rays, normal vs pneumonia), 2,428 training images.
[ -f "$OUT/foundation/best/meta.json" ] || $X pretrain --kind folder --root "$DATA/pneumoniamnist/png" \
  --split train --val-split val "${MODEL[@]}" --epochs 10 --batch-size 32 --lr 5e-4 --out "$OUT/foundation" "${COMMON[@]}" > "$OUT.foundation.json"
# 2. The same architecture, untrained (one step at lr 1e-12, as the config refuses lr 0): "random init".
[ -f "$OUT/random/best/meta.json" ] || $X pretrain --kind folder --root "$DATA/pneumoniamnist/png" \
  --split train --val-split val "${MODEL[@]}" --max-steps 1 --lr 1e-12 --out "$OUT/random" "${COMMON[@]}" > "$OUT.random.json"
# 3. Adapt to MURA humerus (1,133 training images, 558 studies), evaluate on its valid split (125 studies)
#    with the weights at the end of the budget (--report-on last: no checkpoint is picked on that split).
for run in "lora foundation" "lora random" "scratch foundation"; do
  set -- $run
  $X adapt --foundation "$OUT/$2/best" --method "$1" --kind mura --root "$DATA/mura-humerus-64/MURA-v1.1" \
    --split train --val-split valid --epochs 10 --batch-size 32 --lr 2e-3 --hflip --report-on last \
    --out "$OUT/adapt-$1-$2" "${COMMON[@]}" > "$OUT.adapt-$1-$2.json"
done
echo "reports: $OUT/adapt-*/report/report.md"
