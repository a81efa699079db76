"""Benchmark: fused scaled cosine attention (dtl_fast.ops.cosine_attention).

Providers (the first is the baseline every ratio is taken against, timed in the same run):
  composite    dtl_fast.ops.cosine_attention.cosine_attention_composite: F.normalize on q and k,
               the per-head scale folded into q, F.scaled_dot_product_attention (flash where it
               applies: no mask; with key padding / a window it gets a boolean attn_mask, which
               rules the flash backend out)
  reference    dtl_fast.reference.cosine_attention: the eager dense-score version (float32 math)
  compiled     torch.compile(reference), one compiled function for the whole run (dynamic shapes
               after the first recompile, as torch.compile does by default); CUDA only
  dtl_fast     dtl_fast.ops.cosine_attention: backend="fused" (Triton) on CUDA; backend="auto" on
               CPU (the reference or the composite, ops.cosine_attention.CPU_AUTO_PATH) -- the
               fused kernels on CPU tensors would run in the Triton interpreter, never timed
  dtl_fast:auto  backend="auto" on CUDA (the rule ops.cosine_attention.auto_path: fused or the
               composite per shape); its row's extra says which ("impl")
  flex         torch.nn.attention.flex_attention under torch.compile (dynamic=False): q, k
               normalised with F.normalize, a score_mod multiplying the logits by the per-head
               scale, a block mask (create_block_mask, built once per case and input: what a
               training step builds once per batch) for key_lengths / window; memory slots
               appended to K / V (the mask lets every query see them). CUDA only (skipped on CPU
               or where torch has no flex_attention, with the reason); its compile is budgeted as
               torch.compile's. Without a mask it is a calibration: what Triton-generated
               attention reaches on this card and stack.

The composite's row records which SDPA backend ran (extra "sdpa": flash / efficient / cudnn /
math, from torch._fused_sdp_choice on the composite's own arguments).

Shapes ("BxHxNxd", self-attention: Nq = Nk = N, dv = d): DTL-sized (B 64, H 4-8, N 16-64,
d 32-64) and long (B 4, H 16, N 1k-16k, d 64 / 128). Variants: plain (no key_lengths), pad
(key_lengths uniform in [N/2, N], fixed seed), win64 / win256 (window 64 / 256), win+mem (window
8 at N <= 64, else 64, and 8 memory slots). logit_scale: per head, uniform in [ln 5, ln 20] (scales 5-20, below the clamp).
dtypes bfloat16, float16, float32 (TF32 off, PyTorch's default for matmuls).

Modes: forward (under torch.no_grad()) and forward+backward (out.backward(g), g fixed random;
q, k, v, logit_scale (and the memory) require grad, .grad reset before every call).

Gate before timing: every provider's output, and for forward+backward dq, dk, dv, d logit_scale
(d memory), against a float64 ground truth computed here in query chunks (so it fits in memory at
N = 8k): relative error <= max(TOL64, 2x the composite's own error). The composite itself must
be within 10x TOL64 (a sanity check of the ground truth). A provider that fails is
"gate-failed: ..." and not timed.

Memory: the reference holds several dense [B, H, N, N] float32 matrices (4 in the forward, ~10
with the backward: 17 GB each at B 4, H 16, N 8k); the reference and the compiled reference are
skipped, with the reason in the row, where that estimate exceeds 80 % of free GPU memory.

extra: rel64, x_eager (reference ms / this ms), tflops (every provider: 4 d per attended
(query, key) pair -- B H N N for plain, the valid pairs for pad / window, plus the memory slots --
forward; x3.5 forward+backward: FlashAttention-2's backward counts 2.5x the forward), compile_s,
peak_mb (CUDA), impl, sdpa, noisy.

Time budget (--time-budget): a case is not started once it is spent (its rows say "skipped: time
budget spent", and every figure covering it FAILs with "N case(s) not run"); within a case each
provider's second call is timed (the first holds the JIT compile) and the provider is skipped,
with a row, when ~8 such calls do not fit in what is left; torch.compile is budgeted at every
compiled case and mode (forward+backward estimated COMPILE_BWD_FACTOR x the forward's compile).

    python bench/bench_cosine_attention.py --device cpu [--quick]
    python bench/bench_cosine_attention.py --device cuda --quick --time-budget 90
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness as H  # noqa: E402

KERNEL = "cosine_attention"
BASELINE = "composite"
MODES = ("forward", "forward+backward")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
LOG_MAX_SCALE = math.log(100.0)
NORM_EPS = 1e-12

# relative error bounds against float64: (output, gradients)
TOL64 = {"float32": (1e-5, 1e-4), "bfloat16": (2e-2, 5e-2), "float16": (5e-3, 2e-2)}
BASELINE_SLACK = 10.0  # the composite itself: within 10x TOL64 (a sanity check of the ground
# truth; the providers are held to max(TOL64, 2x the composite's own error))

WINDOW, MEMORY = 8, 8  # the win+mem variant (DTL shapes; window 64 from N 128 on)
VARIANT_WINDOW = {"win64": 64, "win256": 256}


@dataclass(frozen=True)
class Case:
    B: int
    Hh: int
    N: int
    d: int
    variant: str  # plain | pad | win+mem
    dtype: str
    eager: bool = True
    compile: bool = False

    @property
    def shape(self) -> str:
        return f"{self.B}x{self.Hh}x{self.N}x{self.d}"

    @property
    def long(self) -> bool:
        return self.N >= 1024


def _dtl(*, variants=("plain", "pad"), dtypes=("bfloat16",)):
    return [Case(64, h, n, d, v, dt) for dt in dtypes for v in variants for h in (4, 8)
            for n in (16, 32, 64) for d in (32, 64)]


def _long(*, variants=("plain", "pad"), dtypes=("bfloat16",), ns=(1024, 2048, 4096, 8192)):
    return [Case(4, 16, n, d, v, dt) for dt in dtypes for v in variants for d in (64, 128)
            for n in ns]


CPU_QUICK = [  # `make demo` runs this three times: two DTL-sized cases keep it to seconds
    Case(64, 8, 64, 64, "plain", "float32"),
    Case(64, 8, 64, 64, "pad", "float32"),
]
CPU_FULL = (
    [Case(64, h, n, d, v, "float32") for v in ("plain", "pad") for h in (4, 8) for n in (16, 64)
     for d in (32, 64)]
    + [Case(64, 8, 64, 64, "win+mem", "float32"), Case(64, 8, 64, 64, "plain", "bfloat16")]
    + [Case(4, 16, 1024, 64, v, "float32") for v in ("plain", "pad")]
)
CPU_TINY = [Case(2, 2, 5, 8, v, "float32") for v in ("plain", "pad", "win+mem")]

# GPU quick (gpu_check.sh): one cheap case per acceptance figure first, then the bigger ones, so
# a budget cut drops the expensive tail; torch.compile last. The eager reference only where it is
# affordable (not at N 8k: ~17 GB per dense score matrix).
GPU_QUICK = [
    Case(64, 4, 16, 32, "pad", "bfloat16"),  # DTL-sized >= 1x composite (cheapest)
    Case(4, 16, 1024, 64, "pad", "bfloat16"),  # padding >= 1.5x; long >= 4x eager
    Case(4, 16, 2048, 64, "plain", "bfloat16"),  # Nk >= 2k: fwd >= 1.1x, fwd+bwd >= 1x; eager
    Case(64, 8, 32, 64, "plain", "float32"),  # DTL-sized, float32
    Case(4, 16, 4096, 128, "pad", "float16"),  # d 128, padding
    Case(4, 16, 8192, 64, "plain", "bfloat16", eager=False),  # the longest Nk
    Case(4, 16, 4096, 64, "win256", "bfloat16"),  # window >= 1.5x composite, >= 1.2x Flex
    Case(64, 8, 64, 64, "plain", "bfloat16", compile=True),  # DTL-sized + compiled
    Case(4, 16, 2048, 64, "plain", "bfloat16", compile=True),  # headline + compiled
]


def _gpu_full() -> list[Case]:
    dts = ("bfloat16", "float16", "float32")
    cases = (_long(dtypes=dts, variants=("plain", "pad", "win64", "win256", "win+mem"),
                   ns=(1024, 2048, 4096, 8192, 16384))
             + [Case(16, 16, 64, d, v, dt) for dt in dts for v in ("plain", "pad") for d in (64, 128)]
             + _dtl(dtypes=dts, variants=("plain", "pad", "win+mem")))
    # the eager reference and its torch.compile stop at N 8k (dense scores: 17 GB at 8k)
    cases = [Case(c.B, c.Hh, c.N, c.d, c.variant, c.dtype, c.N <= 8192, c.N <= 8192) for c in cases]

    def prio(c: Case):  # the headline cases first
        head = c.long and c.dtype == "bfloat16" and c.d == 64 and c.variant in ("plain", "pad", "win256")
        return (not head, not c.long)

    return sorted(cases, key=prio)


GPU_FULL = _gpu_full()
# a compile of the reference: forward, and forward+backward (another graph: AOTAutograd's forward
# and backward) estimated COMPILE_BWD_FACTOR x higher; checked against the budget at every
# compiled case and mode (a new shape or dtype can recompile)
COMPILE_EST_S = 45.0
COMPILE_BWD_FACTOR = 2.0


FLEX_COMPILE_EST_S = 25.0  # flex_attention's compile per shape / dtype / mask (a guess: not
# yet measured here); forward+backward COMPILE_BWD_FACTOR x that


def compile_estimate_s(mode: str, provider: str = "compiled") -> float:
    est = FLEX_COMPILE_EST_S if provider == "flex" else COMPILE_EST_S
    return est if mode == "forward" else COMPILE_BWD_FACTOR * est


# ----------------------------------------------------------------------------------------------
# providers
# ----------------------------------------------------------------------------------------------


def _scale(logit_scale, dtype):
    return torch.exp(torch.clamp(logit_scale.to(dtype), max=LOG_MAX_SCALE))


def _mask(key_lengths, window, B, Nq, Nk, device):
    if key_lengths is None and window is None:
        return None
    m = torch.ones((B, 1, Nq, Nk), dtype=torch.bool, device=device)
    j = torch.arange(Nk, device=device)
    if key_lengths is not None:
        m = m & (j[None, :] < key_lengths.to(device)[:, None])[:, None, None, :]
    if window is not None:
        i = torch.arange(Nq, device=device)
        m = m & ((i[:, None] - j[None, :]).abs() <= window)[None, None]
    return m


def _standin_reference(q, k, v, logit_scale, key_lengths=None, window=None, memory_k=None,
                       memory_v=None, **_):
    """Dense eager cosine attention (harness self-test)."""
    cd = torch.float64 if q.dtype == torch.float64 else torch.float32
    B, Hh, Nq, _ = q.shape
    qn, kn = F.normalize(q.to(cd), dim=-1, eps=NORM_EPS), F.normalize(k.to(cd), dim=-1, eps=NORM_EPS)
    vv = v.to(cd)
    s = _scale(logit_scale, cd)[None, :, None, None] * (qn @ kn.transpose(-1, -2))
    m = _mask(key_lengths, window, B, Nq, k.shape[2], q.device)
    if m is None:
        m = torch.ones_like(s, dtype=torch.bool)
    m = m.expand(s.shape)
    if memory_k is not None:
        mk = F.normalize(memory_k.to(cd), dim=-1, eps=NORM_EPS)
        s = torch.cat([_scale(logit_scale, cd)[None, :, None, None] * (qn @ mk.transpose(-1, -2)[None]), s], -1)
        vv = torch.cat([memory_v.to(cd)[None].expand(B, -1, -1, -1), vv], 2)
        m = torch.cat([m.new_ones(B, Hh, Nq, memory_k.shape[1]), m], -1)
    p = torch.softmax(s.masked_fill(~m, float("-inf")), -1).nan_to_num(0.0)
    return (p @ vv).to(q.dtype)


def _standin_composite(q, k, v, logit_scale, key_lengths=None, window=None, memory_k=None,
                       memory_v=None, **_):
    """Normalise + SDPA (harness self-test; no empty rows in the bench's cases)."""
    B, Hh, Nq, _ = q.shape
    qn = F.normalize(q, dim=-1, eps=NORM_EPS) * _scale(logit_scale, q.dtype)[None, :, None, None]
    kn, vv = F.normalize(k, dim=-1, eps=NORM_EPS), v
    m = _mask(key_lengths, window, B, Nq, k.shape[2], q.device)
    if memory_k is not None:
        kn = torch.cat([F.normalize(memory_k, dim=-1, eps=NORM_EPS)[None].expand(B, -1, -1, -1), kn], 2)
        vv = torch.cat([memory_v[None].expand(B, -1, -1, -1), vv], 2)
        if m is not None:
            m = torch.cat([m.new_ones(B, 1, Nq, memory_k.shape[1]), m], -1)
    return F.scaled_dot_product_attention(qn, kn, vv, attn_mask=m, scale=1.0)


_AUTO_IMPL: dict[str, str] = {}


def load_api(standin: bool):
    """Returns (reference_fn, composite_fn, dtl_fast_fn or None, note)."""
    if standin:
        return (_standin_reference, _standin_composite,
                lambda *a, backend=None, **k: _standin_composite(*a, **k),
                "stand-in functions (harness self-test)")
    try:
        R = importlib.import_module("dtl_fast.reference.cosine_attention")

        ref = R.cosine_attention
    except Exception as exc:  # noqa: BLE001
        raise SystemExit(f"dtl_fast.reference.cosine_attention is not importable "
                         f"({type(exc).__name__}: {exc}); run with --standin to test the harness")
    try:
        O = importlib.import_module("dtl_fast.ops.cosine_attention")

        comp, fused = O.cosine_attention_composite, O.cosine_attention
        note = f"dtl_fast.ops.cosine_attention (CPU auto path: {getattr(O, 'CPU_AUTO_PATH', '?')})"
        _AUTO_IMPL["cpu"] = str(getattr(O, "CPU_AUTO_PATH", "?"))
        _AUTO_IMPL["cuda"] = "fused"
    except Exception as exc:  # noqa: BLE001
        comp, fused = None, None
        note = f"dtl_fast.ops.cosine_attention unavailable: {type(exc).__name__}: {exc}"
    return ref, comp, fused, note


# ----------------------------------------------------------------------------------------------
# float64 ground truth, in query chunks
# ----------------------------------------------------------------------------------------------


def truth64(inputs: dict, g: torch.Tensor | None, *, chunk_elems: int = 1 << 24):
    """Output (and, when g is given, the gradients of every float input) in float64, computed
    over chunks of queries so the dense scores of one chunk stay under chunk_elems entries.
    Returns (out, {name: grad})."""
    q, k, v, ls = (inputs[n].detach().double() for n in ("q", "k", "v", "logit_scale"))
    mk = inputs.get("memory_k")
    mv = inputs.get("memory_v")
    mk = None if mk is None else mk.detach().double()
    mv = None if mv is None else mv.detach().double()
    leaves = {"q": q, "k": k, "v": v, "logit_scale": ls}
    if mk is not None:
        leaves.update(memory_k=mk, memory_v=mv)
    if g is not None:
        for t in leaves.values():
            t.requires_grad_(True)
    B, Hh, N, _ = q.shape
    Nk = k.shape[2] + (0 if mk is None else mk.shape[1])
    step = max(1, min(N, chunk_elems // max(1, B * Hh * Nk)))
    kl, window = inputs.get("key_lengths"), inputs.get("window")
    outs = []
    with torch.enable_grad() if g is not None else torch.no_grad():
        for i0 in range(0, N, step):
            i1 = min(N, i0 + step)
            qc = q[:, :, i0:i1]
            qn = F.normalize(qc, dim=-1, eps=NORM_EPS)
            kn = F.normalize(k, dim=-1, eps=NORM_EPS)
            sc = _scale(ls, torch.float64)[None, :, None, None]
            s = sc * (qn @ kn.transpose(-1, -2))  # [B, H, c, N]
            valid = torch.ones(B, 1, i1 - i0, k.shape[2], dtype=torch.bool, device=q.device)
            j = torch.arange(k.shape[2], device=q.device)
            if kl is not None:
                valid = valid & (j[None, :] < kl.to(q.device)[:, None])[:, None, None, :]
            if window is not None:
                i = torch.arange(i0, i1, device=q.device)
                valid = valid & ((i[:, None] - j[None, :]).abs() <= window)[None, None]
            valid = valid.expand(B, Hh, i1 - i0, k.shape[2])
            vv = v
            if mk is not None:
                mkn = F.normalize(mk, dim=-1, eps=NORM_EPS)
                s = torch.cat([sc * (qn @ mkn.transpose(-1, -2)[None]), s], -1)
                vv = torch.cat([mv[None].expand(B, -1, -1, -1), v], 2)
                valid = torch.cat([valid.new_ones(B, Hh, i1 - i0, mk.shape[1]), valid], -1)
            s = s.masked_fill(~valid, float("-inf"))
            mx = s.amax(-1, keepdim=True).detach()
            mx = torch.where(torch.isfinite(mx), mx, torch.zeros_like(mx))
            p = torch.exp(s - mx)
            den = p.sum(-1, keepdim=True)
            oc = (p @ vv) / torch.where(den > 0, den, torch.ones_like(den))
            if g is not None:
                oc.backward(g[:, :, i0:i1].double())
            outs.append(oc.detach())
    out = torch.cat(outs, 2)
    grads = {n: t.grad for n, t in leaves.items()} if g is not None else {}
    return out, grads


# ----------------------------------------------------------------------------------------------
# the run
# ----------------------------------------------------------------------------------------------


def _window_of(case: Case) -> int | None:
    if case.variant == "win+mem":
        return (2 if case.N < 16 else WINDOW) if case.N <= 64 else 64
    return VARIANT_WINDOW.get(case.variant)


def attended_pairs(case: Case, key_lengths=None) -> int:
    """(query, key) pairs a query attends to, summed over the batch (per head): N * N for
    plain; the valid ones under key_lengths / window; plus N * M memory pairs."""
    N = case.N
    w = _window_of(case)
    lens = [N] * case.B if key_lengths is None else [int(x) for x in key_lengths]
    total = 0
    for L in lens:
        if w is None:
            total += N * L
        else:  # sum over i < N of #{j < L : |i - j| <= w}
            i = torch.arange(N)
            total += int((torch.clamp(i + w + 1, max=L) - torch.clamp(i - w, min=0)).clamp(min=0).sum())
    if case.variant == "win+mem":
        total += case.B * N * (2 if case.N < 16 else MEMORY)
    return total


def flops(case: Case, mode: str, key_lengths=None) -> float:
    """QK^T and PV matmuls over the attended pairs (attended_pairs: 4 d each); the backward
    does ~2.5x the forward's (FlashAttention-2's count)."""
    f = 4 * case.Hh * attended_pairs(case, key_lengths) * case.d
    return f if mode == "forward" else 3.5 * f


def ref_bytes(case: Case, mode: str) -> int:
    """Peak memory of the eager reference: dense float32 [B, H, N, N(+M)] matrices."""
    m = MEMORY if case.variant == "win+mem" else 0
    per = case.B * case.Hh * case.N * (case.N + m) * 4
    return per * (4 if mode == "forward" else 10)










def make_inputs(case: Case, ci: int, device: str) -> dict:
    dt = DTYPES[case.dtype]
    gen = H.gen(device, ci)
    shape = (case.B, case.Hh, case.N, case.d)
    inp: dict[str, Any] = {
        "q": torch.randn(shape, generator=gen, device=device).to(dt),
        "k": torch.randn(shape, generator=gen, device=device).to(dt),
        "v": torch.randn(shape, generator=gen, device=device).to(dt),
        "logit_scale": torch.empty(case.Hh, device=device).uniform_(
            math.log(5.0), math.log(20.0), generator=gen),
        "key_lengths": None, "window": None, "memory_k": None, "memory_v": None,
    }
    if case.variant == "pad":
        inp["key_lengths"] = torch.randint(case.N // 2, case.N + 1, (case.B,),
                                           generator=H.gen("cpu", 1000 + ci)).to(device)
    elif case.variant in VARIANT_WINDOW:
        inp["window"] = VARIANT_WINDOW[case.variant]
    elif case.variant == "win+mem":
        inp["window"] = _window_of(case)
        m = 2 if case.N < 16 else MEMORY
        inp["memory_k"] = torch.randn(case.Hh, m, case.d, generator=gen, device=device).to(dt)
        inp["memory_v"] = torch.randn(case.Hh, m, case.d, generator=gen, device=device).to(dt)
    return inp


GRAD_NAMES = ("q", "k", "v", "logit_scale", "memory_k", "memory_v")


def _auto_impl(inp: dict, mode: str) -> str:
    """The path backend="auto" takes for these inputs (ops.cosine_attention.auto_path)."""
    try:
        O = importlib.import_module("dtl_fast.ops.cosine_attention")
        q = inp["q"]
        masked = inp["key_lengths"] is not None or inp["window"] is not None
        m = 0 if inp.get("memory_k") is None else inp["memory_k"].shape[1]  # memory slots
        return O.auto_path(q.device.type, q.dtype, masked, mode != "forward", q.shape[2],
                           inp["k"].shape[2], d=q.shape[3], dv=inp["v"].shape[3], m=m)
    except Exception:  # noqa: BLE001
        return "?"


def _call(fn, inp, leaves=None):
    src = dict(inp)
    if leaves:
        src.update(leaves)
    return fn(src["q"], src["k"], src["v"], src["logit_scale"], src["key_lengths"], src["window"],
              src["memory_k"], src["memory_v"])


def _leaves(inp) -> dict:
    return {n: inp[n].detach().requires_grad_(True) for n in GRAD_NAMES if inp.get(n) is not None}


def _fwd_bwd(fn, inp, g):
    lv = _leaves(inp)
    out = _call(fn, inp, lv)
    out.backward(g)
    return out.detach(), {n: t.grad for n, t in lv.items()}


def _one_call_s(fn, mode, inp, g, device) -> float:
    """Seconds of one call of `fn` in `mode` (synchronised)."""
    H.sync(device)
    t0 = time.perf_counter()
    if mode == "forward":
        with torch.no_grad():
            _call(fn, inp)
    else:
        _fwd_bwd(fn, inp, g)
    H.sync(device)
    return time.perf_counter() - t0


def _check(names, got: dict, want: dict, base_err: dict | None, dtype: str, baseline: bool):
    """(ok, message, worst rel64, {name: rel64})."""
    errs = {}
    for n in names:
        a, r = got.get(n), want[n]
        grad = n != "output"
        if a is None:
            return False, f"{n}: missing (None)", math.inf, errs
        if tuple(a.shape) != tuple(r.shape):
            return False, f"{n}: shape {tuple(a.shape)} != {tuple(r.shape)}", math.inf, errs
        if not bool(torch.isfinite(a).all()):
            return False, f"{n}: non-finite values", math.inf, errs
        e = H.rel_err(a, r)
        errs[n] = e
        tol = TOL64[dtype][1 if grad else 0]
        if baseline:
            bound = tol * BASELINE_SLACK
        else:
            bound = max(tol, 2.0 * (base_err or {}).get(n, 0.0))
        if not e <= bound:
            return False, f"{n}: rel err vs float64 {e:.2e} > {bound:.1e}", e, errs
    return True, "ok", max(errs.values(), default=0.0), errs


def select_cases(device: str, quick: bool, tiny: bool) -> list[Case]:
    return H.select_grid(device, quick, tiny, tiny_grid=CPU_TINY, cpu_quick=CPU_QUICK,
                         cpu_full=CPU_FULL, gpu_quick=GPU_QUICK, gpu_full=GPU_FULL)


def timing_kwargs(device: str, quick: bool, tiny: bool) -> dict[str, Any]:
    return H.grid_timing_kwargs(device, quick, tiny,
                                cpu_quick=dict(warmup=20, rep=40, min_samples=5, max_ms=1000))


_COMPILED: dict[str, Any] = {}
_FLEX: dict[str, Any] = {}


def flex_unavailable(device: str) -> str | None:
    """Why the FlexAttention provider cannot run here (None: it can)."""
    if device != "cuda":
        return "skipped: FlexAttention is timed on CUDA only (its CPU path is not a Triton kernel)"
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention  # noqa: F401
    except Exception as exc:  # noqa: BLE001
        return f"skipped: torch.nn.attention.flex_attention unavailable ({type(exc).__name__}: {exc})"
    return None


def flex_provider():
    """FlexAttention as a PyTorch user writes scaled cosine attention with it (see the module
    docstring). One torch.compile'd flex_attention for the run; the block mask is cached per
    (key_lengths, window, memory, shape), so a timed call does not rebuild it."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    if "fn" not in _FLEX:
        _FLEX["fn"] = torch.compile(flex_attention, dynamic=False)
        _FLEX["masks"] = {}
    compiled, masks = _FLEX["fn"], _FLEX["masks"]

    def fn(q, k, v, logit_scale, key_lengths=None, window=None, memory_k=None, memory_v=None):
        B, Hh, Nq, _ = q.shape
        scale = _scale(logit_scale, torch.float32)
        qn, kn, vv = F.normalize(q, dim=-1, eps=NORM_EPS), F.normalize(k, dim=-1, eps=NORM_EPS), v
        M = 0
        if memory_k is not None:
            M = memory_k.shape[1]
            kn = torch.cat([F.normalize(memory_k, dim=-1, eps=NORM_EPS)[None].expand(B, -1, -1, -1), kn], 2)
            vv = torch.cat([memory_v[None].expand(B, -1, -1, -1), vv], 2)
        Nk = kn.shape[2]

        def score_mod(score, b, h, q_idx, kv_idx):
            return score * scale[h]

        block_mask = None
        if key_lengths is not None or window is not None:
            # keyed by the lengths tensor's identity (no host sync in a timed call); the cache
            # holds the tensor, so its id is not reused while the entry lives
            key = (id(key_lengths), window, M, B, Nq, Nk, str(q.device))
            if key not in masks or masks[key][0] is not key_lengths:
                kl = key_lengths
                w = window

                def mask_mod(b, h, q_idx, kv_idx):
                    j = kv_idx - M
                    ok = j >= 0
                    if kl is not None:
                        ok = ok & (j < kl[b])
                    if w is not None:
                        ok = ok & ((q_idx - j).abs() <= w)
                    return ok | (kv_idx < M)

                masks[key] = (key_lengths, create_block_mask(mask_mod, B, None, Nq, Nk,
                                                             device=q.device))
            block_mask = masks[key][1]
        return compiled(qn, kn, vv, score_mod=score_mod, block_mask=block_mask, scale=1.0)

    return fn


def sdpa_backend(inp: dict) -> str:
    """Which SDPA backend the composite's call picks (torch._fused_sdp_choice on arguments of
    the composite's shapes, dtype and mask): flash / efficient / cudnn / math, or '?'."""
    try:
        from torch.nn.attention import SDPBackend

        q, k, v = inp["q"], inp["k"], inp["v"]
        B, _, N, _ = q.shape
        mask = _mask(inp.get("key_lengths"), inp.get("window"), B, N, k.shape[2], q.device)
        if inp.get("memory_k") is not None:
            M = inp["memory_k"].shape[1]
            k = torch.cat([inp["memory_k"][None].expand(B, -1, -1, -1), k], 2)
            v = torch.cat([inp["memory_v"][None].expand(B, -1, -1, -1), v], 2)
            if mask is not None:
                mask = torch.cat([mask.new_ones(B, 1, N, M), mask], -1)
        choice = torch._fused_sdp_choice(q, k, v, mask, 0.0, False, scale=1.0)
        return {SDPBackend.FLASH_ATTENTION: "flash", SDPBackend.EFFICIENT_ATTENTION: "efficient",
                SDPBackend.MATH: "math"}.get(SDPBackend(choice), "cudnn" if "CUDNN" in
                                             SDPBackend(choice).name else SDPBackend(choice).name.lower())
    except Exception:  # noqa: BLE001
        return "?"


def _compiled_reference(ref_fn):
    if "fn" not in _COMPILED:
        import torch._dynamo as dynamo

        for key in ("recompile_limit", "cache_size_limit"):  # one name or the other per version
            with contextlib.suppress(Exception):
                if hasattr(dynamo.config, key):
                    setattr(dynamo.config, key, max(64, getattr(dynamo.config, key)))
        _COMPILED["fn"] = torch.compile(ref_fn)
    return _COMPILED["fn"]


def make_providers(case: Case, ref_fn, comp_fn, fused_fn, device: str, standin: bool):
    provs: dict[str, Callable | str] = {}
    provs[BASELINE] = comp_fn if comp_fn is not None else "skipped: composite unavailable"
    provs["reference"] = ref_fn if case.eager else "skipped: eager reference not in this grid"
    if device != "cuda" or standin:
        provs["compiled"] = "skipped: torch.compile is timed on CUDA only (compile time)"
    elif not case.compile:
        provs["compiled"] = "skipped: torch.compile only on the cases marked for it (compile time)"
    else:
        provs["compiled"] = _compiled_reference(ref_fn)
    if fused_fn is None:
        provs["dtl_fast"] = "skipped: dtl_fast.ops.cosine_attention unavailable"
    else:
        backend = "fused" if device == "cuda" else "auto"
        provs["dtl_fast"] = (lambda q, k, v, ls, kl, w, mk, mv, fn=fused_fn, b=backend:
                             fn(q, k, v, ls, kl, w, mk, mv, backend=b))
        if device == "cpu":
            provs["dtl_fast:fused"] = ("skipped: the fused kernel on CPU tensors runs in the Triton "
                                       "interpreter: never timed")
            provs["dtl_fast:auto"] = "skipped: on CPU the dtl_fast row is backend='auto'"
        else:
            provs["dtl_fast:auto"] = (lambda q, k, v, ls, kl, w, mk, mv, fn=fused_fn:
                                      fn(q, k, v, ls, kl, w, mk, mv, backend="auto"))
    why = flex_unavailable(device)
    provs["flex"] = why if why is not None else ("skipped: stand-in run" if standin else flex_provider())
    return provs


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Measures the grid of args (see the module docstring); returns the rows it appended.

    On CPU without --threads it runs on one thread (restored afterwards; the rows' device_name
    says so): on a shared 2-core machine a second thread turns every small op's parallel region
    into a wait for a busy core (the quick grid took 8 s or 37 s on 2 threads depending on the
    load); the figures compare providers on the same thread count.
    """
    return H.run_one_thread_on_cpu(args, _run)


def _run(args: argparse.Namespace, device: str) -> list[dict[str, Any]]:
    standin = getattr(args, "standin", False)
    tiny = getattr(args, "tiny", False)
    kernel, run_id, deadline = H.start_run(args, KERNEL)
    ref_fn, comp_fn, fused_fn, note = load_api(standin)
    if getattr(args, "fused_override", None) is not None:  # tests: a deliberately wrong provider
        fused_fn = args.fused_override

    stamp, writer = H.open_results(args, kernel, device)
    print(f"[{kernel}] providers: composite (normalise + SDPA), reference, compiled, {note}")
    cases = getattr(args, "cases", None) or select_cases(device, args.quick, tiny)
    timing_kw = timing_kwargs(device, args.quick, tiny)
    if device == "cpu":
        timing_kw["flush_cache"] = getattr(args, "cold_cache", False)
    rows: list[dict[str, Any]] = []
    emit = H.emitter(writer, rows, ("x_eager", "tflops"))

    def one_case(ci, case):
        _run_case(case, ci, device, ref_fn, comp_fn, fused_fn, kernel, stamp, run_id, timing_kw,
                  deadline, emit, standin)

    H.run_cases(cases, kernel=kernel, device=device, deadline=deadline, emit=emit, modes=MODES,
                stamp=stamp, baseline=BASELINE, run_id=run_id, run_case=one_case)

    return H.finish_run(rows, args, kernel=kernel, device=device, run_id=run_id, writer=writer,
                        stamp=stamp, extra_keys=("x_eager", "tflops", "rel64"))


def _run_case(case, ci, device, ref_fn, comp_fn, fused_fn, kernel, stamp, run_id, timing_kw,
              deadline, emit, standin):
    inp = make_inputs(case, ci, device)
    dt = DTYPES[case.dtype]
    g = torch.randn(case.B, case.Hh, case.N, case.d, generator=H.gen(device, 500 + ci),
                    device=device).to(dt)
    provs = make_providers(case, ref_fn, comp_fn, fused_fn, device, standin)
    grad_names = [n for n in GRAD_NAMES if inp.get(n) is not None]
    fb_names = ["output"] + [f"{n}.grad" for n in grad_names]
    print(f"[{kernel}] {case.variant} {case.shape} {case.dtype}", flush=True)
    truth: dict[str, dict] = {}
    base_err: dict[str, dict] = {}

    for mode in MODES:
        if mode == "forward":
            out64, _ = truth64(inp, None)
            truth[mode] = {"output": out64}
        else:
            out64, gr64 = truth64(inp, g)
            truth[mode] = {"output": out64, **{f"{n}.grad": gr64[n] for n in grad_names}}
        names = ["output"] if mode == "forward" else fb_names
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
            if name in ("reference", "compiled") and device == "cuda":
                need = ref_bytes(case, mode)
                free = torch.cuda.mem_get_info()[0]
                if need > 0.8 * free:
                    emit(H.status_row(base, name, f"skipped: needs ~{need / 2**30:.0f} GiB of "
                                                  f"dense scores, {free / 2**30:.0f} GiB free"))
                    continue
            if name in ("compiled", "flex"):  # budgeted every time: forward and fwd+bwd separately
                st = H.budget_skip(deadline, compile_estimate_s(mode, name), planned,
                                   what=f"a {mode} compile")
                if st:
                    emit(H.status_row(base, name, st))
                    continue
            t0 = time.perf_counter()
            try:
                if mode == "forward":
                    with torch.no_grad():
                        got = {"output": _call(fn, inp)}
                else:
                    out, gr = _fwd_bwd(fn, inp, g)
                    got = {"output": out, **{f"{n}.grad": gr.get(n) for n in grad_names}}
                H.sync(device)
                first_s = time.perf_counter() - t0
                ok, msg, worst, errs = _check(names, got, truth[mode], base_err.get(mode),
                                              case.dtype, name == BASELINE)
                if name == BASELINE:
                    base_err[mode] = errs
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
            ex: dict[str, Any] = {"rel64": float(f"{worst:.3g}")}
            if name in ("compiled", "flex"):
                ex["compile_s"] = round(first_s, 1)
            # every provider: the second call, timed (the first one held the JIT compile /
            # autotuning), says what its timing costs; skip (with a row) when that does not fit
            if deadline.end is not None:
                est, st = H.second_call_budget(
                    deadline, planned, lambda fn=fn: _one_call_s(fn, mode, inp, g, device), device)
                if st:
                    emit(H.status_row(base, name, st))
                    continue
                planned += est
            extras[name] = ex
            if mode == "forward":
                calls[name] = lambda fn=fn: _call(fn, inp)
            else:
                lv = _leaves(inp)
                calls[name] = lambda fn=fn, lv=lv: _call(fn, inp, lv).backward(g)
                grads[name] = list(lv.values())
        if H.baseline_missing(calls, BASELINE, kernel,
                              f"{mode} {case.variant} {case.shape} {case.dtype}", emit, base):
            continue
        timed = H.time_calls(calls, grads, mode=mode, device=device, timing_kw=timing_kw,
                             emit=emit, base=base)
        if timed is None:
            continue
        times, peaks = timed
        base_ms = times[BASELINE][0]
        ref_ms = times["reference"][0] if "reference" in times else None
        fl = flops(case, mode, None if inp["key_lengths"] is None else inp["key_lengths"].tolist())
        for name, t in times.items():
            ex = H.speed_extras(extras[name], t[0], fl, ref_ms, peaks.get(name))
            if name == "dtl_fast":
                ex["backend"] = "fused" if device == "cuda" else "auto"
                if _AUTO_IMPL:
                    ex["impl"] = _AUTO_IMPL.get(device, "?")
            if name == "dtl_fast:auto":
                ex["backend"] = "auto"
                ex["impl"] = _auto_impl(inp, mode)
            if name == BASELINE and not standin:
                ex["sdpa"] = sdpa_backend(inp)
            if H.noisy(t):
                ex["noisy"] = True
            emit(H.make_row(**base, provider=name, timing=t, baseline_ms=base_ms, extra=ex))
        del calls, grads
        truth.pop(mode, None)
        H.free(device)


# ----------------------------------------------------------------------------------------------
# acceptance figures (run.py prints them)
# ----------------------------------------------------------------------------------------------

GPU_FWD_LONG = 1.1  # bf16, d 64, no padding, Nk >= 2k: x composite
GPU_FWDBWD_LONG = 1.0
GPU_PAD = 1.5  # with key padding or a window (long): x composite
GPU_PAD_FLEX = 1.2  # the same cases: x FlexAttention
GPU_EAGER = 4.0  # long: x eager reference
GPU_DTL = 1.5  # DTL-sized (N <= 64, B H >= 256): x composite
GPU_AUTO = 0.95  # backend="auto": x composite, every case
GPU_TFLOPS_FWD, GPU_TFLOPS_FWDBWD = 300.0, 150.0  # plain bf16 d64 N >= 2k
CPU_AUTO = 0.9  # auto: x the faster of reference / composite (CPU)


_ok = H.row_ok
_extra = H.row_extra
_min_figure = H.min_figure


def _dims(shape: str):
    B, Hh, N, d = (int(s) for s in shape.split("x"))
    return B, Hh, N, d


def _ratio(r):
    return H.fnum(r.get("ratio"))


def acceptance(rows, device: str) -> list[dict[str, Any]]:
    """The attention acceptance figures from this run's rows (one figure per criterion and mode:
    the minimum over the cases it covers, naming the worst)."""
    rows = [r for r in rows if r.get("kernel") == KERNEL and r.get("device") == device]
    fused = [r for r in rows if r["provider"] == "dtl_fast"]
    figs: list[dict[str, Any]] = []
    if device == "cpu":
        def best(r):  # the faster of reference and composite, over auto
            x = _extra(r).get("x_eager")
            vals = [v for v in (_ratio(r), H.fnum(x)) if v is not None]
            return min(vals) if vals else None

        for r in fused:
            figs.append(_min_figure(
                f"cpu {r['mode']:<16} {r['variant']:<5} {r['shape']:<12} {r['dtype']:<8} auto >= "
                f"{CPU_AUTO:g}x the faster of reference / composite", [r], best, CPU_AUTO))
        if not figs:
            figs.append(dict(name="cpu auto vs reference / composite", value="unmeasured",
                             passed=False))
        n_cut = len({(r["variant"], r["shape"], r["dtype"]) for r in H.not_run_rows(rows)})
        if n_cut:
            figs.append(H.mark_not_run(dict(name="cpu grid complete", value="cut", passed=False),
                                       n_cut))
        return figs
    not_run = H.not_run_rows(rows)  # whole cases cut by the budget (or failed before timing)

    def figure(name, pred, value_fn, target, f=None):
        """min over the dtl_fast rows `pred` selects; cases of that kind that were not run make
        it FAIL, saying how many."""
        if f is None:
            f = _min_figure(name, [r for r in fused if pred(r)], value_fn, target)
        return H.mark_not_run(f, len([r for r in not_run if pred(r)]))

    for mode, target in (("forward", GPU_FWD_LONG), ("forward+backward", GPU_FWDBWD_LONG)):
        figs.append(figure(
            f"gpu bf16 d64 no padding Nk>=2k {mode:<16} >= {target:g}x composite",
            lambda r, mode=mode: (r["mode"] == mode and r["dtype"] == "bfloat16"
                                  and r["variant"] == "plain" and _dims(r["shape"])[3] == 64
                                  and _dims(r["shape"])[2] >= 2048), _ratio, target))
    def masked_long(r, mode):
        return r["mode"] == mode and r["variant"] != "plain" and _dims(r["shape"])[2] >= 1024

    for mode in MODES:
        figs.append(figure(
            f"gpu key padding or window (N>=1k) {mode:<16} >= {GPU_PAD:g}x composite",
            lambda r, mode=mode: masked_long(r, mode), _ratio, GPU_PAD))
    # Figures on other providers' rows appear when the run has such rows (a run of an older
    # grid, or synthetic rows, has none).
    flex_ms = {(r["mode"], r["variant"], r["shape"], r["dtype"]): H.fnum(r.get("median_ms"))
               for r in rows if r["provider"] == "flex" and _ok(r)}
    if any(r["provider"] == "flex" for r in rows):
        def x_flex(r):
            f = flex_ms.get((r["mode"], r["variant"], r["shape"], r["dtype"]))
            ms = H.fnum(r.get("median_ms"))
            return None if f is None or not ms else f / ms

        for mode in MODES:
            figs.append(figure(
                f"gpu key padding or window (N>=1k) {mode:<16} >= {GPU_PAD_FLEX:g}x FlexAttention",
                lambda r, mode=mode: masked_long(r, mode), x_flex, GPU_PAD_FLEX))
    auto = [r for r in rows if r["provider"] == "dtl_fast:auto"]
    if auto:
        for mode in MODES:
            figs.append(H.mark_not_run(_min_figure(
                f"gpu auto everywhere {mode:<16} >= {GPU_AUTO:g}x composite",
                [r for r in auto if r["mode"] == mode], _ratio, GPU_AUTO),
                len([r for r in not_run if r["mode"] == mode])))
    headline = [r for r in fused if r["dtype"] == "bfloat16" and r["variant"] == "plain"
                and _dims(r["shape"])[3] == 64 and _dims(r["shape"])[2] >= 2048]
    if any("tflops" in _extra(r) for r in headline):
        for mode, target in (("forward", GPU_TFLOPS_FWD), ("forward+backward", GPU_TFLOPS_FWDBWD)):
            figs.append(_min_figure(
                f"gpu bf16 d64 no padding Nk>=2k {mode:<16} >= {target:g} TFLOP/s",
                [r for r in headline if r["mode"] == mode],
                lambda r: H.fnum(_extra(r).get("tflops")), target, unit=" TFLOP/s"))
    for mode in MODES:
        def is_long(r, mode=mode):
            return r["mode"] == mode and _dims(r["shape"])[2] >= 1024

        long_rows = [r for r in fused if is_long(r)]
        sel = [r for r in long_rows if _ok(r) and "x_eager" in _extra(r)]
        name = f"gpu long (N>=1k) {mode:<16} >= {GPU_EAGER:g}x eager reference"
        f = _min_figure(name, sel, lambda r: H.fnum(_extra(r).get("x_eager")), GPU_EAGER)
        if sel and len(long_rows) > len(sel):
            f["value"] += (f"; eager timed in {len(sel)} of {len(long_rows)} case(s) (memory / "
                           "budget: see their rows)")
        figs.append(figure(name, is_long, None, GPU_EAGER, f=f))
    for mode in MODES:
        figs.append(figure(
            f"gpu DTL-sized (N<=64, BH>=256) {mode:<16} >= {GPU_DTL:g}x composite",
            lambda r, mode=mode: (r["mode"] == mode and _dims(r["shape"])[2] <= 64
                                  and _dims(r["shape"])[0] * _dims(r["shape"])[1] >= 256),
            _ratio, GPU_DTL))
    return figs


def main(argv=None) -> int:
    return H.bench_main(argv, doc=__doc__, kernel=KERNEL, run=run, acceptance=acceptance)


if __name__ == "__main__":
    sys.exit(main())
