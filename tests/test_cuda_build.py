"""The CUDA kernels as built into dtl_fast._C, read without a GPU: every target architecture is
there, no kernel spills to local memory or exceeds what its launch assumes, and the SASS moves
16-byte vectors (LDG.E.128 / STG.E.128) with several loads in flight where the source says so."""
import functools
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


@functools.lru_cache(maxsize=1)
def _sass():
    """{arch: {mangled kernel name: SASS text}}"""
    out = subprocess.run([_cuobjdump(), "-sass", _extension._C.__file__],
                         capture_output=True, text=True, check=True).stdout
    sass, arch = {}, None
    for part in re.split(r"\n(?=\s*(?:arch = sm_\d+|Function : ))", out):
        if m := re.match(r"\s*arch = (sm_\d+)", part):
            arch = m.group(1)
            sass.setdefault(arch, {})
        elif (m := re.match(r"\s*Function : (\S+)", part)) and arch:
            sass[arch][m.group(1)] = sass[arch].get(m.group(1), "") + part
    return sass


# Template arguments in the mangled names: <scalar, acc, VEC, U, KIND> for the forward kernel,
# <scalar, acc, VEC, KIND> for the backward one (KIND 0 mean/sum, 1 max, 2 meanmax).
_FWD = re.compile(r"frame_pool_fwd_kernelI.*?Li(\d+)ELi(\d+)ELi(\d)E")
_BWD = re.compile(r"frame_pool_bwd_kernelI.*?Li(\d+)ELi(\d)E")
# the forward through a ring of shared memory (fwd_pipeline = 2)
_RING = re.compile(r"frame_pool_fwd_ring_kernelI")


def _expected_archs():
    spec = os.environ.get("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
    return {"sm_" + a.split("+")[0].replace(".", "").replace("a", "") for a in re.split(r"[;\s]+", spec) if a}


def test_every_target_architecture_is_built():
    usage = _resource_usage()
    assert _expected_archs() <= set(usage), f"built: {sorted(usage)}"
    for arch, kernels in usage.items():
        names = " ".join(kernels)
        # frame_pool_lengths: the length check alone, for the calls with nothing to pool
        for part in ("frame_pool_fwd", "frame_pool_bwd", "combine", "frame_pool_lengths"):
            assert part in names, f"{arch}: no kernel named like {part!r} in {sorted(kernels)[:3]}..."
        # every kind (mean/sum, max, meanmax) has its forward and backward kernels
        kinds_fwd = {m.group(3) for n in kernels if (m := _FWD.search(n))}
        kinds_bwd = {m.group(2) for n in kernels if (m := _BWD.search(n))}
        assert kinds_fwd == kinds_bwd == {"0", "1", "2"}, (arch, kinds_fwd, kinds_bwd)


def _register_cap(name: str) -> int:
    """Registers per thread the kernel's __launch_bounds__ leave: 64 (4 blocks per SM) for the
    backward and combine kernels; the forward's depend on VEC, U and KIND (fwd_unroll 8 / 16
    ask for fewer blocks; the ring kernel 3): tests/test_frame_pool_sass.py mirrors
    kFwdMinBlocks and kRingMinBlocks."""
    from test_frame_pool_sass import _register_cap as forward_cap

    m = _FWD.search(name)
    if m:
        return forward_cap(int(m.group(1)), int(m.group(2)), int(m.group(3)))
    if _RING.search(name):  # the ring forward: 3 blocks per SM
        from test_frame_pool_sass import RING_REGISTER_CAP

        return RING_REGISTER_CAP
    return 64


def test_no_spills_and_launch_limits_hold():
    # No stack frame or local memory (a spill), registers within what the launch bounds leave,
    # static shared memory under the 48 KB that needs no opt-in.
    for arch, kernels in _resource_usage().items():
        for name, res in kernels.items():
            assert res["LOCAL"] == 0 and res["STACK"] == 0, f"{arch} {name} spills: {res}"
            cap = _register_cap(name)
            assert res["REG"] <= cap, f"{arch} {name}: {res['REG']} registers > {cap}"
            assert res["SHARED"] <= 48 * 1024, f"{arch} {name}: {res['SHARED']} B shared"


def test_info_agrees():
    assert dtl_fast.info()["cuda_kernels_built"] is True


def test_vector_kernels_move_16_byte_words():
    # The forward's vector path issues U = 4 16-byte loads per unrolled step (all before any is
    # consumed: the body and the predicated tail each have U); the backward's vector path
    # stores 16 bytes per frame. The scalar (VEC == 1) instantiations serve unaligned inputs.
    checked = 0
    for arch, kernels in _sass().items():
        for name, text in kernels.items():
            if m := _FWD.search(name):
                vec, unroll = int(m.group(1)), int(m.group(2))
                if vec > 1:
                    n = len(re.findall(r"LDG\.E\.128", text))
                    assert n >= 2 * unroll, f"{arch} {name}: {n} LDG.E.128, expected >= {2 * unroll}"
                    checked += 1
            elif m := _BWD.search(name):
                if int(m.group(1)) > 1:
                    assert re.search(r"STG\.E\.128", text), f"{arch} {name}: no STG.E.128"
                    checked += 1
    # 4 dtypes x 3 kinds x (forward + backward) per architecture
    assert checked >= 24 * len(_expected_archs()), checked
