"""Sweep of the CUDA frame-pooling launch constants on a GPU (issue 13), one bounded call.

What it measures, on the headline shapes (>= 256 MiB inputs, fp32 and bf16, a long-T one and a
small-B one) and the pooling modes mean, max and meanmax:
  forward   every forward configuration in FWD_GRID (threads per block, feature vectors per
            block, frames in flight per thread `fwd_unroll`, the software-pipelined loop
            `fwd_pipeline` 1 and the shared-memory ring `fwd_pipeline` 2), as % of the copy
            bandwidth
            measured in the same run over the bytes the op must move (valid frames read once +
            output written once);
  series    the forward (mean, float32) at T = 128 / 256 / 512 for each (fwd_unroll,
            fwd_pipeline) in SERIES_GRID, and per configuration the fit t = t0 + bytes / BW
            (fixed cost vs streaming rate);
  backward  the backward op alone (torch.ops.dtl_fast.frame_pool_backward) for every
            configuration in BWD_GRID (threads, feature vectors, frames per thread, waves), over
            grad_out read once + grad_x written once;
  method    (first; the ring's rows last, as all of the ring's) the forward with the default
            configuration, with evict-first loads (u4-ef) and the ring (u4-p2), and the
            backward op with the default, each timed three ways: do_bench (L2 zeroed before each
            call: its dirty lines are written back inside the next call), a read flush (L2
            filled by reading: no dirty lines) and steady state (back-to-back calls over 3
            copies of the input), each against the copy bandwidth timed the same way, on the
            two 256 MiB headline inputs and 4x4096x512: does the harness's own flush hold the
            forward below 85 % (bench/NOTES.md, issue 13, s24)? The forwards also after a
            producer of x (x.mul_(1)): untimed before each call ("produced"), and timed with
            it, less the producer alone ("pipeline": the forward's cost in a model; s25).
  roofline  torch's x.sum(1) / x.amax(1) and the fused forward with every frame valid, on the
            two 256 MiB headline inputs: the same bytes read the same way, as % of copy (is the
            forward's gap to 85 % ours, or the device's for a read-and-reduce stream?);
  stock     the eager masked reduction (dtl_fast.reference) and torch.segment_reduce beside the
            fused op with its default configuration, forward and forward+backward (gradient of an
            intermediate by torch.autograd.grad), on the headline and small shapes: the inputs of
            the `auto` rule (dtl_fast/ops/frame_pool.py) that must keep `auto` never slower than
            the best stock formulation.
  all-frames  the same without lengths (every frame valid): the fused op against torch's own
            reduction (dtl_fast.ops.frame_pool._stock_all_frames: x.amax(1), x.sum(1), x.mean(1),
            float32 accumulation for half inputs) and `auto`, forward and forward+backward, on
            the small shapes and the two 256 MiB headline ones, mean / max / meanmax / sum: the
            rows of the CUDA part of the lengths=None rule (_CUDA_ALL_FRAMES_FUSED_WINS; until
            they exist `auto` runs torch's reduction for a forward without a gradient, and for
            sum and float32 mean with one). Run before `stock` (the budget reaches it first);
            its table lines read "<mode>:all-frames", with auto's time beside the verdict.
Each configuration's output is compared with the default configuration's before it is timed (a
mismatch is a row with status "mismatch", not a time). Rows go to
bench/results/frame_pool_sweep.csv (harness format; provider = the configuration); a short
table prints last: per case the default and the best configuration with their % of copy
bandwidth, the stock timings, and the configuration that is best over all headline cases.

Bounded: --budget-s (default 150 s of timing, checked before every timing); cases not reached
are listed as not run. Without CUDA (or with --dry-run) it walks the same plan, checks that
every configuration is accepted by dtl_fast._C.set_cuda_launch_config and that every op call
runs on small CPU tensors, and prints that nothing was measured.

    python bench/sweep_frame_pool.py                  # on a GPU machine (about 1-2 minutes)
    python bench/sweep_frame_pool.py --dry-run        # anywhere: the plan, nothing measured
"""
from __future__ import annotations

import argparse
import math
import re
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness as H  # noqa: E402

KERNEL = "frame_pool_sweep"
f32, bf16 = torch.float32, torch.bfloat16

HEADLINE = [((256, 256, 1024), f32), ((256, 512, 1024), bf16), ((64, 1024, 1024), f32),
            ((4, 4096, 512), f32)]
SMALL = [((64, 64, 1024), f32), ((16, 32, 256), f32), ((8, 128, 128), bf16)]  # auto-rule inputs
POOL_MODES = ("mean", "max", "meanmax")

# (threads, max_tx, fwd_unroll[, fwd_pipeline]); the time split and the backward fields stay at
# their defaults.
# Only block shapes with the default's 8 time lanes (256 x 32, 128 x 16): another lane count
# sums the frames in another order, so mean / meanmax differ from the default in the last bit
# and the run of 2026-11-27 (H100) timed nothing there; the split constants (sw / phi) moved
# the forward by under 1 point in that run. fwd_unroll (frames in flight per thread) is the
# variable this grid exists for; it never changes the result. fwd_pipeline = 1 (U = 8 / 16 held
# as two software-pipelined rounds of 4 / 8, round k + 1 issued before round k is folded) is
# timed beside the plain U = 8 / 16, which hold as many registers at the same occupancy: the
# pair isolates the load schedule. fwd_pipeline = 2 (U = 4) copies each round with cp.async into
# a per-thread ring of 4 stages in shared memory, 3 stages ahead of the fold: the bytes in flight
# then cost shared memory, not registers (bench/NOTES.md, s24). 14 forward configurations x 12
# headline cases.
FWD_GRID = ([(t, tx, u) for (t, tx) in ((256, 32), (128, 16)) for u in (2, 4, 8, 16)]
            + [(t, tx, u, 1) for (t, tx) in ((256, 32), (128, 16)) for u in (8, 16)]
            + [(t, tx, 4, 2) for (t, tx) in ((256, 32), (128, 16))])
# A size series for the forward (mean, float32, B x D = 256 x 1024 as the first headline case,
# T = 128 / 256 / 512, ~68 / 136 / 270 MB of valid frames) at each fwd_unroll of the default
# block shape: the fit t = t0 + bytes / BW per unroll says whether U moves the fixed cost t0
# (launch, first loads, tail) or the streaming rate BW (bytes in flight) -- bench/NOTES.md.
SIZE_SERIES = [((256, 128, 1024), f32), ((256, 512, 1024), f32)]
SERIES_GRID = ([(256, 32, u) for u in (2, 4, 8, 16)] + [(256, 32, u, 1) for u in (8, 16)]
               + [(256, 32, 4, 2)])
# (threads, max_tx, bwd_frames, bwd_waves); the forward fields stay at their defaults.
BWD_GRID = [(t, tx, fr, 4) for t in (128, 256) for tx in (16, 32, 64) for fr in (4, 8, 16, 32)]

# The method step: cases, configurations (None = the default) and timing methods.
# (256, 32, 4, 0, 1): the default with its loads marked evict-first in L2 (fwd_l2_evict_first;
# bench/NOTES.md, s25). Two methods put a producer of x in front of the forward: x.mul_(1), an
# SM kernel that rewrites x with the same bits and leaves its last lines dirty in L2, as the
# layer that wrote x would. "produced" runs it untimed in place of a flush (like do_bench, it
# leaves the forward's deferred write-backs to the next, untimed, producer); "pipeline" times
# producer + forward back to back and subtracts the producer alone timed the same way, so every
# write-back is paid inside the timed stream: the forward's cost in a model. Forward passes only
# (the backward does not read x).
METHOD_CASES = [HEADLINE[0], HEADLINE[1], HEADLINE[3]]
METHOD_CONFIGS = [None, (256, 32, 4, 0, 1), (256, 32, 4, 2)]  # the ring's are timed last (main())
METHODS = ("do_bench", "read-flush", "steady", "produced", "pipeline")
FORWARD_ONLY_METHODS = ("produced", "pipeline")
STEADY_FOOTPRINT = 200e6  # bytes a steady stream's inputs span at least: 4 x an H100's L2

# The fields of dtl_fast._C.cuda_launch_config(), in order.
FIELDS = ("threads", "max_tx", "split_waves", "split_phi_pct", "bwd_frames", "bwd_waves",
          "fwd_unroll", "fwd_pipeline", "fwd_l2_evict_first")
# Provider names: `-p1` / `-p2` only for the pipelined / ring forward and `-ef` only for
# evict-first loads, so the names of every other configuration (and of the default) are those
# of the rows already in frame_pool_sweep.csv.
_NAME = re.compile(r"t(\d+)-tx(\d+)-sw(\d+)-phi(\d+)-bf(\d+)-bw(\d+)-u(\d+)(?:-p(\d+))?(-ef)?")


def is_ring(c: tuple[int, ...] | None) -> bool:
    """A FWD_GRID / SERIES_GRID / METHOD_CONFIGS entry of the ring kernel (fwd_pipeline = 2)."""
    return c is not None and len(c) > 3 and c[3] == 2


def config_name(cfg: tuple[int, ...]) -> str:
    t, tx, w, phi, fr, bw, u, p, ef = cfg
    return (f"t{t}-tx{tx}-sw{w}-phi{phi}-bf{fr}-bw{bw}-u{u}" + (f"-p{p}" if p else "")
            + ("-ef" if ef else ""))


def parse_config_name(name: str) -> tuple[int, ...]:
    """The configuration tuple (FIELDS order) of a provider name config_name wrote; rows of
    runs before fwd_pipeline / fwd_l2_evict_first (no `-p` / `-ef` part) read as 0."""
    m = _NAME.fullmatch(name)
    if m is None:
        raise ValueError(f"not a sweep configuration name: {name!r}")
    *nums, ef = m.groups()
    return tuple(int(g) if g is not None else 0 for g in nums) + (1 if ef else 0,)


def with_fields(default: tuple[int, ...], **fields: int) -> tuple[int, ...]:
    """The default configuration with the named fields replaced."""
    return tuple(fields.get(name, v) for name, v in zip(FIELDS, default))


def fwd_config(default: tuple[int, ...], c: tuple[int, ...]) -> tuple[int, ...]:
    """c = (threads, max_tx, fwd_unroll[, fwd_pipeline = 0[, fwd_l2_evict_first = 0]])."""
    return with_fields(default, threads=c[0], max_tx=c[1], fwd_unroll=c[2],
                       fwd_pipeline=c[3] if len(c) > 3 else 0,
                       fwd_l2_evict_first=c[4] if len(c) > 4 else 0)


def bwd_config(default: tuple[int, ...], c: tuple[int, int, int, int]) -> tuple[int, ...]:
    return with_fields(default, threads=c[0], max_tx=c[1], bwd_frames=c[2], bwd_waves=c[3])


def out_width(D: int, mode: str) -> int:
    return 2 * D if mode == "meanmax" else D


def seg_reduce_fn(lengths: torch.Tensor, B: int, T: int, D: int) -> Callable:
    """torch.segment_reduce in its strongest form (segments prepared, unsafe=True); meanmax as
    the two reductions a user would write."""
    seg = torch.stack([lengths, T - lengths], 1).reshape(-1).contiguous()
    empty = lengths == 0

    def fn(xx: torch.Tensor, mode: str) -> torch.Tensor:
        if mode == "meanmax":
            return torch.cat([fn(xx, "mean"), fn(xx, "max")], -1)
        kw: dict[str, Any] = {"initial": 0.0} if mode != "max" else {}
        y = torch.segment_reduce(xx.reshape(B * T, D), mode, lengths=seg, axis=0, unsafe=True, **kw)[0::2]
        return y.masked_fill(empty[:, None], 0.0) if mode == "max" else y

    return fn


class Sweep:
    def __init__(self, args: argparse.Namespace, device: str, measure: bool):
        import dtl_fast
        from dtl_fast import _extension

        self.args, self.device, self.measure = args, device, measure
        self.dtl_fast = dtl_fast
        self.C = _extension._C
        if self.C is None:
            raise SystemExit(f"dtl_fast._C is not built: {_extension.LOAD_ERROR}")
        self.default = tuple(self.C.cuda_launch_config())
        if len(self.default) != len(FIELDS):
            raise SystemExit(f"dtl_fast._C.cuda_launch_config() has {len(self.default)} fields, "
                             f"this sweep knows {len(FIELDS)} ({', '.join(FIELDS)}): rebuild dtl_fast")
        self.deadline = H.Deadline(args.budget_s)
        self.rows: list[dict[str, Any]] = []
        self.not_run: list[str] = []
        self.planned = {"forward": 0, "backward": 0, "stock": 0, "roofline": 0, "method": 0}
        self.results: dict[tuple, dict[str, Any]] = {}  # (shape, dtype, mode, pass) -> summary
        self.run_id = args.run_id or H.new_run_id()
        self.stamp = H.env_stamp(device)
        self.writer = H.ResultWriter(args.out, KERNEL) if measure else None
        self.copy = H.copy_bandwidth(device) if measure else None
        self.copy_by_method: dict[str, float] = {}  # the method step's copy references, GB/s

    # -- timing ---------------------------------------------------------------------------------
    def time(self, fn: Callable) -> tuple[float, float, float] | None:
        if not self.measure:
            fn()  # the call itself still runs (small CPU tensors): the plan is exercised
            return None
        return H.time_ms(fn, device=self.device, warmup=self.args.warmup_ms, rep=self.args.rep_ms)

    def emit(self, *, mode: str, variant: str, shape, dtype, provider: str, timing, nbytes: int,
             baseline_ms: float | None, status: str = "ok", extra: dict | None = None,
             copy_gbps: float | None = None) -> None:
        """One row; pct_copy against copy_gbps (default: the run's do_bench copy)."""
        ex = dict(extra or {})
        if timing is not None and timing[0] > 0:  # (a "pipeline" difference may be <= 0)
            copy = copy_gbps or self.copy["copy_gbps"]
            gbps = nbytes / (timing[0] * 1e-3) / 1e9
            ex.update(bytes=nbytes, gbps=round(gbps, 1), pct_copy=round(100 * gbps / copy, 2),
                      copy_gbps=round(copy, 1))
        row = H.make_row(kernel=KERNEL, provider=provider, mode=mode, variant=variant, shape=shape,
                         dtype=dtype, stamp=self.stamp, timing=timing, baseline="default",
                         baseline_ms=baseline_ms, extra=ex, status=status, run_id=self.run_id)
        self.rows.append(row)
        if self.writer is not None:
            self.writer.append(row)

    def time_or_error_row(self, fn: Callable, *, mode: str, variant: str, shape, dtype,
                          provider: str) -> tuple[float, float, float] | None:
        """self.time(fn); an exception becomes a row with status "error: ..." and None, so one
        failing form does not end the sweep (in the dry run it is raised: the dry run exists to
        catch exactly this)."""
        try:
            return self.time(fn)
        except Exception as exc:  # noqa: BLE001
            self.emit(mode=mode, variant=variant, shape=shape, dtype=dtype, provider=provider,
                      timing=None, nbytes=0, baseline_ms=None, status=f"error: {H.exc_text(exc)}")
            if not self.measure:
                raise
            return None

    def budget_left(self, what: str) -> bool:
        if self.measure and self.deadline.expired():
            self.not_run.append(what)
            return False
        return True

    # -- one case -------------------------------------------------------------------------------
    def inputs(self, shape, dtype, seed: int):
        B, T, D = shape
        if not self.measure:  # the plan on small CPU tensors: same code paths, tiny sizes
            B, T, D = min(B, 3), min(T, 9), min(D, 16)
        x = torch.randn((B, T, D), generator=H.gen(self.device, seed), device=self.device).to(dtype)
        lengths = torch.randint(1, T + 1, (B,), generator=H.gen("cpu", 1000 + seed)).to(self.device)
        return x, lengths

    def sweep_case(self, shape, dtype, mode: str, seed: int, forward_only: list | None = None,
                   fwd_grid: list | None = None, ring_phase: bool = False) -> None:
        """Every configuration of fwd_grid (default FWD_GRID) and BWD_GRID on one case; with
        forward_only, only the forward over that grid. ring_phase: the default re-timed beside
        the ring is kept apart ("ring_default"), so the first phase's comparisons keep the
        default timed with them."""
        x, lengths = self.inputs(shape, dtype, seed)
        B, T, D = x.shape
        es = x.element_size()
        W = out_width(D, mode)
        sum_len = int(lengths.sum())
        fwd_bytes = sum_len * D * es + B * W * es + 8 * B
        bwd_bytes = B * W * es + B * T * D * es
        g = torch.randn(B, W, device=self.device).to(dtype)
        op, op_bwd = torch.ops.dtl_fast.frame_pool, torch.ops.dtl_fast.frame_pool_backward
        key = (H.shape_str(shape), H.dtype_str(dtype), mode)

        grid = (FWD_GRID if fwd_grid is None else fwd_grid) if forward_only is None else forward_only
        passes = [("forward", grid, fwd_config, fwd_bytes),
                  ("backward", BWD_GRID, bwd_config, bwd_bytes)][:1 if forward_only is not None else 2]
        for pas, grid, make, nbytes in passes:
            self.C.set_cuda_launch_config(*self.default)
            ref_out, argmax = op(x, lengths, mode)
            ref_gx = op_bwd(g, lengths, argmax, T, mode)
            summary = self.results.setdefault(key + (pas,), {"configs": {}, "bytes": nbytes})
            base_ms = None
            for c in [None] + grid:
                cfg = self.default if c is None else make(self.default, c)
                if c is not None and cfg == self.default:
                    continue
                name = "default" if c is None else config_name(cfg)
                self.planned[pas] += 1
                if not self.budget_left(f"{pas} {name} {mode} {key[0]} {key[1]}"):
                    continue
                self.C.set_cuda_launch_config(*cfg)
                try:
                    if pas == "forward":
                        call = lambda: op(x, lengths, mode)  # noqa: E731
                        same = all(map(torch.equal, call(), (ref_out, argmax)))
                    else:
                        call = lambda: op_bwd(g, lengths, argmax, T, mode)  # noqa: E731
                        same = torch.equal(call(), ref_gx)
                    if not same:
                        self.emit(mode=pas, variant=mode, shape=shape, dtype=dtype, provider=name,
                                  timing=None, nbytes=nbytes, baseline_ms=None,
                                  status="mismatch: output or argmax differs from the default "
                                         "config's")
                        continue
                    t = self.time(call)
                finally:
                    self.C.set_cuda_launch_config(*self.default)
                if t is None:
                    continue
                base_ms = t[0] if c is None else base_ms
                self.emit(mode=pas, variant=mode, shape=shape, dtype=dtype, provider=name, timing=t,
                          nbytes=nbytes, baseline_ms=base_ms, extra={"config": list(cfg)})
                pct = 100 * nbytes / (t[0] * 1e-3) / 1e9 / self.copy["copy_gbps"]
                if ring_phase and c is None:
                    summary["ring_default"] = pct
                    continue
                summary["configs"][cfg] = t[0]
                summary["pct"] = summary.get("pct", {})
                summary["pct"][cfg] = pct

    def stock_case(self, shape, dtype, mode: str, seed: int) -> None:
        """Fused (default config) against the eager reference and segment_reduce: forward and
        forward+backward of an intermediate input."""
        from dtl_fast import ops, reference

        x, lengths = self.inputs(shape, dtype, seed)
        B, T, D = x.shape
        es, W = x.element_size(), out_width(D, mode)
        fwd_bytes = int(lengths.sum()) * D * es + B * W * es + 8 * B
        g = torch.randn(B, W, device=self.device).to(dtype)
        provs = {"fused": lambda xx: ops.frame_pool(xx, lengths, mode, backend="fused"),
                 "eager": lambda xx: reference.frame_pool(xx, lengths, mode),
                 "segment_reduce": lambda xx: seg_reduce_fn(lengths, B, T, D)(xx, mode)}
        key = (H.shape_str(shape), H.dtype_str(dtype), mode)
        for pas, times in self.time_stock_forms(x, g, provs, shape, dtype, mode, fwd_bytes,
                                                "stock"):
            self.results.setdefault(key + ("stock " + pas,), {})["stock"] = times

    def time_stock_forms(self, x, g, provs: dict, shape, dtype, variant: str, fwd_bytes: int,
                         what: str, extra: dict | None = None):
        """Times each of `provs` (name -> fn(x)) forward (no_grad) and forward+backward (the
        gradient of an intermediate input, grad_out `g`), fused first: a row "stock <pass>"
        each, its baseline the fused time. Yields (pass, {name: median ms}) per pass."""
        B, T, D = x.shape
        es, W = x.element_size(), g.shape[1]
        h = x.detach().requires_grad_(True) * 1
        for pas in ("forward", "forward+backward"):
            times: dict[str, float] = {}
            for name, fn in provs.items():
                self.planned["stock"] += 1
                if not self.budget_left(f"{what} {pas} {name} {variant} {H.shape_str(shape)} "
                                        f"{H.dtype_str(dtype)}"):
                    continue
                if pas == "forward":
                    def call(fn=fn):
                        with torch.no_grad():
                            return fn(x)
                else:
                    def call(fn=fn):
                        return torch.autograd.grad(fn(h), h, g)
                # (a stock form may not support a dtype)
                t = self.time_or_error_row(call, mode=f"stock {pas}", variant=variant,
                                           shape=shape, dtype=dtype, provider=name)
                if t is None:
                    continue
                times[name] = t[0]
                nbytes = fwd_bytes + (B * W * es + B * T * D * es if pas != "forward" else 0)
                # baseline: the fused op (timed first), so ratio = fused time / this time
                self.emit(mode=f"stock {pas}", variant=variant, shape=shape, dtype=dtype,
                          provider=name, timing=t, nbytes=nbytes, baseline_ms=times.get("fused"),
                          extra=extra)
            yield pas, times

    def all_frames_case(self, shape, dtype, mode: str, seed: int) -> None:
        """Without lengths: fused (default config) against torch's own reduction (what `auto`
        runs for a CUDA forward without a gradient) and `auto` itself, forward and
        forward+backward of an intermediate input; rows "stock <pass>" with variant
        "<mode>:all-frames"."""
        from dtl_fast import ops
        from dtl_fast.ops.frame_pool import _stock_all_frames

        x, _ = self.inputs(shape, dtype, seed)
        B, T, D = x.shape
        es, W = x.element_size(), out_width(D, mode)
        fwd_bytes = B * T * D * es + B * W * es
        g = torch.randn(B, W, device=self.device).to(dtype)
        provs = {"fused": lambda xx: ops.frame_pool(xx, None, mode, backend="fused"),
                 "torch": lambda xx: _stock_all_frames(xx, mode),
                 "auto": lambda xx: ops.frame_pool(xx, None, mode, backend="auto")}
        variant = f"{mode}:all-frames"
        key = (H.shape_str(shape), H.dtype_str(dtype), variant)
        for pas, times in self.time_stock_forms(x, g, provs, shape, dtype, variant, fwd_bytes,
                                                "all-frames", extra={"lengths": "none"}):
            # "auto" is what runs, not a competitor: the verdict compares fused and torch
            self.results.setdefault(key + ("stock " + pas,), {})["stock"] = {
                k: v for k, v in times.items() if k != "auto"}
            if "auto" in times:
                self.results[key + ("stock " + pas,)]["auto"] = times["auto"]

    def method_copy(self, method: str) -> float | None:
        """Copy bandwidth (GB/s) timed by `method`, measured once per sweep."""
        if not self.measure:
            return None
        if method not in self.copy_by_method:
            if method in ("do_bench", "produced"):  # both start cold ("produced": x is not
                gbps = self.copy["copy_gbps"]  # a copy's input, so do_bench's copy stands in)
            elif method in ("steady", "pipeline"):  # both back-to-back streams: one copy figure
                other = self.copy_by_method.get("pipeline" if method == "steady" else "steady")
                gbps = other or H.copy_bandwidth_steady(self.device)["copy_gbps"]
            else:
                n = (1 << 30) // 4
                src = torch.empty(n, device=self.device).uniform_()
                dst = torch.empty_like(src)
                med = H.time_read_flushed(lambda: dst.copy_(src), device=self.device)[0]
                gbps = 2 * n * 4 / (med * 1e-3) / 1e9
                del src, dst
                H.free(self.device)
            self.copy_by_method[method] = gbps
        return self.copy_by_method[method]

    def time_method(self, method: str, calls: list, info: dict, produce: Callable | None = None,
                    produce_alone: dict | None = None) -> tuple[float, float, float] | None:
        """calls[0] timed by do_bench, with a read flush, or after `produce()` (untimed: it
        rewrites calls[0]'s input); all of them by steady state, which fills `info` (host time
        per call); "pipeline": `produce(); calls[0]()` as a steady stream, less `produce()` alone
        timed the same way (once per case: cached in `produce_alone`), as (median difference,
        p20 of the pair - p80 of the producer, p80 of the pair - p20 of the producer): bounds,
        not quantiles, and any of them may be <= 0 (an L2-resident case); a host-bound producer
        stream marks `info` host-bound too. The dry run makes one call (after `produce()` for the
        methods that have one)."""
        if not self.measure:
            if method in FORWARD_ONLY_METHODS and produce is not None:
                produce()
            calls[0]()
            return None
        if method == "do_bench":
            return self.time(calls[0])
        if method == "produced":
            return H.time_after(calls[0], produce, device=self.device,
                                warmup=self.args.warmup_ms, rep=self.args.rep_ms)
        if method == "pipeline":
            cache = produce_alone if produce_alone is not None else {}
            if "ms" not in cache:
                cache["info"] = {}
                cache["ms"] = H.time_steady([produce], device=self.device, info=cache["info"])
            alone = cache["ms"]
            both = H.time_steady([lambda: (produce(), calls[0]())], device=self.device, info=info)
            info["host_bound"] = info.get("host_bound", False) or cache["info"]["host_bound"]
            return (both[0] - alone[0], both[1] - alone[2], both[2] - alone[1])
        if method == "read-flush":
            return H.time_read_flushed(calls[0], device=self.device, warmup=self.args.warmup_ms,
                                       rep=self.args.rep_ms)
        return H.time_steady(calls, device=self.device, info=info)

    def method_case(self, shape, dtype, seed: int, configs: list, backward: bool) -> None:
        """The same op timed by each of METHODS (bench/NOTES.md, issue 13, s24): the forward
        with each of `configs` (None: the default), and with `backward` the backward op too."""
        x, lengths = self.inputs(shape, dtype, seed)
        # Steady state: the calls rotate over copies of x, and keep their outputs alive, so that
        # together they read and write several times the L2 (4 x 50 MB) and no call finds the
        # previous ones' bytes there (4x4096x512's 32 MiB takes 6 copies; counted on the case's
        # real size, which the dry run shrinks).
        copies = max(3, math.ceil(STEADY_FOOTPRINT / (math.prod(shape) * x.element_size())))
        xs = [x] + [x.clone() for _ in range(copies - 1)]
        B, T, D = x.shape
        es = x.element_size()
        op, op_bwd = torch.ops.dtl_fast.frame_pool, torch.ops.dtl_fast.frame_pool_backward
        produce_alone: dict = {}  # the producer's own steady time, once per case ("pipeline")
        for mode in POOL_MODES:
            W = out_width(D, mode)
            g = torch.randn(B, W, device=self.device).to(dtype)
            ref_out, argmax = op(x, lengths, mode)
            passes = [("forward", c, int(lengths.sum()) * D * es + B * W * es + 8 * B)
                      for c in configs]
            if backward:
                passes.append(("backward", None, B * W * es + B * T * D * es))
            for pas, c, nbytes in passes:
                cfg = self.default if c is None else fwd_config(self.default, c)
                name = "default" if c is None else config_name(cfg)
                key = (H.shape_str(shape), H.dtype_str(dtype), mode, name, pas)
                kept: list = [None] * copies  # each call's output, alive until its turn again
                if pas == "forward":
                    calls = [lambda i=i: kept.__setitem__(i, op(xs[i], lengths, mode)) or kept[i]
                             for i in range(copies)]
                else:
                    calls = [lambda i=i: kept.__setitem__(i, op_bwd(g, lengths, argmax, T, mode))
                             or kept[i] for i in range(copies)]
                self.C.set_cuda_launch_config(*cfg)
                try:
                    same = pas != "forward" or all(map(torch.equal, calls[0](), (ref_out, argmax)))
                    if not same:
                        self.emit(mode="method forward", variant=mode, shape=shape, dtype=dtype,
                                  provider=name, timing=None, nbytes=nbytes, baseline_ms=None,
                                  status="mismatch: output or argmax differs from the default "
                                         "config's")
                        continue
                    for method in METHODS:
                        if method in FORWARD_ONLY_METHODS and pas != "forward":
                            continue
                        self.planned["method"] += 1
                        if not self.budget_left(f"method {pas} {name} {method} {mode} {key[0]}"):
                            continue
                        info: dict = {}
                        # "produced" / "pipeline": x rewritten in place with the same bits by
                        # an SM kernel before each call, as the layer that wrote it would
                        # leave the L2 (x * 1 is exact, -0.0 included; randn has no NaN)
                        t = self.time_method(method, calls, info,
                                             produce=lambda: xs[0].mul_(1),
                                             produce_alone=produce_alone)
                        if t is None:
                            continue
                        copy = self.method_copy(method)
                        # a difference ("pipeline") may come out <= 0: no bandwidth then
                        pct = 100 * nbytes / (t[0] * 1e-3) / 1e9 / copy if t[0] > 0 else math.nan
                        extra = {"config": list(cfg), "method": method, "copies": copies}
                        if method == "pipeline":
                            extra["bounds"] = ("p20 / p80 columns: producer + forward p20 - "
                                               "producer p80, p80 - p20 (not quantiles)")
                        if info:
                            extra.update(host_ms=round(info["host_ms"], 5),
                                         host_bound=info["host_bound"])
                        self.emit(mode=f"method {pas}", variant=mode, shape=shape, dtype=dtype,
                                  provider=f"{name} {method}", timing=t, nbytes=nbytes,
                                  baseline_ms=None, extra=extra, copy_gbps=copy)
                        self.results.setdefault(key, {"method": {}})["method"][method] = (
                            t[0], pct, info.get("host_bound", False))
                finally:
                    self.C.set_cuda_launch_config(*self.default)
        del xs
        H.free(self.device)

    def roofline_case(self, shape, dtype, seed: int) -> None:
        """The read roofline of the headline case: torch's own reductions over all T frames
        (x.sum(1), x.amax(1)) beside the fused forward with every frame valid (lengths None),
        i.e. the same bytes read the same way, as % of copy. Says whether the forward's gap to
        85 % is ours (torch reads faster) or the device's for a read-and-reduce stream."""
        from dtl_fast import ops

        x, _ = self.inputs(shape, dtype, seed)
        B, T, D = x.shape
        es = x.element_size()
        nbytes = B * T * D * es + B * D * es
        key = (H.shape_str(shape), H.dtype_str(dtype), "all frames", "roofline")
        provs = {"torch.sum": lambda: x.sum(1), "torch.amax": lambda: x.amax(1),
                 "fused mean": lambda: ops.frame_pool(x, None, "mean", backend="fused"),
                 "fused max": lambda: ops.frame_pool(x, None, "max", backend="fused")}
        summary = self.results.setdefault(key, {"roofline": {}})
        for name, fn in provs.items():
            self.planned["roofline"] += 1
            if not self.budget_left(f"roofline {name} {key[0]} {key[1]}"):
                continue
            with torch.no_grad():  # (e.g. out of memory: the stock rows still follow)
                t = self.time_or_error_row(fn, mode="roofline forward", variant="all frames",
                                           shape=shape, dtype=dtype, provider=name)
            if t is None:
                continue
            self.emit(mode="roofline forward", variant="all frames", shape=shape, dtype=dtype,
                      provider=name, timing=t, nbytes=nbytes, baseline_ms=None)
            summary["roofline"][name] = 100 * nbytes / (t[0] * 1e-3) / 1e9 / self.copy["copy_gbps"]

    def size_series_fit(self) -> list[str]:
        """Least-squares t = t0 + bytes / BW over the size series (and the first headline case)
        for each configuration of SERIES_GRID: the fixed cost and the streaming rate per U."""
        shapes = [H.shape_str(s) for s, _ in SIZE_SERIES + HEADLINE[:1]]
        lines = []
        for c in SERIES_GRID:
            cfg = fwd_config(self.default, c)
            pts = [(res["bytes"], res["configs"][cfg]) for key, res in self.results.items()
                   if key[0] in shapes and key[1:] == ("float32", "mean", "forward")
                   and cfg in res.get("configs", {})]
            if len(pts) < 3:
                continue
            n = len(pts)
            mb = sum(b for b, _ in pts) / n
            mt = sum(t for _, t in pts) / n
            slope = (sum((b - mb) * (t - mt) for b, t in pts) / sum((b - mb) ** 2 for b, _ in pts))
            t0_us = (mt - slope * mb) * 1e3
            bw = 1e-9 / (slope * 1e-3) if slope > 0 else float("inf")  # GB/s
            lines.append(f"size series fit (float32 mean, {n} sizes) {config_name(cfg)}: t0 {t0_us:.1f} us, "
                         f"BW {bw:.0f} GB/s ({100 * bw / self.copy['copy_gbps']:.1f}% of copy)")
        return lines

    # -- the table ------------------------------------------------------------------------------
    def table(self) -> str:
        lines = []
        if not self.measure:
            lines.append("no CUDA: nothing measured (every GPU figure stays unmeasured)")
            lines.append(f"plan: {self.planned['method']} timing-method timings, "
                         f"{self.planned['forward']} forward and {self.planned['backward']} "
                         f"backward configuration timings, {self.planned['stock']} stock timings, "
                         f"{self.planned['roofline']} read-roofline timings; "
                         f"every configuration accepted by set_cuda_launch_config, every call ran "
                         f"on small CPU tensors")
            return "\n".join(lines)
        l2 = (torch.cuda.get_device_properties(torch.cuda.current_device()).L2_cache_size
              if torch.cuda.is_available() else 0)
        # the L2's size scales the method lines' MB (bench/NOTES.md's bands assumed 50 MB)
        lines.append(f"copy bandwidth {self.copy['copy_gbps']:.0f} GB/s on {self.stamp['device_name']} "
                     f"(L2 {l2 / 1e6:.0f} MB), run {self.run_id}; % = of copy bandwidth over the "
                     f"bytes the op must move")
        lines.append(f"{'case':<32} {'pass':<9} {'default':>14} {'best':>14}  best config")
        best_overall: dict[str, dict] = {"forward": {}, "backward": {}}
        for key, res in self.results.items():
            if "configs" not in res or not res.get("pct"):
                continue
            shape, dtype, mode, pas = key
            pct = res["pct"]
            best = max(pct, key=pct.get)
            d = pct.get(self.default)
            lines.append(f"{shape + ' ' + dtype + ' ' + mode:<32} {pas:<9} "
                         f"{(f'{d:.1f}%' if d is not None else 'n/a'):>14} {pct[best]:>13.1f}%  "
                         f"{config_name(best)}")
            if (tuple(int(s) for s in shape.split("x")), getattr(torch, dtype)) in HEADLINE:
                for cfg, p in pct.items():
                    best_overall[pas].setdefault(cfg, []).append(p)
        for pas, per_cfg in best_overall.items():
            n = max((len(v) for v in per_cfg.values()), default=0)
            full = {c: v for c, v in per_cfg.items() if len(v) == n and n > 0}
            if full:
                geo = {c: math.exp(sum(math.log(max(p, 1e-9)) for p in v) / n) for c, v in full.items()}
                c = max(geo, key=geo.get)
                lines.append(f"best {pas} config over the {n} headline cases (geometric mean "
                             f"{geo[c]:.1f}% vs default {geo.get(self.default, float('nan')):.1f}%): "
                             f"{config_name(c)}")
                if pas == "forward":  # fwd_unroll / fwd_pipeline (bench/NOTES.md predicts them)
                    lines.append("forward geometric mean by config: " + ", ".join(
                        f"{config_name(k)} {v:.1f}%" for k, v in sorted(geo.items())))
        # the ring against the default re-timed beside it (a same-minute reference)
        for key, res in self.results.items():
            if "ring_default" in res:
                ring = {c: p for c, p in res.get("pct", {}).items() if c[7] == 2}
                lines.append(f"ring phase {' '.join(key[:3])}: default {res['ring_default']:.1f}% "
                             f"(first phase {res.get('pct', {}).get(self.default, float('nan')):.1f}%)"
                             + "".join(f", {config_name(c)} {p:.1f}% "
                                       f"({p - res['ring_default']:+.1f} points)"
                                       for c, p in ring.items()))
        if self.copy_by_method:
            lines.append("copy bandwidth by timing method: " + ", ".join(
                f"{m} {v:.0f} GB/s" for m, v in self.copy_by_method.items()))
        for key, res in self.results.items():
            if res.get("method"):
                m = res["method"]
                shape, dtype, mode, name, pas = key
                # a time difference as MB at the run's copy rate (the prediction's unit)
                gaps = "".join(
                    f"; {a} - {b} {1e3 * (m[a][0] - m[b][0]):+.1f} us"
                    f" ({(m[a][0] - m[b][0]) * self.copy['copy_gbps']:+.0f} MB)"  # ms x GB/s
                    for a, b in (("read-flush", "do_bench"), ("steady", "read-flush"),
                                 ("produced", "do_bench"), ("pipeline", "steady"))
                    if a in m and b in m)
                lines.append(f"method {pas} {shape} {dtype} {mode} {name}: " + ", ".join(
                    f"{k} {v[1]:.1f}%" + (" (HOST-BOUND)" if v[2] else "") for k, v in m.items())
                    + f" (of that method's copy){gaps}")
        # The evict-first forward against the default, method by method (bench/NOTES.md, s25
        # has the predicted differences; 4x4096x512 is below L2, so its line is a control: ~0).
        for c in METHOD_CONFIGS:
            if c is None or len(c) < 5 or not c[4]:
                continue
            ef = config_name(fwd_config(self.default, c))
            base = config_name(fwd_config(self.default, c[:4]))
            base = "default" if fwd_config(self.default, c[:4]) == self.default else base
            for key, res in self.results.items():
                if not res.get("method") or key[3:] != (base, "forward"):
                    continue
                other = self.results.get(key[:3] + (ef, "forward"), {}).get("method", {})
                m = res["method"]
                diffs = [f"{k} {1e3 * (other[k][0] - m[k][0]):+.1f} us "
                         f"({(other[k][0] - m[k][0]) * self.copy['copy_gbps']:+.0f} MB)"
                         for k in METHODS if k in other and k in m]
                if diffs:
                    lines.append(f"{ef} - {base}, forward {key[0]} {key[1]} {key[2]}: "
                                 + ", ".join(diffs))
        lines += self.size_series_fit()
        for key, res in self.results.items():
            if res.get("roofline"):
                lines.append(f"read roofline {key[0]} {key[1]} (all frames, % of copy): " + ", ".join(
                    f"{k} {v:.1f}%" for k, v in res["roofline"].items()))
        for key, res in self.results.items():
            if "stock" in res and res["stock"]:
                shape, dtype, mode, pas = key
                st = res["stock"]
                stock = {k: v for k, v in st.items() if k != "fused"}
                best_stock = min(stock, key=stock.get) if stock else None
                verdict = ("fused wins" if best_stock is None or st.get("fused", math.inf) <= stock[best_stock]
                           else f"STOCK WINS ({best_stock})")
                auto = f" (auto {res['auto']:.4f} ms)" if "auto" in res else ""
                lines.append(f"{shape + ' ' + dtype + ' ' + mode:<32} {pas:<24} "
                             + " ".join(f"{k} {v:.4f} ms" for k, v in st.items())
                             + f"  -> {verdict}{auto}")
        lines += [m for m in self.not_run if " phase stopped: " in m]
        cut = [m for m in self.not_run if " phase stopped: " not in m]
        if cut:
            lines.append(f"budget spent: {len(cut)} timing(s) not run, first: {cut[0]}")
        return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget-s", type=float, default=150.0, help="seconds of timing (default 150)")
    p.add_argument("--dry-run", action="store_true", help="walk the plan on the CPU, measure nothing")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    p.add_argument("--run-id", default=None)
    p.add_argument("--warmup-ms", type=float, default=5.0)
    p.add_argument("--rep-ms", type=float, default=20.0)
    p.add_argument("--no-stock", action="store_true", help="skip the stock-formulation timings")
    args = p.parse_args(argv)

    measure = torch.cuda.is_available() and not args.dry_run
    device = "cuda" if measure else "cpu"
    t0 = time.perf_counter()
    sweep = Sweep(args, device, measure)
    if measure and not sweep.dtl_fast.info().get("cuda_kernels_built"):
        print("dtl_fast._C has no CUDA kernels: nothing to sweep")
        return 1
    print(f"[sweep] {H.format_stamp(sweep.stamp)}")
    print(f"[sweep] default config {config_name(sweep.default)}; {'measuring' if measure else 'DRY RUN (no CUDA): nothing is measured'}")
    # Each phase stops on its own: a fault or an out-of-memory error in one (the evict-first
    # kernels of the method step have never run on a GPU either) ends that phase, not the run;
    # the table says which phase stopped (the dry run raises instead: it exists to catch this).
    def phase(name, body):
        try:
            body()
        except Exception as exc:  # noqa: BLE001
            if not measure:
                raise
            sweep.not_run.append(f"the {name} phase stopped: {H.exc_text(exc)}")
            print(f"[sweep] the {name} phase stopped: {H.exc_text(exc)}", flush=True)

    def method():  # first: it decides how to read the rest
        for i, (shape, dtype) in enumerate(METHOD_CASES):
            sweep.method_case(shape, dtype, 30 + i, [c for c in METHOD_CONFIGS if not is_ring(c)],
                              backward=True)

    def headline():
        for i, (shape, dtype) in enumerate(HEADLINE):
            for mode in POOL_MODES:
                sweep.sweep_case(shape, dtype, mode, i,
                                 fwd_grid=[c for c in FWD_GRID if not is_ring(c)])

    def series():
        for i, (shape, dtype) in enumerate(SIZE_SERIES):
            sweep.sweep_case(shape, dtype, "mean", 10 + i,
                             forward_only=[c for c in SERIES_GRID if not is_ring(c)])

    def roofline():
        for i, (shape, dtype) in enumerate(HEADLINE[:2]):
            sweep.roofline_case(shape, dtype, 20 + i)

    def stock():
        for i, (shape, dtype) in enumerate(SMALL + HEADLINE):
            for mode in POOL_MODES:
                sweep.stock_case(shape, dtype, mode, 100 + i)

    def all_frames():  # before `stock`: the lengths=None rule has no GPU row at all yet
        for i, (shape, dtype) in enumerate(SMALL + HEADLINE[:2]):
            for mode in POOL_MODES + ("sum",):
                sweep.all_frames_case(shape, dtype, mode, 200 + i)

    # The ring kernel (fwd_pipeline = 2) has never run on a GPU: every timing of it comes last,
    # so that a fault in it (which would leave the process's CUDA context unusable) cannot cost
    # the rows of anything else; each of its forward cases re-times the default beside it.
    def ring():
        for i, (shape, dtype) in enumerate(METHOD_CASES):
            sweep.method_case(shape, dtype, 30 + i, [c for c in METHOD_CONFIGS if is_ring(c)],
                              backward=False)
        for i, (shape, dtype) in enumerate(HEADLINE):
            for mode in POOL_MODES:
                sweep.sweep_case(shape, dtype, mode, i,
                                 forward_only=[c for c in FWD_GRID if is_ring(c)], ring_phase=True)
        for i, (shape, dtype) in enumerate(SIZE_SERIES):
            sweep.sweep_case(shape, dtype, "mean", 10 + i,
                             forward_only=[c for c in SERIES_GRID if is_ring(c)], ring_phase=True)

    phase("method", method)
    phase("headline", headline)
    phase("size-series", series)
    phase("roofline", roofline)
    if not args.no_stock:
        phase("all-frames", all_frames)
        phase("stock", stock)
    if measure:
        # the table so far, in case the ring phase hangs and the step's timeout kills the run
        print("==================== frame_pool sweep (before the ring phase) ====================")
        print(sweep.table(), flush=True)
    phase("ring", ring)
    print(f"[sweep] {len(sweep.rows)} rows{' written to ' + str(Path(args.out) / (KERNEL + '.csv')) if measure else ''}; "
          f"{time.perf_counter() - t0:.0f} s")
    print("==================== frame_pool sweep ====================")
    print(sweep.table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
