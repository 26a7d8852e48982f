#!/usr/bin/env bash
# The GPU checks, as one prepared script (docs/gpu.md): the tests' CUDA cases, the pretraining throughput
# benchmark at the paper's sizes (this pipeline, the compute bound and the reference design in one run),
# all_reduce over NCCL with every GPU the machine has, and the fine-tune cells' paths timed at the paper's sizes. Run from the repository root in an environment with the
# project installed:
#
#   bash scripts/device_checks.sh [OUT]        # OUT: where the logs go (default: $OUT, else device-checks/)
#
# Each step has its own time limit (seconds, environment: MFLAG_TEST_S 300, MFLAG_BENCH_S 240, MFLAG_NCCL_S 120,
# MFLAG_CELL_S 120)
# so that one hung step cannot use a lent machine's whole time; a step that fails or runs out is reported and
# the next one still runs. The exit status is the number of steps that did not pass. Without a CUDA device it
# says so and stops (status 0): there is nothing here a CPU can check that the test suite does not.
set -uo pipefail
out="${1:-${OUT:-device-checks}}"
mkdir -p "$out"
summary="$out/summary.txt"
: > "$summary"
failures=0

step() {  # step NAME LIMIT COMMAND...: run it with a time limit, log to $out/NAME.log, record the outcome
    local name=$1 limit=$2; shift 2
    local start=$SECONDS
    timeout --signal=INT --kill-after=10 "$limit" "$@" > "$out/$name.log" 2>&1
    local rc=$?
    local verdict=passed
    if [ $rc -eq 124 ]; then verdict="timed out after ${limit} s"; elif [ $rc -ne 0 ]; then verdict="failed (rc $rc)"; fi
    [ "$verdict" = passed ] || failures=$((failures + 1))
    echo "$name: $verdict in $((SECONDS - start)) s" | tee -a "$summary"
    tail -n 15 "$out/$name.log"
}

python - > "$out/device.txt" 2>&1 <<'EOF'
import torch
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, devices {torch.cuda.device_count()}")
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f"  {i}: {p.name}, {p.total_memory / 2**30:.1f} GiB, bf16 {torch.cuda.is_bf16_supported()}")
EOF
cat "$out/device.txt"
gpus=$(python -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
if [ "$gpus" -lt 1 ]; then
    echo "no CUDA device: nothing to check here (the test suite covers the CPU)" | tee -a "$summary"
    exit 0
fi

# 1. every test with a CUDA case (they skip on CPU-only machines, so CI never runs them)
step cuda_tests "${MFLAG_TEST_S:-300}" python -m pytest -q -rs tests/test_augment.py tests/test_pretrain.py \
    tests/test_precision.py -k "cuda or ddp"
# 2. pretraining throughput at the paper's sizes: (a) this pipeline, (b) the compute bound, (c) the reference design
step throughput "${MFLAG_BENCH_S:-240}" python benchmarks/pretrain_step.py --device cuda --batch 512 --size 256 \
    --crop 224 --workers 8 --steps 20 --warmup 5
# 3. NCCL: all_reduce across every GPU (one GPU: a world of one, which checks the set-up but no transfer)
step nccl "${MFLAG_NCCL_S:-120}" torchrun --standalone --nproc_per_node="$gpus" benchmarks/allreduce.py --mb 256
# 4. the fine-tune cells' paths (frozen encoder, U-Net, YOLOv3 head) and the pretraining step at 224 px, timed:
#    docs/scaling.md's GPU-hours of the cells are estimated from operation counts until this has run
step cell_cost "${MFLAG_CELL_S:-120}" python benchmarks/cell_cost.py --time --device cuda --batch 64 --steps 10

echo "device checks: $failures step(s) did not pass; logs in $out/" | tee -a "$summary"
exit "$failures"
