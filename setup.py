"""Build of dtl_fast: the Python package, the Triton kernels (kernels/ installed as
dtl_fast.kernels) and the C++/CUDA extension dtl_fast._C.

Environment:
  DTL_FAST_CUDA=0          build the CPU kernels only
  DTL_FAST_REQUIRE_CUDA=1  fail when the CUDA kernels cannot be built (CI sets it)
  TORCH_CUDA_ARCH_LIST     CUDA targets (default "8.0;9.0+PTX": SASS for A100 and H100/H200,
                           PTX the driver compiles for newer GPUs)
  DEBUG=1                  -O0 -g
  MAX_JOBS                 parallel compile jobs (ninja)
"""
import glob
import os
import shutil
import sys
import sysconfig

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _env_flag(name: str, default: str = "0") -> bool:
    return os.environ.get(name, default).strip().lower() in ("1", "true", "yes", "on")


def _prefer_full_cuda_toolkit() -> None:
    """torch derives CUDA_HOME from the nvcc on PATH; a wrapper script in /usr/local/bin then
    gives /usr/local, which has no CUDA headers. Point it at the toolkit nvcc belongs to."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    nvcc = shutil.which("nvcc")
    candidates = [os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))] if nvcc else []
    candidates.append("/usr/local/cuda")
    for home in candidates:
        if os.path.exists(os.path.join(home, "include", "cuda_runtime.h")):
            os.environ["CUDA_HOME"] = home
            return


def _pip_cuda_include_dirs() -> list:
    """Headers of the CUDA libraries that pip's torch wheels bring (nvidia/*/include): torch's
    CUDA headers include cuSPARSE / cuBLAS headers that a bare CUDA toolkit may lack."""
    try:
        import nvidia
    except ImportError:
        return []
    dirs = []
    for root in getattr(nvidia, "__path__", []):
        dirs += sorted(d for d in glob.glob(os.path.join(root, "*", "include")) if os.path.isdir(d))
    return dirs


def _extensions():
    _prefer_full_cuda_toolkit()
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError as exc:  # pip without --no-build-isolation hides the installed torch
        raise RuntimeError(
            "building dtl_fast needs torch importable at build time: install torch first, then "
            "`pip install --no-build-isolation .`"
        ) from exc

    debug = _env_flag("DEBUG")
    require_cuda = _env_flag("DTL_FAST_REQUIRE_CUDA")
    want_cuda = _env_flag("DTL_FAST_CUDA", "1")
    cuda_home = cpp_extension.CUDA_HOME
    nvcc = cuda_home and (shutil.which("nvcc", path=os.path.join(cuda_home, "bin")) or None)
    reasons = []
    if not want_cuda:
        reasons.append("DTL_FAST_CUDA=0")
    if torch.version.cuda is None:
        reasons.append(f"torch {torch.__version__} is not a CUDA build")
    if not nvcc:
        reasons.append("nvcc not found (set CUDA_HOME)")
    with_cuda = not reasons
    if require_cuda and not with_cuda:
        raise RuntimeError("DTL_FAST_REQUIRE_CUDA=1 but the CUDA kernels cannot be built: "
                           + "; ".join(reasons))
    if not with_cuda:
        print("dtl_fast: building the CPU kernels only (" + "; ".join(reasons) + ")")

    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    opt = ["-O0", "-g"] if debug else ["-O3"]
    # -fopenmp at compile time only: at::parallel_for is an OpenMP region in ATen's headers,
    # and its runtime calls resolve to the libgomp that torch itself loads (linking a second
    # libgomp would give two thread pools).
    # -falign-loops / -falign-functions=64: the CPU backward's store loops are short, and where
    # they fall relative to 64-byte boundaries depended on what else the library holds: the same
    # machine code ran ~30 % slower in the CUDA-enabled build than in a CPU-only one (frame_pool
    # backward 64x64x1024: 1.05-1.15 vs 0.75-0.85 ms); aligned, both run at the faster speed
    # (bench/NOTES.md, issue 13).
    cxx = opt + ["-fopenmp", "-Wall", "-Wno-unused-parameter", "-falign-loops=64",
                 "-falign-functions=64"]
    define_macros = [("Py_LIMITED_API", "0x030A0000")]
    extra = {"cxx": cxx}
    ext_cls = cpp_extension.CppExtension
    if with_cuda:
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
        define_macros.append(("DTL_FAST_WITH_CUDA", "1"))
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
        extra["nvcc"] = opt + ["--expt-relaxed-constexpr", "-lineinfo"]
        if debug:
            extra["nvcc"] += ["-G"]
        ext_cls = cpp_extension.CUDAExtension
    include_dirs = [os.path.join(ROOT, "csrc")]
    if with_cuda:
        include_dirs += _pip_cuda_include_dirs()
    return [
        ext_cls(
            "dtl_fast._C",
            sources,
            include_dirs=include_dirs,
            define_macros=define_macros,
            extra_compile_args=extra,
            py_limited_api=True,
        )
    ], cpp_extension.BuildExtension.with_options(use_ninja=True)


def _packages() -> tuple:
    """(packages, package_dir): every package with an __init__.py under dtl_fast/, found rather
    than listed (a hand-written list once shipped a wheel without dtl_fast.models and
    dtl_fast.data), plus kernels/ and its subpackages installed as dtl_fast.kernels through
    package_dir, so no top-level `kernels` module lands on anyone's import path."""
    packages = find_packages(where=ROOT, include=["dtl_fast", "dtl_fast.*"])
    packages += ["dtl_fast.kernels"] + [
        "dtl_fast.kernels." + p for p in find_packages(where=os.path.join(ROOT, "kernels"))]
    return packages, {"dtl_fast.kernels": "kernels"}


def _build_temp() -> str:
    """One folder for the compiled objects of every build of this tree. setuptools' editable
    install (`make install`) otherwise compiles in a throwaway temporary folder, so a wheel or
    a `pip install .` after it compiled everything again (nvcc: minutes); with a fixed folder,
    ninja recompiles only what changed, for either. The name is setuptools' own default for
    non-editable builds (build/temp.<platform>-<python>)."""
    return os.path.join(ROOT, "build", f"temp.{sysconfig.get_platform()}-{sys.implementation.cache_tag}")


packages, package_dir = _packages()
ext_modules, build_ext = _extensions()

setup(
    license="MIT",  # pyproject.toml lists it as dynamic (why: there)
    packages=packages,
    package_dir=package_dir,
    ext_modules=ext_modules,
    cmdclass={"build_ext": build_ext},
    options={"bdist_wheel": {"py_limited_api": "cp310"}, "build_ext": {"build_temp": _build_temp()}},
)
