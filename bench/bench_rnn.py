"""Benchmark: fused bidirectional LSTM / GRU (dtl_fast.ops.lstm / gru) against torch.nn.

Providers (the first is the baseline every ratio is taken against, timed in the same run):
  torch.nn     torch.nn.LSTM / torch.nn.GRU: cuDNN on CUDA (extra "cudnn": whether cuDNN is
               expected to run it, from the dtype and the card's compute capability: fp16 / fp32
               always, bf16 on sm80+), PyTorch's native CPU kernel on CPU
  torch.nn:again  (full CPU grid) the same module timed again as another provider: the ratio the
               machine's noise alone gives (A/A), printed beside the CPU parity figure
  reference    dtl_fast.reference.lstm / gru: the eager time-step loop (GPU: only at T <= 128,
               where one call is affordable; the "20x eager" figure says over how many cases)
  compiled     torch.compile(reference) (dynamic=False: the T-step loop is unrolled, so a new
               shape is a new compile; only on the cases marked for it, see COMPILE_*)
  dtl_fast     dtl_fast.ops.lstm / gru: backend="fused" (Triton) on CUDA; backend="auto"
               (PyTorch's native kernels) on CPU -- the fused kernels on CPU tensors would run
               in the Triton interpreter, which is never timed (a "skipped" row says so)
  dtl_fast:auto  (CUDA) backend="auto": the path dtl_fast.ops.rnn.auto_path picks for the
               case (extra "path": "native" = cuDNN, or "fused:<impl>"); its ratio is the
               "swapping in never costs" figure (on CPU the dtl_fast row is already auto)
  torch.nn:packed-compiled  (cases marked auto_len) torch.compile (inductor on CUDA, aot_eager
               on CPU) of torch.nn over a PackedSequence of lengths all = T (CPU lengths,
               pack_padded_sequence / pad_packed_sequence): the stock form of a compiled model
               that passes lengths (dynamo graph-breaks on torch.nn.LSTM / GRU)
  dtl_fast:auto-compiled-len  (cases marked auto_len) torch.compile (same backend) of
               backend="auto" with the same lengths: what `dtl-fast train --compile` runs
               (dtl_fast.ops.rnn runs PyTorch's packed path outside the graph); extra "x_packed"
               = torch.nn:packed-compiled's median / this one, the figure "compiled auto with
               lengths >= 0.95x compiled torch.nn packed"
  torch.nn:compiled  (cases marked auto_len) torch.compile (same backend) of the torch.nn
               module on the padded input (dynamo breaks at the module: its eager kernel)
  dtl_fast:auto-compiled  (cases marked auto_len) torch.compile (same backend) of a
               dtl_fast.nn module sharing those weights, backend="auto" (its forward runs
               PyTorch's kernel outside the graph where auto picks it; traced, torch.lstm would
               decompose into a loop unrolled over T); extra "x_compiled" = torch.nn:compiled's
               median / this one, the figure "compiled auto >= 0.95x compiled torch.nn"

Every case: one layer (num_layers=1), input size = hidden size H, time-major input [T, B, H]
(batch_first=False, cuDNN's own layout), no lengths (all sequences full; the two auto_len
providers pass lengths all = T, so every provider computes the same function), bias on, hx=None
(zero initial state). shape = "BxTxH"; variant = "<cell>-<bi|uni>"; dtype is float32 (TF32
off: torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False),
"float32-tf32" (both True), bfloat16 or float16; the flags are restored after each case.

Modes: forward (under torch.no_grad()) and forward+backward (output.backward(g) with a fixed
random g; the input and all weights require grad, their .grad is reset before every call).

Gate before timing: every provider's output, h_n (and c_n), and in forward+backward the input
and weight gradients, are compared with torch.nn's in the same dtype and with torch.nn in
float64 on the same weights (relative error ||a - b|| / ||b||): a tensor passes when it is within
TOL_BASE of torch.nn, or no further from float64 than max(TOL64, 2x torch.nn's own error);
torch.nn itself must be within 10x TOL64 of float64 (a sanity check of the ground truth). A
provider that fails is recorded "gate-failed: ..." and not timed.

extra: rel_base / rel64 (worst tensor), x_eager (reference ms / this ms), tflops (GEMM FLOPs of
the recurrence + input projection over the time), us_per_step (median / T), compile_s (first call of the compiled
provider), peak_mb (CUDA), cudnn, impl (what "auto" runs), noisy.

Time budget (--time-budget): a case is not started once it is spent (its rows say "skipped: time
budget spent", and every figure covering it FAILs with "N case(s) not run"); within a case each
provider's second call is timed (the first holds the JIT compile) and the provider is skipped,
with a row, when ~8 such calls do not fit in what is left; torch.compile is budgeted per mode
(forward+backward estimated COMPILE_BWD_FACTOR x the forward's compile).

    python bench/bench_rnn.py --device cpu [--quick]
    python bench/bench_rnn.py --device cuda --quick --time-budget 120
"""

from __future__ import annotations

import argparse
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

KERNEL = "rnn"
BASELINE = "torch.nn"
AA = "torch.nn:again"
MODES = ("forward", "forward+backward")
GATES = {"lstm": 4, "gru": 3}

# name -> (torch dtype, TF32 on)
DTYPES = {
    "float32": (torch.float32, False),
    "float32-tf32": (torch.float32, True),
    "bfloat16": (torch.bfloat16, False),
    "float16": (torch.float16, False),
}

# Relative error bounds (outputs, gradients): against float64 (TOL64) and against torch.nn in the
# same dtype (TOL_BASE). A provider may be further than TOL64 from float64 only where torch.nn
# itself is (the bound becomes 2x torch.nn's own error).
TOL64 = {
    "float32": (1e-5, 1e-4),
    "float32-tf32": (5e-3, 1e-2),
    "bfloat16": (2e-2, 5e-2),
    "float16": (1e-2, 2e-2),
}
TOL_BASE = {
    "float32": (1e-4, 1e-4),
    "float32-tf32": (1e-2, 2e-2),
    "bfloat16": (3e-2, 6e-2),
    "float16": (1e-2, 3e-2),
}


@dataclass(frozen=True)
class Case:
    cell: str  # "lstm" | "gru"
    B: int
    T: int
    H: int
    bi: bool
    dtype: str  # a key of DTYPES
    eager: bool = True  # time the eager loop here
    compile: bool = False  # time torch.compile(reference) here
    aa: bool = False  # CPU: time torch.nn a second time ("torch.nn:again"): the noise floor
    auto_len: bool = False  # time the compiled pairs (with lengths, padded) here

    @property
    def shape(self) -> str:
        return f"{self.B}x{self.T}x{self.H}"

    @property
    def variant(self) -> str:
        return f"{self.cell}-{'bi' if self.bi else 'uni'}"

    def figure_case(self) -> bool:
        """Inside the issue's headline figures: bidirectional, H 256-1024, T >= 128, half."""
        return (self.bi and 256 <= self.H <= 1024 and self.T >= 128
                and self.dtype in ("bfloat16", "float16"))


def _cells(*specs, cells=("lstm", "gru")) -> list[Case]:
    return [Case(cell, *spec[:5], **(spec[5] if len(spec) > 5 else {})) for spec in specs
            for cell in cells]


# CPU: the parity figure (backend "auto" = PyTorch's native kernels, against torch.nn). The eager
# loop only at T=16 (at T=128 one fwd+bwd call of it takes ~0.1-1 s on 2 cores).
CPU_FULL = [Case(cell, B, T, H, True, "float32", eager=T <= 16, aa=True,
                 auto_len=(B, T, H) == (16, 128, 128))
            for cell in ("lstm", "gru") for B in (16, 64) for H in (128, 256) for T in (16, 128)]
# a tiny call (~0.1-0.5 ms), where what auto adds around the kernel shows (s30: the per-call
# argument checks; torch.compile's frames around the graph break)
CPU_FULL += _cells((4, 8, 32, True, "float32", {"aa": True, "auto_len": True}))
# quick (`make demo` runs it three times beside the other modules): seconds, not minutes
CPU_QUICK = _cells((16, 16, 128, True, "float32")) + [Case("lstm", 16, 64, 128, True, "float32",
                                                           eager=False)]
# tests/test_bench_smoke.py (the LSTM's case also runs the compiled pairs)
CPU_TINY = [Case("lstm", 2, 5, 8, True, "float32", auto_len=True),
            Case("gru", 2, 5, 8, True, "float32")]

# FlashRNN's published case (NX-AI/flashrnn, H100 SXM): uni LSTM fp16 B16 T1024 H768, where their
# table has cuDNN at 2.01 ms forward and 5.19 ms forward+backward: our rows sit beside theirs.
FLASHRNN_CASE = Case("lstm", 16, 1024, 768, False, "float16", eager=False)

# GPU quick (gpu_check.sh): one cheap case per acceptance figure first (both cells, bi bf16
# B16 T128 H256: a headline case, so it feeds the headline, the 0.9x-everywhere and the
# 20x-eager figures at once), then the bigger ones, so a budget cut drops the expensive tail;
# torch.compile last (a compile of the unrolled loop costs tens of seconds). The eager loop is
# timed only where it is affordable (T <= 128); the "20x eager" figure says over how many cases.
GPU_QUICK = _cells(
    (16, 128, 256, True, "bfloat16", {"auto_len": True}),  # headline + everywhere + eager, cheapest
    # `dtl-fast train`'s own RNN (B64 T16 H64 bi): where compiled auto's fixed cost per call
    # (~35-45 us on the CPU, review s28) would show against compiled torch.nn packed
    (64, 16, 64, True, "float32", {"auto_len": True}),
    (128, 16, 512, True, "bfloat16"),  # short T (launch-bound), eager cheap
    (64, 128, 512, True, "float16"),  # headline, H 512
    (64, 128, 256, False, "float32"),  # unidirectional, TF32 off
    (64, 128, 256, False, "float32-tf32"),  # TF32 on
    (128, 512, 1024, True, "bfloat16", {"eager": False}),  # biggest headline case, no eager
    (16, 1024, 256, True, "bfloat16", {"eager": False}),  # T = 1024
) + [FLASHRNN_CASE] + _cells((64, 16, 256, True, "bfloat16", {"compile": True}))


def _gpu_full() -> list[Case]:
    cases = []
    for cell in ("lstm", "gru"):
        for dtype in DTYPES:
            for bi in (True, False):
                for H_ in (128, 256, 512, 1024):
                    for B in (16, 64, 128):
                        for T in (16, 128, 512, 1024):
                            comp = (T <= 128 and B == 64 and H_ in (256, 1024)
                                    and dtype in ("bfloat16", "float32") and bi)
                            cases.append(Case(cell, B, T, H_, bi, dtype, eager=T <= 128,
                                              compile=comp, auto_len=comp and H_ == 256))
    cases.append(FLASHRNN_CASE)  # H = 768 is outside the grid's H set
    # headline cases first, compile cases last, the rest in grid order
    return sorted(cases, key=lambda c: (not c.figure_case(), c.compile))


GPU_FULL = _gpu_full()

# A compile of the unrolled loop: assumed seconds per unrolled step (both directions count), to
# decide whether it fits in what is left of the time budget. forward+backward compiles another
# graph (forward and backward through AOTAutograd): COMPILE_BWD_FACTOR x the forward's estimate.
COMPILE_S_PER_STEP = 1.0
COMPILE_S_FIXED = 15.0
COMPILE_BWD_FACTOR = 2.5


# dtl_fast:auto-compiled-len compiles only the small graphs around the RNN op (the op itself
# runs outside the graph): assumed seconds for one mode's first call.
AUTO_LEN_COMPILE_S = 20.0
AUTO_LEN = "dtl_fast:auto-compiled-len"
PACKED = "torch.nn:packed-compiled"
AUTO_COMPILED = "dtl_fast:auto-compiled"
NN_COMPILED = "torch.nn:compiled"
COMPILED_PAIRS = (AUTO_LEN, PACKED, AUTO_COMPILED, NN_COMPILED)  # one compile each per mode


def compile_estimate_s(case: Case, mode: str) -> float:
    est = COMPILE_S_FIXED + COMPILE_S_PER_STEP * case.T * (2 if case.bi else 1)
    return est if mode == "forward" else COMPILE_BWD_FACTOR * est


def cudnn_expected(dtype: torch.dtype, device: str) -> bool | None:
    """Whether torch.nn.LSTM / GRU runs cuDNN here, from the dtype and the card (not
    torch.backends.cudnn.is_acceptable, which says False for bfloat16 although cuDNN's RNN
    takes bf16 on compute capability >= 8.0)."""
    if device != "cuda":
        return None
    try:
        if not (torch.backends.cudnn.is_available() and torch.backends.cudnn.enabled):
            return False
        if dtype in (torch.float16, torch.float32, torch.float64):
            return True
        if dtype == torch.bfloat16:
            return torch.cuda.get_device_capability()[0] >= 8
    except Exception:  # noqa: BLE001
        return None
    return False


# ----------------------------------------------------------------------------------------------
# providers
# ----------------------------------------------------------------------------------------------


def _standin_loop(cell, x, hx, weights, *, bidirectional=False, **_):
    """A plain eager LSTM / GRU (one layer, no lengths): the harness self-test's reference."""
    T, B, _ = x.shape
    per_dir = 4
    outs, hs, cs = [], [], []
    for d in range(2 if bidirectional else 1):
        w_ih, w_hh, b_ih, b_hh = weights[d * per_dir:(d + 1) * per_dir]
        Hd = w_hh.shape[1]
        h = x.new_zeros(B, Hd)
        c = x.new_zeros(B, Hd)
        out = [None] * T
        for t in (range(T) if d == 0 else range(T - 1, -1, -1)):
            gx, gh = x[t] @ w_ih.t() + b_ih, h @ w_hh.t() + b_hh
            if cell == "lstm":
                i, f, g, o = (gx + gh).chunk(4, -1)
                c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
                h = torch.sigmoid(o) * torch.tanh(c)
            else:
                xr, xz, xn = gx.chunk(3, -1)
                hr, hz, hn = gh.chunk(3, -1)
                r, z = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
                h = (1 - z) * torch.tanh(xn + r * hn) + z * h
            out[t] = h
        outs.append(torch.stack(out))
        hs.append(h)
        cs.append(c)
    out = torch.cat(outs, -1)
    if cell == "lstm":
        return out, (torch.stack(hs), torch.stack(cs))
    return out, torch.stack(hs)


def _standin_native(cell, x, hx, weights, *, bidirectional=False, backend=None, **_):
    """torch.lstm / torch.gru (what backend="auto" runs on CPU): the self-test's dtl_fast."""
    D = 2 if bidirectional else 1
    Hd = weights[1].shape[1]
    h0 = x.new_zeros(D, x.shape[1], Hd)
    if cell == "lstm":
        out, h, c = torch.lstm(x, (h0, h0), list(weights), True, 1, 0.0, False, bidirectional, False)
        return out, (h, c)
    out, h = torch.gru(x, h0, list(weights), True, 1, 0.0, False, bidirectional, False)
    return out, h


_AUTO_IMPL: dict[str, str] = {}


def _auto_path(case: Case, device: str) -> str:
    """What backend="auto" runs for this case (dtl_fast.ops.rnn.auto_path), for the row."""
    try:
        O = importlib.import_module("dtl_fast.ops.rnn")
        dtype = {"float32-tf32": torch.float32}.get(case.dtype) or getattr(torch, case.dtype)
        return O.auto_path(case.cell.upper(), dtype, case.B, case.H, case.T, 2 if case.bi else 1,
                           None, device)
    except Exception as exc:  # noqa: BLE001
        return f"? ({type(exc).__name__})"


def load_api(standin: bool):
    """Returns ({cell: reference_fn}, {cell: dtl_fast_fn} or None, note). Each fn takes
    (x, hx, weights, *, bidirectional, backend=...) like dtl_fast.ops.lstm."""
    if standin:
        ref = {c: (lambda *a, c=c, **k: _standin_loop(c, *a, **k)) for c in GATES}
        fused = {c: (lambda *a, c=c, **k: _standin_native(c, *a, **k)) for c in GATES}
        return ref, fused, "stand-in functions (harness self-test)"
    try:
        R = importlib.import_module("dtl_fast.reference.rnn")

        ref = {"lstm": R.lstm, "gru": R.gru}
    except Exception as exc:  # noqa: BLE001
        raise SystemExit(f"dtl_fast.reference.rnn is not importable ({type(exc).__name__}: {exc}); "
                         "run with --standin to test the harness")
    try:
        O = importlib.import_module("dtl_fast.ops.rnn")

        fused = {"lstm": O.lstm, "gru": O.gru}
        note = "dtl_fast.ops.rnn"
        try:
            import dtl_fast

            impl = dtl_fast.info()["ops"]["lstm"]
            _AUTO_IMPL.update(impl)
            note += f" (auto: cpu -> {impl.get('cpu')}; cuda -> {impl.get('cuda')})"
        except Exception:  # noqa: BLE001
            pass
    except Exception as exc:  # noqa: BLE001
        fused, note = None, f"dtl_fast.ops.rnn unavailable: {type(exc).__name__}: {exc}"
    return ref, fused, note


def _unpack(cell, res):
    """(output, h_n, c_n or None) from an LSTM / GRU return value."""
    out, state = res
    if cell == "lstm":
        return out, state[0], state[1]
    return out, state, None


def make_providers(case: Case, module, ref_fns, fused_fns, device: str, compiled_fn=None,
                   standin: bool = False):
    """name -> callable(x) -> (output, h_n, c_n|None), or a str saying why it does not run."""
    cell, bi = case.cell, case.bi
    weights = list(module._flat_weights)
    provs: dict[str, Callable | str] = {BASELINE: lambda x: _unpack(cell, module(x))}
    if case.aa:
        # the same call as the baseline, timed as another provider: its ratio is what the
        # machine's noise alone gives, next to dtl_fast's (A/A test)
        provs[AA] = lambda x: _unpack(cell, module(x))
    ref = ref_fns[cell]
    if case.eager:
        provs["reference"] = lambda x: _unpack(cell, ref(x, None, weights, bidirectional=bi))
    else:
        provs["reference"] = ("skipped: eager loop not timed at this size in this grid "
                              "(one call takes too long for the time budget)")
    if device == "cpu":
        provs["compiled"] = "skipped: torch.compile is timed on CUDA only (compile time)"
    elif not case.compile:
        provs["compiled"] = ("skipped: torch.compile only on the compile subset (dynamic=False "
                             "unrolls the T-step loop: one compile per shape)")
    elif compiled_fn is not None:
        provs["compiled"] = lambda x: _unpack(cell, compiled_fn(x, *weights))
    if case.auto_len:
        provs.update(_compiled_providers(case, module, fused_fns, device, standin))
    if fused_fns is None:
        provs["dtl_fast"] = "skipped: dtl_fast.ops.rnn unavailable"
    else:
        backend = "fused" if device == "cuda" else "auto"
        fn = fused_fns[cell]
        provs["dtl_fast"] = lambda x: _unpack(cell, fn(x, None, weights, bidirectional=bi,
                                                       backend=backend))
        if device == "cpu":
            provs["dtl_fast:fused"] = ("skipped: the fused kernels on CPU tensors run in the Triton "
                                       "interpreter: never timed")
        else:
            provs["dtl_fast:auto"] = lambda x: _unpack(cell, fn(x, None, weights, bidirectional=bi,
                                                                backend="auto"))
    return provs


def _compiled_providers(case: Case, module, fused_fns, device: str,
                        standin: bool = False) -> dict[str, Callable | str]:
    """The compiled pairs (see the module docstring): torch.nn:packed-compiled and
    dtl_fast:auto-compiled-len with lengths all = T, on the CPU (where pack_padded_sequence
    wants them); torch.nn:compiled and dtl_fast:auto-compiled on the padded input."""
    from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

    cell, bi, T = case.cell, case.bi, case.T
    lengths = torch.full((case.B,), T, dtype=torch.int64)

    def packed(x):
        out, state = module(pack_padded_sequence(x, lengths, enforce_sorted=False))
        return _unpack(cell, (pad_packed_sequence(out, total_length=T)[0], state))

    backend = "inductor" if device == "cuda" else "aot_eager"
    nn_c = torch.compile(module, backend=backend)
    provs: dict[str, Callable | str] = {PACKED: torch.compile(packed, backend=backend),
                                        NN_COMPILED: lambda x: _unpack(cell, nn_c(x))}
    if fused_fns is None:
        provs[AUTO_LEN] = provs[AUTO_COMPILED] = "skipped: dtl_fast.ops.rnn unavailable"
        return provs
    fn, weights = fused_fns[cell], list(module._flat_weights)

    def auto_len(x, lengths):
        return fn(x, None, weights, lengths=lengths, bidirectional=bi, backend="auto")

    compiled = torch.compile(auto_len, backend=backend)
    provs[AUTO_LEN] = lambda x: _unpack(cell, compiled(x, lengths))
    if standin:  # the harness self-test: nothing of dtl_fast's
        provs[AUTO_COMPILED] = "skipped: stand-in run (the module is dtl_fast's)"
        return provs
    try:
        from dtl_fast import nn as dnn
    except Exception as exc:  # noqa: BLE001
        provs[AUTO_COMPILED] = f"skipped: dtl_fast.nn unavailable: {type(exc).__name__}"
        return provs
    ours = getattr(dnn, "LSTM" if cell == "lstm" else "GRU").from_torch(module, backend="auto")
    ours_c = torch.compile(ours, backend=backend)
    provs[AUTO_COMPILED] = lambda x: _unpack(cell, ours_c(x))
    return provs


# ----------------------------------------------------------------------------------------------
# gate
# ----------------------------------------------------------------------------------------------


def _finite(t: torch.Tensor) -> bool:
    return bool(torch.isfinite(t).all().item())


def check_tensors(names, got, base, ref64, dtype: str, grad: bool) -> tuple[bool, str, float, float]:
    """Each tensor of `got` against torch.nn (`base`) and float64 (`ref64`). Returns (ok, message,
    worst rel_base, worst rel64)."""
    tol64 = TOL64[dtype][1 if grad else 0]
    tolb = TOL_BASE[dtype][1 if grad else 0]
    worst_b = worst_64 = 0.0
    for name, g, b, r in zip(names, got, base, ref64, strict=True):
        if g is None:
            return False, f"{name}: missing (None)", math.inf, math.inf
        if tuple(g.shape) != tuple(b.shape):
            return False, f"{name}: shape {tuple(g.shape)} != {tuple(b.shape)}", math.inf, math.inf
        if not _finite(g):
            return False, f"{name}: non-finite values", math.inf, math.inf
        eb, e64, b64 = H.rel_err(g, b), H.rel_err(g, r), H.rel_err(b, r)
        worst_b, worst_64 = max(worst_b, eb), max(worst_64, e64)
        bound64 = max(tol64, 2.0 * b64)
        if not (eb <= tolb or e64 <= bound64):
            return (False, f"{name}: rel err {eb:.2e} vs torch.nn (> {tolb:.0e}) and {e64:.2e} "
                    f"vs float64 (> {bound64:.1e}; torch.nn's own {b64:.1e})", eb, e64)
    return True, "ok", worst_b, worst_64


BASELINE_SLACK = 10.0  # torch.nn itself: within 10x TOL64 of float64 (a sanity check of the
# ground truth, not a contest: the providers are held to 2x torch.nn's own error anyway)


def check_baseline(names, base, ref64, dtype: str, grad: bool) -> tuple[bool, str, float]:
    """(ok, message, worst rel64) of torch.nn against float64."""
    bound = BASELINE_SLACK * TOL64[dtype][1 if grad else 0]
    worst = 0.0
    for name, b, r in zip(names, base, ref64, strict=True):
        if b is None or not _finite(b):
            return False, f"{name}: torch.nn gave None / non-finite values", math.inf
        e = H.rel_err(b, r)
        worst = max(worst, e)
        if not e <= bound:
            return False, f"{name}: torch.nn rel err vs float64 {e:.2e} > {bound:.0e}", e
    return True, "ok", worst


def _fwd_bwd(fn, x, params, g):
    """One forward+backward; returns (output, h_n, c_n, x.grad, *param grads) (detached)."""
    xl = x.detach().requires_grad_(True)
    for p in params:
        p.grad = None
    out, hn, cn = fn(xl)
    out.backward(g)
    res = [out.detach(), hn.detach(), None if cn is None else cn.detach(), xl.grad]
    res += [None if p.grad is None else p.grad.detach().clone() for p in params]
    for p in params:
        p.grad = None
    return res


def _one_call_s(fn, mode, x, params, g, device) -> float:
    """Seconds of one call of `fn` in `mode` (synchronised)."""
    H.sync(device)
    t0 = time.perf_counter()
    if mode == "forward":
        with torch.no_grad():
            fn(x)
    else:
        xl = x.detach().requires_grad_(True)
        fn(xl)[0].backward(g)
        for p in params:
            p.grad = None
    H.sync(device)
    return time.perf_counter() - t0


# ----------------------------------------------------------------------------------------------
# the run
# ----------------------------------------------------------------------------------------------


def flops(case: Case, mode: str) -> float:
    """GEMM FLOPs: input projection + recurrent projection, every step and direction; the
    backward does two GEMMs per forward GEMM (dX and dW)."""
    D = 2 if case.bi else 1
    G = GATES[case.cell]
    fwd = D * case.T * 2 * case.B * (case.H + case.H) * G * case.H
    return fwd if mode == "forward" else 3 * fwd


def select_cases(device: str, quick: bool, tiny: bool) -> list[Case]:
    return H.select_grid(device, quick, tiny, tiny_grid=CPU_TINY, cpu_quick=CPU_QUICK,
                         cpu_full=CPU_FULL, gpu_quick=GPU_QUICK, gpu_full=GPU_FULL)


def timing_kwargs(device: str, quick: bool, tiny: bool) -> dict[str, Any]:
    # CPU: longer than the harness default on a shared VM; quick keeps `make demo` short
    return H.grid_timing_kwargs(device, quick, tiny,
                                cpu_quick=dict(warmup=15, rep=30, min_samples=5, max_ms=600))


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Measures the grid of args (see the module docstring); returns the rows it appended.

    On CPU without --threads it runs on one thread (restored afterwards; the rows' device_name
    says so): a recurrent step is a chain of small ops, each a parallel region that, on a shared
    machine, waits a scheduler tick for its second thread (the quick grid took 76 s on 2 threads
    vs 10 s on 1 under load); the parity ratio compares two providers on the same thread count.
    """
    return H.run_one_thread_on_cpu(args, _run)


def _run(args: argparse.Namespace, device: str) -> list[dict[str, Any]]:
    standin = getattr(args, "standin", False)
    tiny = getattr(args, "tiny", False)
    kernel, run_id, deadline = H.start_run(args, KERNEL)
    ref_fns, fused_fns, note = load_api(standin)
    if getattr(args, "fused_override", None) is not None:  # tests: a deliberately wrong provider
        fused_fns = args.fused_override

    stamp, writer = H.open_results(args, kernel, device)
    print(f"[{kernel}] providers: {BASELINE} ({'cuDNN' if device == 'cuda' else 'native CPU'}), "
          f"reference (eager loop), compiled, {note}")
    print(f"[{kernel}] 1 layer, input size = H, [T, B, H] input, no lengths, hx=None")
    cases = getattr(args, "cases", None) or select_cases(device, args.quick, tiny)
    timing_kw = timing_kwargs(device, args.quick, tiny)
    if device == "cpu":
        timing_kw["flush_cache"] = getattr(args, "cold_cache", False)

    rows: list[dict[str, Any]] = []
    emit = H.emitter(writer, rows, ("x_eager", "tflops"))

    def one_case(ci, case):
        dtype, tf32 = DTYPES[case.dtype]
        with H.precision(tf32):
            _run_case(case, ci, device, dtype, ref_fns, fused_fns, kernel, stamp, run_id,
                      timing_kw, deadline, emit, standin)

    def after_case(case):
        if (case.compile or case.auto_len) and not standin:
            importlib.import_module("torch._dynamo").reset()  # free the unrolled graphs

    H.run_cases(cases, kernel=kernel, device=device, deadline=deadline, emit=emit, modes=MODES,
                stamp=stamp, baseline=BASELINE, run_id=run_id, run_case=one_case,
                after_case=after_case)

    return H.finish_run(rows, args, kernel=kernel, device=device, run_id=run_id, writer=writer,
                        stamp=stamp, extra_keys=("x_eager", "tflops", "rel64"))


def _run_case(case, ci, device, dtype, ref_fns, fused_fns, kernel, stamp, run_id, timing_kw,
              deadline, emit, standin):
    cell, B, T, Hd = case.cell, case.B, case.T, case.H
    torch.manual_seed(1000 + ci)
    cls = torch.nn.LSTM if cell == "lstm" else torch.nn.GRU
    module = cls(Hd, Hd, num_layers=1, bidirectional=case.bi).to(device=device, dtype=dtype)
    module64 = copy.deepcopy(module).double()
    params = list(module._flat_weights)
    params64 = list(module64._flat_weights)
    x = torch.randn(T, B, Hd, generator=H.gen(device, ci), device=device).to(dtype)
    D = 2 if case.bi else 1
    g = torch.randn(T, B, D * Hd, generator=H.gen(device, 500 + ci), device=device).to(dtype)
    x64, g64 = x.double(), g.double()
    cudnn_ok = cudnn_expected(dtype, device)

    compiled_fn = None
    if case.compile and device == "cuda" and not standin:
        ref = ref_fns[cell]
        bi = case.bi

        def _loop(xx, *ws):
            return ref(xx, None, list(ws), bidirectional=bi)

        compiled_fn = torch.compile(_loop, dynamic=False)
    provs = make_providers(case, module, ref_fns, fused_fns, device, compiled_fn, standin)

    # ground truth: torch.nn in this dtype and in float64, same weights
    base_fn = provs[BASELINE]
    with torch.no_grad():
        fwd_base = [t for t in base_fn(x)]
        fwd64 = list(_unpack(cell, module64(x64)))
    fb_base = _fwd_bwd(base_fn, x, params, g)
    fb64 = _fwd_bwd(lambda xx: _unpack(cell, module64(xx)), x64, params64, g64)
    out_names = ["output", "h_n"] + (["c_n"] if cell == "lstm" else [])
    pnames = list(module._flat_weights_names)
    fb_names = out_names + ["x.grad"] + [f"{n}.grad" for n in pnames]

    def strip(lst):  # drop c_n for GRU
        return [t for i, t in enumerate(lst) if not (i == 2 and cell == "gru")]

    fwd_base, fwd64 = strip(fwd_base), strip(fwd64)
    fb_base, fb64 = strip(fb_base), strip(fb64)
    print(f"[{kernel}] {case.variant} {case.shape} {case.dtype}"
          + (f" cudnn={cudnn_ok}" if cudnn_ok is not None else ""), flush=True)

    for mode in MODES:
        base = dict(kernel=kernel, mode=mode, variant=case.variant, shape=case.shape,
                    dtype=case.dtype, stamp=stamp, baseline=BASELINE, run_id=run_id)
        calls: dict[str, Callable] = {}
        grads: dict[str, list] = {}
        extras: dict[str, dict] = {}
        planned = 0.0  # seconds of timing already promised to this mode's providers
        for name in H.budget_order(provs, BASELINE):
            fn = provs[name]
            if isinstance(fn, str):
                emit(H.status_row(base, name, fn))
                continue
            if name in ("compiled", *COMPILED_PAIRS):  # forward, forward+backward compile apart
                est = compile_estimate_s(case, mode) if name == "compiled" else AUTO_LEN_COMPILE_S
                st = H.budget_skip(deadline, est, planned, what=f"a {mode} compile")
                if st:
                    emit(H.status_row(base, name, st))
                    continue
            grad = mode != "forward"
            names, want_base, want64 = ((fb_names, fb_base, fb64) if grad
                                        else (out_names, fwd_base, fwd64))
            t0 = time.perf_counter()
            try:
                if grad:
                    got = strip(_fwd_bwd(fn, x, params, g))
                else:
                    with torch.no_grad():
                        got = strip(list(fn(x)))
                H.sync(device)
                first_s = time.perf_counter() - t0
                if name == BASELINE:
                    ok, msg, e64 = check_baseline(names, got, want64, case.dtype, grad)
                    eb = 0.0
                else:
                    ok, msg, eb, e64 = check_tensors(names, got, want_base, want64, case.dtype,
                                                     grad)
                del got
            except Exception as exc:  # noqa: BLE001
                ok, msg = False, H.exc_status(exc, device)
                if msg == "skipped: out of memory":
                    H.free(device)
            if not ok:
                msg = H.gate_status(msg, kernel, f"{name} {mode} {case.variant} {case.shape} "
                                                 f"{case.dtype}")
                emit(H.status_row(base, name, msg))
                continue
            ex: dict[str, Any] = {}
            ex["rel64"] = float(f"{e64:.3g}")
            if name != BASELINE:
                ex["rel_base"] = float(f"{eb:.3g}")
            if name in ("compiled", *COMPILED_PAIRS):
                ex["compile_s"] = round(first_s, 1)
            # every provider: the second call, timed (the first one held the JIT compile /
            # autotuning), says what its timing costs; skip (with a row) when that does not fit
            if deadline.end is not None:
                est, st = H.second_call_budget(
                    deadline, planned, lambda fn=fn: _one_call_s(fn, mode, x, params, g, device),
                    device)
                if st:
                    emit(H.status_row(base, name, st))
                    continue
                planned += est
            extras[name] = ex
            if mode == "forward":
                calls[name] = lambda fn=fn: fn(x)
            else:
                xl = x.detach().requires_grad_(True)
                calls[name] = lambda fn=fn, xl=xl: fn(xl)[0].backward(g)
                grads[name] = [xl] + params
        if H.baseline_missing(calls, BASELINE, kernel,
                              f"{mode} {case.variant} {case.shape} {case.dtype}", emit, base):
            continue
        timed = H.time_calls(calls, grads, mode=mode, device=device, timing_kw=timing_kw,
                             emit=emit, base=base)
        if timed is None:
            continue
        times, peaks = timed
        for p in params:
            p.grad = None
        base_ms = times[BASELINE][0]
        ref_ms = times["reference"][0] if "reference" in times else None
        fl = flops(case, mode)
        for name, t in times.items():
            ex = H.speed_extras(extras[name], t[0], fl, ref_ms, peaks.get(name))
            ex["us_per_step"] = round(t[0] * 1e3 / case.T, 2)
            if name == "dtl_fast:auto":
                ex["path"] = _auto_path(case, device)
            if name == AUTO_LEN and PACKED in times:
                ex["x_packed"] = round(times[PACKED][0] / t[0], 4)
            if name == AUTO_COMPILED and NN_COMPILED in times:
                ex["x_compiled"] = round(times[NN_COMPILED][0] / t[0], 4)
            if name == BASELINE and cudnn_ok is not None:
                ex["cudnn"] = cudnn_ok
            if name == "dtl_fast":
                ex["backend"] = "fused" if device == "cuda" else "auto"
                if _AUTO_IMPL:
                    ex["impl"] = str(_AUTO_IMPL.get(device, "?"))[:60]
            if H.noisy(t):
                ex["noisy"] = True
            emit(H.make_row(**base, provider=name, timing=t, baseline_ms=base_ms, extra=ex))
        del calls, grads


# ----------------------------------------------------------------------------------------------
# acceptance figures (run.py prints them)
# ----------------------------------------------------------------------------------------------

CPU_PARITY = 0.95  # auto vs torch.nn on CPU: within 5 %
GPU_FWD = 2.0  # x cuDNN, headline cases
GPU_FWDBWD = 1.5
GPU_FLOOR = 0.9  # x cuDNN, everywhere
GPU_EAGER = 20.0  # x the eager loop, everywhere
GPU_AUTO = 0.95  # backend="auto" x torch.nn (cuDNN), everywhere: swapping the modules in never costs


_ok = H.row_ok
_extra = H.row_extra


def _parse_shape(shape: str) -> tuple[int, int, int]:
    B, T, H_ = (int(s) for s in shape.split("x"))
    return B, T, H_


def _is_headline(r) -> bool:
    B, T, H_ = _parse_shape(r["shape"])
    return (r["variant"].endswith("-bi") and 256 <= H_ <= 1024 and 16 <= B <= 128 and T >= 128
            and r["dtype"] in ("bfloat16", "float16"))


def _min_figure(name, rows, key, target, unit):
    """H.min_figure of the row's ``ratio`` (key "ratio") or of its extra's ``key``."""
    if key == "ratio":
        return H.min_figure(name, rows, lambda r: H.fnum(r.get("ratio")), target, unit)
    return H.min_figure(name, rows, lambda r: H.fnum(_extra(r).get(key)), target, unit)


def acceptance(rows, device: str) -> list[dict[str, Any]]:
    """The RNN acceptance figures from this run's rows: dicts with name, value, passed (and
    number / target / unit when measured, for run.py's median over repeated runs)."""
    rows = [r for r in rows if r.get("kernel") == KERNEL and r.get("device") == device]
    figs: list[dict[str, Any]] = []
    if device == "cpu":
        # one figure per case: run.py --repeat N folds each into the median of N runs
        for r in rows:
            if r["provider"] != "dtl_fast":
                continue
            f = _min_figure(f"cpu {r['mode']:<16} {r['variant']:<7} {r['shape']:<11} auto >= "
                            f"{CPU_PARITY:g}x torch.nn", [r], "ratio", CPU_PARITY, "x")
            aa = [a for a in rows if a["provider"] == AA and _ok(a) and all(
                a[k] == r[k] for k in ("mode", "variant", "shape", "dtype", "run_id"))]
            if aa and H.fnum(aa[0].get("ratio")) is not None:
                f["value"] += f"; A/A (torch.nn vs itself) {H.fnum(aa[0]['ratio']):.2f}x"
            figs.append(f)
        for name, key, what in ((AUTO_COMPILED, "x_compiled", "compiled torch.nn"),
                                (AUTO_LEN, "x_packed", "compiled torch.nn packed")):
            for r in rows:
                if r["provider"] == name:
                    figs.append(_min_figure(
                        f"cpu {r['mode']:<16} {r['variant']:<7} {r['shape']:<11} compiled auto"
                        f"{' with lengths' if name == AUTO_LEN else ''} >= {CPU_PARITY:g}x {what}",
                        [r], key, CPU_PARITY, "x"))
        if not figs:
            figs.append(dict(name="cpu auto vs torch.nn parity", value="unmeasured", passed=False))
        n_cut = len({(r["variant"], r["shape"], r["dtype"]) for r in H.not_run_rows(rows)})
        if n_cut:
            figs.append(H.mark_not_run(dict(name="cpu grid complete", value="cut", passed=False),
                                       n_cut))
        return figs
    fused = [r for r in rows if r["provider"] == "dtl_fast"]
    not_run = H.not_run_rows(rows)  # whole cases cut by the budget (or failed before timing)

    def figure(name, pred, key, target):
        """min of `key` over the dtl_fast rows `pred` selects; cases of that kind that were
        not run make it FAIL, saying how many."""
        f = _min_figure(name, [r for r in fused if pred(r)], key, target, "x")
        return H.mark_not_run(f, len([r for r in not_run if pred(r)]))

    for cell in ("lstm", "gru"):
        for mode, target in (("forward", GPU_FWD), ("forward+backward", GPU_FWDBWD)):
            figs.append(figure(
                f"gpu {cell} bi H256-1024 T>=128 bf16/fp16 {mode:<16} >= {target:g}x cuDNN",
                lambda r, cell=cell, mode=mode: (r["variant"] == f"{cell}-bi"
                                                 and r["mode"] == mode and _is_headline(r)),
                "ratio", target))
    for mode in MODES:
        figs.append(figure(f"gpu everywhere {mode:<16} >= {GPU_FLOOR:g}x cuDNN",
                           lambda r, mode=mode: r["mode"] == mode, "ratio", GPU_FLOOR))
        in_mode = [r for r in fused if r["mode"] == mode]
        sel = [r for r in in_mode if _ok(r) and "x_eager" in _extra(r)]
        f = _min_figure(f"gpu everywhere {mode:<16} >= {GPU_EAGER:g}x eager loop", sel,
                        "x_eager", GPU_EAGER, "x")
        if sel and len(in_mode) > len(sel):
            f["value"] += (f"; eager timed in {len(sel)} of {len(in_mode)} case(s) (only where "
                           "affordable)")
        figs.append(H.mark_not_run(f, len([r for r in not_run if r["mode"] == mode])))
        auto = [r for r in rows if r["provider"] == "dtl_fast:auto" and r["mode"] == mode]
        f = _min_figure(f"gpu everywhere {mode:<16} auto >= {GPU_AUTO:g}x torch.nn", auto,
                        "ratio", GPU_AUTO, "x")
        figs.append(H.mark_not_run(f, len([r for r in not_run if r["mode"] == mode])))
        comp = [r for r in rows if r["provider"] == AUTO_LEN and r["mode"] == mode]
        if comp:  # only the cases marked auto_len have these rows
            figs.append(_min_figure(f"gpu compiled {mode:<16} auto with lengths >= {GPU_AUTO:g}x "
                                    "compiled torch.nn packed", comp, "x_packed", GPU_AUTO, "x"))
        comp = [r for r in rows if r["provider"] == AUTO_COMPILED and r["mode"] == mode]
        if comp:
            figs.append(_min_figure(f"gpu compiled {mode:<16} auto >= {GPU_AUTO:g}x compiled "
                                    "torch.nn", comp, "x_compiled", GPU_AUTO, "x"))
    return figs


def main(argv=None) -> int:
    return H.bench_main(argv, doc=__doc__, kernel=KERNEL, run=run, acceptance=acceptance)


if __name__ == "__main__":
    sys.exit(main())
