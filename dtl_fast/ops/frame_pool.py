"""Masked temporal frame pooling: the registered C++/CUDA op torch.ops.dtl_fast.frame_pool,
its fake (meta) kernels, and the backend choice. Its autograd lives in C++
(csrc/frame_pool_autograd.cpp)."""
from __future__ import annotations

import torch

from dtl_fast import _extension, reference
from dtl_fast._backend import resolve_backend
from dtl_fast._checks import (FLOAT_DTYPES, INTEGER_DTYPES, POOL_MODES, check_pool_input,
                              normalize_lengths)
from dtl_fast.ops._eager import needs_stock_path, refuse_transforms, transforms_in_use

_FWD = "dtl_fast::frame_pool"
_BWD = "dtl_fast::frame_pool_backward"
MODES = POOL_MODES + ("meanmax",)
_MAX_T = 2**31 - 4097  # the kernels' limit (csrc/frame_pool.cpp kMaxT: int32 frame indices)


def _register() -> None:
    # The fake kernels (torch.compile, opcheck, meta tensors) give the output shapes. They check
    # what the real kernels check without reading data (mode, dtypes, shapes), with the same
    # ValueError (under torch.compile wrapped in dynamo's TorchRuntimeError), so that a direct
    # torch.ops call the kernel would reject fails while it is traced, not when the graph first
    # runs. T's upper limit is checked only where T is a number: on a symbolic T the check
    # would bound it, and torch.export would then refuse an unbounded Dim("T"). The autograd of both ops is registered in C++
    # (csrc/frame_pool_autograd.cpp, under the Autograd dispatch key), which saves the ~0.18 ms
    # per call the Python register_autograd wrapper cost.
    def _check_lengths(lengths, B, owner, device):
        if lengths is None:
            return
        torch._check_value(lengths.dtype in INTEGER_DTYPES,
                           lambda: f"{owner}: lengths must be an integer tensor, got dtype "
                                   f"{lengths.dtype}")
        torch._check_value(lengths.dim() == 1 and lengths.shape[0] == B,
                           lambda: f"{owner}: lengths must have shape [B] = [{B}], got "
                                   f"{list(lengths.shape)}")
        torch._check_value(lengths.device.type == "cpu" or lengths.device == device,
                           lambda: f"{owner}: lengths must be on the CPU or on the device of "
                                   f"its input ({device}), got {lengths.device}")

    def _check_mode(mode, owner):
        torch._check_value(mode in MODES, lambda: f"{owner}: mode must be one of "
                                                  f"{', '.join(map(repr, MODES))}, got {mode!r}")

    @torch.library.register_fake(_FWD)
    def _frame_pool_fake(x, lengths, mode, with_argmax=True):
        _check_mode(mode, "frame_pool")
        torch._check_value(x.dim() == 3, lambda: f"frame_pool: x must be a 3-D tensor [B, T, D], "
                                                 f"got shape {list(x.shape)}")
        torch._check_value(x.dtype in FLOAT_DTYPES, lambda: f"frame_pool: x must be float32, "
                                                            f"float64, float16 or bfloat16, got "
                                                            f"{x.dtype}")
        B, T, D = x.shape
        if isinstance(T, int):
            torch._check_value(T <= _MAX_T, lambda: f"frame_pool: T must be <= 2^31 - 4097 "
                                                    f"(frame indices are int32), got {T}")
        _check_lengths(lengths, B, "frame_pool", x.device)
        width = 2 * D if mode == "meanmax" else D
        # with_argmax=False: no argmax (the C++ Autograd kernel passes True for a call it
        # records, so a traced backward has its argmax)
        argmax_shape = (B, D) if mode in ("max", "meanmax") and with_argmax else (0,)
        return x.new_empty((B, width)), x.new_empty(argmax_shape, dtype=torch.int32)

    @torch.library.register_fake(_BWD)
    def _frame_pool_backward_fake(grad_out, lengths, argmax, T, mode):
        _check_mode(mode, "frame_pool_backward")
        torch._check_value(grad_out.dim() == 2, lambda: "frame_pool_backward: grad_out must be "
                                                        f"[B, D], got {list(grad_out.shape)}")
        torch._check_value(grad_out.dtype in FLOAT_DTYPES,
                           lambda: f"frame_pool_backward: grad_out must be float32, float64, "
                                   f"float16 or bfloat16, got {grad_out.dtype}")
        B, width = grad_out.shape
        torch._check_value(mode != "meanmax" or width % 2 == 0,
                           lambda: f"frame_pool_backward: grad_out of 'meanmax' must be "
                                   f"[B, 2D], got width {width}")
        if isinstance(T, int):
            torch._check_value(0 <= T <= _MAX_T, lambda: f"frame_pool_backward: T must lie in "
                                                         f"[0, 2^31 - 4097], got {T}")
        D = width // 2 if mode == "meanmax" else width
        if mode in ("max", "meanmax"):
            def argmax_msg():  # the C++ kernel's words (csrc/frame_pool.cpp)
                return (f"frame_pool_backward: argmax must be an int32 tensor [B, D] = [{B}, {D}] "
                        f"on {grad_out.device}, got {argmax.dtype} {list(argmax.shape)} on "
                        f"{argmax.device}")
            torch._check_value(argmax.dtype == torch.int32 and argmax.dim() == 2
                               and argmax.device == grad_out.device, argmax_msg)
            torch._check_value(argmax.shape[0] == B, argmax_msg)
            torch._check_value(argmax.shape[1] == D, argmax_msg)
        _check_lengths(lengths, B, "frame_pool_backward", grad_out.device)
        return grad_out.new_empty((B, T, D))


if _extension.cpp_available():
    _register()


# `auto` on CUDA must never be slower than the best stock formulation (the eager masked
# reduction, torch.segment_reduce; DESIGN.md "Backends"). The rule is this table of measured
# cases where a stock form wins: (mode, dtype, largest input bytes) -> `auto` runs the eager
# reference for inputs up to that size. Its inputs are the "stock" rows that
# bench/sweep_frame_pool.py writes (fused with the default launch constants beside both stock
# forms, forward and forward+backward, small and headline shapes); its table prints
# "STOCK WINS" where an entry is due. Measured on an NVIDIA H100 80GB HBM3 (run
# gpucheck-20261127T172725-461, bench/results/gpu_check_nvidia-h100_1-pool-dtl.log): the fused
# op beat the eager reduction and torch.segment_reduce in all 42 cases (64x64x1024, 16x32x256,
# 8x128x128 bf16 and the four headline shapes; mean, max, meanmax; forward and forward+backward;
# e.g. 16x32x256 max forward 0.0068 ms vs segment_reduce 0.032 ms), so the table stays empty.
# (The H200 rows, run gpucheck-20261127T013134-437, predate the sync-free length check.)
_CUDA_STOCK_WINS: tuple[tuple[str, torch.dtype, int], ...] = ()


# Without lengths (every frame valid) the stock path is torch's own reduction over dim 1
# (_stock_all_frames: x.amax(1), x.sum(1), x.mean(1); float32 accumulation for half inputs,
# as the reference and the kernels), not the masked eager forms above, and `auto` picks between
# it and the kernel by these measured tables. Neither applies where T = 0 (the kernel gives
# the reference's zeros; torch.amax raises on an empty dim), under torch.compile or another
# trace (dispatch modes, fake tensors, tensor subclasses), inside torch.func transforms, on
# meta tensors, or to "fused" (always the kernel) and "reference": those keep the paths above.
#
# CPU: (mode, dtype, grad, smallest input bytes, largest input bytes, threads) where the stock
# reduction measured faster than the C++ kernel (bench/bench_frame_pool.py, the ":all-frames"
# rows of bench/results/frame_pool.csv: "dtl_fast:op" against "stock", forward under
# no_grad (grad False) and forward+backward of an intermediate (grad True)); `threads` is the
# torch.get_num_threads() the rows were measured at, and a call at another count reads the
# entries of the smallest measured count above it, else of the largest. Filled from the run(s)
# named in _CPU_ALL_FRAMES_RUNS; everything else runs the kernel. Max and meanmax with a
# gradient never take the stock path, whatever the table says (the CUDA note below says why).
#
# Measured on the AMD EPYC 2-core VM (AVX2; ATen AVX512), torch 2.14.1, at 1 thread, float32 and
# bfloat16, 16 KiB to 64 MiB float32 (8 KiB to 64 MiB bfloat16): bench/results/frame_pool.csv,
# run 20261128T210603-1523, "dtl_fast:op" (the bare op; ops.frame_pool's ~1.5 us of Python
# checks are paid on either path) against "stock"; run 20261128T204048-24174 repeats it with
# "dtl_fast:fused" (those checks included). Ratios stock / op, < 1: torch faster:
# - max forward: torch up to 512 KiB float32 (0.66-0.87; 1 MiB on 1.10-1.73) and at 8 KiB
#   bfloat16 (0.84; 32 KiB on 1.22-2.46);
# - sum forward: torch up to 64 KiB float32 (0.71, 0.80; 256 / 512 KiB ties 0.99, 1.00; 1 MiB on
#   1.17-2.41) and at 8 KiB bfloat16 (0.87; then 1.16-3.24, ties at 4x256x256 0.98 and 64 MiB
#   1.00);
# - mean and meanmax forward: ours everywhere (float32 mean 1.41-2.47, bfloat16 mean slower
#   still on torch's side: x.sum(1, dtype=float32), the float32 accumulation the numerics need,
#   is slow on this CPU; meanmax 1.66-13.5);
# - sum with a gradient: torch everywhere in float32 (0.59-0.81: its backward is an expand,
#   nothing written, where ours writes the dense [B, T, D] gradient, so the bound stays open
#   above the largest size measured); bfloat16 up to 512 KiB (0.79-0.92 but 1.03 at 128 KiB and
#   1.28 at 16x16x1024) and from 8 MiB (0.86, 0.53, 0.51), ours at 2-4 MiB with T = 16 (1.79,
#   1.67: T decides there, 4x256x256 0.71);
# - mean with a gradient: torch in float32 from 256 KiB (0.99, then 0.59-0.96; 16 / 64 KiB ours
#   1.12, 1.10), ours in bfloat16 (its backward casts the expanded gradient back to bfloat16);
# - max / meanmax with a gradient: ours everywhere (1.2-25x), and never torch's (see below).
# At 2 threads (run 20261128T212206-2458, same VM): the same picture, except max float32
# forward (torch only up to 64 KiB: 0.66, 0.71; 256 KiB-1 MiB 1.06-1.25 but 0.88 at
# 4x256x256) and bfloat16 sum with a gradient (ours up to 8 MiB: 1.54, 1.87, 1.06; torch from
# 32 MiB: 0.41, 0.59); sum float32 with a gradient 0.45-0.87 but 1.08 at 64x64x1024, kept at any
# size. float16 and float64 were not timed: the kernel, as before. (An earlier 2-thread run,
# while other processes held the VM's cores, had 351 of 672 medians at multiples of 8 ms, the
# second OpenMP thread descheduled: not committed.)
_MiB = 1 << 20
_ANY = 1 << 62  # no upper bound
_CPU_ALL_FRAMES_RUNS = ("20261128T210603-1523 (1 thread), 20261128T212206-2458 (2 threads), "
                        "AMD EPYC 2-core VM")
_CPU_ALL_FRAMES_STOCK_WINS: tuple[tuple[str, torch.dtype, bool, int, int, int], ...] = (
    ("max", torch.float32, False, 0, _MiB // 2, 1),
    ("max", torch.bfloat16, False, 0, 8 << 10, 1),
    ("sum", torch.float32, False, 0, 64 << 10, 1),
    ("sum", torch.bfloat16, False, 0, 8 << 10, 1),
    ("sum", torch.float32, True, 0, _ANY, 1),
    ("sum", torch.bfloat16, True, 0, _MiB // 2, 1),
    ("sum", torch.bfloat16, True, 8 * _MiB, _ANY, 1),
    ("mean", torch.float32, True, 256 << 10, _ANY, 1),
    ("max", torch.float32, False, 0, 64 << 10, 2),
    ("max", torch.bfloat16, False, 0, 8 << 10, 2),
    ("sum", torch.float32, False, 0, 64 << 10, 2),
    ("sum", torch.bfloat16, False, 0, 8 << 10, 2),
    ("sum", torch.float32, True, 0, _ANY, 2),
    ("sum", torch.bfloat16, True, 0, _MiB // 2, 2),
    ("sum", torch.bfloat16, True, 32 * _MiB, _ANY, 2),
    ("mean", torch.float32, True, 256 << 10, _ANY, 2),
)
# CUDA: never measured (bench_frame_pool's ":all-frames" cases, in its --quick run too, and
# sweep_frame_pool's all-frames phase time it on the next GPU run). Until rows say otherwise
# `auto` runs torch's reduction
# - for a forward without a gradient: it is what the user would otherwise write, one
#   read-and-reduce of x as ours is, and our kernel's only forward figures are with lengths
#   (64-76 % of copy bandwidth on an H100, torch's reduction never timed beside it): a kernel
#   never measured against its stock path is not what `auto` should run;
# - for sum (any dtype) and float32 / float64 mean with a gradient: torch's backward there is
#   an expand of grad_out (nothing written; mean divides [B, D] first) where ours writes the
#   dense [B, T, D] gradient, one full write more on a bandwidth-bound device; the CPU rows
#   show it (sum float32 0.59-0.81 at every size, mean float32 from 256 KiB).
# The kernel with a gradient otherwise: max / meanmax always (torch.amax's backward splits the
# gradient among tied maxima, the reference's goes to the first), half-precision mean (torch's
# backward writes a dense half gradient too, and its forward measured slower on the CPU).
# Cases our kernel is measured to win go in _CUDA_ALL_FRAMES_FUSED_WINS as (mode, dtype, grad,
# smallest bytes, largest bytes) and run the kernel.
_CUDA_ALL_FRAMES_FUSED_WINS: tuple[tuple[str, torch.dtype, bool, int, int], ...] = ()


def _mib(n: int) -> str:
    return f"{n / 2**20:g} MiB" if n >= 1 << 20 else f"{n / 2**10:g} KiB"


def _span(lo: int, hi: int) -> str:
    if hi >= _ANY:
        return "any size" if lo == 0 else f">= {_mib(lo)}"
    return f"<= {_mib(hi)}" if lo == 0 else f"{_mib(lo)}-{_mib(hi)}"


def _all_frames_rule() -> str:
    if _CPU_ALL_FRAMES_STOCK_WINS:
        by: dict[tuple, list[str]] = {}
        for m, d, grad, lo, hi, threads in _CPU_ALL_FRAMES_STOCK_WINS:
            key = (threads, "with a gradient" if grad else "without a gradient")
            by.setdefault(key, []).append(f"{m} {str(d).replace('torch.', '')} {_span(lo, hi)}")
        cpu = "; ".join(f"at {t} thread{'s' if t != 1 else ''} {g} for " + ", ".join(v)
                        for (t, g), v in sorted(by.items(), key=lambda kv: (kv[0][0],
                                                                            "with" in kv[0][1])))
        cpu = (f"torch's reduction {cpu} (another thread count reads the next measured count "
               f"above it, else the largest); else the C++ kernel")
    else:
        cpu = "the C++ kernel (no stock reduction measured faster)"
    cuda = ("torch's reduction without a gradient, and with one for sum and float32 / float64 "
            "mean (unmeasured against the kernel on a GPU)")
    if _CUDA_ALL_FRAMES_FUSED_WINS:
        won = ", ".join(f"{m} {str(d).replace('torch.', '')} "
                        f"{'with' if g else 'without'} a gradient {_span(lo, hi)}"
                        for m, d, g, lo, hi in _CUDA_ALL_FRAMES_FUSED_WINS)
        cuda += f", except the CUDA kernel for {won}"
    runs = f" [CPU rows: {_CPU_ALL_FRAMES_RUNS}]" if _CPU_ALL_FRAMES_RUNS else ""
    return (f"Without lengths (T >= 1, eager): CPU {cpu}; CUDA {cuda}; else the CUDA "
            f"kernel{runs}")


def auto_rule() -> str:
    """What backend="auto" runs for frame_pool, in one line (shown by `dtl-fast info`)."""
    if not _CUDA_STOCK_WINS:
        with_lengths = ("With lengths: CPU the C++ kernel; CUDA the CUDA kernel for every shape "
                        "(faster than the eager forms and torch.segment_reduce in all 42 cases "
                        "an H100 timed, run gpucheck-20261127T172725-461: the stock-wins table "
                        "is empty)")
    else:
        cases = ", ".join(f"{m} {str(d).replace('torch.', '')} <= {n / 2**20:g} MiB"
                          for m, d, n in _CUDA_STOCK_WINS)
        with_lengths = (f"With lengths: CPU the C++ kernel; CUDA the CUDA kernel, except the "
                        f"eager form for {cases}")
    return f"{with_lengths}. {_all_frames_rule()}"


_CPU_INDEX: list = [None, (), {}]  # [the table it was built from, thread counts, entries]


def _cpu_index() -> tuple[tuple[int, ...], dict]:
    """_CPU_ALL_FRAMES_STOCK_WINS as (measured thread counts, {(mode, dtype): {(grad,
    threads): ((lo, hi), ...)}}), rebuilt when the table is replaced: a call the table does
    not name costs one dict lookup (a scan of the tuple cost ~1 us per call without lengths)."""
    table = _CPU_ALL_FRAMES_STOCK_WINS
    if _CPU_INDEX[0] is not table:
        entries: dict = {}
        for m, d, g, lo, hi, t in table:
            per = entries.setdefault((m, d), {})
            per[(g, t)] = per.get((g, t), ()) + ((lo, hi),)
        _CPU_INDEX[:] = [table, tuple(sorted({e[5] for e in table})), entries]
    return _CPU_INDEX[1], _CPU_INDEX[2]


def _cpu_rule(per: dict, nbytes: int, grad: bool, threads: int, counts: tuple) -> bool:
    key = counts[-1]  # the largest measured count, unless a count >= threads was measured
    for t in counts:
        if t >= threads:
            key = t
            break
    for lo, hi in per.get((grad, key), ()):
        if lo <= nbytes <= hi:
            return True
    return False


def all_frames_stock_rule(device_type: str, mode: str, dtype: torch.dtype, nbytes: int,
                          grad: bool, threads: int | None = 1) -> bool:
    """The measured rule alone: whether `auto` runs torch's reduction for a call without lengths
    on `device_type` with an input of `nbytes`, `grad` when autograd records it, at `threads`
    (CPU: the entries of the smallest measured thread count >= threads, else the largest;
    None: torch.get_num_threads(), asked only when the table names (mode, dtype))."""
    if device_type == "cpu":
        # first the one dict lookup: a call the table does not name costs no more
        counts, entries = _cpu_index()
        per = entries.get((mode, dtype))
        if per is None:
            return False
    elif device_type != "cuda":
        return False
    if grad and mode in ("max", "meanmax"):
        return False  # torch.amax's backward splits the gradient among ties: not the reference's
    if device_type == "cuda":
        if grad and not (mode == "sum" or dtype in (torch.float32, torch.float64)):
            return False  # half-precision mean with a gradient
        return not any(m == mode and d == dtype and g == grad and lo <= nbytes <= hi
                       for m, d, g, lo, hi in _CUDA_ALL_FRAMES_FUSED_WINS)
    if threads is None:
        threads = torch.get_num_threads()
    return _cpu_rule(per, nbytes, grad, threads, counts)


def _stock_all_frames_wins(x: torch.Tensor, mode: str) -> bool:
    """Whether `auto` runs torch's own reduction (_stock_all_frames) for this call without
    lengths: the rule, for eager calls on plain CPU / CUDA tensors with T >= 1. On the CPU a
    call the table does not name returns after one dict lookup; the other conditions are asked
    only where the rule says the stock path."""
    if torch.compiler.is_compiling():
        return False  # the op, traced as before (and get_num_threads is no graph op)
    device_type = "cuda" if x.is_cuda else "cpu" if x.is_cpu else None
    if device_type is None or not all_frames_stock_rule(
            device_type, mode, x.dtype, x.numel() * x.element_size(),
            torch.is_grad_enabled() and x.requires_grad, threads=None):
        return False
    return not (x.shape[1] == 0 or torch._C._len_torch_dispatch_stack() > 0
                or type(x) not in (torch.Tensor, torch.nn.Parameter)
                or bool(transforms_in_use((x,))))


def _stock_all_frames(x: torch.Tensor, mode: str) -> torch.Tensor:
    """Pooling over all T >= 1 frames with torch's own reductions, with the reference's
    numerics. What `auto` runs where the tables above say, and the benchmark's "stock" provider.
      sum   x.sum(1): ATen sums bfloat16 / float16 in float32 and rounds once, on the CPU and
            on CUDA (tests/test_frame_pool.py holds it to that); its backward is an expand.
      mean  x.sum(1) / T; half inputs x.sum(1, dtype=float32) / T rounded once (x.mean(1) of a
            half tensor rounds the sum to x's dtype before it divides).
      max   torch.amax (NaN propagates; exact in any dtype).
      meanmax  both, side by side."""
    if mode == "max":
        return x.amax(1)
    if mode == "meanmax":
        return torch.cat([_stock_all_frames(x, "mean"), x.amax(1)], 1)
    if mode == "sum":
        return x.sum(1)
    if x.dtype in (torch.float16, torch.bfloat16):
        return x.sum(1, dtype=torch.float32).div_(x.shape[1]).to(x.dtype)
    return x.sum(1).div_(x.shape[1])


def _stock_wins_on_cuda(x: torch.Tensor, mode: str) -> bool:
    if not _CUDA_STOCK_WINS or torch.compiler.is_compiling():
        return False
    nbytes = x.numel() * x.element_size()
    return any(m == mode and d == x.dtype and nbytes <= limit for m, d, limit in _CUDA_STOCK_WINS)


def _use_compiled(x: torch.Tensor, backend: str, mode: str) -> bool:
    if backend == "reference":
        return False
    if backend == "auto" and x.is_cuda and _stock_wins_on_cuda(x, mode):
        return False
    # Meta x (shapes only): `auto` runs the reference, which still checks lengths that live on
    # the CPU, as a real run would; `fused` runs the op's fake kernel (shapes, no values).
    if backend == "auto" and x.device.type == "meta":
        return False
    if _extension.has_kernel("frame_pool", x.device.type):
        # a GPU the build has no kernel image for (older than its TORCH_CUDA_ARCH_LIST): `auto`
        # runs the reference; `fused` goes on to the op, whose error names the GPU and the fix
        return backend == "fused" or not x.is_cuda or _extension.cuda_kernels_run_on(
            x.device.index if x.device.index is not None else torch.cuda.current_device())
    if backend == "fused":
        if x.device.type not in ("cpu", "cuda", "meta"):
            raise RuntimeError(f"frame_pool(backend='fused') has kernels for CPU and CUDA tensors "
                               f"only, got x on {x.device}; pass backend='auto' or 'reference'")
        raise RuntimeError(_extension.missing_build_message(
            f"frame_pool(backend='fused') on {x.device.type} tensors"))
    return False


def frame_pool(x: torch.Tensor, lengths=None, mode: str = "mean", *, backend: str | None = None
               ) -> torch.Tensor:
    """Pools each sequence of frames over its valid frames only.

    Args:
        x: [B, T, D] float32 / float64 / float16 / bfloat16, any strides.
        lengths: None (all T frames valid), a list of B ints, an integer NumPy array (copied),
            or an integer tensor [B] on the CPU or on x's device; frames t >= lengths[b] are
            never read. The compiled op keeps a lengths tensor for its backward, as autograd
            keeps any saved input: writing into it in place before the backward raises
            autograd's "modified by an inplace operation" error (the reference builds its masks
            at once and does not mind); a write autograd cannot see (through a NumPy view,
            `.data`, DLPack) changes the gradient, as for any saved tensor.
        mode: "mean" | "max" | "sum" | "meanmax" (mean and max side by side, [B, 2D], from one
            read of x and, in the backward pass, one write of grad_x).
        backend: "auto" | "fused" | "reference"; None reads $DTL_FAST_BACKEND (else "auto")
            at each call (under torch.compile: when the graph is traced).
            "auto" runs the C++ kernel on CPU tensors and the CUDA kernel on GPU tensors (unless
            the measured rule _CUDA_STOCK_WINS names the case); without lengths, torch's own
            reduction (x.amax(1), x.sum(1), x.mean(1)) where the measured CPU table
            _CPU_ALL_FRAMES_STOCK_WINS names the case, and on CUDA for a forward without a
            gradient (unmeasured there; auto_rule() says it); and the eager reference where a
            kernel was not built, and under torch.func.grad / vjp / jvp and forward-mode AD
            (which the compiled op's autograd cannot serve; "fused" raises NotImplementedError
            there). torch.func.vmap runs the compiled op per sample. On meta tensors (shapes
            only) "auto" runs the reference, which still checks lengths held on the CPU, and
            "fused" the op's fake kernel.

    Returns:
        [B, D] ([B, 2D] for "meanmax") in x's dtype; half types accumulate in float32. A row
        with length 0 gives zeros and zero gradient. "max" propagates NaN like torch.amax and
        sends the gradient to the first maximal frame.

    Raises:
        ValueError: wrong rank or dtype of x, T above 2^31 - 4097 (the kernels' int32 frame
            indices), unknown mode, lengths not integer, not [B], on another device, beyond
            int64, or (CPU lengths) outside [0, T]. Lengths on the GPU are checked on the GPU
            without a host synchronisation, whatever the shape (a call with T = 0 or D = 0
            too): the kernel pools over the lengths clamped into [0, T] and records the error,
            which `dtl_fast.check_errors()` raises (it waits for the GPU), as does any later
            CUDA pooling call, forward or backward, that finds it recorded. The record is one
            per process: whichever check sees it first raises and clears it, whatever thread,
            stream or device made the faulty call.
        RuntimeError: out-of-range lengths with backend="reference" under torch.compile or
            CUDA graph capture (an asynchronous assert: no host read inside a graph; the
            compiled op still raises ValueError for CPU lengths there).
    """
    backend = resolve_backend(backend)
    check_pool_input(x, mode, MODES)
    lengths = normalize_lengths(lengths, x)
    if (lengths is not None and torch.compiler.is_compiling() and x.requires_grad
            and torch.is_grad_enabled()):
        # AOTAutograd saves the graph's input for the backward, and refuses an inference tensor
        # (lengths made under torch.inference_mode), which the C++ autograd copies eagerly but
        # whose inference flag dynamo cannot read: a copy of B integers in the graph (review s31)
        lengths = lengths.clone()
    if lengths is None and backend == "auto" and _stock_all_frames_wins(x, mode):
        return _stock_all_frames(x, mode)
    if not _use_compiled(x, backend, mode):
        return reference.frame_pool(x, lengths, mode)
    if not torch.compiler.is_compiling():
        # The op's autograd is a C++ torch::autograd::Function under the Autograd key: it has
        # no forward-mode formula, and functorch refuses it while a grad / jvp layer is on the
        # stack. vmap alone is served (its fallback calls the op per sample, below the layer);
        # the reference is plain torch ops.
        used = transforms_in_use((x,))
        if needs_stock_path(used):
            if backend == "fused":
                refuse_transforms("frame_pool(backend='fused')", used)
            return reference.frame_pool(x, lengths, mode)
    # with_argmax=False: the argmax only when autograd records the call (its C++ Autograd
    # kernel asks for it then); a forward nobody differentiates skips the index bookkeeping
    out, _ = torch.ops.dtl_fast.frame_pool(x, lengths, mode, False)
    return out
