"""Profile one DTL training step with torch.profiler: where the time of a step goes, per op.

One step = forward + dtl_loss + backward (+ Adam step and zero_grad with --optimizer), of
dtl_fast.models.DTL after warm-up steps, on the sizes of a preset:

  demo         the `make demo` model (Makefile DEMO_ARGS and `dtl-fast train`'s defaults for
               the rest): B 32, 8 frames of 16 x 16, width 16, hidden 32, dim 32, 2 heads,
               1 DAM layer, 3 channels (--channels' default: `make demo`'s checkpoint has
               in_channels 3; before s32 this preset had 1, which changes the first convolution
               only, not the op calls per step), LSTM, 10 classes
  bench-small  bench_dtl's default model (width 64, hidden 64, dim 128, 4 heads, 2 layers),
               scaled down to B 8, T 8, S 16 (a CPU-sized step)
  bench        bench_dtl's default case: B 64, T 16, S 32 (--batch overrides B)
  tiny         the demo model's structure at B 2, T 3, S 8, 1 channel (for backend fused on CPU,
               i.e. the Triton interpreter: the op calls per step are those of the demo model)

What it prints and writes, on every device (bench/results/profile_dtl_<preset>_<rnn>_<backend>
[_graphs][_bf16]_<device-slug>.txt; --out '' writes none):
- the step's wall time (median of the profiled steps, the profiler's own overhead included) and
  the number of operator calls per step (aten ops and our custom ops: a device-independent count
  of what one step dispatches, i.e. of launches on a GPU);
- a table of the ops by self CPU time: op, calls per step, self CPU ms per step, share;
- on CUDA: GPU busy fraction = (sum of the GPU time of every kernel, memcpy and memset of the
  profiled steps) / (their wall time), the top kernels by GPU time, and the peak GPU memory of a
  step (torch.cuda.max_memory_allocated); --graphs profiles the replay of the whole step captured
  in a torch.cuda.CUDAGraph (bench_dtl's `fused+graphs` step) instead of the eager step.

On CPU, backend "fused" runs the Triton kernels in the interpreter (TRITON_INTERPRET=1 is set
here when it is not): its table shows the per-call Python / dispatch work of the fused path,
but the interpreter's time swamps the kernels' -- read the call counts and the non-kernel rows.
Backend "auto" on CPU is the CPU fast path (native RNN, C++ pooling, SDPA attention).

    python bench/profile_dtl.py --device cpu --preset demo --backend auto
    python bench/profile_dtl.py --device cpu --preset demo --backend fused
    python bench/profile_dtl.py --device cuda --preset bench --backend fused [--graphs] [--amp bf16]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

PRESETS = {
    # `make demo`'s model: DEMO_ARGS, the rest (channels 3, lstm) train's defaults (a test
    # compares them with the Makefile)
    "demo": dict(B=32, T=8, S=16, C=3, model=dict(width=16, hidden_size=32, dim=32, num_heads=2,
                                                  num_layers=1)),
    "bench-small": dict(B=8, T=8, S=16, C=3, model={}),
    "bench": dict(B=64, T=16, S=32, C=3, model={}),
    # the op structure of the demo model at interpreter-sized shapes (backend fused on CPU:
    # the call counts are the same as at the demo size; a demo-sized interpreted step took
    # 9 minutes on the 2-core machine)
    "tiny": dict(B=2, T=3, S=8, C=1, model=dict(width=8, hidden_size=8, dim=16, num_heads=2,
                                               num_layers=1)),
}
NUM_CLASSES = 10


def _parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--preset", default="demo", choices=tuple(PRESETS))
    p.add_argument("--batch", type=int, default=None, help="override the preset's batch size")
    p.add_argument("--rnn", default="lstm", choices=("lstm", "gru"))
    p.add_argument("--backend", default="fused", choices=("fused", "auto", "reference"))
    p.add_argument("--amp", default=None, choices=(None, "bf16"), help="bf16 autocast (CUDA)")
    p.add_argument("--tf32", action="store_true", help="TF32 matmuls (CUDA)")
    p.add_argument("--optimizer", action="store_true", help="include Adam step + zero_grad")
    p.add_argument("--graphs", action="store_true",
                   help="CUDA: profile replays of the step captured in a CUDA graph (implies "
                        "--optimizer, Adam(capturable=True))")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=3, help="profiled steps")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--threads", type=int, default=1, help="CPU threads (default 1)")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"),
                   help="folder of the summary file ('' : do not write)")
    a = p.parse_args(argv)
    if a.graphs and a.device != "cuda":
        p.error("--graphs needs --device cuda")
    if a.graphs:
        a.optimizer = True
    return a


def main(argv=None) -> int:
    args = _parse(argv)
    if args.device == "cpu" and args.backend == "fused":
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import torch
    from torch.profiler import ProfilerActivity, profile

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import bench_dtl as BD  # noqa: E402  (the graphed step is shared with the benchmark)
    import harness as H  # noqa: E402
    from dtl_fast.models import DTL, dtl_loss

    if args.device == "cuda" and not torch.cuda.is_available():
        print("profile_dtl: --device cuda but CUDA is not available", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    torch.backends.cuda.matmul.allow_tf32 = bool(args.tf32)
    torch.backends.cudnn.allow_tf32 = bool(args.tf32)
    pre = PRESETS[args.preset]
    B = args.batch or pre["B"]
    dev = args.device
    torch.manual_seed(0)
    model = DTL(NUM_CLASSES, in_channels=pre["C"], rnn=args.rnn, **pre["model"]).to(dev)
    model.set_backend(args.backend)
    case = BD.Case(args.rnn, B, pre["T"], pre["S"], "float32")
    images, videos, lengths, labels = BD.make_inputs(case, 0, dev, channels=pre["C"])
    amp = torch.bfloat16 if args.amp == "bf16" else None

    if args.graphs:
        opt = torch.optim.Adam(model.parameters(), lr=1e-3, capturable=True)
        # the captured step reads its lengths from a device buffer (checked on the host first)
        step = BD.make_graphed_step(model, opt, dtl_loss, (images, videos, lengths.to(dev), labels),
                                    dev, amp)
    else:
        opt = torch.optim.Adam(model.parameters(), lr=1e-3) if args.optimizer else None

        def step():
            with BD._autocast(dev, amp):
                loss = dtl_loss(model(images, videos, lengths), labels)
            loss.backward()
            if opt is not None:
                opt.step()
                opt.zero_grad(set_to_none=True)
            else:
                model.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    H.sync(dev)
    if dev == "cuda":
        torch.cuda.reset_peak_memory_stats()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev == "cuda" else [])
    walls = []
    with profile(activities=activities, record_shapes=False) as prof:
        for _ in range(args.steps):
            H.sync(dev)
            t0 = time.perf_counter()
            step()
            H.sync(dev)
            walls.append((time.perf_counter() - t0) * 1e3)
    peak = torch.cuda.max_memory_allocated() / 2**20 if dev == "cuda" else None
    n = args.steps
    wall_ms = statistics.median(walls)
    avgs = prof.key_averages()

    def dev_time(e):  # us; the attribute was renamed in torch 2.4 (cuda -> device)
        v = getattr(e, "self_device_time_total", None)
        return v if v is not None else getattr(e, "self_cuda_time_total", 0.0)

    cpu_rows = [e for e in avgs if e.self_cpu_time_total > 0 or e.count > 0]
    cpu_rows = [e for e in cpu_rows if str(getattr(e, "device_type", "")).endswith("CPU")]
    total_cpu = sum(e.self_cpu_time_total for e in cpu_rows) / 1e3 / n
    op_calls = sum(e.count for e in cpu_rows
                   if e.key.startswith(("aten::", "dtl_fast::"))) / n
    lines = []
    title = (f"DTL training step profile: preset {args.preset} (B {B}, T {pre['T']}, S {pre['S']}), "
             f"rnn {args.rnn}, backend {args.backend}, device {H.device_name(dev)}, "
             f"amp {args.amp or 'none'}, tf32 {args.tf32}, "
             f"{'graph replay' if args.graphs else 'eager'}"
             f"{' + Adam' if args.optimizer else ''}; torch {torch.__version__}")
    lines.append(title)
    lines.append(f"step wall time (profiled, median of {n}): {wall_ms:.2f} ms; "
                 f"self CPU time in ops: {total_cpu:.2f} ms/step; "
                 f"operator calls (aten:: + dtl_fast::) per step: {op_calls:.0f}")
    if dev == "cuda":
        kern = [e for e in avgs if str(getattr(e, "device_type", "")).endswith("CUDA")]
        gpu_ms = sum(dev_time(e) for e in kern) / 1e3 / n
        busy = gpu_ms / wall_ms if wall_ms > 0 else float("nan")
        lines.append(f"GPU time per step: {gpu_ms:.3f} ms; GPU busy fraction: {100 * busy:.1f} % "
                     f"(kernel+memcpy time / step wall time under the profiler: a lower bound for "
                     f"an eager step, whose host work the profiler slows); peak GPU memory: "
                     f"{peak:.1f} MiB (the profiled steps; a graph replay allocates nothing); "
                     f"kernel launches per step: {sum(e.count for e in kern) / n:.0f}")
    lines.append("")
    lines.append(f"top {args.top} ops by self CPU time (per step):")
    lines.append(f"  {'op':<52} {'calls':>7} {'self CPU ms':>12} {'share':>7}")
    for e in sorted(cpu_rows, key=lambda e: -e.self_cpu_time_total)[:args.top]:
        ms = e.self_cpu_time_total / 1e3 / n
        lines.append(f"  {e.key[:52]:<52} {e.count / n:>7.0f} {ms:>12.3f} "
                     f"{100 * ms / max(total_cpu, 1e-9):>6.1f}%")
    if dev == "cuda":
        lines.append("")
        lines.append(f"top {args.top} kernels by GPU time (per step):")
        lines.append(f"  {'kernel':<70} {'calls':>6} {'GPU ms':>9}")
        for e in sorted(kern, key=lambda e: -dev_time(e))[:args.top]:
            lines.append(f"  {e.key[:70]:<70} {e.count / n:>6.0f} {dev_time(e) / 1e3 / n:>9.3f}")
    text = "\n".join(lines)
    print(text)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        tag = f"{args.preset}_{args.rnn}_{args.backend}{'_graphs' if args.graphs else ''}" \
              f"{'_bf16' if args.amp else ''}"
        path = out / f"profile_dtl_{tag}_{H.device_slug(dev)}.txt"
        path.write_text(text + "\n")
        print(f"written: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
