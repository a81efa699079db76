"""Helpers shared by the tests: relative-error comparison, output poisoning, encoding test clips."""
from __future__ import annotations

import os

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


# Half precision (bfloat16 / float16, autocast): no fixed tolerance. ATen's CPU kernels round
# differently under each CPU capability (ATEN_CPU_CAPABILITY=default / avx2 / avx512), so a
# number tuned on one machine fails on another. A half-precision result is held instead to the
# error the eager reference itself makes at that precision on the same inputs (both against
# float64): `factor` times that, plus one unit roundoff of the dtype (what rounding the result
# alone costs). The fused kernels round intermediate products (probabilities, gates) to the
# half type where eager keeps float32, so they land 1-4x the eager error (measured over seeds
# on CPU under default and avx2); wrong masks, terms or gradients give errors of order 0.1-1.
HALF_FACTOR = 4.0
# A derived tolerance past this could not catch a wrong result: the case is too ill-conditioned
# at this precision to test anything, and the test says so instead of passing.
HALF_TOL_MAX = 0.05


def unit_roundoff(dtype: torch.dtype) -> float:
    """Half the machine epsilon: the largest relative error of rounding one value to dtype
    (bfloat16 2^-8 = 3.9e-3, float16 2^-11 = 4.9e-4)."""
    return torch.finfo(dtype).eps / 2


def half_tol(name: str, base: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype,
             factor: float = HALF_FACTOR) -> tuple:
    """(tolerance, the baseline's error) for a half-precision result named `name`:
    factor * rel_err(base, ref) + unit_roundoff(dtype), where base is the eager reference's
    result at that precision and ref the float64 reference on the same (rounded) inputs.
    Fails when the baseline is not finite or the tolerance exceeds HALF_TOL_MAX."""
    assert torch.isfinite(base.detach()).all(), f"{name}: the eager {dtype} baseline is not finite"
    err = rel_err(base, ref)
    tol = factor * err + unit_roundoff(dtype)
    assert tol <= HALF_TOL_MAX, (
        f"{name}: the eager {dtype} reference is off by {err:.2e} here, a tolerance of {tol:.1e} "
        f"could not catch a wrong result; use a better conditioned case")
    return tol, err


def assert_half_close(name: str, out: torch.Tensor, ref: torch.Tensor, base: torch.Tensor,
                      dtype: torch.dtype, factor: float = HALF_FACTOR) -> float:
    """assert_rel_close(out, ref) with the tolerance of half_tol(base, ref); the failure message
    shows how the tolerance was derived. Returns the tolerance."""
    tol, err = half_tol(name, base, ref, dtype, factor)
    assert_rel_close(f"{name} (tolerance {factor:g} x eager {str(dtype)[6:]} error {err:.2e} "
                     f"+ {unit_roundoff(dtype):.1e})", out, ref, tol)
    return tol


def encode_clip(path, frames, codec: str, rate: int = 10, *, options: dict | None = None,
                format: str | None = None, audio_frames: int = 0):
    """Writes uint8 RGB frames [T, H, W, 3] as a real video file at `path` (container from the
    suffix, or `format`; `path` may also be a writable file object, then `format` is needed)
    with PyAV's encoder `codec`, yuv420p; returns `path`. options: the muxer's (e.g.
    movflags); audio_frames > 0 adds an AAC track of that many 1024-sample silent frames at
    8 kHz, muxed after the video frames. Needs PyAV."""
    import av
    import numpy as np

    target = str(path) if isinstance(path, (str, os.PathLike)) else path
    with av.open(target, "w", format=format, options=options or {}) as out:
        stream = out.add_stream(codec, rate=rate)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        sound = out.add_stream("aac", rate=8000) if audio_frames else None
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                out.mux(packet)
        if sound is not None:
            for i in range(audio_frames):
                chunk = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp",
                                                   layout="mono")
                chunk.sample_rate, chunk.pts = 8000, 1024 * i
                for packet in sound.encode(chunk):
                    out.mux(packet)
            for packet in sound.encode():
                out.mux(packet)
        for packet in stream.encode():  # flush the encoder's delayed frames
            out.mux(packet)
    return path
