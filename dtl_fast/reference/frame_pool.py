"""Eager masked temporal pooling: the numerical ground truth of dtl_fast.ops.frame_pool."""
from __future__ import annotations

import torch

from dtl_fast._checks import (POOL_MODES, check_pool_input, device_capturing, normalize_lengths,
                              unwrap_functorch)

MODES = POOL_MODES + ("meanmax",)


def frame_pool(x: torch.Tensor, lengths=None, mode: str = "mean") -> torch.Tensor:
    """Pools each sequence over its valid frames.

    Args:
        x: [B, T, D] float32 / float64 / float16 / bfloat16.
        lengths: None (every row has T frames), a list of B ints, or an integer tensor [B] on
            the CPU or on x's device; frames t >= lengths[b] are ignored.
        mode: "mean" | "max" | "sum" | "meanmax" (mean and max concatenated: [B, 2D]).

    Returns:
        [B, D] ([B, 2D] for "meanmax") in x's dtype (half types are reduced in float32). A row with length 0 gives
        zeros and zero gradient. "max" propagates NaN and sends the gradient to the first
        maximal frame.
    """
    check_pool_input(x, mode, MODES)
    lengths = normalize_lengths(lengths, x)
    B, T, D = x.shape
    xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    if lengths is None:
        lengths = torch.full((B,), T, dtype=torch.int64, device=x.device)
    else:
        given = lengths
        lengths = lengths.to(device=x.device, dtype=torch.int64)
        if B > 0 and given.device.type == "meta":
            pass  # shapes only: meta lengths hold no values to check
        elif B > 0 and (torch.compiler.is_compiling() or device_capturing(lengths)):
            # No host round trip inside a graph (compiled or CUDA-captured): the check runs
            # with it and fails the call.
            torch._assert_async(((lengths >= 0) & (lengths <= T)).all(),
                                "frame_pool: every lengths[b] must lie in [0, T]")
        elif B > 0:
            # one host sync, not two; under torch.func.vmap the values of every sample
            # (the lengths as given: a meta x leaves CPU lengths' values on the CPU)
            lo, hi = torch.stack(torch.aminmax(unwrap_functorch(given).long())).tolist()
            if lo < 0 or hi > T:
                raise ValueError(f"frame_pool: every lengths[b] must lie in [0, T] = [0, {T}], "
                                 f"got values in [{lo}, {hi}]")
    valid = (torch.arange(T, device=x.device)[None, :] < lengths[:, None])[..., None]  # [B, T, 1]
    if mode == "meanmax":
        out = torch.cat([_pool(xf, lengths, valid, "mean"), _pool(xf, lengths, valid, "max")], -1)
    else:
        out = _pool(xf, lengths, valid, mode)
    return out.to(x.dtype)


def _pool(xf: torch.Tensor, lengths: torch.Tensor, valid: torch.Tensor, mode: str) -> torch.Tensor:
    """One of "mean" / "max" / "sum" of xf [B, T, D] over the frames `valid` [B, T, 1] marks."""
    T = xf.shape[1]
    nonempty = (lengths > 0)[:, None]  # [B, 1]
    if mode == "max":
        if T == 0:
            out = xf.sum(dim=1)  # zeros that stay on x's autograd graph
        else:
            out = torch.where(valid, xf, float("-inf")).max(dim=1).values
            out = torch.where(nonempty, out, 0.0)
    else:
        out = torch.where(valid, xf, 0.0).sum(dim=1)
        if mode == "mean":
            out = out / lengths.clamp(min=1)[:, None].to(xf.dtype)
    return out
