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


_CACHE: dict = {}  # (device, stream, dtype, shape, values) -> the device copy
_CACHE_MAX = 64


def to_device_cached(t: torch.Tensor, device, dtype: torch.dtype) -> torch.Tensor:
    """A small CPU integer tensor (lengths) as `dtype` on a CUDA `device`, copied once per value:
    a later call with equal values (same dtype, shape, device and current stream) returns the
    same device tensor without a copy. A model passes one lengths tensor to several ops per
    step; each would otherwise pay a host-to-device copy (from pageable memory, a stream sync).
    The result is read-only for its callers (the ops only read lengths). Anything else (not a
    CPU tensor, another device type, inside torch.compile or a CUDA graph capture, where the
    copy must not outlive a cache entry) takes t.to(device, dtype) as before."""
    device = torch.device(device)
    if (t.device.type != "cpu" or device.type != "cuda" or t.numel() > 4096
            or torch.compiler.is_compiling() or torch.cuda.is_current_stream_capturing()):
        return t.to(device=device, dtype=dtype, non_blocking=True)
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    key = (device, torch.cuda.current_stream(device).stream_id, dtype, tuple(t.shape),
           t.detach().to(dtype).numpy().tobytes())
    hit = _CACHE.get(key)
    if hit is None:
        if len(_CACHE) >= _CACHE_MAX:
            _CACHE.clear()
        # pinned + non-blocking: no stream sync; the copy is ordered before every later use,
        # which runs on the same stream (the stream is part of the key). Made outside inference
        # mode: a later training call may save it for backward.
        with torch.inference_mode(False):
            hit = _CACHE[key] = to_device_async(t.to(dtype), device)
    return hit
