"""Integer arguments (lengths, key lengths, windows, labels) of every dtype torch has, through
every public entry and backend: the eight integer dtypes are taken, every other dtype gets a
ValueError naming the argument. The bit-packed, sub-byte and quantized dtypes (torch.bits8,
torch.int4, torch.uint3, torch.quint8, ...) are neither floating nor complex; the reference
backends once let them through to a `.to(torch.int64)` that raised NotImplementedError
("copy_" not implemented for 'Bits8'), and dtl_loss to F.cross_entropy."""
from __future__ import annotations

import warnings

import pytest
import torch

from dtl_fast import ops
from dtl_fast.models.dtl import DTLOutput, dtl_loss
from dtl_fast.ops.cosine_attention import cosine_attention, cosine_attention_composite

# Every dtype torch has: the bit-packed, sub-byte, float8 and quantized ones too.
ALL_TORCH_DTYPES = sorted({v for v in vars(torch).values() if isinstance(v, torch.dtype)}, key=str)
# at::isIntegralType(dtype, includeBool=false), written out here rather than imported
INTEGER = {torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.uint16,
           torch.uint32, torch.uint64}


def _tensor(values, dtype):
    """`values` (small non-negative ints) as `dtype`; dtypes with no conversion from int64
    (bit-packed, sub-byte) as an uninitialised tensor of the same shape."""
    with warnings.catch_warnings():  # complex32 "experimental", quantized "deprecated"
        warnings.simplefilter("ignore", UserWarning)
        base = torch.tensor(values)
        if str(dtype).startswith(("torch.qint", "torch.quint")):
            return torch.quantize_per_tensor(base.float(), 1.0, 0, dtype)
        try:
            return base.to(dtype)
        except (NotImplementedError, RuntimeError):  # bits*, int1-7, float4 / float8 packed
            return torch.empty(base.shape, dtype=dtype)


def _outcome(call, name):
    try:
        call()
    except ValueError as e:
        assert f"{name} must" in str(e), str(e)
        return "refused"
    return "taken"


def _want(dtype):
    return "taken" if dtype in INTEGER else "refused"


@pytest.mark.parametrize("dtype", ALL_TORCH_DTYPES, ids=str)
def test_frame_pool_lengths(dtype):
    x = torch.randn(3, 5, 4)
    lengths = _tensor([1, 5, 0], dtype)
    got = {be: _outcome(lambda be=be: ops.frame_pool(x, lengths, "max", backend=be), "lengths")
           for be in ("reference", "fused", "auto")}
    assert got == dict.fromkeys(got, _want(dtype))


@pytest.mark.parametrize("dtype", ALL_TORCH_DTYPES, ids=str)
def test_rnn_lengths(dtype):
    torch.manual_seed(0)
    rnn = torch.nn.LSTM(4, 6, bidirectional=True)
    x = torch.randn(5, 2, 4)
    weights = [p.detach() for p in rnn._flat_weights]
    lengths = _tensor([5, 3], dtype)
    got = {be: _outcome(lambda be=be: ops.lstm(x, None, weights, bidirectional=True,
                                               lengths=lengths, backend=be), "lengths")
           for be in ("reference", "fused", "auto")}
    assert got == dict.fromkeys(got, _want(dtype))


@pytest.mark.parametrize("dtype", ALL_TORCH_DTYPES, ids=str)
def test_attention_key_lengths_and_window(dtype):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 4, 8) for _ in range(3))
    scale = torch.zeros(3)
    calls = {}
    for be in ("reference", "fused", "auto", "composite"):
        f = cosine_attention_composite if be == "composite" else (
            lambda *a, be=be, **kw: cosine_attention(*a, backend=be, **kw))
        calls[be, "key_lengths [B]"] = (
            lambda f=f: f(q, k, v, scale, key_lengths=_tensor([4, 2], dtype)), "key_lengths")
        calls[be, "key_lengths [B, H]"] = (
            lambda f=f: f(q, k, v, scale, key_lengths=_tensor([[4, 2, 1], [1, 3, 4]], dtype)),
            "key_lengths")
        calls[be, "window [H]"] = (lambda f=f: f(q, k, v, scale, window=_tensor([1, 0, 2], dtype)),
                                   "window")
    got = {key: _outcome(call, name) for key, (call, name) in calls.items()}
    assert got == dict.fromkeys(got, _want(dtype))


@pytest.mark.parametrize("dtype", ALL_TORCH_DTYPES, ids=str)
def test_dtl_loss_labels(dtype):
    logits = torch.randn(3, 4)
    out = DTLOutput(logits, logits, logits)
    assert _outcome(lambda: dtl_loss(out, _tensor([0, 3, 1], dtype)), "labels") == _want(dtype)


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_uint64_lengths_under_torch_func_grad(backend):
    """uint64 lengths are read on the host (a value >= 2^63 would wrap in int64): with tolist,
    which works under torch.func.grad (before: .numpy() raised "Cannot access data pointer of
    Tensor that doesn't have storage" there), for frame pooling and the RNN alike."""
    x = torch.randn(2, 3, 4, dtype=torch.float64)
    L = torch.tensor([3, 1], dtype=torch.uint64)
    got = torch.func.grad(lambda t: ops.frame_pool(t, L, "mean", backend=backend).sum())(x)
    want = torch.func.grad(lambda t: ops.frame_pool(t, L.long(), "mean", backend=backend).sum())(x)
    assert torch.equal(got, want)
    ws = [w.detach().double() for w in torch.nn.GRU(4, 3).parameters()]
    g = torch.func.grad(lambda t: ops.gru(t, None, ws, lengths=L, batch_first=True,
                                          backend=backend)[0].sum())(x)
    g64 = torch.func.grad(lambda t: ops.gru(t, None, ws, lengths=L.long(), batch_first=True,
                                            backend=backend)[0].sum())(x)
    torch.testing.assert_close(g, g64)
    big = torch.tensor([3, 2**63], dtype=torch.uint64)
    with pytest.raises(ValueError, match="must fit in int64"):
        torch.func.grad(lambda t: ops.frame_pool(t, big, "mean", backend=backend).sum())(x)
