"""Every launch configuration the cosine-attention launchers can choose compiles for sm_80 and
sm_90 without a GPU, fits in shared memory, does not spill (local 0, stack 0), and uses
tensor-core MMA (HMMA / HGMMA) for the half types.

kernels/cosine_attention.launch_configs is the launchers' own choice (_choose) enumerated: it
depends only on the dtype (bf16 / fp16 / fp32, the latter with IEEE or TF32 dots), the head-dim
bucket (BLOCK_D 32 / 64 / 128) and the kernel; sequence lengths, key lengths, window and memory
slots are runtime arguments. Each configuration is compiled as the JIT specialises it for the
benchmark head dims: d 32 / 64 / 128 with 16-aligned tensors, row strides and head dims
(`divisible`: tt.divisibility=16, which gives vectorised, pipelined loads), and d 40
(BLOCK_D 64, no divisibility on the head dim and row strides)."""
import os
import time

import pytest
import torch

from dtl_fast.kernels.cosine_attention import KERNELS, launch_configs

from _triton_aot import check_fits, compile_configs

MODULE = "dtl_fast.kernels.cosine_attention"
HEAD_DIMS = ((32, 32), (40, 40), (64, 64), (128, 128))

def test_launch_configs_cover_every_choice():
    configs = launch_configs(head_dims=HEAD_DIMS)
    assert {c["kernel"] for c in configs} == set(KERNELS)
    # One config per (kernel, dtype / dot precision, head-dim bucket, alignment): the choice
    # does not grow with sequence lengths, key lengths, window or memory slots.
    wide = launch_configs(head_dims=HEAD_DIMS + ((16, 16), (24, 24), (96, 96), (128, 64)))
    assert len(wide) == len({(c["kernel"], c["dtype"], tuple(sorted(c["constexprs"].items())),
                              tuple(c["divisible"])) for c in wide})
    assert len(configs) <= 60


@pytest.mark.slow
def test_every_launch_config_compiles_fits_without_spills_and_uses_mma():
    configs = launch_configs(head_dims=HEAD_DIMS)
    t0, c0 = time.time(), os.times()
    rows = compile_configs(MODULE, configs)
    c1 = os.times()
    cpu = c1.children_user - c0.children_user + c1.children_system - c0.children_system
    print(f"{len(configs)} configs, {len(rows)} compiles: {time.time() - t0:.1f} s wall, "
          f"{cpu:.1f} s CPU (workers)")
    assert len(rows) == 2 * len(configs)
    print("kernel | blocks | BLOCK_D | dtype | dot | aligned | warps | stages | arch | shared | "
          "regs | local | stack | mma")
    for row in rows:
        cfg = row["config"]
        c = cfg["constexprs"]
        blocks = "x".join(str(c[n]) for n in ("BLOCK_M", "BLOCK_N", "BLOCK_R") if n in c)
        print(f"{row['kernel']} | {blocks} | {c['BLOCK_D']} | {cfg['dtype']} | "
              f"{c.get('DOT_PREC', '-')} | {'D' in cfg['divisible']} | "
              f"{cfg['num_warps']} | {cfg['num_stages']} | sm_{row['arch']} | {row.get('shared')} | "
              f"{row.get('reg')} | {row.get('local')} | {row.get('stack')} | {row.get('mma')} | "
              f"{row['error'] or ''}")
    failures = []
    for row in rows:
        try:
            check_fits(row)
            cfg = row["config"]
            if cfg["dtype"] != str(torch.float32) and row["kernel"] != "_cos_attn_rowdot_kernel":
                assert row["mma"], f"{row['kernel']} sm_{row['arch']}: no HMMA / HGMMA in the SASS"
        except AssertionError as e:
            failures.append(str(e))
    assert not failures, "\n".join(failures)


# ------------------------------------------------------------------------------------------
# The second forward (kernels/cosine_attention_fwd.py: pre-pass, fixed-maximum kernel, short-
# sequence kernel) and the second backward (kernels/cosine_attention_bwd.py), in the dtypes the
# op runs them in on a GPU (ops.attn_version: bfloat16 / float16; float32 takes the first version:
# its second-version tiles spilled). Forward: every tile candidate in bfloat16 at the aligned
# head dims 64 / 128 (float16 compiles to the same code but for the element type), the defaults
# at every head dim (d 40: unaligned) and float16 at d 64, the pre-pass at d 40 / 64, the short
# kernel's tile buckets at d 64. Backward: every tile candidate in bfloat16 at every head dim
# (d 40 included: the unaligned specialisation is the one closest to spilling), the defaults
# in float16 at d 64.

FWD_MODULE = "dtl_fast.kernels.cosine_attention_fwd"
BWD_MODULE = "dtl_fast.kernels.cosine_attention_bwd"


def _dedup(configs):
    seen, out = set(), []
    for c in configs:
        key = (c["kernel"], c["dtype"], tuple(sorted(c["constexprs"].items())), c["num_warps"],
               c["num_stages"], tuple(c["divisible"]))
        if key not in seen:
            seen.add(key)
            out.append(c)
    return out


def _v2_configs(mod, main_kernels, other_kernels=()):
    bf, f16 = torch.bfloat16, torch.float16
    c = mod.launch_configs(dtypes=(bf,), head_dims=((64, 64), (128, 128)), kernels=main_kernels,
                           candidates=True)
    c += mod.launch_configs(dtypes=(bf,), head_dims=HEAD_DIMS, kernels=main_kernels, candidates=False)
    c += mod.launch_configs(dtypes=(f16,), head_dims=((64, 64),), kernels=main_kernels, candidates=False)
    if other_kernels:
        c += mod.launch_configs(dtypes=(bf,), head_dims=((40, 40), (64, 64)), kernels=other_kernels)
    return _dedup(c)


def _fwd_configs():
    from dtl_fast.kernels import cosine_attention_fwd as F2
    return _v2_configs(F2, ("_cos_attn_fwd2_kernel",), ("_cos_attn_prep_kernel",)) + _dedup(
        F2.launch_configs(dtypes=(torch.bfloat16,), head_dims=((64, 64),),
                          kernels=("_cos_attn_fwd_short_kernel",)))


# The TMA variant of the second forward (USE_TMA: q and K through tensor descriptors; TMA_V: V
# too), sm_90 only (TMA is Hopper's): every bfloat16 tile candidate at d 64 / 128 with V by
# descriptor, the defaults at every head dim (d 40: v rows of 80 bytes, TMA-able, unaligned
# specialisation), and the default at d 64 with V by pointer (v strides TMA cannot take).
TMA_ARCHS = (90,)


def _fwd_tma_configs():
    from dtl_fast.kernels import cosine_attention_fwd as F2
    fwd2 = ("_cos_attn_fwd2_kernel",)
    qkv = ((True, True),)
    c = F2.launch_configs(dtypes=(torch.bfloat16,), head_dims=((64, 64), (128, 128)), kernels=fwd2,
                          candidates=True, tma=qkv)
    c += F2.launch_configs(dtypes=(torch.bfloat16,), head_dims=HEAD_DIMS, kernels=fwd2,
                           candidates=False, tma=qkv)
    c += F2.launch_configs(dtypes=(torch.bfloat16,), head_dims=((64, 64),), kernels=fwd2,
                           candidates=False, tma=((True, False),))
    return _dedup(c)


def _bwd_configs():
    from dtl_fast.kernels import cosine_attention_bwd as B2
    c = B2.launch_configs(dtypes=(torch.bfloat16,), head_dims=HEAD_DIMS, candidates=True)
    c += B2.launch_configs(dtypes=(torch.float16,), head_dims=((64, 64),), candidates=False)
    return _dedup(c)


def test_v2_launch_configs_cover_every_candidate():
    from dtl_fast.kernels import cosine_attention_bwd as B2
    from dtl_fast.kernels import cosine_attention_fwd as F2
    fwd, bwd = _fwd_configs(), _bwd_configs()
    assert {c["kernel"] for c in fwd} == set(F2.KERNELS)
    assert {c["kernel"] for c in bwd} == set(B2.KERNELS)
    got = {(c["constexprs"]["BLOCK_M"], c["constexprs"]["BLOCK_N"], c["num_warps"], c["num_stages"])
           for c in fwd if c["kernel"] == "_cos_attn_fwd2_kernel" and c["dtype"] == str(torch.bfloat16)
           and c["constexprs"]["BLOCK_D"] in (64, 128)}
    want = {t for (cls, bd), cands in F2.FWD2_CANDIDATES.items() if cls == "half" and bd in (64, 128)
            for t in cands}
    assert got == want
    # the backward: every half candidate at every head dim, d 40 (unaligned) among them
    for kernel in B2.KERNELS:
        for d in HEAD_DIMS:
            bd = B2.block_d(*d)
            got = {(c["constexprs"]["BLOCK_M"], c["constexprs"]["BLOCK_N"], c["num_warps"],
                    c["num_stages"])
                   for c in bwd if c["kernel"] == kernel and c["dtype"] == str(torch.bfloat16)
                   and c["constexprs"]["BLOCK_D"] == bd
                   and ("D" in c["divisible"]) == (d[0] % 16 == 0)}
            want = {(cols, rows, w, st) if "dkdv" in kernel else (rows, cols, w, st)
                    for rows, cols, w, st in B2.BWD2_CANDIDATES[(kernel, "half", bd)]}
            assert got == want, (kernel, d)
    assert len(fwd) + len(bwd) <= 60
    # the TMA variant: every half candidate at d 64 / 128, both V forms, only half types
    tma = _fwd_tma_configs()
    assert all(c["constexprs"]["USE_TMA"] for c in tma)
    assert {c["dtype"] for c in tma} == {str(torch.bfloat16)}
    got = {(c["constexprs"]["BLOCK_M"], c["constexprs"]["BLOCK_N"], c["num_warps"], c["num_stages"])
           for c in tma if c["constexprs"]["BLOCK_D"] in (64, 128) and c["constexprs"]["TMA_V"]}
    assert got == {t for (cls, bd), cands in F2.FWD2_CANDIDATES.items()
                   if cls == "half" and bd in (64, 128) for t in cands}
    assert {c["constexprs"]["TMA_V"] for c in tma} == {True, False}
    assert not any(c["constexprs"]["USE_TMA"] for c in fwd if "USE_TMA" in c["constexprs"])
    assert len(tma) <= 10


def _check_rows(rows, half_mma_exempt=("_cos_attn_prep_kernel",)):
    print("kernel | constexprs | warps | stages | arch | shared | regs | local | stack | mma")
    failures = []
    for row in rows:
        cfg = row["config"]
        print(f"{row['kernel']} | {cfg['constexprs']} | {cfg['num_warps']} | {cfg['num_stages']} | "
              f"sm_{row['arch']} | {row.get('shared')} | {row.get('reg')} | {row.get('local')} | "
              f"{row.get('stack')} | {row.get('mma')} | {row['error'] or ''}")
        try:
            check_fits(row)
            if cfg["dtype"] != str(torch.float32) and row["kernel"] not in half_mma_exempt:
                assert row["mma"], f"{row['kernel']} sm_{row['arch']}: no HMMA / HGMMA in the SASS"
        except AssertionError as e:
            failures.append(str(e))
    assert not failures, "\n".join(failures)


@pytest.mark.slow
def test_v2_forward_compiles_fits_without_spills_and_uses_mma():
    """Every forward configuration for sm_80 / sm_90, and the TMA variant's for sm_90: compiles,
    fits in shared memory, no spills, HMMA / HGMMA; TMA loads (UTMALDG / UBLKCP) in the SASS
    of exactly the TMA configurations."""
    configs, tma = _fwd_configs(), _fwd_tma_configs()
    t0 = time.time()
    rows = compile_configs(FWD_MODULE, configs)
    tma_rows = compile_configs(FWD_MODULE, tma, archs=TMA_ARCHS)
    print(f"{len(configs)} configs, {len(rows)} compiles; {len(tma)} TMA configs, "
          f"{len(tma_rows)} compiles: {time.time() - t0:.1f} s wall")
    assert len(rows) == 2 * len(configs) and len(tma_rows) == len(tma)
    _check_rows(rows + tma_rows)
    print("TMA in the SASS: " + ", ".join(
        f"{r['kernel']} {r['config']['constexprs'].get('USE_TMA')} sm_{r['arch']}: {r.get('tma')}"
        for r in rows + tma_rows if r["kernel"] == "_cos_attn_fwd2_kernel"))
    for r in rows + tma_rows:
        want = bool(r["config"]["constexprs"].get("USE_TMA"))
        assert r["tma"] == want, f"{r['kernel']} sm_{r['arch']} {r['config']['constexprs']}: " \
                                 f"TMA loads in the SASS {r['tma']}, want {want}"


@pytest.mark.slow
def test_v2_backward_compiles_fits_without_spills_and_uses_mma():
    """Every candidate of the second backward: compiles for sm_80 / sm_90, fits in shared
    memory, no register spills (stack 0, local 0), HMMA / HGMMA in the SASS."""
    configs = _bwd_configs()
    t0 = time.time()
    rows = compile_configs(BWD_MODULE, configs)
    print(f"{len(configs)} configs, {len(rows)} compiles: {time.time() - t0:.1f} s wall")
    assert len(rows) == 2 * len(configs)
    _check_rows(rows)


# ------------------------------------------------------------------------------------------
# float64 (the gpu tests' gradient reference: test_cosine_attention.py::test_gpu_float64_and_opcheck,
# and DTL_FAST_ATTN_IMPL=v2 runs float64 on the second version). The interpreter accepts a
# float64 tl.dot into a float64 accumulator whatever out_dtype says; the GPU compile of triton
# 3.6 does not (its tl.dot defaults out_dtype to float32 and asserts the accumulator has that
# type: the H100 run's compile error, bench/results/gpu_check_nvidia-h100_2-tests.log). Every
# kernel of both versions, forward and backward, at the default tiles for head dims 40 / 24
# (the gpu test's: BLOCK_D 64, unaligned), 64 and 128, for sm_80 and sm_90: it must compile and
# fit in shared memory. Spills are allowed (a test dtype; the figures are printed).
F64_HEAD_DIMS = ((40, 24), (64, 64), (128, 128))


def _f64_configs():
    from dtl_fast.kernels import cosine_attention as V1
    from dtl_fast.kernels import cosine_attention_bwd as B2
    from dtl_fast.kernels import cosine_attention_fwd as F2
    f64 = (torch.float64,)
    return [(MODULE, V1.launch_configs(dtypes=f64, head_dims=F64_HEAD_DIMS)),
            (FWD_MODULE, F2.launch_configs(dtypes=f64, head_dims=F64_HEAD_DIMS, candidates=False)),
            (BWD_MODULE, B2.launch_configs(dtypes=f64, head_dims=F64_HEAD_DIMS, candidates=False))]


def test_f64_launch_configs_cover_every_kernel():
    from dtl_fast.kernels import cosine_attention_bwd as B2
    from dtl_fast.kernels import cosine_attention_fwd as F2
    groups = dict(_f64_configs())
    assert {c["kernel"] for c in groups[MODULE]} == set(KERNELS)
    assert {c["kernel"] for c in groups[FWD_MODULE]} == set(F2.KERNELS)
    assert {c["kernel"] for c in groups[BWD_MODULE]} == set(B2.KERNELS)
    for configs in groups.values():
        assert all(c["dtype"] == str(torch.float64) and c["constexprs"]["IS_F64"] for c in configs)


@pytest.mark.slow
def test_f64_every_kernel_compiles_for_sm80_sm90():
    failures, n = [], 0
    t0 = time.time()
    for module, configs in _f64_configs():
        rows = compile_configs(module, configs)
        assert len(rows) == 2 * len(configs)
        n += len(rows)
        for row in rows:
            cfg = row["config"]
            print(f"{row['kernel']} | {cfg['constexprs']} | {cfg['num_warps']} | "
                  f"{cfg['num_stages']} | sm_{row['arch']} | {row.get('shared')} | "
                  f"{row.get('reg')} | {row.get('local')} | {row.get('stack')} | {row.get('mma')} | "
                  f"{(row['error'] or '')[:300]}")
            try:
                check_fits(row, allow_spills=True)
            except AssertionError as e:
                failures.append(str(e))
    print(f"float64: {n} compiles, {time.time() - t0:.1f} s wall")
    assert not failures, "\n".join(failures)
