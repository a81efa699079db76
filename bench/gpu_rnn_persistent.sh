#!/usr/bin/env bash
# Issue 10's GPU call: the persistent LSTM / GRU kernel's correctness on the card, then the sweep
# of its variants against cuDNN on the headline shapes. One prepared, bounded call:
#
#   1. setup:  the source tree on PYTHONPATH; dtl_fast.kernels resolves from an installed
#              (editable) package; without one, a CPU-only editable build (DTL_FAST_CUDA=0,
#              the Triton kernels need no CUDA build), under `timeout 150`
#   2. tests:  the `gpu` tests of the persistent kernel and of auto's dispatch
#              (tests/test_rnn_persistent.py) under `timeout 120`; the kernel's grid barrier
#              spins a bounded time, so a barrier that cannot complete fails a test in seconds
#   3. sweep:  bench/sweep_rnn.py --budget-s $RNN_SWEEP_BUDGET (default 240) under
#              `timeout $((budget + 60))`: BLOCK_N {16, 32} x warps {4, 8} x W resident / streamed,
#              and the loop kernel, against cuDNN, forward and forward+backward; rows in
#              bench/results/rnn_sweep.csv; its table prints last
#   4. outputs copied to $OUT when set (the CSV and this log)
#
# Without CUDA it runs the sweep's dry run (the plan, and the step mode in the Triton interpreter
# on a tiny shape against the reference), prints "no CUDA", and exits with the dry run's status.
#
#     bash bench/gpu_rnn_persistent.sh                 # ~6 min on an H100 / H200
#     RNN_SWEEP_BUDGET=120 bash bench/gpu_rnn_persistent.sh
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  for c in python3 python; do
    if command -v "$c" >/dev/null && "$c" -c "import torch" 2>/dev/null; then PY=$c; break; fi
  done
fi
[ -n "$PY" ] || { echo "no python with torch found"; exit 1; }
BUDGET=${RNN_SWEEP_BUDGET:-240}

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "no CUDA: nothing measured; the sweep's dry run (interpreter) follows"
  TRITON_INTERPRET=1 timeout 300 "$PY" bench/sweep_rnn.py --dry-run
  exit $?
fi
LOG=bench/results/gpu_rnn_persistent.log
mkdir -p bench/results
exec > >(tee "$LOG") 2>&1

status=0
if ! "$PY" -c "import dtl_fast.kernels.rnn_persistent" 2>/dev/null; then
  echo "== setup: CPU-only editable build (the Triton kernels need no CUDA build)"
  DTL_FAST_CUDA=0 timeout 150 "$PY" -m pip install --no-deps --no-build-isolation --no-index -e . \
    >/dev/null || { echo "setup FAILED"; exit 1; }
fi
"$PY" -c "import torch, triton; print('device:', torch.cuda.get_device_name(), ' torch', torch.__version__, ' triton', triton.__version__)"

echo "== tests: gpu tests of the persistent kernel (timeout 120)"
timeout 120 "$PY" -m pytest -q -m gpu -x tests/test_rnn_persistent.py -p no:cacheprovider
rc=$?; [ $rc -eq 0 ] || { echo "tests: rc=$rc"; status=1; }

echo "== sweep (budget ${BUDGET} s)"
timeout $((BUDGET + 60)) "$PY" bench/sweep_rnn.py --budget-s "$BUDGET"
rc=$?; [ $rc -eq 0 ] || { echo "sweep: rc=$rc"; status=1; }

if [ -n "${OUT:-}" ]; then
  cp bench/results/rnn_sweep.csv "$LOG" "$OUT"/ 2>/dev/null || true
fi
echo "== gpu_rnn_persistent: tests and sweep done, status $status (table above)"
exit $status
