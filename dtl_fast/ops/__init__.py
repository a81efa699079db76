"""Functional ops: custom-op registration, autograd and the backend choice
("auto" | "fused" | "reference") for every fused kernel of dtl_fast."""
from dtl_fast.ops.frame_pool import frame_pool

__all__ = ["frame_pool"]
