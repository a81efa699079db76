"""Shared benchmark harness for dtl_fast kernels.

Every kernel's bench module (bench/bench_<kernel>.py) uses this file for:

- timing: ``time_ms(fn, device=..., grad_to_none=...)`` -> (median, p20, p80) in milliseconds.
  CUDA: ``triton.testing.do_bench`` with ``quantiles=[0.5, 0.2, 0.8]`` (its default return is the
  mean, so the median is asked for explicitly; it flushes L2 and clears ``grad_to_none`` between
  calls outside the timed region). CPU: a steady ``time.perf_counter`` timer, warm-up first, then
  samples until both a minimum time and a minimum sample count are reached.
- the environment stamp (device name, torch / triton / CUDA versions, threads, date, git revision),
- the correctness gate (``gate``): a provider whose output does not match the reference is not
  timed -- "a speedup is never reported on a red gate",
- result rows appended to ``<out>/<kernel>.csv`` (header written once) with the ratio against the
  baseline provider timed in the same run (baseline_ms / this_ms: > 1 means faster than baseline),
- a compact stdout table and a bar plot per kernel (``<out>/<kernel>_<device-slug>.png``).

Nothing here imports dtl_fast, so the harness works (and can be tested) before the package builds.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime as _dt
import gc
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
DEFAULT_OUT = BENCH_DIR / "results"

# Column order of every results CSV. Add new columns at the end only.
COLUMNS = [
    "kernel",  # e.g. frame_pool
    "provider",  # e.g. reference / segment_reduce / dtl_fast
    "mode",  # forward / forward+backward / backward ...
    "variant",  # kernel-specific sub-case, e.g. the pool mode mean / max / sum
    "shape",  # e.g. 64x64x1024
    "dtype",  # e.g. float32
    "device",  # cpu / cuda
    "device_name",  # e.g. "NVIDIA H100 80GB HBM3" or "AMD EPYC (2 cores, 2 threads)"
    "torch",
    "triton",
    "cuda",
    "median_ms",
    "p20_ms",
    "p80_ms",
    "baseline",  # name of the baseline provider of this run
    "ratio",  # baseline median / this median (same run, same case); > 1 = faster
    "extra",  # JSON object: GB/s, % of copy bandwidth, bytes, ...
    "status",  # ok | gate-failed: ... | skipped: ... | error: ...
    "timestamp",
    "run_id",  # one id per bench invocation (run.py passes one id to every module)
    "git_rev",
]


# ----------------------------------------------------------------------------------------------
# environment stamp
# ----------------------------------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def device_name(device: str) -> str:
    """Human-readable name of the device the benchmark runs on."""
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    cores = os.cpu_count() or 0
    return f"{_cpu_model()} ({cores} cores, {torch.get_num_threads()} threads)"


def device_slug(device: str) -> str:
    """File-name friendly device tag, e.g. ``nvidia-h100-80gb-hbm3`` or ``cpu-amd-epyc-2t``."""
    if device.startswith("cuda"):
        name = torch.cuda.get_device_name(torch.device(device))
    else:
        name = f"cpu {_cpu_model()} {torch.get_num_threads()}t"
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return slug[:60] or "device"


def _git_rev() -> str:
    """The checkout's revision (+dirty), else $DTL_FAST_GIT_REV (a copy of the tree without .git,
    e.g. on a lent GPU machine), else "none"."""
    env = os.environ.get("DTL_FAST_GIT_REV", "").strip()
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=5,
        )
        rev = out.stdout.strip()
        if out.returncode != 0 or not rev:
            return env or "none"
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=5,
        )
        return rev + ("+dirty" if dirty.stdout.strip() else "")
    except Exception:  # no git, not a checkout, ...
        return env or "none"


def _loadavg() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "?"


def env_stamp(device: str) -> dict[str, Any]:
    """Versions, device and date: stored with every row."""
    try:
        import triton  # noqa: F401

        triton_version = triton.__version__
    except Exception:
        triton_version = "none"
    stamp: dict[str, Any] = {
        "device": "cuda" if device.startswith("cuda") else "cpu",
        "device_name": device_name(device),
        "device_slug": device_slug(device),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda or "none",
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "git_rev": _git_rev(),
        "loadavg": _loadavg(),
    }
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(torch.device(device))
        stamp["sm_count"] = props.multi_processor_count
        stamp["capability"] = f"{props.major}.{props.minor}"
        stamp["memory_gib"] = round(props.total_memory / 2**30, 1)
    try:  # the package may not exist yet, or may not have info()
        import dtl_fast

        info = getattr(dtl_fast, "info", None)
        stamp["dtl_fast"] = info() if callable(info) else getattr(dtl_fast, "__version__", "?")
    except Exception as exc:  # noqa: BLE001
        stamp["dtl_fast"] = f"unavailable ({type(exc).__name__})"
    return stamp


def format_stamp(stamp: dict[str, Any]) -> str:
    keys = ["device_name", "torch", "triton", "cuda", "threads", "date", "git_rev", "loadavg"]
    return "  ".join(f"{k}={stamp.get(k)}" for k in keys)


# ----------------------------------------------------------------------------------------------
# timing
# ----------------------------------------------------------------------------------------------


def _clear_grads(grad_to_none: Sequence[torch.Tensor] | None) -> None:
    if grad_to_none:
        for t in grad_to_none:
            t.grad = None


def _quantiles(samples: Sequence[float]) -> tuple[float, float, float]:
    s = sorted(samples)
    if len(s) == 1:
        return s[0], s[0], s[0]
    q = statistics.quantiles(s, n=10, method="inclusive")  # deciles: q[1]=p20, q[7]=p80
    return statistics.median(s), q[1], q[7]


_CPU_FLUSH: torch.Tensor | None = None


def _flush_cpu_cache(nbytes: int = 256 << 20) -> None:
    global _CPU_FLUSH
    if _CPU_FLUSH is None or _CPU_FLUSH.numel() * 4 != nbytes:
        _CPU_FLUSH = torch.empty(nbytes // 4, dtype=torch.float32)
    _CPU_FLUSH.fill_(1.0)


class _CpuTimed:
    """One CPU callable under the steady timer: warm-up, then one sample per ``sample()``."""

    def __init__(self, fn, grad_to_none, warmup_ms: float, flush_cache: bool):
        self.fn, self.grads, self.flush = fn, grad_to_none, flush_cache
        self.samples: list[float] = []
        clock = time.perf_counter
        t0 = clock()
        n = 0
        while n < 2 or (clock() - t0) * 1e3 < warmup_ms:  # >= 2 calls and >= warmup_ms
            _clear_grads(self.grads)
            fn()
            n += 1
        per_call = (clock() - t0) / n
        # a sample must sit well above timer resolution and call overhead: batch several
        # calls into one sample when one call is under ~1 ms
        self.inner = math.ceil(1e-3 / max(per_call, 1e-9)) if per_call < 1e-3 else 1

    def settle(self) -> None:
        """One untimed call: back to this provider's steady state after another ran."""
        _clear_grads(self.grads)
        self.fn()

    def sample(self) -> None:
        clock = time.perf_counter
        if self.flush:
            _flush_cpu_cache()
        if self.inner == 1:
            _clear_grads(self.grads)
            s = clock()
            self.fn()
            self.samples.append((clock() - s) * 1e3)
        else:
            s = clock()
            for _ in range(self.inner):
                _clear_grads(self.grads)
                self.fn()
            self.samples.append((clock() - s) * 1e3 / self.inner)


def _time_cpu(
    fn: Callable[[], Any],
    grad_to_none: Sequence[torch.Tensor] | None,
    warmup_ms: float,
    rep_ms: float,
    min_samples: int,
    max_samples: int,
    max_ms: float,
    flush_cache: bool,
) -> tuple[float, float, float]:
    t = _CpuTimed(fn, grad_to_none, warmup_ms, flush_cache)
    start = time.perf_counter()
    while True:
        t.sample()
        elapsed_ms = (time.perf_counter() - start) * 1e3
        n = len(t.samples)
        if n >= max_samples or (n >= min_samples and elapsed_ms >= rep_ms):
            break
        if n >= 3 and elapsed_ms >= max_ms:  # very slow call: do not run forever
            break
    return _quantiles(t.samples)


def _time_cuda_events(
    fn: Callable[[], Any],
    grad_to_none: Sequence[torch.Tensor] | None,
    warmup_ms: float,
    rep_ms: float,
    flush: str | Callable[[], Any] = "zero",
) -> tuple[float, float, float]:
    """CUDA events around each call with the L2 flushed before it (outside the timed region):
    flush="zero" writes a 256 MiB buffer, as do_bench does (this is the fallback when triton is
    not installed); flush="read" reads one instead (``time_read_flushed``); a callable is run
    instead of a flush (``time_after``)."""
    if callable(flush):
        clear = flush
    elif flush == "zero":
        cache = torch.empty(256 << 20, dtype=torch.int8, device="cuda")
        clear = cache.zero_
    elif flush == "read":
        cache = torch.ones(64 << 20, dtype=torch.float32, device="cuda")
        clear = cache.sum
    else:
        raise ValueError(f"flush must be 'zero', 'read' or a callable, got {flush!r}")
    fn()
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(5):
        clear()
        fn()
    e.record()
    torch.cuda.synchronize()
    est = max(s.elapsed_time(e) / 5, 1e-3)
    n_warm, n_rep = max(1, int(warmup_ms / est)), max(1, int(rep_ms / est))
    for _ in range(n_warm):
        fn()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n_rep)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n_rep)]
    for i in range(n_rep):
        _clear_grads(grad_to_none)
        clear()
        starts[i].record()
        fn()
        ends[i].record()
    torch.cuda.synchronize()
    return _quantiles([a.elapsed_time(b) for a, b in zip(starts, ends)])


def time_read_flushed(fn: Callable[[], Any], *, device: str, warmup: float = 25,
                      rep: float = 100) -> tuple[float, float, float]:
    """(median, p20, p80) ms of ``fn()`` with the L2 flushed before each call by *reading* a
    256 MiB buffer: the inputs start cold as with do_bench, but the L2 holds no dirty lines, so
    the call pays for no write-back that is not its own. It is not neutral either: what the call
    itself leaves dirty in L2 is written back after its time (a credit to writers). On a CPU
    device it is ``time_ms``. bench/NOTES.md (issue 13, s24) has why this matters."""
    if not device.startswith("cuda"):
        return time_ms(fn, device=device, warmup=warmup, rep=rep)
    return _time_cuda_events(fn, None, warmup, rep, flush="read")


def time_after(fn: Callable[[], Any], before: Callable[[], Any], *, device: str,
               warmup: float = 25, rep: float = 100) -> tuple[float, float, float]:
    """(median, p20, p80) ms of ``fn()`` with ``before()`` run (untimed) ahead of each call, in
    place of a cache flush: e.g. rewriting the call's input, so that it finds the L2 as the
    layer that produced that input would leave it (the last lines written, dirty). On a CPU
    device ``before`` runs too, and each call is timed on the wall clock."""
    if not device.startswith("cuda"):
        samples = []
        start = time.perf_counter()
        warm_end, deadline = start + warmup * 1e-3, start + (warmup + rep) * 1e-3
        while True:
            before()
            t0 = time.perf_counter()
            fn()
            t1 = time.perf_counter()
            if t0 >= warm_end:  # calls of the first `warmup` ms are not kept
                samples.append((t1 - t0) * 1e3)
            if t1 > deadline and len(samples) >= 3:
                break
        return _quantiles(samples)
    return _time_cuda_events(fn, None, warmup, rep, flush=before)


def time_steady(fns: Sequence[Callable[[], Any]], *, device: str, target_ms: float = 20.0,
                repeats: int = 7, info: dict[str, Any] | None = None) -> tuple[float, float, float]:
    """Per-call (median, p20, p80) ms of a stream of back-to-back calls, ``fns[i % len(fns)]``
    in turn, with nothing between them: each stream of >= ``target_ms`` is timed as a whole
    (CUDA events; a CPU device uses the wall clock), ``repeats`` streams after a warm-up stream.

    Why (issue 13): do_bench zeroes a 256 MiB buffer before each call, and the dirty lines it
    leaves in L2 may be written back inside the next call's time. That would charge a read-only
    op for traffic that is not its own, while an op that writes more than the L2 holds leaves
    as much of its own for later (a hypothesis: bench/NOTES.md, s24). In a stream, every call's
    write-back lands inside the stream, so every op (and the copy reference) pays exactly for
    its own bytes, whatever the L2 does. Give ``fns`` calls on
    different inputs, and writing different outputs, whose total is several times the L2 (a few
    hundred MB on an H100) so that no call finds the previous ones' bytes in cache.

    The host must enqueue faster than the device runs, or the stream times the host: ``info``
    (a dict) receives ``host_ms``, the median wall time per call of the launch loop over the
    first 64 calls of a stream (CUDA), and ``host_bound``, True when that is at least 0.9 of
    the per-call time."""
    if not fns:
        raise ValueError("time_steady needs at least one call")
    cuda = device.startswith("cuda")
    host: list[float] = []

    def stream(n: int) -> float:
        if cuda:
            # The host is timed over the first calls only: once the launch queue is full, the
            # loop waits for the device and its time says nothing about the host.
            k = min(n, 64)
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            t0 = time.perf_counter()
            for i in range(n):
                fns[i % len(fns)]()
                if i == k - 1:
                    host.append((time.perf_counter() - t0) * 1e3 / k)
            e.record()
            torch.cuda.synchronize()
            return s.elapsed_time(e)
        t0 = time.perf_counter()
        for i in range(n):
            fns[i % len(fns)]()
        host.append((time.perf_counter() - t0) * 1e3 / n)
        return host[-1] * n

    stream(len(fns))  # warm-up: allocator, caches, lazy initialisation
    sync(device)
    est = max(stream(len(fns)) / len(fns), 1e-4)
    n = max(len(fns), math.ceil(target_ms / est / len(fns)) * len(fns))
    del host[:]
    timing = _quantiles([stream(n) / n for _ in range(repeats)])
    if info is not None:
        info["host_ms"] = statistics.median(host)
        info["host_bound"] = info["host_ms"] >= 0.9 * timing[0]
    return timing


def copy_bandwidth_steady(device: str, nbytes: int = 256 << 20,
                          copies: int = 3) -> dict[str, float]:
    """``copy_bandwidth`` timed as ``time_steady``: back-to-back ``dst.copy_(src_i)`` over
    ``copies`` sources of ``nbytes`` each (bytes moved per call = 2 * nbytes), so each copy pays
    for writing back the previous one's dirty lines, as an op timed the same way does."""
    n = nbytes // 4
    srcs = [torch.empty(n, dtype=torch.float32, device=device).uniform_() for _ in range(copies)]
    dst = torch.empty_like(srcs[0])
    try:
        med, _, _ = time_steady([lambda s=s: dst.copy_(s) for s in srcs], device=device)
    finally:
        del srcs, dst
        free(device)
    moved = 2 * n * 4
    return {"copy_gbps": moved / (med * 1e-3) / 1e9, "copy_bytes": moved, "copy_ms": med}


def time_ms(
    fn: Callable[[], Any],
    *,
    device: str,
    grad_to_none: Sequence[torch.Tensor] | None = None,
    warmup: float | None = None,
    rep: float | None = None,
    min_samples: int = 10,
    max_samples: int = 2000,
    max_ms: float = 5000.0,
    flush_cache: bool = False,
) -> tuple[float, float, float]:
    """Time ``fn()``; returns (median, p20, p80) in milliseconds.

    ``warmup`` and ``rep`` are in milliseconds (as in ``triton.testing.do_bench``); defaults:
    CUDA 25 / 100, CPU 100 / 200. On CPU the sampling stops once ``rep`` ms and ``min_samples``
    samples are both reached (or ``max_samples``, or ``max_ms`` with at least 3 samples).
    ``grad_to_none``: tensors whose ``.grad`` is set to None before every call (so a backward
    pass allocates its gradient each time instead of accumulating into a warm buffer).
    ``flush_cache`` (CPU only): write 256 MB before every sample so the inputs start out of
    cache; do_bench always flushes L2 on CUDA.
    """
    if device.startswith("cuda"):
        warmup = 25 if warmup is None else warmup
        rep = 100 if rep is None else rep
        try:
            from triton.testing import do_bench
        except Exception:  # noqa: BLE001
            return _time_cuda_events(fn, grad_to_none, warmup, rep)
        med, p20, p80 = do_bench(
            fn,
            warmup=warmup,
            rep=rep,
            grad_to_none=list(grad_to_none) if grad_to_none else None,
            quantiles=[0.5, 0.2, 0.8],
        )
        return float(med), float(p20), float(p80)
    warmup = 100 if warmup is None else warmup
    rep = 200 if rep is None else rep
    return _time_cpu(fn, grad_to_none, warmup, rep, min_samples, max_samples, max_ms, flush_cache)


def time_many(
    fns: dict[str, Callable[[], Any]],
    *,
    device: str,
    grad_to_none: dict[str, Sequence[torch.Tensor]] | None = None,
    warmup: float | None = None,
    rep: float | None = None,
    min_samples: int = 10,
    max_samples: int = 2000,
    max_ms: float = 5000.0,
    flush_cache: bool = False,
) -> dict[str, tuple[float, float, float]]:
    """Times several providers of one case; returns name -> (median, p20, p80) in ms.

    CUDA: ``time_ms`` (do_bench) for each in turn -- the GPU is not shared.
    CPU: rounds of blocks -- every round runs each provider (in a rotating order) for one
    untimed call and then ``block`` timed samples back to back. Rounds make a change in
    background load (other processes on a shared machine) hit every provider alike; blocks keep
    each provider in its steady state (its own buffers and cache contents, as in a loop that
    calls it) instead of timing it right after another provider has evicted everything. Stops
    when every provider has ``min_samples`` samples and ``rep`` ms of samples, or at
    ``max_samples``, or after ``max_ms`` ms per provider with at least 3 samples each.
    """
    grad_to_none = grad_to_none or {}
    if device.startswith("cuda"):
        return {
            k: time_ms(f, device=device, grad_to_none=grad_to_none.get(k), warmup=warmup, rep=rep)
            for k, f in fns.items()
        }
    warmup = 100 if warmup is None else warmup
    rep = 200 if rep is None else rep
    timed = {k: _CpuTimed(f, grad_to_none.get(k), warmup, flush_cache) for k, f in fns.items()}
    names = list(timed)
    start = time.perf_counter()
    rnd = 0
    block = 5
    while True:
        order = names[rnd % len(names):] + names[: rnd % len(names)]
        for k in order:
            timed[k].settle()
            for _ in range(block):
                timed[k].sample()
        rnd += block
        elapsed_ms = (time.perf_counter() - start) * 1e3
        per = elapsed_ms / len(names)
        if rnd >= max_samples or (rnd >= min_samples and per >= rep):
            break
        if rnd >= 3 and per >= max_ms:
            break
    return {k: _quantiles(t.samples) for k, t in timed.items()}


def noisy(timing: tuple[float, float, float] | None, limit: float = 0.25) -> bool:
    """True when the p20-p80 spread is more than ``limit`` of the median."""
    if not timing or not timing[0]:
        return False
    med, p20, p80 = timing
    return (p80 - p20) / med > limit


def copy_bandwidth(device: str, nbytes: int | None = None) -> dict[str, float]:
    """Device-to-device copy ``dst.copy_(src)``; bytes moved = 2 * size (read + write).

    CUDA: a 1 GiB buffer timed with do_bench. CPU: 256 MiB (memcpy-like through torch).
    Returns {"copy_gbps": ..., "copy_bytes": ..., "copy_ms": ...}.
    """
    if nbytes is None:
        nbytes = (1 << 30) if device.startswith("cuda") else (256 << 20)
    n = nbytes // 4
    src = torch.empty(n, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    med, _, _ = time_ms(lambda: dst.copy_(src), device=device, warmup=50, rep=200)
    moved = 2 * n * 4
    del src, dst
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return {"copy_gbps": moved / (med * 1e-3) / 1e9, "copy_bytes": moved, "copy_ms": med}


# ----------------------------------------------------------------------------------------------
# correctness gate
# ----------------------------------------------------------------------------------------------

# assert_close tolerances against the reference in the same dtype, and the bound on the relative
# error || out - ref64 || / || ref64 || against a float64 reference (DESIGN.md "Numerics").
_TOL = {
    torch.float64: dict(rtol=1e-7, atol=1e-7, rel64=1e-12),
    torch.float32: dict(rtol=1e-4, atol=1e-5, rel64=1e-5),
    torch.bfloat16: dict(rtol=2e-2, atol=2e-2, rel64=1e-2),
    torch.float16: dict(rtol=5e-3, atol=5e-3, rel64=1e-2),
}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """|| out - ref || / || ref || in float64 (NaN if out has NaN)."""
    o, r = out.detach().double(), ref.detach().double()
    denom = r.norm().item()
    num = (o - r).norm().item()
    return num / denom if denom > 0 else num


def gate(
    out: torch.Tensor,
    expected: torch.Tensor,
    *,
    ref64: torch.Tensor | None = None,
    what: str = "output",
) -> tuple[bool, str]:
    """Checks ``out`` against the reference: finite, same shape, assert_close with dtype
    tolerances, and (when given) relative error against a float64 reference.
    Returns (ok, message); the message names the numbers either way."""
    if out.shape != expected.shape:
        return False, f"{what}: shape {tuple(out.shape)} != {tuple(expected.shape)}"
    if out.dtype != expected.dtype:
        return False, f"{what}: dtype {out.dtype} != {expected.dtype}"
    n_nan = int((~torch.isfinite(out)).sum().item()) - int((~torch.isfinite(expected)).sum().item())
    if n_nan > 0:
        return False, f"{what}: {n_nan} more non-finite values than the reference"
    tol = _TOL.get(out.dtype, _TOL[torch.float32])
    msgs = []
    try:
        torch.testing.assert_close(out, expected, rtol=tol["rtol"], atol=tol["atol"])
    except AssertionError as exc:
        first = str(exc).strip().splitlines()
        return False, f"{what}: " + " | ".join(first[:4])
    if ref64 is not None:
        err = rel_err(out, ref64)
        if not (err <= tol["rel64"]):  # catches NaN too
            return False, f"{what}: rel err vs float64 {err:.2e} > {tol['rel64']:.0e}"
        msgs.append(f"rel64={err:.1e}")
    return True, f"{what}: ok " + " ".join(msgs)


# ----------------------------------------------------------------------------------------------
# rows, CSV, table
# ----------------------------------------------------------------------------------------------


def shape_str(shape: Iterable[int]) -> str:
    return "x".join(str(int(s)) for s in shape)


def dtype_str(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def new_run_id() -> str:
    return _dt.datetime.now().strftime("%Y%m%dT%H%M%S") + f"-{os.getpid()}"


def make_row(
    *,
    kernel: str,
    provider: str,
    mode: str,
    variant: str,
    shape: Sequence[int] | str,
    dtype: torch.dtype | str,
    stamp: dict[str, Any],
    timing: tuple[float, float, float] | None,
    baseline: str,
    baseline_ms: float | None,
    extra: dict[str, Any] | None = None,
    status: str = "ok",
    run_id: str = "",
) -> dict[str, Any]:
    med, p20, p80 = timing if timing is not None else (None, None, None)
    ratio = None
    if med and baseline_ms:
        ratio = baseline_ms / med
    return {
        "kernel": kernel,
        "provider": provider,
        "mode": mode,
        "variant": variant,
        "shape": shape if isinstance(shape, str) else shape_str(shape),
        "dtype": dtype if isinstance(dtype, str) else dtype_str(dtype),
        "device": stamp["device"],
        "device_name": stamp["device_name"],
        "torch": stamp["torch"],
        "triton": stamp["triton"],
        "cuda": stamp["cuda"],
        "median_ms": _fmt(med, 6),
        "p20_ms": _fmt(p20, 6),
        "p80_ms": _fmt(p80, 6),
        "baseline": baseline,
        "ratio": _fmt(ratio, 4),
        "extra": json.dumps(extra or {}, sort_keys=True, separators=(",", ":")),
        "status": status,
        "timestamp": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "run_id": run_id,
        "git_rev": stamp.get("git_rev", ""),
    }


def _fmt(v: float | None, digits: int) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return ""
    return f"{v:.{digits}g}"


def fnum(v: Any) -> float | None:
    """Parses a numeric CSV cell ('' -> None)."""
    try:
        f = float(v)
        return f if math.isfinite(f) else None
    except (TypeError, ValueError):
        return None


class ResultWriter:
    """Appends rows to ``<out>/<kernel>.csv`` as they are measured (a killed run keeps what it
    measured). The header is written once; if an existing file has another header it is moved
    aside to ``<kernel>.csv.old-<date>`` rather than mixed."""

    def __init__(self, out_dir: Path | str, kernel: str):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.out_dir / f"{kernel}.csv"
        if self.path.exists() and self.path.stat().st_size > 0:
            with open(self.path, newline="") as f:
                header = next(csv.reader(f), [])
            if header != COLUMNS:
                aside = self.path.with_name(
                    f"{self.path.name}.old-{_dt.datetime.now():%Y%m%dT%H%M%S}"
                )
                self.path.rename(aside)
                print(f"[bench] {self.path.name}: other columns; old file moved to {aside.name}")

    def append(self, row: dict[str, Any]) -> None:
        new = not self.path.exists() or self.path.stat().st_size == 0
        with open(self.path, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
            if new:
                w.writeheader()
            w.writerow(row)


def read_rows(path: Path | str) -> list[dict[str, str]]:
    path = Path(path)
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def row_line(r: dict[str, Any], extra_keys: Sequence[str] = ()) -> str:
    """One compact line for a row (printed live while a benchmark runs)."""
    try:
        ex = json.loads(r.get("extra") or "{}")
    except ValueError:
        ex = {}
    med, ratio = fnum(r.get("median_ms")), fnum(r.get("ratio"))
    parts = [
        f"{r.get('mode', ''):<16}",
        f"{r.get('variant', ''):<5}",
        f"{r.get('shape', ''):<14}",
        f"{r.get('dtype', ''):<8}",
        f"{r.get('provider', ''):<16}",
        f"{med:>10.4f} ms" if med is not None else f"{'-':>10}   ",
        f"{ratio:>7.2f}x" if ratio is not None else f"{'-':>8}",
    ]
    for k in extra_keys:
        v = ex.get(k)
        parts.append(f"{k}={v:.1f}" if isinstance(v, (int, float)) else f"{k}=-")
    parts.append(str(r.get("status", ""))[:100])
    return " ".join(parts)


def print_table(rows: Sequence[dict[str, Any]], extra_keys: Sequence[str] = (), file=None) -> None:
    """Compact fixed-width table of rows (one line per row)."""
    file = file or sys.stdout
    if not rows:
        print("(no rows)", file=file)
        return
    head = ["mode", "variant", "shape", "dtype", "provider", "median_ms", "p20-p80", "ratio"]
    head += list(extra_keys) + ["status"]
    lines = []
    for r in rows:
        ex = {}
        try:
            ex = json.loads(r.get("extra") or "{}")
        except ValueError:
            pass
        med = fnum(r.get("median_ms"))
        p20, p80 = fnum(r.get("p20_ms")), fnum(r.get("p80_ms"))
        ratio = fnum(r.get("ratio"))
        cells = [
            r.get("mode", ""),
            r.get("variant", ""),
            r.get("shape", ""),
            r.get("dtype", ""),
            r.get("provider", ""),
            f"{med:.4f}" if med is not None else "-",
            f"{p20:.3f}-{p80:.3f}" if p20 is not None and p80 is not None else "-",
            f"{ratio:.2f}x" if ratio is not None else "-",
        ]
        for k in extra_keys:
            v = ex.get(k)
            cells.append(f"{v:.1f}" if isinstance(v, (int, float)) else ("-" if v is None else str(v)))
        st = str(r.get("status", ""))
        cells.append(st if len(st) <= 60 else st[:57] + "...")
        lines.append(cells)
    widths = [max(len(h), *(len(c[i]) for c in lines)) for i, h in enumerate(head)]
    print("  ".join(h.ljust(w) for h, w in zip(head, widths)), file=file)
    print("  ".join("-" * w for w in widths), file=file)
    for c in lines:
        print("  ".join(x.ljust(w) for x, w in zip(c, widths)), file=file)


# ----------------------------------------------------------------------------------------------
# plot
# ----------------------------------------------------------------------------------------------


def plot_ratios(
    rows: Sequence[dict[str, Any]], out_dir: Path | str, kernel: str, slug: str
) -> Path | None:
    """Bar plot of the speed ratio vs the baseline: one panel per (mode, variant), one bar group
    per shape/dtype, one bar per non-baseline provider. Saved as <out>/<kernel>_<slug>.png.
    Returns the path, or None when matplotlib is missing or there is nothing to plot."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as exc:  # noqa: BLE001
        print(f"[bench] matplotlib unavailable ({type(exc).__name__}): no plot for {kernel}")
        return None
    pts = [r for r in rows if fnum(r.get("ratio")) is not None and r["provider"] != r["baseline"]]
    if not pts:
        print(f"[bench] no ratios to plot for {kernel}")
        return None
    modes, variants, cases = [], [], []
    for r in pts:  # keep the order in which they were measured
        for lst, v in ((modes, r["mode"]), (variants, r["variant"]),
                       (cases, f"{r['shape']}\n{r['dtype']}")):
            if v not in lst:
                lst.append(v)
    providers = sorted({r["provider"] for r in pts})
    panels = [(m, v) for m in modes for v in variants]  # one row per mode, one column per variant
    nrow, ncol = len(modes), len(variants)
    fig_w = max(4.0, 0.55 * len(cases) * len(providers) + 1.6) * ncol
    fig, axes = plt.subplots(nrow, ncol, figsize=(min(fig_w, 30), 3.4 * nrow + 0.6), squeeze=False)
    width = 0.8 / max(1, len(providers))
    base = pts[0]["baseline"]
    for idx, (mode, variant) in enumerate(panels):
        ax = axes[idx // ncol][idx % ncol]
        for j, prov in enumerate(providers):
            xs, ys = [], []
            for i, c in enumerate(cases):
                for r in pts:
                    if (r["mode"], r["variant"], r["provider"]) == (mode, variant, prov) and (
                        f"{r['shape']}\n{r['dtype']}" == c
                    ):
                        xs.append(i + (j - (len(providers) - 1) / 2) * width)
                        ys.append(fnum(r["ratio"]))
            if xs:
                bars = ax.bar(xs, ys, width=width, label=prov)
                for b, y in zip(bars, ys):
                    ax.annotate(f"{y:.1f}", (b.get_x() + b.get_width() / 2, y),
                                ha="center", va="bottom", fontsize=6)
        ax.axhline(1.0, color="k", lw=0.8, ls="--")
        ax.set_xticks(range(len(cases)))
        ax.set_xticklabels(cases, fontsize=6)
        ax.set_title(f"{mode} / {variant}", fontsize=9)
        ax.set_ylabel(f"speed vs {base} (x)", fontsize=8)
        ax.tick_params(axis="y", labelsize=7)
    for idx in range(len(panels), nrow * ncol):
        axes[idx // ncol][idx % ncol].axis("off")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper right", fontsize=7)
    dev = pts[0].get("device_name", "")
    fig.suptitle(f"{kernel}: speed ratio vs {base} (higher is faster)  [{dev}]", fontsize=9)
    fig.tight_layout(rect=(0, 0, 0.93, 0.95))
    out = Path(out_dir) / f"{kernel}_{slug}.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


# ----------------------------------------------------------------------------------------------
# CLI, deadline
# ----------------------------------------------------------------------------------------------


def add_common_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--quick", action="store_true", help="fewer shapes and shorter timing")
    p.add_argument("--device", default=None, choices=["cpu", "cuda"],
                   help="default: cuda if available, else cpu")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="results folder (default bench/results)")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    p.add_argument("--time-budget", type=float, default=None, metavar="S",
                   help="stop starting new cases after S seconds (rows so far are kept)")
    p.add_argument("--cold-cache", action="store_true",
                   help="CPU: flush the cache (256 MB write) before every timed sample")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="CPU: torch.set_num_threads(N) (default: torch's own choice). On a shared "
                        "machine use fewer threads than idle cores: a parallel region whose "
                        "thread waits for a busy core costs a scheduler tick (~4 ms)")
    p.add_argument("--run-id", default=None, help=argparse.SUPPRESS)
    return p


def apply_threads(args: argparse.Namespace) -> None:
    n = getattr(args, "threads", None)
    if n:
        torch.set_num_threads(n)


def resolve_device(arg: str | None) -> str:
    if arg is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if arg == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch.cuda.is_available() is False on this machine")
    return arg


def mark_not_run(fig: dict[str, Any], n_not_run: int) -> dict[str, Any]:
    """An acceptance figure some of whose cases were not run (cut by the time budget, or the
    whole case failed): it says so and never passes (``incomplete`` keeps it failed when run.py
    folds repeated runs into a median)."""
    if n_not_run:
        fig["value"] = f"{fig['value']}; {n_not_run} case(s) not run"
        fig["passed"] = False
        fig["incomplete"] = True
    return fig


def not_run_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows that stand for a whole case that did not run: provider "(all)" (time budget
    spent before it, out of memory, or an error before any provider ran)."""
    return [r for r in rows if r.get("provider") == "(all)"]


class Deadline:
    def __init__(self, seconds: float | None):
        self.end = None if seconds is None else time.monotonic() + seconds

    def expired(self) -> bool:
        return self.end is not None and time.monotonic() >= self.end

    def left(self) -> float:
        return math.inf if self.end is None else self.end - time.monotonic()


TIMING_CALLS = 8  # a timing costs about this many calls (warm-up + samples, do_bench quick)


def timing_estimate_s(call_s: float) -> float:
    """Seconds one provider's timing is expected to take, from one warm call (JIT compile and
    autotuning excluded: the caller times the second call)."""
    return TIMING_CALLS * call_s + 1.0


def budget_skip(deadline: Deadline, est_s: float, planned_s: float = 0.0,
                what: str = "timing") -> str | None:
    """A "skipped: ..." status when ``est_s`` seconds (after ``planned_s`` already promised to
    other providers of this case) do not fit in what is left of the deadline; None otherwise."""
    if deadline.end is None:
        return None
    left = deadline.left()
    if planned_s + est_s > left:
        return (f"skipped: {what} needs ~{est_s:.0f} s, {max(0.0, left - planned_s):.0f} s left "
                "in the time budget")
    return None


# ----------------------------------------------------------------------------------------------
# pieces the bench modules share (inputs, memory, the run loop's rows, acceptance, main)
# ----------------------------------------------------------------------------------------------


def gen(device: str, seed: int) -> torch.Generator:
    """A fresh generator on ``device`` seeded with ``seed``: every input of a case is drawn from
    its own seed, so the providers of a case (and repeated runs) see the same tensors."""
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


def free(device: str) -> None:
    """Collect garbage and, on CUDA, hand the allocator's cached blocks back (between cases)."""
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def sync(device: str) -> None:
    """Wait for the device (CUDA) so that host timers measure the work, not its launch."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def peak_mb(fn: Callable[[], Any], device: str, grad_to_none=None) -> float | None:
    """MiB allocated at the peak of one call of ``fn`` above what was allocated before it (CUDA
    only; None on CPU). ``grad_to_none``'s grads are cleared first, as between timed calls."""
    if device != "cuda":
        return None
    _clear_grads(grad_to_none)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / (1 << 20)


def exc_text(exc: BaseException, limit: int = 120) -> str:
    """``Type: first line of the message`` (cut to ``limit`` characters) for a status."""
    first = (str(exc).splitlines() or [""])[0]  # an exception may have an empty message
    return f"{type(exc).__name__}: {first[:limit]}"


def exc_status(exc: BaseException, device: str) -> str:
    """The status of a row whose work raised ``exc``: ``skipped: out of memory`` for a CUDA
    out-of-memory error, ``error: Type: message`` otherwise."""
    if device == "cuda" and isinstance(exc, torch.cuda.OutOfMemoryError):
        return "skipped: out of memory"
    return f"error: {exc_text(exc)}"


def gate_status(msg: str, kernel: str, what: str) -> str:
    """The status of a provider that did not pass its gate: a red gate (a message that is not
    already ``skipped...`` / ``error...``) is printed as ``RED GATE <what>`` and becomes
    ``gate-failed: <msg>``; a skip or error stays as it is."""
    if msg.startswith(("skipped", "error")):
        return msg
    print(f"[{kernel}] RED GATE {what}: {msg}")
    return f"gate-failed: {msg}"


def emitter(writer: "ResultWriter", rows: list[dict[str, Any]],
            extra_keys: Sequence[str]) -> Callable[[dict[str, Any]], None]:
    """``emit(row)``: append the row to the CSV and to ``rows``, and print its line."""

    def emit(row: dict[str, Any]) -> None:
        writer.append(row)
        rows.append(row)
        print("  " + row_line(row, extra_keys=extra_keys), flush=True)

    return emit


def emit_case_rows(emit: Callable, modes: Iterable[str], status: str, **case: Any) -> None:
    """One ``(all)`` row per mode for a whole case that did not run (``status`` says why):
    ``case`` holds make_row's kernel, variant, shape, dtype, stamp, baseline, run_id."""
    for mode in modes:
        emit(make_row(**case, provider="(all)", mode=mode, timing=None, baseline_ms=None,
                      status=status))


BUDGET_SPENT = "skipped: time budget spent before this case"


def second_call_budget(deadline: Deadline, planned_s: float, one_call_s: Callable[[], float],
                       device: str) -> tuple[float, str | None]:
    """Budget one provider's timing from its second call (the first held the JIT compile /
    autotuning): ``(estimated seconds, None)`` when it fits in what is left of ``deadline``
    after ``planned_s``, else ``(0.0, status)`` -- ``skipped: ...`` or, when the call raised,
    ``error: second call: ...`` (the device's cache freed)."""
    try:
        call_s = one_call_s()
    except Exception as exc:  # noqa: BLE001
        free(device)
        return 0.0, f"error: second call: {exc_text(exc, 100)}"
    est = timing_estimate_s(call_s)
    return est, budget_skip(deadline, est, planned_s)


def status_row(base: dict[str, Any], provider: str, status: str) -> dict[str, Any]:
    """The row of a provider that was not timed (``status`` says why): make_row with ``base``
    (kernel, mode, variant, shape, dtype, stamp, baseline, run_id) and no timing."""
    return make_row(**base, provider=provider, timing=None, baseline_ms=None, status=status)


def budget_order(providers: Iterable[str], baseline: str) -> list[str]:
    """The order providers are gated and budgeted in: the baseline, then dtl_fast, then the
    others (eager, compiled), so a tight budget drops the expensive comparisons before the one
    the figures need."""
    return sorted(providers, key=lambda n: (n != baseline, n != "dtl_fast"))


def baseline_missing(calls: dict[str, Callable], baseline: str, kernel: str, what: str,
                     emit: Callable, base: dict[str, Any]) -> bool:
    """True (having printed it and emitted ``skipped: baseline failed its gate`` for the other
    providers) when the baseline is not among ``calls``: no ratio, so nothing is timed."""
    if baseline in calls:
        return False
    print(f"[{kernel}] baseline {baseline} unavailable: nothing timed for {what}")
    for name in calls:
        emit(status_row(base, name, "skipped: baseline failed its gate"))
    return True


def time_calls(calls: dict[str, Callable], grads: dict[str, list], *, mode: str, device: str,
               timing_kw: dict[str, Any], emit: Callable, base: dict[str, Any]):
    """``(times, peaks)`` of ``calls`` (time_many; forward under no_grad) and each call's CUDA
    peak MiB; on an exception an ``error: timing: ...`` row per provider, the device's cache
    freed, and None."""
    try:
        with torch.no_grad() if mode == "forward" else contextlib.nullcontext():
            times = time_many(calls, device=device, grad_to_none=grads, **timing_kw)
            peaks = {k: peak_mb(c, device, grads.get(k)) for k, c in calls.items()}
    except Exception as exc:  # noqa: BLE001
        reason = exc_text(exc)
        for name in calls:
            emit(status_row(base, name, f"error: timing: {reason}"))
        free(device)
        return None
    return times, peaks


def speed_extras(ex: dict[str, Any], t_ms: float, flops: float, ref_ms: float | None,
                 peak: float | None) -> dict[str, Any]:
    """Add ``tflops``, ``x_eager`` (the eager reference's median / this one, when it was timed)
    and ``peak_mb`` (when measured) to a row's extra, in that order; returns ``ex``."""
    ex["tflops"] = round(flops / (t_ms * 1e-3) / 1e12, 3)
    if ref_ms is not None:
        ex["x_eager"] = round(ref_ms / t_ms, 2)
    if peak is not None:
        ex["peak_mb"] = round(peak, 1)
    return ex


def finish_run(rows: list[dict[str, Any]], args: argparse.Namespace, *, kernel: str,
               device: str, run_id: str, writer: "ResultWriter", stamp: dict[str, Any],
               extra_keys: Sequence[str]) -> list[dict[str, Any]]:
    """The end of a module's run: where the rows went, the table and (unless --no-plot) the
    plot; returns ``rows``."""
    print(f"\n[{kernel}] results ({device}, run {run_id}) -> {writer.path}")
    print_table(rows, extra_keys=extra_keys)
    if not args.no_plot:
        png = plot_ratios(rows, args.out, kernel, stamp["device_slug"])
        if png:
            print(f"[{kernel}] plot -> {png}")
    return rows


def run_one_thread_on_cpu(args: argparse.Namespace,
                          body: Callable[[argparse.Namespace, str], Any]) -> Any:
    """``body(args, device)``; on CPU without --threads on one thread, the thread count
    restored afterwards (the rows' device_name says which)."""
    device = resolve_device(args.device)
    prev_threads = torch.get_num_threads()
    if device == "cpu" and not getattr(args, "threads", None):
        torch.set_num_threads(1)
    try:
        return body(args, device)
    finally:
        torch.set_num_threads(prev_threads)


# acceptance helpers


def row_ok(r: dict[str, Any]) -> bool:
    """The row's provider was timed (status ``ok``)."""
    return str(r.get("status", "")).startswith("ok")


def row_extra(r: dict[str, Any]) -> dict[str, Any]:
    """The row's ``extra`` JSON as a dict ({} when empty or not JSON)."""
    try:
        return json.loads(r.get("extra") or "{}")
    except ValueError:
        return {}


def min_figure(name: str, rows: Sequence[dict[str, Any]],
               value_fn: Callable[[dict[str, Any]], float | None], target: float,
               unit: str = "x") -> dict[str, Any]:
    """One acceptance figure: the minimum of ``value_fn`` over the rows that qualify, naming the
    worst case. Rows whose provider failed or was skipped make the figure FAIL (a red gate
    never passes); no rows: ``unmeasured``; no value: ``n/a``."""
    if not rows:
        return dict(name=name, value="unmeasured (no case of this kind in this run)", passed=False)
    bad = [r for r in rows if not row_ok(r)]
    if bad:
        r = bad[0]
        return dict(name=name, passed=False,
                    value=f"{len(bad)} case(s) not ok, e.g. {r['variant']} {r['shape']} "
                          f"{r['dtype']} {r['mode']}: {str(r['status'])[:60]}")
    vals = [(value_fn(r), r) for r in rows]
    vals = [(v, r) for v, r in vals if v is not None]
    if not vals:
        return dict(name=name, value="n/a", passed=False)
    v, r = min(vals, key=lambda p: p[0])
    noisy = any(row_extra(rr).get("noisy") for _, rr in vals)
    return dict(name=name, passed=v >= target, number=v, target=target, unit=unit,
                value=f"min {v:.2f}{unit} over {len(vals)} case(s), worst {r['variant']} "
                      f"{r['shape']} {r['dtype']}" + (", noisy p20-p80" if noisy else ""))


def bench_main(argv, *, doc: str, kernel: str, run: Callable, acceptance: Callable,
               standin_help: str | None = None,
               add_args: Callable[[argparse.ArgumentParser], None] | None = None) -> int:
    """A bench module's command line: the common flags plus --standin (and the module's own,
    from add_args), run, print the acceptance figures (not for a stand-in run); exit status 1
    when a row is gate-failed or an error."""
    p = add_common_args(argparse.ArgumentParser(description=doc.splitlines()[0]))
    p.add_argument("--standin", action="store_true",
                   help=standin_help or "harness self-test with stand-in functions; rows go to "
                                        f"{kernel}_standin.csv")
    if add_args is not None:
        add_args(p)
    args = p.parse_args(argv)
    rows = run(args)
    figs = acceptance(rows, resolve_device(args.device)) if not args.standin else []
    for f in figs:
        print(f"  {'PASS' if f['passed'] else 'FAIL'}  {f['name']}  ({f['value']})")
    red = [r for r in rows if r["status"].startswith(("gate-failed", "error"))]
    return 1 if red else 0


def run_cases(cases: Sequence[Any], *, kernel: str, device: str, deadline: Deadline,
              emit: Callable, modes: Iterable[str], stamp: dict[str, Any], baseline: str,
              run_id: str, run_case: Callable[[int, Any], None],
              after_case: Callable[[Any], None] | None = None) -> None:
    """``run_case(index, case)`` for each case (an object with ``variant``, ``shape`` and
    ``dtype`` strings) in turn. A case that raises gets one ``(all)`` row per mode with its
    status (exc_status), so one broken case does not end the run; once the deadline has passed
    the cases left get ``(all)`` rows saying so, and none runs. After each case:
    ``after_case(case)``, then free(device)."""
    modes = tuple(modes)

    def case_rows(c, status):
        emit_case_rows(emit, modes, status, kernel=kernel, variant=c.variant, shape=c.shape,
                       dtype=c.dtype, stamp=stamp, baseline=baseline, run_id=run_id)

    for ci, case in enumerate(cases):
        if deadline.expired():
            print(f"[{kernel}] time budget spent: {len(cases) - ci} case(s) not run (rows say so)")
            for c in cases[ci:]:
                case_rows(c, BUDGET_SPENT)
            break
        try:
            run_case(ci, case)
        except Exception as exc:  # noqa: BLE001 -- one broken case must not end the run
            case_rows(case, exc_status(exc, device))
        if after_case is not None:
            after_case(case)
        free(device)


def select_grid(device: str, quick: bool, tiny: bool, *, tiny_grid: list, cpu_quick: list,
                cpu_full: list, gpu_quick: list, gpu_full: list) -> list:
    """The cases of a run: --tiny (tests) first, then CUDA quick / full, else CPU quick / full."""
    if tiny:
        return tiny_grid
    if device == "cuda":
        return gpu_quick if quick else gpu_full
    return cpu_quick if quick else cpu_full


def grid_timing_kwargs(device: str, quick: bool, tiny: bool, *,
                       cpu_quick: dict[str, Any]) -> dict[str, Any]:
    """time_many's settings for a case grid: CUDA do_bench quick / full; CPU --tiny (tests),
    ``cpu_quick`` (the module's own), or the full settings (longer than the harness default:
    on a shared VM the sample distribution is wide). A fresh dict each call."""
    if device == "cuda":
        return dict(warmup=10, rep=40) if quick else dict(warmup=25, rep=100)
    if tiny:
        return dict(warmup=2, rep=5, min_samples=3, max_ms=200)
    return (dict(cpu_quick) if quick
            else dict(warmup=100, rep=300, min_samples=10, max_ms=4000))


def start_run(args: argparse.Namespace, kernel: str) -> tuple[str, str, Deadline]:
    """The start of a module's run: apply --threads; returns the kernel name of the rows (with
    ``_standin`` for a --standin run), the run id (run.py's, else a new one) and the deadline
    of --time-budget (started now)."""
    apply_threads(args)
    if getattr(args, "standin", False):
        kernel += "_standin"
    return kernel, args.run_id or new_run_id(), Deadline(args.time_budget)


def open_results(args: argparse.Namespace, kernel: str,
                 device: str) -> tuple[dict[str, Any], "ResultWriter"]:
    """The environment stamp (printed) and the writer of ``<out>/<kernel>.csv``."""
    stamp = env_stamp(device)
    writer = ResultWriter(args.out, kernel)
    print(f"[{kernel}] {format_stamp(stamp)}")
    return stamp, writer


@contextlib.contextmanager
def precision(tf32: bool):
    """TF32 for matmuls and cuDNN on or off for one case; the previous flags come back after."""
    prev = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32
    try:
        yield
    finally:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = prev
