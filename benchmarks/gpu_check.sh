#!/usr/bin/env bash
# One prepared GPU check (< 8 minutes on one H200): the bench.py measurements on CUDA for
# cifar10 (batch 64) and imagenet64 (batch 8), float32 and bf16, and "sample 8 CIFAR-10 images
# warm" (paper: 0.32 s; goal: < 0.1 s). JSON and logs go to ${OUT:-bench-out}/.
#
#   benchmarks/gpu_check.sh                     # on a CUDA machine
#   benchmarks/gpu_check.sh --device cpu --quick  # smoke test: tiny config, small batches
#
# Options: --device cuda|cpu, --quick, --budget SECONDS (total, default 450), --no-compile.
# Environment: OUT (output folder), PYTHON (interpreter, default python3 or python).
# Each step has its own time limit and the whole script a budget; a step that fails or runs out
# of time is reported and the rest still run; the exit status is non-zero if any step failed.
set -euo pipefail

DEVICE=cuda
QUICK=0
BUDGET=450
COMPILE=1
while [ $# -gt 0 ]; do
    case "$1" in
        --device) DEVICE="$2"; shift 2 ;;
        --device=*) DEVICE="${1#*=}"; shift ;;
        --quick) QUICK=1; shift ;;
        --budget) BUDGET="$2"; shift 2 ;;
        --no-compile) COMPILE=0; shift ;;
        -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT_DIR="${OUT:-bench-out}"
mkdir -p "$OUT_DIR"
if [ -z "${PYTHON:-}" ]; then
    if command -v python3 >/dev/null 2>&1; then PYTHON=python3; else PYTHON=python; fi
fi
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
BENCH=("$PYTHON" "$ROOT/benchmarks/bench.py" --device "$DEVICE")

START=$SECONDS
FAILED=()
OPTIONAL_FAILED=()
SKIPPED=()
OPTIONAL=0

# step NAME LIMIT_SECONDS [bench.py args...]: run one benchmark into $OUT_DIR/NAME.json
step() {
    local name="$1" limit="$2"
    shift 2
    local left=$(( BUDGET - (SECONDS - START) ))
    if [ "$DEVICE" = cpu ] && [[ " $* " == *" --bf16 "* ]]; then
        # bench.py ignores --bf16 on a CPU: the step would repeat the float32 one
        echo "=== $name: skipped (bfloat16 autocast is for GPUs)"
        SKIPPED+=("$name")
        return 0
    fi
    if [ "$left" -lt 20 ]; then
        echo "=== $name: skipped (budget of ${BUDGET}s used up)"
        SKIPPED+=("$name")
        return 0
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    echo "=== $name (limit ${limit}s, $(( SECONDS - START ))s elapsed)"
    local rc=0
    timeout --kill-after=10 "$limit" "${BENCH[@]}" "$@" --json "$OUT_DIR/$name.json" 2>&1 \
        | tee "$OUT_DIR/$name.log" || rc=$?
    if [ "$rc" -ne 0 ]; then
        if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
            echo "=== $name: TIMED OUT after ${limit}s"
        else
            echo "=== $name: FAILED (exit $rc)"
        fi
        if [ "$OPTIONAL" -eq 1 ]; then OPTIONAL_FAILED+=("$name"); else FAILED+=("$name"); fi
    fi
}

{
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "device: $DEVICE  quick: $QUICK  budget: ${BUDGET}s"
    "$PYTHON" -c 'import torch, sys; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())'
    if [ "$DEVICE" != cpu ] && command -v nvidia-smi >/dev/null 2>&1; then
        nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || true
    fi
} 2>&1 | tee "$OUT_DIR/machine.txt"

if [ "$QUICK" -eq 1 ]; then
    # Same steps on the tiny config, one timed run each: checks the script end to end.
    C10=(--config tiny --batch-size 4)
    I64=(--config tiny --batch-size 2)
    S8=(--config tiny --batch-size 8)
    RUNS=(--repeats 1 --warmup 0 --matmul-size 256)
    SRUNS=(--repeats 2 --warmup 1)
    # the CPU peak-RSS measurement starts a child process: once is enough for a smoke test
    LATER=(--only train,logprob,sample,inverse,flops)
    if [ "$DEVICE" = cpu ]; then RUNS+=(--threads 1); SRUNS+=(--threads 1); fi
    L_BIG=60; L_SMALL=30
    COMPILE=0
else
    C10=(--config cifar10 --batch-size 64)
    I64=(--config imagenet64 --batch-size 8)
    S8=(--config cifar10 --batch-size 8)
    RUNS=(--repeats 5 --warmup 2)
    SRUNS=(--repeats 10 --warmup 3)
    LATER=()
    L_BIG=110; L_SMALL=45
fi

# Most important first: if the budget runs out, the later steps are the ones skipped.
step cifar10_b64_fp32    "$L_BIG"   "${C10[@]}" "${RUNS[@]}"
step cifar10_b64_bf16    "$L_BIG"   "${C10[@]}" "${RUNS[@]}" "${LATER[@]+"${LATER[@]}"}" --bf16
step sample8_fp32        "$L_SMALL" "${S8[@]}" "${SRUNS[@]}" --only sample
step sample8_bf16        "$L_SMALL" "${S8[@]}" "${SRUNS[@]}" --only sample --bf16
step imagenet64_b8_fp32  "$L_BIG"   "${I64[@]}" "${RUNS[@]}" "${LATER[@]+"${LATER[@]}"}"
step imagenet64_b8_bf16  "$L_BIG"   "${I64[@]}" "${RUNS[@]}" "${LATER[@]+"${LATER[@]}"}" --bf16
if [ "$COMPILE" -eq 1 ]; then
    # Optional: compiled conditioners (compilation takes a while); a failure here does not fail the check.
    left=$(( BUDGET - (SECONDS - START) ))
    if [ "$left" -ge 90 ]; then
        OPTIONAL=1
        step sample8_bf16_compile "$left" "${S8[@]}" "${SRUNS[@]}" --only sample --bf16 --compile
        OPTIONAL=0
    else
        echo "=== compile step skipped (${left}s left)"
    fi
fi

echo
echo "=== summary ($(( SECONDS - START ))s)"
"$PYTHON" "$ROOT/benchmarks/bench.py" --summarize "$OUT_DIR" 2>&1 | tee "$OUT_DIR/summary.txt" || true

if [ "${#SKIPPED[@]}" -gt 0 ]; then echo "skipped: ${SKIPPED[*]}"; fi
if [ "${#OPTIONAL_FAILED[@]}" -gt 0 ]; then echo "optional steps failed: ${OPTIONAL_FAILED[*]}"; fi
if [ "${#FAILED[@]}" -gt 0 ]; then
    echo "failed: ${FAILED[*]}"
    exit 1
fi
echo "all steps done in $(( SECONDS - START ))s; results in $OUT_DIR/"
