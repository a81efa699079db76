"""Cosine-similarity attention modules: CosineAttention (multi-head scaled cosine attention,
called like nn.MultiheadAttention but not a drop-in for it, see below), FeatureExchange (gated
cross-modal exchange between two token sequences) and DualModalAttention (the DAM stack of DTL),
with DAMLayer, one level of that stack.

All of them run dtl_fast.ops.cosine_attention for every attention product, so the backend
("auto" | "fused" | "reference") picks the Triton kernel or the eager reference for the whole
module.

Conventions shared by the modules:
- Layout: batch-first [B, N, C] (CosineAttention also takes batch_first=False: [N, B, C]).
- CosineAttention is not a drop-in for nn.MultiheadAttention, only called like it
  (query, key, value): its default layout is batch-first (MultiheadAttention's is [N, B, C]),
  forward returns one tensor, not (output, weights) (the fused kernel never forms the attention
  weights), it takes key_lengths instead of key_padding_mask / attn_mask / need_weights, and its
  parameters (q_proj, k_proj, v_proj, out_proj, logit_scale) are not MultiheadAttention's
  (in_proj_weight, ...), so neither state_dict loads into the other. MultiheadAttention code
  moved over unchanged can go wrong without an error: `out, weights = attn(q, k, v)` unpacks
  the batch dimension when B == 2, and [N, B, C] input is read as [B, N, C] (the shapes pass
  every check either way): pass batch_first=False for [N, B, C] and take one output.
- Backend: every module takes `backend=` (None: $DTL_FAST_BACKEND, read when the op runs, else
  "auto"). Assigning `module.backend = "fused"` (or `module.set_backend("fused")`, which
  returns the module) on any of these modules sets it on that module and on every dtl_fast
  attention module inside it, so a whole DAM stack switches with one line.
- Variable lengths: every forward takes lengths [B] (None, a list of ints, a NumPy integer
  array or an integer tensor on the CPU or on the inputs' device), checked once per forward
  (CPU lengths on the host, no device sync; lengths on a GPU cost one host sync, except under
  torch.compile and during CUDA graph capture, where the check is an asynchronous device
  assert and nothing is read on the host). CPU lengths are handed to the attention op as
  they are (it checks them on the host and copies them without a sync); masks use one copy
  on the inputs' device. Tokens
  n >= lengths[b] are padding: they never influence valid tokens' outputs (no attention
  weight, their keys and values zeroed inside the op, left out of every pooled summary), even
  when they hold NaN or inf, and the outputs of FeatureExchange / DualModalAttention are zero
  there with zero gradient. Gradients are another matter: padded tokens still pass through
  the per-token maps (LayerNorm, the projections, the MLP) and attend as queries, so NaN / inf
  in padded *inputs* gives NaN gradients (the weights' and, through padded queries' attention
  backward, valid tokens' too) in every backend, as any nn.Linear over them would: pad with
  finite values (zeros) to train.
- Bad arguments raise ValueError naming the argument and what was expected; an input on
  another device than the module's parameters too, and one whose dtype is not the module's
  parameter dtype, except under torch.autocast (which casts every float dtype but float64: a
  float64 input there meets torch's own dtype error).
- Not scriptable: torch.jit.script of a model holding one of these modules raises
  dtl_fast.nn.NotScriptableError (torch.compile, torch.export and torch.jit.trace work).
- Grouped form (FeatureExchange, DAMLayer, and CosineAttention's self / shared key-value
  projections): with backend "auto" or "fused", the projections that read the same tokens run
  as one GEMM over their weights concatenated at call time (the parameters and the state_dict
  stay those of the separate nn.Linear modules, so every checkpoint loads as before), memory-only
  attention of both modalities runs as one op call over their queries side by side, attention
  branches with queries and keys of the same shapes run as one op call over their stacked heads
  with a window and key lengths per head (a DAM layer's intra_v and short-term branches; the two
  feature-exchange directions when Na == Nb), and a DAM layer's per-branch output projections
  run as one batched GEMM. Same function as the simple form, which backend="reference" keeps
  (one module call per branch, the readable ground truth); `module.grouped = True / False`
  forces either form (None: by backend).
"""
from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from dtl_fast._checks import (as_lengths_tensor, autocast_enabled, check_lengths_range,
                              device_capturing)
from dtl_fast._backend import resolve_backend
from dtl_fast.nn.rnn import _not_scriptable
from dtl_fast.ops.cosine_attention import cosine_attention

__all__ = ["CosineAttention", "DAMLayer", "DualModalAttention", "FeatureExchange"]

MAX_HEAD_DIM = 128  # the fused kernel keeps one head row in registers / shared memory
_INIT_LOGIT_SCALE = math.log(10.0)  # Swin Transformer V2's initial temperature
_FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------------------------
# argument checks
# --------------------------------------------------------------------------------------------
def _check_int(owner: str, name: str, value, *, minimum: int = 1, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < minimum:
        kind = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        if allow_none:
            kind += " or None"
        raise ValueError(f"{owner}: {name} must be {kind}, got {value!r}")


def _check_dropout(owner: str, dropout) -> None:
    if not isinstance(dropout, numbers.Real) or isinstance(dropout, bool) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"{owner}: dropout must be a float in [0, 1), got {dropout!r}")


def _check_heads(owner: str, dim_name: str, dim: int, num_heads: int) -> int:
    _check_int(owner, dim_name, dim)
    _check_int(owner, "num_heads", num_heads)
    if dim % num_heads != 0:
        raise ValueError(f"{owner}: {dim_name} ({dim}) must be divisible by num_heads ({num_heads})")
    head_dim = dim // num_heads
    if head_dim > MAX_HEAD_DIM:
        raise ValueError(f"{owner}: head dim {dim_name} / num_heads = {dim} / {num_heads} = {head_dim} "
                         f"exceeds {MAX_HEAD_DIM}; use more heads")
    return head_dim


def _check_tokens(owner: str, name: str, x, width: int, width_name: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{owner}: {name} must be a torch.Tensor [B, N, {width_name}], got {type(x).__name__}")
    if x.dim() != 3:
        raise ValueError(f"{owner}: {name} must be a 3-D tensor [B, N, {width_name}], got shape {tuple(x.shape)}")
    if x.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{owner}: {name} must be float32, float64, float16 or bfloat16, got {x.dtype}")
    if x.shape[-1] != width:
        raise ValueError(f"{owner}: {name} must have last dimension {width_name} = {width}, "
                         f"got shape {tuple(x.shape)}")


def _check_same(owner: str, name: str, x: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if x.dtype != ref.dtype:
        raise ValueError(f"{owner}: {name} must have the dtype of {ref_name} ({ref.dtype}), got {x.dtype}")
    if x.device != ref.device:
        raise ValueError(f"{owner}: {name} must be on the device of {ref_name} ({ref.device}), got {x.device}")


def _check_module_param(owner: str, name: str, x: torch.Tensor, param: torch.Tensor) -> None:
    """x must be on the module's parameter device, and have its dtype except under
    torch.autocast on x's device, where an input dtype other than the parameters' is what AMP
    runs (the projections cast both sides themselves). One parameter stands for the module
    (a module split over devices meets torch's own errors). A check of metadata alone: nothing
    on the data path."""
    if x.device != param.device:
        raise ValueError(f"{owner}: {name} must be on the module's device ({param.device}), got "
                         f"{x.device}; move the input or the module "
                         f"(module.to({str(x.device)!r}))")
    if x.dtype != param.dtype and not autocast_enabled(x.device.type):
        raise ValueError(f"{owner}: {name} must have the module's dtype ({param.dtype}), got "
                         f"{x.dtype}; convert the input or the module (module.to({x.dtype}))")


class _Lengths(NamedTuple):
    """Checked lengths [B], in the two forms the modules need: `op`, what the attention op gets
    (the caller's CPU tensor when the lengths came on the CPU: the op checks those on the host
    and copies them to the device without a sync, where device lengths would cost each op call
    a host sync of its own; else the device tensor), and `dev`, int64 on the tokens' device,
    for the padding masks and counts."""
    op: torch.Tensor
    dev: torch.Tensor


def capturing(t: torch.Tensor) -> bool:
    """True while a CUDA graph is being captured on the current stream (eager mode, not inside
    torch.compile tracing): no host read of device data is allowed then."""
    return not torch.compiler.is_compiling() and device_capturing(t)


def check_range_no_sync(lengths: torch.Tensor, lo: int, hi: int, *, owner: str, name: str,
                        span: str | None = None) -> None:
    """lo <= lengths[b] <= hi: on the host for CPU lengths (and for device lengths in eager
    mode: one sync); an asynchronous device assert under torch.compile and while a CUDA graph
    is captured (the caller checked the values on the host before copying them to the
    device: a bad value then aborts the CUDA context instead of raising here)."""
    check_lengths_range(lengths, lo, hi, owner=owner, name=name, span=span)  # capture-aware


def _lengths(owner: str, name: str, lengths, x: torch.Tensor, N: int, x_name: str):
    """None, or _Lengths with every value checked to lie in [0, N] (see check_range_no_sync
    for where the check runs)."""
    if lengths is None:
        return None
    lengths = as_lengths_tensor(lengths, x.shape[0], x.device, owner=owner, name=name,
                                device_name=x_name)
    check_range_no_sync(lengths, 0, N, owner=owner, name=name,
                        span=f"[0, N] = [0, {N}] (N = {x_name}.shape[1])")
    return _Lengths(lengths, lengths.to(device=x.device, dtype=torch.int64, non_blocking=True))


def _as_checked(lengths) -> _Lengths | None:
    """Internal entry points take _Lengths, or an int64 tensor already checked by the caller
    (as DAMLayer.forward documents) that then serves both as op and mask lengths."""
    if lengths is None or isinstance(lengths, _Lengths):
        return lengths
    return _Lengths(lengths, lengths)


def _op_lengths(lengths: _Lengths | None) -> torch.Tensor | None:
    return None if lengths is None else lengths.op


def _valid_mask(lengths: _Lengths | torch.Tensor | None, x: torch.Tensor) -> torch.Tensor | None:
    """[B, N, 1] bool, True on valid tokens; None when every token is valid."""
    if lengths is None:
        return None
    if isinstance(lengths, _Lengths):
        lengths = lengths.dev
    return (torch.arange(x.shape[1], device=x.device)[None, :] < lengths[:, None])[..., None]


# --------------------------------------------------------------------------------------------
# grouped form: several projections of the same tokens as one GEMM
# --------------------------------------------------------------------------------------------
def use_grouped(module: nn.Module) -> bool:
    """Whether `module` runs its grouped form: `module.grouped` when set (True / False), else
    every backend but "reference" (the simple form stays the readable ground truth)."""
    forced = getattr(module, "grouped", None)
    if forced is not None:
        return bool(forced)
    return resolve_backend(module.backend) != "reference"


def _plain_linears(linears) -> bool:
    """Whether every module in `linears` is exactly an nn.Linear that nothing hooks (no forward
    or backward hook of its own nor a global one): only then may a grouped GEMM read their
    weights directly in place of calling them. A hook (torch.nn.utils.prune and the old
    weight_norm / spectral_norm are forward pre-hooks), a parametrization (it changes the
    class) or a subclass with its own forward would be skipped silently otherwise."""
    g = torch.nn.modules.module
    if any(getattr(g, name, None) for name in (
            "_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
            "_global_backward_pre_hooks")):
        return False
    return all(type(m) is nn.Linear and not (m._forward_hooks or m._forward_pre_hooks
                                             or m._backward_hooks or m._backward_pre_hooks)
               for m in linears)


def _linear_group(x: torch.Tensor, linears) -> torch.Tensor:
    """x [..., C] through several nn.Linear(C, *) at once: [..., sum of their out_features],
    their outputs side by side in the order given. The weights are concatenated at each call
    (a small copy: the parameters stay the modules' own, state_dicts and optimizers unchanged);
    autograd splits the gradient back to each weight. Modules that are not plain Linears
    (_plain_linears) are called one by one instead, so their hooks and forwards run."""
    if len(linears) == 1:
        return linears[0](x)
    if not _plain_linears(linears):
        return torch.cat([m(x) for m in linears], dim=-1)
    w = torch.cat([m.weight for m in linears])
    b = None if linears[0].bias is None else torch.cat([m.bias for m in linears])
    return F.linear(x, w, b)


def _head_groups(y: torch.Tensor, sizes, H: int, d: int) -> tuple[torch.Tensor, ...]:
    """[B, N, sum(sizes)*H*d] (the outputs of sum(sizes) projections side by side) -> one view
    [B, s*H, N, d] per entry s of sizes: s consecutive projections' heads stacked along the head
    axis, as an op call over stacked heads takes them (the op takes any strides: no copy)."""
    heads = y.unflatten(-1, (-1, d)).transpose(1, 2)  # [B, sum(sizes)*H, N, d]
    return heads.split([s * H for s in sizes], dim=1)


def _split_heads(y: torch.Tensor, K: int, H: int, d: int) -> tuple[torch.Tensor, ...]:
    """[B, N, K*H*d] -> K views [B, H, N, d] (the op takes any strides: no copy)."""
    return _head_groups(y, [1] * K, H, d)


def _attn_op(mod, q, k, v, lengths: _Lengths | None) -> torch.Tensor:
    """The op call of CosineAttention `mod` on projected heads: o [B, H, Nq, d]."""
    return cosine_attention(q, k, v, mod.logit_scale, _op_lengths(lengths), mod.window,
                            mod.memory_k, mod.memory_v, backend=mod.backend)


def _stacked_attn_op(mods, q, k, v, lengths: _Lengths | None) -> list[torch.Tensor]:
    """The op calls of CosineAttention modules `mods` (H heads each, no memory slots) whose
    projected heads are stacked in q [B, K*H, Nq, d], k, v [B, K*H, Nk, d] (module k's heads
    at k*H..(k+1)*H-1) and that share the key lengths: ONE call over the K*H heads, each head
    with its module's window and learned scale (a window per head), when the modules share a
    backend; else one call each. Returns each module's o [B, H, Nq, d] (views)."""
    H = mods[0].num_heads
    if len(mods) == 1 or any(m.backend != mods[0].backend for m in mods[1:]):
        return [_attn_op(m, q[:, i * H:(i + 1) * H], k[:, i * H:(i + 1) * H],
                         v[:, i * H:(i + 1) * H], lengths) for i, m in enumerate(mods)]
    # (the op takes K*H equal entries as the one-window form, the kernels' specialised path)
    window = [m.window for m in mods for _ in range(H)]
    o = cosine_attention(q, k, v, torch.cat([m.logit_scale for m in mods]), _op_lengths(lengths),
                         window, None, None, backend=mods[0].backend)
    return list(o.split(H, dim=1))


def _same_lengths(a: _Lengths | None, b: _Lengths | None) -> bool:
    """Whether a and b are known to be the same lengths (one object, or neither given)."""
    return a is b or (a is not None and b is not None and a.op is b.op)


def _per_head_lengths(groups, H: int, N: int) -> torch.Tensor | None:
    """Key lengths [B, G*H] for G groups of H heads stacked group by group: the heads of group
    g get groups[g] (_Lengths, or None: all N keys valid). Built from the op forms (CPU lengths
    stay on the CPU, where the op checks them and copies them without a sync) when they share
    a device, else from the device forms. None when no group has lengths."""
    given = [g for g in groups if g is not None]
    if not given:
        return None
    form = "op" if all(g.op.device == given[0].op.device for g in given) else "dev"
    ref = getattr(given[0], form)
    # int64 whatever the callers' dtypes: N may not fit theirs (int8 lengths with N >= 128),
    # nor may one group's values fit another's dtype
    full = torch.full_like(ref, N, dtype=torch.int64)
    cols = torch.stack([full if g is None else getattr(g, form).to(torch.int64) for g in groups], 1)
    return cols[:, :, None].expand(-1, -1, H).reshape(cols.shape[0], len(groups) * H)


def _out_group(outs, mods) -> torch.Tensor:
    """The output projections of K attention branches over the same N tokens as one batched
    GEMM: outs K x o [B, H, N, d] (any strides), mods their modules (each with .dropout of the
    same p and .out_proj) -> [K, B, N, dim], branch k = mods[k].out_proj(dropout(o_k))."""
    B, Hh, N, d = outs[0].shape
    K, dim = len(outs), Hh * d
    if K == 1 or not _plain_linears([m.out_proj for m in mods]):  # (each called: its hooks run)
        return torch.stack([m.out_proj(m.dropout(o.transpose(1, 2).reshape(B, N, dim)))
                            for o, m in zip(outs, mods)])
    o = torch.stack([t.transpose(1, 2) for t in outs]).view(K, B * N, dim)
    o = mods[0].dropout(o)
    w = torch.stack([m.out_proj.weight for m in mods]).transpose(1, 2)  # [K, dim_in, dim_out]
    if mods[0].out_proj.bias is None:
        y = torch.bmm(o, w)
    else:
        y = torch.baddbmm(torch.stack([m.out_proj.bias for m in mods])[:, None, :], o, w)
    return y.view(K, B, N, w.shape[2])


def _zero_padding(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    # torch.where, not a multiply: inf / NaN in padding must not leak as 0 * inf = NaN.
    return x if mask is None else torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))


# --------------------------------------------------------------------------------------------
# backend propagation
# --------------------------------------------------------------------------------------------
class _BackendMixin:
    """`backend` property shared by the attention modules: reading gives this module's own
    setting (None: $DTL_FAST_BACKEND / "auto" at call time); assigning validates the value and
    sets it on this module and on every _BackendMixin module inside it."""

    @property
    def backend(self) -> str | None:
        return self.__dict__.get("_backend")

    @backend.setter
    def backend(self, value: str | None) -> None:
        if value is not None:
            resolve_backend(value)
        for m in self.modules():
            if isinstance(m, _BackendMixin):
                m.__dict__["_backend"] = value

    def set_backend(self, backend: str | None):
        """Sets `backend` on this module and every attention module inside it; returns self."""
        self.backend = backend
        return self

    def __prepare_scriptable__(self):
        # torch.jit.script calls this on every module before compiling: a clear error instead
        # of a TorchScript compiler error inside this file (see dtl_fast.nn.rnn._not_scriptable)
        _not_scriptable(self)


# --------------------------------------------------------------------------------------------
# CosineAttention
# --------------------------------------------------------------------------------------------
class CosineAttention(_BackendMixin, nn.Module):
    r"""Multi-head scaled cosine attention (Swin Transformer V2), called like
    nn.MultiheadAttention(query, key, value) but not a drop-in for it: batch-first by default,
    one output tensor, key_lengths for padding, other parameter names (see the module
    docstring).

    For head h with head dim d = embed_dim / num_heads:

        q = query W_q + b_q,  k = key W_k + b_k,  v = value W_v + b_v      (split into heads)
        s_ij = exp(min(tau_h, ln 100)) * <q_i, k_j> / (|q_i| |k_j|)
        a_i  = softmax_j(s_ij) over the allowed keys j;  o_i = sum_j a_ij v_j
        out  = concat_h(Dropout(o)) W_o + b_o

    The allowed keys of query i are the keys j < key_lengths[b] with |i - j| <= window (all of
    them when window is None), plus the num_memory learned memory slots, which every query may
    always attend to. A query with no allowed key gets o_i = 0 (so out = b_o), never NaN.
    tau (`logit_scale`, [num_heads]) is learned, initialised to ln 10.

    Memory slots are per head and live after the projections: `memory_k` [H, M, d] and
    `memory_v` [H, M, d] are parameters handed to the op as they are (keys of the slots are
    compared by cosine, so only their direction matters).

    Dropout: the fused kernel never materialises the attention weights, so there is no
    attention-weight dropout as in nn.MultiheadAttention; `dropout` is applied to the attended
    values o (per head, before the output projection), the same in every backend.

    Args:
        embed_dim: width of query and of the output.
        num_heads: heads; embed_dim % num_heads == 0 and embed_dim / num_heads <= 128.
        kdim, vdim: widths of key and value (default embed_dim).
        window: None (global) or w >= 0: query i sees keys j with |i - j| <= w (positions in
            the query and key sequences; meant for self-attention over frames).
        num_memory: M >= 0 learned memory slots.
        dropout: probability in [0, 1), see above.
        bias: biases in the four projections.
        batch_first: True (default, unlike nn.MultiheadAttention): tensors are [B, N, C];
            False: [N, B, C].
        backend: "auto" | "fused" | "reference" | None ($DTL_FAST_BACKEND, else "auto").
        device, dtype: factory arguments for the parameters.

    forward(query, key=None, value=None, key_lengths=None) -> Tensor:
        query [B, Nq, embed_dim]; key [B, Nk, kdim] (default: query, i.e. self-attention);
        value [B, Nk, vdim] (default: key); key_lengths None or [B] integers in [0, Nk]
        (a list, NumPy array or integer tensor on the CPU or the inputs' device).
        Returns one tensor [B, Nq, embed_dim] in the inputs' dtype (not a tuple: there are no
        attention weights to return). float32 / float64 / float16 / bfloat16, the module's
        parameter dtype (under torch.autocast any but float64).
        Rows of padded queries are computed like any other query; mask them downstream.
        Padded keys (n >= key_lengths[b]) do not reach the output even when NaN / inf, but the
        k / v projection weights' gradients still see them (sum over all tokens, as for any
        nn.Linear): NaN there gives NaN weight gradients in every backend. A NaN query (a
        padded token of self-attention) gives NaN gradients to every key it attends to, even
        with its output row masked downstream.
    """

    def __init__(self, embed_dim: int, num_heads: int, kdim: int | None = None, vdim: int | None = None,
                 window: int | None = None, num_memory: int = 0, dropout: float = 0.0, bias: bool = True,
                 batch_first: bool = True, backend: str | None = None, device=None, dtype=None):
        super().__init__()
        owner = type(self).__name__
        self.head_dim = _check_heads(owner, "embed_dim", embed_dim, num_heads)
        _check_int(owner, "kdim", kdim, allow_none=True)
        _check_int(owner, "vdim", vdim, allow_none=True)
        _check_int(owner, "window", window, minimum=0, allow_none=True)
        _check_int(owner, "num_memory", num_memory, minimum=0)
        _check_dropout(owner, dropout)
        factory = {"device": device, "dtype": dtype}
        self.embed_dim, self.num_heads = int(embed_dim), int(num_heads)
        self.kdim = int(kdim) if kdim is not None else self.embed_dim
        self.vdim = int(vdim) if vdim is not None else self.embed_dim
        self.window = None if window is None else int(window)
        self.num_memory = int(num_memory)
        self.batch_first = bool(batch_first)
        self.q_proj = nn.Linear(self.embed_dim, self.embed_dim, bias=bias, **factory)
        self.k_proj = nn.Linear(self.kdim, self.embed_dim, bias=bias, **factory)
        self.v_proj = nn.Linear(self.vdim, self.embed_dim, bias=bias, **factory)
        self.out_proj = nn.Linear(self.embed_dim, self.embed_dim, bias=bias, **factory)
        self.logit_scale = nn.Parameter(torch.empty(self.num_heads, **factory))
        if self.num_memory > 0:
            self.memory_k = nn.Parameter(torch.empty(self.num_heads, self.num_memory, self.head_dim, **factory))
            self.memory_v = nn.Parameter(torch.empty(self.num_heads, self.num_memory, self.head_dim, **factory))
        else:
            self.register_parameter("memory_k", None)
            self.register_parameter("memory_v", None)
        self.dropout = nn.Dropout(dropout)
        self.grouped = None  # None: by backend (see use_grouped)
        self.backend = backend
        self._reset_own_parameters()

    def _reset_own_parameters(self) -> None:
        with torch.no_grad():
            self.logit_scale.fill_(_INIT_LOGIT_SCALE)
            if self.memory_k is not None:
                nn.init.normal_(self.memory_k)  # direction only (cosine)
                # Small values: a fresh slot acts as a near-null "sink", not as noise.
                nn.init.normal_(self.memory_v, std=0.02)

    def forward(self, query: torch.Tensor, key: torch.Tensor | None = None, value: torch.Tensor | None = None,
                key_lengths=None) -> torch.Tensor:
        owner = type(self).__name__
        key = query if key is None else key
        value = key if value is None else value
        _check_tokens(owner, "query", query, self.embed_dim, "embed_dim")
        _check_tokens(owner, "key", key, self.kdim, "kdim")
        _check_tokens(owner, "value", value, self.vdim, "vdim")
        _check_same(owner, "key", key, "query", query)
        _check_same(owner, "value", value, "query", query)
        _check_module_param(owner, "query", query, self.q_proj.weight)
        if not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        if key.shape[0] != query.shape[0] or value.shape[0] != query.shape[0]:
            raise ValueError(f"{owner}: query, key and value must have the same batch size, got "
                             f"{query.shape[0]}, {key.shape[0]}, {value.shape[0]}")
        if value.shape[1] != key.shape[1]:
            raise ValueError(f"{owner}: key and value must have the same number of tokens, got "
                             f"{key.shape[1]} and {value.shape[1]}")
        key_lengths = _lengths(owner, "key_lengths", key_lengths, key, key.shape[1], "key")
        out = self._attend(query, key, value, _op_lengths(key_lengths))
        return out if self.batch_first else out.transpose(0, 1)

    def _attend(self, query, key, value, key_lengths) -> torch.Tensor:
        """forward without argument checks (batch-first inputs, key_lengths already a checked
        int64 tensor or None); the DAM layers call this after checking their inputs once."""
        B, Nq, _ = query.shape
        H, d = self.num_heads, self.head_dim
        # [B, N, H, d] -> [B, H, N, d] as a view: the op takes any strides.
        grouped = use_grouped(self) and self.kdim == self.embed_dim and self.vdim == self.embed_dim
        if grouped and key is query and value is query:  # self-attention: one GEMM for q, k, v
            q, k, v = _split_heads(_linear_group(query, [self.q_proj, self.k_proj, self.v_proj]), 3, H, d)
        elif grouped and value is key:  # k and v of the same tokens: one GEMM
            q = self.q_proj(query).unflatten(-1, (H, d)).transpose(1, 2)
            k, v = _split_heads(_linear_group(key, [self.k_proj, self.v_proj]), 2, H, d)
        else:
            q = self.q_proj(query).unflatten(-1, (H, d)).transpose(1, 2)
            k = self.k_proj(key).unflatten(-1, (H, d)).transpose(1, 2)
            v = self.v_proj(value).unflatten(-1, (H, d)).transpose(1, 2)
        o = cosine_attention(q, k, v, self.logit_scale, key_lengths, self.window,
                             self.memory_k, self.memory_v, backend=self.backend)
        o = self.dropout(o.transpose(1, 2).reshape(B, Nq, self.embed_dim))
        return self.out_proj(o)

    def extra_repr(self) -> str:
        s = f"embed_dim={self.embed_dim}, num_heads={self.num_heads}"
        if self.kdim != self.embed_dim or self.vdim != self.embed_dim:
            s += f", kdim={self.kdim}, vdim={self.vdim}"
        if self.window is not None:
            s += f", window={self.window}"
        if self.num_memory:
            s += f", num_memory={self.num_memory}"
        if not self.batch_first:
            s += ", batch_first=False"
        if self.backend is not None:
            s += f", backend={self.backend!r}"
        return s


class _MemoryReadout(_BackendMixin, nn.Module):
    r"""Attention from each token to M learned slots only (the long-term memory of DAM):

        q = x W_q + b_q (per head);  s_im = exp(min(tau_h, ln 100)) * cos(q_i, mk_m)
        o_i = sum_m softmax_m(s_im) mv_m;  out = concat_h(Dropout(o)) W_o + b_o

    mk [H, M, d], mv [H, M, d] are the slots. It runs the same op as CosineAttention with an
    empty key sequence, so there are no key / value projections to learn.
    """

    def __init__(self, dim: int, num_heads: int, num_memory: int, dropout: float = 0.0, bias: bool = True,
                 backend: str | None = None, device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.dim, self.num_heads, self.num_memory = dim, num_heads, num_memory
        self.head_dim = dim // num_heads
        self.q_proj = nn.Linear(dim, dim, bias=bias, **factory)
        self.out_proj = nn.Linear(dim, dim, bias=bias, **factory)
        self.logit_scale = nn.Parameter(torch.full((num_heads,), _INIT_LOGIT_SCALE, **factory))
        self.memory_k = nn.Parameter(torch.empty(num_heads, num_memory, self.head_dim, **factory))
        self.memory_v = nn.Parameter(torch.empty(num_heads, num_memory, self.head_dim, **factory))
        with torch.no_grad():
            nn.init.normal_(self.memory_k)
            nn.init.normal_(self.memory_v, std=0.02)
        self.dropout = nn.Dropout(dropout)
        self.window = None  # memory only: no keys, no window
        self.backend = backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, _ = x.shape
        H, d = self.num_heads, self.head_dim
        q = self.q_proj(x).unflatten(-1, (H, d)).transpose(1, 2)
        o = self.attend_heads(q)
        o = self.dropout(o.transpose(1, 2).reshape(B, N, self.dim))
        return self.out_proj(o)

    def attend_heads(self, q: torch.Tensor) -> torch.Tensor:
        """The op on projected queries q [B, H, N, d] (any strides) -> o [B, H, N, d]. Each
        query attends to the slots only, so queries of several sequences may be laid side by
        side along N and attended in one call."""
        kv = q.new_zeros(q.shape[0], q.shape[1], 0, q.shape[3])
        return cosine_attention(q, kv, kv, self.logit_scale, None, None, self.memory_k, self.memory_v,
                                backend=self.backend)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}, num_memory={self.num_memory}"


# --------------------------------------------------------------------------------------------
# FeatureExchange
# --------------------------------------------------------------------------------------------
class FeatureExchange(_BackendMixin, nn.Module):
    r"""The feature-exchange strategy of DTL: two token sequences a and b, brought to a common
    width `dim`, each take in what they find in the other by cosine attention, through a
    learned per-token, per-channel gate.

        a' = a P_a + p_a   (identity when dim_a == dim),   b' = b P_b + p_b   (likewise)
        c_a = CosineAttention_ab(query=a', key=value=b', key_lengths=b_lengths)
        c_b = CosineAttention_ba(query=b', key=value=a', key_lengths=a_lengths)
        g_a = sigmoid([a', c_a] G_a + g_a0),   g_b = sigmoid([b', c_b] G_b + g_b0)   in (0, 1)^dim
        a_out = a' + g_a * c_a,   b_out = b' + g_b * c_b

    g = 0 keeps a token's own features, g = 1 adds everything it attended to in the other
    modality. A reading of the article, which exchanges features between modalities "to remove
    redundancy" when their widths differ: here the cosine-attention selection and the gate
    are kept, and the other modality's context is added, whatever the widths; nothing is
    removed. A token whose other modality is empty (length 0) gets c = out-projection bias.
    Outputs are zero at padded positions (n >= a_lengths[b] / b_lengths[b]).

    Args:
        dim_a, dim_b: widths of a and b.
        dim: common width; num_heads must divide it (head dim <= 128).
        num_heads: heads of both cross attentions.
        dropout: CosineAttention dropout (attended values).
        bias: biases in the projections and gates.
        backend, device, dtype: as in CosineAttention.

    forward(a [B, Na, dim_a], b [B, Nb, dim_b], a_lengths=None, b_lengths=None,
            return_gates=False) -> (a_out [B, Na, dim], b_out [B, Nb, dim])
        (+ (g_a [B, Na, dim], g_b [B, Nb, dim]) as a third element when return_gates).
        a and b: same batch size, dtype and device; the module's parameter dtype (any float
        dtype but float64 under torch.autocast).
    """

    def __init__(self, dim_a: int, dim_b: int, dim: int, num_heads: int, dropout: float = 0.0,
                 bias: bool = True, backend: str | None = None, device=None, dtype=None):
        super().__init__()
        owner = type(self).__name__
        _check_int(owner, "dim_a", dim_a)
        _check_int(owner, "dim_b", dim_b)
        _check_heads(owner, "dim", dim, num_heads)
        _check_dropout(owner, dropout)
        factory = {"device": device, "dtype": dtype}
        self.dim_a, self.dim_b, self.dim, self.num_heads = int(dim_a), int(dim_b), int(dim), int(num_heads)
        self.proj_a = nn.Linear(dim_a, dim, bias=bias, **factory) if dim_a != dim else nn.Identity()
        self.proj_b = nn.Linear(dim_b, dim, bias=bias, **factory) if dim_b != dim else nn.Identity()
        self.attn_ab = CosineAttention(dim, num_heads, dropout=dropout, bias=bias, **factory)
        self.attn_ba = CosineAttention(dim, num_heads, dropout=dropout, bias=bias, **factory)
        self.gate_a = nn.Linear(2 * dim, dim, bias=bias, **factory)
        self.gate_b = nn.Linear(2 * dim, dim, bias=bias, **factory)
        self.grouped = None  # None: by backend (see use_grouped)
        self.backend = backend

    def forward(self, a: torch.Tensor, b: torch.Tensor, a_lengths=None, b_lengths=None,
                return_gates: bool = False):
        owner = type(self).__name__
        _check_tokens(owner, "a", a, self.dim_a, "dim_a")
        _check_tokens(owner, "b", b, self.dim_b, "dim_b")
        _check_same(owner, "b", b, "a", a)
        _check_module_param(owner, "a", a, self.gate_a.weight)
        if a.shape[0] != b.shape[0]:
            raise ValueError(f"{owner}: a and b must have the same batch size, got {a.shape[0]} and {b.shape[0]}")
        same = a_lengths is b_lengths  # one object: one check, and the directions may stack
        a_lengths = _lengths(owner, "a_lengths", a_lengths, a, a.shape[1], "a")
        b_lengths = a_lengths if same and a.shape[1] == b.shape[1] else \
            _lengths(owner, "b_lengths", b_lengths, b, b.shape[1], "b")
        a_out, b_out, g_a, g_b = self._exchange(a, b, a_lengths, b_lengths)
        return (a_out, b_out, (g_a, g_b)) if return_gates else (a_out, b_out)

    def _exchange(self, a, b, a_lengths, b_lengths):
        """forward without argument checks: a [B, Na, dim_a], b [B, Nb, dim_b]; lengths None,
        _Lengths or checked int64 tensors. Returns (a_out, b_out, g_a, g_b)."""
        a_lengths, b_lengths = _as_checked(a_lengths), _as_checked(b_lengths)
        a, b = self.proj_a(a), self.proj_b(b)
        if use_grouped(self):
            c_a, c_b = self._cross_grouped(a, b, a_lengths, b_lengths)
        else:
            c_a = self.attn_ab._attend(a, b, b, _op_lengths(b_lengths))
            c_b = self.attn_ba._attend(b, a, a, _op_lengths(a_lengths))
        g_a = torch.sigmoid(self.gate_a(torch.cat([a, c_a], dim=-1)))
        g_b = torch.sigmoid(self.gate_b(torch.cat([b, c_b], dim=-1)))
        mask_a, mask_b = _valid_mask(a_lengths, a), _valid_mask(b_lengths, b)
        a_out = _zero_padding(a + g_a * c_a, mask_a)
        b_out = _zero_padding(b + g_b * c_b, mask_b)
        return a_out, b_out, g_a, g_b

    def _cross_grouped(self, a, b, a_lengths, b_lengths):
        """Both cross attentions with the projections of each sequence as one GEMM (a: q of
        a->b, k and v of b->a; b: k and v of a->b, q of b->a). When the two directions have the
        same shapes (Na == Nb) they also run as one op call over 2H stacked heads, each head
        with its own learned scale and its own key lengths: the a->b heads attend b's keys
        (b_lengths), the b->a heads a's (a_lengths); with one lengths object (or none) for both
        that is the lengths [B] for all heads, else per-head key lengths [B, 2H]. With
        Na != Nb, two calls (other query and key counts)."""
        ab, ba = self.attn_ab, self.attn_ba
        H, d = self.num_heads, self.dim // self.num_heads
        B, Na, Nb = a.shape[0], a.shape[1], b.shape[1]
        q_ab, k_ba, v_ba = _split_heads(_linear_group(a, [ab.q_proj, ba.k_proj, ba.v_proj]), 3, H, d)
        k_ab, v_ab, q_ba = _split_heads(_linear_group(b, [ab.k_proj, ab.v_proj, ba.q_proj]), 3, H, d)
        if Na == Nb and ab.backend == ba.backend:
            if _same_lengths(a_lengths, b_lengths):
                lengths = _op_lengths(a_lengths)
            else:
                lengths = _per_head_lengths([b_lengths, a_lengths], H, Na)
            o = cosine_attention(torch.cat([q_ab, q_ba], 1), torch.cat([k_ab, k_ba], 1),
                                 torch.cat([v_ab, v_ba], 1),
                                 torch.cat([ab.logit_scale, ba.logit_scale]),
                                 lengths, None, None, None, backend=ab.backend)
            o_ab, o_ba = o[:, :H], o[:, H:]
        else:
            o_ab = _attn_op(ab, q_ab, k_ab, v_ab, b_lengths)
            o_ba = _attn_op(ba, q_ba, k_ba, v_ba, a_lengths)
        c_a = ab.out_proj(ab.dropout(o_ab.transpose(1, 2).reshape(B, Na, self.dim)))
        c_b = ba.out_proj(ba.dropout(o_ba.transpose(1, 2).reshape(B, Nb, self.dim)))
        return c_a, c_b

    def extra_repr(self) -> str:
        return f"dim_a={self.dim_a}, dim_b={self.dim_b}, dim={self.dim}, num_heads={self.num_heads}"


# --------------------------------------------------------------------------------------------
# DAM
# --------------------------------------------------------------------------------------------
class _Composition(nn.Module):
    r"""Composition attention: a per-token softmax over K branch outputs o_1..o_K [B, N, dim],

        alpha = softmax_k([o_1, ..., o_K] W_c + b_c)     ([B, N, K]; input-dependent)
        out   = sum_k alpha_k o_k
    """

    def __init__(self, dim: int, num_branches: int, bias: bool = True, device=None, dtype=None):
        super().__init__()
        self.num_branches = num_branches
        self.score = nn.Linear(num_branches * dim, num_branches, bias=bias, device=device, dtype=dtype)

    def forward(self, branches: list[torch.Tensor], return_weights: bool = False):
        alpha = torch.softmax(self.score(torch.cat(branches, dim=-1)), dim=-1)
        out = (torch.stack(branches, dim=-1) * alpha.unsqueeze(-2)).sum(-1)
        return (out, alpha) if return_weights else out

    def forward_stacked(self, stacked: torch.Tensor, last: torch.Tensor | None = None) -> torch.Tensor:
        """The same from the branches stacked [K, B, N, dim] (what the grouped DAM layer
        computes), and optionally one more branch `last` [B, N, dim] (any strides) after them:
        one copy to [B, N, K*dim] (= torch.cat(branches, -1)) serves both the scores and the
        weighted sum."""
        K, B, N, D = stacked.shape
        if last is None:
            flat = stacked.permute(1, 2, 0, 3).reshape(B, N, K * D)
        else:
            flat = torch.cat([*stacked.unbind(0), last], dim=-1)
            K += 1
        alpha = torch.softmax(self.score(flat), dim=-1)
        return (flat.view(B, N, K, D) * alpha.unsqueeze(-1)).sum(2)


class DAMLayer(_BackendMixin, nn.Module):
    r"""One level of the DAM stack (see DualModalAttention). With x_i [B, Ni, dim] the image
    tokens, x_v [B, Nv, dim] the video tokens, L_i / L_v their lengths:

        h_i = LN_i(x_i),  h_v = LN_v(x_v)                                  (pre-norm)
        inter:       e_i = CA_iv(h_i, h_v; L_v)            e_v = CA_vi(h_v, h_i; L_i)
        intra:       a_i = CA_ii(h_i, h_i; L_i)            a_v = CA_vv(h_v, h_v; L_v)
        short-term:                                        s_v = CA_st(h_v, h_v; L_v, |t - t'| <= window)
        long-term:   m_i = MEM(h_i)                        m_v = MEM(h_v)
                     (MEM: attention to num_memory learned slots only, shared by both modalities)
        composition: c_i = Comp_i(e_i, a_i, m_i)           c_v = Comp_v(e_v, a_v, s_v, m_v)
        x_i <- x_i + Dropout(c_i),                         x_v <- x_v + Dropout(c_v)
        x   <- x + MLP(LN'(x))  per modality, when mlp_ratio > 0 (MLP: Linear, GELU, Linear)

    The short-term branch exists when window is not None, the long-term branch when
    num_memory > 0. CA are CosineAttention modules; Comp is the composition attention
    alpha = softmax_k([o_1..o_K] W_c + b_c), c = sum_k alpha_k o_k per token.

    forward(x_i, x_v, L_i, L_v) with L_* None or checked int64 tensors [B] on the inputs'
    device (use DualModalAttention for checked, user-facing input) -> (x_i, x_v).

    Grouped form (backend "auto" / "fused", or `grouped = True`): the nine projections of h_v
    (inter_vi q; intra_v q, k, v; short-term q, k, v; long-term q; inter_iv k, v) are one GEMM,
    the seven of h_i another; intra_v and short-term (same queries, keys and lengths: h_v, h_v,
    L_v) run as ONE op call over their 2H stacked heads with a window per head (None for the
    intra heads, window for the short-term ones), their q, k, v plain views of the GEMM; the
    long-term branch attends the image and video queries in one op call; the out-projections
    of each modality's branches are one batched GEMM. Op calls per layer: 4, plus 1 with the
    long-term branch (simple form: 4, plus 1 with the short-term, plus 2 with the long-term
    branch). The other branches stay separate calls: inter_iv, intra_i (queries h_i) and
    inter_vi (keys h_i) read other queries or other keys (inter_vi could join intra_v only when
    Ni == Nv, at the cost of copying its keys next to theirs: not done), and the long-term
    branch attends the memory slots only, which for its heads alone would take per-head memory
    slots and "no keys" (key lengths 0) that the op does not have (its memory slots are shared
    by all heads of a call). With dropout > 0 in training the
    grouped form draws its masks over the stacked branches (same distribution, other random
    numbers than the simple form).
    """

    def __init__(self, dim: int, num_heads: int, window: int | None = None, num_memory: int = 0,
                 mlp_ratio: float = 2.0, dropout: float = 0.0, bias: bool = True, backend: str | None = None,
                 device=None, dtype=None):
        super().__init__()
        owner = type(self).__name__
        _check_heads(owner, "dim", dim, num_heads)
        _check_int(owner, "window", window, minimum=0, allow_none=True)
        _check_int(owner, "num_memory", num_memory, minimum=0)
        _check_dropout(owner, dropout)
        if not isinstance(mlp_ratio, numbers.Real) or isinstance(mlp_ratio, bool) or mlp_ratio < 0:
            raise ValueError(f"{owner}: mlp_ratio must be a number >= 0, got {mlp_ratio!r}")
        factory = {"device": device, "dtype": dtype}
        attn = {"dropout": dropout, "bias": bias, **factory}
        self.window, self.num_memory = window, num_memory
        self.norm_i = nn.LayerNorm(dim, **factory)
        self.norm_v = nn.LayerNorm(dim, **factory)
        self.inter_iv = CosineAttention(dim, num_heads, **attn)
        self.inter_vi = CosineAttention(dim, num_heads, **attn)
        self.intra_i = CosineAttention(dim, num_heads, **attn)
        self.intra_v = CosineAttention(dim, num_heads, **attn)
        self.short_term = CosineAttention(dim, num_heads, window=window, **attn) if window is not None else None
        self.long_term = _MemoryReadout(dim, num_heads, num_memory, **attn) if num_memory > 0 else None
        n_i = 2 + (num_memory > 0)
        n_v = 2 + (window is not None) + (num_memory > 0)
        self.compose_i = _Composition(dim, n_i, bias=bias, **factory)
        self.compose_v = _Composition(dim, n_v, bias=bias, **factory)
        self.drop = nn.Dropout(dropout)
        hidden = round(mlp_ratio * dim)
        if hidden > 0:
            self.mlp_norm_i = nn.LayerNorm(dim, **factory)
            self.mlp_norm_v = nn.LayerNorm(dim, **factory)

            def mlp():
                return nn.Sequential(nn.Linear(dim, hidden, bias=bias, **factory), nn.GELU(),
                                     nn.Dropout(dropout), nn.Linear(hidden, dim, bias=bias, **factory))

            self.mlp_i, self.mlp_v = mlp(), mlp()
        else:
            self.mlp_i = self.mlp_v = None
        self.grouped = None  # None: by backend (see use_grouped)
        self.backend = backend

    def branches(self, x_i, x_v, L_i, L_v):
        """The branch outputs before composition: (image list, video list), in the order of
        the equations (inter, intra[, short-term][, long-term]). Simple form."""
        L_i, L_v = _as_checked(L_i), _as_checked(L_v)
        li, lv = _op_lengths(L_i), _op_lengths(L_v)
        h_i, h_v = self.norm_i(x_i), self.norm_v(x_v)
        b_i = [self.inter_iv._attend(h_i, h_v, h_v, lv), self.intra_i._attend(h_i, h_i, h_i, li)]
        b_v = [self.inter_vi._attend(h_v, h_i, h_i, li), self.intra_v._attend(h_v, h_v, h_v, lv)]
        if self.short_term is not None:
            b_v.append(self.short_term._attend(h_v, h_v, h_v, lv))
        if self.long_term is not None:
            b_i.append(self.long_term(h_i))
            b_v.append(self.long_term(h_v))
        return b_i, b_v

    def branches_stacked(self, x_i, x_v, L_i, L_v):
        """The branch outputs of the grouped form: ([K_i, B, Ni, dim], [K_v, B, Nv, dim]) the
        stacked branches in the order of branches() but the long-term one, and that one's
        outputs m_i [B, Ni, dim], m_v [B, Nv, dim] (None without long-term memory)."""
        L_i, L_v = _as_checked(L_i), _as_checked(L_v)
        h_i, h_v = self.norm_i(x_i), self.norm_v(x_v)
        Ni = x_i.shape[1]
        H = self.inter_iv.num_heads
        d = self.inter_iv.head_dim
        lt = self.long_term
        # intra_v and short-term: same queries, keys and key lengths (h_v, h_v, L_v), other
        # windows: their q, k, v projections are laid out [q_vv q_st | k_vv k_st | v_vv v_st]
        # in the GEMM of h_v, so each of q, k, v is a view over the 2H stacked heads.
        same_kv = [self.intra_v] + ([self.short_term] if self.short_term is not None else [])
        n = len(same_kv)
        # The long-term memory module serves both modalities: its q_proj is in neither grouped
        # GEMM nor its out_proj in the stacked output GEMMs; it runs once over both token sets
        # side by side (below). In both groups each of its weight gradients came as two slices
        # of grouped gradients, summed into a new tensor, while AccumulateGrad kept the other
        # slices as the other parameters' .grad (views): the dead slices stayed allocated until
        # zero_grad, through the encoder's backward where the step peaks (2 x 64 KiB per layer
        # at dim 128, and the out_proj biases; bench/memory_dtl.py).
        lin_v = [self.inter_vi.q_proj] + [m.q_proj for m in same_kv] + [m.k_proj for m in same_kv] \
            + [m.v_proj for m in same_kv] + [self.inter_iv.k_proj, self.inter_iv.v_proj]
        sizes_v = [1, n, n, n, 1, 1]
        lin_i = [self.inter_iv.q_proj, self.intra_i.q_proj, self.intra_i.k_proj, self.intra_i.v_proj,
                 self.inter_vi.k_proj, self.inter_vi.v_proj]
        pv = iter(_head_groups(_linear_group(h_v, lin_v), sizes_v, H, d))
        pi = iter(_split_heads(_linear_group(h_i, lin_i), len(lin_i), H, d))
        q_vi, q_vv, k_vv, v_vv = next(pv), next(pv), next(pv), next(pv)
        k_iv, v_iv = next(pv), next(pv)
        q_iv, q_ii, k_ii, v_ii = next(pi), next(pi), next(pi), next(pi)
        k_vi, v_vi = next(pi), next(pi)
        outs_i = [_attn_op(self.inter_iv, q_iv, k_iv, v_iv, L_v), _attn_op(self.intra_i, q_ii, k_ii, v_ii, L_i)]
        mods_i = [self.inter_iv, self.intra_i]
        outs_v = [_attn_op(self.inter_vi, q_vi, k_vi, v_vi, L_i)]
        outs_v += _stacked_attn_op(same_kv, q_vv, k_vv, v_vv, L_v)  # one call over 2H heads
        mods_v = [self.inter_vi] + same_kv
        m_i = m_v = None
        if lt is not None:
            # memory only: the module once over both token sets side by side (its q_proj and
            # out_proj are one GEMM each, outside the grouped GEMMs: see lin_v above)
            m = lt(torch.cat([h_i, h_v], dim=1))
            m_i, m_v = m[:, :Ni], m[:, Ni:]
        return _out_group(outs_i, mods_i), _out_group(outs_v, mods_v), m_i, m_v

    def forward(self, x_i, x_v, L_i=None, L_v=None):
        if use_grouped(self):
            s_i, s_v, m_i, m_v = self.branches_stacked(x_i, x_v, L_i, L_v)
            c_i, c_v = self.compose_i.forward_stacked(s_i, m_i), self.compose_v.forward_stacked(s_v, m_v)
        else:
            b_i, b_v = self.branches(x_i, x_v, L_i, L_v)
            c_i, c_v = self.compose_i(b_i), self.compose_v(b_v)
        x_i = x_i + self.drop(c_i)
        x_v = x_v + self.drop(c_v)
        if self.mlp_i is not None:
            x_i = x_i + self.drop(self.mlp_i(self.mlp_norm_i(x_i)))
            x_v = x_v + self.drop(self.mlp_v(self.mlp_norm_v(x_v)))
        return x_i, x_v


class DualModalAttention(_BackendMixin, nn.Module):
    r"""The DAM stack of DTL: num_layers DAMLayer levels (inter, intra, composition,
    short-term and long-term memory attention; see DAMLayer for each equation) over image
    tokens x_i [B, Ni, dim] and video tokens x_v [B, Nv, dim], with a hierarchical summary:

        (x_i^l, x_v^l) = DAMLayer_l(x_i^{l-1}, x_v^{l-1}),   l = 1..num_layers
        s_l = (sum_{n < L_i} x_i^l[n] + sum_{n < L_v} x_v^l[n]) / max(L_i + L_v, 1)
                                            (masked mean over the valid tokens of both modalities)
        summary   = LN_s(sum_l softmax(beta)_l s_l)      (beta [num_layers] learned, init 0)
        image_out = LN_i(x_i^L),  video_out = LN_v(x_v^L),  zero at padded positions

    A sample with no valid token in one modality (length 0) is fine: the other modality's
    cross attention to it gives zeros and the summary averages the other modality; with both
    empty the summary is LN_s(0) = LN_s's bias. Never NaN.

    Args:
        dim: token width of both modalities (bring them there first, e.g. with FeatureExchange).
        num_heads: heads of every attention; dim % num_heads == 0, dim / num_heads <= 128.
        num_layers: levels >= 1.
        window: w >= 0, the short-term memory: each video frame attends to frames within w
            steps, before and after it (symmetric: the article's short-term memory recalls past
            events; a causal window is not built); None drops the short-term branch.
        num_memory: M >= 0 learned long-term memory slots; 0 drops the long-term branch.
        mlp_ratio: hidden width of the per-layer MLP in units of dim; 0 drops the MLP.
        dropout: on the attended values, the residual branches and the MLP hidden layer.
        bias: biases in every linear map.
        backend: "auto" | "fused" | "reference" | None; assign `.backend` later to switch the
            whole stack.
        device, dtype: factory arguments.

    forward(image_tokens [B, Ni, dim], video_tokens [B, Nv, dim], image_lengths=None,
            video_lengths=None) -> (image_out [B, Ni, dim], video_out [B, Nv, dim], summary [B, dim]).
        Lengths: None or [B] integers in [0, Ni] / [0, Nv] (list, NumPy or integer tensor on
        the CPU or the inputs' device). Inputs share dtype and device; float32 / float64 /
        float16 / bfloat16, the module's parameter dtype (under torch.autocast any but float64).
    """

    def __init__(self, dim: int, num_heads: int, num_layers: int = 2, window: int | None = 2,
                 num_memory: int = 0, mlp_ratio: float = 2.0, dropout: float = 0.0, bias: bool = True,
                 backend: str | None = None, device=None, dtype=None):
        super().__init__()
        owner = type(self).__name__
        _check_heads(owner, "dim", dim, num_heads)
        _check_int(owner, "num_layers", num_layers)
        _check_int(owner, "window", window, minimum=0, allow_none=True)
        _check_int(owner, "num_memory", num_memory, minimum=0)
        _check_dropout(owner, dropout)
        if not isinstance(mlp_ratio, numbers.Real) or isinstance(mlp_ratio, bool) or mlp_ratio < 0:
            raise ValueError(f"{owner}: mlp_ratio must be a number >= 0, got {mlp_ratio!r}")
        factory = {"device": device, "dtype": dtype}
        self.dim, self.num_heads, self.num_layers = int(dim), int(num_heads), int(num_layers)
        self.window = None if window is None else int(window)
        self.num_memory = int(num_memory)
        self.layers = nn.ModuleList(
            DAMLayer(self.dim, self.num_heads, self.window, self.num_memory, mlp_ratio, dropout, bias, **factory)
            for _ in range(self.num_layers))
        self.level_logits = nn.Parameter(torch.zeros(self.num_layers, **factory))
        self.norm_i = nn.LayerNorm(self.dim, **factory)
        self.norm_v = nn.LayerNorm(self.dim, **factory)
        self.norm_summary = nn.LayerNorm(self.dim, **factory)
        self.backend = backend

    def forward(self, image_tokens: torch.Tensor, video_tokens: torch.Tensor, image_lengths=None,
                video_lengths=None):
        owner = type(self).__name__
        x_i, x_v = image_tokens, video_tokens
        _check_tokens(owner, "image_tokens", x_i, self.dim, "dim")
        _check_tokens(owner, "video_tokens", x_v, self.dim, "dim")
        _check_same(owner, "video_tokens", x_v, "image_tokens", x_i)
        _check_module_param(owner, "image_tokens", x_i, self.level_logits)
        if x_i.shape[0] != x_v.shape[0]:
            raise ValueError(f"{owner}: image_tokens and video_tokens must have the same batch size, "
                             f"got {x_i.shape[0]} and {x_v.shape[0]}")
        L_i = _lengths(owner, "image_lengths", image_lengths, x_i, x_i.shape[1], "image_tokens")
        L_v = _lengths(owner, "video_lengths", video_lengths, x_v, x_v.shape[1], "video_tokens")
        return self._run(x_i, x_v, L_i, L_v)

    def _run(self, x_i, x_v, L_i, L_v):
        """forward without argument checks (lengths None, _Lengths or checked int64 tensors)."""
        L_i, L_v = _as_checked(L_i), _as_checked(L_v)
        mask_i, mask_v = _valid_mask(L_i, x_i), _valid_mask(L_v, x_v)
        B, Ni, Nv = x_i.shape[0], x_i.shape[1], x_v.shape[1]
        # Half inputs are pooled in float32 (the counts, too, are not exact in bfloat16).
        acc = torch.float32 if x_i.dtype in (torch.float16, torch.bfloat16) else x_i.dtype
        if L_i is None and L_v is None:
            count = torch.full((B, 1), max(Ni + Nv, 1), dtype=acc, device=x_i.device)
        else:
            n_i = L_i.dev if L_i is not None else torch.full((B,), Ni, dtype=torch.int64, device=x_i.device)
            n_v = L_v.dev if L_v is not None else torch.full((B,), Nv, dtype=torch.int64, device=x_i.device)
            count = (n_i + n_v).clamp(min=1).to(acc)[:, None]
        weights = torch.softmax(self.level_logits.to(acc), dim=0)
        summary = None
        for level, layer in enumerate(self.layers):
            x_i, x_v = layer(x_i, x_v, L_i, L_v)
            total = (_zero_padding(x_i, mask_i).sum(1, dtype=acc)
                     + _zero_padding(x_v, mask_v).sum(1, dtype=acc))
            s = weights[level] * (total / count)
            summary = s if summary is None else summary + s
        image_out = _zero_padding(self.norm_i(x_i), mask_i)
        video_out = _zero_padding(self.norm_v(x_v), mask_v)
        return image_out, video_out, self.norm_summary(summary.to(x_i.dtype))

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_heads={self.num_heads}, num_layers={self.num_layers}, "
                f"window={self.window}, num_memory={self.num_memory}")
