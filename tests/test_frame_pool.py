"""Masked temporal frame pooling: the C++ / CUDA op against the eager reference, the reference
against a plain loop, gradients (autograd registered in C++), torch.library / torch.compile
integration, bad input, the GPU length-error flag and the CUDA launch constants."""
import gc
import importlib
import itertools
import os
import re
import sys
import warnings

import pytest
import torch

import dtl_fast
from dtl_fast import ops, reference
from dtl_fast.nn import FramePool

from _helpers import DEVICES, REL_TOL, assert_rel_close

fp_ops = importlib.import_module("dtl_fast.ops.frame_pool")  # the module, not the function

MODES = ["mean", "max", "sum", "meanmax"]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
# (2, 9, 2053), (3, 40, 3000): more than one 1024-feature chunk of the CPU forward, the last
# one partial
SHAPES = [(1, 1, 1), (2, 5, 7), (3, 9, 1000), (4, 1, 7), (5, 6, 1), (6, 17, 64),
          (0, 4, 5), (3, 0, 5), (3, 4, 0), (2, 9, 2053), (3, 40, 3000)]
# Whether a test may make a fake tensor on "cuda:1" (FakeTensorMode). On a host whose
# accelerator is CUDA, FakeTensorMode makes a real one-element tensor on each fake CUDA device
# it meets (torch/_subclasses/fake_tensor.py, init_gpu_context), which fails with "invalid
# device ordinal" where there is exactly one GPU. So the other-GPU cases run with no GPU (fake
# tensors only) or with two or more.
FAKE_SECOND_GPU = not torch.cuda.is_available() or torch.cuda.device_count() > 1


def width(D, mode):
    """Columns of the pooled output: meanmax puts mean and max side by side."""
    return 2 * D if mode == "meanmax" else D


def make_lengths(B, T, kind, device="cpu"):
    """Lengths that include an empty row and a full row whenever B allows."""
    if kind == "none":
        return None
    lengths = torch.randint(0, T + 1, (B,))
    if B > 0:
        lengths[0] = T
    if B > 1:
        lengths[1] = 0
    if kind == "list":
        return lengths.tolist()
    if kind == "numpy":
        return lengths.numpy()
    return lengths.to(device)


def loop_pool(x, lengths, mode):
    """The semantics written as the plainest possible loop, in float64."""
    B, T, D = x.shape
    lengths = [T] * B if lengths is None else list(torch.as_tensor(lengths).tolist())
    out = torch.zeros(B, width(D, mode), dtype=torch.float64)
    for b, L in enumerate(lengths):
        if L == 0:
            continue
        frames = x[b, :L].double().cpu()
        pooled = {"mean": frames.mean(0), "max": frames.amax(0), "sum": frames.sum(0)}
        pooled["meanmax"] = torch.cat([pooled["mean"], pooled["max"]])
        out[b] = pooled[mode]
    return out


def pool_with_grads(fn, x, lengths, mode, grad):
    x = x.detach().clone().requires_grad_()
    out = fn(x, lengths, mode)
    out.backward(grad)
    return out, x.grad


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", ["tensor", "list", "numpy", "none"])
def test_reference_matches_plain_loop(mode, kind):
    x = torch.randn(5, 8, 6, dtype=torch.float64)
    lengths = make_lengths(5, 8, kind)
    assert_rel_close("reference", reference.frame_pool(x, lengths, mode), loop_pool(x, lengths, mode), 1e-13)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", ["tensor", "list", "none"])
def test_fused_matches_reference(device, dtype, shape, mode, kind, poison):
    B, T, D = shape
    x = torch.randn(shape, device=device).to(dtype)
    lengths = make_lengths(B, T, kind, device)
    grad = torch.randn(B, width(D, mode), device=device).to(dtype)
    with poison():
        out, gx = pool_with_grads(lambda *a: ops.frame_pool(*a, backend="fused"), x, lengths, mode, grad)
    # Ground truth: the reference in float64 on the same (rounded) input.
    ref, gref = pool_with_grads(reference.frame_pool, x.double(), lengths, mode, grad.double())
    assert out.dtype == dtype and gx.dtype == dtype
    assert_rel_close("output", out, ref, REL_TOL[dtype])
    assert_rel_close("grad x", gx, gref, REL_TOL[dtype])
    if dtype in (torch.float16, torch.bfloat16):
        assert_half_like_the_reference(x, lengths, mode, grad, out, gx)


def assert_half_like_the_reference(x, lengths, mode, grad, out, gx):
    """A half-precision result against the eager reference at the same precision (float32
    accumulation, one rounding: what the kernels promise), with a bound derived from the
    arithmetic, not from a machine: the forward within one unit in the last place plus the
    float32 sum's own error (T x 2^-24 x the sum of |x|: the two sums may add in another
    order); the gradient (g / L, or g at the argmax, rounded once) bit for bit on the CPU, within
    one unit in the last place on a GPU. Both cases round the same float32 number, so a kernel
    that accumulates or rounds in half precision misses by far more."""
    dtype = x.dtype
    base, gbase = pool_with_grads(reference.frame_pool, x, lengths, mode, grad)
    assert_half_forward_like_the_reference(x, mode, out, base)
    eps = torch.finfo(dtype).eps
    if x.device.type == "cpu":
        assert torch.equal(gx, gbase), f"grad x differs from the {dtype} reference"
    else:
        gerr = (gx.float() - gbase.float()).abs()
        assert bool((gerr <= eps * gbase.float().abs() + torch.finfo(dtype).tiny).all())


def assert_half_forward_like_the_reference(x, mode, out, base):
    """The forward part of assert_half_like_the_reference: `out` against `base`, the reference's
    output at x's precision."""
    dtype = x.dtype
    T = x.shape[1]
    eps = torch.finfo(dtype).eps
    acc = x.float().abs().sum(1)
    acc = torch.cat([acc, acc], 1) if mode == "meanmax" else acc
    bound = eps * base.float().abs() + T * 2.0**-24 * acc + torch.finfo(dtype).tiny
    err = (out.float() - base.float()).abs()
    assert bool((err <= bound).all()), (
        f"forward off the {dtype} reference by up to {(err / bound).max().item():.1f} x its bound")


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("mode", MODES)
def test_cpu_forward_is_the_same_on_any_number_of_threads(threads, mode):
    # 16 clips x 3 feature chunks (D 2053: 1024 + 1024 + 5) in tasks that 2 and 3 threads split
    # differently: every thread count gives the one-thread result bit for bit, and that is the
    # reference's.
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(16, 40, 2053, generator=gen)
    lengths = torch.randint(0, 41, (16,), generator=gen)
    lengths[:3] = torch.tensor([0, 1, 40])
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = torch.ops.dtl_fast.frame_pool(x, lengths, mode)
        torch.set_num_threads(threads)
        out = torch.ops.dtl_fast.frame_pool(x, lengths, mode)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(out[0], one[0]) and torch.equal(out[1], one[1])
    assert_rel_close("forward", out[0], reference.frame_pool(x.double(), lengths, mode), 1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", MODES)
def test_empty_rows_give_zeros_and_zero_gradient(device, mode):
    x = torch.randn(3, 4, 5, device=device)
    x[1] = float("nan")  # an empty row must not read its frames at all
    lengths = torch.tensor([4, 0, 2], device=device)
    out, gx = pool_with_grads(ops.frame_pool, x, lengths, mode, torch.ones(3, width(5, mode), device=device))
    assert torch.equal(out[1], torch.zeros(width(5, mode), device=device))
    assert torch.equal(gx[1], torch.zeros(4, 5, device=device))
    assert torch.isfinite(out).all() and torch.isfinite(gx).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", MODES)
def test_padded_frames_are_never_read(device, mode):
    x = torch.randn(2, 6, 9, device=device)
    lengths = torch.tensor([2, 5], device=device)
    clean = ops.frame_pool(x, lengths, mode)
    x[0, 2:] = float("nan")
    x[1, 5:] = float("inf")
    assert torch.equal(ops.frame_pool(x, lengths, mode), clean)


@pytest.mark.parametrize("device", DEVICES)
def test_max_sends_gradient_to_first_maximum(device):
    x = torch.zeros(2, 5, 3, device=device)
    x[0, 1] = 1.0
    x[0, 3] = 1.0  # a later tie gets nothing
    lengths = torch.tensor([5, 4], device=device)
    out, gx = pool_with_grads(ops.frame_pool, x, lengths, "max", torch.ones(2, 3, device=device))
    expected = torch.zeros(2, 5, 3, device=device)
    expected[0, 1] = 1.0
    expected[1, 0] = 1.0  # all-equal row: the first valid frame
    assert torch.equal(out, torch.tensor([[1.0] * 3, [0.0] * 3], device=device))
    assert torch.equal(gx, expected)
    # Frames that are all -inf still have a first maximum (torch.max agrees).
    x = torch.full((2, 4, 3), float("-inf"), device=device)
    lengths = torch.tensor([3, 1], device=device)
    out, gx = pool_with_grads(ops.frame_pool, x, lengths, "max", torch.ones(2, 3, device=device))
    ref, gref = pool_with_grads(reference.frame_pool, x, lengths, "max", torch.ones(2, 3, device=device))
    assert torch.equal(out, ref) and torch.equal(gx, gref)
    assert gx[:, 0].eq(1).all() and gx[:, 1:].eq(0).all()


@pytest.mark.parametrize("device", DEVICES)
def test_max_propagates_nan_like_amax(device):
    x = torch.randn(3, 6, 4, device=device)
    x[0, 2, 1] = float("nan")
    x[0, 4, 1] = float("nan")
    x[1, 5, 2] = float("nan")  # padded for row 1: ignored
    lengths = torch.tensor([6, 5, 6], device=device)
    out, gx = pool_with_grads(ops.frame_pool, x, lengths, "max", torch.ones(3, 4, device=device))
    ref, gref = pool_with_grads(reference.frame_pool, x, lengths, "max", torch.ones(3, 4, device=device))
    assert torch.isnan(out[0, 1]) and torch.isfinite(out[1]).all()
    assert torch.equal(torch.isnan(out), torch.isnan(x[0:1, :6].amax(1)).expand(3, 4) & (torch.arange(3, device=device) == 0)[:, None])
    assert torch.allclose(out, ref, equal_nan=True)
    assert gx[0, 2, 1] == 1 and gx[0, 4, 1] == 0  # the first NaN takes the gradient
    assert torch.equal(gx, gref)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("path", ["fused", "stock"])
def test_half_types_accumulate_in_float32(device, path):
    # 4096 ones: a float16 accumulator stops at 2048 (bfloat16 at 256), a float32 one reaches
    # 4096 exactly; 4099 (not a multiple of the 4 frames the CPU loop adds at once) runs its tail
    # too; meanmax has its own loop. 4099 rounds to 4100 in float16 and 4096 in bfloat16: the
    # exact sum rounded once. "stock" is what auto may run without lengths
    # (_stock_all_frames): its sum is x.sum(1) for half inputs too, which holds only while ATen
    # sums them in float32 and rounds once; its mean sums in float32 explicitly (x.mean(1)
    # would round the half sum before it divides).
    def pool(x, mode):
        if path == "stock":
            return fp_ops._stock_all_frames(x, mode)
        return ops.frame_pool(x, None, mode, backend="fused")

    for dtype in (torch.float16, torch.bfloat16):
        for T in (4096, 4099):
            x = torch.ones(2, T, 3, dtype=dtype, device=device)
            once = torch.tensor(float(T)).to(dtype).item()
            assert pool(x, "sum").float().tolist() == [[once] * 3] * 2
            assert pool(x, "mean").float().tolist() == [[1.0] * 3] * 2
            assert pool(x, "meanmax").float().tolist() == [[1.0] * 6] * 2


def _layouts(B, T, D, device):
    base = torch.randn(B, T, D + 3, device=device)
    yield "feature slice", base[:, :, 2 : 2 + D]
    yield "time-major", torch.randn(T, B, D, device=device).transpose(0, 1)
    yield "feature-strided", torch.randn(B, D, T, device=device).transpose(1, 2)
    yield "every other frame", torch.randn(B, 2 * T, D, device=device)[:, ::2]
    yield "expanded", torch.randn(1, T, D, device=device).expand(B, T, D)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", MODES)
def test_non_contiguous_inputs(device, mode):
    B, T, D = 4, 7, 12
    lengths = torch.tensor([7, 0, 3, 5], device=device)
    grad = torch.randn(B, width(D, mode), device=device)
    for name, x in _layouts(B, T, D, device):
        out, gx = pool_with_grads(ops.frame_pool, x, lengths, mode, grad)
        ref, gref = pool_with_grads(reference.frame_pool, x.double(), lengths, mode, grad.double())
        assert_rel_close(f"{name} output", out, ref, 1e-6)
        assert_rel_close(f"{name} grad", gx, gref, 1e-6)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("backend", ["fused", "reference"])
@pytest.mark.parametrize("T", [5, 0])
def test_gradcheck_float64(mode, backend, T):
    x = torch.randn(3, T, 4, dtype=torch.float64, requires_grad=True)
    lengths = torch.tensor([T, 0, min(2, T)])
    fn = lambda t: ops.frame_pool(t, lengths, mode, backend=backend)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x,))
    assert torch.autograd.gradgradcheck(fn, (x,))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.int32, torch.uint8, torch.int16, torch.int64], ids=str)
def test_lengths_dtypes_and_layouts(device, dtype):
    x = torch.randn(4, 6, 3, device=device)
    base = torch.tensor([[6, 9], [0, 9], [2, 9], [5, 9]], dtype=dtype)[:, 0]  # non-contiguous
    assert not base.is_contiguous()
    expected = loop_pool(x, [6, 0, 2, 5], "mean")
    for lengths in (base, base.to(device), list(base), base.numpy()):
        for backend in ("fused", "reference"):
            out = ops.frame_pool(x, lengths, "mean", backend=backend)
            assert_rel_close(f"{type(lengths).__name__} {backend}", out, expected, 1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("with_lengths", [True, False])
def test_opcheck(device, mode, requires_grad, with_lengths):
    x = torch.randn(3, 6, 5, device=device, requires_grad=requires_grad)
    lengths = torch.tensor([6, 0, 4], device=device) if with_lengths else None
    torch.library.opcheck(torch.ops.dtl_fast.frame_pool.default, (x, lengths, mode))
    # with_argmax=False (what ops.frame_pool passes): no argmax unless autograd records the call
    torch.library.opcheck(torch.ops.dtl_fast.frame_pool.default, (x, lengths, mode, False))
    grad = torch.randn(3, width(5, mode), device=device, requires_grad=requires_grad)
    _, am = torch.ops.dtl_fast.frame_pool(x.detach(), lengths, mode)
    torch.library.opcheck(torch.ops.dtl_fast.frame_pool_backward.default, (grad, lengths, am, 6, mode))


@pytest.mark.parametrize("mode", ["mean", "max", "meanmax"])
def test_torch_compile_fullgraph(mode):
    torch._dynamo.reset()
    pool = FramePool(mode)
    compiled = torch.compile(pool, fullgraph=True, backend="aot_eager")
    x = torch.randn(4, 6, 5)
    lengths = torch.tensor([6, 1, 0, 3])
    grad = torch.randn(4, 10 if mode == "meanmax" else 5)
    out, gx = pool_with_grads(lambda t, L, _: compiled(t, L), x, lengths, mode, grad)
    ref, gref = pool_with_grads(lambda t, L, _: pool(t, L), x, lengths, mode, grad)
    assert torch.equal(out, ref) and torch.equal(gx, gref)


def test_torch_jit_script_raises_a_clear_error():
    # TorchScript cannot compile the module (Python-side checks, custom ops): the error names
    # the module and the ways that work, not a compiler error inside dtl_fast's source;
    # jit.trace still works
    import warnings

    from dtl_fast.nn import NotScriptableError

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.pool = FramePool("mean")

        def forward(self, x):
            return self.pool(x)

    for model in (FramePool("max"), Model()):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.jit.script is deprecated in recent torch
            with pytest.raises(NotScriptableError, match=r"dtl_fast\.nn\.FramePool is not "
                               r"scriptable.*torch\.compile, torch\.export or torch\.jit\.trace"):
                torch.jit.script(model)
    x = torch.randn(2, 3, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(Model(), (x,))
    assert torch.equal(traced(x), x.mean(1))


def test_torch_compile_dynamic_shapes():
    torch._dynamo.reset()
    pool = FramePool("max")
    compiled = torch.compile(pool, fullgraph=True, backend="aot_eager", dynamic=True)
    for B, T, D in [(3, 5, 4), (6, 9, 7), (2, 1, 3)]:
        x = torch.randn(B, T, D)
        lengths = torch.randint(0, T + 1, (B,))
        grad = torch.randn(B, D)
        out, gx = pool_with_grads(lambda t, L, _: compiled(t, L), x, lengths, "max", grad)
        ref, gref = pool_with_grads(reference.frame_pool, x, lengths, "max", grad)
        assert torch.equal(out, ref) and torch.equal(gx, gref)


@pytest.mark.parametrize("backend", ["fused", "reference"])
def test_torch_compile_fullgraph_numpy_lengths(backend):
    # NumPy lengths trace in one graph, and the compiled call owns a copy too: a buffer refilled
    # before the backward does not change the gradient.
    np = pytest.importorskip("numpy")
    torch._dynamo.reset()
    compiled = torch.compile(lambda t, L: ops.frame_pool(t, L, "meanmax", backend=backend),
                             fullgraph=True, backend="aot_eager")
    x = torch.randn(3, 5, 4)
    grad = torch.randn(3, 8)
    eager = lambda t, L, mode: ops.frame_pool(t, L, mode, backend=backend)  # noqa: E731
    ref, gref = pool_with_grads(eager, x, [5, 2, 0], "meanmax", grad)
    for _ in range(2):
        lengths = np.array([5, 2, 0])
        xg = x.clone().requires_grad_()
        out = compiled(xg, lengths)
        lengths[:] = [1, 1, 1]
        (gx,) = torch.autograd.grad(out, xg, grad)
        assert torch.equal(out, ref) and torch.equal(gx, gref)


def test_torch_export_with_a_dynamic_frame_count():
    # The fake kernel bounds no symbolic size: an unbounded Dim("T") exports.
    from torch.export import Dim, export

    class Pool(torch.nn.Module):
        def forward(self, x, lengths):
            return FramePool("max", backend="fused")(x, lengths)

    ep = export(Pool(), (torch.randn(2, 5, 3), torch.tensor([5, 2])),
                dynamic_shapes=({0: Dim("B"), 1: Dim("T"), 2: Dim("D")}, {0: Dim("B")}))
    x, lengths = torch.randn(3, 9, 4), torch.tensor([9, 0, 4])
    assert torch.equal(ep.module()(x, lengths), reference.frame_pool(x, lengths, "max"))


def test_framepool_module_modes():
    x = torch.randn(3, 5, 4)
    lengths = [5, 2, 0]
    mm = FramePool("meanmax")(x, lengths)
    assert mm.shape == (3, 8)
    assert torch.equal(mm[:, :4], FramePool("mean")(x, lengths))
    assert torch.equal(mm[:, 4:], FramePool("max")(x, lengths))
    assert "meanmax" in repr(FramePool("meanmax"))
    with pytest.raises(ValueError, match="mode"):
        FramePool("median")
    with pytest.raises(ValueError, match="backend"):
        FramePool("mean", backend="cudnn")


def test_backend_choice(monkeypatch):
    x = torch.randn(2, 3, 4)
    x.requires_grad_()
    node = lambda out: out.grad_fn.name()  # noqa: E731
    # The registered op shows up as its own (C++) autograd node; the reference is plain autograd.
    assert "FramePoolFunction" in node(ops.frame_pool(x, None))
    monkeypatch.setenv("DTL_FAST_BACKEND", "reference")
    assert "FramePoolFunction" not in node(ops.frame_pool(x, None))
    assert "FramePoolFunction" in node(ops.frame_pool(x, None, backend="fused"))
    monkeypatch.setenv("DTL_FAST_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="DTL_FAST_BACKEND"):
        ops.frame_pool(x, None)
    monkeypatch.delenv("DTL_FAST_BACKEND")
    # Without a compiled kernel, "auto" falls back to the reference and "fused" says why.
    monkeypatch.setattr(dtl_fast._extension, "has_kernel", lambda op, device: False)
    assert torch.equal(ops.frame_pool(x, [3, 1]), reference.frame_pool(x, [3, 1]))
    with pytest.raises(RuntimeError, match="dtl_fast._C"):
        ops.frame_pool(x, [3, 1], backend="fused")


BAD_INPUTS = [
    ("lengths > T", lambda x: (x, torch.tensor([2, 9, 1])), "lengths"),
    ("lengths < 0", lambda x: (x, torch.tensor([2, -1, 1])), "lengths"),
    ("float lengths", lambda x: (x, torch.tensor([2.0, 1.0, 1.0])), "lengths"),
    ("float in list", lambda x: (x, [2, 1.5, 1]), "lengths"),
    ("bool lengths", lambda x: (x, torch.tensor([True, False, True])), "lengths"),
    ("B mismatch", lambda x: (x, torch.tensor([1, 2])), "lengths"),
    ("2-D lengths", lambda x: (x, torch.tensor([[1, 2, 3]])), "lengths"),
    ("x rank 2", lambda x: (x[0], None), r"frame_pool: x must be a 3-D tensor"),
    ("x rank 4", lambda x: (x[None], None), r"frame_pool: x must be a 3-D tensor"),
    ("integer x", lambda x: (x.long(), None), r"frame_pool: x must be float32"),
    ("float numpy lengths", lambda x: (x, __import__("numpy").array([2.0, 1.0, 1.0])), "lengths"),
    ("object numpy lengths", lambda x: (x, __import__("numpy").array([2, 1, 1], dtype=object)),
     "lengths"),
    # int64 is what the kernels count in: 2^64 - 1 must not wrap into a "-1" in the message
    ("uint64 lengths >= 2^63", lambda x: (x, torch.tensor([2**64 - 1, 1, 1], dtype=torch.uint64)),
     "lengths must fit in int64, got 18446744073709551615"),
]
# The cases the registered op itself sees (it takes lengths as a tensor or None).
TENSOR_BAD_INPUTS = [c for c in BAD_INPUTS
                     if c[0] not in ("float in list", "float numpy lengths", "object numpy lengths")]
# ... and those its fake kernel sees too (no values: shapes and dtypes only).
FAKE_BAD_INPUTS = [c for c in TENSOR_BAD_INPUTS
                   if c[0] not in ("lengths > T", "lengths < 0", "uint64 lengths >= 2^63")]


@pytest.mark.parametrize("backend", ["fused", "reference"])
@pytest.mark.parametrize("case", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_is_a_clear_value_error(backend, case):
    _, make, name = case
    x, lengths = make(torch.randn(3, 4, 5))
    with pytest.raises(ValueError, match=name):
        ops.frame_pool(x, lengths, "mean", backend=backend)
    with pytest.raises(ValueError, match="mode"):
        ops.frame_pool(torch.randn(3, 4, 5), None, "median", backend=backend)


@pytest.mark.parametrize("case", TENSOR_BAD_INPUTS, ids=[c[0] for c in TENSOR_BAD_INPUTS])
def test_registered_op_checks_its_own_arguments(case):
    # Calling torch.ops.dtl_fast.* directly skips the Python checks; the C++ ones still hold.
    _, make, name = case
    x, lengths = make(torch.randn(3, 4, 5))
    with pytest.raises(ValueError, match=name):
        torch.ops.dtl_fast.frame_pool(x, lengths, "mean")
    with pytest.raises(ValueError, match="mode"):
        torch.ops.dtl_fast.frame_pool(torch.randn(3, 4, 5), None, "median")
    with pytest.raises(ValueError, match="argmax"):
        torch.ops.dtl_fast.frame_pool_backward(torch.randn(3, 5), None, torch.zeros(3, 5), 4, "max")


def test_registered_ops_check_the_frame_count():
    # T above the kernels' int32 frame indices (2^31 - 4097) is refused by the compiled ops
    # themselves, not only by their fake kernels: an expanded x of 2^31 frames costs no memory.
    big = torch.zeros(1, 1, 2).expand(1, 2**31, 2)
    for mode in MODES:
        with pytest.raises(ValueError, match=r"T must be <= 2\^31 - 4097"):
            torch.ops.dtl_fast.frame_pool(big, None, mode)
        with pytest.raises(ValueError, match=r"T must be <= 2\^31 - 4097"):
            ops.frame_pool(big, None, mode, backend="fused")
    no_argmax = torch.empty(0, dtype=torch.int32)
    for T in (-1, 2**31):
        with pytest.raises(ValueError, match="T must lie in"):
            torch.ops.dtl_fast.frame_pool_backward(torch.ones(3, 5), None, no_argmax, T, "mean")
    # and the backward's own grad_out checks (the fake kernel's are tested below)
    with pytest.raises(ValueError, match="frame_pool_backward: grad_out must be"):
        torch.ops.dtl_fast.frame_pool_backward(torch.ones(3, 5, 1), None, no_argmax, 4, "mean")
    with pytest.raises(ValueError, match="frame_pool_backward: grad_out must be float32, "
                                         "float64, float16 or bfloat16, got torch.int64"):
        torch.ops.dtl_fast.frame_pool_backward(torch.ones(3, 5, dtype=torch.int64), None,
                                               no_argmax, 4, "mean")
    with pytest.raises(ValueError, match=r"\[B, 2D\]"):
        torch.ops.dtl_fast.frame_pool_backward(torch.ones(3, 5), None,
                                               torch.zeros(3, 2, dtype=torch.int32), 4, "meanmax")


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.complex64],
                         ids=str)
def test_dtype_errors_read_the_same_from_kernel_and_fake_kernel(dtype):
    # The C++ kernel (CPU here; the CUDA kernel runs the same check) and the fake kernel
    # (meta / fake tensors: torch.compile, export) word a dtype error identically, naming the
    # argument, the dtypes it takes and the one it got as Python spells it.
    from torch._subclasses.fake_tensor import FakeTensorMode

    def message(call):
        with pytest.raises(ValueError) as err:
            call()
        return str(err.value)

    def grad_out_call(device):
        g = torch.ones(3, 5, device=device).to(dtype)
        am = torch.empty(0, dtype=torch.int32, device=device)
        return lambda: torch.ops.dtl_fast.frame_pool_backward(g, None, am, 4, "mean")

    def x_call(device):
        x = torch.ones(3, 4, 5, device=device).to(dtype)
        return lambda: torch.ops.dtl_fast.frame_pool(x, None, "mean")

    def argmax_call(device):
        g = torch.ones(3, 5, device=device)
        am = torch.zeros(3, 5, device=device).to(dtype)
        return lambda: torch.ops.dtl_fast.frame_pool_backward(g, None, am, 4, "max")

    name = str(dtype)
    for call, want in (
            (grad_out_call, lambda device: "frame_pool_backward: grad_out must be float32, "
                                           f"float64, float16 or bfloat16, got {name}"),
            (x_call, lambda device: "frame_pool: x must be float32, float64, float16 or "
                                    f"bfloat16, got {name}"),
            (argmax_call, lambda device: "frame_pool_backward: argmax must be an int32 tensor "
                                         f"[B, D] = [3, 5] on {device}, got {name} [3, 5] on "
                                         f"{device}")):
        if call is argmax_call and dtype == torch.int32:  # the dtype argmax takes
            call("cpu")()
            call("meta")()
            continue
        kernel = message(call("cpu"))
        fake = message(call("meta"))
        with FakeTensorMode():
            fake_tensor = message(call("cpu"))
        assert (kernel, fake, fake_tensor) == (want("cpu"), want("meta"), want("cpu"))


# Every dtype torch has: the bit-packed, sub-byte, float8 and quantized ones too.
ALL_TORCH_DTYPES = sorted({v for v in vars(torch).values() if isinstance(v, torch.dtype)},
                          key=str)
# at::isIntegralType(dtype, includeBool=false): what the C++ kernels take as lengths
KERNEL_LENGTH_DTYPES = {torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64,
                        torch.uint16, torch.uint32, torch.uint64}


@pytest.mark.parametrize("dtype", ALL_TORCH_DTYPES, ids=str)
def test_kernel_and_fake_kernel_take_the_same_lengths_dtypes(dtype):
    # Lengths the C++ kernel rejects, the fake kernel rejects too, with the same ValueError,
    # so a traced graph does not accept them and then fail when it first runs (the fake kernel
    # once let torch.bits8 or torch.int4 through: neither floating nor complex); those it
    # takes, the fake kernel takes. Quantized lengths reach neither kernel: the dispatcher has none
    # for them, on either device.
    from torch._subclasses.fake_tensor import FakeTensorMode

    quantized = str(dtype).startswith(("torch.qint", "torch.quint"))

    def outcomes(device):
        with warnings.catch_warnings():  # complex32 / bcomplex32 "experimental", quantized
            warnings.simplefilter("ignore", UserWarning)  # "deprecated"
            lengths = (torch.empty if quantized else torch.zeros)(3, dtype=dtype, device=device)
        x = torch.zeros(3, 4, 5, device=device)
        g = torch.zeros(3, 5, device=device)
        am = torch.zeros(3, 5, dtype=torch.int32, device=device)
        got = {}
        for op, call in (
                ("frame_pool", lambda: torch.ops.dtl_fast.frame_pool(x, lengths, "max")),
                ("frame_pool_backward",
                 lambda: torch.ops.dtl_fast.frame_pool_backward(g, lengths, am, 4, "max"))):
            try:
                call()
                got[op] = "accepted"
            except ValueError as e:
                got[op] = str(e)
            except NotImplementedError as e:  # no kernel for the dispatch key (Quantized*)
                got[op] = "no kernel" if "Quantized" in str(e) else str(e)
        return got

    want = {op: "accepted" if dtype in KERNEL_LENGTH_DTYPES else "no kernel" if quantized
            else f"{op}: lengths must be an integer tensor, got dtype {dtype}"
            for op in ("frame_pool", "frame_pool_backward")}
    assert outcomes("cpu") == want
    assert outcomes("meta") == want
    if not quantized:  # FakeTensorMode makes no quantized tensors
        with FakeTensorMode():
            assert outcomes("cpu") == want


def test_lengths_errors_read_the_same_from_kernel_and_fake_kernel():
    # The lengths' shape error, forward and backward, in the same words from the C++ kernel and
    # the fake kernel (the device error is worded alike too: the fake-kernel side is
    # test_fake_kernels_check_the_lengths_device, the kernel side a gpu test).
    from torch._subclasses.fake_tensor import FakeTensorMode

    def messages(device):
        x = torch.zeros(3, 4, 5, device=device)
        g = torch.zeros(3, 5, device=device)
        am = torch.zeros(3, 5, dtype=torch.int32, device=device)
        got = []
        for lengths in (torch.zeros(2, dtype=torch.int64, device=device),
                        torch.zeros(3, 1, dtype=torch.int32, device=device)):
            for call in (lambda: torch.ops.dtl_fast.frame_pool(x, lengths, "max"),
                         lambda: torch.ops.dtl_fast.frame_pool_backward(g, lengths, am, 4,
                                                                        "max")):
                with pytest.raises(ValueError) as err:
                    call()
                got.append(str(err.value))
        return got

    want = [f"{op}: lengths must have shape [B] = [3], got {shape}"
            for shape in ("[2]", "[3, 1]") for op in ("frame_pool", "frame_pool_backward")]
    assert messages("cpu") == want
    assert messages("meta") == want
    with FakeTensorMode():
        assert messages("cpu") == want


def test_argument_errors_read_the_same_from_kernel_and_fake_kernel():
    # Every other argument error of both ops in one wording from the C++ kernel and the fake
    # kernel (the mode error once named frame_pool in the backward and listed the modes another
    # way, meanmax's odd width and the shapes were printed differently); on meta tensors the
    # same words, with the device they name.
    from torch._subclasses.fake_tensor import FakeTensorMode

    def messages(device):
        x = torch.zeros(3, 4, 5, device=device)
        g = torch.zeros(3, 5, device=device)
        am = torch.zeros(3, 5, dtype=torch.int32, device=device)
        fwd, bwd = torch.ops.dtl_fast.frame_pool, torch.ops.dtl_fast.frame_pool_backward
        calls = {
            "mode": lambda: fwd(x, None, "median"),
            "backward mode": lambda: bwd(g, None, am, 4, "median"),
            "meanmax width": lambda: bwd(torch.zeros(3, 7, device=device), None, am, 4, "meanmax"),
            "x rank": lambda: fwd(x[0], None, "mean"),
            "x dtype": lambda: fwd(x.long(), None, "mean"),
            "grad_out rank": lambda: bwd(x, None, am, 4, "mean"),
            "grad_out dtype": lambda: bwd(g.long(), None, am, 4, "mean"),
            "T": lambda: bwd(g, None, am, -1, "mean"),
            "argmax dtype": lambda: bwd(g, None, am.long(), 4, "max"),
            "argmax shape": lambda: bwd(g, None, am[:2], 4, "max"),
        }
        got = {}
        for what, call in calls.items():
            with pytest.raises(ValueError) as err:
                call()
            got[what] = str(err.value)
        return got

    kernel = messages("cpu")
    assert kernel["mode"] == ("frame_pool: mode must be one of 'mean', 'max', 'sum', 'meanmax', "
                              "got 'median'")
    assert kernel["backward mode"].startswith("frame_pool_backward: mode must be one of")
    assert kernel["meanmax width"] == ("frame_pool_backward: grad_out of 'meanmax' must be "
                                       "[B, 2D], got width 7")
    assert kernel["x rank"] == "frame_pool: x must be a 3-D tensor [B, T, D], got shape [4, 5]"
    with FakeTensorMode():
        assert messages("cpu") == kernel
    assert {k: v.replace("meta", "cpu") for k, v in messages("meta").items()} == kernel
    # the public entry (every backend's shared check) words x's rank error alike
    with pytest.raises(ValueError) as err:
        ops.frame_pool(torch.zeros(4, 5), None, "mean", backend="reference")
    assert str(err.value) == kernel["x rank"]


@pytest.mark.parametrize("case", FAKE_BAD_INPUTS, ids=[c[0] for c in FAKE_BAD_INPUTS])
def test_fake_kernels_check_what_the_kernels_check(case):
    # A direct torch.ops call that the kernel would reject fails while it is traced (meta / fake
    # tensors), with the kernel's ValueError, not only when the graph first runs.
    _, make, name = case
    x, lengths = make(torch.randn(3, 4, 5, device="meta"))
    with pytest.raises(ValueError, match=name):
        torch.ops.dtl_fast.frame_pool(x, lengths, "mean")
    xm = torch.randn(3, 4, 5, device="meta")
    with pytest.raises(ValueError, match="mode"):
        torch.ops.dtl_fast.frame_pool(xm, None, "median")
    bwd = torch.ops.dtl_fast.frame_pool_backward
    g = torch.randn(3, 10, device="meta")
    am = torch.zeros(3, 5, dtype=torch.int32, device="meta")
    with pytest.raises(ValueError, match="argmax"):
        bwd(g[:, :5], None, am.float(), 4, "max")
    with pytest.raises(ValueError, match="argmax"):
        bwd(g, None, am[:, :4], 4, "meanmax")
    with pytest.raises(ValueError, match=r"argmax .* on meta, got torch.int32 \[3, 5\] on cpu"):
        bwd(g[:, :5], None, torch.zeros(3, 5, dtype=torch.int32), 4, "max")
    with pytest.raises(ValueError, match=r"\[B, 2D\]"):
        bwd(g[:, :9], None, am, 4, "meanmax")
    with pytest.raises(ValueError, match="T must"):
        bwd(g[:, :5], None, am, -1, "mean")
    with pytest.raises(ValueError, match="lengths"):
        bwd(g[:, :5], torch.tensor([1, 2]), am, 4, "mean")
    assert bwd(g, torch.tensor([1, 2, 3]), am, 4, "meanmax").shape == (3, 4, 5)


@pytest.mark.parametrize("backend", ["auto", "fused", "reference"])
def test_meta_tensors_give_shapes(backend):
    # Shape inference on the meta device (as under `with torch.device("meta")`): every backend
    # gives the output and gradient shapes; auto and reference still check CPU lengths' values.
    x = torch.empty(4, 6, 5, device="meta", requires_grad=True)
    for lengths in (None, [1, 6, 0, 2], torch.tensor([1, 6, 0, 2]),
                    torch.empty(4, dtype=torch.int64, device="meta")):
        for mode, w in (("mean", 5), ("meanmax", 10)):
            out = ops.frame_pool(x, lengths, mode, backend=backend)
            assert out.shape == (4, w) and out.device.type == "meta"
            (gx,) = torch.autograd.grad(out.sum(), x)
            assert gx.shape == x.shape and gx.device.type == "meta"
    if backend != "fused":  # the fake kernel reads no values
        with pytest.raises(ValueError, match="lengths"):
            ops.frame_pool(x, torch.tensor([1, 9, 0, 2]), "mean", backend=backend)
    with torch.device("meta"):
        out = FramePool("max", backend=backend)(torch.empty(2, 3, 4), [1, 3])
    assert out.shape == (2, 4) and out.device.type == "meta"


@pytest.mark.parametrize("backend", ["fused", "reference"])
def test_numpy_lengths_are_copied(backend):
    # A reused NumPy buffer refilled between forward and backward (a data loader's per-batch
    # array) must not change the gradient: the op owns a copy.
    np = pytest.importorskip("numpy")
    x = torch.randn(2, 4, 3, requires_grad=True)
    lengths = np.array([4, 2])
    out = ops.frame_pool(x, lengths, "meanmax", backend=backend)
    lengths[:] = [1, 1]
    (gx,) = torch.autograd.grad(out, x, torch.ones_like(out))
    _, gref = pool_with_grads(reference.frame_pool, x.detach(), [4, 2], "meanmax", torch.ones(2, 6))
    assert torch.equal(gx, gref)
    # Layouts torch.from_numpy refuses or warns about: reversed, big-endian, read-only.
    base = np.array([2, 3])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for arr in (base[::-1], base.astype(">i8"), np.broadcast_to(np.array([2]), (2,))):
            expected = reference.frame_pool(x.detach(), [int(v) for v in arr], "mean")
            assert torch.equal(ops.frame_pool(x.detach(), arr, "mean", backend=backend), expected)


def test_saved_lengths_written_in_place_is_autograd_s_error():
    # The compiled op keeps a lengths tensor for its backward as autograd keeps any saved input:
    # an in-place write before the backward is the usual version-counter error, not a wrong
    # gradient (the docstring says so).
    x = torch.randn(2, 4, 3, requires_grad=True)
    lengths = torch.tensor([4, 2])
    out = ops.frame_pool(x, lengths, "mean", backend="fused")
    lengths.fill_(1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_without_lengths_is_bit_stable(dtype):
    # The README's promise for bit-for-bit results: under `fused`, without lengths too (where
    # `auto` may take torch's x.sum(1) / x.amax(1) at sizes its rows measured faster: float32
    # mean with a gradient from 256 KiB, which rounds differently), meanmax equals
    # cat([mean, max]) and a call with a gradient gives the bits of one without, and of the
    # same call with every length T
    torch.manual_seed(0)
    x = torch.randn(16, 16, 512, dtype=dtype)  # 512 KiB in float32
    xg = x.clone().requires_grad_()
    full = [16] * 16
    for lengths in (None, full):
        mm = ops.frame_pool(xg, lengths, "meanmax", backend="fused")
        for mode in ("mean", "max", "sum"):
            with_grad = ops.frame_pool(xg, lengths, mode, backend="fused")
            with torch.no_grad():
                without = ops.frame_pool(x, lengths, mode, backend="fused")
            assert torch.equal(with_grad, without), (mode, lengths)
            assert torch.equal(with_grad, ops.frame_pool(x, full, mode, backend="fused")), mode
        assert torch.equal(mm, torch.cat([ops.frame_pool(xg, lengths, "mean", backend="fused"),
                                          ops.frame_pool(xg, lengths, "max", backend="fused")], -1))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("backend", ["auto", "fused", "reference"])
def test_lengths_made_under_inference_mode(mode, backend):
    # Lengths from a data pipeline run under torch.inference_mode, pooled with gradients: the
    # C++ op saved the caller's tensor for the backward, which autograd refuses for an
    # inference tensor ("Inference tensors cannot be saved for backward", at the forward; the
    # reference took it; review s31). It keeps a copy of such a tensor: the reference's
    # gradients, the second order too.
    with torch.inference_mode():
        lengths = torch.tensor([5, 3, 0])
    x = torch.randn(3, 5, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 8 if mode == "meanmax" else 4, dtype=torch.float64, requires_grad=True)
    v = torch.randn_like(x)
    out = ops.frame_pool(x, lengths, mode, backend=backend)
    want = reference.frame_pool(x, lengths.clone(), mode)
    assert torch.equal(out, want) if mode == "max" else torch.allclose(out, want)
    (gx,) = torch.autograd.grad((out * w).sum(), x, create_graph=True)
    (gwant,) = torch.autograd.grad((want * w).sum(), x, create_graph=True)
    assert torch.allclose(gx, gwant)
    # the gradient's own backward (the saved lengths again), with respect to the weights w
    (gw,) = torch.autograd.grad((gx * v).sum(), w)
    (gwwant,) = torch.autograd.grad((gwant * v).sum(), w)
    assert torch.allclose(gw, gwwant)
    # compiled: AOTAutograd saves the graph's input itself (the op copies it there)
    torch._dynamo.reset()
    compiled = torch.compile(lambda x, lengths: ops.frame_pool(x, lengths, mode, backend=backend),
                             backend="aot_eager")
    out = compiled(x, lengths)
    (gx,) = torch.autograd.grad((out * w).sum(), x)
    assert torch.allclose(out, want) and torch.allclose(gx, gwant)
    torch._dynamo.reset()


def test_framepool_checks_mode_and_backend_when_set():
    import pickle

    pool = FramePool("max", backend="reference")
    with pytest.raises(ValueError, match="backend"):
        pool.backend = "fast"
    with pytest.raises(ValueError, match="mode"):
        pool.mode = "min"
    assert (pool.mode, pool.backend) == ("max", "reference")
    pool.mode, pool.backend = "meanmax", None
    assert pool(torch.ones(2, 3, 4), [1, 3]).shape == (2, 8)
    copy = pickle.loads(pickle.dumps(pool))
    assert (copy.mode, copy.backend) == ("meanmax", None)
    # A FramePool pickled before mode / backend were checked properties kept them in __dict__.
    state = dict(pool.__dict__)
    state["mode"], state["backend"] = state.pop("_mode"), state.pop("_backend")
    old = FramePool.__new__(FramePool)
    old.__setstate__(state)
    assert (old.mode, old.backend) == ("meanmax", None)
    assert torch.equal(old(torch.ones(2, 3, 4), [1, 3]), pool(torch.ones(2, 3, 4), [1, 3]))


@pytest.mark.gpu
def test_lengths_on_another_device_is_rejected():
    x = torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match="lengths"):
        ops.frame_pool(x, torch.tensor([1, 2], device="cuda"))
    if torch.cuda.device_count() > 1:
        with pytest.raises(ValueError, match="lengths"):
            ops.frame_pool(x.to("cuda:0"), torch.tensor([1, 2], device="cuda:1"))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", [(64, 64, 1024), (256, 32, 2048), (4, 4096, 512), (3, 333, 1001)],
                         ids=lambda s: "x".join(map(str, s)))
def test_cuda_real_sizes(dtype, mode, shape, poison):
    B, T, D = shape
    x = torch.randn(shape, device="cuda", dtype=dtype)
    lengths = torch.randint(1, T + 1, (B,), device="cuda")
    lengths[0] = 0
    grad = torch.randn(B, width(D, mode), device="cuda", dtype=dtype)
    with poison():
        out, gx = pool_with_grads(lambda *a: ops.frame_pool(*a, backend="fused"), x, lengths, mode, grad)
    ref, gref = pool_with_grads(reference.frame_pool, x.double(), lengths, mode, grad.double())
    assert_rel_close("output", out, ref, REL_TOL[dtype])
    assert_rel_close("grad x", gx, gref, REL_TOL[dtype])
    # CPU lengths with CUDA x take the same path.
    assert torch.equal(ops.frame_pool(x, lengths.cpu(), mode), out)


@pytest.mark.parametrize("device", DEVICES)
def test_max_backward_never_writes_padded_frames(device):
    # An argmax that points past a clip's length (not from the same forward call) must not
    # put gradient into padding.
    grad = torch.ones(1, 2, device=device)
    argmax = torch.tensor([[3, 1]], dtype=torch.int32, device=device)
    lengths = torch.tensor([2], device=device)
    gx = torch.ops.dtl_fast.frame_pool_backward(grad, lengths, argmax, 4, "max")
    expected = torch.zeros(1, 4, 2, device=device)
    expected[0, 1, 1] = 1.0
    assert torch.equal(gx, expected)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", MODES)
def test_cuda_graph_capture_with_device_lengths(mode):
    x = torch.randn(8, 50, 96, device="cuda")
    lengths = torch.randint(0, 51, (8,), device="cuda")
    expected = ops.frame_pool(x, lengths, mode)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        ops.frame_pool(x, lengths, mode)  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = ops.frame_pool(x, lengths, mode)
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, ops.frame_pool(x, lengths, mode))
    assert not torch.equal(out, expected)


# Shapes that take the CPU forward's different paths: several 1024-feature chunks with a
# partial last one (D > 1024), one whole chunk, D not a multiple of any vector width (odd), D = 1,
# T = 1, T with frames left after the groups of four; lengths with an empty clip, a full one
# and one of a single frame where B allows. Each in a contiguous and a time-major layout (x
# read in place through its strides).
BASELINE_SHAPES = [(5, 13, 37), (3, 9, 2053), (2, 6, 1024), (4, 1, 7), (3, 6, 1)]
BASELINE_LAYOUTS = ("contiguous", "time-major")


def baseline_case(shape, dtype, layout):
    B, T, D = shape
    gen = torch.Generator().manual_seed(B * 10007 + T * 101 + D)
    if layout == "time-major":
        x = torch.randn(T, B, D, generator=gen).to(dtype).transpose(0, 1)
    else:
        x = torch.randn(B, T, D, generator=gen).to(dtype)
    lengths = torch.tensor([T, 0, 1, T - 2, 3][:B]).clamp(0, T)
    return x, lengths


@pytest.fixture(scope="module")
def baseline_isa_results(tmp_path_factory):
    """{case: (out, argmax)} of the C++ forward on the baseline path (DTL_FAST_DISABLE_AVX2=1,
    in a child process: the choice is made once per process), "isa": what the child ran."""
    body = """
from test_frame_pool import BASELINE_LAYOUTS, BASELINE_SHAPES, DTYPES, MODES, baseline_case
res = {"isa": dtl_fast._extension._C.cpu_isa()}
for shape in BASELINE_SHAPES:
    for dtype in DTYPES:
        for layout in BASELINE_LAYOUTS:
            x, lengths = baseline_case(shape, dtype, layout)
            for mode in MODES:
                res[(shape, str(dtype), layout, mode)] = torch.ops.dtl_fast.frame_pool(x, lengths, mode)
                res[(shape, str(dtype), layout, mode, "values")] = torch.ops.dtl_fast.frame_pool(
                    x, lengths, mode, False)[0]
                res[(shape, str(dtype), layout, mode, "all")] = torch.ops.dtl_fast.frame_pool(
                    x, None, mode, False)[0]
torch.save(res, saved)
"""
    return run_child(tmp_path_factory.mktemp("baseline"), body, {"DTL_FAST_DISABLE_AVX2": "1"})


@pytest.mark.parametrize("shape", BASELINE_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_cpu_baseline_path_matches_reference(shape, baseline_isa_results):
    # The C++ forward has an AVX2 path (taken on CPUs that have it) and a baseline x86-64
    # path; the rest of this file exercises the first, this the second. Both match the float64
    # reference, and each other bit for bit: every feature is its own lane, added in the same
    # order and divided once, whatever the vector width.
    assert baseline_isa_results["isa"] == "baseline"
    for dtype in DTYPES:
        for layout in BASELINE_LAYOUTS:
            x, lengths = baseline_case(shape, dtype, layout)
            for mode in MODES:
                what = f"{tuple(shape)} {dtype} {layout} {mode}"
                out, argmax = baseline_isa_results[(shape, str(dtype), layout, mode)]
                ref = reference.frame_pool(x.double(), lengths, mode)
                assert_rel_close(what, out, ref, REL_TOL[dtype])
                here, here_argmax = torch.ops.dtl_fast.frame_pool(x, lengths, mode)
                assert torch.equal(out, here), f"{what}: the baseline path differs from this one"
                assert torch.equal(argmax, here_argmax), f"{what}: argmax differs"
                # the argmax-free forward (no gradient recorded), with lengths and without
                values = baseline_isa_results[(shape, str(dtype), layout, mode, "values")]
                assert torch.equal(values, out), f"{what}: the argmax-free path differs"
                every = baseline_isa_results[(shape, str(dtype), layout, mode, "all")]
                here_every = torch.ops.dtl_fast.frame_pool(x, None, mode, False)[0]
                assert torch.equal(every, here_every), f"{what}: all frames, baseline differs"
                assert torch.equal(every, torch.ops.dtl_fast.frame_pool(x, None, mode)[0]), what
                if mode in ("max", "meanmax"):
                    empty = lengths == 0
                    assert bool((argmax[empty] == -1).all()), what
                    assert bool((argmax[~empty] >= 0).all()), what
                    assert bool((argmax[~empty] < lengths[~empty, None]).all()), what


@pytest.mark.parametrize("backend", ["fused", "reference"])
def test_bad_lengths_raise_under_torch_compile(backend):
    torch._dynamo.reset()
    compiled = torch.compile(FramePool("mean", backend=backend), fullgraph=True, backend="aot_eager")
    x = torch.randn(4, 6, 3)
    assert_rel_close("compiled", compiled(x, torch.tensor([6, 0, 3, 5])), loop_pool(x, [6, 0, 3, 5], "mean"), 1e-6)
    with pytest.raises((ValueError, RuntimeError), match="lengths"):
        compiled(x, torch.tensor([9, 0, 3, 5]))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_meanmax_equals_mean_and_max_side_by_side(device, dtype):
    # One pass gives exactly what the two single-mode passes give (same accumulation order),
    # and its gradient is theirs added up (rounded once, so compared with the tolerance).
    x = torch.randn(5, 19, 24, device=device).to(dtype)
    lengths = torch.tensor([19, 0, 7, 1, 12], device=device)
    g = torch.randn(5, 48, device=device).to(dtype)
    out, gx = pool_with_grads(lambda *a: ops.frame_pool(*a, backend="fused"), x, lengths, "meanmax", g)
    mean, g_mean = pool_with_grads(lambda *a: ops.frame_pool(*a, backend="fused"), x, lengths, "mean", g[:, :24])
    mx, g_max = pool_with_grads(lambda *a: ops.frame_pool(*a, backend="fused"), x, lengths, "max", g[:, 24:])
    assert torch.equal(out, torch.cat([mean, mx], 1))
    assert_rel_close("meanmax grad", gx, g_mean.double() + g_max.double(), REL_TOL[dtype])


def test_autograd_is_registered_in_cpp():
    # Both ops have a C++ Autograd kernel (no Python autograd wrapper), and the backward op's
    # own backward works (gradgradcheck above covers its values).
    for op in ("dtl_fast::frame_pool", "dtl_fast::frame_pool_backward"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "Autograd"), op
    x = torch.randn(2, 3, 4, requires_grad=True)
    out = ops.frame_pool(x, [3, 1], "max", backend="fused")
    assert "FramePoolFunction" in out.grad_fn.name()
    # grad_x depends on grad_out only (the backward is linear in it), so a grad_out that
    # requires grad is what puts the backward op's own node on the graph.
    g = torch.ones(2, 4, requires_grad=True)
    (gx,) = torch.autograd.grad(out, x, g, create_graph=True)
    assert gx.grad_fn is not None and "FramePoolBackwardFunction" in gx.grad_fn.name()
    (gg,) = torch.autograd.grad(gx, g, torch.ones_like(gx))
    assert torch.equal(gg, torch.ones(2, 4))  # every max has exactly one frame


@pytest.mark.parametrize("mode", MODES)
def test_backward_fills_no_zero_gradient_for_the_argmax(mode):
    # argmax is an output autograd never differentiates. A C++ Function materializes an
    # undefined output gradient as zeros by default: an int32 [B, D] zero fill before every
    # backward of max / meanmax (and a [0] one for mean / sum), which nothing reads. The
    # backward op must be the only op the engine dispatches for this node.
    from torch.utils._python_dispatch import TorchDispatchMode

    class Log(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func.overloadpacket))
            return func(*args, **(kwargs or {}))

    h = torch.randn(3, 5, 8, requires_grad=True) * 1
    out = ops.frame_pool(h, [5, 2, 0], mode, backend="fused")
    g = torch.randn_like(out)
    with Log() as log:
        (gh,) = torch.autograd.grad(out, h, g)
    assert "dtl_fast.frame_pool_backward" in log.ops  # the mode sees the engine's ops
    assert not [op for op in log.ops if "zero" in op or "full" in op], log.ops
    (gref,) = torch.autograd.grad(reference.frame_pool(h, [5, 2, 0], mode), h, g)
    assert_rel_close("grad", gh, gref, 1e-6)


@pytest.mark.parametrize("mode", MODES)
def test_gradient_of_an_intermediate_input(mode):
    # The benchmark's form: x is an intermediate of a model, its gradient taken with
    # torch.autograd.grad (nothing accumulated into a .grad).
    w = torch.randn(4, 7, 6, dtype=torch.float64, requires_grad=True)
    h = w * 2.0
    lengths = torch.tensor([7, 0, 3, 6])
    g = torch.randn(4, width(6, mode), dtype=torch.float64)
    (gh,) = torch.autograd.grad(ops.frame_pool(h, lengths, mode, backend="fused"), h, g)
    (gref,) = torch.autograd.grad(reference.frame_pool(h, lengths, mode), h, g)
    assert w.grad is None
    assert_rel_close("grad of intermediate", gh, gref, 1e-12)


def test_check_errors_without_a_gpu_error_is_silent():
    # CPU lengths are checked on the host (ValueError at the call); the GPU flag has nothing to
    # report here, with or without waiting.
    assert dtl_fast.check_errors() is None
    assert dtl_fast.check_errors(sync=False) is None
    with pytest.raises(ValueError, match="lengths"):
        ops.frame_pool(torch.randn(2, 3, 4), torch.tensor([4, 1]), "mean", backend="fused")
    assert dtl_fast.check_errors() is None


def test_cuda_kernels_run_on_names_a_bad_device_index():
    # Which GPUs the build's kernels run on is asked of the driver per device index; without a
    # GPU every index is out of range (a ValueError naming it), and a CPU-only build says no.
    C = dtl_fast._extension._C
    if not dtl_fast._extension.cuda_kernels_built():
        assert C.cuda_kernels_run_on(0) is False and not dtl_fast._extension.cuda_kernels_run_on(0)
        return
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: test_gpu_kernels_run_on_this_gpu covers it")
    with pytest.raises(ValueError, match=r"device must be in \[0, 0\), got 3"):
        C.cuda_kernels_run_on(3)


def test_a_gpu_without_a_kernel_image_runs_the_reference_under_auto(monkeypatch):
    # A GPU older than the build's TORCH_CUDA_ARCH_LIST (a T4 against the default
    # "8.0;9.0+PTX") has no kernel image: `auto` runs the eager reference there, `fused` goes on
    # to the op, whose CUDA kernel raises naming the GPU (never reached here: fake CUDA
    # tensors, no GPU needed).
    from torch._subclasses.fake_tensor import FakeTensorMode

    if not dtl_fast._extension.has_kernel("frame_pool", "cuda"):
        pytest.skip("dtl_fast._C was built without CUDA kernels")
    calls = []
    monkeypatch.setattr(reference, "frame_pool",
                        lambda x, lengths, mode: calls.append(mode) or x.new_empty(()))
    with FakeTensorMode():
        x = torch.randn(2, 5, 4, device="cuda")
        if torch.cuda.device_count() == 0:
            # fake CUDA tensors on a machine without a GPU (torch.export, tracing on a build
            # host): nothing to ask the driver, the op's fake kernel serves
            monkeypatch.delitem(dtl_fast._extension._RUNS_ON, 0, raising=False)
            assert ops.frame_pool(x, [1, 2], "max").shape == (2, 4) and calls == []
        for runs, backend, to_reference in ((False, "auto", True), (False, "fused", False),
                                            (True, "auto", False)):
            monkeypatch.setitem(dtl_fast._extension._RUNS_ON, 0, runs)
            calls.clear()
            out = ops.frame_pool(x, [1, 2], "max", backend=backend)
            assert calls == (["max"] if to_reference else []), (runs, backend)
            assert out.shape == (() if to_reference else (2, 4)), (runs, backend)
        # the measured stock-wins table (empty today: the CUDA kernel won every case timed)
        # sends `auto` to the eager form for the cases it names, and only those
        module = sys.modules["dtl_fast.ops.frame_pool"]
        monkeypatch.setattr(module, "_CUDA_STOCK_WINS", (("max", torch.float32, 1 << 20),))
        for mode, backend, to_reference in (("max", "auto", True), ("max", "fused", False),
                                            ("mean", "auto", False)):
            calls.clear()
            ops.frame_pool(x, [1, 2], mode, backend=backend)
            assert calls == ([mode] if to_reference else []), (mode, backend)
        assert "max float32 <= 1 MiB" in module.auto_rule()


def test_info_says_when_the_gpu_has_no_kernel_image(monkeypatch):
    # `dtl-fast info` on a GPU the build has no kernel for (a T4, compute capability 7.5)
    # names what auto runs there and the rebuild that fixes it.
    info = sys.modules["dtl_fast.info"]  # the module (dtl_fast.info is its function)

    if not dtl_fast._extension.has_kernel("frame_pool", "cuda"):
        pytest.skip("dtl_fast._C was built without CUDA kernels")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (7, 5))
    monkeypatch.setitem(dtl_fast._extension._RUNS_ON, 0, False)
    assert info._op_backend("frame_pool", "cuda") == (
        "eager reference (dtl_fast._C has no kernel for this GPU, compute capability 7.5: "
        "rebuild with TORCH_CUDA_ARCH_LIST=7.5)")
    monkeypatch.setitem(dtl_fast._extension._RUNS_ON, 0, True)
    monkeypatch.delenv("DTL_FAST_BACKEND", raising=False)  # auto
    assert info._op_backend("frame_pool", "cuda") == (
        "CUDA kernel (dtl_fast._C; without lengths torch's reduction where the auto rule says)")
    monkeypatch.setenv("DTL_FAST_BACKEND", "fused")  # fused: always the kernel
    assert info._op_backend("frame_pool", "cuda") == "CUDA kernel (dtl_fast._C)"


def test_fake_kernels_check_the_lengths_device():
    # As the kernels do: lengths on the CPU or on the input's device (a fake CUDA tensor on
    # another GPU: the check fails while a graph is traced, not when it first runs).
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.randn(2, 5, 4, device="cuda:0")
        g = torch.randn(2, 4, device="cuda:0")
        am = torch.zeros(0, dtype=torch.int32, device="cuda:0")
        if FAKE_SECOND_GPU:  # not on a host with exactly one GPU (see FAKE_SECOND_GPU)
            other = torch.tensor([1, 2], device="cuda:1")
            with pytest.raises(ValueError, match=r"lengths must be on the CPU or on the device "
                                                 r"of its input \(cuda:0\), got cuda:1"):
                torch.ops.dtl_fast.frame_pool(x, other, "mean")
            with pytest.raises(ValueError,
                               match="frame_pool_backward: lengths must be on the CPU"):
                torch.ops.dtl_fast.frame_pool_backward(g, other, am, 5, "mean")
        assert torch.ops.dtl_fast.frame_pool(x, torch.tensor([1, 2]), "mean")[0].shape == (2, 4)
        assert torch.ops.dtl_fast.frame_pool_backward(g, torch.tensor([1, 2], device="cuda:0"),
                                                      am, 5, "mean").shape == (2, 5, 4)


def test_cpu_max_backward_scratch_is_sized_by_the_clip(tmp_path):
    # The max backward's buckets (argmax features grouped by frame) need scratch only for a clip
    # that takes them, sized by its length: a long-T, small-D gradient once zeroed 16 T bytes
    # per thread it never read (T = 2^25, 2 threads: +1 GiB of peak memory for a 128 MiB
    # gradient). Peak RSS in a child: the max backward after a sum backward of the same size,
    # whose every page is written (the max one, on fresh zero pages, writes one row per clip).
    body = """
import resource
torch.set_num_threads(2)
T = 2 ** 25
g = torch.ones(1, 1)
am = torch.zeros(1, 1, dtype=torch.int32)
gx = torch.ops.dtl_fast.frame_pool_backward(g, None, am, T, "sum")
assert gx.shape == (1, T, 1) and bool((gx == 1).all())
del gx
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
gx = torch.ops.dtl_fast.frame_pool_backward(g, None, am, T, "max")
grew = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
assert float(gx[0, 0, 0]) == 1 and float(gx.sum()) == 1, "max backward: wrong gradient"
torch.save(grew, saved)
"""
    grew_kib = run_child(tmp_path, body, {})
    assert grew_kib < 64 * 1024, f"max backward grew peak memory by {grew_kib / 1024:.0f} MiB"


def test_cuda_launch_config_validates_and_round_trips():
    C = dtl_fast._extension._C
    default = C.cuda_launch_config()
    # (threads, max_tx, split_waves, split_phi_pct, bwd_frames, bwd_waves, fwd_unroll, fwd_pipeline,
    # fwd_l2_evict_first)
    assert len(default) == 9 and all(isinstance(v, int) for v in default)
    # today's forward: 4 frames in flight per thread, not pipelined, normal L2 priority
    assert default[6:] == (4, 0, 0)
    base = (128, 16, 2, 50, 8, 2)
    try:
        assert C.set_cuda_launch_config(*base, 16, 1, 1) == default
        assert C.cuda_launch_config() == base + (16, 1, 1)
        for bad, name in [((96, 16, 2, 50, 8, 2), "threads"), ((128, 12, 2, 50, 8, 2), "max_tx"),
                          ((128, 256, 2, 50, 8, 2), "max_tx"), ((128, 16, -1, 50, 8, 2), "split_waves"),
                          ((128, 16, 2, 0, 8, 2), "split_phi_pct"), ((128, 16, 2, 50, 0, 2), "bwd_frames"),
                          ((128, 16, 2, 50, 8, 0), "bwd_waves"), (base + (3,), "fwd_unroll"),
                          (base + (32,), "fwd_unroll"), (base + (0,), "fwd_unroll"),
                          (base + (4, 3), "fwd_pipeline"), (base + (8, -1), "fwd_pipeline"),
                          # pipelined kernels exist for U = 8 and 16 only (two rounds of 4 / 8),
                          # the ring kernel for U = 4 only (stages of 4 frames)
                          (base + (4, 1), "fwd_pipeline"), (base + (2, 1), "fwd_pipeline"),
                          (base + (8, 2), "fwd_pipeline"), (base + (2, 2), "fwd_pipeline"),
                          (base + (4, 0, 2), "fwd_l2_evict_first"),
                          (base + (4, 0, -1), "fwd_l2_evict_first")]:
            with pytest.raises(ValueError, match=name):
                C.set_cuda_launch_config(*bad)
        assert C.cuda_launch_config() == base + (16, 1, 1)  # a rejected call changes nothing
        # The shorter forms (callers older than fwd_unroll / fwd_pipeline / fwd_l2_evict_first)
        # set the fields they leave out back to their defaults.
        assert C.set_cuda_launch_config(*base, 16, 1) == base + (16, 1, 1)
        assert C.cuda_launch_config() == base + (16, 1, 0)
        assert C.set_cuda_launch_config(*base, 8) == base + (16, 1, 0)
        assert C.cuda_launch_config() == base + (8, 0, 0)
        C.set_cuda_launch_config(*base, 8, 1, 1)
        assert C.set_cuda_launch_config(*base) == base + (8, 1, 1)
        assert C.cuda_launch_config() == base + (4, 0, 0)
        for u, p in ((2, 0), (4, 0), (8, 0), (16, 0), (8, 1), (16, 1), (4, 2)):
            for e in (0, 1):
                C.set_cuda_launch_config(*default[:6], u, p, e)
                assert C.cuda_launch_config() == default[:6] + (u, p, e)
    finally:
        C.set_cuda_launch_config(*default)


def test_span_bytes_is_what_the_evict_first_rule_compares_with_l2():
    # fwd_l2_evict_first applies when x spans more memory than the L2 (csrc/frame_pool.cpp
    # span_bytes): numel x element size for contiguous, sliced and transposed x, only the
    # repeated frames' bytes for a broadcast one (stride 0: its re-reads may hit in L2), 0 empty.
    span = dtl_fast._extension._C.span_bytes

    def of(t):
        return span(t.shape, t.stride(), t.element_size())

    x = torch.empty(8, 50, 64)
    assert of(x) == x.numel() * 4
    assert of(x[:, :, 1:]) == 8 * 50 * 63 * 4  # a slice: its own elements, not the parent's
    assert of(x.transpose(0, 1)) == x.numel() * 4
    assert of(x.to(torch.bfloat16)) == x.numel() * 2
    frames = torch.empty(50, 64)
    assert of(frames.expand(8, 50, 64)) == 50 * 64 * 4  # one [T, D] block read 8 times
    # every other frame of a broadcast block: frames 0, 2, ..., 48 and the 64 elements of the last
    assert of(torch.empty(1, 50, 64).expand(1000, 50, 64)[:, ::2]) == (24 * 128 + 64) * 4
    assert span((2, 3), (-3, 1), 4) == 6 * 4  # a negative stride counts by its size
    assert of(torch.empty(8, 0, 64)) == 0
    for bad, match in [(((2, 3), (3,), 4), "sizes"), (((2, -1), (3, 1), 4), "sizes"),
                       (((0, -1), (3, 1), 4), "sizes"),  # a negative size after an empty one
                       (((2, 3), (3, 1), 0), "element_size")]:
        with pytest.raises(ValueError, match=match):
            span(*bad)
    with pytest.raises(TypeError, match="sizes"):
        span(3, (1,), 4)


def test_sweep_provider_names_parse_back():
    # bench/sweep_frame_pool.py names each timed row's provider after its launch configuration.
    # Every configuration it can time has its own name, which parses back to it; the plain ones
    # keep the names of earlier runs' rows (ending in -u<U>), the pipelined ones end in -u<U>-p1,
    # the ring ones in -u4-p2, evict-first loads add -ef, and set_cuda_launch_config accepts
    # every one of them.
    import re
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import sweep_frame_pool as S

    C = dtl_fast._extension._C
    default = C.cuda_launch_config()
    assert len(S.FIELDS) == len(default)
    assert S.config_name(default) == "t256-tx32-sw4-phi25-bf16-bw4-u4"  # the default's rows so far
    cfgs = {S.fwd_config(default, c)
            for c in S.FWD_GRID + S.SERIES_GRID + [c for c in S.METHOD_CONFIGS if c is not None]}
    cfgs |= {S.bwd_config(default, c) for c in S.BWD_GRID}
    names = {S.config_name(c) for c in cfgs}
    assert len(names) == len(cfgs)
    assert {c[6] for c in cfgs if c[7] == 1} == {8, 16}  # pipelined: fwd_unroll 8 and 16
    assert {c[6] for c in cfgs if c[7] == 2} == {4}  # the ring: stages of 4 frames
    assert any(c[8] == 1 for c in cfgs)  # the method step times evict-first loads
    try:
        for cfg in cfgs:
            name = S.config_name(cfg)
            assert S.parse_config_name(name) == cfg, name
            tail = (rf"-p{cfg[7]}" if cfg[7] else "") + ("-ef" if cfg[8] else "")
            assert re.search(rf"-u(\d+){tail}$", name), name
            C.set_cuda_launch_config(*cfg)
    finally:
        C.set_cuda_launch_config(*default)
    # a row written before fwd_pipeline / fwd_l2_evict_first existed reads as the plain loop
    assert S.parse_config_name("t128-tx16-sw4-phi25-bf16-bw4-u8") == (128, 16, 4, 25, 16, 4, 8, 0,
                                                                      0)
    assert S.parse_config_name("t256-tx32-sw4-phi25-bf16-bw4-u4-ef") == default[:8] + (1,)
    with pytest.raises(ValueError, match="default"):
        S.parse_config_name("default")


def test_sweep_dry_run_walks_the_whole_plan(capsys, tmp_path, monkeypatch):
    # The GPU sweep (gpu_check's sweep-pool step) is only ever run on a lent GPU: its dry run
    # calls every timing method, configuration, stock form and read-roofline form on small CPU
    # tensors, so a broken plan fails here and not in the lease.
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "bench"))
    import sweep_frame_pool as S

    real = dtl_fast._extension._C
    configs = []  # every configuration the sweep sets, in order

    class Recording:
        def __getattr__(self, name):
            return getattr(real, name)

        def set_cuda_launch_config(self, *cfg):
            configs.append(tuple(cfg))
            return real.set_cuda_launch_config(*cfg)

    monkeypatch.setattr(dtl_fast._extension, "_C", Recording())
    assert S.main(["--dry-run", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    # the ring kernel (fwd_pipeline 2, never run on a GPU) is timed only after everything else
    ring = [i for i, c in enumerate(configs) if c[7] == 2]
    others = [i for i, c in enumerate(configs) if c[7] != 2 and c != configs[0]]
    assert ring and others and max(others) < min(ring), (len(configs), ring[:3], others[-3:])
    plan = re.search(r"plan: (\d+) timing-method timings, (\d+) forward and (\d+) backward "
                     r"configuration timings, (\d+) stock timings, (\d+) read-roofline timings", out)
    assert plan, out
    n_method, n_fwd, n_bwd, n_stock, n_roof = map(int, plan.groups())
    assert n_fwd >= len(S.FWD_GRID) and n_bwd >= len(S.BWD_GRID) and n_stock > 0
    assert n_roof == 4 * 2  # torch.sum / torch.amax / fused mean / fused max, two inputs
    # every case x mode x (forward per configuration x timing method + the backward x the
    # methods that apply to it: not "produced" / "pipeline", which rewrite x)
    assert set(S.FORWARD_ONLY_METHODS) == {"produced", "pipeline"} <= set(S.METHODS)
    assert n_method == (len(S.METHOD_CASES) * len(S.POOL_MODES)
                        * (len(S.METHOD_CONFIGS) * len(S.METHODS)
                           + len(S.METHODS) - len(S.FORWARD_ONLY_METHODS)))
    assert not list(tmp_path.iterdir())  # nothing measured, nothing written


def test_sweep_method_lines_read_as_predicted(tmp_path, monkeypatch):
    # The method step's table lines are printed only on a GPU: here a sweep is given made-up
    # method results, so the lines the lease's reader will look for (bench/NOTES.md, issue 13,
    # s24) are checked: each method's % of its own copy, the host-bound mark, and the time
    # differences in us and in MB at the run's copy rate (ms x GB/s = MB).
    import argparse
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "bench"))
    import sweep_frame_pool as S

    args = argparse.Namespace(budget_s=10.0, dry_run=True, out=str(tmp_path), run_id="t",
                              warmup_ms=5.0, rep_ms=20.0, no_stock=True)
    sweep = S.Sweep(args, "cpu", measure=False)
    sweep.measure, sweep.copy = True, {"copy_gbps": 3000.0}
    sweep.copy_by_method = {"do_bench": 3000.0, "steady": 2990.0}
    key = ("256x256x1024", "float32", "mean", "default", "forward")
    sweep.results[key] = {"method": {"do_bench": (0.061, 74.3, False),
                                     "read-flush": (0.046, 97.0, False),
                                     "steady": (0.0465, 96.5, True)}}
    lines = [ln for ln in sweep.table().splitlines() if ln.startswith(("method", "copy bandwidth by"))]
    assert lines[0] == "copy bandwidth by timing method: do_bench 3000 GB/s, steady 2990 GB/s"
    assert lines[1] == ("method forward 256x256x1024 float32 mean default: do_bench 74.3%, "
                        "read-flush 97.0%, steady 96.5% (HOST-BOUND) (of that method's copy); "
                        "read-flush - do_bench -15.0 us (-45 MB); "
                        "steady - read-flush +0.5 us (+2 MB)")
    # s25: "produced" (x rewritten before each call) against do_bench, "pipeline" (producer +
    # forward, less the producer) against steady state, and the evict-first forward against the
    # default, method by method, in us and MB
    sweep.results[key]["method"]["produced"] = (0.0612, 74.1, False)
    sweep.results[key]["method"]["pipeline"] = (0.0468, 95.9, False)
    ef = S.config_name(S.fwd_config(sweep.default, (256, 32, 4, 0, 1)))
    assert ef.endswith("-u4-ef")
    sweep.results[key[:3] + (ef, "forward")] = {"method": {"do_bench": (0.049, 92.5, False),
                                                           "steady": (0.0465, 96.5, False),
                                                           "produced": (0.045, 100.8, False),
                                                           "pipeline": (0.0430, 104.4, False)}}
    lines = sweep.table().splitlines()
    assert any(ln.endswith("; produced - do_bench +0.2 us (+1 MB); "
                           "pipeline - steady +0.3 us (+1 MB)") for ln in lines), lines
    assert (f"{ef} - default, forward 256x256x1024 float32 mean: do_bench -12.0 us (-36 MB), "
            "steady +0.0 us (+0 MB), produced -16.2 us (-49 MB), pipeline -3.8 us (-11 MB)"
            ) in lines, lines
    # a fault in the ring phase (timed last) is reported as such, not as a spent budget
    sweep.not_run = ["the ring phase stopped: CUDA error: an illegal memory access"]
    table = sweep.table().splitlines()
    assert table[-1] == sweep.not_run[0] and not any("budget spent" in ln for ln in table)
    # ... as is one in any other phase (each phase stops on its own), beside a spent budget
    sweep.not_run = ["the method phase stopped: CUDA out of memory", "forward default mean x"]
    table = sweep.table().splitlines()
    assert table[-2:] == ["the method phase stopped: CUDA out of memory",
                          "budget spent: 1 timing(s) not run, first: forward default mean x"]
    # the ring against the default re-timed beside it; the first phase's default (what every
    # other configuration is compared with) is kept
    ring = S.fwd_config(sweep.default, (256, 32, 4, 2))
    sweep.results[("256x256x1024", "float32", "mean", "forward")] = {
        "configs": {sweep.default: 0.061, ring: 0.052}, "bytes": 136e6,
        "pct": {sweep.default: 74.0, ring: 88.0}, "ring_default": 75.0}
    lines = sweep.table().splitlines()
    assert (f"ring phase 256x256x1024 float32 mean: default 75.0% (first phase 74.0%), "
            f"{S.config_name(ring)} 88.0% (+13.0 points)") in lines, lines
    # a case whose first phase stopped before it and whose ring then failed: no crash
    sweep.results[("256x512x1024", "bfloat16", "max", "forward")] = {
        "configs": {}, "bytes": 145e6, "ring_default": 66.0}
    assert ("ring phase 256x512x1024 bfloat16 max: default 66.0% (first phase nan%)"
            in sweep.table().splitlines())


def test_sweep_pipeline_method_subtracts_the_producer_timed_once_per_case(tmp_path, monkeypatch):
    # "pipeline" (s25): producer + forward as one steady stream, less the producer alone, which
    # is timed once per case and shared by every mode and configuration; the result is (median
    # difference, lower bound, upper bound), and a host-bound producer stream marks the row.
    # "produced" hands the producer to harness.time_after. Timers stubbed: the GPU path on a CPU.
    import argparse
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "bench"))
    import sweep_frame_pool as S

    args = argparse.Namespace(budget_s=10.0, dry_run=True, out=str(tmp_path), run_id="t",
                              warmup_ms=5.0, rep_ms=20.0, no_stock=True)
    sweep = S.Sweep(args, "cpu", measure=False)
    sweep.measure = True
    timed = []

    def produce():
        pass

    def fake_steady(fns, *, device, info=None, **kw):
        alone = fns[0] is produce
        timed.append("producer" if alone else "pair")
        if info is not None:
            info.update(host_ms=0.001, host_bound=alone)
        return (1.00, 0.95, 1.10) if alone else (1.20, 1.18, 1.30)

    after = []
    monkeypatch.setattr(S.H, "time_steady", fake_steady)
    monkeypatch.setattr(S.H, "time_after", lambda fn, before, **kw: after.append(before) or (
        0.5, 0.4, 0.6))
    cache: dict = {}
    for _ in range(3):
        info: dict = {}
        t = sweep.time_method("pipeline", [lambda: None], info, produce=produce,
                              produce_alone=cache)
        assert t == pytest.approx((0.20, 0.08, 0.35)) and t[1] <= t[0] <= t[2]
        assert info["host_bound"]  # the producer's stream was host-bound
    assert timed == ["producer", "pair", "pair", "pair"]
    assert sweep.time_method("produced", [lambda: None], {}, produce=produce) == (0.5, 0.4, 0.6)
    assert after == [produce]


@pytest.mark.gpu
@pytest.mark.parametrize("mode", MODES)
def test_gpu_lengths_are_checked_on_the_gpu(mode):
    # A bad GPU length does not stop the call (no host sync): the kernel pools over the length
    # clamped into [0, T] and records the error, which check_errors() raises once and clears.
    dtl_fast.check_errors()
    x = torch.randn(3, 6, 8, device="cuda")
    bad = torch.tensor([9, -2, 4], device="cuda")
    out = ops.frame_pool(x, bad, mode)
    assert_rel_close("clamped", out, loop_pool(x, [6, 0, 4], mode), 1e-6)
    with pytest.raises(ValueError, match="lengths"):
        dtl_fast.check_errors()
    dtl_fast.check_errors()  # cleared
    # Raised by a later call too, once the faulty kernel has finished.
    ops.frame_pool(x, bad, mode)
    torch.cuda.synchronize()
    with pytest.raises(ValueError, match="lengths"):
        ops.frame_pool(x, torch.tensor([1, 2, 3], device="cuda"), mode)
    dtl_fast.check_errors()
    # The backward kernel records a bad length as well.
    g = torch.ones(3, width(8, mode), device="cuda")
    _, am = torch.ops.dtl_fast.frame_pool(x, torch.tensor([6, 0, 4], device="cuda"), mode)
    torch.ops.dtl_fast.frame_pool_backward(g, bad, am, 6, mode)
    with pytest.raises(ValueError, match="lengths"):
        dtl_fast.check_errors()
    # ... and a later backward raises what a forward recorded: a training step learns of its
    # forward's bad lengths in its own backward.
    xg = x.detach().requires_grad_(True)
    out = ops.frame_pool(xg, bad, mode)
    torch.cuda.synchronize()
    with pytest.raises(ValueError, match="lengths"):
        out.backward(torch.ones_like(out))
    dtl_fast.check_errors()  # cleared by the backward that raised it


# (T, D) of the calls that have nothing to pool or to write, beside an ordinary one.
DEGENERATE_TD = [(4, 5), (0, 5), (4, 0), (0, 0)]


def no_argmax_or(mode, B, D, device="cpu"):
    if mode in ("max", "meanmax"):
        return torch.full((B, D), -1, dtype=torch.int32, device=device)
    return torch.empty(0, dtype=torch.int32, device=device)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("td", DEGENERATE_TD, ids=lambda td: f"T{td[0]}-D{td[1]}")
def test_lengths_are_checked_whatever_t_and_d(td, mode):
    # A call with T = 0 or D = 0 checks its lengths as any other does, forward and backward:
    # the C++ kernel their values (CPU lengths: at the call), the fake kernel (no values: meta
    # and fake CUDA tensors) their dtype, shape and device. The CUDA kernels' record of bad GPU
    # lengths is the gpu test below.
    from torch._subclasses.fake_tensor import FakeTensorMode

    T, D = td
    B = 3
    fwd, bwd = torch.ops.dtl_fast.frame_pool, torch.ops.dtl_fast.frame_pool_backward
    x = torch.randn(B, T, D)
    g = torch.ones(B, width(D, mode))
    am = no_argmax_or(mode, B, D)
    for bad in (torch.tensor([T + 1, 0, 0]), torch.tensor([-1, 0, 0])):
        with pytest.raises(ValueError, match=r"lengths\[b\] must lie in \[0, T\]"):
            fwd(x, bad, mode)
        with pytest.raises(ValueError, match=r"lengths\[b\] must lie in \[0, T\]"):
            bwd(g, bad, am, T, mode)
    good = torch.tensor([T, 0, T])
    assert fwd(x, good, mode)[0].shape == (B, width(D, mode))
    assert bwd(g, good, am, T, mode).shape == (B, T, D)

    def fake_checks(device, other_device=None):
        xf = torch.randn(B, T, D, device=device)
        gf = torch.ones(B, width(D, mode), device=device)
        amf = no_argmax_or(mode, B, D, device)
        cases = [(torch.tensor([1.0, 0.0, 0.0], device=device), "integer tensor"),
                 (torch.tensor([0, 0], device=device), r"shape \[B\]")]
        if other_device is not None:
            cases.append((torch.zeros(B, dtype=torch.int64, device=other_device),
                          "on the CPU or on"))
        for lengths, what in cases:
            with pytest.raises(ValueError, match=what):
                fwd(xf, lengths, mode)
            with pytest.raises(ValueError, match=what):
                bwd(gf, lengths, amf, T, mode)
        for lengths in (torch.tensor([T, 0, T]), torch.tensor([T, 0, T], device=device)):
            assert fwd(xf, lengths, mode)[0].shape == (B, width(D, mode))
            assert bwd(gf, lengths, amf, T, mode).shape == (B, T, D)

    fake_checks("meta")
    with FakeTensorMode():  # fake CUDA tensors, no GPU needed
        fake_checks("cuda:0", "cuda:1" if FAKE_SECOND_GPU else None)


# (B, lengths dtype, on a side stream) of the GPU length-check test. 2^18 + 1 clips are more
# than the length-check kernel's 1024 blocks x 256 threads take in one pass: a bad length at
# the last clip is seen only if the blocks stride on. int32 lengths are converted to int64 on
# the GPU first.
GPU_LENGTH_CASES = [(3, torch.int64, False), (3, torch.int32, False),
                    (2**18 + 1, torch.int64, False), (3, torch.int64, True)]


@pytest.mark.gpu
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("td", DEGENERATE_TD, ids=lambda td: f"T{td[0]}-D{td[1]}")
def test_gpu_lengths_are_checked_on_the_gpu_whatever_t_and_d(td, mode):
    # Calls that have nothing to pool or write (D = 0; the backward with T = 0) record a bad GPU
    # length as the others do (a length check launched alone), with no host synchronisation,
    # and record nothing for good lengths: for int64 and int32 lengths, for more clips than
    # one pass of the kernel covers, and on a side stream (GPU_LENGTH_CASES).
    T, D = td
    fwd, bwd = torch.ops.dtl_fast.frame_pool, torch.ops.dtl_fast.frame_pool_backward
    dtl_fast.check_errors()
    for B, dtype, side in GPU_LENGTH_CASES:
        case = f"B={B} {dtype}" + (" side stream" if side else "")
        x = torch.randn(B, T, D, device="cuda")
        g = torch.ones(B, width(D, mode), device="cuda")
        am = no_argmax_or(mode, B, D, "cuda")

        def call_after_write(call, lengths, at, value):
            # lengths[at] = value, then the call, on one stream, with no host synchronisation.
            # On the side stream the write waits behind a sleep of some milliseconds, so a
            # kernel launched on any stream but the current one reads the lengths before it
            # and records nothing.
            stream = torch.cuda.current_stream()
            if side:
                stream = torch.cuda.Stream()
                stream.wait_stream(torch.cuda.current_stream())  # x, g, am, lengths are made
            with torch.cuda.stream(stream):
                if side:
                    torch.cuda._sleep(20_000_000)
                lengths[at] = value
                torch.cuda.set_sync_debug_mode("error")
                try:
                    call(lengths)
                finally:
                    torch.cuda.set_sync_debug_mode("default")

        for op, call in (("forward", lambda lengths: fwd(x, lengths, mode)),
                         ("backward", lambda lengths: bwd(g, lengths, am, T, mode))):
            for at, value in ((0, T + 1), (B // 2, -1), (B - 1, T + 1)):
                lengths = torch.zeros(B, dtype=dtype, device="cuda")
                call_after_write(call, lengths, at, value)
                try:
                    dtl_fast.check_errors()  # waits for the GPU (every stream)
                except ValueError as e:
                    assert "lengths" in str(e), (case, op, str(e))
                else:
                    pytest.fail(f"{case} {op}: lengths[{at}] = {value} was not recorded")
            lengths = torch.zeros(B, dtype=dtype, device="cuda")
            lengths[0] = T
            call_after_write(call, lengths, B - 1, T)
            dtl_fast.check_errors()  # nothing recorded
    # through autograd: the forward's record is raised by its own backward, as for any shape
    x = torch.randn(3, T, D, device="cuda", requires_grad=True)
    out = ops.frame_pool(x, torch.tensor([T + 1, 0, 0], device="cuda"), mode, backend="fused")
    torch.cuda.synchronize()
    with pytest.raises(ValueError, match="lengths"):
        out.backward(torch.ones_like(out))
    dtl_fast.check_errors()


@pytest.mark.gpu
def test_gpu_kernels_run_on_this_gpu():
    # The build's architectures (default 8.0;9.0+PTX) cover the lent H100 / H200: `auto` runs
    # the CUDA kernel, asked once per GPU.
    dev = torch.cuda.current_device()
    assert dtl_fast._extension.cuda_kernels_run_on(dev) is True
    x = torch.randn(2, 3, 4, device="cuda", requires_grad=True)
    assert "FramePoolFunction" in ops.frame_pool(x, [3, 1], "mean").grad_fn.name()


@pytest.mark.gpu
def test_gpu_check_errors_lets_other_threads_run_while_it_waits():
    # check_errors(sync=True) waits for the GPU without holding the GIL (as
    # torch.cuda.synchronize): while a worker thread waits in it, this thread runs. Ordering,
    # not rates: this thread's next step must come before the worker's wait ends (holding the
    # GIL, the wait would end first: this thread could not run until then).
    import threading
    import time

    ops.frame_pool(torch.randn(2, 3, 4, device="cuda"), None, "mean", backend="fused")
    dtl_fast.check_errors()
    torch.cuda._sleep(int(1e9))  # ~0.5 s of GPU work at the ~2 GHz of an H100 / H200
    entering, times = threading.Event(), {}

    def wait():
        entering.set()
        times["start"] = time.perf_counter()
        dtl_fast.check_errors(sync=True)
        times["end"] = time.perf_counter()

    worker = threading.Thread(target=wait)
    worker.start()
    entering.wait()
    time.sleep(0.05)  # lets the worker into check_errors
    times["here"] = time.perf_counter()
    worker.join()
    assert times["end"] - times["start"] > 0.1, times  # it did wait for the GPU
    assert times["here"] < times["end"], times


@pytest.mark.gpu
def test_gpu_first_pooling_call_of_a_process_inside_graph_capture(tmp_path):
    # The length-error flag is allocated by the first CUDA pooling call of a process; when that
    # call is captured into a CUDA graph, the allocation runs in relaxed capture mode instead of
    # invalidating the capture (a fresh child process: this one has made its first call).
    body = """
x = torch.randn(4, 8, 16, device="cuda")
lengths = torch.tensor([1, 8, 3, 0], device="cuda")
graph = torch.cuda.CUDAGraph()
with torch.cuda.graph(graph):
    out = dtl_fast.ops.frame_pool(x, lengths, "meanmax", backend="fused")
graph.replay()
torch.cuda.synchronize()
ref = dtl_fast.reference.frame_pool(x, lengths, "meanmax")
assert torch.allclose(out, ref, rtol=1e-5, atol=1e-6), (out - ref).abs().max()
dtl_fast.check_errors()
torch.save(True, saved)
"""
    assert run_child(tmp_path, body, {}) is True


@pytest.mark.gpu
@pytest.mark.parametrize("where", ["cuda", "cpu"])
def test_no_host_synchronisation_per_call(where):
    # Lengths on the GPU are never read by the host; CPU lengths go through a pinned buffer
    # with a non-blocking copy. torch's sync debug mode turns any synchronisation into an error.
    x = torch.randn(8, 40, 64, device="cuda", requires_grad=True)
    lengths = torch.randint(0, 41, (8,), device=where)
    g = torch.randn(8, 128, device="cuda")
    ops.frame_pool(x, lengths, "meanmax")  # first call: allocations, occupancy queries
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = ops.frame_pool(x, lengths, "meanmax")
        (gx,) = torch.autograd.grad(out, x, g)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    ref, gref = pool_with_grads(reference.frame_pool, x.detach().double(), lengths, "meanmax", g.double())
    assert_rel_close("output", out, ref, 1e-6)
    assert_rel_close("grad", gx, gref, 1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("config", [(256, 32, 4, 25, 16, 4, 4), (128, 16, 2, 50, 8, 2, 8), (64, 8, 8, 10, 4, 8, 2),
                                    (256, 64, 0, 100, 1, 1, 16), (128, 128, 64, 1, 64, 16, 4),
                                    (64, 8, 8, 10, 4, 8, 8, 1), (256, 32, 4, 25, 16, 4, 16, 1),
                                    (256, 32, 4, 25, 16, 4, 4, 2), (64, 8, 8, 10, 4, 8, 4, 2),
                                    (256, 32, 0, 25, 16, 4, 4, 2)])
@pytest.mark.parametrize("mode", MODES)
def test_every_launch_config_computes_the_same(config, mode, poison):
    # The sweep varies these constants; each must stay correct (shapes that split time or not,
    # vector and scalar paths, both dtypes' vector widths).
    C = dtl_fast._extension._C
    old = C.set_cuda_launch_config(*config)
    try:
        for shape, dtype in [((4, 1000, 96), torch.float32), ((3, 77, 1001), torch.float32),
                             ((64, 33, 512), torch.bfloat16), ((2, 4096, 8), torch.float16)]:
            B, T, D = shape
            x = torch.randn(shape, device="cuda").to(dtype)
            lengths = torch.randint(0, T + 1, (B,), device="cuda")
            grad = torch.randn(B, width(D, mode), device="cuda").to(dtype)
            with poison():
                out, gx = pool_with_grads(lambda *a: ops.frame_pool(*a, backend="fused"), x, lengths, mode, grad)
            ref, gref = pool_with_grads(reference.frame_pool, x.double(), lengths, mode, grad.double())
            assert_rel_close(f"{shape} output", out, ref, REL_TOL[dtype])
            assert_rel_close(f"{shape} grad", gx, gref, REL_TOL[dtype])
    finally:
        C.set_cuda_launch_config(*old)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("mode", MODES)
def test_fwd_unroll_is_bit_identical(dtype, mode, poison):
    # fwd_unroll only regroups the loads of the forward's vector loop, and fwd_pipeline only
    # reorders them (1: round k + 1 issued before round k is folded; 2: rounds copied through a
    # ring of shared memory three stages ahead of the fold); each lane still folds its
    # frames in increasing order, and the time split is planned with the default unroll, so
    # every (fwd_unroll, fwd_pipeline) must give exactly the default's output and argmax: frame
    # counts that no U divides, lengths 0 / 1 / T and a spread of lengths in between (a lane's
    # last full round, or its first, followed by a partial one, an odd or even number of full
    # rounds: both exits of the pipelined loop), time-split shapes (B = 2, T = 3001; B = 6,
    # T = 700) and plain ones, -inf and NaN where max must pick the first maximum / propagate NaN,
    # and more rows than a grid's y extent (B = 65537: a block pools two rows, so the ring kernel
    # reuses its ring, and the fold buffers laid over it, for the second). Every case runs
    # twice: with the default time split, and with none (split_waves 0), where a lane of
    # (2, 3001, 64) folds 24-47 stages, so the ring wraps around many times.
    # fwd_l2_evict_first = 1 only changes the L2 policy of the loads; it takes effect for an x
    # larger than the device's L2, so the last cases are (4, T, 1024) and (4, T, 1021), with T
    # making them ~2 x L2. Each configuration also runs with with_argmax=False, the default
    # one included: there max / meanmax fold the max without its frame index (ValueMax, the
    # vector path of float32 / float16 / bfloat16), and must still give the default's values.
    C = dtl_fast._extension._C
    default = C.cuda_launch_config()
    gen = torch.Generator(device="cuda").manual_seed(7)
    cases = []
    for B, T, D in [(2, 3001, 64), (37, 77, 128), (5, 1, 24), (9, 19, 16), (6, 700, 64),
                    (65537, 21, 16)]:
        x = torch.randn(B, T, D, device="cuda", generator=gen).to(dtype)
        x[:, ::5, 1] = float("-inf")  # -inf frames: the first of several equal maxima wins
        x[:, :, 2] = 0.5  # every frame equal
        x[-1, T // 2, 3] = float("nan")
        # the index-free fold packs 2-byte elements in pairs: a NaN in a low half too (column 4;
        # column 3 is a high half), one with its sign bit set, and zeros of both signs
        x[0, T // 3, 4] = float("nan")
        x[1 % B, 0, 6] = -float("nan")
        x[:, :, 5] = 0.0
        x[:, 1::2, 5] = -0.0
        lengths = torch.randint(0, T + 1, (B,), device="cuda", generator=gen)
        if B > 4:
            lengths[3:] = torch.arange(B - 3, device="cuda") * T // (B - 4)  # 0 ... T
        lengths[0], lengths[1 % B] = T, min(1, T)
        if B > 2:
            lengths[2] = 0
        cases.append((x, lengths))
    l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 128 << 20)
    T = -(-2 * l2 // (4 * 1024 * torch.empty((), dtype=dtype).element_size()))
    for D in (1024, 1021):  # the vector path, and the scalar one (odd D: every dtype)
        x = torch.randn(4, T, D, device="cuda", generator=gen).to(dtype)
        assert x.numel() * x.element_size() > l2
        cases.append((x, torch.tensor([T, T // 2, 1, T - 7], device="cuda")))
    no_split = default[:2] + (0,) + default[3:6]
    try:
        for (x, lengths), base in itertools.product(cases, (default[:6], no_split)):
            C.set_cuda_launch_config(*base, 4, 0, 0)
            ref, ref_am = torch.ops.dtl_fast.frame_pool(x, lengths, mode)
            for u, p, e in ((4, 0, 0), (2, 0, 0), (8, 0, 0), (16, 0, 0), (8, 1, 0), (16, 1, 0),
                            (4, 2, 0), (4, 0, 1), (16, 1, 1), (4, 2, 1)):
                C.set_cuda_launch_config(*base, u, p, e)
                what = (f"fwd_unroll={u} fwd_pipeline={p} fwd_l2_evict_first={e} {base} "
                        f"{tuple(x.shape)} {dtype}")
                if (u, p, e) != (4, 0, 0):
                    with poison():
                        out, am = torch.ops.dtl_fast.frame_pool(x, lengths, mode)
                    assert torch.equal(out.isnan(), ref.isnan()), what
                    assert torch.equal(torch.nan_to_num(out), torch.nan_to_num(ref)), what
                    assert torch.equal(am, ref_am), what
                # with_argmax=False: the kernels get no argmax to write (a null pointer, in
                # the plain, pipelined and ring kernels and the split's combine), same values
                with poison():
                    values, none = torch.ops.dtl_fast.frame_pool(x, lengths, mode, False)
                assert none.shape == (0,), what
                assert torch.equal(torch.nan_to_num(values), torch.nan_to_num(ref)), what
                assert torch.equal(values.isnan(), ref.isnan()), what
    finally:
        C.set_cuda_launch_config(*default)


@pytest.mark.gpu
def test_fwd_pipeline_2_runs_the_ring_kernel():
    # The bit-identity tests above pass just as well if fwd_pipeline = 2 silently ran the plain
    # kernel (its fallback for float64, unaligned inputs and older devices): the profiler says
    # which kernel ran. The sweep's -u4-p2 rows mean nothing unless this holds.
    C = dtl_fast._extension._C
    default = C.cuda_launch_config()
    major = torch.cuda.get_device_capability()[0]

    def kernels(x, lengths):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            torch.ops.dtl_fast.frame_pool(x, lengths, "max")
            torch.cuda.synchronize()
        return [e.name for e in prof.events() if "frame_pool_fwd" in e.name]

    lengths = torch.tensor([7, 0, 64], device="cuda")
    try:
        C.set_cuda_launch_config(*default[:6], 4, 2)
        for dtype, ring in ((torch.float32, major >= 8), (torch.bfloat16, major >= 8),
                            (torch.float64, False)):
            x = torch.randn(3, 64, 256, device="cuda").to(dtype)
            names = kernels(x, lengths)
            assert names and all(("ring" in n) == ring for n in names), (dtype, names)
        # an input whose rows are not 16-byte aligned takes the scalar path
        names = kernels(torch.randn(3, 64, 257, device="cuda")[:, :, 1:], lengths)
        assert names and not any("ring" in n for n in names), names
        C.set_cuda_launch_config(*default)  # and the default never runs it
        names = kernels(torch.randn(3, 64, 256, device="cuda"), lengths)
        assert names and not any("ring" in n for n in names), names
    finally:
        C.set_cuda_launch_config(*default)


@pytest.mark.gpu
def test_forward_without_argmax_runs_the_index_free_kernel():
    # The bit-identity test above passes just as well if with_argmax=False kept tracking the
    # frame index: the profiler names the kernel that ran (frame_pool_fwd_kernel<scalar, acc,
    # VEC, U, KIND, PIPE, IDX>). Index-free: max / meanmax, the default loop, the vector path of
    # float32 / float16 / bfloat16, with and without a time split; not float64, not the scalar
    # path, not mean, not another fwd_unroll, and never when the argmax is wanted.
    C = dtl_fast._extension._C
    default = C.cuda_launch_config()

    def index_free(x, lengths, mode, with_argmax=False, split=False):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            torch.ops.dtl_fast.frame_pool(x, lengths, mode, with_argmax)
            torch.cuda.synchronize()
        names = [e.name for e in prof.events() if "frame_pool_fwd_kernel" in e.name]
        assert names, [e.name for e in prof.events()]
        # a time split shows as its combine kernel
        assert any("frame_pool_combine" in e.name for e in prof.events()) == split, names
        flags = [re.search(r"(true|false), (true|false)>", n) for n in names]
        assert all(flags), names
        return {f.group(2) == "false" for f in flags}

    lengths = torch.tensor([7, 0, 64], device="cuda")
    try:
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            x = torch.randn(3, 64, 256, device="cuda").to(dtype)
            for mode in ("max", "meanmax"):
                assert index_free(x, lengths, mode) == {True}, (dtype, mode)
                assert index_free(x, lengths, mode, True) == {False}, (dtype, mode)
            assert index_free(x, lengths, "mean") == {False}, dtype
            # a time split (two rows, long T): the split kernel folds without the index too
            long = torch.randn(2, 4096, 64, device="cuda").to(dtype)
            for mode in ("max", "meanmax"):
                assert index_free(long, torch.tensor([4096, 3000], device="cuda"), mode,
                                  split=True) == {True}, (dtype, mode)
        assert index_free(torch.randn(3, 64, 256, device="cuda", dtype=torch.float64), lengths,
                          "max") == {False}
        # rows not 16-byte aligned: the scalar path keeps the index
        assert index_free(torch.randn(3, 64, 257, device="cuda")[:, :, 1:], lengths,
                          "max") == {False}
        C.set_cuda_launch_config(*default[:6], 8)  # another unroll keeps it too
        assert index_free(torch.randn(3, 64, 256, device="cuda"), lengths, "max") == {False}
    finally:
        C.set_cuda_launch_config(*default)


@pytest.mark.parametrize("mode", MODES)
def test_forward_mode_ad_runs_the_reference(mode):
    # The compiled op's C++ autograd has no forward-mode formula: "auto" pools a dual tensor
    # with the eager reference, so the tangent is carried, not dropped or refused.
    import torch.autograd.forward_ad as fwAD
    x = torch.randn(3, 6, 5, dtype=torch.float64)
    t = torch.randn_like(x)
    lengths = torch.tensor([6, 0, 4])
    out, tangent = torch.func.jvp(lambda a: ops.frame_pool(a, lengths, mode), (x,), (t,))
    ref_out, ref_tangent = torch.func.jvp(lambda a: reference.frame_pool(a, lengths, mode),
                                          (x,), (t,))
    assert torch.equal(out, ref_out) and torch.equal(tangent, ref_tangent)
    if mode in ("mean", "sum"):  # linear in x: the tangent is the pooled tangent
        assert_rel_close("jvp tangent", tangent, loop_pool(t, lengths, mode), 1e-12)
    else:  # max: the tangent of the first maximal frame, row 1 (length 0) zero
        if mode == "meanmax":  # and the mean half, linear
            assert_rel_close("jvp tangent (mean half)", tangent[:, :5],
                             loop_pool(t, lengths, "mean"), 1e-12)
        first = torch.stack([x[b, :L].argmax(0) if L else torch.zeros(5, dtype=torch.long)
                             for b, L in enumerate(lengths.tolist())])
        picked = t.gather(1, first.unsqueeze(1)).squeeze(1)
        picked[1] = 0
        assert torch.equal(tangent[:, -5:], picked)
    with fwAD.dual_level():
        dual = ops.frame_pool(fwAD.make_dual(x, t), lengths, mode)
        assert torch.equal(fwAD.unpack_dual(dual).tangent, ref_tangent)
        with pytest.raises(NotImplementedError, match="frame_pool.*forward-mode AD"):
            ops.frame_pool(fwAD.make_dual(x, t), lengths, mode, backend="fused")
        # a plain (non-dual) tensor inside a dual level still takes the compiled op
        assert ops.frame_pool(x, lengths, mode, backend="fused").grad_fn is None




@pytest.mark.parametrize("mode", MODES)
def test_torch_func_vmap_and_grad(mode):
    # The op's C++ autograd Function (Autograd key) is served under vmap (the batching
    # fallback calls the op per sample), not while a grad layer is on the stack: there "auto"
    # (and the FramePool module) run the reference and "fused" refuses by name.
    xs = torch.randn(4, 3, 6, 5, dtype=torch.float64)
    lengths = torch.tensor([6, 1, 4])
    per_sample = torch.stack([ops.frame_pool(x, lengths, mode, backend="fused") for x in xs])
    for backend in ("auto", "fused"):
        batched = torch.func.vmap(lambda a: ops.frame_pool(a, lengths, mode, backend=backend))(xs)
        assert_rel_close(f"vmap {backend}", batched, per_sample, 1e-12)
    module = FramePool(mode)
    assert_rel_close("vmap module", torch.func.vmap(lambda a: module(a, lengths))(xs),
                     per_sample, 1e-12)
    g = torch.randn(3, width(5, mode), dtype=torch.float64)
    gx = torch.func.grad(lambda a: (ops.frame_pool(a, lengths, mode) * g).sum())(xs[0])
    x0 = xs[0].clone().requires_grad_()
    (want,) = torch.autograd.grad(ops.frame_pool(x0, lengths, mode, backend="fused"), x0, g)
    assert_rel_close("func.grad", gx, want, 1e-12)
    with pytest.raises(NotImplementedError, match=r"frame_pool\(backend='fused'\).*grad"):
        torch.func.grad(lambda a: ops.frame_pool(a, lengths, mode, backend="fused").sum())(xs[0])


@pytest.mark.parametrize("backend", ["auto", "fused", "reference"])
def test_per_sample_lengths_and_gradients_under_vmap(backend):
    # Per-sample gradients with per-sample lengths: vmap(grad(loss)) over (x, lengths), each
    # sample against its own plain call; bad lengths in one sample are still a ValueError.
    xs = torch.randn(4, 3, 6, 5, dtype=torch.float64)
    lengths = torch.tensor([[6, 0, 3], [1, 2, 6], [4, 4, 4], [0, 6, 5]])
    got = torch.func.vmap(lambda x, L: ops.frame_pool(x, L, "meanmax", backend=backend))(xs, lengths)
    want = torch.stack([loop_pool(x, L, "meanmax") for x, L in zip(xs, lengths)])
    assert_rel_close("vmap per-sample lengths", got, want, 1e-12)

    def loss(x, L):
        return ops.frame_pool(x, L, "max", backend=backend).pow(2).sum()

    want = []
    for x, L in zip(xs, lengths):
        x = x.clone().requires_grad_()
        want.append(torch.autograd.grad(loss(x, L), x)[0])
    if backend == "fused":
        with pytest.raises(NotImplementedError, match="grad"):
            torch.func.vmap(torch.func.grad(loss))(xs, lengths)
    else:
        assert_rel_close("vmap(grad)", torch.func.vmap(torch.func.grad(loss))(xs, lengths),
                         torch.stack(want), 1e-12)
    bad = lengths.clone()
    bad[2, 1] = 7
    with pytest.raises(ValueError, match=r"lengths\[b\] must lie in \[0, T\]"):
        torch.func.vmap(lambda x, L: ops.frame_pool(x, L, "mean", backend=backend))(xs, bad)


@pytest.mark.parametrize("backend", ["auto", "fused"])
def test_functionalize_keeps_the_registered_op(backend):
    # torch.func.functionalize involves no autograd: the op passes through it, and a graph
    # traced through it holds the op, not the reference's pieces.
    from torch.fx.experimental.proxy_tensor import make_fx
    x = torch.randn(2, 5, 4)
    lengths = torch.tensor([5, 2])
    f = torch.func.functionalize(lambda a: ops.frame_pool(a, lengths, "max", backend=backend))
    assert torch.equal(f(x), reference.frame_pool(x, lengths, "max"))
    assert "dtl_fast.frame_pool" in make_fx(f)(x).code


# --- CPU gradients of >= 4 MiB from a cache of warm blocks within its bound, of >= 32 MiB beyond
# it on zero pages (csrc/frame_pool.cpp, GradPagesAllocator) ---------------------------------------
ZERO_PAGES_MIN_BYTES = 32 << 20  # kZeroPagesMinBytes
CACHE_MIN_BYTES = 4 << 20  # kGradCacheMinBytes
CACHE_DEFAULT_BOUND = 64 << 20  # kGradCacheDefaultMiB
# The zero-page cases: the smallest whole 2 MiB above the cache's default bound, which takes
# every gradient that fits it (s34). A fixed size, so that child processes with other settings
# build the same case; where the bound is set higher, the zero-page tests skip.
ZERO_PAGES_CASE_BYTES = CACHE_DEFAULT_BOUND + (2 << 20)


def zero_pages_on():
    return dtl_fast._extension._C.cpu_grad_on_zero_pages(ZERO_PAGES_CASE_BYTES)


def grad_origin():
    """Where this thread's latest CPU gradient came from, as the op records it
    (csrc/frame_pool.cpp, cpu_grad_origins): "torch" (torch's CPU allocator), "mapped" (a
    fresh mapping of the op's own: zero pages) or "cache" (a warm block of its cache). A data
    pointer's 2 MiB alignment is no such signal: torch's allocator can hand out aligned blocks
    too (it page-aligns its blocks under THP_MEM_ALLOC_ENABLE=1, so one in 512 lands on 2 MiB)."""
    return dtl_fast._extension._cpu_grad_origins()["last"]


needs_zero_pages = pytest.mark.skipif(
    not sys.platform.startswith("linux") or not zero_pages_on(),
    reason="zero pages are off here (not Linux, another malloc or CPU allocator, or "
           "DTL_FAST_DISABLE_ZERO_PAGES set)")


def rss_bytes(page: int) -> int:
    """This process's resident memory: /proc/self/smaps_rollup walks the page tables (exact);
    /proc/self/statm's counters are per-CPU caches on Linux >= 6.2, off by up to CPUs x a batch
    of pages on a many-core host, so it is only the fallback."""
    try:
        with open("/proc/self/smaps_rollup") as f:
            for line in f:
                if line.startswith("Rss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * page


def big_case(dtype, T=64, B=8, less=0, nbytes=ZERO_PAGES_CASE_BYTES):
    """x of exactly `nbytes` (by default the zero-page cases' size; `less` feature columns
    fewer), lengths that mix an empty clip, full ones and short ones.
    For max in float32 the full clips take the backward's buckets (D <= L x row bytes / 256),
    the others its vectorised select; full clip 6 is built so that frame 3 is the argmax of
    only 100 features (scattered stores) and frame 7 of all the others (a bucketed row)."""
    D = nbytes // (B * T * torch.empty((), dtype=dtype).element_size()) - less
    gen = torch.Generator().manual_seed(21)
    x = torch.randn(B, T, D, generator=gen).to(dtype)
    x[6] = -5.0
    x[6, 3, :100] = 5.0
    x[6, 7, 100:] = 5.0
    lengths = torch.tensor([T, 0, 1, 5, T, 33, T, 2])
    return x, lengths


def assert_big_grad(what, gx, x, lengths, g, mode):
    """gx, the op's grad_x of a big_case, against the float64 reference: padding frames exactly
    zero, the rest within the dtype's tolerance, and for max exactly one frame per feature of
    a non-empty clip carrying g."""
    x64 = x.double().requires_grad_()
    (want,) = torch.autograd.grad(reference.frame_pool(x64, lengths, mode), x64, g.double())
    padding = torch.arange(x.shape[1])[None, :] >= lengths[:, None]
    assert torch.count_nonzero(gx[padding]) == 0, what  # NaN counts as nonzero
    assert_rel_close(what, gx, want, REL_TOL[x.dtype])
    if mode == "max":
        nz = (gx != 0).sum(1)
        assert torch.equal(nz[lengths > 0], (g[lengths > 0] != 0).long()), what


def test_zero_pages_rule():
    # The rule the op applies, as the extension reports it: the cache of warm blocks from 4 MiB
    # up to its bound (a size rounded up to 2 MiB must fit it), fresh zero pages from 32 MiB
    # for what the cache does not take, and only where they were not turned off (here the
    # default: Linux, glibc, torch's own CPU allocator). The two never both say yes.
    c = dtl_fast._extension._C
    assert not c.cpu_grad_on_zero_pages(ZERO_PAGES_MIN_BYTES - 1)
    assert not c.cpu_grad_on_zero_pages(0)
    assert not c.cpu_grad_from_cache(CACHE_MIN_BYTES - 1)
    assert not c.cpu_grad_from_cache(0)
    default_setup = (sys.platform.startswith("linux") and not os.environ.get("LD_PRELOAD")
                     and os.environ.get("DTL_FAST_DISABLE_ZERO_PAGES", "") in ("", "0"))
    for n in (CACHE_MIN_BYTES, ZERO_PAGES_MIN_BYTES - 1, ZERO_PAGES_MIN_BYTES,
              CACHE_DEFAULT_BOUND, CACHE_DEFAULT_BOUND + 1, ZERO_PAGES_CASE_BYTES, 2**64 - 1):
        assert not (c.cpu_grad_from_cache(n) and c.cpu_grad_on_zero_pages(n)), n
        if default_setup:  # whatever the cache's bound: zero pages for what it does not take
            assert c.cpu_grad_on_zero_pages(n) == (
                n >= ZERO_PAGES_MIN_BYTES and not c.cpu_grad_from_cache(n)), n
    assert not c.cpu_grad_from_cache(2**64 - 1)  # no wrap-around when rounded up to 2 MiB
    if default_setup and os.environ.get("DTL_FAST_CPU_GRAD_CACHE_MB") is None:
        assert c.cpu_grad_cache_info()[2] == CACHE_DEFAULT_BOUND
        for n in (CACHE_MIN_BYTES, ZERO_PAGES_MIN_BYTES - 1, ZERO_PAGES_MIN_BYTES,
                  CACHE_DEFAULT_BOUND - 1, CACHE_DEFAULT_BOUND):
            assert c.cpu_grad_from_cache(n), n
            assert not c.cpu_grad_on_zero_pages(n), n
        # one byte past the bound rounds up to a 2 MiB block that does not fit it
        assert not c.cpu_grad_from_cache(CACHE_DEFAULT_BOUND + 1)
        assert c.cpu_grad_on_zero_pages(CACHE_DEFAULT_BOUND + 1)
        assert c.cpu_grad_on_zero_pages(ZERO_PAGES_CASE_BYTES)
    with pytest.raises((OverflowError, TypeError)):
        c.cpu_grad_on_zero_pages(-1)
    with pytest.raises((OverflowError, TypeError)):
        c.cpu_grad_from_cache(-1)


@needs_zero_pages
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("nbytes", [ZERO_PAGES_CASE_BYTES, ZERO_PAGES_MIN_BYTES],
                         ids=["zero-pages", "32MiB"])
def test_large_cpu_gradient_on_zero_pages_matches_reference(mode, dtype, nbytes):
    # The backward skips the writes that zero pages make unnecessary (padding frames; for max,
    # the features of other frames): every element must still come out right, on zero pages
    # beyond the cache's bound and at 32 MiB (a block of the cache: fresh, or one an earlier
    # call left there; torch's allocator or zero pages with the cache off).
    x, lengths = big_case(dtype, nbytes=nbytes)
    B, T, D = x.shape
    g = torch.randn(B, width(D, mode), generator=torch.Generator().manual_seed(5)).to(dtype)
    _, am = torch.ops.dtl_fast.frame_pool(x, lengths, mode)
    gx = torch.ops.dtl_fast.frame_pool_backward(g, lengths, am, T, mode)
    c = dtl_fast._extension._C
    if c.cpu_grad_on_zero_pages(gx.nbytes):
        assert grad_origin() == "mapped"
    elif c.cpu_grad_from_cache(gx.nbytes):
        assert grad_origin() in ("mapped", "cache")
    else:
        assert grad_origin() == "torch"
    assert nbytes != ZERO_PAGES_CASE_BYTES or grad_origin() == "mapped"
    assert_big_grad("large grad", gx, x, lengths, g, mode)


@needs_zero_pages
@pytest.mark.parametrize("mode", ["max", "meanmax"])
def test_zero_page_backward_ignores_an_argmax_outside_the_clip(mode):
    # The backward op takes argmax as given: an index at or past the clip's length (a frame of
    # its padding, T, far beyond) or below 0 sends no gradient anywhere. For max the 70-frame
    # clip 0 of this 66 MiB gradient takes the buckets (D 16896 <= 70 x 66 KiB / 256), whose
    # scratch holds the clip's frames only: such an index must not reach it.
    x, lengths = big_case(torch.float32, T=128)
    B, T, D = x.shape
    lengths[0] = 70
    g = torch.randn(B, width(D, mode), generator=torch.Generator().manual_seed(9))
    _, am = torch.ops.dtl_fast.frame_pool(x, lengths, mode)
    am = am.clone()
    am[0, :50], am[0, 50:60], am[0, 60:70], am[0, 70:80] = 100, 10**6, -7, T
    gx = torch.ops.dtl_fast.frame_pool_backward(g, lengths, am, T, mode)
    want = torch.zeros(B, T, D)
    g_max = g[:, D:] if mode == "meanmax" else g
    b, d = torch.nonzero((am >= 0) & (am < lengths[:, None]), as_tuple=True)
    want[b, am[b, d].long(), d] = g_max[b, d]
    if mode == "meanmax":
        valid = torch.arange(T)[None, :] < lengths[:, None]
        want += valid[:, :, None] * (g[:, None, :D] / lengths.clamp(min=1)[:, None, None])
    assert torch.count_nonzero(gx[0, :, :80] - want[0, :, :80]) == 0
    assert_rel_close("grad x", gx, want, 1e-6)


@needs_zero_pages
def test_zero_page_gradient_is_a_regular_tensor_and_is_freed():
    x, lengths = big_case(torch.float32)
    B, T, D = x.shape
    _, am = torch.ops.dtl_fast.frame_pool(x, None, "mean")
    page = os.sysconf("SC_PAGE_SIZE")

    def rss():
        return rss_bytes(page)

    gx = torch.ops.dtl_fast.frame_pool_backward(torch.ones(B, D), None, am, T, "mean")
    assert grad_origin() == "mapped"
    assert torch.equal(gx, torch.full_like(gx, 1.0 / T))
    before = rss()
    del gx  # every page was written (no padding): freeing it must hand them back at once
    assert before - rss() >= 0.9 * ZERO_PAGES_CASE_BYTES
    gx = torch.ops.dtl_fast.frame_pool_backward(torch.ones(B, D), lengths, am, T, "mean")
    c = gx.clone()
    gx.add_(1.0)  # in place (what gradient accumulation does)
    assert torch.equal(gx, c + 1.0)
    mapped = dtl_fast._extension._cpu_grad_origins()["mapped"]
    gx.resize_(B + 1, T, D)  # grows through the same allocator (a new mapping of its own)
    assert grad_origin() == "mapped"
    assert dtl_fast._extension._cpu_grad_origins()["mapped"] == mapped + 1
    assert torch.equal(gx[:B], c + 1.0)
    assert gx.numpy().shape == (B + 1, T, D)


@needs_zero_pages
def test_zero_page_gradient_is_seen_by_the_memory_profiler():
    # Reported through torch's own CPU reporter: the allocation and its free inside the window
    # count, and the free of a block allocated before the window is dropped (as torch drops
    # its own), not shown as a negative allocation.
    from torch.profiler import ProfilerActivity, profile, record_function

    x, lengths = big_case(torch.float32)
    B, T, D = x.shape
    _, am = torch.ops.dtl_fast.frame_pool(x, lengths, "max")
    old = torch.ops.dtl_fast.frame_pool_backward(torch.ones(B, D), lengths, am, T, "max")
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        gx = torch.ops.dtl_fast.frame_pool_backward(torch.ones(B, D), lengths, am, T, "max")
        nbytes = gx.nbytes
        with record_function("free_new"):
            del gx
        with record_function("free_old"):
            del old
    usage = {e.key: e.cpu_memory_usage for e in prof.key_averages()}
    assert sum(v for k, v in usage.items() if "frame_pool_backward" in k) >= nbytes
    assert usage["free_new"] <= -nbytes
    assert usage["free_old"] == 0


def case_grads(nbytes=ZERO_PAGES_CASE_BYTES, reuse=False, origins=None):
    """{mode: grad_x} of big_case(nbytes) for mean, max and meanmax; with reuse, {mode: (the
    first grad_x, the next one)}, the first overwritten with -1 and freed in between, so that
    the second lands on a reused block where one is cached. A list `origins` gets the
    grad_origin() of each gradient in turn. The switch tests run this in a child process and
    in their own."""
    x, lengths = big_case(torch.float32, nbytes=nbytes)
    T = x.shape[1]
    out = {}
    for mode in ("mean", "max", "meanmax"):
        _, am = torch.ops.dtl_fast.frame_pool(x, lengths, mode)
        g = torch.randn(8, width(x.shape[2], mode), generator=torch.Generator().manual_seed(1))
        first = torch.ops.dtl_fast.frame_pool_backward(g, lengths, am, T, mode)
        if origins is not None:
            origins.append(grad_origin())
        if not reuse:
            out[mode] = first
            continue
        keep = first.clone()
        first.fill_(-1.0)
        del first
        out[mode] = (keep, torch.ops.dtl_fast.frame_pool_backward(g, lengths, am, T, mode))
        if origins is not None:
            origins.append(grad_origin())
    return out


def run_child(tmp_path, body: str, env: dict):
    """Runs `body` in a child Python with `env` added, this module importable and `saved` the
    path of a file to torch.save into; returns what it saved (None if nothing)."""
    import subprocess

    saved = tmp_path / f"child{len(list(tmp_path.iterdir()))}.pt"
    code = "import sys, torch, dtl_fast\nsys.path.insert(0, %r)\nsaved = %r\n" % (
        os.path.dirname(__file__), str(saved)) + body
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, **env})
    assert res.returncode == 0, res.stderr
    return torch.load(saved) if saved.exists() else None


def assert_bad_setting_rejected(tmp_path, var, value, info_key, reader):
    """In a child with `var`=`value` (read once per process): the raw backward op, a module's
    backward and the Python reader `reader` raise a ValueError naming `var` (the op's with the
    bad value), and dtl_fast.info()[info_key] says it instead of raising."""
    body = f"""
import pytest
x = torch.randn(2, 3, 4)
_, am = torch.ops.dtl_fast.frame_pool(x, None, "mean")
with pytest.raises(ValueError, match="{var}.*'{value}'"):
    torch.ops.dtl_fast.frame_pool_backward(torch.ones(2, 4), None, am, 3, "mean")
x.requires_grad_()
with pytest.raises(ValueError, match="{var}"):
    dtl_fast.nn.FramePool("mean")(x).sum().backward()
assert "{var}" in dtl_fast.info()["{info_key}"]["error"]
with pytest.raises(ValueError, match="{var}"):
    {reader}()
"""
    assert run_child(tmp_path, body, {var: value}) is None


@needs_zero_pages
def test_zero_pages_can_be_turned_off(tmp_path):
    # DTL_FAST_DISABLE_ZERO_PAGES=1 (read once per process) keeps the gradient on torch's
    # allocator with bit-identical values.
    off = run_child(tmp_path, """
from test_frame_pool import ZERO_PAGES_CASE_BYTES, case_grads
assert not dtl_fast._extension._C.cpu_grad_on_zero_pages(ZERO_PAGES_CASE_BYTES)
origins = []
torch.save(case_grads(origins=origins), saved)
assert origins == ["torch"] * 3, origins
""", {"DTL_FAST_DISABLE_ZERO_PAGES": "1"})
    origins = []
    for mode, gx in case_grads(origins=origins).items():
        assert torch.equal(gx, off[mode]), mode
    assert origins == ["mapped"] * 3, origins


# --- the cache of warm gradient blocks (4 MiB up to its bound) -----------------------------------
CACHE_CASE_BYTES = 16 << 20  # the size of issue 13's 64x64x1024 float32 gradient


def cache_on(nbytes=CACHE_CASE_BYTES):
    try:
        return dtl_fast._extension._C.cpu_grad_from_cache(nbytes)
    except ValueError:  # a bad DTL_FAST_CPU_GRAD_CACHE_MB in this process: nothing cached
        return False


needs_grad_cache = pytest.mark.skipif(
    not sys.platform.startswith("linux") or not cache_on(),
    reason="the CPU gradient cache is off here (not Linux, another malloc or CPU allocator, or "
           "DTL_FAST_CPU_GRAD_CACHE_MB=0)")


@needs_grad_cache
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("mode", MODES)
def test_cached_gradient_block_is_reused_and_fully_rewritten(mode, dtype):
    # A block back from the cache holds whatever its last tensor held: the backward must write
    # every element of it (padding zeros included), where a fresh block may skip the padding.
    x, lengths = big_case(dtype, nbytes=CACHE_CASE_BYTES)
    B, T, D = x.shape
    g = torch.randn(B, width(D, mode), generator=torch.Generator().manual_seed(7)).to(dtype)
    _, am = torch.ops.dtl_fast.frame_pool(x, lengths, mode)
    gc.collect()  # an earlier test's gradient in a cycle must not reach the cache mid-test
    dtl_fast.empty_cpu_grad_cache()
    fresh = torch.ops.dtl_fast.frame_pool_backward(g, lengths, am, T, mode)
    assert grad_origin() == "mapped"  # the op's own block, freshly mapped
    assert_big_grad("fresh block", fresh, x, lengths, g, mode)
    ptr = fresh.data_ptr()
    fresh.fill_(float("nan"))  # what the user did with it
    del fresh
    assert dtl_fast._extension._C.cpu_grad_cache_info()[:2] == (CACHE_CASE_BYTES, 1)
    reused = torch.ops.dtl_fast.frame_pool_backward(g, lengths, am, T, mode)
    assert grad_origin() == "cache"
    assert reused.data_ptr() == ptr  # the same block, back from the cache
    assert dtl_fast._extension._C.cpu_grad_cache_info()[:2] == (0, 0)
    assert not torch.isnan(reused).any()
    assert_big_grad("reused block", reused, x, lengths, g, mode)


@needs_grad_cache
def test_grad_cache_is_bounded_and_emptied():
    # At most the bound (64 MiB by default) is kept; the oldest blocks go first; a different
    # size is not handed out for another; empty_cpu_grad_cache() gives the pages back to the system.
    c = dtl_fast._extension._C
    cap = c.cpu_grad_cache_info()[2]
    if cap < 2 * CACHE_CASE_BYTES or cap % CACHE_CASE_BYTES:
        pytest.skip("the expectations below are written for a bound of 32, 48, 64, ... MiB")
    k = cap // CACHE_CASE_BYTES  # blocks of 16 MiB the cache can keep
    x, _ = big_case(torch.float32, nbytes=CACHE_CASE_BYTES)
    B, T, D = x.shape
    lengths = None  # every frame valid: every page of every block is written, fresh or reused
    _, am = torch.ops.dtl_fast.frame_pool(x, lengths, "mean")
    g = torch.ones(B, D)
    gc.collect()  # an earlier test's gradient in a cycle must not reach the cache mid-test
    dtl_fast.empty_cpu_grad_cache()
    n = k + 2
    grads = [torch.ops.dtl_fast.frame_pool_backward(g, lengths, am, T, "mean") for _ in range(n)]
    ptrs = [t.data_ptr() for t in grads]
    assert len(set(ptrs)) == n and c.cpu_grad_cache_info()[:2] == (0, 0)
    while grads:  # freed oldest first: the first two are evicted as the last ones come back
        grads.pop(0)
    assert c.cpu_grad_cache_info()[:2] == (cap, k)
    # the k kept are the k freed last; the most recently freed is handed out first
    again = [torch.ops.dtl_fast.frame_pool_backward(g, lengths, am, T, "mean") for _ in range(k)]
    assert [t.data_ptr() for t in again] == ptrs[::-1][:k]
    assert c.cpu_grad_cache_info()[:2] == (0, 0)
    while again:
        again.pop(0)
    # another size (8 MiB) does not take a 16 MiB block; cached, it evicts the oldest one
    small = torch.ops.dtl_fast.frame_pool_backward(g[:, : D // 2], lengths, am, T, "mean")
    assert small.data_ptr() not in ptrs[2:]
    del small
    assert c.cpu_grad_cache_info()[:2] == (cap - CACHE_CASE_BYTES // 2, k)
    # freed in the order taken, ptrs[-1] was the oldest (evicted) and ptrs[2] the newest
    again = torch.ops.dtl_fast.frame_pool_backward(g, lengths, am, T, "mean")
    assert again.data_ptr() == ptrs[2]
    del again
    page = os.sysconf("SC_PAGE_SIZE")

    def rss():
        return rss_bytes(page)

    held = c.cpu_grad_cache_info()[0]
    assert held == cap - CACHE_CASE_BYTES // 2
    before = rss()
    assert dtl_fast.empty_cpu_grad_cache() == held
    assert c.cpu_grad_cache_info()[:2] == (0, 0)
    assert before - rss() >= 0.9 * held
    assert dtl_fast.empty_cpu_grad_cache() == 0


@needs_grad_cache
def test_grad_cache_keeps_a_gradient_just_below_32mib():
    # Asked for below 32 MiB, the block is 32 MiB once rounded to 2 MiB: it must still go back
    # to the cache and be reused, as cpu_grad_from_cache says.
    c = dtl_fast._extension._C
    x, lengths = big_case(torch.float32, less=1, nbytes=ZERO_PAGES_MIN_BYTES)
    B, T, D = x.shape
    nbytes = x.numel() * x.element_size()
    if not c.cpu_grad_from_cache(nbytes):
        pytest.skip("the bound is below 32 MiB here")
    _, am = torch.ops.dtl_fast.frame_pool(x, lengths, "mean")
    gc.collect()  # an earlier test's gradient in a cycle must not reach the cache mid-test
    dtl_fast.empty_cpu_grad_cache()
    gx = torch.ops.dtl_fast.frame_pool_backward(torch.ones(B, D), lengths, am, T, "mean")
    ptr = gx.data_ptr()
    del gx
    assert c.cpu_grad_cache_info()[:2] == (ZERO_PAGES_MIN_BYTES, 1)
    gx = torch.ops.dtl_fast.frame_pool_backward(torch.ones(B, D), lengths, am, T, "mean")
    assert gx.data_ptr() == ptr and grad_origin() == "cache"
    del gx
    assert dtl_fast.empty_cpu_grad_cache() == ZERO_PAGES_MIN_BYTES
    # beyond the bound: fresh zero pages, never cached
    if c.cpu_grad_cache_info()[2] > (256 << 20):
        return  # not at a size this test should allocate
    x, lengths = big_case(torch.float32, nbytes=c.cpu_grad_cache_info()[2] + (2 << 20))
    _, am = torch.ops.dtl_fast.frame_pool(x, lengths, "mean")
    gx = torch.ops.dtl_fast.frame_pool_backward(torch.ones(B, x.shape[2]), lengths, am, T, "mean")
    assert grad_origin() in ("mapped", "torch")
    del gx
    assert c.cpu_grad_cache_info()[:2] == (0, 0)


@needs_grad_cache
@pytest.mark.parametrize("mode", ["mean", "max", "meanmax"])
def test_grad_cache_takes_a_gradient_of_32mib_and_more_within_its_bound(mode):
    # From s34 the cache takes any gradient whose rounded size fits its bound, 32 MiB and more
    # too (a fresh mapping per call cost the kernel's zeroing of every page, and host faults on
    # a VM that reports free memory). A fresh block skips the padding; the block back from the
    # cache, overwritten in between, must be written in full.
    c = dtl_fast._extension._C
    nbytes = c.cpu_grad_cache_info()[2]  # the whole bound: the largest block it takes
    if not ZERO_PAGES_MIN_BYTES <= nbytes <= (256 << 20) or nbytes % (2 << 20):
        pytest.skip("written for a bound of 32 MiB up to 256 MiB, in whole 2 MiB")
    x, lengths = big_case(torch.float32, nbytes=nbytes)
    B, T, D = x.shape
    assert c.cpu_grad_from_cache(x.nbytes) and not c.cpu_grad_on_zero_pages(x.nbytes)
    g = torch.randn(B, width(D, mode), generator=torch.Generator().manual_seed(11))
    _, am = torch.ops.dtl_fast.frame_pool(x, lengths, mode)
    gc.collect()  # an earlier test's gradient in a cycle must not reach the cache mid-test
    dtl_fast.empty_cpu_grad_cache()
    fresh = torch.ops.dtl_fast.frame_pool_backward(g, lengths, am, T, mode)
    assert grad_origin() == "mapped"
    assert_big_grad("fresh block", fresh, x, lengths, g, mode)
    ptr = fresh.data_ptr()
    fresh.fill_(float("nan"))
    del fresh
    assert c.cpu_grad_cache_info()[:2] == (nbytes, 1)
    reused = torch.ops.dtl_fast.frame_pool_backward(g, lengths, am, T, mode)
    assert grad_origin() == "cache" and reused.data_ptr() == ptr
    assert_big_grad("reused block", reused, x, lengths, g, mode)
    del reused
    assert dtl_fast.empty_cpu_grad_cache() == nbytes


def two_size_grads():
    """(the cache's bound, large(), small()) for the eviction tests, the cache emptied: large()
    and small() return a mean gradient of the bound's size and of 16 MiB (every frame valid),
    checked against 1 / T. Skips where the bound is not 32 MiB up to 256 MiB."""
    cap = dtl_fast._extension._C.cpu_grad_cache_info()[2]
    if cap < 2 * CACHE_CASE_BYTES or cap > (256 << 20) or cap % (2 << 20):
        pytest.skip("written for a bound of 32 MiB up to 256 MiB, in whole 2 MiB")

    def maker(nbytes):
        x, _ = big_case(torch.float32, nbytes=nbytes)
        T = x.shape[1]
        _, am = torch.ops.dtl_fast.frame_pool(x, None, "mean")
        g = torch.ones(8, x.shape[2])

        def grad():
            gx = torch.ops.dtl_fast.frame_pool_backward(g, None, am, T, "mean")
            assert torch.equal(gx, torch.full_like(gx, 1.0 / T))
            return gx
        return grad

    large, small = maker(cap), maker(CACHE_CASE_BYTES)
    gc.collect()  # an earlier test's gradient in a cycle must not reach the cache mid-test
    dtl_fast.empty_cpu_grad_cache()
    return cap, large, small


@needs_grad_cache
@pytest.mark.parametrize("large_freed_first", [True, False], ids=["large-first", "small-first"])
def test_grad_cache_with_a_large_and_a_small_gradient_per_step(large_freed_first):
    # A block may be as large as the whole bound (s34). A step that frees a 16 MiB and a
    # bound-sized gradient must not have one evict the other: blocks of 32 MiB and more have a
    # pool of their own, so both hit from the second step on, whichever is freed first, and
    # the 16 MiB one as before s34 (review s34: in one pool they missed every step).
    c = dtl_fast._extension._C
    cap, large_grad, small_grad = two_size_grads()
    origins = []
    for _ in range(4):
        large = large_grad()
        origins.append(grad_origin())
        small = small_grad()
        origins.append(grad_origin())
        if large_freed_first:
            del large, small
        else:
            del small, large
        assert c.cpu_grad_cache_info()[:2] == (cap + CACHE_CASE_BYTES, 2)
    assert origins == ["mapped"] * 2 + ["cache"] * 6, origins
    assert dtl_fast.empty_cpu_grad_cache() == cap + CACHE_CASE_BYTES


@needs_grad_cache
def test_a_small_block_in_the_cache_leaves_a_large_gradient_its_room():
    # A 16 MiB block left in the cache by earlier work stays where it is, and a bound-sized
    # gradient still hits from its second call (its own pool).
    c = dtl_fast._extension._C
    cap, large_grad, small_grad = two_size_grads()
    del_small = small_grad()
    del del_small
    assert c.cpu_grad_cache_info()[:2] == (CACHE_CASE_BYTES, 1)
    origins = []
    for _ in range(3):
        large = large_grad()
        origins.append(grad_origin())
        del large
        assert c.cpu_grad_cache_info()[:2] == (cap + CACHE_CASE_BYTES, 2)
    assert origins == ["mapped", "cache", "cache"], origins
    assert dtl_fast.empty_cpu_grad_cache() == cap + CACHE_CASE_BYTES


@needs_grad_cache
def test_grad_cache_blocks_are_seen_by_the_memory_profiler():
    # A block from the cache is reported as an allocation, and its return to the cache as a
    # free (as torch's CUDA caching allocator reports allocated, not reserved, memory).
    from torch.profiler import ProfilerActivity, profile, record_function

    x, lengths = big_case(torch.float32, nbytes=CACHE_CASE_BYTES)
    B, T, D = x.shape
    _, am = torch.ops.dtl_fast.frame_pool(x, lengths, "mean")
    warm = torch.ops.dtl_fast.frame_pool_backward(torch.ones(B, D), lengths, am, T, "mean")
    del warm  # a block in the cache before the window opens
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        gx = torch.ops.dtl_fast.frame_pool_backward(torch.ones(B, D), lengths, am, T, "mean")
        nbytes = gx.nbytes
        with record_function("back_to_cache"):
            del gx
    usage = {e.key: e.cpu_memory_usage for e in prof.key_averages()}
    assert sum(v for k, v in usage.items() if "frame_pool_backward" in k) >= nbytes
    assert usage["back_to_cache"] <= -nbytes


@needs_grad_cache
def test_grad_cache_under_threads():
    # Backward calls from several threads take and return blocks at once: every gradient
    # comes out right and no block is handed to two tensors.
    from concurrent.futures import ThreadPoolExecutor

    x, lengths = big_case(torch.float32, nbytes=CACHE_MIN_BYTES)
    B, T, D = x.shape
    _, am = torch.ops.dtl_fast.frame_pool(x, lengths, "max")
    gs = [torch.randn(B, D, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    want = [torch.ops.dtl_fast.frame_pool_backward(g, lengths, am, T, "max").clone() for g in gs]
    gc.collect()  # an earlier test's gradient in a cycle must not reach the cache mid-test
    dtl_fast.empty_cpu_grad_cache()

    import threading

    lock = threading.Lock()
    in_use: set[int] = set()  # data pointers of the gradients alive in any thread

    def work(i):
        live, origins = [], []
        for k in range(6):
            gx = torch.ops.dtl_fast.frame_pool_backward(gs[i], lengths, am, T, "max")
            origins.append(grad_origin())  # this thread's own record
            with lock:
                if gx.data_ptr() in in_use:  # one block handed to two live tensors
                    return False
                in_use.add(gx.data_ptr())
            live.append(gx)
            if len(live) > 2:
                old = live.pop(0)
                with lock:
                    in_use.discard(old.data_ptr())
                del old
            if not torch.equal(gx, want[i]):
                return False
        ok = all(o in ("mapped", "cache") for o in origins)
        with lock:
            for t in live:
                in_use.discard(t.data_ptr())
        return ok

    with ThreadPoolExecutor(4) as pool:
        assert all(pool.map(work, range(4)))


@needs_grad_cache
def test_grad_origin_is_each_thread_s_own():
    # The `last` origin is a thread's own record (thread_local in csrc/frame_pool.cpp): a
    # gradient of the op's allocator made in another thread after this thread's gradient of
    # torch's does not show here, and this thread's does not show in a fresh thread. A record
    # shared by the threads would read "mapped" / "cache" here and "torch" there.
    import threading

    bwd = torch.ops.dtl_fast.frame_pool_backward
    small = torch.randn(2, 3, 4)
    _, small_am = torch.ops.dtl_fast.frame_pool(small, None, "max")
    bwd(torch.ones(2, 4), None, small_am, 3, "max")
    assert grad_origin() == "torch"
    x, lengths = big_case(torch.float32, nbytes=CACHE_MIN_BYTES)
    B, T, D = x.shape
    _, am = torch.ops.dtl_fast.frame_pool(x, lengths, "max")
    seen = {}

    def work():
        seen["before"] = grad_origin()
        gx = bwd(torch.ones(B, D), lengths, am, T, "max")
        seen["after"] = grad_origin()
        del gx

    worker = threading.Thread(target=work)
    worker.start()
    worker.join()
    assert seen["before"] == "none" and seen["after"] in ("mapped", "cache"), seen
    assert grad_origin() == "torch"


@needs_grad_cache
def test_grad_cache_can_be_turned_off_and_rejects_a_bad_setting(tmp_path):
    # DTL_FAST_CPU_GRAD_CACHE_MB=0 (read once per process) keeps these gradients on torch's
    # allocator, bit for bit the same; a setting that is not a whole number of MiB is a
    # ValueError naming it, from the backward (dtl_fast.info() says it instead of raising).
    off = run_child(tmp_path, """
from test_frame_pool import CACHE_CASE_BYTES, ZERO_PAGES_MIN_BYTES, case_grads
assert not dtl_fast._extension._C.cpu_grad_from_cache(CACHE_CASE_BYTES)
assert dtl_fast._extension._C.cpu_grad_cache_info() == (0, 0, 0)
origins = []
torch.save(case_grads(CACHE_CASE_BYTES, reuse=True, origins=origins), saved)
assert origins == ["torch"] * 6, origins
# from 32 MiB, with the cache off: fresh zero pages, every call, as before s34
if dtl_fast._extension._C.cpu_grad_on_zero_pages(ZERO_PAGES_MIN_BYTES):
    big = []
    case_grads(ZERO_PAGES_MIN_BYTES, reuse=True, origins=big)
    assert big == ["mapped"] * 6, big
assert dtl_fast._extension._C.cpu_grad_cache_info() == (0, 0, 0)
""", {"DTL_FAST_CPU_GRAD_CACHE_MB": "0"})
    origins = []
    for mode, (first, reused) in case_grads(CACHE_CASE_BYTES, reuse=True,
                                            origins=origins).items():
        assert torch.equal(first, off[mode][0]), mode
        assert torch.equal(reused, off[mode][1]), mode
        assert torch.equal(first, reused), mode

    # each first one a block of the cache (fresh, or left there earlier), each reused one
    # the block its first one gave back
    assert all(o in ("mapped", "cache") for o in origins[0::2]), origins
    assert origins[1::2] == ["cache"] * 3, origins

    assert_bad_setting_rejected(tmp_path, "DTL_FAST_CPU_GRAD_CACHE_MB", "64MB",
                                "frame_pool_cpu_grad_cache", "dtl_fast.cpu_grad_cache_info")


THP_BODY = """
from test_frame_pool import CACHE_CASE_BYTES, ZERO_PAGES_CASE_BYTES, big_case, case_grads, grad_origin
import os
# a gradient below the cache's 4 MiB, of torch's allocator, which page-aligns (and advises for
# huge pages) blocks of 2 MiB and more under THP_MEM_ALLOC_ENABLE=1
x, lengths = big_case(torch.float32, nbytes=3 << 20)
B, T, D = x.shape
_, am = torch.ops.dtl_fast.frame_pool(x, lengths, "mean")
gx = torch.ops.dtl_fast.frame_pool_backward(torch.ones(B, D), lengths, am, T, "mean")
assert grad_origin() == "torch"
assert gx.data_ptr() % os.sysconf("SC_PAGE_SIZE") == 0, "THP_MEM_ALLOC_ENABLE=1 had no effect"
origins = {"cached": [], "zero_pages": []}
res = {"cached": case_grads(CACHE_CASE_BYTES, reuse=True, origins=origins["cached"]),
       "zero_pages": case_grads(ZERO_PAGES_CASE_BYTES, origins=origins["zero_pages"]),
       "origins": origins}
torch.save(res, saved)
"""


@needs_grad_cache
@needs_zero_pages
@pytest.mark.parametrize("cache", ["on", "off"])
def test_grad_origins_under_thp(tmp_path, cache):
    # Under THP_MEM_ALLOC_ENABLE=1 (read by torch once per process: in a child) torch's
    # allocator page-aligns its large blocks, so a pointer's alignment no longer says whose a
    # block is; the op's record still does, and the gradients are bit for bit this process's.
    env = {"THP_MEM_ALLOC_ENABLE": "1"}
    if cache == "off":
        env["DTL_FAST_CPU_GRAD_CACHE_MB"] = "0"
    child = run_child(tmp_path, THP_BODY, env)
    cached = ["mapped", "cache"] * 3 if cache == "on" else ["torch"] * 6  # a fresh process
    assert child["origins"] == {"cached": cached, "zero_pages": ["mapped"] * 3}
    here = {"cached": case_grads(CACHE_CASE_BYTES, reuse=True),
            "zero_pages": case_grads(ZERO_PAGES_CASE_BYTES)}
    for part, grads in here.items():
        for mode, want in grads.items():
            got = child[part][mode]
            if isinstance(want, tuple):
                assert all(torch.equal(a, b) for a, b in zip(want, got)), (part, mode)
            else:
                assert torch.equal(want, got), (part, mode)


# --- which CPU gradients are written past the caches (non-temporal stores) ----------------------
NT_STORE_FALLBACK_BYTES = 4 << 20  # kStreamingFallbackBytes: where no cache size is known


def sysfs_llc_bytes():
    """The largest level-3 (or higher) data or unified cache that CPU 0 reports in sysfs (0 if
    none), parsed here on its own to check the extension's reading of it."""
    import glob

    best = (0, 0)
    for d in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*"):
        try:
            with open(d + "/level") as f:
                level = int(f.read())
            with open(d + "/type") as f:
                kind = f.read().strip()
            with open(d + "/size") as f:
                size = f.read().strip()
        except (OSError, ValueError):
            continue
        m = re.fullmatch(r"(\d+)([KMG]?)", size)
        if level < 3 or kind == "Instruction" or m is None:  # an L1 / L2-only report: unknown
            continue
        best = max(best, (level, int(m[1]) << {"": 0, "K": 10, "M": 20, "G": 30}[m[2]]))
    return best[1]


@pytest.mark.skipif(bool(os.environ.get("DTL_FAST_CPU_NT_STORE_MIN_MB")),
                    reason="DTL_FAST_CPU_NT_STORE_MIN_MB is set in this process")
def test_nt_store_rule_is_half_the_last_level_cache():
    rule = dtl_fast._extension.cpu_nt_store_rule()
    llc = sysfs_llc_bytes()
    assert rule["bulk_min_bytes"] == 2 * rule["min_bytes"]
    if llc:
        assert rule == {"min_bytes": llc // 2, "bulk_min_bytes": llc // 2 * 2, "llc_bytes": llc,
                        "source": "half the last-level cache"}
    elif rule["llc_bytes"] == 0:  # no sysfs and no sysconf answer
        assert rule["min_bytes"] == NT_STORE_FALLBACK_BYTES
    else:  # sysconf's answer
        assert rule["min_bytes"] == rule["llc_bytes"] // 2
    assert dtl_fast.info()["frame_pool_cpu_nt_stores"] == rule


SMALL_SHAPES = [(3, 9, 37), (2, 5, 1000), (4, 3, 5), (5, 40, 1000)]
SMALL_THREADS = (1, 2, 3, 6)


def small_lengths(B, T):
    return torch.tensor([T, 0, 33, 1, T - 7][:B]).clamp(max=T)


def small_grads():
    """{(threads, shape, dtype, mode): grad_x} of the CPU backward over shapes whose rows are
    not a multiple of 16 bytes (the streaming writers' unaligned head and tail), with an empty
    clip, a full one, padding, and valid runs of 1, T - 7 and up to 33 frames (the doubling
    copies), at 1, 2, 3 and 6 threads. (5, 40, 1000) has 200 rows in tasks of >= 32 (grain
    32768 / D): 2 threads split it at row 100 (clip 2, frame 20 of 33 valid) and 6 threads at
    34, 68, 102, 136 and 170, so tasks start and end inside valid runs and padding runs. The
    switch test runs this in child processes and in its own."""
    out = {}
    before = torch.get_num_threads()
    try:
        for threads in SMALL_THREADS:
            torch.set_num_threads(threads)
            for shape in SMALL_SHAPES:
                B, T, D = shape
                lengths = small_lengths(B, T)
                for dtype in (torch.float32, torch.bfloat16, torch.float64):
                    x = torch.randn(shape, generator=torch.Generator().manual_seed(D)).to(dtype)
                    for mode in MODES:
                        _, am = torch.ops.dtl_fast.frame_pool(x, lengths, mode)
                        g = torch.randn(B, width(D, mode),
                                        generator=torch.Generator().manual_seed(3))
                        out[(threads, shape, str(dtype), mode)] = (
                            torch.ops.dtl_fast.frame_pool_backward(g.to(dtype), lengths, am, T,
                                                                   mode))
    finally:
        torch.set_num_threads(before)
    return out


def test_nt_stores_on_or_off_give_the_same_gradients(tmp_path):
    # DTL_FAST_CPU_NT_STORE_MIN_MB (read once per process) sets the size from which the
    # backward streams: 0 streams every gradient, 1048576 none. Either way the gradients are
    # bit for bit those of this process, small and unaligned rows, the cache's reused blocks
    # and the zero pages alike, and the small ones match the float64 reference.
    body = """
from test_frame_pool import small_grads, case_grads, CACHE_CASE_BYTES, ZERO_PAGES_CASE_BYTES
rule = dtl_fast._extension.cpu_nt_store_rule()
assert rule["source"] == "DTL_FAST_CPU_NT_STORE_MIN_MB", rule
assert rule["min_bytes"] == %d, rule
torch.save({"small": small_grads(), "cached": case_grads(CACHE_CASE_BYTES, reuse=True),
            "zero_pages": case_grads(ZERO_PAGES_CASE_BYTES)}, saved)
"""
    every = run_child(tmp_path, body % 0, {"DTL_FAST_CPU_NT_STORE_MIN_MB": "0"})
    never = run_child(tmp_path, body % (1 << 40), {"DTL_FAST_CPU_NT_STORE_MIN_MB": "1048576"})
    here = {"small": small_grads(), "cached": case_grads(CACHE_CASE_BYTES, reuse=True),
            "zero_pages": case_grads(ZERO_PAGES_CASE_BYTES)}
    for part in here:
        for key, want in here[part].items():
            for other in (every, never):
                got = other[part][key]
                if isinstance(want, tuple):
                    assert all(torch.equal(a, b) for a, b in zip(want, got)), (part, key)
                else:
                    assert torch.equal(want, got), (part, key)
    for (threads, shape, dtype, mode), gx in here["small"].items():
        # every thread count writes the same bits
        assert torch.equal(gx, here["small"][(1, shape, dtype, mode)]), (threads, shape, mode)
        if threads != 1:
            continue
        B, T, D = shape
        lengths = small_lengths(B, T)
        # x and g rounded to the case's dtype first (exact in float64: the same argmax)
        x = torch.randn(shape, generator=torch.Generator().manual_seed(D)).to(gx.dtype)
        g = torch.randn(B, width(D, mode), generator=torch.Generator().manual_seed(3))
        x, g = x.double().requires_grad_(), g.to(gx.dtype).double()
        (want,) = torch.autograd.grad(reference.frame_pool(x, lengths, mode), x, g)
        assert_rel_close(f"{shape} {dtype} {mode}", gx, want, REL_TOL[gx.dtype])


def test_nt_store_setting_rejects_a_bad_value(tmp_path):
    assert_bad_setting_rejected(tmp_path, "DTL_FAST_CPU_NT_STORE_MIN_MB", "-1",
                                "frame_pool_cpu_nt_stores", "dtl_fast._extension.cpu_nt_store_rule")


# --- without lengths: the argmax-free forward, and auto's choice of torch's own reduction ------
# (csrc/frame_pool.cpp: with_argmax=False; dtl_fast/ops/frame_pool.py: _CPU_ALL_FRAMES_STOCK_WINS,
# _CUDA_ALL_FRAMES_FUSED_WINS, all_frames_stock_rule, _stock_all_frames)


def bits(t):
    """t's bits as integers: torch.equal calls NaN != NaN, and +0 == -0; bits tell them apart."""
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def same_bits(a, b, mode, D):
    """a and b bit for bit, -0 / +0 included; NaN payloads too in the max part (the first NaN
    is the one kept). A sum's NaN is any NaN: which input NaN an addition returns depends on
    the order of its operands, which IEEE leaves open and the compiler may swap."""
    exact = torch.zeros_like(a, dtype=torch.bool)
    if mode == "max":
        exact[:] = True
    elif mode == "meanmax":
        exact[:, D:] = True
    both_nan = torch.isnan(a) & torch.isnan(b) & ~exact
    return bool(((bits(a) == bits(b)) | both_nan).all())


def special_input(B, T, D, dtype, seed=0):
    """Values the max scan must order exactly as the argmax path: many ties (halves), -0 and +0,
    NaNs of two payloads and both signs (the first one wins), a column of -inf, +inf."""
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(B, T, D, generator=gen) * 2).round() / 2
    x = x.to(dtype)
    flat = x.view(-1)
    n = flat.numel()
    if n == 0:
        return x
    idx = torch.randperm(n, generator=gen)
    flat[idx[: n // 7]] = 0.0
    flat[idx[n // 7: 2 * n // 7]] = -0.0
    ib = bits(flat)
    nan_bits = {torch.float32: (0x7FC00001, -0x3FFFFF), torch.float64: (0x7FF8000000000001, -1),
                torch.float16: (0x7E01, -0x1FF), torch.bfloat16: (0x7FC1, -0x3F)}[dtype]
    ib[idx[2 * n // 7: 2 * n // 7 + max(1, n // 50)]] = nan_bits[0]
    ib[idx[-max(1, n // 50):]] = nan_bits[1]  # a negative NaN with another payload
    if T > 1 and D > 2:
        x[0, :, 1] = float("-inf")
        x[-1, T // 2, 2] = float("inf")
    return x


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("T", [1, 2, 4, 5, 8, 9, 13])
def test_argmax_free_forward_is_bit_equal(dtype, mode, T, poison):
    # with_argmax=False (a forward nobody differentiates) skips the index and, for max, folds
    # four frames at a time as a tree: the values are the argmax path's bit for bit (NaN
    # payloads, -0 / +0 order included), with lengths and without, over several 1024-feature
    # chunks with a partial last one, a D not a multiple of the vector width, D = 1.
    for D in (1, 7, 1030):
        x = special_input(3, T, D, dtype, seed=T * 31 + D)
        for lengths in (None, torch.tensor([T, 0, max(T - 3, 1)])):
            with poison():
                out, argmax = torch.ops.dtl_fast.frame_pool(x, lengths, mode)
                values, none = torch.ops.dtl_fast.frame_pool(x, lengths, mode, False)
            what = f"{dtype} {mode} T={T} D={D} lengths={lengths}"
            assert same_bits(values, out, mode, D), what
            assert none.shape == (0,) and none.dtype == torch.int32, what
            assert argmax.shape == ((3, D) if mode in ("max", "meanmax") else (0,)), what
            # the time-major layout (read through its strides) gives the same bits
            xt = x.transpose(0, 1).contiguous().transpose(0, 1)
            assert same_bits(torch.ops.dtl_fast.frame_pool(xt, lengths, mode, False)[0], out,
                             mode, D), what


@pytest.mark.parametrize("mode", MODES)
def test_argmax_free_forward_on_any_number_of_threads(mode):
    x = special_input(16, 9, 1030, torch.float32, seed=5)
    prev = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        want = torch.ops.dtl_fast.frame_pool(x, None, mode, False)[0]
        for threads in (2, 3):
            torch.set_num_threads(threads)
            assert same_bits(torch.ops.dtl_fast.frame_pool(x, None, mode, False)[0], want,
                             mode, 1030), threads
    finally:
        torch.set_num_threads(prev)


@pytest.mark.parametrize("mode", MODES)
def test_with_argmax_false_still_differentiates(mode):
    # The flag is a caller's hint: a call autograd records gets its argmax anyway (the C++
    # Autograd kernel asks for it), so the gradient is the argmax path's; a call it does not
    # record (no_grad, inference mode, x not requiring grad) gets none.
    x = special_input(3, 6, 5, torch.float64, seed=1).nan_to_num(0.0).requires_grad_()
    lengths = torch.tensor([6, 0, 4])
    g = torch.randn(3, width(5, mode), dtype=torch.float64)
    has_max = mode in ("max", "meanmax")
    for L in (lengths, None):
        out, argmax = torch.ops.dtl_fast.frame_pool(x, L, mode, False)
        assert argmax.shape == ((3, 5) if has_max else (0,))
        (gx,) = torch.autograd.grad(out, x, g)
        (want,) = torch.autograd.grad(reference.frame_pool(x, L, mode), x, g)
        assert torch.equal(gx, want), L
        for ctx in (torch.no_grad, torch.inference_mode):
            with ctx():
                out2, none = torch.ops.dtl_fast.frame_pool(x, L, mode, False)
            assert none.shape == (0,) and torch.equal(out2, out.detach()) and out2.grad_fn is None
    # x needing no gradient: nothing recorded, whatever the grad mode
    assert torch.ops.dtl_fast.frame_pool(x.detach(), None, mode, False)[1].shape == (0,)
    # the op without autograd's node: no grad_fn, no argmax kept
    out = ops.frame_pool(x.detach(), None, mode, backend="fused")
    assert out.grad_fn is None


@pytest.mark.parametrize("mode", ["max", "meanmax", "mean"])
@pytest.mark.parametrize("backend", ["auto", "fused"])
def test_torch_compile_without_lengths(mode, backend):
    # Under torch.compile `auto` keeps the kernel without lengths (the stock reduction is an
    # eager-only choice): the graph holds the op, values and gradients are the eager kernel's.
    torch._dynamo.reset()
    fn = torch.compile(lambda t: ops.frame_pool(t, None, mode, backend=backend),
                       fullgraph=True, backend="aot_eager")
    x = torch.randn(4, 6, 5)
    eager = lambda t: ops.frame_pool(t, None, mode, backend="fused")  # noqa: E731
    with torch.no_grad():
        assert torch.equal(fn(x), eager(x))
    g = torch.randn(4, width(5, mode))
    out, gx = pool_with_grads(lambda t, L, m: fn(t), x, None, mode, g)
    ref, gref = pool_with_grads(lambda t, L, m: eager(t), x, None, mode, g)
    assert torch.equal(out, ref) and torch.equal(gx, gref)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", MODES)
def test_stock_reduction_matches_the_reference(dtype, mode):
    # What auto runs where the rule says (torch's own reduction over every frame) against the
    # reference: float64 within the dtype's tolerance; half types as the reference at their
    # precision (float32 accumulation rounded once, which x.mean(1) of a half tensor does not
    # do); NaN and infinities where the reference has them; empty B / D; any strides. Mean and
    # sum (the modes the rule may send there with a gradient) also in their gradients.
    for shape in [(1, 1, 1), (3, 9, 1000), (5, 6, 1), (0, 4, 5), (3, 4, 0), (2, 9, 2053)]:
        B, T, D = shape
        x = torch.randn(shape).to(dtype)
        for layout, xx in (("contiguous", x), ("time-major",
                                                x.transpose(0, 1).contiguous().transpose(0, 1))):
            what = f"{shape} {dtype} {mode} {layout}"
            out = fp_ops._stock_all_frames(xx, mode)
            ref = reference.frame_pool(xx.double(), None, mode)
            assert out.dtype == dtype and out.shape == ref.shape, what
            if out.numel():
                assert_rel_close(what, out, ref, REL_TOL[dtype])
            g = torch.randn(B, width(D, mode)).to(dtype)
            if mode in ("mean", "sum"):
                got, gx = pool_with_grads(lambda t, L, m: fp_ops._stock_all_frames(t, m), xx,
                                          None, mode, g)
                _, gref = pool_with_grads(reference.frame_pool, xx.double(), None, mode,
                                          g.double())
                if gx.numel():
                    assert_rel_close(what + " grad", gx, gref, REL_TOL[dtype])
                if dtype in (torch.float16, torch.bfloat16) and out.numel():
                    assert_half_like_the_reference(xx, None, mode, g, got, gx)
            elif dtype in (torch.float16, torch.bfloat16) and out.numel():
                assert_half_forward_like_the_reference(xx, mode, out,
                                                       reference.frame_pool(xx, None, mode))
    # NaN propagates, infinities stay (max is exact in every dtype: the reference's bits)
    x = special_input(3, 6, 5, dtype, seed=2)
    got, want = fp_ops._stock_all_frames(x, mode), reference.frame_pool(x, None, mode)
    assert torch.equal(torch.isnan(got), torch.isnan(want)), mode
    assert torch.equal(got.isinf(), want.isinf()), mode
    if mode == "max":
        assert torch.equal(got.nan_to_num(0.0), want.nan_to_num(0.0))


@pytest.mark.parametrize("device", DEVICES)
def test_stock_half_sums_are_float32_rounded_once(device):
    # The stock path's half sums and means are the reference's bits: one float32 sum (any
    # order: these land on the same rounding), one division, one rounding (the ones-count
    # side is test_half_types_accumulate_in_float32's "stock" case)
    for dtype in (torch.float16, torch.bfloat16):
        x = torch.randn(8, 300, 33, device=device).to(dtype)
        for mode in ("sum", "mean"):
            assert torch.equal(fp_ops._stock_all_frames(x, mode),
                               reference.frame_pool(x, None, mode)), (dtype, mode)


def _spy_stock(monkeypatch):
    calls = []
    real = fp_ops._stock_all_frames
    monkeypatch.setattr(fp_ops, "_stock_all_frames",
                        lambda x, mode: calls.append(mode) or real(x, mode))
    return calls


def test_auto_without_lengths_follows_the_cpu_table(monkeypatch):
    calls = _spy_stock(monkeypatch)
    f32 = torch.float32
    # sum float32 up to 100 bytes, no gradient, measured at 1 thread; mean float32 with a
    # gradient at 2 threads; max with a gradient (never taken: amax splits ties)
    monkeypatch.setattr(fp_ops, "_CPU_ALL_FRAMES_STOCK_WINS", (
        ("sum", f32, False, 0, 100, 1), ("mean", f32, True, 0, 1 << 20, 2),
        ("max", f32, True, 0, 1 << 20, 1)))
    x = torch.randn(2, 3, 4)  # 96 bytes
    prev = torch.get_num_threads()
    try:
        torch.set_num_threads(1)

        def ran(*args, **kw):
            calls.clear()
            ops.frame_pool(*args, **kw)
            return calls == [args[2]]

        assert ran(x, None, "sum")
        assert not ran(x, None, "mean") and not ran(x, None, "max")
        assert not ran(x.to(torch.bfloat16), None, "sum")
        assert not ran(torch.randn(2, 3, 5), None, "sum")  # 120 bytes: past the bound
        assert not ran(x, [3, 2], "sum") and not ran(x, torch.tensor([3, 3]), "sum")
        assert not ran(x, None, "sum", backend="fused")
        assert not ran(x, None, "sum", backend="reference")
        xg = x.clone().requires_grad_()
        assert not ran(xg, None, "sum")  # the entry is for a forward without a gradient
        with torch.no_grad():
            assert ran(xg, None, "sum")
        assert not ran(xg, None, "max")  # listed with a gradient, never taken
        # T = 0 keeps the kernel (the reference's zeros; torch.amax raises on an empty dim)
        monkeypatch.setattr(fp_ops, "_CPU_ALL_FRAMES_STOCK_WINS",
                            (("max", f32, False, 0, 100, 1),))
        calls.clear()
        assert torch.equal(ops.frame_pool(torch.randn(2, 0, 4), None, "max"), torch.zeros(2, 4))
        assert calls == []
        assert ran(x, None, "max")
        # a vmap layer, fake tensors, meta tensors: the paths they had
        calls.clear()
        assert torch.func.vmap(lambda a: ops.frame_pool(a, None, "max"))(
            torch.randn(3, 2, 3, 4)).shape == (3, 2, 4)
        assert calls == []
        from torch._subclasses.fake_tensor import FakeTensorMode
        with FakeTensorMode():
            assert ops.frame_pool(torch.randn(2, 3, 4), None, "max").shape == (2, 4)
        assert calls == []
        assert ops.frame_pool(x.to("meta"), None, "max").shape == (2, 4) and calls == []
        # under torch.compile: the op, as before
        torch._dynamo.reset()
        compiled = torch.compile(lambda a: ops.frame_pool(a, None, "max"), fullgraph=True,
                                 backend="aot_eager")
        assert torch.equal(compiled(x), ops.frame_pool(x, None, "max", backend="fused"))
        calls.clear()
        compiled(x)
        assert calls == []
        # thread counts: the entries of the smallest measured count >= this one, else the largest
        monkeypatch.setattr(fp_ops, "_CPU_ALL_FRAMES_STOCK_WINS", (
            ("sum", f32, False, 0, 100, 1), ("mean", f32, False, 0, 100, 2)))
        assert ran(x, None, "sum") and not ran(x, None, "mean")
        for threads in (2, 4):
            torch.set_num_threads(threads)
            assert ran(x, None, "mean") and not ran(x, None, "sum"), threads
    finally:
        torch.set_num_threads(prev)
    # a mean / sum entry with a gradient: the stock path's gradient is the reference's
    monkeypatch.setattr(fp_ops, "_CPU_ALL_FRAMES_STOCK_WINS",
                        (("mean", f32, True, 0, 1 << 20, 1),))
    g = torch.randn(2, 4)
    calls.clear()
    out, gx = pool_with_grads(ops.frame_pool, x, None, "mean", g)
    assert calls == ["mean"]
    ref, gref = pool_with_grads(reference.frame_pool, x, None, "mean", g)
    assert_rel_close("stock mean", out, ref, 1e-6)
    assert_rel_close("stock mean grad", gx, gref, 1e-6)
    rule = fp_ops.auto_rule()
    assert "at 1 thread with a gradient for mean float32 <= 1 MiB" in rule, rule
    assert "CUDA torch's reduction without a gradient" in rule, rule


def test_all_frames_rule_on_cuda(monkeypatch):
    # Never measured on a GPU: a forward without a gradient runs torch's reduction, and so do
    # sum and float32 / float64 mean with one (an expand backward, nothing written); max /
    # meanmax (amax splits ties) and half mean with a gradient run the kernel. An entry of
    # _CUDA_ALL_FRAMES_FUSED_WINS (rows where ours wins) sends its range back to the kernel.
    # The CPU table does not apply to CUDA, nor the CUDA rule to other devices.
    rule = fp_ops.all_frames_stock_rule
    for mode in MODES:
        for dtype in DTYPES:
            assert rule("cuda", mode, dtype, 1 << 20, grad=False)
            want = mode == "sum" or (mode == "mean" and dtype in (torch.float32, torch.float64))
            assert rule("cuda", mode, dtype, 1 << 20, grad=True) == want, (mode, dtype)
            assert not rule("mps", mode, dtype, 1 << 20, grad=False)
    monkeypatch.setattr(fp_ops, "_CUDA_ALL_FRAMES_FUSED_WINS",
                        (("max", torch.bfloat16, False, 1 << 20, 1 << 30),
                         ("sum", torch.float32, True, 0, 1 << 30)))
    assert not rule("cuda", "max", torch.bfloat16, 1 << 20, grad=False)
    assert rule("cuda", "max", torch.bfloat16, 1 << 19, grad=False)
    assert rule("cuda", "max", torch.float32, 1 << 20, grad=False)
    assert not rule("cuda", "sum", torch.float32, 1 << 20, grad=True)
    assert rule("cuda", "sum", torch.float32, 1 << 20, grad=False)
    assert ("the CUDA kernel for max bfloat16 without a gradient 1 MiB-1024 MiB"
            in fp_ops.auto_rule())
    # the committed CPU table reads as such
    monkeypatch.undo()
    assert "without a gradient for max float32 <= 512 KiB" in fp_ops.auto_rule()
    monkeypatch.setattr(fp_ops, "_CPU_ALL_FRAMES_STOCK_WINS", ())
    assert not rule("cpu", "sum", torch.float32, 8, grad=False)


def test_auto_without_lengths_gives_the_references_values_whatever_it_runs(monkeypatch):
    # The committed table and one that sends every CPU case to torch's reduction: auto's values
    # are the reference's within the tolerances, for every mode and dtype, with T = 0 zeros.
    everything = tuple((m, d, g, 0, 1 << 40, 1) for m in MODES for d in DTYPES
                       for g in (False, True))
    for table in (fp_ops._CPU_ALL_FRAMES_STOCK_WINS, everything):
        monkeypatch.setattr(fp_ops, "_CPU_ALL_FRAMES_STOCK_WINS", table)
        for dtype in DTYPES:
            for mode in MODES:
                for shape in [(3, 9, 1000), (2, 0, 4), (4, 1, 7)]:
                    x = torch.randn(shape).to(dtype)
                    g = torch.randn(shape[0], width(shape[2], mode)).to(dtype)
                    out, gx = pool_with_grads(ops.frame_pool, x, None, mode, g)
                    ref, gref = pool_with_grads(reference.frame_pool, x.double(), None, mode,
                                                g.double())
                    what = f"{dtype} {mode} {shape}"
                    assert_rel_close(what, out, ref, REL_TOL[dtype])
                    assert_rel_close(what + " grad", gx, gref, REL_TOL[dtype])
                    if shape[1] == 0:
                        assert not out.any() and not gx.any(), what
                    with torch.no_grad():
                        assert_rel_close(what + " no_grad", ops.frame_pool(x, None, mode), ref,
                                         REL_TOL[dtype])


@pytest.mark.gpu
@pytest.mark.parametrize("mode", MODES)
def test_gpu_auto_without_lengths_runs_torchs_reduction_where_the_rule_says(mode, monkeypatch):
    calls = _spy_stock(monkeypatch)
    x = torch.randn(4, 33, 300, device="cuda")
    with torch.no_grad():
        out = ops.frame_pool(x, None, mode)
    assert calls[:1] == [mode]  # (meanmax calls it again for its mean half)
    assert_rel_close("cuda stock", out, reference.frame_pool(x.double(), None, mode), 1e-6)
    for dtype in (torch.bfloat16, torch.float16):
        xh = x.to(dtype)
        with torch.no_grad():
            got, want = ops.frame_pool(xh, None, mode), reference.frame_pool(xh, None, mode)
        assert_half_forward_like_the_reference(xh, mode, got, want)
    calls.clear()
    g = torch.randn(4, width(300, mode), device="cuda")
    _, gx = pool_with_grads(ops.frame_pool, x, None, mode, g)
    # with a gradient: torch's for sum / mean float32 (an expand backward), else the kernel
    assert calls == ([mode] if mode in ("sum", "mean") else [])
    _, gref = pool_with_grads(reference.frame_pool, x.double(), None, mode, g.double())
    assert_rel_close("cuda grad", gx, gref, 1e-6)
    calls.clear()
    _, gx = pool_with_grads(ops.frame_pool, x.to(torch.bfloat16), None, mode,
                            g.to(torch.bfloat16))
    assert calls == ([mode] if mode == "sum" else [])
    _, gref = pool_with_grads(reference.frame_pool, x.to(torch.bfloat16).double(), None, mode,
                              g.to(torch.bfloat16).double())
    assert_rel_close("cuda grad bfloat16", gx, gref, REL_TOL[torch.bfloat16])
