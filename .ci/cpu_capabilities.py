"""Runs the half-precision and autocast tests (pytest marker `half`) once more under each CPU
capability this machine has besides its native one.

ATen compiles its CPU kernels several times (default = baseline x86-64, avx2, avx512) and picks
one per process; ATEN_CPU_CAPABILITY=<name> asks for another. They round half-precision work
differently, so a tolerance that holds under one may fail under another: a user's machine may
pick any of them. The main `make test` run is the native one; this adds the others (default
always, avx2 / avx512 where the CPU has them). torch honours ATEN_CPU_CAPABILITY=avx512 even
on a CPU without AVX-512 (and dies of an illegal instruction), so the CPU's own flags
(/proc/cpuinfo) decide what can run; torch then confirms that it runs what was asked.

Usage: python .ci/cpu_capabilities.py [extra pytest arguments]
Exit status: 0 when every run passed (or selected no test: pytest's 5), else 1.
"""
import os
import subprocess
import sys
import time

# The instruction sets each capability needs, as ATen checks them (cpuinfo: AVX2 with FMA3;
# AVX512 with the F, BW, VL and DQ subsets and FMA3), spelled as Linux's /proc/cpuinfo flags.
CANDIDATES = {
    "default": set(),
    "avx2": {"avx2", "fma"},
    "avx512": {"avx512f", "avx512bw", "avx512vl", "avx512dq", "fma"},
}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def capability(asked):
    """What torch dispatches to in a fresh process with ATEN_CPU_CAPABILITY=asked (None: unset),
    as torch.backends.cpu.get_cpu_capability() spells it ("DEFAULT", "AVX2", "AVX512", ...)."""
    env = dict(os.environ)
    env.pop("ATEN_CPU_CAPABILITY", None)
    if asked is not None:
        env["ATEN_CPU_CAPABILITY"] = asked
    out = subprocess.run([sys.executable, "-c",
                          "import torch; print(torch.backends.cpu.get_cpu_capability())"],
                         env=env, capture_output=True, text=True, check=True)
    return out.stdout.strip().splitlines()[-1]


def cpu_flags():
    """The CPU's feature flags from /proc/cpuinfo; empty where there is none (not Linux), so only
    `default`, which every x86-64 CPU runs, is tried there."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def main(pytest_args):
    native = capability(None)
    print(f"cpu_capabilities: native capability {native} (covered by the main test run)", flush=True)
    failed, ran = [], []
    flags = cpu_flags()
    for asked, needs in CANDIDATES.items():
        if not needs <= flags:
            print(f"cpu_capabilities: {asked}: this CPU lacks {', '.join(sorted(needs - flags))}, skipped")
            continue
        got = capability(asked)
        if got != asked.upper():
            print(f"cpu_capabilities: {asked}: torch runs {got} when asked for it (this torch lacks "
                  f"{asked} kernels or ignores the request), skipped")
            continue
        if got == native:
            print(f"cpu_capabilities: {asked}: the native capability, already tested")
            continue
        cmd = [sys.executable, "-m", "pytest", "-q", "-m", "half and not gpu", "tests", *pytest_args]
        print(f"cpu_capabilities: ATEN_CPU_CAPABILITY={asked} {' '.join(cmd[1:])}", flush=True)
        start = time.monotonic()
        rc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "ATEN_CPU_CAPABILITY": asked}).returncode
        seconds = time.monotonic() - start
        if rc == 5 and pytest_args:  # no test selected: a -k in PYTEST_ARGS matching no half test
            print(f"cpu_capabilities: {asked}: no half-precision test selected ({seconds:.0f} s)")
        elif rc == 5:  # without a filter, none selected means the `half` marking broke
            failed.append(asked)
            print(f"cpu_capabilities: {asked}: FAILED: no test carries the `half` marker "
                  "(tests/conftest.py marks them by name)")
        elif rc != 0:
            failed.append(asked)
            print(f"cpu_capabilities: {asked}: FAILED (pytest exit {rc}, {seconds:.0f} s)")
        else:
            ran.append(asked)
            print(f"cpu_capabilities: {asked}: passed ({seconds:.0f} s)")
    if failed:
        print(f"cpu_capabilities: half-precision tests failed under ATEN_CPU_CAPABILITY={', '.join(failed)}",
              file=sys.stderr)
        return 1
    print(f"cpu_capabilities: native {native} in the main run; half-precision tests passed under "
          f"{', '.join(ran) if ran else 'no other capability'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
