"""A/B of the CPU frame pooling backward's gradient memory (where it lives, how it is written),
with and without each of its choices.

Three switches, each read once per process, so the two sides run in alternating child
processes, `--pairs` times:
  --switch zero-pages  gradients of >= 32 MiB on fresh zero pages (off: DTL_FAST_DISABLE_ZERO_PAGES=1),
                       the cache off on both sides (DTL_FAST_CPU_GRAD_CACHE_MB=0), which would
                       otherwise take them up to its bound (s34)
  --switch cache       gradients of >= 4 MiB from the op's cache of warm blocks, within its
                       bound (off: DTL_FAST_CPU_GRAD_CACHE_MB=0: torch's allocator below 32 MiB,
                       fresh zero pages from there)
  --switch nt-stores   non-temporal stores only from half (rows stored one by one) / the whole
                       (rows written in bulk) last-level cache, the rest into the cache with
                       memcpy / memset / vector stores (off: DTL_FAST_CPU_NT_STORE_MIN_MB=0,
                       every row streamed, as before s23). The children check the bulk rule
                       only: where max rows stream on both sides (16 MiB on a 32 MiB L3), the
                       max column compares the padding writes alone
Each child times, for mean and max at [B, T, D] float32 (median and min of `--calls` calls,
the gradient freed after each, as in a training step), either the raw
`torch.ops.dtl_fast.frame_pool_backward` (`--through raw`) or forward + backward through
`torch.autograd.grad` of an intermediate input (`--through autograd`: what bench_frame_pool's
forward+backward rows time, less the Python wrapper `dtl_fast.ops.frame_pool`), and counts
the page faults per call. Lengths are uniform in
[1, T], as bench_frame_pool draws them.

    .venv/bin/python bench/ab_frame_pool_grad_alloc.py --threads 2     # zero pages, raw
    .venv/bin/python bench/ab_frame_pool_grad_alloc.py --switch cache --shape 64x64x1024 \
        --through autograd --threads 1 [--csv bench/results/frame_pool_grad_cache_ab.csv]

The CSV gets one row per child, mode and side (a file whose header differs is refused). The
table printed last gives the median over the pairs of each side's per-child median.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import statistics
import subprocess
import sys

CHILD = r"""
import json, resource, statistics, sys, time
import torch
import dtl_fast
B, T, D, threads, calls = (int(v) for v in sys.argv[1:6])
switch, through = sys.argv[6], sys.argv[7]
torch.set_num_threads(threads)
gen = torch.Generator().manual_seed(1000)
x = torch.randn(B, T, D, generator=gen)
lengths = torch.randint(1, T + 1, (B,), generator=gen)
op = torch.ops.dtl_fast
C = dtl_fast._extension._C
nbytes = x.numel() * x.element_size()
if switch == "zero-pages":
    on = C.cpu_grad_on_zero_pages(nbytes)
elif switch == "cache":
    on = C.cpu_grad_from_cache(nbytes)
else:  # nt-stores: the bulk rows (mean, padding) go into the cache
    on = nbytes < 2 * C.cpu_nt_store_rule()[0]
out = {"on": on}
h = x.detach().requires_grad_(True) * 1
for mode in ("mean", "max"):
    _, am = op.frame_pool(x, lengths, mode)
    g = torch.randn(B, D, generator=gen)
    if through == "raw":
        call = lambda: op.frame_pool_backward(g, lengths, am, T, mode)
    else:
        call = lambda: torch.autograd.grad(op.frame_pool(h, lengths, mode)[0], h, g)
    call()
    ts = []
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(calls):
        t0 = time.perf_counter()
        call()
        ts.append((time.perf_counter() - t0) * 1e3)
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / calls
    out[mode] = [statistics.median(ts), min(ts), faults]
print(json.dumps(out))
"""

# switch -> (environment variable, its value for the "off" side, its value for "on", side names,
# variables set alike on both sides)
SWITCHES = {
    "zero-pages": ("DTL_FAST_DISABLE_ZERO_PAGES", "1", "0", ("torch allocator", "zero pages"),
                   {"DTL_FAST_CPU_GRAD_CACHE_MB": "0"}),
    "cache": ("DTL_FAST_CPU_GRAD_CACHE_MB", "0", "", ("cache off", "grad cache"), {}),
    "nt-stores": ("DTL_FAST_CPU_NT_STORE_MIN_MB", "0", "", ("all streamed", "cache rule"), {}),
}


def run_child(shape, threads, calls, switch: str, through: str, off: bool) -> dict:
    var, off_value, on_value, _, both = SWITCHES[switch]
    env = {**os.environ, **both, var: off_value if off else on_value}
    args = [sys.executable, "-c", CHILD, *map(str, shape), str(threads), str(calls), switch,
            through]
    res = subprocess.run(args, capture_output=True, text=True, env=env, check=False)
    if res.returncode != 0:
        raise SystemExit(f"child failed:\n{res.stderr}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--switch", choices=sorted(SWITCHES), default="zero-pages")
    ap.add_argument("--through", choices=("raw", "autograd"), default="raw",
                    help="time the raw backward op, or forward + backward via autograd.grad")
    ap.add_argument("--shape", default="256x32x2048", help="BxTxD (default 256x32x2048)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--pairs", type=int, default=4)
    ap.add_argument("--calls", type=int, default=41)
    ap.add_argument("--csv", default=None, help="append one row per child and mode here")
    args = ap.parse_args(argv)
    shape = tuple(int(v) for v in args.shape.lower().split("x"))
    if len(shape) != 3 or min(shape) < 1:
        ap.error(f"--shape must be BxTxD with positive sizes, got {args.shape!r}")
    for name in ("threads", "pairs", "calls"):
        if getattr(args, name) < 1:
            ap.error(f"--{name} must be >= 1")
    off_side, on_side = SWITCHES[args.switch][3]
    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    rows, med = [], {}
    for pair in range(args.pairs):
        for off in (True, False):
            side = off_side if off else on_side
            got = run_child(shape, args.threads, args.calls, args.switch, args.through, off)
            if got["on"] == off:
                raise SystemExit(f"the {side} child reported its path {'on' if got['on'] else 'off'}"
                                 f" (is the {args.switch} path available here, at this size? see "
                                 "dtl_fast._C cpu_grad_on_zero_pages / cpu_grad_from_cache / "
                                 "cpu_nt_store_rule)")
            for mode in ("mean", "max"):
                m, lo, faults = got[mode]
                med.setdefault((mode, side), []).append(m)
                rows.append({"timestamp": stamp, "pair": pair, "side": side, "mode": mode,
                             "shape": args.shape, "dtype": "float32", "threads": args.threads,
                             "calls": args.calls, "median_ms": round(m, 4), "min_ms": round(lo, 4),
                             "switch": args.switch, "through": args.through,
                             "faults_per_call": round(faults, 1)})
                print(f"pair {pair} {side:15s} {mode:4s} median {m:7.3f} ms  min {lo:7.3f} ms  "
                      f"faults/call {faults:6.1f}", flush=True)
    if args.csv:
        write_rows(args.csv, rows)
    what = "frame_pool_backward" if args.through == "raw" else "forward + backward (autograd.grad)"
    print(f"\n{what} {args.shape} float32, {args.threads} threads, "
          f"median over {args.pairs} pairs of per-child medians ({args.calls} calls):")
    for mode in ("mean", "max"):
        a = statistics.median(med[(mode, off_side)])
        b = statistics.median(med[(mode, on_side)])
        print(f"  {mode:4s} {off_side} {a:7.3f} ms   {on_side} {b:7.3f} ms   "
              f"{100 * (b - a) / a:+.1f} %")
    return 0


def write_rows(path: str, rows: list[dict]) -> None:
    """Appends rows to the CSV at path (header first for a new file); a file with another
    header is refused rather than mixed."""
    fields = list(rows[0])
    if os.path.exists(path) and os.path.getsize(path) > 0:
        with open(path, newline="") as f:
            have = next(csv.reader(f), [])
        if have != fields:
            raise SystemExit(f"--csv {path}: its header {have} is not this script's {fields}; "
                             "write to a new file")
        new = False
    else:
        new = True
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        if new:
            w.writeheader()
        w.writerows(rows)


if __name__ == "__main__":
    raise SystemExit(main())
