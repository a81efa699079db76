"""Host time per call of the fused ops' Python path: the eager entry point against the
registered custom op, side by side in one run.

A DTL training step on a GPU is host-bound (bench/NOTES.md, issue 12: 45 ms of host time for
11 ms of GPU work at B 64), so what an op costs the host per call -- argument checks, the
dispatcher, autograd, the launches -- sets the eager step time. This measures it per op and per
path:

  eager  the default: dtl_fast.ops._eager calls the op body and its autograd formula directly
  op     every call forced through the registered torch.library op (what torch.compile and
         torch.export see; the only path before the eager entry points existed)
  eager+handles  (CUDA) the eager path with the Triton kernels launched through cached
         compiled handles (dtl_fast.kernels._launch, $DTL_FAST_TRITON_HANDLES=1)

Cases (--size dtl, the default on CUDA: DTL's own sizes at B 64, bench_dtl's model; --size
tiny, the default on the CPU, where the GEMMs and sums around the stubbed kernels would
otherwise take milliseconds of real CPU work):
  attention  q, k, v [64, 4, 32, 32] float32 (tiny: [2, 4, 8, 8]), key lengths on the CPU
  lstm, gru  bidirectional, T 16, B 64, input 128, hidden 64 (tiny: 4, 2, 8, 8), lengths on
             the CPU
each "forward" (no grad) and "forward+backward" (autograd.grad of every input).

--device cpu (default without CUDA): the Triton launchers are replaced by stubs that only
allocate the outputs, so the time is the Python / dispatch / autograd path alone (the kernels
would run in Triton's interpreter otherwise). --device cuda: the real kernels; calls are issued
back to back and the time per call is the wall time of a batch of calls over their number,
which is the host's cost whenever the host is slower than the GPU (these shapes: a few us of
GPU work per kernel).

On CUDA a last probe times one Triton launch through the JIT against one through the compiled
kernel's handle (launch_probe): how much a cache of compiled handles could save per launch.

Rows go to <out>/host_overhead.csv (provider eager / op, baseline op: ratio = op / eager > 1
means the eager entry point is cheaper).

    python bench/host_overhead.py --device cpu
    python bench/host_overhead.py --device cuda
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness as H  # noqa: E402

KERNEL = "host_overhead"
ROUNDS = 9  # interleaved rounds per (case, path); the median is reported


@contextlib.contextmanager
def stubbed_kernels():
    """CPU: the Triton launchers of the attention and RNN kernels replaced by functions that
    allocate what each returns (shapes and dtypes as the launchers document), restored on
    exit."""
    from dtl_fast.kernels import cosine_attention as ka
    from dtl_fast.kernels import rnn as kr

    def acc(t):
        return torch.float64 if t.dtype == torch.float64 else torch.float32

    def attn_fwd(q, k, v, scale, key_lengths, window, memory_k, memory_v):
        return (q.new_empty(q.shape[:3] + (v.shape[3],)), q.new_empty(q.shape[:3], dtype=acc(q)))

    def attn_bwd(grad_out, q, k, v, scale, key_lengths, window, memory_k, memory_v, out, lse):
        return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v),
                torch.empty_like(scale), q.new_empty((0,)), q.new_empty((0,)))

    def lstm_fwd(gates_x, w_hh, h0, c0, lengths):
        T, B, D, G = gates_x.shape
        Hh = G // 4
        return (gates_x.new_empty(T, B, D * Hh), gates_x.new_empty(D, B, Hh),
                gates_x.new_empty(D, B, Hh), gates_x.new_empty(T, B, D, G, dtype=acc(gates_x)),
                gates_x.new_empty(T, B, D, Hh, dtype=acc(gates_x)))

    def lstm_bwd(grad_out, grad_hn, grad_cn, w_hh, c0, act, c_all, lengths):
        T, B, D, G = act.shape
        return (act.new_empty(T, B, D, G, dtype=w_hh.dtype), act.new_empty(D, B, G // 4),
                act.new_empty(D, B, G // 4))

    def gru_fwd(gates_x, w_hh, b_hn, h0, lengths):
        T, B, D, G = gates_x.shape
        Hh = G // 3
        return (gates_x.new_empty(T, B, D * Hh), gates_x.new_empty(D, B, Hh),
                gates_x.new_empty(T, B, D, 4 * Hh, dtype=acc(gates_x)))

    def gru_bwd(grad_out, grad_hn, w_hh, h0, out, act, lengths):
        T, B, D, G4 = act.shape
        Hh = G4 // 4
        return (act.new_empty(T, B, D, 3 * Hh, dtype=w_hh.dtype),
                act.new_empty(T, B, D, 3 * Hh, dtype=w_hh.dtype), act.new_empty(D, B, Hh))

    stubs = {(ka, "cosine_attention_forward"): attn_fwd, (ka, "cosine_attention_backward"): attn_bwd,
             (kr, "lstm_forward"): lstm_fwd, (kr, "lstm_backward"): lstm_bwd,
             (kr, "gru_forward"): gru_fwd, (kr, "gru_backward"): gru_bwd}
    saved = {key: getattr(*key) for key in stubs}
    try:
        for (mod, name), fn in stubs.items():
            setattr(mod, name, fn)
        yield
    finally:
        for (mod, name), fn in saved.items():
            setattr(mod, name, fn)


# (B, heads, N, d) of the attention case and (T, B, input, hidden) of the RNN cases
SIZES = {"dtl": ((64, 4, 32, 32), (16, 64, 128, 64)),
         # the CPU default: the stubs skip the kernels, but the GEMMs and gradient sums around
         # them run on the CPU for real, and at DTL's sizes they take milliseconds
         "tiny": ((2, 4, 8, 8), (4, 2, 8, 8))}


def _cases(device: str, size: str):
    """name -> (shape string, leaves, forward fn)."""
    import dtl_fast.ops.rnn as rnn_ops
    from dtl_fast.ops import cosine_attention

    g = torch.Generator().manual_seed(0)

    def leaf(*shape):
        return torch.randn(*shape, generator=g).to(device).requires_grad_()

    (B, Ha, N, d), (T, Br, I, Hh) = SIZES[size]
    lengths = torch.randint(1, N + 1, (B,), generator=g)
    lengths[0] = N
    q, k, v, ls = leaf(B, Ha, N, d), leaf(B, Ha, N, d), leaf(B, Ha, N, d), leaf(Ha)
    cases = {"attention": (f"{B}x{Ha}x{N}x{d}", [q, k, v, ls],
                           lambda: cosine_attention(q, k, v, ls, lengths, backend="fused"))}
    B = Br
    rnn_len = torch.randint(1, T + 1, (B,), generator=g)
    rnn_len[0] = T
    for mode, fn in (("lstm", rnn_ops.lstm), ("gru", rnn_ops.gru)):
        G = 4 if mode == "lstm" else 3
        x = leaf(T, B, I)
        ws = [w for _ in range(2)  # per direction: w_ih, w_hh, b_ih, b_hh
              for w in (leaf(G * Hh, I), leaf(G * Hh, Hh), leaf(G * Hh), leaf(G * Hh))]

        def run(x=x, ws=ws, fn=fn):
            out, _ = fn(x, None, ws, lengths=rnn_len, bidirectional=True, backend="fused")
            return out
        cases[mode] = (f"{T}x{B}x{I}x{Hh}", [x, *ws], run)
    return cases


def launch_probe(calls: int = 200) -> dict:
    """CUDA only: the host cost of one Triton launch through the JIT (`kernel[grid](...)`, what
    the launchers do: Triton's binder specialises every argument and looks the compiled kernel
    up) against a launch through the CompiledKernel handle that first launch returned (no
    specialisation, no lookup: what a cache of compiled handles would save at most), on the
    attention's row-norm kernel (16 arguments, DTL's sizes). The two outputs must be equal."""
    import triton
    from dtl_fast.kernels import cosine_attention as ka
    x = torch.randn(64, 4, 32, 32, device="cuda")
    out_jit = torch.empty(64 * 4 * 32, device="cuda")
    out_handle = torch.full_like(out_jit, float("nan"))
    cfg = ka._choose("_cos_attn_rowdot_kernel", x.dtype, 32, 32)
    consts = dict(cfg["constexprs"], IS_F64=False)
    grid = (triton.cdiv(32, consts["BLOCK_R"]) * 64 * 4,)
    kernel = ka._cos_attn_rowdot_kernel

    def args(out):
        return (x, x, out, *x.stride()[:3], *x.stride()[:3], 4, 32, 32, 1)

    def jit():
        return kernel[grid](*args(out_jit), **consts, num_warps=cfg["num_warps"],
                            num_stages=cfg["num_stages"])

    compiled = jit()
    # the handle takes every parameter in signature order, constexprs included (as the JIT
    # passes its bound arguments)
    names = kernel.arg_names
    by_name = dict(zip(names, args(out_handle)), **consts)
    runner = compiled[grid]
    handle_args = [by_name[n] for n in names]

    def handle():
        runner(*handle_args)

    handle()
    torch.cuda.synchronize()
    if not torch.equal(out_jit, out_handle):
        return dict(status="mismatch: the handle's output differs from the JIT launch's")
    res = {}
    for name, fn in (("jit", jit), ("handle", handle)):
        samples = [_per_call_us(fn, "cuda", calls) for _ in range(ROUNDS)]
        res[name] = statistics.median(samples)
    res["status"] = "ok"
    return res


def _per_call_us(fn, device: str, calls: int) -> float:
    H.sync(device)
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    H.sync(device)
    return (time.perf_counter() - t0) / calls * 1e6


def main(argv=None) -> int:
    p = H.add_common_args(argparse.ArgumentParser(description=__doc__.split("\n")[0]))
    p.add_argument("--calls", type=int, default=50, help="calls per timed batch")
    p.add_argument("--size", choices=sorted(SIZES), default=None,
                   help="case sizes (default: dtl on CUDA, tiny on the CPU)")
    args = p.parse_args(argv)
    device = H.resolve_device(args.device)
    if device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before dtl_fast imports the kernels
    H.apply_threads(args)
    with stubbed_kernels() if device == "cpu" else contextlib.nullcontext():
        return _run(args, device)


def _run(args, device: str) -> int:
    from dtl_fast.ops import _eager
    stamp = H.env_stamp(device)
    run_id = args.run_id or H.new_run_id()
    print(H.format_stamp(stamp))
    from dtl_fast.kernels import _launch
    eager_ok, mode = _eager.eager_ok, _launch.MODE
    # path -> (eager_ok, Triton launch mode); the cached handles only where kernels compile
    paths = {"eager": (eager_ok, "0"), "op": (lambda a: False, "0")}
    if device == "cuda":
        paths["eager+handles"] = (eager_ok, "1")
    writer = H.ResultWriter(args.out, KERNEL)
    rows = []
    size = args.size or ("dtl" if device == "cuda" else "tiny")
    for name, (shape, leaves, fwd) in _cases(device, size).items():
        def forward():
            with torch.no_grad():
                fwd()

        def forward_backward():
            out = fwd()
            torch.autograd.grad(out, leaves, torch.ones_like(out))

        for mode, fn in (("forward", forward), ("forward+backward", forward_backward)):
            samples = {path: [] for path in paths}
            for r in range(ROUNDS + 1):  # round 0 warms up (compiles on a GPU)
                for path, (ok, launch_mode) in paths.items():
                    _eager.eager_ok, _launch.MODE = ok, launch_mode
                    try:
                        us = _per_call_us(fn, device, args.calls if r else 3)
                    finally:
                        _eager.eager_ok, _launch.MODE = eager_ok, mode
                    if r:
                        samples[path].append(us)
            base = statistics.median(samples["op"]) / 1e3
            for path in paths:
                s = sorted(samples[path])
                timing = (statistics.median(s) / 1e3, s[len(s) // 5] / 1e3, s[(4 * len(s)) // 5] / 1e3)
                row = H.make_row(kernel=KERNEL, provider=path, mode=mode, variant=name, shape=shape,
                                 dtype=torch.float32, stamp=stamp, timing=timing, baseline="op",
                                 baseline_ms=base, run_id=run_id,
                                 extra={"stubbed_kernels": device == "cpu"})
                writer.append(row)
                rows.append(row)
    if device == "cuda":
        try:
            probe = launch_probe()
        except Exception as e:  # the handle API is Triton's internal one: report, do not fail
            probe = dict(status=H.exc_text(e))
        print(f"triton launch probe (rowdot kernel, us per launch): {probe}")
        if probe.get("status") == "ok":
            for path in ("jit", "handle"):
                t = probe[path] / 1e3
                row = H.make_row(kernel=KERNEL, provider=path, mode="launch", variant="rowdot",
                                 shape="64x4x32x32", dtype=torch.float32, stamp=stamp,
                                 timing=(t, t, t), baseline="jit", baseline_ms=probe["jit"] / 1e3,
                                 run_id=run_id)
                writer.append(row)
                rows.append(row)
    H.print_table(rows)
    print("per call, host path (us): " + "; ".join(
        f"{r['variant']} {r['mode']} {r['provider']} {float(r['median_ms']) * 1e3:.0f}"
        for r in rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
