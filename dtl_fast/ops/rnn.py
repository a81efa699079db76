"""Multi-layer (bidirectional) LSTM and GRU: the registered recurrence ops
torch.ops.dtl_fast.{lstm,gru}_recurrence (Triton kernels, both directions in one launch), their
fake kernels and autograd, and the backend choice.

Per layer the fused path is
    gates_x = x @ cat(W_ih_fwd, W_ih_rev).T + biases        one GEMM over all steps and directions
    out, h_n, ... = {lstm,gru}_recurrence(gates_x, W_hh...)  one Triton launch, loop over T inside
and its backward
    dgates, dh0, ... = {lstm,gru}_recurrence_backward(...)  one Triton launch, reverse time loop
    dW_hh = dgates^T @ h_prev                                one batched GEMM over all steps
    dW_ih, db, dx                                           autograd of the projection GEMM
so every weight gradient is a GEMM (deterministic, no atomics).

The recurrence has three fused implementations ("impl"), all computing the same function with
the same saved tensors:
    "loop"        kernels/rnn.py: one program per direction and 16 batch rows, time loop inside
    "persistent"  kernels/rnn_persistent.py: D x P programs, each owning H/P hidden units of one
                  direction for all T steps, a grid-wide barrier per step (CUDA only)
    "step"        the persistent kernel's step code, one launch per step (any device; the
                  persistent path's fallback when its grid cannot be co-resident)
backend="fused" runs FUSED_DEFAULT_IMPL ($DTL_FAST_RNN_IMPL overrides it); backend="auto" asks
auto_path, a rule from measured GPU rows (AUTO_FUSED_REGIONS below).
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from dtl_fast._device import to_device_async
from dtl_fast._backend import outside_graph, resolve_backend
from dtl_fast._checks import autocast_enabled, device_capturing
from dtl_fast._triton import can_run_triton, require_triton
from dtl_fast.ops._eager import (eager_op, needs_stock_path, no_double_backward, refuse_transforms,
                                 transforms_in_use)
from dtl_fast.reference import rnn as _ref

_HALF = (torch.float16, torch.bfloat16)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _kernels():
    # Imported on first use (the import compiles nothing). TRITON_INTERPRET must be set before
    # Triton itself is first imported, which `import dtl_fast` (through torch.library) already
    # does: dtl_fast._triton refuses CPU tensors when it was set later.
    from dtl_fast.kernels import rnn as k
    return k


def _persistent():
    from dtl_fast.kernels import rnn_persistent as k
    return k


IMPLS = ("loop", "persistent", "step")
IMPL_ENV_VAR = "DTL_FAST_RNN_IMPL"
# What backend="fused" means: the best fused variant measured so far. Today's "loop" kernel stays
# the default until a GPU run (bench/gpu_rnn_persistent.sh) measures the persistent one faster:
# the persistent kernel has never run on a GPU (no device was lent while it was written).
FUSED_DEFAULT_IMPL = "loop"


def fused_impl() -> str:
    """The fused implementation backend="fused" runs: $DTL_FAST_RNN_IMPL if set, else
    FUSED_DEFAULT_IMPL. Raises ValueError naming the variable for anything not in IMPLS."""
    impl = os.environ.get(IMPL_ENV_VAR) or FUSED_DEFAULT_IMPL
    if impl not in IMPLS:
        raise ValueError(f"${IMPL_ENV_VAR} must be one of {', '.join(map(repr, IMPLS))}, got {impl!r}")
    return impl


def _check_impl(impl: str) -> None:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {', '.join(map(repr, IMPLS))}, got {impl!r}")


# ----------------------------------------------------------------------------------------------
# backend="auto": which path runs, from measured GPU rows
# ----------------------------------------------------------------------------------------------

# Where the rule comes from: one benchmark run; its rows are in bench/results/rnn.csv.
AUTO_RULE_SOURCE = {"card": "NVIDIA H200", "run_id": "gpucheck-20261127T013134-437",
                    "csv": "bench/results/rnn.csv", "torch": "2.11.0+cu130", "triton": "3.6.0"}
# The regions where a fused implementation measured faster than cuDNN (torch.nn) in BOTH forward
# and forward+backward in that run (auto cannot know at the forward whether a backward follows).
# Everywhere else on CUDA, auto runs PyTorch's cuDNN path. In that run the "loop" kernel was
# 0.02-0.51x cuDNN in 12 of the 14 timed shapes (the recurrence is latency-bound on 2-16 SMs:
# bench/NOTES.md); it won both modes only at T=16, B=64, H=256 (bi bf16): LSTM 1.35x forward /
# 1.16x forward+backward (GRU 0.95x / 1.34x: no entry). A single point does not define a region,
# so an entry is exactly what was measured, and every condition of the benchmark's call is part
# of it:
#   cell, dtypes, D (directions), B, H, T ((lo, hi) spans, inclusive);
#   lengths       False: only calls without lengths (cuDNN packs with lengths: unmeasured);
#   num_layers    (lo, hi) span;  I: the input size, "H" (equal to the hidden size) or a span;
#   hx            False: only hx=None (zero initial state);
#   batch_first   the layout measured (False: [T, B, I], cuDNN's own);
#   bias          the bias measured (True: the biases present);
#   dropout       False: only calls that apply no dropout (dropout == 0 or not training);
#   cards         the device names (torch.cuda.get_device_properties(...).name) it was measured
#                 on: a different card (A100, another Hopper variant, a MIG slice) runs cuDNN.
# Every fused pick also needs Triton to run on the device (can_run_triton) and not ROCm
# (torch.version.hip: no row was measured there); else cuDNN. The persistent kernel has no
# entry: it is unmeasured, and auto does not pick it until a GPU row says it wins
# (bench/gpu_rnn_persistent.sh prints the rows that would go here).
AUTO_FUSED_REGIONS: tuple[dict, ...] = (
    dict(cell="LSTM", dtypes=(torch.bfloat16,), D=(2,), B=(64, 64), H=(256, 256), T=(16, 16),
         lengths=False, num_layers=(1, 1), I="H", hx=False, dropout=False, batch_first=False,
         bias=True, cards=("NVIDIA H200",), impl="loop", measured="1.353x fwd, 1.157x fwd+bwd"),
)


def auto_rule() -> str:
    """One or two lines saying what backend="auto" runs for lstm / gru (for `dtl-fast info`)."""
    wins = "; ".join(
        f"{r['cell']} D={'/'.join(map(str, r['D']))} {'/'.join(str(d).replace('torch.', '') for d in r['dtypes'])} "
        f"B{_span(r['B'])} H{_span(r['H'])} T{_span(r['T'])}{'' if r['lengths'] else ', no lengths'}"
        f", {_span(r['num_layers'])} layer(s), input size {'= H' if r['I'] == 'H' else _span(r['I'])}"
        f"{'' if r['hx'] else ', hx None'}{'' if r['dropout'] else ', no dropout'}"
        f"{', batch_first' if r['batch_first'] else ', [T, B, I]'}{'' if r['bias'] else ', no bias'}, on "
        f"{' / '.join(r['cards'])} -> fused {r['impl']} ({r['measured']})" for r in AUTO_FUSED_REGIONS)
    src = AUTO_RULE_SOURCE
    return (f"CUDA: PyTorch's cuDNN path (torch.lstm / torch.gru) except {wins or 'nowhere'} "
            f"(where Triton runs, not ROCm); measured on {src['card']}, run {src['run_id']} "
            f"({src['csv']}); the persistent kernel is unmeasured and never picked.\n"
            "CPU (and float64): PyTorch's native kernels (torch.lstm / torch.gru). Any device, "
            "with lengths: under torch.compile PyTorch's packed path outside the graph (a graph "
            "break, as torch.nn.LSTM); under torch.export or CUDA graph capture the fused loop "
            "on CUDA, the eager reference elsewhere.")


def _span(r) -> str:
    return str(r[0]) if r[0] == r[1] else f"{r[0]}-{r[1]}"


def _in(value: int, span) -> bool:
    return span[0] <= value <= span[1]


def _card(device) -> str | None:
    """The name of a CUDA device (None for any other device, or without CUDA). Read through
    get_device_properties, which torch.compile folds to a constant (as the attention rule's
    capability)."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_properties(device).name


def fused_can_run(device) -> bool:
    """Whether backend="auto" may pick a fused kernel on `device` at all: Triton runs there
    (dtl_fast._triton.can_run_triton) and it is not a ROCm build (torch.version.hip: every
    committed row is NVIDIA's; ROCm reports its GPUs as "cuda" devices)."""
    return torch.version.hip is None and can_run_triton(device)


def auto_path(cell: str, dtype: torch.dtype, B: int, H: int, T: int, D: int, lengths,
              device, *, num_layers: int = 1, input_size: int | None = None, hx: bool = False,
              dropout: float = 0.0, batch_first: bool = False, bias: bool = True,
              card: str | None = None) -> str:
    """Which path backend="auto" takes for one call: "native" (PyTorch's torch.lstm /
    torch.gru: cuDNN on CUDA, the native kernels on the CPU) or "fused:<impl>" (impl in IMPLS).

    cell "LSTM" | "GRU"; dtype the recurrence's dtype (the autocast dtype under autocast);
    B batch, H hidden size, T steps, D directions (1 or 2); lengths None or anything (only
    whether there are lengths counts); device a torch.device or its string.
    The keywords describe the rest of the call; their defaults are the benchmark's call (one
    layer, input size = H, hx None, no dropout, [T, B, I], biases): num_layers; input_size
    (None: = H); hx (whether an initial state is given); dropout (the dropout applied: 0 when
    not training); batch_first; bias (whether the weights include biases); card (the CUDA device's name; None: read from `device`, None off CUDA).
    Fused only inside an AUTO_FUSED_REGIONS entry, on a device where fused_can_run.
    """
    if cell not in ("LSTM", "GRU"):
        raise ValueError(f"auto_path: cell must be 'LSTM' or 'GRU', got {cell!r}")
    if D not in (1, 2):
        raise ValueError(f"auto_path: D must be 1 or 2, got {D!r}")
    if torch.device(device).type != "cuda" or dtype == torch.float64:
        return "native"
    has_len = lengths is not None
    I = H if input_size is None else input_size
    for r in AUTO_FUSED_REGIONS:
        if (r["cell"] == cell and dtype in r["dtypes"] and D in r["D"] and _in(B, r["B"])
                and _in(H, r["H"]) and _in(T, r["T"]) and (r["lengths"] or not has_len)
                and _in(num_layers, r["num_layers"]) and _in(I, (H, H) if r["I"] == "H" else r["I"])
                and (r["hx"] or not hx) and (r["dropout"] or not dropout)
                and bool(batch_first) == r["batch_first"] and bool(bias) == r["bias"]
                and fused_can_run(device)
                and (card if card is not None else _card(device)) in r["cards"]):
            return "fused:" + r["impl"]
    return "native"


# ----------------------------------------------------------------------------------------------
# Registered ops
# ----------------------------------------------------------------------------------------------

@torch.library.custom_op("dtl_fast::lstm_recurrence", mutates_args=())
def lstm_recurrence(gates_x: torch.Tensor, w_hh: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor,
                    lengths: Optional[torch.Tensor], impl: str = "loop"
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The LSTM recurrence of one layer, both directions in one launch.

    gates_x [T, B, D, 4H] (input projection with both biases), w_hh [D, 4H, H], h0, c0 [D, B, H],
    all of one float dtype; lengths None or int64 [B] on gates_x's device.
    Returns out [T, B, D*H], h_n, c_n [D, B, H] (gates_x's dtype) and, for the backward,
    act [T, B, D, 4H] (gate activations i, f, g, o) and c_all [T, B, D, H] (cell states), both
    float32 (float64 for float64 input). impl: one of IMPLS ("loop", "persistent", "step"); every
    implementation returns the same tensors.
    """
    return _lstm_impl(gates_x, w_hh, h0, c0, lengths, impl)


def _lstm_impl(gates_x, w_hh, h0, c0, lengths, impl="loop"):
    # The bodies of the registered ops (the ops and their eager entry points run them).
    _check_impl(impl)
    if impl == "loop":
        return _kernels().lstm_forward(gates_x, w_hh, h0, c0, lengths)
    return _persistent().lstm_forward(gates_x, w_hh, h0, c0, lengths, persistent=impl == "persistent")


@lstm_recurrence.register_fake
def _(gates_x, w_hh, h0, c0, lengths, impl="loop"):
    T, B, D, G = gates_x.shape
    H = w_hh.shape[-1]
    torch._check(G == 4 * H, lambda: f"lstm_recurrence: gates_x last dim {G} != 4 * {H}")
    acc = _acc_dtype(gates_x.dtype)
    return (gates_x.new_empty(T, B, D * H), gates_x.new_empty(D, B, H), gates_x.new_empty(D, B, H),
            gates_x.new_empty(T, B, D, 4 * H, dtype=acc), gates_x.new_empty(T, B, D, H, dtype=acc))


@torch.library.custom_op("dtl_fast::lstm_recurrence_backward", mutates_args=())
def lstm_recurrence_backward(grad_out: torch.Tensor, grad_hn: torch.Tensor, grad_cn: torch.Tensor,
                             w_hh: torch.Tensor, c0: torch.Tensor, act: torch.Tensor,
                             c_all: torch.Tensor, lengths: Optional[torch.Tensor],
                             impl: str = "loop"
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reverse-time dh/dc recurrence of lstm_recurrence: returns dgates [T, B, D, 4H] (the
    gradient of gates_x, in w_hh's dtype) and dh0, dc0 [D, B, H] (float32 / float64)."""
    return _lstm_bwd_impl(grad_out, grad_hn, grad_cn, w_hh, c0, act, c_all, lengths, impl)


def _lstm_bwd_impl(grad_out, grad_hn, grad_cn, w_hh, c0, act, c_all, lengths, impl="loop"):
    _check_impl(impl)
    if impl == "loop":
        return _kernels().lstm_backward(grad_out, grad_hn, grad_cn, w_hh, c0, act, c_all, lengths)
    return _persistent().lstm_backward(grad_out, grad_hn, grad_cn, w_hh, c0, act, c_all, lengths,
                                       persistent=impl == "persistent")


@lstm_recurrence_backward.register_fake
def _(grad_out, grad_hn, grad_cn, w_hh, c0, act, c_all, lengths, impl="loop"):
    T, B, D, G = act.shape
    H = G // 4
    acc = _acc_dtype(w_hh.dtype)
    return (act.new_empty(T, B, D, G, dtype=w_hh.dtype), act.new_empty(D, B, H, dtype=acc),
            act.new_empty(D, B, H, dtype=acc))


@torch.library.custom_op("dtl_fast::gru_recurrence", mutates_args=())
def gru_recurrence(gates_x: torch.Tensor, w_hh: torch.Tensor, b_hn: torch.Tensor, h0: torch.Tensor,
                   lengths: Optional[torch.Tensor], impl: str = "loop"
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The GRU recurrence of one layer, both directions in one launch.

    gates_x [T, B, D, 3H] (W_ih x + b_ih, plus b_hr, b_hz on the r and z gates), w_hh [D, 3H, H],
    b_hn [D, H], h0 [D, B, H], one float dtype; lengths None or int64 [B].
    Returns out [T, B, D*H], h_n [D, B, H] and, for the backward, act [T, B, D, 4H]
    (r, z, n, W_hn h + b_hn) in float32 (float64 for float64 input). impl as lstm_recurrence.
    """
    return _gru_impl(gates_x, w_hh, b_hn, h0, lengths, impl)


def _gru_impl(gates_x, w_hh, b_hn, h0, lengths, impl="loop"):
    _check_impl(impl)
    if impl == "loop":
        return _kernels().gru_forward(gates_x, w_hh, b_hn, h0, lengths)
    return _persistent().gru_forward(gates_x, w_hh, b_hn, h0, lengths, persistent=impl == "persistent")


@gru_recurrence.register_fake
def _(gates_x, w_hh, b_hn, h0, lengths, impl="loop"):
    T, B, D, G = gates_x.shape
    H = w_hh.shape[-1]
    torch._check(G == 3 * H, lambda: f"gru_recurrence: gates_x last dim {G} != 3 * {H}")
    acc = _acc_dtype(gates_x.dtype)
    return (gates_x.new_empty(T, B, D * H), gates_x.new_empty(D, B, H),
            gates_x.new_empty(T, B, D, 4 * H, dtype=acc))


@torch.library.custom_op("dtl_fast::gru_recurrence_backward", mutates_args=())
def gru_recurrence_backward(grad_out: torch.Tensor, grad_hn: torch.Tensor, w_hh: torch.Tensor,
                            h0: torch.Tensor, out: torch.Tensor, act: torch.Tensor,
                            lengths: Optional[torch.Tensor], impl: str = "loop"
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reverse-time dh recurrence of gru_recurrence: returns dgates_x [T, B, D, 3H] (gradient of
    gates_x), dgates_h [T, B, D, 3H] (gradient of W_hh h + [b_hr, b_hz, b_hn]), both in w_hh's
    dtype, and dh0 [D, B, H] (float32 / float64)."""
    return _gru_bwd_impl(grad_out, grad_hn, w_hh, h0, out, act, lengths, impl)


def _gru_bwd_impl(grad_out, grad_hn, w_hh, h0, out, act, lengths, impl="loop"):
    _check_impl(impl)
    if impl == "loop":
        return _kernels().gru_backward(grad_out, grad_hn, w_hh, h0, out, act, lengths)
    return _persistent().gru_backward(grad_out, grad_hn, w_hh, h0, out, act, lengths,
                                      persistent=impl == "persistent")


@gru_recurrence_backward.register_fake
def _(grad_out, grad_hn, w_hh, h0, out, act, lengths, impl="loop"):
    T, B, D, G4 = act.shape
    H = G4 // 4
    acc = _acc_dtype(w_hh.dtype)
    return (act.new_empty(T, B, D, 3 * H, dtype=w_hh.dtype),
            act.new_empty(T, B, D, 3 * H, dtype=w_hh.dtype), act.new_empty(D, B, H, dtype=acc))


def _h_prev(out: torch.Tensor, h0: torch.Tensor, lengths: Optional[torch.Tensor]) -> torch.Tensor:
    """h_{t-1} of every step in processing order, [D, T, B, H]: the forward direction reads
    step t-1 (h0 at t=0); the reverse one step t+1, or h0 at each sequence's last valid step."""
    T, B, DH = out.shape
    D, _, H = h0.shape
    o = out.view(T, B, D, H)
    fwd = torch.cat([h0[0].unsqueeze(0), o[:T - 1, :, 0]], dim=0)
    if D == 1:
        return fwd.unsqueeze(0)
    rev = torch.cat([o[1:, :, 1], h0[1].unsqueeze(0)], dim=0)
    if lengths is not None:
        last = torch.arange(T, device=out.device)[:, None] == (lengths[None, :] - 1)  # [T, B]
        rev = torch.where(last[..., None], h0[1].unsqueeze(0), rev)
    return torch.stack([fwd, rev])


def _grad_w_hh(dgates: torch.Tensor, h_prev: torch.Tensor) -> torch.Tensor:
    """sum_t dgates_t^T h_{t-1} per direction as one batched GEMM: [D, G*H, H]."""
    T, B, D, G = dgates.shape
    H = h_prev.shape[-1]
    a = dgates.permute(2, 3, 0, 1).reshape(D, G, T * B)
    b = h_prev.reshape(D, T * B, H).to(dgates.dtype)
    return torch.bmm(a, b)


def _zeros_if_none(g, like: torch.Tensor, shape=None):
    if g is None:
        return like.new_zeros(shape if shape is not None else like.shape)
    return g


def _lstm_setup(ctx, inputs, output):
    gates_x, w_hh, h0, c0, lengths, impl = inputs
    out, _, _, act, c_all = output
    ctx.save_for_backward(w_hh, h0, c0, out, act, c_all, lengths)
    ctx.impl = impl  # the backward runs the same implementation


def _lstm_backward(ctx, grad_out, grad_hn, grad_cn, _g_act, _g_call, *, saved=None):
    # saved: ctx.saved_tensors, unpacked by no_double_backward under create_graph=True
    w_hh, h0, c0, out, act, c_all, lengths = ctx.saved_tensors if saved is None else saved
    grad_out = _zeros_if_none(grad_out, out).contiguous()
    grad_hn = _zeros_if_none(grad_hn, h0).contiguous()
    grad_cn = _zeros_if_none(grad_cn, c0).contiguous()
    dgates, dh0, dc0 = _lstm_bwd_call(grad_out, grad_hn, grad_cn, w_hh, c0, act, c_all, lengths,
                                      ctx.impl)
    g_w = _grad_w_hh(dgates, _h_prev(out, h0, lengths)) if ctx.needs_input_grad[1] else None
    return (dgates if ctx.needs_input_grad[0] else None, g_w,
            dh0.to(h0.dtype) if ctx.needs_input_grad[2] else None,
            dc0.to(c0.dtype) if ctx.needs_input_grad[3] else None, None, None)


# no_double_backward: a gradient penalty (create_graph=True) raises naming backend='reference'
# on this path too (the forward through the registered op: torch.compile, dispatch modes).
torch.library.register_autograd("dtl_fast::lstm_recurrence",
                                no_double_backward(_lstm_backward, "dtl_fast::lstm_recurrence"),
                                setup_context=_lstm_setup)


def _gru_setup(ctx, inputs, output):
    gates_x, w_hh, b_hn, h0, lengths, impl = inputs
    out, _, act = output
    ctx.save_for_backward(w_hh, h0, out, act, lengths)
    ctx.impl = impl


def _gru_backward(ctx, grad_out, grad_hn, _g_act, *, saved=None):
    w_hh, h0, out, act, lengths = ctx.saved_tensors if saved is None else saved
    grad_out = _zeros_if_none(grad_out, out).contiguous()
    grad_hn = _zeros_if_none(grad_hn, h0).contiguous()
    dgx, dgh, dh0 = _gru_bwd_call(grad_out, grad_hn, w_hh, h0, out, act, lengths, ctx.impl)
    H = w_hh.shape[-1]
    g_w = _grad_w_hh(dgh, _h_prev(out, h0, lengths)) if ctx.needs_input_grad[1] else None
    g_bhn = None
    if ctx.needs_input_grad[2]:
        g_bhn = dgh[..., 2 * H:].sum(dim=(0, 1), dtype=_acc_dtype(w_hh.dtype)).to(w_hh.dtype)
    return (dgx if ctx.needs_input_grad[0] else None, g_w, g_bhn,
            dh0.to(h0.dtype) if ctx.needs_input_grad[3] else None, None, None)


torch.library.register_autograd("dtl_fast::gru_recurrence",
                                no_double_backward(_gru_backward, "dtl_fast::gru_recurrence"),
                                setup_context=_gru_setup)

# The eager entry points (dtl_fast.ops._eager): the same bodies and autograd formulas without the
# dispatcher, wherever that is safe; the registered ops everywhere else (torch.compile, export,
# dispatch modes, subclasses).
_lstm_bwd_call = eager_op(torch.ops.dtl_fast.lstm_recurrence_backward, _lstm_bwd_impl, grad_args=3)
_gru_bwd_call = eager_op(torch.ops.dtl_fast.gru_recurrence_backward, _gru_bwd_impl, grad_args=2)
_lstm_call = eager_op(torch.ops.dtl_fast.lstm_recurrence, _lstm_impl, _lstm_setup, _lstm_backward,
                      name="FusedLSTMRecurrence")
_gru_call = eager_op(torch.ops.dtl_fast.gru_recurrence, _gru_impl, _gru_setup, _gru_backward,
                     name="FusedGRURecurrence")


# ----------------------------------------------------------------------------------------------
# Public functions
# ----------------------------------------------------------------------------------------------

def _native(*args):
    """PyTorch's own RNN kernels: the call torch.nn.LSTM / GRU make (_native_body). Under a
    plain torch.compile it runs outside the graph, as _dispatch's own break does (traced,
    torch.lstm decomposes into a loop over T, and torch 2.11 / 2.14's AOTAutograd asserts on
    it with weights that need a gradient). This frame guards itself because dynamo can compile
    it on its own: a compiled caller first run inside an eager torch.func transform makes dynamo
    skip the frames above it (it cannot resume after their breaks there), and later plain calls
    then traced torch.lstm here (review s31)."""
    if torch.compiler.is_compiling() and not _exporting() and not in_traced_transform(args[1]):
        return _native_outside_graph(*args)
    return _native_body(*args)


def _native_body(mode, x, hs, weights, lengths, num_layers, bidirectional, batch_first, dropout,
                 training, has_bias, H, D):
    """_native's call, eagerly or traced (see _native)."""
    fn = torch.lstm if mode == "LSTM" else torch.gru
    B = x.shape[0] if batch_first else x.shape[1]
    zero_state = hs is None
    if zero_state:
        zeros = x.new_zeros(num_layers * D, B, H)
        hs = (zeros, zeros) if mode == "LSTM" else (zeros,)
    weights = list(weights)
    p, train = float(dropout), bool(training)
    if lengths is None or B == 0:
        # pack_padded_sequence refuses an empty batch; with no sequence the lengths change nothing.
        if (mode == "LSTM" and B > 0 and x.device.type == "cpu"
                and x.dtype in (torch.float32, torch.bfloat16)  # float16 / float64 input runs
                and torch.is_autocast_enabled("cpu")
                and torch.get_autocast_dtype("cpu") == torch.float16):
            # oneDNN has no float16 LSTM and says only "could not create a primitive descriptor"
            raise RuntimeError(
                "lstm(backend='auto') on the CPU under torch.autocast('cpu', dtype=torch.float16): "
                "PyTorch's CPU LSTM (oneDNN, what torch.nn.LSTM runs) has no float16 kernel; use "
                "backend='reference' (or 'fused' where Triton runs), which round to float16, or "
                "bfloat16 autocast")
        hx = hs if mode == "LSTM" else hs[0]
        out, *state = fn(x, hx, weights, has_bias, num_layers, p, train, bidirectional, batch_first)
    else:
        T = x.shape[1] if batch_first else x.shape[0]
        # (sorted_indices and unsorted_indices come on x's device: pack_padded_sequence puts
        # them there)
        packed = pack_padded_sequence(x, lengths.cpu(), batch_first=batch_first, enforce_sorted=False)
        # zeros need no sorting (torch.nn.LSTM does not permute the zeros it makes either)
        hs_sorted = hs if zero_state else tuple(h.index_select(1, packed.sorted_indices) for h in hs)
        hx = hs_sorted if mode == "LSTM" else hs_sorted[0]
        data, *state = fn(packed.data, packed.batch_sizes, hx, weights, has_bias, num_layers, p,
                          train, bidirectional)
        out, _ = pad_packed_sequence(packed._replace(data=data), batch_first=batch_first, total_length=T)
        state = [s.index_select(1, packed.unsorted_indices) for s in state]
    if mode == "LSTM":
        return out, (state[0], state[1])
    return out, state[0]


def _refuse_host_lengths_in_capture(mode: str, lengths: torch.Tensor, x: torch.Tensor) -> None:
    """ValueError when a CUDA graph is being captured on x's device and lengths are elsewhere
    (on the host): the host-to-device copy inside the captured graph would replay reading that
    host block, whatever it holds by then -- silently wrong lengths on every replay."""
    if lengths.device != x.device and device_capturing(x):
        raise ValueError(f"{mode}: lengths must be on {x.device} during a CUDA graph capture "
                         f"(got them on {lengths.device}, or as a list): copy them into a device "
                         "tensor before capturing and update it in place before each replay")


def _fused(mode, x, hs, weights, lengths, num_layers, bidirectional, batch_first, dropout,
           training, has_bias, H, D, impl):
    require_triton(x.device, f"{mode.lower()}(backend='fused') on {x.device.type} tensors")
    G = 4 if mode == "LSTM" else 3
    per_dir = 4 if has_bias else 2
    xt = x.transpose(0, 1) if batch_first else x  # [T, B, I]
    T, B = xt.shape[0], xt.shape[1]
    if lengths is not None:
        _refuse_host_lengths_in_capture(mode, lengths, x)
        # CPU lengths (checked on the host) go over without a stream sync
        lengths = to_device_async(lengths.to(torch.int64), x.device)
    h_n, c_n = [], []
    layer_in = xt
    if lengths is not None:
        # Padded steps are never read, but the projection GEMM below covers all T steps, and
        # its autograd (dW_ih = dgates^T x) would turn a NaN / inf in the padding into a NaN
        # weight gradient (0 * NaN): zero them. Deeper layers read the previous layer's output,
        # which is exactly zero there already.
        valid = torch.arange(T, device=x.device)[:, None] < lengths[None, :]  # [T, B]
        layer_in = torch.where(valid[..., None], xt, 0)
    for layer in range(num_layers):
        ws = [weights[(layer * D + d) * per_dir:(layer * D + d + 1) * per_dir] for d in range(D)]
        w_ih = torch.cat([w[0] for w in ws]) if D > 1 else ws[0][0]  # [D*G*H, I_l]
        inp = layer_in.reshape(T * B, layer_in.shape[-1])
        if has_bias:
            if mode == "LSTM":
                bias = torch.cat([w[2] + w[3] for w in ws])
            else:
                # b_hr and b_hz add to the input side; b_hn stays inside r * (W_hn h + b_hn).
                bias = torch.cat([w[2] + torch.cat([w[3][:2 * H], torch.zeros_like(w[3][2 * H:])])
                                  for w in ws])
            gates_x = torch.addmm(bias, inp, w_ih.t())
        else:
            gates_x = torch.mm(inp, w_ih.t())
        gates_x = gates_x.view(T, B, D, G * H)
        # Under autocast the GEMM picks the dtype; the recurrence runs in that one dtype.
        dt = gates_x.dtype
        w_hh = torch.stack([w[1] for w in ws]).to(dt)  # [D, G*H, H]
        sl = slice(layer * D, (layer + 1) * D)
        if hs is None:
            h0 = gates_x.new_zeros(D, B, H)
            c0 = gates_x.new_zeros(D, B, H) if mode == "LSTM" else None
        else:
            h0 = hs[0][sl].to(dt)
            c0 = hs[1][sl].to(dt) if mode == "LSTM" else None
        if mode == "LSTM":
            out, hn, cn, _, _ = _lstm_call(gates_x, w_hh, h0, c0, lengths, impl)
            c_n.append(cn)
        else:
            if has_bias:
                b_hn = torch.stack([w[3][2 * H:] for w in ws]).to(dt)
            else:
                b_hn = gates_x.new_zeros(D, H)
            out, hn, _ = _gru_call(gates_x, w_hh, b_hn, h0, lengths, impl)
        h_n.append(hn)
        if dropout > 0 and training and layer < num_layers - 1:
            out = F.dropout(out, float(dropout), training=True)
        layer_in = out
    output = layer_in.transpose(0, 1) if batch_first else layer_in
    h_n = torch.cat(h_n)
    if mode == "LSTM":
        return output, (h_n, torch.cat(c_n))
    return output, h_n


def _own_lengths(lengths, caller, device):
    """The checked int64 `lengths` for the fused path, copied when it is (or shares memory
    with) the caller's own tensor `caller` on `device`: the recurrence ops save lengths for the
    backward, so an in-place write to the caller's tensor before backward would be a
    version-counter error (auto and reference keep no reference to it). A CPU tensor bound
    for the GPU is copied there anyway; B integers otherwise: the copy costs nothing."""
    if (lengths is None or not isinstance(caller, torch.Tensor) or lengths.device != device
            or not torch.is_grad_enabled()):  # nothing is saved
        return lengths
    if (lengths is caller or torch.compiler.is_compiling()
            or lengths.untyped_storage().data_ptr() == caller.untyped_storage().data_ptr()):
        return lengths.clone()
    return lengths


def _exporting() -> bool:
    """True while torch.export traces. Not torch.compiler.is_exporting(): torch 2.11's dynamo
    folds that call to True under a plain torch.compile as well (2.14's reads the flag); the
    flag it reads is what export sets, in both versions, and dynamo guards on it as a global."""
    flag = getattr(torch.compiler, "_is_exporting_flag", None)
    return torch.compiler.is_exporting() if flag is None else bool(flag)


def _dispatch(mode, input, hx, weights, lengths, num_layers, bidirectional, batch_first, dropout,
              training, has_bias, backend):
    backend = resolve_backend(backend)
    bidirectional, batch_first, has_bias, training = _ref.check_flags(
        mode, bidirectional=bidirectional, batch_first=batch_first, has_bias=has_bias,
        training=training)
    if (backend == "auto" and lengths is not None and torch.compiler.is_compiling()
            and not _exporting()):
        # torch.compile: PyTorch's packed path (pack_padded_sequence: batch_sizes depend on the
        # values of lengths, read on the host) cannot be traced, so the whole call runs eagerly,
        # outside the graph: a graph break, what torch.nn.LSTM gets there, and so PyTorch's
        # speed and the numbers of eager auto (the checks included: no graph pieces of ours
        # around the break).
        return _auto_with_lengths_outside_graph(mode, input, hx, weights, lengths, num_layers,
                                                bidirectional, batch_first, dropout, training,
                                                has_bias, backend)
    if (backend == "auto" and torch.compiler.is_compiling() and not _exporting()
            and not in_traced_transform(input)
            and _compiled_auto_is_native(mode, input, hx, weights, num_layers, bidirectional,
                                         batch_first, dropout, training, has_bias)):
        # Without lengths too: traced, torch.lstm / gru decompose into a cell loop unrolled over
        # T (never cuDNN; 0.40x compiled torch.nn in one CPU case, slow to compile), and torch
        # 2.11 (the GPU machines') cannot even run that trace with weights that need a gradient
        # (an AOTAutograd assertion; wrong h_n shapes for LSTM). Inside a compiled torch.func
        # transform other than vmap the call traces (a break there fails inside dynamo); so it
        # does under torch.export, where a graph is the point. Inside a torch.cond body the
        # break cannot be captured (as for torch.nn.LSTM): use backend='fused' / 'reference'.
        return _auto_native_outside_graph(mode, input, hx, weights, lengths, num_layers,
                                          bidirectional, batch_first, dropout, training,
                                          has_bias, backend)
    kw = dict(lengths=lengths, num_layers=num_layers, bidirectional=bidirectional,
              batch_first=batch_first, dropout=dropout, training=training, has_bias=has_bias)
    if backend == "reference":
        return (_ref.lstm if mode == "LSTM" else _ref.gru)(input, hx, weights, **kw)
    H, D, hs, lengths = _ref.check_all(mode, input, hx, weights, lengths=lengths, num_layers=num_layers,
                                       bidirectional=bidirectional, batch_first=batch_first,
                                       dropout=dropout, has_bias=has_bias)
    args = (mode, input, hs, weights, lengths, num_layers, bidirectional, batch_first, dropout,
            training, has_bias, H, D)
    # torch.func transforms and forward-mode AD (one scan per call: ~10 us a tensor inside an
    # open dual level, so the input first)
    used = () if torch.compiler.is_compiling() else transforms_in_use(
        (input, *(hs or ()), *weights))
    if backend == "auto":
        if used and (lengths is not None or not {"forward_ad", "jvp", "vmap"}.isdisjoint(used)):
            # neither torch.lstm / gru (no batching rule, no forward-mode formula in cuDNN /
            # oneDNN; their packed form, which lengths take, fails under any torch.func
            # transform: "Cannot access data pointer of Tensor that doesn't have storage") nor
            # the fused ops under jvp serve these; the reference is plain torch ops
            return (_ref.lstm if mode == "LSTM" else _ref.gru)(input, hx, weights, **kw)
        path = auto_path(mode, rule_dtype(input), input.shape[0 if batch_first else 1], H,
                         input.shape[1 if batch_first else 0], D, lengths, input.device,
                         num_layers=num_layers, input_size=input.shape[-1], hx=hs is not None,
                         dropout=float(dropout) if training else 0.0, batch_first=batch_first,
                         bias=has_bias)
        if path == "native" and lengths is not None:
            # PyTorch's packed path can neither be traced by torch.export (torch.compile took
            # the branch at the top) nor pack meta tensors (no data)
            if input.device.type == "meta" or torch.compiler.is_compiling():
                return _run_path(_traceable_path(input), args, hx, kw)
            return _auto_with_lengths(args, hx, kw)
        if path == "native" or needs_stock_path(used):
            return _native(*args)
        return _run_path(path, args, hx, kw)
    refuse_transforms(f"{mode.lower()}(backend='fused')", used)
    return _run_path("fused:" + fused_impl(), args, hx, kw)


def _run_path(path: str, args: tuple, hx, kw: dict):
    """Runs "reference" or "fused:<impl>" for _dispatch's `args` (hx, kw: the caller's hx
    and keyword arguments, for the reference, which checks them itself)."""
    mode, x = args[0], args[1]
    if path == "reference":
        return (_ref.lstm if mode == "LSTM" else _ref.gru)(x, hx, args[3], **kw)
    own = _own_lengths(args[4], kw["lengths"], x.device)
    return _fused(*args[:4], own, *args[5:], path.split(":", 1)[1])


def _auto_with_lengths(args: tuple, hx, kw: dict):
    """backend="auto" with lengths where auto_path says "native", run eagerly: PyTorch's packed
    path (what torch.nn.LSTM / GRU run with a PackedSequence); during a CUDA graph capture,
    where packing would read lengths on the host (an error there), the traceable path."""
    if device_capturing(args[1]):
        return _run_path(_traceable_path(args[1]), args, hx, kw)
    return _native(*args)


def _dispatch_eager(*args):
    """_dispatch, run eagerly: what torch.compile calls where backend="auto" takes PyTorch's
    path (see _dispatch)."""
    return _dispatch(*args)


def _depth_is_folded() -> bool:
    """Whether dynamo folds get_dynamic_layer_stack_depth() into a constant (with a guard on
    it): torch 2.14 does; torch 2.11 skips the function (a graph break)."""
    try:
        from torch._dynamo.variables.torch import constant_fold_functions_need_guards
        return torch._C._functorch.get_dynamic_layer_stack_depth in constant_fold_functions_need_guards
    except Exception:  # noqa: BLE001  (dynamo's internals moved: the query that works anywhere)
        return False


_DEPTH_IS_FOLDED = _depth_is_folded()


def in_traced_transform(input) -> bool:
    """Under torch.compile: whether dynamo is tracing inside a torch.func transform other than
    vmap (grad / vjp / jacrev / jvp / functional_call under them), where a graph break fails
    inside dynamo (an internal AssertionError, torch 2.11 and 2.14): the RNN call then stays
    in the graph. Not for vmap's batched input, whose traced path fails and whose eager call
    works. Dynamo evaluates each query while tracing (it really enters the transform's level).
    The stack depth where dynamo folds it: a guard, and no node in the graph, where
    _are_functorch_transforms_active() left a dead call that made the graph before the
    module's break non-empty (~15 us a call to run it, a tiny compiled LSTM, s30)."""
    active = (torch._C._functorch.get_dynamic_layer_stack_depth() > 0 if _DEPTH_IS_FOLDED
              else torch._C._are_functorch_transforms_active())
    return active and not (isinstance(input, torch.Tensor)
                           and torch._C._functorch.is_batchedtensor(input))


def _compiled_auto_is_native(mode, input, hx, weights, num_layers, bidirectional, batch_first,
                             dropout, training, has_bias) -> bool:
    """Under torch.compile, without lengths: whether auto_path picks PyTorch's kernel for this
    call, read from the shapes alone (for the modules, which then run their forward outside
    the graph, the checks included). True off CUDA and for anything malformed, which the
    eager call then rejects with the checks' message."""
    if not (isinstance(input, torch.Tensor) and input.is_cuda and input.dim() == 3
            and isinstance(weights, (list, tuple)) and len(weights) > 1
            and isinstance(weights[1], torch.Tensor) and weights[1].dim() == 2):
        return True
    return auto_path(mode, rule_dtype(input), input.shape[0 if batch_first else 1],
                     weights[1].shape[1], input.shape[1 if batch_first else 0],
                     2 if bidirectional else 1, None, input.device, num_layers=num_layers,
                     input_size=input.shape[-1], hx=hx is not None,
                     dropout=float(dropout) if training else 0.0, batch_first=batch_first,
                     bias=has_bias) == "native"


# What torch.compile calls instead of tracing _dispatch for backend="auto" with lengths: a graph
# break (fullgraph=True raises torch._dynamo.exc.Unsupported, "Skip calling
# `torch.compiler.disable()`d function", with this reason).
_KEEP_ONE_GRAPH = (
    "To keep one graph (fullgraph=True), choose another backend: backend='fused' (the Triton "
    "kernels; CUDA, or the CPU under TRITON_INTERPRET=1) or backend='reference' (the eager "
    "loop, unrolled over T), set on the module (dtl_fast.nn.LSTM(..., backend=...) or "
    "module.backend = ...), through the model (DTL(..., backend=...), dtl-fast train "
    "--backend) or for every call with DTL_FAST_BACKEND")
_OUTSIDE_GRAPH_REASON = (
    "dtl_fast lstm/gru(backend='auto') with lengths runs PyTorch's packed RNN kernel "
    "(pack_padded_sequence, as torch.nn.LSTM / GRU do) outside the graph, at cuDNN / oneDNN "
    "speed. " + _KEEP_ONE_GRAPH)
_auto_with_lengths_outside_graph = outside_graph(_dispatch_eager, _OUTSIDE_GRAPH_REASON)
# The same function for auto without lengths (see _dispatch), with its own reason.
_AUTO_NATIVE_REASON = (
    "dtl_fast lstm/gru(backend='auto') runs PyTorch's RNN kernel (cuDNN / oneDNN, as "
    "torch.nn.LSTM / GRU do) outside the graph: traced, torch.lstm / torch.gru decompose into a "
    "loop unrolled over T. " + _KEEP_ONE_GRAPH)
_auto_native_outside_graph = outside_graph(_dispatch_eager, _AUTO_NATIVE_REASON)
# _native's own break (see _native): _native_body, eagerly
_native_outside_graph = outside_graph(_native_body, _AUTO_NATIVE_REASON)


def _traceable_path(x: torch.Tensor) -> str:
    """What backend="auto" runs with lengths where PyTorch's packed path cannot run: under
    torch.export, during a CUDA graph capture, and on meta tensors. "fused:<FUSED_DEFAULT_IMPL>"
    on CUDA (float16 / bfloat16 / float32, where fused_can_run: Triton, not ROCm), else
    "reference" (the eager loop: traceable anywhere, unrolled over T)."""
    if x.is_cuda and x.dtype != torch.float64 and fused_can_run(x.device):
        return "fused:" + FUSED_DEFAULT_IMPL
    return "reference"


def rule_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype auto_path looks a call up with: the dtype PyTorch's own path (the one `auto`
    falls back to, and must agree with on the output dtype) computes in. Under CUDA autocast
    that is float16 whatever the autocast dtype (cuDNN's autocast wrapper,
    aten/src/ATen/cudnn/AutocastRNN.cpp, rounds input, states and weights to half), so a
    bfloat16-autocast call never takes a bfloat16 fused region and returns what torch.nn
    returns; under CPU autocast the autocast dtype; float64 is never cast; else x's."""
    if autocast_enabled(x.device.type) and x.dtype != torch.float64:
        return torch.float16 if x.is_cuda else torch.get_autocast_dtype(x.device.type)
    return x.dtype


def lstm(input, hx, weights, *, lengths=None, num_layers: int = 1, bidirectional: bool = False,
         batch_first: bool = False, dropout: float = 0.0, training: bool = False,
         has_bias: bool = True, backend: str | None = None):
    """Multi-layer (bidirectional) LSTM, the function torch.nn.LSTM computes.

    Args:
        input: [T, B, I] (or [B, T, I] with batch_first) float32 / float16 / bfloat16 (float64:
            reference and native always, fused in the interpreter).
        hx: None (zeros) or (h0, c0), each [num_layers * D, B, H] (D = 2 if bidirectional),
            index = layer * D + direction.
        weights: torch.nn.LSTM._flat_weights order: per layer, per direction (forward, reverse):
            w_ih [4H, I_l], w_hh [4H, H], then b_ih [4H], b_hh [4H] if has_bias (gates i, f, g, o;
            I_0 = I, I_l = D*H). H is read from w_hh.
        lengths: None, or [B] integers in [1, T] (list or tensor on the CPU or input's device).
            Steps t >= lengths[b] are padding: zero output; the reverse direction starts at each
            sequence's last valid step; h_n / c_n come from each sequence's last valid step.
        dropout, training: F.dropout(p=dropout) on each layer's output but the last, when training.
        backend: "auto" | "fused" | "reference"; None reads $DTL_FAST_BACKEND (else "auto").
            "auto": the path auto_path picks: on CUDA PyTorch's cuDNN path (torch.lstm) except
            where a measured GPU row puts a fused kernel ahead (AUTO_FUSED_REGIONS, auto_rule():
            that shape and call, on the card it was measured on, where Triton runs, not on
            ROCm); PyTorch's native kernels on the CPU and for float64. Under torch.compile
            PyTorch's kernels run outside the graph (a graph break per call, as torch.nn.LSTM
            gets: traced, torch.lstm / gru decompose into a loop unrolled over T, never cuDNN),
            except inside a compiled torch.func transform other than vmap and under
            torch.export, where the call traces; a torch.cond body cannot hold the break (use
            'fused' / 'reference' there). Under torch.func.grad /
            vjp / jacrev PyTorch's path (the eager reference with lengths: PyTorch's packed path
            fails under torch.func), under vmap / jvp / jacfwd / forward-mode AD the eager
            reference. With lengths PyTorch's path is its packed one (pack_padded_sequence,
            which reads lengths on the host), also under torch.compile, where it runs outside
            the graph: a graph break, as torch.nn.LSTM gets. So torch.compile(fullgraph=True)
            of an "auto" call with lengths raises (see Raises); backend="fused" or "reference"
            keep one graph. Where the packed path cannot run at all (torch.export, a CUDA graph
            capture, meta tensors): the fused kernels on CUDA (float16 / bfloat16 / float32,
            where Triton runs, not on ROCm), the eager reference elsewhere (an unrolled loop
            over T: slow to compile for long sequences); they agree with PyTorch's path to
            rounding only.
            "fused": the Triton kernels (FUSED_DEFAULT_IMPL; $DTL_FAST_RNN_IMPL = "loop" |
            "persistent" | "step" picks another implementation).

    Returns:
        (output, (h_n, c_n)): output [T, B, D*H] (or [B, T, D*H]), h_n, c_n [num_layers * D, B, H],
        in input's dtype. Under torch.autocast, "fused" and "reference" round input, hx and
        weights (unless float64) to the autocast dtype and return results in it. "auto" returns
        exactly what torch.nn.LSTM / GRU return, which differs: on CUDA the cuDNN path rounds
        to float16 whatever the autocast dtype (and the rule looks such calls up as float16,
        see rule_dtype, so a bfloat16 fused region never changes that); on the CPU the kernels
        apply autocast only to a non-empty LSTM in bfloat16 without lengths (float32
        otherwise; oneDNN has no float16 LSTM, so "auto" raises a RuntimeError for a float16
        autocast LSTM without lengths). The cell state and every accumulation are float32
        whatever the input dtype.

    Raises:
        RuntimeError: input feature size != weight_ih_l0 columns, hx of the wrong shape, lengths
            outside [1, T], backend="fused" where Triton cannot run (meta tensors, CPU tensors
            without the interpreter), backend="auto" LSTM on the CPU under float16 autocast;
            in the backward, differentiating the fused path's gradients again (create_graph=True:
            gradient penalties, torch.autograd.functional.hessian), which names
            backend='reference'.
        ValueError: wrong rank or dtype, wrong weight count or shapes, devices that differ,
            a flag (bidirectional, batch_first, has_bias, training) that is not a bool.
        NotImplementedError: backend="fused" under torch.func.grad / vjp / jacrev / jvp /
            jacfwd or forward-mode AD, which cannot see through the fused kernels' autograd
            (torch.autograd.functional.jacobian(vectorize=True) and autograd.grad's
            is_grads_batched do work: the backward kernels run once per batched gradient;
            with create_graph=True too they raise the second-order RuntimeError).
        torch._dynamo.exc.Unsupported: backend="auto" under torch.compile(fullgraph=True)
            where it takes PyTorch's path (with lengths always; without them outside the
            measured fused region): "Skip calling `torch.compiler.disable()`d function",
            whose reason names backend='fused' and backend='reference' as the ways to keep
            one graph (torch versions whose torch.compiler.disable takes no reason omit it).
    """
    return _dispatch("LSTM", input, hx, weights, lengths, num_layers, bidirectional, batch_first,
                     dropout, training, has_bias, backend)


def gru(input, hx, weights, *, lengths=None, num_layers: int = 1, bidirectional: bool = False,
        batch_first: bool = False, dropout: float = 0.0, training: bool = False,
        has_bias: bool = True, backend: str | None = None):
    """Multi-layer (bidirectional) GRU, the function torch.nn.GRU computes (gates r, z, n;
    n = tanh(W_in x + b_in + r * (W_hn h + b_hn)), h' = (1 - z) * n + z * h).

    Same arguments as lstm, with hx None or h0 [num_layers * D, B, H] and weights of 3H rows.
    Returns (output [T, B, D*H] (or [B, T, D*H]), h_n [num_layers * D, B, H]) in input's dtype
    (under torch.autocast as lstm). Raises as lstm, torch.compile(fullgraph=True) of
    backend="auto" with lengths included (PyTorch's packed path runs outside the graph:
    backend='fused' or 'reference' keep one graph).
    """
    return _dispatch("GRU", input, hx, weights, lengths, num_layers, bidirectional, batch_first,
                     dropout, training, has_bias, backend)
