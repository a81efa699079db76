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
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from dtl_fast._backend import resolve_backend
from dtl_fast._triton import require_triton
from dtl_fast.reference import rnn as _ref

_HALF = (torch.float16, torch.bfloat16)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _kernels():
    # Imported on first use, so a TRITON_INTERPRET set by the tests before that takes effect.
    from dtl_fast.kernels import rnn as k
    return k


# ----------------------------------------------------------------------------------------------
# Registered ops
# ----------------------------------------------------------------------------------------------

@torch.library.custom_op("dtl_fast::lstm_recurrence", mutates_args=())
def lstm_recurrence(gates_x: torch.Tensor, w_hh: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor,
                    lengths: Optional[torch.Tensor]
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The LSTM recurrence of one layer, both directions in one launch.

    gates_x [T, B, D, 4H] (input projection with both biases), w_hh [D, 4H, H], h0, c0 [D, B, H],
    all of one float dtype; lengths None or int64 [B] on gates_x's device.
    Returns out [T, B, D*H], h_n, c_n [D, B, H] (gates_x's dtype) and, for the backward,
    act [T, B, D, 4H] (gate activations i, f, g, o) and c_all [T, B, D, H] (cell states), both
    float32 (float64 for float64 input).
    """
    return _kernels().lstm_forward(gates_x, w_hh, h0, c0, lengths)


@lstm_recurrence.register_fake
def _(gates_x, w_hh, h0, c0, lengths):
    T, B, D, G = gates_x.shape
    H = w_hh.shape[-1]
    torch._check(G == 4 * H, lambda: f"lstm_recurrence: gates_x last dim {G} != 4 * {H}")
    acc = _acc_dtype(gates_x.dtype)
    return (gates_x.new_empty(T, B, D * H), gates_x.new_empty(D, B, H), gates_x.new_empty(D, B, H),
            gates_x.new_empty(T, B, D, 4 * H, dtype=acc), gates_x.new_empty(T, B, D, H, dtype=acc))


@torch.library.custom_op("dtl_fast::lstm_recurrence_backward", mutates_args=())
def lstm_recurrence_backward(grad_out: torch.Tensor, grad_hn: torch.Tensor, grad_cn: torch.Tensor,
                             w_hh: torch.Tensor, c0: torch.Tensor, act: torch.Tensor,
                             c_all: torch.Tensor, lengths: Optional[torch.Tensor]
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reverse-time dh/dc recurrence of lstm_recurrence: returns dgates [T, B, D, 4H] (the
    gradient of gates_x, in w_hh's dtype) and dh0, dc0 [D, B, H] (float32 / float64)."""
    return _kernels().lstm_backward(grad_out, grad_hn, grad_cn, w_hh, c0, act, c_all, lengths)


@lstm_recurrence_backward.register_fake
def _(grad_out, grad_hn, grad_cn, w_hh, c0, act, c_all, lengths):
    T, B, D, G = act.shape
    H = G // 4
    acc = _acc_dtype(w_hh.dtype)
    return (act.new_empty(T, B, D, G, dtype=w_hh.dtype), act.new_empty(D, B, H, dtype=acc),
            act.new_empty(D, B, H, dtype=acc))


@torch.library.custom_op("dtl_fast::gru_recurrence", mutates_args=())
def gru_recurrence(gates_x: torch.Tensor, w_hh: torch.Tensor, b_hn: torch.Tensor, h0: torch.Tensor,
                   lengths: Optional[torch.Tensor]
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The GRU recurrence of one layer, both directions in one launch.

    gates_x [T, B, D, 3H] (W_ih x + b_ih, plus b_hr, b_hz on the r and z gates), w_hh [D, 3H, H],
    b_hn [D, H], h0 [D, B, H], one float dtype; lengths None or int64 [B].
    Returns out [T, B, D*H], h_n [D, B, H] and, for the backward, act [T, B, D, 4H]
    (r, z, n, W_hn h + b_hn) in float32 (float64 for float64 input).
    """
    return _kernels().gru_forward(gates_x, w_hh, b_hn, h0, lengths)


@gru_recurrence.register_fake
def _(gates_x, w_hh, b_hn, h0, lengths):
    T, B, D, G = gates_x.shape
    H = w_hh.shape[-1]
    torch._check(G == 3 * H, lambda: f"gru_recurrence: gates_x last dim {G} != 3 * {H}")
    acc = _acc_dtype(gates_x.dtype)
    return (gates_x.new_empty(T, B, D * H), gates_x.new_empty(D, B, H),
            gates_x.new_empty(T, B, D, 4 * H, dtype=acc))


@torch.library.custom_op("dtl_fast::gru_recurrence_backward", mutates_args=())
def gru_recurrence_backward(grad_out: torch.Tensor, grad_hn: torch.Tensor, w_hh: torch.Tensor,
                            h0: torch.Tensor, out: torch.Tensor, act: torch.Tensor,
                            lengths: Optional[torch.Tensor]
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reverse-time dh recurrence of gru_recurrence: returns dgates_x [T, B, D, 3H] (gradient of
    gates_x), dgates_h [T, B, D, 3H] (gradient of W_hh h + [b_hr, b_hz, b_hn]), both in w_hh's
    dtype, and dh0 [D, B, H] (float32 / float64)."""
    return _kernels().gru_backward(grad_out, grad_hn, w_hh, h0, out, act, lengths)


@gru_recurrence_backward.register_fake
def _(grad_out, grad_hn, w_hh, h0, out, act, lengths):
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
    gates_x, w_hh, h0, c0, lengths = inputs
    out, _, _, act, c_all = output
    ctx.save_for_backward(w_hh, h0, c0, out, act, c_all, lengths)


def _lstm_backward(ctx, grad_out, grad_hn, grad_cn, _g_act, _g_call):
    w_hh, h0, c0, out, act, c_all, lengths = ctx.saved_tensors
    grad_out = _zeros_if_none(grad_out, out).contiguous()
    grad_hn = _zeros_if_none(grad_hn, h0).contiguous()
    grad_cn = _zeros_if_none(grad_cn, c0).contiguous()
    dgates, dh0, dc0 = torch.ops.dtl_fast.lstm_recurrence_backward(
        grad_out, grad_hn, grad_cn, w_hh, c0, act, c_all, lengths)
    g_w = _grad_w_hh(dgates, _h_prev(out, h0, lengths)) if ctx.needs_input_grad[1] else None
    return (dgates if ctx.needs_input_grad[0] else None, g_w,
            dh0.to(h0.dtype) if ctx.needs_input_grad[2] else None,
            dc0.to(c0.dtype) if ctx.needs_input_grad[3] else None, None)


torch.library.register_autograd("dtl_fast::lstm_recurrence", _lstm_backward, setup_context=_lstm_setup)


def _gru_setup(ctx, inputs, output):
    gates_x, w_hh, b_hn, h0, lengths = inputs
    out, _, act = output
    ctx.save_for_backward(w_hh, h0, out, act, lengths)


def _gru_backward(ctx, grad_out, grad_hn, _g_act):
    w_hh, h0, out, act, lengths = ctx.saved_tensors
    grad_out = _zeros_if_none(grad_out, out).contiguous()
    grad_hn = _zeros_if_none(grad_hn, h0).contiguous()
    dgx, dgh, dh0 = torch.ops.dtl_fast.gru_recurrence_backward(
        grad_out, grad_hn, w_hh, h0, out, act, lengths)
    H = w_hh.shape[-1]
    g_w = _grad_w_hh(dgh, _h_prev(out, h0, lengths)) if ctx.needs_input_grad[1] else None
    g_bhn = None
    if ctx.needs_input_grad[2]:
        g_bhn = dgh[..., 2 * H:].sum(dim=(0, 1), dtype=_acc_dtype(w_hh.dtype)).to(w_hh.dtype)
    return (dgx if ctx.needs_input_grad[0] else None, g_w, g_bhn,
            dh0.to(h0.dtype) if ctx.needs_input_grad[3] else None, None)


torch.library.register_autograd("dtl_fast::gru_recurrence", _gru_backward, setup_context=_gru_setup)


# ----------------------------------------------------------------------------------------------
# Public functions
# ----------------------------------------------------------------------------------------------

def _native(mode, x, hs, weights, lengths, num_layers, bidirectional, batch_first, dropout,
            training, has_bias, H, D):
    """PyTorch's own RNN kernels: the call torch.nn.LSTM / GRU make."""
    fn = torch.lstm if mode == "LSTM" else torch.gru
    B = x.shape[0] if batch_first else x.shape[1]
    if hs is None:
        zeros = x.new_zeros(num_layers * D, B, H)
        hs = (zeros, zeros) if mode == "LSTM" else (zeros,)
    weights = list(weights)
    p, train = float(dropout), bool(training)
    if lengths is None:
        hx = hs if mode == "LSTM" else hs[0]
        out, *state = fn(x, hx, weights, has_bias, num_layers, p, train, bidirectional, batch_first)
    else:
        from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence
        T = x.shape[1] if batch_first else x.shape[0]
        packed = pack_padded_sequence(x, lengths.cpu(), batch_first=batch_first, enforce_sorted=False)
        sorted_idx = packed.sorted_indices.to(x.device)
        hs_sorted = tuple(h.index_select(1, sorted_idx) for h in hs)
        hx = hs_sorted if mode == "LSTM" else hs_sorted[0]
        data, *state = fn(packed.data, packed.batch_sizes, hx, weights, has_bias, num_layers, p,
                          train, bidirectional)
        packed_out = type(packed)(data, packed.batch_sizes, packed.sorted_indices, packed.unsorted_indices)
        out, _ = pad_packed_sequence(packed_out, batch_first=batch_first, total_length=T)
        unsorted_idx = packed.unsorted_indices.to(x.device)
        state = [s.index_select(1, unsorted_idx) for s in state]
    if mode == "LSTM":
        return out, (state[0], state[1])
    return out, state[0]


def _fused(mode, x, hs, weights, lengths, num_layers, bidirectional, batch_first, dropout,
           training, has_bias, H, D):
    require_triton(x.device, f"{mode.lower()}(backend='fused') on {x.device.type} tensors")
    G = 4 if mode == "LSTM" else 3
    per_dir = 4 if has_bias else 2
    xt = x.transpose(0, 1) if batch_first else x  # [T, B, I]
    T, B = xt.shape[0], xt.shape[1]
    if lengths is not None:
        lengths = lengths.to(device=x.device, dtype=torch.int64)
    h_n, c_n = [], []
    layer_in = xt
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
            out, hn, cn, _, _ = torch.ops.dtl_fast.lstm_recurrence(gates_x, w_hh, h0, c0, lengths)
            c_n.append(cn)
        else:
            if has_bias:
                b_hn = torch.stack([w[3][2 * H:] for w in ws]).to(dt)
            else:
                b_hn = gates_x.new_zeros(D, H)
            out, hn, _ = torch.ops.dtl_fast.gru_recurrence(gates_x, w_hh, b_hn, h0, lengths)
        h_n.append(hn)
        if dropout > 0 and training and layer < num_layers - 1:
            out = F.dropout(out, float(dropout), training=True)
        layer_in = out
    output = layer_in.transpose(0, 1) if batch_first else layer_in
    h_n = torch.cat(h_n)
    if mode == "LSTM":
        return output, (h_n, torch.cat(c_n))
    return output, h_n


def _dispatch(mode, input, hx, weights, lengths, num_layers, bidirectional, batch_first, dropout,
              training, has_bias, backend):
    backend = resolve_backend(backend)
    kw = dict(lengths=lengths, num_layers=num_layers, bidirectional=bidirectional,
              batch_first=batch_first, dropout=dropout, training=training, has_bias=has_bias)
    if backend == "reference":
        return (_ref.lstm if mode == "LSTM" else _ref.gru)(input, hx, weights, **kw)
    H, D, hs, lengths = _ref.check_all(mode, input, hx, weights, lengths=lengths, num_layers=num_layers,
                                       bidirectional=bidirectional, batch_first=batch_first,
                                       dropout=dropout, has_bias=has_bias)
    args = (mode, input, hs, weights, lengths, num_layers, bidirectional, batch_first, dropout,
            training, has_bias, H, D)
    # float64 has no GPU kernel (the fused float64 path is the interpreter's, for CPU tests).
    if backend == "auto" and (input.device.type != "cuda" or input.dtype == torch.float64):
        return _native(*args)
    return _fused(*args)


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
            "auto": Triton kernels on CUDA tensors, PyTorch's native kernels on the CPU (and
            for float64 CUDA tensors: the fused float64 path exists only in the interpreter).

    Returns:
        (output, (h_n, c_n)): output [T, B, D*H] (or [B, T, D*H]), h_n, c_n [num_layers * D, B, H],
        in input's dtype (under torch.autocast: the autocast dtype). The cell state and every
        accumulation are float32 whatever the input dtype.

    Raises:
        RuntimeError: input feature size != weight_ih_l0 columns, hx of the wrong shape, lengths
            outside [1, T], backend="fused" where Triton cannot run.
        ValueError: wrong rank or dtype, wrong weight count or shapes, devices that differ.
    """
    return _dispatch("LSTM", input, hx, weights, lengths, num_layers, bidirectional, batch_first,
                     dropout, training, has_bias, backend)


def gru(input, hx, weights, *, lengths=None, num_layers: int = 1, bidirectional: bool = False,
        batch_first: bool = False, dropout: float = 0.0, training: bool = False,
        has_bias: bool = True, backend: str | None = None):
    """Multi-layer (bidirectional) GRU, the function torch.nn.GRU computes (gates r, z, n;
    n = tanh(W_in x + b_in + r * (W_hn h + b_hn)), h' = (1 - z) * n + z * h).

    Same arguments as lstm, with hx None or h0 [num_layers * D, B, H] and weights of 3H rows.
    Returns (output [T, B, D*H] (or [B, T, D*H]), h_n [num_layers * D, B, H]) in input's dtype.
    Raises as lstm.
    """
    return _dispatch("GRU", input, hx, weights, lengths, num_layers, bidirectional, batch_first,
                     dropout, training, has_bias, backend)
