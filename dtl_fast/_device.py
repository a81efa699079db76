"""Moving small host tensors (lengths, indices) to a GPU without making the host wait."""
from __future__ import annotations

import torch


def to_device_async(t: torch.Tensor, device) -> torch.Tensor:
    """t on `device` without making the host wait: a CPU tensor bound for a GPU goes through
    pinned memory (PyTorch's caching host allocator: no new allocation per call, and the block
    is not reused before the copy has run), since a non-blocking copy from pageable memory may
    synchronise with the stream. Not for use inside a CUDA graph capture (the graph would keep
    reading that host block): callers keep lengths on the device there."""
    device = torch.device(device)
    if t.device == device:
        return t
    if device.type == "cuda" and t.device.type == "cpu" and not torch.compiler.is_compiling():
        t = t.pin_memory()
    return t.to(device, non_blocking=True)
