#!/usr/bin/env bash
# The evidence study as single-threaded tracks: the cheapest verdict-bearing stages first
# (short lengths, the toy search, the fine-tune), then the long ones. Every stage resumes from
# the cached runs, so rerunning this script continues where it stopped.
#   nohup bash benchmarks/evidence_queue.sh >> benchmarks/results/evidence/queue.log 2>&1 &
# On a machine with a second free core, a second track takes the stages the first one leaves
# (no stage is in both, so the two never run the same sweep):
#   nohup bash benchmarks/evidence_queue.sh 2 >> benchmarks/results/evidence/queue2.log 2>&1 &
set -u
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1
py=${PYTHON:-python}
track=${1:-1}
run() { echo "=== $(date -u +%H:%M:%S) evidence.py $*"; "$py" benchmarks/evidence.py "$@" --threads 1; }
case "$track" in
  1)
    run horizon-gpt --max-steps 300
    run toy-search
    run finetune-llama
    run horizon-gpt --max-steps 1000
    run size-gpt --max-steps 300
    run horizon-bert --max-steps 1000
    run horizon-gpt
    run horizon-bert
    ;;
  2)
    run large-bert
    run size-gpt
    ;;
  all)  # one track doing everything, in the order above
    "$0" 1
    "$0" 2
    ;;
  *)
    echo "usage: evidence_queue.sh [1|2|all]" >&2
    exit 2
    ;;
esac
echo "=== $(date -u +%H:%M:%S) track $track finished"
