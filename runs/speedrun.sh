#!/usr/bin/env bash
# The GPT-2-grade run (nanochat's speedrun) on one 8xH100 host, or on several hosts.
#
#   bash runs/speedrun.sh                 # one host, all 8 GPUs (JAX uses every local device; no launcher needed)
#   DRY_RUN=1 bash runs/speedrun.sh       # print every command, with the numbers the depth dial derives, run nothing
#   RUN=myrun bash runs/speedrun.sh       # name the TensorBoard run (default "dummy": no TensorBoard events)
#   RECIPE=bigram bash runs/speedrun.sh   # nanochat 412e9a1's d22 recipe: fp8, Muon+ with row MuonEq, hashed bigram
#                                         # embeddings (factor 5), 11600 steps of 2**19 tokens
#
# Several hosts: run this same script on every host at once, with a shared $JAXCHAT_BASE_DIR (NFS or similar) or
# with the data downloaded on each, and these variables set per host (jax.distributed reads them):
#   JAX_COORDINATOR_ADDRESS=<host0 ip>:1234   JAX_NUM_PROCESSES=<number of hosts>   JAX_PROCESS_ID=<0..N-1>
# One jax.sharding.Mesh then spans all GPUs of all hosts; each host reads its own share of the shards.
# Under SLURM or Open MPI (srun / mpirun with one task per host) JAX finds these by itself.
set -euo pipefail
cd "$(dirname "$0")/.."
export JAXCHAT_BASE_DIR="${JAXCHAT_BASE_DIR:-$HOME/.cache/jaxchat}"
RUN="${RUN:-dummy}"
DEPTH="${DEPTH:-24}"
DRY_RUN="${DRY_RUN:-0}"
RECIPE="${RECIPE:-head}"
PROCESS_ID="${JAX_PROCESS_ID:-0}"
run() { echo "+ $*"; if [ "$DRY_RUN" != 1 ]; then "$@"; fi; }
host0() { if [ "$PROCESS_ID" = 0 ]; then run "$@"; else echo "(host $PROCESS_ID skips: $*)"; fi; }

run pip install -e '.[gpu]'
host0 python -m jaxchat.report reset
# 8 shards (~800 MB of text) now for the tokenizer; the rest (~170 shards) in the background while it trains.
run python -m jaxchat.dataset -n 8
if [ "$DRY_RUN" != 1 ]; then python -m jaxchat.dataset -n 170 & DOWNLOAD_PID=$!; else echo "+ python -m jaxchat.dataset -n 170 &"; fi
host0 python -m train.tokenizer
host0 python -m evals.tokenizer
if [ "$DRY_RUN" != 1 ]; then wait "$DOWNLOAD_PID"; fi

if [ "$RECIPE" = bigram ]; then  # the flags of nanochat 412e9a1's runs/speedrun.sh
  PRETRAIN_FLAGS=(--run="$RUN" --fp8 --depth=22 --num-iterations=11600 --target-param-data-ratio=11
    --total-batch-size=524288 --scalar-lr=0.3 --bigram-embed-factor=5 --muon-plus --muon-eq=row
    --core-metric-every=5800 --sample-every=-1)
elif [ "$RECIPE" = head ]; then
  PRETRAIN_FLAGS=(--depth="$DEPTH" --target-param-data-ratio=8 --device-batch-size=16 --run="$RUN")
else
  echo "RECIPE=$RECIPE: expected head or bigram" >&2; exit 2
fi
echo "# the plan the depth dial derives (model, batch, horizon, learning rates):"
python -m train.pretrain "${PRETRAIN_FLAGS[@]}" --vocab-size=32768 --dry-run
run python -m train.pretrain "${PRETRAIN_FLAGS[@]}"
run python -m evals.base_eval --device-batch-size=16
run python -m train.sft --device-batch-size=16 --run="$RUN"
run python -m evals.chat_eval -i sft
host0 python -m jaxchat.report generate
