"""Peak live memory of one DTL training step, per provider, and what is alive at the peak.

Issue 12 asks for "peak GPU memory of fused <= that of the reference". bench_dtl measures a
provider's peak_mb (harness.peak_mb) as torch.cuda.max_memory_allocated() minus
memory_allocated() before ONE step (forward, dtl_loss, backward, Adam step, zero_grad), taken
after the timed steps: Adam's state already exists and the gradients are None. This script
takes the same step on the same model and inputs (bench_dtl's Case, make_inputs, DTL defaults)
and records, with a TorchDispatchMode, every tensor storage the step allocates and when each is
freed. That gives, per provider:
  - the peak of live bytes above what was allocated before the step, and when it happened
    (phase: forward / loss / backward / optimizer / zero_grad; the op, and in the backward the
    autograd node, that allocated the block that made the peak);
  - every storage alive at that moment, grouped by where it was allocated (the DTL submodule in
    the forward, the autograd node in the backward), op, shape and dtype;
  - the difference between the providers' live sets at their peaks.

Sizes are rounded up to 512 bytes (the CUDA caching allocator's smallest block and rounding),
so CPU figures compare with max_memory_allocated. What the tracker cannot see: memory a C++
kernel allocates and frees inside one call (cuDNN / MKL-DNN workspaces, different on CPU and
GPU, the same for both providers here since only the encoder convolutions have them), and the
host tensors a CUDA run keeps on the CPU (lengths; on a CPU run they are counted: a few hundred
bytes). Inside dtl_fast's own ops (their Python launchers) every allocation is seen.

Kernels on CPU: "interpret" runs the Triton kernels in the interpreter (TRITON_INTERPRET=1,
small sizes only: minutes per step at the bench size); "stub" skips the kernel bodies (the
launchers still allocate every output, workspace and contiguous copy they do on a GPU; the
values are garbage), which makes the bench's full size affordable: the allocation pattern does
not depend on the values (no launcher reads a kernel's result on the host). tests/
test_memory_dtl.py checks that both give the same timeline at a small size.

On CUDA the step is also measured the way bench_dtl does (max_memory_allocated - allocated
before the step; the "cuda peak" line), and --snapshot FILE dumps the allocator history of the
step (torch.cuda.memory._record_memory_history; open it at https://pytorch.org/memory_viz).

--patch FILE (a Python file defining apply() -> undo(), e.g. one that swaps in a method of a
scratch copy of a module) runs the fused provider once more with a proposed change applied, so
its effect shows next to the unpatched run.

    python bench/memory_dtl.py --device cpu --preset small                 (interpreter)
    python bench/memory_dtl.py --device cpu --preset bench --kernels stub  (bench size)
    python bench/memory_dtl.py --device cuda --preset bench [--dtype bf16-amp] [--snapshot f.pickle]
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import os
import sys
import traceback
import types
import warnings
import weakref
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

MiB = float(1 << 20)
CUDA_BLOCK = 512  # the CUDA caching allocator rounds every block up to a multiple of 512 bytes
_HERE = Path(__file__).resolve().parent
_ROOT = _HERE.parent
# frames under these folders name where an allocation came from (the first one, innermost)
_OWN_CODE = tuple(str(_ROOT / p) for p in ("dtl_fast", "kernels", "bench"))


def rounded(nbytes: int, block: int) -> int:
    """nbytes rounded up to a multiple of `block` (0 stays 0; block 1: unchanged)."""
    return -(-nbytes // block) * block if nbytes else 0


@dataclass
class Block:
    """One storage allocated while the tracker was active (or alive when it started: base)."""
    id: int
    nbytes: int  # rounded
    op: str  # the op whose output it was first seen as ("<base>" for a base storage)
    shape: tuple
    dtype: str
    device: str
    phase: str
    where: str  # module path (forward), autograd node (backward), or the innermost own frame
    alloc_at: int = -1  # event index
    free_at: int | None = None
    tags: list = field(default_factory=list)  # (label, bytes) of tensors viewing it: tag()


class LiveMemory(TorchDispatchMode):
    """Live bytes of tensor storages over a region of code, with what is alive at the peak.

    Every op's outputs are inspected; a storage not seen before is an allocation (its size
    rounded to `block` bytes), and a weakref callback on it records its free. Storages alive
    when the tracker starts (found through the garbage collector) are the base: their frees
    during the region count as negative, as they lower torch.cuda.memory_allocated.

    device_type: count only storages on this device type ("cuda", "cpu"; None: all).
    reenter: op namespaces whose implementations are tracked inside too (dtl_fast's custom ops:
    their Python launchers allocate outputs, workspaces and contiguous copies).
    `phase` (a string attribute) labels allocations; `pause()` stops recording (the Triton
    interpreter's own host copies are not device memory).

    After the region: peak() -> (bytes, event index), live_at(index) -> [Block], timeline.
    """

    def __init__(self, device_type: str | None = None, block: int = CUDA_BLOCK,
                 reenter: tuple = ("dtl_fast",), module_names: dict | None = None):
        super().__init__()
        self.device_type = device_type
        self.block = block
        self.reenter = tuple(reenter)
        self.phase = "-"
        self.blocks: dict[int, Block] = {}
        self.events: list[tuple[int, int]] = []  # (block id, +nbytes | -nbytes)
        self._refs: dict[int, weakref.ref] = {}
        self._by_ptr: dict[int, int] = {}  # StorageImpl address -> block id, for live blocks
        self._next = 0
        self.op_calls = 0  # operator calls seen (inside dtl_fast's ops too): a launch count proxy
        self._paused = 0
        self._module_stack: list[str] = []
        self._module_names = module_names or {}
        self._hooks = []
        self.active = False

    # -- storages --------------------------------------------------------------------------------
    def _counted(self, st) -> bool:
        return st.nbytes() > 0 and (self.device_type is None or st.device.type == self.device_type)

    def _new_block(self, st, **info) -> Block | None:
        key = st._cdata
        if key in self._by_ptr or not self._counted(st):
            return None
        bid = self._next
        self._next += 1
        b = Block(bid, rounded(st.nbytes(), self.block), device=str(st.device), **info)
        self.blocks[bid] = b
        self._by_ptr[key] = bid
        self._refs[bid] = weakref.ref(st, partial(self._freed, bid, key))
        return b

    def _freed(self, bid: int, key: int, _ref) -> None:
        b = self.blocks[bid]
        self._by_ptr.pop(key, None)
        self._refs.pop(bid, None)
        if not self.active or b.free_at is not None:
            return
        b.free_at = len(self.events)
        self.events.append((bid, -b.nbytes))

    def _scan_base(self) -> None:
        with warnings.catch_warnings():  # isinstance on every object trips deprecation shims
            warnings.simplefilter("ignore")
            objs = gc.get_objects()
            tensors = [o for o in objs if isinstance(o, torch.Tensor)]
        for obj in tensors:
            try:
                if not obj.is_meta and obj.layout == torch.strided:
                    st = obj.untyped_storage()
                    self._new_block(st, op="<base>", shape=tuple(obj.shape), dtype=str(obj.dtype),
                                    phase="<base>", where="<base>")
            except Exception:  # noqa: BLE001 -- tensor subclasses, freed wrappers: not ours
                continue

    # -- context -------------------------------------------------------------------------------
    def start(self) -> LiveMemory:
        """Scans the base, installs the module hooks and pushes the mode; stop() undoes it.
        (`with tracker.tracking():` does both.)"""
        gc.collect()
        self._scan_base()
        self.active = True
        self._hooks = [torch.nn.modules.module.register_module_forward_pre_hook(self._pre),
                       torch.nn.modules.module.register_module_forward_hook(self._post)]
        self.__enter__()
        return self

    def stop(self) -> None:
        self.__exit__(None, None, None)
        self.active = False
        for h in self._hooks:
            h.remove()
        self._hooks = []

    @contextlib.contextmanager
    def tracking(self):
        """start() ... stop() around a region."""
        self.start()
        try:
            yield self
        finally:
            self.stop()

    def _pre(self, module, _args):
        self._module_stack.append(self._module_names.get(id(module), type(module).__name__))

    def _post(self, module, _args, _out):
        if self._module_stack:
            self._module_stack.pop()

    @contextlib.contextmanager
    def pause(self):
        """A region in which nothing is recorded (storages first seen there are ignored)."""
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1

    def _where(self) -> str:
        node = torch._C._current_autograd_node()
        if node is not None:
            return f"bwd:{node.name()}"
        if self._module_stack:
            return self._module_stack[-1]
        for fr in reversed(traceback.extract_stack(limit=12)[:-3]):
            if fr.filename.startswith(_OWN_CODE) and not fr.filename.endswith("memory_dtl.py"):
                return f"{Path(fr.filename).name}:{fr.name}"
        return "-"

    def _python_impl(self, func, args, kwargs):
        """The Python implementation of a torch.library.custom_op in one of `reenter`'s
        namespaces that the dispatcher would run for these arguments (the one registered for
        their device type, else the default), called directly: calling the op again would
        dispatch back here."""
        if func.namespace not in self.reenter:
            return None
        from torch._library.custom_ops import OPDEFS
        opdef = OPDEFS.get(func._schema.name)
        if opdef is None:
            return None
        dev = next((a.device.type for a in tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)),
                   None)
        return opdef._backend_fns.get(dev) or opdef._backend_fns.get(None)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self._paused:
            return func(*args, **kwargs)
        self.op_calls += 1
        impl = self._python_impl(func, args, kwargs)
        if impl is not None:
            with self:  # the op's own Python code (its launcher) runs with the tracker on
                out = impl(*args, **kwargs)
        else:
            out = func(*args, **kwargs)
        where = None
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor) or t.is_meta:
                continue
            st = t.untyped_storage()
            if st._cdata in self._by_ptr or not self._counted(st):
                continue
            where = where or self._where()
            b = self._new_block(st, op=str(func.name()).replace("::", "."), shape=tuple(t.shape),
                                dtype=str(t.dtype).replace("torch.", ""), phase=self.phase,
                                where=where)
            if b is not None:
                b.alloc_at = len(self.events)
                self.events.append((b.id, b.nbytes))
        return out

    # -- results -------------------------------------------------------------------------------
    def tag(self, t: torch.Tensor, label: str) -> None:
        """Adds (label, bytes of t) to the block holding t's storage (e.g. a parameter's
        gradient: a gradient may be a view into a larger block, see dead_grad_bytes)."""
        bid = self._by_ptr.get(t.untyped_storage()._cdata)
        if bid is not None:
            self.blocks[bid].tags.append((label, t.numel() * t.element_size()))

    def peak(self) -> tuple[int, int]:
        """(peak live bytes above the start, index of the event that reached it; -1: none)."""
        cur, best, at = 0, 0, -1
        for i, (_, d) in enumerate(self.events):
            cur += d
            if cur > best:
                best, at = cur, i
        return best, at

    def live_at(self, index: int) -> list[Block]:
        """Blocks allocated at or before event `index` and not freed by then (base excluded)."""
        return [b for b in self.blocks.values() if 0 <= b.alloc_at <= index
                and (b.free_at is None or b.free_at > index)]

    def freed_base_at(self, index: int) -> list[Block]:
        return [b for b in self.blocks.values() if b.alloc_at < 0 and b.free_at is not None
                and b.free_at <= index]

    def dead_grad_bytes(self) -> list[tuple[Block, int]]:
        """[(block, dead bytes)] for tagged blocks larger than the tagged tensors viewing them
        (beyond the rounding): memory kept alive only because other views of it are kept
        (AccumulateGrad keeps a view of a larger gradient as a parameter's .grad)."""
        out = []
        for b in self.blocks.values():
            if b.tags:
                dead = b.nbytes - rounded(sum(n for _, n in b.tags), self.block)
                if dead > 0:
                    out.append((b, dead))
        return sorted(out, key=lambda x: -x[1])

    def end_bytes(self) -> int:
        return sum(d for _, d in self.events)


# ----------------------------------------------------------------------------------------------
# the step (bench_dtl's make_step, with phase marks)
# ----------------------------------------------------------------------------------------------
PRESETS = {
    # bench_dtl's default case (GPU_QUICK's first: LSTM B 64, T 16, S 32, the default DTL)
    "bench": dict(B=64, T=16, S=32, model=()),
    # the same model at interpreter-sized inputs (the full model: the op structure of the bench)
    "small": dict(B=4, T=8, S=16, model=()),
    # bench_dtl's CPU_TINY model (a test-sized step)
    "tiny": dict(B=2, T=3, S=8, model=(("width", 8), ("hidden_size", 8), ("dim", 16),
                                       ("num_heads", 2), ("num_layers", 1), ("window", 1),
                                       ("num_memory", 2))),
}


def _bench():
    sys.path.insert(0, str(_HERE))
    import bench_dtl as BD  # the case, inputs and step of the benchmark
    return BD


@dataclass
class Result:
    provider: str
    fix: str  # the --patch applied ("" none)
    peak: int
    at: int
    tracker: LiveMemory
    cuda_peak: float | None = None  # MiB, bench_dtl's way
    peak_phase: str = ""
    peak_block: Block | None = None

    @property
    def label(self) -> str:
        return self.provider + (f" + {self.fix}" if self.fix else "")


def traced_step(model, opt, loss_fn, inputs, device, amp, tracker: LiveMemory | None,
                names: dict) -> None:
    """bench_dtl.make_step's step, phase by phase: out and loss stay referenced until the step
    returns, as there (the autograd graph lives through opt.step and zero_grad)."""
    BD = _bench()
    images, videos, lengths, labels = inputs
    t = tracker or types.SimpleNamespace(phase="")
    t.phase = "forward"
    with BD._autocast(device, amp):
        out = model(images, videos, lengths)
        t.phase = "loss"
        loss = loss_fn(out, labels)
    t.phase = "backward"
    loss.backward()
    if tracker is not None:
        for name, p in names.items():
            if p.grad is not None:
                tracker.tag(p.grad, f"grad {name}")
    t.phase = "optimizer"
    opt.step()
    t.phase = "zero_grad"
    opt.zero_grad(set_to_none=True)
    t.phase = "-"
    del out, loss


def stub_kernels() -> Callable[[], None]:
    """Skips the body of every Triton kernel launch (interpreter or compiled); returns undo."""
    import triton.runtime.interpreter as I
    import triton.runtime.jit as J
    saved = [(I.InterpretedFunction, I.InterpretedFunction.run), (J.JITFunction, J.JITFunction.run)]
    for cls, _ in saved:
        cls.run = lambda self, *a, **k: None

    def undo():
        for cls, fn in saved:
            cls.run = fn

    return undo


def pause_in_kernels(tracker: LiveMemory) -> Callable[[], None]:
    """The Triton interpreter copies arguments on the host: not recorded (and its reference
    cycles are collected after each launch). Returns undo."""
    import triton.runtime.interpreter as I
    orig = I.InterpretedFunction.run

    def run(self, *a, **k):
        with tracker.pause():
            out = orig(self, *a, **k)
            # the interpreter leaves reference cycles holding the launch arguments: collected
            # here, the launcher's temporaries are freed when it returns, as on a GPU
            gc.collect()
            return out

    I.InterpretedFunction.run = run

    def undo():
        I.InterpretedFunction.run = orig

    return undo


# ----------------------------------------------------------------------------------------------
# proposed changes, tried as monkeypatches of the fused provider (--patch)
# ----------------------------------------------------------------------------------------------
def load_patch(path: str) -> tuple[str, Callable[[], Callable[[], None]]]:
    """(name, apply) from a Python file defining apply() -> undo(): a proposed change applied
    as a monkeypatch while the fused provider runs (e.g. a method of a scratch copy of a
    module). name: the file's stem."""
    import importlib.util
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"memory_dtl: --patch {path!r} is not a file")
    spec = importlib.util.spec_from_file_location(f"_memory_dtl_patch_{p.stem}", p)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    if not callable(getattr(mod, "apply", None)):
        raise TypeError(f"memory_dtl: --patch {path!r} must define apply() -> undo()")
    return p.stem, mod.apply


# ----------------------------------------------------------------------------------------------
# one provider
# ----------------------------------------------------------------------------------------------
def module_names(model) -> dict[int, str]:
    """id(submodule) -> its dotted name in `model` ("DTL" for the model itself)."""
    return {id(m): (n or "DTL") for n, m in model.named_modules()}


def run_provider(provider: str, backend: str, case, device: str, amp, *, kernels: str,
                 patch: tuple | None = None, warmup: int = 1, snapshot: str | None = None) -> Result:
    """One provider of bench_dtl's case: a fresh model from seed 1000 (bench_dtl's first case),
    the gate step, Adam, `warmup` steps, then the tracked step."""
    BD = _bench()
    from dtl_fast.models import DTL, dtl_loss
    torch.manual_seed(1000)
    base = DTL(BD.NUM_CLASSES, rnn=case.rnn, **dict(case.model)).to(device)
    model = copy.deepcopy(base).set_backend(backend)
    del base
    inputs = BD.make_inputs(case, 0, device)
    undo = [patch[1]()] if patch is not None else []
    if device == "cpu" and kernels == "stub" and backend != "reference":
        undo.append(stub_kernels())
    try:
        BD.gate_step(model, dtl_loss, inputs, device, amp)
        opt = torch.optim.Adam(model.parameters(), lr=BD.LR)
        params = dict(model.named_parameters())
        for _ in range(warmup):
            traced_step(model, opt, dtl_loss, inputs, device, amp, None, params)
        cuda_peak = None
        if device == "cuda":
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            if snapshot:
                torch.cuda.memory._record_memory_history(max_entries=200000)
            traced_step(model, opt, dtl_loss, inputs, device, amp, None, params)
            torch.cuda.synchronize()
            cuda_peak = (torch.cuda.max_memory_allocated() - before) / MiB
            if snapshot:
                tail = provider + (f"+{patch[0]}" if patch is not None else "")
                torch.cuda.memory._dump_snapshot(snapshot.replace(".pickle", f"_{tail}.pickle"))
                torch.cuda.memory._record_memory_history(enabled=None)
        tracker = LiveMemory(device_type=device, module_names=module_names(model))
        if device == "cpu" and kernels == "interpret" and backend != "reference":
            undo.append(pause_in_kernels(tracker))
        with tracker.tracking():
            traced_step(model, opt, dtl_loss, inputs, device, amp, tracker, params)
            if device == "cuda":
                torch.cuda.synchronize()
    finally:
        for u in reversed(undo):
            u()
    peak, at = tracker.peak()
    r = Result(provider, patch[0] if patch is not None else "", peak, at, tracker, cuda_peak)
    if at >= 0:
        r.peak_block = tracker.blocks[tracker.events[at][0]]
        r.peak_phase = r.peak_block.phase
    return r


# ----------------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------------
def group(blocks, key=lambda b: (b.where, b.op, b.shape, b.dtype)) -> list[tuple[Any, int, int]]:
    """[(key, count, bytes)] sorted by bytes, largest first."""
    acc: dict = defaultdict(lambda: [0, 0])
    for b in blocks:
        k = key(b)
        acc[k][0] += 1
        acc[k][1] += b.nbytes
    return sorted(((k, c, n) for k, (c, n) in acc.items()), key=lambda x: -x[2])


def _row(key, count: int, nbytes: int) -> str:
    where, op, shape, dtype = key
    return f"     {nbytes / MiB:10.3f} MiB  {count:3d} x  {where:40s} {op:38s} {list(shape)} {dtype}"


def _area(b: Block) -> str:
    """A coarse owner: the DTL submodule, the backward, or the optimizer."""
    if b.tags:
        return "parameter gradients (blocks they view)"
    if b.where.startswith("bwd:"):
        return "backward temporaries"
    return b.where.split(".")[0] if b.phase == "forward" else b.phase


def describe(r: Result, top: int) -> list[str]:
    t = r.tracker
    live = t.live_at(r.at)
    lines = [f"== {r.label}: peak {r.peak / MiB:.3f} MiB "
             f"above the step's start ({r.peak} B), at event {r.at} of {len(t.events)} "
             f"({t.op_calls} operator calls in the step)"
             + (f"; cuda peak (bench_dtl's way) {r.cuda_peak:.1f} MiB" if r.cuda_peak is not None else "")]
    if r.peak_block is not None:
        b = r.peak_block
        lines.append(f"   reached in phase {b.phase}, by {b.op} at {b.where} {list(b.shape)} {b.dtype}")
    lines.append(f"   alive at the peak: {len(live)} blocks; by owner:")
    for k, c, n in group(live, key=_area):
        lines.append(f"     {n / MiB:10.3f} MiB  {c:4d}  {k}")
    lines.append(f"   largest {top} groups (where, op, shape, dtype):")
    lines += [_row(k, c, n) for k, c, n in group(live)[:top]]
    grads = [b for b in live if b.tags]
    if grads:
        dead = t.dead_grad_bytes()
        lines.append(f"   parameter gradients alive at the peak: {len(grads)} blocks, "
                     f"{sum(b.nbytes for b in grads) / MiB:.3f} MiB for "
                     f"{sum(n for b in grads for _, n in b.tags) / MiB:.3f} MiB of gradients; "
                     f"blocks larger than their gradients (over the step): "
                     f"{sum(d for _, d in dead) / MiB:.3f} MiB")
        for b, d in dead[:top]:
            names = ", ".join(lbl.removeprefix("grad ") for lbl, _ in b.tags)
            lines.append(f"     {d / MiB:10.3f} MiB dead in {b.where} {b.op} {list(b.shape)}: "
                         f"{len(b.tags)} gradients view it ({names[:150]})")
    gone = t.freed_base_at(r.at)
    if gone:
        lines.append(f"   base blocks freed before the peak: {len(gone)}, "
                     f"{sum(b.nbytes for b in gone) / MiB:.3f} MiB")
    return lines


def diff(a: Result, b: Result, top: int) -> list[str]:
    """What b holds at its peak that a does not, and the reverse, by (shape, dtype) multiset."""
    def bag(r):
        acc: dict = defaultdict(list)
        for blk in r.tracker.live_at(r.at):
            acc[(blk.shape, blk.dtype, blk.nbytes)].append(blk)
        return acc

    ba, bb = bag(a), bag(b)
    extra_b, extra_a = [], []
    for k in set(ba) | set(bb):
        na, nb = len(ba.get(k, [])), len(bb.get(k, []))
        if nb > na:
            extra_b += bb[k][na:]
        elif na > nb:
            extra_a += ba[k][nb:]
    lines = [(f"== at the peaks: {b.label} - {a.label} = {(b.peak - a.peak) / MiB:+.3f} MiB "
              f"({b.peak - a.peak:+d} B)"),
             f"   only in {b.label} (by shape and dtype): {sum(x.nbytes for x in extra_b) / MiB:.3f} MiB"]
    lines += [_row(k, c, n) for k, c, n in group(extra_b)[:top]]
    lines.append(f"   only in {a.label}: {sum(x.nbytes for x in extra_a) / MiB:.3f} MiB")
    lines += [_row(k, c, n) for k, c, n in group(extra_a)[:top]]
    return lines


def _parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--preset", default="small", choices=tuple(PRESETS))
    p.add_argument("--batch", type=int, default=None, help="override the preset's B")
    p.add_argument("--frames", type=int, default=None, help="override the preset's T")
    p.add_argument("--size", type=int, default=None, help="override the preset's S")
    p.add_argument("--rnn", default="lstm", choices=("lstm", "gru"))
    p.add_argument("--dtype", default="float32-tf32", help="a bench_dtl dtype (bf16-amp: CUDA)")
    p.add_argument("--providers", default="reference,fused")
    p.add_argument("--kernels", default="interpret", choices=("interpret", "stub"),
                   help="CPU: run the Triton kernels in the interpreter, or skip their bodies")
    p.add_argument("--patch", action="append", default=[],
                   help="a Python file with apply() -> undo(): the fused provider runs once more "
                        "with it applied (repeatable)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--snapshot", default=None, help="CUDA: allocator history file (.pickle)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = _parse(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("memory_dtl: --device cuda but CUDA is not available", file=sys.stderr)
        return 2
    if args.device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is first imported
    try:
        patches = [load_patch(p) for p in args.patch]
    except (ValueError, TypeError) as exc:
        print(exc, file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    BD = _bench()
    if args.dtype not in BD.DTYPES or (BD.DTYPES[args.dtype][1] is not None and args.device != "cuda"):
        print(f"memory_dtl: --dtype must be one of {', '.join(BD.DTYPES)} (bf16-amp on CUDA only), "
              f"got {args.dtype!r} on {args.device}", file=sys.stderr)
        return 2
    pre = PRESETS[args.preset]
    case = BD.Case(args.rnn, args.batch or pre["B"], args.frames or pre["T"], args.size or pre["S"],
                   args.dtype, model=pre["model"])
    tf32, amp = BD.DTYPES[args.dtype]
    print(f"[memory_dtl] {args.device} {case.rnn} {case.shape} {args.dtype} kernels="
          f"{args.kernels if args.device == 'cpu' else 'gpu'} model {dict(case.model) or 'default'}")
    results: list[Result] = []
    sys.path.insert(0, str(_HERE))
    import harness as H
    with H.precision(tf32):
        for prov in args.providers.split(","):
            backend = "reference" if prov == "reference" else "fused"
            for patch in ([None] + patches if backend == "fused" else [None]):
                r = run_provider(prov, backend, case, args.device, amp, kernels=args.kernels,
                                 patch=patch, warmup=args.warmup, snapshot=args.snapshot)
                results.append(r)
                print("\n".join(describe(r, args.top)), flush=True)
    ref = next((r for r in results if r.provider == "reference"), None)
    for r in results:
        if ref is not None and r is not ref:
            print("\n".join(diff(ref, r, args.top)))
    if ref is not None:
        print("== summary (peak above the step's start; fused <= reference is issue 12's figure)")
        for r in results:
            name = r.label
            cp = f", cuda {r.cuda_peak:.1f} MiB" if r.cuda_peak is not None else ""
            print(f"   {name:34s} {r.peak / MiB:10.3f} MiB  ratio {r.peak / max(ref.peak, 1):.5f}"
                  f"  ({r.peak_phase}){cp}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
