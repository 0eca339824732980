#!/usr/bin/env bash
# The main job on a CPU, in minutes: a real local corpus -> tokenizer -> pretrain a small model -> a reply from it.
#   bash runs/quickstart.sh                     (after `pip install -e .`)
#   DEPTH=6 STEPS=1000 bash runs/quickstart.sh  for a bigger, slower, better model
# Steps already done (shards or tokenizer present in $JAXCHAT_BASE_DIR) are skipped, so it can be re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
BASE="${JAXCHAT_BASE_DIR:-$HOME/.cache/jaxchat}"
export JAXCHAT_BASE_DIR="$BASE"
DEPTH="${DEPTH:-4}"
STEPS="${STEPS:-300}"
VOCAB="${VOCAB:-8192}"
CORPUS_MB="${CORPUS_MB:-20}"

if ! ls "$BASE"/base_data/*.parquet >/dev/null 2>&1; then
  echo "== corpus: ~${CORPUS_MB} MB of English prose from Debian packages"
  python -m jaxchat.dataset --corpus local --max-mb "$CORPUS_MB"
fi
if [ ! -f "$BASE/tokenizer/tokenizer.pkl" ]; then
  echo "== tokenizer: BPE with vocab $VOCAB"
  python -m train.tokenizer --vocab-size "$VOCAB"
fi
echo "== pretrain: depth $DEPTH, $STEPS steps on the CPU (TensorBoard run 'quickstart')"
python -m train.pretrain --depth="$DEPTH" --head-dim=64 --window-pattern=L --max-seq-len=256 \
  --device-batch-size=16 --total-batch-size=4096 --num-iterations="$STEPS" --eval-every=100 --eval-tokens=65536 \
  --core-metric-every=-1 --sample-every=-1 --save-every=-1 --model-tag="quickstart" --run=quickstart --overwrite
echo "== a reply from the model"
python -m serve.cli -i base -g quickstart -t 0 -m 48 -p "The kernel provides"
echo
echo "Next: tensorboard --logdir $BASE/runs --host 127.0.0.1   |   python -m serve.cli -i base -g quickstart"
