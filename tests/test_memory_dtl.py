"""bench/memory_dtl.py: the live-bytes tracker on cases whose answer is known by hand, and the
DTL step it measures (stub kernels allocate what the interpreted kernels allocate)."""
import os
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import memory_dtl as MD

F32 = 4


def _track(fn, **kw):
    t = MD.LiveMemory(device_type="cpu", **kw)
    with t.tracking():
        fn(t)
    return t


def test_rounded():
    assert [MD.rounded(n, 512) for n in (0, 1, 512, 513, 4000)] == [0, 512, 512, 1024, 4096]
    assert MD.rounded(4000, 1) == 4000


def test_peak_and_live_set_of_known_allocations():
    # a: 4000 B -> 4096, b: 400 B -> 512, c: 8000 B -> 8192. Live: a+b = 4608, then a freed,
    # then b+c = 8704: the peak, with b and c alive (without frees it would read 12800).
    def body(t):
        a = torch.empty(1000)
        b = torch.empty(100)
        del a
        c = torch.empty(2000)
        t.keep = (b, c)

    t = _track(body)
    peak, at = t.peak()
    assert peak == 512 + 8192
    live = t.live_at(at)
    assert sorted(b.shape for b in live) == [(100,), (2000,)]
    assert t.end_bytes() == 512 + 8192  # b and c outlive the region


def test_no_rounding_counts_exact_bytes():
    t = _track(lambda t: setattr(t, "keep", torch.empty(3, dtype=torch.float64)), block=1)
    assert t.peak()[0] == 24


def test_views_and_inplace_ops_are_not_allocations():
    def body(t):
        x = torch.zeros(256)
        y = x[10:].view(2, 123)  # a view
        y.add_(1.0)  # in place
        t.keep = (x, y)

    t = _track(body)
    assert t.peak()[0] == 256 * F32
    assert len([b for b in t.blocks.values() if b.alloc_at >= 0]) == 1


def test_a_base_tensor_freed_inside_counts_negative():
    # memory_allocated falls when a tensor from before the region is freed: so does the tracker
    def region(free_first):
        holder = {"pre": torch.empty(1024)}

        def body(t):
            if free_first:
                del holder["pre"]
            t.keep = torch.empty(1024)
            holder.clear()

        return _track(body)

    alloc_first, free_first = region(False), region(True)
    assert alloc_first.peak() == (1024 * F32, 0)  # both alive for a moment
    assert free_first.peak() == (0, -1)  # the new block fits in what was freed: no rise
    for t in (alloc_first, free_first):
        assert t.end_bytes() == 0
        assert [b.shape for b in t.freed_base_at(len(t.events))] == [(1024,)]


def test_where_names_the_module_in_forward_and_the_node_in_backward():
    lin = nn.Linear(8, 4)
    names = {id(lin): "head"}
    x = torch.randn(16, 8)

    def body(t):
        t.phase = "forward"
        y = lin(x)
        t.phase = "backward"
        y.sum().backward()

    t = MD.LiveMemory(device_type="cpu", module_names=names)
    with t.tracking():
        body(t)
    fwd = [b for b in t.blocks.values() if b.phase == "forward"]
    bwd = [b for b in t.blocks.values() if b.phase == "backward"]
    assert {b.where for b in fwd} == {"head"}
    assert any(b.where.startswith("bwd:AddmmBackward") for b in bwd)


@torch.library.custom_op("memtest::scratch", mutates_args=())
def _scratch(x: torch.Tensor) -> torch.Tensor:
    work = torch.empty(4096)  # a workspace freed before the op returns (16 KiB)
    work.fill_(1.0)
    return x + work[: x.numel()].view_as(x)


def test_python_custom_op_is_tracked_inside_when_its_namespace_is_reentered():
    x = torch.randn(64)

    def body(t):
        t.keep = torch.ops.memtest.scratch(x)

    inside = _track(body, reenter=("memtest",))
    outside = _track(body, reenter=())
    # inside: the 16 KiB workspace and the 256 B output (-> 512) alive together
    assert inside.peak()[0] == 4096 * F32 + 512
    # outside: only the output is seen
    assert outside.peak()[0] == 512
    assert inside.end_bytes() == outside.end_bytes() == 512


def _dead_case(w_list):
    """Gradient of a weight built by torch.cat from Parameters, some used twice: AccumulateGrad
    keeps slices of the concatenated gradient as the parameters' .grad (views)."""
    x = torch.randn(5, 16)

    def body(t):
        w = torch.cat(w_list)
        (x @ w.t()).sum().backward()
        for i, p in enumerate(dict.fromkeys(w_list)):
            t.tag(p.grad, f"grad p{i}")

    return _track(body)


def test_dead_gradient_bytes_of_a_parameter_used_twice_in_one_concatenation():
    a = nn.Parameter(torch.randn(32, 16))  # 2 KiB
    b = nn.Parameter(torch.randn(64, 16))  # 4 KiB
    t = _dead_case([a, b, a])
    # the concatenated gradient [128, 16] (8 KiB) is kept for b's slice; a's two slices were
    # summed into a new tensor: 2 x 2 KiB of the 8 KiB block are dead
    dead = t.dead_grad_bytes()
    assert [(blk.shape, d) for blk, d in dead] == [((128, 16), 2 * 32 * 16 * F32)]
    assert sorted(lbl for lbl, _ in dead[0][0].tags) == ["grad p1"]


def test_no_dead_gradient_bytes_without_a_repeated_parameter():
    a = nn.Parameter(torch.randn(32, 16))
    b = nn.Parameter(torch.randn(64, 16))
    t = _dead_case([a, b])
    assert t.dead_grad_bytes() == []
    # both gradients are views of the one [96, 16] block
    blk = next(blk for blk in t.blocks.values() if blk.tags)
    assert blk.shape == (96, 16) and len(blk.tags) == 2


# the fused DTL on CPU tensors runs its Triton kernels in the interpreter (conftest sets it
# where there is no GPU); on a GPU machine the step test is bench/memory_dtl.py --device cuda
needs_interpreter = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                       reason="fused kernels on CPU tensors need TRITON_INTERPRET=1")


def _tiny_fused(kernels, warmup=1):
    BD = MD._bench()
    pre = MD.PRESETS["tiny"]
    case = BD.Case("lstm", pre["B"], pre["T"], pre["S"], "float32", model=pre["model"])
    return MD.run_provider("fused", "fused", case, "cpu", None, kernels=kernels, warmup=warmup)


def _timeline(r):
    blocks = r.tracker.blocks
    return [(blocks[i].op, blocks[i].shape, blocks[i].dtype, blocks[i].phase, d)
            for i, d in r.tracker.events]


@pytest.mark.slow
@needs_interpreter
def test_stub_kernels_allocate_what_the_interpreted_kernels_allocate():
    """--kernels stub (the bench size on CPU) must see the same allocations and frees, in the
    same order, as the Triton interpreter: the launchers allocate, the kernels only write.
    (No warm-up step: Adam's state is then made inside the tracked step, in both.)"""
    interp = _tiny_fused("interpret", warmup=0)
    stub = _tiny_fused("stub", warmup=0)
    assert interp.peak > 0
    assert _timeline(stub) == _timeline(interp)
    assert (stub.peak, stub.at) == (interp.peak, interp.at)


@needs_interpreter
def test_fused_step_keeps_no_dead_gradient_bytes():
    # issue 12: the DAM long-term memory module's q_proj used to sit in both grouped GEMMs of
    # DAMLayer.branches_stacked; its two gradient slices then stayed allocated until zero_grad,
    # through the encoder backward where the step peaks (0.25 MiB at bench size)
    r = _tiny_fused("stub")
    assert r.tracker.dead_grad_bytes() == []


@pytest.mark.gpu
def test_gpu_tracker_peak_matches_the_caching_allocator():
    """On CUDA the tracker's rounding is the caching allocator's: for plain tensor allocations
    its peak equals max_memory_allocated() above the start, byte for byte."""
    dev = torch.device("cuda")
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()

    def body(t):
        a = torch.empty(1, device=dev, dtype=torch.uint8)
        b = torch.empty(513, device=dev, dtype=torch.uint8)
        c = torch.empty(1000, device=dev)
        del b
        d = torch.empty(3000, device=dev)
        t.keep = (a, c, d)

    t = MD.LiveMemory(device_type="cuda")
    with t.tracking():
        body(t)
    torch.cuda.synchronize()
    assert t.peak()[0] == torch.cuda.max_memory_allocated() - before
    assert t.end_bytes() == torch.cuda.memory_allocated() - before
