"""Scaled cosine attention backward, second version: the tutorial's deterministic layout on
normalised inputs.

Pre-pass (kernels/cosine_attention_fwd._prep): q_hat * S (S = scale * log2 e) and k_hat (and the
memory keys) in the input dtype, zero-padded to BLOCK_D, with the row norms |q|, |k| in float32;
delta = rowsum(dO * O) (kernels/cosine_attention._rowdot). Then, with base-2 logits that are
plain dot products and p = exp2(logit - lse * log2 e) from the forward's lse:

  _cos_attn_bwd2_dkdv_kernel  a key block resident (k_hat, v), query blocks streamed:
                              dv = sum_i p_ij dO_i, d k_hat_j = ln 2 * sum_i dS_ij (q_hat_i S),
                              then the normalisation's Jacobian on the resident block (epilogue)
  _cos_attn_bwd2_dq_kernel    a query block resident, key blocks streamed: d q_hat_i =
                              scale * sum_j dS_ij k_hat_j, the Jacobian (epilogue), and the
                              block's share of sum dS * cos for d scale

Every output element has one writer (no atomics): deterministic. Memory slots are the first key
blocks of the dk/dv grid, written per (b, h) in float32 and summed over the batch by the
launcher, as in the first backward. Query and key ranges are block-aware as in the second
forward: masked loops only over edge blocks. Windows and key lengths may differ per head
(kernels/cosine_attention._head_mask: WINDOW == -2 reads WINS[h], HAS_LENS == 2 reads
LENS[b * H + h]): scalar loads once per program, the loops are those of the shared forms.

It computes the same gradients as kernels/cosine_attention.cosine_attention_backward, with the
normalised rows rounded to the input dtype (as the composite and the second forward do).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from dtl_fast.kernels.cosine_attention import (_acc, _acc_dtype, _dot_precision, _exp2,
                                               _fits_i32, _head_mask, _mask_args, _mm, _mma,
                                               _normalize_bwd, _rowdot, _slice32, _TRITON_DTYPE)
from dtl_fast.kernels.cosine_attention_fwd import _cls, _prep, block_d, sm90_measured

_RUNTIME = ["H", "NQ", "NK", "M", "WINDOW", "HAS_LENS"]


@triton.jit
def _dkdv_loop(dk_acc, dv_acc, k, v, qb, dob, stride_don, lseb, deltab, lo, hi, NQ, offs_n,
               win, DV, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, MASK: tl.constexpr,
               EVEN_DV: tl.constexpr, IS_F64: tl.constexpr, DOT_PREC: tl.constexpr):
    # Query blocks lo, lo + BLOCK_M, ... < hi against the resident key block. Without MASK
    # every (query, key) pair is valid and every query row is < NQ.
    offs_d = tl.arange(0, BLOCK_D)
    for start in range(lo, hi, BLOCK_M):
        offs_m = start + tl.arange(0, BLOCK_M)
        qp = qb + offs_m[:, None] * BLOCK_D + offs_d[None, :]
        dop = dob + offs_m[:, None] * stride_don + offs_d[None, :]
        if MASK:
            mmask = offs_m < NQ
            qs = tl.load(qp, mask=mmask[:, None], other=0.0)
            if EVEN_DV:
                do = tl.load(dop, mask=mmask[:, None], other=0.0)
            else:
                do = tl.load(dop, mask=mmask[:, None] & (offs_d[None, :] < DV), other=0.0)
            # rows past NQ: lse = +inf gives p = 0
            lse2 = tl.load(lseb + offs_m, mask=mmask, other=float("inf")) * 1.4426950408889634
            delta = tl.load(deltab + offs_m, mask=mmask, other=0.0)
        else:
            qs = tl.load(qp)
            if EVEN_DV:
                do = tl.load(dop)
            else:
                do = tl.load(dop, mask=offs_d[None, :] < DV, other=0.0)
            lse2 = tl.load(lseb + offs_m) * 1.4426950408889634
            delta = tl.load(deltab + offs_m)
        st = _mm(k, tl.trans(qs), DOT_PREC)  # [BLOCK_N, BLOCK_M] base-2 logits
        pt = _exp2(st - lse2[None, :], IS_F64)
        if MASK:
            pt = tl.where(tl.abs(offs_m[None, :] - offs_n[:, None]) <= win, pt, 0.0)
        dv_acc = _mma(pt.to(do.dtype), do, dv_acc, DOT_PREC)
        dpt = _mm(v, tl.trans(do), DOT_PREC)
        dst = pt * (dpt - delta[None, :])
        dk_acc = _mma(dst.to(qs.dtype), qs, dk_acc, DOT_PREC)
    return dk_acc, dv_acc


@triton.jit(do_not_specialize=_RUNTIME)
def _cos_attn_bwd2_dkdv_kernel(QS, KN, K, V, MKN, MK, MV, DO, NRM_K, NRM_M, LENS, WINS, LSE,
                               DELTA,
                               DK, DV_OUT, DMK, DMV,
                               stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
                               stride_mkh, stride_mkn, stride_mvh, stride_mvn,
                               stride_dob, stride_doh, stride_don,
                               stride_dkb, stride_dkh, stride_dkn, stride_dvb, stride_dvh,
                               stride_dvn, H, NQ, NK, M, D, DV, WINDOW, HAS_LENS,
                               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                               BLOCK_D: tl.constexpr, EVEN_DV: tl.constexpr,
                               IS_F64: tl.constexpr, DOT_PREC: tl.constexpr):
    # One key block of one (b, h); the first cdiv(M, BLOCK_N) blocks of each (b, h) are memory
    # slots (no lengths, no window), written to the float32 per-(b, h) buffers DMK / DMV.
    pid = tl.program_id(0)
    n_memb = tl.cdiv(M, BLOCK_N)
    n_blk = n_memb + tl.cdiv(NK, BLOCK_N)
    pid_n = pid % n_blk
    bh = pid // n_blk
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    big = NQ + NK + M + BLOCK_M + BLOCK_N
    is_mem = pid_n < n_memb
    if is_mem:
        n0 = pid_n * BLOCK_N
        knb = MKN + h * M * BLOCK_D
        kb = MK + h * stride_mkh
        vb = MV + h * stride_mvh
        skn = (pid * 0 + stride_mkn).to(tl.int32)
        svn = (pid * 0 + stride_mvn).to(tl.int32)
        nb = NRM_M + h * M
        kend = M
        win = big
    else:
        n0 = (pid_n - n_memb) * BLOCK_N
        knb = KN + bh.to(tl.int64) * NK * BLOCK_D
        kb = K + b * stride_kb + h * stride_kh
        vb = V + b * stride_vb + h * stride_vh
        skn = (pid * 0 + stride_kn).to(tl.int32)
        svn = (pid * 0 + stride_vn).to(tl.int32)
        nb = NRM_K + bh.to(tl.int64) * NK
        kend, win = _head_mask(LENS, WINS, b, h, H, NK, WINDOW, HAS_LENS, big)
    nrows = tl.where(is_mem, M, NK)
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    nmask = offs_n < kend
    k = tl.load(knb + offs_n[:, None] * BLOCK_D + offs_d[None, :], mask=nmask[:, None], other=0.0)
    v = tl.load(vb + offs_n[:, None] * svn + offs_d[None, :],
                mask=nmask[:, None] & (offs_d[None, :] < DV), other=0.0)
    dk_acc = _acc(tl.zeros([BLOCK_N, BLOCK_D], tl.float32), IS_F64)
    dv_acc = _acc(tl.zeros([BLOCK_N, BLOCK_D], tl.float32), IS_F64)

    # Queries that see a key of this block: [lo, hi); those that see every key of it (and are
    # < NQ): [int_lo, int_hi). Keys past the length are zeroed at the end (each row of dk / dv
    # depends on its own row of p only), so they need no mask in the loop.
    lo = tl.maximum(n0 - win, 0) // BLOCK_M * BLOCK_M
    hi = tl.minimum(NQ, n0 + BLOCK_N + win)
    hi = tl.where(n0 < kend, hi, lo)  # a block past the length: zeros only
    int_lo = tl.cdiv(tl.maximum(n0 + BLOCK_N - 1 - win, 0), BLOCK_M) * BLOCK_M
    int_lo = tl.minimum(tl.maximum(int_lo, lo), tl.maximum(hi, lo))
    int_hi = tl.minimum(NQ, n0 + win + 1) // BLOCK_M * BLOCK_M
    int_hi = tl.minimum(tl.maximum(int_hi, int_lo), tl.maximum(hi, lo))
    qb = QS + bh.to(tl.int64) * NQ * BLOCK_D
    dob = DO + b * stride_dob + h * stride_doh
    lseb = LSE + bh.to(tl.int64) * NQ
    deltab = DELTA + bh.to(tl.int64) * NQ
    dk_acc, dv_acc = _dkdv_loop(dk_acc, dv_acc, k, v, qb, dob, stride_don, lseb, deltab, lo,
                                int_lo, NQ, offs_n, win, DV, BLOCK_M, BLOCK_D, True, EVEN_DV,
                                IS_F64, DOT_PREC)
    dk_acc, dv_acc = _dkdv_loop(dk_acc, dv_acc, k, v, qb, dob, stride_don, lseb, deltab, int_lo,
                                int_hi, NQ, offs_n, win, DV, BLOCK_M, BLOCK_D, False, EVEN_DV,
                                IS_F64, DOT_PREC)
    dk_acc, dv_acc = _dkdv_loop(dk_acc, dv_acc, k, v, qb, dob, stride_don, lseb, deltab, int_hi,
                                hi, NQ, offs_n, win, DV, BLOCK_M, BLOCK_D, True, EVEN_DV,
                                IS_F64, DOT_PREC)

    # dv is stored first, so that the float32 reload of the raw k rows below is live with one
    # [BLOCK_N, BLOCK_D] float32 accumulator, not two (the epilogue's register peak; stores are
    # not moved across loads by the compiler, which cannot tell the pointers apart).
    dv_acc = tl.where(nmask[:, None], dv_acc, 0.0)
    smask = offs_n < nrows
    mb = bh.to(tl.int64) * M
    if is_mem:
        tl.store(DMV + (mb + offs_n[:, None]) * DV + offs_d[None, :], dv_acc,
                 mask=smask[:, None] & (offs_d[None, :] < DV))
    else:
        tl.store(DV_OUT + b * stride_dvb + h * stride_dvh + offs_n[:, None] * stride_dvn
                 + offs_d[None, :], dv_acc.to(DV_OUT.dtype.element_ty),
                 mask=smask[:, None] & (offs_d[None, :] < DV))
    # d k_hat = ln 2 * sum_i dS_ij (q_hat_i S); then the normalisation's Jacobian on the raw
    # rows (reloaded here, in float32) and their norms from the pre-pass.
    kf = _acc(tl.load(kb + offs_n[:, None] * skn + offs_d[None, :],
                      mask=nmask[:, None] & (offs_d[None, :] < D), other=0.0), IS_F64)
    nrm_k = tl.load(nb + offs_n, mask=nmask, other=1.0)
    dk = tl.where(nmask[:, None], _normalize_bwd(kf, dk_acc * 0.6931471805599453, nrm_k), 0.0)
    if is_mem:
        tl.store(DMK + (mb + offs_n[:, None]) * D + offs_d[None, :], dk,
                 mask=smask[:, None] & (offs_d[None, :] < D))
    else:
        tl.store(DK + b * stride_dkb + h * stride_dkh + offs_n[:, None] * stride_dkn
                 + offs_d[None, :], dk.to(DK.dtype.element_ty),
                 mask=smask[:, None] & (offs_d[None, :] < D))


@triton.jit
def _dq_loop(dq_acc, dsc_acc, z_acc, c_acc, qs, do, lse2, delta, kb, vb, stride_vn, lo, hi,
             kend, offs_m, win, DV, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
             MASK: tl.constexpr, EVEN_DV: tl.constexpr, IS_F64: tl.constexpr,
             DOT_PREC: tl.constexpr):
    offs_d = tl.arange(0, BLOCK_D)
    for start in range(lo, hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        kp = kb + offs_n[:, None] * BLOCK_D + offs_d[None, :]
        vp = vb + offs_n[:, None] * stride_vn + offs_d[None, :]
        if MASK:
            nmask = offs_n < kend
            k = tl.load(kp, mask=nmask[:, None], other=0.0)
            if EVEN_DV:
                v = tl.load(vp, mask=nmask[:, None], other=0.0)
            else:
                v = tl.load(vp, mask=nmask[:, None] & (offs_d[None, :] < DV), other=0.0)
        else:
            k = tl.load(kp)
            if EVEN_DV:
                v = tl.load(vp)
            else:
                v = tl.load(vp, mask=offs_d[None, :] < DV, other=0.0)
        s = _mm(qs, tl.trans(k), DOT_PREC)  # base-2 logits = S cos
        p = _exp2(s - lse2[:, None], IS_F64)
        if MASK:
            valid = nmask[None, :] & (tl.abs(offs_m[:, None] - offs_n[None, :]) <= win)
            p = tl.where(valid, p, 0.0)
        dp = _mm(do, tl.trans(v), DOT_PREC)
        ds = p * (dp - delta[:, None])
        dq_acc = _mma(ds.to(k.dtype), k, dq_acc, DOT_PREC)
        # cos = s / S: the 1 / S is applied once to the row sums in the epilogue
        dsc_acc += tl.sum(ds * s, axis=1)
        z_acc += tl.sum(ds, axis=1)
        c_acc += tl.sum(p * s, axis=1)
    return dq_acc, dsc_acc, z_acc, c_acc


@triton.jit(do_not_specialize=_RUNTIME)
def _cos_attn_bwd2_dq_kernel(QS, Q, KN, V, MKN, MV, DO, NRM_Q, SCALE, LENS, WINS, LSE, DELTA,
                             DQ, DSCALE_PART, stride_qb, stride_qh, stride_qn, stride_vb, stride_vh,
                             stride_vn, stride_mvh, stride_mvn, stride_dob, stride_doh,
                             stride_don, stride_dqb, stride_dqh, stride_dqn,
                             H, NQ, NK, M, D, DV, WINDOW, HAS_LENS,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                             BLOCK_D: tl.constexpr, EVEN_DV: tl.constexpr,
                             IS_F64: tl.constexpr, DOT_PREC: tl.constexpr):
    pid = tl.program_id(0)
    n_mb = tl.cdiv(NQ, BLOCK_M)
    pid_m = pid % n_mb
    bh = pid // n_mb
    b = (bh // H).to(tl.int64)
    h = bh % H
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mmask = offs_m < NQ
    qs = tl.load(QS + (bh.to(tl.int64) * NQ + offs_m[:, None]) * BLOCK_D + offs_d[None, :],
                 mask=mmask[:, None], other=0.0)
    do = tl.load(DO + b * stride_dob + h.to(tl.int64) * stride_doh + offs_m[:, None] * stride_don
                 + offs_d[None, :], mask=mmask[:, None] & (offs_d[None, :] < DV), other=0.0)
    rowb = bh.to(tl.int64) * NQ
    lse2 = tl.load(LSE + rowb + offs_m, mask=mmask, other=float("inf")) * 1.4426950408889634
    delta = tl.load(DELTA + rowb + offs_m, mask=mmask, other=0.0)
    scale = _acc(tl.load(SCALE + h), IS_F64)
    rS = 1.0 / (scale * 1.4426950408889634)
    dq_acc = _acc(tl.zeros([BLOCK_M, BLOCK_D], tl.float32), IS_F64)
    dsc_acc = _acc(tl.zeros([BLOCK_M], tl.float32), IS_F64)
    z_acc = _acc(tl.zeros([BLOCK_M], tl.float32), IS_F64)
    c_acc = _acc(tl.zeros([BLOCK_M], tl.float32), IS_F64)

    big = NQ + NK + M + BLOCK_M + BLOCK_N
    kend, win = _head_mask(LENS, WINS, b, h, H, NK, WINDOW, HAS_LENS, big)
    lo = tl.maximum(m0 - win, 0) // BLOCK_N * BLOCK_N
    hi = tl.minimum(kend, m0 + BLOCK_M + win)
    int_lo = tl.cdiv(tl.maximum(m0 + BLOCK_M - 1 - win, 0), BLOCK_N) * BLOCK_N
    int_lo = tl.minimum(tl.maximum(int_lo, lo), tl.maximum(hi, lo))
    int_hi = tl.minimum(kend, m0 + win + 1) // BLOCK_N * BLOCK_N
    int_hi = tl.maximum(int_hi, int_lo)
    kb = KN + bh.to(tl.int64) * NK * BLOCK_D
    vb = V + b * stride_vb + h.to(tl.int64) * stride_vh
    mkb = MKN + h.to(tl.int64) * M * BLOCK_D
    mvb = MV + h.to(tl.int64) * stride_mvh
    dq_acc, dsc_acc, z_acc, c_acc = _dq_loop(
        dq_acc, dsc_acc, z_acc, c_acc, qs, do, lse2, delta, mkb, mvb, stride_mvn, 0, M, M,
        offs_m, big, DV, BLOCK_N, BLOCK_D, True, EVEN_DV, IS_F64, DOT_PREC)
    dq_acc, dsc_acc, z_acc, c_acc = _dq_loop(
        dq_acc, dsc_acc, z_acc, c_acc, qs, do, lse2, delta, kb, vb, stride_vn, lo, int_lo, kend,
        offs_m, win, DV, BLOCK_N, BLOCK_D, True, EVEN_DV, IS_F64, DOT_PREC)
    dq_acc, dsc_acc, z_acc, c_acc = _dq_loop(
        dq_acc, dsc_acc, z_acc, c_acc, qs, do, lse2, delta, kb, vb, stride_vn, int_lo, int_hi,
        kend, offs_m, win, DV, BLOCK_N, BLOCK_D, False, EVEN_DV, IS_F64, DOT_PREC)
    dq_acc, dsc_acc, z_acc, c_acc = _dq_loop(
        dq_acc, dsc_acc, z_acc, c_acc, qs, do, lse2, delta, kb, vb, stride_vn, int_hi, hi, kend,
        offs_m, win, DV, BLOCK_N, BLOCK_D, True, EVEN_DV, IS_F64, DOT_PREC)

    # d q_hat = scale * sum_j dS_ij k_hat_j; the Jacobian on the raw rows (float32)
    qf = _acc(tl.load(Q + b * stride_qb + h.to(tl.int64) * stride_qh + offs_m[:, None] * stride_qn
                      + offs_d[None, :], mask=mmask[:, None] & (offs_d[None, :] < D), other=0.0),
              IS_F64)
    nrm_q = tl.load(NRM_Q + rowb + offs_m, mask=mmask, other=1.0)
    dq = _normalize_bwd(qf, dq_acc * scale, nrm_q)
    tl.store(DQ + b * stride_dqb + h.to(tl.int64) * stride_dqh + offs_m[:, None] * stride_dqn
             + offs_d[None, :], dq.to(DQ.dtype.element_ty),
             mask=mmask[:, None] & (offs_d[None, :] < D))
    # as the first backward: the rounding constant of delta along a row cancels out of
    # sum_j dS_ij cos_ij by subtracting (sum_j dS_ij) * (mean cos under p); cos = logit / S
    dsc = (dsc_acc - z_acc * c_acc) * rS
    tl.store(DSCALE_PART + pid, tl.sum(tl.where(mmask, dsc, 0.0), axis=0))


# ---------------------------------------------------------------------------------------------
# Launch configurations

KERNELS = ("_cos_attn_bwd2_dkdv_kernel", "_cos_attn_bwd2_dq_kernel")

# (kernel, dtype class, BLOCK_D) -> candidates (resident rows, streamed rows, warps, stages),
# the default first (bwd2_index picks another where the H100 sweep timed one faster); the sweep
# (bench/sweep_cosine_attention.py) runs candidate i of both kernels together, so both kernels
# have as many per (dtype class, BLOCK_D). Every half candidate compiles for sm_80 and sm_90
# without spills (stack 0, local 0: tests/test_cosine_attention_compile.py; registers sm_80 /
# sm_90 in the comments, triton 3.8).
#
# Why these tiles. The resident operands and float32 accumulators live in registers for the
# whole program: dk / dv keeps k, v (input dtype) and dk, dv (float32) of BLOCK_N x BLOCK_D,
# i.e. 12 * BLOCK_N * BLOCK_D bytes; dq keeps q, dO and dq: the same for BLOCK_M. Spread over
# 32 * warps threads, the tutorial's 128 x 64 at 4 warps is 192 of the 255 registers a thread
# may have before the loop's [128, 32] float32 tiles (logits, p, dp, ds): it spilled 80-150 B.
# So a 128-row resident tile gets 8 warps (96 registers of resident state); at d 128 the
# resident tile is 64 rows (8 warps: 96; a 128-row one spilled even at 8 warps). Halving
# the resident rows doubles the re-reads of the streamed side (Q, dO for dk / dv; K, V for
# dq): at N 4k, d 128 that is 136 MB instead of 68 MB per (b, h) against 17 GFLOP, which
# stays compute-bound if those re-reads hit L2 (bench/NOTES.md: predicted, unmeasured).
# Stages: 2 at 8 warps (each stage is a streamed Q / dO or K / V tile in shared memory; 3 is
# the alternative where it still fits without spills); 3 at 4 warps.
_HALF_32 = [(128, 32, 4, 3),  # dkdv 228 / 235, dq 221 / 248: 96 resident regs at 4 warps
            (64, 32, 4, 3)]   # dkdv 168 / 114, dq 151 / 127: twice the programs (short N)
_HALF_64 = [(128, 32, 8, 2),  # dkdv 180 / 197, dq 211 / 168 (d 40: 254 / 214, 255 / 185)
            (128, 32, 8, 3),  # dkdv 207 / 197, dq 227 / 172: one more stage in flight
            (64, 32, 4, 3)]   # dkdv 221 / 162, dq 238 / 164: the tutorial's 4 warps, 64 rows
BWD2_CANDIDATES = {
    ("_cos_attn_bwd2_dkdv_kernel", "half", 32): _HALF_32,
    ("_cos_attn_bwd2_dkdv_kernel", "half", 64): _HALF_64,
    # 218 / 222; 222 / 226
    ("_cos_attn_bwd2_dkdv_kernel", "half", 128): [(64, 32, 8, 2), (64, 32, 8, 3)],
    # float32 / float64: the interpreter's tiles (on a GPU the op runs float32 on the first
    # version, ops.attn_version; the compile test builds the float64 ones, spills allowed:
    # test_f64_every_kernel_compiles_for_sm80_sm90)
    ("_cos_attn_bwd2_dkdv_kernel", "f32", 32): [(32, 16, 4, 2)],
    ("_cos_attn_bwd2_dkdv_kernel", "f32", 64): [(32, 16, 4, 2)],
    ("_cos_attn_bwd2_dkdv_kernel", "f32", 128): [(32, 16, 8, 2)],
    ("_cos_attn_bwd2_dq_kernel", "half", 32): _HALF_32,
    ("_cos_attn_bwd2_dq_kernel", "half", 64): _HALF_64,
    # 246 / 173; 246 / 192 (4 warps, 16-row K / V chunks; (64, 32, 8, 3) reached 255 on sm_80)
    ("_cos_attn_bwd2_dq_kernel", "half", 128): [(64, 32, 8, 2), (64, 16, 4, 3)],
    ("_cos_attn_bwd2_dq_kernel", "f32", 32): [(32, 32, 4, 2)],
    ("_cos_attn_bwd2_dq_kernel", "f32", 64): [(16, 16, 8, 2)],
    ("_cos_attn_bwd2_dq_kernel", "f32", 128): [(16, 16, 8, 2)],
}


# Timed on an NVIDIA H100 (sm_90; run gpucheck-20261127T173701-4905,
# bench/results/gpu_check_nvidia-h100_3-attn-sweep.log, bf16, B 4, H 16, no memory slots):
# backward median ms per candidate index (both kernels):
#
#   shape              [0]      [1]      [2]
#   plain  N2048 d64   1.317    0.932    0.806
#   plain  N8192 d64   15.534   12.452   11.166
#   pad    N8192 d64   11.646   8.729    7.634
#   win256 N8192 d64   1.723    1.535    1.193
#   plain  N4096 d128  13.016   9.491    -
#
# Candidate 2 (64-row resident tiles, 4 warps, 3 stages) wins every d 64 row by 1.39-1.64x over
# the default, candidate 1 (3 stages) the d 128 row by 1.37x. So in the class these rows cover
# (kernels/cosine_attention_fwd.sm90_measured: sm_90, half types, d = dv in {64, 128}, max(Nq,
# Nk) from the smallest N timed at that head dim, no memory slots) those are the defaults; the
# default stays candidate 0 everywhere else (untimed).
SM90_BWD2_INDEX = {64: 2, 128: 1}


def bwd2_index(device, dtype: torch.dtype, d: int, dv: int, nq: int, nk: int, m: int) -> int:
    """The BWD2_CANDIDATES index a call runs by default: SM90_BWD2_INDEX[d] in the H100 rows'
    class (sm90_measured), else 0."""
    if sm90_measured(device, dtype, d, dv, nq, nk, m):
        return SM90_BWD2_INDEX[int(d)]
    return 0


def bwd2_config(kernel: str, dtype: torch.dtype, d: int, dv: int, index: int = 0) -> dict:
    """Constexprs and launch options of `kernel`: candidate `index` of BWD2_CANDIDATES."""
    BD = block_d(d, dv)
    rows, cols, warps, stages = BWD2_CANDIDATES[(kernel, _cls(dtype), BD)][index]
    if dtype == torch.float64:
        rows, cols = min(rows, 32), min(cols, 32)
    if kernel == "_cos_attn_bwd2_dkdv_kernel":
        consts = dict(BLOCK_M=cols, BLOCK_N=rows)
    else:
        consts = dict(BLOCK_M=rows, BLOCK_N=cols)
    consts.update(BLOCK_D=BD, EVEN_DV=int(dv) == BD)
    return dict(constexprs=consts, num_warps=warps, num_stages=stages)


_INT_ARGS = {"H", "NQ", "NK", "M", "D", "DV", "WINDOW", "HAS_LENS"}


def _signature(kernel: str, dtype: torch.dtype, consts: dict) -> dict:
    t = _TRITON_DTYPE[dtype]
    acc = "fp64" if dtype == torch.float64 else "fp32"
    ptr = {"LENS": "*i32", "WINS": "*i32", "SCALE": f"*{acc}", "LSE": f"*{acc}", "DELTA": f"*{acc}",
           "DSCALE_PART": f"*{acc}", "NRM_Q": f"*{acc}", "NRM_K": f"*{acc}", "NRM_M": f"*{acc}",
           "DMK": f"*{acc}", "DMV": f"*{acc}"}
    fn = globals()[kernel]
    while not hasattr(fn, "arg_names"):
        fn = fn.fn
    return {name: ("constexpr" if name in consts else
                   "i32" if name in _INT_ARGS or name.startswith("stride_") else
                   ptr.get(name, f"*{t}")) for name in fn.arg_names}


def _aligned_args(kernel: str, consts: dict, d: int | None) -> list[str]:
    fn = globals()[kernel]
    while not hasattr(fn, "arg_names"):
        fn = fn.fn
    out = []
    for name in fn.arg_names:
        if name in consts or name in ("H", "NQ", "NK", "M", "WINDOW", "HAS_LENS"):
            continue
        if name in ("D", "DV") or name.startswith("stride_") and name.endswith("n"):
            if d is not None and d % 16 == 0:
                out.append(name)
        else:
            out.append(name)
    return out


def launch_configs(dtypes=(torch.float32, torch.float16, torch.bfloat16),
                   head_dims=((32, 32), (40, 40), (64, 64), (128, 128)),
                   precisions=("ieee", "tf32"), kernels=KERNELS, candidates: bool = True
                   ) -> list[dict]:
    """Every launch configuration of the two kernels (all BWD2_CANDIDATES when `candidates`,
    else the defaults), in the form tests/_triton_aot.compile_configs takes."""
    seen, out = set(), []
    for kernel in kernels:
        for dtype in dtypes:
            for prec in (precisions if dtype == torch.float32 else ("ieee",)):
                for d, dv in head_dims:
                    n = len(BWD2_CANDIDATES[(kernel, _cls(dtype), block_d(d, dv))]) if candidates else 1
                    for i in range(n):
                        cfg = bwd2_config(kernel, dtype, d, dv, i)
                        consts = dict(cfg["constexprs"], IS_F64=dtype == torch.float64, DOT_PREC=prec)
                        aligned = _aligned_args(kernel, consts, d if d == dv else None)
                        key = (kernel, str(dtype), tuple(sorted(consts.items())), cfg["num_warps"],
                               cfg["num_stages"], tuple(aligned))
                        if key in seen:
                            continue
                        seen.add(key)
                        out.append(dict(kernel=kernel, signature=_signature(kernel, dtype, consts),
                                        constexprs=consts, num_warps=cfg["num_warps"],
                                        num_stages=cfg["num_stages"], dtype=str(dtype),
                                        divisible=aligned))
    return out


# ---------------------------------------------------------------------------------------------
# Host launcher

# The launcher takes per-head windows ([H] tensor) and per-head key lengths ([B, H]): the op
# (dtl_fast.ops.cosine_attention) routes per-head calls here only when this is True.
SUPPORTS_PER_HEAD = True


def cosine_attention_backward2(grad_out, q, k, v, scale, key_lengths, window, memory_k, memory_v,
                               out, lse, *, config: int | None = None):
    """As kernels/cosine_attention.cosine_attention_backward (same arguments and results:
    (dq, dk, dv, dscale [H], dmemory_k, dmemory_v), memory gradients empty [0] without memory),
    on normalised inputs; window None, an int or an int32 tensor [H] (per head, -1: none),
    key_lengths None, int32 [B] or [B, H] (per head). config: candidate index of
    BWD2_CANDIDATES for both kernels; None: bwd2_index's default."""
    B, H, Nq, d = q.shape
    Nk, dv = k.shape[2], v.shape[3]
    M = 0 if memory_k is None else memory_k.shape[1]
    lens, wins, win, has_lens = _mask_args(key_lengths, window, q.device)
    acc_dt = _acc_dtype(q.dtype)
    is_f64 = q.dtype == torch.float64
    prec = _dot_precision(q.dtype, q.device)
    if config is None:
        config = bwd2_index(q.device, q.dtype, d, dv, Nq, Nk, M)
    dq, dk, dvv = (t if _fits_i32(t) else torch.empty(t.shape, dtype=t.dtype, device=t.device)
                   for t in (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)))
    if memory_k is None:
        dmk, dmv = q.new_empty((0,)), q.new_empty((0,))
    elif B * H * M == 0 or B * H * Nq == 0:
        dmk, dmv = torch.zeros_like(memory_k), torch.zeros_like(memory_v)
    if B * H * Nq == 0:
        dk.zero_()
        dvv.zero_()
        return dq, dk, dvv, torch.zeros_like(scale), dmk, dmv
    q, k, v, memory_k, memory_v, grad_out, out = (
        _slice32(t) for t in (q, k, v, memory_k, memory_v, grad_out, out))
    BD = block_d(d, dv)

    delta = _rowdot(out, grad_out, False)
    qs, nrm_q = _prep(q, BD, scale, norms=True)
    kn, nrm_k = _prep(k, BD, None, norms=True)
    if M > 0:
        mk, mv = memory_k, memory_v
        mkn, nrm_m = _prep(mk, BD, None, batched=False, norms=True)
        dmk_b = torch.empty((B, H, M, d), dtype=acc_dt, device=q.device)
        dmv_b = torch.empty((B, H, M, dv), dtype=acc_dt, device=q.device)
    else:
        mk, mv, mkn, nrm_m = k, v, kn, nrm_k
        dmk_b = dmv_b = delta  # never written (no memory blocks)

    if B * H * (Nk + M) > 0:
        cfg = bwd2_config("_cos_attn_bwd2_dkdv_kernel", q.dtype, d, dv, config)
        bn = cfg["constexprs"]["BLOCK_N"]
        grid = ((triton.cdiv(Nk, bn) + triton.cdiv(M, bn)) * B * H,)
        _cos_attn_bwd2_dkdv_kernel[grid](
            qs, kn, k, v, mkn, mk, mv, grad_out, nrm_k, nrm_m, lens, wins, lse, delta,
            dk, dvv, dmk_b, dmv_b,
            k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
            mk.stride(-3), mk.stride(-2), mv.stride(-3), mv.stride(-2),
            grad_out.stride(0), grad_out.stride(1), grad_out.stride(2),
            dk.stride(0), dk.stride(1), dk.stride(2), dvv.stride(0), dvv.stride(1), dvv.stride(2),
            H, Nq, Nk, M, d, dv, win, has_lens,
            **cfg["constexprs"], IS_F64=is_f64, DOT_PREC=prec,
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    if M > 0:
        dmk = dmk_b.sum(dim=0).to(memory_k.dtype)
        dmv = dmv_b.sum(dim=0).to(memory_v.dtype)

    cfg = bwd2_config("_cos_attn_bwd2_dq_kernel", q.dtype, d, dv, config)
    n_mb = triton.cdiv(Nq, cfg["constexprs"]["BLOCK_M"])
    dscale_part = torch.empty((B, H, n_mb), dtype=acc_dt, device=q.device)
    _cos_attn_bwd2_dq_kernel[(n_mb * B * H,)](
        qs, q, kn, v, mkn, mv, grad_out, nrm_q, scale, lens, wins, lse, delta, dq, dscale_part,
        q.stride(0), q.stride(1), q.stride(2), v.stride(0), v.stride(1), v.stride(2),
        mv.stride(-3), mv.stride(-2), grad_out.stride(0), grad_out.stride(1), grad_out.stride(2),
        dq.stride(0), dq.stride(1), dq.stride(2), H, Nq, Nk, M, d, dv, win, has_lens,
        **cfg["constexprs"], IS_F64=is_f64, DOT_PREC=prec,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    dscale = dscale_part.sum(dim=(0, 2)).to(scale.dtype)
    return dq, dk, dvv, dscale, dmk, dmv
