"""Scaled cosine attention (Swin Transformer V2) in Triton, first version: flash-style forward
with the L2 normalisation of q and k fused in, and a deterministic backward (no float atomics).

The op (dtl_fast.ops.cosine_attention.attn_version) runs the second version
(kernels/cosine_attention_fwd.py: normalise-once pre-pass, fixed softmax maximum, block-aware
masking, a short-sequence kernel; kernels/cosine_attention_bwd.py) where a GPU timed it faster
(sm_90, half types, N >= 2048) and these kernels everywhere else (DTL's short sequences,
float32, float64, other cards). They are also the comparison the GPU sweep
(bench/sweep_cosine_attention.py) times against, and hold the helpers (_rowdot, _mm, _mma, ...)
the second version imports; their outputs (out, lse) are interchangeable with it.

    score(i, j) = scale_h * cos(q_i, k_j),  cos = (q_i . k_j) / (max(|q_i|, eps) max(|k_j|, eps))

The dot products take the raw q / k tiles (tensor cores on fp16 / bf16) and the per-row inverse
norms are applied to the float32 scores afterwards, so normalised vectors are never rounded to
the input dtype. The row norms |k_j| (and |q_i| for the backward) come from a small pre-pass
(_cos_attn_rowdot_kernel) instead of converting every key tile to float32 inside the loops.
The softmax runs in base 2 (log2(e) folded into the per-row query factor); lse is stored as the
natural log-sum-exp. Memory slots ([H, M, d], the same for every batch element) are extra key
blocks visited before the keys; their gradients are written per (b, h) in float32 and summed
over the batch by the launcher.

Key lengths, the window and the memory-slot count are runtime arguments (no recompile, and no
per-element cost where a block needs no mask: a scalar test per block decides whether the
element mask is applied). They may differ between heads (_head_mask: WINDOW == -2 reads head
h's window from WINS[h], HAS_LENS == 2 reads LENS[b * H + h]), so that branches with different
masks over the same tokens run as one launch over their stacked heads; a program then loads two
int32 scalars once, and every per-block and per-element step is the one-mask code. Offsets
inside one (b, h) slice are 32-bit; the slice base pointer is advanced with 64-bit arithmetic
once per program (the launcher checks that one slice fits).

Kernels (each launched on a 1-D grid: (row block, b * H + h) flattened, row blocks fastest):
  _cos_attn_rowdot_kernel    per-row sum(x * y) (delta = rowsum(dO * O)) or |x| (norms)
  _cos_attn_fwd_kernel       out, lse (log-sum-exp of the scores; +inf for a row with no keys)
  _cos_attn_bwd_dkdv_kernel  dk, dv over key blocks, and the memory slots' per-(b, h) dk / dv
  _cos_attn_bwd_dq_kernel    dq and per-block partial sums of dS * cos for d scale

Host launchers: cosine_attention_forward, cosine_attention_backward. launch_configs lists every
configuration the launchers can choose (shared with the ahead-of-time compile test).
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from dtl_fast.kernels._launch import launch

NORM_EPS = 1e-12  # torch.nn.functional.normalize's default; the kernels spell it out
MAX_HEAD_DIM = 128
_INT32_MAX = 2**31 - 1  # the kernels' WINDOW / WINS are int32
LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453

# Scalar arguments that take any value at run time: not specialised by the JIT (no recompile
# when a length happens to be 1 or a multiple of 16).
_RUNTIME_INTS = ["H", "NQ", "NK", "M", "WINDOW", "HAS_LENS"]


@triton.jit
def _acc(x, IS_F64: tl.constexpr):
    if IS_F64:
        return x.to(tl.float64)
    else:
        return x.to(tl.float32)


@triton.jit
def _exp2(x, IS_F64: tl.constexpr):
    if IS_F64:
        return tl.exp(x * 0.6931471805599453)
    else:
        return tl.exp2(x)


@triton.jit
def _mm(a, b, DOT_PREC: tl.constexpr):
    if DOT_PREC == "upcast":
        # Triton's interpreter multiplies bfloat16 tiles as their uint16 bit patterns
        # (triton 3.8); the launcher asks for float32 operands there (exact products, float32
        # sums, as the tensor cores compute them).
        return tl.dot(a.to(tl.float32), b.to(tl.float32))
    else:
        return tl.dot(a, b, input_precision=DOT_PREC)


@triton.jit
def _mma(a, b, acc, DOT_PREC: tl.constexpr):
    # acc + a @ b, the accumulator handed to the MMA (no separate add of a fresh tile).
    # out_dtype is the accumulator's type: triton 3.6's tl.dot defaults it to float32 and
    # asserts the accumulator matches, so a float64 accumulator failed the GPU compile (the
    # interpreter and triton 3.8, which defaults it to acc's type, accept it). For a float32
    # accumulator it is the default, the same code (tests/test_cosine_attention_compile.py
    # compiles every float64 kernel for sm_80 / sm_90).
    if DOT_PREC == "upcast":
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    else:
        return tl.dot(a, b, acc, input_precision=DOT_PREC, out_dtype=acc.dtype)


@triton.jit
def _inv(nrm):
    # 1 / max(|x|, eps), as F.normalize divides by.
    return 1.0 / tl.maximum(nrm, 1e-12)


@triton.jit
def _normalize_bwd(xf, g, nrm):
    # Gradient of x / max(|x|, eps) given the gradient g of the normalised rows and |x|: the
    # projection (g - x_hat (x_hat . g)) / |x| where |x| >= eps, and g / eps where the clamp is
    # active (clamp_min passes its gradient at equality, as torch's does).
    den = tl.maximum(nrm, 1e-12)
    xh = xf / den[:, None]
    proj = tl.sum(xh * g, axis=1)
    keep = (nrm >= 1e-12).to(g.dtype)
    return (g - xh * (proj * keep)[:, None]) / den[:, None]


@triton.jit
def _head_mask(LENS, WINS, b, h, H, NK, WINDOW, HAS_LENS, big):
    # (kend, win) of head h of batch b: keys j < kend with |i - j| <= win are visible (win = big:
    # no window). HAS_LENS 0: none, 1: LENS[b], 2: LENS[b * H + h] (int32 [B, H]); WINDOW >= 0
    # for every head, -1 none, -2: WINS[h] (-1: none for that head). Scalar loads, once per
    # program (per (b, h) in the short kernel). Written as the one-mask code was (one branch
    # for the lengths, selects for the window; the per-head window a predicated load that
    # the one-window launch never issues) so that it compiles to the same straight-line code:
    # a branch per form instead moved ptxas's register allocation by up to 30 registers.
    kend = NK
    if HAS_LENS != 0:
        kend = tl.minimum(kend, tl.load(LENS + tl.where(HAS_LENS == 2, b * H + h, b)).to(tl.int32))
    wh = tl.load(WINS + h, mask=WINDOW == -2, other=-1).to(tl.int32)
    # Each form clamped to big, which every distance is below, so the same mask: the callers
    # add block offsets to win in int32 (m0 + BLOCK_M + win), which a window near 2^31 - 1
    # would wrap. (Clamped per form: one minimum of the selected window instead moved ptxas's
    # allocation, 108 -> 128 registers and a 16 B stack spill in the float32 dq kernel.)
    win = tl.where(WINDOW >= 0, tl.minimum(WINDOW, big), tl.where(wh >= 0, tl.minimum(wh, big), big))
    return kend, win


@triton.jit(do_not_specialize=["H", "N", "SQRT"])
def _cos_attn_rowdot_kernel(X, Y, OUT, stride_xb, stride_xh, stride_xn,
                            stride_yb, stride_yh, stride_yn, H, N, D, SQRT,
                            BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, IS_F64: tl.constexpr):
    # OUT[bh * N + n] = sum_d X[b, h, n, d] * Y[b, h, n, d], square-rooted when SQRT != 0 (row
    # norms: X = Y). Head dims wider than BLOCK_D are looped over, so one compile serves all d.
    pid = tl.program_id(0)
    n_rb = tl.cdiv(N, BLOCK_R)
    pid_r = pid % n_rb
    bh = pid // n_rb
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = offs_r < N
    xb = X + b * stride_xb + h * stride_xh
    yb = Y + b * stride_yb + h * stride_yh
    acc = _acc(tl.zeros([BLOCK_R], tl.float32), IS_F64)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask = rmask[:, None] & (offs_d[None, :] < D)
        x = tl.load(xb + offs_r[:, None] * stride_xn + offs_d[None, :], mask=mask, other=0.0)
        y = tl.load(yb + offs_r[:, None] * stride_yn + offs_d[None, :], mask=mask, other=0.0)
        acc += tl.sum(_acc(x, IS_F64) * _acc(y, IS_F64), axis=1)
    if SQRT != 0:
        acc = tl.sqrt(acc)
    tl.store(OUT + bh.to(tl.int64) * N + offs_r, acc, mask=rmask)


@triton.jit
def _fwd_tile(acc, m_i, l_i, q, qmul, offs_m, m0, start, kend, win, kb, stride_kn, vb,
              stride_vn, nb, D, DV,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
              IS_F64: tl.constexpr, DOT_PREC: tl.constexpr):
    offs_n = start + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    nmask = offs_n < kend
    k = tl.load(kb + offs_n[:, None] * stride_kn + offs_d[None, :],
                mask=nmask[:, None] & (offs_d[None, :] < D), other=0.0)
    rk = _inv(tl.load(nb + offs_n, mask=nmask, other=1.0))
    # scores in base-2 units: qmul = scale * log2(e) / |q_i|
    s = _mm(q, tl.trans(k), DOT_PREC) * qmul[:, None] * rk[None, :]
    # The element mask only where the block needs one: a partial last block or a window edge.
    need = (start + BLOCK_N > kend) | (m0 + BLOCK_M - 1 - start > win) | \
        (start + BLOCK_N - 1 - m0 > win)
    if need:
        valid = nmask[None, :] & (tl.abs(offs_m[:, None] - offs_n[None, :]) <= win)
        s = tl.where(valid, s, float("-inf"))
    # m_i starts below any score (-scale log2 e - 1), so it is always finite: no -inf - -inf.
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    alpha = _exp2(m_i - m_new, IS_F64)
    p = _exp2(s - m_new[:, None], IS_F64)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    v = tl.load(vb + offs_n[:, None] * stride_vn + offs_d[None, :],
                mask=nmask[:, None] & (offs_d[None, :] < DV), other=0.0)
    acc = _mma(p.to(v.dtype), v, acc * alpha[:, None], DOT_PREC)
    return acc, m_new, l_i


@triton.jit(do_not_specialize=_RUNTIME_INTS)
def _cos_attn_fwd_kernel(Q, K, V, MK, MV, NRM_K, NRM_M, SCALE, LENS, WINS, O, LSE,
                         stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                         stride_vb, stride_vh, stride_vn, stride_mkh, stride_mkn,
                         stride_mvh, stride_mvn, stride_ob, stride_oh, stride_on,
                         H, NQ, NK, M, D, DV, WINDOW, HAS_LENS,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
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
    q = tl.load(Q + b * stride_qb + h.to(tl.int64) * stride_qh + offs_m[:, None] * stride_qn
                + offs_d[None, :], mask=mmask[:, None] & (offs_d[None, :] < D), other=0.0)
    qf = _acc(q, IS_F64)
    scale = _acc(tl.load(SCALE + h), IS_F64)
    qmul = _inv(tl.sqrt(tl.sum(qf * qf, axis=1))) * (scale * 1.4426950408889634)
    m_i = _acc(tl.zeros([BLOCK_M], tl.float32), IS_F64) - (scale * 1.4426950408889634 + 1.0)
    l_i = _acc(tl.zeros([BLOCK_M], tl.float32), IS_F64)
    acc = _acc(tl.zeros([BLOCK_M, BLOCK_D], tl.float32), IS_F64)

    # The memory-slot blocks, then the key blocks that hold a valid key for some row of this
    # block (lengths, window).
    big = NQ + NK + M + BLOCK_M + BLOCK_N  # "no window": larger than any distance
    kend, win = _head_mask(LENS, WINS, b, h, H, NK, WINDOW, HAS_LENS, big)
    kstart = tl.maximum(m0 - win, 0) // BLOCK_N * BLOCK_N
    kend = tl.minimum(kend, m0 + BLOCK_M + win)
    kb = K + b * stride_kb + h.to(tl.int64) * stride_kh
    vb = V + b * stride_vb + h.to(tl.int64) * stride_vh
    nb = NRM_K + bh.to(tl.int64) * NK
    mkb = MK + h.to(tl.int64) * stride_mkh
    mvb = MV + h.to(tl.int64) * stride_mvh
    mnb = NRM_M + h.to(tl.int64) * M
    # Two loops, not one over both with selected pointers: with the select, sm_80's pipeliner
    # multi-buffers only one of the K / V loads.
    for start in range(0, M, BLOCK_N):
        acc, m_i, l_i = _fwd_tile(acc, m_i, l_i, q, qmul, offs_m, m0, start, M, big, mkb,
                                  stride_mkn, mvb, stride_mvn, mnb, D, DV,
                                  BLOCK_M, BLOCK_N, BLOCK_D, IS_F64, DOT_PREC)
    for start in range(kstart, kend, BLOCK_N):
        acc, m_i, l_i = _fwd_tile(acc, m_i, l_i, q, qmul, offs_m, m0, start, kend, win, kb,
                                  stride_kn, vb, stride_vn, nb, D, DV,
                                  BLOCK_M, BLOCK_N, BLOCK_D, IS_F64, DOT_PREC)

    nonempty = l_i > 0
    l_safe = tl.where(nonempty, l_i, 1.0)
    out = acc / l_safe[:, None]
    tl.store(O + b * stride_ob + h.to(tl.int64) * stride_oh + offs_m[:, None] * stride_on
             + offs_d[None, :], out.to(O.dtype.element_ty),
             mask=mmask[:, None] & (offs_d[None, :] < DV))
    lse = tl.where(nonempty, (m_i + tl.log2(l_safe)) * 0.6931471805599453, float("inf"))
    tl.store(LSE + bh.to(tl.int64) * NQ + offs_m, lse, mask=mmask)


@triton.jit(do_not_specialize=_RUNTIME_INTS)
def _cos_attn_bwd_dkdv_kernel(Q, K, V, MK, MV, DO, NRM_Q, NRM_K, NRM_M, SCALE, LENS, WINS, LSE,
                              DELTA,
                              DK, DV_OUT, DMK, DMV,
                              stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                              stride_vb, stride_vh, stride_vn, stride_mkh, stride_mkn,
                              stride_mvh, stride_mvn, stride_dob, stride_doh, stride_don,
                              stride_dkb, stride_dkh, stride_dkn, stride_dvb, stride_dvh,
                              stride_dvn, H, NQ, NK, M, D, DV, WINDOW, HAS_LENS,
                              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                              IS_F64: tl.constexpr, DOT_PREC: tl.constexpr):
    # One key block of one (b, h): dv = sum_i p_ij dO_i, dk through dS and the normalisation.
    # The first cdiv(M, BLOCK_N) blocks of each (b, h) are memory-slot blocks (no lengths, no
    # window); their dk / dv go to the float32 per-(b, h) buffers DMK / DMV [B, H, M, d].
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
        kb = MK + h * stride_mkh
        vb = MV + h * stride_mvh
        skn = (pid * 0 + stride_mkn).to(tl.int32)
        svn = (pid * 0 + stride_mvn).to(tl.int32)
        nb = NRM_M + h * M
        kend = M
        nrows = M
        win = big
    else:
        n0 = (pid_n - n_memb) * BLOCK_N
        kb = K + b * stride_kb + h * stride_kh
        vb = V + b * stride_vb + h * stride_vh
        skn = (pid * 0 + stride_kn).to(tl.int32)
        svn = (pid * 0 + stride_vn).to(tl.int32)
        nb = NRM_K + bh.to(tl.int64) * NK
        kend, win = _head_mask(LENS, WINS, b, h, H, NK, WINDOW, HAS_LENS, big)
        nrows = NK
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    nmask = offs_n < kend
    k = tl.load(kb + offs_n[:, None] * skn + offs_d[None, :],
                mask=nmask[:, None] & (offs_d[None, :] < D), other=0.0)
    v = tl.load(vb + offs_n[:, None] * svn + offs_d[None, :],
                mask=nmask[:, None] & (offs_d[None, :] < DV), other=0.0)
    nrm_k = tl.load(nb + offs_n, mask=nmask, other=1.0)
    scale = _acc(tl.load(SCALE + h), IS_F64)
    kmul = _inv(nrm_k) * (scale * 1.4426950408889634)  # base-2 scores
    dk_acc = _acc(tl.zeros([BLOCK_N, BLOCK_D], tl.float32), IS_F64)
    dv_acc = _acc(tl.zeros([BLOCK_N, BLOCK_D], tl.float32), IS_F64)

    qstart = tl.maximum(n0 - win, 0) // BLOCK_M * BLOCK_M
    qend = tl.minimum(NQ, n0 + BLOCK_N + win)
    qend = tl.where(n0 < kend, qend, 0)  # a block past the length: zeros only
    qb = Q + b * stride_qb + h * stride_qh
    dob = DO + b * stride_dob + h * stride_doh
    rowb = bh.to(tl.int64) * NQ
    for start in range(qstart, qend, BLOCK_M):
        offs_m = start + tl.arange(0, BLOCK_M)
        mmask = offs_m < NQ
        q = tl.load(qb + offs_m[:, None] * stride_qn + offs_d[None, :],
                    mask=mmask[:, None] & (offs_d[None, :] < D), other=0.0)
        do = tl.load(dob + offs_m[:, None] * stride_don + offs_d[None, :],
                     mask=mmask[:, None] & (offs_d[None, :] < DV), other=0.0)
        rq = _inv(tl.load(NRM_Q + rowb + offs_m, mask=mmask, other=1.0))
        # Rows past NQ: lse = +inf gives p = 0 (no element mask needed for them).
        lse2 = tl.load(LSE + rowb + offs_m, mask=mmask, other=float("inf")) * 1.4426950408889634
        delta = tl.load(DELTA + rowb + offs_m, mask=mmask, other=0.0)
        st = _mm(k, tl.trans(q), DOT_PREC) * kmul[:, None] * rq[None, :]  # [BLOCK_N, BLOCK_M]
        pt = _exp2(st - lse2[None, :], IS_F64)
        # Key rows past the length are zeroed once at the end (each row of dk / dv depends on
        # its own row of pt only); the element mask is for window edges alone.
        need = (start + BLOCK_M - 1 - n0 > win) | (n0 + BLOCK_N - 1 - start > win)
        if need:
            pt = tl.where(tl.abs(offs_m[None, :] - offs_n[:, None]) <= win, pt, 0.0)
        dv_acc = _mma(pt.to(do.dtype), do, dv_acc, DOT_PREC)
        dpt = _mm(v, tl.trans(do), DOT_PREC)
        dst = pt * (dpt - delta[None, :])
        dk_acc = _mma((dst * rq[None, :]).to(q.dtype), q, dk_acc, DOT_PREC)

    # d k_hat = scale * sum_i dS_ij q_hat_i; then through the normalisation (k reloaded here
    # rather than kept in float32 across the loop).
    kf = _acc(tl.load(kb + offs_n[:, None] * skn + offs_d[None, :],
                      mask=nmask[:, None] & (offs_d[None, :] < D), other=0.0), IS_F64)
    dk = tl.where(nmask[:, None], _normalize_bwd(kf, dk_acc * scale, nrm_k), 0.0)
    dv_acc = tl.where(nmask[:, None], dv_acc, 0.0)
    smask = offs_n < nrows
    if is_mem:
        mb = bh.to(tl.int64) * M
        tl.store(DMK + (mb + offs_n[:, None]) * D + offs_d[None, :], dk,
                 mask=smask[:, None] & (offs_d[None, :] < D))
        tl.store(DMV + (mb + offs_n[:, None]) * DV + offs_d[None, :], dv_acc,
                 mask=smask[:, None] & (offs_d[None, :] < DV))
    else:
        tl.store(DK + b * stride_dkb + h * stride_dkh + offs_n[:, None] * stride_dkn
                 + offs_d[None, :], dk.to(DK.dtype.element_ty),
                 mask=smask[:, None] & (offs_d[None, :] < D))
        tl.store(DV_OUT + b * stride_dvb + h * stride_dvh + offs_n[:, None] * stride_dvn
                 + offs_d[None, :], dv_acc.to(DV_OUT.dtype.element_ty),
                 mask=smask[:, None] & (offs_d[None, :] < DV))


@triton.jit
def _dq_tile(dq_acc, dsc_acc, z_acc, c_acc, q, do, rq, smul, lse2, delta, offs_m, m0, start,
             kend, win, kb, stride_kn, vb, stride_vn, nb, D, DV,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
             IS_F64: tl.constexpr, DOT_PREC: tl.constexpr):
    offs_n = start + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    nmask = offs_n < kend
    k = tl.load(kb + offs_n[:, None] * stride_kn + offs_d[None, :],
                mask=nmask[:, None] & (offs_d[None, :] < D), other=0.0)
    rk = _inv(tl.load(nb + offs_n, mask=nmask, other=1.0))
    cos = _mm(q, tl.trans(k), DOT_PREC) * rq[:, None] * rk[None, :]
    p = _exp2(cos * smul - lse2[:, None], IS_F64)
    need = (start + BLOCK_N > kend) | (m0 + BLOCK_M - 1 - start > win) | \
        (start + BLOCK_N - 1 - m0 > win)
    if need:
        valid = nmask[None, :] & (tl.abs(offs_m[:, None] - offs_n[None, :]) <= win)
        p = tl.where(valid, p, 0.0)
    v = tl.load(vb + offs_n[:, None] * stride_vn + offs_d[None, :],
                mask=nmask[:, None] & (offs_d[None, :] < DV), other=0.0)
    dp = _mm(do, tl.trans(v), DOT_PREC)
    ds = p * (dp - delta[:, None])
    dq_acc = _mma((ds * rk[None, :]).to(k.dtype), k, dq_acc, DOT_PREC)
    dsc_acc += tl.sum(ds * cos, axis=1)
    z_acc += tl.sum(ds, axis=1)
    c_acc += tl.sum(p * cos, axis=1)
    return dq_acc, dsc_acc, z_acc, c_acc


@triton.jit(do_not_specialize=_RUNTIME_INTS)
def _cos_attn_bwd_dq_kernel(Q, K, V, MK, MV, DO, NRM_Q, NRM_K, NRM_M, SCALE, LENS, WINS, LSE,
                            DELTA,
                            DQ, DSCALE_PART,
                            stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                            stride_vb, stride_vh, stride_vn, stride_mkh, stride_mkn,
                            stride_mvh, stride_mvn, stride_dob, stride_doh, stride_don,
                            stride_dqb, stride_dqh, stride_dqn,
                            H, NQ, NK, M, D, DV, WINDOW, HAS_LENS,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                            IS_F64: tl.constexpr, DOT_PREC: tl.constexpr):
    # One query block of one (b, h): dq over the memory slots and the visible keys, and this
    # block's share of sum(dS * cos) (d scale), summed over blocks and batch by the launcher.
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
    qb = Q + b * stride_qb + h.to(tl.int64) * stride_qh
    q = tl.load(qb + offs_m[:, None] * stride_qn + offs_d[None, :],
                mask=mmask[:, None] & (offs_d[None, :] < D), other=0.0)
    do = tl.load(DO + b * stride_dob + h.to(tl.int64) * stride_doh + offs_m[:, None] * stride_don
                 + offs_d[None, :], mask=mmask[:, None] & (offs_d[None, :] < DV), other=0.0)
    rowb = bh.to(tl.int64) * NQ
    nrm_q = tl.load(NRM_Q + rowb + offs_m, mask=mmask, other=1.0)
    rq = _inv(nrm_q)
    lse2 = tl.load(LSE + rowb + offs_m, mask=mmask, other=float("inf")) * 1.4426950408889634
    delta = tl.load(DELTA + rowb + offs_m, mask=mmask, other=0.0)
    scale = _acc(tl.load(SCALE + h), IS_F64)
    smul = scale * 1.4426950408889634
    dq_acc = _acc(tl.zeros([BLOCK_M, BLOCK_D], tl.float32), IS_F64)
    dsc_acc = _acc(tl.zeros([BLOCK_M], tl.float32), IS_F64)
    z_acc = _acc(tl.zeros([BLOCK_M], tl.float32), IS_F64)
    c_acc = _acc(tl.zeros([BLOCK_M], tl.float32), IS_F64)

    big = NQ + NK + M + BLOCK_M + BLOCK_N  # "no window": larger than any distance
    kend, win = _head_mask(LENS, WINS, b, h, H, NK, WINDOW, HAS_LENS, big)
    kstart = tl.maximum(m0 - win, 0) // BLOCK_N * BLOCK_N
    kend = tl.minimum(kend, m0 + BLOCK_M + win)
    kb = K + b * stride_kb + h.to(tl.int64) * stride_kh
    vb = V + b * stride_vb + h.to(tl.int64) * stride_vh
    nb = NRM_K + bh.to(tl.int64) * NK
    mkb = MK + h.to(tl.int64) * stride_mkh
    mvb = MV + h.to(tl.int64) * stride_mvh
    mnb = NRM_M + h.to(tl.int64) * M
    for start in range(0, M, BLOCK_N):  # memory slots (two loops: see the forward)
        dq_acc, dsc_acc, z_acc, c_acc = _dq_tile(
            dq_acc, dsc_acc, z_acc, c_acc, q, do, rq, smul, lse2, delta, offs_m, m0, start, M,
            big, mkb, stride_mkn, mvb, stride_mvn, mnb, D, DV,
            BLOCK_M, BLOCK_N, BLOCK_D, IS_F64, DOT_PREC)
    for start in range(kstart, kend, BLOCK_N):
        dq_acc, dsc_acc, z_acc, c_acc = _dq_tile(
            dq_acc, dsc_acc, z_acc, c_acc, q, do, rq, smul, lse2, delta, offs_m, m0, start,
            kend, win, kb, stride_kn, vb, stride_vn, nb, D, DV,
            BLOCK_M, BLOCK_N, BLOCK_D, IS_F64, DOT_PREC)

    # d q_hat = scale * sum_j dS_ij k_hat_j, with 1 / |k_j| already folded into dS (q reloaded
    # in float32 here rather than kept across the loop).
    qf = _acc(tl.load(qb + offs_m[:, None] * stride_qn + offs_d[None, :],
                      mask=mmask[:, None] & (offs_d[None, :] < D), other=0.0), IS_F64)
    dq = _normalize_bwd(qf, dq_acc * scale, nrm_q)
    tl.store(DQ + b * stride_dqb + h.to(tl.int64) * stride_dqh + offs_m[:, None] * stride_dqn
             + offs_d[None, :], dq.to(DQ.dtype.element_ty),
             mask=mmask[:, None] & (offs_d[None, :] < D))
    # sum_j dS_ij is 0 in exact arithmetic; delta = dO . O with O rounded to the input dtype
    # leaves a rounding constant along the row, which subtracting (sum_j dS_ij) * (mean cos
    # under p) removes from sum_j dS_ij cos_ij (the d scale terms cancel along rows).
    dsc = dsc_acc - z_acc * c_acc
    tl.store(DSCALE_PART + pid, tl.sum(tl.where(mmask, dsc, 0.0), axis=0))


# ---------------------------------------------------------------------------------------------
# Launch configurations: one function picks them (_choose), launch_configs enumerates it.

KERNELS = ("_cos_attn_rowdot_kernel", "_cos_attn_fwd_kernel", "_cos_attn_bwd_dkdv_kernel",
           "_cos_attn_bwd_dq_kernel")
_TRITON_DTYPE = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16",
                 torch.float64: "fp64"}
BLOCK_DS = (32, 64, 128)  # head dims are bucketed: BLOCK_D = max(32, next_pow2(max(d, dv)))
_ROWDOT = dict(constexprs=dict(BLOCK_R=64, BLOCK_D=32), num_warps=4, num_stages=1)

# (kernel, "half" | "f32", BLOCK_D) -> (rows block, columns block, warps, stages). Rows are what
# one program owns (queries; keys for dkdv), columns what it loops over. One choice per head-dim
# bucket and dtype class, whatever the sequence lengths: short sequences only mask more of a
# block (DTL-sized N 16-64 are launch-bound), and the compile test covers every entry.
# Register / shared-memory figures for each are in tests/test_cosine_attention_compile.py's
# output; every entry compiles for sm_80 and sm_90 without spills.
_CONFIGS = {
    ("_cos_attn_fwd_kernel", "half", 32): (128, 64, 8, 3),
    ("_cos_attn_fwd_kernel", "half", 64): (128, 64, 8, 3),
    ("_cos_attn_fwd_kernel", "half", 128): (128, 64, 8, 3),
    ("_cos_attn_fwd_kernel", "f32", 32): (64, 32, 4, 2),
    ("_cos_attn_fwd_kernel", "f32", 64): (32, 32, 4, 2),
    ("_cos_attn_fwd_kernel", "f32", 128): (16, 32, 4, 2),
    ("_cos_attn_bwd_dkdv_kernel", "half", 32): (128, 32, 8, 2),
    ("_cos_attn_bwd_dkdv_kernel", "half", 64): (32, 32, 4, 2),
    ("_cos_attn_bwd_dkdv_kernel", "half", 128): (64, 32, 8, 2),
    ("_cos_attn_bwd_dkdv_kernel", "f32", 32): (32, 16, 4, 2),
    ("_cos_attn_bwd_dkdv_kernel", "f32", 64): (32, 16, 4, 2),
    ("_cos_attn_bwd_dkdv_kernel", "f32", 128): (32, 16, 8, 2),
    ("_cos_attn_bwd_dq_kernel", "half", 32): (128, 32, 8, 2),
    ("_cos_attn_bwd_dq_kernel", "half", 64): (64, 32, 8, 2),
    ("_cos_attn_bwd_dq_kernel", "half", 128): (64, 32, 8, 2),
    ("_cos_attn_bwd_dq_kernel", "f32", 32): (32, 32, 4, 2),
    ("_cos_attn_bwd_dq_kernel", "f32", 64): (16, 16, 8, 2),
    ("_cos_attn_bwd_dq_kernel", "f32", 128): (16, 16, 8, 2),
}


def _block_d(d: int, dv: int) -> int:
    return max(32, triton.next_power_of_2(max(int(d), int(dv), 1)))


def _choose(kernel: str, dtype: torch.dtype, d: int, dv: int) -> dict:
    """Constexprs and launch options of `kernel` for head dims d / dv (any sequence lengths)."""
    if kernel == "_cos_attn_rowdot_kernel":
        return dict(constexprs=dict(_ROWDOT["constexprs"]), num_warps=_ROWDOT["num_warps"],
                    num_stages=_ROWDOT["num_stages"])
    BD = _block_d(d, dv)
    cls = "half" if dtype in (torch.float16, torch.bfloat16) else "f32"
    rows, cols, warps, stages = _CONFIGS[(kernel, cls, BD)]
    if dtype == torch.float64:
        rows, cols = min(rows, 32), min(cols, 32)
    if kernel == "_cos_attn_bwd_dkdv_kernel":
        consts = dict(BLOCK_M=cols, BLOCK_N=rows)
    else:
        consts = dict(BLOCK_M=rows, BLOCK_N=cols)
    consts.update(BLOCK_D=BD)
    return dict(constexprs=consts, num_warps=warps, num_stages=stages)


def _dot_precision(dtype: torch.dtype, device: torch.device | None = None) -> str:
    if dtype == torch.bfloat16 and device is not None and device.type == "cpu":
        return "upcast"  # the interpreter (see _mm)
    # float32 follows PyTorch's matmul setting: TF32 tensor cores only when the user allowed
    # them (torch.set_float32_matmul_precision("high" / "medium")).
    if dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest":
        return "tf32"
    return "ieee"


_INT_ARGS = {"H", "N", "NQ", "NK", "M", "D", "DV", "WINDOW", "HAS_LENS", "SQRT"}


def _signature(kernel: str, dtype: torch.dtype, consts: dict) -> dict:
    """Triton signature of `kernel` (pointer element types and i32 scalars) for AOT compiles."""
    t = _TRITON_DTYPE[dtype]
    acc = "fp64" if dtype == torch.float64 else "fp32"
    ptr = {"LENS": "*i32", "WINS": "*i32", "SCALE": f"*{acc}", "LSE": f"*{acc}", "DELTA": f"*{acc}",
           "DSCALE_PART": f"*{acc}", "NRM_Q": f"*{acc}", "NRM_K": f"*{acc}", "NRM_M": f"*{acc}",
           "DMK": f"*{acc}", "DMV": f"*{acc}", "OUT": f"*{acc}"}
    fn = globals()[kernel]
    while not hasattr(fn, "arg_names"):
        fn = fn.fn
    sig = {}
    for name in fn.arg_names:
        if name in consts:
            sig[name] = "constexpr"
        elif name in _INT_ARGS or name.startswith("stride_"):
            sig[name] = "i32"
        else:
            sig[name] = ptr.get(name, f"*{t}")
    return sig


def _aligned_args(kernel: str, consts: dict, d: int | None) -> list[str]:
    """The arguments the JIT sees as multiples of 16 for contiguous [B, H, N, d] tensors with
    head dim d (None: unknown): pointers (16-byte aligned allocations), batch and head strides
    always, head dims and row strides when d % 16 == 0. The AOT compile gives them
    tt.divisibility=16, as the launch does (vectorised, pipelined loads)."""
    fn = globals()[kernel]
    while not hasattr(fn, "arg_names"):
        fn = fn.fn
    out = []
    for name in fn.arg_names:
        if name in consts or name in ("H", "N", "NQ", "NK", "M", "WINDOW", "HAS_LENS", "SQRT"):
            continue
        if name in ("D", "DV") or name.startswith("stride_") and name.endswith("n"):
            if d is not None and d % 16 == 0:
                out.append(name)  # head dims and row strides
        else:
            out.append(name)  # pointers, batch and head strides
    return out


def launch_configs(dtypes=(torch.float32, torch.float16, torch.bfloat16),
                   head_dims=((32, 32), (40, 40), (64, 64), (128, 128)),
                   precisions=("ieee", "tf32"), kernels=KERNELS) -> list[dict]:
    """Every launch configuration the launchers pick for the given dtypes and (d, dv) head dims
    (the choice does not depend on sequence lengths, key lengths, window or memory slots: those
    are runtime arguments), deduplicated: dicts with kernel, signature, constexprs, num_warps,
    num_stages, dtype, and `divisible` (argument names the JIT specialises as multiples of 16
    for such a head dim: pointers, batch / head strides always; head dim and row strides when
    d % 16 == 0), as tests/_triton_aot.compile_configs takes them. float32 comes in each of `precisions` (TF32
    only when torch's float32 matmul precision allows it)."""
    seen, out = set(), []
    for kernel in kernels:
        for dtype in dtypes:
            precs = precisions if dtype == torch.float32 else ("ieee",)
            if kernel == "_cos_attn_rowdot_kernel":
                precs = ("ieee",)  # no dot
            for prec in precs:
                for d, dv in head_dims:
                    cfg = _choose(kernel, dtype, d, dv)
                    consts = dict(cfg["constexprs"])
                    consts["IS_F64"] = dtype == torch.float64
                    if kernel != "_cos_attn_rowdot_kernel":
                        consts["DOT_PREC"] = prec
                    dd = d if d == dv else None
                    aligned = _aligned_args(kernel, consts, dd)
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
# Host launchers

_I32_MAX = 2 ** 31 - 1


def _fits_i32(t: torch.Tensor) -> bool:
    # Largest element offset inside one slice over the last two dims (the kernels' 32-bit
    # offsets; batch / head offsets are 64-bit).
    n, d = t.shape[-2], t.shape[-1]
    return (n - 1) * abs(t.stride(-2)) + (d - 1) * abs(t.stride(-1)) <= _I32_MAX // 2


def _slice32(t: torch.Tensor | None) -> torch.Tensor | None:
    """t itself when one (b, h) slice is addressable with 32-bit offsets, else a contiguous
    copy (which is, unless a single slice has 2^30 elements)."""
    if t is None or _fits_i32(t):
        return t
    t = t.contiguous()
    if not _fits_i32(t):
        raise ValueError(f"cosine_attention: one head's slice {tuple(t.shape[-2:])} is too large "
                         "for the kernels' 32-bit offsets")
    return t


@functools.lru_cache(maxsize=None)
def _dummy_lengths(device: torch.device) -> torch.Tensor:
    # Stands in for LENS when there are no key lengths (never read: HAS_LENS=0).
    return torch.zeros(1, dtype=torch.int32, device=device)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _launch(kernel, grid, args, cfg, **consts):
    launch(kernel, grid, args, {**cfg["constexprs"], **consts}, cfg["num_warps"], cfg["num_stages"])


def _rowdot(x, y, sqrt: bool, batched: bool = True) -> torch.Tensor:
    """sum(x * y, -1) (its square root when sqrt) in the accumulation dtype, flattened: x, y
    [B, H, N, d] (or [H, N, d] with batched=False, one batch element)."""
    if batched:
        B, H, N, D = x.shape
        xs, ys = (x.stride(0), x.stride(1), x.stride(2)), (y.stride(0), y.stride(1), y.stride(2))
    else:
        B, (H, N, D) = 1, x.shape
        xs, ys = (0, x.stride(0), x.stride(1)), (0, y.stride(0), y.stride(1))
    out = torch.empty((B * H * N,), dtype=_acc_dtype(x.dtype), device=x.device)
    if out.numel() == 0:
        return out
    cfg = _choose("_cos_attn_rowdot_kernel", x.dtype, D, D)
    grid = (triton.cdiv(N, cfg["constexprs"]["BLOCK_R"]) * B * H,)
    _launch(_cos_attn_rowdot_kernel, grid, (x, y, out, *xs, *ys, H, N, D, int(sqrt)), cfg,
            IS_F64=x.dtype == torch.float64)
    return out


def _window_arg(window: int) -> int:
    # -1: none; a window wider than int32 (the kernels' WINDOW) means the same as 2^31 - 1,
    # which _head_mask clamps below every distance
    return min(window, _INT32_MAX) if window >= 0 else -1


def _mask_args(key_lengths, window, device: torch.device):
    """The kernels' (LENS, WINS, WINDOW, HAS_LENS) from a launcher's key_lengths (None, int32 [B],
    or int32 [B, H] per head) and window (None or an int: -1 / negative none, >= 0 one window;
    or an int32 tensor [H] per head, -1: none for that head). Unused pointers get a 1-element
    dummy (never read)."""
    dummy = _dummy_lengths(device)
    if key_lengths is None:
        lens, has_lens = dummy, 0
    else:
        # int32, and rows of H for the per-head form: no-ops for what the op passes
        lens = key_lengths.to(torch.int32).contiguous()
        has_lens = 2 if key_lengths.dim() == 2 else 1
    if isinstance(window, torch.Tensor):
        if window.dtype != torch.int32:  # clamped first: int64 2^40 would wrap to 0 in int32
            window = window.to(torch.int64).clamp(max=_INT32_MAX).to(torch.int32)
        return lens, window.contiguous(), -2, has_lens
    return lens, dummy, _window_arg(-1 if window is None else int(window)), has_lens


def cosine_attention_forward(q, k, v, scale, key_lengths, window, memory_k, memory_v):
    """q [B, H, Nq, d], k [B, H, Nk, d], v [B, H, Nk, dv] (same dtype, last dim contiguous),
    scale [H] float32 (float64 for float64 inputs), key_lengths None or int32 [B] (or [B, H]:
    per head) on q's device, window None / -1 (none), an int >= 0, or an int32 tensor [H] on
    q's device (per head, -1: none), memory_k / memory_v None or [H, M, d] / [H, M, dv].

    Returns out [B, H, Nq, dv] in q's dtype and lse [B, H, Nq] (float32 / float64): the
    natural log-sum-exp of each row's scores, +inf for a row with nothing to attend to."""
    B, H, Nq, d = q.shape
    Nk, dv = k.shape[2], v.shape[3]
    M = 0 if memory_k is None else memory_k.shape[1]
    out = torch.empty((B, H, Nq, dv), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, Nq), dtype=_acc_dtype(q.dtype), device=q.device)
    if B * H * Nq == 0:
        return out, lse
    q, k, v, memory_k, memory_v = (_slice32(t) for t in (q, k, v, memory_k, memory_v))
    nrm_k = _rowdot(k, k, True)
    if M > 0:
        mk, mv = memory_k, memory_v
        nrm_m = _rowdot(mk, mk, True, batched=False)
    else:
        mk, mv, nrm_m = k, v, nrm_k
    lens, wins, win, has_lens = _mask_args(key_lengths, window, q.device)
    cfg = _choose("_cos_attn_fwd_kernel", q.dtype, d, dv)
    grid = (triton.cdiv(Nq, cfg["constexprs"]["BLOCK_M"]) * B * H,)
    _launch(_cos_attn_fwd_kernel, grid,
            (q, k, v, mk, mv, nrm_k, nrm_m, scale, lens, wins, out, lse,
             q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
             v.stride(0), v.stride(1), v.stride(2), mk.stride(-3), mk.stride(-2),
             mv.stride(-3), mv.stride(-2), out.stride(0), out.stride(1), out.stride(2),
             H, Nq, Nk, M, d, dv, win, has_lens),
            cfg, IS_F64=q.dtype == torch.float64, DOT_PREC=_dot_precision(q.dtype, q.device))
    return out, lse


def cosine_attention_backward(grad_out, q, k, v, scale, key_lengths, window, memory_k, memory_v,
                              out, lse):
    """Gradients of cosine_attention_forward (same arguments, plus grad_out [B, H, Nq, dv] with
    a contiguous last dim, and its out / lse). Deterministic: every output element is written
    by one program, and the batch / block sums of the shared parameters are torch.sum's.

    Returns (dq, dk, dv, dscale [H], dmemory_k [H, M, d], dmemory_v [H, M, dv]) in the inputs'
    dtypes; the memory gradients are empty [0] tensors without memory."""
    B, H, Nq, d = q.shape
    Nk, dv = k.shape[2], v.shape[3]
    M = 0 if memory_k is None else memory_k.shape[1]
    acc_dt = _acc_dtype(q.dtype)
    is_f64 = q.dtype == torch.float64
    prec = _dot_precision(q.dtype, q.device)
    # empty_like (the inputs' strides where they are dense), as the registered fake kernel
    # returns: compiled graphs trace the fake strides (the kernels write through any strides).
    dq, dk, dvv = (t if _fits_i32(t) else torch.empty(t.shape, dtype=t.dtype, device=t.device)
                   for t in (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)))
    if memory_k is None:
        dmk, dmv = q.new_empty((0,)), q.new_empty((0,))  # distinct: outputs may not alias
    elif B * H * M == 0 or B * H * Nq == 0:
        dmk, dmv = torch.zeros_like(memory_k), torch.zeros_like(memory_v)
    if B * H * Nq == 0:
        dk.zero_()
        dvv.zero_()
        return dq, dk, dvv, torch.zeros_like(scale), dmk, dmv
    q, k, v, memory_k, memory_v, grad_out, out = (
        _slice32(t) for t in (q, k, v, memory_k, memory_v, grad_out, out))
    lens, wins, win, has_lens = _mask_args(key_lengths, window, q.device)

    delta = _rowdot(out, grad_out, False)
    nrm_q = _rowdot(q, q, True)
    nrm_k = _rowdot(k, k, True)
    if M > 0:
        mk, mv = memory_k, memory_v
        nrm_m = _rowdot(mk, mk, True, batched=False)
        # Per-(b, h) slot gradients in the accumulation dtype, summed over the batch below:
        # deterministic, unlike atomics into one [H, M, d] buffer.
        dmk_b = torch.empty((B, H, M, d), dtype=acc_dt, device=q.device)
        dmv_b = torch.empty((B, H, M, dv), dtype=acc_dt, device=q.device)
    else:
        mk, mv, nrm_m = k, v, nrm_k
        dmk_b = dmv_b = delta  # never written (no memory blocks)

    common = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
              v.stride(0), v.stride(1), v.stride(2), mk.stride(-3), mk.stride(-2),
              mv.stride(-3), mv.stride(-2), grad_out.stride(0), grad_out.stride(1),
              grad_out.stride(2))
    if B * H * (Nk + M) > 0:
        cfg = _choose("_cos_attn_bwd_dkdv_kernel", q.dtype, d, dv)
        bn = cfg["constexprs"]["BLOCK_N"]
        grid = ((triton.cdiv(Nk, bn) + triton.cdiv(M, bn)) * B * H,)
        _launch(_cos_attn_bwd_dkdv_kernel, grid,
                (q, k, v, mk, mv, grad_out, nrm_q, nrm_k, nrm_m, scale, lens, wins, lse, delta,
                 dk, dvv, dmk_b, dmv_b, *common,
                 dk.stride(0), dk.stride(1), dk.stride(2), dvv.stride(0), dvv.stride(1),
                 dvv.stride(2), H, Nq, Nk, M, d, dv, win, has_lens),
                cfg, IS_F64=is_f64, DOT_PREC=prec)
    if M > 0:
        dmk = dmk_b.sum(dim=0).to(memory_k.dtype)
        dmv = dmv_b.sum(dim=0).to(memory_v.dtype)

    cfg = _choose("_cos_attn_bwd_dq_kernel", q.dtype, d, dv)
    n_mb = triton.cdiv(Nq, cfg["constexprs"]["BLOCK_M"])
    dscale_part = torch.empty((B, H, n_mb), dtype=acc_dt, device=q.device)
    _launch(_cos_attn_bwd_dq_kernel, (n_mb * B * H,),
            (q, k, v, mk, mv, grad_out, nrm_q, nrm_k, nrm_m, scale, lens, wins, lse, delta, dq,
             dscale_part, *common, dq.stride(0), dq.stride(1), dq.stride(2),
             H, Nq, Nk, M, d, dv, win, has_lens),
            cfg, IS_F64=is_f64, DOT_PREC=prec)
    dscale = dscale_part.sum(dim=(0, 2)).to(scale.dtype)
    return dq, dk, dvv, dscale, dmk, dmv
