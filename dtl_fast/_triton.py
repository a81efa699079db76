"""Where the Triton kernels can run: CUDA tensors always (when Triton is installed), CPU tensors
only in Triton's interpreter (TRITON_INTERPRET=1, set before Triton is first imported, which
`import dtl_fast` already does: Triton's own library functions are interpreted or compiled from
then on, whatever the variable says later)."""
from __future__ import annotations

import os

import torch


_IMPORT_ERROR: list = []  # filled on first use; a plain global, which torch.compile traces
_TRITON_INTERPRETED: list = []  # whether Triton was imported in interpreter mode, once known


def _triton_import_error() -> str | None:
    if not _IMPORT_ERROR:
        try:
            import triton  # noqa: F401
            _IMPORT_ERROR.append(None)
        except Exception as e:  # a broken install must not break `import dtl_fast`
            _IMPORT_ERROR.append(f"{type(e).__name__}: {e}")
    return _IMPORT_ERROR[0]


def _env_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


def _triton_interpreted() -> bool:
    """Whether Triton itself runs in its interpreter: decided once, when triton.language is
    first imported (its @triton.jit library functions, tl.cdiv / tl.sigmoid / ..., become
    interpreted or compiled functions then). Read from Triton's own objects, so it is right
    however Triton came to be imported (torch.library imports it with dtl_fast)."""
    if not _TRITON_INTERPRETED:
        try:
            import triton.language.standard as standard
            from triton.runtime.interpreter import InterpretedFunction
            from triton.runtime.jit import JITFunction
            fn = standard.cdiv
            # neither class (Triton's internals moved): the environment decides, as before
            _TRITON_INTERPRETED.append(True if isinstance(fn, InterpretedFunction) else
                                       False if isinstance(fn, JITFunction) else _env_interpret())
        except Exception:  # noqa: BLE001  (Triton internals moved: the environment decides)
            _TRITON_INTERPRETED.append(_env_interpret())
    return _TRITON_INTERPRETED[0]


def _version(text: str) -> tuple[int, int]:
    """(major, minor) of a version string such as "3.6.0" or "2.4.0rc1"; (0, 0) if unreadable.
    String methods, not `re`: the first call can come inside torch.compile (a fused op traced
    with fullgraph=True), and torch 2.11's dynamo cannot trace re's pattern compiler."""
    parts = text.split(".")
    digits = "0123456789"  # (str.isdigit takes "²" too, which int() refuses)
    if len(parts) < 2 or not parts[0] or any(ch not in digits for ch in parts[0]):
        return (0, 0)
    minor = ""
    for ch in parts[1]:
        if ch not in digits:
            break
        minor += ch
    return (int(parts[0]), int(minor)) if minor else (0, 0)


def interpreter_conflict() -> str | None:
    """Why Triton's interpreter cannot run our kernels with the installed NumPy, or None.
    Triton before 3.7 turns a loop bound into a Python int with int() of a 1-element array,
    which NumPy 2.4 made a TypeError ("only 0-dimensional arrays can be converted to Python
    scalars"): every kernel with a loop over a run-time bound fails inside Triton. Triton 3.7
    squeezes the array first."""
    try:
        import numpy
        import triton
    except Exception:  # noqa: BLE001  (no Triton: triton_unavailable_reason says so)
        return None
    if _version(triton.__version__) < (3, 7) and _version(numpy.__version__) >= (2, 4):
        return (f"Triton {triton.__version__}'s interpreter fails under NumPy "
                f"{numpy.__version__} (it converts 1-element arrays with int(), a TypeError "
                "since NumPy 2.4): install 'numpy<2.4' or triton >= 3.7, or use "
                "backend='auto' / 'reference'")
    return None


def interpreting() -> bool:
    """True when Triton runs kernels in its interpreter: TRITON_INTERPRET=1 was set when Triton
    was imported and still is (the kernels are decorated when first used)."""
    return _triton_import_error() is None and _env_interpret() and _triton_interpreted()


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
            return interpreter_conflict()
        if _env_interpret():
            # Triton's library functions were made for the GPU compiler: interpreted kernels
            # would fail inside Triton ("Cannot call @triton.jit'd outside of the scope of a
            # kernel")
            return ("TRITON_INTERPRET was set after Triton was imported (importing dtl_fast "
                    "imports it): set it before importing dtl_fast, e.g. in the environment of "
                    "the process; or use backend='auto' / 'reference'")
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
