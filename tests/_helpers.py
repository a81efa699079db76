"""Helpers shared by the tests: relative-error comparison and output poisoning."""
from __future__ import annotations

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()

# The devices a test runs on: the CPU always, CUDA as a `gpu` test (skipped without one).
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]

# Relative error ||out - ref|| / ||ref|| against a float64 reference (DESIGN.md, Numerics).
REL_TOL = {torch.float64: 1e-12, torch.float32: 1e-6, torch.float16: 1e-2, torch.bfloat16: 1e-2}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    denom = ref.norm().item()
    diff = (out - ref).norm().item()
    return diff / denom if denom > 0 else diff


def assert_rel_close(name: str, out: torch.Tensor, ref: torch.Tensor, tol: float) -> None:
    """Fails on a shape mismatch, on any NaN / inf the reference does not have at the same
    place, or when the relative error exceeds tol; the message shows the worst entries."""
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    o, r = out.detach().double().cpu(), ref.detach().double().cpu()
    bad_o, bad_r = ~torch.isfinite(o), ~torch.isfinite(r)
    assert torch.equal(bad_o, bad_r), (
        f"{name}: non-finite values at {bad_o.nonzero()[:5].tolist()} "
        f"(reference has them at {bad_r.nonzero()[:5].tolist()})")
    o, r = o.masked_fill(bad_o, 0), r.masked_fill(bad_r, 0)
    err = rel_err(o, r)
    if not err <= tol:
        worst = (o - r).abs().flatten().topk(min(3, o.numel())).indices
        detail = ", ".join(f"[{i}] {o.flatten()[i]:.6g} vs {r.flatten()[i]:.6g}" for i in worst.tolist())
        raise AssertionError(f"{name}: relative error {err:.3e} > {tol:.1e}; worst: {detail}")
