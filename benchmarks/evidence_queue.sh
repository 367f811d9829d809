#!/usr/bin/env bash
# The evidence study as single-threaded tracks: the cheapest verdict-bearing stages first
# (short lengths, the toy search, the fine-tune), then the long ones, with came-bc ("where
# budget allows") at the longest lengths last. Every stage resumes from
# the cached runs, so rerunning this script continues where it stopped.
#   nohup bash benchmarks/evidence_queue.sh >> benchmarks/results/evidence/queue.log 2>&1 &
# On a machine with a second free core, a second track works through the same stages in
# another order (the large batch and the larger model first):
#   nohup bash benchmarks/evidence_queue.sh 2 >> benchmarks/results/evidence/queue2.log 2>&1 &
# The tracks share the work sweep by sweep: each sweep (setting, optimizer) is claimed by the
# track running it, and the other track skips it (evidence.py exits 75). Stages that skipped
# something come round again after the rest, so whichever track is free finishes what is left.
set -u
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1
py=${PYTHON:-python}
track=${1:-1}
wait_s=${EVIDENCE_QUEUE_WAIT:-300}  # nothing left but sweeps the other track holds: look again
run() { echo "=== $(date -u +%H:%M:%S) evidence.py $*"; "$py" benchmarks/evidence.py "$@" --threads 1; }
case "$track" in
  1|all)
    stages=(
      "horizon-gpt --max-steps 300"
      "toy-search"
      "finetune-llama"
      "horizon-gpt --max-steps 1000"
      "size-gpt --max-steps 300"
      "horizon-bert --max-steps 1000"
      "horizon-gpt --without came-bc"
      "horizon-bert --without came-bc"
      "size-gpt"
      "large-bert"
      "horizon-gpt"
      "horizon-bert"
    )
    ;;
  2)
    stages=(
      "large-bert"
      "size-gpt"
      "horizon-bert --without came-bc"
      "horizon-gpt --without came-bc"
      "horizon-bert"
      "horizon-gpt"
      "finetune-llama"
    )
    ;;
  *)
    echo "usage: evidence_queue.sh [1|2|all]" >&2
    exit 2
    ;;
esac
while ((${#stages[@]})); do
  again=()
  for stage in "${stages[@]}"; do
    # shellcheck disable=SC2086  # a stage is an experiment and its flags
    run $stage
    rc=$?
    if ((rc == 75)); then
      again+=("$stage")
    elif ((rc != 0)); then  # reported; the other stages still run
      echo "=== $(date -u +%H:%M:%S) evidence.py $stage failed (exit $rc)"
    fi
  done
  if ((${#again[@]} == ${#stages[@]})); then
    sleep "$wait_s"  # every stage waits on the other track
  fi
  stages=("${again[@]}")
done
echo "=== $(date -u +%H:%M:%S) track $track finished"
