"""Scaled cosine attention (Swin Transformer V2 scores, key lengths, a local window, shared
memory slots): the registered Triton ops torch.ops.dtl_fast.cosine_attention_fwd / _bwd, their
fake kernels and autograd, the normalise + scaled_dot_product_attention composite, and the
backend choice.

The learned log-scale is turned into scale = exp(min(logit_scale, ln 100)) here, with PyTorch
ops, before the custom op: the kernels take and differentiate `scale` [H], and autograd carries
the gradient through exp and the clamp (zero where the clamp is active), exactly as in the
reference.

Strides: q, k, v, memory_k / memory_v and the output gradient are passed to the kernels with
their strides (no copy), except that a tensor whose last dimension is not contiguous is made
contiguous first.
"""
from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F

from dtl_fast._backend import resolve_backend
from dtl_fast._checks import autocast_enabled
from dtl_fast._device import to_device_cached
from dtl_fast._triton import can_run_triton, require_triton
from dtl_fast.ops._eager import (eager_op, needs_stock_path, no_double_backward, refuse_transforms,
                                 transforms_in_use)
from dtl_fast.reference.cosine_attention import (MAX_WINDOW, NORM_EPS, check_inputs, check_values,
                                                 head_scale, key_mask, key_valid, window_tensor,
                                                 zero_padded_keys)
from dtl_fast.reference.cosine_attention import cosine_attention as _reference

_FWD = "dtl_fast::cosine_attention_fwd"
_BWD = "dtl_fast::cosine_attention_bwd"

# The CPU path of backend="auto": "composite" or "reference". Measured on a shared 2-core
# CPU, torch 2.14.1, float32, median of 20 (ms, forward / forward+backward), reference vs
# composite: B64 H4 N16 d32 1.37/4.74 vs 0.83/4.29; B64 H8 N64 d64 61.5/80.8 vs 11.6/332
# (noisy); B64 H8 N32 d64 padded 48.5/254 vs 33.9/134; B64 H4 N64 d32 padded M8 7.7/20.1 vs
# 4.9/15.4; B64 H8 N64 d64 padded M8 65.2/535 vs 148/472. The composite wins most.
CPU_AUTO_PATH = "composite"


def _kernels():
    # Imported lazily, at the first fused call: the kernels' module builds its launch tables
    # then. (TRITON_INTERPRET must be set before Triton is imported, which importing dtl_fast
    # does; dtl_fast._triton refuses a later one by name.)
    from dtl_fast.kernels import cosine_attention as kernels
    return kernels


# Which kernels the fused path runs. The second version (kernels/cosine_attention_fwd.py, _bwd.py:
# normalise-once pre-pass, fixed maximum, block-aware masking, short-sequence kernel) can run the
# half types and float64 (V2_CANDIDATE_DTYPES); the first (kernels/cosine_attention.py) runs
# everything, float32 always (its second-version tiles spill registers in the sm_80 / sm_90
# compile). A forward and its backward always come from the same version: the second rounds the
# normalised rows to the input dtype, and its backward recomputes the logits the forward's lse
# was taken over.
#
# By default (attn_version) the second version runs where a GPU timed it: the H100 sweep
# (NVIDIA H100 80GB HBM3, run gpucheck-20261127T173701-4905,
# bench/results/gpu_check_nvidia-h100_3-attn-sweep.log; bf16, B 4, H 16, d 64 at N 2048 / 8192
# plain, padded and with a window of 256, d 128 at N 4096) measured its forward 1.7-3.5x and its
# backward 1.3-3.5x the first version's at every row. So: bfloat16 / float16 (the same code but
# for the element type) on an NVIDIA device of compute capability 9.x (_sm90: not ROCm, whose
# MI200 / MI300 / MI350 also report 9.x) with max(Nq, Nk) >= V2_MIN_N,
# the shortest N those rows timed; the first version elsewhere: DTL's own calls (N <= 64, where
# the second's short kernel was not timed), other cards, float32, float64.
#
# $DTL_FAST_ATTN_IMPL (read at import): unset or "" the rule above, "v1" the first version
# everywhere, "v2" the second everywhere it can run (V2_CANDIDATE_DTYPES at every size and card).
# V2_DTYPES: the dtypes forced onto the second version at every size (the tests set it too).
V2_CANDIDATE_DTYPES = (torch.float16, torch.bfloat16, torch.float64)
V2_DEFAULT_DTYPES = (torch.float16, torch.bfloat16)
V2_MIN_N = 2048
ATTN_IMPL_ENV = "DTL_FAST_ATTN_IMPL"


def _attn_impl_env() -> str:
    """$DTL_FAST_ATTN_IMPL as "auto" (unset or ""), "v1" or "v2"; anything else is an error."""
    impl = os.environ.get(ATTN_IMPL_ENV, "")
    if impl not in ("", "v1", "v2"):
        raise ValueError(f"${ATTN_IMPL_ENV} must be 'v1' or 'v2' (or unset), got {impl!r}")
    return impl or "auto"


ATTN_IMPL = _attn_impl_env()
V2_DTYPES = V2_CANDIDATE_DTYPES if ATTN_IMPL == "v2" else ()


def _lse_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _bwd2_supports_per_head() -> bool:
    from dtl_fast.kernels import cosine_attention_bwd as bwd  # lazily, as _kernels
    return bool(getattr(bwd, "SUPPORTS_PER_HEAD", False))


def _capability(device) -> tuple[int, int] | None:
    """The compute capability of a CUDA device (None for any other device). Read through
    get_device_properties, which torch.compile folds to a constant (get_device_capability is
    not on dynamo's constant-fold list): the wrapper stays one graph under fullgraph=True."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    props = torch.cuda.get_device_properties(device)
    return (props.major, props.minor)


def _sm90(capability: tuple[int, int] | None) -> bool:
    """Whether `capability` is an NVIDIA sm_90 (Hopper: H100 / H200) device's, the only card the
    second version was timed on. ROCm builds report (9, x) too (MI210 gfx90a (9, 0), MI300 gfx942
    (9, 4), MI350 (9, 5)): never sm_90 here (torch.version.hip), nothing was compiled or timed
    for them."""
    return capability is not None and capability[0] == 9 and torch.version.hip is None


def attn_version(dtype: torch.dtype, nq: int, nk: int, capability: tuple[int, int] | None,
                 per_head: bool = False) -> str:
    """Which kernels a fused call runs, "v1" or "v2", for q's dtype, nq queries, nk keys (memory
    slots not counted) and the compute capability of q's CUDA device (None: not CUDA). per_head:
    the call has per-head key lengths or windows, which run the second version only once its
    backward supports them (SUPPORTS_PER_HEAD). The rule and its rows: the comment above (sm_90:
    _sm90, NVIDIA only). $DTL_FAST_ATTN_IMPL=v2 (V2_DTYPES) forces the second version on any
    card: that is the `fused` knob, which auto_path does not follow off sm_90."""
    if per_head and not _bwd2_supports_per_head():
        return "v1"
    if dtype in V2_DTYPES:
        return "v2"
    if ATTN_IMPL == "v1":
        return "v1"
    if dtype in V2_DEFAULT_DTYPES and _sm90(capability) and max(nq, nk) >= V2_MIN_N:
        return "v2"
    return "v1"


def _use_v2(q: torch.Tensor, k: torch.Tensor, key_lengths: torch.Tensor | None,
            window_heads: torch.Tensor | None) -> bool:
    """Whether this call runs the second-version kernels (attn_version). The answer depends on
    the arguments alone (dtype, sizes, device), so the forward and the backward op of one call
    agree."""
    per_head = window_heads is not None or (key_lengths is not None and key_lengths.dim() == 2)
    return attn_version(q.dtype, q.shape[2], k.shape[2], _capability(q.device), per_head) == "v2"


def _launch_window(window: int, window_heads: torch.Tensor | None):
    # The launchers' window: an int (-1: none) or the int32 [H] per-head tensor.
    return window_heads if window == -2 else window


def _check_window_args(window: int, window_heads: torch.Tensor | None) -> None:
    if (window == -2) != (window_heads is not None):
        raise ValueError("dtl_fast::cosine_attention_fwd / _bwd: window == -2 (per head) goes "
                         f"with window_heads (int32 [H]) and only with it, got window={window} and "
                         f"window_heads "
                         f"{'None' if window_heads is None else 'given'}")


def _fwd_impl(q, k, v, scale, key_lengths, window, memory_k, memory_v, window_heads=None):
    # The body of the forward op: the registered op and its eager entry point (_fwd_call) both
    # run it.
    _check_window_args(window, window_heads)
    win = _launch_window(window, window_heads)
    if not _use_v2(q, k, key_lengths, window_heads):
        return _kernels().cosine_attention_forward(q, k, v, scale, key_lengths, win, memory_k,
                                                   memory_v)
    from dtl_fast.kernels import cosine_attention_fwd as fwd  # lazily, as _kernels
    return fwd.cosine_attention_forward2(q, k, v, scale, key_lengths, win, memory_k, memory_v)


def _bwd_impl(grad_out, q, k, v, scale, key_lengths, window, memory_k, memory_v, out, lse,
              window_heads=None):
    # The body of the backward op (see _fwd_impl).
    _check_window_args(window, window_heads)
    win = _launch_window(window, window_heads)
    if not _use_v2(q, k, key_lengths, window_heads):
        return _kernels().cosine_attention_backward(grad_out, q, k, v, scale, key_lengths, win,
                                                    memory_k, memory_v, out, lse)
    from dtl_fast.kernels import cosine_attention_bwd as bwd  # lazily, as _kernels
    return bwd.cosine_attention_backward2(grad_out, q, k, v, scale, key_lengths, win,
                                          memory_k, memory_v, out, lse)


@torch.library.custom_op(_FWD, mutates_args=())
def _cosine_attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: torch.Tensor,
                          key_lengths: torch.Tensor | None, window: int,
                          memory_k: torch.Tensor | None, memory_v: torch.Tensor | None,
                          window_heads: torch.Tensor | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """out [B, H, Nq, dv] in q's dtype, lse [B, H, Nq] (float32; float64 for float64 inputs):
    the log-sum-exp of each query's scores, +inf for a query with nothing to attend to.
    scale [H] float32 (float64); key_lengths None or int32 [B] or [B, H] (per head, contiguous)
    on q's device; window -1: none, >= 0: one window for all heads, -2: per head, from
    window_heads (int32 [H] on q's device, -1: none for that head; None unless window is -2)."""
    return _fwd_impl(q, k, v, scale, key_lengths, window, memory_k, memory_v, window_heads)


@_cosine_attention_fwd.register_fake
def _cosine_attention_fwd_fake(q, k, v, scale, key_lengths, window, memory_k, memory_v,
                               window_heads=None):
    torch._check(q.dim() == 4 and k.dim() == 4 and v.dim() == 4,
                 lambda: "cosine_attention_fwd: q, k, v must be 4-D")
    B, H, Nq, _ = q.shape
    if key_lengths is not None:
        torch._check(key_lengths.dim() in (1, 2), lambda: "cosine_attention_fwd: key_lengths "
                     "must be [B] or [B, H]")
    if window_heads is not None:
        torch._check(window_heads.dim() == 1, lambda: "cosine_attention_fwd: window_heads must "
                     "be [H]")
    out = q.new_empty((B, H, Nq, v.shape[3]))
    lse = q.new_empty((B, H, Nq), dtype=_lse_dtype(q.dtype))
    return out, lse


@torch.library.custom_op(_BWD, mutates_args=())
def _cosine_attention_bwd(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          scale: torch.Tensor, key_lengths: torch.Tensor | None, window: int,
                          memory_k: torch.Tensor | None, memory_v: torch.Tensor | None,
                          out: torch.Tensor, lse: torch.Tensor,
                          window_heads: torch.Tensor | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                     torch.Tensor, torch.Tensor]:
    """(dq, dk, dv, dscale, dmemory_k, dmemory_v); dmemory_* are empty [0] without memory.
    Arguments as the forward's (window_heads last), plus grad_out and the forward's out, lse."""
    return _bwd_impl(grad_out, q, k, v, scale, key_lengths, window, memory_k, memory_v, out, lse,
                     window_heads)


@_cosine_attention_bwd.register_fake
def _cosine_attention_bwd_fake(grad_out, q, k, v, scale, key_lengths, window, memory_k, memory_v,
                               out, lse, window_heads=None):
    torch._check(grad_out.shape == out.shape, lambda: "cosine_attention_bwd: grad_out must match out")
    return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), torch.empty_like(scale),
            torch.empty_like(memory_k) if memory_k is not None else q.new_empty((0,)),
            torch.empty_like(memory_v) if memory_v is not None else q.new_empty((0,)))


def _setup_context(ctx, inputs, output):
    q, k, v, scale, key_lengths, window, memory_k, memory_v, window_heads = inputs
    out, lse = output
    ctx.window = window
    ctx.has_memory = memory_k is not None
    ctx.has_lengths = key_lengths is not None
    ctx.has_window_heads = window_heads is not None
    saved = [q, k, v, scale, out, lse]
    if ctx.has_lengths:
        saved.append(key_lengths)
    if ctx.has_window_heads:
        saved.append(window_heads)
    if ctx.has_memory:
        saved += [memory_k, memory_v]
    ctx.save_for_backward(*saved)


def _backward(ctx, grad_out, _grad_lse, *, saved=None):
    # saved: ctx.saved_tensors, unpacked by no_double_backward under create_graph=True
    saved = list(ctx.saved_tensors if saved is None else saved)
    q, k, v, scale, out, lse = saved[:6]
    rest = saved[6:]
    key_lengths = rest.pop(0) if ctx.has_lengths else None
    window_heads = rest.pop(0) if ctx.has_window_heads else None
    memory_k, memory_v = (rest[0], rest[1]) if ctx.has_memory else (None, None)
    if grad_out is None or not any(ctx.needs_input_grad):  # None: only lse had a gradient path
        return None, None, None, None, None, None, None, None, None
    dq, dk, dv, dscale, dmk, dmv = _bwd_call(
        grad_out.contiguous() if grad_out.stride(-1) != 1 else grad_out,
        q, k, v, scale, key_lengths, ctx.window, memory_k, memory_v, out, lse, window_heads)
    if not ctx.has_memory:
        dmk = dmv = None
    return dq, dk, dv, dscale, None, None, dmk, dmv, None


# no_double_backward: a gradient penalty through the registered op (torch.compile, dispatch
# modes) raises naming backend='reference', as the eager path does
torch.library.register_autograd(_FWD, no_double_backward(_backward, "dtl_fast::cosine_attention_fwd"),
                                setup_context=_setup_context)


# The eager entry points (dtl_fast.ops._eager): the same bodies and autograd formula without the
# dispatcher, wherever that is safe; the registered ops everywhere else (torch.compile, export,
# dispatch modes, subclasses).
_bwd_call = eager_op(torch.ops.dtl_fast.cosine_attention_bwd, _bwd_impl, grad_args=1)
_fwd_call = eager_op(torch.ops.dtl_fast.cosine_attention_fwd, _fwd_impl, _setup_context, _backward,
                     name="FusedCosineAttention")


@functools.lru_cache(maxsize=256)
def _cached_window_heads(entries: tuple, device: torch.device) -> torch.Tensor:
    # A per-head window given as Python ints: made on the device once per (entries, device), so
    # that later calls (a CUDA graph capture too) copy nothing from the host; outside inference
    # mode, since a later training call saves it for backward.
    with torch.inference_mode(False):
        return window_tensor(entries, device, torch.int32)


def _fused_window_args(window, device: torch.device, nq: int, nk: int
                       ) -> tuple[int, torch.Tensor | None]:
    """(window, window_heads) for the custom op from check_inputs' window: (-1, None) none,
    (w, None) one window, (-2, int32 [H] on `device`) per head.

    A window >= max(nq, nk) covers every key of every query (|i - j| < max(nq, nk)): it is
    passed as none (-1, the kernels' unmasked specialisation; for a per-head sequence that
    head's entry is None), and a per-head tensor is clamped to nq + nk. Either way no window
    near 2^31 reaches the kernels, which add block offsets to it in int32."""
    if window is None:
        return -1, None
    wide = max(nq, nk)
    if isinstance(window, int):
        return (-1 if window >= wide else window), None
    if isinstance(window, tuple):
        if any(w is not None and w >= wide for w in window):
            window = tuple(None if w is None or w >= wide else w for w in window)
            if all(w == window[0] for w in window[1:]):  # the one-window form, as check_inputs
                return _fused_window_args(window[0], device, nq, nk)
        if torch.compiler.is_compiling():  # a constant of the graph (no cache inside a trace)
            return -2, window_tensor(window, device, torch.int32)
        return -2, _cached_window_heads(window, torch.device(device))
    # an integer tensor [H], values checked (>= -1, < 2^63); int32 without overflow
    return -2, window.to(device=device, dtype=torch.int64, non_blocking=True).clamp(
        max=min(nq + nk, MAX_WINDOW)).to(torch.int32)


def _last_dim_contiguous(t: torch.Tensor | None) -> torch.Tensor | None:
    if t is None or t.stride(-1) == 1 or t.shape[-1] <= 1:
        return t
    return t.contiguous()


def _autocast_inputs(q, k, v, memory_k, memory_v):
    """Under torch.autocast, all of q, k, v and the memory go to the autocast dtype (like
    scaled_dot_product_attention, which autocast runs in lower precision)."""
    if not isinstance(q, torch.Tensor):
        return q, k, v, memory_k, memory_v
    device_type = q.device.type
    if not autocast_enabled(device_type):
        return q, k, v, memory_k, memory_v
    dtype = torch.get_autocast_dtype(device_type)

    def cast(t):
        if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64:
            return t.to(dtype)
        return t

    return cast(q), cast(k), cast(v), cast(memory_k), cast(memory_v)


@torch.compiler.assume_constant_result
def _cpu_sdpa_needs_math(dtype: torch.dtype) -> bool:
    """Whether F.scaled_dot_product_attention on CPU tensors of `dtype` must avoid ATen's
    reduced-precision flash kernel. ATen's CPU flash-attention kernel packs bfloat16 (float16)
    blocks for AMX wherever the CPU has AMX-BF16 (AMX-FP16), but the packing routine exists only
    in the kernel's AVX-512 build: under ATEN_CPU_CAPABILITY=default or avx2 on such a CPU it
    raises "pack_vnni2 is only supported when avx512 is supported" (an Intel Xeon with AMX,
    torch 2.14.1, bfloat16, from 64 keys on; bench/NOTES.md s33). Read once per dtype: the
    capability is fixed at start-up."""
    return _cpu_sdpa_needs_math_cached(dtype)


@functools.lru_cache(maxsize=None)
def _cpu_sdpa_needs_math_cached(dtype: torch.dtype) -> bool:
    if dtype not in (torch.bfloat16, torch.float16):
        return False
    if str(torch.backends.cpu.get_cpu_capability()).upper().startswith("AVX512"):
        return False
    probe = (getattr(torch.cpu, "_is_amx_fp16_supported", None) if dtype == torch.float16
             else getattr(torch.cpu, "_is_amx_tile_supported", None))
    try:
        return bool(probe()) if probe is not None else False
    except Exception:  # noqa: BLE001 (a build without the query: assume the flash path works)
        return False


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
          mask: torch.Tensor | None) -> torch.Tensor:
    """F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1), in the dtype it would
    compute in (q's, or CPU autocast's where that is on: the composite is public and may run
    under it). Where ATen's CPU flash kernel cannot run that dtype (_cpu_sdpa_needs_math), the
    same call on float32 copies with autocast off, rounded once to that dtype: the float32
    kernel packs nothing. (The private aten._scaled_dot_product_attention_math would read a
    boolean mask as an additive one: the public call converts it first.) The choice is made
    when a program is traced: one compiled or exported on another machine keeps that
    machine's."""
    if q.device.type == "cpu":
        autocast = autocast_enabled("cpu")
        # autocast leaves float64 alone
        dtype = (torch.get_autocast_dtype("cpu") if autocast and q.dtype != torch.float64
                 else q.dtype)
        if _cpu_sdpa_needs_math(dtype):
            with torch.autocast("cpu", enabled=False):
                out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(),
                                                     attn_mask=mask, scale=1.0)
            return out.to(dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0)


def cosine_attention_composite(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                               logit_scale: torch.Tensor, key_lengths=None, window: int | None = None,
                               memory_k: torch.Tensor | None = None, memory_v: torch.Tensor | None = None
                               ) -> torch.Tensor:
    """The same function as cosine_attention, written the way a user would without the fused
    kernel: F.normalize on q and k, the per-head scale folded into q, and
    torch.nn.functional.scaled_dot_product_attention (scale=1) with a boolean attn_mask for the
    key lengths / window; memory slots are normalised and concatenated in front of each batch's
    keys; padded keys' k and v rows are zeroed first (as in the reference: SDPA applies its
    mask after q k^T, so a NaN there would reach every query). Computes in the inputs' dtype
    (SDPA accumulates half types in float32, but the normalised, scaled q it gets is rounded to
    the input dtype: about twice the reference's error in float16 / bfloat16).

    Shapes, dtypes and errors as cosine_attention. Returns [B, H, Nq, dv] in q's dtype; a query
    with nothing to attend to gives zeros and zero gradient.
    """
    key_lengths, window = check_inputs(q, k, v, logit_scale, key_lengths, window, memory_k, memory_v)
    B, H, Nq, _ = q.shape
    Nk = k.shape[2]
    check_values(key_lengths, window, Nk)
    # NORM_EPS rounds to 0 in float16, where a zero row (zeroed padding too) would normalise
    # to 0 / 0 = NaN; 2^-24, float16's smallest subnormal, is no larger than any nonzero row's
    # norm, so the clamp still acts on zero rows only, as NORM_EPS does in the reference.
    eps = 2.0**-24 if q.dtype == torch.float16 else NORM_EPS
    kv_valid = key_valid(key_lengths, Nk, q.device)
    qn = F.normalize(q, dim=-1, eps=eps) * head_scale(logit_scale, q.dtype)[None, :, None, None]
    kn = F.normalize(zero_padded_keys(k, kv_valid), dim=-1, eps=eps)
    vv = zero_padded_keys(v, kv_valid)
    mask = key_mask(key_lengths, window, B, Nq, Nk, q.device, kv_valid)
    if memory_k is not None:
        M = memory_k.shape[1]
        mkn = F.normalize(memory_k, dim=-1, eps=eps)[None].expand(B, -1, -1, -1)
        kn = torch.cat([mkn, kn], dim=2)
        vv = torch.cat([memory_v[None].expand(B, -1, -1, -1), vv], dim=2)
        if mask is not None:
            mask = torch.cat([mask.new_ones(mask.shape[:3] + (M,)), mask], dim=-1)
        Nk = Nk + M
    empty_rows = None
    if mask is not None:
        # SDPA gives NaN (or NaN gradients) for a row with every key masked: such rows attend to
        # everything instead and are zeroed afterwards (where: zero gradient into them).
        empty_rows = ~mask.any(dim=-1, keepdim=True)  # [B, 1 or H, Nq, 1]
        mask = mask | empty_rows
    if Nk == 0:
        return ((qn @ kn.transpose(-1, -2)) @ vv).to(q.dtype)  # zeros, on the autograd graph
    out = _sdpa(qn, kn, vv, mask)
    if empty_rows is not None:
        out = torch.where(empty_rows, torch.zeros((), dtype=out.dtype, device=out.device), out)
    return out.to(q.dtype)


# ---------------------------------------------------------------------------------------------
# backend="auto" on CUDA: the fused kernels only where a GPU row measured them faster than the
# composite (ratio = composite median / fused median, same run). Two runs:
#
# 1. The first version (kernels/cosine_attention.py): NVIDIA H200, torch 2.11.0+cu130, triton
#    3.6.0, run gpucheck-20261127T013134-437, bench/results/cosine_attention.csv (provider
#    dtl_fast = backend="fused"):
#
#   variant  shape (BxHxNxd)  dtype     forward (no grad)  forward+backward
#   pad      64x4x16x32       bfloat16  1.38               1.11
#   pad      4x16x1024x64     bfloat16  1.30               0.94
#   pad      4x16x4096x128    float16   1.34               0.61
#   plain    64x8x32x64       float32   0.64               0.79
#   plain    64x8x64x64       bfloat16  0.61               0.79
#   plain    4x16x2048x64     bfloat16  0.58, 0.67         0.49, 0.58
#   plain    4x16x8192x64     bfloat16  0.36               0.22
#
# 2. The second version (kernels/cosine_attention_fwd.py, _bwd.py) at its defaults (TMA and tiles:
#    kernels/cosine_attention_fwd.fwd2_index / use_tma, _bwd.bwd2_index): NVIDIA H100 80GB HBM3,
#    torch 2.11.0+cu130, triton 3.6.0, run gpucheck-20261127T173701-4905,
#    bench/results/gpu_check_nvidia-h100_3-attn-sweep.log (bench/sweep_cosine_attention.py,
#    bfloat16; forward+backward = the fused forward's median + the fused backward's median
#    against the composite's autograd forward+backward):
#
#   variant  shape (BxHxNxd)  forward (no grad)         forward+backward
#   plain    4x16x2048x64     1.71 (0.180 vs 0.306 ms)  1.32 (0.180 + 0.806 vs 1.300 ms)
#   plain    4x16x8192x64     1.29 (2.162 vs 2.787)     0.82 (2.162 + 11.166 vs 10.987)
#   pad      4x16x8192x64     4.73 (1.512 vs 7.148)     2.14 (1.512 + 7.634 vs 19.528)
#   win256   4x16x8192x64     23.1 (0.341 vs 7.886)     12.9 (0.341 + 1.193 vs 19.818)
#   plain    4x16x4096x128    1.19 (1.042 vs 1.243)     0.53 (1.042 + 9.491 vs 5.555)
#
# The rule (bf16 / fp16; float32 and float64 take the composite: the one float32 row lost,
# float64 was not measured):
# - key_lengths or a window ("masked"), no grad: fused at every N. With a mask SDPA gets a
#   dense boolean attn_mask (no flash kernel); the kernels visit only the visible key blocks.
#   Every masked forward row of both runs wins (1.30-1.38 first version, 4.7-23 second). A
#   window counts as masked (the composite takes the same dense-mask path as for key lengths).
# - masked, with grad: fused at max(Nq, Nk) <= AUTO_FUSED_GRAD_MAX_N (run 1: 1.11 at N 16; 0.94 at
#   1k, 0.61 at 4k); and where the second version runs on sm_90 (attn_version) at d = dv = 64
#   from min(Nq, Nk) AUTO_V2_MIN_N[masked, grad][64] = 2048 (run 2: 2.14 padded, 12.9
#   windowed at N 8192; the lower bound is the shortest N of run 2: there even the unmasked
#   call wins, 1.32, and a mask only slows the composite and spares the kernels work, as the
#   N 8192 rows show).
# - no mask, no grad: fused where the second version runs on sm_90 at d = dv = 64 from
#   min(Nq, Nk) 2048 (1.71, 1.29) and d = dv = 128 from 4096 (1.19): the shortest N timed at
#   each head dim. No upper bound: at the longest N timed both sides already run at
#   compute-bound rates (508 vs 395 TFLOP/s at d 64, 528 vs 442 at d 128), so longer sequences
#   keep the inner loops' ratio.
#   The first version lost every unmasked row (0.36-0.67), so nothing below those N.
# - no mask, with grad: the composite. The second version loses at d 64 N 8192 (0.82) and
#   d 128 N 4096 (0.53) on its backward (SDPA's flash backward); it wins at d 64 N 2048 (1.32),
#   but the crossover between 2048 and 8192 is untimed, and one N is no range: composite, as
#   before (a row at N 4096 would place it).
#
# Where each class applies (what was measured, and how far it is carried):
# - Run 2's classes (AUTO_V2_MIN_N) only in the class its rows timed: an NVIDIA sm_90 card
#   (_sm90, checked here whatever $DTL_FAST_ATTN_IMPL / V2_DTYPES force for `fused`), the second
#   version running (attn_version, so not under $DTL_FAST_ATTN_IMPL=v1), d = dv, no memory slots
#   (m == 0: with slots the kernels fall back to untimed tiles, pointer loads at d 64 measured
#   0.97x the composite at plain N 8192), and min(Nq, Nk) from the bound: every row is square
#   (Nq = Nk), so a few queries against many keys (decode-like, cross-attention) is untimed and
#   takes the composite. This is a subset of what kernels/cosine_attention_fwd.sm90_measured
#   calls the H100 rows' class (tests/test_attention_dispatch.py checks it).
# - Run 1's classes ("masked, no grad, any N"; "masked with grad, N <= 16") were measured on one
#   sm_90 card (AUTO_RULE_CAPABILITY) and are applied on every NVIDIA card: an extrapolation
#   (the reason they win, SDPA's dense-mask path against kernels that skip masked blocks, holds
#   on any card; no other card was timed). auto_rule() says so.
# - Every fused pick needs Triton to run on the device (can_run_triton) and an NVIDIA build
#   (torch.version.hip None: nothing was compiled or timed for ROCm); else the composite.
AUTO_RULE_CARD = "NVIDIA H200"
AUTO_RULE_CAPABILITY = (9, 0)  # run 1's card; its classes are applied on every NVIDIA card
AUTO_RULE_RUN = "gpucheck-20261127T013134-437"
AUTO_V2_RULE_CARD = "NVIDIA H100 80GB HBM3"
AUTO_V2_RULE_CAPABILITY = (9, 0)  # run 2's card; its classes only there (_sm90: major 9, NVIDIA)
AUTO_V2_RULE_RUN = "gpucheck-20261127T173701-4905"
AUTO_V2_RULE_LOG = "bench/results/gpu_check_nvidia-h100_3-attn-sweep.log"
AUTO_FUSED_DTYPES = (torch.bfloat16, torch.float16)
AUTO_FUSED_GRAD_MAX_N = 16  # masked forward+backward: fused up to this max(Nq, Nk) (run 1)
# Run 2: (masked, needs_grad) -> {head dim (d = dv): the smallest min(Nq, Nk) fused from}, on
# sm_90 where the second version runs, without memory slots (see above).
AUTO_V2_MIN_N = {(True, True): {64: 2048}, (False, False): {64: 2048, 128: 4096}}


def _auto_can_fuse(device_type: str) -> bool:
    """Whether auto may pick the Triton kernels on a `device_type` device at all: Triton runs
    there (can_run_triton) and the build is NVIDIA's (no measurement on ROCm)."""
    return torch.version.hip is None and can_run_triton(device_type)


def auto_path(device_type: str, dtype: torch.dtype, masked: bool, needs_grad: bool,
              nq: int, nk: int, d: int | None = None, dv: int | None = None,
              capability: tuple[int, int] | None = None, m: int = 0) -> str:
    """What backend="auto" runs on a `device_type` tensor: "fused" (the Triton kernels),
    "composite" (normalise + SDPA) or "reference" (CPU only, CPU_AUTO_PATH).

    masked: key_lengths or a window was given; needs_grad: autograd will record the call
    (grad mode on and an input requires grad); nq, nk: query and key counts (memory slots not
    counted); d, dv: the q / k and v head dims (None: unknown, only the first run's rule
    applies); capability: the CUDA device's compute capability (None: the current device's);
    m: the number of memory slots (0: none). The CUDA rule is the table above
    (AUTO_RULE_CARD's and AUTO_V2_RULE_CARD's rows); the composite wherever Triton cannot run
    and on ROCm."""
    if device_type != "cuda":
        return CPU_AUTO_PATH
    if dtype not in AUTO_FUSED_DTYPES or not _auto_can_fuse(device_type):
        return "composite"
    if masked and (not needs_grad or max(nq, nk) <= AUTO_FUSED_GRAD_MAX_N):
        return "fused"  # run 1, every NVIDIA card (an extrapolation from AUTO_RULE_CAPABILITY)
    # run 2: only its measured class (the comment above)
    min_n = AUTO_V2_MIN_N.get((masked, needs_grad), {})
    if (m != 0 or d is None or d != dv or int(d) not in min_n
            or min(nq, nk) < min_n[int(d)]):
        return "composite"
    if capability is None and torch.cuda.is_available():
        capability = _capability(torch.device("cuda", torch.cuda.current_device()))
    if not _sm90(capability):  # whatever $DTL_FAST_ATTN_IMPL / V2_DTYPES force for `fused`
        return "composite"
    return "fused" if attn_version(dtype, nq, nk, capability) == "v2" else "composite"


def auto_rule() -> str:
    """backend="auto" in three lines, for `dtl-fast info` (the second run's classes from
    AUTO_V2_MIN_N; left out under $DTL_FAST_ATTN_IMPL=v1, where they do not apply)."""
    def classes(masked, grad):
        return ", ".join(f"d={d} min(Nq,Nk)>={n}"
                         for d, n in sorted(AUTO_V2_MIN_N[(masked, grad)].items()))

    def sm(cap):
        return f"sm_{cap[0]}{cap[1]}"

    v2 = "" if ATTN_IMPL == "v1" else (
        f"\n  on NVIDIA sm_90 only, also (second version, {AUTO_V2_RULE_CARD} "
        f"{sm(AUTO_V2_RULE_CAPABILITY)}, run {AUTO_V2_RULE_RUN}), without memory slots: "
        f"masked with grad at {classes(True, True)}; unmasked without grad at "
        f"{classes(False, False)}")
    return (f"NVIDIA CUDA with Triton, bf16/fp16: fused Triton kernels with key_lengths or a "
            f"window without grad, with grad at N <= {AUTO_FUSED_GRAD_MAX_N} (first version, "
            f"measured on {AUTO_RULE_CARD} {sm(AUTO_RULE_CAPABILITY)} only, run {AUTO_RULE_RUN}; "
            f"applied on every NVIDIA card, unmeasured elsewhere){v2}; normalise + SDPA "
            f"composite otherwise (float32 / float64, ROCm, no Triton: always).\n"
            f"CPU: the {CPU_AUTO_PATH}.")


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(
        isinstance(t, torch.Tensor) and t.requires_grad for t in tensors)


def _path(q, k, v, logit_scale, key_lengths, window, memory_k, memory_v, backend: str) -> str:
    if backend == "reference":
        return "reference"
    # torch.func transforms and forward-mode AD (one scan per call: ~10 us a tensor inside an
    # open dual level, so q first)
    used = () if torch.compiler.is_compiling() else transforms_in_use(
        (q, k, v, logit_scale, memory_k, memory_v))
    if backend == "fused":
        require_triton(q.device, "cosine_attention(backend='fused')")
        refuse_transforms("cosine_attention(backend='fused')", used)
        return "fused"
    path = auto_path(q.device.type, q.dtype, key_lengths is not None or window is not None,
                     _needs_grad(q, k, v, logit_scale, memory_k, memory_v), q.shape[2], k.shape[2],
                     q.shape[3], v.shape[3], _capability(q.device),
                     0 if memory_k is None else memory_k.shape[1])
    if "forward_ad" in used or "jvp" in used or used.count("grad") > 1:
        # plain torch ops: SDPA has no forward-mode formula on every device, and its backward
        # no derivative (grad of grad)
        return "reference"
    if path == "fused" and needs_stock_path(used):
        return "composite"  # the registered ops' autograd is opaque to torch.func.grad
    return path


def cosine_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, logit_scale: torch.Tensor,
                     key_lengths=None, window: int | None = None,
                     memory_k: torch.Tensor | None = None, memory_v: torch.Tensor | None = None,
                     *, backend: str | None = None) -> torch.Tensor:
    """Scaled cosine attention (Swin Transformer V2) with key lengths, a local window and
    memory slots shared by the batch:

        out_i = sum_j softmax_j(exp(min(logit_scale_h, ln 100)) * cos(q_i, k_j)) v_j

    with cos through F.normalize(x, dim=-1, eps=1e-12) of q and k.

    Args:
        q: [B, H, Nq, d] float32 / float16 / bfloat16 (float64 too), any strides.
        k: [B, H, Nk, d], v: [B, H, Nk, dv] in q's dtype, on q's device; 1 <= d, dv <= 128.
        logit_scale: [H], any float dtype (learnable); the scale is clamped at 100.
        key_lengths: None, a list of B ints or an integer tensor [B] on the CPU or on q's
            device, in [0, Nk]: keys j >= key_lengths[b] get no weight (and are not read: NaN
            or inf there changes nothing, and their k and v rows get zero gradient, in every
            backend). Per head: an integer tensor (or nested list) [B, H]: keys
            j >= key_lengths[b, h] get no weight in head h.
        window: None or an int w >= 0: query i attends only to keys j with |i - j| <= w
            (keys outside the window get no weight but may be read: they must be finite).
            Any w >= max(Nq, Nk) (2^31 - 1, sys.maxsize, ...) is the same as None.
            Per head: H entries, a sequence of ints >= 0 / None / -1 or an integer tensor [H]
            on the CPU or q's device (-1: no window), window[h] for head h. A sequence whose
            entries are all equal is the one-window form. A Python sequence costs no host
            sync (its device copy is cached); a tensor is range-checked with one sync (an
            asynchronous assert under torch.compile and CUDA graph capture), as key_lengths.
        memory_k, memory_v: None or [H, M, d] / [H, M, dv] (both or neither; M >= 0): slots
            that every query attends to besides its keys, with the same scaled cosine score;
            key_lengths and window do not apply to them.
        backend: "auto" | "fused" | "reference"; None reads $DTL_FAST_BACKEND (else "auto").
            "auto": on CUDA tensors the Triton kernels where they measured faster than the
            normalise + SDPA composite (auto_path, auto_rule: bf16 / fp16 with key_lengths or
            a window and no gradient needed, or N <= 16; on NVIDIA sm_90 also, without memory
            slots, d 64 masked with grad and unmasked without grad from min(Nq, Nk) 2048, d 128
            unmasked without grad from 4096), the composite elsewhere (and wherever Triton
            cannot run, and on ROCm); on CPU tensors the faster of the eager reference and the
            composite (CPU_AUTO_PATH).
            "fused": the Triton kernels (CPU tensors only under TRITON_INTERPRET=1): the
            second version on NVIDIA sm_90 for bf16 / fp16 at max(Nq, Nk) >= 2048, the first
            elsewhere (attn_version; $DTL_FAST_ATTN_IMPL=v1 / v2 forces either).

    Returns:
        [B, H, Nq, dv] in q's dtype. The fused kernels and the reference compute half inputs
        in float32 (float64 for float64); the composite (auto on CPU, and on CUDA where
        auto_path picks it) folds the scale into q in the input dtype before SDPA's float32
        accumulation, about twice their error in float16 / bfloat16. A query with nothing to
        attend to (no memory, no valid key in its window) gives zeros and zero gradient. Under
        torch.autocast, q, k, v and the memory are cast to the autocast dtype.

    The composite on the CPU (backend="auto" on CPU tensors, CPU_AUTO_PATH) inherits two
    limits of PyTorch's CPU flash scaled_dot_product_attention, which it calls:
        - no double backward: a gradient penalty (autograd.grad(..., create_graph=True), then a
          backward through that gradient) raises "derivative for
          aten::_scaled_dot_product_flash_attention_for_cpu_backward is not implemented"; use
          backend="reference" for it (under torch.func, grad of grad takes the reference by
          itself; plain autograd cannot be told apart at forward time);
        - a NaN logit_scale (a diverged parameter) gives zeros, not NaN, in that head's rows
          (the reference and the fused kernels give NaN).

    Raises:
        ValueError: wrong ranks / shapes / dtypes / devices (naming the argument), head dims
            outside [1, 128], key_lengths not [B] or [B, H] integers in [0, Nk], window < 0
            (per-head entries < -1), a per-head window without H entries.
        RuntimeError: backend="fused" where the Triton kernels cannot run.
        NotImplementedError: backend="fused" under torch.func.grad / vjp / jacrev / jvp /
            jacfwd or forward-mode AD, which cannot see through the kernels' autograd ("auto"
            takes the composite or, for forward mode, the reference there; vmap runs the
            kernels per sample, and so do torch.autograd.functional.jacobian(vectorize=True)
            and autograd.grad's is_grads_batched for the backward kernel; with
            create_graph=True too they raise the second-order RuntimeError).
    """
    backend = resolve_backend(backend)
    caller_lengths = key_lengths
    q, k, v, memory_k, memory_v = _autocast_inputs(q, k, v, memory_k, memory_v)
    key_lengths, window = check_inputs(q, k, v, logit_scale, key_lengths, window, memory_k, memory_v)
    path = _path(q, k, v, logit_scale, key_lengths, window, memory_k, memory_v, backend)
    if path != "fused":
        eager = _reference if path == "reference" else cosine_attention_composite
        if autocast_enabled(q.device.type):
            with torch.autocast(q.device.type, enabled=False):
                return eager(q, k, v, logit_scale, key_lengths, window, memory_k, memory_v)
        return eager(q, k, v, logit_scale, key_lengths, window, memory_k, memory_v)
    Nk = k.shape[2]
    check_values(key_lengths, window, Nk)
    if key_lengths is not None:
        # CPU lengths: one copy per value (a model passes the same lengths to several calls)
        key_lengths = to_device_cached(key_lengths, q.device, torch.int32)
        if key_lengths.dim() == 2:
            key_lengths = key_lengths.contiguous()  # the kernels read LENS[b * H + h]
        if key_lengths is caller_lengths:
            # int32 lengths on q's device pass through unchanged: the backward saves them, and
            # a write to the caller's tensor before backward would raise autograd's version
            # error (the eager paths save none). B (or B * H) integers: a negligible copy.
            key_lengths = key_lengths.clone()
    win, window_heads = _fused_window_args(window, q.device, q.shape[2], Nk)
    if autocast_enabled(q.device.type):
        with torch.autocast(q.device.type, enabled=False):
            scale = head_scale(logit_scale, _lse_dtype(q.dtype))
    else:  # (entering the context costs more host time than the scale itself)
        scale = head_scale(logit_scale, _lse_dtype(q.dtype))
    q, k, v, memory_k, memory_v = (_last_dim_contiguous(t) for t in (q, k, v, memory_k, memory_v))
    out, _ = _fwd_call(q, k, v, scale, key_lengths, win, memory_k, memory_v, window_heads)
    return out
