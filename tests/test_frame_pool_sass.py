"""The forward kernel's fwd_unroll variants (CudaLaunchConfig::fwd_unroll: 2, 4, 8 or 16 frames in
flight per thread in the 16-byte-vector loop) as built into dtl_fast._C, read without a GPU:
each is there for every architecture, dtype and pooling kind, fits its launch bounds without a
spill, and the sum kernels issue all U 16-byte loads of a round before the first instruction
that waits for one of them (the memory-level parallelism the knob exists for).

What the SASS showed when this was written (sm_90, loads issued before the first wait, per
round of the unguarded loop / the predicated last round): mean / sum kernels U of U in both;
the max / meanmax kernels at U = 8 / 16 fewer (ptxas sinks some loads next to their use, e.g.
bfloat16 max U = 8: 6 then 2; float32 max U = 8: 8, last round 1 then 7) -- bench/NOTES.md."""
import re

import pytest
from test_cuda_build import _FWD, _expected_archs, _resource_usage, _sass

from dtl_fast import _extension

pytestmark = pytest.mark.skipif(not _extension.cuda_kernels_built(),
                                reason="dtl_fast._C was built without CUDA kernels")

UNROLLS = (2, 4, 8, 16)
DTYPES = {"ff": "float32", "dd": "float64", "N3c104HalfEf": "float16", "N3c108BFloat16Ef": "bfloat16"}
_SCALARS = re.compile(r"frame_pool_fwd_kernelI(ff|dd|N3c104HalfEf|N3c108BFloat16Ef)Li")


def _vector_forward_kernels(kernels):
    """{(dtype, VEC, U, KIND): name} of the 16-byte-vector forward kernels (VEC > 1)."""
    out = {}
    for name in kernels:
        m, s = _FWD.search(name), _SCALARS.search(name)
        if m and s and int(m.group(1)) > 1:
            out[(DTYPES[s.group(1)], int(m.group(1)), int(m.group(2)), int(m.group(3)))] = name
    return out


def _register_cap(vec: int, unroll: int, kind: int) -> int:
    """Registers per thread that __launch_bounds__(256, kFwdMinBlocks<KIND, VEC, U>) leave
    for the forward kernel <VEC, U, KIND> (csrc/cuda/frame_pool.cu, mirrored here): 65536 /
    (256 x blocks), allocated in steps of 8. The scalar path (VEC 1, U 8) keeps U = 4's."""
    meanmax_2byte = kind == 2 and vec >= 8
    if vec == 1 or unroll <= 4:
        blocks = 3 if meanmax_2byte else 4
    elif unroll <= 8:
        blocks = 2 if meanmax_2byte else 3
    else:
        blocks = 2
    return 65536 // (256 * blocks) // 8 * 8


def test_every_unroll_is_built_and_fits_without_spills():
    usage = _resource_usage()
    assert _expected_archs() <= set(usage), sorted(usage)
    for arch in _expected_archs():
        found = _vector_forward_kernels(usage[arch])
        want = {(dt, 16 // size, u, k) for dt, size in
                (("float32", 4), ("float64", 8), ("float16", 2), ("bfloat16", 2))
                for u in UNROLLS for k in (0, 1, 2)}
        assert want <= set(found), f"{arch}: missing {sorted(want - set(found))[:4]}"
        for (dt, vec, u, kind), name in found.items():
            res = usage[arch][name]
            assert res["LOCAL"] == 0 and res["STACK"] == 0, f"{arch} {dt} U={u} kind {kind} spills: {res}"
            cap = _register_cap(vec, u, kind)
            assert res["REG"] <= cap, f"{arch} {dt} U={u} kind {kind}: {res['REG']} registers > {cap}"


def _loads_before_first_wait(sass_text: str) -> list:
    """Per run of 16-byte loads: how many LDG.E.128 are issued before an instruction reads a
    register one of them writes (the warp waits for memory there)."""
    runs, pending, count = [], set(), 0
    for line in sass_text.splitlines():
        if not re.search(r"/\*[0-9a-f]{4}\*/", line):
            continue
        ins = re.sub(r"^\s*/\*[0-9a-f]{4}\*/\s*", "", line.split(";")[0]).strip()
        ins = re.sub(r"^@!?U?P\w+\s+", "", ins)  # guard predicate
        op, _, operands = ins.partition(" ")
        regs = [int(r) for r in re.findall(r"\bR(\d+)\b", operands)]
        if op.startswith("LDG.E.128"):
            if set(regs[1:]) & pending:  # the address needs a loaded value
                runs.append(count)
                count, pending = 0, set()
            count += 1
            pending |= set(range(regs[0], regs[0] + 4))
            continue
        # operand 0 is the destination except for compares, stores and branches
        reads = regs if op.startswith(("ISETP", "FSETP", "DSETP", "HSETP2", "ST", "BRA")) else regs[1:]
        if set(reads) & pending:
            if count:
                runs.append(count)
            count, pending = 0, set()
        elif regs and not op.startswith(("ISETP", "FSETP", "DSETP", "HSETP2", "ST", "BRA")):
            pending.discard(regs[0])  # overwritten before use: no longer a pending load
    return runs


@pytest.mark.parametrize("unroll", UNROLLS)
def test_sum_kernels_issue_every_load_of_a_round_before_the_first_wait(unroll):
    # mean / sum (kind 0): the unguarded loop and the predicated last round each issue U loads
    # back to back before the first use, for every dtype, on every architecture.
    checked = 0
    for arch, kernels in _sass().items():
        for (dt, vec, u, kind), name in _vector_forward_kernels(kernels).items():
            if u != unroll:
                continue
            runs = _loads_before_first_wait(kernels[name])
            if kind == 0:
                assert runs == [unroll, unroll], f"{arch} {dt} U={u}: loads before each wait {runs}"
            else:
                # max / meanmax: never fewer in flight than the default U = 4 gives, in the loop
                assert runs and runs[0] >= min(unroll, 4), f"{arch} {dt} U={u} kind {kind}: {runs}"
            checked += 1
    assert checked >= 12 * len(_expected_archs()), checked
