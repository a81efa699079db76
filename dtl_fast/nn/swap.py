"""swap_modules: put dtl_fast's LSTM / GRU in place of torch.nn.LSTM / torch.nn.GRU anywhere
inside a model."""
from __future__ import annotations

import warnings

from torch import nn
from torch.nn.utils import parametrize

from dtl_fast._backend import resolve_backend
from dtl_fast.nn.rnn import GRU, LSTM

# Exact types: subclasses of torch's modules may change forward, and dtl_fast's own modules
# (which are not subclasses anyway) are already swapped.
_SWAPS = {nn.LSTM: LSTM, nn.GRU: GRU}

# Per-module hook registries. They are moved (the same dict objects), so the RemovableHandles
# the user holds keep removing hooks from the module that now runs them.
_HOOK_DICTS = (
    "_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
    "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_backward_hooks",
    "_backward_pre_hooks", "_state_dict_hooks", "_state_dict_pre_hooks",
    "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks",
)


def _unswappable_reason(module: nn.Module) -> str | None:
    if getattr(module, "proj_size", 0) > 0:
        return f"proj_size={module.proj_size} is not supported"
    expected = set(module._flat_weights_names)
    params = {name for name, p in module._parameters.items() if p is not None}
    if params != expected:
        # e.g. torch.nn.utils.weight_norm replaces weight_ih_l0 by weight_ih_l0_g / _v.
        return f"it has parameters other than its weights ({sorted(params ^ expected)})"
    if any(b is not None for b in module._buffers.values()) or len(module._modules) > 0:
        return "it has buffers or submodules of its own"
    return None


def _parametrized_rnn(module: nn.Module) -> type | None:
    """torch.nn.LSTM / GRU for an LSTM / GRU under torch.nn.utils.parametrize (what
    torch.nn.utils.parametrizations.weight_norm, spectral_norm and orthogonal use): its type is
    then a class parametrize made, Parametrized<LSTM>, whose base is torch's. Else None."""
    if not parametrize.is_parametrized(module):
        return None
    base = type(module).__bases__[0]
    return base if base in _SWAPS else None


def _convert(module: nn.Module, backend: str | None) -> nn.Module:
    reason = _unswappable_reason(module)
    if reason is not None:
        # stacklevel: _convert, replacement, swap_modules, then the caller's line
        warnings.warn(f"swap_modules: left a torch.nn.{type(module).__name__} in place because "
                      f"{reason}", stacklevel=4)
        return module
    new = _SWAPS[type(module)].from_torch(module, backend=backend)
    for name in _HOOK_DICTS:
        if hasattr(module, name):
            setattr(new, name, getattr(module, name))
    if hasattr(module, "_is_full_backward_hook"):
        new._is_full_backward_hook = module._is_full_backward_hook
    # Plain attributes a user set on the module (torch's own are all public on `new` already).
    for name, value in vars(module).items():
        if not name.startswith("_") and not hasattr(new, name):
            setattr(new, name, value)
    return new


def swap_modules(model: nn.Module, *, backend: str | None = None) -> nn.Module:
    """Replaces every torch.nn.LSTM / torch.nn.GRU inside `model` with dtl_fast.nn.LSTM / GRU.

    Every submodule at any depth is visited (attributes, nn.Sequential, nn.ModuleList,
    nn.ModuleDict). Only modules whose type is exactly torch.nn.LSTM or torch.nn.GRU are
    replaced: not subclasses (their forward may differ), not dtl_fast's own modules. Each
    replacement (LSTM.from_torch / GRU.from_torch) shares the original's Parameters, so device,
    dtype, weight tying, state_dict keys and an optimizer built before the swap all stay valid;
    train/eval mode is kept. The original's forward / backward / state_dict hooks are moved to
    the replacement, and public attributes set on it are copied. A module registered in several
    places (several attributes, containers or parents) is replaced by one module in all of them;
    references the model holds outside its registered submodules (a plain Python list or dict,
    an attribute set with object.__setattr__) are not module registrations: they keep the torch
    module, which shares the Parameters (same results, torch's kernels).

    Left in place with a warning (they still work, with torch's kernels): LSTMs with
    proj_size > 0, modules with parameters, buffers or submodules beyond their weights
    (torch.nn.utils.weight_norm on an RNN, for one), and LSTMs / GRUs under
    torch.nn.utils.parametrize (torch.nn.utils.parametrizations.weight_norm, spectral_norm,
    orthogonal, ...). A swap could not keep their results exactly: torch.nn.LSTM / GRU
    evaluate a parametrized weight more than once per call (twice in torch 2.14), dtl_fast's
    modules once, so a stateful parametrization (spectral_norm in training) would step
    differently. Swap first,
    then parametrize dtl_fast's module, which supports them. Subclasses of torch.nn.LSTM / GRU
    are left as they are, silently.

    Args:
        model: any nn.Module, on any device; it may itself be a torch.nn.LSTM / GRU.
        backend: "auto" | "fused" | "reference" for the new modules, or None to read
            $DTL_FAST_BACKEND (else "auto") at each call.

    Returns:
        `model`, changed in place, or the replacement when `model` itself is an LSTM / GRU.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"swap_modules expects an nn.Module, got {type(model).__name__}")
    if backend is not None:
        resolve_backend(backend)
    # id -> (old, new); holding `old` keeps its id from being reused during the walk.
    replaced: dict[int, tuple[nn.Module, nn.Module]] = {}

    def replacement(module: nn.Module) -> nn.Module:
        if type(module) not in _SWAPS:
            base = _parametrized_rnn(module)
            if base is not None and id(module) not in replaced:
                replaced[id(module)] = (module, module)  # one warning per module
                names = sorted(module.parametrizations.keys())
                # stacklevel: replacement, swap_modules, then the caller's line
                warnings.warn(f"swap_modules: left a torch.nn.{base.__name__} in place because it "
                              f"is parametrized (torch.nn.utils.parametrize on {', '.join(names)}); "
                              f"swap before parametrizing to get dtl_fast.nn.{base.__name__}",
                              stacklevel=3)
            return module
        if id(module) not in replaced:
            replaced[id(module)] = (module, _convert(module, backend))
        return replaced[id(module)][1]

    visited: set[int] = set()
    stack = [model]
    while stack:
        parent = stack.pop()
        if id(parent) in visited:
            continue
        visited.add(id(parent))
        for name, child in list(parent._modules.items()):
            if child is None:
                continue
            new = replacement(child)
            if new is not child:
                # Through _modules: setattr would also work, but this keeps the position of the
                # child in _modules (and so in state_dict and named_modules order) unchanged.
                parent._modules[name] = new
            else:
                stack.append(child)
    return replacement(model)
