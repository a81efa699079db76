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


# Kernels are registered once, when _C loads, so each answer is cached: the dispatcher query
# costs ~10-20 us, paid by every frame_pool call before the cache (measured on this CPU).
_HAS_KERNEL: dict[tuple[str, str], bool] = {}


# A constant for torch.compile: the registry does not change while a graph runs.
@torch.compiler.assume_constant_result
def has_kernel(op: str, device_type: str) -> bool:
    """Whether the compiled op `dtl_fast::<op>` has a kernel for `device_type` ("cpu", "cuda",
    or "meta": the op's fake kernel, shapes only)."""
    if _C is None:
        return False
    found = _HAS_KERNEL.get((op, device_type))
    if found is None:
        key = {"cpu": "CPU", "cuda": "CUDA", "meta": "Meta"}.get(device_type)
        found = key is not None and torch._C._dispatch_has_kernel_for_dispatch_key(
            f"dtl_fast::{op}", key)
        _HAS_KERNEL[(op, device_type)] = found
    return found


_RUNS_ON: dict[int, bool] = {}


# A constant for torch.compile, as has_kernel: a GPU's architecture does not change.
@torch.compiler.assume_constant_result
def cuda_kernels_run_on(device_index: int) -> bool:
    """Whether dtl_fast._C holds CUDA kernels that GPU `device_index` can run: SASS for its
    architecture, or PTX the driver compiles for it (the build's TORCH_CUDA_ARCH_LIST, default
    "8.0;9.0+PTX", covers compute capability 8.0 and up). False without CUDA kernels. Asked
    once per GPU."""
    found = _RUNS_ON.get(device_index)
    if found is None:
        if cuda_kernels_built() and device_index >= torch.cuda.device_count():
            # no such GPU here: fake CUDA tensors (torch.export, tracing on a machine without
            # one) run the op's fake kernel, whatever GPU the program later runs on
            return True
        found = cuda_kernels_built() and bool(_C.cuda_kernels_run_on(int(device_index)))
        _RUNS_ON[device_index] = found
    return found


def check_errors(sync: bool = True) -> None:
    """Raises the error a CUDA pooling kernel recorded since the last check, and clears it.

    Lengths on the GPU are checked on the GPU (no host synchronisation per call): a kernel that
    meets a length outside [0, T] pools over the length clamped into [0, T] and records the
    error. This raises it as ValueError (naming lengths). sync=True (default) first waits for
    every GPU that ran a pooling kernel (letting other Python threads run meanwhile, as
    torch.cuda.synchronize does), so an error of any call made before is seen; sync=False
    only looks at what has landed so far. A later frame_pool call on CUDA raises it too, once
    the faulty kernel has finished. Without CUDA kernels this does nothing.
    """
    if _C is not None:
        _C.check_errors(bool(sync))


def empty_cpu_grad_cache() -> int:
    """Hands the cached gradient blocks of frame_pool's CPU backward back to the system.

    On Linux with glibc's malloc and torch's default CPU allocator, the CPU backward of
    frame_pool takes a gradient grad_x of 4 MiB or more from a cache of its own warm blocks
    when its size, rounded up to 2 MiB, fits the cache's bound, so the next call of the same
    size has no page faults (glibc's heap trims and rotates blocks below 32 MiB and maps every
    larger one afresh, pages the kernel zeroes on every call). A freed gradient goes back to
    that cache, which keeps at most DTL_FAST_CPU_GRAD_CACHE_MB MiB (default 64; 0 turns it
    off; read once per process) in each of two pools, one for blocks below 32 MiB and one for
    larger ones (so at most twice that in all, and neither evicts the other's blocks). A
    gradient the cache does not take gets fresh pages of the op's own from 32 MiB (unmapped
    when freed; DTL_FAST_DISABLE_ZERO_PAGES=1 turns them off), else torch's allocator.
    Returns the bytes released; 0 without the compiled extension.
    """
    return int(_C.cpu_grad_cache_empty()) if _C is not None else 0


def cpu_grad_cache_info() -> dict:
    """What the cache of frame_pool's CPU gradient blocks holds now (empty_cpu_grad_cache):
    {"cached_bytes": bytes of freed blocks kept (both pools), "blocks": their number,
    "cap_bytes": the
    bound}; all 0 without the compiled extension or with the cache off.

    Raises:
        ValueError: DTL_FAST_CPU_GRAD_CACHE_MB is not a whole number of MiB in [0, 1048576].
    """
    if _C is None:
        return {"cached_bytes": 0, "blocks": 0, "cap_bytes": 0}
    cached, blocks, cap = _C.cpu_grad_cache_info()
    return {"cached_bytes": int(cached), "blocks": int(blocks), "cap_bytes": int(cap)}


def _cpu_grad_origins() -> dict | None:
    """Internal (tests, diagnosis): where frame_pool's CPU backward took its gradients from.
    {"last": this thread's latest one, "torch" | "mapped" | "cache" | "none", and per process
    since it started the counts "torch" (torch's CPU allocator), "mapped" (a fresh mapping of
    the op's own, its pages zero) and "cache" (a warm block of the op's cache, see
    empty_cpu_grad_cache)}. A resize_ of a gradient the op's allocator made counts too. None
    without the compiled extension (or one built before it had this record)."""
    if _C is None or not hasattr(_C, "_cpu_grad_origins"):
        return None
    last, torch_n, mapped, cache = _C._cpu_grad_origins()
    return {"last": last, "torch": int(torch_n), "mapped": int(mapped), "cache": int(cache)}


def cpu_nt_store_rule() -> dict | None:
    """Which gradients frame_pool's CPU backward writes with non-temporal stores (past the
    caches, straight to memory); a smaller one is written into the cache, where the next
    reader finds it.

    Returns {"min_bytes": the rows stored one by one (max, meanmax) stream from this size,
    "bulk_min_bytes": the rows written in bulk with memcpy / memset (mean and sum frames,
    padding) stream from this size (2 x min_bytes), "llc_bytes": the last-level cache CPU 0
    reports (sysfs, else sysconf; 0 when unknown), "source": what set min_bytes}. min_bytes is
    DTL_FAST_CPU_NT_STORE_MIN_MB MiB when set (0 streams every gradient, 1048576 none; read
    once per process), else half of llc_bytes (the level-3 cache; an L1 / L2-only report counts
    as unknown), else 4 MiB; without SSE2, no non-temporal stores at all (min_bytes 2**64 - 1).
    None without the compiled extension (or one built before it had this rule).

    Raises:
        ValueError: DTL_FAST_CPU_NT_STORE_MIN_MB is not a whole number of MiB in [0, 1048576].
    """
    if _C is None or not hasattr(_C, "cpu_nt_store_rule"):  # not built, or built before s23
        return None
    min_bytes, llc, source = _C.cpu_nt_store_rule()
    return {"min_bytes": int(min_bytes), "bulk_min_bytes": 2 * int(min_bytes),
            "llc_bytes": int(llc), "source": source}


def missing_build_message(what: str) -> str:
    reason = LOAD_ERROR or "dtl_fast._C was built without CUDA kernels"
    return (
        f"{what} needs the compiled extension dtl_fast._C ({reason}). Reinstall with "
        "`pip install --no-build-isolation .` (CUDA kernels need nvcc and a CUDA build of torch), "
        "or pass backend='reference'."
    )
