"""LSTM / GRU ops: the eager reference against torch.nn.LSTM / GRU, the fused Triton kernels
(interpreter on CPU) and the native `auto` path against the reference, every gradient,
dropout, autocast, torch.library / torch.compile integration and bad input."""
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from dtl_fast.ops import rnn as ops

from _helpers import HAS_CUDA, assert_rel_close
from _rnn_cases import (MODES, assert_all_close, assert_all_half_close, check_cuda_real_size, fn_of,
                        make_case, names, real_size_id, run)

_TORCH = tuple(int(v) for v in torch.__version__.split("+")[0].split(".")[:2])

F32_TOL = 1e-5  # float32 against the float64 reference (issue 3)


def torch_module_run(module, mode, x, hx, lengths, batch_first, **_):
    """torch.nn.LSTM / GRU with the same weights (padded input -> packed when lengths)."""
    from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence
    module.batch_first = batch_first

    def fn(x, h, ws, **kw):
        for name, w in zip(module._flat_weights_names, ws):
            setattr(module, name, None)
        module._flat_weights = list(ws)
        T = x.shape[1] if batch_first else x.shape[0]
        if lengths is None:
            return _forward(module, x, h)
        packed = pack_padded_sequence(x, torch.as_tensor(lengths), batch_first=batch_first,
                                      enforce_sorted=False)
        out, state = _forward(module, packed, h)
        out, _ = pad_packed_sequence(out, batch_first=batch_first, total_length=T)
        return out, state
    return fn


def _forward(module, x, h):
    # torch.nn.RNNBase.forward reads self._flat_weights, which fn set to the test's leaves.
    return type(module).forward(module, x, h)


# ------------------------------------------------------------------------------------------------
# Reference and native (`auto` on CPU) against torch.nn.LSTM / GRU: cheap, so broad
# ------------------------------------------------------------------------------------------------

REF_CASES = [
    # T, B, I, H, L, bi, batch_first, lengths, bias, hx
    (1, 1, 3, 5, 1, False, False, None, True, True),
    (5, 3, 4, 6, 2, True, False, [5, 1, 3], True, True),
    (4, 3, 6, 5, 3, True, True, [2, 4, 1], True, False),
    (6, 2, 3, 37, 1, False, True, [6, 6], False, True),
    (3, 2, 5, 4, 2, False, False, None, False, False),
]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("backend", ["ref", "auto"])
@pytest.mark.parametrize("case", REF_CASES, ids=lambda c: "T{}B{}I{}H{}L{}{}{}{}{}{}".format(
    *c[:5], "bi" if c[5] else "", "bf" if c[6] else "", "len" if c[7] else "", "" if c[8] else "nobias",
    "hx" if c[9] else ""))
def test_reference_and_native_match_torch(mode, backend, case):
    T, B, I, H, L, bi, bf, lengths, bias, hx = case
    module, x, h, ws = make_case(mode, T, B, I, H, L, bi, bias, hx=hx)
    if bf:
        x = x.transpose(0, 1).contiguous()
        module.batch_first = True
    kw = dict(lengths=lengths, num_layers=L, bidirectional=bi, batch_first=bf, has_bias=bias)
    got = run(fn_of(mode, backend), mode, x, h, ws, **kw)
    want = run(torch_module_run(module, mode, x, h, lengths, bf), mode, x, h, ws)
    assert_all_close(mode, h, len(ws), got, want, 1e-12)
    if lengths is not None:  # padded outputs are exactly zero
        out = got[0] if not bf else got[0].transpose(0, 1)
        for b, n in enumerate(lengths):
            assert torch.all(out[n:, b] == 0)


# ------------------------------------------------------------------------------------------------
# Fused (Triton interpreter on CPU, CUDA as `gpu`) against the reference
# ------------------------------------------------------------------------------------------------

FUSED_CASES = [
    # T, B, I, H, L, bi, batch_first, lengths, bias, hx
    (1, 1, 3, 5, 1, False, False, None, True, True),          # B=1, T=1
    (4, 3, 5, 7, 2, True, False, [4, 1, 3], True, True),      # lengths incl. 1 and T, unsorted
    (3, 2, 4, 5, 3, True, True, None, False, False),          # 3 layers, batch_first, no bias, no hx
    (5, 3, 6, 37, 1, True, True, [2, 5, 1], True, True),      # H=37 (not a power of two)
]


def _case_id(c):
    return "T{}B{}I{}H{}L{}{}{}{}{}{}".format(*c[:5], "bi" if c[5] else "", "bf" if c[6] else "",
                                            "len" if c[7] else "", "" if c[8] else "nobias",
                                            "hx" if c[9] else "")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", FUSED_CASES, ids=_case_id)
def test_fused_matches_reference_float64(mode, case, poison):
    """float64 runs in the interpreter: the kernels compute the reference's function exactly."""
    T, B, I, H, L, bi, bf, lengths, bias, hx = case
    _, x, h, ws = make_case(mode, T, B, I, H, L, bi, bias, hx=hx)
    if bf:
        x = x.transpose(0, 1).contiguous()
    kw = dict(lengths=lengths, num_layers=L, bidirectional=bi, batch_first=bf, has_bias=bias)
    with poison():
        got = run(fn_of(mode, "fused"), mode, x, h, ws, **kw)
    want = run(fn_of(mode, "ref"), mode, x, h, ws, **kw)
    assert_all_close(mode, h, len(ws), got, want, 1e-12)


@pytest.mark.parametrize("mode", MODES)
def test_fused_many_blocks_float32(mode, poison, monkeypatch):
    """Blocks of 16 at H=37: three hidden blocks and several contraction blocks per step, the
    last one partial, in both the forward and the backward kernels; lengths tensor; float32
    against the float64 reference."""
    from dtl_fast.kernels import rnn as kernels
    monkeypatch.setattr(kernels, "MAX_BLOCK", 16)
    T, B, I, H = 3, 2, 4, 37
    _, x, h, ws = make_case(mode, T, B, I, H, 1, True)
    lengths = torch.tensor([1, 3])
    kw = dict(lengths=lengths, num_layers=1, bidirectional=True)
    f32 = lambda t: t.float()  # noqa: E731
    hx32 = tuple(map(f32, h)) if mode == "LSTM" else f32(h)
    with poison():
        got = run(fn_of(mode, "fused"), mode, f32(x), hx32, [f32(w) for w in ws], **kw)
    want = run(fn_of(mode, "ref"), mode, x, h, ws, **kw)
    for a in got:
        assert a.dtype == torch.float32
    assert_all_close(mode, h, len(ws), got, want, F32_TOL)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_fused_dtypes(mode, dtype, poison):
    """float16 / bfloat16 in, the float64 reference on the same rounded values (float32:
    test_fused_many_blocks_float32; several layers: the float64 cases); the tolerance derived
    from the eager reference computing in the same dtype (measured: the fused kernels land
    1.5-2x its error in float16, 2-4x in bfloat16)."""
    T, B, I, H = 4, 3, 5, 6
    _, x, h, ws = make_case(mode, T, B, I, H, 1, True)
    kw = dict(lengths=[4, 2, 3], num_layers=1, bidirectional=True)
    cast = lambda t: t.to(dtype)  # noqa: E731
    hxd = tuple(map(cast, h)) if mode == "LSTM" else cast(h)
    with poison():
        got = run(fn_of(mode, "fused"), mode, cast(x), hxd, [cast(w) for w in ws], **kw)
    base = run(fn_of(mode, "ref"), mode, cast(x), hxd, [cast(w) for w in ws], **kw)
    up = lambda t: t.to(dtype).double()  # noqa: E731
    hx64 = tuple(map(up, h)) if mode == "LSTM" else up(h)
    want = run(fn_of(mode, "ref"), mode, up(x), hx64, [up(w) for w in ws], **kw)
    n_out = 3 if mode == "LSTM" else 2
    for a in got[:n_out]:
        assert a.dtype == dtype
    assert_all_half_close(mode, h, len(ws), got, want, base, dtype)


@pytest.mark.parametrize("mode", MODES)
def test_dropout(mode):
    """Same seed: the fused path and the reference drop the same elements (identical results);
    another seed drops others; training=False (eval) drops nothing."""
    _, x, h, ws = make_case(mode, 2, 2, 3, 4, 2, False)
    kw = dict(num_layers=2, dropout=0.5, training=True, lengths=[2, 1])
    res = {}
    for backend, seed in (("fused", 1), ("ref", 1), ("fused", 2)):
        torch.manual_seed(seed)
        res[(backend, seed)] = run(fn_of(mode, backend), mode, x, h, ws, **kw)
    assert_all_close(mode, h, len(ws), res[("fused", 1)], res[("ref", 1)], 1e-12)
    assert rel_diff(res[("fused", 1)][0], res[("fused", 2)][0]) > 1e-3
    no_drop = run(fn_of(mode, "ref"), mode, x, h, ws, **{**kw, "dropout": 0.0})
    assert rel_diff(res[("ref", 1)][0], no_drop[0]) > 1e-3
    # eval: dropout is ignored on every backend
    ev = {**kw, "training": False}
    want = run(fn_of(mode, "ref"), mode, x, h, ws, **{**ev, "dropout": 0.0})
    for backend in ("fused", "ref", "auto"):
        assert_all_close(mode, h, len(ws), run(fn_of(mode, backend), mode, x, h, ws, **ev), want, 1e-12)


def rel_diff(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_native_dropout_in_training_is_applied():
    _, x, h, ws = make_case("LSTM", 3, 2, 4, 5, 2, False)
    kw = dict(num_layers=2, dropout=0.5, training=True)
    torch.manual_seed(0)
    a = ops.lstm(x, h, ws, backend="auto", **kw)[0]
    b = ops.lstm(x, h, ws, backend="auto", **{**kw, "training": False})[0]
    assert rel_diff(a, b) > 1e-3


@pytest.mark.parametrize("mode", MODES)
def test_fused_autocast(mode):
    """Under torch.autocast the projection GEMM runs in bfloat16 and the recurrence in that
    dtype; float32 parameters get float32 gradients as close to the float64 reference as the
    eager reference computing wholly in bfloat16 is (assert_all_half_close)."""
    bf16 = torch.bfloat16
    _, x, h, ws = make_case(mode, 3, 2, 4, 6, 1, True)
    f32 = lambda t: t.float()  # noqa: E731
    hx32 = tuple(map(f32, h)) if mode == "LSTM" else f32(h)
    with torch.autocast("cpu", dtype=bf16):
        got = run(fn_of(mode, "fused"), mode, f32(x), hx32, [f32(w) for w in ws], bidirectional=True)
    assert got[0].dtype == bf16
    assert all(g.dtype == torch.float32 for g in got[(3 if mode == "LSTM" else 2):])
    want = run(fn_of(mode, "ref"), mode, x, h, ws, bidirectional=True)
    cast = lambda t: t.to(bf16)  # noqa: E731
    base = run(fn_of(mode, "ref"), mode, cast(x), tuple(map(cast, h)) if mode == "LSTM" else cast(h),
               [cast(w) for w in ws], bidirectional=True)
    assert_all_half_close(mode, h, len(ws), got, want, base, bf16)


@pytest.mark.parametrize("mode", MODES)
def test_reference_autocast(mode):
    """Under torch.autocast the reference rounds input, hx and weights to the autocast dtype and
    returns its results in it, as the fused path does (test_fused_autocast): exactly the
    reference on bfloat16 copies, with float32 gradients for the float32 leaves (it once ignored
    autocast and returned float32). torch.nn's CPU LSTM on padded input agrees on the dtype."""
    bf16 = torch.bfloat16
    module, x, h, ws = make_case(mode, 3, 2, 4, 6, 2, True, dtype=torch.float32)
    kw = dict(num_layers=2, bidirectional=True, lengths=[3, 2])

    def forward_under_autocast(*args, **kwargs):
        # Only the forward: a backward under autocast would cast the backward GEMMs as well.
        with torch.autocast("cpu", dtype=bf16):
            return fn_of(mode, "ref")(*args, **kwargs)
    got = run(forward_under_autocast, mode, x, h, ws, **kw)
    cast = lambda t: t.to(bf16)  # noqa: E731
    base = run(fn_of(mode, "ref"), mode, cast(x), tuple(map(cast, h)) if mode == "LSTM" else cast(h),
               [cast(w) for w in ws], **kw)
    n_out = 3 if mode == "LSTM" else 2
    for name, a, b in zip(names(mode, h, len(ws)), got, base):
        assert a.dtype == (bf16 if name in ("output", "h_n", "c_n") else torch.float32), name
        assert torch.equal(a, b.to(a.dtype)), name
    if mode == "LSTM":  # PyTorch's CPU kernels apply autocast to the LSTM only (ops.lstm docstring)
        with torch.autocast("cpu", dtype=bf16):
            want = module.float()(x, h)
        assert [t.dtype for t in got[:n_out]] == [want[0].dtype, *(t.dtype for t in want[1])]


# ------------------------------------------------------------------------------------------------
# lengths=: padded steps are not read, in the backward too; the empty batch
# ------------------------------------------------------------------------------------------------

PAD_CASES = [
    # T, B, I, H, L, bi, batch_first, lengths, hx
    (4, 3, 3, 4, 1, True, False, [2, 4, 1], True),
    (4, 3, 3, 4, 2, True, True, [3, 1, 4], False),
]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("backend", ["ref", "fused", "auto"])
@pytest.mark.parametrize("case", PAD_CASES, ids=lambda c: "L{}{}".format(c[4], "bf" if c[6] else ""))
def test_nonfinite_padding_is_not_read(mode, backend, case, poison):
    """NaN, +inf and -inf in the padded steps (t >= lengths[b]) give exactly the outputs and the
    gradients (input, hx, every weight) of zero padding, and exactly zero input gradient there,
    as torch.nn's PackedSequence path does. They once gave NaN weight gradients: the fused
    path's projection GEMM covers all T steps (dW_ih = dgates^T x sees 0 * NaN), and the
    reference's torch.where on the state still sent 0 * NaN back through x_t @ W_ih into W_hh
    and the valid steps' x.grad."""
    T, B, I, H, L, bi, bf, lengths, hx = case
    _, x, h, ws = make_case(mode, T, B, I, H, L, bi, hx=hx)
    pad = (torch.arange(T)[:, None] >= torch.tensor(lengths)[None, :])[..., None]  # [T, B, 1]
    non_finite = torch.tensor([float("nan"), float("inf"), float("-inf")], dtype=x.dtype)
    junk = non_finite[torch.arange(x.numel()) % 3].view(x.shape)  # every kind at each padded step
    x_zero, x_junk = x.masked_fill(pad, 0.0), torch.where(pad, junk, x)
    if bf:
        x_zero, x_junk = x_zero.transpose(0, 1), x_junk.transpose(0, 1)
    kw = dict(lengths=lengths, num_layers=L, bidirectional=bi, batch_first=bf)
    with poison():
        got = run(fn_of(mode, backend), mode, x_junk, h, ws, **kw)
        want = run(fn_of(mode, backend), mode, x_zero, h, ws, **kw)
    for name, a, b in zip(names(mode, h, len(ws)), got, want, strict=True):
        assert a is not None and torch.isfinite(a).all(), f"{name}: not finite"
        assert torch.equal(a, b), f"{name}: differs from zero padding by {(a - b).abs().max():.3g}"
    dx = got[3 if mode == "LSTM" else 2]
    dx = dx.transpose(0, 1) if bf else dx
    assert torch.equal(dx[pad.expand_as(dx)], torch.zeros(int(pad.sum()) * I, dtype=dx.dtype))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("backend", ["ref", "fused", "auto"])
@pytest.mark.parametrize("bf", [False, True], ids=["", "bf"])
def test_empty_batch_with_lengths(mode, backend, bf):
    """B = 0 with lengths=[] (a list or an empty tensor) gives what torch.nn gives for an empty
    batch: output [T, 0, D*H], h_n (c_n) [L*D, 0, H] in the input's dtype, zero weight
    gradients. `auto` once raised "Cannot pack empty tensors" (pack_padded_sequence)."""
    T, I, H, L = 3, 4, 5, 2
    module, x, _, ws = make_case(mode, T, 0, I, H, L, True, hx=False)
    if bf:
        x = x.transpose(0, 1)
    want = run(torch_module_run(module, mode, x, None, None, bf), mode, x, None, ws)
    kw = dict(num_layers=L, bidirectional=True, batch_first=bf)
    for lengths in ([], torch.zeros(0, dtype=torch.int64)):
        got = run(fn_of(mode, backend), mode, x, None, ws, lengths=lengths, **kw)
        for name, a, b in zip(names(mode, None, len(ws)), got, want, strict=True):
            assert a is not None, f"{name}: missing gradient"
            assert (a.shape, a.dtype) == (b.shape, b.dtype), name
            assert torch.equal(a, b), name


# ------------------------------------------------------------------------------------------------
# torch.library / torch.compile
# ------------------------------------------------------------------------------------------------

def _op_samples(requires_grad):
    T, B, D, H = 2, 2, 2, 3
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g).requires_grad_(requires_grad)  # noqa: E731
    lengths = torch.tensor([2, 1])
    yield "lstm_recurrence", (r(T, B, D, 4 * H), r(D, 4 * H, H), r(D, B, H), r(D, B, H), lengths)
    yield "gru_recurrence", (r(T, B, D, 3 * H), r(D, 3 * H, H), r(D, H), r(D, B, H), lengths)
    act, out = torch.rand(T, B, D, 4 * H, generator=g), torch.randn(T, B, D * H, generator=g)
    yield "lstm_recurrence_backward", (r(T, B, D * H), r(D, B, H), r(D, B, H), r(D, 4 * H, H),
                                       r(D, B, H), act, torch.randn(T, B, D, H, generator=g), lengths)
    yield "gru_recurrence_backward", (r(T, B, D * H), r(D, B, H), r(D, 3 * H, H), r(D, B, H), out,
                                      act, lengths)


@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck(requires_grad):
    """The forward ops with inputs that require grad (opcheck's autograd-registration check
    too), the backward ops without (they have no autograd formula: no double backward)."""
    seen = set()
    for name, args in _op_samples(requires_grad):
        if requires_grad == name.endswith("_backward"):
            continue
        torch.library.opcheck(getattr(torch.ops.dtl_fast, name).default, args)
        seen.add(name)
    assert len(seen) == 2


@pytest.mark.parametrize("mode", MODES)
def test_torch_compile_fullgraph(mode):
    _, x, h, ws = make_case(mode, 3, 2, 4, 5, 2, True, dtype=torch.float32)
    f = {"LSTM": ops.lstm, "GRU": ops.gru}[mode]

    def model(x, h, ws):
        out, state = f(x, h, ws, num_layers=2, bidirectional=True, backend="fused")
        s = state[0] if mode == "LSTM" else state
        return out.sum() + s.square().sum()

    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    ws_c = [w.clone().requires_grad_() for w in ws]
    ws_e = [w.clone().requires_grad_() for w in ws]
    x_c, x_e = x.clone().requires_grad_(), x.clone().requires_grad_()
    lc, le = compiled(x_c, h, ws_c), model(x_e, h, ws_e)
    lc.backward()
    le.backward()
    assert_rel_close("loss", lc, le, 1e-6)
    assert_rel_close("grad input", x_c.grad, x_e.grad, 1e-6)
    for i, (a, b) in enumerate(zip(ws_c, ws_e)):
        assert_rel_close(f"grad weights[{i}]", a.grad, b.grad, 1e-6)


def _auto_with_lengths(mode, backend="auto"):
    f = {"LSTM": ops.lstm, "GRU": ops.gru}[mode]

    def model(x, lengths, ws):
        out, state = f(x, None, ws, lengths=lengths, num_layers=2, bidirectional=True,
                       backend=backend)
        return out, (state[0] if mode == "LSTM" else state)
    return model


def _count_native(monkeypatch):
    """A list that gets one entry (whether lengths were given) per call of PyTorch's path."""
    calls = []
    real = ops._native

    def spy(*args):
        calls.append(args[4] is not None)
        return real(*args)
    monkeypatch.setattr(ops, "_native", spy)
    return calls


def _results(fn, x, lengths, ws):
    """output, h_n and the gradients of x and every weight, on fresh leaves."""
    xl = x.clone().requires_grad_()
    wl = [w.clone().requires_grad_() for w in ws]
    out, h_n = fn(xl, lengths, wl)
    (out.square().sum() + h_n.sum()).backward()
    return [out, h_n, xl.grad, *(w.grad for w in wl)]


def _compiled_equals_eager_with_one_break(model, x, lengths, ws, want, reason_part):
    """torch.compile(model) (aot_eager) gives `want` bitwise (outputs and gradients, see
    _results), with its graph break in ops/rnn.py, whose reason holds `reason_part`."""
    torch._dynamo.reset()
    got = _results(torch.compile(model, backend="aot_eager"), x, lengths, ws)
    for i, (a, b) in enumerate(zip(got, want)):
        assert torch.equal(a, b), f"result {i}"
    ex = torch._dynamo.explain(model)(x, lengths, ws)
    # one break; explain lists it once per frame dynamo compiled around it
    assert ex.break_reasons, "no graph break"
    for r in ex.break_reasons:
        assert reason_part in r.reason, r.reason[:300]
        assert r.user_stack[-1].filename.replace("\\", "/").endswith("/dtl_fast/ops/rnn.py")
    torch._dynamo.reset()


@pytest.mark.parametrize("mode", MODES)
def test_compiled_auto_with_lengths_runs_pytorchs_packed_path(mode, monkeypatch):
    # backend="auto" with lengths under torch.compile once ran the fused loop on CUDA at every
    # shape (0.02-0.51x cuDNN) and the unrolled eager loop on the CPU (review s28, A2). Now it
    # runs the call eager auto makes, PyTorch's packed path, outside the graph: one graph
    # break, what torch.nn.LSTM gets, and the same numbers as eager auto, gradients included.
    _, x, _, ws = make_case(mode, 4, 3, 3, 5, 2, True, dtype=torch.float32)
    rnn = _auto_with_lengths(mode)

    def model(x, lengths, ws):  # graph pieces on both sides of the break
        out, h_n = rnn(x * 2, lengths, ws)
        return out.tanh(), h_n
    lengths = torch.tensor([4, 1, 3])
    want = _results(model, x, lengths, ws)
    calls = _count_native(monkeypatch)
    torch._dynamo.reset()
    _compiled_equals_eager_with_one_break(model, x, lengths, ws, want, "backend='fused'")
    assert calls == [True, True]  # PyTorch's packed path, in the compiled call and explain's


@pytest.mark.parametrize("mode", MODES)
def test_compiled_auto_with_lengths_breaks_the_graph_whatever_is_exporting_says(mode, monkeypatch):
    # torch 2.11's dynamo (the GPU machines' torch) folds torch.compiler.is_exporting() to True
    # under a plain torch.compile too, and the test above then took the traceable path there
    # (the fused loop on CUDA). A stand-in for the function says what 2.11's folding says:
    # True while dynamo traces (it inlines the stand-in and folds is_compiling), False when
    # torch.compile's own wrapper asks before tracing. The graph break must not depend on it.
    monkeypatch.setattr(torch.compiler, "is_exporting", lambda: torch.compiler.is_compiling())
    _, x, _, ws = make_case(mode, 4, 3, 3, 5, 2, True, dtype=torch.float32)
    calls = _count_native(monkeypatch)
    torch._dynamo.reset()
    torch.compile(_auto_with_lengths(mode), backend="aot_eager")(x, torch.tensor([4, 1, 3]), ws)
    assert calls == [True]
    torch._dynamo.reset()


@pytest.mark.parametrize("mode", MODES)
def test_compiled_auto_with_lengths_fullgraph_names_the_way_out(mode):
    # fullgraph=True cannot hold PyTorch's packed path: dynamo's error carries the reason,
    # which names the backends that keep one graph
    _, x, _, ws = make_case(mode, 4, 3, 3, 5, 2, True, dtype=torch.float32)
    torch._dynamo.reset()
    compiled = torch.compile(_auto_with_lengths(mode), fullgraph=True, backend="aot_eager")
    with pytest.raises(torch._dynamo.exc.Unsupported,
                       match=r"(?s)disable.*backend='fused'.*backend='reference'"):
        compiled(x, torch.tensor([4, 1, 3]), ws)
    torch._dynamo.reset()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("backend", ["reference", "fused"])
def test_fused_and_reference_with_lengths_compile_fullgraph(mode, backend):
    # the two ways out the error names: one graph each, the numbers of eager auto
    _, x, _, ws = make_case(mode, 4, 3, 3, 5, 2, True, dtype=torch.float32)
    lengths = torch.tensor([4, 1, 3])
    want = _results(_auto_with_lengths(mode), x, lengths, ws)
    torch._dynamo.reset()
    compiled = torch.compile(_auto_with_lengths(mode, backend), fullgraph=True, backend="aot_eager")
    got = _results(compiled, x, lengths, ws)
    for i, (a, b) in enumerate(zip(got, want)):
        assert_rel_close(f"result {i}", a, b, F32_TOL)
    torch._dynamo.reset()


def test_compiled_auto_rule_from_shapes_agrees_with_auto_path(monkeypatch):
    # Under torch.compile the decision to leave the graph is made from the shapes alone, before
    # the checks (_compiled_auto_is_native): it must read B, T, H, I and the flags as the eager
    # dispatch does, or the H200's fused region would leave the graph (or cuDNN's calls stay in
    # it). Fake CUDA tensors; the card and Triton monkeypatched to the region's.
    from torch._subclasses.fake_tensor import FakeTensorMode

    monkeypatch.setattr(ops, "_card", lambda device: "NVIDIA H200")
    monkeypatch.setattr(ops, "fused_can_run", lambda device: True)
    seen = set()
    with FakeTensorMode(allow_non_fake_inputs=True):
        for mode, T, B, H, bi, batch_first, dtype, hx, dropout, training in [
                ("LSTM", 16, 64, 256, True, False, torch.bfloat16, False, 0.0, False),  # region
                ("LSTM", 16, 64, 256, True, True, torch.bfloat16, False, 0.0, False),
                ("LSTM", 16, 64, 256, True, False, torch.float16, False, 0.0, False),
                ("LSTM", 16, 32, 256, True, False, torch.bfloat16, False, 0.0, False),
                ("LSTM", 16, 64, 256, True, False, torch.bfloat16, True, 0.0, False),
                ("LSTM", 16, 64, 256, True, False, torch.bfloat16, False, 0.5, True),
                ("LSTM", 16, 64, 256, True, False, torch.bfloat16, False, 0.5, False),
                ("GRU", 16, 64, 256, True, False, torch.bfloat16, False, 0.0, False)]:
            G = 4 if mode == "LSTM" else 3
            ws = [torch.empty(G * H, H, device="cuda", dtype=dtype),
                  torch.empty(G * H, H, device="cuda", dtype=dtype),
                  torch.empty(G * H, device="cuda", dtype=dtype),
                  torch.empty(G * H, device="cuda", dtype=dtype)] * (2 if bi else 1)
            x = torch.empty((B, T, H) if batch_first else (T, B, H), device="cuda", dtype=dtype)
            h0 = torch.empty(2 if bi else 1, B, H, device="cuda", dtype=dtype) if hx else None
            want = ops.auto_path(mode, dtype, B, H, T, 2 if bi else 1, None, x.device,
                                 num_layers=1, input_size=H, hx=hx,
                                 dropout=dropout if training else 0.0, batch_first=batch_first,
                                 bias=True) == "native"
            got = ops._compiled_auto_is_native(mode, x, h0, ws, 1, bi, batch_first, dropout,
                                              training, True)
            assert got == want, (mode, T, B, batch_first, dtype, hx, dropout, training)
            seen.add(got)
    assert seen == {True, False}  # the region stays in the graph, the rest leaves it
    # off CUDA and for malformed calls: PyTorch's path, whose eager checks then speak
    assert ops._compiled_auto_is_native("LSTM", torch.randn(3, 2, 4), None, [], 1, True, False,
                                        0.0, False, True)
    assert ops._compiled_auto_is_native("LSTM", "not a tensor", None, [], 1, True, False, 0.0,
                                        False, True)


def _auto_padded(mode):
    f = {"LSTM": ops.lstm, "GRU": ops.gru}[mode]

    def rnn(x, ws):
        out, state = f(x, None, ws, num_layers=2, bidirectional=True, backend="auto")
        return out, (state[0] if mode == "LSTM" else state)

    def model(x, _lengths, ws):  # graph pieces on both sides of the call; _results' signature
        out, h_n = rnn(x * 2, ws)
        return out.tanh(), h_n
    return model


@pytest.mark.parametrize("mode", MODES)
def test_compiled_auto_op_without_lengths_runs_pytorchs_kernel_outside_the_graph(mode):
    # Traced, torch.lstm / gru decompose into a cell loop unrolled over T (never cuDNN):
    # compiled auto measured 0.40x compiled torch.nn (s30), and torch 2.11 cannot run that trace
    # with weights that need a gradient. So the op leaves the graph, as torch.nn.LSTM does:
    # eager auto's numbers (bitwise), one break in ops/rnn.py with the reason; torch.export
    # still traces. Inside a compiled torch.func.grad it stays in the graph (a break there
    # failed inside dynamo, review s30), with eager grad's gradients.
    _, x, _, ws = make_case(mode, 4, 3, 3, 5, 2, True, dtype=torch.float32)
    model = _auto_padded(mode)
    want = _results(model, x, None, ws)
    _compiled_equals_eager_with_one_break(model, x, None, ws, want, "unrolled over T")
    with pytest.raises(torch._dynamo.exc.Unsupported,
                       match=r"(?s)disable.*backend='fused'.*backend='reference'"):
        torch.compile(model, fullgraph=True, backend="aot_eager")(x, None, ws)
    torch._dynamo.reset()

    def loss(x):
        out, h_n = model(x, None, ws)
        return out.square().sum() + h_n.sum()

    if mode == "GRU" or _TORCH >= (2, 12):  # torch 2.11's traced LSTM fails under AOTAutograd
        assert_rel_close("compiled torch.func.grad", torch.compile(
            torch.func.grad(loss), backend="aot_eager")(x), torch.func.grad(loss)(x), F32_TOL)
        torch._dynamo.reset()

    class M(torch.nn.Module):
        def forward(self, x):
            return model(x, None, ws)

    ep = torch.export.export(M(), (x,))
    for name, a, b in zip(("output", "h_n"), ep.module()(x), model(x, None, ws)):
        assert_rel_close(name, a, b, F32_TOL)


@pytest.mark.parametrize("mode", MODES)
def test_auto_with_lengths_exports(mode, monkeypatch):
    # torch.export cannot take the packed path either (nor a graph break): the traceable path
    # (the eager reference on the CPU, the fused loop on CUDA), for any lengths
    _, x, _, ws = make_case(mode, 4, 3, 3, 5, 2, True, dtype=torch.float32)
    model = _auto_with_lengths(mode)

    class M(torch.nn.Module):
        def forward(self, x, lengths):
            return model(x, lengths, ws)

    lengths = torch.tensor([4, 1, 3])
    calls = _count_native(monkeypatch)
    ep = torch.export.export(M(), (x, lengths))
    assert calls == []
    monkeypatch.undo()
    for lens in (lengths, torch.tensor([2, 4, 4])):
        for name, a, b in zip(("output", "h_n"), ep.module()(x, lens), model(x, lens, ws)):
            assert_rel_close(name, a, b, F32_TOL)


@pytest.mark.parametrize("mode", MODES)
def test_lengths_on_the_host_during_a_capture_are_refused(mode, monkeypatch):
    # A host-to-device copy of lengths inside a captured graph would replay reading that host
    # block, whatever it holds by then: the fused path (which auto also takes during a capture)
    # refuses host lengths there, naming the way out. Captures are CUDA-only: x is a fake CUDA
    # tensor and the capture query is monkeypatched.
    from torch._subclasses.fake_tensor import FakeTensorMode

    monkeypatch.setattr(ops, "device_capturing", lambda t: True)
    lens = torch.tensor([4, 1, 3])
    with FakeTensorMode(allow_non_fake_inputs=True):
        x = torch.empty(4, 3, 5, device="cuda")
        with pytest.raises(ValueError, match=mode + r": lengths must be on cuda.* during a CUDA "
                                                   r"graph capture .*got them on cpu"):
            ops._refuse_host_lengths_in_capture(mode, lens, x)
        ops._refuse_host_lengths_in_capture(mode, torch.empty(3, device="cuda"), x)  # fine
    monkeypatch.setattr(ops, "device_capturing", lambda t: False)  # not capturing: fine
    with FakeTensorMode(allow_non_fake_inputs=True):
        ops._refuse_host_lengths_in_capture(mode, lens, torch.empty(4, 3, 5, device="cuda"))
    # the fused path asks it for every call with lengths
    if ops.can_run_triton("cpu"):
        seen = []
        monkeypatch.setattr(ops, "_refuse_host_lengths_in_capture",
                            lambda m, lengths, x: seen.append((m, lengths.tolist())))
        _, x, h, ws = make_case(mode, 4, 3, 3, 5, 1, True, dtype=torch.float32)
        f = {"LSTM": ops.lstm, "GRU": ops.gru}[mode]
        f(x, h, ws, lengths=lens, bidirectional=True, backend="fused")
        assert seen == [(mode, [4, 1, 3])]


@pytest.mark.parametrize("mode", MODES)
def test_auto_with_lengths_during_a_capture_takes_the_traceable_path(mode, monkeypatch):
    # A CUDA graph capture cannot read lengths on the host (the packed path does): the
    # traceable path (here, on CPU tensors, the reference). Captures are CUDA-only, so the
    # check is monkeypatched.
    _, x, h, ws = make_case(mode, 4, 3, 3, 5, 2, True, dtype=torch.float32)
    f = {"LSTM": ops.lstm, "GRU": ops.gru}[mode]
    kw = dict(lengths=torch.tensor([4, 1, 3]), num_layers=2, bidirectional=True)
    want = f(x, h, ws, backend="reference", **kw)
    calls = _count_native(monkeypatch)
    monkeypatch.setattr(ops, "device_capturing", lambda t: True)
    got = f(x, h, ws, backend="auto", **kw)
    assert calls == []
    assert torch.equal(got[0], want[0])


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("backend", ["reference", "auto", "fused"])
def test_lengths_written_in_place_before_backward(mode, backend):
    # The fused ops once saved the caller's own int64 lengths tensor for the backward, so an
    # in-place write to it between forward and backward raised a version-counter error that
    # auto and reference do not raise (review s27, F5). The gradients are those of the lengths
    # the forward saw.
    f = {"LSTM": ops.lstm, "GRU": ops.gru}[mode]
    _, x, h, ws = make_case(mode, 4, 2, 3, 5, 1, True)

    def grads(lengths, write=False):
        xl = x.clone().requires_grad_()
        wl = [w.detach().clone().requires_grad_() for w in ws]
        out, _ = f(xl, h, wl, lengths=lengths, bidirectional=True, backend=backend)
        if write:
            lengths.fill_(1)
        return (out, *torch.autograd.grad(out.square().sum(), [xl, *wl]))

    want = grads(torch.tensor([4, 2]))
    lengths = torch.tensor([4, 2])
    got = grads(lengths, write=True)
    assert lengths.tolist() == [1, 1]
    for a, b in zip(got, want):
        assert torch.equal(a, b)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("lengths", [
    None, [5, 2, 3], torch.tensor([5, 2, 3], device="meta"),
    torch.tensor([5, 2, 3], dtype=torch.int32, device="meta")],
    ids=["", "lengths", "meta-lengths", "meta-int32-lengths"])
def test_meta_tensors(mode, lengths):
    # torch.is_autocast_enabled("meta") raises "unknown device type for autocast", which every
    # backend once hit first (review s27, F9): reference and auto give meta results of the
    # right shapes, fused says that its kernels do not take meta tensors. Meta lengths hold no
    # values: the range check skips them (it read them and raised "Cannot copy out of meta
    # tensor" in every backend, s28)
    f = {"LSTM": ops.lstm, "GRU": ops.gru}[mode]
    _, x, h, ws = make_case(mode, 5, 3, 4, 6, 2, True, dtype=torch.float32)
    meta = lambda t: t.to("meta")  # noqa: E731
    hm = tuple(map(meta, h)) if mode == "LSTM" else meta(h)
    kw = dict(lengths=lengths, num_layers=2, bidirectional=True)
    for backend in ("reference", "auto"):
        out, state = f(meta(x), hm, [meta(w) for w in ws], backend=backend, **kw)
        states = state if mode == "LSTM" else (state,)
        assert out.device.type == "meta" and out.shape == (5, 3, 12), backend
        assert all(s.device.type == "meta" and s.shape == (4, 3, 6) for s in states), backend
    with pytest.raises(RuntimeError, match="do not support meta tensors"):
        f(meta(x), hm, [meta(w) for w in ws], backend="fused", **kw)


def test_auto_lstm_under_cpu_float16_autocast_names_the_alternatives():
    # PyTorch's CPU LSTM (oneDNN) has no float16 kernel and said only "could not create a
    # primitive descriptor" (review s27, F10)
    _, x, h, ws = make_case("LSTM", 3, 2, 4, 6, 1, True, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.float16):
        with pytest.raises(RuntimeError, match=r"float16.*backend='reference'.*bfloat16 autocast"):
            ops.lstm(x, h, ws, bidirectional=True, backend="auto")
        # only there: the reference, the packed path (lengths) and the GRU run
        assert ops.lstm(x, h, ws, bidirectional=True, backend="reference")[0].dtype == torch.float16
        ops.lstm(x, h, ws, bidirectional=True, lengths=[3, 2], backend="auto")
        _, xg, hg, wg = make_case("GRU", 3, 2, 4, 6, 1, True, dtype=torch.float32)
        ops.gru(xg, hg, wg, bidirectional=True, backend="auto")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert ops.lstm(x, h, ws, bidirectional=True, backend="auto")[0].dtype == torch.bfloat16


# ------------------------------------------------------------------------------------------------
# Bad input: every backend rejects it the same way
# ------------------------------------------------------------------------------------------------

BACKENDS = ["reference", "auto", "fused"]


def _two_layer_case(mode, backend):
    """(op, x [3, 2, 8], hx, weights of a 2-layer H 20 RNN, the op's keywords) for the bad-input
    tests."""
    _, x, h, ws = make_case(mode, 3, 2, 8, 20, 2, False, dtype=torch.float32)
    return {"LSTM": ops.lstm, "GRU": ops.gru}[mode], x, h, ws, dict(num_layers=2, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", MODES)
def test_bad_input(mode, backend):
    f, x, h, ws, kw = _two_layer_case(mode, backend)
    with pytest.raises(RuntimeError, match=r"input.size\(-1\) must be equal to input_size. Expected 8, got 7"):
        f(x[..., :7], h, ws, **kw)
    bad_h = torch.zeros(2, 3, 20)
    with pytest.raises(RuntimeError, match=r"Expected hidden(\[0\])? size \(2, 2, 20\), got \[2, 3, 20\]"):
        f(x, (bad_h, h[1]) if mode == "LSTM" else bad_h, ws, **kw)
    for lengths in ([0, 3], [3, 4], torch.tensor([-1, 2])):
        with pytest.raises(RuntimeError, match=r"lengths\[b\] must lie in \[1, T\]"):
            f(x, h, ws, lengths=lengths, **kw)
    with pytest.raises(ValueError, match=r"lengths must have shape \[B\] = \[2\]"):
        f(x, h, ws, lengths=[3, 3, 3], **kw)
    with pytest.raises(ValueError, match=r"lengths must be an integer tensor"):
        f(x, h, ws, lengths=torch.tensor([3.0, 2.0]), **kw)
    with pytest.raises(ValueError, match=r"weights must hold 8 tensors"):
        f(x, h, ws[:-1], **kw)
    with pytest.raises(ValueError, match=r"weights\[2\] \(bias_ih_l0\) must have shape"):
        f(x, h, ws[:2] + [ws[2][:5]] + ws[3:], **kw)
    with pytest.raises(ValueError, match=r"Expected input to be 3D"):
        f(x[0], h, ws, **kw)
    with pytest.raises(ValueError, match=r"weights\[0\] has dtype torch.float64"):
        f(x, h, [ws[0].double()] + ws[1:], **kw)
    with pytest.raises(ValueError, match="backend must be one of"):
        f(x, h, ws, num_layers=2, backend="cuda")
    # An empty sequence: torch.nn.LSTM's RuntimeError, before anything runs (not in backward).
    with pytest.raises(RuntimeError, match="Expected sequence length to be larger than 0"):
        f(x[:0], h, ws, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", MODES)
def test_weight_shapes_of_layer_0_named_in_every_backend(mode, backend):
    # weight_ih_l0_reverse was checked against its own width: any width passed, and PyTorch's
    # CPU kernel (auto) then read past its end (NaN in the reverse half), the reference and
    # fused failed in a matmul (review s31). A weight_hh_l0 with the wrong rows blamed the
    # correct weight_ih_l0.
    _, x, h, ws = make_case(mode, 3, 2, 8, 20, 1, True, dtype=torch.float32)
    f = {"LSTM": ops.lstm, "GRU": ops.gru}[mode]
    kw = dict(bidirectional=True, backend=backend)
    G = 4 if mode == "LSTM" else 3
    for cols in (1, 9):
        bad = list(ws)
        bad[4] = torch.randn(G * 20, cols)
        with pytest.raises(ValueError, match=rf"^{mode}: weights\[4\] \(weight_ih_l0_reverse\) "
                           rf"must have shape \({G * 20}, 8\), got \({G * 20}, {cols}\)"):
            f(x, h, bad, **kw)
    # a wrong weight_ih_l0 with a right reverse one: torch's words for it, not the reverse
    # weight checked against it
    bad = list(ws)
    bad[0] = torch.randn(G * 20, 9)
    with pytest.raises(RuntimeError, match=r"input.size\(-1\) must be equal to input_size. "
                       r"Expected 9, got 8"):
        f(x, h, bad, **kw)
    bad = list(ws)
    bad[1] = torch.randn((G - 1) * 20, 21)
    with pytest.raises(ValueError, match=rf"^{mode}: weights\[1\] \(weight_hh_l0\) must have "
                       rf"shape \({G * 21}, 21\)"):
        f(x, h, bad, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", MODES)
def test_flags_must_be_bools(mode, backend):
    # batch_first="False" is truthy: the reference and fused took it as True (a silently wrong
    # answer), auto failed in torch.lstm with a TypeError naming no argument (review s31). A
    # NumPy bool is a bool: the same result as the Python one.
    f, x, h, ws, kw = _two_layer_case(mode, backend)
    want = f(x, h, ws, **kw)
    for flag in ("batch_first", "bidirectional", "has_bias", "training"):
        for value in ("False", 0, 1.0, None, torch.tensor(False)):
            with pytest.raises(ValueError, match=rf"^{mode}: {flag} must be a bool, got "):
                f(x, h, ws, **{flag: value}, **kw)
    got = f(x, h, ws, batch_first=np.False_, bidirectional=np.bool_(False), has_bias=np.True_,
            training=np.False_, **kw)
    for a, b in zip(torch.utils._pytree.tree_leaves(got), torch.utils._pytree.tree_leaves(want)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", MODES)
def test_checks_remembered_for_a_call_still_see_a_weight_changed_in_place(mode, backend):
    # check_rnn_args remembers the calls that passed (the per-weight loops cost ~8 us of a
    # ~100 us small CPU call, where auto must not be slower than torch.nn): the same weight
    # objects, changed in place, must get the message of a first call
    f, x, h, ws, kw = _two_layer_case(mode, backend)
    f(x, h, ws, **kw)
    f(x, h, ws, **kw)  # remembered
    ws[6].data = ws[6].data[:5].clone()  # bias_ih_l1 with the wrong shape
    with pytest.raises(ValueError, match=r"weights\[6\] \(bias_ih_l1\) must have shape"):
        f(x, h, ws, **kw)
    ws[6].data = torch.zeros(ws[7].shape)
    f(x, h, ws, **kw)
    with torch.no_grad():
        ws[1].resize_(ws[1].shape[0], 7)  # weight_hh_l0 [G*H, 7]: H read as 7
    with pytest.raises(ValueError, match=r"weights\[0\] \(weight_ih_l0\) must have shape \(\d+, 8\)"
                       r"|weights\[1\] \(weight_hh_l0\) must have shape"):
        f(x, h, ws, **kw)
    # (a tensor's dtype and device cannot change in place: `.data =` refuses another type)
    # a remembered call is keyed on the arguments' types too: a bool num_layers is refused
    with pytest.raises(ValueError, match=r"num_layers must be an integer >= 1, got True"):
        f(x, h, ws[:4], num_layers=True, backend=backend)


def test_remembered_checks_are_bounded():
    from dtl_fast.reference import rnn as ref_rnn
    _, x, h, ws = make_case("GRU", 3, 2, 8, 20, 1, False, dtype=torch.float32)
    for i in range(ref_rnn._PASSED_MAX + 5):
        ops.gru(x[..., :1], None, [ws[0][:, :1]] + ws[1:], backend="auto", dropout=i / 10**6)
    assert 0 < len(ref_rnn._PASSED) <= ref_rnn._PASSED_MAX


def test_fused_on_cpu_without_interpreter_raises():
    code = ("import torch\nfrom dtl_fast.ops.rnn import lstm\n"
            "m = torch.nn.LSTM(3, 4)\n"
            "try:\n"
            "    lstm(torch.randn(2, 1, 3), None, m._flat_weights, backend='fused')\n"
            "except RuntimeError as e:\n"
            "    print('RAISED', e)\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "RAISED lstm(backend='fused') on cpu tensors" in proc.stdout and "TRITON_INTERPRET=1" in proc.stdout


def test_triton_interpret_set_after_import_is_refused_by_name():
    # Importing dtl_fast imports Triton, whose own library functions are compiled or
    # interpreted from then on: a TRITON_INTERPRET=1 set later passed the check and then failed
    # inside Triton ("Cannot call @triton.jit'd outside of the scope of a kernel", review s27, F8)
    code = ("import os, torch\nimport dtl_fast\nfrom dtl_fast.ops.rnn import lstm\n"
            "from dtl_fast._triton import can_run_triton\n"
            "os.environ['TRITON_INTERPRET'] = '1'\n"
            "m = torch.nn.LSTM(3, 4)\n"
            "print('CAN', can_run_triton('cpu'))\n"
            "try:\n"
            "    lstm(torch.randn(2, 1, 3), None, m._flat_weights, backend='fused')\n"
            "except RuntimeError as e:\n"
            "    print('RAISED', e)\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "CAN False" in proc.stdout, proc.stdout
    assert ("RAISED lstm(backend='fused') on cpu tensors: TRITON_INTERPRET was set after Triton "
            "was imported" in proc.stdout), proc.stdout
    assert "before importing dtl_fast" in proc.stdout


def test_compiled_fused_fullgraph_as_the_first_call_of_a_process():
    # The Triton checks (version strings included) first ran inside dynamo: torch 2.11 could
    # not trace `re`'s pattern compiler, so fullgraph=True failed when no eager call came
    # first (s31; in pytest it passed only after an earlier test had run the checks)
    code = ("import torch\nfrom dtl_fast.ops.rnn import lstm\n"
            "m = torch.nn.LSTM(3, 4, bidirectional=True)\n"
            "f = torch.compile(lambda x, ws: lstm(x, None, ws, bidirectional=True, "
            "backend='fused')[0], fullgraph=True, backend='aot_eager')\n"
            "x, ws = torch.randn(2, 1, 3), [w.detach() for w in m._flat_weights]\n"
            "with torch.no_grad():\n"
            "    print('ERR', (f(x, ws) - m(x)[0]).abs().max().item())\n")
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    err = float(proc.stdout.split("ERR", 1)[1])
    assert err < 1e-5, proc.stdout


@pytest.mark.parametrize("text,want", [
    ("3.6.0", (3, 6)), ("2.4.0rc1", (2, 4)), ("3.10.1+git2a", (3, 10)), ("2.11", (2, 11)),
    ("3", (0, 0)), ("v3.6", (0, 0)), ("3.x", (0, 0)), ("", (0, 0)), ("3.\u00b2", (0, 0)),
    ("\u00b2.1", (0, 0))])
def test_version_strings_read_as_major_minor(text, want):
    import dtl_fast._triton as tri
    assert tri._version(text) == want


@pytest.mark.parametrize("triton_version,numpy_version,refused", [
    ("3.6.0", "2.4.6", True), ("3.6.0", "2.3.5", False), ("3.7.0", "2.4.6", False),
    ("3.8.0", "2.5.0rc1", False), ("3.5.1", "2.4.0", True)])
def test_interpreter_refused_by_name_where_triton_and_numpy_clash(monkeypatch, triton_version,
                                                                 numpy_version, refused):
    # Triton < 3.7's interpreter fails on every loop over a run-time bound under NumPy >= 2.4
    # (TypeError "only 0-dimensional arrays can be converted to Python scalars", deep inside
    # Triton; found with torch 2.11 / triton 3.6, the GPU machines' versions, s29): `fused` on
    # CPU tensors says so and names the way out, `auto` keeps PyTorch's path
    import triton

    import dtl_fast._triton as tri
    monkeypatch.setattr(triton, "__version__", triton_version)
    monkeypatch.setattr(np, "__version__", numpy_version)
    _, x, h, ws = make_case("LSTM", 3, 2, 4, 6, 1, True, dtype=torch.float32)
    assert (tri.interpreter_conflict() is not None) == refused
    if refused:
        assert not tri.can_run_triton("cpu")
    if refused and tri.interpreting():  # without the interpreter CPU tensors are refused anyway
        with pytest.raises(RuntimeError, match=r"lstm\(backend='fused'\).*Triton "
                           + re.escape(triton_version) + r"'s interpreter fails under NumPy "
                           + re.escape(numpy_version) + r".*'numpy<2.4'"):
            ops.lstm(x, h, ws, bidirectional=True, backend="fused")
    assert ops.lstm(x, h, ws, bidirectional=True, backend="auto")[0].shape == (3, 2, 12)


# ------------------------------------------------------------------------------------------------
# Real sizes on CUDA
# ------------------------------------------------------------------------------------------------

GPU_CASES = [
    # T, B, I, H, L, bi, lengths
    (64, 16, 128, 256, 1, True, False),
    (33, 37, 100, 333, 2, True, True),
    (128, 64, 256, 1024, 1, True, False),
    (17, 128, 512, 512, 2, False, True),
]


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", GPU_CASES, ids=real_size_id)
def test_fused_cuda_real_sizes(mode, dtype, case, poison):
    check_cuda_real_size(mode, dtype, case, poison)


def test_rule_dtype_follows_what_pytorch_computes_in():
    # The dtype auto_path looks a call up with: PyTorch's own path's (CPU autocast: the autocast
    # dtype; float64 is never cast; outside autocast x's own).
    x = torch.randn(2, 3, 4)
    assert ops.rule_dtype(x) == torch.float32 and ops.rule_dtype(x.half()) == torch.float16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert ops.rule_dtype(x) == torch.bfloat16 and ops.rule_dtype(x.half()) == torch.bfloat16
        assert ops.rule_dtype(x.double()) == torch.float64


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_auto_under_cuda_bf16_autocast_returns_what_torch_nn_returns():
    # cuDNN's autocast wrapper computes in float16 whatever the autocast dtype; auto must agree
    # with torch.nn on the output dtype, even at the call of its one bfloat16 fused region
    # (LSTM, bidirectional, B 64, H 256 = input size, T 16, one layer, no lengths, hx None).
    import dtl_fast

    ref = torch.nn.LSTM(256, 256, bidirectional=True).cuda()
    fast = dtl_fast.nn.LSTM.from_torch(ref, backend="auto")
    x = torch.randn(16, 64, 256, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        assert ops.rule_dtype(x) == torch.float16
        want, (h_want, _) = ref(x)
        got, (h_got, _) = fast(x)
    assert got.dtype == want.dtype == torch.float16 and h_got.dtype == h_want.dtype
    assert_rel_close("output", got.float(), want.float(), 1e-3)


# ------------------------------------------------------------------------------------------------
# backend="auto"'s fused region: exactly the measured call, on the measured card, where Triton
# runs and not on ROCm (review s28, A3 / A6); the rows themselves: tests/test_rnn_persistent.py
# ------------------------------------------------------------------------------------------------

CARD = ops.AUTO_RULE_SOURCE["card"]
REGION_CALL = ("LSTM", torch.bfloat16, 64, 256, 16, 2, None, "cuda")  # cell dtype B H T D lengths


def test_fused_region_carries_the_measured_conditions():
    import csv
    import json
    (r,) = ops.AUTO_FUSED_REGIONS
    # bench_rnn.py's call: one layer, input size = H, hx None, no lengths, no dropout, [T, B, I]
    # with biases
    assert (r["num_layers"], r["I"], r["hx"], r["dropout"], r["lengths"], r["batch_first"],
            r["bias"]) == ((1, 1), "H", False, False, False, False, True)
    # the card: the device_name of the rows the entry rests on
    src = ops.AUTO_RULE_SOURCE
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, src["csv"])) as f:
        names = {row["device_name"] for row in csv.DictReader(f)
                 if row["run_id"] == src["run_id"] and row["status"] == "ok"
                 and row["variant"] == "lstm-bi" and row["shape"] == "64x16x256"
                 and row["dtype"] == "bfloat16" and row["provider"] == "dtl_fast"
                 and json.loads(row["extra"])["backend"] == "fused"}
    assert r["cards"] == tuple(names) == (CARD,)


@pytest.mark.parametrize("change", [
    dict(card="NVIDIA H100 80GB HBM3"), dict(card="NVIDIA H200 NVL"),
    dict(card="NVIDIA H200 MIG 1g.18gb"), dict(card="NVIDIA A100-SXM4-80GB"),
    dict(card="AMD Instinct MI300X"), dict(num_layers=2), dict(input_size=255),
    dict(input_size=512), dict(hx=True), dict(dropout=0.1), dict(batch_first=True),
    dict(bias=False)], ids=str)
def test_fused_region_each_condition_flipped_runs_native(change):
    assert ops.auto_path(*REGION_CALL, card=CARD) == "fused:loop"
    assert ops.auto_path(*REGION_CALL, card=CARD, num_layers=1, input_size=256, hx=False,
                         dropout=0.0, batch_first=False, bias=True) == "fused:loop"
    assert ops.auto_path(*REGION_CALL, **{"card": CARD, **change}) == "native"


def test_fused_region_shape_boundaries():
    cell, dt, B, H, T, D, lengths, dev = REGION_CALL
    for call in [(cell, dt, 63, H, T, D), (cell, dt, 65, H, T, D), (cell, dt, B, 255, T, D),
                 (cell, dt, B, 257, T, D), (cell, dt, B, H, 15, D), (cell, dt, B, H, 17, D),
                 (cell, dt, B, H, T, 1), ("GRU", dt, B, H, T, D), (cell, torch.float16, B, H, T, D),
                 (cell, torch.float32, B, H, T, D)]:
        assert ops.auto_path(*call, None, dev, card=CARD) == "native", call
    assert ops.auto_path(*REGION_CALL[:6], torch.tensor([16] * 64), dev, card=CARD) == "native"
    assert ops.auto_path(*REGION_CALL[:7], "cpu", card=CARD) == "native"
    if not torch.cuda.is_available():  # no card to read: never fused
        assert ops.auto_path(*REGION_CALL) == "native"


def test_fused_picks_need_triton_and_not_rocm(monkeypatch):
    from types import SimpleNamespace
    cuda_x = SimpleNamespace(is_cuda=True, dtype=torch.float32, device=torch.device("cuda"))
    assert ops.fused_can_run("cuda") and ops._traceable_path(cuda_x) == "fused:loop"
    monkeypatch.setattr(ops, "can_run_triton", lambda device: False)  # e.g. Triton not importable
    assert ops.auto_path(*REGION_CALL, card=CARD) == "native"
    assert ops._traceable_path(cuda_x) == "reference"
    monkeypatch.undo()
    monkeypatch.setattr(torch.version, "hip", "6.2.41133")  # ROCm: its GPUs are "cuda" devices
    assert ops.auto_path(*REGION_CALL, card=CARD) == "native"
    assert ops._traceable_path(cuda_x) == "reference"


@pytest.mark.parametrize("mode", MODES)
def test_auto_asks_the_rule_with_the_calls_conditions(mode, monkeypatch):
    seen = []
    monkeypatch.setattr(ops, "auto_path", lambda *a, **k: seen.append(k) or "native")
    f = {"LSTM": ops.lstm, "GRU": ops.gru}[mode]
    _, x, h, ws = make_case(mode, 3, 2, 4, 6, 2, True, dtype=torch.float32)
    f(x, h, ws, num_layers=2, bidirectional=True, dropout=0.5, training=True, backend="auto")
    f(x, None, ws, num_layers=2, bidirectional=True, dropout=0.5, training=False, backend="auto")
    f(x.transpose(0, 1), None, [w for w in ws if w.dim() == 2], num_layers=2, bidirectional=True,
      batch_first=True, has_bias=False, backend="auto")
    assert seen == [dict(num_layers=2, input_size=4, hx=True, dropout=0.5, batch_first=False,
                         bias=True),
                    dict(num_layers=2, input_size=4, hx=False, dropout=0.0, batch_first=False,
                         bias=True),
                    dict(num_layers=2, input_size=4, hx=False, dropout=0.0, batch_first=True,
                         bias=False)]
