"""The CUDA kernels as built into dtl_fast._C, read without a GPU: every target architecture is
there, and no kernel spills to local memory or exceeds what its launch assumes."""
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

import dtl_fast
from dtl_fast import _extension

pytestmark = pytest.mark.skipif(not _extension.cuda_kernels_built(),
                                reason="dtl_fast._C was built without CUDA kernels")


def _cuobjdump():
    import triton

    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    for candidate in (bundled, Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin" / "cuobjdump"):
        if candidate.exists():
            return str(candidate)
    found = shutil.which("cuobjdump")
    if found is None:
        pytest.fail("cuobjdump not found (neither in triton's package nor in CUDA_HOME/bin)")
    return found


def _resource_usage():
    """{arch: {kernel name: {"REG": n, "STACK": n, "SHARED": n, "LOCAL": n}}}"""
    out = subprocess.run([_cuobjdump(), "-res-usage", _extension._C.__file__],
                         capture_output=True, text=True, check=True).stdout
    usage, arch, fn = {}, None, None
    for line in out.splitlines():
        if m := re.match(r"\s*arch = (sm_\d+)", line):
            arch = m.group(1)
            usage.setdefault(arch, {})
        elif m := re.match(r"\s*Function (\S+):", line):
            fn = m.group(1)
        elif line.strip().startswith("REG:") and arch and fn:
            usage[arch][fn] = {k: int(v) for k, v in re.findall(r"(\w+):(\d+)", line)}
    return usage


def _expected_archs():
    spec = os.environ.get("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    return {"sm_" + a.split("+")[0].replace(".", "").replace("a", "") for a in re.split(r"[;\s]+", spec) if a}


def test_every_target_architecture_is_built():
    usage = _resource_usage()
    assert _expected_archs() <= set(usage), f"built: {sorted(usage)}"
    for arch, kernels in usage.items():
        names = " ".join(kernels)
        for part in ("frame_pool_fwd", "frame_pool_bwd", "combine"):
            assert part in names, f"{arch}: no kernel named like {part!r} in {sorted(kernels)[:3]}..."


def test_no_spills_and_launch_limits_hold():
    # 256 threads x 4 blocks per SM (__launch_bounds__) leaves 64 registers per thread; static
    # shared memory must stay under the 48 KB that needs no opt-in.
    for arch, kernels in _resource_usage().items():
        for name, res in kernels.items():
            assert res["LOCAL"] == 0 and res["STACK"] == 0, f"{arch} {name} spills: {res}"
            assert res["REG"] <= 64, f"{arch} {name}: {res['REG']} registers"
            assert res["SHARED"] <= 48 * 1024, f"{arch} {name}: {res['SHARED']} B shared"


def test_info_agrees():
    assert dtl_fast.info()["cuda_kernels_built"] is True
