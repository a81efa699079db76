"""FramePool: masked temporal pooling of a padded batch of clips."""
from __future__ import annotations

import torch
from torch import nn

from dtl_fast import ops
from dtl_fast._backend import resolve_backend
from dtl_fast.ops.frame_pool import MODES as _MODES


class FramePool(nn.Module):
    """Pools [B, T, D] frame features over each clip's valid frames to [B, D].

    Args:
        mode: "mean" | "max" | "sum" | "meanmax" ("meanmax" concatenates mean and max: [B, 2D],
            computed in one pass over x).
        backend: "auto" | "fused" | "reference", or None for $DTL_FAST_BACKEND / "auto".

    forward(x, lengths=None): x [B, T, D]; lengths None, a list of B ints or an integer
    tensor [B] (CPU or x's device). Frames t >= lengths[b] are ignored; an empty clip gives
    zeros. See dtl_fast.ops.frame_pool for the exact semantics.
    """

    def __init__(self, mode: str = "mean", backend: str | None = None):
        super().__init__()
        self.mode = mode
        self.backend = backend

    # Both checked when set (in __init__ or later), as the RNN and attention modules do: a typo
    # fails at the assignment, not at the first forward.
    @property
    def mode(self) -> str:
        """"mean" | "max" | "sum" | "meanmax". Settable; a bad value raises ValueError."""
        return self._mode

    @mode.setter
    def mode(self, value: str) -> None:
        if value not in _MODES:
            raise ValueError(f"FramePool: mode must be one of {', '.join(map(repr, _MODES))}, "
                             f"got {value!r}")
        object.__setattr__(self, "_mode", value)

    @property
    def backend(self) -> str | None:
        """"auto" | "fused" | "reference", or None for $DTL_FAST_BACKEND (else "auto") read at
        each call. Settable; a bad value raises ValueError."""
        return self._backend

    @backend.setter
    def backend(self, value: str | None) -> None:
        if value is not None:
            resolve_backend(value)
        object.__setattr__(self, "_backend", value)

    def __prepare_scriptable__(self):
        # torch.jit.script calls this on every module before compiling anything: a clear error
        # naming the way out instead of TorchScript's compiler error inside this file
        from dtl_fast.nn.rnn import _not_scriptable
        _not_scriptable(self)

    def __setstate__(self, state: dict) -> None:
        # A FramePool pickled before mode / backend were properties keeps them in its __dict__
        # under their public names, where the properties would never look.
        for name in ("mode", "backend"):
            if name in state:
                state["_" + name] = state.pop(name)
        super().__setstate__(state)

    def forward(self, x: torch.Tensor, lengths=None) -> torch.Tensor:
        return ops.frame_pool(x, lengths, self.mode, backend=self.backend)

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}" + (f", backend={self.backend!r}" if self.backend else "")
