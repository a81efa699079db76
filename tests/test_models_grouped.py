"""The grouped form of the attention modules (projections of the same tokens as one GEMM,
memory-only branches in one op call, a DAM layer's intra_v and short-term branches as one call
over stacked heads with a window per head, a DAM layer's out-projections as one batched GEMM,
the two feature-exchange directions as one call when Na == Nb, with per-head key lengths when
theirs differ) against the simple form with the same parameters and the same op backend:
outputs and every gradient (inputs and each parameter), within float32 rounding. Also: fewer op
calls, checkpoints of the simple form load unchanged (state_dict names and shapes as before the
grouped form existed)."""
import copy
import hashlib
from typing import NamedTuple

import pytest
import torch

from dtl_fast.models import DTL
from dtl_fast.nn import attention as attn_mod
from dtl_fast.nn.attention import CosineAttention, DAMLayer, DualModalAttention, FeatureExchange

from test_attention_modules import output_grads, randomize_, run

# Relative error (norm). The comparisons run in float64, where the two forms differ only by
# reassociated sums (~1e-15): a wrong grouping (a swapped projection, a misplaced head or
# branch) is an O(1) error. One float32 case checks the float32 bound (1e-4: a logit-scale
# gradient is a sum over every score, with cancellation).
TOL64 = 1e-10
TOL32 = 1e-4
F64 = torch.float64


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def forms(module, backend="reference"):
    """(simple, grouped) copies of module with the same parameters and op backend."""
    simple = copy.deepcopy(module).set_backend(backend)
    grouped = copy.deepcopy(module).set_backend(backend)
    for m in simple.modules():
        if hasattr(m, "grouped"):
            m.grouped = False
    for m in grouped.modules():
        if hasattr(m, "grouped"):
            m.grouped = True
    return simple, grouped


def assert_forms_agree(module, inputs, backend="reference", tol=TOL64, zero_grads=(), **kwargs):
    simple, grouped = forms(module, backend)
    assert_forms_agree_on(simple, grouped, inputs, tol, zero_grads, **kwargs)


def assert_forms_agree_on(simple, grouped, inputs, tol=TOL64, zero_grads=(), **kwargs):
    """grouped's outputs, input grads and every parameter grad equal simple's within tol.
    zero_grads: names (substrings) of parameters whose gradient is zero in the function (only
    rounding in either form): those are measured against the norm of all parameter grads."""
    grads = output_grads(simple, inputs, **kwargs)
    want = run(simple, inputs, grads, **kwargs)
    got = run(grouped, inputs, grads, **kwargs)
    for i, (g, w) in enumerate(zip(got[0], want[0])):
        assert torch.isfinite(g).all(), f"output {i}: non-finite"
        assert rel(g, w) <= tol, f"output {i}: rel err {rel(g, w):.2e}"
    for i, (g, w) in enumerate(zip(got[1], want[1])):
        assert rel(g, w) <= tol, f"input grad {i}: rel err {rel(g, w):.2e}"
    assert got[2].keys() == want[2].keys()
    scale = torch.cat([w.double().flatten() for w in want[2].values()]).norm()
    for name, w in want[2].items():
        g = got[2][name]
        assert w is not None and g is not None, f"{name}: no gradient"
        if any(z in name for z in zero_grads):
            assert w.double().norm() <= 1e-12 * scale, f"{name}: not zero in the simple form"
            err = float((g.double() - w.double()).norm() / scale)
            assert err <= tol, f"grad {name}: error {err:.2e} relative to all parameter grads"
            continue
        # (a softmax over one level has zero gradient by construction)
        if not (name.endswith("level_logits") and w.numel() == 1):
            assert w.abs().sum() > 0, f"{name}: zero gradient in the simple form (test too weak)"
        assert rel(g, w) <= tol, f"grad {name}: rel err {rel(g, w):.2e}"


class _Call(NamedTuple):
    q_shape: tuple
    key_lengths: torch.Tensor | None
    window: object


def _count_calls(monkeypatch):
    """Every call of the attention op from the modules: [_Call] (q's shape, the key lengths and
    the window it got)."""
    calls = []
    real = attn_mod.cosine_attention

    def spy(q, k, v, logit_scale, key_lengths=None, window=None, *args, **kwargs):
        calls.append(_Call(tuple(q.shape), key_lengths, window))
        return real(q, k, v, logit_scale, key_lengths, window, *args, **kwargs)

    monkeypatch.setattr(attn_mod, "cosine_attention", spy)
    return calls


DAM_CASES = [  # (Ni, Nv, window, num_memory, lengths)
    (5, 7, 2, 3, True),
    (4, 4, None, 0, False),
    (6, 3, 1, 0, True),
    (3, 6, None, 2, True),
    (5, 5, 0, 2, True),
    (4, 6, 9, 0, False),
]


@pytest.mark.parametrize("Ni, Nv, window, M, with_lengths", DAM_CASES,
                         ids=["all-branches", "no-st-no-mem", "st-only", "mem-only", "equal-N-window-0",
                              "window-past-N-no-lengths"])
def test_dam_grouped_equals_simple(Ni, Nv, window, M, with_lengths):
    dam = randomize_(DualModalAttention(16, 2, num_layers=2, window=window, num_memory=M, dtype=F64))
    x_i, x_v = torch.randn(3, Ni, 16, dtype=F64), torch.randn(3, Nv, 16, dtype=F64)
    kw = {}
    if with_lengths:
        kw = dict(image_lengths=torch.tensor([Ni, 1, Ni - 1]), video_lengths=[Nv, 2, 0])
    # window 0: each frame sees only itself in the short-term branch (softmax over one key), so
    # its scores, and the gradients of what makes them, are zero in the function
    zero = ("short_term.q_proj", "short_term.k_proj", "short_term.logit_scale") if window == 0 else ()
    assert_forms_agree(dam, [x_i, x_v], zero_grads=zero, **kw)


def test_dam_layer_grouped_equals_simple_with_checked_tensor_lengths():
    """DAMLayer's own forward takes checked int64 tensors (its documented internal form)."""
    layer = randomize_(DAMLayer(16, 4, window=1, num_memory=2, dtype=F64))
    x_i, x_v = torch.randn(2, 5, 16, dtype=F64), torch.randn(2, 6, 16, dtype=F64)
    assert_forms_agree(layer, [x_i, x_v], L_i=torch.tensor([5, 2]), L_v=torch.tensor([3, 6]))


def test_dam_grouped_with_the_fused_op():
    """The grouped form with the Triton op (interpreter) against the simple form with the same
    op: the op sees strided views of the grouped projections, the side-by-side memory queries
    and the intra_v + short-term call over stacked heads with a window per head."""
    dam = randomize_(DualModalAttention(16, 2, num_layers=1, window=1, num_memory=2, dtype=F64))
    x_i, x_v = torch.randn(2, 3, 16, dtype=F64), torch.randn(2, 5, 16, dtype=F64)
    assert_forms_agree(dam, [x_i, x_v], backend="fused", image_lengths=[3, 1], video_lengths=[2, 5])


def test_dam_grouped_equals_simple_float32():
    dam = randomize_(DualModalAttention(32, 4, num_layers=2, window=2, num_memory=4))
    x_i, x_v = torch.randn(4, 9, 32), torch.randn(4, 8, 32)
    assert_forms_agree(dam, [x_i, x_v], tol=TOL32, image_lengths=None, video_lengths=[8, 5, 1, 3])


@pytest.mark.parametrize("window, M, n_simple, n_grouped", [
    (1, 2, 7, 5), (None, 2, 6, 5), (1, 0, 5, 4), (None, 0, 4, 4),
], ids=["st-mem", "mem", "st", "neither"])
def test_dam_grouped_makes_fewer_op_calls(monkeypatch, window, M, n_simple, n_grouped):
    """Per DAM layer: inter x2, intra_i, intra_v (+ short-term: the same call over 2H heads,
    window per head [None]*H + [w]*H), and ONE long-term call over Ni + Nv queries."""
    calls = _count_calls(monkeypatch)
    dam = DualModalAttention(16, 2, num_layers=1, window=window, num_memory=M)
    x_i, x_v = torch.randn(2, 3, 16), torch.randn(2, 5, 16)
    simple, grouped = forms(dam)
    simple(x_i, x_v, video_lengths=[4, 2])
    assert len(calls) == n_simple
    calls.clear()
    grouped(x_i, x_v, video_lengths=[4, 2])
    assert len(calls) == n_grouped
    shapes = [c.q_shape for c in calls]
    assert ((2, 2, 8, 8) in shapes) == (M > 0)  # long-term: 3 + 5 queries side by side
    video_self = [c for c in calls if c.q_shape[1:3] == ((4 if window is not None else 2), 5)
                  and c.key_lengths is not None]
    assert len(video_self) == 1
    want_window = None if window is None else [None, None, window, window]
    assert video_self[0].window == want_window
    assert video_self[0].key_lengths.tolist() == [4, 2]


def test_dam_branches_on_other_backends_stay_separate_calls(monkeypatch):
    """intra_v and short-term on different backends cannot share a call: one call each, with
    each module's own backend, and the same function."""
    dam = randomize_(DualModalAttention(16, 2, num_layers=1, window=1, num_memory=0, dtype=F64))
    x_i, x_v = torch.randn(2, 3, 16, dtype=F64), torch.randn(2, 5, 16, dtype=F64)
    simple, grouped = forms(dam)
    for m in (simple, grouped):
        m.layers[0].short_term.backend = "auto"  # the composite on CPU; the rest: reference
    kw = dict(video_lengths=[5, 2])
    assert_forms_agree_on(simple, grouped, [x_i, x_v], **kw)
    calls = _count_calls(monkeypatch)
    grouped(x_i, x_v, **kw)
    assert sorted(c.q_shape[1] for c in calls) == [2, 2, 2, 2, 2]


def _fe_lengths(kind, Na, Nb):
    if kind == "same":
        L = torch.tensor([Na, 2, 0])
        return dict(a_lengths=L, b_lengths=L)
    if kind == "both":
        return dict(a_lengths=torch.tensor([Na, 1, 3]), b_lengths=torch.tensor([2, Nb, 0]))
    if kind == "b-only":  # as in DTL: image tokens all valid, frames padded
        return dict(b_lengths=[1, Nb, 0])
    if kind == "a-only":
        return dict(a_lengths=[0, 2, Na])
    return {}


def _fe_expected_lengths(kind, Na, Nb, H):
    """The key lengths of the one stacked call: [B] for both directions, or per head [B, 2H]
    (the a->b heads attend b's keys: b_lengths, then the b->a heads: a_lengths)."""
    kw = _fe_lengths(kind, Na, Nb)
    if kind in ("same", None):
        return None if not kw else kw["a_lengths"]
    lb = torch.as_tensor(kw.get("b_lengths", [Nb] * 3))
    la = torch.as_tensor(kw.get("a_lengths", [Na] * 3))
    return torch.cat([lb[:, None].expand(3, H), la[:, None].expand(3, H)], 1)


@pytest.mark.parametrize("Na, Nb, dims, lengths", [
    (5, 5, (16, 16), "same"), (5, 5, (8, 12), None), (4, 6, (16, 8), "both"), (5, 5, (16, 16), "both"),
    (5, 5, (12, 16), "b-only"), (4, 4, (16, 16), "a-only"), (6, 4, (16, 16), "b-only"),
], ids=["stacked-same-lengths", "stacked-no-lengths", "unequal", "equal-N-other-lengths",
        "equal-N-b-lengths-only", "equal-N-a-lengths-only", "unequal-b-lengths-only"])
def test_feature_exchange_grouped_equals_simple(monkeypatch, Na, Nb, dims, lengths):
    fe = randomize_(FeatureExchange(dims[0], dims[1], 16, 2, dtype=F64))
    a, b = torch.randn(3, Na, dims[0], dtype=F64), torch.randn(3, Nb, dims[1], dtype=F64)
    kw = _fe_lengths(lengths, Na, Nb)
    assert_forms_agree(fe, [a, b], **kw)
    calls = _count_calls(monkeypatch)
    forms(fe)[1](a, b, **kw)
    # one call over 2H heads when the directions have the same shapes (per-head key lengths
    # [B, 2H] when theirs differ), else one call per direction
    assert [c.q_shape[1] for c in calls] == ([4] if Na == Nb else [2, 2])
    if Na == Nb:
        want = _fe_expected_lengths(lengths, Na, Nb, 2)
        got = calls[0].key_lengths
        assert (got is None) == (want is None)
        if want is not None:
            assert torch.equal(got.cpu().long(), want.long()), (got, want)


def test_feature_exchange_grouped_per_head_lengths_with_the_fused_op():
    """The stacked exchange call with per-head key lengths [B, 2H] through the Triton op
    (interpreter) against the simple form with the same op (two calls, lengths [B] each)."""
    fe = randomize_(FeatureExchange(8, 12, 16, 2, dtype=F64))
    a, b = torch.randn(3, 4, 8, dtype=F64), torch.randn(3, 4, 12, dtype=F64)
    assert_forms_agree(fe, [a, b], backend="fused", a_lengths=[4, 1, 0], b_lengths=[2, 4, 3])


@pytest.mark.parametrize("kind", ["self", "shared-kv", "cross"])
def test_cosine_attention_grouped_projections_equal_simple(kind):
    m = randomize_(CosineAttention(16, 4, window=2 if kind == "self" else None, num_memory=2, dtype=F64))
    x, y = torch.randn(2, 5, 16, dtype=F64), torch.randn(2, 7, 16, dtype=F64)
    if kind == "self":
        simple, grouped = forms(m)
        grads = output_grads(simple, [x])
        got, want = run(grouped, [x], grads), run(simple, [x], grads)
    else:
        def call(mod):
            if kind == "shared-kv":
                return lambda q, kv: mod(q, kv, kv, key_lengths=[7, 3])
            return lambda q, kv: mod(q, kv, kv * 1.5, key_lengths=[7, 3])
        simple, grouped = forms(m)
        grads = [torch.randn(2, 5, 16, dtype=F64)]
        want = run(simple, [x, y], grads, fn=call(simple))
        got = run(grouped, [x, y], grads, fn=call(grouped))
    assert rel(got[0][0], want[0][0]) <= TOL64
    for g, w in zip(got[1], want[1]):
        assert rel(g, w) <= TOL64
    for name, w in want[2].items():
        assert rel(got[2][name], w) <= TOL64, name


def test_grouped_is_the_default_except_for_reference():
    dam = DualModalAttention(16, 2, num_layers=1)
    layer = dam.layers[0]
    for backend, grouped in (("reference", False), ("auto", True), ("fused", True)):
        dam.backend = backend
        assert attn_mod.use_grouped(layer) is grouped
    layer.grouped = False
    dam.backend = "fused"
    assert attn_mod.use_grouped(layer) is False


def _fingerprint(model) -> str:
    text = "\n".join(f"{k}:{tuple(v.shape)}" for k, v in model.state_dict().items())
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# state_dict names and shapes (in order) of DTL as it was before the grouped form (commit
# 8f1b6bc): checkpoints written then must load now, strict.
OLD_FINGERPRINTS = [
    (dict(num_classes=10), "17a67a34727b97e5"),
    (dict(num_classes=5, in_channels=1, width=8, hidden_size=8, dim=16, num_heads=2, num_layers=1,
          window=1, num_memory=2), "6c75997c165f7eaa"),
    (dict(num_classes=5, rnn="gru", window=None, num_memory=0), "d8cace644a493aba"),
]


@pytest.mark.parametrize("kwargs, fp", OLD_FINGERPRINTS, ids=["default", "tiny", "gru-no-st-mem"])
def test_state_dict_names_and_shapes_unchanged(kwargs, fp):
    assert _fingerprint(DTL(**kwargs)) == fp


def test_simple_form_checkpoint_loads_into_grouped_model(tmp_path):
    """A state_dict saved from the simple (reference) form loads strictly into a fresh model
    that runs grouped, which then computes the simple form's function."""
    kw = dict(in_channels=1, width=8, hidden_size=8, dim=16, num_heads=2, num_layers=1, window=1,
              num_memory=2)
    src = randomize_(DTL(5, **kw, backend="reference"))
    torch.save(src.state_dict(), tmp_path / "old.pt")
    dst = DTL(5, **kw, backend="auto")
    dst.load_state_dict(torch.load(tmp_path / "old.pt", weights_only=True), strict=True)
    assert attn_mod.use_grouped(dst.dam.layers[0]) and attn_mod.use_grouped(dst.exchange)
    images, videos = torch.randn(3, 1, 8, 8), torch.randn(3, 4, 1, 8, 8)
    lengths = torch.tensor([4, 1, 2])
    with torch.no_grad():
        want = src(images, videos, lengths)
        got = dst(images, videos, lengths)
    for g, w in zip(got, want):
        assert rel(g, w) <= TOL32
