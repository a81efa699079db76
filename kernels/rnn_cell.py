"""The LSTM / GRU cell of one step, forward and backward, for one tile of BLOCK_B batch rows x
a block of hidden units: the math that the loop kernels (kernels/rnn.py) and the persistent /
step kernels (kernels/rnn_persistent.py) share. Those two differ in how they get the recurrent
matvec (h_{t-1} @ W_hh, or dgates @ W_hh) and in how they split the work; from the matvec's
accumulators on, the step is the same computation, written here once.

Triton inlines every function here into its caller. The operations, and the order they run
in, are the ones each kernel used to write out for itself, so results are bit-identical. The
compiled code is the same too, except in the loop GRU forward: it now loads its b_hn tile just
before the cell, so the b_hn load is scheduled earlier, with the same registers. A change
here changes both implementations at once. One exception since s32: the persistent / step GRU
forward computes its n with tanh_fast (its register limit, see there), so its results differ
from the loop GRU forward's by that tanh's rounding (and by its error near 0).

Arguments common to the cell functions (all [BLOCK_B] per batch row unless said otherwise):
    cols, col_ok     [BLOCK] int64 hidden units of the tile, and cols < H
    row_ok           the row exists (< B)
    valid, first, last, use_prev    from kernels/rnn.py's _row_state at step t (use_prev =
                     valid & ~first: c_{t-1} comes from the previous step, not from c0)
    st_base          (d*B + row) * H: the row's offset into the [D, B, H] states
    cur_base, prev_base   the row's offset into [T, B, D, H] at step t / at the step processed
                     before t
    gx_base / gbase  the row's offset into the [T, B, D, G*H] gates at step t
Layouts are kernels/rnn.py's (module docstring). Padded steps (rows not valid at t) store
zeros, so no output element is left unwritten.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def tanh_fast(x):
    # (1 - e) / (1 + e) with e = exp(-2|x|): no overflow, but 1 - e cancels as |x| -> 0
    # (relative error ~ eps / 2|x|; 0 below |x| ~ 3e-8 in float32). Only the persistent / step
    # GRU forward still uses it: tanh() below spilled registers there (sm_80 and sm_90, the
    # AOT compile test), a kernel no measured row has picked yet (bench/NOTES.md, s32).
    e = tl.exp(-2.0 * tl.abs(x))
    y = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -y, y)


@triton.jit
def tanh(x):
    # (1 - e) / (1 + e) with e = exp(-2|x|) (exp of a non-positive argument only: no
    # overflow), but 1 - e cancels as |x| -> 0 (tanh_fast's error), so small |x| take tanh's
    # odd Taylor series through x^13 instead, below a threshold where both forms are within
    # ~2 ulp: 0.25 in float32 (series truncation 5e-12, 1 - e's error 1e-7 there), 0.1 in
    # float64 (1.5e-17 and 5e-16). (Of the forms tried, this order of operations is the one
    # that keeps every loop and LSTM kernel configuration free of spills: bench/NOTES.md, s32.)
    a = tl.abs(x)
    e = tl.exp(-2.0 * a)
    y = (1.0 - e) / (1.0 + e)
    a2 = a * a
    p = -0.3333333333333333 + a2 * (0.13333333333333333 + a2 * (
        -0.05396825396825397 + a2 * (0.021869488536155203 + a2 * (
            -0.008863235529902197 + a2 * 0.003592128036572481))))
    small = 0.1 if x.dtype == tl.float64 else 0.25
    y = tl.where(a < small, a + a * (a2 * p), y)
    return tl.where(x < 0, -y, y)


@triton.jit
def lstm_fwd_cell(acc_i, acc_f, acc_g, acc_o, gx_ptr, c0_ptr, out_ptr, hn_ptr, cn_ptr, act_ptr,
                  call_ptr, gx_base, st_base, cur_base, prev_base, cols, col_ok,
                  row_ok, valid, first, last, use_prev, H):
    """LSTM step from the recurrent pre-activations acc_* [BLOCK_B, BLOCK] (h_{t-1} @ W_hh per
    gate, float32 / float64): adds the input projection gates_x, applies the gates, updates c
    and h, and stores h (out), c (c_all), the activations i, f, g, o (act) and, at each row's
    last valid step, h_n / c_n."""
    m = valid[:, None] & col_ok[None, :]
    gx_p = gx_ptr + gx_base[:, None] + cols[None, :]
    i = sigmoid(acc_i + tl.load(gx_p, mask=m, other=0.0).to(acc_i.dtype))
    f = sigmoid(acc_f + tl.load(gx_p + H, mask=m, other=0.0).to(acc_i.dtype))
    g = tanh(acc_g + tl.load(gx_p + 2 * H, mask=m, other=0.0).to(acc_i.dtype))
    o = sigmoid(acc_o + tl.load(gx_p + 3 * H, mask=m, other=0.0).to(acc_i.dtype))
    # c_{t-1} of the tile's own columns: c0 at each row's first step, else the previous step's
    # c, written by this program (other threads of it) before the caller's step barrier.
    c_prev = tl.load(call_ptr + prev_base[:, None] + cols[None, :],
                     mask=use_prev[:, None] & col_ok[None, :], other=0.0)
    c_prev += tl.load(c0_ptr + st_base[:, None] + cols[None, :],
                      mask=first[:, None] & col_ok[None, :], other=0.0).to(acc_i.dtype)
    c = f * c_prev + i * g
    h = o * tanh(c)
    sm = row_ok[:, None] & col_ok[None, :]
    vm = valid[:, None]
    cur = cur_base[:, None] + cols[None, :]
    tl.store(out_ptr + cur, tl.where(vm, h, 0.0).to(out_ptr.dtype.element_ty), mask=sm)
    tl.store(call_ptr + cur, tl.where(vm, c, 0.0), mask=sm)
    a_p = act_ptr + gx_base[:, None] + cols[None, :]
    tl.store(a_p, tl.where(vm, i, 0.0), mask=sm)
    tl.store(a_p + H, tl.where(vm, f, 0.0), mask=sm)
    tl.store(a_p + 2 * H, tl.where(vm, g, 0.0), mask=sm)
    tl.store(a_p + 3 * H, tl.where(vm, o, 0.0), mask=sm)
    lm = last[:, None] & col_ok[None, :]
    st = st_base[:, None] + cols[None, :]
    tl.store(hn_ptr + st, h.to(hn_ptr.dtype.element_ty), mask=lm)
    tl.store(cn_ptr + st, c.to(cn_ptr.dtype.element_ty), mask=lm)


@triton.jit
def lstm_bwd_cell(acc, gout_ptr, ghn_ptr, gcn_ptr, c0_ptr, act_ptr, call_ptr, dg_ptr, buf_ptr,
                  rd, wr, gbase, st_base, cur_base, prev_base, cols, col_ok,
                  row_ok, valid, first, last, use_prev, H):
    """LSTM backward step from acc [BLOCK_B, BLOCK] = dgates[t_next] @ W_hh for the tile's
    columns (zero at each row's last valid step):
        dh = grad_out[t] + (acc, or grad_h_n at the last valid step)
        dc = (the carried dc[t_next] * f[t_next], or grad_c_n at the last valid step)
             + dh * o * (1 - tanh(c)^2)
        dgates[t] = [dc*g*i(1-i), dc*c_prev*f(1-f), dc*i*(1-g^2), dh*tanh(c)*o(1-o)]
    Reads the carry from buf_ptr + rd, stores dgates and dc * f to buf_ptr + wr (the ping-pong
    halves of [2, D, B, H]; padded steps pass the carry on unchanged)."""
    vm = valid[:, None] & col_ok[None, :]
    lm = last[:, None] & col_ok[None, :]
    sm = row_ok[:, None] & col_ok[None, :]
    st = st_base[:, None] + cols[None, :]
    cur = cur_base[:, None] + cols[None, :]
    dh = acc + tl.load(gout_ptr + cur, mask=vm, other=0.0).to(acc.dtype)
    dh += tl.load(ghn_ptr + st, mask=lm, other=0.0).to(acc.dtype)
    carry = tl.load(buf_ptr + rd + st, mask=sm, other=0.0)
    dc = tl.where(last[:, None], tl.load(gcn_ptr + st, mask=lm, other=0.0).to(acc.dtype), carry)
    a_p = act_ptr + gbase[:, None] + cols[None, :]
    i = tl.load(a_p, mask=vm, other=0.0)
    f = tl.load(a_p + H, mask=vm, other=0.0)
    g = tl.load(a_p + 2 * H, mask=vm, other=0.0)
    o = tl.load(a_p + 3 * H, mask=vm, other=0.0)
    tc = tanh(tl.load(call_ptr + cur, mask=vm, other=0.0))
    c_prev = tl.load(call_ptr + prev_base[:, None] + cols[None, :],
                     mask=use_prev[:, None] & col_ok[None, :], other=0.0)
    c_prev += tl.load(c0_ptr + st, mask=first[:, None] & col_ok[None, :], other=0.0).to(acc.dtype)
    dc += dh * o * (1.0 - tc * tc)
    v = valid[:, None]
    d_i = tl.where(v, dc * g * i * (1.0 - i), 0.0)
    d_f = tl.where(v, dc * c_prev * f * (1.0 - f), 0.0)
    d_g = tl.where(v, dc * i * (1.0 - g * g), 0.0)
    d_o = tl.where(v, dh * tc * o * (1.0 - o), 0.0)
    dg_p = dg_ptr + gbase[:, None] + cols[None, :]
    ty = dg_ptr.dtype.element_ty
    tl.store(dg_p, d_i.to(ty), mask=sm)
    tl.store(dg_p + H, d_f.to(ty), mask=sm)
    tl.store(dg_p + 2 * H, d_g.to(ty), mask=sm)
    tl.store(dg_p + 3 * H, d_o.to(ty), mask=sm)
    tl.store(buf_ptr + wr + st, tl.where(v, dc * f, carry), mask=sm)


@triton.jit
def gru_fwd_cell(acc_r, acc_z, acc_n, b_hn, gx_ptr, out_ptr, hn_ptr, act_ptr, h_row,
                 gx_base, act_base, st_base, cur_base, cols, col_ok, row_ok, valid, last, H,
                 H_CACHE: tl.constexpr, FAST_TANH: tl.constexpr):
    """GRU step from the recurrent pre-activations acc_r, acc_z, acc_n [BLOCK_B, BLOCK]
    (h_{t-1} @ W_h{r,z,n}) and b_hn [BLOCK] (the tile's recurrent n bias, input dtype):
        r, z = sigmoid(acc + gates_x); hn_pre = acc_n + b_hn; n = tanh(gates_x_n + r * hn_pre)
        h = (1 - z) * n + z * h_prev
    h_row [BLOCK_B] points at each row's h_{t-1} (h0 or the previous step's output), read
    with cache modifier H_CACHE ("" or ".cg" where other programs wrote it). Stores h (out),
    act = [r, z, n, hn_pre] ([T, B, D, 4H], act_base) and h_n at each row's last valid step.
    FAST_TANH: n with tanh_fast (the persistent / step kernel, at its register limit) instead
    of tanh."""
    m = valid[:, None] & col_ok[None, :]
    gx_p = gx_ptr + gx_base[:, None] + cols[None, :]
    r = sigmoid(acc_r + tl.load(gx_p, mask=m, other=0.0).to(acc_r.dtype))
    z = sigmoid(acc_z + tl.load(gx_p + H, mask=m, other=0.0).to(acc_r.dtype))
    hn_pre = acc_n + b_hn.to(acc_r.dtype)[None, :]
    n_pre = tl.load(gx_p + 2 * H, mask=m, other=0.0).to(acc_r.dtype) + r * hn_pre
    if FAST_TANH:
        n = tanh_fast(n_pre)
    else:
        n = tanh(n_pre)
    h_prev = tl.load(h_row[:, None] + cols[None, :], mask=m, other=0.0,
                     cache_modifier=H_CACHE).to(acc_r.dtype)
    h = (1.0 - z) * n + z * h_prev
    sm = row_ok[:, None] & col_ok[None, :]
    vm = valid[:, None]
    tl.store(out_ptr + cur_base[:, None] + cols[None, :],
             tl.where(vm, h, 0.0).to(out_ptr.dtype.element_ty), mask=sm)
    a_p = act_ptr + act_base[:, None] + cols[None, :]
    tl.store(a_p, tl.where(vm, r, 0.0), mask=sm)
    tl.store(a_p + H, tl.where(vm, z, 0.0), mask=sm)
    tl.store(a_p + 2 * H, tl.where(vm, n, 0.0), mask=sm)
    tl.store(a_p + 3 * H, tl.where(vm, hn_pre, 0.0), mask=sm)
    tl.store(hn_ptr + st_base[:, None] + cols[None, :], h.to(hn_ptr.dtype.element_ty),
             mask=last[:, None] & col_ok[None, :])


@triton.jit
def gru_bwd_cell(acc, gout_ptr, ghn_ptr, act_ptr, dgx_ptr, dgh_ptr, buf_ptr, h_row,
                 rd, wr, gbase, act_base, st_base, cur_base, cols, col_ok,
                 row_ok, valid, last, H):
    """GRU backward step from acc [BLOCK_B, BLOCK] = dgh[t_next] @ W_hh for the tile's columns
    (zero at each row's last valid step):
        dh = grad_out[t] + acc + (the carried dh[t_next] * z[t_next], or grad_h_n at the last
             valid step)
        dz = dh (h_prev - n) z(1-z); dn = dh (1-z)(1-n^2); dr = dn hn_pre r(1-r)
        dgx[t] = [dr, dz, dn]; dgh[t] = [dr, dz, dn * r]
    Reads the carry from buf_ptr + rd, stores dh * z to buf_ptr + wr (ping-pong halves of
    [2, D, B, H]; padded steps pass the carry on unchanged). h_row as in gru_fwd_cell."""
    vm = valid[:, None] & col_ok[None, :]
    lm = last[:, None] & col_ok[None, :]
    sm = row_ok[:, None] & col_ok[None, :]
    st = st_base[:, None] + cols[None, :]
    carry = tl.load(buf_ptr + rd + st, mask=sm, other=0.0)
    direct = tl.where(last[:, None], tl.load(ghn_ptr + st, mask=lm, other=0.0).to(acc.dtype), carry)
    dh = acc + direct + tl.load(gout_ptr + cur_base[:, None] + cols[None, :],
                                mask=vm, other=0.0).to(acc.dtype)
    a_p = act_ptr + act_base[:, None] + cols[None, :]
    r = tl.load(a_p, mask=vm, other=0.0)
    z = tl.load(a_p + H, mask=vm, other=0.0)
    n = tl.load(a_p + 2 * H, mask=vm, other=0.0)
    hn_pre = tl.load(a_p + 3 * H, mask=vm, other=0.0)
    h_prev = tl.load(h_row[:, None] + cols[None, :], mask=vm, other=0.0).to(acc.dtype)
    v = valid[:, None]
    d_z = tl.where(v, dh * (h_prev - n) * z * (1.0 - z), 0.0)
    d_n = tl.where(v, dh * (1.0 - z) * (1.0 - n * n), 0.0)
    d_r = tl.where(v, d_n * hn_pre * r * (1.0 - r), 0.0)
    ty = dgx_ptr.dtype.element_ty
    gx_p = dgx_ptr + gbase[:, None] + cols[None, :]
    gh_p = dgh_ptr + gbase[:, None] + cols[None, :]
    tl.store(gx_p, d_r.to(ty), mask=sm)
    tl.store(gx_p + H, d_z.to(ty), mask=sm)
    tl.store(gx_p + 2 * H, d_n.to(ty), mask=sm)
    tl.store(gh_p, d_r.to(ty), mask=sm)
    tl.store(gh_p + H, d_z.to(ty), mask=sm)
    tl.store(gh_p + 2 * H, (d_n * r).to(ty), mask=sm)
    tl.store(buf_ptr + wr + st, tl.where(v, dh * z, carry), mask=sm)
