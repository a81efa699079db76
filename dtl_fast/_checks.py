"""Argument checks shared by the fused ops and their eager references, so both backends
reject the same bad input with the same message. Only shapes, dtypes and devices are
checked here (they hold for fake tensors under torch.compile too); value checks that need
the data live in the kernels and in the eager references."""
from __future__ import annotations

import numbers
from collections.abc import Sequence

import numpy as np
import torch

FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
POOL_MODES = ("mean", "max", "sum")


def check_pool_input(x: torch.Tensor, mode: str, modes: Sequence[str] = POOL_MODES) -> None:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"frame_pool: x must be a torch.Tensor [B, T, D], got {type(x).__name__}")
    if x.dim() != 3:
        raise ValueError(f"frame_pool: x must be a 3-D tensor [B, T, D], got shape {tuple(x.shape)}")
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"frame_pool: x must be float32, float64, float16 or bfloat16, got {x.dtype}")
    if mode not in modes:
        raise ValueError(f"frame_pool: mode must be one of {', '.join(map(repr, modes))}, got {mode!r}")


def normalize_lengths(lengths, x: torch.Tensor, *, name: str = "lengths") -> torch.Tensor | None:
    """Turns `lengths` (None, a sequence of ints, an integer NumPy array, or an integer tensor
    [B] on the CPU or on x's device) into None or an integer tensor, checking its type, shape
    and device.

    The range 0 <= lengths[b] <= T is checked where the data is read (kernel or reference).
    """
    if lengths is None:
        return None
    B = x.shape[0]
    if isinstance(lengths, np.ndarray):
        lengths = torch.from_numpy(lengths)
    if not isinstance(lengths, torch.Tensor):
        if not isinstance(lengths, Sequence) or isinstance(lengths, (str, bytes)):
            raise ValueError(f"frame_pool: {name} must be None, a list of ints or an integer "
                             f"tensor [B], got {type(lengths).__name__}")

        def is_int(v):
            if isinstance(v, torch.Tensor):  # e.g. list(lengths_tensor)
                return v.dim() == 0 and not v.dtype.is_floating_point and v.dtype != torch.bool
            return isinstance(v, numbers.Integral) and not isinstance(v, (bool, np.bool_))

        if not all(is_int(v) for v in lengths):
            bad = next(v for v in lengths if not is_int(v))
            raise ValueError(f"frame_pool: {name} must hold integers, got {bad!r}")
        values = [int(v) for v in lengths]
        if any(not -(2**63) <= v < 2**63 for v in values):
            raise ValueError(f"frame_pool: {name} must fit in int64, got {max(values, key=abs)}")
        lengths = torch.tensor(values, dtype=torch.int64)
    if lengths.dtype.is_floating_point or lengths.dtype.is_complex or lengths.dtype == torch.bool:
        raise ValueError(f"frame_pool: {name} must be an integer tensor, got dtype {lengths.dtype}")
    if lengths.dim() != 1 or lengths.shape[0] != B:
        raise ValueError(f"frame_pool: {name} must have shape [B] = [{B}], got {tuple(lengths.shape)}")
    if lengths.device.type != "cpu" and lengths.device != x.device:
        raise ValueError(f"frame_pool: {name} must be on the CPU or on x's device ({x.device}), "
                         f"got {lengths.device}")
    return lengths
