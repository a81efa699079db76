"""The files `dtl-fast train` must not lose: atomic writes (temp file, fsync, rename), the
checkpoint (format "dtl_fast.train/1": models, optimizers, metrics, RNG state) and its resume
checks, and the RNG state that makes a resumed run bit-identical to an uninterrupted one."""
from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import random
import tempfile
from pathlib import Path

import numpy as np
import torch

CHECKPOINT_NAME = "checkpoint.pt"
CHECKPOINT_FORMAT = "dtl_fast.train/1"
# Settings a resumed run must share with the checkpoint: they change the model, the data or the
# sequence of batches (epochs may grow; device, workers, backend, progress may change).
RESUME_MUST_MATCH = ("data", "batch_size", "lr", "seed", "image_size", "frame_size", "max_frames",
                     "mean", "std", "channels",
                     "rnn", "encoder", "encoder_weights", "width", "hidden_size", "dim",
                     "num_heads", "num_layers", "baselines")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Writes to a temp file in the same folder, fsyncs, then renames over `path`: a crash leaves
    the old file or the new one, never half of one."""
    path = Path(path)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{random.SystemRandom().getrandbits(32):08x}.tmp"
    # os.open with 0o666 honours the umask (mkstemp would make the result private, 0600)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def atomic_write_text(path: Path, text: str) -> None:
    """`text` as UTF-8 to `path`, atomically (see atomic_write_bytes)."""
    atomic_write_bytes(path, text.encode("utf-8"))


def save_checkpoint(path: Path, state: dict) -> None:
    """torch.save(state) to `path` atomically (temp file in the same folder, fsync, os.replace)."""
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(Path(path), buf.getvalue())


def load_checkpoint(path) -> dict:
    """Loads a `dtl-fast train` checkpoint (weights_only: it holds only tensors and plain data).
    Raises FileNotFoundError / ValueError naming the path."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path}: no such file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated, not a zip, a foreign pickle: all "corrupt"
        raise ValueError(f"checkpoint {path} could not be read ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else ''}); is it a complete "
                         "`dtl-fast train` checkpoint?") from exc
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"checkpoint {path} is not a `dtl-fast train` checkpoint "
                         f"(expected format {CHECKPOINT_FORMAT!r})")
    return state


def check_out_writable(out: Path) -> None:
    """Makes --out and raises ValueError naming it unless a file can be created there."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-test-"):
            pass
    except OSError as exc:
        raise ValueError(f"--out {out}: not writable ({exc.strerror or exc})") from exc


def check_resume(state: dict, config, path: Path) -> None:
    """Raises ValueError naming each RESUME_MUST_MATCH flag whose value in the checkpoint
    `state` (read from `path`) differs from the TrainConfig `config`; also when `state` has no
    optimizer state (best.pt, weights only) or more epochs than config.epochs."""
    if state.get("kind") == "best" or not all(k in state for k in ("optimizers", "rng", "global_step")):
        raise ValueError(f"--resume: {path} holds model weights only, no optimizer state (a best.pt?): "
                         f"resume needs the {CHECKPOINT_NAME} a run writes after every epoch. To use "
                         f"these weights, evaluate them: dtl-fast evaluate {path} --data DIR")
    saved = state.get("config", {})
    now = dataclasses.asdict(config)
    diffs = [f"--{k.replace('_', '-')}: checkpoint {saved.get(k)!r}, this run {now[k]!r}"
             for k in RESUME_MUST_MATCH if saved.get(k) != now[k]]
    if diffs:
        raise ValueError(f"--resume: {path} was written with different settings that change the "
                         "model, the data or the batches: " + "; ".join(diffs)
                         + ". Use the checkpoint's settings, or another --out to start afresh.")
    done = int(state.get("epoch", 0))
    if done > config.epochs:
        raise ValueError(f"--resume: {path} already holds {done} epochs, more than --epochs "
                         f"{config.epochs}; pass --epochs {done} to re-evaluate the run as it is, or "
                         "more to continue it")


def rng_state(device: torch.device) -> dict:
    """The torch, numpy, Python (and this CUDA device's) RNG states, as checkpoint data."""
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(),
             # lists, not numpy arrays, so the checkpoint loads with weights_only=True
             "numpy": (np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])),
             "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    """Restores what rng_state saved."""
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def seed_everything(seed: int) -> None:
    """Seeds torch, numpy and Python's random."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)

