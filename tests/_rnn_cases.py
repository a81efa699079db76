"""Cases and checks shared by the LSTM / GRU tests (tests/test_rnn_ops.py: the loop kernels;
tests/test_rnn_persistent.py: the persistent / step kernels): building a case from a torch
module's weights, running an implementation forward and backward, comparing every output and
gradient, and the real-size CUDA check both kernel families run."""
from __future__ import annotations

import torch

from dtl_fast.ops import rnn as ops
from dtl_fast.reference import rnn as ref

from _helpers import REL_TOL, assert_half_close, assert_rel_close

MODES = ["LSTM", "GRU"]


def make_case(mode, T, B, I, H, L=1, bi=False, bias=True, dtype=torch.float64, device="cpu",
              hx=True, seed=0):
    """Weights of a torch module (so its own forward can be the third opinion), input, hx."""
    g = torch.Generator().manual_seed(seed)
    cls = torch.nn.LSTM if mode == "LSTM" else torch.nn.GRU
    torch.manual_seed(seed)
    module = cls(I, H, L, bias=bias, bidirectional=bi).to(torch.float64)
    D = 2 if bi else 1
    x = torch.randn(T, B, I, generator=g, dtype=torch.float64)
    h = None
    if hx:
        h0 = torch.randn(L * D, B, H, generator=g, dtype=torch.float64)
        h = (h0, torch.randn(L * D, B, H, generator=g, dtype=torch.float64)) if mode == "LSTM" else h0
    to = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731
    weights = [to(w.detach()) for w in module._flat_weights]
    if h is not None:
        h = tuple(to(t) for t in h) if mode == "LSTM" else to(h)
    return module, to(x), h, weights


def run(fn, mode, x, hx, weights, seed=1, **kw):
    """Calls fn on fresh leaves, backpropagates a fixed random gradient into every output;
    returns [output, h_n, (c_n), grad x, grad h0, (grad c0), grad of every weight]."""
    x = x.detach().clone().requires_grad_()
    ws = [w.detach().clone().requires_grad_() for w in weights]
    hs = [] if hx is None else ([t.detach().clone().requires_grad_() for t in hx] if mode == "LSTM"
                                else [hx.detach().clone().requires_grad_()])
    h_arg = None if hx is None else (tuple(hs) if mode == "LSTM" else hs[0])
    out, state = fn(x, h_arg, ws, **kw)
    states = list(state) if mode == "LSTM" else [state]
    g = torch.Generator().manual_seed(seed)
    loss = sum((t.double() * torch.randn(t.shape, generator=g, dtype=torch.float64).to(t.device)).sum()
               for t in [out] + states)
    grads = torch.autograd.grad(loss, [x] + hs + ws, allow_unused=True)
    return [out] + states + list(grads)


def names(mode, hx, n_weights):
    """The names of run()'s results, in its order."""
    n = ["output", "h_n"] + (["c_n"] if mode == "LSTM" else []) + ["grad input"]
    if hx is not None:
        n += ["grad h0"] + (["grad c0"] if mode == "LSTM" else [])
    return n + [f"grad weights[{i}]" for i in range(n_weights)]


def assert_all_close(mode, hx, n_weights, got, want, tol):
    """Every output and gradient of run() within relative error tol; none missing."""
    assert len(got) == len(want)
    for name, a, b in zip(names(mode, hx, n_weights), got, want):
        assert a is not None and b is not None, f"{name}: missing gradient"
        assert_rel_close(name, a, b, tol)


def assert_all_half_close(mode, hx, n_weights, got, want, base, dtype):
    """Every output and gradient within the derived half-precision tolerance (_helpers.
    assert_half_close): HALF_FACTOR x the error of `base` (the eager reference computing in
    dtype on the same inputs) against the float64 `want`, plus a unit roundoff of dtype."""
    assert len(got) == len(want) == len(base)
    for name, a, w, b in zip(names(mode, hx, n_weights), got, want, base):
        assert a is not None and w is not None and b is not None, f"{name}: missing gradient"
        assert_half_close(name, a, w, b, dtype)


def fn_of(mode, backend):
    """The op of mode for backend "ref" (the eager reference) or a dtl_fast.ops backend."""
    if backend == "torch":
        return None
    f = {"LSTM": ops.lstm, "GRU": ops.gru}[mode]
    if backend == "ref":
        return {"LSTM": ref.lstm, "GRU": ref.gru}[mode]
    return lambda *a, **kw: f(*a, backend=backend, **kw)


# ------------------------------------------------------------------------------------------------
# Real sizes on CUDA
# ------------------------------------------------------------------------------------------------

def real_size_id(case):
    """pytest id of a real-size case (T, B, I, H, L, bi, with_lengths)."""
    return "T{}B{}I{}H{}L{}{}{}".format(*case[:5], "bi" if case[5] else "", "len" if case[6] else "")


def check_cuda_real_size(mode, dtype, case, poison):
    """backend="fused" (whichever implementation $DTL_FAST_RNN_IMPL names) on CUDA in dtype,
    against the float64 reference on the same dtype-rounded inputs: every output and gradient.
    case = (T, B, I, H, L, bi, with_lengths); lengths random in 1..T, with T and 1 among them.
    TF32 off: float32 means full float32 (long float32 recurrences still drift past 1e-5, so
    1e-4; half precision REL_TOL)."""
    T, B, I, H, L, bi, with_len = case
    _, x, h, ws = make_case(mode, T, B, I, H, L, bi, dtype=torch.float64, device="cuda")
    lengths = None
    if with_len:
        lengths = torch.randint(1, T + 1, (B,), generator=torch.Generator().manual_seed(0))
        lengths[0], lengths[-1] = T, 1
    kw = dict(lengths=lengths, num_layers=L, bidirectional=bi)
    cast = lambda t: t.to(dtype)  # noqa: E731
    up = lambda t: t.to(dtype).double()  # noqa: E731
    hx_d = tuple(map(cast, h)) if mode == "LSTM" else cast(h)
    hx_64 = tuple(map(up, h)) if mode == "LSTM" else up(h)
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with poison():
            got = run(fn_of(mode, "fused"), mode, cast(x), hx_d, [cast(w) for w in ws], **kw)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev
    want = run(fn_of(mode, "ref"), mode, up(x), hx_64, [up(w) for w in ws], **kw)
    tol = 1e-4 if dtype == torch.float32 else REL_TOL[dtype]
    assert_all_close(mode, h, len(ws), got, want, tol)
