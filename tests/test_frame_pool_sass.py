"""The forward kernel's fwd_unroll variants (CudaLaunchConfig::fwd_unroll: 2, 4, 8 or 16 frames in
flight per thread in the 16-byte-vector loop) and its software-pipelined ones (fwd_pipeline = 1,
U = 8 or 16 as two rounds of U / 2, round k + 1 issued before round k is folded) as built into
dtl_fast._C, read without a GPU: each is there for every architecture, dtype and pooling kind,
fits its launch bounds without a spill; the plain sum kernels issue all U 16-byte loads of a
round before the first instruction that waits for one of them (the memory-level parallelism the
knob exists for), and the pipelined kernels keep the next round's loads in flight through the
fold of the current one, where the plain loop has none left.

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
PIPELINED = (8, 16)  # the fwd_unroll values with a pipelined kernel (fwd_pipeline = 1)
# float64 has none (it runs the plain kernel): its meanmax U = 8 pipelined kernel spilled on sm_80.
PIPELINED_DTYPES = ("float32", "float16", "bfloat16")
_SCALARS = re.compile(r"frame_pool_fwd_kernelI(ff|dd|N3c104HalfEf|N3c108BFloat16Ef)Li")
# The forward kernel's last template arguments: bool PIPE (fwd_pipeline), bool IDX (the max's
# frame index tracked; false only in the index-free kernels of a forward with no argmax).
_PIPE = re.compile(r"frame_pool_fwd_kernelI.*?Li\d+ELi\d+ELi\dELb([01])E")
_IDX = re.compile(r"frame_pool_fwd_kernelI.*?Li\d+ELi\d+ELi\dELb[01]ELb([01])E")


def _vector_forward_kernels(kernels, pipelined=False, index=True):
    """{(dtype, VEC, U, KIND): name} of the 16-byte-vector forward kernels (VEC > 1), the plain
    ones or (pipelined=True) the software-pipelined ones; those that track the max's frame
    index, or (index=False) the index-free ones."""
    out = {}
    for name in kernels:
        m, s, p, i = (_FWD.search(name), _SCALARS.search(name), _PIPE.search(name),
                      _IDX.search(name))
        assert m is None or (p is not None and i is not None), f"no PIPE / IDX argument in {name}"
        if (m and s and int(m.group(1)) > 1 and p.group(1) == ("1" if pipelined else "0")
                and i.group(1) == ("1" if index else "0")):
            key = (DTYPES[s.group(1)], int(m.group(1)), int(m.group(2)), int(m.group(3)))
            assert key not in out, f"two kernels for {key}: {out[key]}, {name}"
            out[key] = name
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


@pytest.mark.parametrize("pipelined", [False, True], ids=["plain", "pipelined"])
def test_every_unroll_is_built_and_fits_without_spills(pipelined):
    # The pipelined kernel <U> holds the same U loaded words as the plain one, under the same
    # launch bounds (kFwdMinBlocks<KIND, VEC, U>), so the same register cap applies.
    usage = _resource_usage()
    assert _expected_archs() <= set(usage), sorted(usage)
    for arch in _expected_archs():
        found = _vector_forward_kernels(usage[arch], pipelined)
        want = {(dt, 16 // size, u, k) for dt, size in
                (("float32", 4), ("float64", 8), ("float16", 2), ("bfloat16", 2))
                if not pipelined or dt in PIPELINED_DTYPES
                for u in (PIPELINED if pipelined else UNROLLS) for k in (0, 1, 2)}
        assert want == set(found), (f"{arch}: missing {sorted(want - set(found))[:4]}, "
                                    f"extra {sorted(set(found) - want)[:4]}")
        for (dt, vec, u, kind), name in found.items():
            res = usage[arch][name]
            what = f"{arch} {dt} U={u} kind {kind}{' pipelined' if pipelined else ''}"
            assert res["LOCAL"] == 0 and res["STACK"] == 0, f"{what} spills: {res}"
            cap = _register_cap(vec, u, kind)
            assert res["REG"] <= cap, f"{what}: {res['REG']} registers > {cap}"


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


_INSTRUCTION = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s*(.*?)\s*;")
# Opcodes whose first register operand is read, not written.
_NO_DEST = ("ISETP", "FSETP", "DSETP", "HSETP2", "ST", "BRA", "BSSY", "BSYNC", "EXIT", "RET")


def _hot_loop(sass_text: str, opcode: str):
    """The shortest backward branch whose body holds an instruction starting with `opcode` (the
    loop over frames, not the loop over rows): its instructions (address, opcode, operands) in
    program order, guard predicates dropped; None without such a loop."""
    ins = []
    for line in sass_text.splitlines():
        if m := _INSTRUCTION.match(line):
            op, _, operands = re.sub(r"^@!?U?P\w+\s+", "", m.group(2)).partition(" ")
            ins.append((int(m.group(1), 16), op, operands))
    loops = []
    for addr, op, operands in ins:
        target = re.search(r"0x([0-9a-f]+)", operands) if op == "BRA" else None
        if target and int(target.group(1), 16) < addr:
            body = [i for i in ins if int(target.group(1), 16) <= i[0] <= addr]
            if any(o.startswith(opcode) for _, o, _ in body):
                loops.append(body)
    return min(loops, key=len) if loops else None


def _in_flight_through_the_fold(sass_text: str):
    """(16-byte loads per trip of the hot loop, fewest, mean and most loads in flight at a fold
    instruction), or None without such a loop. The hot loop is the shortest backward branch
    whose body holds LDG.E.128 (the unguarded / pipelined loop, not the loop over rows). Its
    body is walked twice in program order, so loads issued at the end of one trip and folded in
    the next count; in the second walk, at each instruction that reads a loaded register (the
    warp waits for that load there), the loads issued and not yet read are counted. The plain
    loop issues its U loads and folds them, so at its last fold instruction nothing is in
    flight (fewest 0); the pipelined loop folds round k with round k + 1's loads outstanding."""
    body = _hot_loop(sass_text, "LDG.E.128")
    if body is None:
        return None
    pending, counts = {}, []  # load -> its destination registers not yet read or overwritten
    for trip in range(2):
        for n, (_, op, operands) in enumerate(body):
            regs = [int(r) for r in re.findall(r"\bR(\d+)\b", operands)]
            if op.startswith("LDG.E.128"):
                dest = set(range(regs[0], regs[0] + 4))
                for k in [k for k, v in pending.items() if v & dest]:
                    del pending[k]
                pending[(trip, n)] = dest
                continue
            writes = not op.startswith(_NO_DEST)
            reads = set(regs[1:] if writes else regs)
            waited = [k for k, v in pending.items() if v & reads]
            for k in waited:
                del pending[k]
            if waited and trip == 1:
                counts.append(len(pending))
            if regs and writes:
                for k in [k for k, v in pending.items() if regs[0] in v]:
                    pending[k].discard(regs[0])
                    if not pending[k]:
                        del pending[k]
    loads = sum(op.startswith("LDG.E.128") for _, op, _ in body)
    return loads, min(counts, default=0), sum(counts) / max(len(counts), 1), max(counts, default=0)


@pytest.mark.parametrize("unroll", PIPELINED)
def test_pipelined_kernels_keep_loads_in_flight_through_the_fold(unroll):
    # fwd_pipeline = 1: the next round's loads are issued before the current round is folded,
    # so in the hot loop fold instructions run with loads in flight, where the plain kernel of
    # the same U (same registers, same launch bounds) has none left at its last fold. What the
    # SASS showed when this was written (bench/NOTES.md has the table):
    #   - mean / sum, every dtype, and float32 max / meanmax: all U / 2 loads of the next round
    #     are outstanding at every fold instruction of the current one;
    #   - 2-byte max / meanmax: ptxas sinks some of the next round's loads into the fold, but
    #     at least one stays in flight throughout (3 of 4 at U = 8), more on average than in
    #     the plain kernel.
    checked = 0
    for arch, kernels in _sass().items():
        plain = _vector_forward_kernels(kernels)
        for key, name in _vector_forward_kernels(kernels, pipelined=True).items():
            dt, vec, u, kind = key
            if u != unroll:
                continue
            got = _in_flight_through_the_fold(kernels[name])
            base = _in_flight_through_the_fold(kernels[plain[key]])
            what = (f"{arch} {dt} U={u} kind {kind}: (loads per trip, fewest, mean, most in "
                    f"flight at a fold instruction) pipelined {got}, plain {base}")
            assert got is not None and base is not None, what
            assert got[0] == base[0] == u, what  # one trip: two rounds of U / 2, or one of U
            assert base[1] == 0, what  # the plain loop: nothing in flight at its last fold
            if kind == 0 or dt == "float32":
                assert got[1] == u // 2, what
            else:
                assert got[1] >= 1 and got[2] > base[2], what
            checked += 1
    assert checked == 9 * len(_sass()), checked  # 3 dtypes x 3 kinds per architecture


# The ring forward (fwd_pipeline = 2): frame_pool_fwd_ring_kernel<scalar, acc, VEC, KIND>.
_RING = re.compile(r"frame_pool_fwd_ring_kernelI(ff|N3c104HalfEf|N3c108BFloat16Ef)Li(\d+)ELi(\d)E")
RING_STAGES = 4  # kRingStages in csrc/cuda/frame_pool.cu
RING_REGISTER_CAP = 65536 // (256 * 3) // 8 * 8  # __launch_bounds__(256, kRingMinBlocks = 3)


def _ring_kernels(kernels):
    """{(dtype, VEC, KIND): name} of the ring forward kernels."""
    return {(DTYPES[m.group(1)], int(m.group(2)), int(m.group(3))): name
            for name in kernels if (m := _RING.search(name))}


def test_ring_kernels_are_built_and_fit_without_spills():
    # One per 2- / 4-byte dtype and pooling kind, under launch bounds of 3 blocks per SM (what
    # its shared memory allows on sm_90); the ring itself is dynamic shared memory, so the
    # static figure is at most the 1 KB sm_90 reports for every kernel using shared memory.
    usage = _resource_usage()
    for arch in _expected_archs():
        found = _ring_kernels(usage[arch])
        want = {(dt, 16 // size, k) for k in (0, 1, 2)
                for dt, size in (("float32", 4), ("float16", 2), ("bfloat16", 2))}
        assert set(found) == want, (arch, sorted(found))
        for (dt, vec, kind), name in found.items():
            res = usage[arch][name]
            what = f"{arch} {dt} kind {kind} ring"
            assert res["LOCAL"] == 0 and res["STACK"] == 0, f"{what} spills: {res}"
            assert res["REG"] <= RING_REGISTER_CAP, f"{what}: {res}"
            assert res["SHARED"] <= 1024, f"{what}: static shared memory {res}"


def test_ring_kernels_copy_through_shared_memory_three_stages_ahead():
    # Each trip of the hot loop copies one stage (U = 4 16-byte cp.async copies that bypass L1,
    # LDGSTS.E.BYPASS.128), commits it (LDGDEPBAR), waits until at most 3 stages are in flight
    # (DEPBAR.LE SB0, 0x3) and only then reads the ring (LDS.128); x is never loaded into
    # registers (no LDG.E.128 in the kernel: the only global loads are lengths[b]).
    checked = 0
    for arch, kernels in _sass().items():
        for (dt, vec, kind), name in _ring_kernels(kernels).items():
            text = kernels[name]
            what = f"{arch} {dt} kind {kind} ring"
            assert not re.search(r"LDG\.E\.128", text), f"{what}: loads x into registers"
            body = _hot_loop(text, "LDGSTS")
            assert body is not None, f"{what}: no loop with LDGSTS"
            body = [(o, a) for _, o, a in body]
            ops = [o for o, _ in body]
            copies = [i for i, o in enumerate(ops) if o.startswith("LDGSTS")]
            kinds = {ops[i] for i in copies}
            assert kinds == {"LDGSTS.E.BYPASS.128"}, f"{what}: {kinds}"
            assert len(copies) == 4, f"{what}: {len(copies)} copies per trip"
            commits = [i for i, o in enumerate(ops) if o == "LDGDEPBAR"]
            waits = [i for i, (o, a) in enumerate(body)
                     if o == "DEPBAR.LE" and a.replace(" ", "") == f"SB0,{hex(RING_STAGES - 1)}"]
            reads = [i for i, o in enumerate(ops) if o.startswith("LDS.128")]
            assert len(commits) == 1 and len(waits) == 1 and reads, (what, ops)
            assert max(copies) < commits[0] < waits[0] < min(reads), (what, ops)
            checked += 1
    assert checked == 9 * len(_sass()), checked


# ---- the index-free max (a forward with no argmax wanted) -------------------------------------
# NaN-propagating max instructions, and the pairs of elements each folds: FMNMX.NAN one float32,
# HMNMX2.*NAN a packed pair of float16 / bfloat16, and sm_90's three-input VHMNMX.*NAN two pairs.
_MAX_NAN = {"FMNMX.NAN": 1, "HMNMX2": 2, "VHMNMX": 4}


def test_index_free_kernels_fold_the_max_without_the_frame_index():
    # With no argmax to write, the default loop (U = 4, plain) of max / meanmax on the vector path
    # of float32 / float16 / bfloat16 folds the max with NaN-propagating max instructions: one
    # per float32 element, one per bfloat16 / float16 pair (no conversion), where the index
    # kernel spends a compare, NaN tests and two selects per element. What the SASS showed when
    # this was written (hot loop per trip of 4 loads, sm_80 / sm_90; bench/NOTES.md s33): max
    # float32 33 / 33 instructions (index kernel 120 / 120), bfloat16 33 / 25 (244 / 260),
    # meanmax float32 50 / 48 (136 / 138), bfloat16 98 / 114 (290 / 315); the sum kernel 33 / 33
    # and 80 / 98. So: every element folded by a NaN-propagating max, the loop at most half the
    # index kernel's and (max) no longer than the sum kernel's, the 4 loads issued before the
    # first wait, no spills, registers within the launch bounds. float64, the scalar path,
    # other unrolls and the pipelined / ring loops have none (they keep the index).
    usage = _resource_usage()
    checked = 0
    for arch, kernels in _sass().items():
        free = _vector_forward_kernels(kernels, index=False)
        assert set(free) == {(dt, 16 // size, 4, k) for dt, size in
                             (("float32", 4), ("float16", 2), ("bfloat16", 2)) for k in (1, 2)}, (
            arch, sorted(free))
        tracked = _vector_forward_kernels(kernels)
        for key, name in free.items():
            dt, vec, _, kind = key
            what = f"{arch} {dt} kind {kind}"
            body = _hot_loop(kernels[name], "LDG.E.128")
            ops = [o for _, o, _ in body]
            folded = sum(n for o in ops for prefix, n in _MAX_NAN.items()
                         if o.startswith(prefix) and "NAN" in o)
            assert folded == 4 * vec, (what, folded, ops)
            if vec == 8:  # 2-byte elements folded in pairs, never one by one
                assert not any(o.startswith("FMNMX") for o in ops), (what, ops)
            assert sum(o.startswith("LDG.E.128") for o in ops) == 4, (what, ops)
            index_body = _hot_loop(kernels[tracked[key]], "LDG.E.128")
            assert 2 * len(body) <= len(index_body), (what, len(body), len(index_body))
            if kind == 1:
                sum_body = _hot_loop(kernels[tracked[(dt, vec, 4, 0)]], "LDG.E.128")
                assert len(body) <= len(sum_body), (what, len(body), len(sum_body))
            assert _loads_before_first_wait(kernels[name])[0] == 4, what
            res, index_res = usage[arch][name], usage[arch][tracked[key]]
            assert res["LOCAL"] == 0 and res["STACK"] == 0, (what, res)
            # fewer registers, mostly (max: 44-46 against 45-63), but not always: float32
            # meanmax on sm_90 took 56 against 52; the launch bounds' cap holds either way
            assert res["REG"] <= _register_cap(vec, 4, kind), (what, res, index_res)
            checked += 1
    assert checked == 6 * len(_sass()), checked


# ---- the L2 policy of the forward's loads (CudaLaunchConfig::fwd_l2_evict_first) ---------------
_DESC = re.compile(r"desc\[UR(\d+)\]")


def test_forward_loads_of_x_carry_the_run_time_l2_policy():
    # Every load of x (16-byte LDG in the plain and pipelined kernels, 2- to 8-byte ones in the
    # scalar path, LDGSTS in the ring) names a memory descriptor (desc[URn], the pair URn:URn+1)
    # that the kernel selects at run time (a USEL writes URn or URn+1): the evict-first or the
    # normal policy of l2_load_policy, i.e. `.L2::cache_hint` survived to the SASS. Without it
    # sm_80 loads have no descriptor at all and sm_90 ones read the default from the constant
    # bank. The one global load without it is lengths[b] (an 8-byte LDG.E.64).
    checked = 0
    for arch, kernels in _sass().items():
        for name, text in kernels.items():
            if not (_FWD.search(name) or _RING.search(name)):
                continue
            selected = {int(r) for r in re.findall(r"USEL UR(\d+),", text)}
            loads = []
            for line in text.splitlines():
                if not (m := _INSTRUCTION.match(line)):
                    continue
                op, _, operands = re.sub(r"^@!?U?P\w+\s+", "", m.group(2)).partition(" ")
                if op.startswith(("LDG.E", "LDGSTS")):
                    loads.append((op, operands))
            unhinted = [(o, a) for o, a in loads
                        if not ((d := _DESC.search(a))
                                and {int(d.group(1)), int(d.group(1)) + 1} & selected)]
            what = f"{arch} {name[-60:]}"
            assert len(loads) > 1, f"{what}: no load of x"
            assert len(unhinted) == 1 and unhinted[0][0].startswith("LDG.E.64"), (
                what, unhinted[:4], sorted(selected))
            checked += 1
    assert checked >= 80 * len(_sass()), checked
