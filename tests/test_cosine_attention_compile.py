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
