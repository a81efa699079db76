"""Where `dtl-fast train` runs: the device (--device), the backend the modules get (--backend),
and the torchrun processes (WORLD_SIZE, RANK, LOCAL_RANK).

Under torchrun only rank 0 prints. A setup step that fails on one rank must fail on every rank
(a rank left behind would wait forever in the next collective), and the error must reach rank 0,
the one that prints it: `on_every_rank` does both.
"""
from __future__ import annotations

import os
import pickle
from dataclasses import dataclass

import torch


def parse_device(spec: str) -> None:
    """Raises ValueError naming --device unless spec is auto, cpu, cuda or cuda:N."""
    if spec in ("auto", "cpu", "cuda"):
        return
    if isinstance(spec, str) and spec.startswith("cuda:") and spec[5:].isdigit():
        return
    raise ValueError(f"--device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {spec!r}")


def resolve_device(spec: str, local_rank: int | None) -> torch.device:
    """The torch.device to run on; local_rank is set under torchrun."""
    parse_device(spec)
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if spec == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError(f"--device {spec}: CUDA is not available here (torch {torch.__version__}, "
                         f"CUDA build: {torch.version.cuda}); use --device cpu or auto")
    if spec == "cuda":
        index = local_rank if local_rank is not None else torch.cuda.current_device()
    else:
        index = int(spec[5:])
        if local_rank is not None:
            raise ValueError(f"--device {spec}: under torchrun every rank uses cuda:LOCAL_RANK; "
                             "pass --device cuda or auto")
    if index >= torch.cuda.device_count():
        raise ValueError(f"--device: cuda:{index} does not exist ({torch.cuda.device_count()} "
                         "CUDA device(s) visible)")
    return torch.device("cuda", index)


def module_backend(backend: str, device: torch.device) -> str:
    """The backend the modules get: the fused Triton kernels need CUDA, so "fused" on a CPU
    device becomes "auto" (the C++ pooling kernel, PyTorch's native RNN kernels, SDPA).

    "fused" on a CUDA device needs Triton and the CUDA build of dtl_fast._C: without either it
    is refused here, before the models are built, not at the first forward."""
    if backend == "fused" and device.type != "cuda":
        return "auto"
    if backend == "fused":
        from dtl_fast import _extension, _triton

        missing = []
        reason = _triton.triton_unavailable_reason(device)
        if reason:
            missing.append(f"Triton ({reason})")
        if not _extension.has_kernel("frame_pool", "cuda"):
            missing.append("dtl_fast's CUDA kernels (this build has none: "
                           "install with nvcc and a CUDA build of torch)")
        if missing:
            raise ValueError(f"--backend fused on {device} needs {' and '.join(missing)}; "
                             "use --backend reference, or --backend auto for whatever runs")
    return backend


def describe_backend(backend: str, used: str, device: torch.device) -> str:
    """One line for the log: the backend asked for (`backend`) and the one the modules run (`used`)."""
    if backend == "fused" and used == "auto":
        return (f"backend: fused requested; the fused Triton kernels need CUDA, so on {device} the "
                "modules run 'auto' (C++ frame pooling, PyTorch native RNN, SDPA attention)")
    if used == "fused":
        return f"backend: fused (Triton / CUDA kernels on {device})"
    if used == "auto":
        return f"backend: auto (dtl_fast's fastest path for {device})"
    return f"backend: reference (eager PyTorch on {device})"


@dataclass
class Dist:
    """This process's place among the torchrun processes (world 1, rank 0 without torchrun)."""
    world: int = 1
    rank: int = 0
    local_rank: int | None = None

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        """True on the one rank that prints, evaluates and writes files."""
        return self.rank == 0


def dist_from_env() -> Dist:
    """The Dist that torchrun's environment variables describe."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return Dist()
    return Dist(world, int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0")))


def barrier(dist_info: Dist) -> None:
    if dist_info.active:
        torch.distributed.barrier()


def _portable(error: BaseException | None):
    """`error` if it survives pickling (to travel to rank 0), else a RuntimeError with its text."""
    if error is None:
        return None
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:  # noqa: BLE001 - any exception that cannot travel is sent as text
        return RuntimeError(f"{type(error).__name__}: {error}")


def on_every_rank(fn, dist_info: Dist):
    """Runs fn() on this rank and returns its result, but if fn raised on any rank, every rank
    raises: a failing rank its own exception, the others the lowest failing rank's (so rank 0,
    the one that prints, always has the message). Collective: every rank must call it."""
    try:
        result, error = fn(), None
    except Exception as exc:  # noqa: BLE001 - re-raised below once every rank knows
        result, error = None, exc
    if not dist_info.active:
        if error is not None:
            raise error
        return result
    errors = [None] * dist_info.world
    torch.distributed.all_gather_object(errors, _portable(error))
    first = error if error is not None else next((e for e in errors if e is not None), None)
    if first is not None:
        first.raised_on_every_rank = True  # rank 0 reports it; the others stay quiet
        raise first
    return result
