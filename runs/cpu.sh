#!/usr/bin/env bash
# The whole pipeline on a CPU, well under an hour (nanochat's runcpu.sh): corpus -> tokenizer -> pretrain -> base
# eval -> SFT on what is available offline -> chat eval -> report card.
#   bash runs/cpu.sh               # the default size: depth 4, 800 steps; ~30 minutes on 2 cores (pretraining ~16)
#   SIZE=tiny bash runs/cpu.sh     # depth 2, a few steps of each stage: checks the plumbing in a few minutes (CI)
# Offline data: the local corpus, jaxchat's identity conversations, and SpellingBee/SimpleSpelling from the system
# word list (Debian: apt-get install wamerican). With the CORE bundle in $JAXCHAT_BASE_DIR/eval_bundle, base eval adds
# a CORE subset; with ARC/MMLU/GSM8K/SmolTalk files in $JAXCHAT_BASE_DIR/datasets/ you can add them to --mixture.
set -euo pipefail
cd "$(dirname "$0")/.."
BASE="${JAXCHAT_BASE_DIR:-$HOME/.cache/jaxchat}"
export JAXCHAT_BASE_DIR="$BASE"
SIZE="${SIZE:-default}"
RUN="${RUN:-cpu}"
if [ "$SIZE" = tiny ]; then
  DEPTH=2; STEPS=30; SEQ=128; DBS=8; TBS=1024; EVAL_TOKENS=8192; SFT_STEPS=10; SPELL=200; CHAT_X=4; VOCAB=2048
else
  DEPTH=4; STEPS=800; SEQ=256; DBS=16; TBS=4096; EVAL_TOKENS=131072; SFT_STEPS=200; SPELL=20000; CHAT_X=50; VOCAB=8192
fi

python -m jaxchat.report reset
if ! ls "$BASE"/base_data/*.parquet >/dev/null 2>&1; then
  python -m jaxchat.dataset --corpus local --max-mb 20
fi
[ -f "$BASE/tokenizer/tokenizer.pkl" ] || python -m train.tokenizer --vocab-size "$VOCAB"
python -m evals.tokenizer

python -m train.pretrain --depth="$DEPTH" --head-dim=64 --window-pattern=L --max-seq-len="$SEQ" \
  --device-batch-size="$DBS" --total-batch-size="$TBS" --num-iterations="$STEPS" --eval-every=$((STEPS / 4)) \
  --eval-tokens="$EVAL_TOKENS" --core-metric-every=-1 --sample-every=$((STEPS / 2)) --model-tag=cpu --run="$RUN" --overwrite

EVALS=bpb,sample
[ -d "$BASE/eval_bundle" ] && EVALS=core,bpb,sample
python -m evals.base_eval --model-tag=cpu --eval="$EVALS" --device-batch-size=4 --split-tokens="$EVAL_TOKENS" \
  --max-per-task=16

MIXTURE=identity
if [ -f /usr/share/dict/words ] || [ -n "${JAXCHAT_WORD_LIST:-}" ]; then MIXTURE=identity,simplespelling,spellingbee; fi
python -m train.sft --model-tag=cpu --mixture="$MIXTURE" --num-iterations="$SFT_STEPS" \
  --simple-spelling-size="$SPELL" --spelling-bee-size="$SPELL" --eval-every=$((SFT_STEPS / 2)) \
  --eval-tokens="$EVAL_TOKENS" --chatcore-every=-1 --run="$RUN" --overwrite

if [[ "$MIXTURE" == *spellingbee* ]]; then
  python -m evals.chat_eval -i sft -g cpu -a SpellingBee -x "$CHAT_X" -m 64
fi
python -m jaxchat.report generate
echo
echo "Report: $BASE/report/report.md (copied to ./report.md)"
echo "TensorBoard: tensorboard --logdir $BASE/runs --host 127.0.0.1 --port 6006   (then open http://127.0.0.1:6006)"
echo "Chat: python -m serve.cli -g cpu    |    web: python -m serve.app -g cpu   (then open http://127.0.0.1:8000)"
