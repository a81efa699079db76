"""Masked temporal frame pooling: the registered C++/CUDA op torch.ops.dtl_fast.frame_pool,
its fake (meta) kernels and autograd, and the backend choice."""
from __future__ import annotations

import torch

from dtl_fast import _extension, reference
from dtl_fast._backend import resolve_backend
from dtl_fast._checks import check_pool_input, normalize_lengths

_FWD = "dtl_fast::frame_pool"
_BWD = "dtl_fast::frame_pool_backward"


def _register() -> None:
    @torch.library.register_fake(_FWD)
    def _frame_pool_fake(x, lengths, mode):
        torch._check(x.dim() == 3, lambda: f"frame_pool: x must be [B, T, D], got {x.shape}")
        B, _, D = x.shape
        argmax_shape = (B, D) if mode == "max" else (0,)
        return x.new_empty((B, D)), x.new_empty(argmax_shape, dtype=torch.int32)

    @torch.library.register_fake(_BWD)
    def _frame_pool_backward_fake(grad_out, lengths, argmax, T, mode):
        torch._check(grad_out.dim() == 2, lambda: "frame_pool_backward: grad_out must be [B, D]")
        B, D = grad_out.shape
        return grad_out.new_empty((B, T, D))

    def _setup_context(ctx, inputs, output):
        x, lengths, mode = inputs
        _, argmax = output
        ctx.mode = mode
        ctx.T = x.shape[1]
        ctx.save_for_backward(lengths, argmax)  # argmax is an empty tensor unless mode is max

    def _backward(ctx, grad_out, _grad_argmax):
        if not ctx.needs_input_grad[0]:
            return None, None, None
        lengths, argmax = ctx.saved_tensors
        grad_x = torch.ops.dtl_fast.frame_pool_backward(grad_out, lengths, argmax, ctx.T, ctx.mode)
        return grad_x, None, None

    torch.library.register_autograd(_FWD, _backward, setup_context=_setup_context)

    # The backward is linear in grad_out, so its own gradient (for double backward) is the
    # adjoint map: pooling for mean / sum, a gather at the argmax for max.
    def _setup_context_bwd(ctx, inputs, output):
        _, lengths, argmax, _, mode = inputs
        ctx.mode = mode
        ctx.save_for_backward(lengths, argmax)

    def _backward_bwd(ctx, grad_grad_x):
        lengths, argmax = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None
        if ctx.mode == "max" and grad_grad_x.shape[1] == 0:
            grad = grad_grad_x.new_zeros(argmax.shape)
        elif ctx.mode == "max":
            index = argmax.clamp(min=0).long().unsqueeze(1)  # [B, 1, D]
            picked = grad_grad_x.gather(1, index).squeeze(1)
            grad = torch.where(argmax >= 0, picked, torch.zeros_like(picked))
        else:
            grad, _ = torch.ops.dtl_fast.frame_pool(grad_grad_x, lengths, ctx.mode)
        return grad, None, None, None, None

    torch.library.register_autograd(_BWD, _backward_bwd, setup_context=_setup_context_bwd)


if _extension.cpp_available():
    _register()


def _use_compiled(x: torch.Tensor, backend: str) -> bool:
    if backend == "reference":
        return False
    if _extension.has_kernel("frame_pool", x.device.type):
        return True
    if backend == "fused":
        raise RuntimeError(_extension.missing_build_message(
            f"frame_pool(backend='fused') on {x.device.type} tensors"))
    return False


def frame_pool(x: torch.Tensor, lengths=None, mode: str = "mean", *, backend: str | None = None
               ) -> torch.Tensor:
    """Pools each sequence of frames over its valid frames only.

    Args:
        x: [B, T, D] float32 / float64 / float16 / bfloat16, any strides.
        lengths: None (all T frames valid), a list of B ints, or an integer tensor [B] on the
            CPU or on x's device; frames t >= lengths[b] are never read.
        mode: "mean" | "max" | "sum".
        backend: "auto" | "fused" | "reference"; None reads $DTL_FAST_BACKEND (else "auto")
            at each call (under torch.compile: when the graph is traced).
            "auto" runs the C++ kernel on CPU tensors and the CUDA kernel on GPU tensors, and
            the eager reference where a kernel was not built.

    Returns:
        [B, D] in x's dtype; half types accumulate in float32. A row with length 0 gives
        zeros and zero gradient. "max" propagates NaN like torch.amax and sends the gradient
        to the first maximal frame.

    Raises:
        ValueError: wrong rank or dtype of x, unknown mode, lengths not integer, not [B], on
            another device, or outside [0, T].
    """
    backend = resolve_backend(backend)
    check_pool_input(x, mode)
    lengths = normalize_lengths(lengths, x)
    if not _use_compiled(x, backend):
        return reference.frame_pool(x, lengths, mode)
    out, _ = torch.ops.dtl_fast.frame_pool(x, lengths, mode)
    return out
