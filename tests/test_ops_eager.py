"""The ops' eager entry points (dtl_fast.ops._eager): when a call may bypass the registered
custom op, that both entry points give bitwise the same outputs and gradients (Triton
interpreter on CPU), the autograd details (unused outputs, double backward), and the host-side
caches next to them: check_inputs once per shape, lengths checked on the host, lengths copied
to the GPU once per value."""
import contextlib
import importlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from dtl_fast import _device
from dtl_fast._checks import check_lengths_range
from dtl_fast.ops import _eager
from dtl_fast.ops import rnn as rnn_ops

from _helpers import HAS_CUDA

# the modules, not the functions of the same name that dtl_fast.ops / .reference export
attn_ops = importlib.import_module("dtl_fast.ops.cosine_attention")
ref_attn = importlib.import_module("dtl_fast.reference.cosine_attention")


class _Passthrough(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


class _Sub(torch.Tensor):
    pass


# ---------------------------------------------------------------------------------------------
# eager_ok: where the bypass is allowed

def test_eager_ok_for_plain_tensors_and_none():
    assert _eager.eager_ok((torch.ones(2), None, 3, "loop"))


def test_eager_ok_false_under_a_dispatch_mode():
    with _Passthrough():
        assert not _eager.eager_ok((torch.ones(2),))


def test_eager_ok_false_for_a_tensor_subclass():
    assert not _eager.eager_ok((torch.ones(2).as_subclass(_Sub),))


def test_eager_ok_false_under_fake_tensors():
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode() as mode:
        t = mode.from_tensor(torch.ones(2))
        assert not _eager.eager_ok((t,))


@pytest.mark.parametrize("trace", [
    lambda f: torch.func.grad(lambda x: f(x).sum())(torch.ones(3)),
    lambda f: torch.compile(f, backend="eager", fullgraph=True)(torch.ones(3)),
    lambda f: torch.jit.trace(f, torch.ones(3), check_trace=False),
], ids=["functorch", "torch.compile", "jit.trace"])
def test_eager_ok_false_inside_a_transform_or_trace(trace):
    seen = []

    def f(x):
        seen.append(_eager.eager_ok((x,)))
        return x * x

    trace(f)
    assert seen == [False]


# ---------------------------------------------------------------------------------------------
# The two entry points give bitwise the same results

@pytest.fixture
def through_op(monkeypatch):
    """Forces every call through the registered op (what torch.compile and export see)."""
    def force():
        monkeypatch.setattr(_eager, "eager_ok", lambda args: False)
    return force


def _attn_case(per_head: bool):
    B, H, N, M, d = 3, 2, 7, 2, 8
    g = torch.Generator().manual_seed(1)

    def leaf(*shape):
        return torch.randn(*shape, generator=g).requires_grad_()

    inputs = dict(q=leaf(B, H, N, d), k=leaf(B, H, N, d), v=leaf(B, H, N, d),
                  logit_scale=torch.tensor([0.5, 5.0]).requires_grad_(),  # the second is clamped
                  memory_k=leaf(H, M, d), memory_v=leaf(H, M, d))
    if per_head:
        return inputs, torch.tensor([[7, 2], [3, 0], [5, 5]]), (1, None)
    return inputs, [7, 2, 4], 2


def _attn_run(inputs, key_lengths, window):
    out = attn_ops.cosine_attention(**inputs, key_lengths=key_lengths, window=window,
                                    backend="fused")
    grad = torch.linspace(-1, 1, out.numel()).view_as(out)
    leaves = list(inputs.values())
    return (out.detach(), *torch.autograd.grad(out, leaves, grad)), out.grad_fn.name()


@pytest.mark.parametrize("per_head", [False, True])
def test_attention_eager_and_op_paths_are_bitwise_equal(per_head, through_op):
    inputs, lens, window = _attn_case(per_head)
    eager, eager_node = _attn_run(inputs, lens, window)
    through_op()
    op, op_node = _attn_run(inputs, lens, window)
    assert eager_node != op_node  # the two paths really differ ...
    assert "cosine_attention_fwd" in op_node
    for a, b in zip(eager, op):  # ... and agree bit for bit (output, q, k, v, scale, memory)
        assert torch.equal(a, b)
    assert eager[4][1] == 0  # the clamped head's scale gets no gradient


def _rnn_run(mode, lengths, use_state_only):
    torch.manual_seed(3)
    m = (rnn_ops.lstm if mode == "LSTM" else rnn_ops.gru)
    T, B, I, H = 5, 3, 4, 6
    x = torch.randn(T, B, I, requires_grad=True)
    G = 4 if mode == "LSTM" else 3
    weights = [torch.randn(G * H, I, requires_grad=True), torch.randn(G * H, H, requires_grad=True),
               torch.randn(G * H, requires_grad=True), torch.randn(G * H, requires_grad=True)] * 2
    weights = [w.detach().clone().requires_grad_() for w in weights]
    out, state = m(x, None, weights, lengths=lengths, bidirectional=True, backend="fused")
    h_n = state[0] if mode == "LSTM" else state
    loss = h_n.square().sum() if use_state_only else out.square().sum() + h_n.sum()
    grads = torch.autograd.grad(loss, [x, *weights])
    return (out.detach(), h_n.detach(), *grads)


@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
@pytest.mark.parametrize("use_state_only", [False, True])
def test_rnn_eager_and_op_paths_are_bitwise_equal(mode, use_state_only, through_op):
    lengths = torch.tensor([5, 2, 4])
    eager = _rnn_run(mode, lengths, use_state_only)
    through_op()
    op = _rnn_run(mode, lengths, use_state_only)
    for a, b in zip(eager, op):
        assert torch.equal(a, b)


def test_eager_path_is_taken_in_eager_mode(monkeypatch):
    # The registered op is not called at all on the eager path (forward and backward).
    called = []
    real = _eager.eager_ok
    monkeypatch.setattr(_eager, "eager_ok", lambda args: called.append(1) or real(args))
    inputs, lens, window = _attn_case(False)
    (_, *grads), node = _attn_run(inputs, lens, window)
    assert node == "FusedCosineAttentionBackward"
    assert len(called) == 2  # the forward's and the backward's entry point, each once


def test_eager_path_takes_parameters():
    # memory slots are nn.Parameters in the modules: they must not push a call onto the op
    inputs, lens, window = _attn_case(False)
    inputs["memory_k"] = torch.nn.Parameter(inputs["memory_k"].detach())
    inputs["memory_v"] = torch.nn.Parameter(inputs["memory_v"].detach())
    (_, *grads), node = _attn_run(inputs, lens, window)
    assert node == "FusedCosineAttentionBackward"
    assert all(g is not None for g in grads)


@pytest.mark.parametrize("forward_mode,error", [
    # the eager path: once_differentiable alone would return gradients without a node (the
    # grad_output here does not require grad), and a penalty would silently be a constant
    (contextlib.nullcontext, "FusedCosineAttention: .*no second-order"),
    # the forward through the registered op (under a dispatch mode), the backward outside it:
    # its registered autograd refuses create_graph with the same clear error
    (_Passthrough, "dtl_fast::cosine_attention_fwd: .*no second-order.*backend='reference'"),
], ids=["eager", "op-forward"])
def test_double_backward_fails_loudly(forward_mode, error):
    # A gradient penalty through the fused op must fail loudly, not lose its second-order term.
    inputs, lens, window = _attn_case(False)
    with forward_mode():
        out = attn_ops.cosine_attention(**inputs, key_lengths=lens, window=window,
                                        backend="fused")
    (gq,) = torch.autograd.grad(out.sum(), [inputs["q"]], create_graph=True)
    assert gq.requires_grad
    with pytest.raises(RuntimeError, match=error):
        gq.square().sum().backward()


# Second-order gradients through the fused ops must fail loudly wherever they are asked for.
# The old error node hung off fresh detached leaves, which only .backward() reaches:
# torch.autograd.grad(..., inputs=[...]) and autograd.functional.hessian pruned it and silently
# returned a wrong (or None) second-order term (review s27, F2).
SECOND_ORDER = r"no second-order gradients.*backend='reference'"


def _attn_scale_case():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 4, 4, generator=g, dtype=torch.float64) for _ in range(3))
    return q, k, v, torch.tensor([0.5, 1.0], dtype=torch.float64)


def _attn_of_scale(q, k, v):
    return lambda s: attn_ops.cosine_attention(q, k, v, s, backend="fused").pow(2).sum()


def _rnn_second_order_case(mode):
    torch.manual_seed(0)
    cls = torch.nn.LSTM if mode == "LSTM" else torch.nn.GRU
    ws = [w.detach().double().requires_grad_() for w in cls(3, 4)._flat_weights]
    f = rnn_ops.lstm if mode == "LSTM" else rnn_ops.gru
    return f, ws, torch.randn(4, 2, 3, dtype=torch.float64, requires_grad=True)


@pytest.mark.parametrize("ask", ["grad-inputs", "backward"])
@pytest.mark.parametrize("forward_mode", [contextlib.nullcontext, _Passthrough],
                         ids=["eager", "op-forward"])
def test_attention_gradient_penalty_on_logit_scale_raises(ask, forward_mode):
    q, k, v, s = _attn_scale_case()
    s.requires_grad_()
    with forward_mode():
        y = _attn_of_scale(q, k, v)(s)
    (gs,) = torch.autograd.grad(y, [s], create_graph=True)
    penalty = gs.pow(2).sum()
    with pytest.raises(RuntimeError, match=SECOND_ORDER):
        if ask == "grad-inputs":
            torch.autograd.grad(penalty, [s])
        else:
            penalty.backward()


def test_attention_hessian_raises():
    q, k, v, s = _attn_scale_case()
    with pytest.raises(RuntimeError, match=SECOND_ORDER):
        torch.autograd.functional.hessian(_attn_of_scale(q, k, v), s)


@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
@pytest.mark.parametrize("ask", ["grad-inputs", "backward"])
@pytest.mark.parametrize("forward_mode", [contextlib.nullcontext, _Passthrough],
                         ids=["eager", "op-forward"])
def test_rnn_gradient_penalty_on_w_ih_raises(mode, ask, forward_mode):
    f, ws, x = _rnn_second_order_case(mode)
    with forward_mode():
        out, _ = f(x, None, ws, backend="fused")
    (gx,) = torch.autograd.grad(out.pow(2).sum(), [x], create_graph=True)
    penalty = gx.pow(2).sum()
    with pytest.raises(RuntimeError, match=SECOND_ORDER):
        if ask == "grad-inputs":
            torch.autograd.grad(penalty, [ws[0]])
        else:
            penalty.backward()


@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
def test_rnn_hessian_raises(mode):
    f, ws, x = _rnn_second_order_case(mode)
    with pytest.raises(RuntimeError, match=SECOND_ORDER):
        torch.autograd.functional.hessian(
            lambda w: f(x.detach(), None, [w, *ws[1:]], backend="fused")[0].pow(2).sum(),
            ws[0].detach())


@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
def test_rnn_second_order_reference_still_works(mode):
    # the backend the error names does give the second-order term
    f, ws, x = _rnn_second_order_case(mode)
    out, _ = f(x, None, ws, backend="reference")
    (gx,) = torch.autograd.grad(out.pow(2).sum(), [x], create_graph=True)
    (gw,) = torch.autograd.grad(gx.pow(2).sum(), [ws[0]])
    assert gw.abs().sum() > 0


def test_create_graph_with_only_first_order_use_still_works():
    # create_graph=True whose gradients are only used as values (logged, a manual step, the
    # second-order term of an unrelated leaf) must not raise: only differentiating through the
    # fused op's backward does.
    f, ws, x = _rnn_second_order_case("LSTM")
    out, _ = f(x, None, ws, backend="fused")
    (gx,) = torch.autograd.grad(out.pow(2).sum(), [x], create_graph=True)
    ref, _ = f(x, None, ws, backend="reference")
    (gref,) = torch.autograd.grad(ref.pow(2).sum(), [x])
    torch.testing.assert_close(gx.detach(), gref)
    other = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    (d_other,) = torch.autograd.grad((other * 3).pow(2) + gx.sum(), [other])
    assert d_other.item() == 36.0
    q, k, v, s = _attn_scale_case()
    s.requires_grad_()
    (gs,) = torch.autograd.grad(_attn_of_scale(q, k, v)(s), [s], create_graph=True)
    (gs_ref,) = torch.autograd.grad(
        attn_ops.cosine_attention(q, k, v, s, backend="reference").pow(2).sum(), [s])
    torch.testing.assert_close(gs.detach(), gs_ref)


def test_first_order_backward_adds_no_error_node():
    # create_graph=False: the gradients are the backward formula's own tensors (no extra node)
    f, ws, x = _rnn_second_order_case("LSTM")
    out, _ = f(x, None, ws, backend="fused")
    (gx,) = torch.autograd.grad(out.pow(2).sum(), [x])
    assert gx.grad_fn is None and not gx.requires_grad


def test_eager_path_without_grad_returns_plain_tensors():
    inputs, lens, window = _attn_case(False)
    with torch.no_grad():
        out = attn_ops.cosine_attention(**inputs, key_lengths=lens, window=window, backend="fused")
    assert out.grad_fn is None and not out.requires_grad


# ---------------------------------------------------------------------------------------------
# check_inputs once per shape

def _qkv(B=2, H=2, N=4, d=8):
    return torch.randn(B, H, N, d), torch.randn(B, H, N, d), torch.randn(B, H, N, d), torch.zeros(H)


def test_check_inputs_cache_keeps_every_verdict():
    q, k, v, ls = _qkv()
    ref_attn._CHECKED.clear()
    assert ref_attn.check_inputs(q, k, v, ls, None, (3, 3)) == (None, 3)  # all equal: one window
    assert len(ref_attn._CHECKED) == 1
    assert ref_attn.check_inputs(q, k, v, ls, None, (3, 3)) == (None, 3)  # from the cache
    assert ref_attn.check_inputs(q, k, v, ls, None, [3, None]) == (None, (3, None))
    lens = torch.tensor([4, 1])
    assert ref_attn.check_inputs(q, k, v, ls, lens, None)[0] is lens
    # each bad argument still fails after good calls of the same shapes
    with pytest.raises(ValueError, match="key_lengths must have shape"):
        ref_attn.check_inputs(q, k, v, ls, torch.tensor([4, 1, 2]), None)
    with pytest.raises(ValueError, match="k must have q's dtype"):
        ref_attn.check_inputs(q, k.double(), v, ls, lens, None)
    with pytest.raises(ValueError, match="window"):
        ref_attn.check_inputs(q, k, v, ls, None, -3)
    with pytest.raises(ValueError, match="window per head"):
        ref_attn.check_inputs(q, k, v, ls, None, (3, 3, 3))
    with pytest.raises(ValueError, match="logit_scale"):
        ref_attn.check_inputs(q, k, v, torch.zeros(3), None, None)
    # a bad call is never cached
    with pytest.raises(ValueError, match="window"):
        ref_attn.check_inputs(q, k, v, ls, None, -3)


def test_check_inputs_cache_costs_torch_compile_no_recompile():
    # the memo is skipped while dynamo traces: a write to a global dict would fail the guards
    # of the first graph and recompile on the second call
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    f = torch.compile(lambda *a: attn_ops.cosine_attention(*a, backend="reference"),
                      backend="eager", fullgraph=True)
    q, k, v, ls = _qkv()
    f(q, k, v, ls)
    f(q, k, v, ls)
    assert counters["stats"]["unique_graphs"] == 1


def test_check_inputs_uncached_forms_are_checked_in_full():
    q, k, v, ls = _qkv()
    ref_attn._CHECKED.clear()
    ref_attn.check_inputs(q, k, v, ls, [4, 1], torch.tensor([1, -1]))  # a list, a window tensor
    assert len(ref_attn._CHECKED) == 0
    with pytest.raises(ValueError, match="key_lengths must hold integers"):
        ref_attn.check_inputs(q, k, v, ls, [4.0, 1], None)


# ---------------------------------------------------------------------------------------------
# lengths: checked on the host, copied once per value

@pytest.mark.parametrize("shape", [(4,), (2, 3)])
def test_cpu_lengths_range_check(shape):
    lengths = torch.arange(4 if len(shape) == 1 else 6).view(shape)
    check_lengths_range(lengths, 0, 5, owner="op")
    with pytest.raises(ValueError, match=r"op: every lengths\[b\] must lie in \[1, 5\], got values in \[0, "):
        check_lengths_range(lengths, 1, 5, owner="op")
    with pytest.raises(ValueError, match=r"got values in \[0, 5\]" if len(shape) == 2 else r"\[0, 3\]"):
        check_lengths_range(lengths, 0, 2, owner="op")


def test_device_cache_leaves_cpu_targets_alone():
    t = torch.tensor([3, 1])
    out = _device.to_device_cached(t, "cpu", torch.int32)
    assert out.dtype == torch.int32 and torch.equal(out, t.int())
    assert len(_device._CACHE) == 0


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("cached", ["lengths", "window"])
def test_gpu_cached_device_tensors_made_in_inference_mode_serve_training(cached):
    # an evaluation step under inference_mode fills the caches; the next training step with
    # the same lengths / per-head window saves those tensors for backward
    _device._CACHE.clear()
    attn_ops._cached_window_heads.cache_clear()
    q, k, v, ls = (t.cuda() for t in _qkv(B=2, H=2, N=6))
    lens, window = (torch.tensor([6, 3]), None) if cached == "lengths" else (None, (1, 3))
    with torch.inference_mode():
        attn_ops.cosine_attention(q, k, v, ls, lens, window, backend="fused")
    q.requires_grad_()
    out = attn_ops.cosine_attention(q, k, v, ls, lens, window, backend="fused")
    out.sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_gpu_device_lengths_copied_once_per_value():
    _device._CACHE.clear()
    t = torch.tensor([3, 1, 2])
    a = _device.to_device_cached(t, "cuda", torch.int32)
    b = _device.to_device_cached(t.clone(), "cuda", torch.int32)
    assert a is b and a.is_cuda and a.dtype == torch.int32 and a.tolist() == [3, 1, 2]
    t[0] = 2  # new values: a new copy, the old one unchanged
    c = _device.to_device_cached(t, "cuda", torch.int32)
    assert c is not a and c.tolist() == [2, 1, 2] and a.tolist() == [3, 1, 2]
    assert _device.to_device_cached(t, "cuda", torch.int64) is not c  # the dtype is in the key
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):  # another stream: its own copy
        d = _device.to_device_cached(t, "cuda", torch.int32)
    assert d is not c


def test_eager_calls_keep_their_op_names_in_the_profiler():
    inputs, lens, window = _attn_case(False)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out = attn_ops.cosine_attention(**inputs, key_lengths=lens, window=window, backend="fused")
        out.sum().backward()
    names = {e.key for e in prof.key_averages()}
    assert {"dtl_fast::cosine_attention_fwd", "dtl_fast::cosine_attention_bwd"} <= names


def test_forward_mode_ad_is_refused_not_dropped():
    import torch.autograd.forward_ad as fwAD
    q, k, v, ls = _qkv()
    with fwAD.dual_level():
        dq = fwAD.make_dual(q, torch.ones_like(q))
        with pytest.raises(NotImplementedError, match="cosine_attention.*forward-mode AD"):
            attn_ops.cosine_attention(dq, k, v, ls, backend="fused")
        x = fwAD.make_dual(torch.randn(3, 2, 4), torch.ones(3, 2, 4))
        ws = [torch.randn(16, 4), torch.randn(16, 4), torch.randn(16), torch.randn(16)]
        with pytest.raises(NotImplementedError, match="lstm.*forward-mode AD"):
            rnn_ops.lstm(x, None, ws, backend="fused")
        # outside dual tensors, a dual level alone changes nothing
        attn_ops.cosine_attention(q, k, v, ls, backend="fused")



# ---------------------------------------------------------------------------------------------
# torch.func transforms and forward-mode AD: the fused ops' autograd (torch.library
# register_autograd) is opaque to functorch's grad / jvp, where torch raised an error about
# autograd.Function internals; `auto` takes a stock path there, `fused` refuses by name.

def test_transforms_in_use_names_them():
    seen = []
    probe = lambda x: seen.append(_eager.transforms_in_use((x,))) or x  # noqa: E731
    assert _eager.transforms_in_use((torch.ones(2),)) == ()
    torch.func.vmap(torch.func.grad(lambda x: probe(x).sum()))(torch.ones(2, 3))
    torch.func.jvp(probe, (torch.ones(2),), (torch.ones(2),))
    import torch.autograd.forward_ad as fwAD
    with fwAD.dual_level():
        dual = fwAD.make_dual(torch.ones(2), torch.ones(2))
        probe(dual)
        probe(torch.ones(2))  # a plain tensor inside a dual level: nothing
    # functionalize involves no autograd: not reported (the registered ops pass through it)
    torch.func.functionalize(torch.func.vmap(probe))(torch.ones(2, 3))
    # (torch.func.jvp carries its tangent as a forward-mode dual inside the transform)
    assert seen == [("vmap", "grad"), ("jvp", "forward_ad"), ("forward_ad",), (), ("vmap",)]
    assert not _eager.needs_stock_path(("vmap",)) and _eager.needs_stock_path(("vmap", "grad"))


def _lstm_weights():
    g = torch.Generator().manual_seed(3)
    return [torch.randn(16, 4, generator=g), torch.randn(16, 4, generator=g),
            torch.randn(16, generator=g), torch.randn(16, generator=g)]


def test_fused_ops_refuse_grad_transforms_by_name_and_serve_vmap():
    q, k, v, ls = _qkv()
    with pytest.raises(NotImplementedError, match=r"cosine_attention\(backend='fused'\).*grad"):
        torch.func.grad(lambda a: attn_ops.cosine_attention(a, k, v, ls, backend="fused").sum())(q)
    ws = _lstm_weights()
    x = torch.randn(3, 5, 4)
    with pytest.raises(NotImplementedError, match=r"lstm\(backend='fused'\).*grad"):
        torch.func.grad(lambda a: rnn_ops.lstm(a, None, ws, backend="fused")[0].sum())(x)
    # vmap alone runs the registered ops' per-sample fallback: the same as a loop
    qs, ks, vs = (torch.stack([t, t.flip(0)]) for t in (q, k, v))
    got = torch.func.vmap(lambda a, b, c: attn_ops.cosine_attention(a, b, c, ls, backend="fused"))(
        qs, ks, vs)
    want = torch.stack([attn_ops.cosine_attention(a, b, c, ls, backend="fused")
                        for a, b, c in zip(qs, ks, vs)])
    torch.testing.assert_close(got, want)
    xs = torch.stack([x, x.flip(0)])
    got = torch.func.vmap(lambda a: rnn_ops.lstm(a, None, ws, backend="fused")[0])(xs)
    want = torch.stack([rnn_ops.lstm(a, None, ws, backend="fused")[0] for a in xs])
    torch.testing.assert_close(got, want)


def test_auto_takes_a_stock_path_under_transforms(monkeypatch):
    # As on a GPU where the measured rule picks the fused kernels (forced here): under grad the
    # composite / native path, under jvp and vmap the reference, each matching the fused
    # op's values outside the transform.
    monkeypatch.setattr(attn_ops, "auto_path", lambda *a, **k: "fused")
    monkeypatch.setattr(rnn_ops, "auto_path", lambda *a, **k: "fused:" + rnn_ops.fused_impl())
    q, k, v, ls = (t.double() for t in _qkv())
    qq = q.clone().requires_grad_()
    attn_ops.cosine_attention(qq, k, v, ls, backend="fused").pow(2).sum().backward()
    gq = torch.func.grad(lambda a: attn_ops.cosine_attention(a, k, v, ls).pow(2).sum())(q)
    torch.testing.assert_close(gq, qq.grad)
    t = torch.randn_like(q)
    _, tangent = torch.func.jvp(lambda a: attn_ops.cosine_attention(a, k, v, ls), (q,), (t,))
    _, want = torch.func.jvp(lambda a: ref_attn.cosine_attention(a, k, v, ls), (q,), (t,))
    torch.testing.assert_close(tangent, want)
    eps = 1e-6  # and the tangent is the derivative: a central difference
    fd = (attn_ops.cosine_attention(q + eps * t, k, v, ls, backend="fused")
          - attn_ops.cosine_attention(q - eps * t, k, v, ls, backend="fused")) / (2 * eps)
    torch.testing.assert_close(tangent, fd, rtol=1e-5, atol=1e-7)

    ws = [w.double() for w in _lstm_weights()]
    x = torch.randn(3, 5, 4, dtype=torch.float64)
    xx = x.clone().requires_grad_()
    rnn_ops.lstm(xx, None, ws, backend="fused")[0].pow(2).sum().backward()
    gx = torch.func.grad(lambda a: rnn_ops.lstm(a, None, ws)[0].pow(2).sum())(x)
    torch.testing.assert_close(gx, xx.grad)
    xs = torch.stack([x, x.flip(0)])
    got = torch.func.vmap(lambda a: rnn_ops.lstm(a, None, ws)[0])(xs)
    want = torch.stack([rnn_ops.lstm(a, None, ws, backend="fused")[0] for a in xs])
    torch.testing.assert_close(got, want)
    t = torch.randn_like(x)
    _, tangent = torch.func.jvp(lambda a: rnn_ops.lstm(a, None, ws)[0], (x,), (t,))
    fd = (rnn_ops.lstm(x + eps * t, None, ws, backend="fused")[0]
          - rnn_ops.lstm(x - eps * t, None, ws, backend="fused")[0]) / (2 * eps)
    torch.testing.assert_close(tangent, fd, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("backend", ["auto", "fused"])
def test_per_sample_lengths_under_vmap(backend):
    # vmap over (inputs, lengths): the lengths' range check reads every sample's values under
    # the vmap wrapper (it used to fail reading a wrapped tensor's data), and each sample
    # matches its own call.
    q, k, v = (torch.randn(3, 2, 2, 5, 4, dtype=torch.float64) for _ in range(3))
    ls = torch.tensor([2.0, 3.0], dtype=torch.float64)
    key_lengths = torch.tensor([[5, 2], [3, 0], [4, 4]])
    got = torch.func.vmap(lambda a, b, c, L: attn_ops.cosine_attention(a, b, c, ls, L, backend=backend))(
        q, k, v, key_lengths)
    want = torch.stack([ref_attn.cosine_attention(a, b, c, ls, L)
                        for a, b, c, L in zip(q, k, v, key_lengths)])
    torch.testing.assert_close(got, want)
    ws = [w.double() for w in _lstm_weights()]
    x = torch.randn(3, 2, 5, 4, dtype=torch.float64)
    lengths = torch.tensor([[5, 2], [1, 5], [3, 3]])
    got = torch.func.vmap(lambda a, L: rnn_ops.lstm(a, None, ws, lengths=L, batch_first=True,
                                                    backend=backend)[0])(x, lengths)
    want = torch.stack([rnn_ops.lstm(a, None, ws, lengths=L, batch_first=True,
                                     backend="reference")[0] for a, L in zip(x, lengths)])
    torch.testing.assert_close(got, want)
    if backend == "auto":  # per-sample gradients with per-sample lengths
        def attn_loss(a, b, c, L):
            return attn_ops.cosine_attention(a, b, c, ls, L).pow(2).sum()

        def rnn_loss(a, L):
            return rnn_ops.lstm(a, None, ws, lengths=L, batch_first=True)[0].pow(2).sum()

        got = torch.func.vmap(torch.func.grad(attn_loss, argnums=(0, 1, 2)))(q, k, v, key_lengths)
        for i, (a, b, c, L) in enumerate(zip(q, k, v, key_lengths)):
            a, b, c = (t.clone().requires_grad_() for t in (a, b, c))
            want = torch.autograd.grad(
                ref_attn.cosine_attention(a, b, c, ls, L).pow(2).sum(), (a, b, c))
            for g_got, g_want in zip(got, want):
                torch.testing.assert_close(g_got[i], g_want)
        got = torch.func.vmap(torch.func.grad(rnn_loss))(x, lengths)
        for i, (a, L) in enumerate(zip(x, lengths)):
            a = a.clone().requires_grad_()
            out = rnn_ops.lstm(a, None, ws, lengths=L, batch_first=True, backend="reference")[0]
            torch.testing.assert_close(got[i], torch.autograd.grad(out.pow(2).sum(), a)[0])
    bad = lengths.clone()
    bad[1, 0] = 6
    with pytest.raises((ValueError, RuntimeError), match="lengths"):
        torch.func.vmap(lambda a, L: rnn_ops.lstm(a, None, ws, lengths=L, batch_first=True,
                                                  backend=backend)[0])(x, bad)


# ---------------------------------------------------------------------------------------------
# create_graph=True: the saved tensors unpacked once; an op that saves none of its outputs

def _second_order_cases():
    """(name, make the op's output from leaves under forward_mode, its leaves)."""
    f, ws, x = _rnn_second_order_case("LSTM")
    fg, wg, xg = _rnn_second_order_case("GRU")
    q, k, v, s = _attn_scale_case()
    s.requires_grad_()
    q.requires_grad_()
    return [("LSTM", lambda: f(x, None, ws, lengths=[4, 2], bidirectional=False,
                               backend="fused")[0], [x, *ws]),
            ("GRU", lambda: fg(xg, None, wg, lengths=[4, 2], backend="fused")[0], [xg, *wg]),
            ("attention", lambda: attn_ops.cosine_attention(q, k, v, s, [3], backend="fused"),
             [q, s])]


@pytest.mark.parametrize("case", [0, 1, 2], ids=["LSTM", "GRU", "attention"])
@pytest.mark.parametrize("forward_mode", [contextlib.nullcontext, _Passthrough],
                         ids=["eager", "op-forward"])
def test_create_graph_unpacks_saved_tensors_once(case, forward_mode):
    # no_double_backward unpacked ctx.saved_tensors twice under create_graph=True (once in the
    # formula, once for the error node's edges): every saved-tensor hook (CPU offload, say)
    # ran twice per tensor (s28). Each packed tensor is now unpacked at most once.
    name, run, leaves = _second_order_cases()[case]
    packed, unpacked = [], []

    def pack(t):
        packed.append(t)
        return len(packed) - 1

    def unpack(i):
        unpacked.append(i)
        return packed[i]

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack), forward_mode():
        out = run()
    grads = torch.autograd.grad(out.pow(2).sum(), leaves, create_graph=True)
    assert unpacked, name
    twice = sorted({i for i in unpacked if unpacked.count(i) > 1})
    assert not twice, f"{name}: saved tensors {twice} unpacked more than once"
    assert all(g.requires_grad for g in grads)  # the error node is still there
    with pytest.raises(RuntimeError, match=SECOND_ORDER):
        torch.autograd.grad(grads[0].pow(2).sum(), leaves[0])


def test_no_double_backward_asks_for_the_saved_keyword():
    def old_style(ctx, grad):
        return grad

    with pytest.raises(TypeError, match="keyword-only argument `saved`"):
        _eager.no_double_backward(old_style, "Synthetic")


def _synthetic_exp(save: str):
    """exp(x) through an autograd.Function under no_double_backward whose ctx saves none of
    its outputs: `save` "nothing" keeps exp(x) as a plain attribute, "input" saves x."""
    def backward(ctx, grad, *, saved=None):
        saved = ctx.saved_tensors if saved is None else saved
        return grad * (saved[0].detach().exp() if saved else ctx.e)

    def forward(ctx, x):
        y = x.exp()
        if save == "input":
            ctx.save_for_backward(x)
        else:
            ctx.e = y.detach()
        return y

    return type("SyntheticExp", (torch.autograd.Function,), {
        "forward": staticmethod(forward),
        "backward": staticmethod(_eager.no_double_backward(backward, "SyntheticExp"))})


@pytest.mark.parametrize("save", ["nothing", "input"])
def test_no_double_backward_without_a_saved_output_reaches_leaf_inputs(save):
    # An op that saves none of its outputs: the error node used to hang off the saved tensors
    # and grad_outputs only, so with a constant grad_output (a plain .sum()) and nothing saved
    # the gradient came back as a graph-less constant, and a second-order term through it was
    # silently dropped (s28). Its edges now reach the leaf inputs themselves.
    fn = _synthetic_exp(save)
    x = torch.randn(3, dtype=torch.float64, requires_grad=True)
    (gx,) = torch.autograd.grad(fn.apply(x).sum(), [x], create_graph=True)
    torch.testing.assert_close(gx.detach(), x.detach().exp())  # first order: still the value
    assert gx.requires_grad
    with pytest.raises(RuntimeError, match="SyntheticExp: .*no second-order"):
        torch.autograd.grad((gx + x).sum(), [x])  # would silently be ones
    with pytest.raises(RuntimeError, match="SyntheticExp: .*no second-order"):
        gx.sum().backward()
    # without create_graph the formula's own tensor, no node
    (g1,) = torch.autograd.grad(fn.apply(x).sum(), [x])
    assert g1.grad_fn is None


def test_no_double_backward_without_a_saved_output_refuses_an_unreachable_input():
    # a non-leaf input that the op did not save cannot be reached from its backward: a loud
    # error for the op's author at the first create_graph backward, not a lost second-order term
    fn = _synthetic_exp("nothing")
    w = torch.randn(3, dtype=torch.float64, requires_grad=True)
    x = w * 2
    with pytest.raises(RuntimeError, match=r"SyntheticExp: .*cannot reach the op.s tensor input 0.*save_for_backward"):
        torch.autograd.grad(fn.apply(x).sum(), [w], create_graph=True)
    # plain first-order use never looks
    (gw,) = torch.autograd.grad(fn.apply(w * 2).sum(), [w])
    torch.testing.assert_close(gw, 2 * (2 * w.detach()).exp())


# ---------------------------------------------------------------------------------------------
# Vectorised jacobians: torch.autograd.functional.jacobian(vectorize=True) runs the backward
# under PyTorch's legacy vmap (autograd.grad's is_grads_batched), whose BatchedTensors Triton
# cannot read: "Cannot access storage of BatchedTensorImpl" (s28). The backward ops now go to
# their registered op there, which runs per sample. torch.func.jacrev / jacfwd trace the
# forward under a grad / jvp transform, which backend="fused" refuses by name.

def _jacobian_cases():
    g = torch.Generator().manual_seed(5)
    dt = torch.float64
    lstm = [w.detach().to(dt) for w in torch.nn.LSTM(2, 2, bidirectional=True)._flat_weights]
    gru = [w.detach().to(dt) for w in torch.nn.GRU(2, 2, bidirectional=True)._flat_weights]
    x = torch.randn(3, 2, 2, generator=g, dtype=dt)
    q = torch.randn(2, 2, 2, 4, generator=g, dtype=dt)
    k, v = (torch.randn(2, 2, 3, 4, generator=g, dtype=dt) for _ in range(2))
    mk, mv = (torch.randn(2, 1, 4, generator=g, dtype=dt) for _ in range(2))
    ls = torch.tensor([0.5, 1.0], dtype=dt)

    def lstm_f(backend):
        return lambda a: rnn_ops.lstm(a, None, lstm, lengths=[3, 1], bidirectional=True,
                                      backend=backend)[0]

    def gru_f(backend):
        return lambda a: rnn_ops.gru(a, None, gru, lengths=[2, 3], bidirectional=True,
                                     backend=backend)[1]

    def attn_f(backend):
        return lambda a: attn_ops.cosine_attention(a, k, v, ls, [3, 1], 1, mk, mv, backend=backend)

    return {"LSTM": (lstm_f, x), "GRU": (gru_f, x), "attention": (attn_f, q)}


@pytest.mark.parametrize("name", ["LSTM", "GRU", "attention"])
def test_vectorized_jacobian_through_the_fused_ops(name):
    make, a = _jacobian_cases()[name]
    want = torch.autograd.functional.jacobian(make("reference"), a)
    for backend in ("fused", "auto"):
        got = torch.autograd.functional.jacobian(make(backend), a, vectorize=True)
        torch.testing.assert_close(got, want, msg=lambda m: f"{name} {backend}: {m}")
    # autograd.grad(is_grads_batched=True) itself, forward and backward on the eager path
    a = a.clone().requires_grad_()
    out = make("fused")(a)
    basis = torch.eye(out.numel(), dtype=out.dtype)[:5].view(5, *out.shape)
    (rows,) = torch.autograd.grad(out, a, basis, is_grads_batched=True)
    torch.testing.assert_close(rows, want.reshape(out.numel(), *a.shape)[:5])


@pytest.mark.parametrize("name", ["LSTM", "GRU", "attention"])
def test_func_jacobians_name_the_way_out_on_fused_and_work_on_auto(name):
    make, a = _jacobian_cases()[name]
    want = torch.autograd.functional.jacobian(make("reference"), a)
    with pytest.raises(NotImplementedError, match=r"grad \(torch.func.grad / vjp / jacrev\).*"
                                                  r"backend='auto' or 'reference'"):
        torch.func.jacrev(make("fused"))(a)
    with pytest.raises(NotImplementedError, match=r"forward-mode AD.*backend='auto' or 'reference'"):
        torch.func.jacfwd(make("fused"))(a)
    for jac in (torch.func.jacrev, torch.func.jacfwd):
        torch.testing.assert_close(jac(make("auto"))(a), want)


def test_batched_gradients_with_create_graph_raise_instead_of_crashing():
    # is_grads_batched / jacobian(vectorize=True) with create_graph=True through a fused op:
    # the second-order error at once (PyTorch's DelayedError over legacy BatchedTensors
    # segfaults, so the guard must not build it there). In a child process, so that a crash
    # fails this test instead of ending the run.
    import os
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent('''
        import re, sys, torch
        sys.path.insert(0, sys.argv[1])
        import test_ops_eager as t
        for name, (make, a) in t._jacobian_cases().items():
            a = a.clone().requires_grad_()
            out = make("fused")(a)
            basis = torch.eye(out.numel(), dtype=out.dtype)[:3].view(3, *out.shape)
            for call in (lambda: torch.autograd.grad(out, a, basis, is_grads_batched=True,
                                                     create_graph=True),
                         lambda: torch.autograd.functional.jacobian(make("fused"), a,
                                                                    vectorize=True,
                                                                    create_graph=True)):
                try:
                    call()
                except RuntimeError as exc:
                    assert re.search(t.SECOND_ORDER, str(exc)), (name, str(exc))
                else:
                    raise AssertionError(name + ": no error")
        print("ok")
    ''')
    here = os.path.dirname(os.path.abspath(__file__))
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", code, here], capture_output=True, text=True,
                          env=env, timeout=600)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), (
        f"rc {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")


def test_vectorized_hessian_through_a_fused_op_names_the_reference():
    make, a = _jacobian_cases()["attention"]
    with pytest.raises(RuntimeError, match=SECOND_ORDER):
        torch.autograd.functional.hessian(lambda t: make("fused")(t).pow(2).sum(), a,
                                          vectorize=True)
    # torch.autograd.functional.jvp differentiates a vjp (the double-backward route): the
    # message names it
    with pytest.raises(RuntimeError, match=r"no second-order gradients.*its jvp.*backend='reference'"):
        torch.autograd.functional.jvp(make("fused"), a, torch.ones_like(a))
