"""Drop-in torch.nn modules backed by dtl_fast's fused kernels."""
from dtl_fast.nn.pooling import FramePool

__all__ = ["FramePool"]
