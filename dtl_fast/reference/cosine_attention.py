"""Eager scaled cosine attention (Swin Transformer V2): the numerical ground truth of
dtl_fast.ops.cosine_attention, and the argument checks every backend of it shares.

    score(i, j) = exp(min(logit_scale_h, ln 100)) * cos(q_i, k_j)
    out_i       = sum_j softmax_j(score(i, j)) v_j

over the keys j < key_lengths[b] with |i - j| <= window, plus M memory slots every query sees.
Nothing here imports the kernels."""
from __future__ import annotations

import math
import numbers

import numpy as np
import torch
import torch.nn.functional as F

from dtl_fast._checks import as_lengths_tensor, check_lengths_range

FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
LOG_MAX_SCALE = math.log(100.0)  # Swin V2 clamps the learned log-scale at ln 100
NORM_EPS = 1e-12  # torch.nn.functional.normalize's default
MAX_HEAD_DIM = 128

_NAME = "cosine_attention"


def _fail(msg: str):
    raise ValueError(f"{_NAME}: {msg}")


def _normalize_key_lengths(key_lengths, B: int, device: torch.device) -> torch.Tensor | None:
    return as_lengths_tensor(key_lengths, B, device, owner=_NAME, name="key_lengths", device_name="q")


def check_key_lengths_range(key_lengths: torch.Tensor | None, Nk: int) -> None:
    """Checks 0 <= key_lengths[b] <= Nk (one host sync when the lengths are on a GPU; an
    asynchronous assert inside a torch.compile graph)."""
    check_lengths_range(key_lengths, 0, Nk, owner=_NAME, name="key_lengths", span=f"[0, Nk] = [0, {Nk}]")


def check_inputs(q, k, v, logit_scale, key_lengths=None, window=None, memory_k=None, memory_v=None):
    """Checks shapes, dtypes and devices (not the key_lengths range: check_key_lengths_range).

    Returns (key_lengths as None or an integer tensor [B], window as None or an int).
    Raises ValueError naming the argument and what was expected.
    """
    for name, t in (("q", q), ("k", k), ("v", v), ("logit_scale", logit_scale)):
        if not isinstance(t, torch.Tensor):
            _fail(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            shape = "[B, H, Nq, d]" if name == "q" else "[B, H, Nk, d]" if name == "k" else "[B, H, Nk, dv]"
            _fail(f"{name} must be a 4-D tensor {shape}, got shape {tuple(t.shape)}")
    if q.dtype not in FLOAT_DTYPES:
        _fail(f"q must be float32, float64, float16 or bfloat16, got {q.dtype}")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            _fail(f"{name} must have q's dtype {q.dtype}, got {t.dtype}")
        if t.device != q.device:
            _fail(f"{name} must be on q's device {q.device}, got {t.device}")
    B, H, _, d = q.shape
    if tuple(k.shape[:2]) != (B, H):
        _fail(f"k must be [B, H, Nk, d] with B, H = {B}, {H} from q, got {tuple(k.shape)}")
    if k.shape[3] != d:
        _fail(f"k's head dim must equal q's d = {d}, got k of shape {tuple(k.shape)}")
    if tuple(v.shape[:3]) != tuple(k.shape[:3]):
        _fail(f"v must be [B, H, Nk, dv] with B, H, Nk = {tuple(k.shape[:3])} from k, "
              f"got {tuple(v.shape)}")
    dv = v.shape[3]
    if not 1 <= d <= MAX_HEAD_DIM:
        _fail(f"head dim d (last dim of q and k) must be in [1, {MAX_HEAD_DIM}], got {d}")
    if not 1 <= dv <= MAX_HEAD_DIM:
        _fail(f"head dim dv (last dim of v) must be in [1, {MAX_HEAD_DIM}], got {dv}")
    if logit_scale.dtype not in FLOAT_DTYPES:
        _fail(f"logit_scale must be a floating tensor, got {logit_scale.dtype}")
    if tuple(logit_scale.shape) != (H,):
        _fail(f"logit_scale must have shape [H] = [{H}], got {tuple(logit_scale.shape)}")
    if logit_scale.device != q.device:
        _fail(f"logit_scale must be on q's device {q.device}, got {logit_scale.device}")
    if (memory_k is None) != (memory_v is None):
        _fail("memory_k and memory_v must be given together (both or neither)")
    if memory_k is not None:
        for name, t, last, lname in (("memory_k", memory_k, d, "d"), ("memory_v", memory_v, dv, "dv")):
            if not isinstance(t, torch.Tensor):
                _fail(f"{name} must be a torch.Tensor, got {type(t).__name__}")
            if t.dim() != 3 or t.shape[0] != H or t.shape[2] != last:
                _fail(f"{name} must be [H, M, {lname}] = [{H}, M, {last}], got {tuple(t.shape)}")
            if t.dtype != q.dtype:
                _fail(f"{name} must have q's dtype {q.dtype}, got {t.dtype}")
            if t.device != q.device:
                _fail(f"{name} must be on q's device {q.device}, got {t.device}")
        if memory_k.shape[1] != memory_v.shape[1]:
            _fail(f"memory_k and memory_v must have the same number of slots M, got "
                  f"{memory_k.shape[1]} and {memory_v.shape[1]}")
    if window is not None:
        if isinstance(window, torch.Tensor) and window.dim() == 0 and not window.dtype.is_floating_point \
                and window.dtype != torch.bool:
            window = int(window)
        if not isinstance(window, numbers.Integral) or isinstance(window, (bool, np.bool_)):
            _fail(f"window must be None or an int >= 0, got {window!r}")
        window = int(window)
        if window < 0:
            _fail(f"window must be None or an int >= 0, got {window}")
    key_lengths = _normalize_key_lengths(key_lengths, B, q.device)
    return key_lengths, window


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 accumulation for half types; float32 / float64 stay."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def head_scale(logit_scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """exp(min(logit_scale, ln 100)) in `dtype`: its gradient is zero where the clamp is active."""
    return torch.exp(torch.clamp(logit_scale.to(dtype), max=LOG_MAX_SCALE))


def key_mask(key_lengths, window, B: int, Nq: int, Nk: int, device) -> torch.Tensor | None:
    """Boolean [B, 1, Nq, Nk] (True: the query may attend to the key), or None when all can."""
    if key_lengths is None and window is None:
        return None
    mask = torch.ones((B, 1, Nq, Nk), dtype=torch.bool, device=device)
    j = torch.arange(Nk, device=device)
    if key_lengths is not None:
        lens = key_lengths.to(device=device, dtype=torch.int64)
        mask = mask & (j[None, :] < lens[:, None])[:, None, None, :]
    if window is not None:
        i = torch.arange(Nq, device=device)
        mask = mask & ((i[:, None] - j[None, :]).abs() <= window)[None, None]
    return mask


def cosine_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, logit_scale: torch.Tensor,
                     key_lengths=None, window: int | None = None,
                     memory_k: torch.Tensor | None = None, memory_v: torch.Tensor | None = None
                     ) -> torch.Tensor:
    """Scaled cosine attention, eagerly (dense scores).

    Args:
        q: [B, H, Nq, d] float32 / float64 / float16 / bfloat16.
        k: [B, H, Nk, d], v: [B, H, Nk, dv], q's dtype and device; 1 <= d, dv <= 128.
        logit_scale: [H], any float dtype: score = exp(min(logit_scale_h, ln 100)) * cos.
        key_lengths: None, a list of B ints or an integer tensor [B] (CPU or q's device) in
            [0, Nk]: keys j >= key_lengths[b] get no weight.
        window: None or an int w >= 0: query i sees only keys j with |i - j| <= w.
        memory_k, memory_v: None or [H, M, d], [H, M, dv] (both or neither, M >= 0): slots
            every query attends to besides its keys (not affected by key_lengths / window).

    Returns:
        [B, H, Nq, dv] in q's dtype, computed in float32 for half inputs (float64 for float64).
        A query with nothing to attend to gives zeros and zero gradient.
    """
    key_lengths, window = check_inputs(q, k, v, logit_scale, key_lengths, window, memory_k, memory_v)
    B, H, Nq, _ = q.shape
    Nk = k.shape[2]
    check_key_lengths_range(key_lengths, Nk)
    cd = compute_dtype(q.dtype)
    qn = F.normalize(q.to(cd), dim=-1, eps=NORM_EPS)
    kn = F.normalize(k.to(cd), dim=-1, eps=NORM_EPS)
    vv = v.to(cd)
    scale = head_scale(logit_scale, cd)[None, :, None, None]
    scores = scale * (qn @ kn.transpose(-1, -2))  # [B, H, Nq, Nk]
    valid = key_mask(key_lengths, window, B, Nq, Nk, q.device)
    if valid is None:
        valid = torch.ones((1, 1, 1, 1), dtype=torch.bool, device=q.device).expand(B, 1, Nq, Nk)
    valid = valid.expand(B, H, Nq, Nk)
    if memory_k is not None:
        M = memory_k.shape[1]
        mkn = F.normalize(memory_k.to(cd), dim=-1, eps=NORM_EPS)
        mem_scores = scale * (qn @ mkn.transpose(-1, -2)[None])  # [B, H, Nq, M]
        scores = torch.cat([mem_scores, scores], dim=-1)
        vv = torch.cat([memory_v.to(cd)[None].expand(B, -1, -1, -1), vv], dim=2)
        valid = torch.cat([valid.new_ones((B, H, Nq, M)), valid], dim=-1)
    # Softmax over the valid entries only; a row with none gives 0 / 1 = 0, and masked entries
    # go through where (zero gradient), never through exp(-inf) - (-inf).
    masked = torch.where(valid, scores, float("-inf"))
    row_max = masked.amax(dim=-1, keepdim=True) if masked.shape[-1] > 0 else \
        masked.new_full(masked.shape[:-1] + (1,), float("-inf"))
    row_max = torch.where(torch.isfinite(row_max), row_max, 0.0).detach()  # shift-invariant
    p = torch.exp(torch.where(valid, scores - row_max, float("-inf")))
    denom = p.sum(dim=-1, keepdim=True)
    out = (p @ vv) / torch.where(denom > 0, denom, 1.0)
    return out.to(q.dtype)
