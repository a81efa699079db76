"""Benchmark: one DTL training step (forward, dtl_loss, backward, Adam step, zero_grad).

The model is dtl_fast.models.DTL(num_classes=10) with its defaults (ConvEncoder width 64,
bidirectional LSTM or GRU with hidden 64, dim 128, 4 heads, 2 DAM layers, window 2, 4 memory
slots); images [B, 3, S, S], videos [B, T, 3, S, S] zero padded past each clip's length, lengths
drawn uniformly in [T/2, T] (seeded, int64 on the CPU as a DataLoader gives them), labels in
[0, 10). The default size is B 64, T 16, S 32 (shape "64x16x32" = BxTxS; variant = the RNN).

Providers (the first is the baseline every ratio is taken against, timed in the same run); each
has its own copy of the same initial weights and its own Adam (lr 1e-3):
  reference   the model with backend="reference": eager PyTorch everywhere (the time-step loop
              for the RNN, dense-score attention, masked eager pooling)
  fused       backend="fused" on CUDA (the Triton / CUDA kernels); on CPU backend="auto", the
              fastest CPU path (PyTorch's native RNN kernels, the C++ pooling op, the CPU
              attention path) -- the fused kernels on CPU tensors would run in the Triton
              interpreter, which is never timed (the row's extra "backend" says which ran)
  fused+graphs  CUDA only: the fused model in static-shape mode (every frame slot encoded,
              lengths in a device buffer) with Adam(capturable=True); the WHOLE step (forward,
              dtl_loss, backward, Adam step) captured once in a torch.cuda.CUDAGraph after 3
              warm-up steps on a side stream, and each timed step is one replay (make_graphed_step;
              autocast with cache_enabled=False, as capture needs). Its gate runs the same
              static-mode model eagerly; peak_mb is the peak of warm-up + capture (a replay
              allocates nothing: its buffers are the graph's pool)
  compiled-fused  CUDA only: torch.compile(model with backend="fused"), default mode (the
              model's static-shape mode under tracing: one graph, no break; compile_s in extra);
              budgeted like `compiled`, on the cases marked for compile
  compiled    torch.compile(model with backend="reference"), default mode, forward and backward
              compiled on the first step (compile_s in extra). The unrolled RNN loop makes the
              compile long (minutes): it is budgeted (COMPILE_* below, against --time-budget)
              and a row says "skipped: ..." when it does not fit; on CPU it is not run (it did
              not finish within 15 minutes on the 2-core machine this was written on)

dtypes: float32 (TF32 off), float32-tf32 (TF32 on for matmuls and cuDNN), bf16-amp (autocast
bfloat16 around forward and loss; CUDA only). The TF32 flags are restored after each case.

Gate before timing (a speedup is never reported on a red gate): from the same weights, one
forward + dtl_loss + backward of every provider; the three logits and the loss against the
reference (relative error <= GATE_TOL: 1e-4 on CPU float32, 1e-2 on CUDA under TF32 / bf16)
and the flat vector of all parameter gradients (<= GRAD_TOL). A provider that fails is
"gate-failed: ..." and not timed.

extra: backend, rel_logits, rel_grads (gate), samples_per_s, x_compiled (every dtl_fast row:
compiled ms / its ms, when compiled was timed), compile_s, frames (valid frames per step),
params, peak_mb (CUDA), gpu_busy (CUDA: GPU time of the step's kernels, memcpys and memsets
from torch.profiler over 3 steps / the step's median time), noisy.

Acceptance figures (GPU, min over the cases): fused >= 2x reference; fused >= 1.3x compiled;
fused+graphs >= 2x compiled; fused+graphs GPU busy >= 80 %; peak memory fused <= reference
(max over the cases of fused peak_mb / reference peak_mb <= 1). CPU: fused (auto) >= 1x
reference, with the ratio reported as information.

    python bench/bench_dtl.py --device cpu [--quick]
    python bench/bench_dtl.py --device cuda --quick --time-budget 300
    python bench/bench_dtl.py --device cuda --time-budget 540      (the issue's whole grid)
    python bench/bench_dtl.py --device cuda --quick --compile-only --time-budget 400
                                                               (the compile case alone)
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness as H  # noqa: E402

KERNEL = "dtl"
BASELINE = "reference"
MODES = ("train-step",)
NUM_CLASSES = 10
LR = 1e-3

# name -> (TF32 on, autocast dtype or None)
DTYPES = {
    "float32": (False, None),
    "float32-tf32": (True, None),
    "bf16-amp": (False, torch.bfloat16),
}
GATE_TOL = {"cpu": 1e-4, "cuda": 1e-2}  # logits and loss, relative error vs the reference
GRAD_TOL = {"cpu": 1e-4, "cuda": 5e-2}  # the flat parameter gradient (bf16: rounding adds up)

# torch.compile of the reference: the RNN's time-step loop is unrolled (both directions, both
# modalities), forward and backward. Seconds assumed, to decide whether it fits the budget.
COMPILE_S_FIXED = 30.0
COMPILE_S_PER_STEP = 0.75
# torch.compile of the fused model: no unrolled loop (the recurrences are custom ops)
COMPILE_FUSED_S = 60.0
GRAPH_WARMUP = 3  # eager steps on a side stream before the capture (the docs' pattern)


@dataclass(frozen=True)
class Case:
    rnn: str  # "lstm" | "gru"
    B: int
    T: int  # frames per clip (max); lengths uniform in [T // 2, T]
    S: int  # image and frame size S x S
    dtype: str  # a key of DTYPES
    compile: bool = False  # time torch.compile(reference) here
    model: tuple = ()  # DTL keyword overrides as (key, value) pairs (tests: a tiny model)

    @property
    def shape(self) -> str:
        return f"{self.B}x{self.T}x{self.S}"

    @property
    def variant(self) -> str:
        return self.rnn


DEFAULT = dict(B=64, T=16, S=32)
LARGE = dict(B=256, T=16, S=32)
CPU_TINY = [Case("lstm", 2, 3, 8, "float32",
                 model=(("width", 8), ("hidden_size", 8), ("dim", 16), ("num_heads", 2),
                        ("num_layers", 1), ("window", 1), ("num_memory", 2)))]
# quick (`make demo` runs run.py --quick three times): the default model at batch 16
CPU_QUICK = [Case("lstm", 16, 16, 32, "float32")]
CPU_FULL = [Case(rnn, **DEFAULT, dtype="float32") for rnn in ("lstm", "gru")]
# GPU (issue 12's grid: LSTM and GRU, fp32+TF32 and bf16 autocast, batch 64 and 256): the cheap
# cases first, the torch.compile cases last (their compiles take minutes and are budgeted; when
# one does not fit its row says so and the compiled figures FAIL)
GPU_QUICK = [Case("lstm", **DEFAULT, dtype="float32-tf32"),
             Case("gru", **DEFAULT, dtype="bf16-amp"),
             Case("lstm", **LARGE, dtype="bf16-amp"),
             Case("lstm", **DEFAULT, dtype="float32-tf32", compile=True)]
GPU_FULL = ([Case(rnn, **size, dtype=dt) for size in (DEFAULT, LARGE) for rnn in ("lstm", "gru")
             for dt in ("float32-tf32", "bf16-amp")]
            + [Case(rnn, **DEFAULT, dtype="float32-tf32", compile=True) for rnn in ("lstm", "gru")]
            + [Case("lstm", **LARGE, dtype="bf16-amp", compile=True)])


def compile_estimate_s(case: Case, tokens: int) -> float:
    """Seconds a compile of the reference model is assumed to take: unrolled RNN steps (image
    tokens + frames, two directions) times a per-step cost, plus a fixed part."""
    return COMPILE_S_FIXED + COMPILE_S_PER_STEP * 2 * (tokens + case.T)


def select_cases(device: str, quick: bool, tiny: bool, compile_only: bool = False) -> list[Case]:
    cases = H.select_grid(device, quick, tiny, tiny_grid=CPU_TINY, cpu_quick=CPU_QUICK,
                          cpu_full=CPU_FULL, gpu_quick=GPU_QUICK, gpu_full=GPU_FULL)
    return [c for c in cases if c.compile] if compile_only else cases


def timing_kwargs(device: str, quick: bool, tiny: bool) -> dict[str, Any]:
    if device == "cuda":
        # one step is tens of ms: do_bench's default 100 ms would give a handful of samples
        return dict(warmup=100, rep=600) if quick else dict(warmup=200, rep=2000)
    # one step is ~1 s on CPU: one round of time_many (5 samples each) is enough for quick
    return H.grid_timing_kwargs(device, quick, tiny,
                                cpu_quick=dict(warmup=1, rep=1, min_samples=5, max_ms=1))


def load_api():
    try:
        M = importlib.import_module("dtl_fast.models")
    except Exception as exc:  # noqa: BLE001
        raise SystemExit(f"dtl_fast.models is not importable ({type(exc).__name__}: {exc})")
    return M.DTL, M.dtl_loss


def make_inputs(case: Case, ci: int, device: str, channels: int = 3):
    """images, videos (zero padded), lengths (int64, CPU), labels: seeded per case."""
    g = H.gen("cpu", 100 + ci)
    lengths = torch.randint(max(1, case.T // 2), case.T + 1, (case.B,), generator=g)
    labels = torch.randint(0, NUM_CLASSES, (case.B,), generator=g).to(device)
    gd = H.gen(device, 200 + ci)
    images = torch.randn(case.B, channels, case.S, case.S, generator=gd, device=device)
    videos = torch.randn(case.B, case.T, channels, case.S, case.S, generator=gd, device=device)
    pad = (torch.arange(case.T)[None, :] >= lengths[:, None]).to(device)
    videos[pad] = 0.0
    return images, videos, lengths, labels


def _autocast(device: str, amp, cache: bool = True):
    if amp is None:
        return contextlib.nullcontext()
    # cache=False under CUDA graph capture: autocast's cast cache would keep casts of the
    # weights made before the capture (torch.cuda.graphs docs)
    return torch.autocast(device_type=device, dtype=amp, cache_enabled=cache)


def _flat_grads(model) -> torch.Tensor:
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).detach().float().flatten()
                      for p in model.parameters()])


def gate_step(model, loss_fn, inputs, device, amp):
    """One forward + loss + backward (no optimizer step); returns (logits [3], loss, flat grads)
    and leaves no gradient behind."""
    images, videos, lengths, labels = inputs
    model.zero_grad(set_to_none=True)
    with _autocast(device, amp):
        out = model(images, videos, lengths)
        loss = loss_fn(out, labels)
    loss.backward()
    res = ([o.detach().float() for o in out], loss.detach().float(), _flat_grads(model))
    model.zero_grad(set_to_none=True)
    H.sync(device)
    return res


def make_step(model, opt, loss_fn, inputs, device, amp) -> Callable[[], None]:
    images, videos, lengths, labels = inputs

    def step():
        with _autocast(device, amp):
            out = model(images, videos, lengths)
            loss = loss_fn(out, labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def make_graphed_step(model, opt, loss_fn, inputs, device, amp) -> Callable[[], None]:
    """The whole training step (forward, loss, backward, opt.step()) captured in one
    torch.cuda.CUDAGraph; returns a replay callable that keeps the graph and `inputs` alive.
    `inputs` are the static buffers (lengths on the device: refill them with .copy_() between
    replays); `opt` must be built with
    capturable=True. GRAPH_WARMUP eager steps run first on a side stream (they step the
    model, as any training step would). The model is put in static-shape mode."""
    if device != "cuda":
        raise RuntimeError("make_graphed_step: CUDA graphs need a CUDA device")
    images, videos, lengths, labels = inputs
    if lengths.device != videos.device:
        raise ValueError("make_graphed_step: lengths must be a device buffer like videos")
    model.static_shapes = True

    def body():
        with _autocast(device, amp, cache=False):
            out = model(images, videos, lengths)
            loss = loss_fn(out, labels)
        loss.backward()
        opt.step()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(GRAPH_WARMUP):
            opt.zero_grad(set_to_none=True)
            body()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    opt.zero_grad(set_to_none=True)  # the captured backward allocates the grads in its pool
    with torch.cuda.graph(graph):
        body()

    def replay():
        graph.replay()

    # The graph reads the input buffers by address: the step owns them, so the caller dropping
    # its tuple cannot free them for the allocator to reuse (replays would read whatever lands
    # there: seen on an H100, a device-side lengths assert).
    replay.static_inputs = inputs
    return replay


def gpu_kernel_ms(step: Callable[[], None], steps: int = 3) -> float | None:
    """GPU time per step (ms) of the kernels, memcpys and memsets torch.profiler sees over
    `steps` calls (CUDA graph replays included); None when the profiler shows no GPU work."""
    from torch.profiler import ProfilerActivity, profile

    step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    total = 0.0
    for e in prof.key_averages():
        if str(getattr(e, "device_type", "")).endswith("CUDA"):
            v = getattr(e, "self_device_time_total", None)
            total += v if v is not None else getattr(e, "self_cuda_time_total", 0.0)
    return total / 1e3 / steps if total > 0 else None


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Measures the grid of args (see the module docstring); returns the rows it appended.
    On CPU without --threads it runs on one thread (restored afterwards; the rows'
    device_name says so), as the other modules: the ratios compare providers on the same
    thread count, and a shared machine's second core comes and goes."""
    return H.run_one_thread_on_cpu(args, _run)


def _run(args: argparse.Namespace, device: str) -> list[dict[str, Any]]:
    tiny = getattr(args, "tiny", False)
    kernel, run_id, deadline = H.start_run(args, KERNEL)
    DTL, loss_fn = load_api()
    stamp, writer = H.open_results(args, kernel, device)
    print(f"[{kernel}] providers: reference (backend reference), fused (backend "
          f"{'fused' if device == 'cuda' else 'auto: the fastest CPU path'}), fused+graphs (the "
          "whole step in one CUDA graph), compiled-fused (torch.compile of the fused model), "
          "compiled (torch.compile of the reference model); one step = forward, dtl_loss, "
          "backward, Adam step, zero_grad")
    cases = getattr(args, "cases", None) or select_cases(
        device, args.quick, tiny, compile_only=getattr(args, "compile_only", False))
    timing_kw = timing_kwargs(device, args.quick, tiny)
    if device == "cpu":
        timing_kw["flush_cache"] = getattr(args, "cold_cache", False)
    rows: list[dict[str, Any]] = []
    emit = H.emitter(writer, rows, ("samples_per_s",))

    def one_case(ci, case):
        tf32, _ = DTYPES[case.dtype]
        with H.precision(tf32):
            _run_case(case, ci, device, DTL, loss_fn, kernel, stamp, run_id, timing_kw,
                      deadline, emit, getattr(args, "fused_override", None))

    def after_case(case):
        if case.compile:
            importlib.import_module("torch._dynamo").reset()  # free the unrolled graphs

    H.run_cases(cases, kernel=kernel, device=device, deadline=deadline, emit=emit, modes=MODES,
                stamp=stamp, baseline=BASELINE, run_id=run_id, run_case=one_case,
                after_case=after_case)
    return H.finish_run(rows, args, kernel=kernel, device=device, run_id=run_id, writer=writer,
                        stamp=stamp, extra_keys=("samples_per_s", "rel_logits", "x_compiled"))


def _tokens(model, case: Case, device: str) -> int:
    """Image tokens the encoder gives for an S x S image (the RNN's unrolled image steps)."""
    with torch.no_grad():
        return int(model.encoder.tokens(torch.zeros(1, 3, case.S, case.S, device=device)).shape[1])


def _run_case(case, ci, device, DTL, loss_fn, kernel, stamp, run_id, timing_kw, deadline, emit,
              fused_override=None):
    _, amp = DTYPES[case.dtype]
    if amp is not None and device != "cuda":
        raise ValueError(f"{case.dtype} is a CUDA case")
    torch.manual_seed(1000 + ci)
    base_model = DTL(NUM_CLASSES, rnn=case.rnn, **dict(case.model)).to(device)
    inputs = make_inputs(case, ci, device)
    n_frames = int(inputs[2].sum())
    n_params = sum(p.numel() for p in base_model.parameters())
    tokens = _tokens(base_model, case, device)
    fused_backend = "fused" if device == "cuda" else "auto"
    print(f"[{kernel}] {case.variant} {case.shape} {case.dtype}: {n_params} parameters, "
          f"{n_frames} valid frames, {tokens} image tokens", flush=True)

    models = {"reference": copy.deepcopy(base_model).set_backend("reference"),
              "fused": copy.deepcopy(base_model).set_backend(fused_backend)}
    if fused_override is not None:  # tests: a deliberately wrong provider
        models["fused"] = fused_override(models["fused"])
    provs: dict[str, Any] = dict(models)
    pristine = None  # the compiled provider's weights: the initial ones (the others step)
    pristine_fused = None  # likewise for compiled-fused
    if device != "cuda":
        provs["compiled"] = ("skipped: torch.compile of the reference model is timed on CUDA only "
                             "(the unrolled RNN loop takes many minutes to compile on a CPU)")
    elif not case.compile:
        provs["compiled"] = "skipped: torch.compile only on the case marked for it (compile time)"
    else:
        pristine = copy.deepcopy(models["reference"])
        provs["compiled"] = None  # compiled below, once the budget says it fits
    if device != "cuda":
        provs["fused+graphs"] = "skipped: CUDA graphs need a CUDA device"
        provs["compiled-fused"] = ("skipped: torch.compile of the fused model is timed on CUDA only "
                                   "(its Triton kernels run in the interpreter on CPU tensors)")
    else:
        provs["fused+graphs"] = copy.deepcopy(models["fused"])
        if case.compile:
            provs["compiled-fused"] = None  # compiled below, once the budget says it fits
            pristine_fused = copy.deepcopy(models["fused"])
        else:
            provs["compiled-fused"] = "skipped: torch.compile only on the case marked for it (compile time)"
    if device == "cpu":
        provs["fused:triton"] = ("skipped: the fused kernels on CPU tensors run in the Triton "
                                 "interpreter: never timed")
    del base_model

    mode = MODES[0]
    base = dict(kernel=kernel, mode=mode, variant=case.variant, shape=case.shape,
                dtype=case.dtype, stamp=stamp, baseline=BASELINE, run_id=run_id)
    want = None
    calls: dict[str, Callable] = {}
    extras: dict[str, dict] = {}
    planned = 0.0
    graph_peak = None
    order = [n for n in H.budget_order(provs, BASELINE) if n not in ("fused+graphs", "compiled-fused")]
    order[order.index("fused") + 1:order.index("fused") + 1] = ["fused+graphs", "compiled-fused"]
    for name in order:
        prov = provs[name]
        if isinstance(prov, str):
            emit(H.status_row(base, name, prov))
            continue
        ex: dict[str, Any] = {"frames": n_frames, "params": n_params}
        gate_inputs = inputs
        if name in ("compiled", "compiled-fused"):
            est = (compile_estimate_s(case, tokens) if name == "compiled" else COMPILE_FUSED_S)
            st = H.budget_skip(deadline, est, planned, what=f"torch.compile ({name}, forward + backward)")
            if st:
                emit(H.status_row(base, name, st))
                continue
            model = pristine if name == "compiled" else pristine_fused
            prov = torch.compile(model)
        elif name == "fused+graphs":
            model = prov
            model.static_shapes = True
            # static buffers: the lengths live on the device (checked on the host first)
            gate_inputs = (inputs[0].clone(), inputs[1].clone(), inputs[2].to(device), inputs[3].clone())
        else:
            model = prov
        t0 = time.perf_counter()
        try:
            got = gate_step(prov, loss_fn, gate_inputs, device, amp)
        except Exception as exc:  # noqa: BLE001
            status = H.exc_status(exc, device)
            if name == "compiled" and not status.startswith("skipped"):
                status = f"skipped: torch.compile failed: {H.exc_text(exc, 100)}"
            H.free(device)
            emit(H.status_row(base, name, status))
            continue
        first_s = time.perf_counter() - t0
        if name in ("compiled", "compiled-fused"):
            ex["compile_s"] = round(first_s, 1)
        if name == BASELINE:
            want = got
            ok, msg = all(torch.isfinite(t).all() for t in (*got[0], got[1], got[2])), "non-finite"
        else:
            ok, msg, rl, rg = _check(got, want, device)
            ex["rel_logits"], ex["rel_grads"] = float(f"{rl:.3g}"), float(f"{rg:.3g}")
        if not ok:
            emit(H.status_row(base, name, H.gate_status(msg, kernel, f"{name} {case.variant} "
                                                                      f"{case.shape} {case.dtype}")))
            if name == BASELINE:
                break
            continue
        if name == BASELINE or name.startswith(("fused", "compiled-fused")):
            ex["backend"] = "reference" if name == BASELINE else fused_backend
        if name == "fused+graphs":
            opt = torch.optim.Adam(model.parameters(), lr=LR, capturable=True)
            try:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                before = torch.cuda.memory_allocated()
                step = make_graphed_step(model, opt, loss_fn, gate_inputs, device, amp)
                torch.cuda.synchronize()
                graph_peak = (torch.cuda.max_memory_allocated() - before) / (1 << 20)
            except Exception as exc:  # noqa: BLE001 -- a host sync in an op breaks capture
                H.free(device)
                emit(H.status_row(base, name, f"error: CUDA graph capture failed: {H.exc_text(exc, 160)}"))
                continue
        else:
            opt = torch.optim.Adam(model.parameters(), lr=LR)
            step = make_step(prov, opt, loss_fn, inputs, device, amp)
        if deadline.end is not None:
            est, st = H.second_call_budget(deadline, planned, lambda s=step: _one_call_s(s, device),
                                           device)
            if st:
                emit(H.status_row(base, name, st))
                continue
            planned += est
        calls[name], extras[name] = step, ex
    if want is None or H.baseline_missing(calls, BASELINE, kernel,
                                          f"{case.variant} {case.shape} {case.dtype}", emit, base):
        return
    timed = H.time_calls(calls, {}, mode=mode, device=device, timing_kw=timing_kw, emit=emit,
                         base=base)
    if timed is None:
        return
    times, peaks = timed
    if graph_peak is not None and "fused+graphs" in peaks:
        peaks["fused+graphs"] = graph_peak  # a replay allocates nothing new
    base_ms = times[BASELINE][0]
    comp_ms = times["compiled"][0] if "compiled" in times else None
    for name, t in times.items():
        ex = extras[name]
        ex["samples_per_s"] = round(case.B / (t[0] * 1e-3), 1)
        if name != "compiled" and name != BASELINE and comp_ms is not None:
            ex["x_compiled"] = round(comp_ms / t[0], 3)
        if peaks.get(name) is not None:
            ex["peak_mb"] = round(peaks[name], 1)
        if device == "cuda":
            try:
                k_ms = gpu_kernel_ms(calls[name])
            except Exception as exc:  # noqa: BLE001 -- the profiler is information only
                print(f"[{kernel}] {name}: profiler failed ({H.exc_text(exc, 80)})")
                k_ms = None
            if k_ms is not None:
                ex["gpu_busy"] = round(min(k_ms / t[0], 1.0), 3)
        if H.noisy(t):
            ex["noisy"] = True
        emit(H.make_row(**base, provider=name, timing=t, baseline_ms=base_ms, extra=ex))


def _check(got, want, device) -> tuple[bool, str, float, float]:
    """(ok, message, worst logits / loss rel err, grads rel err) of a provider's gate step."""
    tol, gtol = GATE_TOL[device], GRAD_TOL[device]
    worst = 0.0
    for name, g, w in zip(("logits.image", "logits.video", "logits.fused", "loss"),
                          (*got[0], got[1]), (*want[0], want[1])):
        if g.shape != w.shape:
            return False, f"{name}: shape {tuple(g.shape)} != {tuple(w.shape)}", math.inf, math.inf
        if not bool(torch.isfinite(g).all()):
            return False, f"{name}: non-finite values", math.inf, math.inf
        e = H.rel_err(g, w)
        worst = max(worst, e)
        if not e <= tol:
            return False, f"{name}: rel err {e:.2e} vs reference > {tol:.0e}", e, math.inf
    if not bool(torch.isfinite(got[2]).all()):
        return False, "parameter gradients: non-finite values", worst, math.inf
    eg = H.rel_err(got[2], want[2])
    if not eg <= gtol:
        return False, f"parameter gradients: rel err {eg:.2e} vs reference > {gtol:.0e}", worst, eg
    return True, "ok", worst, eg


def _one_call_s(step, device) -> float:
    H.sync(device)
    t0 = time.perf_counter()
    step()
    H.sync(device)
    return time.perf_counter() - t0


# ----------------------------------------------------------------------------------------------
# acceptance figures (run.py prints them)
# ----------------------------------------------------------------------------------------------

GPU_X_REFERENCE = 2.0  # fused vs the eager reference, per training step
GPU_X_COMPILED = 1.3  # fused vs torch.compile(reference), per training step
GPU_GRAPHS_X_COMPILED = 2.0  # fused+graphs vs torch.compile(reference) (issue 12)
GPU_GRAPHS_BUSY = 0.80  # fused+graphs: GPU busy fraction of the step (issue 12)
GPU_PEAK_RATIO = 1.0  # peak memory fused / reference (issue 12: fused <= reference)
CPU_X_REFERENCE = 1.0  # auto vs the eager reference on CPU (the ratio is information)


def acceptance(rows, device: str) -> list[dict[str, Any]]:
    """The DTL training-step figures from this run's rows: dicts with name, value, passed (and
    number / target / unit when measured)."""
    rows = [r for r in rows if r.get("kernel") == KERNEL and r.get("device") == device]
    fused = [r for r in rows if r["provider"] == "fused"]
    not_run = H.not_run_rows(rows)
    if device == "cpu":
        f = H.min_figure(f"cpu train step auto >= {CPU_X_REFERENCE:g}x reference", fused,
                         lambda r: H.fnum(r.get("ratio")), CPU_X_REFERENCE)
        ms = [f"{r['variant']} {r['shape']}: {H.fnum(r['median_ms']):.0f} ms/step"
              for r in fused if H.row_ok(r)]
        ms += [f"reference {H.fnum(r['median_ms']):.0f} ms" for r in rows
               if r["provider"] == BASELINE and H.row_ok(r)]
        if ms and f.get("number") is not None:
            f["value"] += "; " + ", ".join(ms)
        return [H.mark_not_run(f, len(not_run))]
    figs = [H.mark_not_run(H.min_figure(
        f"gpu train step fused >= {GPU_X_REFERENCE:g}x reference", fused,
        lambda r: H.fnum(r.get("ratio")), GPU_X_REFERENCE), len(not_run))]
    comp_rows = [r for r in rows if r["provider"] == "compiled" and "only on the case" not in
                 r["status"]]
    with_comp = [r for r in fused if "x_compiled" in H.row_extra(r)]
    if comp_rows and not with_comp:
        bad = comp_rows[0]
        f = dict(name=f"gpu train step fused >= {GPU_X_COMPILED:g}x torch.compile(reference)",
                 passed=False, value=f"compiled not timed: {bad['status'][:90]}")
    else:
        f = H.min_figure(f"gpu train step fused >= {GPU_X_COMPILED:g}x torch.compile(reference)",
                         with_comp, lambda r: H.fnum(H.row_extra(r).get("x_compiled")),
                         GPU_X_COMPILED)
    # a grid cut by the budget may have cut the compile case: unmeasured then says so
    figs.append(H.mark_not_run(f, 0 if with_comp else len(not_run)))
    graphs = [r for r in rows if r["provider"] == "fused+graphs"]
    g_comp = [r for r in graphs if "x_compiled" in H.row_extra(r)]
    name = f"gpu train step fused+graphs >= {GPU_GRAPHS_X_COMPILED:g}x torch.compile(reference)"
    if graphs and not any(H.row_ok(r) for r in graphs):
        f = dict(name=name, passed=False, value=f"fused+graphs not timed: {graphs[0]['status'][:90]}")
    else:
        f = H.min_figure(name, g_comp, lambda r: H.fnum(H.row_extra(r).get("x_compiled")),
                         GPU_GRAPHS_X_COMPILED)
    figs.append(H.mark_not_run(f, 0 if g_comp else len(not_run)))
    figs.append(H.mark_not_run(H.min_figure(
        f"gpu train step fused+graphs GPU busy >= {100 * GPU_GRAPHS_BUSY:g} %",
        [r for r in graphs if "gpu_busy" in H.row_extra(r)],
        lambda r: H.fnum(H.row_extra(r).get("gpu_busy")), GPU_GRAPHS_BUSY), len(not_run)))
    figs.append(H.mark_not_run(_peak_figure(rows), len(not_run)))
    return figs


def _peak_figure(rows) -> dict[str, Any]:
    """max over the cases of fused peak_mb / reference peak_mb (same case) <= GPU_PEAK_RATIO."""
    name = f"gpu train step peak memory fused <= {GPU_PEAK_RATIO:g}x reference"
    ref = {(r["variant"], r["shape"], r["dtype"]): H.fnum(H.row_extra(r).get("peak_mb"))
           for r in rows if r["provider"] == BASELINE and H.row_ok(r)}
    ratios = []
    for r in rows:
        key = (r["variant"], r["shape"], r["dtype"])
        mb = H.fnum(H.row_extra(r).get("peak_mb")) if r["provider"] == "fused" and H.row_ok(r) else None
        if mb is not None and ref.get(key):
            ratios.append((mb / ref[key], " ".join(key)))
    if not ratios:
        return dict(name=name, passed=False, value="unmeasured: no fused and reference peak_mb pair")
    worst, where = max(ratios)
    return dict(name=name, passed=worst <= GPU_PEAK_RATIO, number=round(worst, 3),
                target=GPU_PEAK_RATIO, unit="x",
                value=f"max {worst:.2f}x over {len(ratios)} case(s), worst {where}")


def _add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--compile-only", action="store_true",
                   help="only the cases marked for torch.compile (its ~4-minute compile of the "
                        "reference, on an H200, needs a call of its own within a short lease)")


def main(argv=None) -> int:
    return H.bench_main(argv, doc=__doc__, kernel=KERNEL, run=run, acceptance=acceptance,
                        add_args=_add_args)


if __name__ == "__main__":
    sys.exit(main())
