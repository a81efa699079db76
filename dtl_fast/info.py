"""What this installation of dtl_fast is: versions, what was built, and which backend each
op uses on each device."""
from __future__ import annotations

import os
import platform

import torch

from dtl_fast import _extension
from dtl_fast._backend import BACKENDS, ENV_VAR


def _default_backend() -> tuple[str, str | None]:
    """($DTL_FAST_BACKEND or "auto", None), or (the value, what every call with backend=None
    then raises) when the variable holds no backend: said here, raised by the ops."""
    chosen = os.environ.get(ENV_VAR) or "auto"
    if chosen in BACKENDS:
        return chosen, None
    return chosen, (f"error: ${ENV_VAR}={chosen!r} is not one of "
                    f"{', '.join(map(repr, BACKENDS))}: every call with backend=None raises "
                    f"ValueError")


def _triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _op_backend(op: str, device: str) -> str:
    """What an op with backend=None runs on `device`: $DTL_FAST_BACKEND, else "auto"."""
    if device == "cuda" and not torch.cuda.is_available():
        return "no CUDA device"
    chosen, error = _default_backend()
    if error is not None:
        return error
    if chosen == "reference":
        return f"eager reference (${ENV_VAR}=reference)"
    if _extension.has_kernel(op, device):
        # auto without lengths may run torch's own reduction instead (frame_pool's auto_rule)
        stock = "; without lengths torch's reduction where the auto rule says" if chosen == "auto" else ""
        if device == "cpu":
            return f"C++ kernel (dtl_fast._C{stock})"
        index = torch.cuda.current_device()
        if not _extension.cuda_kernels_run_on(index):
            major, minor = torch.cuda.get_device_capability(index)
            return (f"eager reference (dtl_fast._C has no kernel for this GPU, compute capability "
                    f"{major}.{minor}: rebuild with TORCH_CUDA_ARCH_LIST={major}.{minor})")
        return f"CUDA kernel (dtl_fast._C{stock})"
    return "eager reference (kernel not built)"


# What backend="auto" runs on CPU tensors for each Triton op (on CUDA: the op's auto_rule()).
_TRITON_OPS_CPU_AUTO = {
    "lstm": "PyTorch native RNN kernel (torch.lstm)",
    "gru": "PyTorch native RNN kernel (torch.gru)",
    "cosine_attention": "eager reference / normalise + SDPA composite",
}


def _triton_op_backend(op: str, device: str) -> str:
    """What a Triton-backed op with backend=None runs on `device`."""
    from dtl_fast._triton import interpreting, triton_unavailable_reason

    if device == "cuda" and not torch.cuda.is_available():
        return "no CUDA device"
    chosen, error = _default_backend()
    if error is not None:
        return error
    if chosen == "reference":
        return f"eager reference (${ENV_VAR}=reference)"
    if chosen == "auto" and device == "cpu":
        return _TRITON_OPS_CPU_AUTO[op]
    reason = triton_unavailable_reason(device)
    if chosen == "auto":  # CUDA: the measured per-shape rule picks kernel or stock path
        if reason is not None:  # auto never picks a kernel that cannot run
            return f"the stock PyTorch path (Triton unavailable: {reason})"
        if torch.version.hip is not None:  # every auto row was measured on NVIDIA cards
            return "the stock PyTorch path (ROCm: no measured row)"
        return "per shape, by the auto rule: Triton kernel or the stock PyTorch path"
    if reason is not None:
        return f"unavailable: {reason}"
    return "Triton kernel (interpreter)" if device == "cpu" and interpreting() else "Triton kernel"


def _auto_rules() -> dict:
    """{op: one-line description of what backend="auto" picks}, from each op module's
    auto_rule() (the rule tables live beside the ops, with the card they were measured on)."""
    import importlib

    rules = {}
    # importlib: dtl_fast.ops re-exports functions named like two of these modules
    for name, module in (("frame_pool", "frame_pool"), ("lstm/gru", "rnn"),
                         ("cosine_attention", "cosine_attention")):
        rule = getattr(importlib.import_module(f"dtl_fast.ops.{module}"), "auto_rule", None)
        if rule is not None:
            rules[name] = rule()
    return rules


def _cpu_setting(read) -> dict | None:
    """What read() (a frame_pool CPU setting's report) says; a bad setting in the environment
    (DTL_FAST_CPU_GRAD_CACHE_MB, DTL_FAST_CPU_NT_STORE_MIN_MB) is said, not raised, here."""
    if not _extension.cpp_available():
        return None
    try:
        return read()
    except ValueError as e:
        return {"error": str(e)}


def info() -> dict:
    """Returns a dict describing this installation:

    versions (dtl_fast, torch, triton, CUDA of torch, Python), whether the C++ and CUDA
    kernels were built (and why not), the devices, the default backend ($DTL_FAST_BACKEND or
    "auto"), and for each op what a call with that default runs on the CPU and on CUDA.
    """
    import dtl_fast

    cuda = torch.cuda.is_available()
    default, default_error = _default_backend()
    return {
        "dtl_fast": dtl_fast.__version__,
        "torch": torch.__version__,
        "triton": _triton_version(),
        "torch_cuda": torch.version.cuda,
        "python": platform.python_version(),
        "cpp_kernels_built": _extension.cpp_available(),
        "cuda_kernels_built": _extension.cuda_kernels_built(),
        "extension_error": _extension.LOAD_ERROR,
        "cpu": _cpu_model(),
        "cpu_threads": torch.get_num_threads(),
        "cpu_kernel_isa": _extension._C.cpu_isa() if _extension.cpp_available() else None,
        # frame_pool's CPU backward: its cache of warm gradient blocks (>= 4 MiB, within
        # DTL_FAST_CPU_GRAD_CACHE_MB)
        "frame_pool_cpu_grad_cache": _cpu_setting(_extension.cpu_grad_cache_info),
        # ... and which of its gradients it writes past the caches (non-temporal stores;
        # DTL_FAST_CPU_NT_STORE_MIN_MB)
        "frame_pool_cpu_nt_stores": _cpu_setting(_extension.cpu_nt_store_rule),
        # frame_pool's CUDA launch constants (threads, max_tx, split_waves, split_phi_pct,
        # bwd_frames, bwd_waves, fwd_unroll, fwd_pipeline, fwd_l2_evict_first):
        # bench/sweep_frame_pool.py measures them on a GPU
        "frame_pool_cuda_launch": (_extension._C.cuda_launch_config()
                                   if _extension.cuda_kernels_built() else None),
        "backend_default": default_error or default,
        "cuda_device": torch.cuda.get_device_name() if cuda else None,
        # each op's rule for backend="auto" (a measured table beside the op: DESIGN.md)
        "auto_rules": _auto_rules(),
        "ops": {
            "frame_pool": {"cpu": _op_backend("frame_pool", "cpu"),
                           "cuda": _op_backend("frame_pool", "cuda")},
            **{op: {"cpu": _triton_op_backend(op, "cpu"), "cuda": _triton_op_backend(op, "cuda")}
               for op in _TRITON_OPS_CPU_AUTO},
        },
    }


def format_info(data: dict | None = None) -> str:
    """info() as aligned text lines."""
    data = info() if data is None else data
    lines = []
    for key, value in data.items():
        if key == "auto_rules":
            for op, rule in value.items():
                # a rule of several lines keeps the value column
                lines.append(f"{'auto rule ' + op:<28} " + rule.replace("\n", "\n" + " " * 29))
        elif key == "ops":
            for op, per_device in value.items():
                for device, backend in per_device.items():
                    lines.append(f"{'op ' + op + ' on ' + device:<28} {backend}")
        elif value is not None:
            lines.append(f"{key:<28} {value}")
    return "\n".join(lines)
