"""CosineAttention, FeatureExchange and DualModalAttention (dtl_fast.nn.attention): each module
with the fused backend against the same weights with the reference backend (outputs and every
gradient), the module semantics against hand-written eager code, padding invariance, empty
modalities, backend propagation, torch.compile and bad input."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

from dtl_fast.nn import attention as attn_mod
from dtl_fast.nn.attention import CosineAttention, DAMLayer, DualModalAttention, FeatureExchange

from _helpers import REL_TOL, assert_half_close, assert_rel_close, rel_err

TOL = 1e-5  # float32 fused module vs float64 reference module (the task's bound)


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def randomize_(module, seed=1):
    """Every parameter random (not its init), so zero-initialised paths (level weights, biases)
    are exercised and every gradient is non-trivial; scales like a trained model's (matrices
    ~ 1/sqrt(fan_in), LayerNorm gains ~ 1, logit scales in [1, 3])."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            r = torch.randn(p.shape, generator=g, dtype=torch.float64)
            if name.endswith("logit_scale"):
                r = torch.rand(p.shape, generator=g, dtype=torch.float64) * 2.0 + 1.0
            elif p.dim() == 2:
                r = r / math.sqrt(p.shape[1])
            elif ".norm" in f".{name}" or "norm_" in name:
                r = (1.0 + 0.2 * r) if name.endswith("weight") else 0.2 * r
            else:
                r = 0.5 * r
            p.copy_(r)
    return module


def run(module, inputs, grads, fn=None, **kwargs):
    """Runs module (or fn, a function of module's parameters) on fresh leaf copies of inputs
    and backpropagates grads; returns (outputs tuple, input grads, {parameter name: grad})."""
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    module.zero_grad(set_to_none=True)
    out = (module if fn is None else fn)(*leaves, **kwargs)
    outs = out if isinstance(out, tuple) else (out,)
    torch.autograd.backward(list(outs), [g.to(o.dtype) for o, g in zip(outs, grads)])
    return (tuple(o.detach() for o in outs), [x.grad for x in leaves],
            {n: p.grad for n, p in module.named_parameters()})


def output_grads(module, inputs, **kwargs):
    """Random gradients shaped like the module's outputs."""
    with torch.no_grad():
        out = module(*inputs, **kwargs)
    return [torch.randn_like(o) for o in (out if isinstance(out, tuple) else (out,))]


def _param_err(g, r, scale):
    """Relative error of one parameter gradient; a gradient that is exactly zero in the
    function (e.g. the query projection under window 0 without memory: each query sees only
    itself) is measured against `scale`, the norm of all parameter gradients together."""
    if r.double().norm() <= 1e-12 * scale:
        return (g.double() - r.double()).norm().item() / scale
    return rel_err(g, r)


def assert_same_results(name, got, want, tol, param_tol=None):
    """got / want: results of run(). Every output and input gradient within tol; every
    parameter gradient within param_tol(name) (default tol)."""
    (out, gin, gp), (r_out, r_gin, r_gp) = got, want
    assert len(out) == len(r_out)
    for i, (o, r) in enumerate(zip(out, r_out)):
        assert_rel_close(f"{name}: output {i}", o, r, tol)
    for i, (g, r) in enumerate(zip(gin, r_gin)):
        assert g is not None and r is not None, f"{name}: input {i} got no gradient"
        assert_rel_close(f"{name}: grad of input {i}", g, r, tol)
    assert gp.keys() == r_gp.keys()
    missing = [p for p in r_gp if r_gp[p] is None or gp[p] is None]
    assert not missing, f"{name}: no gradient for {missing}"
    scale = torch.cat([r.double().flatten() for r in r_gp.values()]).norm().item()
    for pname, r in r_gp.items():
        g = gp[pname]
        assert torch.isfinite(g).all(), f"{name}: grad of {pname} is not finite"
        err, limit = _param_err(g, r, scale), (param_tol(pname) if param_tol else tol)
        assert err <= limit, f"{name}: grad of {pname}: relative error {err:.3e} > {limit:.1e}"


def assert_fused_matches_reference(module, inputs, poison, dtype=torch.float64, **kwargs):
    """A copy of module with backend "fused" against a float64 copy of the same weights with
    backend "reference": outputs, input grads and every parameter grad.

    float64: the same function to 1e-10 everywhere.
    float32: outputs and input grads within TOL (1e-5). A parameter gradient can be worse
    conditioned than that in float32 whatever computes it (logit_scale and key biases sum many
    cancelling terms; the eager reference in float32 is off by up to ~2e-5 on some), so each
    must be within TOL, or within 10x the float32 reference module's own error, and all of
    them together (one vector) within TOL."""
    ref = copy.deepcopy(module).double().set_backend("reference")
    x64 = [x.double() for x in inputs]
    grads = output_grads(ref, x64, **kwargs)
    want = run(ref, x64, grads, **kwargs)
    fused = copy.deepcopy(module).to(dtype).set_backend("fused")
    with poison():
        got = run(fused, [x.to(dtype) for x in inputs], [g.to(dtype) for g in grads], **kwargs)
    if dtype == torch.float64:
        assert_same_results("fused vs reference (float64)", got, want, 1e-10)
        return
    ref32 = copy.deepcopy(module).to(dtype).set_backend("reference")
    base = run(ref32, [x.to(dtype) for x in inputs], [g.to(dtype) for g in grads], **kwargs)
    scale = torch.cat([r.double().flatten() for r in want[2].values()]).norm().item()

    def param_tol(pname):
        return max(TOL, 10 * _param_err(base[2][pname], want[2][pname], scale))

    assert_same_results(f"fused vs reference ({dtype})", got, want, TOL, param_tol)
    flat = torch.cat([g.double().flatten() for g in got[2].values()])
    flat_ref = torch.cat([r.double().flatten() for r in want[2].values()])
    assert_rel_close("all parameter grads", flat, flat_ref, TOL)


def eager_cosine_attention(q, k, v, logit_scale, key_lengths=None, window=None, mem_k=None, mem_v=None):
    """The op's semantics written out densely: [B, H, Nq, d] x [B, H, Nk, d] -> [B, H, Nq, dv]."""
    B, H, Nq, _ = q.shape
    Nk = k.shape[2]
    scale = logit_scale.clamp(max=math.log(100.0)).exp()[None, :, None, None]
    qn = q / q.norm(dim=-1, keepdim=True)
    keys, values = [k / k.norm(dim=-1, keepdim=True)], [v]
    allowed = torch.ones(B, H, Nq, Nk, dtype=torch.bool)
    if key_lengths is not None:
        allowed &= (torch.arange(Nk)[None, :] < torch.as_tensor(key_lengths)[:, None])[:, None, None, :]
    if window is not None:
        allowed &= (torch.arange(Nq)[:, None] - torch.arange(Nk)[None, :]).abs() <= window
    if mem_k is not None:
        M = mem_k.shape[1]
        keys.append((mem_k / mem_k.norm(dim=-1, keepdim=True))[None].expand(B, -1, -1, -1))
        values.append(mem_v[None].expand(B, -1, -1, -1))
        allowed = torch.cat([allowed, torch.ones(B, H, Nq, M, dtype=torch.bool)], dim=-1)
    s = scale * qn @ torch.cat(keys, 2).transpose(-1, -2)
    w = torch.softmax(s.masked_fill(~allowed, -math.inf), dim=-1).nan_to_num(0.0)  # empty rows: 0
    return w @ torch.cat(values, 2)


def eager_module(m: CosineAttention, query, key, value, key_lengths=None):
    """CosineAttention written out by hand: projections, eager_cosine_attention, out_proj."""
    H, d = m.num_heads, m.head_dim
    B, Nq, _ = query.shape

    def heads(x, lin):
        return lin(x).reshape(B, x.shape[1], H, d).permute(0, 2, 1, 3)

    o = eager_cosine_attention(heads(query, m.q_proj), heads(key, m.k_proj), heads(value, m.v_proj),
                               m.logit_scale, key_lengths, m.window, m.memory_k, m.memory_v)
    return m.out_proj(o.permute(0, 2, 1, 3).reshape(B, Nq, H * d))


# --------------------------------------------------------------------------------------------
# CosineAttention
# --------------------------------------------------------------------------------------------
CA_CASES = [
    # (B, Nq, Nk, embed_dim, kdim, vdim, window, num_memory, key_lengths, self_attention)
    (2, 5, 5, 16, None, None, None, 0, None, True),
    (2, 7, 7, 16, None, None, 1, 0, [7, 4], True),
    (2, 6, 6, 16, None, None, 0, 3, [0, 6], True),
    (2, 4, 9, 16, 12, 20, None, 2, [9, 0], False),
    (1, 3, 1, 24, 8, 8, None, 2, None, False),
    (2, 5, 8, 12, None, None, 20, 1, [3, 8], False),
]
# A single key and no memory: weight 1 whatever q is, so dL/dquery is exactly 0 and a relative
# error against it is meaningless in float32 (the eager test below still runs it, in float64).
CA_CASES_EAGER = CA_CASES + [(1, 3, 1, 24, 8, 8, None, 0, None, False)]


@pytest.mark.parametrize("case", CA_CASES_EAGER, ids=[f"case{i}" for i in range(len(CA_CASES_EAGER))])
def test_cosine_attention_matches_hand_written_eager(case):
    B, Nq, Nk, E, kdim, vdim, window, M, lengths, self_attn = case
    m = randomize_(CosineAttention(E, 2, kdim, vdim, window=window, num_memory=M, backend="reference",
                                   dtype=torch.float64))
    q = torch.randn(B, Nq, E, dtype=torch.float64)
    args = [q] if self_attn else [q, torch.randn(B, Nk, m.kdim, dtype=torch.float64),
                                  torch.randn(B, Nk, m.vdim, dtype=torch.float64)]
    grads = [torch.randn(B, Nq, E, dtype=torch.float64)]

    def eager(query, key=None, value=None, key_lengths=None):
        key = query if key is None else key
        return eager_module(m, query, key, key if value is None else value, key_lengths)

    got = run(m, args, grads, key_lengths=lengths)
    want = run(m, args, grads, fn=eager, key_lengths=lengths)
    assert_same_results("reference module vs eager", got, want, 1e-12)
    if M == 0:
        assert m.memory_k is None and m.memory_v is None
    else:
        assert got[2]["memory_k"].abs().sum() > 0 and got[2]["memory_v"].abs().sum() > 0


# float64 on every case, float32 on those with lengths, window or memory.
CA_FUSED = [pytest.param(torch.float64, c, id=f"f64-case{i}") for i, c in enumerate(CA_CASES)] + [
    pytest.param(torch.float32, CA_CASES[i], id=f"f32-case{i}") for i in (1, 3, 5)]


@pytest.mark.parametrize("dtype, case", CA_FUSED)
def test_cosine_attention_fused_matches_reference(dtype, case, poison):
    B, Nq, Nk, E, kdim, vdim, window, M, lengths, self_attn = case
    m = randomize_(CosineAttention(E, 2, kdim, vdim, window=window, num_memory=M))
    q = torch.randn(B, Nq, E)
    args = [q] if self_attn else [q, torch.randn(B, Nk, m.kdim), torch.randn(B, Nk, m.vdim)]
    assert_fused_matches_reference(m, args, poison, dtype, key_lengths=lengths)


def test_cosine_attention_layout_and_defaults():
    m = randomize_(CosineAttention(16, 2, backend="reference", dtype=torch.float64))
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    y = torch.randn(2, 7, 16, dtype=torch.float64)
    # key / value default to query (self-attention), value to key.
    assert torch.equal(m(x), m(x, x, x))
    assert torch.equal(m(x, y), m(x, y, y))
    # batch_first=False takes and returns [N, B, C], same weights, same numbers.
    m_sf = copy.deepcopy(m)
    m_sf.batch_first = False
    out = m_sf(x.transpose(0, 1), y.transpose(0, 1), y.transpose(0, 1), key_lengths=[3, 7])
    assert_rel_close("batch_first=False", out.transpose(0, 1), m(x, y, y, key_lengths=[3, 7]), 1e-14)
    fresh = CosineAttention(16, 4)
    assert torch.allclose(fresh.logit_scale, torch.full((4,), math.log(10.0)))
    assert fresh.head_dim == 4 and fresh.memory_k is None


def test_cosine_attention_window_memory_and_lengths_effects():
    m = randomize_(CosineAttention(16, 2, window=0, backend="reference", dtype=torch.float64))
    x = torch.randn(2, 6, 16, dtype=torch.float64)
    # window 0, no memory: every query sees only itself, with weight 1.
    assert_rel_close("window 0", m(x), m.out_proj(m.v_proj(x)), 1e-12)
    # a window at least N - 1 is global attention.
    glob = copy.deepcopy(m)
    glob.window = None
    wide = copy.deepcopy(m)
    wide.window = 5
    assert_rel_close("window N-1", wide(x), glob(x), 1e-12)
    assert rel_err(m(x), glob(x)) > 1e-3
    # keys past key_lengths: changing them changes nothing; lengths == N is no lengths.
    y = torch.randn(2, 8, 16, dtype=torch.float64)
    y2 = y.clone()
    y2[0, 5:] = 100 * torch.randn(3, 16, dtype=torch.float64)
    y2[1, 2:] = torch.randn(6, 16, dtype=torch.float64)
    lengths = torch.tensor([5, 2])
    assert_rel_close("padded keys", glob(x, y2, key_lengths=lengths), glob(x, y, key_lengths=lengths), 1e-13)
    assert_rel_close("full lengths", glob(x, y, key_lengths=[8, 8]), glob(x, y), 1e-14)
    # key length 0 without memory: the attended value is 0, so the output is the out-proj bias.
    out = glob(x, y, key_lengths=[0, 8])
    assert_rel_close("empty row", out[0], m.out_proj.bias.expand(6, 16), 1e-14)
    # with memory slots an empty row attends to the slots alone (softmax over them).
    mem = randomize_(CosineAttention(16, 2, num_memory=3, backend="reference", dtype=torch.float64), seed=3)
    out = mem(x, y, key_lengths=[0, 8])
    q = mem.q_proj(x[0]).reshape(6, 2, 8).transpose(0, 1)
    s = (F.normalize(q, dim=-1) @ F.normalize(mem.memory_k, dim=-1).transpose(-1, -2)
         * mem.logit_scale.clamp(max=math.log(100.0)).exp()[:, None, None])
    o = (torch.softmax(s, -1) @ mem.memory_v).transpose(0, 1).reshape(6, 16)
    assert_rel_close("memory only", out[0], mem.out_proj(o), 1e-12)
    assert torch.isfinite(out).all()


def test_cosine_attention_dropout_is_on_attended_values():
    m = CosineAttention(16, 2, dropout=0.5, backend="reference")
    x = torch.randn(2, 5, 16)
    m.train()
    torch.manual_seed(3)
    out = m(x)
    torch.manual_seed(3)
    q, k, v = (lin(x).view(2, 5, 2, 8).transpose(1, 2) for lin in (m.q_proj, m.k_proj, m.v_proj))
    o = attn_mod.cosine_attention(q, k, v, m.logit_scale, backend="reference")
    expect = m.out_proj(F.dropout(o.transpose(1, 2).reshape(2, 5, 16), 0.5, training=True))
    assert_rel_close("dropout", out, expect, 1e-6)
    m.eval()
    assert torch.equal(m(x), m(x))


# --------------------------------------------------------------------------------------------
# FeatureExchange
# --------------------------------------------------------------------------------------------
FE_CASES = [
    # (dim_a, dim_b, dim, Na, Nb, a_lengths, b_lengths)
    (12, 20, 16, 5, 7, [5, 2], [0, 7]),   # dim_a != dim_b != dim, an empty b
    (16, 16, 16, 6, 4, None, [3, 4]),     # equal widths: no projection
    (16, 8, 16, 3, 9, [0, 3], None),      # one projection
]


@pytest.mark.parametrize("case", FE_CASES, ids=["unequal", "equal", "one-projected"])
def test_feature_exchange_equations(case):
    dim_a, dim_b, dim, Na, Nb, la, lb = case
    fe = randomize_(FeatureExchange(dim_a, dim_b, dim, 2, backend="reference", dtype=torch.float64))
    assert isinstance(fe.proj_a, torch.nn.Identity) == (dim_a == dim)
    assert isinstance(fe.proj_b, torch.nn.Identity) == (dim_b == dim)
    a = torch.randn(2, Na, dim_a, dtype=torch.float64)
    b = torch.randn(2, Nb, dim_b, dtype=torch.float64)
    a_out, b_out, (g_a, g_b) = fe(a, b, la, lb, return_gates=True)
    assert a_out.shape == (2, Na, dim) and b_out.shape == (2, Nb, dim)
    assert g_a.shape == (2, Na, dim) and g_b.shape == (2, Nb, dim)
    assert ((g_a >= 0) & (g_a <= 1)).all() and ((g_b >= 0) & (g_b <= 1)).all()
    assert g_a.std() > 0.05  # random weights: the gate is not stuck

    # The equations of the docstring, by hand.
    ap = fe.proj_a(a)
    bp = fe.proj_b(b)
    c_a = eager_module(fe.attn_ab, ap, bp, bp, lb)
    c_b = eager_module(fe.attn_ba, bp, ap, ap, la)
    ga = torch.sigmoid(fe.gate_a(torch.cat([ap, c_a], -1)))
    gb = torch.sigmoid(fe.gate_b(torch.cat([bp, c_b], -1)))
    va = torch.arange(Na)[None, :, None] < torch.as_tensor(la if la is not None else [Na, Na])[:, None, None]
    vb = torch.arange(Nb)[None, :, None] < torch.as_tensor(lb if lb is not None else [Nb, Nb])[:, None, None]
    assert_rel_close("gate a", g_a, ga, 1e-12)
    assert_rel_close("a_out", a_out, (ap + ga * c_a) * va, 1e-12)
    assert_rel_close("b_out", b_out, (bp + gb * c_b) * vb, 1e-12)
    assert torch.equal(fe(a, b, la, lb)[0], a_out)


@pytest.mark.parametrize("dtype, case", [
    pytest.param(torch.float64, c, id=f"f64-{i}") for c, i in zip(FE_CASES, ["unequal", "equal", "one-projected"])
] + [pytest.param(torch.float32, FE_CASES[0], id="f32-unequal")])
def test_feature_exchange_fused_matches_reference(dtype, case, poison):
    dim_a, dim_b, dim, Na, Nb, la, lb = case
    fe = randomize_(FeatureExchange(dim_a, dim_b, dim, 2))
    assert_fused_matches_reference(fe, [torch.randn(2, Na, dim_a), torch.randn(2, Nb, dim_b)], poison, dtype,
                                   a_lengths=la, b_lengths=lb)


def test_feature_exchange_padding_does_not_leak():
    fe = randomize_(FeatureExchange(12, 20, 16, 2, backend="reference", dtype=torch.float64))
    la, lb = torch.tensor([4, 0]), torch.tensor([2, 6])
    a = torch.randn(2, 5, 12, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, 6, 20, dtype=torch.float64, requires_grad=True)
    a_out, b_out = fe(a, b, la, lb)
    (a_out * torch.randn_like(a_out)).sum().backward(inputs=[a, b])
    a2, b2 = a.detach().clone(), b.detach().clone()
    a2[0, 4:] = 1e4 * torch.randn(1, 12, dtype=torch.float64)
    a2[1] = torch.randn(5, 12, dtype=torch.float64)
    b2[0, 2:] = -1e4
    a_out2, b_out2 = fe(a2, b2, la, lb)
    assert_rel_close("a_out", a_out2, a_out, 1e-12)
    assert_rel_close("b_out", b_out2, b_out, 1e-12)
    assert (a_out[0, 4:] == 0).all() and (a_out[1] == 0).all() and (b_out[0, 2:] == 0).all()
    assert (a.grad[0, 4:] == 0).all() and (a.grad[1] == 0).all() and (b.grad[0, 2:] == 0).all()
    assert torch.isfinite(a.grad).all() and torch.isfinite(b.grad).all()


# --------------------------------------------------------------------------------------------
# DualModalAttention
# --------------------------------------------------------------------------------------------
def eager_dam(dam: DualModalAttention, x_i, x_v, L_i=None, L_v=None):
    """The DAM equations of the docstrings written out with eager_cosine_attention."""
    B, Ni, Nv = x_i.shape[0], x_i.shape[1], x_v.shape[1]
    L_i = torch.full((B,), Ni) if L_i is None else torch.as_tensor(L_i)
    L_v = torch.full((B,), Nv) if L_v is None else torch.as_tensor(L_v)
    m_i = (torch.arange(Ni)[None, :] < L_i[:, None])[..., None].to(x_i.dtype)
    m_v = (torch.arange(Nv)[None, :] < L_v[:, None])[..., None].to(x_i.dtype)

    def memory(mem, h):
        H, d = mem.num_heads, mem.head_dim
        q = mem.q_proj(h).reshape(B, h.shape[1], H, d).permute(0, 2, 1, 3)
        empty = q[:, :, :0]
        o = eager_cosine_attention(q, empty, empty, mem.logit_scale, None, None, mem.memory_k, mem.memory_v)
        return mem.out_proj(o.permute(0, 2, 1, 3).reshape(B, h.shape[1], H * d))

    def compose(comp, branches):
        alpha = torch.softmax(comp.score(torch.cat(branches, -1)), -1)
        return sum(alpha[..., k:k + 1] * o for k, o in enumerate(branches))

    summaries = []
    for layer in dam.layers:
        h_i, h_v = layer.norm_i(x_i), layer.norm_v(x_v)
        b_i = [eager_module(layer.inter_iv, h_i, h_v, h_v, L_v), eager_module(layer.intra_i, h_i, h_i, h_i, L_i)]
        b_v = [eager_module(layer.inter_vi, h_v, h_i, h_i, L_i), eager_module(layer.intra_v, h_v, h_v, h_v, L_v)]
        if layer.short_term is not None:
            b_v.append(eager_module(layer.short_term, h_v, h_v, h_v, L_v))
        if layer.long_term is not None:
            b_i.append(memory(layer.long_term, h_i))
            b_v.append(memory(layer.long_term, h_v))
        x_i = x_i + compose(layer.compose_i, b_i)
        x_v = x_v + compose(layer.compose_v, b_v)
        if layer.mlp_i is not None:
            x_i = x_i + layer.mlp_i(layer.mlp_norm_i(x_i))
            x_v = x_v + layer.mlp_v(layer.mlp_norm_v(x_v))
        total = (x_i * m_i).sum(1) + (x_v * m_v).sum(1)
        summaries.append(total / (L_i + L_v).clamp(min=1)[:, None].to(x_i.dtype))
    w = torch.softmax(dam.level_logits, 0)
    summary = dam.norm_summary(sum(w[l] * s for l, s in enumerate(summaries)))
    return dam.norm_i(x_i) * m_i, dam.norm_v(x_v) * m_v, summary


DAM_CASES = [
    # (num_layers, window, num_memory, mlp_ratio, Ni, Nv, image_lengths, video_lengths)
    (1, 0, 0, 2.0, 4, 6, [0, 4], [0, 3]),     # window 0, no memory; a sample with nothing
    (2, 1, 3, 2.0, 5, 7, [5, 0], [3, 7]),     # an image-less sample
    (1, 20, 2, 0.0, 3, 8, [2, 3], [0, 5]),    # window > N, a video-less sample, no MLP
    (1, None, 0, 1.0, 4, 5, None, None),      # no short-term branch, no lengths
]
DAM_IDS = ["1layer-w0-empty", "2layers-mem", "w>N-nomlp", "nowindow"]
# The fused module in float64 (the same function to 1e-10) or float32 (TOL) on the cases with
# lengths: the interpreter is slow, and the op's own tests cover float32 widely (no lengths:
# the CosineAttention cases).
DAM_FUSED = [pytest.param(torch.float64, DAM_CASES[0], id=f"f64-{DAM_IDS[0]}"),
             pytest.param(torch.float64, DAM_CASES[1], id=f"f64-{DAM_IDS[1]}"),
             pytest.param(torch.float32, DAM_CASES[2], id=f"f32-{DAM_IDS[2]}")]


@pytest.mark.parametrize("case", DAM_CASES, ids=DAM_IDS)
def test_dam_matches_equations(case):
    layers, window, M, mlp, Ni, Nv, li, lv = case
    dam = randomize_(DualModalAttention(16, 2, layers, window, M, mlp_ratio=mlp, backend="reference",
                                        dtype=torch.float64))
    x_i = torch.randn(2, Ni, 16, dtype=torch.float64)
    x_v = torch.randn(2, Nv, 16, dtype=torch.float64)
    grads = output_grads(dam, [x_i, x_v], image_lengths=li, video_lengths=lv)
    got = run(dam, [x_i, x_v], grads, image_lengths=li, video_lengths=lv)
    want = run(dam, [x_i, x_v], grads, fn=lambda a, b, image_lengths, video_lengths:
               eager_dam(dam, a, b, image_lengths, video_lengths), image_lengths=li, video_lengths=lv)
    assert_same_results("DAM vs its equations", got, want, 1e-12)
    image_out, video_out, summary = got[0]
    assert image_out.shape == (2, Ni, 16) and video_out.shape == (2, Nv, 16) and summary.shape == (2, 16)
    assert all(torch.isfinite(t).all() for t in (*got[0], *got[1], *got[2].values()))
    n_branch_v = 2 + (window is not None) + (M > 0)
    assert dam.layers[0].compose_v.num_branches == n_branch_v
    assert dam.layers[0].compose_i.num_branches == 2 + (M > 0)
    if li is not None and lv is not None:
        for b in range(2):
            if li[b] == 0 and lv[b] == 0:  # nothing at all: LN of a zero summary is its bias
                assert_rel_close("empty summary", summary[b], dam.norm_summary.bias, 1e-14)


@pytest.mark.parametrize("dtype, case", DAM_FUSED)
def test_dam_fused_matches_reference(dtype, case, poison):
    layers, window, M, mlp, Ni, Nv, li, lv = case
    dam = randomize_(DualModalAttention(16, 2, layers, window, M, mlp_ratio=mlp))
    assert_fused_matches_reference(dam, [torch.randn(2, Ni, 16), torch.randn(2, Nv, 16)], poison, dtype,
                                   image_lengths=li, video_lengths=lv)


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_dam_padding_does_not_leak(backend):
    dam = randomize_(DualModalAttention(16, 2, 2, window=1, num_memory=2, backend=backend, dtype=torch.float64))
    li, lv = torch.tensor([3, 0]), torch.tensor([6, 2])
    x_i = torch.randn(2, 4, 16, dtype=torch.float64, requires_grad=True)
    x_v = torch.randn(2, 7, 16, dtype=torch.float64, requires_grad=True)
    outs = dam(x_i, x_v, li, lv)
    torch.autograd.backward(list(outs), [torch.randn_like(o) for o in outs], inputs=[x_i, x_v])
    y_i, y_v = x_i.detach().clone(), x_v.detach().clone()
    y_i[0, 3:] = 1e4 * torch.randn(1, 16, dtype=torch.float64)
    y_i[1] = torch.randn(4, 16, dtype=torch.float64) * 50
    y_v[0, 6:] = -3e3
    y_v[1, 2:] = torch.randn(5, 16, dtype=torch.float64)
    outs2 = dam(y_i, y_v, li, lv)
    for name, o2, o in zip(("image_out", "video_out", "summary"), outs2, outs):
        assert_rel_close(name, o2, o, 1e-12)
    image_out, video_out, _ = outs
    assert (image_out[0, 3:] == 0).all() and (image_out[1] == 0).all() and (video_out[1, 2:] == 0).all()
    assert (x_i.grad[0, 3:] == 0).all() and (x_i.grad[1] == 0).all() and (x_v.grad[1, 2:] == 0).all()
    assert torch.isfinite(x_i.grad).all() and torch.isfinite(x_v.grad).all()


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_non_finite_padding_does_not_reach_outputs(backend):
    """NaN / inf in padded tokens (the attention op's padded keys) leave every module's output
    as with finite padding: DAM (grouped under auto: stacked heads, per-head windows), the
    FeatureExchange (per-head key lengths when the directions stack) and a cross
    CosineAttention. Forward only: the padding's own weight gradients are NaN in every backend
    (see the module docstring)."""
    f64 = torch.float64
    li, lv = torch.tensor([3, 1]), torch.tensor([6, 2])
    x_i, x_v = torch.randn(2, 4, 16, dtype=f64), torch.randn(2, 7, 16, dtype=f64)
    valid_i = torch.arange(4)[None, :, None] < li[:, None, None]
    valid_v = torch.arange(7)[None, :, None] < lv[:, None, None]
    y_i = torch.where(valid_i, x_i, math.nan)
    y_v = torch.where(valid_v, x_v, -math.inf)
    y_v[0, 6, :3] = math.inf
    x_i, x_v = torch.where(valid_i, x_i, 0.0), torch.where(valid_v, x_v, 0.0)
    dam = randomize_(DualModalAttention(16, 2, 2, window=1, num_memory=2, backend=backend, dtype=f64))
    fe = randomize_(FeatureExchange(16, 16, 16, 2, backend=backend, dtype=f64), seed=2)
    ca = randomize_(CosineAttention(16, 2, window=2, backend=backend, dtype=f64), seed=3)
    calls = {
        "DAM": lambda a, b: dam(a, b, li, lv),
        "FeatureExchange": lambda a, b: fe(a, b[:, :4], li, torch.tensor([4, 2])),
        # finite queries: a padded query's own row is computed like any other (docstring)
        "CosineAttention": lambda a, b: (ca(x_i, b, key_lengths=lv),),
    }
    for module, call in calls.items():
        for i, (got, want) in enumerate(zip(call(y_i, y_v), call(x_i, x_v))):
            assert torch.isfinite(got).all(), f"{module} output {i} has NaN / inf"
            assert_rel_close(f"{module} output {i}", got, want, 1e-12)


def test_dam_lengths_forms_and_full_lengths():
    dam = randomize_(DualModalAttention(16, 2, 1, window=1, backend="reference", dtype=torch.float64))
    x_i, x_v = torch.randn(2, 3, 16, dtype=torch.float64), torch.randn(2, 5, 16, dtype=torch.float64)
    plain = dam(x_i, x_v)
    for li, lv in (([3, 3], [5, 5]), (torch.tensor([3, 3], dtype=torch.int32), None),
                   (None, __import__("numpy").array([5, 5]))):
        for o, p in zip(dam(x_i, x_v, li, lv), plain):
            assert_rel_close("full lengths", o, p, 1e-13)


def test_composition_weights_are_a_softmax():
    layer = randomize_(DAMLayer(16, 2, window=1, num_memory=2, backend="reference", dtype=torch.float64))
    x_i, x_v = torch.randn(2, 3, 16, dtype=torch.float64), torch.randn(2, 5, 16, dtype=torch.float64)
    b_i, b_v = layer.branches(x_i, x_v, None, None)
    assert len(b_i) == 3 and len(b_v) == 4
    _, alpha = layer.compose_v(b_v, return_weights=True)
    assert alpha.shape == (2, 5, 4)
    assert_rel_close("sum alpha", alpha.sum(-1), torch.ones(2, 5, dtype=torch.float64), 1e-14)
    assert alpha.std(dim=1).mean() > 1e-3  # input-dependent: differs across tokens


def test_dam_half_precision_is_finite_and_close():
    """A bfloat16 DAM (weights and inputs) within HALF_FACTOR x the error that rounding its
    weights and inputs to bfloat16 alone causes (the float64 module on the rounded values) +
    a unit roundoff: computing in bfloat16 may add rounding of the same order (measured
    1.2-1.9x), not lose the accumulation (float32 softmax / norms) or the masks."""
    dam = randomize_(DualModalAttention(16, 2, 2, window=1, num_memory=2, backend="reference"))
    x_i, x_v = torch.randn(2, 3, 16), torch.randn(2, 5, 16)
    ref = copy.deepcopy(dam).double()(x_i.double(), x_v.double(), [3, 1], [0, 5])
    out = copy.deepcopy(dam).bfloat16()(x_i.bfloat16(), x_v.bfloat16(), [3, 1], [0, 5])
    rounded = copy.deepcopy(dam).bfloat16().double()(x_i.bfloat16().double(), x_v.bfloat16().double(),
                                                     [3, 1], [0, 5])
    for i, (o, r, b) in enumerate(zip(out, ref, rounded)):
        assert o.dtype == torch.bfloat16
        assert_half_close(f"bf16 DAM output {i}", o, r, b, torch.bfloat16)


def test_dam_under_autocast():
    """AMP: float32 parameters and inputs under torch.autocast(bfloat16) run (the op casts q, k,
    v and the memory slots to the autocast dtype), stay finite and as near float32 as the same
    model run wholly in bfloat16 is (assert_half_close; autocast measured at 0.8-1.2x its error)."""
    fe = randomize_(FeatureExchange(8, 12, 16, 2, backend="reference"))
    dam = randomize_(DualModalAttention(16, 2, 1, window=1, num_memory=2, backend="reference"), seed=2)
    a, b = torch.randn(2, 3, 8), torch.randn(2, 4, 12)

    def model():
        x_i, x_v = fe(a, b, [3, 0], None)
        return dam(x_i, x_v, [3, 0], None)

    want = model()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = model()
    fe16, dam16 = copy.deepcopy(fe).bfloat16(), copy.deepcopy(dam).bfloat16()
    with torch.no_grad():
        x_i, x_v = fe16(a.bfloat16(), b.bfloat16(), [3, 0], None)
        base = dam16(x_i, x_v, [3, 0], None)
    sum(o.float().square().sum() for o in got).backward()
    for i, (o, w, r) in enumerate(zip(got, want, base)):
        assert_half_close(f"autocast output {i}", o.float(), w, r, torch.bfloat16)
    assert all(torch.isfinite(p.grad).all() for p in dam.parameters())


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_inputs_of_another_dtype_run_under_autocast(backend):
    """Under torch.autocast an input dtype other than the parameters' is what AMP runs (the
    projections cast both sides): no dtype error there for float32 modules given bfloat16
    inputs, nor for bfloat16 modules given float32 inputs (not DAM: torch's CPU LayerNorm
    refuses a float32 input with bfloat16 weights under autocast); outside autocast the same
    calls raise."""
    bf16 = torch.bfloat16
    a, b = torch.randn(2, 3, 16), torch.randn(2, 5, 16)
    for module_dtype, input_dtype in ((torch.float32, bf16), (bf16, torch.float32)):
        ca = CosineAttention(16, 2, window=1, backend=backend, dtype=module_dtype)
        fe = FeatureExchange(16, 16, 16, 2, backend=backend, dtype=module_dtype)
        dam = DualModalAttention(16, 2, 1, window=1, num_memory=2, backend=backend, dtype=module_dtype)
        x, y = a.to(input_dtype), b.to(input_dtype)
        calls = {"CosineAttention": lambda: (ca(x, y, key_lengths=[5, 2]),),
                 "FeatureExchange": lambda: fe(x, y, [3, 1], [5, 2])}
        if module_dtype == torch.float32:
            calls["DualModalAttention"] = lambda: dam(x, y, [3, 1], [5, 2])
        for name, call in calls.items():
            with torch.autocast("cpu", dtype=bf16):
                outs = call()
            assert all(torch.isfinite(o).all() for o in outs), name
            with pytest.raises(ValueError, match="must have the module's dtype"):
                call()


# --------------------------------------------------------------------------------------------
# backend switch, torch.compile
# --------------------------------------------------------------------------------------------
def test_backend_propagates_to_every_attention(monkeypatch):
    seen = []
    real = attn_mod.cosine_attention

    def spy(*args, backend=None, **kwargs):
        seen.append(backend)
        return real(*args, backend="reference", **kwargs)

    monkeypatch.setattr(attn_mod, "cosine_attention", spy)
    dam = DualModalAttention(16, 2, 2, window=1, num_memory=2)
    fe = FeatureExchange(8, 16, 16, 2, backend="reference")
    x_i, x_v = torch.randn(1, 3, 16), torch.randn(1, 4, 16)
    dam(x_i, x_v)
    # None: the op reads $DTL_FAST_BACKEND. Grouped form ("auto"): 5 op calls per layer (the
    # long-term memory of both modalities is one call, intra_v + short-term another)
    assert len(seen) == 2 * 5 and set(seen) == {None}
    seen.clear()
    assert dam.set_backend("fused") is dam
    dam.backend = "reference"
    assert all(m.backend == "reference" for m in dam.modules() if hasattr(m, "_backend"))
    dam(x_i, x_v)
    assert seen == ["reference"] * 14  # the simple form: one call per branch
    seen.clear()
    fe(torch.randn(1, 2, 8), x_v)
    assert seen == ["reference"] * 2
    with pytest.raises(ValueError, match="backend"):
        dam.backend = "cuda"
    with pytest.raises(ValueError, match="backend"):
        CosineAttention(16, 2, backend="fast")


def test_backend_from_environment(monkeypatch):
    m = CosineAttention(16, 2)
    x = torch.randn(1, 3, 16)
    monkeypatch.setenv("DTL_FAST_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="DTL_FAST_BACKEND"):
        m(x)
    monkeypatch.setenv("DTL_FAST_BACKEND", "reference")
    assert torch.isfinite(m(x)).all()


def _compile_case(window=1, num_memory=2):
    dam = randomize_(DualModalAttention(16, 2, 1, window=window, num_memory=num_memory, mlp_ratio=0.0))
    x_i, x_v = torch.randn(2, 3, 16), torch.randn(2, 5, 16)
    return dam, x_i, x_v, torch.tensor([3, 1]), torch.tensor([0, 5])


@pytest.mark.slow
def test_dam_torch_compile_fullgraph_reference():
    """One graph (fullgraph=True: no break on the lengths checks, the backend switch or the
    eager reference) that gives eager's outputs (the branches with window and memory are traced
    in the fused test: tracing the eager reference is slow)."""
    torch._dynamo.reset()
    dam, x_i, x_v, li, lv = _compile_case(window=None, num_memory=0)
    dam.backend = "reference"
    with torch.no_grad():
        eager = dam(x_i, x_v, li, lv)
        out = torch.compile(dam, fullgraph=True, backend="aot_eager")(x_i, x_v, li, lv)
    for name, o, e in zip(("image_out", "video_out", "summary"), out, eager):
        assert_rel_close(f"compiled {name}", o, e, REL_TOL[torch.float32])


@pytest.mark.slow
def test_dam_torch_compile_fullgraph_fused():
    """The same with the fused op and every branch (window, memory), forward and backward
    (training under torch.compile: the op's registered autograd and fake kernels): eager's
    outputs, input and parameter grads."""
    torch._dynamo.reset()
    dam, x_i, x_v, li, lv = _compile_case()
    dam.backend = "fused"
    grads = output_grads(dam, [x_i, x_v], image_lengths=li, video_lengths=lv)
    want = run(dam, [x_i, x_v], grads, image_lengths=li, video_lengths=lv)
    compiled = torch.compile(dam, fullgraph=True, backend="aot_eager")
    got = run(dam, [x_i, x_v], grads, fn=compiled, image_lengths=li, video_lengths=lv)
    assert_same_results("compiled vs eager", got, want, 1e-5)


# --------------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ctor, match", [
    (lambda: CosineAttention(30, 4), "divisible by num_heads"),
    (lambda: CosineAttention(258, 2), "head dim .* exceeds 128"),
    (lambda: CosineAttention(0, 2), "embed_dim"),
    (lambda: CosineAttention(16, 0), "num_heads"),
    (lambda: CosineAttention(16, 2, window=-1), "window"),
    (lambda: CosineAttention(16, 2, window=1.5), "window"),
    (lambda: CosineAttention(16, 2, num_memory=-2), "num_memory"),
    (lambda: CosineAttention(16, 2, kdim=0), "kdim"),
    (lambda: CosineAttention(16, 2, dropout=1.0), "dropout"),
    (lambda: FeatureExchange(8, 8, 30, 4), "divisible by num_heads"),
    (lambda: FeatureExchange(0, 8, 16, 2), "dim_a"),
    (lambda: FeatureExchange(8, 8, 512, 2), "exceeds 128"),
    (lambda: DualModalAttention(30, 4, 1, 1, 0), "divisible by num_heads"),
    (lambda: DualModalAttention(16, 2, 0, 1, 0), "num_layers"),
    (lambda: DualModalAttention(16, 2, 1, -1, 0), "window"),
    (lambda: DualModalAttention(16, 2, 1, 1, -1), "num_memory"),
    (lambda: DualModalAttention(16, 2, 1, 1, 0, mlp_ratio=-1), "mlp_ratio"),
    (lambda: DualModalAttention(512, 2, 1, 1, 0), "exceeds 128"),
])
def test_bad_construction(ctor, match):
    with pytest.raises(ValueError, match=match):
        ctor()


def test_bad_forward_input():
    m = CosineAttention(16, 2, kdim=8, vdim=12, backend="reference")
    q, k, v = torch.randn(2, 3, 16), torch.randn(2, 5, 8), torch.randn(2, 5, 12)
    cases = [
        (lambda: m(torch.randn(2, 3, 15), k, v), "query .*embed_dim = 16"),
        (lambda: m(q, torch.randn(2, 5, 16), v), "key .*kdim = 8"),
        (lambda: m(q, k, torch.randn(2, 5, 8)), "value .*vdim = 12"),
        (lambda: m(q, k, torch.randn(2, 4, 12)), "same number of tokens"),
        (lambda: m(q, torch.randn(3, 5, 8), torch.randn(3, 5, 12)), "same batch size"),
        (lambda: m(torch.randn(3, 16), k, v), "3-D"),
        (lambda: m(q.double(), k, v), "dtype"),
        (lambda: m(q.double(), k.double(), v.double()),
         r"query must have the module's dtype \(torch.float32\), got torch.float64"),
        (lambda: m(q.int(), k, v), "float32"),
        (lambda: m(q, k, v, key_lengths=[5, 6]), r"key_lengths\[b\] must lie in \[0, N\] = \[0, 5\]"),
        (lambda: m(q, k, v, key_lengths=[-1, 2]), "key_lengths"),
        (lambda: m(q, k, v, key_lengths=[1, 2, 3]), r"shape \[B\] = \[2\]"),
        (lambda: m(q, k, v, key_lengths=torch.tensor([1.0, 2.0])), "integer"),
        (lambda: m(q, k, v, key_lengths="12"), "key_lengths"),
    ]
    fe = FeatureExchange(8, 12, 16, 2, backend="reference")
    a, b = torch.randn(2, 3, 8), torch.randn(2, 4, 12)
    cases += [
        (lambda: fe(b, a), "a must have last dimension dim_a = 8"),
        (lambda: fe(a, torch.randn(3, 4, 12)), "same batch size"),
        (lambda: fe(a, b, a_lengths=[4, 0]), r"a_lengths\[b\] must lie in \[0, N\] = \[0, 3\]"),
        (lambda: fe(a, b, b_lengths=[0]), "b_lengths"),
        (lambda: fe(a.half(), b.half()), r"a must have the module's dtype \(torch.float32\)"),
    ]
    dam = DualModalAttention(16, 2, 1, 1, 2, backend="reference")
    x_i, x_v = torch.randn(2, 3, 16), torch.randn(2, 5, 16)
    cases += [
        (lambda: dam(x_i, torch.randn(2, 5, 8)), "video_tokens .*dim = 16"),
        (lambda: dam(x_i, torch.randn(1, 5, 16)), "same batch size"),
        (lambda: dam(x_i, x_v, [4, 0], None), r"image_lengths\[b\] must lie in \[0, N\] = \[0, 3\]"),
        (lambda: dam(x_i, x_v, None, [-1, 0]), "video_lengths"),
        (lambda: dam(x_i, x_v.double()), "dtype"),
        (lambda: dam(x_i.bfloat16(), x_v.bfloat16()),
         r"image_tokens must have the module's dtype \(torch.float32\), got torch.bfloat16"),
        (lambda: dam(x_i[0], x_v), "image_tokens must be a 3-D tensor"),
    ]
    for i, (call, match) in enumerate(cases):
        with pytest.raises(ValueError, match=match):
            call()
            pytest.fail(f"case {i} did not raise")


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_input_on_another_device_than_the_module(backend):
    # A ValueError naming the argument (torch's F.linear would say "Tensor on device cpu is not
    # on the expected device meta!"), both ways round; same device (meta included) runs.
    for dev, other in [("cpu", "meta"), ("meta", "cpu")]:
        ca = CosineAttention(16, 2, backend=backend, device=dev)
        fe = FeatureExchange(8, 16, 16, 2, backend=backend, device=dev)
        dam = DualModalAttention(16, 2, 1, 1, 2, backend=backend, device=dev)
        x = torch.randn(2, 3, 16, device=other)
        a = torch.randn(2, 3, 8, device=other)
        msg = rf"must be on the module's device \({dev}\), got {other}; move the input or the module"
        with pytest.raises(ValueError, match=rf"^CosineAttention: query {msg}"):
            ca(x)
        with pytest.raises(ValueError, match=rf"^CosineAttention: query {msg}"):
            CosineAttention(16, 2, backend=backend, device=dev, batch_first=False)(x, x, x)
        with pytest.raises(ValueError, match=rf"^FeatureExchange: a {msg}"):
            fe(a, x)
        with pytest.raises(ValueError, match=rf"^DualModalAttention: image_tokens {msg}"):
            dam(x, x)
    meta = torch.randn(2, 3, 16, device="meta")
    ca = CosineAttention(16, 2, backend=backend, device="meta")
    assert ca(meta, key_lengths=[3, 1]).shape == (2, 3, 16)
    dam = DualModalAttention(16, 2, 1, 1, 2, backend=backend, device="meta")
    assert dam(meta, meta)[2].shape == (2, 16)
    # a meta module and a meta input of another dtype: the dtype message (not autocast's
    # "unknown device type" for meta)
    with pytest.raises(ValueError, match="query must have the module's dtype"):
        ca(meta.double())


@pytest.mark.parametrize("make", [
    lambda: CosineAttention(16, 2),
    lambda: FeatureExchange(8, 16, 16, 2),
    lambda: DualModalAttention(16, 2, 1, 1, 2),
    lambda: DAMLayer(16, 2),
], ids=["CosineAttention", "FeatureExchange", "DualModalAttention", "DAMLayer"])
def test_torch_jit_script_raises_a_clear_error(make):
    import warnings

    from dtl_fast.nn import NotScriptableError

    module = make()
    where = "dtl_fast.nn.attention" if isinstance(module, DAMLayer) else "dtl_fast.nn"

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = torch.nn.Sequential(torch.nn.Identity())
            self.inner.add_module("attn", module)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script is deprecated
        for target in (module, Model()):
            with pytest.raises(NotScriptableError,
                               match=rf"^torch.jit.script: {where}.{type(module).__name__} is not "
                                     r"scriptable .* use torch.compile, torch.export or "
                                     r"torch.jit.trace"):
                torch.jit.script(target)


# --------------------------------------------------------------------------------------------
# CUDA at DTL sizes (skipped without a GPU)
# --------------------------------------------------------------------------------------------
def _gpu_lengths(B, N):
    lengths = torch.randint(0, N + 1, (B,))
    lengths[0], lengths[1] = N, 0
    return lengths.cuda()


def _assert_gpu_fused_matches_reference(module, inputs, dtype, poison, **kwargs):
    """On CUDA: the fused module in `dtype` and the reference module in `dtype` (same weights),
    both measured against the reference module in float64. Every output, input gradient and
    parameter gradient of the fused module must be within max(floor, factor x the error of
    the reference module in the same dtype): the fused kernel may not lose more accuracy than
    eager attention at that precision. float32 follows PyTorch's default matmul precision
    ("highest": no TF32) in the kernel too. Parameter gradients sum many cancelling terms, so
    they get a wider margin each, and all of them together (one vector) the tight one.
    In bfloat16 a flash-style kernel rounds its probabilities and score gradients to bfloat16
    before the tensor-core products while the eager reference keeps them in float32, so the
    fused module is expected to be a few times less accurate (about 3x on small shapes in the
    interpreter; up to 10x on a key bias gradient, a sum of cancelling terms): the bfloat16
    bounds catch wrong masks and gradients (errors of order 1), not that."""
    floor, factor = (2e-5, 2.0) if dtype == torch.float32 else (3e-2, 4.0)
    p_floor, p_factor = (2e-5, 10.0) if dtype == torch.float32 else (0.25, 5.0)
    module = module.cuda()
    ref64 = copy.deepcopy(module).double().set_backend("reference")
    x64 = [x.cuda().double() for x in inputs]
    grads = output_grads(ref64, x64, **kwargs)
    want = run(ref64, x64, grads, **kwargs)
    xs = [x.to(dtype) for x in x64]
    gs = [g.to(dtype) for g in grads]
    base = run(copy.deepcopy(module).to(dtype).set_backend("reference"), xs, gs, **kwargs)
    with poison():
        got = run(copy.deepcopy(module).to(dtype).set_backend("fused"), xs, gs, **kwargs)

    def check(name, g, b, r, floor, factor):
        assert g is not None and torch.isfinite(g).all(), f"{name}: missing or not finite"
        err, err_ref = rel_err(g, r), rel_err(b, r)
        assert err <= max(floor, factor * err_ref), (
            f"{name}: fused error {err:.3e} vs eager {dtype} error {err_ref:.3e} (floor {floor:.0e})")

    for i in range(len(want[0])):
        check(f"output {i}", got[0][i], base[0][i], want[0][i], floor, factor)
    for i in range(len(want[1])):
        check(f"grad of input {i}", got[1][i], base[1][i], want[1][i], floor, factor)
    for pname in want[2]:
        check(f"grad of {pname}", got[2][pname], base[2][pname], want[2][pname], p_floor, p_factor)
    flat = [torch.cat([d[p].double().flatten() for p in want[2]]) for d in (got[2], base[2], want[2])]
    check("all parameter grads", *flat, floor, factor)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("heads, window, M, cross", [(4, None, 0, False), (4, 8, 4, False), (8, None, 8, True)])
def test_gpu_cosine_attention(dtype, heads, window, M, cross, poison):
    B, Nq, Nk, E = 64, 48, 64 if cross else 48, 256
    m = CosineAttention(E, heads, kdim=128 if cross else None, window=window, num_memory=M)
    randomize_(m)
    q = torch.randn(B, Nq, E)
    args = [q, torch.randn(B, Nk, 128), torch.randn(B, Nk, E)] if cross else [q]
    _assert_gpu_fused_matches_reference(m, args, dtype, poison, key_lengths=_gpu_lengths(B, Nk))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_gpu_feature_exchange(dtype, poison):
    B, Na, Nb = 64, 16, 64
    fe = randomize_(FeatureExchange(512, 128, 256, 8))
    _assert_gpu_fused_matches_reference(fe, [torch.randn(B, Na, 512), torch.randn(B, Nb, 128)], dtype, poison,
                                        a_lengths=_gpu_lengths(B, Na), b_lengths=_gpu_lengths(B, Nb))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("heads, Ni, Nv", [(4, 16, 64), (8, 32, 16)])
def test_gpu_dam(dtype, heads, Ni, Nv, poison):
    B = 64
    dam = randomize_(DualModalAttention(256, heads, num_layers=2, window=4, num_memory=8))
    _assert_gpu_fused_matches_reference(dam, [torch.randn(B, Ni, 256), torch.randn(B, Nv, 256)], dtype, poison,
                                        image_lengths=_gpu_lengths(B, Ni), video_lengths=_gpu_lengths(B, Nv))


# --------------------------------------------------------------------------------------------
# review of s32: hooks and non-plain projections in the grouped form, small-int lengths
# --------------------------------------------------------------------------------------------
def _modules_for_hooks():
    """(module, inputs, the Linears its grouped form concatenates) for each grouped form."""
    torch.manual_seed(0)
    ca = randomize_(CosineAttention(8, 2))
    fe = randomize_(FeatureExchange(8, 8, 8, 2))
    dam = randomize_(DAMLayer(8, 2, window=1, num_memory=0))
    x, y = torch.randn(2, 5, 8, dtype=torch.float64), torch.randn(2, 5, 8, dtype=torch.float64)
    return [(ca, (x,), ca.k_proj), (fe, (x, y), fe.attn_ab.q_proj),
            (dam, (x, y), dam.intra_v.v_proj), (dam, (x, y), dam.inter_iv.out_proj)]


@pytest.mark.parametrize("case", range(4))
def test_grouped_form_runs_projection_hooks(case):
    """A forward hook on a projection the grouped form would concatenate runs, and changes the
    result, exactly as in the reference form (before: the grouped GEMM read the weights and
    skipped the hook silently under auto / fused)."""
    module, inputs, lin = _modules_for_hooks()[case]
    module.double()
    outs = {}
    for backend in ("reference", "auto"):
        module.backend = backend
        calls = []
        # (a shift: cosine attention ignores a scale of q or k)
        handle = lin.register_forward_hook(lambda m, i, o: (calls.append(1), o + 0.5)[1])
        try:
            out = module(*inputs)
        finally:
            handle.remove()
        assert len(calls) == 1, backend
        outs[backend] = out if isinstance(out, tuple) else (out,)
    for a, b in zip(outs["auto"], outs["reference"]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    module.backend = "auto"
    plain = module(*inputs)
    plain = plain if isinstance(plain, tuple) else (plain,)
    # the hook did change the output
    assert not all(torch.allclose(a, b) for a, b in zip(plain, outs["auto"]))


def test_grouped_form_with_pruned_projection_trains():
    """torch.nn.utils.prune recomputes a projection's weight in a forward pre-hook: the grouped
    form must call the module (before: it read the stale weight of the first step and the
    second backward failed, 'Trying to backward through the graph a second time')."""
    from torch.nn.utils import prune

    torch.manual_seed(0)
    x = torch.randn(2, 5, 8)
    losses = {}
    for backend in ("reference", "auto"):
        torch.manual_seed(1)
        m = CosineAttention(8, 2, backend=backend)
        prune.l1_unstructured(m.k_proj, "weight", amount=0.5)
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        losses[backend] = []
        for _ in range(3):
            opt.zero_grad()
            loss = m(x).square().mean()
            loss.backward()
            opt.step()
            losses[backend].append(loss.item())
    assert losses["auto"] == pytest.approx(losses["reference"], rel=1e-5)


def test_grouped_form_with_a_linear_subclass():
    """A Linear subclass with its own forward in a projection slot is called, not bypassed."""
    class Scaled(torch.nn.Linear):
        def forward(self, x):
            return 2.0 * super().forward(x)

    torch.manual_seed(0)
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    outs = []
    for backend in ("reference", "auto"):
        torch.manual_seed(1)
        m = CosineAttention(8, 2, backend=backend).double()
        old = m.v_proj
        m.v_proj = Scaled(8, 8).double()
        m.v_proj.load_state_dict(old.state_dict())
        outs.append(m(x))
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype,n", [(torch.int8, 150), (torch.uint8, 300)])
@pytest.mark.parametrize("a_given", [False, True])
def test_feature_exchange_small_int_lengths_beyond_their_range(dtype, n, a_given):
    """b's lengths in a small integer dtype with N past its range (N itself is not a length
    value), a's none or int64 ones past that range too: the grouped form's per-head lengths are
    built in int64 (before: full_like(b_lengths, N) overflowed int8 / uint8, an error naming no
    argument, and a's values were cast to b's dtype)."""
    torch.manual_seed(0)
    fe = randomize_(FeatureExchange(8, 8, 8, 2))
    a, b = torch.randn(2, n, 8), torch.randn(2, n, 8)
    la = torch.tensor([n - 3, 5]) if a_given else None
    lb = torch.tensor([100, 7], dtype=dtype)
    outs = []
    for backend in ("auto", "reference"):
        fe.backend = backend
        outs.append(fe(a, b, la, lb))
    for x, y in zip(outs[0], outs[1]):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)
