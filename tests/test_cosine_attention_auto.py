"""backend="auto" of cosine_attention: the CUDA rule (fused kernel only where it measured faster
than the normalise + SDPA composite) against the committed GPU rows it was derived from, how the
op feeds it (mask, grad), its one-line description, and on a GPU which path really ran."""
import csv
import os
import importlib
from pathlib import Path

import pytest
import torch

from dtl_fast.ops.cosine_attention import auto_path, auto_rule, cosine_attention, cosine_attention_composite

from _helpers import HAS_CUDA

# the module (dtl_fast.ops re-exports the function under the same name)
ops = importlib.import_module("dtl_fast.ops.cosine_attention")

CSV = Path(__file__).resolve().parent.parent / "bench" / "results" / "cosine_attention.csv"
DT = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def _measured_rows():
    """(variant, B, H, N, d, dtype, mode, fused / composite ratio) of the rule's run."""
    with open(CSV, newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["run_id"] == ops.AUTO_RULE_RUN
                and r["provider"] == "dtl_fast" and r["status"] == "ok" and r["device"] == "cuda"]
    out = []
    for r in rows:
        assert r["device_name"] == ops.AUTO_RULE_CARD, r
        B, H, N, d = (int(x) for x in r["shape"].split("x"))
        out.append((r["variant"], B, H, N, d, r["dtype"], r["mode"], float(r["ratio"])))
    return out


H200 = (9, 0)  # the first run's card (an NVIDIA H200) is sm_90


@pytest.mark.parametrize("impl", ["v1", "auto"])
def test_rule_agrees_with_every_measured_row(monkeypatch, impl):
    """The first run's rows timed the first kernels: fused exactly where they measured it
    faster, the composite elsewhere, for every row when the first version is forced
    ($DTL_FAST_ATTN_IMPL=v1), and by default for every row the first version still runs (the
    rest is the second version's, tests/test_attention_dispatch.py)."""
    monkeypatch.setattr(ops, "ATTN_IMPL", impl)
    monkeypatch.setattr(ops, "V2_DTYPES", ())
    rows = _measured_rows()
    assert len(rows) >= 14, f"the rule's run has only {len(rows)} rows in {CSV}"
    checked = 0
    for variant, B, H, N, d, dtype, mode, ratio in rows:
        if ops.attn_version(DT[dtype], N, N, H200) != "v1":
            continue
        checked += 1
        path = auto_path("cuda", DT[dtype], variant != "plain", mode != "forward", N, N, d, d, H200)
        want = "fused" if ratio > 1.0 else "composite"
        assert path == want, f"{variant} {B}x{H}x{N}x{d} {dtype} {mode}: ratio {ratio} -> {path}"
    assert checked == len(rows) if impl == "v1" else checked >= 8


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("needs_grad", [False, True], ids=["nograd", "grad"])
@pytest.mark.parametrize("masked", [False, True], ids=["plain", "masked"])
@pytest.mark.parametrize("n", [8, 16, 17, 64, 1024, 16384])
def test_rule_table(dtype, needs_grad, masked, n):
    """Without the head dims (d None: what a caller that does not know them gets) or on a card
    that is not sm_90, the first run's rule alone; the second run's classes:
    tests/test_attention_dispatch.py."""
    half = dtype in (torch.bfloat16, torch.float16)
    want = "fused" if half and masked and (not needs_grad or n <= 16) else "composite"
    assert auto_path("cuda", dtype, masked, needs_grad, n, n, capability=H200) == want
    assert auto_path("cuda", dtype, masked, needs_grad, n, n, 64, 64, (8, 0)) == want
    # max(Nq, Nk) decides: a long key side with 16 queries is not "short"
    if half and masked and needs_grad:
        assert auto_path("cuda", dtype, masked, True, 16, 17, capability=H200) == "composite"
        assert auto_path("cuda", dtype, masked, True, 16, 16, capability=H200) == "fused"


def test_rule_on_cpu_is_the_cpu_path():
    for masked in (False, True):
        for grad in (False, True):
            assert auto_path("cpu", torch.bfloat16, masked, grad, 16, 16) == ops.CPU_AUTO_PATH


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32], ids=str)
def test_meta_key_lengths_tensor_on_every_eager_path(dtype):
    # meta key_lengths ([B] and [B, H], as the RNN's meta lengths, s28): auto (the CPU path's
    # composite on meta) and reference give meta outputs of the reference's shape, fused names
    # its own limit, and the range check, which reads values, skips them
    from dtl_fast._checks import check_lengths_range
    B, H, Nq, Nk, d = 2, 3, 4, 5, 8
    q, k, v = (torch.empty(B, H, n, d, device="meta") for n in (Nq, Nk, Nk))
    ls = torch.empty(H, device="meta")
    for lens in (torch.tensor([5, 2], dtype=dtype, device="meta"),
                 torch.zeros(B, H, dtype=dtype, device="meta")):
        check_lengths_range(lens, 0, Nk, owner="cosine_attention")
        for backend in ("auto", "reference"):
            out = cosine_attention(q, k, v, ls, lens, 2, backend=backend)
            assert out.device.type == "meta" and out.shape == (B, H, Nq, d), backend
        with pytest.raises(RuntimeError, match="do not support meta tensors"):
            cosine_attention(q, k, v, ls, lens, backend="fused")


def test_auto_rule_text():
    text = auto_rule()
    assert 1 <= len(text.splitlines()) <= 3
    assert ops.AUTO_RULE_CARD in text and ops.AUTO_RULE_RUN in text and "SDPA" in text
    # the first run's classes: measured on one sm_90 card, applied on every NVIDIA card (said)
    assert "measured on NVIDIA H200 sm_90 only" in text and "applied on every NVIDIA card" in text


def test_few_queries_many_keys_take_the_composite():
    """Every H100 row is square (Nq = Nk): 16 queries against 2048 keys, unmasked and without a
    gradient, is untimed and runs the composite on an sm_90 card (the second run's classes key
    on min(Nq, Nk))."""
    bf = torch.bfloat16
    for nq, nk in ((16, 2048), (2048, 16), (1, 8192)):
        assert auto_path("cuda", bf, False, False, nq, nk, 64, 64, (9, 0)) == "composite"
    if ops.ATTN_IMPL != "v1":  # square: the second run's class
        assert auto_path("cuda", bf, False, False, 2048, 2048, 64, 64, (9, 0)) == "fused"


@pytest.mark.parametrize("grad_mode,requires,lens,window,want_grad,want_masked", [
    (True, True, None, None, True, False),
    (False, True, [5, 3], None, False, True),  # torch.no_grad(): nothing is recorded
    (True, False, None, 2, False, True),  # no input requires grad
    # per head: any window or lengths is a mask; a window of None for every head is none
    (False, False, None, [None, 2], False, True),
    (False, False, None, torch.tensor([-1, -1]), False, True),  # a tensor is not read for this
    (False, False, torch.tensor([[5, 5], [3, 0]]), None, False, True),
    (False, False, None, [None, -1], False, False),
])
def test_op_feeds_the_rule(monkeypatch, grad_mode, requires, lens, window, want_grad, want_masked):
    seen = []

    def spy(device_type, dtype, masked, needs_grad, nq, nk, d, dv, capability, m):
        seen.append((device_type, dtype, masked, needs_grad, nq, nk, d, dv, capability, m))
        return "composite"

    monkeypatch.setattr(ops, "auto_path", spy)
    q, k, v = torch.randn(2, 2, 4, 8), torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 6)
    ls = torch.zeros(2, requires_grad=requires)
    with torch.set_grad_enabled(grad_mode):
        out = cosine_attention(q, k, v, ls, lens, window, backend="auto")
    assert seen == [("cpu", torch.float32, want_masked, want_grad, 4, 5, 8, 6, None, 0)]
    assert torch.equal(out, cosine_attention_composite(q, k, v, ls.detach(), lens, window))
    # memory slots: their count (the second run's classes hold without slots only)
    seen.clear()
    mk, mv = torch.randn(2, 3, 8), torch.randn(2, 3, 6)
    with torch.set_grad_enabled(grad_mode):
        out = cosine_attention(q, k, v, ls, lens, window, mk, mv, backend="auto")
    assert seen == [("cpu", torch.float32, want_masked, want_grad, 4, 5, 8, 6, None, 3)]
    assert torch.equal(out, cosine_attention_composite(q, k, v, ls.detach(), lens, window, mk, mv))
    # "fused" and "reference" never ask the rule
    seen.clear()
    cosine_attention(q, k, v, ls, lens, window, backend="reference")
    assert seen == []


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_gpu_auto_dispatch():
    """On CUDA, auto gives bit for bit what the path the rule names gives."""
    g = torch.Generator(device="cuda").manual_seed(0)
    B, H, N, d = 4, 8, 1024, 64
    q, k, v = (torch.randn(B, H, N, d, device="cuda", generator=g).to(torch.bfloat16) for _ in range(3))
    ls = torch.full((H,), 2.0, device="cuda")
    lens = torch.tensor([N, 700, 5, 1000], device="cuda")

    def run(backend, lens, window, grad):
        leaves = [t.detach().clone().requires_grad_(grad) for t in (q, k, v, ls)]
        with torch.set_grad_enabled(grad):
            if backend == "composite":
                out = cosine_attention_composite(*leaves, lens, window)
            else:
                out = cosine_attention(*leaves, lens, window, backend=backend)
        return out.detach()

    cases = [(lens, None, False, "fused"), (None, 64, False, "fused"), (lens, None, True, "composite"),
             (None, None, False, "composite"), (None, None, True, "composite")]
    for lens_, window, grad, want in cases:
        assert auto_path("cuda", q.dtype, lens_ is not None or window is not None, grad, N, N,
                         d, d) == want
        got = run("auto", lens_, window, grad)
        other = "composite" if want == "fused" else "fused"
        assert torch.equal(got, run(want, lens_, window, grad)), (lens_ is not None, window, grad, want)
        assert not torch.equal(got, run(other, lens_, window, grad)), "the two paths agree bit for bit"


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("window", [None, 256], ids=["plain", "win256"])
def test_gpu_second_version_defaults_on_sm90(monkeypatch, window, poison):
    """On an sm_90 card, a bf16 call at N 2048, d 64 runs the second version with the H100
    rows' defaults (tests/test_attention_dispatch.py): the forward with TMA and candidate 0
    without a window, pointer loads and candidate 2 with one; the backward candidate 2; within
    the GPU tolerance of the float64 reference. And `auto` picks what the rule says, bit for
    bit the path it names."""
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the second version's defaults: sm_90 only")
    from dtl_fast.kernels import cosine_attention_bwd as B2
    from dtl_fast.kernels import cosine_attention_fwd as F2
    from test_cosine_attention import NAMES, forward_backward, fused, gpu_tol, leaves, make_inputs, ref64

    from _helpers import assert_rel_close
    monkeypatch.delenv(F2.TMA_ENV, raising=False)
    assert ops.ATTN_IMPL == "auto", "run without $DTL_FAST_ATTN_IMPL"
    seen = []
    for mod, name in ((F2, "fwd2_index"), (B2, "bwd2_index"), (F2, "tma_descriptors")):
        real = getattr(mod, name)
        monkeypatch.setattr(mod, name, lambda *a, _r=real, _n=name: seen.append(
            (_n, _r(*a) if _n != "tma_descriptors" else None)) or _r(*a))
    B, H, N, d = 2, 8, 2048, 64
    inputs = make_inputs(B, H, N, N, d, d, None, dtype=torch.bfloat16, device="cuda")
    lens = torch.tensor([N, 1500], device="cuda")
    grad = torch.randn(B, H, N, d, device="cuda").to(torch.bfloat16)
    with poison():
        got = forward_backward(fused, leaves(inputs), lens, window, grad)
    names = [n for n, _ in seen]
    want_fwd = 2 if window else 0
    assert ("fwd2_index", want_fwd) in seen and ("bwd2_index", 2) in seen, seen
    assert ("tma_descriptors" in names) == (window is None), seen
    want = ref64(inputs, lens, window, grad)
    from dtl_fast.ops.cosine_attention import cosine_attention_composite as comp_fn
    comp = forward_backward(comp_fn, leaves(inputs), lens, window, grad)
    for name, a, c, w in zip(NAMES, got, comp, want):
        assert_rel_close(name, a, w, gpu_tol(torch.bfloat16, c, w, N, N))
    # auto at d 64 N 2048: fused with a mask (grad or not) and without one when no gradient is
    # needed; the composite without a mask with a gradient
    q, k, v, ls = inputs[:4]
    for lens_, grad_on, want_path in ((lens, True, "fused"), (None, False, "fused"),
                                      (None, True, "fused" if window else "composite")):
        masked = lens_ is not None or window is not None
        path = auto_path("cuda", q.dtype, masked, grad_on, N, N, d, d)
        assert path == want_path, (lens_ is not None, window, grad_on)
        lv = [t.detach().requires_grad_(grad_on) for t in (q, k, v, ls)]
        with torch.set_grad_enabled(grad_on):
            out = cosine_attention(*lv, lens_, window, backend="auto").detach()
            ref = (cosine_attention(*lv, lens_, window, backend="fused") if want_path == "fused"
                   else cosine_attention_composite(*lv, lens_, window)).detach()
        assert torch.equal(out, ref), (lens_ is not None, window, grad_on)
    torch.cuda.synchronize()


# ---- SDPA on CPUs whose flash kernel cannot pack (AMX under ATEN_CPU_CAPABILITY default / avx2) --

def test_cpu_sdpa_avoids_the_flash_kernel_exactly_where_it_cannot_pack(monkeypatch):
    # ATen's CPU flash kernel packs bfloat16 / float16 blocks for AMX where the CPU has it, with
    # a routine that only its AVX-512 build has: under ATEN_CPU_CAPABILITY=default / avx2 on
    # such a CPU it raises (s33, an Intel Xeon with AMX). The rule: reduced precision, a
    # capability below AVX-512, and the AMX unit the kernel would pack for.
    CA = importlib.import_module("dtl_fast.ops.cosine_attention")  # the module, not the op

    def rule(cap, amx_bf16, amx_fp16, dtype):
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: cap)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx_bf16, raising=False)
        monkeypatch.setattr(torch.cpu, "_is_amx_fp16_supported", lambda: amx_fp16, raising=False)
        CA._cpu_sdpa_needs_math_cached.cache_clear()
        try:
            return CA._cpu_sdpa_needs_math_cached(dtype)
        finally:
            CA._cpu_sdpa_needs_math_cached.cache_clear()

    assert rule("DEFAULT", True, False, torch.bfloat16)
    assert rule("AVX2", True, False, torch.bfloat16)
    assert not rule("AVX512", True, True, torch.bfloat16)  # the kernel has its packing there
    assert not rule("DEFAULT", False, False, torch.bfloat16)  # no AMX: nothing is packed
    assert not rule("DEFAULT", True, False, torch.float16)  # AMX without its float16 unit
    assert rule("DEFAULT", True, True, torch.float16)
    assert not rule("DEFAULT", True, True, torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cpu_composite_through_float32_sdpa_is_the_composite(monkeypatch, dtype):
    # Where the flash kernel cannot run, the composite calls SDPA on float32 copies (the boolean
    # mask converted by the public call, not read as an additive one): within the dtype's rounding
    # of the float32 composite, masked keys, windows and empty rows included, gradients too.
    CA = importlib.import_module("dtl_fast.ops.cosine_attention")  # the module, not the op

    torch.manual_seed(0)
    B, H, N, d = 2, 2, 96, 16
    # inputs exactly representable in `dtype`, and moderate per-head scales (exp(0), exp(1)), so
    # the float32 composite differs only by the roundings inside the reduced-precision one
    q, k, v = (torch.randn(B, H, N, d).to(dtype).float() for _ in range(3))
    scale = torch.tensor([0.0, 1.0])
    lens = torch.tensor([96, 0])
    want = cosine_attention_composite(q, k, v, scale, lens, 7)
    monkeypatch.setattr(CA, "_cpu_sdpa_needs_math", lambda dt: True)
    leaves = [t.to(dtype).requires_grad_(True) for t in (q, k, v)]
    got = cosine_attention_composite(*leaves, scale, lens, 7)
    assert got.dtype == dtype
    eps = torch.finfo(dtype).eps  # qn / kn and the output rounded once each: a few eps
    torch.testing.assert_close(got.float(), want, atol=4 * eps, rtol=4 * eps)
    assert torch.equal(got[1], torch.zeros_like(got[1]))  # no keys: zeros
    got.float().sum().backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in leaves)


def test_cpu_float32_sdpa_detour_keeps_float64_under_autocast(monkeypatch):
    # CPU autocast leaves float64 alone, so the detour must not round float64 inputs to the
    # autocast dtype (s33: it took autocast's bfloat16 for them): under bfloat16 autocast,
    # float64 comes back at float64 precision, value and gradients.
    CA = importlib.import_module("dtl_fast.ops.cosine_attention")  # the module, not the op

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 2, 80, 16, dtype=torch.float64, requires_grad=True)
               for _ in range(3))
    scale, lens = torch.tensor([0.5, 1.0]), torch.tensor([80, 33])
    want = cosine_attention_composite(q, k, v, scale, lens, 7)
    want_grads = torch.autograd.grad(want.sum(), (q, k, v))
    monkeypatch.setattr(CA, "_cpu_sdpa_needs_math", lambda dt: True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = cosine_attention_composite(q, k, v, scale, lens, 7)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)  # float32 math, not bfloat16
    for g, w in zip(torch.autograd.grad(got.sum(), (q, k, v)), want_grads):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


def test_cpu_composite_runs_in_bfloat16_under_every_aten_capability(tmp_path):
    # End to end in fresh processes (ATEN_CPU_CAPABILITY is read at start-up): the composite in
    # bfloat16 at 64+ keys, where ATen's flash kernel packs for AMX. On a CPU without AMX this
    # passes trivially; on one with AMX it raised "pack_vnni2 is only supported when avx512 is
    # supported" under default / avx2 before s33.
    import subprocess
    import sys

    code = "\n".join([
        "import torch",
        "from dtl_fast.ops.cosine_attention import cosine_attention_composite as f",
        "q = torch.randn(2, 2, 128, 32, dtype=torch.bfloat16)",
        "y = f(q, q, q, torch.tensor([3.0, 3.0]), torch.tensor([128, 70]))",
        "assert torch.isfinite(y).all() and y.dtype == torch.bfloat16",
        # and under CPU autocast, which runs SDPA in bfloat16 whatever the inputs' dtype (the
        # composite returns q's dtype)
        "x = q.float()",
        "with torch.autocast('cpu', dtype=torch.bfloat16):",
        "    z = f(x, x, x, torch.tensor([3.0, 3.0]), torch.tensor([128, 70]))",
        "assert torch.isfinite(z).all() and z.dtype == torch.float32",
        "print(torch.backends.cpu.get_cpu_capability())"])
    for cap in ("default", "avx2"):
        env = dict(os.environ, ATEN_CPU_CAPABILITY=cap)
        r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                           timeout=300)
        assert r.returncode == 0, (cap, r.stderr[-2000:])
        assert r.stdout.split()[-1] == cap.upper(), (cap, r.stdout)  # ATen took the override
