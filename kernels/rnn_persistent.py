"""Persistent LSTM / GRU recurrence (forward and backward, both directions of a layer in one
launch) and its step-at-a-time mode, with their host launchers. No autograd here:
dtl_fast.ops.rnn calls these through the registered recurrence ops (impl "persistent" / "step").

Work split (Diamos et al., "Persistent RNNs", ICML 2016): the grid is D x P programs. Program
(d, p) owns the hidden units cols = p*BLOCK_N .. p*BLOCK_N + BLOCK_N - 1 of direction d, with ALL
their gates, for all T steps and all B rows (an inner loop over BLOCK_B-row blocks). Its slice of
W_hh is one contiguous block of the "gate-interleaved" copy the launcher builds,

    w_int [D, P, G, H, BLOCK_N]:  w_int[d, p, q, k, n] = W_hh[d, q*H + p*BLOCK_N + n, k]      (forward)
                                  w_int[d, p, q, i, n] = W_hh[d, q*H + i, p*BLOCK_N + n]      (backward)

so the cell update of a hidden unit needs only gate values the same program computed (no
exchange of gate pre-activations), and the only data that crosses programs is h_t (forward) or
the gate gradients dgates_t (backward), through global memory.

Per step a program reads h_{t-1} [B, H] of its direction (all units: the matvec contracts over
them), multiplies it by its W slice (RESIDENT: loaded once before the time loop and kept on chip,
whole contraction in one tl.dot; else streamed from L2 in BLOCK_K chunks every step), adds its
columns of the precomputed input projection, updates its columns of c / h and writes them.

Between steps a program must see every other program's h_t of the same direction:
  PERSISTENT=1 (a runtime argument: one compiled kernel serves both modes): one grid-wide
    barrier per step and direction (_grid_sync: a monotonic counter per direction; arrive =
    CTA barrier, then an atomic add with sem="release", scope="gpu"; wait = spin on atomic
    reads with sem="acquire"; then a CTA barrier). All D*P programs must
    be co-resident (the launcher checks it from the compiled kernel's registers and shared
    memory); the spin is bounded: past spin_limit reads a program sets the error flag and stops
    waiting, and the launcher raises RuntimeError instead of hanging.
  PERSISTENT=0 ("step" mode): the SAME code, one launch per step (S0 = s, S1 = s + 1); the
    launch boundary is the barrier. Runs anywhere, including TRITON_INTERPRET=1 on the CPU (where
    programs run one after another, so a grid barrier could never complete), and is the
    fallback when the persistent grid cannot be co-resident.

Tensors and their layouts are exactly those of kernels/rnn.py (gates_x [T, B, D, G*H], out
[T, B, D*H], act, c_all, dgates, ...): the two implementations are interchangeable, forward and
backward independently. Cell state and accumulation are float32 (float64 in the interpreter).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from dtl_fast.kernels.rnn import (GPU_DTYPES, _TY, _dot, _gru_bwd_outputs, _gru_fwd_outputs, _len_arg,
                                  _lstm_bwd_outputs, _lstm_fwd_outputs, _nullcontext, _row_state, _zeros)
from dtl_fast.kernels.rnn_cell import gru_bwd_cell, gru_fwd_cell, lstm_bwd_cell, lstm_fwd_cell

# T, B, D, P and the step range are not value-specialised: a new length, batch or step never
# compiles another kernel. H keeps Triton's divisibility specialisation.
_NO_SPEC = ["T", "B", "D", "P", "S0", "S1", "EPI", "PERSISTENT", "spin_limit"]

# ----------------------------------------------------------------------------------------------
# Device helpers
# ----------------------------------------------------------------------------------------------


@triton.jit
def _load_w(w_base, H, KP: tl.constexpr, BLOCK_N: tl.constexpr):
    """One gate's [KP, BLOCK_N] tile of the interleaved W slice (rows past H are 0)."""
    k = tl.arange(0, KP)
    return tl.load(w_base + k[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :],
                   mask=(k < H)[:, None], other=0.0)


@triton.jit
def _mv_shared_lhs(h_rows, h_ok, w_base, H, w0, w1, w2, w3,
                   NG: tl.constexpr, RESIDENT: tl.constexpr, KP: tl.constexpr,
                   BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   ALLOW_TF32: tl.constexpr, DOT_F32: tl.constexpr, F64: tl.constexpr):
    """Forward: h[rows, :H] @ W_q[:H, BLOCK_N] for the NG gates q (one left operand, read once
    per contraction chunk for all gates). h_rows [BLOCK_B] are row pointers; rows outside h_ok
    contribute 0. Returns NG accumulators (the 4th is zeros when NG == 3)."""
    a0 = _zeros(BLOCK_B, BLOCK_N, F64)
    a1 = _zeros(BLOCK_B, BLOCK_N, F64)
    a2 = _zeros(BLOCK_B, BLOCK_N, F64)
    a3 = _zeros(BLOCK_B, BLOCK_N, F64)
    if RESIDENT:
        k = tl.arange(0, KP)
        # .cg: h_{t-1} was written by other programs (other SMs); read it from L2, never from a
        # possibly stale L1 line.
        hp = tl.load(h_rows[:, None] + k[None, :], mask=h_ok[:, None] & (k < H)[None, :], other=0.0,
                     cache_modifier=".cg")
        a0 = _dot(hp, w0, a0, ALLOW_TF32, DOT_F32)
        a1 = _dot(hp, w1, a1, ALLOW_TF32, DOT_F32)
        a2 = _dot(hp, w2, a2, ALLOW_TF32, DOT_F32)
        if NG == 4:
            a3 = _dot(hp, w3, a3, ALLOW_TF32, DOT_F32)
    else:
        rk = tl.arange(0, BLOCK_K)
        rn = tl.arange(0, BLOCK_N)
        HBN = H * BLOCK_N
        for k0 in range(0, H, BLOCK_K):
            ks = k0 + rk
            k_ok = ks < H
            hp = tl.load(h_rows[:, None] + ks[None, :], mask=h_ok[:, None] & k_ok[None, :], other=0.0,
                         cache_modifier=".cg")
            wp = w_base + ks[:, None] * BLOCK_N + rn[None, :]
            wm = k_ok[:, None]
            a0 = _dot(hp, tl.load(wp, mask=wm, other=0.0), a0, ALLOW_TF32, DOT_F32)
            a1 = _dot(hp, tl.load(wp + HBN, mask=wm, other=0.0), a1, ALLOW_TF32, DOT_F32)
            a2 = _dot(hp, tl.load(wp + 2 * HBN, mask=wm, other=0.0), a2, ALLOW_TF32, DOT_F32)
            if NG == 4:
                a3 = _dot(hp, tl.load(wp + 3 * HBN, mask=wm, other=0.0), a3, ALLOW_TF32, DOT_F32)
    return a0, a1, a2, a3


@triton.jit
def _mv_gate_lhs(g_rows, g_ok, w_base, H, w0, w1, w2, w3,
                 NG: tl.constexpr, RESIDENT: tl.constexpr, KP: tl.constexpr,
                 BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 ALLOW_TF32: tl.constexpr, DOT_F32: tl.constexpr, F64: tl.constexpr):
    """Backward: sum_q dg[rows, q*H : q*H + H] @ W_q^T[:H, BLOCK_N] (the recurrent part of dh
    for this program's columns; g_rows [BLOCK_B] point at each row's gate gradients)."""
    acc = _zeros(BLOCK_B, BLOCK_N, F64)
    if RESIDENT:
        i = tl.arange(0, KP)
        m = g_ok[:, None] & (i < H)[None, :]
        gp = g_rows[:, None] + i[None, :]
        acc = _dot(tl.load(gp, mask=m, other=0.0, cache_modifier=".cg"), w0, acc, ALLOW_TF32, DOT_F32)
        acc = _dot(tl.load(gp + H, mask=m, other=0.0, cache_modifier=".cg"), w1, acc, ALLOW_TF32, DOT_F32)
        acc = _dot(tl.load(gp + 2 * H, mask=m, other=0.0, cache_modifier=".cg"), w2, acc, ALLOW_TF32, DOT_F32)
        if NG == 4:
            acc = _dot(tl.load(gp + 3 * H, mask=m, other=0.0, cache_modifier=".cg"), w3, acc,
                       ALLOW_TF32, DOT_F32)
    else:
        rk = tl.arange(0, BLOCK_K)
        rn = tl.arange(0, BLOCK_N)
        HBN = H * BLOCK_N
        for q in tl.static_range(NG):
            for i0 in range(0, H, BLOCK_K):
                ks = i0 + rk
                k_ok = ks < H
                g = tl.load(g_rows[:, None] + q * H + ks[None, :], mask=g_ok[:, None] & k_ok[None, :],
                            other=0.0, cache_modifier=".cg")
                w = tl.load(w_base + q * HBN + ks[:, None] * BLOCK_N + rn[None, :], mask=k_ok[:, None],
                            other=0.0)
                acc = _dot(g, w, acc, ALLOW_TF32, DOT_F32)
    return acc


@triton.jit
def _resident_tiles(w_base, H, NG: tl.constexpr, RESIDENT: tl.constexpr, KP: tl.constexpr,
                    BLOCK_N: tl.constexpr):
    """The program's W slice, loaded once for all T steps (RESIDENT), else placeholders."""
    if RESIDENT:
        HBN = H * BLOCK_N
        w0 = _load_w(w_base, H, KP, BLOCK_N)
        w1 = _load_w(w_base + HBN, H, KP, BLOCK_N)
        w2 = _load_w(w_base + 2 * HBN, H, KP, BLOCK_N)
        if NG == 4:
            w3 = _load_w(w_base + 3 * HBN, H, KP, BLOCK_N)
        else:
            w3 = w2  # not used with 3 gates
    else:
        w0 = w_base
        w1 = w_base
        w2 = w_base
        w3 = w_base
    return w0, w1, w2, w3


@triton.jit
def _grid_sync(cnt_ptr, err_ptr, target, spin_limit, failed):
    """Grid-wide barrier of one direction: every program of it adds 1 to the direction's counter
    once per step, then waits until the counter reaches target = (steps done) x P.

    The CTA barrier first makes every thread's stores of this step happen before the one
    release atomic (a scalar release orders only the issuing thread's own stores); the acquire
    reads pair with the other programs' releases; the CTA barrier after the wait hands the
    acquired view to all threads. Bounded: after spin_limit reads without reaching target the
    program sets *err_ptr = 1 and returns failed = 1, and never waits again (the launcher
    raises). Returns failed (int32 scalar)."""
    tl.debug_barrier()
    tl.atomic_add(cnt_ptr, 1, sem="release", scope="gpu")
    cur = tl.atomic_add(cnt_ptr, 0, sem="acquire", scope="gpu")
    spins = 0
    while (cur < target) & (spins < spin_limit) & (failed == 0):
        cur = tl.atomic_add(cnt_ptr, 0, sem="acquire", scope="gpu")
        spins += 1
    if cur < target:
        tl.atomic_xchg(err_ptr, 1)
        failed = failed * 0 + 1
    tl.debug_barrier()
    return failed


# ----------------------------------------------------------------------------------------------
# LSTM
# ----------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=_NO_SPEC)
def _lstm_fwd_persistent(gx_ptr, w_ptr, h0_ptr, c0_ptr, len_ptr,
                         out_ptr, hn_ptr, cn_ptr, act_ptr, call_ptr, bar_ptr, err_ptr,
                         T, B, H, D, P, S0, S1, PERSISTENT, spin_limit,
                         BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         KP: tl.constexpr, RESIDENT: tl.constexpr,
                         ALLOW_TF32: tl.constexpr, F64: tl.constexpr, DOT_F32: tl.constexpr):
    """Steps S0 .. S1-1 of the LSTM forward for direction d = program_id(0), hidden units of
    block p = program_id(1); the step's cell math is kernels/rnn_cell.py's lstm_fwd_cell, as in
    kernels/rnn.py's _lstm_fwd_kernel."""
    d = tl.program_id(0).to(tl.int64)
    p = tl.program_id(1).to(tl.int64)
    G = 4 * H
    cols = p * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    col_ok = cols < H
    w_base = w_ptr + (d * P + p) * (4 * H * BLOCK_N)
    w0, w1, w2, w3 = _resident_tiles(w_base, H, 4, RESIDENT, KP, BLOCK_N)
    rb = tl.arange(0, BLOCK_B).to(tl.int64)
    failed = tl.full([], 0, tl.int32)
    for s in range(S0, S1):
        t = s + d * (T - 1 - 2 * s)  # processing order -> time index (int64)
        tp = t - 1 + 2 * d  # the step processed before t
        for b0 in range(0, B, BLOCK_B):
            rows = b0 + rb
            row_ok = rows < B
            seq_len = tl.load(len_ptr + rows, mask=row_ok, other=1).to(tl.int64)
            valid, first, last = _row_state(t, d, seq_len, row_ok)
            use_prev = valid & ~first
            st_base = (d * B + rows) * H
            prev_base = ((tp * B + rows) * D + d) * H
            h_row = tl.where(first, h0_ptr + st_base, out_ptr + prev_base)
            acc_i, acc_f, acc_g, acc_o = _mv_shared_lhs(
                h_row, valid, w_base, H, w0, w1, w2, w3, 4, RESIDENT, KP,
                BLOCK_B, BLOCK_N, BLOCK_K, ALLOW_TF32, DOT_F32, F64)
            cur_base = ((t * B + rows) * D + d) * H
            gx_base = ((t * B + rows) * D + d) * G
            # The cell reads c_{t-1} of this program's own columns only: written by this program
            # (other threads of it) in the previous step; the step's CTA barrier orders it.
            lstm_fwd_cell(acc_i, acc_f, acc_g, acc_o, gx_ptr, c0_ptr, out_ptr, hn_ptr, cn_ptr, act_ptr,
                          call_ptr, gx_base, st_base, cur_base, prev_base, cols, col_ok,
                          row_ok, valid, first, last, use_prev, H)
        if PERSISTENT != 0:
            failed = _grid_sync(bar_ptr + d, err_ptr, (s + 1) * P, spin_limit, failed)
        else:
            tl.debug_barrier()


@triton.jit(do_not_specialize=_NO_SPEC)
def _lstm_bwd_persistent(gout_ptr, ghn_ptr, gcn_ptr, w_ptr, c0_ptr, act_ptr, call_ptr, len_ptr,
                         dg_ptr, dh0_ptr, dc0_ptr, buf_ptr, bar_ptr, err_ptr,
                         T, B, H, D, P, S0, S1, EPI, PERSISTENT, spin_limit,
                         BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         KP: tl.constexpr, RESIDENT: tl.constexpr,
                         ALLOW_TF32: tl.constexpr, F64: tl.constexpr, DOT_F32: tl.constexpr):
    """Backward steps S0 .. S1-1 (S1 <= T) in reverse processing order (the cell math of
    kernels/rnn_cell.py's lstm_bwd_cell, for this program's columns); when EPI != 0, then the
    epilogue dh0 = dgates[t_first] @ W_hh, dc0 = the carry buffer (after the last step's
    barrier, or in a launch of its own)."""
    d = tl.program_id(0).to(tl.int64)
    p = tl.program_id(1).to(tl.int64)
    G = 4 * H
    DBH = (d * 0 + D) * B * H  # int64 (d is)
    cols = p * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    col_ok = cols < H
    w_base = w_ptr + (d * P + p) * (4 * H * BLOCK_N)
    w0, w1, w2, w3 = _resident_tiles(w_base, H, 4, RESIDENT, KP, BLOCK_N)
    rb = tl.arange(0, BLOCK_B).to(tl.int64)
    failed = tl.full([], 0, tl.int32)
    for s in range(S0, S1):
        t = (T - 1 - s) + d * (2 * s - T + 1)
        tn = t + 1 - 2 * d  # processed after t in the forward pass
        tp = t - 1 + 2 * d  # processed before t in the forward pass
        rd = ((s + 1) % 2) * DBH
        wr = (s % 2) * DBH
        for b0 in range(0, B, BLOCK_B):
            rows = b0 + rb
            row_ok = rows < B
            seq_len = tl.load(len_ptr + rows, mask=row_ok, other=1).to(tl.int64)
            valid, first, last = _row_state(t, d, seq_len, row_ok)
            from_next = valid & ~last
            use_prev = valid & ~first
            st_base = (d * B + rows) * H
            next_gbase = ((tn * B + rows) * D + d) * G
            gbase = ((t * B + rows) * D + d) * G
            cur_base = ((t * B + rows) * D + d) * H
            prev_base = ((tp * B + rows) * D + d) * H
            acc = _mv_gate_lhs(dg_ptr + next_gbase, from_next, w_base, H, w0, w1, w2, w3, 4,
                               RESIDENT, KP, BLOCK_B, BLOCK_N, BLOCK_K, ALLOW_TF32, DOT_F32, F64)
            lstm_bwd_cell(acc, gout_ptr, ghn_ptr, gcn_ptr, c0_ptr, act_ptr, call_ptr, dg_ptr, buf_ptr,
                          rd, wr, gbase, st_base, cur_base, prev_base, cols, col_ok,
                          row_ok, valid, first, last, use_prev, H)
        if PERSISTENT != 0:
            failed = _grid_sync(bar_ptr + d, err_ptr, (s + 1) * P, spin_limit, failed)
        else:
            tl.debug_barrier()
    if EPI != 0:
        # Gradients of h0 / c0: from each row's first processed step (every program's dgates of
        # it are written: the last step's barrier, or the launch boundary, is behind us).
        fin = ((T - 1) % 2) * DBH
        for b0 in range(0, B, BLOCK_B):
            rows = b0 + rb
            row_ok = rows < B
            seq_len = tl.load(len_ptr + rows, mask=row_ok, other=1).to(tl.int64)
            t_first = tl.where(d == 0, 0, seq_len - 1)
            first_gbase = ((t_first * B + rows) * D + d) * G
            acc = _mv_gate_lhs(dg_ptr + first_gbase, row_ok, w_base, H, w0, w1, w2, w3, 4,
                               RESIDENT, KP, BLOCK_B, BLOCK_N, BLOCK_K, ALLOW_TF32, DOT_F32, F64)
            sm = row_ok[:, None] & col_ok[None, :]
            st = (d * B + rows)[:, None] * H + cols[None, :]
            tl.store(dh0_ptr + st, acc, mask=sm)
            tl.store(dc0_ptr + st, tl.load(buf_ptr + fin + st, mask=sm, other=0.0), mask=sm)


# ----------------------------------------------------------------------------------------------
# GRU
# ----------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=_NO_SPEC)
def _gru_fwd_persistent(gx_ptr, w_ptr, bhn_ptr, h0_ptr, len_ptr,
                        out_ptr, hn_ptr, act_ptr, bar_ptr, err_ptr,
                        T, B, H, D, P, S0, S1, PERSISTENT, spin_limit,
                        BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        KP: tl.constexpr, RESIDENT: tl.constexpr,
                        ALLOW_TF32: tl.constexpr, F64: tl.constexpr, DOT_F32: tl.constexpr):
    """Steps S0 .. S1-1 of the GRU forward (kernels/rnn_cell.py's gru_fwd_cell)."""
    d = tl.program_id(0).to(tl.int64)
    p = tl.program_id(1).to(tl.int64)
    G = 3 * H
    G4 = 4 * H
    cols = p * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    col_ok = cols < H
    w_base = w_ptr + (d * P + p) * (3 * H * BLOCK_N)
    w0, w1, w2, w3 = _resident_tiles(w_base, H, 3, RESIDENT, KP, BLOCK_N)
    b_hn = tl.load(bhn_ptr + d * H + cols, mask=col_ok, other=0.0)
    rb = tl.arange(0, BLOCK_B).to(tl.int64)
    failed = tl.full([], 0, tl.int32)
    for s in range(S0, S1):
        t = s + d * (T - 1 - 2 * s)
        tp = t - 1 + 2 * d
        for b0 in range(0, B, BLOCK_B):
            rows = b0 + rb
            row_ok = rows < B
            seq_len = tl.load(len_ptr + rows, mask=row_ok, other=1).to(tl.int64)
            valid, first, last = _row_state(t, d, seq_len, row_ok)
            st_base = (d * B + rows) * H
            prev_base = ((tp * B + rows) * D + d) * H
            h_row = tl.where(first, h0_ptr + st_base, out_ptr + prev_base)
            acc_r, acc_z, acc_n, _unused = _mv_shared_lhs(
                h_row, valid, w_base, H, w0, w1, w2, w3, 3, RESIDENT, KP,
                BLOCK_B, BLOCK_N, BLOCK_K, ALLOW_TF32, DOT_F32, F64)
            cur_base = ((t * B + rows) * D + d) * H
            gx_base = ((t * B + rows) * D + d) * G
            act_base = ((t * B + rows) * D + d) * G4
            # .cg: h_{t-1} of the tile's columns was written by other programs (other SMs).
            gru_fwd_cell(acc_r, acc_z, acc_n, b_hn, gx_ptr, out_ptr, hn_ptr, act_ptr, h_row,
                         gx_base, act_base, st_base, cur_base, cols, col_ok, row_ok, valid, last, H,
                         ".cg", True)
        if PERSISTENT != 0:
            failed = _grid_sync(bar_ptr + d, err_ptr, (s + 1) * P, spin_limit, failed)
        else:
            tl.debug_barrier()


@triton.jit(do_not_specialize=_NO_SPEC)
def _gru_bwd_persistent(gout_ptr, ghn_ptr, w_ptr, h0_ptr, out_ptr, act_ptr, len_ptr,
                        dgx_ptr, dgh_ptr, dh0_ptr, buf_ptr, bar_ptr, err_ptr,
                        T, B, H, D, P, S0, S1, EPI, PERSISTENT, spin_limit,
                        BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        KP: tl.constexpr, RESIDENT: tl.constexpr,
                        ALLOW_TF32: tl.constexpr, F64: tl.constexpr, DOT_F32: tl.constexpr):
    """GRU backward steps (kernels/rnn_cell.py's gru_bwd_cell, this program's columns);
    epilogue dh0 = buffer + dgh[t_first] @ W_hh when EPI != 0."""
    d = tl.program_id(0).to(tl.int64)
    p = tl.program_id(1).to(tl.int64)
    G = 3 * H
    G4 = 4 * H
    DBH = (d * 0 + D) * B * H
    cols = p * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    col_ok = cols < H
    w_base = w_ptr + (d * P + p) * (3 * H * BLOCK_N)
    w0, w1, w2, w3 = _resident_tiles(w_base, H, 3, RESIDENT, KP, BLOCK_N)
    rb = tl.arange(0, BLOCK_B).to(tl.int64)
    failed = tl.full([], 0, tl.int32)
    for s in range(S0, S1):
        t = (T - 1 - s) + d * (2 * s - T + 1)
        tn = t + 1 - 2 * d
        tp = t - 1 + 2 * d
        rd = ((s + 1) % 2) * DBH
        wr = (s % 2) * DBH
        for b0 in range(0, B, BLOCK_B):
            rows = b0 + rb
            row_ok = rows < B
            seq_len = tl.load(len_ptr + rows, mask=row_ok, other=1).to(tl.int64)
            valid, first, last = _row_state(t, d, seq_len, row_ok)
            from_next = valid & ~last
            st_base = (d * B + rows) * H
            next_gbase = ((tn * B + rows) * D + d) * G
            gbase = ((t * B + rows) * D + d) * G
            act_base = ((t * B + rows) * D + d) * G4
            cur_base = ((t * B + rows) * D + d) * H
            prev_base = ((tp * B + rows) * D + d) * H
            h_row = tl.where(first, h0_ptr + st_base, out_ptr + prev_base)
            acc = _mv_gate_lhs(dgh_ptr + next_gbase, from_next, w_base, H, w0, w1, w2, w3, 3,
                               RESIDENT, KP, BLOCK_B, BLOCK_N, BLOCK_K, ALLOW_TF32, DOT_F32, F64)
            gru_bwd_cell(acc, gout_ptr, ghn_ptr, act_ptr, dgx_ptr, dgh_ptr, buf_ptr, h_row,
                         rd, wr, gbase, act_base, st_base, cur_base, cols, col_ok,
                         row_ok, valid, last, H)
        if PERSISTENT != 0:
            failed = _grid_sync(bar_ptr + d, err_ptr, (s + 1) * P, spin_limit, failed)
        else:
            tl.debug_barrier()
    if EPI != 0:
        fin = ((T - 1) % 2) * DBH
        for b0 in range(0, B, BLOCK_B):
            rows = b0 + rb
            row_ok = rows < B
            seq_len = tl.load(len_ptr + rows, mask=row_ok, other=1).to(tl.int64)
            t_first = tl.where(d == 0, 0, seq_len - 1)
            first_gbase = ((t_first * B + rows) * D + d) * G
            acc = _mv_gate_lhs(dgh_ptr + first_gbase, row_ok, w_base, H, w0, w1, w2, w3, 3,
                               RESIDENT, KP, BLOCK_B, BLOCK_N, BLOCK_K, ALLOW_TF32, DOT_F32, F64)
            sm = row_ok[:, None] & col_ok[None, :]
            st = (d * B + rows)[:, None] * H + cols[None, :]
            tl.store(dh0_ptr + st, acc + tl.load(buf_ptr + fin + st, mask=sm, other=0.0), mask=sm)


# ----------------------------------------------------------------------------------------------
# Launch configurations: one source of truth for the launchers and the AOT compile test
# ----------------------------------------------------------------------------------------------

KERNELS = ("_lstm_fwd_persistent", "_lstm_bwd_persistent", "_gru_fwd_persistent", "_gru_bwd_persistent")
_GATES = {"_lstm_fwd_persistent": 4, "_lstm_bwd_persistent": 4, "_gru_fwd_persistent": 3,
          "_gru_bwd_persistent": 3}
_SIG_ORDER = {
    # name -> (argument, kind): "x" compute dtype, "a" float32 / float64 accumulator,
    # "i64" int64, "i32" int32 tensor; then the int scalars
    "_lstm_fwd_persistent": [("gx_ptr", "x"), ("w_ptr", "x"), ("h0_ptr", "x"), ("c0_ptr", "x"),
                             ("len_ptr", "i64"), ("out_ptr", "x"), ("hn_ptr", "x"), ("cn_ptr", "x"),
                             ("act_ptr", "a"), ("call_ptr", "a"), ("bar_ptr", "i32"), ("err_ptr", "i32")],
    "_lstm_bwd_persistent": [("gout_ptr", "x"), ("ghn_ptr", "x"), ("gcn_ptr", "x"), ("w_ptr", "x"),
                             ("c0_ptr", "x"), ("act_ptr", "a"), ("call_ptr", "a"), ("len_ptr", "i64"),
                             ("dg_ptr", "x"), ("dh0_ptr", "a"), ("dc0_ptr", "a"), ("buf_ptr", "a"),
                             ("bar_ptr", "i32"), ("err_ptr", "i32")],
    "_gru_fwd_persistent": [("gx_ptr", "x"), ("w_ptr", "x"), ("bhn_ptr", "x"), ("h0_ptr", "x"),
                            ("len_ptr", "i64"), ("out_ptr", "x"), ("hn_ptr", "x"), ("act_ptr", "a"),
                            ("bar_ptr", "i32"), ("err_ptr", "i32")],
    "_gru_bwd_persistent": [("gout_ptr", "x"), ("ghn_ptr", "x"), ("w_ptr", "x"), ("h0_ptr", "x"),
                            ("out_ptr", "x"), ("act_ptr", "a"), ("len_ptr", "i64"), ("dgx_ptr", "x"),
                            ("dgh_ptr", "x"), ("dh0_ptr", "a"), ("buf_ptr", "a"), ("bar_ptr", "i32"),
                            ("err_ptr", "i32")],
}
_CONSTEXPRS = ("BLOCK_B", "BLOCK_N", "BLOCK_K", "KP", "RESIDENT", "ALLOW_TF32", "F64", "DOT_F32")

# Fixed tile: 16 batch rows (tl.dot's minimum M; rows past B masked; an inner loop covers any B),
# contraction chunks of 32 when W is streamed.
BLOCK_B, BLOCK_K = 16, 32
# Hidden units per program (P = cdiv(H, BLOCK_N) programs per direction). 16 is the default: the
# most programs, so the most SMs and the smallest W slice each (bi H=1024: 128 programs, within
# an H100's / H200's 132 SMs at one program per SM); 32 halves P for the sweep and for cards
# with fewer SMs (A100: 108).
BLOCK_NS = (16, 32)
# W_hh slice loaded once for all T steps ("resident") only in the bucket 128 < H <= 256, in
# half precision and with BLOCK_N = 16 (tile [KP=256, 16] per gate: 24-32 KB per program; Triton
# keeps the loop-invariant dot operand in shared memory: 33-41 KB per program, AOT).
# Larger slices do not fit one program; smaller H gains little (one or two streamed chunks,
# read from L1/L2). Every other H streams W from L2 in BLOCK_K chunks each step (spread over D*P SMs:
# bi H=1024 bf16 is 64 KB per program per step).
RESIDENT_KP = 256
RESIDENT_BLOCK_N = 16
# Bounded spin of the grid barrier: atomic reads per wait before a program gives up (each read
# is a round trip to L2, ~0.5-1 us: a few seconds at most).
SPIN_LIMIT = 1 << 22
# Overrides for bench/sweep_rnn.py and the tests: block_n, resident (True / False / "auto"),
# num_warps, and force_persistent (skip the co-residency check: tests only, the interpreter with
# one program per direction, or the bounded-spin test).
TUNE: dict = {}


def _pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def _resident_ok(H: int) -> bool:
    return RESIDENT_KP // 2 < H <= RESIDENT_KP


def _launch_shape(kernel: str, dtype: torch.dtype, block_n: int, resident: bool) -> tuple[int, int]:
    """(num_warps, num_stages), from AOT compiles (tests/test_rnn_compile.py, triton 3.8, sm_80
    and sm_90, aligned): the choice at which each configuration compiles without spills.
    float32: 8 warps, 1 stage (4 warps or 2 stages spilled 8-64 B on sm_80). Half, resident W
    (BLOCK_N = 16): 8 warps (the LSTM kernels spilled 8-16 B at 4), but the GRU backward 4.
    Half, streamed W: 4 warps and 2 stages (the W chunks software-pipelined over the contraction
    loop), but the LSTM forward at BLOCK_N = 32 (8 warps, 1 stage) and the GRU backward at
    BLOCK_N = 16 (8 warps): 8-24 B of stack otherwise."""
    if dtype in (torch.float32, torch.float64):
        return 8, 1
    if resident:
        return (4 if kernel == "_gru_bwd_persistent" else 8), 1
    if kernel == "_lstm_fwd_persistent" and block_n == 32:
        return 8, 1
    if kernel == "_gru_bwd_persistent" and block_n == 16:
        return 8, 2
    return 4, 2


def block_ns(kernel: str, dtype: torch.dtype) -> tuple[int, ...]:
    """The BLOCK_N a kernel runs with for dtype. The float32 GRU backward at BLOCK_N=16 keeps a
    stack frame (8-16 B on sm_80 at 4 and 8 warps, AOT): it runs with 32 only."""
    if kernel == "_gru_bwd_persistent" and dtype == torch.float32:
        return (32,)
    return BLOCK_NS


def pick_config(kernel: str, dtype: torch.dtype, *, H: int, block_n: int = 16, resident=None,
                num_warps: int | None = None, interpret: bool = False) -> dict:
    """The launch configuration of one persistent / step kernel: kernel, signature, constexprs,
    num_warps, num_stages. It depends on the kernel, the dtype, BLOCK_N and whether W is
    resident (then KP = RESIDENT_KP); not on T, B, D, P or the mode (persistent or step: a
    runtime argument), so launch_configs lists every one a GPU can run.

    resident None: the default rule (_resident_ok(H), half precision; float32 too in the
    interpreter); True needs _resident_ok(H).
    float32 runs without TF32 (TF32 is a permission; one configuration less to compile).
    F64 / DOT_F32 are interpreter-only variants, as in kernels/rnn.py."""
    if kernel not in KERNELS:
        raise ValueError(f"pick_config: kernel must be one of {KERNELS}, got {kernel!r}")
    if dtype not in _TY:
        raise ValueError(f"pick_config: unsupported dtype {dtype}")
    if block_n not in BLOCK_NS:
        raise ValueError(f"pick_config: block_n must be one of {BLOCK_NS}, got {block_n!r}")
    if block_n not in block_ns(kernel, dtype) and not interpret:
        raise ValueError(f"pick_config: {kernel} runs {dtype} with block_n in {block_ns(kernel, dtype)} "
                         f"on a GPU, got {block_n}")
    half = dtype in (torch.float16, torch.bfloat16)
    if resident is None:
        resident = _resident_ok(H) and (half or interpret) and block_n == RESIDENT_BLOCK_N
    if resident and not _resident_ok(H):
        raise ValueError(f"pick_config: a resident W slice needs {RESIDENT_KP // 2} < H <= {RESIDENT_KP}, got H={H}")
    if resident and block_n != RESIDENT_BLOCK_N:
        # AOT: the [256, 32] tiles kept 8 B of stack in both backward kernels on sm_90.
        raise ValueError(f"pick_config: a resident W slice runs with block_n={RESIDENT_BLOCK_N}, got {block_n}")
    if resident and not (half or interpret):
        # AOT (sm_80 / sm_90): a float32 tile of [256, BLOCK_N] x G gates spills ~6 KB of stack.
        raise ValueError(f"pick_config: a resident W slice is for float16 / bfloat16 on a GPU, got {dtype}")
    f64 = dtype == torch.float64
    x = _TY[dtype]
    a = "fp64" if f64 else "fp32"
    sig = {name: {"x": "*" + x, "a": "*" + a, "i64": "*i64", "i32": "*i32"}[kind]
           for name, kind in _SIG_ORDER[kernel]}
    ints = ["T", "B", "H", "D", "P", "S0", "S1"] + (["EPI"] if "bwd" in kernel else []) + ["PERSISTENT", "spin_limit"]
    for name in ints:
        sig[name] = "i32"
    constexprs = dict(BLOCK_B=BLOCK_B, BLOCK_N=block_n, BLOCK_K=BLOCK_K,
                      KP=RESIDENT_KP if resident else 16, RESIDENT=bool(resident), ALLOW_TF32=False,
                      F64=f64, DOT_F32=bool(interpret and dtype == torch.bfloat16))
    for name in _CONSTEXPRS:
        sig[name] = "constexpr"
    warps, stages = _launch_shape(kernel, dtype, block_n, bool(resident))
    return dict(kernel=kernel, signature=sig, constexprs=constexprs,
                num_warps=num_warps or warps, num_stages=stages)


def launch_configs(dtypes=GPU_DTYPES, kernels=KERNELS) -> list[dict]:
    """Every configuration the launchers can choose on a GPU: kernel x dtype x (BLOCK_N 16 or
    32 streamed, BLOCK_N 16 resident; float32 streamed only): 4 x (2 + 3 + 3) less the float32
    GRU backward at BLOCK_N=16 (block_ns) = 31."""
    out = []
    for kernel in kernels:
        for dtype in dtypes:
            for block_n in block_ns(kernel, dtype):
                for H in (RESIDENT_KP * 2, RESIDENT_KP):  # streamed, resident
                    cfg = pick_config(kernel, dtype, H=H, block_n=block_n)
                    if cfg not in out:
                        out.append(cfg)
    return out


# ----------------------------------------------------------------------------------------------
# Co-residency: how many programs of a compiled kernel fit on the device at once
# ----------------------------------------------------------------------------------------------

_CAPACITY: dict = {}


def co_resident_programs(compiled, num_warps: int, device: torch.device) -> int:
    """Programs of `compiled` (a Triton CompiledKernel) the device holds at once: SM count x
    programs per SM, the least of what registers (compiled.n_regs, allocated per warp in units
    of 256), threads and shared memory (metadata.shared + 1 KB the driver reserves per block)
    allow, and at most 32 per SM."""
    props = torch.cuda.get_device_properties(device)
    sms = props.multi_processor_count
    regs_sm = getattr(props, "regs_per_multiprocessor", 65536)
    threads_sm = getattr(props, "max_threads_per_multi_processor", 2048)
    smem_sm = getattr(props, "shared_memory_per_multiprocessor", 0) or 164 * 1024
    compiled._init_handles()
    n_regs = max(1, int(compiled.n_regs))
    threads = 32 * num_warps
    regs_block = ((n_regs * 32 + 255) // 256) * 256 * num_warps
    per_sm = min(regs_sm // regs_block, threads_sm // threads, 32)
    shared = int(getattr(compiled.metadata, "shared", 0) or 0)
    if shared:
        per_sm = min(per_sm, smem_sm // (shared + 1024))
    return per_sm * sms


# ----------------------------------------------------------------------------------------------
# Host launchers
# ----------------------------------------------------------------------------------------------


def interleave_w(w_hh: torch.Tensor, G: int, block_n: int, backward: bool) -> torch.Tensor:
    """W_hh [D, G*H, H] -> the gate-interleaved copy [D, P, G, H, BLOCK_N] (P = cdiv(H, BLOCK_N),
    hidden units past H zero): program (d, p)'s slice is one contiguous block.
    forward:  out[d, p, q, k, n] = W_hh[d, q*H + p*BLOCK_N + n, k]
    backward: out[d, p, q, i, n] = W_hh[d, q*H + i, p*BLOCK_N + n]"""
    D, GH, H = w_hh.shape
    P = triton.cdiv(H, block_n)
    w = w_hh.reshape(D, G, H, H)
    if backward:  # pad the column (owned unit) axis
        w = torch.nn.functional.pad(w, (0, P * block_n - H))  # [D, G, H(i), P*BN]
        return w.reshape(D, G, H, P, block_n).permute(0, 3, 1, 2, 4).contiguous()
    w = torch.nn.functional.pad(w, (0, 0, 0, P * block_n - H))  # [D, G, P*BN (j), H (k)]
    return w.reshape(D, G, P, block_n, H).permute(0, 2, 1, 4, 3).contiguous()


def _plan(kernel_name: str, dtype, H: int, D: int, ref: torch.Tensor, persistent: bool, args, ints):
    """(cfg, P, persistent) for this call: TUNE overrides, the default BLOCK_N = 16, and the
    persistent mode only where all D*P programs can be co-resident (else the step mode)."""
    interpret = not ref.is_cuda
    resident = TUNE.get("resident", "auto")
    allowed = block_ns(kernel_name, dtype)
    cands = [TUNE["block_n"]] if TUNE.get("block_n") in allowed else list(allowed)
    force = bool(TUNE.get("force_persistent"))
    first = None
    for block_n in cands:
        res = None if resident == "auto" else bool(resident)
        cfg = pick_config(kernel_name, dtype, H=H, block_n=block_n, resident=res,
                          num_warps=TUNE.get("num_warps"), interpret=interpret)
        P = triton.cdiv(H, block_n)
        first = first or (cfg, P, False)
        if not persistent:
            return first
        if force:
            return (cfg, P, True)
        if interpret:
            return first  # the interpreter runs programs one after another: no grid barrier
        cap = _capacity(kernel_name, cfg, ref, args, ints, (D, P))
        if D * P <= cap:
            return (cfg, P, True)
    return first  # no BLOCK_N fits: the step mode of the first (most parallel) configuration


def _capacity(kernel_name, cfg, ref, args, ints, grid) -> int:
    key = (kernel_name, tuple(sorted(cfg["constexprs"].items())), cfg["num_warps"], ref.device.index)
    if key not in _CAPACITY:
        try:
            kernel = globals()[kernel_name]
            compiled = kernel.warmup(*args, *ints, grid=grid, **cfg["constexprs"],
                                     num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
            _CAPACITY[key] = co_resident_programs(compiled, cfg["num_warps"], ref.device)
        except Exception:  # cannot tell: never risk a grid barrier that cannot complete
            _CAPACITY[key] = 0
    return _CAPACITY[key]


def _run(kernel_name: str, tensors: list, T: int, B: int, H: int, D: int, dtype, ref,
         persistent: bool, w_hh: torch.Tensor, backward: bool) -> str:
    """Launches a kernel over all T steps (and the backward epilogue): once, with the grid
    barrier, when persistent and co-resident, else once per step. Returns the mode that ran."""
    if ref.is_cuda and dtype not in GPU_DTYPES:
        raise TypeError(f"dtl_fast.kernels.rnn_persistent: {dtype} runs on the GPU only through "
                        f"backend 'auto' / 'reference' (the fused kernels take {GPU_DTYPES} there)")
    G = _GATES[kernel_name]
    bar = torch.zeros(D, dtype=torch.int32, device=ref.device)
    err = torch.zeros(1, dtype=torch.int32, device=ref.device)
    # The W copy depends on BLOCK_N, which the plan picks; plan with a copy for the first
    # candidate (the compiled kernel does not depend on its values).
    allowed = block_ns(kernel_name, dtype)
    block_n0 = TUNE["block_n"] if TUNE.get("block_n") in allowed else allowed[0]
    w = interleave_w(w_hh, G, block_n0, backward)
    wi = [i for i, (n, _) in enumerate(_SIG_ORDER[kernel_name]) if n == "w_ptr"][0]

    def args_with(w_):
        a = list(tensors)
        a.insert(wi, w_)
        return a + [bar, err]

    P0 = triton.cdiv(H, block_n0)
    ints0 = [T, B, H, D, P0, 0, T] + ([1] if backward else []) + [1, SPIN_LIMIT]
    cfg, P, pers = _plan(kernel_name, dtype, H, D, ref, persistent, args_with(w), ints0)
    if cfg["constexprs"]["BLOCK_N"] != block_n0:
        w = interleave_w(w_hh, G, cfg["constexprs"]["BLOCK_N"], backward)
    args = args_with(w)
    kernel = globals()[kernel_name]
    c = cfg["constexprs"]
    kw = dict(**c, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    grid = (D, P)
    with torch.cuda.device(ref.device) if ref.is_cuda else _nullcontext():
        if pers:
            ints = [T, B, H, D, P, 0, T] + ([1] if backward else []) + [1, SPIN_LIMIT]
            kernel[grid](*args, *ints, **kw)
            if int(err.item()) != 0:
                raise RuntimeError(
                    f"dtl_fast persistent RNN kernel ({kernel_name}, grid {D}x{P}): the grid-wide "
                    f"barrier timed out after {SPIN_LIMIT} spins (not all programs were resident "
                    "at once, e.g. another kernel held SMs); its outputs are invalid. Set "
                    "DTL_FAST_RNN_IMPL=step (or loop) to run without a grid barrier.")
            return "persistent"
        for s in range(T):
            ints = [T, B, H, D, P, s, s + 1] + ([0] if backward else []) + [0, SPIN_LIMIT]
            kernel[grid](*args, *ints, **kw)
        if backward:  # the epilogue needs every program's last dgates: a launch of its own
            kernel[grid](*args, T, B, H, D, P, T, T, 1, 0, SPIN_LIMIT, **kw)
    return "step"


# The mode of the last launch ("persistent" / "step"), for the tests and the sweep.
LAST_MODE: dict = {}


def lstm_forward(gates_x, w_hh, h0, c0, lengths, *, persistent: bool = True):
    """kernels/rnn.py's lstm_forward, run by the persistent kernel (persistent=True and the grid
    co-resident on a GPU) or its step mode: gates_x [T, B, D, 4H], w_hh [D, 4H, H], h0, c0
    [D, B, H], lengths None or int [B] -> out [T, B, D*H], h_n, c_n [D, B, H], act
    [T, B, D, 4H], c_all [T, B, D, H]."""
    outs, empty = _lstm_fwd_outputs(gates_x, w_hh, h0, c0)
    if empty:
        return outs
    T, B, D, _ = gates_x.shape
    H = w_hh.shape[-1]
    LAST_MODE["lstm_forward"] = _run(
        "_lstm_fwd_persistent",
        [gates_x.contiguous(), h0.contiguous(), c0.contiguous(), _len_arg(lengths, T, B, gates_x), *outs],
        T, B, H, D, gates_x.dtype, gates_x, persistent, w_hh, backward=False)
    return outs


def lstm_backward(grad_out, grad_hn, grad_cn, w_hh, c0, act, c_all, lengths, *, persistent: bool = True):
    """kernels/rnn.py's lstm_backward by the persistent / step kernel: -> dgates [T, B, D, 4H]
    (w_hh's dtype), dh0, dc0 [D, B, H] (float32 / float64)."""
    outs, buf = _lstm_bwd_outputs(act, w_hh, grad_hn, grad_cn)
    if buf is None:
        return outs
    T, B, D, _ = act.shape
    H, dt = w_hh.shape[-1], w_hh.dtype
    LAST_MODE["lstm_backward"] = _run(
        "_lstm_bwd_persistent",
        [grad_out.to(dt).contiguous(), grad_hn.to(dt).contiguous(), grad_cn.to(dt).contiguous(),
         c0.to(dt).contiguous(), act.contiguous(), c_all.contiguous(), _len_arg(lengths, T, B, act),
         *outs, buf], T, B, H, D, dt, act, persistent, w_hh, backward=True)
    return outs


def gru_forward(gates_x, w_hh, b_hn, h0, lengths, *, persistent: bool = True):
    """kernels/rnn.py's gru_forward by the persistent / step kernel: gates_x [T, B, D, 3H],
    w_hh [D, 3H, H], b_hn [D, H], h0 [D, B, H] -> out [T, B, D*H], h_n [D, B, H], act
    [T, B, D, 4H]."""
    outs, empty = _gru_fwd_outputs(gates_x, w_hh, h0)
    if empty:
        return outs
    T, B, D, _ = gates_x.shape
    H = w_hh.shape[-1]
    LAST_MODE["gru_forward"] = _run(
        "_gru_fwd_persistent",
        [gates_x.contiguous(), b_hn.contiguous(), h0.contiguous(), _len_arg(lengths, T, B, gates_x), *outs],
        T, B, H, D, gates_x.dtype, gates_x, persistent, w_hh, backward=False)
    return outs


def gru_backward(grad_out, grad_hn, w_hh, h0, out, act, lengths, *, persistent: bool = True):
    """kernels/rnn.py's gru_backward by the persistent / step kernel: -> dgates_x, dgates_h
    [T, B, D, 3H] (w_hh's dtype), dh0 [D, B, H] (float32 / float64)."""
    outs, buf = _gru_bwd_outputs(act, w_hh, grad_hn)
    if buf is None:
        return outs
    T, B, D, _ = act.shape
    H, dt = w_hh.shape[-1], w_hh.dtype
    LAST_MODE["gru_backward"] = _run(
        "_gru_bwd_persistent",
        [grad_out.to(dt).contiguous(), grad_hn.to(dt).contiguous(), h0.to(dt).contiguous(),
         out.contiguous(), act.contiguous(), _len_arg(lengths, T, B, act), *outs, buf],
        T, B, H, D, dt, act, persistent, w_hh, backward=True)
    return outs
