#!/usr/bin/env bash
# GPU check for a machine with an NVIDIA GPU and no network (`make gpu-check` calls this).
#
#   1. build:  pip install --no-deps --no-build-isolation --no-index -e .  against the torch
#              already installed in the python on PATH (not .venv); TORCH_CUDA_ARCH_LIST is set
#              from the visible card's compute capability when unset (one arch: short build)
#   2. tests:  python -m pytest -m gpu -q tests
#   3. bench:  python bench/run.py --device cuda   (stops starting new cases near its limit)
#   4. summary table, printed LAST: acceptance figures, then one line per step
#
# Outputs: bench/results/ (CSVs, PNGs, gpu_check.log, summary_<gpu>.txt); also copied into
# "$OUT" when that variable is set (at most 8 files: a tarball replaces the rest when more).
# Whole run is kept under GPU_CHECK_BUDGET seconds (default 450 = 7.5 min): every step runs
# under `timeout`, with a cap of its own and never more than what is left of the budget.
# It only reads the GPU's state (nvidia-smi --query-gpu); it changes no GPU setting.
#
# Environment: PYTHON (default: python, else python3 on PATH), TORCH_CUDA_ARCH_LIST, MAX_JOBS,
# GPU_CHECK_BUDGET, GPU_CHECK_BUILD_CAP (240), GPU_CHECK_TEST_CAP (120), GPU_CHECK_QUICK=1 (bench
# --quick), GPU_CHECK_SKIP_BUILD=1 (package already installed).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PYTHONUNBUFFERED=1
START=$SECONDS
BUDGET=${GPU_CHECK_BUDGET:-450}
BUILD_CAP=${GPU_CHECK_BUILD_CAP:-240}
TEST_CAP=${GPU_CHECK_TEST_CAP:-120}
SUMMARY_RESERVE=25   # kept for the summary step at the end

if [[ -n "${PYTHON:-}" ]]; then PY=$PYTHON
elif command -v python >/dev/null 2>&1; then PY=$(command -v python)
else PY=$(command -v python3)
fi

RES=bench/results
mkdir -p "$RES"
LOG=$RES/gpu_check.log
: >"$LOG"

STEP_NAMES=()
STEP_STATE=()
STEP_SECS=()

log() { echo "$*" | tee -a "$LOG"; }

left() { echo $((BUDGET - (SECONDS - START))); }

# step NAME CAP CMD...: runs CMD under `timeout min(CAP, budget left - reserve)`, output to
# stdout and the log; records ok / FAILED (rc) / TIMEOUT; never stops the script.
step() {
    local name=$1 cap=$2
    shift 2
    local limit rc t0=$SECONDS
    limit=$(($(left) - SUMMARY_RESERVE))
    if ((limit > cap)); then limit=$cap; fi
    if ((limit < 10)); then
        log "=== [$name] skipped: time budget spent"
        STEP_NAMES+=("$name"); STEP_STATE+=("skipped (budget)"); STEP_SECS+=(0)
        return 0
    fi
    log ""
    log "=== [$name] $* (limit ${limit}s)"
    set +e
    timeout --signal=TERM --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$LOG"
    rc=${PIPESTATUS[0]}
    set -e
    local state=ok
    if ((rc == 124 || rc == 137)); then state="TIMEOUT (${limit}s)"
    elif ((rc != 0)); then state="FAILED (rc=$rc)"
    fi
    STEP_NAMES+=("$name"); STEP_STATE+=("$state"); STEP_SECS+=($((SECONDS - t0)))
    LAST_RC=$rc
    return 0
}

skip() {
    log "=== [$1] skipped: $2"
    STEP_NAMES+=("$1"); STEP_STATE+=("skipped ($2)"); STEP_SECS+=(0)
}

# ---- 0. the machine, read-only ---------------------------------------------------------------
log "gpu_check: $(date -Is)  python: $PY  budget: ${BUDGET}s"
if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem,temperature.gpu,power.draw,utilization.gpu \
        --format=csv 2>&1 | tee -a "$LOG" || true
else
    log "nvidia-smi not found"
fi
"$PY" - <<'EOF' 2>&1 | tee -a "$LOG" || true
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"device {p.name}  cc {p.major}.{p.minor}  SMs {p.multi_processor_count}  "
          f"memory {p.total_memory / 2**30:.1f} GiB")
try:
    import triton
    print("triton", triton.__version__)
except Exception as e:
    print("triton unavailable:", e)
EOF

if [[ -z "${TORCH_CUDA_ARCH_LIST:-}" ]]; then
    TORCH_CUDA_ARCH_LIST=$("$PY" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability(0))' 2>/dev/null || true)
    if [[ -n "$TORCH_CUDA_ARCH_LIST" ]]; then export TORCH_CUDA_ARCH_LIST; fi
fi
if [[ -z "${CUDA_HOME:-}" ]] && ! command -v nvcc >/dev/null 2>&1 && [[ -x /usr/local/cuda/bin/nvcc ]]; then
    export CUDA_HOME=/usr/local/cuda
    export PATH=$CUDA_HOME/bin:$PATH
fi
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
log "TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-<unset>}  MAX_JOBS=$MAX_JOBS  nvcc: $(command -v nvcc || echo none)"

# ---- 1. build --------------------------------------------------------------------------------
BUILD_OK=1
if [[ "${GPU_CHECK_SKIP_BUILD:-0}" == 1 ]]; then
    skip build "GPU_CHECK_SKIP_BUILD=1"
else
    step build "$BUILD_CAP" "$PY" -m pip install --no-deps --no-build-isolation --no-index -e .
    if [[ "${STEP_STATE[-1]}" != ok ]]; then BUILD_OK=0; fi
fi
KERNELS=$("$PY" -c 'import dtl_fast; i = dtl_fast.info(); print("cuda kernels built:", i.get("cuda_kernels_built"), "| extension error:", i.get("extension_error"))' 2>&1 | tail -n 1 || true)
log "$KERNELS"

# ---- 2. gpu tests ----------------------------------------------------------------------------
TEST_LINE="-"
if ((BUILD_OK)); then
    LAST_RC=0
    step gpu-tests "$TEST_CAP" "$PY" -m pytest -m gpu -q -rfE -p no:cacheprovider tests
    if ((LAST_RC == 5)); then  # pytest: no tests collected
        STEP_STATE[-1]="ok (no gpu tests collected)"
    fi
    TEST_LINE=$(grep -E "^(=+ )?[0-9]+ (passed|failed|error|skipped|deselected)|no tests ran" "$LOG" | tail -n 1 || true)
else
    skip gpu-tests "build failed"
fi

# ---- 3. benchmarks ---------------------------------------------------------------------------
if ((BUILD_OK)); then
    BENCH_LIMIT=$(($(left) - SUMMARY_RESERVE))
    QUICK=()
    if [[ "${GPU_CHECK_QUICK:-0}" == 1 ]]; then QUICK=(--quick); fi
    # the benchmark stops starting new cases 30 s before its hard limit, so it ends cleanly
    step bench "$BENCH_LIMIT" "$PY" bench/run.py --device cuda ${QUICK[@]+"${QUICK[@]}"} \
        --time-budget $((BENCH_LIMIT > 60 ? BENCH_LIMIT - 30 : BENCH_LIMIT / 2))
else
    skip bench "build failed"
fi

# ---- 4. outputs to $OUT, then the summary (printed last) -------------------------------------
SUMMARY=$RES/gpu_check_summary.txt
{
    "$PY" bench/run.py --device cuda --summary-only latest --summary-file "$RES/summary_gpu.txt" \
        2>&1 || true
    echo ""
    echo "==================== gpu_check summary ($(date -Is)) ===================="
    echo "$KERNELS"
    echo "gpu tests: ${TEST_LINE:--}"
    printf '%-10s %-34s %6s\n' step result seconds
    for i in "${!STEP_NAMES[@]}"; do
        printf '%-10s %-34s %6s\n' "${STEP_NAMES[$i]}" "${STEP_STATE[$i]}" "${STEP_SECS[$i]}"
    done
    printf '%-10s %-34s %6s\n' total "" $((SECONDS - START))
} >"$SUMMARY" 2>&1
cat "$SUMMARY" >>"$LOG"

if [[ -n "${OUT:-}" ]]; then
    mkdir -p "$OUT"
    mapfile -t FILES < <(ls -1 "$RES"/*.csv "$RES"/*.png 2>/dev/null || true)
    cp "$LOG" "$SUMMARY" "$OUT"/ 2>/dev/null || true
    if ((${#FILES[@]} <= 6)); then
        for f in "${FILES[@]}"; do cp "$f" "$OUT"/ || true; done
    else
        tar -czf "$OUT/bench_results.tar.gz" -C "$RES" . || true
        for f in "${FILES[@]:0:5}"; do cp "$f" "$OUT"/ || true; done
    fi
fi

cat "$SUMMARY"
FAILED=0
for s in "${STEP_STATE[@]}"; do
    if [[ "$s" != ok* ]]; then FAILED=1; fi
done
exit $FAILED
