"""Sweep of the persistent LSTM / GRU kernel's variants against cuDNN on a GPU (issue 10), one
bounded call.

Cases (headline shapes): bi LSTM / GRU bf16 B16 T128 H256, B64 T512 H512, B128 T512 H1024, and
FlashRNN's published case, uni LSTM fp16 B16 T1024 H768 (their table, H100: cuDNN 2.01 ms
forward, 5.19 ms forward+backward). Input size = H, no lengths, hx=None, bias on.
Variants: torch.nn (cuDNN, the baseline), the "loop" kernel (today's fused default; at H <= 256
only, where one call is short; bench/results/rnn.csv has it at the larger shapes), and the
persistent kernel for BLOCK_N in {16, 32} (P = cdiv(H, BLOCK_N) programs per direction) x
num_warps {4, 8} x W resident (loaded once; Triton keeps it in shared memory) or streamed from
L2 (resident only where 128 < H <= 256, at BLOCK_N = 16; a num_warps other than the launcher's
own choice is outside the AOT-checked set and may spill). Each variant's output is compared with
cuDNN's before it is timed (rel. error > 3e-2 is a "mismatch" row, not a time); each records the
mode that ran ("persistent", or "step" when the grid could not be co-resident). The grid barrier's spin is
bounded (SPIN_LIMIT lowered to 2^20 reads, ~1 s): a hang costs seconds and becomes a
"timeout" row. Modes: forward (no_grad) and forward+backward.

Rows go to bench/results/rnn_sweep.csv (harness format: provider = the variant, extra = mode
that ran, TFLOP/s, us per step). A table prints last: per case and mode, cuDNN's time and each
variant's ratio, then the rows the `auto` rule (dtl_fast/ops/rnn.py AUTO_FUSED_REGIONS) could
take (a fused variant faster than cuDNN in both modes).

    python bench/sweep_rnn.py                 # on a GPU machine (bounded by --budget-s, 300 s)
    python bench/sweep_rnn.py --dry-run       # anywhere: the plan, and the step mode on a tiny
                                              # shape in the Triton interpreter; nothing measured
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness as Hn  # noqa: E402

KERNEL = "rnn_sweep"
CASES = [
    # cell, bidirectional, dtype, B, T, H
    ("LSTM", True, torch.bfloat16, 16, 128, 256),
    ("GRU", True, torch.bfloat16, 16, 128, 256),
    ("LSTM", True, torch.bfloat16, 64, 512, 512),
    ("GRU", True, torch.bfloat16, 64, 512, 512),
    ("LSTM", True, torch.bfloat16, 128, 512, 1024),
    ("GRU", True, torch.bfloat16, 128, 512, 1024),
    ("LSTM", False, torch.float16, 16, 1024, 768),  # FlashRNN's case
]
MODES = ("forward", "forward+backward")


def variants(H: int):
    """(name, impl, tune) in the order they are timed."""
    # the loop kernel only where one call is short (it was 0.7-1.7 s per call at B128 T512 H1024)
    out = [("loop", "loop", {})] if H <= 256 else []
    for block_n in (16, 32):
        for warps in (4, 8):
            residents = (True, False) if 128 < H <= 256 and block_n == 16 else (False,)
            for res in residents:
                out.append((f"persistent-n{block_n}-w{warps}-{'res' if res else 'l2'}", "persistent",
                            dict(block_n=block_n, num_warps=warps, resident=res)))
    return out


def flops(cell: str, D: int, B: int, T: int, H: int, mode: str) -> float:
    G = 4 if cell == "LSTM" else 3
    f = 4.0 * D * T * B * G * H * H  # input and recurrent projections (input size = H)
    return f * (3 if mode == "forward+backward" else 1)


def dry_run() -> int:
    """The plan, and one tiny step-mode call per cell in the interpreter against the reference."""
    os.environ.setdefault("TRITON_INTERPRET", "1")
    from dtl_fast.kernels import rnn_persistent as rp
    from dtl_fast.ops import rnn as ops
    from dtl_fast.reference import rnn as ref
    n = 0
    for cell, bi, dtype, B, T, H in CASES:
        n += len(variants(H)) + 1
    print(f"[sweep_rnn] no CUDA: nothing measured. Plan: {len(CASES)} cases x {len(MODES)} modes, "
          f"{n} variant timings per mode (cuDNN included).")
    for cell in ("LSTM", "GRU"):
        m = (torch.nn.LSTM if cell == "LSTM" else torch.nn.GRU)(3, 20, bidirectional=True).double()
        x = torch.randn(3, 2, 3, dtype=torch.float64)
        fn = ops.lstm if cell == "LSTM" else ops.gru
        os.environ[ops.IMPL_ENV_VAR] = "step"
        got = fn(x, None, m._flat_weights, bidirectional=True, backend="fused", lengths=[3, 2])[0]
        want = (ref.lstm if cell == "LSTM" else ref.gru)(x, None, m._flat_weights, bidirectional=True,
                                                         lengths=[3, 2])[0]
        err = ((got - want).norm() / want.norm()).item()
        print(f"[sweep_rnn] interpreter step mode {cell} bi T3 B2 H20 float64: rel err {err:.2e} "
              f"({rp.LAST_MODE.get(cell.lower() + '_forward')})")
        if not err < 1e-12:
            return 1
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--budget-s", type=float, default=300.0)
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    p.add_argument("--only", default="", help="comma-separated case indices (0-based)")
    args = p.parse_args()
    if args.dry_run or not torch.cuda.is_available():
        return dry_run()

    from dtl_fast.kernels import rnn_persistent as rp
    from dtl_fast.ops import rnn as ops
    rp.SPIN_LIMIT = 1 << 20
    device = "cuda"
    stamp = Hn.env_stamp(device)
    run_id = Hn.new_run_id()
    writer = Hn.ResultWriter(args.out, KERNEL)
    start = time.time()
    rows = []
    only = {int(i) for i in args.only.split(",") if i.strip()}
    for ci, (cell, bi, dtype, B, T, H) in enumerate(CASES):
        if only and ci not in only:
            continue
        D = 2 if bi else 1
        torch.manual_seed(0)
        mod = (torch.nn.LSTM if cell == "LSTM" else torch.nn.GRU)(H, H, bidirectional=bi).to(device, dtype)
        x = torch.randn(T, B, H, device=device, dtype=dtype)
        gy = torch.randn(T, B, D * H, device=device, dtype=dtype)
        ws = list(mod._flat_weights)
        fn = ops.lstm if cell == "LSTM" else ops.gru
        variant = f"{cell.lower()}-{'bi' if bi else 'uni'}"
        for mode in MODES:
            xg = x.detach().clone().requires_grad_(mode != "forward")

            def call_cudnn():
                if mode == "forward":
                    with torch.no_grad():
                        return mod(xg)[0]
                out = mod(xg)[0]
                out.backward(gy)
                return out

            with torch.no_grad():
                base_out = mod(x)[0].float()
            base = Hn.time_ms(call_cudnn, device=device, grad_to_none=[xg] + ws)
            rows.append(dict(case=(cell, bi, dtype, B, T, H), mode=mode, name="cudnn", ms=base[0], ratio=1.0))
            writer.append(Hn.make_row(kernel=KERNEL, provider="torch.nn", mode=mode, variant=variant,
                                      shape=(B, T, H), dtype=dtype, stamp=stamp, timing=base,
                                      baseline="torch.nn", baseline_ms=base[0], run_id=run_id,
                                      extra={"tflops": round(flops(cell, D, B, T, H, mode) / base[0] / 1e9, 3),
                                             "us_per_step": round(base[0] * 1e3 / T, 2)}))
            for name, impl, tune in variants(H):
                if time.time() - start > args.budget_s:
                    print(f"[sweep_rnn] budget of {args.budget_s:.0f} s spent: case {ci} {mode} {name} not run")
                    rows.append(dict(case=(cell, bi, dtype, B, T, H), mode=mode, name=name, ms=None,
                                     ratio=None, status="not run"))
                    continue
                os.environ[ops.IMPL_ENV_VAR] = impl
                rp.TUNE.clear()
                rp.TUNE.update(tune)
                rp.LAST_MODE.clear()

                def call():
                    if mode == "forward":
                        with torch.no_grad():
                            return fn(xg, None, ws, bidirectional=bi, backend="fused")[0]
                    out = fn(xg, None, ws, bidirectional=bi, backend="fused")[0]
                    out.backward(gy)
                    return out

                status, timing, ran = "ok", None, ""
                try:
                    with torch.no_grad():
                        got = fn(x, None, ws, bidirectional=bi, backend="fused")[0].float()
                    err = ((got - base_out).norm() / base_out.norm()).item()
                    ran = ",".join(sorted(set(rp.LAST_MODE.values()))) or impl
                    if not err < 3e-2:
                        status = f"mismatch: rel err vs cuDNN {err:.2e}"
                    else:
                        timing = Hn.time_ms(call, device=device, grad_to_none=[xg] + ws)
                        ran = ",".join(sorted(set(rp.LAST_MODE.values()))) or impl
                except RuntimeError as e:
                    status = "timeout" if "timed out" in str(e) else f"error: {str(e)[:200]}"
                    torch.cuda.synchronize()
                extra = {"impl": impl, "ran": ran, **{k: v for k, v in tune.items()}}
                if timing:
                    extra["tflops"] = round(flops(cell, D, B, T, H, mode) / timing[0] / 1e9, 3)
                    extra["us_per_step"] = round(timing[0] * 1e3 / T, 2)
                writer.append(Hn.make_row(kernel=KERNEL, provider=name, mode=mode, variant=variant,
                                          shape=(B, T, H), dtype=dtype, stamp=stamp, timing=timing,
                                          baseline="torch.nn", baseline_ms=base[0], run_id=run_id,
                                          extra=extra, status=status))
                rows.append(dict(case=(cell, bi, dtype, B, T, H), mode=mode, name=name,
                                 ms=timing[0] if timing else None,
                                 ratio=base[0] / timing[0] if timing else None, status=status, ran=ran))
                print(f"[sweep_rnn] {variant} B{B} T{T} H{H} {Hn.dtype_str(dtype)} {mode:16s} {name:28s} "
                      f"{status:8s} {ran:10s} " + (f"{timing[0]:.3f} ms ({base[0] / timing[0]:.2f}x cuDNN)" if timing else ""),
                      flush=True)
        os.environ.pop(ops.IMPL_ENV_VAR, None)
        rp.TUNE.clear()
    print(f"\n===== rnn sweep ({stamp['device_name']}, run {run_id}, rows in {writer.path}) =====")
    print(f"{'case':34s} {'mode':16s} {'cuDNN ms':>9s}  best variant (ratio vs cuDNN, mode that ran)")
    wins = []
    for key in dict.fromkeys((r["case"], r["mode"]) for r in rows):
        rs = [r for r in rows if (r["case"], r["mode"]) == key]
        base = next(r for r in rs if r["name"] == "cudnn")
        timed = sorted((r for r in rs if r["name"] != "cudnn" and r["ratio"]), key=lambda r: -r["ratio"])
        cell, bi, dtype, B, T, H = key[0]
        label = f"{cell} {'bi' if bi else 'uni'} {Hn.dtype_str(dtype)} B{B} T{T} H{H}"
        best = ", ".join(f"{r['name']} {r['ratio']:.2f}x ({r['ran']})" for r in timed[:3]) or "none timed"
        print(f"{label:34s} {key[1]:16s} {base['ms']:9.3f}  {best}")
        if timed and timed[0]["ratio"] > 1.0:
            wins.append((key[0], key[1], timed[0]["name"], timed[0]["ratio"]))
    print("fused faster than cuDNN (candidates for AUTO_FUSED_REGIONS: both modes needed):")
    for w in wins:
        print(f"  {w}")
    if not wins:
        print("  none")
    return 0


if __name__ == "__main__":
    sys.exit(main())
