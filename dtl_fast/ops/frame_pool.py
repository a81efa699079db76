"""Masked temporal frame pooling: the registered C++/CUDA op torch.ops.dtl_fast.frame_pool,
its fake (meta) kernels, and the backend choice. Its autograd lives in C++
(csrc/frame_pool_autograd.cpp)."""
from __future__ import annotations

import torch

from dtl_fast import _extension, reference
from dtl_fast._backend import resolve_backend
from dtl_fast._checks import FLOAT_DTYPES, POOL_MODES, check_pool_input, normalize_lengths
from dtl_fast.ops._eager import needs_stock_path, refuse_transforms, transforms_in_use

_FWD = "dtl_fast::frame_pool"
_BWD = "dtl_fast::frame_pool_backward"
MODES = POOL_MODES + ("meanmax",)
_MAX_T = 2**31 - 4097  # the kernels' limit (csrc/frame_pool.cpp kMaxT: int32 frame indices)
# The lengths dtypes the kernels take: at::isIntegralType(dtype, includeBool=false). Not
# "integral" in Python's sense: the bit-packed and sub-byte dtypes (torch.bits8, torch.int4,
# torch.uint3, ...) are neither floating nor complex, and the kernels reject them.
_LENGTH_DTYPES = frozenset({torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64,
                            torch.uint16, torch.uint32, torch.uint64})


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
        torch._check_value(lengths.dtype in _LENGTH_DTYPES,
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
    def _frame_pool_fake(x, lengths, mode):
        _check_mode(mode, "frame_pool")
        torch._check_value(x.dim() == 3, lambda: f"frame_pool: x must be a 3-D tensor [B, T, D], "
                                                 f"got shape {tuple(x.shape)}")
        torch._check_value(x.dtype in FLOAT_DTYPES, lambda: f"frame_pool: x must be float32, "
                                                            f"float64, float16 or bfloat16, got "
                                                            f"{x.dtype}")
        B, T, D = x.shape
        if isinstance(T, int):
            torch._check_value(T <= _MAX_T, lambda: f"frame_pool: T must be <= 2^31 - 4097 "
                                                    f"(frame indices are int32), got {T}")
        _check_lengths(lengths, B, "frame_pool", x.device)
        width = 2 * D if mode == "meanmax" else D
        argmax_shape = (B, D) if mode in ("max", "meanmax") else (0,)
        return x.new_empty((B, width)), x.new_empty(argmax_shape, dtype=torch.int32)

    @torch.library.register_fake(_BWD)
    def _frame_pool_backward_fake(grad_out, lengths, argmax, T, mode):
        _check_mode(mode, "frame_pool_backward")
        torch._check_value(grad_out.dim() == 2, lambda: "frame_pool_backward: grad_out must be "
                                                        f"[B, D], got {tuple(grad_out.shape)}")
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


def auto_rule() -> str:
    """What backend="auto" runs for frame_pool, in one line (shown by `dtl-fast info`)."""
    if not _CUDA_STOCK_WINS:
        return ("CPU: the C++ kernel; CUDA: the CUDA kernel for every shape (faster than the "
                "eager forms and torch.segment_reduce in all 42 cases an H100 timed, run "
                "gpucheck-20261127T172725-461: the stock-wins table is empty)")
    cases = ", ".join(f"{m} {str(d).replace('torch.', '')} <= {n / 2**20:g} MiB"
                      for m, d, n in _CUDA_STOCK_WINS)
    return f"CPU: the C++ kernel; CUDA: the CUDA kernel, except the eager form for {cases}"


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
            the measured rule _CUDA_STOCK_WINS names the case), and the eager reference where a
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
    out, _ = torch.ops.dtl_fast.frame_pool(x, lengths, mode)
    return out
