"""backend="auto" of cosine_attention: the CUDA rule (fused kernel only where it measured faster
than the normalise + SDPA composite) against the committed GPU rows it was derived from, how the
op feeds it (mask, grad), its one-line description, and on a GPU which path really ran."""
import csv
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


def test_rule_agrees_with_every_measured_row():
    """Fused exactly where the committed rows measured it faster; the composite elsewhere."""
    rows = _measured_rows()
    assert len(rows) >= 14, f"the rule's run has only {len(rows)} rows in {CSV}"
    for variant, B, H, N, d, dtype, mode, ratio in rows:
        path = auto_path("cuda", DT[dtype], variant != "plain", mode != "forward", N, N)
        want = "fused" if ratio > 1.0 else "composite"
        assert path == want, f"{variant} {B}x{H}x{N}x{d} {dtype} {mode}: ratio {ratio} -> {path}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("needs_grad", [False, True], ids=["nograd", "grad"])
@pytest.mark.parametrize("masked", [False, True], ids=["plain", "masked"])
@pytest.mark.parametrize("n", [8, 16, 17, 64, 1024, 16384])
def test_rule_table(dtype, needs_grad, masked, n):
    path = auto_path("cuda", dtype, masked, needs_grad, n, n)
    half = dtype in (torch.bfloat16, torch.float16)
    want = "fused" if half and masked and (not needs_grad or n <= 16) else "composite"
    assert path == want
    # max(Nq, Nk) decides: a long key side with 16 queries is not "short"
    if half and masked and needs_grad:
        assert auto_path("cuda", dtype, masked, True, 16, 17) == "composite"
        assert auto_path("cuda", dtype, masked, True, 16, 16) == "fused"


def test_rule_on_cpu_is_the_cpu_path():
    for masked in (False, True):
        for grad in (False, True):
            assert auto_path("cpu", torch.bfloat16, masked, grad, 16, 16) == ops.CPU_AUTO_PATH


def test_auto_rule_text():
    text = auto_rule()
    assert 1 <= len(text.splitlines()) <= 2
    assert ops.AUTO_RULE_CARD in text and ops.AUTO_RULE_RUN in text and "SDPA" in text


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

    def spy(device_type, dtype, masked, needs_grad, nq, nk):
        seen.append((device_type, dtype, masked, needs_grad, nq, nk))
        return "composite"

    monkeypatch.setattr(ops, "auto_path", spy)
    q, k, v = torch.randn(2, 2, 4, 8), torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8)
    ls = torch.zeros(2, requires_grad=requires)
    with torch.set_grad_enabled(grad_mode):
        out = cosine_attention(q, k, v, ls, lens, window, backend="auto")
    assert seen == [("cpu", torch.float32, want_masked, want_grad, 4, 5)]
    assert torch.equal(out, cosine_attention_composite(q, k, v, ls.detach(), lens, window))
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
        assert auto_path("cuda", q.dtype, lens_ is not None or window is not None, grad, N, N) == want
        got = run("auto", lens_, window, grad)
        other = "composite" if want == "fused" else "fused"
        assert torch.equal(got, run(want, lens_, window, grad)), (lens_ is not None, window, grad, want)
        assert not torch.equal(got, run(other, lens_, window, grad)), "the two paths agree bit for bit"


def test_second_version_is_opt_in_until_measured(monkeypatch):
    """The auto rule's rows timed the first kernels, so the second version runs only when asked
    for ($DTL_FAST_ATTN_IMPL=v2); anything else is an error naming the variable."""
    mod = ops
    monkeypatch.delenv("DTL_FAST_ATTN_IMPL", raising=False)
    assert mod._v2_dtypes() == ()
    monkeypatch.setenv("DTL_FAST_ATTN_IMPL", "v2")
    assert set(mod._v2_dtypes()) == {torch.float16, torch.bfloat16, torch.float64}
    monkeypatch.setenv("DTL_FAST_ATTN_IMPL", "v3")
    with pytest.raises(ValueError, match="DTL_FAST_ATTN_IMPL"):
        mod._v2_dtypes()
