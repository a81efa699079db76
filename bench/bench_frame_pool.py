"""Benchmark: masked temporal frame pooling (dtl_fast.ops.frame_pool).

Providers (the first is the baseline every ratio is taken against, timed in the same run):
  reference        dtl_fast.reference.frame_pool -- the eager masked reduction (where + sum)
  eager_mul        the other eager form: (x * mask).sum(1) / lengths for mean / sum,
                   masked_fill + amax for max. Every row also carries vs_best_eager: the faster
                   of reference and eager_mul, divided by this provider's time (the issue 13
                   acceptance form on the CPU).
  segment_reduce   torch.segment_reduce over x.reshape(B*T, D) with segments alternating
                   valid / padding frames ([L0, T-L0, L1, T-L1, ...]); every other output row
                   is kept. Segment lengths are prepared outside the timed region and
                   unsafe=True skips its validation (no host sync): the strongest form of it.
  dtl_fast         dtl_fast.ops.frame_pool(..., backend="auto") (C++ on CPU, CUDA on GPU)
  dtl_fast:cpu-len (CUDA only) the same with lengths given as a CPU tensor
  dtl_fast:argmax  (CUDA only; forward, max and meanmax) the registered op asked for its argmax,
                   torch.ops.dtl_fast.frame_pool(x, lengths, mode, True): the kernel a training
                   forward runs, which tracks the max's frame; "dtl_fast" (no gradient, so no
                   argmax) runs the index-free one since s33. Timed in steady state too at
                   >= 256 MiB: the two rows side by side are that change's A/B (this one skips
                   ops.frame_pool's Python checks, ~1.5 us of host time, hidden behind a
                   >= 256 MiB kernel, not at small shapes).

Modes: forward (under torch.no_grad()) and forward+backward: the input is an intermediate of a
model (h = x * 1, built once outside the timed region) and each call is
torch.autograd.grad(pool(h), h, g) with a fixed random g, so no provider accumulates into a
.grad. Pool modes: mean, max (+ meanmax on CUDA; + sum and meanmax in a full run).
Lengths are uniform in [1, T] (fixed seed); all tensors live on the benchmarked device.

Without lengths ("<mode>:all-frames" rows, lengths=None: every frame valid), after the cases
above: the stock path is then torch's own reduction over dim 1, and `auto` picks between it and
our kernel by a measured table (dtl_fast/ops/frame_pool.py, _CPU_ALL_FRAMES_STOCK_WINS; on
CUDA _CUDA_ALL_FRAMES_FUSED_WINS). Providers, baseline first:
  stock            dtl_fast.ops.frame_pool._stock_all_frames: x.amax(1), x.sum(1), x.mean(1),
                   float32 accumulation for half inputs (sum(1, dtype=float32), rounded once),
                   meanmax as a cat of both -- what `auto` runs where the table says
  torch            the plain calls a user writes: x.mean(1) / x.amax(1) / x.sum(1) (half mean
                   rounds the sum before it divides), meanmax as a cat
  dtl_fast         backend="auto" (its row's extra says which path it took: "auto_path")
  dtl_fast:fused   backend="fused": our kernel whatever the table says
  dtl_fast:op      torch.ops.dtl_fast.frame_pool(x, None, mode, False) alone: the kernel
                   without ops.frame_pool's Python checks, which `auto` pays on either path
Shapes: ALL_FRAMES_* (CPU full: 16 KiB to 64 MiB, float32 and bfloat16; --all-frames-only runs
these alone). The CPU rule's rows are "dtl_fast:op" against "stock" (two bare calls), forward
and forward+backward, at each thread count (device_name says it).

Gate before timing: each provider's forward output must match the reference (assert_close) and a
float64 reference (relative error), and for forward+backward its x.grad too; a provider that
fails is recorded with status "gate-failed: ..." and not timed.

Bytes the op must move (forward): valid frames read once (sum(L) * D) + output written once
(B * D, 2 * B * D for meanmax), in x's element size, + lengths (8 * B). forward+backward adds
grad_out read once + the whole grad_x [B, T, D] written once. Reported as GB/s and as % of the
device-to-device copy bandwidth measured at the start of the same run (dst.copy_(src), 1 GiB
on GPU, 256 MiB on CPU, bytes = 2 * size), next to the ratio against eager.

The fused op on GPU inputs of >= 256 MiB is also timed in steady state (harness.time_steady:
back-to-back calls over 3 copies of the input, no flush), against the copy bandwidth timed the
same way (steady_ms, pct_copy_steady, copy_gbps_steady). do_bench zeroes a 256 MiB buffer before
each call, and the dirty L2 it leaves may be written back inside the next call's time: a
read-only forward would pay ~50 MB that are not its own, the copy reference would not (a
hypothesis: bench/NOTES.md, issue 13, s24). A stream charges every op only for its own bytes
either way. The GPU acceptance figures read the steady-state fraction; each shows do_bench's
beside it, and every row keeps it.

    python bench/bench_frame_pool.py --quick --device cpu
    python bench/bench_frame_pool.py --device cuda --out bench/results
    python bench/bench_frame_pool.py --device cpu --threads 1 --all-frames-only
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness as H  # noqa: E402

KERNEL = "frame_pool"
BASELINE = "reference"
MIB = 1 << 20
LARGE_BYTES = 256 * MIB  # GPU acceptance applies from this input size on

f32, bf16 = torch.float32, torch.bfloat16

CPU_SHAPES = [((64, 64, 1024), f32), ((256, 32, 2048), f32)]
GPU_SHAPES_FULL = CPU_SHAPES + [
    ((256, 256, 1024), f32),  # 256 MiB
    ((64, 1024, 1024), f32),  # 256 MiB, long T
    ((256, 512, 1024), bf16),  # 256 MiB
    ((128, 1024, 1024), bf16),  # 256 MiB, long T
    ((4, 4096, 512), f32),  # small B, long T: parallelism must come from T and D
]
GPU_SHAPES_QUICK = [
    ((64, 64, 1024), f32),
    ((256, 256, 1024), f32),
    ((256, 512, 1024), bf16),
    ((4, 4096, 512), f32),
]
MODES = ("forward", "forward+backward")
FLOOR = "__grad_alloc_floor__"  # timed beside the providers in forward+backward, not a row
ARGMAX = "dtl_fast:argmax"  # CUDA forward of max / meanmax with its argmax (the index kernel)

# lengths=None cases (every frame valid): "<mode>:all-frames" rows, baseline "stock".
ALL_FRAMES = ":all-frames"
ALL_FRAMES_BASELINE = "stock"
_SIZE_RANGE = [  # float32 bytes: 16 KiB ... 64 MiB (bfloat16: half of each)
    (4, 16, 64), (4, 16, 256), (16, 16, 256), (16, 32, 256), (16, 16, 1024), (4, 256, 256),
    (64, 16, 1024), (128, 16, 1024), (64, 64, 1024), (256, 64, 1024)]
ALL_FRAMES_CPU_FULL = ([(s, f32) for s in _SIZE_RANGE] + [(s, bf16) for s in _SIZE_RANGE]
                       + [((256, 128, 1024), bf16)])  # 64 MiB bfloat16
ALL_FRAMES_CPU_QUICK = [((16, 32, 256), f32), ((64, 64, 1024), f32), ((16, 32, 256), bf16)]
ALL_FRAMES_TINY = [((3, 7, 40), f32)]
# GPU: the sweep's small auto-rule shapes, then 4 MiB ... 256 MiB (never measured on a GPU: the
# CUDA rule sends a forward without a gradient to torch's reduction until rows say otherwise)
ALL_FRAMES_GPU_QUICK = [((16, 32, 256), f32), ((8, 128, 128), bf16), ((64, 64, 1024), f32),
                        ((256, 256, 1024), f32), ((256, 512, 1024), bf16)]
ALL_FRAMES_GPU_FULL = ALL_FRAMES_GPU_QUICK[:3] + [
    ((4, 16, 64), f32), ((64, 16, 1024), f32), ((64, 64, 1024), bf16), ((256, 64, 1024), f32),
    ((256, 256, 1024), f32), ((256, 512, 1024), bf16), ((64, 1024, 1024), f32)]


def input_bytes(shape, dtype) -> int:
    B, T, D = shape
    return B * T * D * torch.empty((), dtype=dtype).element_size()


# ----------------------------------------------------------------------------------------------
# providers
# ----------------------------------------------------------------------------------------------


STEADY_COPIES = 3  # inputs a steady-state stream rotates over (768 MiB at 256 MiB each)


def steady_ms(fn: Callable, x: torch.Tensor, variant: str, mode: str, gv: torch.Tensor,
              device: str, info: dict | None = None) -> tuple[float, float, float]:
    """harness.time_steady of provider `fn` over STEADY_COPIES copies of x: the forward, or
    forward+backward of x as an intermediate (the gradient by torch.autograd.grad, a fresh
    grad_x of x's size per call). `info` receives the host's time per call."""
    if mode == "forward":
        xs = [x] + [x.clone() for _ in range(STEADY_COPIES - 1)]
        with torch.no_grad():
            return H.time_steady([lambda xx=xx: fn(xx, variant) for xx in xs], device=device,
                                 info=info)
    hs = [x.detach().requires_grad_(True) * 1 for _ in range(STEADY_COPIES)]  # distinct copies
    return H.time_steady([lambda h=h: torch.autograd.grad(fn(h, variant), h, gv) for h in hs],
                         device=device, info=info)


def _standin_reference(x, lengths=None, mode="mean"):
    """Eager masked reduction with the reference's semantics (harness self-test only)."""
    B, T, D = x.shape
    if lengths is None:
        lengths = torch.full((B,), T, dtype=torch.long, device=x.device)
    lengths = torch.as_tensor(lengths, device=x.device)
    mask = torch.arange(T, device=x.device)[None, :] < lengths[:, None]  # [B, T]
    acc = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    m = mask[:, :, None]
    if mode == "max":
        out = acc.masked_fill(~m, float("-inf")).amax(1)
        out = out.masked_fill((lengths == 0)[:, None], 0.0)
    else:
        out = (acc * m).sum(1)
        if mode == "mean":
            out = out / lengths.clamp(min=1)[:, None].to(acc.dtype)
    return out.to(x.dtype)


def _standin_fused(x, lengths=None, mode="mean", *, backend=None):
    """A different eager formulation, standing in for dtl_fast before it builds."""
    B, T, D = x.shape
    lengths = torch.as_tensor(lengths, device=x.device)
    mask = torch.arange(T, device=x.device)[None, :] < lengths[:, None]
    if mode == "max":
        out = torch.where(mask[:, :, None], x, x.new_tensor(float("-inf"))).max(1).values
        return out.masked_fill((lengths == 0)[:, None], 0.0)
    w = mask.to(torch.float32 if x.dtype != torch.float64 else x.dtype)
    if mode == "mean":
        w = w / lengths.clamp(min=1)[:, None].to(w.dtype)
    return torch.bmm(w[:, None, :], x.to(w.dtype)).squeeze(1).to(x.dtype)


_AUTO_IMPL: dict[str, str] = {}  # device type -> what backend="auto" runs (dtl_fast.info())


def grad_memory(x: torch.Tensor) -> dict[str, Any]:
    """Where the CPU backward puts x's gradient in this process (csrc/frame_pool.cpp):
    {"grad_on_zero_pages": >= 32 MiB on fresh zero pages where the cache does not take it
    (glibc, DTL_FAST_DISABLE_ZERO_PAGES unset), "grad_from_cache": >= 4 MiB from the op's cache
    of warm blocks (within DTL_FAST_CPU_GRAD_CACHE_MB), "nt_rows" / "nt_bulk": whether the
    rows stored one by one (max, meanmax) / written in bulk (mean, sum, padding) go out with
    non-temporal stores, and "llc_mb": the last-level cache that rule read (0: unknown)}; a key
    the extension cannot say (an older build) is left out."""
    out: dict[str, Any] = {}
    try:
        from dtl_fast._extension import _C
    except Exception:  # noqa: BLE001
        return out
    nbytes = x.numel() * x.element_size()
    for key, ask in (("grad_on_zero_pages", lambda: bool(_C.cpu_grad_on_zero_pages(nbytes))),
                     ("grad_from_cache", lambda: bool(_C.cpu_grad_from_cache(nbytes)))):
        try:
            out[key] = ask()
        except Exception:  # noqa: BLE001
            pass
    try:
        min_bytes, llc, _ = _C.cpu_nt_store_rule()
        out["nt_rows"] = nbytes >= min_bytes  # max / meanmax rows, non-temporal
        out["nt_bulk"] = nbytes >= 2 * min_bytes  # mean / sum rows and padding, non-temporal
        out["llc_mb"] = round(llc / MIB, 1)
    except Exception:  # noqa: BLE001
        pass
    return out


def cpu_isa_extra(provider: str) -> dict[str, str]:
    """What a CPU row ran on: {"aten_cpu": the CPU kernels ATen dispatches to in this process
    (torch.backends.cpu.get_cpu_capability(): "AVX512", "AVX2", "DEFAULT"; ATEN_CPU_CAPABILITY
    picks a lower one), and for our providers "isa": the instruction set our C++ forward runs
    ("avx2" or "baseline", dtl_fast._C.cpu_isa())}. The eager forms' speed depends
    on the first, so a ratio measured under ATEN_CPU_CAPABILITY=avx2 on an AVX-512 machine
    says so in its row."""
    out: dict[str, str] = {}
    try:
        out["aten_cpu"] = str(torch.backends.cpu.get_cpu_capability())
    except Exception:  # noqa: BLE001 (an older torch)
        pass
    if provider.startswith("dtl_fast"):
        try:
            from dtl_fast._extension import _C

            out["isa"] = str(_C.cpu_isa())
        except Exception:  # noqa: BLE001 (no C++ kernels built)
            pass
    return out


def load_api(standin: bool):
    """Returns (reference_fn, fused_fn_or_None, note)."""
    if standin:
        return _standin_reference, _standin_fused, "stand-in functions (harness self-test)"
    try:
        from dtl_fast import reference as R

        ref = R.frame_pool
    except Exception as exc:  # noqa: BLE001
        raise SystemExit(
            f"dtl_fast.reference.frame_pool is not importable ({type(exc).__name__}: {exc}).\n"
            "Build it first: .venv/bin/pip install --no-build-isolation -e .  "
            "(or run with --standin to test the harness)"
        )
    try:
        from dtl_fast import ops

        fused = ops.frame_pool
        note = "dtl_fast.ops.frame_pool"
        try:  # which implementation "auto" picks per device (auto silently falls back to the
            import dtl_fast  # reference where a kernel was not built: say so in every row)

            impl = dtl_fast.info()["ops"]["frame_pool"]
            note += f" (auto: cpu -> {impl.get('cpu')}; cuda -> {impl.get('cuda')})"
            _AUTO_IMPL.update(impl)
        except Exception:  # noqa: BLE001
            pass
    except Exception as exc:  # noqa: BLE001
        fused, note = None, f"dtl_fast.ops.frame_pool unavailable: {type(exc).__name__}: {exc}"
    return ref, fused, note


def eager_mul(xx: torch.Tensor, lengths: torch.Tensor, mode: str) -> torch.Tensor:
    """The second eager form a user would write: a multiply by the 0/1 mask instead of `where`
    (mean / sum), masked_fill + amax for max; meanmax is both side by side."""
    B, T, D = xx.shape
    mask = torch.arange(T, device=xx.device)[None, :] < lengths[:, None]  # [B, T]
    acc = xx.float() if xx.dtype in (torch.float16, torch.bfloat16) else xx
    if mode == "meanmax":
        return torch.cat([eager_mul(xx, lengths, "mean"), eager_mul(xx, lengths, "max")], -1)
    if mode == "max":
        out = acc.masked_fill(~mask[:, :, None], float("-inf")).amax(1)
        out = out.masked_fill((lengths == 0)[:, None], 0.0)
    else:
        out = (acc * mask[:, :, None].to(acc.dtype)).sum(1)
        if mode == "mean":
            out = out / lengths.clamp(min=1)[:, None].to(acc.dtype)
    return out.to(xx.dtype)


def add_rate(extra: dict, t, nbytes: int, copy: dict, peak_mb: float | None) -> None:
    """A timed row's rate fields in `extra`: the bytes the op must move, GB/s, % of the run's
    copy bandwidth, the peak memory where measured, and the noisy mark of a wide spread."""
    gbps = nbytes / (t[0] * 1e-3) / 1e9
    extra.update(bytes=nbytes, gbps=round(gbps, 2),
                 pct_copy=round(100 * gbps / copy["copy_gbps"], 2),
                 copy_gbps=round(copy["copy_gbps"], 1))
    if peak_mb is not None:
        extra["peak_mb"] = round(peak_mb, 1)
    if H.noisy(t):
        extra["noisy"] = True


def make_providers(ref_fn, fused_fn, x: torch.Tensor, lengths: torch.Tensor, device: str):
    """name -> callable(x, mode) or a str saying why the provider does not apply."""
    B, T, D = x.shape
    provs: dict[str, Callable | str] = {"reference": lambda xx, mode: ref_fn(xx, lengths, mode),
                                        "eager_mul": lambda xx, mode: eager_mul(xx, lengths, mode)}

    seg = torch.stack([lengths, T - lengths], 1).reshape(-1).contiguous()  # valid, pad, valid...
    empty = lengths == 0
    any_empty = bool(empty.any())

    def seg_reduce(xx, mode):
        if mode == "meanmax":  # the stock form: two reductions
            return torch.cat([seg_reduce(xx, "mean"), seg_reduce(xx, "max")], -1)
        kw: dict[str, Any] = {}
        if any_empty and mode in ("mean", "sum"):
            kw["initial"] = 0.0  # an empty valid segment pools to 0, as in the reference
        y = torch.segment_reduce(xx.reshape(B * T, D), mode, lengths=seg, axis=0, unsafe=True, **kw)
        y = y[0::2]
        if any_empty and mode == "max":  # initial=0 would clamp max to >= 0: mask instead
            y = y.masked_fill(empty[:, None], 0.0)
        return y

    provs["segment_reduce"] = seg_reduce

    if fused_fn is None:
        provs["dtl_fast"] = "skipped: dtl_fast.ops.frame_pool unavailable"
    else:
        provs["dtl_fast"] = lambda xx, mode: fused_fn(xx, lengths, mode, backend="auto")
        if device == "cuda":
            lengths_cpu = lengths.cpu()
            provs["dtl_fast:cpu-len"] = lambda xx, mode: fused_fn(
                xx, lengths_cpu, mode, backend="auto"
            )
            if fused_fn is not _standin_fused:  # the registered op: dtl_fast's own
                provs[ARGMAX] = lambda xx, mode: torch.ops.dtl_fast.frame_pool(xx, lengths, mode,
                                                                               True)[0]
    return provs


# ----------------------------------------------------------------------------------------------
# gates
# ----------------------------------------------------------------------------------------------


def grad_gate_max(grad, x, out, g, lengths, *, what="x.grad") -> tuple[bool, str]:
    """Tie-robust check of a max-pool gradient (bf16 inputs have many ties, and which tied frame
    gets the gradient is a convention): the gradient sums over frames to g for non-empty rows,
    is zero on padded frames and on frames that are not a maximum."""
    B, T, D = x.shape
    if grad is None:
        return False, f"{what}: None"
    if grad.shape != x.shape:
        return False, f"{what}: shape {tuple(grad.shape)} != {tuple(x.shape)}"
    if not torch.isfinite(grad).all():
        return False, f"{what}: non-finite values"
    valid = (torch.arange(T, device=x.device)[None, :] < lengths[:, None])[:, :, None]
    is_max = (x == out[:, None, :]) & valid
    stray = int(((grad != 0) & ~is_max).sum().item())
    if stray:
        return False, f"{what}: {stray} nonzero entries on non-max or padded frames"
    want = torch.where((lengths > 0)[:, None], g.float(), torch.zeros_like(g, dtype=torch.float32))
    ok, msg = H.gate(grad.float().sum(1), want, what=f"{what} summed over T")
    return ok, msg


def _gate_provider(fn, x, g, lengths, variant, mode, expected, exp64, exp_grad, exp_grad64,
                   ref_fn=None):
    """Returns (ok, message, rel64 of the forward output). An exception is (False, "error: ...")."""
    try:
        with torch.no_grad():
            out = fn(x, variant)
        ok, msg = H.gate(out, expected, ref64=exp64, what="forward")
        rel64 = float(f"{H.rel_err(out, exp64):.3g}")
        del out
        if ok and mode == "forward+backward":
            xl = x.detach().requires_grad_(True)
            fn(xl, variant).backward(g)
            if variant == "max":
                ok, msg = grad_gate_max(xl.grad, x, expected, g, lengths)
            elif variant == "meanmax":  # the max half tie-robustly, the mean half exactly
                D = x.shape[2]
                xm = x.detach().requires_grad_(True)
                fn(xm, variant).backward(torch.cat([torch.zeros_like(g[:, :D]), g[:, D:]], 1))
                ok, msg = grad_gate_max(xm.grad, x, expected[:, D:], g[:, D:], lengths)
                if ok:
                    xs = x.detach().requires_grad_(True)
                    fn(xs, variant).backward(torch.cat([g[:, :D], torch.zeros_like(g[:, D:])], 1))
                    want = x.detach().requires_grad_(True)
                    ref_mean = ref_fn(want, lengths, "mean")
                    ref_mean.backward(g[:, :D])
                    ok, msg = H.gate(xs.grad, want.grad, what="x.grad (mean half)")
            else:
                ok, msg = H.gate(xl.grad, exp_grad, ref64=exp_grad64, what="x.grad")
        return ok, msg, rel64
    except Exception as exc:  # noqa: BLE001
        return False, f"error: {H.exc_text(exc)}", None


# ----------------------------------------------------------------------------------------------
# the run
# ----------------------------------------------------------------------------------------------








def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    device = H.resolve_device(args.device)
    standin = getattr(args, "standin", False)
    kernel, run_id, deadline = H.start_run(args, KERNEL)
    ref_fn, fused_fn, note = load_api(standin)

    stamp, writer = H.open_results(args, kernel, device)
    print(f"[{kernel}] providers: reference, segment_reduce, {note}")

    if device == "cuda":
        shapes = GPU_SHAPES_QUICK if args.quick else GPU_SHAPES_FULL
    else:
        shapes = CPU_SHAPES
    if getattr(args, "all_frames_only", False):
        shapes = []
    if args.quick:
        variants = ("mean", "max", "meanmax") if device == "cuda" else ("mean", "max")
    else:
        variants = ("mean", "max", "sum", "meanmax")
    if device == "cuda":
        timing_kw: dict[str, Any] = dict(warmup=10, rep=40) if args.quick else {}
    else:
        # CPU: longer than the harness default (200 ms / 10 samples): on a shared VM the
        # sample distribution is wide and sometimes bimodal (see bench/NOTES.md)
        timing_kw = (dict(warmup=50, rep=100, min_samples=5) if args.quick
                     else dict(warmup=100, rep=400, min_samples=15))
        timing_kw["flush_cache"] = args.cold_cache

    if device == "cpu":
        try:
            load1 = os.getloadavg()[0]
            if load1 > 0.5 * (os.cpu_count() or 1):
                print(f"[{kernel}] WARNING: load average {load1:.2f} on "
                      f"{os.cpu_count()} CPUs: other processes compete; ratios "
                      "stay fairer (providers are timed in alternating rounds) but times are inflated; "
                      "consider --threads 1")
        except OSError:
            pass
    copy = H.copy_bandwidth(device)
    print(f"[{kernel}] copy bandwidth: {copy['copy_gbps']:.1f} GB/s "
          f"({copy['copy_bytes'] / 1e9:.2f} GB moved in {copy['copy_ms']:.3f} ms)")
    copy_steady = None
    if device == "cuda" and any(input_bytes(*c) >= LARGE_BYTES for c in shapes):
        copy_steady = H.copy_bandwidth_steady(device)
        print(f"[{kernel}] copy bandwidth, steady state: {copy_steady['copy_gbps']:.1f} GB/s")

    rows: list[dict[str, Any]] = []
    emit = H.emitter(writer, rows, ("gbps", "pct_copy", "pct_copy_steady", "grad_floor_ms"))

    def cut(rest):  # cases the budget cut: one "(all)" row per mode, so figures can say so
        print(f"[{kernel}] time budget spent: {len(rest)} case(s) not run (rows say so)")
        for shp, dt, var in rest:
            H.emit_case_rows(emit, MODES, H.BUDGET_SPENT, kernel=kernel, variant=var, shape=shp,
                             dtype=dt, stamp=stamp, baseline=BASELINE, run_id=run_id)

    stopped = False
    for si, (shape, dtype) in enumerate(shapes):
        if stopped:
            break
        if deadline.expired():
            cut([(shp, dt, v) for shp, dt in shapes[si:] for v in variants])
            break
        B, T, D = shape
        es = torch.empty((), dtype=dtype).element_size()
        lengths = torch.randint(1, T + 1, (B,), generator=H.gen("cpu", 1000 + si)).to(device)
        x = torch.randn(shape, generator=H.gen(device, si), device=device, dtype=torch.float32)
        x = x.to(dtype)
        g = torch.randn((B, D), generator=H.gen(device, 500 + si), device=device).to(dtype)
        x64, g64 = x.double(), g.double()
        sum_len = int(lengths.sum().item())
        # the bytes the op must move: computed per variant (meanmax writes / reads 2 * B * D)
        def op_bytes(variant):
            w = 2 * D if variant == "meanmax" else D
            return sum_len * D * es + B * w * es + B * 8, B * w * es + B * T * D * es
        provs = make_providers(ref_fn, fused_fn, x, lengths, device)
        print(f"[{kernel}] {H.shape_str(shape)} {H.dtype_str(dtype)}: "
              f"{input_bytes(shape, dtype) / MIB:.0f} MiB input, {sum_len / (B * T):.0%} valid frames")

        for vi, variant in enumerate(variants):
            if deadline.expired():
                cut([(shape, dtype, v) for v in variants[vi:]]
                    + [(shp, dt, v) for shp, dt in shapes[si + 1:] for v in variants])
                stopped = True
                break
            # ground truth: the reference in x's dtype, and in float64
            with torch.no_grad():
                expected = ref_fn(x, lengths, variant)
                exp64 = ref_fn(x64, lengths, variant)
            gw = torch.cat([g, g.flip(1)], 1)  # meanmax's grad_out [B, 2D]
            gv = gw if variant == "meanmax" else g
            xl = x.detach().requires_grad_(True)
            ref_fn(xl, lengths, variant).backward(gv)
            exp_grad = xl.grad
            xl64 = x64.detach().requires_grad_(True)
            ref_fn(xl64, lengths, variant).backward(gv.double())
            exp_grad64 = xl64.grad
            del xl, xl64

            fwd_bytes, bwd_bytes = op_bytes(variant)
            for mode in MODES:
                base = dict(kernel=kernel, mode=mode, variant=variant, shape=shape, dtype=dtype,
                            stamp=stamp, baseline=BASELINE, run_id=run_id)
                calls: dict[str, Callable] = {}
                grads: dict[str, list] = {}
                extras: dict[str, dict] = {}
                for name, fn in provs.items():
                    if name == ARGMAX and (mode != "forward" or variant not in ("max", "meanmax")):
                        continue  # the same kernel as "dtl_fast" there: nothing to compare
                    if isinstance(fn, str):
                        emit(H.status_row(base, name, fn))
                        continue
                    gv = gw if variant == "meanmax" else g
                    ok, msg, rel64 = _gate_provider(fn, x, gv, lengths, variant, mode, expected,
                                                    exp64, exp_grad, exp_grad64, ref_fn)
                    if not ok:
                        what = (f"{name} {mode} {variant} {H.shape_str(shape)} "
                                f"{H.dtype_str(dtype)}")
                        msg = H.gate_status(msg, kernel, what)
                        if name == "segment_reduce" and msg.startswith("error"):
                            msg = "skipped" + msg[len("error"):]  # a torch limitation, not ours
                        emit(H.status_row(base, name, msg))
                        continue
                    extras[name] = {"rel64": rel64}
                    if device == "cpu":  # which kernels ran: ATen's (the eager forms) and ours
                        extras[name].update(cpu_isa_extra(name))
                    if mode == "forward":
                        calls[name] = lambda fn=fn: fn(x, variant)
                    else:
                        # x as an intermediate of a model: the gradient is taken with respect to
                        # h (built once, outside the timed region), so nothing is accumulated
                        # into a .grad and h's own graph is never walked.
                        h = x.detach().requires_grad_(True) * 1
                        calls[name] = lambda fn=fn, h=h, gv=gv: torch.autograd.grad(
                            fn(h, variant), h, gv)
                        grads[name] = []
                if mode == "forward+backward" and BASELINE in calls:
                    # the floor of any backward here: allocate and write a dense [B, T, D] grad_x
                    # (on CPU a fresh 64 MiB block costs page faults on every call)
                    calls[FLOOR] = lambda: torch.empty_like(x).zero_()
                if BASELINE not in calls:
                    print(f"[{kernel}] baseline {BASELINE} unavailable: nothing timed for "
                          f"{mode} {variant} {H.shape_str(shape)}")
                    continue
                # ---- time (CPU: rounds of blocks; CUDA: do_bench one after another) --------
                timed = H.time_calls(calls, grads, mode=mode, device=device,
                                     timing_kw=timing_kw, emit=emit, base=base)
                if timed is None:
                    continue
                times, peaks = timed
                for xs in grads.values():
                    for t in xs:
                        t.grad = None
                nbytes = fwd_bytes if mode == "forward" else fwd_bytes + bwd_bytes
                baseline_ms = times[BASELINE][0]
                floor = times.pop(FLOOR, None)
                # the faster eager form of this case (issue 13's CPU acceptance baseline)
                best_eager = min(times[k][0] for k in ("reference", "eager_mul") if k in times)
                for name, t in times.items():
                    extra = extras[name]
                    extra["vs_best_eager"] = round(best_eager / t[0], 4)
                    if floor is not None:
                        extra["grad_floor_ms"] = round(floor[0], 4)  # empty_like(x).zero_()
                    add_rate(extra, t, nbytes, copy, peaks.get(name))
                    if name.startswith("dtl_fast") and _AUTO_IMPL:
                        extra["impl"] = str(_AUTO_IMPL.get(device, "?"))[:60]
                    if name.startswith("dtl_fast") and device == "cpu" and mode != "forward":
                        extra.update(grad_memory(x))
                    if (name in ("dtl_fast", ARGMAX) and copy_steady is not None
                            and input_bytes(shape, dtype) >= LARGE_BYTES):
                        info: dict[str, Any] = {}
                        try:
                            st = steady_ms(provs[name], x, variant, mode,
                                           gw if variant == "meanmax" else g, device, info)
                        except Exception as exc:  # noqa: BLE001 (e.g. out of memory)
                            extra["steady"] = f"error: {H.exc_text(exc)}"
                        else:
                            gbps_st = nbytes / (st[0] * 1e-3) / 1e9
                            copy_st = copy_steady["copy_gbps"]
                            extra.update(steady_ms=round(st[0], 5),
                                         steady_p20_ms=round(st[1], 5),
                                         steady_p80_ms=round(st[2], 5),
                                         pct_copy_steady=round(100 * gbps_st / copy_st, 2),
                                         copy_gbps_steady=round(copy_st, 1),
                                         steady_host_ms=round(info["host_ms"], 5),
                                         steady_host_bound=info["host_bound"])
                        finally:
                            H.free(device)
                    emit(H.make_row(**base, provider=name, timing=t, baseline_ms=baseline_ms,
                                    extra=extra))
                del calls, grads
            del expected, exp64, exp_grad, exp_grad64
            H.free(device)
        del x, g, x64, g64, provs
        H.free(device)

    if not stopped:
        run_all_frames(args, device, ref_fn, fused_fn, variants, timing_kw, copy, emit, stamp,
                       run_id, kernel, deadline)

    return H.finish_run(rows, args, kernel=kernel, device=device, run_id=run_id, writer=writer,
                        stamp=stamp,
                        extra_keys=("gbps", "pct_copy", "pct_copy_steady", "grad_floor_ms"))


def all_frames_shapes(args: argparse.Namespace, device: str) -> list:
    """The lengths=None cases of this run (--tiny: one small case)."""
    if getattr(args, "tiny", False):
        return ALL_FRAMES_TINY
    if device == "cuda":
        return ALL_FRAMES_GPU_QUICK if args.quick else ALL_FRAMES_GPU_FULL
    return ALL_FRAMES_CPU_QUICK if args.quick else ALL_FRAMES_CPU_FULL


def plain_torch(xx: torch.Tensor, mode: str) -> torch.Tensor:
    """The reduction a user writes without lengths (half mean: x.mean(1), sum rounded first)."""
    if mode == "meanmax":
        return torch.cat([xx.mean(1), xx.amax(1)], 1)
    return {"mean": xx.mean, "max": xx.amax, "sum": xx.sum}[mode](1)


def run_all_frames(args, device, ref_fn, fused_fn, variants, timing_kw, copy, emit, stamp,
                   run_id, kernel, deadline) -> None:
    """The lengths=None cases: our kernel (auto and fused) against torch's own reductions,
    forward under no_grad and forward+backward of an intermediate, rows "<mode>:all-frames"
    with baseline "stock" (module docstring)."""
    if fused_fn is None or getattr(args, "standin", False):
        return
    try:
        from dtl_fast.ops.frame_pool import _stock_all_frames, _stock_all_frames_wins
    except ImportError as exc:  # an older tree
        print(f"[{kernel}] lengths=None cases skipped: {exc}")
        return
    cases = all_frames_shapes(args, device)
    if device == "cuda":  # the CUDA rule's with-gradient part names sum: time it in --quick too
        variants = tuple(dict.fromkeys(tuple(variants) + ("sum",)))
    for si, (shape, dtype) in enumerate(cases):
        if deadline.expired():
            print(f"[{kernel}] time budget spent: {len(cases) - si} lengths=None case(s) not run")
            for shp, dt in cases[si:]:
                for v in variants:
                    H.emit_case_rows(emit, MODES, H.BUDGET_SPENT, kernel=kernel,
                                     variant=v + ALL_FRAMES, shape=shp, dtype=dt, stamp=stamp,
                                     baseline=ALL_FRAMES_BASELINE, run_id=run_id)
            return
        B, T, D = shape
        es = torch.empty((), dtype=dtype).element_size()
        x = torch.randn(shape, generator=H.gen(device, 700 + si), device=device,
                        dtype=torch.float32).to(dtype)
        full = torch.full((B,), T, dtype=torch.long, device=device)  # for the gates only
        print(f"[{kernel}] {H.shape_str(shape)} {H.dtype_str(dtype)} without lengths: "
              f"{input_bytes(shape, dtype) / MIB:.3g} MiB input")
        provs: dict[str, Callable] = {
            "stock": _stock_all_frames,
            "torch": plain_torch,
            "dtl_fast": lambda xx, mode: fused_fn(xx, None, mode, backend="auto"),
            "dtl_fast:fused": lambda xx, mode: fused_fn(xx, None, mode, backend="fused"),
            # the registered op alone, without ops.frame_pool's Python checks (~1.5 us per
            # call, which auto pays whichever path it takes): the rule compares this with
            # "stock", two bare calls
            "dtl_fast:op": lambda xx, mode: torch.ops.dtl_fast.frame_pool(xx, None, mode,
                                                                          False)[0],
        }
        for variant in variants:
            W = 2 * D if variant == "meanmax" else D
            g = torch.randn((B, W), generator=H.gen(device, 800 + si), device=device).to(dtype)
            with torch.no_grad():
                expected = ref_fn(x, None, variant)
                exp64 = ref_fn(x.double(), None, variant)
            xl = x.detach().requires_grad_(True)
            ref_fn(xl, None, variant).backward(g)
            xl64 = x.double().requires_grad_(True)
            ref_fn(xl64, None, variant).backward(g.double())
            exp_grad, exp_grad64 = xl.grad, xl64.grad
            del xl, xl64
            fwd_bytes = B * T * D * es + B * W * es
            for mode in MODES:
                base = dict(kernel=kernel, mode=mode, variant=variant + ALL_FRAMES, shape=shape,
                            dtype=dtype, stamp=stamp, baseline=ALL_FRAMES_BASELINE, run_id=run_id)
                calls: dict[str, Callable] = {}
                extras: dict[str, dict] = {}
                h = x.detach().requires_grad_(True) * 1  # an intermediate, as in the cases above
                for name, fn in provs.items():
                    # torch.amax's backward splits the gradient among tied maxima (bfloat16 has
                    # many) where the reference's goes to the first: the stock forms' max
                    # gradient is gated as a forward only, timed, and its row says so (auto
                    # never takes that path with a gradient)
                    splits = (name in ("stock", "torch") and mode != "forward"
                              and variant in ("max", "meanmax"))
                    ok, msg, rel64 = _gate_provider(fn, x, g, full, variant,
                                                    "forward" if splits else mode, expected,
                                                    exp64, exp_grad, exp_grad64, ref_fn)
                    if not ok:
                        emit(H.status_row(base, name, H.gate_status(
                            msg, kernel, f"{name} {mode} {variant} without lengths "
                                         f"{H.shape_str(shape)} {H.dtype_str(dtype)}")))
                        continue
                    extras[name] = {"rel64": rel64, "lengths": "none"}
                    if splits:
                        extras[name]["grad"] = "amax: ties split (not gated)"
                    if device == "cpu":
                        extras[name].update(cpu_isa_extra(name))
                    if name == "dtl_fast":  # the path auto takes for this call
                        with torch.no_grad() if mode == "forward" else contextlib.nullcontext():
                            xx = x if mode == "forward" else h
                            extras[name]["auto_path"] = ("stock" if _stock_all_frames_wins(
                                xx, variant) else "kernel")
                    if mode == "forward":
                        calls[name] = lambda fn=fn: fn(x, variant)
                    else:
                        calls[name] = lambda fn=fn: torch.autograd.grad(fn(h, variant), h, g)
                if ALL_FRAMES_BASELINE not in calls:
                    continue
                timed = H.time_calls(calls, {}, mode=mode, device=device, timing_kw=timing_kw,
                                     emit=emit, base=base)
                if timed is None:
                    continue
                times, peaks = timed
                nbytes = fwd_bytes if mode == "forward" else fwd_bytes + B * W * es + B * T * D * es
                baseline_ms = times[ALL_FRAMES_BASELINE][0]
                for name, t in times.items():
                    extra = extras[name]
                    add_rate(extra, t, nbytes, copy, peaks.get(name))
                    emit(H.make_row(**base, provider=name, timing=t, baseline_ms=baseline_ms,
                                    extra=extra))
                del calls, h
            del expected, exp64, exp_grad, exp_grad64
            H.free(device)
        del x
        H.free(device)


# ----------------------------------------------------------------------------------------------
# acceptance figures (run.py prints them)
# ----------------------------------------------------------------------------------------------

# issue 13: CPU forward and forward+backward >= 4x the faster eager form (vs_best_eager);
# GPU forward >= 85 % and forward+backward >= 80 % of the copy bandwidth, on the bytes the op
# must move, at >= 256 MiB inputs, mean, max and meanmax: the op and the copy both timed in
# steady state (pct_copy_steady; the module docstring says why not do_bench's pct_copy).
CPU_TARGET = {"forward": 4.0, "forward+backward": 4.0}  # x the faster eager form
GPU_FWD_PCT_COPY = 85.0  # forward: % of copy bandwidth at >= 256 MiB input
GPU_FWDBWD_PCT_COPY = 80.0  # forward+backward: % of copy bandwidth at >= 256 MiB input


def _find(rows, **key):
    for r in rows:
        if all(r.get(k) == v for k, v in key.items()):
            return r
    return None


def _shape_bytes(shape: str, dtype: str) -> int:
    dims = [int(s) for s in shape.split("x")]
    es = torch.empty((), dtype=getattr(torch, dtype)).element_size()
    n = 1
    for d in dims:
        n *= d
    return n * es


def acceptance(rows, device: str) -> list[dict[str, Any]]:
    """The pooling kernel's acceptance figures from this run's rows: dicts with
    name, value (str), passed (bool)."""
    rows = [r for r in rows if r.get("kernel") == KERNEL]
    figs: list[dict[str, Any]] = []

    def fig(name, r, key, target, unit, case=None):
        if r is None:
            # a case cut by the time budget (its "(all)" row) says so, like every module's
            # figures; "missing" is a case this run's grid did not have
            cut = case is not None and any(all(c.get(k) == v for k, v in case.items())
                                           for c in H.not_run_rows(rows))
            figs.append(H.mark_not_run(dict(name=name, value="cut", passed=False), 1) if cut
                        else dict(name=name, value="missing", passed=False))
            return
        if not str(r.get("status", "")).startswith("ok"):
            figs.append(dict(name=name, value=str(r["status"])[:40], passed=False))
            return
        if key == "ratio":
            v = H.fnum(r.get("ratio"))
        else:
            v = H.fnum(json.loads(r.get("extra") or "{}").get(key))
        if v is None:
            figs.append(dict(name=name, value="n/a", passed=False))
            return
        ex = json.loads(r.get("extra") or "{}")
        noisy = ex.get("noisy", False)
        if key == "pct_copy_steady":  # the spread of the steady-state streams, not do_bench's
            noisy = H.noisy((ex.get("steady_ms"), ex.get("steady_p20_ms"), ex.get("steady_p80_ms"))
                            if ex.get("steady_p20_ms") is not None else None)
        if key == "ratio":  # the ratio is as noisy as either of its two timings
            b = _find(rows, provider=BASELINE, mode=r["mode"], variant=r["variant"],
                      shape=r["shape"], dtype=r["dtype"], device=r["device"])
            noisy = noisy or (b is not None and json.loads(b.get("extra") or "{}").get("noisy"))
        value = f"{v:.2f}{unit}" + (", noisy p20-p80" if noisy else "")
        if ex.get("aten_cpu"):  # the eager side's kernels (ATEN_CPU_CAPABILITY may lower them)
            value += f", eager on ATen {ex['aten_cpu']}"
        figs.append(dict(name=name, value=value, passed=v >= target, number=v, target=target,
                         unit=unit))

    if rows and all(str(r.get("variant", "")).endswith(ALL_FRAMES) for r in rows):
        return figs  # --all-frames-only: the figures read the cases with lengths
    if device == "cpu":
        for shape in ("64x64x1024", "256x32x2048"):
            for variant in ("mean", "max"):
                for mode, target in CPU_TARGET.items():
                    case = dict(mode=mode, variant=variant, shape=shape, dtype="float32",
                                device="cpu")
                    r = _find(rows, provider="dtl_fast", **case)
                    fig(f"cpu {mode:<16} {variant:<4} {shape:<12} >= {target:g}x faster eager",
                        r, "vs_best_eager", target, "x", case)
        return figs

    large = []
    for r in rows:
        if r.get("device") == "cuda" and r.get("provider") == BASELINE:
            key = (r["shape"], r["dtype"])
            if key not in large and _shape_bytes(*key) >= LARGE_BYTES:
                large.append(key)
    cut = {(r["shape"], r["dtype"], r["variant"]) for r in H.not_run_rows(rows)
           if r.get("device") == "cuda" and _shape_bytes(r["shape"], r["dtype"]) >= LARGE_BYTES}
    if cut:
        figs.append(H.mark_not_run(dict(name="gpu >= 256 MiB cases complete", value="cut",
                                        passed=False), len(cut)))
    if not large:
        figs.append(dict(name="gpu: no case with >= 256 MiB input measured", value="missing",
                         passed=False))
        return figs
    def steady_fig(name, r, target):
        # the steady-state fraction decides; the do_bench one is shown beside it, and a
        # steady-state timing that failed (or a host-bound stream) says so
        fig(name, r, "pct_copy_steady", target, "%")
        if r is None:
            return
        ex = json.loads(r.get("extra") or "{}")
        f = figs[-1]
        if "steady" in ex and f["value"] == "n/a":
            f["value"] = "steady " + str(ex["steady"])[:40]
        if ex.get("pct_copy") is not None:
            f["value"] += f" (do_bench {ex['pct_copy']:.1f}%)"
        if ex.get("steady_host_bound"):
            f["value"] += ", host-bound"

    for shape, dtype in large:
        for variant in ("mean", "max", "meanmax"):
            r = _find(rows, provider="dtl_fast", mode="forward", variant=variant, shape=shape,
                      dtype=dtype, device="cuda")
            steady_fig(f"gpu forward          {variant:<7} {shape:<13} {dtype:<8} >= "
                       f"{GPU_FWD_PCT_COPY:g}% copy bw (steady)", r, GPU_FWD_PCT_COPY)
            r = _find(rows, provider="dtl_fast", mode="forward+backward", variant=variant,
                      shape=shape, dtype=dtype, device="cuda")
            steady_fig(f"gpu forward+backward {variant:<7} {shape:<13} {dtype:<8} >= "
                       f"{GPU_FWDBWD_PCT_COPY:g}% copy bw (steady)", r, GPU_FWDBWD_PCT_COPY)
    return figs


def _add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--all-frames-only", action="store_true",
                   help="time only the lengths=None cases (ALL_FRAMES_*: the auto rule's rows)")


def main(argv=None) -> int:
    return H.bench_main(argv, doc=__doc__, kernel=KERNEL, run=run, acceptance=acceptance,
                        standin_help="harness self-test with stand-in functions (no dtl_fast "
                                     "needed); rows go to frame_pool_standin.csv",
                        add_args=_add_args)


if __name__ == "__main__":
    sys.exit(main())
