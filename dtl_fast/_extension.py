"""Loads the compiled extension dtl_fast._C (which registers torch.ops.dtl_fast.*) and says
what it holds. Nothing here fails at import: a missing build is reported by `info()` and by
the ops that need it."""
from __future__ import annotations

import torch

try:
    from dtl_fast import _C  # noqa: F401  (importing registers the C++/CUDA ops)

    LOAD_ERROR: str | None = None
except ImportError as exc:  # not built, or built against another torch
    _C = None
    LOAD_ERROR = f"{type(exc).__name__}: {exc}"


def cpp_available() -> bool:
    """True when dtl_fast._C loaded, so the C++ CPU kernels are registered."""
    return _C is not None


def cuda_kernels_built() -> bool:
    """True when dtl_fast._C was compiled with its CUDA kernels."""
    return _C is not None and bool(getattr(_C, "WITH_CUDA", 0))


# A constant for torch.compile: the registry does not change while a graph runs.
@torch.compiler.assume_constant_result
def has_kernel(op: str, device_type: str) -> bool:
    """Whether the compiled op `dtl_fast::<op>` has a kernel for `device_type` ("cpu", "cuda")."""
    if _C is None:
        return False
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
    return key is not None and torch._C._dispatch_has_kernel_for_dispatch_key(f"dtl_fast::{op}", key)


def missing_build_message(what: str) -> str:
    reason = LOAD_ERROR or "dtl_fast._C was built without CUDA kernels"
    return (
        f"{what} needs the compiled extension dtl_fast._C ({reason}). Reinstall with "
        "`pip install --no-build-isolation .` (CUDA kernels need nvcc and a CUDA build of torch), "
        "or pass backend='reference'."
    )
