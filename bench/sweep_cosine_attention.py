"""GPU sweep of the cosine-attention forward kernels (kernels/cosine_attention_fwd.py).

1. Checks: the pre-pass + fixed-maximum kernel (every tile candidate), the short-sequence
   kernel and the first forward (kernels/cosine_attention.py) at real sizes against a float64
   ground truth, next to the normalise + SDPA composite's own error (a kernel passes within
   max(TOL, 2x the composite's error)).
2. Sweep: every FWD2_CANDIDATES tile configuration, fixed maximum and online maximum, and on
   an sm_90 card each candidate with the fixed maximum once more with tensor descriptors (TMA,
   forced whatever $DTL_FAST_ATTN_TMA says), on the headline shapes (B 4, H 16, bf16, d 64 /
   128, N 2k / 8k, plain and key padding, and a window of 256), forward only, median of
   triton.testing.do_bench; the composite and the first forward timed in the same run.
   TFLOP/s = 4 d per attended (query, key) pair / median. A table per shape: the best
   candidate with TMA against the best without (the number that decides the env default).
3. The backward: every BWD2_CANDIDATES configuration of the second backward
   (kernels/cosine_attention_bwd.py) against the first backward and the composite's
   forward+backward (autograd), on the same shapes; backward FLOPs counted as 2.5x the forward's.
4. A short table last: per shape the best configuration, its TFLOP/s and its ratio to the
   composite and to the first kernel (forward; backward).

Without CUDA it says "no CUDA" and exits 0 (a dry run: the plan is printed). --tiny runs the
whole script on tiny shapes: on CPU tensors under TRITON_INTERPRET=1 (a test of the script, no
meaningful times).

    python bench/sweep_cosine_attention.py [--time-budget 240] [--quick]
    TRITON_INTERPRET=1 python bench/sweep_cosine_attention.py --tiny
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

TOL = {torch.bfloat16: 2e-2, torch.float16: 5e-3, torch.float32: 1e-5}

CHECKS = [  # B, H, N, d, variant, dtype
    (4, 16, 2048, 64, "plain", torch.bfloat16),
    (4, 16, 1024, 64, "pad", torch.bfloat16),
    (4, 16, 4096, 128, "win256", torch.float16),
    (2, 16, 1024, 64, "win+mem", torch.float32),
    (64, 8, 64, 64, "plain", torch.bfloat16),
    (64, 4, 16, 32, "pad", torch.bfloat16),
]
SWEEP = [  # B, H, N, d, variant
    (4, 16, 2048, 64, "plain"), (4, 16, 8192, 64, "plain"), (4, 16, 8192, 64, "pad"),
    (4, 16, 4096, 128, "plain"), (4, 16, 8192, 64, "win256"),
]


def _inputs(B, H, N, d, variant, dtype, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    q, k, v = (torch.randn(B, H, N, d, device=device, generator=g).to(dtype) for _ in range(3))
    ls = torch.empty(H, device=device).uniform_(math.log(5.0), math.log(20.0), generator=g)
    lens = window = mk = mv = None
    if variant == "pad":
        lens = torch.randint(N // 2, N + 1, (B,), device=device, generator=g)
    if variant.startswith("win"):
        window = 256 if variant == "win256" else 64
    if variant == "win+mem":
        mk = torch.randn(H, 8, d, device=device, generator=g).to(dtype)
        mv = torch.randn(H, 8, d, device=device, generator=g).to(dtype)
    return q, k, v, ls, lens, window, mk, mv


def _pairs(N, lens, window, B, M):
    i = torch.arange(N)
    total = 0
    for L in (lens.tolist() if lens is not None else [N] * B):
        lo = (i - window).clamp(min=0) if window is not None else torch.zeros_like(i)
        hi = (i + window + 1).clamp(max=L) if window is not None else torch.full_like(i, L)
        total += int((hi - lo).clamp(min=0).sum()) + N * M
    return total


def _sweep_case(B, H, N, d, variant, dev):
    """One headline case as the kernels take it: (q, k, v, logit_scale, lens, window, mk, mv)
    of _inputs (bf16 on CUDA, float32 on the CPU dry run), then scale [H] float32, lengths
    int32 or None, window int (-1 none) and the forward's FLOPs (4 d per attended pair)."""
    from dtl_fast.ops.cosine_attention import head_scale
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    q, k, v, ls, lens, window, mk, mv = _inputs(B, H, N, d, variant, dtype, dev)
    scale = head_scale(ls, torch.float32)
    L = None if lens is None else lens.to(torch.int32)
    w = -1 if window is None else window
    flop = 4 * d * H * _pairs(N, lens.cpu() if lens is not None else None, window, B, 0)
    return q, k, v, ls, lens, window, mk, mv, scale, L, w, flop


def _truth(q, k, v, ls, lens, window, mk, mv):
    import bench_cosine_attention as BA
    inp = dict(q=q, k=k, v=v, logit_scale=ls, key_lengths=lens, window=window, memory_k=mk, memory_v=mv)
    return BA.truth64(inp, None)[0]


def _rel(a, b):
    return ((a.double() - b).norm() / b.norm()).item()


def tma_modes(dev: str) -> tuple:
    """(False,) or (False, True): TMA is swept where the variant runs: an sm_90 GPU (or the
    interpreter, --tiny) with a Triton that has tensor descriptors."""
    from dtl_fast.kernels import cosine_attention_fwd as F2
    if not F2.tma_api() or (dev == "cuda" and torch.cuda.get_device_capability()[0] != 9):
        return (False,)
    return (False, True)


def _variants(modes) -> list:
    # (fixed_max, tma) per candidate: both softmax forms by pointer, the fixed one with TMA
    return [("auto", False), ("never", False)] + [("auto", True)] * (True in modes)


def _label(fm: str, tma: bool) -> str:
    return ("" if fm == "auto" else " online") + (" tma" if tma else "")


def plan() -> str:
    from dtl_fast.kernels import cosine_attention_fwd as F2
    n = sum(len(c) for (cls, _), c in F2.FWD2_CANDIDATES.items() if cls == "half")
    return (f"checks: {len(CHECKS)} shapes x (every fwd2 candidate, fixed/online and TMA on "
            f"sm_90, short, first forward); sweep: {len(SWEEP)} shapes x {n} half candidates "
            f"(of their head dim) x (fixed, online, fixed+TMA on sm_90; this triton "
            f"{'has' if F2.tma_api() else 'lacks'} tensor descriptors)")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--time-budget", type=float, default=240.0, help="seconds for the sweep part")
    ap.add_argument("--quick", action="store_true", help="the first two sweep shapes only")
    ap.add_argument("--tiny", action="store_true",
                    help="tiny shapes (on CPU under TRITON_INTERPRET=1: tests the script)")
    args = ap.parse_args(argv)
    global CHECKS, SWEEP
    if args.tiny:
        CHECKS = [(1, 2, n, d, v, dt) for n, d, v, dt in ((150, 16, "pad", torch.bfloat16),
                                                         (140, 16, "win+mem", torch.float32),
                                                         (20, 16, "pad", torch.float32))]
        SWEEP = [(1, 2, 150, 64, "pad")]
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    if dev == "cpu" and not args.tiny:
        print(f"[sweep_cosine_attention] no CUDA: nothing run (dry run). Plan: {plan()}")
        return 0
    import triton
    import triton.testing

    from dtl_fast.kernels import cosine_attention as K1
    from dtl_fast.kernels import cosine_attention_fwd as F2
    from dtl_fast.ops.cosine_attention import cosine_attention_composite, head_scale

    name = torch.cuda.get_device_name() if dev == "cuda" else "CPU (interpreter)"
    modes = tma_modes(dev)
    print(f"[sweep_cosine_attention] {name}  torch {torch.__version__}  "
          f"triton {triton.__version__}  TMA swept: {True in modes}")
    failures = []

    # 1. checks at real sizes
    print("\n== checks: rel. error vs float64 (composite's own error alongside) ==")
    for B, H, N, d, variant, dtype in CHECKS:
        q, k, v, ls, lens, window, mk, mv = _inputs(B, H, N, d, variant, dtype, dev)
        want = _truth(q, k, v, ls, lens, window, mk, mv)
        comp = cosine_attention_composite(q, k, v, ls, lens, window, mk, mv)
        ce = _rel(comp, want)
        bound = max(TOL[dtype], 2 * ce)
        scale = head_scale(ls, torch.float32)
        L = None if lens is None else lens.to(torch.int32)
        w = -1 if window is None else window
        runs = {"v1": lambda: K1.cosine_attention_forward(q, k, v, scale, L, w, mk, mv)[0]}
        if F2.use_short(N, N, 0 if mk is None else mk.shape[1], F2.block_d(d, d)):
            runs["short"] = lambda: F2.cosine_attention_forward2(q, k, v, scale, L, w, mk, mv, short=True)[0]
        n_cand = len(F2.FWD2_CANDIDATES[(F2._cls(dtype), F2.block_d(d, d))])
        for i in range(n_cand):
            for fm, tma in _variants(modes if dtype in F2.TMA_DTYPES or dev == "cpu" else ()):
                runs[f"fwd2[{i}]{_label(fm, tma)}"] = (
                    lambda i=i, fm=fm, tma=tma: F2.cosine_attention_forward2(
                        q, k, v, scale, L, w, mk, mv, config=i, fixed_max=fm, short=False, tma=tma)[0])
        for name, fn in runs.items():
            try:
                e = _rel(fn(), want)
                ok = e <= bound
            except Exception as exc:  # noqa: BLE001
                e, ok = float("nan"), False
                print(f"  {name}: {type(exc).__name__}: {str(exc)[:200]}")
            if not ok:
                failures.append(f"{variant} {B}x{H}x{N}x{d} {str(dtype)[6:]} {name}: {e:.2e} > {bound:.1e}")
            print(f"  {variant:<7} {B}x{H}x{N}x{d} {str(dtype)[6:]:<8} {name:<16} {e:.2e} "
                  f"(composite {ce:.2e}) {'ok' if ok else 'FAIL'}")
        del q, k, v, want, comp
        if dev == "cuda":
            torch.cuda.empty_cache()

    # 2. the sweep
    print("\n== sweep: forward median ms, TFLOP/s ==")
    deadline = time.time() + args.time_budget
    best, tma_best = [], []
    shapes = SWEEP[:2] if args.quick else SWEEP
    for B, H, N, d, variant in shapes:
        if time.time() > deadline:
            print(f"  time budget spent: {variant} {B}x{H}x{N}x{d} not swept")
            continue
        q, k, v, ls, lens, window, mk, mv, scale, L, w, flop = _sweep_case(B, H, N, d, variant, dev)

        def t(fn):
            with torch.no_grad():
                if dev == "cpu":
                    t0 = time.perf_counter()
                    fn()
                    return (time.perf_counter() - t0) * 1e3
                return triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median")

        base = t(lambda: cosine_attention_composite(q, k, v, ls, lens, window, mk, mv))
        v1 = t(lambda: K1.cosine_attention_forward(q, k, v, scale, L, w, mk, mv))
        rows = []
        for i, cand in enumerate(F2.FWD2_CANDIDATES[(F2._cls(dtype), F2.block_d(d, d))]):
            for fm, tma in _variants(modes):
                if time.time() > deadline:
                    break
                try:
                    ms = t(lambda i=i, fm=fm, tma=tma: F2.cosine_attention_forward2(
                        q, k, v, scale, L, w, mk, mv, config=i, fixed_max=fm, short=False, tma=tma))
                except Exception as exc:  # noqa: BLE001
                    print(f"  {cand} {fm}{' tma' if tma else ''}: {type(exc).__name__}: {str(exc)[:200]}")
                    continue
                rows.append((ms, i, cand, fm, tma))
                print(f"  {variant:<7} {B}x{H}x{N}x{d} {str(cand):<20} {fm:<6} {'tma' if tma else '   '} "
                      f"{ms:8.3f} ms {flop / ms / 1e9:7.1f} TFLOP/s  x{base / ms:.2f} composite  "
                      f"x{v1 / ms:.2f} v1")
        print(f"  {variant:<7} {B}x{H}x{N}x{d} composite {base:.3f} ms {flop / base / 1e9:.1f} TFLOP/s; "
              f"v1 {v1:.3f} ms {flop / v1 / 1e9:.1f} TFLOP/s")
        if rows:
            ms, i, cand, fm, tma = min(rows)
            best.append((f"{variant} {B}x{H}x{N}x{d}", f"[{i}] {cand} {fm}{' tma' if tma else ''}",
                         flop / ms / 1e9, base / ms, v1 / ms))
            on = [r for r in rows if r[4]]
            off = [r for r in rows if not r[4] and r[3] == "auto"]
            if on and off:
                tma_best.append((f"{variant} {B}x{H}x{N}x{d}", min(off), min(on),
                                 {r[1]: r[0] for r in off}, {r[1]: r[0] for r in on}))
        del q, k, v
        if dev == "cuda":
            torch.cuda.empty_cache()

    # 3. the backward
    print("\n== sweep: backward median ms (the composite: its forward+backward minus its forward) ==")
    from dtl_fast.kernels import cosine_attention_bwd as B2
    best_bwd = []
    for B, H, N, d, variant in shapes:
        if time.time() > deadline:
            print(f"  time budget spent: backward {variant} {B}x{H}x{N}x{d} not swept")
            continue
        q, k, v, ls, lens, window, mk, mv, scale, L, w, flop = _sweep_case(B, H, N, d, variant, dev)
        flop *= 2.5  # the backward: 2.5x the forward's FLOPs
        out, lse = F2.cosine_attention_forward2(q, k, v, scale, L, w, mk, mv)
        g = torch.randn_like(out)

        def tb(fn):
            if dev == "cpu":
                t0 = time.perf_counter()
                fn()
                return (time.perf_counter() - t0) * 1e3
            return triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median")

        lv = [t.detach().requires_grad_() for t in (q, k, v, ls)]
        fb = tb(lambda: torch.autograd.grad(cosine_attention_composite(*lv, lens, window), lv, g))
        with torch.no_grad():
            fo = tb(lambda: cosine_attention_composite(q, k, v, ls, lens, window))
        base = max(fb - fo, 1e-6)
        v1 = tb(lambda: K1.cosine_attention_backward(g, q, k, v, scale, L, w, mk, mv, out, lse))
        rows = []
        for i, cand in enumerate(B2.BWD2_CANDIDATES[("_cos_attn_bwd2_dkdv_kernel", F2._cls(dtype),
                                                    F2.block_d(d, d))]):
            if time.time() > deadline:
                break
            try:
                ms = tb(lambda i=i: B2.cosine_attention_backward2(g, q, k, v, scale, L, w, mk, mv, out,
                                                                  lse, config=i))
            except Exception as exc:  # noqa: BLE001
                print(f"  backward {cand}: {type(exc).__name__}: {str(exc)[:200]}")
                continue
            rows.append((ms, i, cand))
            print(f"  {variant:<7} {B}x{H}x{N}x{d} bwd [{i}] {str(cand):<18} {ms:8.3f} ms "
                  f"{flop / ms / 1e9:7.1f} TFLOP/s  x{base / ms:.2f} composite bwd  x{v1 / ms:.2f} v1")
        print(f"  {variant:<7} {B}x{H}x{N}x{d} composite fwd+bwd {fb:.3f} ms (bwd ~{base:.3f}); "
              f"v1 bwd {v1:.3f} ms {flop / v1 / 1e9:.1f} TFLOP/s")
        if rows:
            ms, i, cand = min(rows)
            best_bwd.append((f"{variant} {B}x{H}x{N}x{d}", f"[{i}] dkdv {cand}", flop / ms / 1e9,
                             base / ms, v1 / ms))
        del q, k, v, out, g, lv
        if dev == "cuda":
            torch.cuda.empty_cache()

    print("\n== best backward configuration per shape (bf16; candidates index both kernels) ==")
    print(f"{'shape':<22} {'config':<34} {'TFLOP/s':>8} {'x comp':>7} {'x v1':>6}")
    for shape, cfg, tf, xc, xv in best_bwd:
        print(f"{shape:<22} {cfg:<34} {tf:8.1f} {xc:7.2f} {xv:6.2f}")

    if tma_best:
        print("\n== TMA on / off (fixed maximum): best of each, and per candidate off/on ms ==")
        print(f"{'shape':<22} {'best off (ms)':<30} {'best on (ms)':<30} {'x on':>6}  per candidate")
        for shape, off, on, per_off, per_on in tma_best:
            per = " ".join(f"[{i}] {per_off[i] / per_on[i]:.2f}" for i in per_on if i in per_off)
            print(f"{shape:<22} {f'[{off[1]}] {off[2]} {off[0]:.3f}':<30} "
                  f"{f'[{on[1]}] {on[2]} {on[0]:.3f}':<30} {off[0] / on[0]:6.2f}  {per}")

    print("\n== best forward configuration per shape (bf16) ==")
    print(f"{'shape':<22} {'config (BM, BN, warps, stages)':<34} {'TFLOP/s':>8} {'x comp':>7} {'x v1':>6}")
    for shape, cfg, tf, xc, xv in best:
        print(f"{shape:<22} {cfg:<34} {tf:8.1f} {xc:7.2f} {xv:6.2f}")
    if failures:
        print("\nCHECK FAILURES:\n  " + "\n  ".join(failures))
        return 1
    print("\nchecks: all within max(TOL, 2x the composite's error)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
