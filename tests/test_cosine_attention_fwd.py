"""The second cosine-attention forward (kernels/cosine_attention_fwd.py) in the interpreter: the
pre-pass + fixed-maximum kernel (every tile candidate, both softmax forms, edge / interior /
window / length / memory blocks) and the short-sequence kernel against the float64 reference,
the fixed-maximum limit at both sides, every gradient through the op with the long path
forced (the backward takes its lse), empty rows, half precision, determinism, opcheck."""
import importlib
import math

import pytest
import torch

from dtl_fast.kernels import cosine_attention_fwd as F2
from dtl_fast.ops.cosine_attention import cosine_attention, cosine_attention_composite
from dtl_fast.reference.cosine_attention import cosine_attention as reference

from _helpers import assert_half_close, assert_rel_close, unit_roundoff
from test_cosine_attention import (NAMES, forward_backward, leaves, make_inputs, ref64,
                                   scale_grad_tol, half_scale_grad_tol)

ops = importlib.import_module("dtl_fast.ops.cosine_attention")


# The op runs the second-version kernels here for every dtype (conftest.py).
pytestmark = pytest.mark.usefixtures("second_version_all_dtypes")
LN100 = math.log(100.0)


def fwd2(inputs, lens, window, **kw):
    q, k, v, ls, mk, mv = inputs
    scale = torch.exp(ls.clamp(max=LN100)).to(torch.float64 if q.dtype == torch.float64 else torch.float32)
    L = None if lens is None else torch.as_tensor(lens, dtype=torch.int32)
    # the launchers take a contiguous last dim (the op makes it so)
    q, k, v, mk, mv = (ops._last_dim_contiguous(t) for t in (q, k, v, mk, mv))
    return F2.cosine_attention_forward2(q, k, v, scale, L, -1 if window is None else window, mk, mv, **kw)


def want64(inputs, lens, window):
    return reference(*[None if t is None else t.double() for t in inputs[:4]], lens, window,
                     *[None if t is None else t.double() for t in inputs[4:]])


def lse64(inputs, lens, window):
    """log-sum-exp of each row's scores in float64 (+inf where a row has nothing)."""
    q, k, v, ls, mk, mv = [None if t is None else t.double() for t in inputs]
    B, H, Nq, _ = q.shape
    n = torch.nn.functional.normalize
    s = torch.exp(ls.clamp(max=LN100))[None, :, None, None] * (n(q, dim=-1) @ n(k, dim=-1).transpose(-1, -2))
    from dtl_fast.reference.cosine_attention import key_mask
    m = key_mask(None if lens is None else torch.as_tensor(lens), window, B, Nq, k.shape[2], "cpu")
    if m is not None:
        s = s.masked_fill(~m, float("-inf"))
    if mk is not None:
        sm = torch.exp(ls.clamp(max=LN100))[None, :, None, None] * (n(q, dim=-1) @ n(mk, dim=-1).transpose(-1, -2)[None])
        s = torch.cat([sm, s], -1)
    out = torch.logsumexp(s, -1)
    return torch.where(torch.isneginf(out), torch.full_like(out, float("inf")), out)


# B, H, Nq, Nk, d, dv, M, key_lengths, window: shapes that give several query blocks, lower /
# upper edge and interior key blocks (BLOCK_N 32-128), key lengths inside a block, empty
# batches, windows narrower and wider than a block, memory slots across a block boundary
LONG = {
    "plain_odd": (1, 2, 150, 261, 16, 16, None, None, None),
    "lengths_mem": (3, 1, 140, 300, 8, 8, 5, [300, 0, 131], None),
    "window17_lengths": (2, 1, 200, 190, 8, 8, 2, [190, 100], 17),
    "window0_mem70": (1, 1, 140, 140, 8, 8, 70, None, 0),
    "window_wide_d40_dv24": (2, 1, 150, 150, 40, 24, 8, [150, 7], 90),
    "d3_dv5": (1, 2, 133, 140, 3, 5, 1, None, 3),
}


@pytest.mark.parametrize("fixed", ["auto", "never"])
@pytest.mark.parametrize("case", list(LONG), ids=list(LONG))
def test_fwd2_float32_matches_reference(case, fixed, poison):
    B, H, Nq, Nk, d, dv, M, lens, window = LONG[case]
    inputs = make_inputs(B, H, Nq, Nk, d, dv, M, contiguous=case != "plain_odd")
    with poison():
        out, lse = fwd2(inputs, lens, window, fixed_max=fixed, short=False)
    assert_rel_close("out", out, want64(inputs, lens, window), 1e-5)
    assert_rel_close("lse", lse, lse64(inputs, lens, window), 1e-6)


def _candidate_ids():
    return [(cls, bd, i) for (cls, bd), cands in F2.FWD2_CANDIDATES.items() for i in range(len(cands))]


@pytest.mark.parametrize("cls,bd,index", _candidate_ids(), ids=lambda x: str(x))
def test_every_tile_candidate_matches_reference(cls, bd, index):
    """Each candidate on a shape with an edge block, an interior block and key lengths, in a
    dtype of its class (bfloat16 for half: its own tolerance) and at its head-dim bucket."""
    dtype = torch.bfloat16 if cls == "half" else torch.float32
    d = {32: 24, 64: 40, 128: 72}[bd]
    cfg = F2.fwd2_config(dtype, d, d, index)
    bn = cfg["constexprs"]["BLOCK_N"]
    Nk = 2 * bn + 5
    lens, window = [Nk, bn + 3], (bn // 2 if index % 2 else None)
    inputs = make_inputs(2, 1, cfg["constexprs"]["BLOCK_M"] + 3, Nk, d, d, 3, dtype=dtype)
    out, _ = fwd2(inputs, lens, window, config=index, short=False)
    want = want64(inputs, lens, window)
    if dtype == torch.float32:
        assert_rel_close("out", out, want, 1e-5)
    else:
        # the long path rounds the normalised rows to bfloat16, as the composite does: held to
        # HALF_FACTOR x the composite's error in bfloat16 (the eager reference keeps float32)
        base = cosine_attention_composite(*inputs[:4], lens, window, *inputs[4:])
        assert_half_close("out", out, want, base, dtype)


@pytest.mark.parametrize("case", ["lengths_mem", "window17_lengths", "window_wide_d40_dv24"])
def test_fwd2_gradients_through_the_op(case, monkeypatch, poison):
    """Every gradient (q, k, v, logit_scale, memory) with the long forward forced at any size:
    the backward uses the lse this forward returns."""
    monkeypatch.setattr(F2, "SHORT_MAX_N", 0)
    B, H, Nq, Nk, d, dv, M, lens, window = LONG[case]
    inputs = make_inputs(B, H, Nq, Nk, d, dv, M)
    grad = torch.randn(B, H, Nq, dv)
    with poison():
        got = forward_backward(lambda *a: cosine_attention(*a, backend="fused"), leaves(inputs),
                               lens, window, grad)
    want = ref64(inputs, lens, window, grad)
    for name, a, b in zip(NAMES, got, want):
        tol = scale_grad_tol(inputs, lens, window, grad, b) if name == "dlogit_scale" else 1e-5
        assert_rel_close(name, a, b, tol)


@pytest.mark.parametrize("short", [False, True], ids=["long", "short"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_matches_float64_reference(dtype, short, monkeypatch, poison):
    """float16 / bfloat16: output and every gradient within HALF_FACTOR x the eager reference's
    error in that dtype (+ a unit roundoff). The long path rounds the normalised, scaled q and
    the normalised k to the input dtype as the normalise + SDPA composite does, so its baseline
    is the composite's error in that dtype; so do the short path (it rounds as the pre-pass
    does, for the backward's sake) and the backward."""
    if not short:
        monkeypatch.setattr(F2, "SHORT_MAX_N", 0)
    # the short kernel takes at most 64 queries / keys; d logit_scale is well conditioned on both
    B, H, Nq, Nk, d, dv, M, lens, window = ((3, 3, 64, 64, 40, 24, 8, [64, 30, 50], None) if short
                                            else (2, 3, 70, 67, 40, 24, 8, [67, 30], None))
    inputs = make_inputs(B, H, Nq, Nk, d, dv, M, dtype=dtype)
    grad = torch.randn(B, H, Nq, dv).to(dtype)
    with poison():
        got = forward_backward(lambda *a: cosine_attention(*a, backend="fused"), leaves(inputs),
                               lens, window, grad)
    want = ref64(inputs, lens, window, grad)
    comp = forward_backward(cosine_attention_composite, leaves(inputs), lens, window, grad)
    # both paths (and the backward) round the normalised rows as the composite does
    base = comp
    for name, a, b, w in zip(NAMES, got, base, want):
        assert a.dtype == dtype, name
        if name == "dlogit_scale":
            assert_rel_close(name, a, w, half_scale_grad_tol(inputs, lens, window, grad, w, b, dtype))
        else:
            assert_half_close(name, a, w, b, dtype)


# ------------------------------------------------------------------------------------------
# The fixed maximum at both sides of its limit

def _antialigned(dtype, s, N=40, dv=8):
    """One head whose every key points exactly away from every query (cos = -1): all weights
    are exp2(-2 S) under the fixed maximum, the softmax is uniform (out = mean of v)."""
    q = torch.randn(1, 1, 1, 16).expand(1, 1, 3, 16).contiguous()
    k = (-q[:, :, :1]).expand(1, 1, N, 16).contiguous() * torch.rand(1, 1, N, 1) * 3 + 0.0
    v = torch.randn(1, 1, N, dv)
    ls = torch.tensor([math.log(s)])
    return [t.to(dtype) for t in (q, k, v)] + [ls, None, None]


def test_limit_is_derived_from_the_exponent_range():
    for dtype in (torch.float32, torch.bfloat16):
        assert F2.fixed_max_limit(dtype) == 51.0  # 2 S <= 126 - 24
    assert F2.fixed_max_limit(torch.float16) == 7.0  # 2 S <= 14
    assert math.isclose(F2.fixed_max_scale_limit(torch.float32), 51 * math.log(2))
    # the weights the limit admits are normal in the weights' dtype with the headroom asked
    for dtype, room in ((torch.float32, 2.0**-24), (torch.float16, 1.0)):
        smallest = 2.0 ** (-2 * F2.fixed_max_limit(dtype))
        assert smallest >= torch.finfo(dtype).tiny / room * (1 - 1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_fixed_max_at_both_sides_of_its_limit(dtype):
    """Just below the limit the fixed maximum runs ("auto" = "always") and is right on the
    worst row (all weights at their smallest); just above, "auto" takes the online maximum
    (= "never") and is right; forcing the fixed maximum far above the limit is wrong (the
    weights underflow): the limit is needed."""
    lim = F2.fixed_max_scale_limit(dtype)
    tol = 1e-5 if dtype == torch.float32 else 4e-3
    for s, side in ((lim * 0.999, "below"), (lim * 1.001, "above")):
        inputs = _antialigned(dtype, s)
        want = want64(inputs, None, None)
        assert_rel_close(f"{side}: mean of v", want, inputs[2].double().mean(2, keepdim=True).expand_as(want), 1e-4)  # cos = -1 up to the rounding of k
        auto, lse_a = fwd2(inputs, None, None, short=False)
        assert_rel_close(f"{side} auto", auto, want, tol)
        forced = fwd2(inputs, None, None, short=False, fixed_max="always" if side == "below" else "never")
        assert torch.equal(auto, forced[0]) and torch.equal(lse_a, forced[1]), f"{side}: auto took the other path"
        # float16: q_hat * S and k_hat rounded to float16 move each logit by ~u S
        lse_tol = 1e-6 if dtype == torch.float32 else 4 * unit_roundoff(dtype)
        assert_rel_close(f"{side} lse", lse_a, lse64(inputs, None, None), lse_tol)
    far = 100.0 if dtype == torch.float32 else 12.0
    inputs = _antialigned(dtype, far)
    bad, _ = fwd2(inputs, None, None, short=False, fixed_max="always")
    good, _ = fwd2(inputs, None, None, short=False)
    want = want64(inputs, None, None)
    assert_rel_close("online far above", good, want, tol)
    assert not torch.isfinite(bad).all() or (bad.double() - want).norm() > 0.1 * want.norm(), \
        "the fixed maximum far above its limit was still right: the limit is not where it binds"


def test_per_head_choice():
    """Heads below and above the limit in one call (the choice is per head, at run time)."""
    lim = F2.fixed_max_scale_limit(torch.float32)
    inputs = make_inputs(2, 3, 140, 150, 16, 16, 4, log_scale=[math.log(lim) - 0.5, math.log(lim) + 0.3, LN100])
    out, lse = fwd2(inputs, [150, 77], 40, short=False)
    # scores reach 100: float32 rounding of the scores alone is ~1e-5 relative (see the
    # clamped-scale test)
    assert_rel_close("out", out, want64(inputs, [150, 77], 40), 5e-5)
    assert_rel_close("lse", lse, lse64(inputs, [150, 77], 40), 1e-6)


# ------------------------------------------------------------------------------------------
# Empty rows, the short kernel, determinism, opcheck

@pytest.mark.parametrize("short", [False, True], ids=["long", "short"])
def test_rows_with_nothing_to_attend_to(short, monkeypatch, poison):
    if short:  # float32 through the short kernel (on a GPU only half types take it)
        monkeypatch.setattr(F2, "use_short", lambda nq, nk, m, *a: max(nq, nk, m) <= F2.SHORT_MAX_N)
    else:
        monkeypatch.setattr(F2, "SHORT_MAX_N", 0)
    B, H, Nq, Nk, d, dv = 2, 2, 64, 60, 8, 8
    inputs = make_inputs(B, H, Nq, Nk, d, dv, None)
    lens, window = [30, 0], 5
    grad = torch.randn(B, H, Nq, dv)
    with poison():
        out, dq, dk, dv_, dls = forward_backward(lambda *a: cosine_attention(*a, backend="fused"),
                                                 leaves(inputs), lens, window, grad)
    empty = torch.zeros(B, Nq, dtype=torch.bool)
    empty[1] = True
    empty[0, 35:] = True  # query i sees keys i-5..i+5 < 30: none from 35 on
    assert (out.permute(0, 2, 1, 3)[empty] == 0).all() and (dq.permute(0, 2, 1, 3)[empty] == 0).all()
    assert (out.permute(0, 2, 1, 3)[~empty] != 0).any(dim=-1).all()
    assert (dk[1] == 0).all() and (dv_[1] == 0).all()
    want = ref64(inputs, lens, window, grad)
    for name, a, b in zip(NAMES, (out, dq, dk, dv_, dls), want):
        assert_rel_close(name, a, b, 1e-5)


SHORT = {
    "n16_d32_lengths": (5, 3, 16, 16, 32, 32, None, [16, 3, 0, 9, 16], None),
    "n33x47_mem8_window": (3, 2, 33, 47, 20, 12, 8, [47, 1, 30], 4),
    "n64_mem16": (1, 2, 64, 64, 8, 8, 16, [64], None),
    "nk0_mem3": (2, 1, 5, 0, 8, 8, 3, None, None),
}


@pytest.mark.parametrize("case", list(SHORT), ids=list(SHORT))
def test_short_kernel_matches_reference_and_long(case, poison):
    B, H, Nq, Nk, d, dv, M, lens, window = SHORT[case]
    inputs = make_inputs(B, H, Nq, Nk, d, dv, M, log_scale=torch.rand(H) * 4.6)
    assert F2.use_short(Nq, Nk, M or 0, F2.block_d(d, dv), torch.bfloat16)
    with poison():
        out, lse = fwd2(inputs, lens, window, short=True)  # float32: forced (GPU: half only)
    assert_rel_close("out", out, want64(inputs, lens, window), 1e-5)
    assert_rel_close("lse", lse, lse64(inputs, lens, window), 1e-6)
    long_out, _ = fwd2(inputs, lens, window, short=False)
    assert_rel_close("short vs long", out, long_out, 1e-5)


def test_short_config_groups_heads():
    assert F2.short_config(torch.bfloat16, 16, 16, 0, 32, 32, 64 * 4)["constexprs"]["HEADS"] == 1
    assert F2.short_config(torch.bfloat16, 16, 16, 0, 32, 32, 64 * 132 * 8)["constexprs"]["HEADS"] == 8
    c = F2.short_config(torch.float32, 33, 47, 8, 20, 12, 6)["constexprs"]
    assert (c["BLOCK_M"], c["BLOCK_N"], c["BLOCK_MEM"], c["BLOCK_D"]) == (64, 64, 16, 32)
    with pytest.raises(ValueError, match="short kernel"):
        fwd2(make_inputs(1, 1, 65, 4, 8, 8), None, None, short=True)
    assert F2.use_short(64, 64, 8, 64, torch.float16) and not F2.use_short(65, 4, 0, 32)
    assert not F2.use_short(16, 16, 0, 128, torch.bfloat16)
    assert not F2.use_short(16, 16, 0, 32, torch.float32)  # spills on the GPU: long path


def test_short_kernel_several_heads_per_program(monkeypatch):
    """HEADS > 1 with a last program that holds fewer heads (B * H not a multiple)."""
    orig = F2.short_config

    def four_heads(*a):
        cfg = orig(*a)
        cfg["constexprs"]["HEADS"] = 4
        return cfg

    monkeypatch.setattr(F2, "short_config", four_heads)
    inputs = make_inputs(3, 3, 9, 12, 8, 8, 2)
    out, lse = fwd2(inputs, [12, 5, 0], 3, short=True)
    assert_rel_close("out", out, want64(inputs, [12, 5, 0], 3), 1e-5)
    assert_rel_close("lse", lse, lse64(inputs, [12, 5, 0], 3), 1e-6)


def test_forward_is_deterministic():
    inputs = make_inputs(2, 2, 140, 150, 16, 16, 3)
    a = fwd2(inputs, [150, 60], 50, short=False)
    b = fwd2(inputs, [150, 60], 50, short=False)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_bad_fixed_max():
    with pytest.raises(ValueError, match="fixed_max must be one of"):
        fwd2(make_inputs(1, 1, 4, 4, 8, 8), None, None, fixed_max="sometimes", short=False)


def test_opcheck_long_path(monkeypatch):
    monkeypatch.setattr(F2, "SHORT_MAX_N", 0)
    q, k, v, ls, mk, mv = make_inputs(2, 1, 5, 6, 4, 3, 2)
    scale = torch.exp(ls)
    lens = torch.tensor([6, 2], dtype=torch.int32)
    args = [t.detach().clone().requires_grad_() for t in (q, k, v, scale, mk, mv)]
    torch.library.opcheck(torch.ops.dtl_fast.cosine_attention_fwd.default, (*args[:4], lens, 1, *args[4:]))


def test_old_forward_still_matches(poison):
    """The first forward (kernels/cosine_attention.cosine_attention_forward) stays correct: the
    sweep times it against this one."""
    from dtl_fast.kernels import cosine_attention as K1
    inputs = make_inputs(2, 1, 70, 90, 16, 16, 3)
    q, k, v, ls, mk, mv = inputs
    with poison():
        out, lse = K1.cosine_attention_forward(q, k, v, torch.exp(ls), torch.tensor([90, 40], dtype=torch.int32),
                                               20, mk, mv)
    assert_rel_close("out", out, want64(inputs, [90, 40], 20), 1e-5)
    assert_rel_close("lse", lse, lse64(inputs, [90, 40], 20), 1e-6)
