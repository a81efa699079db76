"""Eager multi-layer (bidirectional) LSTM and GRU: a plain time-step loop of torch ops, the
numerical ground truth of dtl_fast.ops.lstm / dtl_fast.ops.gru.

The argument checks live here too (not in the ops) so that the reference and every backend of
the ops reject the same bad input with the same message; the ops import them.
"""
from __future__ import annotations

import numbers
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from dtl_fast._checks import as_lengths_tensor, autocast_enabled, check_lengths_range

FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
GATES = {"LSTM": 4, "GRU": 3}


# ----------------------------------------------------------------------------------------------
# Argument checks shared by all backends
# ----------------------------------------------------------------------------------------------

def check_flags(mode: str, *, bidirectional, batch_first, has_bias, training):
    """The functional ops' four flags as Python bools (a NumPy bool is one too); ValueError
    naming the flag otherwise. Before anything reads them: a string "False" is truthy (the
    reference took batch_first="False" as True; torch.lstm refuses it with a TypeError that
    names no argument)."""
    if (type(bidirectional) is bool and type(batch_first) is bool and type(has_bias) is bool
            and type(training) is bool):  # every call but a mistake: ~0.2 us
        return bidirectional, batch_first, has_bias, training
    flags = {"bidirectional": bidirectional, "batch_first": batch_first, "has_bias": has_bias,
             "training": training}
    for flag, value in flags.items():
        if not isinstance(value, (bool, np.bool_)):
            raise ValueError(f"{mode}: {flag} must be a bool, got {value!r} "
                             f"({type(value).__name__})")
    return bool(bidirectional), bool(batch_first), bool(has_bias), bool(training)


# check_rnn_args' verdicts, by everything they read (see _args_key): a call with the key of one
# that passed passes too, so it skips the per-weight loops (~8 us of the ~100 us torch.lstm call
# of a small RNN on the CPU, where backend="auto" runs PyTorch's kernel and must not be slower
# than torch.nn). Bounded: cleared when full.
_PASSED: dict = {}
_PASSED_MAX = 512


def _args_key(mode, input, weights, num_layers, bidirectional, dropout, has_bias):
    """What check_rnn_args' verdict depends on, hashable; None where it cannot be built
    cheaply (a weight that is not a tensor, arguments of unhashable types: the full checks
    run and raise)."""
    if type(weights) not in (list, tuple) or input.dim() == 0:
        return None
    try:
        # (bidirectional and has_bias by truthiness, all the checks read: a tensor passed there
        # is not kept alive by the memo)
        return (mode, input.dtype, input.device, input.dim(), input.shape[-1], num_layers,
                type(num_layers), bool(bidirectional), dropout, type(dropout), bool(has_bias),
                autocast_enabled(input.device.type),
                tuple([(type(w), w.shape, w.dtype, w.device) for w in weights]))
    except (AttributeError, RuntimeError):  # bool() of a tensor that has no one truth value
        return None


def check_rnn_args(mode: str, input, weights, *, num_layers: int, bidirectional: bool,
                   dropout: float, has_bias: bool):
    """Checks input and weights; returns (H, D).

    Raises the exception types torch.nn.LSTM / GRU raise for the same mistakes: RuntimeError
    for a wrong input feature size or hx shape, ValueError for a wrong rank; ValueError for a
    wrong weight list, dtype or device.
    """
    key = None
    if isinstance(input, torch.Tensor) and not torch.compiler.is_compiling():
        key = _args_key(mode, input, weights, num_layers, bidirectional, dropout, has_bias)
        try:
            found = _PASSED.get(key) if key is not None else None
        except TypeError:  # an argument of an unhashable type: the checks say what is wrong
            found = key = None
        if found is not None:
            return found
    H, D = _check_rnn_args(mode, input, weights, num_layers=num_layers,
                           bidirectional=bidirectional, dropout=dropout, has_bias=has_bias)
    if key is not None:
        if len(_PASSED) >= _PASSED_MAX:
            _PASSED.clear()
        _PASSED[key] = (H, D)
    return H, D


def _check_rnn_args(mode: str, input, weights, *, num_layers: int, bidirectional: bool,
                    dropout: float, has_bias: bool):
    """check_rnn_args' checks, every call."""
    name = mode
    if not isinstance(input, torch.Tensor):
        raise ValueError(f"{name}: input must be a torch.Tensor, got {type(input).__name__}")
    if input.dim() != 3:
        raise ValueError(f"{name}: Expected input to be 3D ([T, B, I] or [B, T, I] with "
                         f"batch_first=True), got {input.dim()}D instead")
    if input.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name}: input must be float32, float64, float16 or bfloat16, got {input.dtype}")
    if not isinstance(num_layers, numbers.Integral) or isinstance(num_layers, bool) or num_layers < 1:
        raise ValueError(f"{name}: num_layers must be an integer >= 1, got {num_layers!r}")
    if not isinstance(dropout, numbers.Real) or not 0.0 <= float(dropout) <= 1.0:
        raise ValueError(f"{name}: dropout must be a number in [0, 1], got {dropout!r}")
    D = 2 if bidirectional else 1
    G = GATES[mode]
    per_dir = 4 if has_bias else 2
    if isinstance(weights, torch.Tensor) or not isinstance(weights, Sequence):
        raise ValueError(f"{name}: weights must be a list of tensors in torch.nn.{mode}._flat_weights "
                         f"order, got {type(weights).__name__}")
    expected = num_layers * D * per_dir
    if len(weights) != expected:
        raise ValueError(
            f"{name}: weights must hold {expected} tensors (num_layers={num_layers} x directions={D} x "
            f"{'(w_ih, w_hh, b_ih, b_hh)' if has_bias else '(w_ih, w_hh)'}), got {len(weights)}")
    for i, w in enumerate(weights):
        if not isinstance(w, torch.Tensor):
            raise ValueError(f"{name}: weights[{i}] must be a tensor, got {type(w).__name__}")
        if w.device != input.device:
            raise ValueError(f"{name}: weights[{i}] is on {w.device}, input on {input.device}")
        if w.dtype not in FLOAT_DTYPES:
            raise ValueError(f"{name}: weights[{i}] must be a float tensor, got {w.dtype}")
    w_hh0 = weights[1]
    if w_hh0.dim() != 2:
        raise ValueError(f"{name}: weights[1] (weight_hh_l0) must be 2-D [{G}*H, H], got {tuple(w_hh0.shape)}")
    H = w_hh0.shape[1]
    if H < 1:
        raise ValueError(f"{name}: hidden size (weight_hh_l0.shape[1]) must be >= 1, got {H}")
    if w_hh0.shape[0] != G * H:  # else the first weight checked against this H took the blame
        raise ValueError(f"{name}: weights[1] (weight_hh_l0) must have shape {(G * H, H)} "
                         f"({G}*H rows for its H = {H} columns), got {tuple(w_hh0.shape)}")
    # torch's check and words first: the input against weight_ih_l0's columns (what torch.nn
    # calls input_size); so a wrong weight_ih_l0 is named as torch names it, not the reverse
    # direction's weight checked against it below
    w_ih0 = weights[0]
    if w_ih0.dim() == 2 and input.shape[-1] != w_ih0.shape[1]:
        raise RuntimeError(f"input.size(-1) must be equal to input_size. Expected {w_ih0.shape[1]}, "
                           f"got {input.shape[-1]}")
    for layer in range(num_layers):
        # every direction of layer 0 reads the input: its columns are the input's, not each
        # weight's own, which let a reverse one of any width through (PyTorch's CPU kernel
        # then read past its end: NaN)
        in_size = input.shape[-1] if layer == 0 else D * H
        for d in range(D):
            sfx = f"l{layer}" + ("_reverse" if d else "")
            base = (layer * D + d) * per_dir
            shapes = [(f"weight_ih_{sfx}", (G * H, in_size)),
                      (f"weight_hh_{sfx}", (G * H, H))]
            if has_bias:
                shapes += [(f"bias_ih_{sfx}", (G * H,)), (f"bias_hh_{sfx}", (G * H,))]
            for j, (wname, shape) in enumerate(shapes):
                w = weights[base + j]
                if tuple(w.shape) != shape:
                    raise ValueError(f"{name}: weights[{base + j}] ({wname}) must have shape "
                                     f"{shape}, got {tuple(w.shape)}")
    if not autocast_enabled(input.device.type):
        for i, w in enumerate(weights):
            if w.dtype != input.dtype:
                raise ValueError(f"{name}: weights[{i}] has dtype {w.dtype}, input {input.dtype}: "
                                 "they must match (outside torch.autocast)")
    return H, D


def check_hx(mode: str, hx, input, H: int, D: int, num_layers: int, batch_first: bool):
    """Returns hx as a tuple of tensors ((h0, c0) for LSTM, (h0,) for GRU) or None."""
    if hx is None:
        return None
    B = input.shape[0] if batch_first else input.shape[1]
    expected = (num_layers * D, B, H)
    if mode == "LSTM":
        if isinstance(hx, torch.Tensor) or not isinstance(hx, (tuple, list)) or len(hx) != 2:
            raise ValueError("LSTM: hx must be None or a tuple (h0, c0) of tensors "
                             f"[num_layers * num_directions, B, H] = {list(expected)}")
        hs = tuple(hx)
        names = ("hidden[0]", "hidden[1]")
    else:
        if not isinstance(hx, torch.Tensor):
            raise ValueError("GRU: hx must be None or a tensor h0 [num_layers * num_directions, B, H] "
                             f"= {list(expected)}, got {type(hx).__name__}")
        hs = (hx,)
        names = ("hidden",)
    for h, nm in zip(hs, names):
        if not isinstance(h, torch.Tensor):
            raise ValueError(f"{mode}: {nm} must be a tensor, got {type(h).__name__}")
        if tuple(h.shape) != expected:
            raise RuntimeError(f"Expected {nm} size {expected}, got {list(h.shape)}")
        if h.dtype not in FLOAT_DTYPES:
            raise ValueError(f"{mode}: {nm} must be a float tensor, got {h.dtype}")
        if h.dtype != input.dtype and not autocast_enabled(input.device.type):
            raise ValueError(f"{mode}: {nm} has dtype {h.dtype}, input {input.dtype}: they must "
                             "match (outside torch.autocast)")
        if h.device != input.device:
            raise ValueError(f"{mode}: {nm} is on {h.device}, input on {input.device}")
    return hs


def check_lengths(mode: str, lengths, input, batch_first: bool, *, check_values: bool = True):
    """Turns lengths (None, a sequence of ints, an integer NumPy array or an integer tensor [B]
    on the CPU or on input's device) into None or an int64 tensor on the same device it came
    from, and checks 1 <= lengths[b] <= T (RuntimeError, as pack_padded_sequence raises)."""
    if lengths is None:
        return None
    B, T = (input.shape[0], input.shape[1]) if batch_first else (input.shape[1], input.shape[0])
    lengths = as_lengths_tensor(lengths, B, input.device, owner=mode, device_name="input",
                                overflow_error=RuntimeError)
    if lengths.dtype != torch.int64:
        lengths = lengths.to(torch.int64)
    if check_values:
        # pack_padded_sequence raises RuntimeError for lengths <= 0.
        check_lengths_range(lengths, 1, T, owner=mode, error=RuntimeError,
                            span=f"[1, T] = [1, {T}] (as pack_padded_sequence requires)")
    return lengths


def check_all(mode, input, hx, weights, *, lengths, num_layers, bidirectional, batch_first,
              dropout, has_bias, check_length_values=True):
    """All checks; returns (H, D, hx tuple or None, lengths int64 tensor or None)."""
    H, D = check_rnn_args(mode, input, weights, num_layers=num_layers,
                          bidirectional=bidirectional, dropout=dropout, has_bias=has_bias)
    if input.shape[1 if batch_first else 0] == 0:  # torch's own words and exception type
        raise RuntimeError("Expected sequence length to be larger than 0 in RNN "
                           f"(input of shape {tuple(input.shape)}, batch_first={batch_first})")
    hs = check_hx(mode, hx, input, H, D, num_layers, batch_first)
    lengths = check_lengths(mode, lengths, input, batch_first, check_values=check_length_values)
    return H, D, hs, lengths


# ----------------------------------------------------------------------------------------------
# The eager loop
# ----------------------------------------------------------------------------------------------

def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _cell(mode, x_t, h, c, w_ih, w_hh, b_ih, b_hh):
    gx = x_t @ w_ih.t()
    gh = h @ w_hh.t()
    if b_ih is not None:
        gx = gx + b_ih
        gh = gh + b_hh
    if mode == "LSTM":
        i, f, g, o = (gx + gh).chunk(4, dim=-1)
        i, f, g, o = torch.sigmoid(i), torch.sigmoid(f), torch.tanh(g), torch.sigmoid(o)
        c_new = f * c + i * g
        return o * torch.tanh(c_new), c_new
    xr, xz, xn = gx.chunk(3, dim=-1)
    hr, hz, hn = gh.chunk(3, dim=-1)
    r = torch.sigmoid(xr + hr)
    z = torch.sigmoid(xz + hz)
    n = torch.tanh(xn + r * hn)
    return (1 - z) * n + z * h, None


def _run(mode, input, hx, weights, *, lengths, num_layers, bidirectional, batch_first, dropout,
         training, has_bias):
    bidirectional, batch_first, has_bias, training = check_flags(
        mode, bidirectional=bidirectional, batch_first=batch_first, has_bias=has_bias,
        training=training)
    H, D, hs, lengths = check_all(mode, input, hx, weights, lengths=lengths, num_layers=num_layers,
                                  bidirectional=bidirectional, batch_first=batch_first,
                                  dropout=dropout, has_bias=has_bias)
    kw = dict(lengths=lengths, num_layers=num_layers, bidirectional=bidirectional,
              batch_first=batch_first, dropout=dropout, training=training, has_bias=has_bias)
    dev_type = input.device.type
    if autocast_enabled(dev_type) and input.dtype != torch.float64:
        # What autocast does to the fused path: input, hx and weights (any float but float64, as
        # autocast casts) rounded to the autocast dtype, the result in it. (PyTorch's cuDNN path
        # rounds to float16 whatever the autocast dtype; the reference follows the fused path.) The loop itself then runs as for a half input, with autocast off so
        # that its own matmuls are not cast a second time.
        adt = torch.get_autocast_dtype(dev_type)
        cast = lambda t: t if t.dtype == torch.float64 else t.to(adt)  # noqa: E731
        with torch.autocast(dev_type, enabled=False):
            return _loop(mode, cast(input), None if hs is None else tuple(map(cast, hs)),
                         [cast(w) for w in weights], H, D, **kw)
    return _loop(mode, input, hs, weights, H, D, **kw)


def _loop(mode, input, hs, weights, H, D, *, lengths, num_layers, bidirectional, batch_first,
          dropout, training, has_bias):
    dtype = input.dtype
    cdt = _compute_dtype(dtype)
    x = input.transpose(0, 1) if batch_first else input  # [T, B, I]
    T, B = x.shape[0], x.shape[1]
    dev = input.device
    if hs is None:
        zeros = x.new_zeros(num_layers * D, B, H, dtype=cdt)
        h0 = zeros
        c0 = zeros if mode == "LSTM" else None
    else:
        h0 = hs[0].to(cdt)
        c0 = hs[1].to(cdt) if mode == "LSTM" else None
    if lengths is None:
        valid = torch.ones(T, B, 1, dtype=torch.bool, device=dev)
    else:
        valid = (torch.arange(T, device=dev)[:, None] < lengths.to(dev)[None, :])[..., None]
        # Padded steps are never read: without this a NaN / inf there would still flow back as
        # 0 * NaN through x_t @ W_ih (torch.where only zeroes the gradient of the state) into
        # the weight gradients and x.grad. Deeper layers read outputs that are zero there.
        x = torch.where(valid, x, 0)
    per_dir = 4 if has_bias else 2
    h_n, c_n = [], []
    layer_in = x
    for layer in range(num_layers):
        outs = []
        for d in range(D):
            idx = layer * D + d
            ws = [w.to(cdt) for w in weights[idx * per_dir:(idx + 1) * per_dir]]
            w_ih, w_hh = ws[0], ws[1]
            b_ih, b_hh = (ws[2], ws[3]) if has_bias else (None, None)
            h = h0[idx]
            c = c0[idx] if mode == "LSTM" else None
            steps = range(T) if d == 0 else range(T - 1, -1, -1)
            out_t = [None] * T
            xin = layer_in.to(cdt)
            for t in steps:
                h_new, c_new = _cell(mode, xin[t], h, c, w_ih, w_hh, b_ih, b_hh)
                # Padded steps leave the state alone: the forward direction's state stops at
                # each sequence's last valid step, the reverse one starts at it.
                h = torch.where(valid[t], h_new, h)
                if mode == "LSTM":
                    c = torch.where(valid[t], c_new, c)
                out_t[t] = torch.where(valid[t], h, torch.zeros_like(h))
            outs.append(torch.stack(out_t) if T > 0 else xin.new_zeros(0, B, H))
            h_n.append(h)
            if mode == "LSTM":
                c_n.append(c)
        layer_out = torch.cat(outs, dim=-1).to(dtype)  # [T, B, D*H]
        if dropout > 0 and training and layer < num_layers - 1:
            layer_out = F.dropout(layer_out, dropout, training=True)
        layer_in = layer_out
    output = layer_in.transpose(0, 1) if batch_first else layer_in
    h_n = torch.stack(h_n).to(dtype)
    if mode == "LSTM":
        return output, (h_n, torch.stack(c_n).to(dtype))
    return output, h_n


def lstm(input, hx, weights, *, lengths=None, num_layers: int = 1, bidirectional: bool = False,
         batch_first: bool = False, dropout: float = 0.0, training: bool = False,
         has_bias: bool = True):
    """Multi-layer (bidirectional) LSTM as torch.nn.LSTM computes it, one time step at a time.

    Args:
        input: [T, B, I] (or [B, T, I] with batch_first) float32 / float64 / float16 / bfloat16.
        hx: None (zeros) or (h0, c0), each [num_layers * D, B, H] (D = 2 if bidirectional),
            index = layer * D + direction.
        weights: torch.nn.LSTM._flat_weights order: per layer, per direction (forward, reverse):
            w_ih [4H, I_l], w_hh [4H, H], then b_ih [4H], b_hh [4H] if has_bias (gates i, f, g, o).
        lengths: None, or [B] integers in [1, T] (list or tensor on the CPU or input's device):
            steps t >= lengths[b] are padding (zero output); the reverse direction starts at
            each sequence's last valid step; h_n / c_n come from the last valid step.
        dropout, training: F.dropout on each layer's output but the last, when training.

    Returns:
        output [T, B, D*H] (or [B, T, D*H]) and (h_n, c_n), each [num_layers * D, B, H], all in
        input's dtype; half inputs are computed in float32. Under torch.autocast, input, hx and
        weights (unless float64) are first rounded to the autocast dtype, which the results are
        then in (as the fused path; PyTorch's cuDNN path rounds to float16 whatever the autocast
        dtype).
    """
    return _run("LSTM", input, hx, weights, lengths=lengths, num_layers=num_layers,
                bidirectional=bidirectional, batch_first=batch_first, dropout=dropout,
                training=training, has_bias=has_bias)


def gru(input, hx, weights, *, lengths=None, num_layers: int = 1, bidirectional: bool = False,
        batch_first: bool = False, dropout: float = 0.0, training: bool = False,
        has_bias: bool = True):
    """Multi-layer (bidirectional) GRU as torch.nn.GRU computes it, one time step at a time:
    r = σ(W_ir x + b_ir + W_hr h + b_hr), z likewise, n = tanh(W_in x + b_in + r * (W_hn h + b_hn)),
    h' = (1 - z) * n + z * h.

    Same arguments as lstm, with hx None or h0 [num_layers * D, B, H] and weights of 3H rows
    (gates r, z, n). Returns output [T, B, D*H] (or [B, T, D*H]) and h_n [num_layers * D, B, H]
    in input's dtype (under torch.autocast as lstm).
    """
    return _run("GRU", input, hx, weights, lengths=lengths, num_layers=num_layers,
                bidirectional=bidirectional, batch_first=batch_first, dropout=dropout,
                training=training, has_bias=has_bias)
