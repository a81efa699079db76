"""Ahead-of-time compile of every launch configuration of the LSTM / GRU kernels for sm_80 and
sm_90 (no GPU needed): each compiles, fits in shared memory, does not spill registers (local
and stack 0) and, for bfloat16 / float16 / TF32, uses tensor-core MMA.

The set is complete, not a sample: the launchers' choice (kernels/rnn.py, pick_config) depends
only on the kernel, the dtype and TF32 (lengths are a runtime tensor, the tile shape is fixed
and T, B, D are not value-specialised), so launch_configs lists all 15 of them: 4 kernels x
(float32, float32 + TF32, bfloat16, float16), less the GRU backward's TF32 variant (it spilled;
that kernel runs in full float32 when TF32 is allowed). Each is compiled twice: without divisibility hints
(odd H, unaligned views) and as Triton's launcher specialises it at realistic shapes (every
pointer 16-byte aligned, H a multiple of 16): two different kernels.

Not compiled here, because they never run on a GPU: the F64 variant (float64, interpreter-only:
the launcher refuses float64 CUDA tensors and backend "auto" sends them to PyTorch), the
DOT_F32 variant (bfloat16 upcast before tl.dot, set only in the interpreter) and the MAX_BLOCK
test knob (smaller tiles, set only by tests/test_rnn_ops.py in the interpreter)."""
import os
import time

import pytest
import torch

from _triton_aot import check_fits, compile_configs, with_aligned_variants

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _dtype_name(cfg):
    sig = cfg["signature"]
    x = sig.get("gx_ptr") or sig["gout_ptr"]
    return x[1:] + ("+tf32" if cfg["constexprs"]["ALLOW_TF32"] else "")


@pytest.mark.slow
def test_every_launch_configuration_compiles_and_fits():
    from dtl_fast.kernels.rnn import KERNELS, launch_configs
    configs = launch_configs()
    assert len(configs) == 15
    assert {(c["kernel"], _dtype_name(c)) for c in configs} == {
        (k, d) for k in KERNELS for d in ("fp32", "fp32+tf32", "bf16", "fp16")
        if (k, d) != ("_gru_bwd_kernel", "fp32+tf32")}
    for c in configs:  # interpreter-only variants are not among them
        assert not c["constexprs"]["F64"] and not c["constexprs"]["DOT_F32"]
    start, cpu0 = time.time(), os.times()
    configs = with_aligned_variants([{**c, "aligned_ints": ["H"]} for c in configs])
    rows = compile_configs("dtl_fast.kernels.rnn", configs)
    cpu1 = os.times()
    assert len(rows) == 2 * len(configs) == 60
    lines = [f"{len(rows)} compiles in {time.time() - start:.0f} s wall, "
             f"{cpu1.children_user - cpu0.children_user + cpu1.children_system - cpu0.children_system:.0f} s CPU"]
    failures = []
    for row in rows:
        c = row["config"]
        k = c["constexprs"]
        if row["error"] is None:
            lines.append(f"{row['kernel']:17s} sm_{row['arch']} {_dtype_name(c):9s} "
                         f"{'aligned' if c.get('divisible') else 'unaligned':9s} "
                         f"B{k['BLOCK_B']}/H{k['BLOCK_H']}/K{k['BLOCK_K']} warps={c['num_warps']} "
                         f"shared={row['shared']} reg={row['reg']} stack={row['stack']} "
                         f"local={row['local']} mma={row['mma']}")
        try:
            check_fits(row)
        except AssertionError as e:
            failures.append(str(e))
            continue
        # Half precision and TF32 recurrences must use tensor cores.
        if _dtype_name(c) != "fp32" and not row["mma"]:
            failures.append(f"{row['kernel']} sm_{row['arch']} {_dtype_name(c)} {c.get('divisible')}: no HMMA / HGMMA in the SASS")
    print("\n".join(lines))
    assert not failures, f"{len(failures)} of {len(rows)} compiles do not fit:\n" + "\n".join(failures)


def test_launchers_choose_only_listed_configurations(monkeypatch):
    """Whatever the shape, lengths or not, the configuration a launcher picks (the same call
    with interpret=False, i.e. what it picks on a GPU) is one of launch_configs."""
    from dtl_fast.kernels import rnn as k
    listed = k.launch_configs()
    seen = []
    real = k.pick_config

    def spy(kernel, dtype, *, allow_tf32, interpret=False):
        for tf32 in (False, True):
            seen.append(real(kernel, dtype, allow_tf32=tf32, interpret=False))
        return real(kernel, dtype, allow_tf32=allow_tf32, interpret=interpret)

    monkeypatch.setattr(k, "pick_config", spy)
    small, odd = (1, 1, 1, 1, None), (2, 17, 3, 2, [2] * 16 + [1])  # T, B, H, D, lengths
    for dtype, shapes in [(torch.float32, (small, odd)), (torch.bfloat16, (odd,)), (torch.float16, (small,))]:
        for T, B, H, D, lengths in shapes:
            kw = dict(dtype=dtype)
            lens = None if lengths is None else torch.tensor(lengths)
            gx = torch.randn(T, B, D, 4 * H, **kw)
            w = torch.randn(D, 4 * H, H, **kw)
            h0, c0 = torch.randn(D, B, H, **kw), torch.randn(D, B, H, **kw)
            out, hn, cn, act, c_all = k.lstm_forward(gx, w, h0, c0, lens)
            k.lstm_backward(torch.randn_like(out), hn, cn, w, c0, act, c_all, lens)
            gx = torch.randn(T, B, D, 3 * H, **kw)
            w = torch.randn(D, 3 * H, H, **kw)
            out, hn, act = k.gru_forward(gx, w, torch.randn(D, H, **kw), h0, lens)
            k.gru_backward(torch.randn_like(out), hn, w, h0, out, act, lens)
    assert {c["kernel"] for c in seen} == set(k.KERNELS)
    for cfg in seen:
        assert cfg in listed, cfg


# ------------------------------------------------------------------------------------------------
# The persistent kernels (kernels/rnn_persistent.py)
# ------------------------------------------------------------------------------------------------

def _p_name(cfg):
    sig = cfg["signature"]
    x = (sig.get("gx_ptr") or sig["gout_ptr"])[1:]
    c = cfg["constexprs"]
    return f"{x} n{c['BLOCK_N']} {'resident' if c['RESIDENT'] else 'streamed'}"


@pytest.mark.slow
def test_every_persistent_launch_configuration_compiles_and_fits():
    """All 31 configurations (4 kernels x (float32 streamed at BLOCK_N 16 / 32; bf16 / fp16
    streamed at 16 / 32 or resident at 16), less the float32 GRU backward at BLOCK_N=16) for
    sm_80 and sm_90: compile, fit in shared memory, no spills, and
    tensor-core MMA in the half-precision ones. One compiled kernel serves the persistent and
    the step mode (PERSISTENT is a runtime argument), and the barrier's atomics are in every
    one of them. Compiled as the launcher specialises them at realistic shapes (aligned
    pointers, H % 16 == 0): the unaligned variant of the same code is covered by the loop
    kernels' test above and doubles a compile time that is already the longest of the suite."""
    from dtl_fast.kernels.rnn_persistent import KERNELS, launch_configs
    configs = launch_configs()
    assert len(configs) == 31
    assert {c["kernel"] for c in configs} == set(KERNELS)
    for c in configs:
        assert not c["constexprs"]["F64"] and not c["constexprs"]["DOT_F32"]
        assert not c["constexprs"]["ALLOW_TF32"]
    configs = [v for v in with_aligned_variants([{**c, "aligned_ints": ["H"]} for c in configs])
               if v.get("divisible")]
    start = time.time()
    rows = compile_configs("dtl_fast.kernels.rnn_persistent", configs)
    assert len(rows) == 2 * len(configs) == 62
    lines, failures = [f"{len(rows)} compiles in {time.time() - start:.0f} s wall"], []
    for row in rows:
        c = row["config"]
        if row["error"] is None:
            lines.append(f"{row['kernel']:21s} sm_{row['arch']} {_p_name(c):22s} warps={c['num_warps']} "
                         f"stages={c['num_stages']} shared={row['shared']} reg={row['reg']} "
                         f"stack={row['stack']} local={row['local']} mma={row['mma']}")
        try:
            check_fits(row)
        except AssertionError as e:
            failures.append(str(e))
            continue
        if not _p_name(c).startswith("fp32") and not row["mma"]:
            failures.append(f"{row['kernel']} sm_{row['arch']} {_p_name(c)}: no HMMA / HGMMA in the SASS")
    print("\n".join(lines))
    assert not failures, f"{len(failures)} of {len(rows)} compiles do not fit:\n" + "\n".join(failures)


def test_persistent_launchers_choose_only_listed_configurations(monkeypatch):
    """Whatever the shape (H below, inside and above the resident bucket, both BLOCK_N), the
    configuration the persistent launchers pick, asked as on a GPU, is one of launch_configs."""
    from dtl_fast.kernels import rnn_persistent as k
    listed = k.launch_configs()
    seen = []
    real = k.pick_config

    def spy(kernel, dtype, *, H, block_n=16, resident=None, num_warps=None, interpret=False):
        seen.append(real(kernel, dtype, H=H, block_n=block_n, resident=resident, num_warps=num_warps))
        return real(kernel, dtype, H=H, block_n=block_n, resident=resident, num_warps=num_warps,
                    interpret=interpret)

    monkeypatch.setattr(k, "pick_config", spy)
    monkeypatch.setattr(k, "TUNE", {})
    for dtype, H, block_n in [(torch.float32, 3, 16), (torch.bfloat16, 130, None), (torch.float16, 17, 32)]:
        k.TUNE.clear()
        if block_n:
            k.TUNE["block_n"] = block_n
        T, B, D = 1, 2, 2
        gx = torch.randn(T, B, D, 4 * H, dtype=dtype)
        w = torch.randn(D, 4 * H, H, dtype=dtype)
        h0, c0 = torch.randn(D, B, H, dtype=dtype), torch.randn(D, B, H, dtype=dtype)
        out, hn, cn, act, c_all = k.lstm_forward(gx, w, h0, c0, None, persistent=False)
        k.lstm_backward(torch.randn_like(out), hn, cn, w, c0, act, c_all, None, persistent=False)
        gx = torch.randn(T, B, D, 3 * H, dtype=dtype)
        w = torch.randn(D, 3 * H, H, dtype=dtype)
        out, hn, act = k.gru_forward(gx, w, torch.randn(D, H, dtype=dtype), h0, None, persistent=False)
        k.gru_backward(torch.randn_like(out), hn, w, h0, out, act, None, persistent=False)
    assert {c["kernel"] for c in seen} == set(k.KERNELS)
    assert any(c["constexprs"]["RESIDENT"] for c in seen)
    for cfg in seen:
        assert cfg in listed, cfg
