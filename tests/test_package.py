"""The package around the kernels: info(), the command line, the test helpers themselves."""
import importlib
import json
import os
import subprocess
import sys

import pytest
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


def test_info_shows_each_ops_auto_rule(monkeypatch):
    fp_ops = importlib.import_module("dtl_fast.ops.frame_pool")  # the module, not the function

    rules = dtl_fast.info()["auto_rules"]
    assert set(rules) == {"frame_pool", "lstm/gru", "cosine_attention"}
    assert all(isinstance(r, str) and r for r in rules.values())
    assert "empty" in rules["frame_pool"]  # no stock form measured faster (H100 sweep)
    # a filled table is what the line shows, and what the op then does
    monkeypatch.setattr(fp_ops, "_CUDA_STOCK_WINS", (("max", torch.bfloat16, 4 << 20),))
    assert "max bfloat16 <= 4 MiB" in dtl_fast.info()["auto_rules"]["frame_pool"]
    x = torch.zeros(2, 3, 4, dtype=torch.bfloat16)
    assert fp_ops._stock_wins_on_cuda(x, "max") and not fp_ops._stock_wins_on_cuda(x, "mean")
    from dtl_fast.info import format_info

    assert "auto rule frame_pool" in format_info()


def test_info_says_auto_runs_the_stock_path_where_triton_cannot(monkeypatch):
    # auto on CUDA never picks a Triton kernel that cannot run there (the ops' auto rules are
    # gated on can_run_triton): info says the stock path, and why
    import dtl_fast._triton as tri
    info_mod = importlib.import_module("dtl_fast.info")  # the module, not the function

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.delenv("DTL_FAST_BACKEND", raising=False)
    monkeypatch.setattr(tri, "triton_unavailable_reason", lambda device=None: "no triton here")
    line = info_mod._triton_op_backend("lstm", "cuda")
    assert line == "the stock PyTorch path (Triton unavailable: no triton here)"
    monkeypatch.setattr(tri, "triton_unavailable_reason", lambda device=None: None)
    assert "auto rule: Triton kernel or the stock" in info_mod._triton_op_backend("lstm", "cuda")
    monkeypatch.setattr(torch.version, "hip", "6.2.41133")  # ROCm: no auto row measured there
    assert info_mod._triton_op_backend("lstm", "cuda") == "the stock PyTorch path (ROCm: no measured row)"


def test_info_follows_the_backend_variable(monkeypatch):
    monkeypatch.setenv("DTL_FAST_BACKEND", "fused")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert dtl_fast.info()["ops"]["lstm"]["cpu"] == "Triton kernel (interpreter)"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert "TRITON_INTERPRET=1" in dtl_fast.info()["ops"]["cosine_attention"]["cpu"]
    monkeypatch.setenv("DTL_FAST_BACKEND", "reference")
    assert dtl_fast.info()["ops"]["gru"]["cpu"].startswith("eager reference")


def test_info_says_a_bad_backend_variable(monkeypatch):
    # Every call with backend=None raises then: info() says so instead of naming a kernel.
    monkeypatch.setenv("DTL_FAST_BACKEND", "Fused")
    data = dtl_fast.info()
    assert data["backend_default"].startswith("error: $DTL_FAST_BACKEND='Fused'")
    for op in ("frame_pool", "lstm", "cosine_attention"):
        assert data["ops"][op]["cpu"].startswith("error:"), (op, data["ops"][op])
    with pytest.raises(ValueError, match="DTL_FAST_BACKEND"):
        dtl_fast.ops.frame_pool(torch.ones(1, 2, 3))


def test_submodules_load_on_first_use():
    # `import dtl_fast` then dtl_fast.models / .data / .train, as the README writes them; a
    # fresh interpreter, so that no other test has imported them already.
    code = ("import sys, dtl_fast\n"
            "assert 'dtl_fast.models' not in sys.modules and 'dtl_fast.train' not in sys.modules\n"
            "assert type(dtl_fast.models.DTL(3)).__name__ == 'DTL'\n"
            "assert callable(dtl_fast.data.open_split) and callable(dtl_fast.data.prepare)\n"
            "assert dtl_fast.train.__name__ == 'dtl_fast.train'\n"
            "assert {'models', 'data', 'train'} <= set(dir(dtl_fast))\n"
            "try:\n    dtl_fast.no_such_name\nexcept AttributeError as e:\n"
            "    assert 'no_such_name' in str(e)\nelse:\n    raise AssertionError('no error')\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


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


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _setup_py_packages():
    """(packages, package_dir) as setup.py hands them to setuptools, read by running setup.py
    up to setup()'s start (distutils' run_setup, stop_after="init": nothing is built), in a
    subprocess because setup.py sets build variables in os.environ."""
    code = ("import json, setuptools\n"
            "from distutils.core import run_setup\n"
            "d = run_setup('setup.py', stop_after='init')\n"
            "print('PACKAGES=' + json.dumps([d.packages, d.package_dir]))\n")
    env = {**os.environ, "DTL_FAST_REQUIRE_CUDA": "0"}
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    line = [x for x in res.stdout.splitlines() if x.startswith("PACKAGES=")][-1]
    packages, package_dir = json.loads(line[len("PACKAGES="):])
    return packages, package_dir


def _packages_on_disk():
    """{package name: folder} for every folder under dtl_fast/ and kernels/ (as dtl_fast.kernels)
    that holds Python files; asserts each has an __init__.py (without one, setuptools' discovery
    skips it and the wheel would lack it while the editable install still imports it)."""
    found, no_init = {}, []
    for top, name in (("dtl_fast", "dtl_fast"), ("kernels", "dtl_fast.kernels")):
        for d, dirs, files in os.walk(os.path.join(ROOT, top)):
            dirs[:] = sorted(x for x in dirs if x != "__pycache__" and not x.startswith("."))
            if not any(f.endswith(".py") for f in files):
                continue
            rel = os.path.relpath(d, os.path.join(ROOT, top))
            pkg = name if rel == "." else name + "." + rel.replace(os.sep, ".")
            if "__init__.py" in files:
                found[pkg] = d
            else:
                no_init.append(d)
    assert not no_init, f"folders with Python files but no __init__.py (not installed): {no_init}"
    return found


def test_setup_py_ships_every_package_on_disk():
    """The wheel holds what setup.py lists: every package folder of the tree must be in that
    list, mapped to its own folder (kernels/ as dtl_fast.kernels), and nothing else. A
    hand-written list once left out dtl_fast.models and dtl_fast.data; the editable install
    the other tests use hides such a gap (`make wheel-check` runs the built wheel itself)."""
    if not os.path.exists(os.path.join(ROOT, "setup.py")):
        pytest.skip("not a source tree")
    packages, package_dir = _setup_py_packages()
    on_disk = _packages_on_disk()
    missing, extra = sorted(set(on_disk) - set(packages)), sorted(set(packages) - set(on_disk))
    assert not missing, f"setup.py does not ship these packages of the tree: {missing}"
    assert not extra, f"setup.py ships packages with no folder of Python files: {extra}"
    assert len(packages) == len(set(packages)), f"listed twice: {packages}"
    assert all(p == "dtl_fast" or p.startswith("dtl_fast.") for p in packages), packages
    for pkg in packages:  # where setuptools takes each package from: longest package_dir prefix
        parts = pkg.split(".")
        for i in range(len(parts), -1, -1):
            prefix = ".".join(parts[:i])
            if prefix in package_dir or i == 0:
                src = os.path.join(ROOT, package_dir.get(prefix, ""), *parts[i:])
                break
        assert os.path.samefile(src, on_disk[pkg]), f"{pkg} would be taken from {src}, not {on_disk[pkg]}"


def test_lengths_range_check_is_asynchronous_under_capture(monkeypatch):
    """During a CUDA graph capture a host read of device lengths would fail the capture: the
    range check becomes torch._assert_async (on CPU tensors it fires at once, a RuntimeError
    instead of the ValueError of the host check), in the shared check and in the reference."""
    import dtl_fast._checks as checks
    from dtl_fast.reference import frame_pool as ref_pool

    bad = torch.tensor([1, 9])
    with pytest.raises(ValueError, match=r"lengths\[b\] must lie in \[0, 4\]"):
        checks.check_lengths_range(bad, 0, 4, owner="t")
    assert not checks.device_capturing(bad)  # a CPU tensor is never captured
    monkeypatch.setattr(checks, "device_capturing", lambda t: True)
    with pytest.raises(RuntimeError, match=r"lengths\[b\] must lie in \[0, 4\]"):
        checks.check_lengths_range(bad, 0, 4, owner="t")
    checks.check_lengths_range(torch.tensor([0, 4]), 0, 4, owner="t")  # in range: no error
    ref_module = importlib.import_module("dtl_fast.reference.frame_pool")
    monkeypatch.setattr(ref_module, "device_capturing", lambda t: True)
    with pytest.raises(RuntimeError, match="must lie in"):
        ref_pool(torch.zeros(2, 4, 3), bad)


def test_readme_python_examples_run_as_written(tmp_path):
    # Every ```python block of the README, run on its own in a fresh interpreter (a newcomer
    # pastes them one at a time): each defines what it uses (review s31 found three that used
    # names defined nowhere)
    import re

    readme = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
    with open(readme, encoding="utf-8") as f:
        blocks = re.findall(r"```python\n(.*?)```", f.read(), re.S)
    assert len(blocks) >= 4
    for i, code in enumerate(blocks):
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              cwd=tmp_path, timeout=300)
        assert proc.returncode == 0, f"README python block {i}:\n{code}\n{proc.stderr[-2000:]}"
