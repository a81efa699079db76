"""The package around the kernels: info(), the command line, the test helpers themselves."""
import json
import os
import subprocess
import sys

import torch

import dtl_fast

from _helpers import assert_rel_close


def test_info_reports_build_and_backends():
    data = dtl_fast.info()
    assert data["torch"] == torch.__version__
    assert data["cpp_kernels_built"] is True, data["extension_error"]
    assert data["ops"]["frame_pool"]["cpu"].startswith("C++ kernel")
    assert isinstance(data["cuda_kernels_built"], bool)
    if os.environ.get("DTL_FAST_REQUIRE_CUDA") == "1":  # CI: the CUDA part must have been built
        assert data["cuda_kernels_built"] is True
        assert torch._C._dispatch_has_kernel_for_dispatch_key("dtl_fast::frame_pool", "CUDA")
    assert data["cpu_kernel_isa"] in ("avx2", "baseline")
    if not torch.cuda.is_available():
        assert data["ops"]["frame_pool"]["cuda"] == "no CUDA device"
    assert data["ops"]["lstm"]["cpu"].startswith("PyTorch native RNN")
    assert data["ops"]["gru"]["cpu"].startswith("PyTorch native RNN")
    assert "SDPA" in data["ops"]["cosine_attention"]["cpu"]


def test_info_follows_the_backend_variable(monkeypatch):
    monkeypatch.setenv("DTL_FAST_BACKEND", "fused")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert dtl_fast.info()["ops"]["lstm"]["cpu"] == "Triton kernel (interpreter)"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert "TRITON_INTERPRET=1" in dtl_fast.info()["ops"]["cosine_attention"]["cpu"]
    monkeypatch.setenv("DTL_FAST_BACKEND", "reference")
    assert dtl_fast.info()["ops"]["gru"]["cpu"].startswith("eager reference")


def test_public_api():
    for name in ("LSTM", "GRU", "CosineAttention", "FeatureExchange", "DualModalAttention",
                 "FramePool", "swap_modules"):
        assert hasattr(dtl_fast.nn, name), name
    for name in ("lstm", "gru", "cosine_attention", "frame_pool"):
        assert callable(getattr(dtl_fast.ops, name)) and callable(getattr(dtl_fast.reference, name)), name
    assert dtl_fast.swap_modules is dtl_fast.nn.swap_modules


def test_cli_info_and_help():
    out = subprocess.run([sys.executable, "-m", "dtl_fast.cli", "info", "--json"],
                         capture_output=True, text=True, check=True).stdout
    assert json.loads(out)["dtl_fast"] == dtl_fast.__version__
    for argv in (["--help"], ["info", "--help"], ["demo", "--help"]):
        res = subprocess.run([sys.executable, "-m", "dtl_fast.cli", *argv], capture_output=True, text=True)
        assert res.returncode == 0 and "usage: dtl-fast" in res.stdout
    res = subprocess.run([sys.executable, "-m", "dtl_fast.cli"], capture_output=True, text=True)
    assert res.returncode != 0 and "COMMAND" in res.stderr


def test_demo_runs_and_masking_matters():
    from dtl_fast import demo

    result = demo.run(batch=64, max_len=12, repeats=2)
    assert result["max_abs_diff"] < 1e-5
    assert result["accuracy_masked"] > 0.9 > result["accuracy_padded"]


def test_poisoned_outputs_fill_uninitialised_memory(poison):
    with poison():
        assert torch.isnan(torch.empty(4)).all()
        assert (torch.empty(2, dtype=torch.int32) == torch.iinfo(torch.int32).max).all()
    assert not torch.are_deterministic_algorithms_enabled()


def test_assert_rel_close_catches_errors():
    ref = torch.ones(4, dtype=torch.float64)
    assert_rel_close("same", ref.float(), ref, 1e-7)
    for bad in (ref * 1.01, torch.tensor([1.0, float("nan"), 1.0, 1.0]), torch.ones(5)):
        try:
            assert_rel_close("bad", bad, ref, 1e-3)
        except AssertionError:
            continue
        raise AssertionError(f"assert_rel_close accepted {bad}")
