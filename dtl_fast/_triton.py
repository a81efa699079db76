"""Where the Triton kernels can run: CUDA tensors always (when Triton is installed), CPU tensors
only in Triton's interpreter (TRITON_INTERPRET=1, set before the kernels are first imported)."""
from __future__ import annotations

import os

import torch


_IMPORT_ERROR: list = []  # filled on first use; a plain global, which torch.compile traces


def _triton_import_error() -> str | None:
    if not _IMPORT_ERROR:
        try:
            import triton  # noqa: F401
            _IMPORT_ERROR.append(None)
        except Exception as e:  # a broken install must not break `import dtl_fast`
            _IMPORT_ERROR.append(f"{type(e).__name__}: {e}")
    return _IMPORT_ERROR[0]


def interpreting() -> bool:
    """True when Triton runs kernels in its interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


def triton_unavailable_reason(device: torch.device | str) -> str | None:
    """None when the Triton kernels can run on tensors of `device`, else why not."""
    err = _triton_import_error()
    if err is not None:
        return f"Triton cannot be imported ({err})"
    device_type = torch.device(device).type
    if device_type == "cuda":
        return None
    if device_type == "cpu":
        if interpreting():
            return None
        return ("Triton kernels run on CPU tensors only in Triton's interpreter: set "
                "TRITON_INTERPRET=1 before importing dtl_fast (slow; meant for tests), or use "
                "backend='auto' / 'reference'")
    return f"dtl_fast's Triton kernels do not support {device_type} tensors"


def can_run_triton(device: torch.device | str) -> bool:
    return triton_unavailable_reason(device) is None


def require_triton(device: torch.device | str, what: str) -> None:
    """Raises RuntimeError naming `what` when the Triton kernels cannot run on `device`."""
    reason = triton_unavailable_reason(device)
    if reason is not None:
        raise RuntimeError(f"{what}: {reason}")
