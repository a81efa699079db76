"""Eager scaled cosine attention (Swin Transformer V2): the numerical ground truth of
dtl_fast.ops.cosine_attention, and the argument checks every backend of it shares.

    score(i, j) = exp(min(logit_scale_h, ln 100)) * cos(q_i, k_j)
    out_i       = sum_j softmax_j(score(i, j)) v_j

over the keys j < key_lengths[b] with |i - j| <= window, plus M memory slots every query sees.
Per head (head h): key_lengths may be [B, H] (keys j < key_lengths[b, h]) and window may hold
H entries (window[h], None / -1: no window for that head), so that branches with different
masks over the same tokens run as one call over their stacked heads.
Nothing here imports the kernels."""
from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from dtl_fast._checks import (INTEGER_DTYPES, as_lengths_tensor, check_lengths_range,
                              device_capturing, tensor_from_numpy, unwrap_functorch)

FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
LOG_MAX_SCALE = math.log(100.0)  # Swin V2 clamps the learned log-scale at ln 100
NORM_EPS = 1e-12  # torch.nn.functional.normalize's default
MAX_HEAD_DIM = 128
MAX_WINDOW = 2**31 - 1  # the kernels take windows as int32; a wider one equals none (N < 2^31)

_NAME = "cosine_attention"


def _fail(msg: str):
    raise ValueError(f"{_NAME}: {msg}")


def _is_int(v) -> bool:
    """A Python / NumPy integer (not a bool) or a 0-d integer tensor."""
    if isinstance(v, torch.Tensor):
        return v.dim() == 0 and v.dtype in INTEGER_DTYPES
    return isinstance(v, numbers.Integral) and not isinstance(v, (bool, np.bool_))


def _is_int_dtype(dtype: torch.dtype) -> bool:
    return dtype in INTEGER_DTYPES


def _normalize_key_lengths(key_lengths, B: int, H: int, device: torch.device) -> torch.Tensor | None:
    """None, an integer tensor [B] (every head), or an integer tensor [B, H] (per head)."""
    if isinstance(key_lengths, np.ndarray) and key_lengths.ndim == 2:
        key_lengths = tensor_from_numpy(key_lengths, owner=_NAME, name="key_lengths")
    if isinstance(key_lengths, Sequence) and not isinstance(key_lengths, (str, bytes)) \
            and len(key_lengths) > 0 and all(isinstance(r, (Sequence, np.ndarray)) and
                                             not isinstance(r, (str, bytes)) for r in key_lengths):
        # nested lists: [B][H] integers, per head
        rows = [list(r) for r in key_lengths]
        bad = [v for r in rows for v in r if not _is_int(v)]
        if bad:
            _fail(f"key_lengths must hold integers, got {bad[0]!r}")
        if len({len(r) for r in rows}) != 1:
            _fail(f"key_lengths per head must be [B, H] = [{B}, {H}], got rows of lengths "
                  f"{sorted({len(r) for r in rows})}")
        key_lengths = torch.tensor([[int(v) for v in r] for r in rows], dtype=torch.int64)
    if isinstance(key_lengths, torch.Tensor) and key_lengths.dim() == 2:
        if not _is_int_dtype(key_lengths.dtype):
            _fail(f"key_lengths must be an integer tensor, got dtype {key_lengths.dtype}")
        if tuple(key_lengths.shape) != (B, H):
            _fail(f"key_lengths per head must have shape [B, H] = [{B}, {H}] (q is [B, H, Nq, d]), "
                  f"got {tuple(key_lengths.shape)}")
        if key_lengths.device.type != "cpu" and key_lengths.device != torch.device(device):
            _fail(f"key_lengths must be on the CPU or on q's device ({device}), got "
                  f"{key_lengths.device}")
        return key_lengths
    if isinstance(key_lengths, torch.Tensor) and key_lengths.dim() > 2:
        _fail(f"key_lengths must have shape [B] = [{B}] or [B, H] = [{B}, {H}], got "
              f"{tuple(key_lengths.shape)}")
    return as_lengths_tensor(key_lengths, B, device, owner=_NAME, name="key_lengths", device_name="q")


def _normalize_window(window, H: int, device: torch.device):
    """None, an int >= 0 (every head), a tuple of H entries (int >= 0 or None) with at least two
    different ones, or an integer tensor [H] (-1: none; its values are check_window_range's).
    A sequence whose entries are all equal becomes the one-window form (None or the int): the
    same function, and the kernels' cheaper specialisation."""
    scalar_msg = (f"window must be None or an int >= 0 (one window for all heads), or H = {H} "
                  f"per-head entries (ints >= 0 or None / -1)")
    if window is None:
        return None
    if isinstance(window, np.ndarray):
        window = tensor_from_numpy(window, owner=_NAME, name="window")
    if isinstance(window, torch.Tensor):
        if not _is_int_dtype(window.dtype):
            _fail(f"window must be None, an int or an integer tensor [H], got dtype {window.dtype}")
        if window.dim() == 0:
            window = int(window)  # one window (a host read, as for an int)
        elif window.dim() != 1 or window.shape[0] != H:
            _fail(f"window per head must have shape [H] = [{H}], got {tuple(window.shape)}")
        elif window.device.type != "cpu" and window.device != torch.device(device):
            _fail(f"window must be on the CPU or on q's device ({device}), got {window.device}")
        else:
            return window
    if isinstance(window, Sequence) and not isinstance(window, (str, bytes)):
        if len(window) != H:
            _fail(f"window per head must have H = {H} entries (q has {H} heads), got {len(window)}")
        entries = []
        for w in window:
            if w is None:
                entries.append(None)
                continue
            if not _is_int(w):
                _fail(f"window entries must be ints >= 0 or None / -1, got {w!r}")
            w = int(w)
            if w < -1:
                _fail(f"window entries must be ints >= 0 or None / -1, got {w}")
            entries.append(None if w == -1 else min(w, MAX_WINDOW))
        if all(e == entries[0] for e in entries[1:]):
            return entries[0] if entries else None
        return tuple(entries)
    if not _is_int(window):
        _fail(f"{scalar_msg}, got {window!r}")
    window = int(window)
    if window < 0:
        _fail(f"{scalar_msg}, got {window}")
    return min(window, MAX_WINDOW)


def window_tensor(window, device, dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """A per-head window (a tuple of H ints / None, or an integer tensor [H]) as a `dtype` tensor
    [H] on `device`, -1 where a head has none."""
    if isinstance(window, torch.Tensor):
        return window.to(device=device, dtype=dtype)
    return torch.tensor([-1 if w is None else w for w in window], dtype=dtype, device=device)


def check_key_lengths_range(key_lengths: torch.Tensor | None, Nk: int) -> None:
    """Checks 0 <= key_lengths[b] (or [b, h]) <= Nk (one host sync when the lengths are on a GPU;
    an asynchronous assert inside a torch.compile graph or a CUDA graph capture). Meta tensors
    hold no values: unchecked (shape inference on the meta device)."""
    if key_lengths is not None and key_lengths.device.type == "meta":
        return
    check_lengths_range(key_lengths, 0, Nk, owner=_NAME, name="key_lengths", span=f"[0, Nk] = [0, {Nk}]")


def check_window_range(window) -> None:
    """Checks that a per-head window tensor holds ints >= -1 (-1: none), as check_lengths_range
    checks lengths: one host read (CPU, or one sync on a GPU), or an asynchronous assert inside a
    torch.compile graph or a CUDA graph capture. Other forms were checked by check_inputs.

    Unsigned dtypes (uint16 / uint32 / uint64 have no min() in torch) are read as int64, which
    every backend computes in: a uint64 value >= 2^63 would wrap to a negative one there, and
    is refused."""
    if not isinstance(window, torch.Tensor) or window.numel() == 0 or window.device.type == "meta":
        return  # (meta tensors hold no values)
    unsigned = not window.dtype.is_signed
    if unsigned:
        window = window.to(torch.int64)  # exact below 2^63; a larger uint64 wraps negative
    if torch.compiler.is_compiling() or device_capturing(window):
        torch._assert_async((window >= (0 if unsigned else -1)).all(),
                            f"{_NAME}: every window[h] must be >= 0, or -1 for no window (and "
                            f"below 2^63)")
        return
    low = int(unwrap_functorch(window).min())  # every sample's windows under torch.func.vmap
    if unsigned and low < 0:
        _fail(f"every window[h] must fit in int64 (below 2^63), got {low + 2**64}")
    if low < -1:
        _fail(f"every window[h] must be >= 0, or -1 for no window, got {low}")


def check_values(key_lengths, window, Nk: int) -> None:
    """The value checks of check_inputs' results that read the data: key lengths in [0, Nk],
    per-head window tensor entries >= -1."""
    check_key_lengths_range(key_lengths, Nk)
    check_window_range(window)


def _meta(t):
    # What check_inputs reads of a tensor argument (None stays None).
    return None if t is None else (t.shape, t.dtype, t.device)


def _check_key(q, k, v, logit_scale, key_lengths, window, memory_k, memory_v):
    """The part of check_inputs' arguments its verdict depends on, as a hashable key, or None
    where the arguments are not of the common forms (then check_inputs checks in full): plain
    tensors (shape, dtype, device), None, and a window that is None, an int or a sequence of
    ints / None (its values, which the normalised window depends on). None too while
    torch.compile traces (the checks are traced once per graph anyway)."""
    args = (q, k, v, logit_scale, key_lengths, memory_k, memory_v)
    if q is None or not all(a is None or type(a) in _PLAIN for a in args):
        return None
    if torch.compiler.is_compiling():  # a write to a global dict would cost dynamo a recompile
        return None
    if window is None or type(window) is int:
        wkey = window
    elif type(window) in (tuple, list) and all(w is None or type(w) is int for w in window):
        wkey = ("seq", tuple(window))
    else:
        return None
    return tuple(_meta(a) for a in args) + (wkey,)


_PLAIN = (torch.Tensor, torch.nn.Parameter)  # nn.Parameter: the same checks as its tensor
_CHECKED: dict = {}  # _check_key -> the normalised window of arguments that passed check_inputs
_CHECKED_MAX = 4096


def check_inputs(q, k, v, logit_scale, key_lengths=None, window=None, memory_k=None, memory_v=None):
    """Checks shapes, dtypes and devices (not the values of tensors: check_values).

    Returns (key_lengths as None or an integer tensor [B] or [B, H], window as None, an int, a
    tuple of H entries int / None with at least two different ones, or an integer tensor [H]).
    Raises ValueError naming the argument and what was expected.

    Validated once per shape: arguments of the common forms (plain tensors, None, a window of
    ints) whose shapes, dtypes, devices and window equal those of an earlier call that passed
    return at once (a model calls this with the same shapes on every step); the verdict depends
    on nothing else.
    """
    key = _check_key(q, k, v, logit_scale, key_lengths, window, memory_k, memory_v)
    if key is not None:
        hit = _CHECKED.get(key, _CHECKED)
        if hit is not _CHECKED:
            return key_lengths, hit
    key_lengths, window = _check_inputs(q, k, v, logit_scale, key_lengths, window, memory_k, memory_v)
    if key is not None and not isinstance(window, torch.Tensor):
        if len(_CHECKED) >= _CHECKED_MAX:
            _CHECKED.clear()
        _CHECKED[key] = window
    return key_lengths, window


def _check_inputs(q, k, v, logit_scale, key_lengths, window, memory_k, memory_v):
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
    window = _normalize_window(window, H, q.device)
    key_lengths = _normalize_key_lengths(key_lengths, B, H, q.device)
    return key_lengths, window


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 accumulation for half types; float32 / float64 stay."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def head_scale(logit_scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """exp(min(logit_scale, ln 100)) in `dtype`: its gradient is zero where the clamp is active."""
    return torch.exp(torch.clamp(logit_scale.to(dtype), max=LOG_MAX_SCALE))


def key_valid(key_lengths, Nk: int, device) -> torch.Tensor | None:
    """Boolean [B, 1, Nk], or [B, H, Nk] for per-head key_lengths (True: key j < the length),
    or None without key_lengths. key_lengths: None, [B] or [B, H]."""
    if key_lengths is None:
        return None
    lens = torch.as_tensor(key_lengths).to(device=device, dtype=torch.int64)
    lens = lens[:, None] if lens.dim() == 1 else lens  # [B, 1] or [B, H]
    return torch.arange(Nk, device=device) < lens[..., None]


def zero_padded_keys(t: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """t [B, H, Nk, d] with the rows of padded keys (valid [B, 1 or H, Nk] False, key_valid)
    set to zero; t itself when valid is None. Padded keys get no weight, but their rows still
    enter the dense products (0 * NaN = NaN in p @ v; SDPA applies its mask after q k^T): a
    NaN / inf there would poison every query of the sample, where the fused kernels never read
    it. torch.where, not a multiply: zero in the forward, exactly zero gradient into those
    rows, and the valid rows unchanged bit for bit."""
    if valid is None:
        return t
    return torch.where(valid[..., None], t, torch.zeros((), dtype=t.dtype, device=t.device))


def key_mask(key_lengths, window, B: int, Nq: int, Nk: int, device,
             valid: torch.Tensor | None = None) -> torch.Tensor | None:
    """Boolean [B, 1, Nq, Nk], or [B, H, Nq, Nk] for per-head key_lengths / window (True: the
    query may attend to the key), or None when all can. key_lengths: None, [B] or [B, H];
    window: None, an int, H entries (int / None) or an integer tensor [H] (-1: none); valid:
    key_valid(key_lengths, Nk, device) when the caller has it already (one copy of the lengths
    to the device, not two)."""
    if key_lengths is None and window is None:
        return None
    mask = torch.ones((B, 1, Nq, Nk), dtype=torch.bool, device=device)
    j = torch.arange(Nk, device=device)
    if key_lengths is not None:
        if valid is None:
            valid = key_valid(key_lengths, Nk, device)
        mask = mask & valid[:, :, None, :]
    if window is not None:
        i = torch.arange(Nq, device=device)
        dist = (i[:, None] - j[None, :]).abs()  # [Nq, Nk]
        if isinstance(window, numbers.Integral):
            mask = mask & (dist <= window)[None, None]
        else:
            w = window_tensor(window, device)[:, None, None]  # [H, 1, 1]
            mask = mask & ((dist[None] <= w) | (w < 0))[None]
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
            [0, Nk]: keys j >= key_lengths[b] get no weight; or per head an integer tensor
            (or nested list) [B, H]: keys j >= key_lengths[b, h] get no weight in head h.
            Padded keys are zeroed before use: whatever they hold (NaN, inf) changes nothing,
            and their k and v rows get zero gradient.
        window: None or an int w >= 0: query i sees only keys j with |i - j| <= w; or per head
            H entries (a sequence of ints >= 0 / None / -1, or an integer tensor [H], -1: none)
            for head h's window. Keys outside a query's window get no weight but are read:
            they must be finite.
        memory_k, memory_v: None or [H, M, d], [H, M, dv] (both or neither, M >= 0): slots
            every query attends to besides its keys (not affected by key_lengths / window).

    Returns:
        [B, H, Nq, dv] in q's dtype, computed in float32 for half inputs (float64 for float64).
        A query with nothing to attend to gives zeros and zero gradient.
    """
    key_lengths, window = check_inputs(q, k, v, logit_scale, key_lengths, window, memory_k, memory_v)
    B, H, Nq, _ = q.shape
    Nk = k.shape[2]
    check_values(key_lengths, window, Nk)
    cd = compute_dtype(q.dtype)
    kv_valid = key_valid(key_lengths, Nk, q.device)
    qn = F.normalize(q.to(cd), dim=-1, eps=NORM_EPS)
    kn = F.normalize(zero_padded_keys(k, kv_valid).to(cd), dim=-1, eps=NORM_EPS)
    vv = zero_padded_keys(v, kv_valid).to(cd)
    scale = head_scale(logit_scale, cd)[None, :, None, None]
    scores = scale * (qn @ kn.transpose(-1, -2))  # [B, H, Nq, Nk]
    valid = key_mask(key_lengths, window, B, Nq, Nk, q.device, kv_valid)
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
