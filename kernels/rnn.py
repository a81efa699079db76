"""Triton kernels of the LSTM / GRU recurrence (forward and backward, both directions of a
layer in one launch) and their host launchers. No autograd here: dtl_fast.ops.rnn registers
these as custom ops.

Layout (all contiguous):
    gates_x [T, B, D, G*H]   input projection of every step and direction (G = 4 LSTM, 3 GRU)
    w_hh    [D, G*H, H]      recurrent weights (the forward kernels read a transposed copy
                             [D, H, G*H] so each tile load is contiguous along the gate axis)
    out     [T, B, D*H]      = [T, B, D, H]: h of every step; also the h_{t-1} the next step reads
    h0, c0, h_n, c_n [D, B, H]

One program owns one direction and BLOCK_B batch rows for all T steps and all H hidden units:
the time loop runs inside the kernel; each step loops over hidden blocks (BLOCK_H) and, inside,
over the contraction (BLOCK_K) with tl.dot; h_{t-1} is re-read from global memory (written by
other threads of the same program in the previous step), with tl.debug_barrier() between steps.
Rows past B are masked. The cell state and all accumulation are float32 (float64 for float64).
The cell math of a step (gates, state update, and its gradient) is kernels/rnn_cell.py's,
shared with the persistent kernels (kernels/rnn_persistent.py).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from dtl_fast.kernels._launch import launch
from dtl_fast.kernels.rnn_cell import gru_bwd_cell, gru_fwd_cell, lstm_bwd_cell, lstm_fwd_cell

# T, B, D are not specialised on their values (== 1), so the batch / length / direction count
# never changes which kernel runs. H and the pointers keep Triton's divisibility-by-16
# specialisation (aligned, wider weight loads): tests/test_rnn_compile.py compiles each
# configuration with and without those hints.
_NO_SPEC = ["T", "B", "D"]

# ----------------------------------------------------------------------------------------------
# Device helpers
# ----------------------------------------------------------------------------------------------


@triton.jit
def _dot(a, b, acc, ALLOW_TF32: tl.constexpr, DOT_F32: tl.constexpr):
    if DOT_F32:
        # Triton's interpreter multiplies bfloat16 tiles wrongly (triton 3.8); upcast there.
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    elif ALLOW_TF32:
        return tl.dot(a, b, acc, input_precision="tf32")
    else:
        # out_dtype: triton 3.6 defaults it to float32 and asserts acc matches (the float64
        # loop in the interpreter); 3.8 takes acc's dtype. The same IR for float32.
        return tl.dot(a, b, acc, input_precision="ieee", out_dtype=acc.dtype)


@triton.jit
def _zeros(BB: tl.constexpr, BN: tl.constexpr, F64: tl.constexpr):
    if F64:
        return tl.zeros([BB, BN], dtype=tl.float64)
    else:
        return tl.zeros([BB, BN], dtype=tl.float32)


@triton.jit
def _dgates_dot_w(dg_ptr, g_base, row_m, w_ptr, d, G, H, cols, col_ok, rk,
                  BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
                  ALLOW_TF32: tl.constexpr, DOT_F32: tl.constexpr, F64: tl.constexpr):
    """dgates[rows, :G] @ W_hh[d, :G, cols] for one hidden block: the recurrent part of dh
    (g_base [BLOCK_B] indexes the rows' gate gradients; rows outside row_m contribute 0)."""
    acc = _zeros(BLOCK_B, BLOCK_H, F64)
    for k0 in range(0, G, BLOCK_K):
        ks = k0 + rk
        k_ok = ks < G
        dgn = tl.load(dg_ptr + g_base[:, None] + ks[None, :],
                      mask=row_m[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptr + (d * G + ks[:, None]) * H + cols[None, :],
                    mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = _dot(dgn, w, acc, ALLOW_TF32, DOT_F32)
    return acc


@triton.jit
def _row_state(t, d, seq_len, row_ok):
    """Per batch row at step t of direction d: (valid, first, last) in processing order. The
    forward direction runs t = 0 .. len-1, the reverse one t = len-1 .. 0."""
    valid = row_ok & (t < seq_len)
    at0 = t == 0
    atl = t == seq_len - 1
    first = valid & tl.where(d == 0, at0, atl)
    last = valid & tl.where(d == 0, atl, at0)
    return valid, first, last


# ----------------------------------------------------------------------------------------------
# LSTM
# ----------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=_NO_SPEC)
def _lstm_fwd_kernel(gx_ptr, wt_ptr, h0_ptr, c0_ptr, len_ptr,
                     out_ptr, hn_ptr, cn_ptr, act_ptr, call_ptr,
                     T, B, H, D,
                     BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr,
                     BLOCK_K: tl.constexpr, ALLOW_TF32: tl.constexpr, F64: tl.constexpr,
                     DOT_F32: tl.constexpr):
    d = tl.program_id(0).to(tl.int64)
    rows = tl.program_id(1).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B).to(tl.int64)
    row_ok = rows < B
    # Always a lengths tensor (the launcher fills it with T when there is none): one load per
    # row per launch, and no HAS_LENGTHS variant to compile.
    seq_len = tl.load(len_ptr + rows, mask=row_ok, other=1).to(tl.int64)
    G = 4 * H
    rn = tl.arange(0, BLOCK_H)
    rk = tl.arange(0, BLOCK_K)
    st_base = (d * B + rows) * H  # [BLOCK_B] into [D, B, H]
    for s in range(0, T):
        t = s + d * (T - 1 - 2 * s)  # processing order -> time index (int64)
        tp = t - 1 + 2 * d  # the step processed before t
        valid, first, last = _row_state(t, d, seq_len, row_ok)
        use_prev = valid & ~first
        prev_base = ((tp * B + rows) * D + d) * H  # into [T, B, D, H]
        # h_{t-1}: h0 at each row's first step, else the previous step's output.
        h_row = tl.where(first, h0_ptr + st_base, out_ptr + prev_base)
        cur_base = ((t * B + rows) * D + d) * H
        gx_base = ((t * B + rows) * D + d) * G  # into [T, B, D, G]
        for n0 in range(0, H, BLOCK_H):
            cols = n0 + rn
            col_ok = cols < H
            acc_i = _zeros(BLOCK_B, BLOCK_H, F64)
            acc_f = _zeros(BLOCK_B, BLOCK_H, F64)
            acc_g = _zeros(BLOCK_B, BLOCK_H, F64)
            acc_o = _zeros(BLOCK_B, BLOCK_H, F64)
            for k0 in range(0, H, BLOCK_K):
                ks = k0 + rk
                k_ok = ks < H
                hp = tl.load(h_row[:, None] + ks[None, :], mask=valid[:, None] & k_ok[None, :], other=0.0)
                w_p = wt_ptr + (d * H + ks[:, None]) * G + cols[None, :]
                w_m = k_ok[:, None] & col_ok[None, :]
                acc_i = _dot(hp, tl.load(w_p, mask=w_m, other=0.0), acc_i, ALLOW_TF32, DOT_F32)
                acc_f = _dot(hp, tl.load(w_p + H, mask=w_m, other=0.0), acc_f, ALLOW_TF32, DOT_F32)
                acc_g = _dot(hp, tl.load(w_p + 2 * H, mask=w_m, other=0.0), acc_g, ALLOW_TF32, DOT_F32)
                acc_o = _dot(hp, tl.load(w_p + 3 * H, mask=w_m, other=0.0), acc_o, ALLOW_TF32, DOT_F32)
            lstm_fwd_cell(acc_i, acc_f, acc_g, acc_o, gx_ptr, c0_ptr, out_ptr, hn_ptr, cn_ptr, act_ptr,
                          call_ptr, gx_base, st_base, cur_base, prev_base, cols, col_ok,
                          row_ok, valid, first, last, use_prev, H)
        # The next step reads this step's h and c, written by other threads of this program.
        tl.debug_barrier()


@triton.jit(do_not_specialize=_NO_SPEC)
def _lstm_bwd_kernel(gout_ptr, ghn_ptr, gcn_ptr, w_ptr, c0_ptr, act_ptr, call_ptr, len_ptr,
                     dg_ptr, dh0_ptr, dc0_ptr, buf_ptr,
                     T, B, H, D,
                     BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr,
                     BLOCK_K: tl.constexpr, ALLOW_TF32: tl.constexpr, F64: tl.constexpr,
                     DOT_F32: tl.constexpr):
    """Steps in reverse processing order. At step t (rows valid there):
        dh = grad_out[t] + (dgates[t_next] @ W_hh, or grad_h_n at the last valid step)
        dc = (dc[t_next] * f[t_next], or grad_c_n at the last valid step) + dh * o * (1 - tanh(c)^2)
        dgates[t] = [dc*g*i(1-i), dc*c_prev*f(1-f), dc*i*(1-g^2), dh*tanh(c)*o(1-o)]
    dc * f goes through a ping-pong buffer [2, D, B, H] (padded steps pass it on unchanged);
    after the loop dh0 = dgates[t_first] @ W_hh and dc0 = the buffer."""
    d = tl.program_id(0).to(tl.int64)
    rows = tl.program_id(1).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B).to(tl.int64)
    row_ok = rows < B
    # Always a lengths tensor (the launcher fills it with T when there is none): one load per
    # row per launch, and no HAS_LENGTHS variant to compile.
    seq_len = tl.load(len_ptr + rows, mask=row_ok, other=1).to(tl.int64)
    G = 4 * H
    DBH = (d * 0 + D) * B * H  # int64 (d is), whatever JIT specialises D, B, H to
    rn = tl.arange(0, BLOCK_H)
    rk = tl.arange(0, BLOCK_K)
    st_base = (d * B + rows) * H
    for s in range(0, T):
        t = (T - 1 - s) + d * (2 * s - T + 1)
        tn = t + 1 - 2 * d  # processed after t in the forward pass
        tp = t - 1 + 2 * d  # processed before t in the forward pass
        valid, first, last = _row_state(t, d, seq_len, row_ok)
        from_next = valid & ~last
        use_prev = valid & ~first
        next_gbase = ((tn * B + rows) * D + d) * G
        gbase = ((t * B + rows) * D + d) * G
        cur_base = ((t * B + rows) * D + d) * H
        prev_base = ((tp * B + rows) * D + d) * H
        rd = ((s + 1) % 2) * DBH
        wr = (s % 2) * DBH
        for n0 in range(0, H, BLOCK_H):
            cols = n0 + rn
            col_ok = cols < H
            acc = _dgates_dot_w(dg_ptr, next_gbase, from_next, w_ptr, d, G, H, cols, col_ok, rk,
                                BLOCK_B, BLOCK_H, BLOCK_K, ALLOW_TF32, DOT_F32, F64)
            lstm_bwd_cell(acc, gout_ptr, ghn_ptr, gcn_ptr, c0_ptr, act_ptr, call_ptr, dg_ptr, buf_ptr,
                          rd, wr, gbase, st_base, cur_base, prev_base, cols, col_ok,
                          row_ok, valid, first, last, use_prev, H)
        tl.debug_barrier()
    # Gradients of h0 / c0: from each row's first processed step.
    t_first = tl.where(d == 0, 0, seq_len - 1)
    first_gbase = ((t_first * B + rows) * D + d) * G
    fin = ((T - 1) % 2) * DBH
    for n0 in range(0, H, BLOCK_H):
        cols = n0 + rn
        col_ok = cols < H
        acc = _dgates_dot_w(dg_ptr, first_gbase, row_ok, w_ptr, d, G, H, cols, col_ok, rk,
                            BLOCK_B, BLOCK_H, BLOCK_K, ALLOW_TF32, DOT_F32, F64)
        sm = row_ok[:, None] & col_ok[None, :]
        st = st_base[:, None] + cols[None, :]
        tl.store(dh0_ptr + st, acc, mask=sm)
        tl.store(dc0_ptr + st, tl.load(buf_ptr + fin + st, mask=sm, other=0.0), mask=sm)


# ----------------------------------------------------------------------------------------------
# GRU
# ----------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=_NO_SPEC)
def _gru_fwd_kernel(gx_ptr, wt_ptr, bhn_ptr, h0_ptr, len_ptr,
                    out_ptr, hn_ptr, act_ptr,
                    T, B, H, D,
                    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr,
                    BLOCK_K: tl.constexpr, ALLOW_TF32: tl.constexpr, F64: tl.constexpr,
                     DOT_F32: tl.constexpr):
    d = tl.program_id(0).to(tl.int64)
    rows = tl.program_id(1).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B).to(tl.int64)
    row_ok = rows < B
    # Always a lengths tensor (the launcher fills it with T when there is none): one load per
    # row per launch, and no HAS_LENGTHS variant to compile.
    seq_len = tl.load(len_ptr + rows, mask=row_ok, other=1).to(tl.int64)
    G = 3 * H
    G4 = 4 * H
    rn = tl.arange(0, BLOCK_H)
    rk = tl.arange(0, BLOCK_K)
    st_base = (d * B + rows) * H
    for s in range(0, T):
        t = s + d * (T - 1 - 2 * s)
        tp = t - 1 + 2 * d
        valid, first, last = _row_state(t, d, seq_len, row_ok)
        prev_base = ((tp * B + rows) * D + d) * H
        h_row = tl.where(first, h0_ptr + st_base, out_ptr + prev_base)
        cur_base = ((t * B + rows) * D + d) * H
        gx_base = ((t * B + rows) * D + d) * G
        act_base = ((t * B + rows) * D + d) * G4
        for n0 in range(0, H, BLOCK_H):
            cols = n0 + rn
            col_ok = cols < H
            acc_r = _zeros(BLOCK_B, BLOCK_H, F64)
            acc_z = _zeros(BLOCK_B, BLOCK_H, F64)
            acc_n = _zeros(BLOCK_B, BLOCK_H, F64)
            for k0 in range(0, H, BLOCK_K):
                ks = k0 + rk
                k_ok = ks < H
                hp = tl.load(h_row[:, None] + ks[None, :], mask=valid[:, None] & k_ok[None, :], other=0.0)
                w_p = wt_ptr + (d * H + ks[:, None]) * G + cols[None, :]
                w_m = k_ok[:, None] & col_ok[None, :]
                acc_r = _dot(hp, tl.load(w_p, mask=w_m, other=0.0), acc_r, ALLOW_TF32, DOT_F32)
                acc_z = _dot(hp, tl.load(w_p + H, mask=w_m, other=0.0), acc_z, ALLOW_TF32, DOT_F32)
                acc_n = _dot(hp, tl.load(w_p + 2 * H, mask=w_m, other=0.0), acc_n, ALLOW_TF32, DOT_F32)
            b_hn = tl.load(bhn_ptr + d * H + cols, mask=col_ok, other=0.0)
            gru_fwd_cell(acc_r, acc_z, acc_n, b_hn, gx_ptr, out_ptr, hn_ptr, act_ptr, h_row,
                         gx_base, act_base, st_base, cur_base, cols, col_ok, row_ok, valid, last, H,
                         "", False)
        tl.debug_barrier()


@triton.jit(do_not_specialize=_NO_SPEC)
def _gru_bwd_kernel(gout_ptr, ghn_ptr, w_ptr, h0_ptr, out_ptr, act_ptr, len_ptr,
                    dgx_ptr, dgh_ptr, dh0_ptr, buf_ptr,
                    T, B, H, D,
                    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr,
                    BLOCK_K: tl.constexpr, ALLOW_TF32: tl.constexpr, F64: tl.constexpr,
                     DOT_F32: tl.constexpr):
    """Steps in reverse processing order. At step t (rows valid there):
        dh = grad_out[t] + (dgh[t_next] @ W_hh + dh[t_next] * z[t_next], or grad_h_n at the
             last valid step)
        dz = dh (h_prev - n) z(1-z); dn = dh (1-z)(1-n^2); dr = dn hn_pre r(1-r)
        dgx[t] = [dr, dz, dn]; dgh[t] = [dr, dz, dn * r]
    dh * z goes through a ping-pong buffer [2, D, B, H]; after the loop
    dh0 = buffer + dgh[t_first] @ W_hh."""
    d = tl.program_id(0).to(tl.int64)
    rows = tl.program_id(1).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B).to(tl.int64)
    row_ok = rows < B
    # Always a lengths tensor (the launcher fills it with T when there is none): one load per
    # row per launch, and no HAS_LENGTHS variant to compile.
    seq_len = tl.load(len_ptr + rows, mask=row_ok, other=1).to(tl.int64)
    G = 3 * H
    G4 = 4 * H
    DBH = (d * 0 + D) * B * H  # int64 (d is), whatever JIT specialises D, B, H to
    rn = tl.arange(0, BLOCK_H)
    rk = tl.arange(0, BLOCK_K)
    st_base = (d * B + rows) * H
    for s in range(0, T):
        t = (T - 1 - s) + d * (2 * s - T + 1)
        tn = t + 1 - 2 * d
        tp = t - 1 + 2 * d
        valid, first, last = _row_state(t, d, seq_len, row_ok)
        from_next = valid & ~last
        next_gbase = ((tn * B + rows) * D + d) * G
        gbase = ((t * B + rows) * D + d) * G
        act_base = ((t * B + rows) * D + d) * G4
        cur_base = ((t * B + rows) * D + d) * H
        prev_base = ((tp * B + rows) * D + d) * H
        h_row = tl.where(first, h0_ptr + st_base, out_ptr + prev_base)
        rd = ((s + 1) % 2) * DBH
        wr = (s % 2) * DBH
        for n0 in range(0, H, BLOCK_H):
            cols = n0 + rn
            col_ok = cols < H
            acc = _dgates_dot_w(dgh_ptr, next_gbase, from_next, w_ptr, d, G, H, cols, col_ok, rk,
                                BLOCK_B, BLOCK_H, BLOCK_K, ALLOW_TF32, DOT_F32, F64)
            gru_bwd_cell(acc, gout_ptr, ghn_ptr, act_ptr, dgx_ptr, dgh_ptr, buf_ptr, h_row,
                         rd, wr, gbase, act_base, st_base, cur_base, cols, col_ok,
                         row_ok, valid, last, H)
        tl.debug_barrier()
    t_first = tl.where(d == 0, 0, seq_len - 1)
    first_gbase = ((t_first * B + rows) * D + d) * G
    fin = ((T - 1) % 2) * DBH
    for n0 in range(0, H, BLOCK_H):
        cols = n0 + rn
        col_ok = cols < H
        acc = _dgates_dot_w(dgh_ptr, first_gbase, row_ok, w_ptr, d, G, H, cols, col_ok, rk,
                            BLOCK_B, BLOCK_H, BLOCK_K, ALLOW_TF32, DOT_F32, F64)
        sm = row_ok[:, None] & col_ok[None, :]
        st = st_base[:, None] + cols[None, :]
        tl.store(dh0_ptr + st, acc + tl.load(buf_ptr + fin + st, mask=sm, other=0.0), mask=sm)


# ----------------------------------------------------------------------------------------------
# Launch configurations: one source of truth for the launchers and the AOT compile test
# ----------------------------------------------------------------------------------------------

KERNELS = ("_lstm_fwd_kernel", "_lstm_bwd_kernel", "_gru_fwd_kernel", "_gru_bwd_kernel")
# The dtypes the kernels run on a GPU. float64 runs only in the interpreter (CPU tests).
GPU_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_TY = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64"}
_SIG_ORDER = {
    # name -> list of (argument, kind): "x" = tensor of the compute dtype, "a" = float32 /
    # float64 accumulator tensor, "i64" = int64 tensor, "int" = scalar
    "_lstm_fwd_kernel": [("gx_ptr", "x"), ("wt_ptr", "x"), ("h0_ptr", "x"), ("c0_ptr", "x"),
                         ("len_ptr", "i64"), ("out_ptr", "x"), ("hn_ptr", "x"), ("cn_ptr", "x"),
                         ("act_ptr", "a"), ("call_ptr", "a")],
    "_lstm_bwd_kernel": [("gout_ptr", "x"), ("ghn_ptr", "x"), ("gcn_ptr", "x"), ("w_ptr", "x"),
                         ("c0_ptr", "x"), ("act_ptr", "a"), ("call_ptr", "a"), ("len_ptr", "i64"),
                         ("dg_ptr", "x"), ("dh0_ptr", "a"), ("dc0_ptr", "a"), ("buf_ptr", "a")],
    "_gru_fwd_kernel": [("gx_ptr", "x"), ("wt_ptr", "x"), ("bhn_ptr", "x"), ("h0_ptr", "x"),
                        ("len_ptr", "i64"), ("out_ptr", "x"), ("hn_ptr", "x"), ("act_ptr", "a")],
    "_gru_bwd_kernel": [("gout_ptr", "x"), ("ghn_ptr", "x"), ("w_ptr", "x"), ("h0_ptr", "x"),
                        ("out_ptr", "x"), ("act_ptr", "a"), ("len_ptr", "i64"), ("dgx_ptr", "x"),
                        ("dgh_ptr", "x"), ("dh0_ptr", "a"), ("buf_ptr", "a")],
}
# Caps BLOCK_H and BLOCK_K (>= 16) when set: an interpreter-only test knob (several hidden and
# contraction blocks at tiny H); never set on a GPU, so not among the compiled configurations.
MAX_BLOCK: int | None = None
_CONSTEXPRS = ("BLOCK_B", "BLOCK_H", "BLOCK_K", "ALLOW_TF32", "F64", "DOT_F32")
# One tile shape for every H and B: BLOCK_B = 16 rows (tl.dot needs >= 16; rows past B are
# masked), BLOCK_H = BLOCK_K = 32 (the loops over hidden / contraction blocks make the tile
# independent of H; masks handle H that is not a multiple of 32). 64-wide tiles with four gate
# accumulators spilled registers (AOT compiles, sm_90).
BLOCK_B, BLOCK_H, BLOCK_K = 16, 32, 32


def _num_warps(kernel: str, dtype: torch.dtype, tf32: bool) -> int:
    """From AOT compiles (tests/test_rnn_compile.py, triton 3.8, sm_80 and sm_90): the warp
    count at which each kernel compiles without spills. At 4 warps the full-precision LSTM
    forward (FMA dot, four accumulators) spills, and the GRU forward and the TF32 LSTM backward
    spill a few bytes on sm_80; at 8 warps the TF32 / half LSTM forward does."""
    if kernel == "_lstm_fwd_kernel":
        return 8 if dtype in (torch.float32, torch.float64) and not tf32 else 4
    if kernel in ("_lstm_bwd_kernel", "_gru_fwd_kernel"):
        return 8
    return 4


def pick_config(kernel: str, dtype: torch.dtype, *, allow_tf32: bool, interpret: bool = False) -> dict:
    """The launch configuration the launcher uses: kernel, signature, constexprs, num_warps,
    num_stages. It depends only on the kernel, the dtype and (float32) TF32: lengths are a
    runtime tensor (all T when the caller gives none), and the tile shape is fixed, so the
    whole set is small enough to compile ahead of time (launch_configs).

    F64 (float64) and DOT_F32 (bfloat16 upcast before tl.dot: triton 3.8's interpreter
    multiplies bfloat16 tiles wrongly) are interpreter-only variants, never compiled for a GPU.
    """
    if kernel not in KERNELS:
        raise ValueError(f"pick_config: kernel must be one of {KERNELS}, got {kernel!r}")
    if dtype not in _TY:
        raise ValueError(f"pick_config: unsupported dtype {dtype}")
    f64 = dtype == torch.float64
    block_h, block_k = BLOCK_H, BLOCK_K
    if MAX_BLOCK is not None:  # tests: many hidden / contraction blocks at tiny H
        block_h, block_k = min(block_h, MAX_BLOCK), min(block_k, MAX_BLOCK)
    x = _TY[dtype]
    a = "fp64" if f64 else "fp32"
    sig = {}
    for name, kind in _SIG_ORDER[kernel]:
        sig[name] = {"x": "*" + x, "a": "*" + a, "i64": "*i64"}[kind]
    for name in ("T", "B", "H", "D"):
        sig[name] = "i32"
    # The GRU backward with TF32 spills a few bytes on sm_80 at both 4 warps (aligned H) and
    # 8 warps (odd H); it runs in full float32 precision instead: TF32 is a permission, not a
    # requirement, and the other three kernels still use it.
    tf32 = bool(allow_tf32 and dtype == torch.float32 and kernel != "_gru_bwd_kernel")
    constexprs = dict(BLOCK_B=BLOCK_B, BLOCK_H=block_h, BLOCK_K=block_k, ALLOW_TF32=tf32,
                      F64=f64, DOT_F32=bool(interpret and dtype == torch.bfloat16))
    for name in _CONSTEXPRS:
        sig[name] = "constexpr"
    return dict(kernel=kernel, signature=sig, constexprs=constexprs,
                num_warps=_num_warps(kernel, dtype, tf32), num_stages=1)


def launch_configs(dtypes=GPU_DTYPES, kernels=KERNELS) -> list[dict]:
    """Every configuration the launchers can choose on a GPU: each kernel for each dtype, and
    for float32 with TF32 off and on (4 kernels x 4, less the GRU backward's TF32 variant,
    which pick_config never chooses: 15)."""
    out = []
    for kernel in kernels:
        for dtype in dtypes:
            for allow_tf32 in ((False, True) if dtype == torch.float32 else (False,)):
                cfg = pick_config(kernel, dtype, allow_tf32=allow_tf32)
                if cfg not in out:
                    out.append(cfg)
    return out


# ----------------------------------------------------------------------------------------------
# Host launchers
# ----------------------------------------------------------------------------------------------


def _allow_tf32(x: torch.Tensor) -> bool:
    return x.dtype == torch.float32 and x.is_cuda and torch.backends.cuda.matmul.allow_tf32


def _launch(kernel_name: str, args: list, T: int, B: int, H: int, D: int, dtype, ref):
    if ref.is_cuda and dtype not in GPU_DTYPES:
        raise TypeError(f"dtl_fast.kernels.rnn: {dtype} runs on the GPU only through backend "
                        f"'auto' / 'reference' (the fused kernels take {GPU_DTYPES} there)")
    cfg = pick_config(kernel_name, dtype, allow_tf32=_allow_tf32(ref), interpret=not ref.is_cuda)
    kernel = globals()[kernel_name]
    c = cfg["constexprs"]
    grid = (D, triton.cdiv(B, c["BLOCK_B"]))
    with torch.cuda.device(ref.device) if ref.is_cuda else _nullcontext():
        launch(kernel, grid, [*args, T, B, H, D], c, cfg["num_warps"], cfg["num_stages"])


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _len_arg(lengths, T: int, B: int, ref):
    """int64 [B] on ref's device: the lengths, or T for every row when there are none."""
    if lengths is None:
        return torch.full((B,), T, dtype=torch.int64, device=ref.device)
    return lengths.to(device=ref.device, dtype=torch.int64).contiguous()


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _lstm_fwd_outputs(gates_x, w_hh, h0, c0):
    """lstm_forward's results, allocated: (out [T, B, D*H], h_n, c_n [D, B, H] in gates_x's
    dtype, act [T, B, D, 4H], c_all [T, B, D, H] float32 / float64), and whether there is
    nothing to run (T == 0 or B == 0: h_n, c_n are then h0, c0). Shared with
    kernels/rnn_persistent.py's launchers."""
    T, B, D, G = gates_x.shape
    H = w_hh.shape[-1]
    acc = _acc(gates_x.dtype)
    outs = (gates_x.new_empty(T, B, D * H), gates_x.new_empty(D, B, H), gates_x.new_empty(D, B, H),
            gates_x.new_empty(T, B, D, G, dtype=acc), gates_x.new_empty(T, B, D, H, dtype=acc))
    empty = T == 0 or B == 0
    if empty:
        outs[1].copy_(h0)
        outs[2].copy_(c0)
    return outs, empty


def _lstm_bwd_outputs(act, w_hh, grad_hn, grad_cn):
    """lstm_backward's results, allocated: (dgates [T, B, D, 4H] in w_hh's dtype, dh0, dc0
    [D, B, H] float32 / float64), and the zeroed carry buffer [2, D, B, H], None when there is
    nothing to run (T == 0 or B == 0: dh0, dc0 are then grad_h_n, grad_c_n)."""
    T, B, D, G = act.shape
    H = w_hh.shape[-1]
    acc = _acc(w_hh.dtype)
    outs = (act.new_empty(T, B, D, G, dtype=w_hh.dtype), act.new_empty(D, B, H, dtype=acc),
            act.new_empty(D, B, H, dtype=acc))
    if T == 0 or B == 0:
        outs[1].copy_(grad_hn)
        outs[2].copy_(grad_cn)
        return outs, None
    return outs, act.new_zeros(2, D, B, H, dtype=acc)


def _gru_fwd_outputs(gates_x, w_hh, h0):
    """gru_forward's results, allocated: (out [T, B, D*H], h_n [D, B, H] in gates_x's dtype,
    act [T, B, D, 4H] float32 / float64), and whether there is nothing to run (T == 0 or
    B == 0: h_n is then h0)."""
    T, B, D, _ = gates_x.shape
    H = w_hh.shape[-1]
    outs = (gates_x.new_empty(T, B, D * H), gates_x.new_empty(D, B, H),
            gates_x.new_empty(T, B, D, 4 * H, dtype=_acc(gates_x.dtype)))
    empty = T == 0 or B == 0
    if empty:
        outs[1].copy_(h0)
    return outs, empty


def _gru_bwd_outputs(act, w_hh, grad_hn):
    """gru_backward's results, allocated: (dgates_x, dgates_h [T, B, D, 3H] in w_hh's dtype,
    dh0 [D, B, H] float32 / float64), and the zeroed carry buffer [2, D, B, H], None when there
    is nothing to run (T == 0 or B == 0: dh0 is then grad_h_n)."""
    T, B, D, _ = act.shape
    H = w_hh.shape[-1]
    acc = _acc(w_hh.dtype)
    outs = (act.new_empty(T, B, D, 3 * H, dtype=w_hh.dtype), act.new_empty(T, B, D, 3 * H, dtype=w_hh.dtype),
            act.new_empty(D, B, H, dtype=acc))
    if T == 0 or B == 0:
        outs[2].copy_(grad_hn)
        return outs, None
    return outs, act.new_zeros(2, D, B, H, dtype=acc)


def lstm_forward(gates_x, w_hh, h0, c0, lengths):
    """gates_x [T, B, D, 4H], w_hh [D, 4H, H], h0, c0 [D, B, H] (one dtype), lengths None or
    int [B] -> out [T, B, D*H], h_n, c_n [D, B, H], act [T, B, D, 4H], c_all [T, B, D, H]."""
    outs, empty = _lstm_fwd_outputs(gates_x, w_hh, h0, c0)
    if empty:
        return outs
    T, B, D, _ = gates_x.shape
    H = w_hh.shape[-1]
    wt = w_hh.transpose(1, 2).contiguous()  # [D, H, 4H]
    _launch("_lstm_fwd_kernel",
            [gates_x.contiguous(), wt, h0.contiguous(), c0.contiguous(), _len_arg(lengths, T, B, gates_x),
             *outs], T, B, H, D, gates_x.dtype, gates_x)
    return outs


def lstm_backward(grad_out, grad_hn, grad_cn, w_hh, c0, act, c_all, lengths):
    """-> dgates [T, B, D, 4H] (w_hh's dtype), dh0, dc0 [D, B, H] (float32 / float64)."""
    outs, buf = _lstm_bwd_outputs(act, w_hh, grad_hn, grad_cn)
    if buf is None:
        return outs
    T, B, D, _ = act.shape
    H, dt = w_hh.shape[-1], w_hh.dtype
    _launch("_lstm_bwd_kernel",
            [grad_out.to(dt).contiguous(), grad_hn.to(dt).contiguous(), grad_cn.to(dt).contiguous(),
             w_hh.contiguous(), c0.to(dt).contiguous(), act.contiguous(), c_all.contiguous(),
             _len_arg(lengths, T, B, act), *outs, buf], T, B, H, D, dt, act)
    return outs


def gru_forward(gates_x, w_hh, b_hn, h0, lengths):
    """gates_x [T, B, D, 3H], w_hh [D, 3H, H], b_hn [D, H], h0 [D, B, H] (one dtype), lengths
    None or int [B] -> out [T, B, D*H], h_n [D, B, H], act [T, B, D, 4H] (r, z, n, W_hn h + b_hn)."""
    outs, empty = _gru_fwd_outputs(gates_x, w_hh, h0)
    if empty:
        return outs
    T, B, D, _ = gates_x.shape
    H = w_hh.shape[-1]
    wt = w_hh.transpose(1, 2).contiguous()  # [D, H, 3H]
    _launch("_gru_fwd_kernel",
            [gates_x.contiguous(), wt, b_hn.contiguous(), h0.contiguous(), _len_arg(lengths, T, B, gates_x),
             *outs], T, B, H, D, gates_x.dtype, gates_x)
    return outs


def gru_backward(grad_out, grad_hn, w_hh, h0, out, act, lengths):
    """-> dgates_x, dgates_h [T, B, D, 3H] (w_hh's dtype), dh0 [D, B, H] (float32 / float64)."""
    outs, buf = _gru_bwd_outputs(act, w_hh, grad_hn)
    if buf is None:
        return outs
    T, B, D, _ = act.shape
    H, dt = w_hh.shape[-1], w_hh.dtype
    _launch("_gru_bwd_kernel",
            [grad_out.to(dt).contiguous(), grad_hn.to(dt).contiguous(), w_hh.contiguous(),
             h0.to(dt).contiguous(), out.contiguous(), act.contiguous(), _len_arg(lengths, T, B, act),
             *outs, buf], T, B, H, D, dt, act)
    return outs
