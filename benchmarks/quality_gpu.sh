#!/usr/bin/env bash
# The issue-12 quality grid (quality_vs_peft.py) on one GPU, within one call of at most 10 minutes.
#
# One process per task, all at the same time on the one GPU (MiniLM at batch 16 leaves most of an
# H200 idle, so five processes share it well), each stopped after LIMIT seconds. The JSONL is
# resumable: run the same command again to go on where it stopped. Longer than the CPU grid
# (STEPS x 16 over SAMPLES examples: 4 epochs of 2 400 by default, the length at which CoLA was
# still unlearned on the CPU), so CoLA and RTE get their chance to separate the methods.
#
#   bash benchmarks/quality_gpu.sh                    # results/quality_gpu.jsonl, one log per task beside it
#   RESULTS=$OUT/q.jsonl LIMIT=480 bash benchmarks/quality_gpu.sh
#   DEVICE=cpu TASKS=rte STEPS=2 SAMPLES=32 METHODS="rankopt peft_lora" \
#       bash benchmarks/quality_gpu.sh --seeds 0 --lrs 2e-3 --eval-samples 16   # CPU smoke run
#
# Extra arguments go to every task's quality_vs_peft.py. It prints the summary table at the end.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
export PYTHONPATH="$here/..${PYTHONPATH:+:$PYTHONPATH}"  # rankopt from this checkout: the GPU machine has no install
results=${RESULTS:-$here/results/quality_gpu.jsonl}
tasks=${TASKS:-sst2 cola rte mrpc stsb}
methods=${METHODS:-rankopt rankopt_fixed rankopt_at_budget peft_lora peft_adalora peft_eva peft_rslora peft_lora_trunc}
mkdir -p "$(dirname "$results")"
for task in $tasks; do
    # shellcheck disable=SC2086  # tasks and methods are word lists
    timeout "${LIMIT:-500}" python3 "$here/quality_vs_peft.py" --tasks "$task" --methods $methods \
        --device "${DEVICE:-cuda}" --threads "${THREADS:-2}" --steps "${STEPS:-600}" \
        --train-samples "${SAMPLES:-2400}" --out "$results" "$@" > "${results%.jsonl}_$task.log" 2>&1 &
done
status=0
for job in $(jobs -p); do
    wait "$job" || { code=$?; [ "$code" -eq 124 ] || status=$code; }  # 124: stopped at LIMIT, resumable
done
# shellcheck disable=SC2086
python3 "$here/quality_vs_peft.py" --summary --out "$results" --tasks $tasks --methods $methods
for task in $tasks; do
    grep -h "^error" "${results%.jsonl}_$task.log" || true  # a failed task says why here, not only in its log
done
exit "$status"
