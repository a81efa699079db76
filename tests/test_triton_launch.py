"""dtl_fast.kernels._launch: the launch key (what it distinguishes), the mode switch, the
parameter order a handle takes, the JIT fallback on CPU tensors; on a GPU the handles against
the JIT, bitwise, with every hit checked against the JIT's own choice."""
import importlib

import pytest
import torch

from dtl_fast.kernels import _launch as L

from _helpers import HAS_CUDA

attn_ops = importlib.import_module("dtl_fast.ops.cosine_attention")


def test_mode_env_is_validated(monkeypatch):
    for good, want in (("", "0"), ("0", "0"), ("1", "1"), ("check", "check")):
        monkeypatch.setenv(L.MODE_ENV, good)
        assert L._mode_from_env() == want
    monkeypatch.setenv(L.MODE_ENV, "yes")
    with pytest.raises(ValueError, match=r"\$DTL_FAST_TRITON_HANDLES must be one of 0, 1, check"):
        L._mode_from_env()


def _key(args, **consts):
    return L.launch_key("k", 0, args, consts or {"BLOCK": 32}, 4, 2)


def test_launch_key_separates_every_specialisation():
    buf = torch.empty(64)
    # pointer alignment (a view 4 bytes in is not 16-byte aligned), dtype
    assert _key([buf]) == _key([torch.empty(8)])
    assert _key([buf]) != _key([buf[1:]])
    assert _key([buf]) != _key([buf.double()])
    # integers: divisible by 16, equal to 1, 32- or 64-bit
    assert _key([32]) == _key([48])
    assert _key([32]) != _key([33])
    assert _key([1]) != _key([3])
    assert _key([2 ** 31 - 2]) != _key([2 ** 31 + 2])
    assert _key([2 ** 62 + 16]) != _key([2 ** 63 + 16])  # i64 / u64
    assert _key([True]) != _key([1])
    # constexprs and launch options
    assert _key([32], BLOCK=32) != _key([32], BLOCK=64)
    assert L.launch_key("k", 0, [32], {}, 4, 2) != L.launch_key("k", 0, [32], {}, 8, 2)
    assert L.launch_key("k", 0, [32], {}, 4, 2) != L.launch_key("k", 1, [32], {}, 4, 2)


def test_tail_names_follow_the_signature():
    from triton.runtime.jit import JITFunction

    def kern(X, N, BLOCK, IS_F64):  # a plain function is enough: nothing is compiled
        pass

    jf = JITFunction(kern)
    assert L._tail_names(jf, 2, {"IS_F64": False, "BLOCK": 16}) == ["BLOCK", "IS_F64"]
    assert L._tail_names(jf, 2, {"BLOCK": 16}) is None  # a parameter left out: JIT path
    assert L._tail_names(jf, 5, {}) is None
    assert L._tail_names(kern, 2, {"IS_F64": False, "BLOCK": 16}) is None  # not a JITFunction


def test_cpu_tensors_take_the_jit_path(monkeypatch):
    # the interpreter has no compiled kernels: with the handles on, CPU calls still run (JIT)
    monkeypatch.setattr(L, "MODE", "check")
    L._HANDLES.clear()
    q, k, v = (torch.randn(2, 2, 5, 8) for _ in range(3))
    out = attn_ops.cosine_attention(q, k, v, torch.zeros(2), [5, 3], backend="fused")
    monkeypatch.setattr(L, "MODE", "0")
    assert torch.equal(out, attn_ops.cosine_attention(q, k, v, torch.zeros(2), [5, 3],
                                                      backend="fused"))
    assert L._HANDLES == {}


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_gpu_handles_match_the_jit_bitwise(monkeypatch):
    from dtl_fast.ops import rnn as rnn_ops

    def run():
        torch.manual_seed(0)
        outs = []
        for N, offset in ((16, 0), (33, 0), (16, 1)):  # offset 1: misaligned views
            base = torch.randn(2 * 4 * N * 32 + 1, device="cuda")
            q = base[offset:offset + 2 * 4 * N * 32].view(2, 4, N, 32).requires_grad_()
            k = torch.randn(2, 4, N, 32, device="cuda", requires_grad=True)
            v = torch.randn(2, 4, N, 32, device="cuda", requires_grad=True)
            o = attn_ops.cosine_attention(q, k, v, torch.zeros(4, device="cuda"), [N, N // 2],
                                          backend="fused")
            outs += [o.detach(), *torch.autograd.grad(o.square().sum(), (q, k, v))]
        for fn in (rnn_ops.lstm, rnn_ops.gru):
            G = 4 if fn is rnn_ops.lstm else 3
            x = torch.randn(6, 3, 8, device="cuda", requires_grad=True)
            ws = [torch.randn(G * 16, 8, device="cuda"), torch.randn(G * 16, 16, device="cuda"),
                  torch.randn(G * 16, device="cuda"), torch.randn(G * 16, device="cuda")] * 2
            out, _ = fn(x, None, ws, lengths=torch.tensor([6, 2, 4]), bidirectional=True,
                        backend="fused")
            outs += [out.detach(), *torch.autograd.grad(out.sum(), (x,))]
        torch.cuda.synchronize()
        return outs

    monkeypatch.setattr(L, "MODE", "0")
    want = run()
    L._HANDLES.clear()
    monkeypatch.setattr(L, "MODE", "check")
    first = run()   # misses: JIT launches, handles stored
    again = run()   # hits: handles, each checked against the JIT's choice
    assert any(h is not L._NO_HANDLE for h in L._HANDLES.values())
    for a, b, c in zip(want, first, again):
        assert torch.equal(a, b) and torch.equal(a, c)
