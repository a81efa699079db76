"""Scaled cosine attention: the Triton kernels (in the interpreter on CPU) and the normalise +
SDPA composite against the eager reference in float64, every gradient (q, k, v, logit_scale,
memory slots), masking edge cases, torch.library / torch.compile / autocast integration and
bad input."""
import importlib
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from dtl_fast.ops.cosine_attention import cosine_attention, cosine_attention_composite
from dtl_fast.reference.cosine_attention import cosine_attention as reference, key_mask

from _helpers import (HALF_FACTOR, HAS_CUDA, REL_TOL, assert_half_close, assert_rel_close, half_tol,
                      rel_err, unit_roundoff)

LN100 = math.log(100.0)
ops = importlib.import_module("dtl_fast.ops.cosine_attention")  # the module (V2_DTYPES)


def make_inputs(B, H, Nq, Nk, d, dv, M=None, dtype=torch.float32, device="cpu", contiguous=True,
                log_scale=None):
    """q, k, v, logit_scale, memory_k, memory_v (memory None when M is None). Non-contiguous
    inputs come from the layouts a model produces: [B, N, H, d] transposed, a strided last dim,
    a [M, H, d] slot table transposed."""
    g = dict(dtype=torch.float32, device=device)
    if contiguous:
        q = torch.randn(B, H, Nq, d, **g)
        k = torch.randn(B, H, Nk, d, **g)
        v = torch.randn(B, H, Nk, dv, **g)
    else:
        q = torch.randn(B, Nq, H, d, **g).transpose(1, 2)
        k = torch.randn(B, H, Nk, 2 * d, **g)[..., ::2]
        v = torch.randn(H, B, Nk, dv, **g).transpose(0, 1)
    if log_scale is None:
        log_scale = torch.rand(H, **g) * 3.0  # scales 1 .. 20
    else:
        log_scale = torch.as_tensor(log_scale, **g)
    mk = mv = None
    if M is not None:
        if contiguous:
            mk, mv = torch.randn(H, M, d, **g), torch.randn(H, M, dv, **g)
        else:
            mk, mv = torch.randn(M, H, d, **g).transpose(0, 1), torch.randn(M, H, dv, **g).transpose(0, 1)
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731 (keeps the strides)
    return [cast(t) for t in (q, k, v, log_scale, mk, mv)]


def leaves(tensors, dtype=None):
    """Detached copies that require grad (None stays None), optionally cast."""
    out = []
    for t in tensors:
        if t is None:
            out.append(None)
            continue
        t = t.detach()
        t = t.to(dtype) if dtype is not None else t.clone()
        out.append(t.requires_grad_())
    return out


def forward_backward(fn, inputs, key_lengths, window, grad):
    """Runs fn(q, k, v, logit_scale, key_lengths, window, memory_k, memory_v) and its backward
    with `grad`; returns [out, dq, dk, dv, dlogit_scale, (dmemory_k, dmemory_v)]."""
    q, k, v, ls, mk, mv = inputs
    out = fn(q, k, v, ls, key_lengths, window, mk, mv)
    wrt = [t for t in inputs if t is not None]
    grads = torch.autograd.grad(out, wrt, grad.to(out.dtype))
    return [out, *grads]


NAMES = ["out", "dq", "dk", "dv", "dlogit_scale", "dmemory_k", "dmemory_v"]


def fused(*args):
    return cosine_attention(*args, backend="fused")


def ref64(inputs, key_lengths, window, grad):
    return forward_backward(reference, leaves(inputs, torch.float64), key_lengths, window, grad.double())


# B, H, Nq, Nk, d, dv, M, key_lengths, window
CASES = {
    "basic_nq_ne_nk": (2, 2, 7, 9, 8, 8, None, None, None),
    "nk1_memory1": (2, 1, 5, 1, 4, 4, 1, None, None),
    "lengths_mixed_0_full": (3, 2, 6, 11, 16, 16, None, [11, 0, 4], None),
    "window0_lengths": (2, 1, 9, 9, 8, 8, 2, [9, 5], 0),
    "window1": (1, 2, 12, 12, 8, 8, None, None, 1),
    "window_gt_n": (2, 1, 10, 7, 8, 8, None, [7, 3], 50),
    "memory0": (2, 2, 5, 6, 8, 8, 0, [6, 2], None),
    "memory8_lengths0": (2, 2, 6, 5, 8, 12, 8, [0, 5], 2),
    "d40_dv24_memory8": (2, 3, 20, 17, 40, 24, 8, [17, 9], None),
    "d3_dv5_window3": (1, 2, 33, 40, 3, 5, 1, None, 3),
}


@pytest.mark.parametrize("contiguous", [True, False], ids=["contig", "strided"])
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_fused_float32_matches_reference(case, contiguous, poison):
    B, H, Nq, Nk, d, dv, M, lens, window = CASES[case]
    if not contiguous and case not in ("basic_nq_ne_nk", "memory8_lengths0", "d40_dv24_memory8"):
        pytest.skip("strided layouts: three representative cases keep the interpreter time down")
    inputs = make_inputs(B, H, Nq, Nk, d, dv, M, contiguous=contiguous)
    grad = torch.randn(B, H, dv, Nq).transpose(-1, -2) if not contiguous else torch.randn(B, H, Nq, dv)
    with poison():
        got = forward_backward(fused, leaves(inputs), lens, window, grad)
    want = ref64(inputs, lens, window, grad)
    assert len(got) == len(want)
    for name, a, b in zip(NAMES, got, want):
        assert a.dtype == torch.float32, name
        assert_rel_close(name, a, b, 1e-5 if name != "dlogit_scale" else scale_grad_tol(inputs, lens, window, grad, b))


def scale_grad_tol(inputs, lens, window, grad, want):
    """d logit_scale_h = scale_h * sum_bij dS_bij cos_bij sums terms whose row sums cancel
    (sum_j dS_ij = 0): float32 cannot resolve it to 1e-5 of its (small) value on some inputs,
    the eager reference in float32 neither. The tolerance is 1e-5 relative, or a few float32
    roundings of sum |scale dS cos| (the size of what was summed), computed here in float64."""
    size, max_score = _scale_grad_terms(inputs, lens, window, grad)
    # Each term carries the rounding of its score, |score| * 2^-24 relative (the same holds
    # for the float32 reference): allow 4 such units of the summed size.
    return max(1e-5, 4 * 2.0**-24 * (1 + max_score) * size / max(want.norm().item(), 1e-30))


def half_scale_grad_tol(inputs, lens, window, grad, want, base, dtype):
    """The half-precision tolerance of d logit_scale: the derived one (HALF_FACTOR x the eager
    reference's error in dtype + a unit roundoff), or, when larger, 2 unit roundoffs of the
    summed size sum |scale dS cos| relative to the (cancelled, small) result. In bfloat16 each
    summed term carries a rounding of about u |term| whatever computes it; how much of it
    survives the cancellation depends on the order of the operations, not on their accuracy:
    over 12 seeds, under ATEN_CPU_CAPABILITY default and avx2, the normalise + SDPA composite
    under autocast lost up to 0.56 u * size (3e-3 .. 1e-1 relative to the result), the eager
    reference up to 0.19 u * size. A wrong scale, clamp or missing term is off by order 1."""
    size, _ = _scale_grad_terms(inputs, lens, window, grad)
    derived, _ = half_tol("dlogit_scale", base, want, dtype)
    return max(derived, 2 * unit_roundoff(dtype) * size / max(want.norm().item(), 1e-30))


def _scale_grad_terms(inputs, lens, window, grad):
    """(||sum_bij |scale dS cos| ||, max |score|) in float64: the size of what d logit_scale
    sums per head, and the largest score."""
    q, k, v, ls, mk, mv = [None if t is None else t.detach().double() for t in inputs]
    B, H, Nq, _ = q.shape
    Nk = k.shape[2]
    norm = lambda x: torch.nn.functional.normalize(x, dim=-1)  # noqa: E731
    cos = norm(q) @ norm(k).transpose(-1, -2)
    mask = key_mask(None if lens is None else torch.as_tensor(lens), window, B, Nq, Nk, "cpu")
    valid = torch.ones(B, H, Nq, Nk, dtype=torch.bool) if mask is None else mask.expand(B, H, Nq, Nk)
    vv = v
    if mk is not None:
        cos = torch.cat([norm(q) @ norm(mk).transpose(-1, -2)[None], cos], dim=-1)
        valid = torch.cat([valid.new_ones(B, H, Nq, mk.shape[1]), valid], dim=-1)
        vv = torch.cat([mv[None].expand(B, -1, -1, -1), v], dim=2)
    scale = torch.exp(ls.clamp(max=LN100))[None, :, None, None]
    p = torch.softmax(torch.where(valid, scale * cos, float("-inf")), dim=-1).nan_to_num(0.0)
    dp = grad.double() @ vv.transpose(-1, -2)
    ds = p * (dp - (p * dp).sum(-1, keepdim=True))
    size = (scale * ds * cos).abs().sum(dim=(0, 2, 3)).norm().item()
    return size, (scale * cos).abs().max().item()


@pytest.mark.parametrize("case", ["window0_lengths", "d40_dv24_memory8"])
def test_fused_float64_matches_reference_tightly(case):
    B, H, Nq, Nk, d, dv, M, lens, window = CASES[case]
    inputs = make_inputs(B, H, Nq, Nk, d, dv, M, dtype=torch.float64)
    grad = torch.randn(B, H, Nq, dv, dtype=torch.float64)
    got = forward_backward(fused, leaves(inputs), lens, window, grad)
    want = forward_backward(reference, leaves(inputs), lens, window, grad)
    for name, a, b in zip(NAMES, got, want):
        assert_rel_close(name, a, b, 1e-10)


@pytest.mark.parametrize("lens,window,M", [([4, 0], 1, 2), ([5, 2], None, None)])
def test_fused_gradcheck_float64(lens, window, M):
    q, k, v, ls, mk, mv = leaves(make_inputs(2, 1, 5, 5, 4, 3, M, dtype=torch.float64))
    args = [q, k, v, ls] + ([mk, mv] if M is not None else [])

    def fn(q, k, v, ls, *mem):
        return cosine_attention(q, k, v, ls, lens, window, *(mem or (None, None)), backend="fused")

    assert torch.autograd.gradcheck(fn, args, fast_mode=True)


def test_reference_gradcheck_float64():
    q, k, v, ls, mk, mv = leaves(make_inputs(2, 2, 4, 5, 3, 3, 2, dtype=torch.float64))
    assert torch.autograd.gradcheck(
        lambda *a: reference(*a[:4], [5, 1], 1, *a[4:]), (q, k, v, ls, mk, mv))


def test_reference_matches_plain_loop():
    """The reference against the definition written out per query, in float64."""
    B, H, Nq, Nk, d, dv, M = 2, 2, 6, 5, 3, 4, 2
    q, k, v, ls, mk, mv = make_inputs(B, H, Nq, Nk, d, dv, M, dtype=torch.float64,
                                      log_scale=[5.5, 0.3])
    lens, window = [5, 2], 1
    want = torch.zeros(B, H, Nq, dv, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            scale = min(math.exp(ls[h].item()), 100.0)
            for i in range(Nq):
                keys = [mk[h, m] for m in range(M)]
                vals = [mv[h, m] for m in range(M)]
                for j in range(Nk):
                    if j < lens[b] and abs(i - j) <= window:
                        keys.append(k[b, h, j])
                        vals.append(v[b, h, j])
                s = torch.stack([scale * torch.dot(q[b, h, i], kk) / (q[b, h, i].norm() * kk.norm())
                                 for kk in keys])
                want[b, h, i] = (torch.softmax(s, 0)[:, None] * torch.stack(vals)).sum(0)
    assert_rel_close("reference", reference(q, k, v, ls, lens, window, mk, mv), want, 1e-13)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("case", ["basic_nq_ne_nk", "lengths_mixed_0_full", "window0_lengths",
                                  "memory8_lengths0", "d40_dv24_memory8"])
def test_composite_matches_reference(case, dtype):
    B, H, Nq, Nk, d, dv, M, lens, window = CASES[case]
    inputs = make_inputs(B, H, Nq, Nk, d, dv, M, dtype=dtype, contiguous=case != "basic_nq_ne_nk")
    grad = torch.randn(B, H, Nq, dv, dtype=dtype)
    got = forward_backward(cosine_attention_composite, leaves(inputs), lens, window, grad)
    want = ref64(inputs, lens, window, grad)
    for name, a, b in zip(NAMES, got, want):
        assert a.dtype == dtype, name
        tol = 1e-12 if dtype == torch.float64 else 1e-5
        if name == "dlogit_scale" and dtype == torch.float32:
            tol = scale_grad_tol(inputs, lens, window, grad, b)
        assert_rel_close(name, a, b, tol)


def test_auto_on_cpu_matches_reference():
    inputs = make_inputs(2, 2, 5, 6, 8, 8, 2)
    grad = torch.randn(2, 2, 5, 8)
    got = forward_backward(lambda *a: cosine_attention(*a, backend="auto"), leaves(inputs), [6, 1], 2, grad)
    want = ref64(inputs, [6, 1], 2, grad)
    for name, a, b in zip(NAMES, got, want):
        tol = scale_grad_tol(inputs, [6, 1], 2, grad, b) if name == "dlogit_scale" else 1e-5
        assert_rel_close(name, a, b, tol)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_fused_half_matches_float64_reference(dtype, poison):
    """float16 / bfloat16 in: the output within HALF_FACTOR x the error of the eager reference
    computing in the same dtype (+ a unit roundoff), both against float64 on the same rounded
    inputs (the kernel rounds probabilities to dtype before P @ V as flash attention does;
    eager keeps them in float32 within its softmax: about 4x in bfloat16). Every gradient too,
    by the same bound; only with the second version (DTL_FAST_ATTN_IMPL=v2) the gradients
    within HALF_FACTOR x the normalise + SDPA composite's error in that dtype: its backward
    rounds the normalised q, k to the input dtype as the composite does (d logit_scale:
    half_scale_grad_tol, its cancellation)."""
    B, H, Nq, Nk, d, dv, M, lens, window = CASES["d40_dv24_memory8"]
    inputs = make_inputs(B, H, Nq, Nk, d, dv, M, dtype=dtype)
    grad = torch.randn(B, H, Nq, dv).to(dtype)
    with poison():
        got = forward_backward(fused, leaves(inputs), lens, window, grad)
    want = ref64(inputs, lens, window, grad)
    base = forward_backward(reference, leaves(inputs), lens, window, grad)
    comp = forward_backward(cosine_attention_composite, leaves(inputs), lens, window, grad)
    # the first kernels keep the reference-based bound everywhere (on the CPU the second
    # version runs only where forced: second_version_all_dtypes, $DTL_FAST_ATTN_IMPL=v2)
    v2 = ops.attn_version(dtype, inputs[0].shape[2], inputs[1].shape[2], None) == "v2"
    for name, a, b, c, w in zip(NAMES, got, base, comp, want):
        assert a.dtype == dtype and b.dtype == dtype, name
        if name == "out" or not v2:
            assert_half_close(name, a, w, b, dtype)
        elif name == "dlogit_scale":
            assert_rel_close(name, a, w, half_scale_grad_tol(inputs, lens, window, grad, w, c, dtype))
        else:
            assert_half_close(name, a, w, c, dtype)


@pytest.mark.parametrize("backend", ["fused", "reference", "composite"])
def test_clamped_scale_has_zero_gradient(backend, poison):
    fn = cosine_attention_composite if backend == "composite" else \
        (lambda *a: cosine_attention(*a, backend=backend))
    # Head 0 is clamped (e^5 > 100), heads 1 and 2 (e^4.6 just under 100) are not.
    inputs = make_inputs(2, 3, 6, 7, 8, 8, 2, log_scale=[5.0, 1.0, 4.6])
    grad = torch.randn(2, 3, 6, 8)
    with poison():
        got = forward_backward(fn, leaves(inputs), [7, 3], None, grad)
    want = ref64(inputs, [7, 3], None, grad)
    dls = got[4]
    assert dls[0].item() == 0.0, f"clamped head got gradient {dls[0].item()}"
    assert dls[1].item() != 0.0 and dls[2].item() != 0.0
    # Scores reach 100 here: their float32 rounding alone (100 * 2^-24 absolute, as much
    # relative in the weights) puts every float32 implementation, the eager reference too,
    # near 1e-5; 5e-5 still catches a wrong clamp or a missing term.
    for name, a, b in zip(NAMES, got, want):
        tol = scale_grad_tol(inputs, [7, 3], None, grad, b) if name == "dlogit_scale" else 5e-5
        assert_rel_close(name, a, b, tol)
    # The clamp really applies: scale 100 for e^5 too.
    assert_rel_close("clamped out", got[0],
                     reference(*[t.double() for t in inputs[:3]], torch.tensor([LN100, 1.0, 4.6]).double(),
                               [7, 3], None, *[t.double() for t in inputs[4:]]), 1e-5)


@pytest.mark.parametrize("backend", ["fused", "reference", "composite"])
def test_rows_with_nothing_to_attend_to(backend, poison):
    fn = cosine_attention_composite if backend == "composite" else \
        (lambda *a: cosine_attention(*a, backend=backend))
    # Batch 1 has no keys; in batch 0 queries 5.. lie outside the window of the 3 valid keys.
    B, H, Nq, Nk, d, dv = 2, 2, 8, 6, 8, 8
    inputs = make_inputs(B, H, Nq, Nk, d, dv, None)
    lens, window = [3, 0], 2
    grad = torch.randn(B, H, Nq, dv)
    with poison():
        out, dq, dk, dv_, dls = forward_backward(fn, leaves(inputs), lens, window, grad)
    for name, t in zip(NAMES, (out, dq, dk, dv_, dls)):
        assert torch.isfinite(t).all(), f"{name} has NaN / inf"
    empty = torch.zeros(B, Nq, dtype=torch.bool)
    empty[1] = True
    empty[0, 5:] = True
    assert (out.permute(0, 2, 1, 3)[empty] == 0).all()
    assert (dq.permute(0, 2, 1, 3)[empty] == 0).all()
    assert (out.permute(0, 2, 1, 3)[~empty] != 0).any(dim=-1).all()
    assert (dk[1] == 0).all() and (dv_[1] == 0).all() and (dk[0, :, 3:] == 0).all()
    want = ref64(inputs, lens, window, grad)
    for name, a, b in zip(NAMES, (out, dq, dk, dv_, dls), want):
        assert_rel_close(name, a, b, 1e-5)


# Padded keys: per batch [B], and per head [B, H] (keys j >= lens[b, h] padded in head h).
PADDED_LENGTHS = {"per_batch": [4, 1], "per_head": [[4, 2], [1, 6]]}


@pytest.mark.parametrize("lens", list(PADDED_LENGTHS), ids=list(PADDED_LENGTHS))
@pytest.mark.parametrize("which, bad", [("k", math.nan), ("k", math.inf), ("v", math.nan),
                                        ("v", -math.inf)], ids=["k_nan", "k_inf", "v_nan", "v_-inf"])
@pytest.mark.parametrize("backend", ["reference", "auto", "fused", "fused_v2"])
# The second version's pre-pass normalises every key row, padded ones too (the main kernel
# masks them), so an inf row warns in the interpreter's NumPy; the test checks the results.
@pytest.mark.filterwarnings("ignore:invalid value encountered in multiply:RuntimeWarning")
def test_non_finite_padded_keys_are_not_read(backend, which, bad, lens, poison, request):
    """NaN / inf in padded keys or values (j >= key_lengths) changes nothing: output and every
    gradient equal those of the same call with zero padding, bit for bit, and the padded k / v
    rows get exactly zero gradient (the kernels mask them out of every product; the reference
    and the composite zero them before their dense products)."""
    if backend == "fused_v2":
        request.getfixturevalue("second_version_all_dtypes")
    fn = lambda *a: cosine_attention(*a, backend=backend.removesuffix("_v2"))  # noqa: E731
    B, H, Nq, Nk, d = 2, 2, 5, 6, 8
    inputs = make_inputs(B, H, Nq, Nk, d, d, 2)
    valid = key_mask(torch.tensor(PADDED_LENGTHS[lens]), None, B, 1, Nk, "cpu")[:, :, 0, :]
    valid = valid.expand(B, H, Nk)
    slot = 1 if which == "k" else 2
    zero, poisoned = list(inputs), list(inputs)
    zero[slot] = torch.where(valid[..., None], inputs[slot], 0.0)
    poisoned[slot] = torch.where(valid[..., None], inputs[slot], bad)
    grad = torch.randn(B, H, Nq, d)
    with poison():
        want = forward_backward(fn, leaves(zero), PADDED_LENGTHS[lens], None, grad)
        got = forward_backward(fn, leaves(poisoned), PADDED_LENGTHS[lens], None, grad)
    for name, a, b in zip(NAMES, got, want):
        assert torch.isfinite(a).all(), f"{name} has NaN / inf: {a}"
        assert torch.equal(a, b), f"{name} differs from zero padding by {(a - b).abs().max():.3g}"
    for name, g in (("dk", got[2]), ("dv", got[3])):
        assert (g[~valid] == 0).all(), f"{name} of padded keys: {g[~valid]}"


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_float16_zero_rows_are_not_nan(backend):
    """float16 zero-padded keys, a zero query and a zero valid key normalise to zero, not to
    0 / 0: F.normalize's eps 1e-12 is 0 in float16, which made the composite return NaN for
    every query of a sample with zero padding. Gradients with zero padding only (the gradient
    of a zero row's normalisation is grad / eps, too large for float16 in every backend)."""
    f16 = torch.float16
    inputs = make_inputs(2, 2, 5, 6, 8, 8, None, dtype=f16)
    k = inputs[1].clone()
    k[1, :, 3:] = 0  # zero padding (lens[1] = 3)
    padded = [inputs[0], k, *inputs[2:]]
    grad = torch.randn(2, 2, 5, 8)
    fn = lambda *a: cosine_attention(*a, backend=backend)  # noqa: E731
    got = forward_backward(fn, leaves(padded), [6, 3], None, grad)
    want = ref64(padded, [6, 3], None, grad)
    base = forward_backward(reference, leaves(padded), [6, 3], None, grad.to(f16))
    # The composite folds the scale into q in float16: its error is up to ~8x the reference's
    # on dq / dk (worst of 60 seeds of this case, s26), so auto gets 4x the usual factor; a
    # NaN, a wrong row or a missing term is still far outside it.
    factor = HALF_FACTOR * (4 if backend == "auto" else 1)
    for name, a, w, b in zip(NAMES, got, want, base):
        assert torch.isfinite(a).all(), f"{name} has NaN / inf"
        if name != "dlogit_scale":
            assert_half_close(name, a, w, b, f16, factor)
    q, k = inputs[0].clone(), inputs[1].clone()
    q[0, :, 1] = 0  # a zero query: zero scores, the mean of its valid values
    k[0, :, 2] = 0  # a zero valid key: score zero
    zeros = [q, k, *inputs[2:]]
    out = fn(*zeros[:4], [6, 3])
    assert torch.isfinite(out).all(), "out has NaN / inf"
    want = reference(*[t.double() for t in zeros[:4]], [6, 3])
    assert_half_close("out", out, want, reference(*zeros[:4], [6, 3]), f16, factor)


def test_single_key_rows_have_zero_score_gradients(poison):
    # Softmax over one key is constant: dq, dk and d logit_scale vanish, dv is grad_out.
    inputs = make_inputs(2, 1, 5, 1, 4, 4, None)
    grad = torch.randn(2, 1, 5, 4)
    with poison():
        out, dq, dk, dv, dls = forward_backward(fused, leaves(inputs), [1, 1], 0, grad)
    assert dq.abs().max() < 1e-5 and dk.abs().max() < 1e-5 and dls.abs().max() < 1e-4
    assert_rel_close("out row 0", out[:, :, 0], inputs[2][:, :, 0], 1e-6)
    assert (out[:, :, 1:] == 0).all()
    assert_rel_close("dv", dv[:, :, 0], grad[:, :, 0], 1e-6)


def test_backward_is_deterministic():
    inputs = make_inputs(2, 2, 20, 17, 16, 16, 3)
    grad = torch.randn(2, 2, 20, 16)
    runs = [forward_backward(fused, leaves(inputs), [17, 9], None, grad) for _ in range(2)]
    for name, a, b in zip(NAMES, *runs):
        assert torch.equal(a, b), f"{name} differs between two identical runs"


def test_key_lengths_forms_agree():
    inputs = make_inputs(3, 1, 4, 6, 4, 4, None)
    want = reference(*inputs[:4], torch.tensor([6, 0, 2]))
    for lens in ([6, 0, 2], np.array([6, 0, 2]), torch.tensor([6, 0, 2], dtype=torch.int32),
                 [torch.tensor(6), torch.tensor(0), torch.tensor(2)]):
        for backend in ("fused", "reference"):
            got = cosine_attention(*inputs[:4], lens, backend=backend)
            assert_rel_close(f"{backend} {type(lens).__name__}", got, want, 1e-6)


def test_empty_sizes():
    # B = 0, Nq = 0, Nk = 0 (memory only / nothing at all) give well-formed results.
    for B, Nq, Nk, M in [(0, 3, 3, None), (2, 0, 3, 2), (2, 3, 0, 2), (2, 3, 0, None)]:
        inputs = leaves(make_inputs(B, 2, Nq, Nk, 4, 4, M))
        for backend in ("fused", "reference"):
            out = cosine_attention(*inputs[:4], None, None, *inputs[4:], backend=backend)
            assert out.shape == (B, 2, Nq, 4)
            want = reference(*[t.detach() if t is not None else None for t in inputs[:4]],
                             None, None, *[t.detach() if t is not None else None for t in inputs[4:]])
            assert torch.isfinite(out).all()
            assert_rel_close(f"{backend} {B},{Nq},{Nk},{M}", out, want, 1e-6)
            out.sum().backward()


# ------------------------------------------------------------------------------------------
# torch.library, torch.compile, autocast

def test_opcheck_forward_and_backward():
    q, k, v, ls, mk, mv = make_inputs(2, 1, 5, 6, 4, 3, 2)
    scale = torch.exp(ls)
    lens = torch.tensor([6, 2], dtype=torch.int32)
    args = [t.detach().clone().requires_grad_() for t in (q, k, v, scale, mk, mv)]
    torch.library.opcheck(torch.ops.dtl_fast.cosine_attention_fwd.default,
                          (*args[:4], lens, 1, *args[4:]))
    torch.library.opcheck(torch.ops.dtl_fast.cosine_attention_fwd.default,
                          (q, k, v, scale, None, -1, None, None))
    out, stats = torch.ops.dtl_fast.cosine_attention_fwd(q, k, v, scale, lens, 1, mk, mv)
    grad = torch.randn_like(out)
    torch.library.opcheck(torch.ops.dtl_fast.cosine_attention_bwd.default,
                          (grad, q, k, v, scale, lens, 1, mk, mv, out, stats))
    out, stats = torch.ops.dtl_fast.cosine_attention_fwd(q, k, v, scale, None, -1, None, None)
    torch.library.opcheck(torch.ops.dtl_fast.cosine_attention_bwd.default,
                          (grad, q, k, v, scale, None, -1, None, None, out, stats))


def test_torch_compile_fullgraph_aot_eager():
    inputs = make_inputs(2, 2, 6, 7, 8, 8, 3)
    lens = torch.tensor([7, 3])

    def f(q, k, v, ls, mk, mv):
        return cosine_attention(q, k, v, ls, lens, 2, mk, mv, backend="fused") * 2.0

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    grad = torch.randn(2, 2, 6, 8)
    a = leaves(inputs)
    out_c = compiled(*a)
    gc = torch.autograd.grad(out_c, a, grad)
    b = leaves(inputs)
    out_e = f(*b)
    ge = torch.autograd.grad(out_e, b, grad)
    assert_rel_close("compiled out", out_c, out_e, 1e-6)
    for name, x, y in zip(NAMES[1:], gc, ge):
        assert_rel_close(f"compiled {name}", x, y, 1e-6)


@pytest.mark.parametrize("backend", ["fused", "reference", "auto"])
def test_autocast_casts_to_the_autocast_dtype(backend):
    """Under autocast(bfloat16) with float32 inputs: a bfloat16 output, float32 gradients, each
    as close to float64 (on the same bf16-rounded inputs, scale float32) as the eager reference
    computing wholly in bfloat16 is (assert_half_close; d logit_scale: half_scale_grad_tol)."""
    bf16 = torch.bfloat16
    inputs = make_inputs(2, 2, 6, 7, 16, 16, 2)  # float32, as a model's parameters are
    grad = torch.randn(2, 2, 6, 16)
    a = leaves(inputs)
    with torch.autocast("cpu", dtype=bf16):
        out = cosine_attention(*a[:4], [7, 4], None, *a[4:], backend=backend)
    assert out.dtype == bf16
    grads = torch.autograd.grad(out, a, grad.to(out.dtype))
    # The reference on the same bf16-rounded inputs (scale stays float32).
    rounded = [t.to(bf16) if i != 3 else t for i, t in enumerate(inputs)]
    want = ref64(rounded, [7, 4], None, grad.to(bf16))
    base = forward_backward(reference, leaves(inputs, bf16), [7, 4], None, grad.to(bf16))
    for name, x, b, y in zip(NAMES, (out, *grads), base, want):
        assert x.dtype == (bf16 if name == "out" else torch.float32), name
        if name == "dlogit_scale":
            assert_rel_close(name, x, y, half_scale_grad_tol(rounded, [7, 4], None, grad.to(bf16), y, b, bf16))
        else:
            assert_half_close(name, x, y, b, bf16)


# ------------------------------------------------------------------------------------------
# Bad input

def _bad_cases():
    q, k, v, ls, mk, mv = make_inputs(2, 2, 5, 6, 8, 8, 2)
    ok = dict(q=q, k=k, v=v, logit_scale=ls, key_lengths=None, window=None, memory_k=mk, memory_v=mv)

    def with_(**kw):
        return {**ok, **kw}

    return [
        ("q rank", with_(q=q[0]), "q must be a 4-D"),
        ("k rank", with_(k=k[0]), "k must be a 4-D"),
        ("v rank", with_(v=v[..., 0]), "v must be a 4-D"),
        ("k batch", with_(k=k[:1]), "k must be"),
        ("k heads", with_(k=k[:, :1]), "k must be"),
        ("k head dim", with_(k=k[..., :4]), "k's head dim"),
        ("v length", with_(v=v[:, :, :3]), "v must be"),
        ("d too large", with_(q=torch.randn(2, 2, 5, 129), k=torch.randn(2, 2, 6, 129), memory_k=None,
                              memory_v=None), "head dim d"),
        ("dv too large", with_(v=torch.randn(2, 2, 6, 130), memory_k=None, memory_v=None), "head dim dv"),
        ("dtype mismatch", with_(k=k.double()), "k must have q's dtype"),
        ("integer q", with_(q=q.long(), k=k.long(), v=v.long()), "q must be float"),
        ("logit_scale shape", with_(logit_scale=ls[:1]), "logit_scale must have shape"),
        ("logit_scale int", with_(logit_scale=ls.long()), "logit_scale must be a floating"),
        ("memory_k alone", with_(memory_v=None), "memory_k and memory_v"),
        ("memory_k shape", with_(memory_k=mk[:1]), "memory_k must be"),
        ("memory_v head dim", with_(memory_v=mv[..., :3]), "memory_v must be"),
        ("memory slots differ", with_(memory_v=mv[:, :1]), "same number of slots"),
        ("memory dtype", with_(memory_k=mk.double()), "memory_k must have q's dtype"),
        ("key_lengths shape", with_(key_lengths=[1, 2, 3]), "key_lengths must have shape"),
        ("key_lengths float", with_(key_lengths=torch.tensor([1.0, 2.0])), "key_lengths must be an integer"),
        ("key_lengths bool", with_(key_lengths=[True, False]), "key_lengths must hold integers"),
        ("key_lengths too long", with_(key_lengths=[7, 2]), r"\[0, Nk\] = \[0, 6\]"),
        ("key_lengths negative", with_(key_lengths=[-1, 2]), r"\[0, Nk\]"),
        ("key_lengths string", with_(key_lengths="12"), "key_lengths must be None"),
        ("window negative", with_(window=-1), "window must be None or an int >= 0"),
        ("window float", with_(window=1.5), "window must be None or an int"),
        ("q not a tensor", with_(q=[[1.0]]), "q must be a torch.Tensor"),
    ]


BAD_INPUT_BACKENDS = ["fused", "reference", "auto", "composite"]


def call_backend(kwargs: dict, backend: str):
    """cosine_attention(**kwargs, backend=backend), or the composite for "composite"."""
    if backend == "composite":
        return cosine_attention_composite(**kwargs)
    return cosine_attention(**kwargs, backend=backend)


@pytest.mark.parametrize("backend", BAD_INPUT_BACKENDS)
@pytest.mark.parametrize("what,kwargs,match", _bad_cases(), ids=[c[0] for c in _bad_cases()])
def test_bad_input_raises_value_error(what, kwargs, match, backend):
    with pytest.raises(ValueError, match=match):
        call_backend(kwargs, backend)


def test_bad_backend():
    q, k, v, ls, _, _ = make_inputs(1, 1, 2, 2, 4, 4)
    with pytest.raises(ValueError, match="backend must be one of"):
        cosine_attention(q, k, v, ls, backend="cuda")


def test_fused_on_cpu_without_interpreter_raises():
    code = (
        "import torch\n"
        "from dtl_fast.ops.cosine_attention import cosine_attention\n"
        "q = torch.randn(1, 1, 3, 4)\n"
        "try:\n"
        "    cosine_attention(q, q, q, torch.zeros(1), backend='fused')\n"
        "except RuntimeError as e:\n"
        "    assert 'TRITON_INTERPRET' in str(e), str(e)\n"
        "    print('RAISED')\n"
        "out = cosine_attention(q, q, q, torch.zeros(1))\n"  # auto still works
        "assert out.shape == (1, 1, 3, 4)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "RAISED" in proc.stdout


# ------------------------------------------------------------------------------------------
# Windows near and past 2^31, the caller's lengths tensor, meta tensors

# "Effectively infinite" windows: each covers every key, so each is window=None. The kernels
# add block offsets to the window in int32 (m0 + BLOCK_M + win); near 2^31 that wrapped
# negative, and the first version returned zeros, the second wrong gradients.
HUGE_WINDOWS = {"int32_max": 2**31 - 1, "sys_maxsize": sys.maxsize, "2^40": 2**40,
                "numpy_2^40": np.int64(2**40), "per_head_list": [2**31 - 1, None],
                "per_head_tensor": torch.tensor([2**40, -1]),
                "per_head_numpy": np.array([2**31 - 1, 2**31 - 1 - 5], dtype=np.int64)}


@pytest.mark.parametrize("version", ["v1", "v2"])
@pytest.mark.parametrize("window", list(HUGE_WINDOWS), ids=list(HUGE_WINDOWS))
@pytest.mark.parametrize("lens", [None, [7, 3]], ids=["full", "padded"])
def test_huge_window_is_no_window(window, version, lens, poison, request):
    """backend="fused", both kernel versions: a window of 2^31 - 1 or wider (one for every head,
    or per head) gives bit for bit what window=None gives, output and every gradient."""
    if version == "v2":
        request.getfixturevalue("second_version_all_dtypes")
    inputs = make_inputs(2, 2, 5, 7, 8, 8, 2)
    grad = torch.randn(2, 2, 5, 8)
    with poison():
        want = forward_backward(fused, leaves(inputs), lens, None, grad)
        got = forward_backward(fused, leaves(inputs), lens, HUGE_WINDOWS[window], grad)
    for name, a, b in zip(NAMES, got, want):
        assert torch.equal(a, b), f"{name} differs from window=None by {(a - b).abs().max():.3g}"


@pytest.mark.parametrize("version", ["v1", "v2_short", "v2_long"])
def test_kernels_take_windows_up_to_int32_max(version, monkeypatch, poison, request):
    """The kernels themselves (the op's forward and backward bodies, below the host's mapping of
    wide windows to none): WINDOW = 2^31 - 1, and a per-head int32 WINS entry of 2^31 - 1, give
    bit for bit the unwindowed results (_head_mask clamps the window below int32 overflow)."""
    if version != "v1":
        request.getfixturevalue("second_version_all_dtypes")
    if version == "v2_long":
        from dtl_fast.kernels import cosine_attention_fwd as F2
        monkeypatch.setattr(F2, "SHORT_MAX_N", 0)
    B, H, Nq, Nk, d = 2, 2, 37, 45, 16  # several blocks in both directions
    q, k, v, ls, mk, mv = make_inputs(B, H, Nq, Nk, d, d, 2)
    scale = torch.exp(ls.clamp(max=LN100))
    lens = torch.tensor([45, 20], dtype=torch.int32)
    grad = torch.randn(B, H, Nq, d)

    def run(window, heads):
        with poison():
            out, lse = ops._fwd_impl(q, k, v, scale, lens, window, mk, mv, heads)
            grads = ops._bwd_impl(grad, q, k, v, scale, lens, window, mk, mv, out, lse, heads)
        return [out, lse, *grads]

    want = run(-1, None)
    big = 2**31 - 1
    for window, heads in ((big, None), (-2, torch.tensor([big, -1], dtype=torch.int32)),
                          (-2, torch.tensor([big, big], dtype=torch.int32))):
        got = run(window, heads)
        for name, a, b in zip(["out", "lse", "dq", "dk", "dv", "dscale", "dmk", "dmv"], got, want):
            assert torch.equal(a, b), (f"window {window} {heads}: {name} differs from no window "
                                       f"by {(a - b).abs().max():.3g}")


def test_window_covering_every_key_reaches_the_kernels_as_none(monkeypatch):
    """A window >= max(Nq, Nk) sees every key: the op passes it as none (the unmasked
    specialisation); per head, such entries become None, and a tensor is clamped to Nq + Nk."""
    seen = []
    orig = ops._fwd_call

    def spy(*a):
        seen.append((a[5], None if a[8] is None else a[8].tolist()))
        return orig(*a)

    monkeypatch.setattr(ops, "_fwd_call", spy)
    q, k, v, ls, _, _ = make_inputs(2, 3, 4, 6, 8, 8)
    for window in (6, 5, 2**40, [6, None, 2**31 - 1], [1, 6, None], torch.tensor([2**40, -1, 2])):
        fused(q, k, v, ls, None, window, None, None)
    assert seen == [(-1, None), (5, None), (-1, None), (-1, None), (-2, [1, -1, -1]),
                    (-2, [10, -1, 2])]


@pytest.mark.parametrize("per_head", [False, True], ids=["lengths_b", "lengths_bh"])
@pytest.mark.parametrize("backend", ["fused", "auto", "reference"])
def test_writing_the_callers_key_lengths_after_the_call(backend, per_head):
    """An in-place write to the caller's key_lengths between the call and backward changes
    nothing: the fused op saves its own copy (int32 lengths on q's device used to pass through
    as the caller's tensor, and backward raised autograd's version error), as the eager
    paths, which save none."""
    B, H = 2, 2
    inputs = make_inputs(B, H, 5, 7, 8, 8, 2)
    lens = [[7, 2], [3, 0]] if per_head else [7, 3]
    grad = torch.randn(B, H, 5, 8)

    def call(write):
        L = torch.tensor(lens, dtype=torch.int32)
        q, k, v, ls, mk, mv = leaves(inputs)
        out = cosine_attention(q, k, v, ls, L, None, mk, mv, backend=backend)
        if write:
            L.fill_(1)
        return [out, *torch.autograd.grad(out, (q, k, v, ls, mk, mv), grad)]

    for name, a, b in zip(NAMES, call(True), call(False)):
        assert torch.equal(a, b), f"{name}: the write to key_lengths changed the result"


@pytest.mark.parametrize("backend", ["reference", "auto", "composite"])
def test_meta_tensors_give_meta_outputs(backend):
    """Shape inference on the meta device: the eager paths run (torch.autocast knows no meta
    device, so the op must not ask it), with key lengths, per-head masks and memory too."""
    B, H, Nq, Nk, d, dv = 2, 3, 5, 7, 8, 6
    q = torch.empty(B, H, Nq, d, device="meta")
    k = torch.empty(B, H, Nk, d, device="meta")
    v = torch.empty(B, H, Nk, dv, device="meta")
    ls = torch.empty(H, device="meta", requires_grad=True)
    mk, mv = torch.empty(H, 2, d, device="meta"), torch.empty(H, 2, dv, device="meta")
    for lens, window, m in ((None, None, (None, None)), ([7, 3], 2, (mk, mv)),
                            (torch.zeros(B, H, dtype=torch.long, device="meta"),
                             torch.tensor([1, -1, 0], device="meta"), (mk, mv))):
        out = call_backend(dict(q=q, k=k, v=v, logit_scale=ls, key_lengths=lens, window=window,
                                memory_k=m[0], memory_v=m[1]), backend)
        assert out.device.type == "meta" and out.shape == (B, H, Nq, dv) and out.dtype == q.dtype
        assert out.requires_grad


def test_meta_tensors_fused_raises_its_own_error():
    q = torch.empty(1, 2, 3, 4, device="meta")
    with pytest.raises(RuntimeError, match="do not support meta tensors"):
        cosine_attention(q, q, q, torch.empty(2, device="meta"), backend="fused")


# ------------------------------------------------------------------------------------------
# CUDA at real sizes (skipped without a GPU)

GPU_SHAPES = [(4, 16, 1024, 1024, 64), (4, 16, 2048, 2048, 128), (4, 16, 1024, 2048, 64)]


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("padded", [False, True], ids=["full", "padded"])
def test_gpu_fused_matches_reference(shape, dtype, padded, poison):
    B, H, Nq, Nk, d = shape
    inputs = make_inputs(B, H, Nq, Nk, d, d, 8, dtype=dtype, device="cuda",
                         log_scale=torch.rand(H) * 1.4 + 1.6)  # scales 5 .. 20
    lens = torch.randint(Nk // 4, Nk + 1, (B,), device="cuda") if padded else None
    if padded:
        lens[0] = Nk
    grad = torch.randn(B, H, Nq, d, device="cuda").to(dtype)
    with poison():
        got = forward_backward(fused, leaves(inputs), lens, None, grad)
    want = ref64(inputs, lens, None, grad)
    comp = forward_backward(cosine_attention_composite, leaves(inputs), lens, None, grad)
    for name, a, c, b in zip(NAMES, got, comp, want):
        assert a.dtype == dtype, name
        assert_rel_close(name, a, b, gpu_tol(dtype, c, b, Nq, Nk))
    torch.cuda.synchronize()


def gpu_tol(dtype, composite, want, nq, nk):
    """float32: 1e-5. Half types: REL_TOL; where the call (nq queries, nk keys, on the current
    CUDA device) runs the second version (ops.attn_version: by default sm_90 from N 2048)
    HALF_FACTOR x the normalise + SDPA composite's own error in that dtype where larger (it
    rounds the normalised q, k to the input dtype as the composite does)."""
    if dtype == torch.float32:
        return 1e-5
    if ops.attn_version(dtype, nq, nk, ops._capability("cuda")) != "v2":
        return REL_TOL[dtype]  # the first kernels: the fixed bound they always met
    return max(REL_TOL[dtype], HALF_FACTOR * rel_err(composite, want))


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_gpu_fused_window_memory_matches_composite(dtype):
    B, H, N, d = 4, 16, 1024, 64
    inputs = make_inputs(B, H, N, N, d, d, 8, dtype=dtype, device="cuda", contiguous=False)
    lens = torch.tensor([N, 700, 1, 0], device="cuda")
    grad = torch.randn(B, H, N, d, device="cuda").to(dtype)
    got = forward_backward(fused, leaves(inputs), lens, 64, grad)
    comp = forward_backward(cosine_attention_composite, leaves(inputs, torch.float64), lens, 64, grad.double())
    want = ref64(inputs, lens, 64, grad)
    comp_d = forward_backward(cosine_attention_composite, leaves(inputs), lens, 64, grad)
    for name, a, c, cd, b in zip(NAMES, got, comp, comp_d, want):
        assert_rel_close(f"composite {name}", c, b, 1e-10)
        assert_rel_close(name, a, b, gpu_tol(dtype, cd, b, N, N))


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_gpu_fused_is_deterministic():
    # (which path backend="auto" takes on CUDA: tests/test_cosine_attention_auto.py)
    inputs = make_inputs(4, 16, 1024, 1024, 64, 64, 8, dtype=torch.bfloat16, device="cuda")
    lens = torch.tensor([1024, 512, 3, 1000], device="cuda")
    grad = torch.randn(4, 16, 1024, 64, device="cuda").to(torch.bfloat16)
    runs = [forward_backward(fused, leaves(inputs), lens, None, grad) for _ in range(2)]
    for name, a, b in zip(NAMES, *runs):
        assert torch.equal(a, b), f"{name} differs between two identical runs"


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_gpu_float64_and_opcheck():
    inputs = make_inputs(2, 2, 37, 45, 40, 24, 3, dtype=torch.float64, device="cuda")
    lens = torch.tensor([45, 7], device="cuda")
    grad = torch.randn(2, 2, 37, 24, dtype=torch.float64, device="cuda")
    got = forward_backward(fused, leaves(inputs), lens, 5, grad)
    want = forward_backward(reference, leaves(inputs), lens, 5, grad)
    for name, a, b in zip(NAMES, got, want):
        assert_rel_close(name, a, b, 1e-10)
    q, k, v, ls, mk, mv = make_inputs(2, 2, 70, 90, 64, 64, 4, dtype=torch.bfloat16, device="cuda")
    torch.library.opcheck(torch.ops.dtl_fast.cosine_attention_fwd.default,
                          (q, k, v, torch.exp(ls.float()), lens.int(), -1, mk, mv))


def test_per_head_key_lengths_and_windows_under_vmap():
    """Per-head key lengths [B, H] and a per-head window tensor [H] batched by torch.func.vmap:
    per-sample results, and the range checks see every sample (before: the lengths' check
    compared Python lists, 'TypeError: <', and the window's called .item() under vmap)."""
    from torch.func import vmap

    torch.manual_seed(0)
    q, k, v = (torch.randn(3, 2, 2, 4, 4) for _ in range(3))
    ls = torch.rand(2)
    kl = torch.tensor([[[0, 4], [2, 1]], [[3, 3], [4, 0]], [[1, 2], [2, 4]]])
    win = torch.tensor([[0, -1], [1, 1], [-1, 2]])
    f = vmap(lambda q, k, v, kl, w: cosine_attention(q, k, v, ls, kl, w, backend="reference"))
    got = f(q, k, v, kl, win)
    want = torch.stack([cosine_attention(q[i], k[i], v[i], ls, kl[i], win[i], backend="reference")
                        for i in range(3)])
    torch.testing.assert_close(got, want)
    with pytest.raises(ValueError, match=r"key_lengths\[b\] must lie in \[0, Nk\]"):
        f(q, k, v, kl.clone().index_fill_(0, torch.tensor([2]), 5), win)
    with pytest.raises(ValueError, match=r"window\[h\] must be >= 0"):
        f(q, k, v, kl, torch.tensor([[0, -1], [1, 1], [-2, 2]]))
