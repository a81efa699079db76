"""Ahead-of-time compilation of Triton kernels for sm_80 / sm_90 without a GPU (DESIGN.md):
compiles each launch configuration in a subprocess (the tests run with TRITON_INTERPRET=1,
under which @triton.jit gives interpreter functions that cannot be compiled) and reads
registers, stack, local (spill) and shared bytes from the cubin with the cuobjdump that
Triton's package ships.

    configs = [dict(kernel="my_kernel", signature={"x_ptr": "*fp32", "n": "i32", "B": "constexpr"},
                    constexprs={"B": 64}, num_warps=4, num_stages=3,
                    divisible=["x_ptr", "n"])]   # optional: args Triton would mark as % 16 == 0
    for r in compile_configs("dtl_fast.kernels.my_module", configs):
        check_fits(r)
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

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
        # "divisible": the arguments Triton's launcher would mark as multiples of 16 (aligned
        # pointers, sizes divisible by 16) on a real GPU; that specialisation is a different
        # kernel (wider loads, other register use) from the hint-free one.
        attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in cfg.get("divisible", ())}
        src = ASTSource(fn=fn, signature=cfg["signature"], constexprs=cfg.get("constexprs", {}),
                        attrs=attrs)
        opts = {"num_warps": cfg.get("num_warps", 4), "num_stages": cfg.get("num_stages", 3)}
        row = dict(kernel=cfg["kernel"], arch=arch, config=cfg, error=None)
        try:
            c = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=opts)
        except Exception as e:
            # a CompilationError's text is the source around the failing call; the reason is
            # in its cause chain (e.g. an API this Triton lacks), so keep both
            why, c = [], e.__cause__ or e.__context__
            while c is not None and len(why) < 4:
                why.append(f"{type(c).__name__}: {str(c)[-600:]}")
                c = c.__cause__ or c.__context__
            row["error"] = f"{type(e).__name__}: {str(e)[:2000]}" + "".join(
                f"\n  caused by {w}" for w in why)
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
        # TMA loads (tensor / bulk async copies, sm_90 SASS)
        row["tma"] = bool(re.search(r"\bUTMALDG\b|\bUBLKCP\b", sass))
        results.append(row)
print("@@RESULTS@@" + json.dumps(results))
"""


def compile_configs(module: str, configs: list[dict], archs=ARCHS, timeout: float = 900,
                    workers: int | None = None) -> list[dict]:
    """Compiles every config for every arch; returns one dict per (config, arch), in order, with
    keys kernel, arch, config, error (None or the message), shared (bytes, Triton's metadata:
    the dynamic shared memory the launch needs), reg, stack, local, static_shared (cuobjdump),
    mma (whether HMMA / HGMMA / DMMA instructions are in the SASS).

    The configs are split over `workers` subprocesses (default: one per CPU core) that run at
    the same time: each compile is single-threaded and takes seconds."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    workers = max(1, min(workers or os.cpu_count() or 1, len(configs)))
    chunks = [configs[i::workers] for i in range(workers)]
    errs = [tempfile.TemporaryFile(mode="w+") for _ in chunks]  # a full stderr pipe would block
    procs = [subprocess.Popen([sys.executable, "-c", _WORKER], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=err, text=True, env=env)
             for err in errs]
    outputs = []
    try:
        for proc, chunk in zip(procs, chunks):
            proc.stdin.write(json.dumps([module, list(archs), chunk]))
            proc.stdin.close()
        for proc, err in zip(procs, errs):
            out = proc.stdout.read()  # workers print one line at the end: no pipe can fill
            proc.wait(timeout=timeout)
            err.seek(0)
            outputs.append((proc.returncode, out, err.read()))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
        for err in errs:
            err.close()
    per_chunk = []
    for rc, out, err in outputs:
        marker = [l for l in out.splitlines() if l.startswith("@@RESULTS@@")]
        if rc != 0 or not marker:
            raise AssertionError(f"AOT compile worker failed (rc={rc}):\n{err[-4000:]}")
        per_chunk.append(json.loads(marker[-1][len("@@RESULTS@@"):]))
    # Back to the caller's order: worker w compiled configs w, w + workers, ...
    results = []
    for i in range(len(configs)):
        chunk = per_chunk[i % workers]
        start = (i // workers) * len(archs)
        results.extend(chunk[start:start + len(archs)])
    return results


def with_aligned_variants(configs: list[dict]) -> list[dict]:
    """Each config twice: as given (no divisibility hints: odd sizes, unaligned views) and with
    every pointer and every int argument in `aligned_ints` marked divisible by 16, which is what
    Triton's launcher specialises on at realistic shapes (H = 256, 512, 1024; fresh tensors)."""
    out = []
    for cfg in configs:
        out.append(cfg)
        sig = cfg["signature"]
        ptrs = [n for n, t in sig.items() if t.startswith("*")]
        ints = [n for n in cfg.get("aligned_ints", ()) if n in sig]
        out.append({**cfg, "divisible": ptrs + ints})
    return out


def check_fits(row: dict, *, allow_spills: bool = False) -> None:
    """Fails when the config did not compile, needs more shared memory than the arch has, or
    (unless allow_spills) spills registers to local memory."""
    aligned = " aligned" if row["config"].get("divisible") else ""
    where = f"{row['kernel']}{aligned} sm_{row['arch']} {row['config'].get('constexprs')} " \
            f"warps={row['config'].get('num_warps')} stages={row['config'].get('num_stages')}"
    assert row["error"] is None, f"{where}: does not compile: {row['error']}"
    assert row["shared"] + row["static_shared"] <= SHARED_LIMIT[row["arch"]], f"{where}: {row['shared']} B shared > {SHARED_LIMIT[row['arch']]}"
    if not allow_spills:
        assert row["local"] == 0 and row["stack"] == 0, f"{where}: spills (local {row['local']} B, stack {row['stack']} B)"
