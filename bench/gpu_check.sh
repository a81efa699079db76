#!/usr/bin/env bash
# GPU check for a machine with an NVIDIA GPU and no network (`make gpu-check` calls this).
# Meant to run as ONE call on a lent machine, with room left for a short rerun on the warm one.
#
#   0. probe:  one python start: torch / triton / CUDA / the card (read-only), pytest-timeout
#   1. build:  pip install --no-deps --no-build-isolation --no-index -e .  against the torch of
#              the chosen python (TORCH_CUDA_ARCH_LIST from the visible card when unset: one arch,
#              short build). If that fails: the same with DTL_FAST_CUDA=0 (CPU-only extension,
#              short), and the Triton ops (rnn, attention) are tested and benchmarked anyway;
#              frame_pool's CUDA tests / benchmark are skipped and reported "CUDA not built".
#              The source tree is on PYTHONPATH, so the Triton ops run even if both builds fail.
#   2. tests:  python -m pytest -m gpu, one pytest per kernel group (frame_pool, rnn, attention),
#              each with its own --maxfail and its share of GPU_CHECK_TEST_CAP (time a group does
#              not use passes to the next), plus a per-test timeout (--timeout-method=thread) when
#              pytest-timeout is installed: a systematic bug in one group cannot starve the others
#   3. bench:  python bench/run.py --device cuda --quick, one step per module (frame_pool, rnn,
#              cosine_attention), each with its share of the time left; each quick grid runs one
#              cheap case per acceptance figure first, then the bigger ones, torch.compile last;
#              a case cut by the budget gets a row saying so and makes its figures FAIL
#              ("N case(s) not run"). All steps share one run id.
#   4. outputs: CSVs, PNGs of this run and the log copied to $OUT BEFORE the summary (and again
#              after); then the summary, under `timeout 60`, printed LAST: acceptance figures of
#              this run, then one line per step.
#
# Outputs: bench/results/ (CSVs, PNGs, gpu_check.log, gpu_check_summary.txt, one combined
# summary_<gpu-slug>.txt); copied into "$OUT" when set (at most 8 files: log, summary, CSVs,
# then this run's PNGs while there is room; bench_results.tar.gz holds everything when more).
# The whole run is kept under GPU_CHECK_BUDGET seconds (default 450): every step runs under
# `timeout`, with its own cap and never more than what is left of the budget.
# It only reads the GPU's state (nvidia-smi --query-gpu); it changes no GPU setting.
#
# Exit status: 0 when every step that ran was ok; 1 when a step failed, timed out or was cut
# by the budget. Without a CUDA device it prints "no CUDA: nothing measured" and exits 0
# (nothing was measured, nothing failed; the build and the - skipped - gpu tests still run).
#
# Rerun on a warm machine (package already built, ~4 min):
#     GPU_CHECK_SKIP_BUILD=1 GPU_CHECK_BUDGET=240 bash bench/gpu_check.sh
#
# Environment: PYTHON (else the first of python3, python on PATH that can `import torch`),
# TORCH_CUDA_ARCH_LIST, MAX_JOBS, GPU_CHECK_BUDGET (450), GPU_CHECK_BUILD_CAP (200),
# GPU_CHECK_TEST_CAP (160, all test groups together), GPU_CHECK_TEST_TIMEOUT (per test, 45 s,
# needs pytest-timeout), GPU_CHECK_TEST_WORKERS (1: pytest-xdist workers per group, when installed), GPU_CHECK_QUICK=0 (full grids instead of --quick, cut by the budget),
# GPU_CHECK_SKIP_BUILD=1 (package already installed), DTL_FAST_GIT_REV (the git revision to stamp
# on every row where the checkout has no .git; printed when set), GPU_CHECK_STEPS (comma-separated
# step names to run, e.g. "test-dtl,bench-dtl"; default all: test-pool, test-rnn, test-attn,
# test-dtl, bench-pool, bench-rnn, bench-attn, bench-dtl; the build always runs unless skipped;
# sweep-pool, the frame_pool launch-constant sweep, runs only when listed: issue 13's one call is
# GPU_CHECK_STEPS=test-pool,sweep-pool,bench-pool; GPU_CHECK_SWEEP_CAP, default 150 s; likewise
# opt-in: sweep-rnn, sweep-attn, profile-dtl (GPU_CHECK_PROFILE_CAP, 90 s each), train-graphs,
# host-overhead, bench-dtl-compile (GPU_CHECK_COMPILE_CAP, 420 s), see step 3).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the source tree, built or not
START=$SECONDS
BUDGET=${GPU_CHECK_BUDGET:-450}
BUILD_CAP=${GPU_CHECK_BUILD_CAP:-200}
CPU_BUILD_CAP=90
TEST_CAP=${GPU_CHECK_TEST_CAP:-160}
TEST_TIMEOUT=${GPU_CHECK_TEST_TIMEOUT:-45}
TEST_WORKERS=${GPU_CHECK_TEST_WORKERS:-1}
SUMMARY_RESERVE=30   # kept for the copy to $OUT and the summary at the end

# the interpreter: the first of $PYTHON, python3, python that can import torch
PY=""
for cand in "${PYTHON:-}" python3 python; do
    [[ -n "$cand" ]] || continue
    c=$(command -v "$cand" 2>/dev/null || true)
    [[ -n "$c" ]] || continue
    if "$c" -c 'import torch' >/dev/null 2>&1; then PY=$c; break; fi
done

RES=bench/results
mkdir -p "$RES"
LOG=$RES/gpu_check.log
SUMMARY=$RES/gpu_check_summary.txt
: >"$LOG"
STAMP_FILE=$(mktemp)   # files newer than this were written by this run
STEP_OUT=$(mktemp)
trap 'rm -f "$STAMP_FILE" "$STEP_OUT"' EXIT

STEP_NAMES=()
STEP_STATE=()
STEP_SECS=()
LAST_RC=0

log() { echo "$*" | tee -a "$LOG"; }

left() { echo $((BUDGET - (SECONDS - START))); }

# step NAME CAP CMD...: runs CMD under `timeout min(CAP, budget left - reserve)`, output to
# stdout, the log and $STEP_OUT; records ok / FAILED (rc) / TIMEOUT; never stops the script.
step() {
    local name=$1 cap=$2
    shift 2
    local limit rc t0=$SECONDS
    limit=$(($(left) - SUMMARY_RESERVE))
    if ((limit > cap)); then limit=$cap; fi
    : >"$STEP_OUT"
    if ((limit < 10)); then
        log "=== [$name] skipped: time budget spent"
        STEP_NAMES+=("$name"); STEP_STATE+=("skipped (budget)"); STEP_SECS+=(0)
        LAST_RC=-1
        return 0
    fi
    log ""
    log "=== [$name] $* (limit ${limit}s)"
    set +e
    timeout --signal=TERM --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$LOG" "$STEP_OUT"
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

# skip NAME REASON: a step that does not run (not a failure)
skip() {
    log "=== [$1] skipped: $2"
    STEP_NAMES+=("$1"); STEP_STATE+=("skipped ($2)"); STEP_SECS+=(0)
}

# wanted NAME: true when GPU_CHECK_STEPS is unset or lists NAME
wanted() {
    [[ -z "${GPU_CHECK_STEPS:-}" ]] && return 0
    [[ ",${GPU_CHECK_STEPS}," == *",$1,"* ]]
}

# copy_out: this run's CSVs, PNGs, log and summary into $OUT (at most 8 files come back)
copy_out() {
    [[ -n "${OUT:-}" ]] || return 0
    mkdir -p "$OUT" || return 0
    local files=() f
    [[ -f "$LOG" ]] && files+=("$LOG")
    [[ -f "$SUMMARY" ]] && files+=("$SUMMARY")
    while IFS= read -r f; do files+=("$f"); done < <(ls -1 "$RES"/*.csv 2>/dev/null || true)
    while IFS= read -r f; do files+=("$f"); done < <(find "$RES" -maxdepth 1 \( -name '*.png' -o -name 'summary_*.txt' \) -newer "$STAMP_FILE" 2>/dev/null | sort)
    if ((${#files[@]} > 8)); then
        tar -czf "$OUT/bench_results.tar.gz" -C "$RES" . 2>/dev/null || true
        files=("${files[@]:0:7}")
    fi
    for f in "${files[@]}"; do cp -f "$f" "$OUT"/ 2>/dev/null || true; done
}

# ---- 0. the machine, read-only (one python start) -------------------------------------------
log "gpu_check: $(date -Is)  python: ${PY:-none}  budget: ${BUDGET}s${DTL_FAST_GIT_REV:+  git: $DTL_FAST_GIT_REV}"
if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem,temperature.gpu,power.draw,utilization.gpu \
        --format=csv 2>&1 | tee -a "$LOG" || true
else
    log "nvidia-smi not found"
fi
if [[ -z "$PY" ]]; then
    log "no python that can import torch (tried \$PYTHON, python3, python): nothing to do"
    exit 1
fi
PROBE=$("$PY" - <<'EOF' 2>&1 || true
import importlib.util, re, sys
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
try:
    import triton
    print("triton", triton.__version__)
except Exception as e:
    print("triton unavailable:", e)
has = int(torch.cuda.is_available())
if has:
    p = torch.cuda.get_device_properties(0)
    print(f"device {p.name}  cc {p.major}.{p.minor}  SMs {p.multi_processor_count}  "
          f"memory {p.total_memory / 2**30:.1f} GiB")
    print(f"@ARCH={p.major}.{p.minor}")
    print("@SLUG=" + (re.sub(r"[^a-z0-9]+", "-", p.name.lower()).strip("-")[:60] or "gpu"))
print(f"@HAS_CUDA={has}")
print(f"@PYTEST_TIMEOUT={int(importlib.util.find_spec('pytest_timeout') is not None)}")
print(f"@PYTEST_XDIST={int(importlib.util.find_spec('xdist') is not None)}")
EOF
)
echo "$PROBE" | grep -v '^@' | tee -a "$LOG" || true
probe() { echo "$PROBE" | sed -n "s/^@$1=//p" | tail -n 1; }
HAS_CUDA=$(probe HAS_CUDA); HAS_CUDA=${HAS_CUDA:-0}
HAS_PYTEST_TIMEOUT=$(probe PYTEST_TIMEOUT); HAS_PYTEST_TIMEOUT=${HAS_PYTEST_TIMEOUT:-0}
HAS_PYTEST_XDIST=$(probe PYTEST_XDIST); HAS_PYTEST_XDIST=${HAS_PYTEST_XDIST:-0}
SLUG=$(probe SLUG); SLUG=${SLUG:-gpu}
if [[ -z "${TORCH_CUDA_ARCH_LIST:-}" ]]; then
    TORCH_CUDA_ARCH_LIST=$(probe ARCH)
    if [[ -n "$TORCH_CUDA_ARCH_LIST" ]]; then export TORCH_CUDA_ARCH_LIST; fi
fi
if [[ -z "${CUDA_HOME:-}" ]] && ! command -v nvcc >/dev/null 2>&1 && [[ -x /usr/local/cuda/bin/nvcc ]]; then
    export CUDA_HOME=/usr/local/cuda
    export PATH=$CUDA_HOME/bin:$PATH
fi
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
log "TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-<unset>}  MAX_JOBS=$MAX_JOBS  nvcc: $(command -v nvcc || echo none)"

# ---- 1. build (CPU-only fallback when the CUDA build fails) ----------------------------------
if [[ "${GPU_CHECK_SKIP_BUILD:-0}" == 1 ]]; then
    skip build "GPU_CHECK_SKIP_BUILD=1"
else
    step build "$BUILD_CAP" "$PY" -m pip install --no-deps --no-build-isolation --no-index -e .
    if [[ "${STEP_STATE[-1]}" != ok ]]; then
        log "build with CUDA failed: retrying CPU-only (DTL_FAST_CUDA=0); the Triton ops run anyway"
        step build-cpu "$CPU_BUILD_CAP" env DTL_FAST_CUDA=0 "$PY" -m pip install --no-deps \
            --no-build-isolation --no-index -e .
    fi
fi
KINFO=$("$PY" -c 'import dtl_fast; i = dtl_fast.info(); print("@CUDA_BUILT=%d" % bool(i.get("cuda_kernels_built"))); print("cuda kernels built:", i.get("cuda_kernels_built"), "| extension error:", i.get("extension_error"))' 2>&1 || true)
CUDA_BUILT=$(echo "$KINFO" | sed -n 's/^@CUDA_BUILT=//p' | tail -n 1); CUDA_BUILT=${CUDA_BUILT:-0}
KERNELS=$(echo "$KINFO" | grep -v '^@' | tail -n 1)
log "$KERNELS"
if ((!CUDA_BUILT)); then KERNELS="$KERNELS | frame_pool CUDA: NOT BUILT (its gpu tests and benchmark skipped)"; fi
RUN_ID=gpucheck-$(date +%Y%m%dT%H%M%S)-$$
log "cuda available: $HAS_CUDA  frame_pool CUDA kernels built: $CUDA_BUILT  run id: $RUN_ID"

# ---- 2. gpu tests: one pytest per kernel group ------------------------------------------------
TEST_LINES=()
TEST_USED=0
# test_group NAME PCT FILE...: PCT % of the test time not yet used (100: all of it)
test_group() {
    local name=$1 pct=$2
    shift 2
    if ! wanted "$name"; then skip "$name" "not in GPU_CHECK_STEPS"; return 0; fi
    local files=() f
    for f in "$@"; do [[ -f "$f" ]] && files+=("$f"); done
    if ((${#files[@]} == 0)); then skip "$name" "no test files"; return 0; fi
    local cap=$(((TEST_CAP - TEST_USED) * pct / 100))
    local args=(-m gpu -q -rfE -p no:cacheprovider --maxfail=5 --durations=5 --durations-min=1.0)
    if ((HAS_PYTEST_TIMEOUT)); then
        args+=(--timeout="$TEST_TIMEOUT" --timeout-method=thread)  # one hung kernel: not the step
    fi
    # a fresh machine spends most of a group's time compiling (nvcc-free, but Triton's JIT and
    # the CUDA module loads are per process): workers in parallel on the one GPU; correctness
    # only, nothing here is timed
    # (not the attention group: its references at N 2k-8k hold GiBs each, and 8 workers ran
    # the H100 out of memory in 9 tests)
    if ((HAS_PYTEST_XDIST && TEST_WORKERS > 1)) && [[ "$name" != test-attn ]]; then
        args+=(-n "$TEST_WORKERS")
    fi
    local t0=$SECONDS
    step "$name" "$cap" "$PY" -m pytest "${args[@]}" "${files[@]}"
    TEST_USED=$((TEST_USED + SECONDS - t0))
    if ((LAST_RC == 5)); then STEP_STATE[-1]="ok (no gpu tests collected)"; fi
    local line
    line=$(grep -E "^(=+ )?[0-9]+ (passed|failed|error|skipped|deselected)|no tests ran" "$STEP_OUT" | tail -n 1 || true)
    TEST_LINES+=("$(printf '%-10s %s' "$name" "${line:-no result line (see the log)}")")
}

if ((CUDA_BUILT)); then
    test_group test-pool 25 tests/test_frame_pool.py
else
    skip test-pool "frame_pool CUDA not built"
fi
test_group test-rnn 55 tests/test_rnn_ops.py tests/test_rnn_modules.py tests/test_rnn_persistent.py
test_group test-attn 70 tests/test_cosine_attention.py tests/test_cosine_attention_*.py \
    tests/test_attention_modules.py
test_group test-dtl 100 tests/test_models.py tests/test_models_capture.py tests/test_models_grouped.py \
    tests/test_train.py tests/test_train_graphs.py tests/test_ops_eager.py tests/test_triton_launch.py \
    tests/test_memory_dtl.py

# ---- 3. benchmarks: one step per module, each with a share of what is left --------------------
QUICK=(--quick)
if [[ "${GPU_CHECK_QUICK:-1}" == 0 ]]; then QUICK=(); fi

# bench_step NAME MODULE PERCENT: runs one module with PERCENT % of the time left for benchmarks;
# the module stops starting new cases ~20 s before its hard limit, so it ends cleanly.
bench_step() {
    local name=$1 module=$2 pct=$3
    if ! wanted "$name"; then skip "$name" "not in GPU_CHECK_STEPS"; return 0; fi
    local avail cap inner
    avail=$(($(left) - SUMMARY_RESERVE))
    cap=$((avail * pct / 100))
    inner=$((cap > 50 ? cap - 20 : cap * 2 / 3))
    step "$name" "$cap" "$PY" bench/run.py --device cuda ${QUICK[@]+"${QUICK[@]}"} --only "$module" \
        --run-id "$RUN_ID" --time-budget "$inner" --no-summary-file
}

NO_CUDA=0
if ((HAS_CUDA != 1)); then
    NO_CUDA=1
    skip bench "no CUDA device"
else
    if ((CUDA_BUILT)); then
        # the launch-constant sweep of issue 13 (bench/sweep_frame_pool.py): only when listed in
        # GPU_CHECK_STEPS, so the default run keeps its time; bounded by its own --budget-s
        if [[ ",${GPU_CHECK_STEPS:-}," == *",sweep-pool,"* ]]; then
            step sweep-pool "${GPU_CHECK_SWEEP_CAP:-150}" "$PY" bench/sweep_frame_pool.py \
                --budget-s $(( ${GPU_CHECK_SWEEP_CAP:-150} - 40 )) --run-id "$RUN_ID"
        fi
        # ~22 % of what is left when other steps follow; all of it when none does (issue 13's
        # call: its acceptance figures must not be cut while time is unused)
        POOL_PCT=100
        for later in bench-rnn bench-attn bench-dtl sweep-rnn sweep-attn profile-dtl \
                     train-graphs host-overhead bench-dtl-compile; do
            if wanted "$later"; then POOL_PCT=22; break; fi
        done
        bench_step bench-pool bench_frame_pool "$POOL_PCT"
    else
        if [[ ",${GPU_CHECK_STEPS:-}," == *",sweep-pool,"* ]]; then
            skip sweep-pool "frame_pool CUDA not built"
        fi
        skip bench-pool "frame_pool CUDA not built"
    fi
    # opt-in sweeps and profiles (only when listed in GPU_CHECK_STEPS; each bounded by its cap):
    #   sweep-rnn    issue 10: the persistent kernel's variants against cuDNN (bench/sweep_rnn.py)
    #   sweep-attn   issue 11: the attention tile configurations (bench/sweep_cosine_attention.py)
    #   profile-dtl  issue 12: one training step profiled, eager fused and graphed
    #                (bench/profile_dtl.py; GPU busy fraction, top kernels, peak memory)
    #   train-graphs issue 12: a short dtl-fast train with CUDA graphs, then without
    if [[ ",${GPU_CHECK_STEPS:-}," == *",sweep-rnn,"* ]]; then
        step sweep-rnn "${GPU_CHECK_SWEEP_CAP:-150}" "$PY" bench/sweep_rnn.py \
            --budget-s $(( ${GPU_CHECK_SWEEP_CAP:-150} - 40 ))
    fi
    if [[ ",${GPU_CHECK_STEPS:-}," == *",sweep-attn,"* && -f bench/sweep_cosine_attention.py ]]; then
        step sweep-attn "${GPU_CHECK_SWEEP_CAP:-150}" "$PY" bench/sweep_cosine_attention.py \
            --time-budget $(( ${GPU_CHECK_SWEEP_CAP:-150} - 40 ))
    fi
    if [[ ",${GPU_CHECK_STEPS:-}," == *",profile-dtl,"* ]]; then
        step profile-dtl-fused "${GPU_CHECK_PROFILE_CAP:-90}" "$PY" bench/profile_dtl.py --device cuda --preset bench \
            --backend fused --tf32 --optimizer
        step profile-dtl-graphs "${GPU_CHECK_PROFILE_CAP:-90}" "$PY" bench/profile_dtl.py --device cuda --preset bench \
            --backend fused --tf32 --graphs
    fi
    #   bench-dtl-compile  issue 12: bench_dtl's compile case alone (the compiled reference took
    #                239 s to compile on an H200), for a call of its own; GPU_CHECK_COMPILE_CAP
    if [[ ",${GPU_CHECK_STEPS:-}," == *",bench-dtl-compile,"* ]]; then
        step bench-dtl-compile "${GPU_CHECK_COMPILE_CAP:-420}" "$PY" bench/bench_dtl.py \
            --device cuda --quick --compile-only --no-plot --run-id "$RUN_ID" \
            --time-budget $(( ${GPU_CHECK_COMPILE_CAP:-420} - 20 ))
    fi
    #   host-overhead issue 12: host time per op call, the eager entry points against the
    #                registered ops, and one Triton launch through the JIT vs a compiled handle
    #                (bench/host_overhead.py; ~30 s)
    if [[ ",${GPU_CHECK_STEPS:-}," == *",host-overhead,"* ]]; then
        step host-overhead 90 "$PY" bench/host_overhead.py --device cuda --run-id "$RUN_ID"
    fi
    if [[ ",${GPU_CHECK_STEPS:-}," == *",train-graphs,"* ]]; then
        step train-graphs 120 "$PY" -m dtl_fast.train --device cuda --backend fused --epochs 2 \
            --batch-size 64 --out "$RES/train_graphs_${SLUG}" --no-progress
        step train-eager 120 "$PY" -m dtl_fast.train --device cuda --backend fused --epochs 2 \
            --batch-size 64 --out "$RES/train_eager_${SLUG}" --no-progress --no-cuda-graphs
    fi
    bench_step bench-rnn bench_rnn 40               # ~31 %
    bench_step bench-attn bench_cosine_attention 45   # ~21 %
    bench_step bench-dtl bench_dtl 100              # the rest (~26 %): the DTL training step
fi

# ---- 4. outputs to $OUT first, then the summary (printed last), then $OUT again ---------------
copy_out
{
    if ((NO_CUDA)); then
        echo "no CUDA: nothing measured (every GPU figure stays unmeasured)"
    else
        # reads CSVs only: no CUDA initialisation in this step
        timeout --signal=TERM --kill-after=5 60 "$PY" bench/run.py --device cuda \
            --summary-only "$RUN_ID" --summary-file "$RES/summary_${SLUG}.txt" 2>&1 \
            || echo "(summary step ended with rc $?)"
    fi
    echo ""
    echo "==================== gpu_check summary ($(date -Is)) ===================="
    echo "$KERNELS"
    [[ -n "${DTL_FAST_GIT_REV:-}" ]] && echo "git revision: $DTL_FAST_GIT_REV"
    echo "gpu tests:"
    if ((${#TEST_LINES[@]})); then
        for l in "${TEST_LINES[@]}"; do echo "  $l"; done
    else
        echo "  -"
    fi
    printf '%-11s %-34s %6s\n' step result seconds
    for i in "${!STEP_NAMES[@]}"; do
        printf '%-11s %-34s %6s\n' "${STEP_NAMES[$i]}" "${STEP_STATE[$i]}" "${STEP_SECS[$i]}"
    done
    printf '%-11s %-34s %6s\n' total "" $((SECONDS - START))
} >"$SUMMARY" 2>&1 || true
cat "$SUMMARY" >>"$LOG"
copy_out

cat "$SUMMARY"
FAILED=0
for s in "${STEP_STATE[@]}"; do
    case "$s" in
        ok*) ;;
        "skipped (budget)") FAILED=1 ;;
        skipped*) ;;
        *) FAILED=1 ;;
    esac
done
if ((NO_CUDA)); then echo "no CUDA: nothing measured"; fi
exit $FAILED
