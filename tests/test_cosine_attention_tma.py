"""The TMA variant of the second cosine-attention forward (kernels/cosine_attention_fwd.py:
USE_TMA / TMA_V of _cos_attn_fwd2_kernel, host tensor descriptors).

- The switch: only on a CUDA device of compute capability 9.x, for float16 / bfloat16, with a
  Triton that has tensor descriptors; there on where the H100 rows timed it faster (d 64, no
  window: tests/test_attention_dispatch.py checks that rule against the log), forced on by
  $DTL_FAST_ATTN_TMA=1 and off by =0; a bad value of the env var is an error naming it.
- The interpreter (TRITON_INTERPRET=1) runs host tensor descriptors in triton 3.6 and 3.8, so
  the TMA code itself runs here on CPU tensors: bit-identical to the pointer path (the same
  values reach the same arithmetic: a descriptor's out-of-range rows and columns read as
  zeros, as the masked loads give them) and within the float32 tolerance of the float64
  reference, on shapes with edge, interior, window, key-length and memory blocks, with V by
  descriptor and (strides TMA cannot take) by pointer, and NaN garbage past the key lengths.
- The sm_90 compile (UTMALDG in the SASS, no spills, shared memory) is in
  tests/test_cosine_attention_compile.py (test_v2_forward_compiles_..., TMA configs).
- A `gpu` test on an sm_90 card: TMA on vs off vs the float64 reference at real sizes."""
import importlib

import pytest
import torch

from dtl_fast.kernels import cosine_attention_fwd as F2

from _helpers import assert_half_close, assert_rel_close, rel_err, unit_roundoff
from test_cosine_attention import make_inputs
from test_cosine_attention_fwd import LONG, fwd2, lse64, want64

ops = importlib.import_module("dtl_fast.ops.cosine_attention")
CUDA0 = torch.device("cuda", 0)  # a device object needs no GPU; the capability is patched


@pytest.fixture
def hopper(monkeypatch):
    """use_tma sees a CUDA device of capability `cap` (default 9.0) and the descriptor API."""
    def set_cap(cap=(9, 0), api=True):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: cap)
        monkeypatch.setattr(F2, "tma_api", lambda: api)
    set_cap()
    return set_cap


# ---------------------------------------------------------------------------------------------
# The switch


MEASURED = (64, 64, 2048, 2048, 0, False)  # d, dv, Nq, Nk, M, window: the H100 rows' class


def test_tma_default_and_env(monkeypatch, hopper):
    """Unset (or ""): on in the measured class only (sizes unknown: off); "0" off; "1" on."""
    for unset in (None, ""):
        if unset is None:
            monkeypatch.delenv(F2.TMA_ENV, raising=False)
        else:
            monkeypatch.setenv(F2.TMA_ENV, unset)
        assert F2.use_tma(CUDA0, torch.bfloat16, *MEASURED)
        assert F2.use_tma(CUDA0, torch.float16, *MEASURED)
        assert not F2.use_tma(CUDA0, torch.bfloat16)
        assert not F2.use_tma(CUDA0, torch.bfloat16, 64, 64, 2048, 2048, 0, True)  # a window
    monkeypatch.setenv(F2.TMA_ENV, "0")
    assert not F2.use_tma(CUDA0, torch.bfloat16, *MEASURED)
    monkeypatch.setenv(F2.TMA_ENV, "1")
    assert F2.use_tma(CUDA0, torch.bfloat16) and F2.use_tma(CUDA0, torch.float16)


@pytest.mark.parametrize("cap", [(8, 0), (8, 9), (10, 0), (12, 0)])
def test_tma_only_on_sm90(monkeypatch, hopper, cap):
    monkeypatch.setenv(F2.TMA_ENV, "1")
    hopper(cap)
    assert not F2.use_tma(CUDA0, torch.bfloat16)
    monkeypatch.delenv(F2.TMA_ENV)
    assert not F2.use_tma(CUDA0, torch.bfloat16, *MEASURED)
    hopper((9, 0))
    assert F2.use_tma(CUDA0, torch.bfloat16, *MEASURED)
    monkeypatch.setenv(F2.TMA_ENV, "1")
    assert F2.use_tma(CUDA0, torch.bfloat16)


def test_tma_off_on_cpu_float32_and_without_the_api(monkeypatch, hopper):
    monkeypatch.setenv(F2.TMA_ENV, "1")
    assert not F2.use_tma(torch.device("cpu"), torch.bfloat16)
    assert not F2.use_tma(CUDA0, torch.float32)
    assert not F2.use_tma(CUDA0, torch.float64)
    hopper((9, 0), api=False)
    assert not F2.use_tma(CUDA0, torch.bfloat16)


def test_this_triton_has_the_api():
    # triton 3.6 (the GPU machine's) and 3.8 (here) both do; a False here would mean the
    # variant silently never runs
    assert F2.tma_api()


@pytest.mark.parametrize("bad", ["2", "yes", "true", "on", " 1"])
def test_bad_env_value_names_the_variable(monkeypatch, bad):
    monkeypatch.setenv(F2.TMA_ENV, bad)
    with pytest.raises(ValueError, match="DTL_FAST_ATTN_TMA"):
        F2.use_tma(torch.device("cpu"), torch.bfloat16)
    # and through the launcher (the long path reads it at each call), even on CPU
    inputs = make_inputs(1, 1, 70, 70, 8, 8)
    with pytest.raises(ValueError, match="DTL_FAST_ATTN_TMA"):
        fwd2(inputs, None, None, short=False)


def test_launcher_asks_the_switch(monkeypatch):
    """tma=None: the launcher builds descriptors exactly when use_tma says so."""
    built = []
    real = F2.tma_descriptors
    monkeypatch.setattr(F2, "tma_descriptors", lambda *a: built.append(1) or real(*a))
    inputs = make_inputs(1, 1, 70, 70, 8, 8)
    monkeypatch.setenv(F2.TMA_ENV, "1")
    fwd2(inputs, None, None, short=False)  # CPU: off although asked
    assert built == []
    monkeypatch.setattr(F2, "use_tma", lambda device, dtype, *sizes: True)
    fwd2(inputs, None, None, short=False)
    assert built == [1]


# ---------------------------------------------------------------------------------------------
# The TMA code in the interpreter


def _spy_tma_v(monkeypatch):
    seen = []
    real = F2.tma_descriptors

    def spy(*a):
        out = real(*a)
        seen.append(out[-1])
        return out
    monkeypatch.setattr(F2, "tma_descriptors", spy)
    return seen


# LONG cases (tests/test_cosine_attention_fwd.py): several query blocks, lower / upper edge and
# interior key blocks, key lengths inside a block and 0, windows, memory across a block; d3_dv5:
# v rows of 20 bytes, not TMA-able (V by pointer with q / k by descriptor)
TMA_CASES = ["plain_odd", "lengths_mem", "window17_lengths", "window_wide_d40_dv24", "d3_dv5"]


@pytest.mark.parametrize("case", TMA_CASES)
def test_tma_matches_pointer_path_and_reference(case, monkeypatch, poison):
    B, H, Nq, Nk, d, dv, M, lens, window = LONG[case]
    inputs = make_inputs(B, H, Nq, Nk, d, dv, M, contiguous=case != "plain_odd")
    seen = _spy_tma_v(monkeypatch)
    with poison():
        out, lse = fwd2(inputs, lens, window, short=False, tma=True)
        out0, lse0 = fwd2(inputs, lens, window, short=False, tma=False)
    assert seen == [case != "d3_dv5"], "V by descriptor exactly when its strides allow"
    assert torch.equal(out, out0) and torch.equal(lse, lse0)
    assert_rel_close("out", out, want64(inputs, lens, window), 1e-5)
    assert_rel_close("lse", lse, lse64(inputs, lens, window), 1e-6)


@pytest.mark.parametrize("fixed", ["always", "never"])
def test_tma_both_softmax_forms(fixed):
    B, H, Nq, Nk, d, dv, M, lens, window = LONG["window17_lengths"]
    inputs = make_inputs(B, H, Nq, Nk, d, dv, M)
    out, lse = fwd2(inputs, lens, window, short=False, tma=True, fixed_max=fixed)
    out0, lse0 = fwd2(inputs, lens, window, short=False, tma=False, fixed_max=fixed)
    assert torch.equal(out, out0) and torch.equal(lse, lse0)
    assert_rel_close("out", out, want64(inputs, lens, window), 1e-5)


def test_tma_ignores_nan_past_the_key_lengths():
    """A descriptor reads whole key blocks: the rows past a batch's key length (inside the
    tensor) are real memory, here NaN. Their logits are masked and their values zeroed, so
    the output equals the one with those rows zeroed (0 * NaN would be NaN)."""
    B, H, N, d = 2, 2, 150, 16
    lens = [150, 70]  # 70: inside the second key block of 64 (a masked edge block)
    inputs = make_inputs(B, H, N, N, d, d)
    clean = [t.clone() if t is not None else None for t in inputs]
    for i in (1, 2):  # k, v
        inputs[i][1, :, 70:] = float("nan")
        clean[i][1, :, 70:] = 0.0
    out, lse = fwd2(inputs, lens, None, short=False, tma=True)
    assert torch.isfinite(out).all()
    want, want_lse = fwd2(clean, lens, None, short=False, tma=False)
    assert torch.equal(out, want) and torch.equal(lse, want_lse)


def test_tma_empty_keys_fall_back_to_pointers(monkeypatch):
    """Nk == 0 (memory slots only): a descriptor cannot describe an empty tensor; the launcher
    uses pointers even when asked for TMA."""
    seen = _spy_tma_v(monkeypatch)
    inputs = make_inputs(1, 2, 70, 0, 8, 8, 5)
    out, _ = fwd2(inputs, None, None, short=False, tma=True)
    assert seen == []
    assert_rel_close("out", out, want64(inputs, None, None), 1e-5)


def test_tma_descriptor_signatures():
    """The AOT signature names descriptors (element type and block) for exactly the arguments
    the launcher passes as descriptors, and puts no divisibility hint on them."""
    for tma_v in (True, False):
        (cfg,) = F2.launch_configs(dtypes=(torch.bfloat16,), head_dims=((64, 64),),
                                   kernels=("_cos_attn_fwd2_kernel",), candidates=False,
                                   tma=((True, tma_v),))
        c, sig = cfg["constexprs"], cfg["signature"]
        bm, bn, bd = c["BLOCK_M"], c["BLOCK_N"], c["BLOCK_D"]
        assert sig["QS"] == f"tensordesc<bf16[1, {bm}, {bd}]>"
        assert sig["KN"] == sig["MKN"] == f"tensordesc<bf16[1, {bn}, {bd}]>"
        want_v = f"tensordesc<bf16[1, 1, {bn}, {bd}]>" if tma_v else "*bf16"
        assert sig["V"] == sig["MV"] == want_v
        descs = {n for n, t in sig.items() if t.startswith("tensordesc")}
        assert not descs & set(cfg["divisible"])
    # float32 has no TMA configuration (TMA_DTYPES), float16 does
    assert not F2.launch_configs(dtypes=(torch.float32,), kernels=("_cos_attn_fwd2_kernel",),
                                 tma=((True, True),))
    assert F2.launch_configs(dtypes=(torch.float16,), kernels=("_cos_attn_fwd2_kernel",),
                             tma=((True, True),))


# ---------------------------------------------------------------------------------------------
# GPU: real sizes, TMA on vs off vs float64


GPU_CASES = {  # B, H, N, d, M, key_lengths, window, v_by_pointer
    "plain_d64": (2, 8, 2048, 64, None, None, None, False),
    "pad_d64": (2, 8, 1024, 64, None, [1024, 700], None, False),
    "win_mem_d128": (2, 4, 1024, 128, 8, None, 256, False),
    "odd_v_strides_d64": (2, 8, 1024, 64, 8, [1024, 333], 64, True),
}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", list(GPU_CASES))
def test_gpu_tma_on_off_and_float64(case, dtype, monkeypatch, poison):
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("TMA variant: sm_90 only")
    B, H, N, d, M, lens, window, v_ptr = GPU_CASES[case]
    inputs = make_inputs(B, H, N, N, d, d, M, dtype=dtype, device="cuda")
    if v_ptr:  # rows of 65 elements: 130 bytes, no TMA stride; V goes by pointer
        inputs[2] = torch.randn(B, H, N, d + 1, device="cuda").to(dtype)[..., :d]
    monkeypatch.setenv(F2.TMA_ENV, "1")
    assert F2.use_tma(inputs[0].device, dtype)
    seen = _spy_tma_v(monkeypatch)
    L = None if lens is None else torch.tensor(lens, dtype=torch.int32, device="cuda")
    with poison():
        out, lse = fwd2(inputs, L, window, short=False)  # tma=None: the switch, on
        out0, lse0 = fwd2(inputs, L, window, short=False, tma=False)
    assert seen == [not v_ptr]
    cpu = [None if t is None else t.cpu() for t in inputs]
    want, want_lse = want64(cpu, lens, window), lse64(cpu, lens, window)
    base = ops.cosine_attention_composite(*inputs[:4], L, window, *inputs[4:]).cpu()
    for name, o in (("out tma", out), ("out pointers", out0)):
        assert_half_close(name, o.cpu(), want, base, dtype)
    # lse: float32 from logits of rows rounded to the input dtype; TMA changes only how the
    # bytes reach shared memory, so it must be as close as the pointer path's
    e0 = rel_err(lse0, want_lse)
    assert e0 <= 1e-2, f"lse (pointers): {e0:.2e}"
    assert_rel_close("lse tma", lse.cpu(), want_lse, 1.5 * e0 + unit_roundoff(torch.float32))
    assert_rel_close("out tma vs pointers", out.float(), out0.float(), unit_roundoff(dtype))
