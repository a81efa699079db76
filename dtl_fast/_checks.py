"""Argument checks shared by the fused ops and their eager references, so both backends
reject the same bad input with the same message. Only shapes, dtypes and devices are
checked here (they hold for fake tensors under torch.compile too); value checks that need
the data live in the kernels and in the eager references."""
from __future__ import annotations

import numbers
from collections.abc import Sequence

import numpy as np
import torch
from torch._subclasses.fake_tensor import is_fake

FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
POOL_MODES = ("mean", "max", "sum")
# The dtypes lengths (and windows, labels) may have, in every op and backend alike:
# at::isIntegralType(dtype, includeBool=false), what the compiled kernels take. Not "integral"
# in Python's sense: the bit-packed, sub-byte and quantized dtypes (torch.bits8, torch.int4,
# torch.uint3, torch.quint8, ...) are neither floating nor complex, yet none converts to int64.
INTEGER_DTYPES = frozenset({torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64,
                           torch.uint16, torch.uint32, torch.uint64})


def check_pool_input(x: torch.Tensor, mode: str, modes: Sequence[str] = POOL_MODES) -> None:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"frame_pool: x must be a torch.Tensor [B, T, D], got {type(x).__name__}")
    if x.dim() != 3:
        raise ValueError(f"frame_pool: x must be a 3-D tensor [B, T, D], got shape {list(x.shape)}")
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"frame_pool: x must be float32, float64, float16 or bfloat16, got {x.dtype}")
    if mode not in modes:
        raise ValueError(f"frame_pool: mode must be one of {', '.join(map(repr, modes))}, got {mode!r}")


def tensor_from_numpy(arr: np.ndarray, *, owner: str, name: str) -> torch.Tensor:
    """A tensor holding a copy of NumPy array `arr` (native byte order, contiguous).

    A copy, not torch.from_numpy's view: the op may read the values again later (the fused
    ops' backward keeps its lengths), and a caller refilling a reused array in between would
    otherwise change them behind autograd's back. B or H integers cost nothing to copy. Arrays
    of anything but integers raise ValueError "<owner>: <name> must be an integer array"."""
    if torch.compiler.is_compiling():
        # Dynamo cannot trace ndarray.dtype, but it turns the array into a tensor of its own
        # (native order, its dtype checked by the caller): a clone is the copy.
        return torch.from_numpy(arr).clone()
    if arr.dtype.kind not in "iu":
        raise ValueError(f"{owner}: {name} must be an integer array, got NumPy dtype {arr.dtype}")
    # newbyteorder("=") keeps the dtype and makes it native; np.array copies (negative strides,
    # read-only and broadcast arrays included) into a fresh writable C-contiguous array.
    return torch.from_numpy(np.array(arr, dtype=arr.dtype.newbyteorder("="), order="C", copy=True))


def as_lengths_tensor(lengths, B: int, device: torch.device, *, owner: str, name: str = "lengths",
                      device_name: str = "x", overflow_error: type = ValueError,
                      required: bool = False) -> torch.Tensor | None:
    """Turns `lengths` (None, a sequence of ints or of 0-d integer tensors, an integer NumPy
    array, or an integer tensor [B] on the CPU or on `device`) into None or an integer tensor
    (its dtype and device as given; a NumPy array is copied, see tensor_from_numpy), checking
    type, shape and device; every op that takes per-sequence lengths goes through here, so
    they all accept and reject the same things.

    Errors are ValueError "<owner>: <name> must ..." (overflow_error for values outside int64).
    The range of the values is the caller's to check: see check_lengths_range. required=True:
    the caller has refused None already, and the type error does not offer it.
    """
    if lengths is None:
        return None
    if isinstance(lengths, np.ndarray):
        lengths = tensor_from_numpy(lengths, owner=owner, name=name)
    if not isinstance(lengths, torch.Tensor):
        if not isinstance(lengths, Sequence) or isinstance(lengths, (str, bytes)):
            raise ValueError(f"{owner}: {name} must be {'' if required else 'None, '}a list of "
                             f"ints or an integer tensor [B], got {type(lengths).__name__}")

        def is_int(v):
            if isinstance(v, torch.Tensor):  # e.g. list(lengths_tensor)
                return v.dim() == 0 and v.dtype in INTEGER_DTYPES
            return isinstance(v, numbers.Integral) and not isinstance(v, (bool, np.bool_))

        bad = [v for v in lengths if not is_int(v)]
        if bad:
            raise ValueError(f"{owner}: {name} must hold integers, got {bad[0]!r}")
        values = [int(v) for v in lengths]
        if any(not -(2**63) <= v < 2**63 for v in values):
            raise overflow_error(f"{owner}: {name} must fit in int64, got {max(values, key=abs)}")
        lengths = torch.tensor(values, dtype=torch.int64)
    if lengths.dtype not in INTEGER_DTYPES:
        raise ValueError(f"{owner}: {name} must be an integer tensor, got dtype {lengths.dtype}")
    if lengths.dtype == torch.uint64 and lengths.device.type == "cpu" and lengths.numel() > 0 \
            and not torch.compiler.is_compiling():
        # int64 is what every kernel and reference computes in: a uint64 value >= 2^63 would
        # wrap to a negative one (torch has no max() for uint64; tolist gives exact Python ints,
        # also under torch.func.grad, where .numpy() finds no storage)
        values = unwrap_functorch(lengths)
        largest = None if is_fake(values) else max(values.reshape(-1).tolist())
        if largest is not None and largest >= 2**63:
            raise overflow_error(f"{owner}: {name} must fit in int64, got {largest}")
    if lengths.dim() != 1 or lengths.shape[0] != B:
        raise ValueError(f"{owner}: {name} must have shape [B] = [{B}] ({device_name} has batch "
                         f"size {B}), got {tuple(lengths.shape)}")
    if lengths.device.type != "cpu" and lengths.device != torch.device(device):
        raise ValueError(f"{owner}: {name} must be on the CPU or on {device_name}'s device "
                         f"({device}), got {lengths.device}")
    return lengths


def autocast_enabled(device_type: str) -> bool:
    """torch.is_autocast_enabled(device_type), False for "meta", which autocast does not know
    (torch raises "unknown device type for autocast" there, and so does torch.autocast("meta")):
    shape inference on the meta device runs the eager paths."""
    return device_type != "meta" and torch.is_autocast_enabled(device_type)


def device_capturing(t: torch.Tensor) -> bool:
    """True while `t`'s device is capturing a CUDA graph on the current stream: then a host
    read of device memory (.item(), .tolist()) is an error, and checks must be asynchronous."""
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


def unwrap_functorch(t: torch.Tensor) -> torch.Tensor:
    """The plain tensor under torch.func wrappers (vmap's batched tensors, grad's tracking
    tensors), for reading values on the host: under vmap it holds every sample's values (the
    batch dimension included), which is what a range check needs. `t` itself when unwrapped.
    Not for torch.compile'd code (dynamo cannot trace the query; checks there are asynchronous
    asserts)."""
    while torch._C._functorch.is_functorch_wrapped_tensor(t):
        t = torch._C._functorch.get_unwrapped(t)
    return t


def check_lengths_range(lengths: torch.Tensor | None, lo: int, hi: int, *, owner: str,
                        name: str = "lengths", error: type = ValueError, span: str | None = None) -> None:
    """Checks lo <= lengths[b] <= hi (`span` names the range in the message, default
    "[lo, hi]"): one host sync for lengths on a GPU (min and max read
    together); inside a torch.compile graph or a CUDA graph capture an asynchronous assert
    instead (no graph break; a capture may not read device memory on the host). Meta tensors
    hold no values: unchecked (shape inference on the meta device, as the references do)."""
    if lengths is None or lengths.numel() == 0 or lengths.device.type == "meta":
        return
    if torch.compiler.is_compiling() or device_capturing(lengths):
        torch._assert_async(((lengths >= lo) & (lengths <= hi)).all(),
                            f"{owner}: every {name}[b] must lie in [{lo}, {hi}]")
        return
    lengths = unwrap_functorch(lengths)  # per-sample lengths under torch.func.vmap
    if lengths.device.type == "cpu":
        # min / max of the host values in Python: 6 us where aminmax + stack + tolist, three
        # dispatched ops, take 15 us (2-core VM, B 64; this runs on every call of the ops that
        # take lengths)
        # (flattened first: under vmap per-head lengths are [V, B, H])
        values = (lengths if lengths.dim() == 1 else lengths.reshape(-1)).tolist()
        got_lo, got_hi = min(values), max(values)
    else:
        got_lo, got_hi = torch.stack(torch.aminmax(lengths)).tolist()
    if got_lo < lo or got_hi > hi:
        raise error(f"{owner}: every {name}[b] must lie in {span or f'[{lo}, {hi}]'}, "
                    f"got values in [{got_lo}, {got_hi}]")


def normalize_lengths(lengths, x: torch.Tensor, *, name: str = "lengths") -> torch.Tensor | None:
    """frame_pool's lengths for x [B, T, D]: see as_lengths_tensor. The range 0 <= lengths[b]
    <= T is checked where the data is read (kernel or reference)."""
    return as_lengths_tensor(lengths, x.shape[0], x.device, owner="frame_pool", name=name)
