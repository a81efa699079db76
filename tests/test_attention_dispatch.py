"""Which cosine-attention kernels a call runs, checked against the committed H100 rows they were
derived from (bench/results/gpu_check_nvidia-h100_3-attn-sweep.log, bench/sweep_cosine_attention.py):

- the version (dtl_fast.ops.cosine_attention.attn_version): the second on NVIDIA sm_90 (not ROCm,
  which reports 9.x too) for bf16 / fp16
  from max(Nq, Nk) = V2_MIN_N, the first elsewhere; $DTL_FAST_ATTN_IMPL overrides; the forward
  and the backward of one call run the same version;
- the second version's TMA switch and tiles (kernels/cosine_attention_fwd.use_tma, fwd2_index,
  kernels/cosine_attention_bwd.bwd2_index): the fastest measured form of every swept shape (or
  within the sweep's 5 % noise of it), the old default elsewhere; $DTL_FAST_ATTN_TMA overrides;
- backend="auto" (auto_path): fused exactly where the log's rows put the defaults ahead of the
  composite, but for the one documented row (plain forward+backward at N 2048); the second run's
  classes only in the class the rows timed (NVIDIA sm_90 whatever forces the version, no memory
  slots, min(Nq, Nk) from the bound); nothing fused on ROCm or where Triton cannot run.

Nothing here needs a GPU: the compute capability is patched, the kernels are spied on."""
import importlib
import re
import types
from pathlib import Path

import pytest
import torch

from dtl_fast.kernels import cosine_attention_bwd as B2
from dtl_fast.kernels import cosine_attention_fwd as F2

ops = importlib.import_module("dtl_fast.ops.cosine_attention")
LOG = Path(__file__).resolve().parent.parent / ops.AUTO_V2_RULE_LOG
CUDA0 = torch.device("cuda", 0)  # a device object needs no GPU; the capability is patched
H100 = (9, 0)
BF, F16 = torch.bfloat16, torch.float16

_FWD = re.compile(r"^\s+(\w+)\s+(\d+)x(\d+)x(\d+)x(\d+) (\(\d+, \d+, \d+, \d+\))\s+(auto|never)\s+"
                  r"(tma)?\s+([\d.]+) ms")
_FWD_BASE = re.compile(r"^\s+(\w+)\s+(\d+)x(\d+)x(\d+)x(\d+) composite ([\d.]+) ms")
_BWD = re.compile(r"^\s+(\w+)\s+(\d+)x(\d+)x(\d+)x(\d+) bwd \[(\d)\] (\(\d+, \d+, \d+, \d+\))\s+([\d.]+) ms")
_BWD_BASE = re.compile(r"^\s+(\w+)\s+(\d+)x(\d+)x(\d+)x(\d+) composite fwd\+bwd ([\d.]+) ms")


def _rows():
    """{(variant, N, d): dict(fwd={(candidate index, tma): ms} (fixed maximum), bwd={index: ms},
    comp_fwd=ms, comp_fb=ms)} from the committed sweep log."""
    assert LOG.exists(), LOG
    text = LOG.read_text()
    assert ops.AUTO_V2_RULE_RUN in text and ops.AUTO_V2_RULE_CARD in text
    rows = {}
    for line in text.splitlines():
        if m := _FWD.match(line):
            variant, _, _, n, d, cand, fm, tma, ms = m.groups()
            if fm == "auto":
                cands = F2.FWD2_CANDIDATES[("half", int(d))]
                idx = [str(c) for c in cands].index(cand)
                rows.setdefault((variant, int(n), int(d)), {}).setdefault("fwd", {})[
                    (idx, tma == "tma")] = float(ms)
        elif m := _FWD_BASE.match(line):
            variant, _, _, n, d, ms = m.groups()
            rows.setdefault((variant, int(n), int(d)), {})["comp_fwd"] = float(ms)
        elif m := _BWD.match(line):
            variant, _, _, n, d, idx, _, ms = m.groups()
            rows.setdefault((variant, int(n), int(d)), {}).setdefault("bwd", {})[int(idx)] = float(ms)
        elif m := _BWD_BASE.match(line):
            variant, _, _, n, d, ms = m.groups()
            rows.setdefault((variant, int(n), int(d)), {})["comp_fb"] = float(ms)
    return rows


ROWS = _rows()


@pytest.fixture
def sm(monkeypatch):
    """Every CUDA device reports capability `cap` (default 9.0, an H100); the descriptor API is
    there; $DTL_FAST_ATTN_TMA unset; the version rule unforced."""
    def set_cap(cap=H100):
        # the kernels read get_device_capability, the op get_device_properties (compile-safe)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: cap)
        monkeypatch.setattr(torch.cuda, "get_device_properties",
                            lambda device=None: types.SimpleNamespace(major=cap[0], minor=cap[1]))
    monkeypatch.setattr(F2, "tma_api", lambda: True)
    monkeypatch.setattr(torch.version, "hip", None)  # an NVIDIA build (ROCm: test_rocm_*)
    monkeypatch.delenv(F2.TMA_ENV, raising=False)
    monkeypatch.setattr(ops, "ATTN_IMPL", "auto")
    monkeypatch.setattr(ops, "V2_DTYPES", ())
    set_cap()
    return set_cap


def _window(variant):
    return 256 if variant.startswith("win") else None


def test_the_log_has_every_swept_shape():
    assert set(ROWS) == {("plain", 2048, 64), ("plain", 8192, 64), ("pad", 8192, 64),
                         ("plain", 4096, 128), ("win256", 8192, 64)}
    for key, r in ROWS.items():
        assert {"fwd", "bwd", "comp_fwd", "comp_fb"} <= set(r), key
        # every candidate with and without TMA (sm_90), every backward candidate
        n_fwd = len(F2.FWD2_CANDIDATES[("half", key[2])])
        assert len(r["fwd"]) == 2 * n_fwd, key
        assert len(r["bwd"]) == len(B2.BWD2_CANDIDATES[("_cos_attn_bwd2_dkdv_kernel", "half", key[2])])


# ---------------------------------------------------------------------------------------------
# Defaults of the second version: TMA and tiles


def _fwd_default(variant, n, d):
    tma = F2.use_tma(CUDA0, BF, d, d, n, n, 0, _window(variant) is not None)
    return F2.fwd2_index(CUDA0, BF, d, d, n, n, 0, tma), tma


@pytest.mark.parametrize("key", sorted(ROWS))
def test_forward_default_is_the_fastest_measured(sm, key):
    """The (tile, TMA) the forward picks is the fastest row of the shape or within the sweep's
    5 % noise of it; where it is not the old default (candidate 0, pointer loads), it beats that
    by more than 5 %."""
    fwd = ROWS[key]["fwd"]
    pick = _fwd_default(*key)
    best = min(fwd.values())
    assert fwd[pick] <= 1.05 * best, (key, pick, fwd[pick], best)
    if pick != (0, False):
        assert fwd[(0, False)] > 1.05 * fwd[pick], (key, pick)


def test_forward_defaults_per_shape(sm):
    # the table in kernels/cosine_attention_fwd.py, spelled out
    assert _fwd_default("plain", 2048, 64) == (0, True)
    assert _fwd_default("plain", 8192, 64) == (0, True)
    assert _fwd_default("pad", 8192, 64) == (0, True)
    assert _fwd_default("win256", 8192, 64) == (2, False)
    assert _fwd_default("plain", 4096, 128) == (0, False)


@pytest.mark.parametrize("key", sorted(ROWS))
def test_forward_default_without_tma_is_the_fastest_pointer_form(sm, key, monkeypatch):
    """$DTL_FAST_ATTN_TMA=0: pointer loads, with the fastest pointer-load candidate."""
    monkeypatch.setenv(F2.TMA_ENV, "0")
    pick = _fwd_default(*key)
    assert pick[1] is False
    ptr = {i: ms for (i, tma), ms in ROWS[key]["fwd"].items() if not tma}
    assert ptr[pick[0]] == min(ptr.values()), (key, pick)


@pytest.mark.parametrize("key", sorted(ROWS))
def test_backward_default_is_the_fastest_measured(sm, key):
    variant, n, d = key
    bwd = ROWS[key]["bwd"]
    pick = B2.bwd2_index(CUDA0, BF, d, d, n, n, 0)
    assert bwd[pick] == min(bwd.values()), (key, pick, bwd)
    assert bwd[0] > 1.05 * bwd[pick] or pick == 0


def test_defaults_outside_the_measured_class_stay(sm):
    """Untimed: shorter N, other head dims, memory slots, d != dv, other cards, float32 /
    float64, the CPU: pointer loads, candidate 0, backward candidate 0."""
    untimed = [  # (device, dtype, d, dv, nq, nk, m)
        (CUDA0, BF, 64, 64, 2047, 2047, 0), (CUDA0, BF, 64, 64, 2048, 2048, 8),
        (CUDA0, BF, 32, 32, 4096, 4096, 0), (CUDA0, BF, 40, 40, 4096, 4096, 0),
        (CUDA0, BF, 64, 32, 4096, 4096, 0), (CUDA0, torch.float32, 64, 64, 4096, 4096, 0),
        (CUDA0, torch.float64, 64, 64, 4096, 4096, 0), (torch.device("cpu"), BF, 64, 64, 4096, 4096, 0),
        (CUDA0, BF, 128, 128, 2048, 2048, 0),  # d 128 was timed at N 4096 only
    ]
    for args in untimed:
        assert not F2.sm90_measured(*args), args
        assert not F2.use_tma(*args, False), args
        assert F2.fwd2_index(*args, False) == 0 and F2.fwd2_index(*args, True) == 0, args
        assert B2.bwd2_index(*args) == 0, args
    # max(Nq, Nk) decides: a long key side counts
    assert F2.use_tma(CUDA0, BF, 64, 64, 16, 2048, 0, False)
    assert B2.bwd2_index(CUDA0, F16, 64, 64, 2048, 16, 0) == 2
    assert B2.bwd2_index(CUDA0, BF, 128, 128, 4096, 4096, 0) == 1
    for cap in ((8, 0), (8, 9), (10, 0), (12, 0)):
        sm(cap)
        assert not F2.use_tma(CUDA0, BF, 64, 64, 8192, 8192, 0, False), cap
        assert F2.fwd2_index(CUDA0, BF, 64, 64, 8192, 8192, 0, False) == 0, cap
        assert B2.bwd2_index(CUDA0, BF, 64, 64, 8192, 8192, 0) == 0, cap


def test_tma_env_overrides(sm, monkeypatch):
    measured = (CUDA0, BF, 64, 64, 8192, 8192, 0, False)
    assert F2.use_tma(*measured)
    monkeypatch.setenv(F2.TMA_ENV, "0")
    assert not F2.use_tma(*measured)
    monkeypatch.setenv(F2.TMA_ENV, "1")  # on where it can run, measured or not
    assert F2.use_tma(CUDA0, BF, 128, 128, 64, 64, 8, True)
    assert not F2.use_tma(CUDA0, torch.float32, 64, 64, 8192, 8192, 0, False)
    assert not F2.use_tma(torch.device("cpu"), BF, 64, 64, 8192, 8192, 0, False)
    sm((8, 0))
    assert not F2.use_tma(*measured)
    monkeypatch.setenv(F2.TMA_ENV, "")  # empty: as unset
    sm(H100)
    assert F2.use_tma(*measured)


def test_launchers_use_the_defaults(monkeypatch):
    """config=None / tma=None: the forward launcher asks use_tma (with the call's sizes and
    whether it has a window) and fwd2_index; the backward launcher bwd2_index. Spied on CPU."""
    from test_cosine_attention import make_inputs
    from test_cosine_attention_fwd import fwd2
    seen = []
    real_idx, real_bidx = F2.fwd2_index, B2.bwd2_index
    monkeypatch.setattr(F2, "use_tma", lambda *a: seen.append(("tma", a[2:])) or False)
    monkeypatch.setattr(F2, "fwd2_index", lambda *a: seen.append(("fwd", a[2:])) or real_idx(*a))
    monkeypatch.setattr(B2, "bwd2_index", lambda *a: seen.append(("bwd", a[2:])) or real_bidx(*a))
    inputs = make_inputs(1, 2, 70, 75, 8, 8, 3)
    out, lse = fwd2(inputs, None, 5, short=False)
    assert seen == [("tma", (8, 8, 70, 75, 3, True)), ("fwd", (8, 8, 70, 75, 3, False))]
    seen.clear()
    fwd2(inputs, None, None, short=False)
    assert seen[0] == ("tma", (8, 8, 70, 75, 3, False))
    seen.clear()
    q, k, v, ls, mk, mv = inputs
    scale = ops.head_scale(ls, torch.float32)
    B2.cosine_attention_backward2(torch.randn_like(out), q, k, v, scale, None, 5, mk, mv, out, lse)
    assert seen == [("bwd", (8, 8, 70, 75, 3))]


# ---------------------------------------------------------------------------------------------
# The version


def test_version_rule(sm):
    v = ops.attn_version
    for dtype in (BF, F16):
        assert v(dtype, 2048, 2048, H100) == "v2"
        assert v(dtype, 16, 2048, H100) == "v2" and v(dtype, 2048, 16, H100) == "v2"
        assert v(dtype, 2047, 2047, H100) == "v1"  # below the shortest N the rows timed
        assert v(dtype, 64, 64, H100) == "v1"  # DTL's own calls
        assert v(dtype, 1 << 16, 1 << 16, H100) == "v2"
        assert v(dtype, 2048, 2048, (9, 0), per_head=True) == "v2"  # SUPPORTS_PER_HEAD
        for cap in (None, (8, 0), (8, 9), (10, 0)):  # the CPU, untimed cards
            assert v(dtype, 8192, 8192, cap) == "v1", cap
    for dtype in (torch.float32, torch.float64):
        assert v(dtype, 8192, 8192, H100) == "v1"


def test_version_env_overrides(sm, monkeypatch):
    v = ops.attn_version
    monkeypatch.setattr(ops, "ATTN_IMPL", "v1")
    assert v(BF, 8192, 8192, H100) == "v1"
    monkeypatch.setattr(ops, "ATTN_IMPL", "v2")
    monkeypatch.setattr(ops, "V2_DTYPES", ops.V2_CANDIDATE_DTYPES)  # as the import sets them
    for dtype in (BF, F16, torch.float64):
        assert v(dtype, 16, 16, None) == "v2" and v(dtype, 8192, 8192, (8, 0)) == "v2"
    assert v(torch.float32, 8192, 8192, H100) == "v1"  # the second version's float32 spills
    monkeypatch.setattr(ops, "_bwd2_supports_per_head", lambda: False)
    assert v(BF, 8192, 8192, H100, per_head=True) == "v1"


@pytest.mark.parametrize("val,want", [(None, "auto"), ("", "auto"), ("v1", "v1"), ("v2", "v2")])
def test_impl_env_values(monkeypatch, val, want):
    if val is None:
        monkeypatch.delenv(ops.ATTN_IMPL_ENV, raising=False)
    else:
        monkeypatch.setenv(ops.ATTN_IMPL_ENV, val)
    assert ops._attn_impl_env() == want


@pytest.mark.parametrize("bad", ["v3", "V2", "1", "auto"])
def test_impl_env_bad_value_names_the_variable(monkeypatch, bad):
    monkeypatch.setenv(ops.ATTN_IMPL_ENV, bad)
    with pytest.raises(ValueError, match="DTL_FAST_ATTN_IMPL"):
        ops._attn_impl_env()


@pytest.mark.parametrize("n,want", [(2047, "v1"), (2048, "v2")])
@pytest.mark.parametrize("per_head", [False, True], ids=["one_mask", "per_head"])
def test_forward_and_backward_run_the_same_version(sm, monkeypatch, n, want, per_head):
    """Through the registered ops and autograd, on CPU tensors that report sm_90: the kernels'
    launchers are replaced by spies that record which version ran and return the right shapes."""
    import dtl_fast.kernels.cosine_attention as K1
    seen = []
    monkeypatch.setattr(ops, "_capability", lambda device: H100)

    def fwd(tag):
        def f(q, k, v, *a, **kw):
            seen.append(("fwd", tag))
            return (q.new_zeros(q.shape[:3] + (v.shape[3],)), q.new_zeros(q.shape[:3], dtype=torch.float32))
        return f

    def bwd(tag):
        def f(g, q, k, v, scale, *a, **kw):
            seen.append(("bwd", tag))
            return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v), torch.zeros_like(scale), \
                q.new_empty((0,)), q.new_empty((0,))
        return f

    monkeypatch.setattr(K1, "cosine_attention_forward", fwd("v1"))
    monkeypatch.setattr(K1, "cosine_attention_backward", bwd("v1"))
    monkeypatch.setattr(F2, "cosine_attention_forward2", fwd("v2"))
    monkeypatch.setattr(B2, "cosine_attention_backward2", bwd("v2"))
    q = torch.randn(1, 2, 4, 8, dtype=BF, requires_grad=True)
    k = torch.randn(1, 2, n, 8, dtype=BF, requires_grad=True)
    v = torch.randn(1, 2, n, 8, dtype=BF, requires_grad=True)
    ls = torch.zeros(2, requires_grad=True)
    window = [3, None] if per_head else 3
    out = ops.cosine_attention(q, k, v, ls, None, window, backend="fused")
    out.sum().backward()
    assert seen == [("fwd", want), ("bwd", want)]


# ---------------------------------------------------------------------------------------------
# backend="auto" against the rows

# (variant, N, d, needs_grad) rows where fused measured faster but auto keeps the composite, and
# why (dtl_fast/ops/cosine_attention.py's table): one N between losing rows is no range.
KEPT_COMPOSITE = {("plain", 2048, 64, True): "crossover to N 8192 (0.82x) untimed"}


@pytest.mark.parametrize("key", sorted(ROWS))
@pytest.mark.parametrize("needs_grad", [False, True], ids=["forward", "fwd_bwd"])
def test_auto_agrees_with_every_h100_row(sm, key, needs_grad):
    """auto_path on sm_90 is "fused" exactly where the defaults' fused median (forward; forward
    + backward) beat the composite's in the log, but for KEPT_COMPOSITE."""
    variant, n, d = key
    r = ROWS[key]
    fwd = r["fwd"][_fwd_default(variant, n, d)]
    if needs_grad:
        ratio = r["comp_fb"] / (fwd + r["bwd"][B2.bwd2_index(CUDA0, BF, d, d, n, n, 0)])
    else:
        ratio = r["comp_fwd"] / fwd
    masked = variant != "plain"
    got = ops.auto_path("cuda", BF, masked, needs_grad, n, n, d, d, H100)
    want = "fused" if ratio > 1 and (variant, n, d, needs_grad) not in KEPT_COMPOSITE else "composite"
    assert got == want, (key, needs_grad, round(ratio, 2))
    if (variant, n, d, needs_grad) in KEPT_COMPOSITE:
        assert ratio > 1  # still what the log says; drop the entry once a rule covers it


def test_auto_rule_boundaries(sm):
    a = ops.auto_path
    for dtype in (BF, F16):
        # unmasked forward: d 64 from N 2048, d 128 from N 4096, nothing else
        assert a("cuda", dtype, False, False, 2048, 2048, 64, 64, H100) == "fused"
        assert a("cuda", dtype, False, False, 2047, 2047, 64, 64, H100) == "composite"
        # min(Nq, Nk) decides (every row is square): few queries, many keys is untimed
        assert a("cuda", dtype, False, False, 16, 2048, 64, 64, H100) == "composite"
        assert a("cuda", dtype, False, False, 2048, 16, 64, 64, H100) == "composite"
        assert a("cuda", dtype, False, False, 2048, 8192, 64, 64, H100) == "fused"
        assert a("cuda", dtype, False, False, 1 << 15, 1 << 15, 64, 64, H100) == "fused"
        assert a("cuda", dtype, False, False, 4096, 4096, 128, 128, H100) == "fused"
        assert a("cuda", dtype, False, False, 4095, 4095, 128, 128, H100) == "composite"
        for d, dv in ((32, 32), (40, 40), (96, 96), (64, 32), (128, 64)):
            assert a("cuda", dtype, False, False, 8192, 8192, d, dv, H100) == "composite", (d, dv)
        assert a("cuda", dtype, False, False, 8192, 8192, None, None, H100) == "composite"
        # unmasked with grad: composite everywhere
        for n, d in ((2048, 64), (8192, 64), (4096, 128), (16, 64)):
            assert a("cuda", dtype, False, True, n, n, d, d, H100) == "composite", (n, d)
        # masked with grad: N <= 16 (first version), d 64 from N 2048 (second)
        assert a("cuda", dtype, True, True, 16, 16, 128, 128, H100) == "fused"
        assert a("cuda", dtype, True, True, 17, 17, 64, 64, H100) == "composite"
        assert a("cuda", dtype, True, True, 2047, 2047, 64, 64, H100) == "composite"
        assert a("cuda", dtype, True, True, 2048, 2048, 64, 64, H100) == "fused"
        assert a("cuda", dtype, True, True, 16, 2048, 64, 64, H100) == "composite"
        assert a("cuda", dtype, True, True, 8192, 8192, 128, 128, H100) == "composite"
        # masked without grad: every N, every head dim
        for n in (8, 1024, 4096, 1 << 15):
            assert a("cuda", dtype, True, False, n, n, 128, 128, H100) == "fused"
    for dtype in (torch.float32, torch.float64):
        for masked in (False, True):
            for grad in (False, True):
                assert a("cuda", dtype, masked, grad, 8192, 8192, 64, 64, H100) == "composite"


@pytest.mark.parametrize("cap", [(8, 0), (8, 9), (10, 0)])
def test_auto_second_version_classes_only_on_sm90(sm, cap):
    """Other cards keep the first run's rule: the second version does not run there by default,
    and nothing of it was timed there."""
    a = ops.auto_path
    assert a("cuda", BF, False, False, 8192, 8192, 64, 64, cap) == "composite"
    assert a("cuda", BF, True, True, 8192, 8192, 64, 64, cap) == "composite"
    assert a("cuda", BF, True, False, 8192, 8192, 64, 64, cap) == "fused"
    assert a("cuda", BF, True, True, 16, 16, 64, 64, cap) == "fused"


V2_CLASSES = [  # (masked, needs_grad, d, N): a call of each second-run class, fused on an H100
    (False, False, 64, 8192), (False, False, 128, 4096), (True, True, 64, 2048)]
RUN1_CLASSES = [(True, False, 64, 8192), (True, True, 64, 16)]  # applied on every NVIDIA card


@pytest.mark.parametrize("force", ["impl_v2", "v2_dtypes"])
@pytest.mark.parametrize("cap", [(7, 5), (8, 0), (8, 9), (10, 0), (12, 0), None])
def test_auto_second_version_classes_need_sm90_whatever_forces_the_version(sm, monkeypatch,
                                                                             force, cap):
    """$DTL_FAST_ATTN_IMPL=v2 (or V2_DTYPES) runs the second version on any card under `fused`
    (attn_version), but auto's second-run classes stay on sm_90, where they were timed: the
    check is auto_path's own, not attn_version's."""
    if force == "impl_v2":
        monkeypatch.setattr(ops, "ATTN_IMPL", "v2")
    monkeypatch.setattr(ops, "V2_DTYPES", ops.V2_CANDIDATE_DTYPES)  # as the import sets them
    a = ops.auto_path
    for masked, grad, d, n in V2_CLASSES:
        assert ops.attn_version(BF, n, n, cap) == "v2"  # what `fused` runs
        assert a("cuda", BF, masked, grad, n, n, d, d, cap) == "composite", (masked, grad, d, n)
        assert a("cuda", BF, masked, grad, n, n, d, d, H100) == "fused", (masked, grad, d, n)
    for masked, grad, d, n in RUN1_CLASSES:
        assert a("cuda", BF, masked, grad, n, n, d, d, cap) == "fused", (masked, grad, d, n)
    assert "on NVIDIA sm_90 only" in ops.auto_rule()  # the text stays true under the knob


@pytest.mark.parametrize("m", [1, 8, 64])
def test_auto_second_version_classes_without_memory_slots(sm, m):
    """The H100 rows had no memory slots; with slots the kernels run untimed tiles (pointer loads
    at d 64: 0.97x the composite at plain N 8192): the composite. Run 1's masked classes keep
    the kernels (its rows had slots)."""
    a = ops.auto_path
    for masked, grad, d, n in V2_CLASSES:
        assert a("cuda", BF, masked, grad, n, n, d, d, H100, m) == "composite", (masked, grad, d, m)
        assert a("cuda", BF, masked, grad, n, n, d, d, H100, 0) == "fused", (masked, grad, d)
        assert a("cuda", BF, masked, grad, n, n, d, d, H100) == "fused"  # m defaults to 0
    for masked, grad, d, n in RUN1_CLASSES:
        assert a("cuda", BF, masked, grad, n, n, d, d, H100, m) == "fused", (masked, grad, d, m)


def test_auto_second_version_classes_are_the_measured_class(sm):
    """Wherever auto fuses outside the first run's classes, the kernels run exactly what the
    H100 rows timed: the second version with kernels/cosine_attention_fwd.sm90_measured's
    tiles (no memory slots, d = dv, the shortest N timed), square or not."""
    a = ops.auto_path
    ns = (16, 2047, 2048, 4095, 4096, 8192)
    checked = 0
    for masked, grad in ((False, False), (True, True), (False, True)):
        for d, dv in ((64, 64), (128, 128), (64, 128), (32, 32)):
            for nq in ns:
                for nk in ns:
                    for m in (0, 8):
                        if a("cuda", BF, masked, grad, nq, nk, d, dv, H100, m) != "fused":
                            continue
                        if masked and grad and max(nq, nk) <= ops.AUTO_FUSED_GRAD_MAX_N:
                            continue  # run 1's
                        checked += 1
                        assert ops.attn_version(BF, nq, nk, H100) == "v2"
                        assert F2.sm90_measured(CUDA0, BF, d, dv, nq, nk, m), (nq, nk, d, dv, m)
                        assert min(nq, nk) >= F2.SM90_MEASURED_MIN_N[d]
    assert checked == 4 + 16 + 16  # d 128 from 4096 (unmasked); d 64 from 2048 (both classes)


@pytest.mark.parametrize("cap", [(9, 0), (9, 4), (9, 5)], ids=["MI210", "MI300", "MI350"])
def test_rocm_is_not_sm90(sm, monkeypatch, cap):
    """ROCm builds report (9, x) for MI210 / MI300 / MI350: no second version by default, no
    TMA, no H100 tiles, and auto takes the composite for every class (nothing compiled or timed
    for AMD); `fused` still runs the first version, or the second where forced."""
    sm(cap)
    monkeypatch.setattr(torch.version, "hip", "6.4.0")
    assert ops.attn_version(BF, 8192, 8192, cap) == "v1"
    assert not ops._sm90(cap)
    a = ops.auto_path
    for masked, grad, d, n in V2_CLASSES + RUN1_CLASSES:
        assert a("cuda", BF, masked, grad, n, n, d, d, cap) == "composite", (masked, grad, d, n)
    assert not F2.sm90_measured(CUDA0, BF, 64, 64, 8192, 8192, 0)
    assert not F2.use_tma(CUDA0, BF, 64, 64, 8192, 8192, 0, False)
    assert F2.fwd2_index(CUDA0, BF, 64, 64, 8192, 8192, 0, False) == 0
    assert B2.bwd2_index(CUDA0, BF, 64, 64, 8192, 8192, 0) == 0
    monkeypatch.setenv(F2.TMA_ENV, "1")  # forced: only where it can run (Hopper)
    assert not F2.use_tma(CUDA0, BF, 64, 64, 8192, 8192, 0, False)
    monkeypatch.setattr(ops, "V2_DTYPES", ops.V2_CANDIDATE_DTYPES)
    assert ops.attn_version(BF, 8192, 8192, cap) == "v2"  # the `fused` knob still forces it
    assert a("cuda", BF, False, False, 8192, 8192, 64, 64, cap) == "composite"
    assert "ROCm" in ops.auto_rule()


def test_auto_needs_triton(sm, monkeypatch):
    """Where Triton cannot run (here: cannot be imported), auto takes the composite for every
    class, where `fused` would raise."""
    from dtl_fast import _triton
    a = ops.auto_path
    for masked, grad, d, n in V2_CLASSES + RUN1_CLASSES:
        assert a("cuda", BF, masked, grad, n, n, d, d, H100) == "fused"
    monkeypatch.setattr(_triton, "_IMPORT_ERROR", ["ImportError: no triton"])
    assert not _triton.can_run_triton("cuda")
    for cap in (H100, (8, 0)):
        for masked, grad, d, n in V2_CLASSES + RUN1_CLASSES:
            assert a("cuda", BF, masked, grad, n, n, d, d, cap) == "composite", (cap, masked, grad)


def test_auto_under_forced_first_version(sm, monkeypatch):
    """$DTL_FAST_ATTN_IMPL=v1: only the first run's rule (its kernels lost every unmasked row)."""
    monkeypatch.setattr(ops, "ATTN_IMPL", "v1")
    a = ops.auto_path
    assert a("cuda", BF, False, False, 8192, 8192, 64, 64, H100) == "composite"
    assert a("cuda", BF, True, True, 8192, 8192, 64, 64, H100) == "composite"
    assert a("cuda", BF, True, False, 8192, 8192, 64, 64, H100) == "fused"
    assert "second version" not in ops.auto_rule()


def test_auto_rule_text_names_both_runs(sm):
    text = ops.auto_rule()
    for s in (ops.AUTO_RULE_CARD, ops.AUTO_RULE_RUN, ops.AUTO_V2_RULE_CARD, ops.AUTO_V2_RULE_RUN,
              "SDPA", "d=64 min(Nq,Nk)>=2048", "d=128 min(Nq,Nk)>=4096",
              f"N <= {ops.AUTO_FUSED_GRAD_MAX_N}", "on NVIDIA sm_90 only", "without memory slots",
              "applied on every NVIDIA card", "ROCm", "no Triton"):
        assert s in text, s
    # the numbers the text states are the table's; both runs' cards were sm_90
    assert ops.AUTO_V2_MIN_N == {(True, True): {64: 2048}, (False, False): {64: 2048, 128: 4096}}
    assert ops.AUTO_RULE_CAPABILITY == ops.AUTO_V2_RULE_CAPABILITY == (9, 0)
    assert text.count("sm_90") >= 3
    # the second run's classes sit inside what the H100 rows timed (kernels' SM90_MEASURED_MIN_N)
    for classes in ops.AUTO_V2_MIN_N.values():
        for d, n in classes.items():
            assert n >= F2.SM90_MEASURED_MIN_N[d]
