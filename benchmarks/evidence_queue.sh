#!/usr/bin/env bash
# The evidence study as one single-threaded track: the cheapest verdict-bearing stages first
# (short lengths, the toy search, the fine-tune), then the long ones. Every stage resumes from
# the cached runs, so rerunning this script continues where it stopped:
#   nohup bash benchmarks/evidence_queue.sh >> benchmarks/results/evidence/queue.log 2>&1 &
set -u
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1
py=${PYTHON:-python}
run() { echo "=== $(date -u +%H:%M:%S) evidence.py $*"; "$py" benchmarks/evidence.py "$@" --threads 1; }
run horizon-gpt --max-steps 300
run toy-search
run finetune-llama
run horizon-gpt --max-steps 1000
run size-gpt --max-steps 300
run horizon-bert --max-steps 1000
run horizon-gpt
run large-bert
run size-gpt
run horizon-bert
echo "=== $(date -u +%H:%M:%S) queue finished"
