"""Ahead-of-time compilation of Triton kernels for sm_80 / sm_90 without a GPU (DESIGN.md):
compiles each launch configuration in a subprocess (the tests run with TRITON_INTERPRET=1,
under which @triton.jit gives interpreter functions that cannot be compiled) and reads
registers, stack, local (spill) and shared bytes from the cubin with the cuobjdump that
Triton's package ships.

    configs = [dict(kernel="my_kernel", signature={"x_ptr": "*fp32", "n": "i32", "B": "constexpr"},
                    constexprs={"B": 64}, num_warps=4, num_stages=3)]
    for r in compile_configs("dtl_fast.kernels.my_module", configs):
        check_fits(r)
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

# Shared memory per block a kernel may use (opt-in maximum), per architecture.
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
ARCHS = (80, 90)

_WORKER = r"""
import json, os, re, subprocess, sys, tempfile
import importlib
import triton
from triton.compiler import ASTSource
from triton.backends.compiler import GPUTarget

module_name, archs, configs = json.loads(sys.stdin.read())
mod = importlib.import_module(module_name)
cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
results = []
for cfg in configs:
    fn = getattr(mod, cfg["kernel"])
    while not hasattr(fn, "arg_names") and hasattr(fn, "fn"):
        fn = fn.fn  # an autotuner / heuristics wrapper: the JITFunction is inside
    for arch in archs:
        src = ASTSource(fn=fn, signature=cfg["signature"], constexprs=cfg.get("constexprs", {}))
        opts = {"num_warps": cfg.get("num_warps", 4), "num_stages": cfg.get("num_stages", 3)}
        row = dict(kernel=cfg["kernel"], arch=arch, config=cfg, error=None)
        try:
            c = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=opts)
        except Exception as e:
            row["error"] = f"{type(e).__name__}: {str(e)[:2000]}"
            results.append(row)
            continue
        row["shared"] = int(c.metadata.shared)
        with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
            f.write(c.asm["cubin"])
        try:
            res = subprocess.run([cuobjdump, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
            sass = subprocess.run([cuobjdump, "-sass", f.name], capture_output=True, text=True, check=True).stdout
        finally:
            os.unlink(f.name)
        line = next(l for l in res.splitlines() if l.strip().startswith("REG:"))
        usage = {k: int(v) for k, v in re.findall(r"(\w+):(\d+)", line)}
        row.update(reg=usage["REG"], stack=usage["STACK"], local=usage["LOCAL"],
                   static_shared=usage["SHARED"])
        row["mma"] = bool(re.search(r"\bHMMA\b|\bHGMMA\b|\bDMMA\b", sass))
        results.append(row)
print("@@RESULTS@@" + json.dumps(results))
"""


def compile_configs(module: str, configs: list[dict], archs=ARCHS, timeout: float = 900) -> list[dict]:
    """Compiles every config for every arch; returns one dict per (config, arch) with keys
    kernel, arch, config, error (None or the message), shared (bytes, Triton's metadata: the
    dynamic shared memory the launch needs), reg, stack, local, static_shared (cuobjdump), mma (whether
    HMMA / HGMMA / DMMA instructions are in the SASS)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _WORKER], input=json.dumps([module, list(archs), configs]),
                          capture_output=True, text=True, env=env, timeout=timeout)
    marker = [l for l in proc.stdout.splitlines() if l.startswith("@@RESULTS@@")]
    if proc.returncode != 0 or not marker:
        raise AssertionError(f"AOT compile worker failed (rc={proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(marker[-1][len("@@RESULTS@@"):])


def check_fits(row: dict, *, allow_spills: bool = False) -> None:
    """Fails when the config did not compile, needs more shared memory than the arch has, or
    (unless allow_spills) spills registers to local memory."""
    where = f"{row['kernel']} sm_{row['arch']} {row['config'].get('constexprs')} " \
            f"warps={row['config'].get('num_warps')} stages={row['config'].get('num_stages')}"
    assert row["error"] is None, f"{where}: does not compile: {row['error']}"
    assert row["shared"] + row["static_shared"] <= SHARED_LIMIT[row["arch"]], f"{where}: {row['shared']} B shared > {SHARED_LIMIT[row['arch']]}"
    if not allow_spills:
        assert row["local"] == 0 and row["stack"] == 0, f"{where}: spills (local {row['local']} B, stack {row['stack']} B)"
