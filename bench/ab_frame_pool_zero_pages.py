"""A/B of the CPU frame pooling backward with and without its zero-page gradient.

The switch (DTL_FAST_DISABLE_ZERO_PAGES) is read once per process, so the two sides run in
alternating child processes, `--pairs` times. Each child times the raw
`torch.ops.dtl_fast.frame_pool_backward` (median and min of `--calls` calls, the gradient
freed after each, as in a training step) for mean and max at [B, T, D] float32. Lengths are
uniform in [1, T], as bench_frame_pool draws them.

    .venv/bin/python bench/ab_frame_pool_zero_pages.py --threads 2 \
        [--csv bench/results/frame_pool_zero_pages_ab.csv]

The CSV gets one row per child, mode and side. The table printed last gives the median over
the pairs of each side's per-child median.
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
import json, statistics, sys, time
import torch
import dtl_fast
B, T, D, threads, calls = (int(v) for v in sys.argv[1:6])
torch.set_num_threads(threads)
gen = torch.Generator().manual_seed(1000)
x = torch.randn(B, T, D, generator=gen)
lengths = torch.randint(1, T + 1, (B,), generator=gen)
op = torch.ops.dtl_fast
out = {"on": dtl_fast._extension._C.cpu_grad_on_zero_pages(x.numel() * x.element_size())}
for mode in ("mean", "max"):
    _, am = op.frame_pool(x, lengths, mode)
    g = torch.randn(B, D, generator=gen)
    op.frame_pool_backward(g, lengths, am, T, mode)
    ts = []
    for _ in range(calls):
        t0 = time.perf_counter()
        op.frame_pool_backward(g, lengths, am, T, mode)
        ts.append((time.perf_counter() - t0) * 1e3)
    out[mode] = [statistics.median(ts), min(ts)]
print(json.dumps(out))
"""


def run_child(shape, threads, calls, disable: bool) -> dict:
    env = {**os.environ, "DTL_FAST_DISABLE_ZERO_PAGES": "1" if disable else "0"}
    args = [sys.executable, "-c", CHILD, *map(str, shape), str(threads), str(calls)]
    res = subprocess.run(args, capture_output=True, text=True, env=env, check=False)
    if res.returncode != 0:
        raise SystemExit(f"child failed:\n{res.stderr}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
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
    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    rows, med = [], {}
    for pair in range(args.pairs):
        for disable in (True, False):
            side = "torch allocator" if disable else "zero pages"
            got = run_child(shape, args.threads, args.calls, disable)
            if got["on"] == disable:
                raise SystemExit(f"the {side} child reported zero pages {'on' if got['on'] else 'off'}"
                                 " (is the path available here? see dtl_fast/_C cpu_grad_on_zero_pages)")
            for mode in ("mean", "max"):
                m, lo = got[mode]
                med.setdefault((mode, side), []).append(m)
                rows.append({"timestamp": stamp, "pair": pair, "side": side, "mode": mode,
                             "shape": args.shape, "dtype": "float32", "threads": args.threads,
                             "calls": args.calls, "median_ms": round(m, 4), "min_ms": round(lo, 4)})
                print(f"pair {pair} {side:15s} {mode:4s} median {m:7.3f} ms  min {lo:7.3f} ms",
                      flush=True)
    if args.csv:
        new = not os.path.exists(args.csv)
        with open(args.csv, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            if new:
                w.writeheader()
            w.writerows(rows)
    print(f"\nframe_pool_backward {args.shape} float32, {args.threads} threads, "
          f"median over {args.pairs} pairs of per-child medians ({args.calls} calls):")
    for mode in ("mean", "max"):
        a = statistics.median(med[(mode, "torch allocator")])
        b = statistics.median(med[(mode, "zero pages")])
        print(f"  {mode:4s} torch allocator {a:7.3f} ms   zero pages {b:7.3f} ms   "
              f"{100 * (b - a) / a:+.1f} %")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
