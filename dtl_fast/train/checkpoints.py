"""The files `dtl-fast train` must not lose: atomic writes (temp file, fsync, rename), the
checkpoint (format "dtl_fast.train/1": models, optimizers, metrics, RNG state) and its resume
checks, and the RNG state that makes a resumed run bit-identical to an uninterrupted one."""
from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import pickle
import random
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import torch

CHECKPOINT_NAME = "checkpoint.pt"
BEST_NAME = "best.pt"
CHECKPOINT_FORMAT = "dtl_fast.train/1"
# Settings a resumed run must share with the checkpoint: they change the model, the data, the
# sequence of batches or the arithmetic. --amp is one: bf16 autocast moves the gradients by
# ~1e-2 relative, so a run half in bf16 and half in float32 would be neither, and metrics.json
# records one setting. Epochs may grow; device, workers, backend (float32 either way: they
# differ by rounding), compile, cuda graphs and progress may change, as may --on-bad-sample:
# it only decides what a bad file does, and check_same_samples refuses a resume whose set of
# usable samples differs from the checkpoint's run, whichever way it came about.
RESUME_MUST_MATCH = ("data", "batch_size", "lr", "seed", "image_size", "frame_size", "max_frames",
                     "mean", "std", "channels", "amp",
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
    Raises FileNotFoundError (no such path) / ValueError (a folder, not a checkpoint, damaged)
    naming the path."""
    path = Path(path)
    if path.is_dir():
        # most likely a run's --out: name the files in it that can be passed
        files = [f"{path / name} ({what})" for name, what in
                 ((CHECKPOINT_NAME, "the last epoch"), (BEST_NAME, "each model at its best epoch"))
                 if (path / name).is_file()]
        raise ValueError(f"checkpoint {path} is a folder, not a checkpoint file; pass "
                         + (" or ".join(files) if files else
                            f"a run's {CHECKPOINT_NAME} or {BEST_NAME} (OUT/{CHECKPOINT_NAME})"))
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path}: no such file")
    not_ours = f"checkpoint {path} is not a `dtl-fast train` checkpoint"
    # torch.save writes a zip archive. Anything else (metrics.json, an image, a truncated file:
    # the archive's directory is at its end) would reach torch's legacy unpickler, whose
    # weights_only error advises weights_only=False: no help here, and no CLI flag does it.
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{not_ours}: not a torch.save archive (another kind of file, or a "
                         f"truncated one); `dtl-fast train` writes OUT/{CHECKPOINT_NAME} and "
                         f"OUT/{BEST_NAME}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch's weights_only unpickler says "Unsupported global" for a class it refuses:
        # ours hold tensors and plain data only, so such a file was saved by something else
        # (torch's advice to load it with weights_only=False is left out: that would run code
        # from the file). Any other refusal is damaged pickle bytes ("Unsupported operand").
        detail = _unpickler_detail(str(exc))
        if "Unsupported global" in str(exc):
            raise ValueError(f"{not_ours}: it holds Python objects other than tensors and plain "
                             f"data ({detail})") from exc
        raise ValueError(f"checkpoint {path} could not be read (damaged: {detail}); is it a "
                         "complete `dtl-fast train` checkpoint?") from exc
    except Exception as exc:  # a damaged archive, a zip that torch did not write
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


def _unpickler_detail(message: str) -> str:
    """The line of torch's weights_only error that says what it met (after "WeightsUnpickler
    error:"), without the surrounding advice; the first line when there is no such part."""
    lines = [line.strip() for line in message.splitlines()]
    for i, line in enumerate(lines):
        if "WeightsUnpickler error:" in line:
            rest = line.split("WeightsUnpickler error:", 1)[1].strip()
            following = [x for x in lines[i + 1:] if x]
            found = rest or (following[0] if following else line)
            return found.split(". ", 1)[0]  # (what follows is advice on allowlisting classes)
    return lines[0] if lines else ""


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
             for k in RESUME_MUST_MATCH
             if _comparable(k, saved.get(k), saved.get("channels")) != _comparable(k, now[k], now["channels"])]
    if diffs:
        raise ValueError(f"--resume: {path} was written with different settings that change the "
                         "model, the data, the batches or the arithmetic: " + "; ".join(diffs)
                         + ". Use the checkpoint's settings, or another --out to start afresh.")
    done = int(state.get("epoch", 0))
    if done > config.epochs:
        raise ValueError(f"--resume: {path} already holds {done} epochs, more than --epochs "
                         f"{config.epochs}; pass --epochs {done} to re-evaluate the run as it is, or "
                         "more to continue it")


def _comparable(key: str, value, channels):
    """`value` of setting `key` as check_resume compares it: --mean / --std as per-channel
    floats, so the Python API's (0.5,), the command line's [0.5] (and [0.5, 0.5, 0.5] with 3
    channels: the data set expands one value to every channel) are the same setting."""
    if key not in ("mean", "std") or not isinstance(value, (list, tuple)):
        return value
    values = [float(v) for v in value]
    if len(values) == 1 and isinstance(channels, int):
        values = values * channels
    return values


def normalise_stats(value):
    """--mean / --std as the checkpoint and metrics.json store them: a list of floats (the
    command line's form; the Python API may give a tuple or ints), or None."""
    return None if value is None else [float(v) for v in value]


def check_same_samples(state: dict, skipped: list, path: Path) -> None:
    """Raises ValueError naming --resume when the samples left out as bad (`skipped`: this run's
    [{"split", "path", "reason"}]) are not those of the checkpoint's run (its metrics): another
    set of training samples is another sequence of batches, and a changed validation or test
    split makes the epochs' accuracies incomparable. A checkpoint without the record passes."""
    before = state.get("metrics", {}).get("skipped")
    if before is None:
        return
    old = {(s["split"], s["path"]) for s in before}
    new = {(s["split"], s["path"]) for s in skipped}
    if old == new:
        return
    parts = []
    if new - old:
        parts.append("now bad and skipped: " + ", ".join(p for _, p in sorted(new - old)))
    if old - new:
        parts.append("skipped by that run, usable now: " + ", ".join(p for _, p in sorted(old - new)))
    raise ValueError(f"--resume: the data set's usable samples differ from those {path} was "
                     f"trained on ({'; '.join(parts)}), so the batches would too. Restore the "
                     "data as it was, or start afresh without --resume (or with another --out).")


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

