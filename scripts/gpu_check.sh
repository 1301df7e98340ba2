#!/usr/bin/env bash
# One device session of issue 11 (see benchmarks/perf/gpu_runbook.md): CUDA tests, the GPU
# benchmark, then the full suite with whatever time is left, everything written under $OUT.
#
#   bash scripts/gpu_check.sh [--dry-run]
#
# Environment: OUT (results folder; default a new temporary one), PY (default python3),
# GPU_CHECK_BUDGET_S (seconds for all steps, default 470), GPU_CHECK_DEVICE (cuda, the default;
# cpu = twin-CPU tests and the quick CPU benchmark, to try this script on a machine without a GPU).
# --dry-run prints each step with its time limit instead of running it (the set-up, the clock
# and the summary still run). Exit status: 0 when every step that ran passed, else 1.
set -u
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
PY=${PY:-python3}
OUT=${OUT:-$(mktemp -d)}
DEVICE=${GPU_CHECK_DEVICE:-cuda}
BUDGET=${GPU_CHECK_BUDGET_S:-470}
START=$(date +%s)
mkdir -p "$OUT"
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
FAILED=0

left() { echo $(( BUDGET - ($(date +%s) - START) )); }

# step NAME LIMIT_S CMD...: run CMD under `timeout LIMIT_S`, output to $OUT/NAME.log, one summary line
step() {
    local name=$1 limit=$2; shift 2
    if [ "$limit" -lt 30 ]; then
        echo "$name: skipped, $limit s left of the budget" | tee -a "$SUMMARY"; return
    fi
    local t0=$(date +%s) rc
    if [ $DRY = 1 ]; then
        echo "[dry-run] timeout $limit $*" > "$OUT/$name.log"; rc=0
    else
        timeout "$limit" "$@" > "$OUT/$name.log" 2>&1; rc=$?
    fi
    [ $rc = 0 ] || FAILED=1
    local why=""; [ $rc = 124 ] && why=" (timed out)"
    echo "$name: rc=$rc$why in $(( $(date +%s) - t0 )) s (limit $limit s); last line: $(grep -v '^[[:space:]]*$' "$OUT/$name.log" | tail -n 1)" \
        | tee -a "$SUMMARY"
}

# higher is not on the GPU machine: install the carried wheel (.whl/) into a temporary folder
if ! "$PY" -c "import higher" 2>/dev/null; then
    if ls .whl/*.whl > /dev/null 2>&1; then
        S=$(mktemp -d)
        "$PY" -m pip install -q --no-index --no-deps --target "$S" .whl/*.whl
        export PYTHONPATH="$S:$PWD${PYTHONPATH:+:$PYTHONPATH}"
    else
        echo "higher is not importable and no .whl/ was carried; see gpu_runbook.md" | tee -a "$SUMMARY"
        exit 1
    fi
else
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi

{
    date -u; nvidia-smi 2>&1 | head -n 15
    "$PY" - <<'EOF'
import importlib.util, torch, fewshot
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(0), "count", torch.cuda.device_count())
print("fewshot from", fewshot.__file__)
for m in ("higher", "h5py", "torchvision", "learn2learn", "xdist"):
    print(m, "importable" if importlib.util.find_spec(m) else "MISSING")
EOF
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt" | tee -a "$SUMMARY"

if [ "$DEVICE" = cuda ]; then
    export FEWSHOT_TEST_TWIN_DEVICE=cuda
    BENCH=(benchmarks/perf/gpu.py --device cuda --json "$OUT/gpu.json" --md "$OUT/gpu.md")
else
    export FEWSHOT_TEST_TWIN_DEVICE=cpu
    BENCH=(benchmarks/perf/gpu.py --device cpu --quick --json "$OUT/gpu_cpu_quick.json" --md "$OUT/gpu_cpu_quick.md")
fi
PYTEST=("$PY" -m pytest -q -p no:cacheprovider -rfEs)

step pytest_cuda $(( $(left) < 150 ? $(left) : 150 )) "${PYTEST[@]}" tests/cuda tests/distributed -x \
    --junitxml="$OUT/pytest_cuda.xml"
step bench_gpu $(( $(left) < 270 ? $(left) : 270 )) "$PY" "${BENCH[@]}"
XDIST=()
"$PY" -c "import xdist" 2>/dev/null && XDIST=(-n 8)
step pytest_full $(( $(left) - 10 )) "${PYTEST[@]}" "${XDIST[@]}" tests --junitxml="$OUT/pytest_full.xml"

for f in "$OUT"/gpu*.md; do [ -f "$f" ] && cat "$f"; done
echo "total $(( $(date +%s) - START )) s of $BUDGET s; results in $OUT" | tee -a "$SUMMARY"
exit $FAILED
