"""dtl_fast: fused Triton and C++/CUDA kernels for DTL (dual task learning), exposed as
drop-in torch.nn modules with autograd.

    import dtl_fast
    rnn = dtl_fast.nn.LSTM(256, 128, bidirectional=True, batch_first=True)  # Triton on CUDA
    model = dtl_fast.swap_modules(model)       # every torch.nn.LSTM / GRU inside -> dtl_fast's
    attn = dtl_fast.nn.CosineAttention(256, num_heads=4)   # cosine attention, Triton on CUDA
    pool = dtl_fast.nn.FramePool("mean")      # masked temporal pooling, C++ / CUDA
    dtl_fast.info()                            # versions, build, which backend runs where
    dtl_fast.check_errors()                    # raise a bad GPU length a CUDA kernel recorded
    dtl_fast.empty_cpu_grad_cache()            # free frame_pool's cached CPU gradient blocks
"""
__version__ = "0.1.0"

from dtl_fast import _extension, nn, ops, reference  # noqa: E402, F401  (_extension loads _C first)
from dtl_fast._extension import check_errors, cpu_grad_cache_info, empty_cpu_grad_cache  # noqa: E402
from dtl_fast.info import info  # noqa: E402
from dtl_fast.nn.swap import swap_modules  # noqa: E402

__all__ = ["check_errors", "cpu_grad_cache_info", "empty_cpu_grad_cache", "info", "nn", "ops", "reference", "swap_modules", "__version__"]
