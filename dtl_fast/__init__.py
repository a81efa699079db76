"""dtl_fast: fused Triton and C++/CUDA kernels for DTL (dual task learning), exposed as
drop-in torch.nn modules with autograd.

    import dtl_fast
    pool = dtl_fast.nn.FramePool("mean")      # masked temporal pooling, C++ / CUDA
    dtl_fast.info()                            # versions, build, which backend runs where
"""
__version__ = "0.1.0"

from dtl_fast import _extension, nn, ops, reference  # noqa: E402, F401  (_extension loads _C first)
from dtl_fast.info import info  # noqa: E402

__all__ = ["info", "nn", "ops", "reference", "__version__"]
