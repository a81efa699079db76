"""Test setup: Triton runs in its interpreter on CPU tensors when there is no GPU, every test
starts from the same seeds with no backend override, `gpu` tests are skipped without CUDA, and
the `poison` fixture NaN-fills every fresh allocation so unwritten outputs show."""
import contextlib
import os
import random
import re

import torch  # importing torch does not import triton, so the next line still takes effect

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from _helpers import HAS_CUDA  # noqa: E402


# A test whose name or parameters name a half type or autocast gets the `half` marker: CI runs
# those once more under each other CPU capability (.ci/cpu_capabilities.py), because ATen's CPU
# kernels round half-precision work differently under each. The name, not the body: bodies
# mention "bf16" in flag checks and GPU compile targets that do no CPU half arithmetic.
_HALF = re.compile(r"bfloat16|float16|bf16|fp16|half|autocast", re.IGNORECASE)


def pytest_report_header(config):
    # Which CPU kernels ATen dispatches to: ATEN_CPU_CAPABILITY picks them (when the CPU has them).
    asked = os.environ.get("ATEN_CPU_CAPABILITY")
    return (f"torch CPU capability: {torch.backends.cpu.get_cpu_capability()}"
            + (f" (ATEN_CPU_CAPABILITY={asked})" if asked else ""))


def pytest_collection_modifyitems(config, items):
    for item in items:
        if _HALF.search(item.name):
            item.add_marker(pytest.mark.half)
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory):
    """$DTL_FAST_CACHE (the demo data, the data-check manifests) in a folder of this test run,
    for subprocesses too: tests leave nothing in the user's ~/.cache/dtl_fast and find nothing
    of an earlier run there."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DTL_FAST_CACHE", str(tmp_path_factory.mktemp("dtl_fast_cache")))
        yield


@pytest.fixture(autouse=True)
def _seed_and_default_backend(monkeypatch):
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    # A DTL_FAST_BACKEND exported by whoever runs the tests would turn kernel-vs-reference
    # comparisons into reference-vs-reference.
    monkeypatch.delenv("DTL_FAST_BACKEND", raising=False)
    yield


@contextlib.contextmanager
def poisoned_outputs():
    """Every uninitialised allocation (torch.empty in Python, at::empty in C++) is filled with
    NaN (max int for integer tensors) while this is active, so an output element a kernel
    forgets to write shows up as NaN instead of passing by luck."""
    prev_det = torch.are_deterministic_algorithms_enabled()
    prev_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    prev_fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(prev_det, warn_only=prev_warn)
        torch.utils.deterministic.fill_uninitialized_memory = prev_fill


@pytest.fixture
def poison():
    """`with poison(): out = fused_op(...)`: see poisoned_outputs."""
    return poisoned_outputs


@pytest.fixture
def second_version_all_dtypes(monkeypatch):
    """The cosine-attention op runs the second-version kernels for every dtype and size (by
    default only bf16 / fp16 on sm_90 at N >= 2048 do, ops.cosine_attention.attn_version; float32
    never, even under $DTL_FAST_ATTN_IMPL=v2), so float32 checks them tightly and the half types
    check them as a GPU would run them."""
    import importlib
    ops = importlib.import_module("dtl_fast.ops.cosine_attention")
    monkeypatch.setattr(ops, "V2_DTYPES", ops.V2_CANDIDATE_DTYPES + (torch.float32,))
