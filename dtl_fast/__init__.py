"""dtl_fast: fused Triton and C++/CUDA kernels for DTL (dual task learning), exposed as
torch.nn modules with autograd (LSTM / GRU drop-in for torch.nn's).

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

# The model, the data pipeline and the trainer load on first use (`dtl_fast.models.DTL(...)`
# works after a plain `import dtl_fast`), so importing the kernels does not import them.
_LAZY_SUBMODULES = ("data", "models", "train")


def __getattr__(name: str):
    if name in _LAZY_SUBMODULES:
        import importlib

        return importlib.import_module(f"dtl_fast.{name}")
    raise AttributeError(f"module 'dtl_fast' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY_SUBMODULES))
