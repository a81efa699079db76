"""The backend switch every op and module takes: "auto" | "fused" | "reference"."""
from __future__ import annotations

import os

BACKENDS = ("auto", "fused", "reference")
ENV_VAR = "DTL_FAST_BACKEND"


def resolve_backend(backend: str | None) -> str:
    """Returns the backend to use: `backend` if given, else $DTL_FAST_BACKEND, else "auto".

    Raises ValueError for anything that is not one of BACKENDS, naming where it came from.
    """
    source = "backend"
    if backend is None:
        backend = os.environ.get(ENV_VAR, "auto") or "auto"
        source = f"${ENV_VAR}"
    if backend not in BACKENDS:
        raise ValueError(f"{source} must be one of {', '.join(map(repr, BACKENDS))}, got {backend!r}")
    return backend


def outside_graph(fn, reason: str):
    """fn wrapped to run eagerly under torch.compile (torch.compiler.disable): a graph break
    whose message, and fullgraph=True's error, carry `reason` (dropped on a torch whose
    disable() takes no reason keyword, before 2.8)."""
    import torch

    try:
        return torch.compiler.disable(fn, reason=reason)
    except TypeError:
        return torch.compiler.disable(fn)
