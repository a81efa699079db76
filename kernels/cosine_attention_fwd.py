"""Scaled cosine attention forward, second version: normalise once, then a flash-attention
forward that knows nothing of cosines, with a fixed softmax maximum where that is safe.

    score(i, j) = s_h * cos(q_i, k_j),  s_h = exp(min(logit_scale_h, ln 100))

1. Pre-pass (_cos_attn_prep_kernel, one launch per tensor): q_i / max(|q_i|, eps) * s_h log2(e)
   and k_j / max(|k_j|, eps) (and the memory keys), rounded to the input dtype (as the normalise
   + SDPA composite rounds them) into contiguous [rows, BLOCK_D] buffers whose padding columns
   are zero: the main loop's Q / K loads need no head-dim mask and no stride arguments.
2. Main kernel (_cos_attn_fwd2_kernel): logits in base 2 are plain dot products of those rows.
   |cos| <= 1 bounds every logit to [-S, S], S = s log2(e), so where exp2(logit - S) cannot
   underflow (S <= fixed_max_limit(dtype), derived below) the softmax runs with the fixed
   maximum S: no running maximum, no rescaling of the accumulator. Above the limit the online
   maximum is kept. The choice is per head at run time (a scalar branch before the loops), so
   one compile serves every scale.
3. Block-aware masking: each program computes the key-block range its rows can see (key
   length, window: its own head's when they differ between heads, see
   kernels/cosine_attention._head_mask) and runs masked loops only over the edge blocks; the
   interior loop loads and computes without masks. The memory slots are one masked prologue
   loop.
4. On sm_90 (use_tma: by default where the H100 sweep timed it faster, see SM90_MEASURED_MIN_N;
   $DTL_FAST_ATTN_TMA=1 / 0 forces it on / off): the same kernel with USE_TMA loads the q
   block and the key blocks through TMA tensor descriptors, and with TMA_V the value blocks
   too where v's strides allow (tma_descriptors); the masks stay on the logits (and zero the
   values of masked edge rows), so the results are those of the pointer loads.

The outputs are those of kernels/cosine_attention.cosine_attention_forward: out in q's dtype
and lse, the natural log-sum-exp of each row's scores (+inf for a row with nothing to attend
to), so that module's backward applies unchanged.

A short-sequence path (_cos_attn_fwd_short_kernel, use_short: max(Nq, Nk, M) <= SHORT_MAX_N = 64,
half types): one program
holds whole (batch, head) tiles, several (b, h) per program, normalises in registers (rounding
as the pre-pass does) and takes the exact row maximum: one launch in all, no pre-pass.
"""
from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from dtl_fast.kernels.cosine_attention import (_acc, _acc_dtype, _dot_precision, _exp2,
                                               _head_mask, _inv, _mask_args, _mm, _mma, _slice32,
                                               _TRITON_DTYPE)

LOG2E = 1.4426950408889634
SHORT_MAX_N = 64

_RUNTIME = ["H", "NQ", "NK", "M", "WINDOW", "HAS_LENS", "NBH"]


# ---------------------------------------------------------------------------------------------
# The fixed-maximum limit, derived.
#
# With the fixed maximum S every weight is p = exp2(logit - S) in [exp2(-2 S), 1]. The weights
# must not underflow where they are rounded and summed:
# - float32 / bfloat16 weights (the same 8-bit exponent): the smallest normal is 2^-126. The
#   row sum l and the products p * v accumulated in float32 must stay normal too for values
#   down to 2^-24 |v| (a float32 mantissa of headroom): 2 S <= 126 - 24 = 102.
# - float16 weights (P is rounded to float16 before P @ V): the smallest normal is 2^-14, and
#   no headroom is left for products (they are exact in the float32 accumulator): 2 S <= 14.
# - float64 (tests): 2 S <= 1022 - 53.
# Above the limit a row whose keys all point away from its query (cos = -1) would lose its
# weights to underflow (zeros or subnormal noise) although its softmax is well defined.
_EXP_ROOM = {torch.float32: 126 - 24, torch.bfloat16: 126 - 24, torch.float16: 14,
             torch.float64: 1022 - 53}


def fixed_max_limit(dtype: torch.dtype) -> float:
    """Largest S = s * log2(e) (base-2 logit bound) for which the fixed-maximum softmax is
    used on `dtype` inputs: half the exponent room above (51 for float32 / bfloat16, i.e.
    scale s <= 35.35; 7 for float16, s <= 4.85)."""
    return _EXP_ROOM[dtype] / 2.0


def fixed_max_scale_limit(dtype: torch.dtype) -> float:
    """fixed_max_limit in units of the scale s = exp(min(logit_scale, ln 100))."""
    return fixed_max_limit(dtype) / LOG2E


# "auto": the derived limit; "always" / "never": force one softmax (tests show the limit is
# needed and test the online path at small scales; the sweep compares the two).
FIXED_MAX_MODES = ("auto", "always", "never")


def _fixed_arg(dtype: torch.dtype, mode: str) -> float:
    if mode not in FIXED_MAX_MODES:
        raise ValueError(f"fixed_max must be one of {FIXED_MAX_MODES}, got {mode!r}")
    return {"auto": fixed_max_limit(dtype), "always": math.inf, "never": -1.0}[mode]


# ---------------------------------------------------------------------------------------------
# Kernels


@triton.jit(do_not_specialize=["H", "N"])
def _cos_attn_prep_kernel(X, Y, SCALE, NRM, stride_xb, stride_xh, stride_xn, H, N, D,
                          HAS_SCALE: tl.constexpr, WRITE_NRM: tl.constexpr,
                          BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, IS_F64: tl.constexpr):
    # Y[bh, n, :] = X[b, h, n, :] / max(|X[b, h, n, :]|, eps) (* SCALE[h] log2 e), zero-padded
    # to BLOCK_D columns, in Y's dtype. The norm and the product are taken in float32; the
    # backward also takes the norms (NRM[bh * N + n] = |X[b, h, n, :]|).
    pid = tl.program_id(0)
    n_rb = tl.cdiv(N, BLOCK_R)
    pid_r = pid % n_rb
    bh = pid // n_rb
    b = (bh // H).to(tl.int64)
    h = bh % H
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, BLOCK_D)
    rmask = offs_r < N
    x = tl.load(X + b * stride_xb + h.to(tl.int64) * stride_xh + offs_r[:, None] * stride_xn
                + offs_d[None, :], mask=rmask[:, None] & (offs_d[None, :] < D), other=0.0)
    xf = _acc(x, IS_F64)
    nrm = tl.sqrt(tl.sum(xf * xf, axis=1))
    if WRITE_NRM:
        tl.store(NRM + bh.to(tl.int64) * N + offs_r, nrm, mask=rmask)
    mul = _inv(nrm)
    if HAS_SCALE:
        mul = mul * (_acc(tl.load(SCALE + h), IS_F64) * 1.4426950408889634)
    y = xf * mul[:, None]
    tl.store(Y + (bh.to(tl.int64) * N + offs_r[:, None]) * BLOCK_D + offs_d[None, :],
             y.to(Y.dtype.element_ty), mask=rmask[:, None])


@triton.jit
def _fwd2_loop(acc, m_i, l_i, q, kb, vb, stride_vn, kidx, vidx0, vidx1, lo, hi, kend, offs_m,
               win, S, DV, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, MASK: tl.constexpr,
               FIXED: tl.constexpr, EVEN_DV: tl.constexpr, IS_F64: tl.constexpr,
               DOT_PREC: tl.constexpr, USE_TMA: tl.constexpr, TMA_V: tl.constexpr):
    # Key blocks starting at lo, lo + BLOCK_N, ... < hi. MASK: element masks (key length,
    # window); without it every (row, key) of every block is valid and nothing is masked.
    # FIXED: weights exp2(logit - S) (S: the logit bound); else the online maximum m_i.
    # USE_TMA: kb is a tensor descriptor [rows, N, BLOCK_D] read at [kidx, start, 0]; TMA_V: vb
    # is one [*, *, N, DV] read at [vidx0, vidx1, start, 0]. Rows past N (and columns past DV)
    # come back as zeros, as the masked pointer loads give them.
    offs_d = tl.arange(0, BLOCK_D)
    for start in range(lo, hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        if MASK:
            nmask = offs_n < kend
        if USE_TMA:
            # rows in [kend, N) are real keys past this head's length: their logits are
            # masked to -inf below, and their values zeroed (0 * NaN garbage would be NaN)
            k = kb.load([kidx, start, 0]).reshape(BLOCK_N, BLOCK_D)
        else:
            kp = kb + offs_n[:, None] * BLOCK_D + offs_d[None, :]
            if MASK:
                k = tl.load(kp, mask=nmask[:, None], other=0.0)
            else:
                k = tl.load(kp)
        s = _mm(q, tl.trans(k), DOT_PREC)
        if MASK:
            valid = nmask[None, :] & (tl.abs(offs_m[:, None] - offs_n[None, :]) <= win)
            s = tl.where(valid, s, float("-inf"))
        if FIXED:
            p = _exp2(s - S, IS_F64)
        else:
            # m_i starts below every logit (-S - 1): always finite, no -inf - -inf.
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            alpha = _exp2(m_i - m_new, IS_F64)
            p = _exp2(s - m_new[:, None], IS_F64)
            l_i = l_i * alpha
            acc = acc * alpha[:, None]
            m_i = m_new
        l_i += tl.sum(p, axis=1)
        if TMA_V:
            v = vb.load([vidx0, vidx1, start, 0]).reshape(BLOCK_N, BLOCK_D)
            if MASK:
                v = tl.where(nmask[:, None], v, 0.0)
        else:
            vp = vb + offs_n[:, None] * stride_vn + offs_d[None, :]
            if MASK:
                if EVEN_DV:
                    v = tl.load(vp, mask=nmask[:, None], other=0.0)
                else:
                    v = tl.load(vp, mask=nmask[:, None] & (offs_d[None, :] < DV), other=0.0)
            else:
                if EVEN_DV:
                    v = tl.load(vp)
                else:
                    v = tl.load(vp, mask=offs_d[None, :] < DV, other=0.0)
        acc = _mma(p.to(v.dtype), v, acc, DOT_PREC)
    return acc, m_i, l_i


@triton.jit
def _fwd2_all(acc, m_i, l_i, q, kb, vb, stride_vn, mkb, mvb, stride_mvn, bh, b, h, M, lo, int_lo,
              int_hi, hi, kend, offs_m, win, big, S, DV,
              BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, FIXED: tl.constexpr,
              EVEN_DV: tl.constexpr, IS_F64: tl.constexpr, DOT_PREC: tl.constexpr,
              USE_TMA: tl.constexpr, TMA_V: tl.constexpr):
    # memory slots (masked: M need not fill a block), lower edge, interior, upper edge.
    # Descriptor coordinates (int32, as TMA takes them): keys [B*H, NK, .] at bh, values
    # [B, H, NK, .] at (b, h); memory keys [H, M, .] at h, memory values [1, H, M, .] at (0, h).
    acc, m_i, l_i = _fwd2_loop(acc, m_i, l_i, q, mkb, mvb, stride_mvn, h, 0, h, 0, M, M, offs_m,
                               big, S, DV, BLOCK_N, BLOCK_D, True, FIXED, EVEN_DV, IS_F64,
                               DOT_PREC, USE_TMA, TMA_V)
    acc, m_i, l_i = _fwd2_loop(acc, m_i, l_i, q, kb, vb, stride_vn, bh, b, h, lo, int_lo, kend,
                               offs_m, win, S, DV, BLOCK_N, BLOCK_D, True, FIXED, EVEN_DV, IS_F64,
                               DOT_PREC, USE_TMA, TMA_V)
    acc, m_i, l_i = _fwd2_loop(acc, m_i, l_i, q, kb, vb, stride_vn, bh, b, h, int_lo, int_hi,
                               kend, offs_m, win, S, DV, BLOCK_N, BLOCK_D, False, FIXED, EVEN_DV,
                               IS_F64, DOT_PREC, USE_TMA, TMA_V)
    acc, m_i, l_i = _fwd2_loop(acc, m_i, l_i, q, kb, vb, stride_vn, bh, b, h, int_hi, hi, kend,
                               offs_m, win, S, DV, BLOCK_N, BLOCK_D, True, FIXED, EVEN_DV, IS_F64,
                               DOT_PREC, USE_TMA, TMA_V)
    return acc, m_i, l_i


@triton.jit(do_not_specialize=_RUNTIME + ["FIXED_S_MAX"])
def _cos_attn_fwd2_kernel(QS, KN, V, MKN, MV, SCALE, LENS, WINS, O, LSE,
                          stride_vb, stride_vh, stride_vn, stride_mvh, stride_mvn,
                          stride_ob, stride_oh, stride_on,
                          H, NQ, NK, M, DV, WINDOW, HAS_LENS, FIXED_S_MAX,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                          EVEN_DV: tl.constexpr, IS_F64: tl.constexpr, DOT_PREC: tl.constexpr,
                          USE_TMA: tl.constexpr = False, TMA_V: tl.constexpr = False):
    # One query block of one (b, h). QS [B*H, NQ, BLOCK_D]: normalised q times S; KN
    # [B*H, NK, BLOCK_D], MKN [H, M, BLOCK_D]: normalised keys (zero padding columns).
    # USE_TMA (sm_90): QS, KN, MKN are host tensor descriptors of those tensors (blocks
    # [1, BLOCK_M or BLOCK_N, BLOCK_D]); TMA_V (needs USE_TMA): V, MV too, as [B, H, NK, DV] and
    # [1, H, M, DV] (blocks [1, 1, BLOCK_N, BLOCK_D]). See tma_descriptors.
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
    if USE_TMA:
        q = QS.load([bh, m0, 0]).reshape(BLOCK_M, BLOCK_D)
    else:
        q = tl.load(QS + (bh.to(tl.int64) * NQ + offs_m[:, None]) * BLOCK_D + offs_d[None, :],
                    mask=mmask[:, None], other=0.0)
    S = _acc(tl.load(SCALE + h), IS_F64) * 1.4426950408889634
    l_i = _acc(tl.zeros([BLOCK_M], tl.float32), IS_F64)
    m_i = l_i - (S + 1.0)
    acc = _acc(tl.zeros([BLOCK_M, BLOCK_D], tl.float32), IS_F64)

    # Keys this block's rows can see: [lo, hi) (lo aligned down to a block); of those the
    # blocks in [int_lo, int_hi) are valid for every row (no mask): start >= m0 + BLOCK_M - 1
    # - win (left window edge of the last row) and start + BLOCK_N <= min(kend, m0 + win + 1)
    # (key length; right window edge of the first row). Blocks past hi in the last masked
    # block are masked by the window (j >= m0 + BLOCK_M + win) or the length.
    big = NQ + NK + M + BLOCK_M + BLOCK_N  # "no window": larger than any distance
    kend, win = _head_mask(LENS, WINS, b, h, H, NK, WINDOW, HAS_LENS, big)  # this head's
    lo = tl.maximum(m0 - win, 0) // BLOCK_N * BLOCK_N
    hi = tl.minimum(kend, m0 + BLOCK_M + win)
    int_lo = tl.cdiv(tl.maximum(m0 + BLOCK_M - 1 - win, 0), BLOCK_N) * BLOCK_N
    int_lo = tl.minimum(tl.maximum(int_lo, lo), tl.maximum(hi, lo))
    int_hi = tl.minimum(kend, m0 + win + 1) // BLOCK_N * BLOCK_N
    int_hi = tl.maximum(int_hi, int_lo)
    if USE_TMA:
        kb = KN
        mkb = MKN
    else:
        kb = KN + bh.to(tl.int64) * NK * BLOCK_D
        mkb = MKN + h.to(tl.int64) * M * BLOCK_D
    if TMA_V:
        vb = V
        mvb = MV
    else:
        vb = V + b * stride_vb + h.to(tl.int64) * stride_vh
        mvb = MV + h.to(tl.int64) * stride_mvh
    if S <= FIXED_S_MAX:
        acc, m_i, l_i = _fwd2_all(acc, m_i, l_i, q, kb, vb, stride_vn, mkb, mvb, stride_mvn, bh,
                                  bh // H, h, M, lo, int_lo, int_hi, hi, kend, offs_m, win, big, S, DV,
                                  BLOCK_N, BLOCK_D, True, EVEN_DV, IS_F64, DOT_PREC, USE_TMA,
                                  TMA_V)
        m_i = l_i * 0.0 + S
    else:
        acc, m_i, l_i = _fwd2_all(acc, m_i, l_i, q, kb, vb, stride_vn, mkb, mvb, stride_mvn, bh,
                                  bh // H, h, M, lo, int_lo, int_hi, hi, kend, offs_m, win, big, S, DV,
                                  BLOCK_N, BLOCK_D, False, EVEN_DV, IS_F64, DOT_PREC, USE_TMA,
                                  TMA_V)

    nonempty = l_i > 0
    l_safe = tl.where(nonempty, l_i, 1.0)
    out = acc / l_safe[:, None]
    tl.store(O + b * stride_ob + h.to(tl.int64) * stride_oh + offs_m[:, None] * stride_on
             + offs_d[None, :], out.to(O.dtype.element_ty),
             mask=mmask[:, None] & (offs_d[None, :] < DV))
    lse = tl.where(nonempty, (m_i + tl.log2(l_safe)) * 0.6931471805599453, float("inf"))
    tl.store(LSE + bh.to(tl.int64) * NQ + offs_m, lse, mask=mmask)


@triton.jit(do_not_specialize=_RUNTIME)
def _cos_attn_fwd_short_kernel(Q, K, V, MK, MV, SCALE, LENS, WINS, O, LSE,
                               stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                               stride_vb, stride_vh, stride_vn, stride_mkh, stride_mkn,
                               stride_mvh, stride_mvn, stride_ob, stride_oh, stride_on,
                               H, NQ, NK, M, D, DV, WINDOW, HAS_LENS, NBH,
                               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                               BLOCK_MEM: tl.constexpr, BLOCK_D: tl.constexpr,
                               HEADS: tl.constexpr, IS_F64: tl.constexpr,
                               DOT_PREC: tl.constexpr):
    # HEADS consecutive (b, h) pairs of NBH = B * H, each whole: all NQ <= BLOCK_M queries
    # against all NK <= BLOCK_N keys and M <= BLOCK_MEM memory slots (BLOCK_MEM 0: none), with
    # the normalisation done here in registers and the exact row maximum over memory and keys.
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mmask = offs_m < NQ
    big = NQ + NK + BLOCK_M + BLOCK_N
    for i in range(HEADS):
        bh = tl.program_id(0) * HEADS + i
        if bh < NBH:
            b = (bh // H).to(tl.int64)
            h = (bh % H).to(tl.int64)
            kend, win = _head_mask(LENS, WINS, b, h, H, NK, WINDOW, HAS_LENS, big)
            q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qn
                        + offs_d[None, :], mask=mmask[:, None] & (offs_d[None, :] < D), other=0.0)
            # normalised (and scaled) rows rounded to the input dtype exactly as the pre-pass
            # of the long path rounds them: the backward recomputes the logits from the
            # pre-pass's rows, so this lse must come from the same logits
            qf = _acc(q, IS_F64)
            S = _acc(tl.load(SCALE + h), IS_F64) * 1.4426950408889634
            qs = (qf * (_inv(tl.sqrt(tl.sum(qf * qf, axis=1))) * S)[:, None]).to(q.dtype)
            nmask = offs_n < kend
            k = tl.load(K + b * stride_kb + h * stride_kh + offs_n[:, None] * stride_kn
                        + offs_d[None, :], mask=nmask[:, None] & (offs_d[None, :] < D), other=0.0)
            kf = _acc(k, IS_F64)
            kn = (kf * _inv(tl.sqrt(tl.sum(kf * kf, axis=1)))[:, None]).to(k.dtype)
            s = _mm(qs, tl.trans(kn), DOT_PREC)
            valid = nmask[None, :] & (tl.abs(offs_m[:, None] - offs_n[None, :]) <= win)
            s = tl.where(valid, s, float("-inf"))
            # the exact maximum; -S - 1 (below every logit) where a row has nothing
            m = tl.maximum(tl.max(s, axis=1), -S - 1.0)
            if BLOCK_MEM > 0:
                offs_j = tl.arange(0, BLOCK_MEM)
                jmask = offs_j < M
                mk = tl.load(MK + h * stride_mkh + offs_j[:, None] * stride_mkn + offs_d[None, :],
                             mask=jmask[:, None] & (offs_d[None, :] < D), other=0.0)
                mkf = _acc(mk, IS_F64)
                mkn = (mkf * _inv(tl.sqrt(tl.sum(mkf * mkf, axis=1)))[:, None]).to(mk.dtype)
                sm = _mm(qs, tl.trans(mkn), DOT_PREC)
                sm = tl.where(jmask[None, :], sm, float("-inf"))
                m = tl.maximum(m, tl.max(sm, axis=1))
            p = _exp2(s - m[:, None], IS_F64)
            l_i = tl.sum(p, axis=1)
            v = tl.load(V + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vn
                        + offs_d[None, :], mask=nmask[:, None] & (offs_d[None, :] < DV), other=0.0)
            acc = _mm(p.to(v.dtype), v, DOT_PREC)
            if BLOCK_MEM > 0:
                pm = _exp2(sm - m[:, None], IS_F64)
                l_i += tl.sum(pm, axis=1)
                mv = tl.load(MV + h * stride_mvh + offs_j[:, None] * stride_mvn + offs_d[None, :],
                             mask=jmask[:, None] & (offs_d[None, :] < DV), other=0.0)
                acc = _mma(pm.to(mv.dtype), mv, acc, DOT_PREC)
            nonempty = l_i > 0
            l_safe = tl.where(nonempty, l_i, 1.0)
            out = acc / l_safe[:, None]
            tl.store(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_on
                     + offs_d[None, :], out.to(O.dtype.element_ty),
                     mask=mmask[:, None] & (offs_d[None, :] < DV))
            lse = tl.where(nonempty, (m + tl.log2(l_safe)) * 0.6931471805599453, float("inf"))
            tl.store(LSE + bh.to(tl.int64) * NQ + offs_m, lse, mask=mmask)


# ---------------------------------------------------------------------------------------------
# Launch configurations

KERNELS = ("_cos_attn_prep_kernel", "_cos_attn_fwd2_kernel", "_cos_attn_fwd_short_kernel")
_PREP = dict(BLOCK_R=32, num_warps=4, num_stages=1)

# _cos_attn_fwd2_kernel: (dtype class, BLOCK_D) -> candidate (BLOCK_M, BLOCK_N, warps, stages),
# the default first (fwd2_index picks another where the H100 sweep timed one faster). Half types
# as the Triton tutorial / FlexAttention on Hopper (BLOCK_M 128, BLOCK_N 64-128, 4-8 warps, 2-4
# stages; Flex's H100 default for bf16 d64 is 128 x 128, 4 warps, 3 stages); float32 smaller (no
# half tensor cores; IEEE or TF32 dots). bench/sweep_cosine_attention.py times every candidate
# and prints the winner per shape.
#
# Dropped after the sm_80 / sm_90 compile (tests/test_cosine_attention_compile.py) showed
# register spills (stack bytes): 4 warps with 128 x 128 tiles (d 32, 64), 128 x 64 with 4 warps
# (d 64, sm_80), every 128-row tile at d 128 on sm_80, float32 (32, 32) at d 64 unaligned and
# (16, 32) at d 128.
FWD2_CANDIDATES = {
    ("half", 32): [(128, 64, 4, 3), (128, 128, 8, 3), (64, 64, 4, 3)],
    ("half", 64): [(128, 64, 8, 4), (128, 128, 8, 3), (64, 64, 4, 3)],
    ("half", 128): [(64, 64, 4, 3)],
    ("f32", 32): [(64, 32, 4, 2), (64, 64, 4, 2)],
    ("f32", 64): [(64, 32, 4, 2)],
    ("f32", 128): [(32, 32, 4, 2)],
}


def _cls(dtype: torch.dtype) -> str:
    return "half" if dtype in (torch.float16, torch.bfloat16) else "f32"


def block_d(d: int, dv: int) -> int:
    """Head dims are bucketed: BLOCK_D = max(32, next_pow2(max(d, dv)))."""
    return max(32, triton.next_power_of_2(max(int(d), int(dv), 1)))


def fwd2_config(dtype: torch.dtype, d: int, dv: int, index: int = 0) -> dict:
    """Constexprs and launch options of _cos_attn_fwd2_kernel: candidate `index` (0: the
    default) of FWD2_CANDIDATES for this dtype class and head-dim bucket."""
    BD = block_d(d, dv)
    bm, bn, warps, stages = FWD2_CANDIDATES[(_cls(dtype), BD)][index]
    if dtype == torch.float64:
        bm, bn = min(bm, 32), min(bn, 32)
    return dict(constexprs=dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=BD, EVEN_DV=int(dv) == BD),
                num_warps=warps, num_stages=stages)


def short_config(dtype: torch.dtype, nq: int, nk: int, m: int, d: int, dv: int, nbh: int) -> dict:
    """Constexprs and launch options of _cos_attn_fwd_short_kernel (nq, nk <= SHORT_MAX_N):
    tiles of the next powers of two (at least 16), HEADS (b, h) pairs per program so that
    there are about 4 programs per SM of a 132-SM card (and at most 8 heads each)."""
    bm = max(16, triton.next_power_of_2(max(nq, 1)))
    bn = max(16, triton.next_power_of_2(max(nk, 1)))
    bmem = 0 if m == 0 else max(16, triton.next_power_of_2(m))
    heads = 1
    while heads < 8 and nbh // (2 * heads) >= 4 * 132:
        heads *= 2
    warps = 4 if bm * bn <= 64 * 64 else 8
    return dict(constexprs=dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_MEM=bmem, BLOCK_D=block_d(d, dv),
                                HEADS=heads),
                num_warps=warps, num_stages=1)


def use_short(nq: int, nk: int, m: int, bd: int = 32, dtype: torch.dtype = torch.bfloat16) -> bool:
    """The short path: every tile fits one program (max(Nq, Nk, M) <= SHORT_MAX_N), for half
    types (and float64, tests). Not float32: its IEEE dots are FMA loops whose whole-tile
    operands spill (thousands of stack bytes in the sm_80 / sm_90 compile), nor tiles of 128
    or head-dim buckets bd of 128 (spills on sm_80)."""
    return max(nq, nk, m) <= SHORT_MAX_N and dtype != torch.float32 and bd <= 64


# ---------------------------------------------------------------------------------------------
# Tensor descriptors (TMA) in _cos_attn_fwd2_kernel, sm_90.
#
# Host-side descriptors (triton.tools.tensor_descriptor.TensorDescriptor as kernel arguments;
# triton 3.6 and 3.8 both have them, the interpreter too): the launcher builds them and the
# kernel's USE_TMA / TMA_V branches call desc.load. Not the device-side tl.make_tensor_descriptor:
# that one writes a 128-byte descriptor per program into global scratch that the launch takes
# from triton.set_allocator, a ContextVar (process-global state a library should not set, and
# unset in the autograd engine's backward threads), and it adds the descriptor writes and a
# fence to every program. The host form needs neither: the descriptor travels as a
# __grid_constant__ kernel parameter.
TMA_ENV = "DTL_FAST_ATTN_TMA"
TMA_DTYPES = (torch.float16, torch.bfloat16)

# ---------------------------------------------------------------------------------------------
# Defaults from the first GPU rows of this module: NVIDIA H100 80GB HBM3 (sm_90), torch 2.11,
# triton 3.6, run gpucheck-20261127T173701-4905, bench/results/gpu_check_nvidia-h100_3-attn-sweep.log
# (bench/sweep_cosine_attention.py; bf16, B 4, H 16, no memory slots, fixed maximum). Forward
# median ms per FWD2_CANDIDATES entry, pointer loads / TMA:
#
#   shape              [0] (128,64,8,4)  [1] (128,128,8,3)  [2] (64,64,4,3)
#   plain  N2048 d64   0.235 / 0.180     0.237 / 0.230      0.187 / 0.196
#   plain  N8192 d64   2.873 / 2.162     2.953 / 2.787      2.346 / 2.404
#   pad    N8192 d64   2.043 / 1.512     2.148 / 2.033      1.743 / 1.682
#   win256 N8192 d64   0.457 / 0.390     0.476 / 0.489      0.341 / 0.350
#   plain  N4096 d128  1.042 / 1.055     (the only d 128 candidate)
#
# So, on sm_90 for half types at d = dv = 64, max(Nq, Nk) >= 2048, no memory slots (the class
# these rows cover): without a window, TMA with candidate 0, the fastest row of every such shape
# (1.04x the best pointer form at N 2048, within the sweep's ~5 % noise; 1.08x at N 8192, 1.15x
# padded); with a window, pointer loads with candidate 2 (TMA 0.97x; candidate 2 1.34x
# candidate 0). With TMA forced off ($DTL_FAST_ATTN_TMA=0) candidate 2, 1.17-1.34x candidate 0 at
# every row. d 128: TMA off (0.99x). Everything the rows do not cover (other head dims, shorter
# sequences, memory slots, other cards, float32) keeps pointer loads and candidate 0, as before
# them. The backward's tiles: kernels/cosine_attention_bwd.bwd2_index, from the same run.
#
# SM90_MEASURED_MIN_N: head dim (d = dv) -> the shortest max(Nq, Nk) the run timed at it.
SM90_MEASURED_MIN_N = {64: 2048, 128: 4096}


def _capability(device: torch.device) -> tuple[int, int] | None:
    device = torch.device(device)
    return torch.cuda.get_device_capability(device) if device.type == "cuda" else None


def _hopper(device) -> bool:
    """A CUDA device of compute capability 9.x on an NVIDIA build: ROCm reports 9.x too (MI210
    (9, 0), MI300 (9, 4), MI350 (9, 5)), where neither TMA nor these tiles were compiled or
    timed."""
    cap = _capability(device)
    return cap is not None and cap[0] == 9 and torch.version.hip is None


def sm90_measured(device, dtype: torch.dtype, d: int, dv: int, nq: int, nk: int, m: int) -> bool:
    """Whether the H100 sweep timed this class of call: an NVIDIA device of compute capability
    9.x (_hopper), float16 / bfloat16, d == dv with a SM90_MEASURED_MIN_N entry, max(nq, nk) at
    least that, no memory slots (m == 0)."""
    if dtype not in TMA_DTYPES or d != dv or m != 0:
        return False
    min_n = SM90_MEASURED_MIN_N.get(int(d))
    if min_n is None or max(nq, nk) < min_n:
        return False
    return _hopper(device)


def tma_api() -> bool:
    """Whether this Triton has host tensor descriptors (triton >= 3.3 or so; 3.6 and 3.8 do)."""
    try:
        from triton.tools.tensor_descriptor import TensorDescriptor  # noqa: F401
    except ImportError:
        return False
    return hasattr(tl, "tensor_descriptor")


def tma_requested() -> bool | None:
    """$DTL_FAST_ATTN_TMA: "1" forces the TMA variant on (where it can run), "0" forces it off,
    unset or "" leaves it to the measured default (None); any other value is an error (read
    at each call, so a typo never passes silently)."""
    val = os.environ.get(TMA_ENV, "")
    if val not in ("", "0", "1"):
        raise ValueError(f"${TMA_ENV} must be '0' or '1' (or unset), got {val!r}")
    return None if val == "" else val == "1"


def use_tma(device: torch.device, dtype: torch.dtype, d: int | None = None, dv: int | None = None,
            nq: int = 0, nk: int = 0, m: int = 0, windowed: bool = False) -> bool:
    """Whether _cos_attn_fwd2_kernel runs with tensor descriptors for a call on `device` of
    `dtype` with head dims d / dv, nq queries, nk keys, m memory slots, a window or not. Never
    off an NVIDIA device of compute capability 9.x (_hopper: TMA is Hopper's; sm_100 has it too
    but nothing here was compiled or timed for it; ROCm reports 9.x and has none), for other
    dtypes than float16 / bfloat16, or with a Triton without the API. There:
    $DTL_FAST_ATTN_TMA=1 on, =0 off, unset the H100 rows' rule (on where sm90_measured and no
    window; d, dv None: unknown, off). Raises ValueError on a bad env value."""
    asked = tma_requested()
    if asked is False:
        return False
    device = torch.device(device)
    if device.type != "cuda" or dtype not in TMA_DTYPES or not tma_api():
        return False
    if not _hopper(device):
        return False
    if asked:
        return True
    return (d is not None and dv is not None and int(d) == 64 and not windowed
            and sm90_measured(device, dtype, d, dv, nq, nk, m))


def fwd2_index(device, dtype: torch.dtype, d: int, dv: int, nq: int, nk: int, m: int,
               tma: bool) -> int:
    """The FWD2_CANDIDATES entry a call runs by default: at d = dv = 64 in the H100 rows' class
    (sm90_measured), candidate 0 with TMA and candidate 2 with pointer loads (the fastest of
    each form in those rows); 0 everywhere else."""
    if int(d) == 64 and sm90_measured(device, dtype, d, dv, nq, nk, m):
        return 0 if tma else 2
    return 0


def _tma_ok(t: torch.Tensor) -> bool:
    # TMA's rules for a global tensor: 16-byte aligned base, unit last stride, every other
    # stride a multiple of 16 bytes, no empty dimension
    return (t.stride(-1) == 1 and t.data_ptr() % 16 == 0 and min(t.shape) > 0
            and all(st * t.element_size() % 16 == 0 for st in t.stride()[:-1]))


def tma_descriptors(qs, kn, mkn, v, mv, M: int, consts: dict):
    """The kernel's (QS, KN, MKN, V, MV, TMA_V) for USE_TMA: descriptors of the pre-pass
    outputs qs, kn [B*H, N, BD] and mkn [H, M, BD] (always TMA-able: fresh, contiguous, BD >= 32),
    and of v [B, H, NK, dv], mv [H, M, dv] (as [1, H, M, dv]) when both meet TMA's stride and
    alignment rules (TMA_V True), else v, mv themselves (loaded with pointers)."""
    from triton.tools.tensor_descriptor import TensorDescriptor
    bm, bn, bd = consts["BLOCK_M"], consts["BLOCK_N"], consts["BLOCK_D"]
    QS = TensorDescriptor.from_tensor(qs, [1, bm, bd])
    KN = TensorDescriptor.from_tensor(kn, [1, bn, bd])
    MKN = TensorDescriptor.from_tensor(mkn, [1, bn, bd]) if M > 0 else KN
    mv4 = mv.unsqueeze(0) if M > 0 else v
    if not (_tma_ok(v) and _tma_ok(mv4)):
        return QS, KN, MKN, v, mv, False
    V = TensorDescriptor.from_tensor(v, [1, 1, bn, bd])
    MV = TensorDescriptor.from_tensor(mv4, [1, 1, bn, bd]) if M > 0 else V
    return QS, KN, MKN, V, MV, True


_INT_ARGS = {"H", "N", "NQ", "NK", "M", "D", "DV", "WINDOW", "HAS_LENS", "NBH"}


def _desc_args(consts: dict) -> dict:
    # the AOT signature of the descriptor arguments (the JIT's own spelling of a host
    # TensorDescriptor argument: tensordesc<element type[block shape]>)
    out = {}
    if consts.get("USE_TMA"):
        bm, bn, bd = consts["BLOCK_M"], consts["BLOCK_N"], consts["BLOCK_D"]
        out = {"QS": f"[1, {bm}, {bd}]", "KN": f"[1, {bn}, {bd}]", "MKN": f"[1, {bn}, {bd}]"}
        if consts.get("TMA_V"):
            out.update(V=f"[1, 1, {bn}, {bd}]", MV=f"[1, 1, {bn}, {bd}]")
    return out


def _signature(kernel: str, dtype: torch.dtype, consts: dict) -> dict:
    t = _TRITON_DTYPE[dtype]
    acc = "fp64" if dtype == torch.float64 else "fp32"
    ptr = {"LENS": "*i32", "WINS": "*i32", "SCALE": f"*{acc}", "LSE": f"*{acc}", "NRM": f"*{acc}"}
    ptr.update({name: f"tensordesc<{t}{shape}>" for name, shape in _desc_args(consts).items()})
    fn = globals()[kernel]
    while not hasattr(fn, "arg_names"):
        fn = fn.fn
    sig = {}
    for name in fn.arg_names:
        if name in consts:
            sig[name] = "constexpr"
        elif name == "FIXED_S_MAX":
            sig[name] = "fp32"
        elif name in _INT_ARGS or name.startswith("stride_"):
            sig[name] = "i32"
        else:
            sig[name] = ptr.get(name, f"*{t}")
    return sig


def _aligned_args(kernel: str, consts: dict, d: int | None) -> list[str]:
    # As kernels/cosine_attention._aligned_args: pointers, batch / head strides always; head
    # dims and row strides when d % 16 == 0.
    fn = globals()[kernel]
    while not hasattr(fn, "arg_names"):
        fn = fn.fn
    out = []
    descs = _desc_args(consts)  # no divisibility attribute on a descriptor
    for name in fn.arg_names:
        if name in consts or name in descs or name in ("H", "N", "NQ", "NK", "M", "WINDOW",
                                                       "HAS_LENS", "NBH", "FIXED_S_MAX"):
            continue
        if name in ("D", "DV") or name.startswith("stride_") and name.endswith("n"):
            if d is not None and d % 16 == 0:
                out.append(name)
        else:
            out.append(name)
    return out


def _short_shapes():
    # the short path's tile buckets the compile test covers: DTL's N 16 / 32 / 64, with and
    # without 8 memory slots
    return [(16, 16, 0), (32, 32, 8), (64, 64, 0), (64, 64, 8)]


def launch_configs(dtypes=(torch.float32, torch.float16, torch.bfloat16),
                   head_dims=((32, 32), (40, 40), (64, 64), (128, 128)),
                   precisions=("ieee", "tf32"), kernels=KERNELS, candidates: bool = True,
                   tma=((False, False),)) -> list[dict]:
    """Every launch configuration of this module's kernels for the given dtypes and head dims
    (all FWD2_CANDIDATES when `candidates`, else the defaults), deduplicated, in the form
    tests/_triton_aot.compile_configs takes. `tma`: the (USE_TMA, TMA_V) variants of
    _cos_attn_fwd2_kernel to list (sm_90 only when USE_TMA; half types: TMA_DTYPES)."""
    seen, out = set(), []

    def add(kernel, dtype, consts, warps, stages, d):
        aligned = _aligned_args(kernel, consts, d)
        key = (kernel, str(dtype), tuple(sorted(consts.items())), warps, stages, tuple(aligned))
        if key in seen:
            return
        seen.add(key)
        out.append(dict(kernel=kernel, signature=_signature(kernel, dtype, consts),
                        constexprs=consts, num_warps=warps, num_stages=stages, dtype=str(dtype),
                        divisible=aligned))

    for kernel in kernels:
        for dtype in dtypes:
            precs = precisions if dtype == torch.float32 and kernel != "_cos_attn_prep_kernel" \
                else ("ieee",)
            for prec in precs:
                for d, dv in head_dims:
                    dd = d if d == dv else None
                    if kernel == "_cos_attn_prep_kernel":
                        for has_scale in (False, True):
                            for write_nrm in (False, True):
                                consts = dict(HAS_SCALE=has_scale, WRITE_NRM=write_nrm,
                                              BLOCK_R=_PREP["BLOCK_R"], BLOCK_D=block_d(d, dv),
                                              IS_F64=dtype == torch.float64)
                                add(kernel, dtype, consts, _PREP["num_warps"], _PREP["num_stages"], dd)
                    elif kernel == "_cos_attn_fwd2_kernel":
                        n = len(FWD2_CANDIDATES[(_cls(dtype), block_d(d, dv))]) if candidates else 1
                        for i in range(n):
                            cfg = fwd2_config(dtype, d, dv, i)
                            for use, tma_v in tma:
                                if use and dtype not in TMA_DTYPES:
                                    continue
                                consts = dict(cfg["constexprs"], IS_F64=dtype == torch.float64,
                                              DOT_PREC=prec, USE_TMA=bool(use),
                                              TMA_V=bool(use and tma_v))
                                add(kernel, dtype, consts, cfg["num_warps"], cfg["num_stages"], dd)
                    else:
                        for nq, nk, m in _short_shapes():
                            if not use_short(nq, nk, m, block_d(d, dv), dtype):
                                continue
                            cfg = short_config(dtype, nq, nk, m, d, dv, 4 * 132 * 8)
                            consts = dict(cfg["constexprs"], IS_F64=dtype == torch.float64,
                                          DOT_PREC=prec)
                            add(kernel, dtype, consts, cfg["num_warps"], cfg["num_stages"], dd)
    return out


# ---------------------------------------------------------------------------------------------
# Host launcher


def _prep(x: torch.Tensor, BD: int, scale: torch.Tensor | None, batched: bool = True,
          norms: bool = False):
    """Normalised rows of x ([B, H, N, d], or [H, N, d] with batched=False) times
    scale[h] log2(e) when scale is given, as a contiguous [B * H, N, BD] (zero-padded) tensor;
    with norms=True also the row norms |x| [B * H * N] in the accumulation dtype: (y, norms)."""
    if batched:
        B, H, N, D = x.shape
        strides = (x.stride(0), x.stride(1), x.stride(2))
    else:
        B, (H, N, D) = 1, x.shape
        strides = (0, x.stride(0), x.stride(1))
    y = torch.empty((B * H, N, BD), dtype=x.dtype, device=x.device)
    nrm = torch.empty((B * H * N,), dtype=_acc_dtype(x.dtype), device=x.device) if norms else None
    if y.numel() > 0:
        br = _PREP["BLOCK_R"]
        _cos_attn_prep_kernel[(triton.cdiv(N, br) * B * H,)](
            x, y, scale if scale is not None else y, nrm if norms else y, *strides, H, N, D,
            HAS_SCALE=scale is not None, WRITE_NRM=norms, BLOCK_R=br, BLOCK_D=BD,
            IS_F64=x.dtype == torch.float64,
            num_warps=_PREP["num_warps"], num_stages=_PREP["num_stages"])
    return (y, nrm) if norms else y


def cosine_attention_forward2(q, k, v, scale, key_lengths, window, memory_k, memory_v, *,
                              fixed_max: str = "auto", config: int | None = None,
                              short: bool | None = None, tma: bool | None = None):
    """As kernels/cosine_attention.cosine_attention_forward (same arguments, per-head key_lengths
    [B, H] and window tensor [H] included, and results: out [B, H, Nq, dv] in q's dtype, lse
    [B, H, Nq] float32 / float64, +inf for empty rows), with the pre-pass + fixed-maximum
    kernel, or the short-sequence kernel.

    fixed_max: "auto" (the derived limit, fixed_max_limit), "always", "never" (tests, sweep).
    config: index into FWD2_CANDIDATES (the sweep); None: fwd2_index's default. short: None
    picks the short kernel when use_short(Nq, Nk, M, BLOCK_D); True / False force it (True
    needs use_short). tma: None loads through tensor descriptors when use_tma says so (sm_90:
    the H100 rows' default, $DTL_FAST_ATTN_TMA overrides); True / False force it (tests,
    sweep; True needs tma_api()).
    Nk == 0 (memory slots only) never uses them: a descriptor cannot describe an empty tensor."""
    B, H, Nq, d = q.shape
    Nk, dv = k.shape[2], v.shape[3]
    M = 0 if memory_k is None else memory_k.shape[1]
    out = torch.empty((B, H, Nq, dv), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, Nq), dtype=_acc_dtype(q.dtype), device=q.device)
    if B * H * Nq == 0:
        return out, lse
    fixed = _fixed_arg(q.dtype, fixed_max)
    q, k, v, memory_k, memory_v = (_slice32(t) for t in (q, k, v, memory_k, memory_v))
    lens, wins, win, has_lens = _mask_args(key_lengths, window, q.device)
    is_f64 = q.dtype == torch.float64
    prec = _dot_precision(q.dtype, q.device)
    mk, mv = (memory_k, memory_v) if M > 0 else (k, v)
    if short is None:
        short = use_short(Nq, Nk, M, block_d(d, dv), q.dtype)
    if short:
        if max(Nq, Nk, M) > SHORT_MAX_N:
            raise ValueError(f"cosine_attention: the short kernel takes at most {SHORT_MAX_N} "
                             f"queries, keys and slots, got {Nq}, {Nk}, {M}")
        cfg = short_config(q.dtype, Nq, Nk, M, d, dv, B * H)
        heads = cfg["constexprs"]["HEADS"]
        _cos_attn_fwd_short_kernel[(triton.cdiv(B * H, heads),)](
            q, k, v, mk, mv, scale, lens, wins, out, lse,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), mk.stride(-3), mk.stride(-2),
            mv.stride(-3), mv.stride(-2), out.stride(0), out.stride(1), out.stride(2),
            H, Nq, Nk, M, d, dv, win, has_lens, B * H,
            **cfg["constexprs"], IS_F64=is_f64, DOT_PREC=prec,
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
        return out, lse
    if tma is None:
        windowed = isinstance(window, torch.Tensor) or (window is not None and window >= 0)
        tma = use_tma(q.device, q.dtype, d, dv, Nq, Nk, M, windowed)
    if config is None:
        config = fwd2_index(q.device, q.dtype, d, dv, Nq, Nk, M, bool(tma and Nk > 0))
    cfg = fwd2_config(q.dtype, d, dv, config)
    BD = cfg["constexprs"]["BLOCK_D"]
    qs = _prep(q, BD, scale)
    kn = _prep(k, BD, None)
    mkn = _prep(memory_k, BD, None, batched=False) if M > 0 else kn
    grid = (triton.cdiv(Nq, cfg["constexprs"]["BLOCK_M"]) * B * H,)
    if tma and Nk > 0:
        if not tma_api():
            raise RuntimeError(f"cosine_attention: tma=True needs tensor descriptors, which "
                               f"triton {triton.__version__} lacks")
        QS, KN, MKN, V, MV, tma_v = tma_descriptors(qs, kn, mkn, v, mv, M, cfg["constexprs"])
        tma_args = {"USE_TMA": True, "TMA_V": tma_v}
    else:
        QS, KN, MKN, V, MV, tma_args = qs, kn, mkn, v, mv, {}
    _cos_attn_fwd2_kernel[grid](
        QS, KN, V, MKN, MV, scale, lens, wins, out, lse,
        v.stride(0), v.stride(1), v.stride(2), mv.stride(-3), mv.stride(-2),
        out.stride(0), out.stride(1), out.stride(2),
        H, Nq, Nk, M, dv, win, has_lens, fixed,
        **cfg["constexprs"], IS_F64=is_f64, DOT_PREC=prec, **tma_args,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return out, lse
