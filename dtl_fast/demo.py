"""`dtl-fast demo`: masked frame pooling on a real batch of variable-length clips.

Each clip is a sequence of frames, each frame one real handwritten digit from scikit-learn's
bundled digits data set (8x8 images, no download), all of one class, padded with noise
frames to a common length. Pooling over the valid frames only recovers the clip's class by
nearest class centroid; pooling over the padded tensor does not. The demo checks the compiled
kernel against the eager reference (outputs and gradients) and times both.
"""
from __future__ import annotations

import time

import torch

from dtl_fast import nn as dnn
from dtl_fast import ops, reference


def _digits():
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise RuntimeError("dtl-fast demo needs scikit-learn (pip install scikit-learn): its "
                           "bundled handwritten digits are the demo's data") from exc
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0  # [1797, 64] in [0, 1]
    return x, torch.tensor(data.target)


def make_clips(batch: int, max_len: int, seed: int = 0):
    """A padded batch of digit clips: frames [B, T, 64], lengths [B], labels [B]."""
    images, targets = _digits()
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 10, (batch,), generator=g)
    lengths = torch.randint(1, max_len + 1, (batch,), generator=g)
    frames = torch.rand(batch, max_len, images.shape[1], generator=g) * 2.0  # padding is noise
    for b in range(batch):
        pool = (targets == labels[b]).nonzero().squeeze(1)
        pick = pool[torch.randint(0, len(pool), (int(lengths[b]),), generator=g)]
        frames[b, : lengths[b]] = images[pick]
    centroids = torch.stack([images[targets == c].mean(0) for c in range(10)])
    return frames, lengths, labels, centroids


def _time(fn, repeats: int = 50) -> float:
    fn()
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return sorted(samples)[len(samples) // 2] * 1e3


def run(batch: int = 256, max_len: int = 24, seed: int = 0, repeats: int = 50) -> dict:
    """Runs the demo and prints what it finds; returns the figures as a dict."""
    frames, lengths, labels, centroids = make_clips(batch, max_len, seed)
    print(f"batch: {batch} clips of handwritten digits, up to {max_len} frames of 64 features, "
          f"lengths {int(lengths.min())}..{int(lengths.max())}")

    def accuracy(pooled):
        return (torch.cdist(pooled, centroids).argmin(1) == labels).float().mean().item()

    pool = dnn.FramePool("mean")
    masked = pool(frames, lengths)
    acc_masked, acc_padded = accuracy(masked), accuracy(frames.mean(1))
    print(f"nearest-centroid accuracy: masked mean pool {acc_masked:.1%}, "
          f"mean over padded frames {acc_padded:.1%}")

    worst = 0.0
    for mode in ("mean", "max", "sum"):
        xa = frames.clone().requires_grad_()
        xb = frames.clone().requires_grad_()
        ya = ops.frame_pool(xa, lengths, mode, backend="fused")
        yb = reference.frame_pool(xb, lengths, mode)
        grad = torch.randn_like(ya)
        ya.backward(grad)
        yb.backward(grad)
        err = max((ya - yb).abs().max().item(), (xa.grad - xb.grad).abs().max().item())
        worst = max(worst, err)
        print(f"  {mode:<4} kernel vs eager reference: max |diff| of output and gradient {err:.2e}")

    big = torch.randn(64, 64, 1024)
    big_len = torch.randint(1, 65, (64,), generator=torch.Generator().manual_seed(seed))
    timings = {}
    for mode in ("mean", "max"):
        t_ref = _time(lambda: reference.frame_pool(big, big_len, mode), repeats)
        t_ker = _time(lambda: ops.frame_pool(big, big_len, mode, backend="fused"), repeats)
        timings[mode] = (t_ref, t_ker)
        print(f"  [64, 64, 1024] float32 {mode:<4} forward: eager {t_ref:.3f} ms, "
              f"dtl_fast {t_ker:.3f} ms ({t_ref / t_ker:.1f}x)")
    return {"accuracy_masked": acc_masked, "accuracy_padded": acc_padded, "max_abs_diff": worst,
            "timings_ms": timings}
