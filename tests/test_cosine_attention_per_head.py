"""Per-head window and per-head key lengths of cosine_attention (several branches with different
masks over the same tokens as one call over their stacked heads): the eager reference, the
normalise + SDPA composite and the fused kernels (the first version forward and backward through
the op, the second version's forward directly; in the Triton interpreter on CPU) against the
per-head oracle, every gradient, the op's routing between kernel versions, bit-identity of the
per-head path with all heads equal to the one-window path, torch.library / torch.compile, and
bad input.

The oracle is independent of the per-head code: the existing one-mask reference run once per
head (q[:, h:h+1], ..., window[h], key_lengths[:, h], logit_scale[h:h+1], memory_k[h:h+1]) in
float64, the heads concatenated, gradients by autograd through the slices."""
import importlib
import math

import pytest
import torch

from dtl_fast.kernels import cosine_attention as K1
from dtl_fast.kernels import cosine_attention_fwd as F2
from dtl_fast.ops.cosine_attention import cosine_attention, cosine_attention_composite
from dtl_fast.reference.cosine_attention import cosine_attention as reference

from _helpers import assert_rel_close
from test_cosine_attention import (BAD_INPUT_BACKENDS, NAMES, call_backend, leaves, make_inputs,
                                   scale_grad_tol)

ops = importlib.import_module("dtl_fast.ops.cosine_attention")
LN100 = math.log(100.0)


def _head_window(window, h):
    if window is None or isinstance(window, int):
        return window
    w = int(window[h]) if window[h] is not None else None
    return None if w is None or w < 0 else w


def _head_lengths(lens, h):
    if lens is None:
        return None
    lens = torch.as_tensor(lens)
    return lens[:, h] if lens.dim() == 2 else lens


def oracle_forward(inputs, lens, window):
    """The per-head oracle's output on `inputs` (leaves, any dtype: computed as given)."""
    q, k, v, ls, mk, mv = inputs
    outs = []
    for h in range(q.shape[1]):
        sl = slice(h, h + 1)
        outs.append(reference(q[:, sl], k[:, sl], v[:, sl], ls[sl], _head_lengths(lens, h),
                              _head_window(window, h),
                              None if mk is None else mk[sl], None if mv is None else mv[sl]))
    return torch.cat(outs, dim=1)


def oracle64(inputs, lens, window, grad):
    """[out, dq, dk, dv, dlogit_scale, (dmemory_k, dmemory_v)] of the per-head oracle in float64."""
    a = leaves(inputs, torch.float64)
    out = oracle_forward(a, lens, window)
    wrt = [t for t in a if t is not None]
    return [out, *torch.autograd.grad(out, wrt, grad.double())]


def oracle_lse64(inputs, lens, window):
    """log-sum-exp of each row's scores per head in float64 (+inf for a row with nothing)."""
    q, k, v, ls, mk, mv = [None if t is None else t.detach().double() for t in inputs]
    B, H, Nq, _ = q.shape
    n = torch.nn.functional.normalize
    out = []
    for h in range(H):
        s = math.exp(min(ls[h].item(), LN100)) * (n(q[:, h], dim=-1) @ n(k[:, h], dim=-1).transpose(-1, -2))
        j = torch.arange(k.shape[2])
        valid = torch.ones(B, Nq, k.shape[2], dtype=torch.bool)
        L = _head_lengths(lens, h)
        if L is not None:
            valid &= (j[None, :] < L[:, None])[:, None, :]
        w = _head_window(window, h)
        if w is not None:
            valid &= ((torch.arange(Nq)[:, None] - j[None, :]).abs() <= w)[None]
        s = s.masked_fill(~valid, float("-inf"))
        if mk is not None:
            sm = math.exp(min(ls[h].item(), LN100)) * (n(q[:, h], dim=-1) @ n(mk[h], dim=-1).T)
            s = torch.cat([sm, s], -1)
        out.append(torch.logsumexp(s, -1))
    lse = torch.stack(out, 1)
    return torch.where(torch.isneginf(lse), torch.full_like(lse, float("inf")), lse)


def run(fn, inputs, lens, window, grad):
    """[out, every gradient] of fn(q, k, v, logit_scale, lens, window, memory_k, memory_v)."""
    q, k, v, ls, mk, mv = inputs
    out = fn(q, k, v, ls, lens, window, mk, mv)
    wrt = [t for t in inputs if t is not None]
    return [out, *torch.autograd.grad(out, wrt, grad.to(out.dtype))]


def fused(*a):
    return cosine_attention(*a, backend="fused")


def ref_op(*a):
    return cosine_attention(*a, backend="reference")


def _lens(spec):
    # nested lists [B][H] are per-head lengths (as a tensor: the form the kernels get), flat
    # lists [B] one length per batch element
    if spec is None or not isinstance(spec[0], list):
        return spec
    return torch.tensor(spec)


def _window(spec, H):
    # "t:" prefix: the same entries as an int tensor [H] (-1: none)
    if isinstance(spec, tuple) and spec and spec[0] == "t":
        return torch.tensor([-1 if w is None else w for w in spec[1]])
    return spec


# B, H, Nq, Nk, d, dv, M, key_lengths, window. Odd shapes: Nq != Nk, N not a multiple of any
# block (the first version's blocks are 16-64 rows, so Nk 45 has two key blocks and a partial
# one), d 3 / 16 / 33, H 1 and 3, windows mixing None / 0 / 1 / wide, lengths 0 and Nk, with and
# without memory slots, per-head lengths with one window, per-batch lengths with per-head windows.
CASES = {
    "h3_lens_and_windows_d3": (2, 3, 7, 9, 3, 5, None, [[9, 0, 4], [5, 9, 1]], [None, 0, 2]),
    "h3_lens_memory_d16": (2, 3, 9, 6, 16, 16, 2, [[6, 3, 0], [1, 6, 6]], None),
    "h3_windows_memory_d33": (1, 3, 10, 10, 33, 8, 3, None, [1, 100, None]),
    "h3_window_tensor_lens_b": (2, 3, 8, 11, 16, 12, None, [11, 4], ("t", [None, 1, 0])),
    "h1_window_tensor_lens_bh": (3, 1, 5, 7, 16, 16, 1, [[7], [0], [3]], ("t", [0])),
    "h2_blocks_lens_bh_window": (2, 2, 37, 45, 16, 16, None, [[45, 20], [0, 33]], 3),
    "h2_blocks_windows_memory": (2, 2, 37, 45, 16, 16, 4, [45, 17], [3, None]),
}


def _case(name, dtype=torch.float32, contiguous=True):
    B, H, Nq, Nk, d, dv, M, lens, window = CASES[name]
    inputs = make_inputs(B, H, Nq, Nk, d, dv, M, dtype=dtype, contiguous=contiguous)
    grad = torch.randn(B, H, Nq, dv, dtype=dtype)
    return inputs, _lens(lens), _window(window, H), grad


def _check(got, want, dtype, inputs, lens, window, grad, tol=None):
    for name, a, b in zip(NAMES, got, want):
        assert a.dtype == dtype, name
        if tol is not None:
            t = tol
        elif name == "dlogit_scale":
            t = scale_grad_tol(inputs, lens, window, grad, b)
        else:
            t = 1e-5
        assert_rel_close(name, a, b, t)


def test_oracle_is_the_one_mask_reference_when_heads_agree():
    """The oracle itself: with every head's window and lengths equal it is the plain reference."""
    inputs, _, _, grad = _case("h3_lens_memory_d16", torch.float64)
    want = run(reference, leaves(inputs), [6, 1], 2, grad)
    got = oracle64(inputs, torch.tensor([[6] * 3, [1] * 3]), [2, 2, 2], grad)
    _check(got, want, torch.float64, inputs, None, None, grad, tol=1e-14)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("backend", ["reference", "composite"])
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_eager_paths_match_the_per_head_oracle(case, backend, dtype):
    inputs, lens, window, grad = _case(case, dtype, contiguous=case != "h3_lens_memory_d16")
    fn = ref_op if backend == "reference" else cosine_attention_composite
    got = run(fn, leaves(inputs), lens, window, grad)
    want = oracle64(inputs, lens, window, grad)
    _check(got, want, dtype, inputs, lens, window, grad, tol=1e-12 if dtype == torch.float64 else None)


# ------------------------------------------------------------------------------------------
# The fused kernels (Triton interpreter on CPU)

@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_fused_float32_matches_the_per_head_oracle(case, poison):
    """First-version forward and backward (float32 runs the first version)."""
    inputs, lens, window, grad = _case(case)
    with poison():
        got = run(fused, leaves(inputs), lens, window, grad)
    _check(got, oracle64(inputs, lens, window, grad), torch.float32, inputs, lens, window, grad)


@pytest.mark.parametrize("case", ["h3_lens_and_windows_d3", "h2_blocks_windows_memory"])
def test_fused_float64_matches_the_per_head_oracle_tightly(case, monkeypatch):
    """float64 on the first version (the second takes float64 only under DTL_FAST_ATTN_IMPL=v2)."""
    monkeypatch.setattr(ops, "V2_DTYPES", ())
    inputs, lens, window, grad = _case(case, torch.float64, contiguous=False)
    got = run(fused, leaves(inputs), lens, window, grad)
    _check(got, oracle64(inputs, lens, window, grad), torch.float64, inputs, lens, window, grad,
           tol=1e-10)


def test_fused_gradcheck_float64(monkeypatch):
    monkeypatch.setattr(ops, "V2_DTYPES", ())
    q, k, v, ls, mk, mv = leaves(make_inputs(2, 2, 5, 6, 4, 3, 2, dtype=torch.float64))
    lens, window = torch.tensor([[6, 2], [0, 5]]), [1, None]

    def fn(q, k, v, ls, mk, mv):
        return cosine_attention(q, k, v, ls, lens, window, mk, mv, backend="fused")

    assert torch.autograd.gradcheck(fn, (q, k, v, ls, mk, mv), fast_mode=True)


def _fwd2(inputs, lens, window, **kw):
    """The second forward's launcher on the op's kernel arguments: (out, lse)."""
    q, k, v, ls, mk, mv = inputs
    scale = torch.exp(ls.clamp(max=LN100)).to(torch.float64 if q.dtype == torch.float64 else torch.float32)
    L = None if lens is None else torch.as_tensor(lens).to(torch.int32).contiguous()
    if window is None:
        w = -1
    elif isinstance(window, int):
        w = window
    else:
        w = torch.as_tensor([-1 if x is None else x for x in window] if not isinstance(window, torch.Tensor)
                            else window).to(torch.int32)
    q, k, v, mk, mv = (ops._last_dim_contiguous(t) for t in (q, k, v, mk, mv))
    return F2.cosine_attention_forward2(q, k, v, scale, L, w, mk, mv, **kw)


@pytest.mark.parametrize("path", ["long", "short"])
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_second_forward_matches_the_per_head_oracle(case, path, poison):
    """The second version's forward (pre-pass + block-aware kernel, and the short-sequence
    kernel, forced in float32) with per-head arguments: out and lse."""
    inputs, lens, window, _ = _case(case)
    with poison():
        out, lse = _fwd2(inputs, lens, window, short=path == "short")
    want = oracle_forward([None if t is None else t.double() for t in inputs], lens, window)
    assert_rel_close("out", out, want, 1e-5)
    assert_rel_close("lse", lse, oracle_lse64(inputs, lens, window), 1e-6)


def test_second_forward_block_bounds_per_head(poison):
    """Several query and key blocks of the long path (BLOCK 64 x 32 in float32) with heads whose
    windows are narrower than a block, none, and wider than the sequence, and whose lengths end
    inside a block, at 0 and at Nk: each head's loop bounds come from its own mask."""
    B, H, Nq, Nk = 2, 4, 140, 150
    inputs = make_inputs(B, H, Nq, Nk, 8, 8, 3)
    lens = torch.tensor([[150, 0, 77, 33], [5, 150, 150, 100]])
    window = [0, None, 40, 1000]
    with poison():
        out, lse = _fwd2(inputs, lens, window, short=False)
    want = oracle_forward([None if t is None else t.double() for t in inputs], lens, window)
    assert_rel_close("out", out, want, 1e-5)
    assert_rel_close("lse", lse, oracle_lse64(inputs, lens, window), 1e-6)


def test_first_forward_block_bounds_per_head(poison):
    """As above for the first version's forward and backward (through the op)."""
    B, H, Nq, Nk = 1, 4, 70, 75
    inputs = make_inputs(B, H, Nq, Nk, 8, 8, 2)
    lens = torch.tensor([[75, 0, 40, 17]])
    window = [0, None, 20, 1000]
    grad = torch.randn(B, H, Nq, 8)
    with poison():
        got = run(fused, leaves(inputs), lens, window, grad)
    _check(got, oracle64(inputs, lens, window, grad), torch.float32, inputs, lens, window, grad)


# ------------------------------------------------------------------------------------------
# Routing between the kernel versions, bit-identity with the one-mask path

def _per_head_support(monkeypatch, supported: bool):
    from dtl_fast.kernels import cosine_attention_bwd as B2
    monkeypatch.setattr(B2, "SUPPORTS_PER_HEAD", supported, raising=False)
    return B2


def test_per_head_calls_stay_on_the_first_version_until_the_second_backward_has_them(monkeypatch):
    """With the second version selected for the dtype: a per-head call runs the first version's
    forward and backward while the second backward lacks SUPPORTS_PER_HEAD (forward and
    backward from one version), a one-mask call still runs the second version."""
    monkeypatch.setattr(ops, "V2_DTYPES", ops.V2_CANDIDATE_DTYPES + (torch.float32,))
    B2 = _per_head_support(monkeypatch, False)
    calls = []

    def spy(name, fn):
        def wrapped(*a, **kw):
            calls.append(name)
            return fn(*a, **kw)
        return wrapped

    for mod, name in ((K1, "cosine_attention_forward"), (K1, "cosine_attention_backward"),
                      (F2, "cosine_attention_forward2"), (B2, "cosine_attention_backward2")):
        monkeypatch.setattr(mod, name, spy(name, getattr(mod, name)))
    inputs, lens, window, grad = _case("h3_lens_and_windows_d3")
    got = run(fused, leaves(inputs), lens, window, grad)
    assert calls == ["cosine_attention_forward", "cosine_attention_backward"]
    _check(got, oracle64(inputs, lens, window, grad), torch.float32, inputs, lens, window, grad)
    calls.clear()
    run(fused, leaves(inputs), [9, 4], 2, grad)
    assert calls == ["cosine_attention_forward2", "cosine_attention_backward2"]


def test_per_head_calls_run_the_second_version_once_supported(monkeypatch, poison):
    from dtl_fast.kernels import cosine_attention_bwd as B2
    if not getattr(B2, "SUPPORTS_PER_HEAD", False):
        pytest.skip("the second backward (kernels/cosine_attention_bwd.py) has no per-head "
                    "support yet: per-head calls run the first version")
    monkeypatch.setattr(ops, "V2_DTYPES", ops.V2_CANDIDATE_DTYPES + (torch.float32,))
    for case in ("h3_lens_and_windows_d3", "h2_blocks_windows_memory"):
        inputs, lens, window, grad = _case(case)
        with poison():
            got = run(fused, leaves(inputs), lens, window, grad)
        _check(got, oracle64(inputs, lens, window, grad), torch.float32, inputs, lens, window, grad)


@pytest.mark.parametrize("version", ["v1", "v2_long", "v2_short"])
def test_per_head_path_with_equal_heads_is_bit_identical(version, monkeypatch):
    """A window tensor [w] * H (the kernels' per-head path, WINDOW == -2) and lengths [B, H]
    equal across heads (HAS_LENS == 2) give bit for bit the one-window, [B]-lengths result:
    the per-head loads change where the mask comes from, not the arithmetic."""
    B, H, Nq, Nk = 2, 3, 37, 45
    inputs = make_inputs(B, H, Nq, Nk, 16, 16, 2)
    lens_b = torch.tensor([45, 17])
    lens_bh = lens_b[:, None].expand(B, H).contiguous()
    win_h = torch.full((H,), 3)
    if version == "v1":
        grad = torch.randn(B, H, Nq, 16)
        one = run(fused, leaves(inputs), lens_b, 3, grad)
        per = run(fused, leaves(inputs), lens_bh, win_h, grad)
        for name, a, b in zip(NAMES, per, one):
            assert torch.equal(a, b), f"{name}: the per-head path differs from the one-mask path"
    else:
        short = version == "v2_short"
        one = _fwd2(inputs, lens_b, 3, short=short)
        per = _fwd2(inputs, lens_bh, win_h, short=short)
        assert torch.equal(one[0], per[0]) and torch.equal(one[1], per[1])


def test_equal_python_entries_are_the_one_window_form(monkeypatch):
    """A sequence whose entries are all equal takes the one-window specialisation (no per-head
    tensor reaches the kernels)."""
    seen = []
    orig = ops._fwd_call  # the op's entry point (the registered op or its eager bypass)

    def spy(*a):
        seen.append((a[5], a[8]))
        return orig(*a)

    monkeypatch.setattr(ops, "_fwd_call", spy)
    q, k, v, ls, _, _ = make_inputs(2, 3, 4, 5, 8, 8)
    cosine_attention(q, k, v, ls, None, [2, 2, 2], backend="fused")
    cosine_attention(q, k, v, ls, None, [None, -1, None], backend="fused")
    cosine_attention(q, k, v, ls, None, [2, None, 2], backend="fused")
    assert seen[0] == (2, None) and seen[1] == (-1, None)
    assert seen[2][0] == -2 and seen[2][1].tolist() == [2, -1, 2] and seen[2][1].dtype == torch.int32


# ------------------------------------------------------------------------------------------
# torch.library, torch.compile, autocast

def test_opcheck_per_head_forms():
    q, k, v, ls, mk, mv = make_inputs(2, 3, 5, 6, 4, 3, 2)
    scale = torch.exp(ls)
    lens = torch.tensor([[6, 2, 0], [1, 6, 3]], dtype=torch.int32)
    wins = torch.tensor([1, -1, 0], dtype=torch.int32)
    args = [t.detach().clone().requires_grad_() for t in (q, k, v, scale, mk, mv)]
    fwd, bwd = torch.ops.dtl_fast.cosine_attention_fwd, torch.ops.dtl_fast.cosine_attention_bwd
    # per-head lengths and windows; per-head lengths with one window (the interpreter makes
    # each opcheck slow: the third combination, [B] lengths with per-head windows, is the
    # same schema path as the first)
    for L, w, wh in ((lens, -2, wins), (lens, 2, None)):
        torch.library.opcheck(fwd.default, (*args[:4], L, w, *args[4:], wh))
        out, lse = fwd(q, k, v, scale, L, w, mk, mv, wh)
        torch.library.opcheck(bwd.default, (torch.randn_like(out), q, k, v, scale, L, w, mk, mv,
                                            out, lse, wh))
    with pytest.raises(ValueError, match="window == -2"):
        fwd(q, k, v, scale, lens, -2, mk, mv, None)
    with pytest.raises(ValueError, match="window == -2"):
        fwd(q, k, v, scale, lens, 1, mk, mv, wins)


@pytest.mark.parametrize("window", ["list", "tensor"])
def test_torch_compile_fullgraph_aot_eager(window):
    inputs = make_inputs(2, 3, 6, 7, 8, 8, 3)
    lens = torch.tensor([[7, 3, 0], [2, 7, 7]])
    win = [2, None, 0] if window == "list" else torch.tensor([2, -1, 0])

    def f(q, k, v, ls, mk, mv):
        return cosine_attention(q, k, v, ls, lens, win, mk, mv, backend="fused") * 2.0

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    grad = torch.randn(2, 3, 6, 8)
    a, b = leaves(inputs), leaves(inputs)
    got = [compiled(*a)]
    got += torch.autograd.grad(got[0], a, grad)
    want = [f(*b)]
    want += torch.autograd.grad(want[0], b, grad)
    for name, x, y in zip(NAMES, got, want):
        assert_rel_close(f"compiled {name}", x, y, 1e-6)
    torch._dynamo.reset()


def test_torch_compile_checks_per_head_lengths_asynchronously():
    """Inside a compiled graph the range check of [B, H] lengths is an asynchronous assert (no
    graph break, no host read): out-of-range lengths still fail."""
    q, k, v, ls, _, _ = make_inputs(2, 2, 4, 5, 8, 8)
    bad = torch.tensor([[5, 6], [0, 1]])

    def f(q, k, v, ls, lens):
        return cosine_attention_composite(q, k, v, ls, lens, [1, None])

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    compiled(q, k, v, ls, torch.tensor([[5, 4], [0, 1]]))
    with pytest.raises(RuntimeError, match="key_lengths"):
        compiled(q, k, v, ls, bad)
    torch._dynamo.reset()


def test_autocast_per_head():
    """Under autocast(bfloat16) the per-head call computes in bfloat16 like the one-mask call:
    compared per head with the one-mask op under the same autocast, bit for bit on the
    reference path."""
    inputs = make_inputs(2, 2, 6, 7, 16, 16, 2)
    lens, window = torch.tensor([[7, 2], [4, 0]]), [None, 1]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = cosine_attention(*inputs[:4], lens, window, *inputs[4:], backend="reference")
        heads = [cosine_attention(inputs[0][:, h:h + 1], inputs[1][:, h:h + 1], inputs[2][:, h:h + 1],
                                  inputs[3][h:h + 1], lens[:, h], window[h], inputs[4][h:h + 1],
                                  inputs[5][h:h + 1], backend="reference") for h in range(2)]
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, torch.cat(heads, 1))


# ------------------------------------------------------------------------------------------
# Bad input

def _bad_cases():
    q, k, v, ls, mk, mv = make_inputs(2, 3, 5, 6, 8, 8, 2)
    ok = dict(q=q, k=k, v=v, logit_scale=ls, key_lengths=None, window=None, memory_k=mk, memory_v=mv)

    def with_(**kw):
        return {**ok, **kw}

    return [
        ("window too few", with_(window=[1, 2]), r"window per head must have H = 3 entries"),
        ("window too many", with_(window=[1, 2, 3, 4]), r"H = 3 entries \(q has 3 heads\), got 4"),
        ("window entry -2", with_(window=[1, -2, 3]), "window entries must be ints >= 0 or None / -1, got -2"),
        ("window entry float", with_(window=[1, 2.5, 3]), "window entries must be ints"),
        ("window entry bool", with_(window=[1, True, 3]), "window entries must be ints"),
        ("window tensor float", with_(window=torch.tensor([1.0, 2.0, 3.0])), "window must be None, an int or an integer tensor"),
        ("window tensor shape", with_(window=torch.tensor([1, 2])), r"window per head must have shape \[H\] = \[3\]"),
        ("window tensor 2-D", with_(window=torch.tensor([[1, 2, 3]])), r"window per head must have shape \[H\]"),
        ("window tensor value", with_(window=torch.tensor([1, -3, 0])), r"every window\[h\] must be >= 0, or -1"),
        ("window string", with_(window="abc"), "window must be None or an int >= 0"),
        ("lengths bh shape", with_(key_lengths=torch.tensor([[6, 6], [1, 1]])), r"key_lengths per head must have shape \[B, H\] = \[2, 3\]"),
        ("lengths bh float", with_(key_lengths=torch.tensor([[6.0, 6.0, 6.0], [1.0, 1.0, 1.0]])), "key_lengths must be an integer tensor"),
        ("lengths bh too long", with_(key_lengths=torch.tensor([[6, 7, 6], [1, 1, 1]])), r"\[0, Nk\] = \[0, 6\]"),
        ("lengths bh negative", with_(key_lengths=torch.tensor([[6, 6, 6], [1, -1, 1]])), r"\[0, Nk\]"),
        ("lengths 3-D", with_(key_lengths=torch.zeros(2, 3, 1, dtype=torch.long)), r"key_lengths must have shape \[B\] = \[2\] or \[B, H\]"),
        ("lengths ragged", with_(key_lengths=[[6, 6, 6], [1, 1]]), "rows of lengths"),
        ("lengths nested float", with_(key_lengths=[[6, 6, 6.5], [1, 1, 1]]), "key_lengths must hold integers"),
    ]


@pytest.mark.parametrize("backend", BAD_INPUT_BACKENDS)
@pytest.mark.parametrize("what,kwargs,match", _bad_cases(), ids=[c[0] for c in _bad_cases()])
def test_bad_per_head_input_raises_value_error(what, kwargs, match, backend):
    with pytest.raises(ValueError, match=match):
        call_backend(kwargs, backend)


def test_window_forms_agree():
    """A list, a tuple, a NumPy array and tensors of any integer dtype give the same result;
    None and -1 are the same entry."""
    import numpy as np
    q, k, v, ls, _, _ = make_inputs(2, 3, 6, 7, 8, 8)
    want = reference(q, k, v, ls, None, [1, None, 0])
    for w in ([1, -1, 0], (1, None, 0), np.array([1, -1, 0]), torch.tensor([1, -1, 0], dtype=torch.int32),
              torch.tensor([1, -1, 0], dtype=torch.int16), [torch.tensor(1), None, torch.tensor(0)]):
        for backend in ("reference", "fused"):
            got = cosine_attention(q, k, v, ls, None, w, backend=backend)
            assert_rel_close(f"{backend} {type(w).__name__}", got, want, 1e-6)
    lens = [[7, 0, 3], [2, 7, 7]]
    want = reference(q, k, v, ls, torch.tensor(lens), None)
    for L in (lens, np.array(lens), torch.tensor(lens, dtype=torch.int32)):
        got = cosine_attention(q, k, v, ls, L, None, backend="reference")
        assert torch.equal(got, want), type(L).__name__


@pytest.mark.parametrize("backend", ["reference", "auto", "fused"])
def test_unsigned_window_dtypes(backend):
    """A per-head window of any unsigned dtype (tensor or NumPy array; torch has no min() for
    uint16 / uint32 / uint64) works as its int64 values; a uint64 value >= 2^63, which int64
    cannot hold, raises a ValueError naming window."""
    import numpy as np
    q, k, v, ls, _, _ = make_inputs(2, 3, 6, 7, 8, 8)
    want = cosine_attention(q, k, v, ls, None, torch.tensor([1, 0, 2]), backend=backend)
    forms = [torch.tensor([1, 0, 2], dtype=dt) for dt in (torch.uint8, torch.uint16, torch.uint32,
                                                         torch.uint64)]
    forms += [np.array([1, 0, 2], dtype=dt) for dt in (np.uint16, np.uint32, np.uint64)]
    for w in forms:
        got = cosine_attention(q, k, v, ls, None, w, backend=backend)
        assert torch.equal(got, want), f"{type(w).__name__} {w.dtype}"
    wide = cosine_attention(q, k, v, ls, None, [1, None, 2], backend=backend)
    got = cosine_attention(q, k, v, ls, None, torch.tensor([1, 2**40, 2], dtype=torch.uint64),
                           backend=backend)
    assert torch.equal(got, wide)
    for w, value in ((torch.tensor([1, 2**63 + 5, 2], dtype=torch.uint64), 2**63 + 5),
                     (np.array([1, 2**64 - 1, 2], dtype=np.uint64), 2**64 - 1)):
        with pytest.raises(ValueError, match=r"cosine_attention: every window\[h\] must fit in "
                                             rf"int64 \(below 2\^63\), got {value}$"):
            cosine_attention(q, k, v, ls, None, w, backend=backend)


# ------------------------------------------------------------------------------------------
# CUDA at real sizes (skipped without a GPU)

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_gpu_stacked_branches_match_the_per_head_oracle(dtype, poison):
    """Two branches of 8 heads stacked (no window / window 64, each with its own lengths) at
    N = 1024 through the fused kernels: output and every gradient against the per-head oracle,
    within the one-mask GPU tolerance (test_cosine_attention.gpu_tol); and the stacked call
    equals the two one-mask calls it replaces."""
    from test_cosine_attention import gpu_tol
    B, H, N, d = 4, 16, 1024, 64
    inputs = make_inputs(B, H, N, N, d, d, 8, dtype=dtype, device="cuda")
    la = torch.tensor([N, 700, 1, 0], device="cuda")
    lb = torch.tensor([N, 300, 900, 5], device="cuda")
    lens = torch.cat([la[:, None].expand(B, H // 2), lb[:, None].expand(B, H // 2)], 1)
    window = [None] * (H // 2) + [64] * (H // 2)
    grad = torch.randn(B, H, N, d, device="cuda").to(dtype)
    with poison():
        got = run(fused, leaves(inputs), lens, window, grad)
    want = oracle64(inputs, lens, window, grad)
    comp = run(cosine_attention_composite, leaves(inputs), lens, window, grad)
    for name, a, c, w in zip(NAMES, got, comp, want):
        assert_rel_close(name, a, w, gpu_tol(dtype, c, w, N, N))
    halves = [slice(0, H // 2), slice(H // 2, H)]
    q, k, v, ls, mk, mv = inputs
    for sl, L, w in zip(halves, (la, lb), (None, 64)):
        one = cosine_attention(q[:, sl], k[:, sl], v[:, sl], ls[sl], L, w, mk[sl], mv[sl], backend="fused")
        assert_rel_close(f"heads {sl}", got[0][:, sl], one, 1e-6 if dtype == torch.float32 else 1e-2)
    torch.cuda.synchronize()
