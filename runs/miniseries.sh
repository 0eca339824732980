#!/usr/bin/env bash
# A sweep of depths at compute-optimal horizons (nanochat's miniseries): pretrain and evaluate each depth.
#   DEPTHS="10 12 14 16 18 20" bash runs/miniseries.sh      DRY_RUN=1 bash runs/miniseries.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export JAXCHAT_BASE_DIR="${JAXCHAT_BASE_DIR:-$HOME/.cache/jaxchat}"
DEPTHS="${DEPTHS:-10 12 14 16 18 20}"
DRY_RUN="${DRY_RUN:-0}"
run() { echo "+ $*"; if [ "$DRY_RUN" != 1 ]; then "$@"; fi; }
for d in $DEPTHS; do
  echo "# depth $d:"
  python -m train.pretrain --depth="$d" --vocab-size=32768 --dry-run
  run python -m train.pretrain --depth="$d" --model-tag="d$d" --run="${RUN:-dummy}_d$d"
  run python -m evals.base_eval --model-tag="d$d" --eval core,bpb
done
