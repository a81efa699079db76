"""Triton launches through cached compiled-kernel handles (opt-in, unmeasured).

A launch `kernel[grid](*args, **constexprs)` goes through Triton's JIT every time: it binds the
arguments, specialises each (dtype; a pointer's 16-byte alignment; an integer's divisibility by
16, whether it equals 1, its width), hashes that into a key and looks the compiled kernel up.
Triton 3.6 does the specialisation in C++, so what a cache above it can still save is the
binding, the key and the lookup: `bench/host_overhead.py` (launch probe) measures that on a
GPU, per launch.

`launch` keeps, per (kernel, device, options, constexprs, specialisation of every argument),
the CompiledKernel the first JIT launch returned, and launches it directly afterwards. The key
holds at least everything Triton specialises on (see _spec), so a hit launches the kernel the
JIT would have chosen; $DTL_FAST_TRITON_HANDLES=check asks the JIT on every hit and raises if it
would have chosen another (the gpu tests run it).

$DTL_FAST_TRITON_HANDLES (read at import; tests and benchmarks set MODE): "0" or unset, the JIT
path (default until a GPU run has measured the handles); "1" the handles; "check" the handles,
each hit verified against the JIT's own choice. CPU tensors (Triton's interpreter) always take
the JIT path.
"""
from __future__ import annotations

import os

import torch

MODE_ENV = "DTL_FAST_TRITON_HANDLES"
MODES = ("0", "1", "check")


def _mode_from_env() -> str:
    mode = os.environ.get(MODE_ENV, "") or "0"
    if mode not in MODES:
        raise ValueError(f"${MODE_ENV} must be one of {', '.join(MODES)} (or unset), got {mode!r}")
    return mode


MODE = _mode_from_env()
_HANDLES: dict = {}
_HANDLES_MAX = 4096
_NO_HANDLE = object()  # a kernel whose parameters the handle path cannot order: JIT always


def _spec(a):
    """What a launch key records of one runtime argument: a superset of what Triton specialises
    on (a pointer's dtype and 16-byte alignment; an integer's divisibility by 16, equality to 1
    and width), so that equal keys mean the same compiled kernel."""
    if isinstance(a, torch.Tensor):
        return (a.dtype, a.data_ptr() % 16 == 0)
    if isinstance(a, bool):
        return ("b", a)
    if isinstance(a, int):
        return ("i", a % 16 == 0, a == 1, -2 ** 31 <= a < 2 ** 31, a >= 2 ** 63)  # i32/i64/u64
    if isinstance(a, float):
        return ("f",)
    return ("v", a)  # None, strings: their value (hashable)


def launch_key(kernel, grid_device: int, args, constexprs: dict, num_warps: int,
               num_stages: int) -> tuple:
    """The cache key of one launch (see _spec)."""
    return (kernel, grid_device, num_warps, num_stages, tuple(sorted(constexprs.items())),
            tuple(_spec(a) for a in args))


def _tail_names(kernel, n_args: int, constexprs: dict):
    # The parameters after the positional ones, in signature order; the handle takes every
    # parameter (constexprs included) as the JIT passes its bound arguments. Plain
    # @triton.jit kernels only (not an autotuner or heuristics wrapper).
    from triton.runtime.jit import JITFunction
    names = getattr(kernel, "arg_names", None)
    if not isinstance(kernel, JITFunction) or names is None or len(names) < n_args:
        return None
    tail = names[n_args:]
    return tail if set(tail) == set(constexprs) else None


def _jit_only(kernel) -> bool:
    # What the JIT does around a launch that a handle would skip: pre-run hooks (profiling
    # tools), and the debug / instrumentation knobs, which change the compiled kernel while
    # the key here does not see them.
    from triton import knobs
    return bool(getattr(kernel, "pre_run_hooks", None) or knobs.runtime.debug
                or knobs.compilation.instrumentation_mode)


def launch(kernel, grid, args, constexprs: dict, num_warps: int, num_stages: int) -> None:
    """kernel[grid](*args, **constexprs, num_warps=..., num_stages=...), through a cached
    compiled handle when MODE asks for it and the arguments are CUDA tensors (see the module
    docstring)."""
    first = next((a for a in args if isinstance(a, torch.Tensor)), None)
    if MODE == "0" or first is None or not first.is_cuda or _jit_only(kernel):
        kernel[grid](*args, **constexprs, num_warps=num_warps, num_stages=num_stages)
        return
    key = launch_key(kernel, torch.cuda.current_device(), args, constexprs, num_warps, num_stages)
    hit = _HANDLES.get(key)
    if hit is None:
        compiled = kernel[grid](*args, **constexprs, num_warps=num_warps, num_stages=num_stages)
        tail = _tail_names(kernel, len(args), constexprs)
        if len(_HANDLES) >= _HANDLES_MAX:
            _HANDLES.clear()
        _HANDLES[key] = _NO_HANDLE if tail is None or compiled is None else (
            compiled, tuple(constexprs[n] for n in tail))
        return
    if hit is _NO_HANDLE:
        kernel[grid](*args, **constexprs, num_warps=num_warps, num_stages=num_stages)
        return
    compiled, tail_values = hit
    if MODE == "check":
        want = kernel.warmup(*args, grid=grid, **constexprs, num_warps=num_warps,
                             num_stages=num_stages)
        if hasattr(want, "result"):  # Triton's asynchronous compile mode
            want = want.result()
        if want is not compiled:
            raise RuntimeError(f"dtl_fast: the cached Triton handle of {kernel} is not the kernel "
                               "the JIT chooses for these arguments (launch_key misses a "
                               "specialisation); unset $DTL_FAST_TRITON_HANDLES")
    grid3 = tuple(grid) + (1,) * (3 - len(grid))
    compiled[grid3](*args, *tail_values)
