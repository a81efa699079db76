"""The second cosine-attention backward (kernels/cosine_attention_bwd.py) in the interpreter:
every tile candidate on shapes with masked edge and unmasked interior blocks (windows, key
lengths, memory slots across block boundaries, empty batches), all gradients against the
float64 reference, determinism; and the first backward, which the op no longer calls, still
right."""
import importlib
import math

import pytest
import torch

from dtl_fast.kernels import cosine_attention_bwd as B2
from dtl_fast.kernels import cosine_attention_fwd as F2
from dtl_fast.ops.cosine_attention import cosine_attention, cosine_attention_composite

from _helpers import HAS_CUDA, assert_half_close, assert_rel_close
from test_cosine_attention import NAMES, forward_backward, leaves, make_inputs, ref64, scale_grad_tol

ops = importlib.import_module("dtl_fast.ops.cosine_attention")


# The op runs the second-version kernels here for every dtype (conftest.py).
pytestmark = pytest.mark.usefixtures("second_version_all_dtypes")


def fused(*a):
    return cosine_attention(*a, backend="fused")


def _candidates():
    out = []
    for (kernel, cls, bd), cands in B2.BWD2_CANDIDATES.items():
        if kernel == "_cos_attn_bwd2_dkdv_kernel":
            out += [(cls, bd, i) for i in range(len(cands))]
    return out


@pytest.mark.parametrize("cls,bd,index", _candidates(), ids=lambda x: str(x))
def test_every_backward_candidate_matches_reference(cls, bd, index, monkeypatch, poison):
    """Candidate `index` of both kernels, on a shape of two resident blocks and a partial one
    (keys for dk / dv, queries for dq), key lengths inside a block and an empty batch element,
    memory slots, and a window narrower than a block on odd candidates."""
    dtype = torch.bfloat16 if cls == "half" else torch.float32
    d = {32: 24, 64: 40, 128: 72}[bd]
    kv, qc = _use_candidate(monkeypatch, dtype, d, index)
    Nk = 2 * kv["BLOCK_N"] + 5
    Nq = max(2 * qc["BLOCK_M"], 2 * kv["BLOCK_M"]) + 3
    lens, window = [Nk, kv["BLOCK_N"] + 3, 0], (kv["BLOCK_M"] // 2 + 1 if index % 2 else None)
    _check_candidate(dtype, 1, Nq, Nk, d, lens, window, "cpu", poison)


def _use_candidate(monkeypatch, dtype, d, index):
    """Makes the op's backward run candidate `index` of both kernels; returns their
    constexprs (dk / dv, dq)."""
    kv = B2.bwd2_config("_cos_attn_bwd2_dkdv_kernel", dtype, d, d, index)["constexprs"]
    qc = B2.bwd2_config("_cos_attn_bwd2_dq_kernel", dtype, d, d, index)["constexprs"]
    orig = B2.bwd2_config
    monkeypatch.setattr(B2, "bwd2_config", lambda *a, config=None, **k: orig(*a[:4], index))
    return kv, qc


def _check_candidate(dtype, H, Nq, Nk, d, lens, window, device, poison):
    """The op's forward + backward (the second version) against the float64 reference: every
    gradient in float32; in half within assert_half_close of the composite's own error."""
    B = len(lens)
    inputs = make_inputs(B, H, Nq, Nk, d, d, 3, dtype=dtype, device=device)
    grad = torch.randn(B, H, Nq, d, device=device).to(dtype)
    with poison():
        got = forward_backward(fused, leaves(inputs), lens, window, grad)
    want = ref64(inputs, lens, window, grad)
    if dtype == torch.float32:
        for name, a, b in zip(NAMES, got, want):
            tol = scale_grad_tol(inputs, lens, window, grad, b) if name == "dlogit_scale" else 1e-5
            assert_rel_close(name, a, b, tol)
    else:
        comp = forward_backward(cosine_attention_composite, leaves(inputs), lens, window, grad)
        # d logit_scale of one head sums few terms with cancellation: too ill-conditioned in
        # bfloat16 here (tests/test_cosine_attention_fwd.py::test_half_matches_float64_reference
        # checks it in half on a case that can); the float32 candidates check it here
        for name, a, c, b in zip(NAMES[1:], got[1:], comp[1:], want[1:]):
            if name != "dlogit_scale":
                assert_half_close(name, a, b, c, dtype)


def _half_candidates(head_dims=(40, 64, 128)):
    key = lambda d: ("_cos_attn_bwd2_dkdv_kernel", "half", F2.block_d(d, d))  # noqa: E731
    return [(d, i) for d in head_dims for i in range(len(B2.BWD2_CANDIDATES[key(d)]))]


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("d,index", _half_candidates(), ids=lambda x: str(x))
def test_gpu_every_backward_candidate_matches_reference(d, index, monkeypatch, poison):
    """Every half candidate as the GPU compiles it (tests/test_cosine_attention_compile.py
    checks those compiles; the interpreter runs the same code, not the same machine code), in
    bfloat16 at a size with many blocks and partial ones: lengths full, inside a block and 0,
    no window and a window of 100 on odd candidates."""
    _use_candidate(monkeypatch, torch.bfloat16, d, index)
    _check_candidate(torch.bfloat16, 4, 1000, 1030, d, [1030, 517, 0], 100 if index % 2 else None,
                     "cuda", poison)


@pytest.mark.parametrize("window", [None, 0, 40], ids=["nowin", "win0", "win40"])
def test_backward_float32_long_forward(window, monkeypatch, poison):
    """With the long forward (its lse) and the backward's edge / interior split over query
    blocks: strided inputs, memory slots, key lengths."""
    monkeypatch.setattr(F2, "SHORT_MAX_N", 0)
    inputs = make_inputs(2, 2, 150, 140, 16, 12, 5, contiguous=False)
    lens = [140, 61]
    grad = torch.randn(2, 2, 150, 12)
    with poison():
        got = forward_backward(fused, leaves(inputs), lens, window, grad)
    want = ref64(inputs, lens, window, grad)
    for name, a, b in zip(NAMES, got, want):
        tol = scale_grad_tol(inputs, lens, window, grad, b) if name == "dlogit_scale" else 1e-5
        assert_rel_close(name, a, b, tol)


def test_backward_is_deterministic():
    inputs = make_inputs(2, 2, 70, 150, 16, 16, 3)
    grad = torch.randn(2, 2, 70, 16)
    runs = [forward_backward(fused, leaves(inputs), [150, 37], 30, grad) for _ in range(2)]
    for name, a, b in zip(NAMES, *runs):
        assert torch.equal(a, b), f"{name} differs between two identical runs"


def test_first_backward_still_matches(poison):
    """kernels/cosine_attention.cosine_attention_backward (kept for comparison in the sweep)
    against the second on the same forward."""
    from dtl_fast.kernels import cosine_attention as K1
    q, k, v, ls, mk, mv = make_inputs(2, 2, 40, 50, 16, 16, 3)
    scale = torch.exp(ls)
    lens = torch.tensor([50, 20], dtype=torch.int32)
    out, lse = K1.cosine_attention_forward(q, k, v, scale, lens, 6, mk, mv)
    g = torch.randn_like(out)
    with poison():
        a = K1.cosine_attention_backward(g, q, k, v, scale, lens, 6, mk, mv, out, lse)
        b = B2.cosine_attention_backward2(g, q, k, v, scale, lens, 6, mk, mv, out, lse)
    for name, x, y in zip(("dq", "dk", "dv", "dscale", "dmk", "dmv"), a, b):
        assert_rel_close(name, x, y, 1e-5 if name != "dscale" else 1e-4)


# ---------------------------------------------------------------------------------------------
# Per-head windows ([H] tensor, -1: none) and per-head key lengths ([B, H]) at the kernel level.
# The oracle needs no per-head code: every head's gradients depend on that head's inputs only,
# so the float64 reference runs once per head slice (its window and lengths scalars) and the
# slices are concatenated; the forward's out / lse come the same way, from the second forward
# run per head slice with a scalar window.

PH_WINDOWS = [3, -1, 40, 0]
PH_LENS = [[75, 5, 0, 33], [40, 75, 75, 70]]


def _head(inputs, h):
    q, k, v, ls, mk, mv = inputs
    return (q[:, h:h + 1], k[:, h:h + 1], v[:, h:h + 1], ls[h:h + 1],
            None if mk is None else mk[h:h + 1], None if mv is None else mv[h:h + 1])


def _per_head(fn, H, windows, lens):
    """[fn(h, window_h, lens_h) for each head]: window_h None for -1, lens_h [B] or None."""
    return [fn(h, None if windows[h] < 0 else windows[h],
               None if lens is None else lens[:, h].contiguous()) for h in range(H)]


def _cat_heads(per_head):
    """Per-head results [out, dq, dk, dv, dls, dmk, dmv] concatenated: head is dim 1 of the
    [B, H, ...] tensors, dim 0 of logit_scale and the memory slots."""
    return [torch.cat(parts, dim=1 if parts[0].dim() == 4 else 0) for parts in zip(*per_head)]


def _backward2_per_head_args(inputs, grad, windows, lens, per_head_window):
    """Runs cosine_attention_backward2 with the per-head arguments on the out / lse of the
    second forward run per head; returns [dq, dk, dv, dlogit_scale, dmk, dmv]."""
    q, k, v, ls, mk, mv = inputs
    H = q.shape[1]
    scale = torch.exp(ls.clamp(max=math.log(100.0)))

    def fwd(h, w, lh):
        hq, hk, hv, _, hmk, hmv = _head(inputs, h)
        return F2.cosine_attention_forward2(hq, hk, hv, scale[h:h + 1], lh,
                                            -1 if w is None else w, hmk, hmv)
    out, lse = (torch.cat(t, dim=1) for t in zip(*_per_head(fwd, H, windows, lens)))
    window = torch.tensor(windows, dtype=torch.int32) if per_head_window else windows[0]
    dq, dk, dv, dscale, dmk, dmv = B2.cosine_attention_backward2(
        grad, q, k, v, scale, lens, window, mk, mv, out, lse)
    return [dq, dk, dv, dscale * scale, dmk, dmv]  # d logit_scale: scale < 100, no clamp


@pytest.mark.parametrize("per_head_window,per_head_lens", [(True, True), (True, False),
                                                           (False, True)],
                         ids=["win_lens", "win", "lens"])
def test_per_head_window_and_lengths_match_per_head_reference(per_head_window, per_head_lens,
                                                              poison):
    """Windows 3, none, 40, 0 and lengths from 0 to Nk across 4 heads, memory slots, key and
    query blocks with masked edges and unmasked interiors (float32: dk/dv keeps 32 keys
    resident and streams 16 queries; dq 32 x 32)."""
    B, H, Nq, Nk, d = 2, 4, 70, 75, 16
    inputs = make_inputs(B, H, Nq, Nk, d, d, 3)
    grad = torch.randn(B, H, Nq, d)
    windows = PH_WINDOWS if per_head_window else [PH_WINDOWS[0]] * H
    lens = torch.tensor(PH_LENS, dtype=torch.int32) if per_head_lens else None
    with poison():
        got = _backward2_per_head_args(inputs, grad, windows, lens, per_head_window)
    want = _cat_heads(_per_head(lambda h, w, lh: ref64(_head(inputs, h), lh, w, grad[:, h:h + 1]),
                                H, windows, lens))[1:]
    for name, a, b in zip(NAMES[1:], got, want):
        if name != "dlogit_scale":
            assert_rel_close(name, a, b, 1e-5)
    for h in range(H):  # d logit_scale per head: each has its own cancellation-limited bound
        w = None if windows[h] < 0 else windows[h]
        lh = None if lens is None else lens[:, h]
        tol = scale_grad_tol(_head(inputs, h), lh, w, grad[:, h:h + 1], want[3][h:h + 1])
        assert_rel_close(f"dlogit_scale[{h}]", got[3][h:h + 1], want[3][h:h + 1], tol)


def test_per_head_forms_with_equal_heads_match_the_shared_forms():
    """A per-head window tensor whose heads agree and per-head lengths [B, H] that repeat [B]
    give bit-identical gradients to the int window and [B] lengths (the same blocks, masks and
    summation order): the per-head branch changes only where the window and length come from."""
    B, H, Nq, Nk, d = 2, 3, 40, 37, 16
    q, k, v, ls, mk, mv = make_inputs(B, H, Nq, Nk, d, d, 2)
    scale = torch.exp(ls)
    lens = torch.tensor([37, 9], dtype=torch.int32)
    out, lse = F2.cosine_attention_forward2(q, k, v, scale, lens, 5, mk, mv)
    g = torch.randn_like(out)
    shared = B2.cosine_attention_backward2(g, q, k, v, scale, lens, 5, mk, mv, out, lse)
    per_head = B2.cosine_attention_backward2(
        g, q, k, v, scale, lens[:, None].expand(B, H), torch.full((H,), 5, dtype=torch.int32),
        mk, mv, out, lse)
    for name, a, b in zip(("dq", "dk", "dv", "dscale", "dmk", "dmv"), shared, per_head):
        assert torch.equal(a, b), f"{name}: per-head forms differ from the shared ones"
