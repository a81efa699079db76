"""`dtl-fast train`: DTL and its two single-modality baselines on a multimodal image + video folder.

    dtl-fast train --data DIR                 # or no --data: the bundled digits demo data
    torchrun --nproc_per_node=N -m dtl_fast.train --data DIR      # DistributedDataParallel

The defaults are the original training script's: 20 epochs, batch size 64, Adam with learning
rate 1e-3, cross-entropy. In one loop over the same batches it trains three models, each with
its own Adam: the image-only CNN baseline (the classic supervised method), the video-only
baseline, and DTL on the dual task (cross-entropy on its image, video and fused heads).

Under torchrun (WORLD_SIZE > 1) each of the N ranks takes batch_size / N samples of every
global batch (a DistributedSampler, as in one process, where it has num_replicas=1), so one
process and N processes see the same global batches. DDP averages the gradients over ranks;
with equal per-rank batch sizes that average is one process's mean over the global batch. The
last batch of an epoch can be partial and then the ranks' shares differ, so that one step is
not exactly the one-process step; a dataset size divisible by the global batch avoids it.
Only rank 0 prints, evaluates and writes files.

Writes under --out: checkpoint.pt (every epoch, atomically), metrics.json, metrics.csv,
results.md (the table) and curves.png (if matplotlib is installed).
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import io
import json
import math
import os
import platform
import random
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dtl_fast._progress import Progress

CHECKPOINT_NAME = "checkpoint.pt"
CHECKPOINT_FORMAT = "dtl_fast.train/1"
# (key, label) of the five evaluated heads, in table order.
HEADS = (
    ("image_cnn", "image-only CNN (baseline)"),
    ("video_baseline", "video-only (baseline)"),
    ("dtl_image", "DTL image head"),
    ("dtl_video", "DTL video head"),
    ("dtl_fused", "DTL fused head"),
)
MODEL_NAMES = ("dtl", "image_cnn", "video_baseline")
# Settings a resumed run must share with the checkpoint: they change the model, the data or the
# sequence of batches (epochs may grow; device, workers, backend, progress may change).
RESUME_MUST_MATCH = ("data", "batch_size", "lr", "seed", "image_size", "frame_size", "max_frames",
                     "mean", "std", "channels",
                     "rnn", "encoder", "encoder_weights", "width", "hidden_size", "dim",
                     "num_heads", "num_layers", "baselines")


@dataclass
class TrainConfig:
    """Everything `dtl-fast train` takes; field names are the flags without `--` (`-` -> `_`).

    data: dataset root (root/{train,validation,test}/<class>/...) or None for the bundled demo
    data, built once under $DTL_FAST_CACHE or ~/.cache/dtl_fast. batch_size is the global batch
    (each of N DDP ranks takes batch_size / N). backend: "fused" (Triton kernels on CUDA; on a
    CPU device the modules' "auto", dtl_fast's fastest CPU paths), "reference" or "auto".
    amp: None or "bf16" (torch.autocast). device: "auto" | "cpu" | "cuda" | "cuda:N".
    """
    data: str | None = None
    out: str = "runs/dtl"
    epochs: int = 20
    batch_size: int = 64
    lr: float = 1e-3
    backend: str = "fused"
    amp: str | None = None
    device: str = "auto"
    seed: int = 0
    workers: int = 0
    resume: bool = False
    on_bad_sample: str = "error"
    image_size: int = 32
    frame_size: int | None = None
    max_frames: int = 16
    mean: tuple | None = None
    std: tuple | None = None
    channels: int = 3
    rnn: str = "lstm"
    encoder: str = "cnn"
    encoder_weights: str | None = None
    width: int = 64
    hidden_size: int = 64
    dim: int = 128
    num_heads: int = 4
    num_layers: int = 2
    baselines: bool = True
    progress: bool = True

    def validate(self) -> None:
        """Raises ValueError naming the flag for a setting that cannot work."""
        def positive(name, value, minimum=1):
            if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
                raise ValueError(f"--{name.replace('_', '-')} must be an integer >= {minimum}, got {value!r}")
        for name in ("epochs", "batch_size", "image_size", "max_frames", "channels", "width",
                     "hidden_size", "dim", "num_heads", "num_layers"):
            positive(name, getattr(self, name))
        positive("workers", self.workers, 0)
        if self.frame_size is not None:
            positive("frame_size", self.frame_size)
        for name in ("mean", "std"):
            value = getattr(self, name)
            if value is None:
                continue
            ok = (isinstance(value, (list, tuple)) and len(value) in (1, self.channels)
                  and all(isinstance(v, (int, float)) and math.isfinite(v) for v in value)
                  and (name == "mean" or all(v > 0 for v in value)))
            if not ok:
                raise ValueError(f"--{name} must be 1 or --channels ({self.channels}) finite numbers"
                                 f"{' > 0' if name == 'std' else ''}, got {value!r}")
        if not isinstance(self.seed, int):
            raise ValueError(f"--seed must be an integer, got {self.seed!r}")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"--lr must be a finite number > 0, got {self.lr!r}")
        if self.backend not in ("fused", "reference", "auto"):
            raise ValueError(f"--backend must be 'fused', 'reference' or 'auto', got {self.backend!r}")
        if self.amp not in (None, "bf16"):
            raise ValueError(f"--amp must be 'bf16' (or left out for float32), got {self.amp!r}")
        if self.on_bad_sample not in ("skip", "error"):
            raise ValueError(f"--on-bad-sample must be 'skip' or 'error', got {self.on_bad_sample!r}")
        if self.rnn not in ("lstm", "gru"):
            raise ValueError(f"--rnn must be 'lstm' or 'gru', got {self.rnn!r}")
        if self.encoder not in ("cnn", "resnet18"):
            raise ValueError(f"--encoder must be 'cnn' or 'resnet18', got {self.encoder!r}")
        if self.dim % self.num_heads:
            raise ValueError(f"--dim ({self.dim}) must be divisible by --num-heads ({self.num_heads})")
        if self.data is not None and not Path(self.data).is_dir():
            raise ValueError(f"--data {self.data}: not a folder (expected root/train, "
                             "root/validation and root/test with one folder per class)")
        if self.encoder_weights is not None and not Path(self.encoder_weights).is_file():
            raise ValueError(f"--encoder-weights {self.encoder_weights}: no such file")
        _parse_device(self.device)


# ----------------------------------------------------------------------------------------------
# command-line arguments (shared by `python -m dtl_fast.train` and `dtl-fast train`)

def add_train_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Adds every TrainConfig flag to `parser` (used by both `dtl-fast train` and
    `python -m dtl_fast.train`); `config_from_args` turns the parsed result into a TrainConfig."""
    d = TrainConfig()
    g = parser.add_argument_group("data")
    g.add_argument("--data", metavar="DIR", default=d.data,
                   help="dataset root with train/, validation/, test/ (one folder per class; "
                        "<sample>.png + <sample>.mp4 or a <sample>/ folder of frames); default: "
                        "the bundled digits demo data, built once in $DTL_FAST_CACHE or "
                        "~/.cache/dtl_fast")
    g.add_argument("--on-bad-sample", choices=("skip", "error"), default=d.on_bad_sample,
                   help="a missing / unreadable / corrupt file: fail before training starts, or "
                        "skip it and report it (default: %(default)s)")
    g.add_argument("--image-size", type=int, default=d.image_size,
                   help="images (and frames, unless --frame-size) are resized to this square "
                        "(default: %(default)s)")
    g.add_argument("--frame-size", type=int, default=d.frame_size,
                   help="video frames are resized to this square (default: --image-size)")
    g.add_argument("--mean", type=float, nargs="+", default=d.mean, metavar="M",
                   help="per-channel normalisation mean, 1 or --channels numbers "
                        "(default: ImageNet's 0.485 0.456 0.406)")
    g.add_argument("--std", type=float, nargs="+", default=d.std, metavar="S",
                   help="per-channel normalisation std (default: ImageNet's 0.229 0.224 0.225)")
    g.add_argument("--max-frames", type=int, default=d.max_frames,
                   help="longer clips are subsampled uniformly to this (default: %(default)s)")
    g.add_argument("--channels", type=int, default=d.channels,
                   help="image channels, 1 or 3 (default: %(default)s)")
    g.add_argument("--workers", type=int, default=d.workers,
                   help="DataLoader worker processes (default: %(default)s)")
    g = parser.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=d.epochs, help="(default: %(default)s)")
    g.add_argument("--batch-size", type=int, default=d.batch_size,
                   help="the global batch: under torchrun each of N ranks takes batch-size/N "
                        "(default: %(default)s)")
    g.add_argument("--lr", type=float, default=d.lr, help="Adam learning rate (default: %(default)s)")
    g.add_argument("--seed", type=int, default=d.seed,
                   help="seeds the models, the shuffling and the demo data (default: %(default)s)")
    g.add_argument("--no-baselines", dest="baselines", action="store_false",
                   help="train DTL only, without the image-only and video-only baselines")
    g = parser.add_argument_group("model")
    g.add_argument("--rnn", choices=("lstm", "gru"), default=d.rnn, help="(default: %(default)s)")
    g.add_argument("--encoder", choices=("cnn", "resnet18"), default=d.encoder,
                   help="(default: %(default)s)")
    g.add_argument("--encoder-weights", metavar="PATH", default=d.encoder_weights,
                   help="a local state_dict for the resnet18 encoder (nothing is downloaded)")
    g.add_argument("--width", type=int, default=d.width, help="CNN encoder width (default: %(default)s)")
    g.add_argument("--hidden-size", type=int, default=d.hidden_size,
                   help="RNN hidden size per direction (default: %(default)s)")
    g.add_argument("--dim", type=int, default=d.dim, help="attention dimension (default: %(default)s)")
    g.add_argument("--num-heads", type=int, default=d.num_heads,
                   help="attention heads (default: %(default)s)")
    g.add_argument("--num-layers", type=int, default=d.num_layers,
                   help="dual-modal attention layers (default: %(default)s)")
    g = parser.add_argument_group("running")
    g.add_argument("--backend", choices=("fused", "reference", "auto"), default=d.backend,
                   help="fused: the Triton kernels on CUDA (on a CPU device the modules' 'auto', "
                        "dtl_fast's fastest CPU paths); reference: eager PyTorch "
                        "(default: %(default)s)")
    g.add_argument("--amp", default=d.amp, metavar="bf16",
                   help="mixed precision: bf16 (torch.autocast); default: off (float32)")
    g.add_argument("--device", default=d.device,
                   help="auto | cpu | cuda | cuda:N (default: %(default)s; under torchrun each rank "
                        "uses cuda:LOCAL_RANK)")
    g.add_argument("--out", metavar="DIR", default=d.out,
                   help="checkpoint.pt, metrics.json, metrics.csv, results.md and curves.png go "
                        "here (default: %(default)s)")
    g.add_argument("--resume", action="store_true",
                   help="continue from OUT/checkpoint.pt at the epoch after the last one saved")
    g.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress bars")
    return parser


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    kwargs = {k: v for k, v in vars(args).items() if k in fields}
    if isinstance(kwargs.get("amp"), str) and kwargs["amp"].lower() in ("none", "off", "fp32", "float32"):
        kwargs["amp"] = None
    return TrainConfig(**kwargs)


# ----------------------------------------------------------------------------------------------
# devices, distribution

def _parse_device(spec: str) -> None:
    if spec in ("auto", "cpu", "cuda"):
        return
    if spec.startswith("cuda:") and spec[5:].isdigit():
        return
    raise ValueError(f"--device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {spec!r}")


def _resolve_device(spec: str, local_rank: int | None) -> torch.device:
    """The torch.device to run on; local_rank is set under torchrun."""
    _parse_device(spec)
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


def _module_backend(backend: str, device: torch.device) -> str:
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
            missing.append("dtl_fast's CUDA kernels (this build has none: " + 
                           "install with nvcc and a CUDA build of torch)")
        if missing:
            raise ValueError(f"--backend fused on {device} needs {' and '.join(missing)}; "
                             "use --backend reference, or --backend auto for whatever runs")
    return backend


def _describe_backend(backend: str, used: str, device: torch.device) -> str:
    if backend == "fused" and used == "auto":
        return (f"backend: fused requested; the fused Triton kernels need CUDA, so on {device} the "
                "modules run 'auto' (C++ frame pooling, PyTorch native RNN, SDPA attention)")
    if used == "fused":
        return f"backend: fused (Triton / CUDA kernels on {device})"
    if used == "auto":
        return f"backend: auto (dtl_fast's fastest path for {device})"
    return f"backend: reference (eager PyTorch on {device})"


@dataclass
class _Dist:
    world: int = 1
    rank: int = 0
    local_rank: int | None = None

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def _dist_from_env() -> _Dist:
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return _Dist()
    return _Dist(world, int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0")))


def _barrier(dist_info: _Dist) -> None:
    if dist_info.active:
        torch.distributed.barrier()


def _all_ok(ok: bool, dist_info: _Dist, device: torch.device) -> bool:
    """True when every rank is ok (one rank's setup error must stop all, not leave them waiting)."""
    if not dist_info.active:
        return ok
    flag = torch.tensor([1 if ok else 0], dtype=torch.int32, device=device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
    return bool(flag.item())


# ----------------------------------------------------------------------------------------------
# files

def _atomic_write_bytes(path: Path, data: bytes) -> None:
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


def _atomic_write_text(path: Path, text: str) -> None:
    _atomic_write_bytes(path, text.encode("utf-8"))


def save_checkpoint(path: Path, state: dict) -> None:
    """torch.save(state) to `path` atomically (temp file in the same folder, fsync, os.replace)."""
    buf = io.BytesIO()
    torch.save(state, buf)
    _atomic_write_bytes(Path(path), buf.getvalue())


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


def _check_out_writable(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-test-"):
            pass
    except OSError as exc:
        raise ValueError(f"--out {out}: not writable ({exc.strerror or exc})") from exc


def _demo_root(seed: int) -> Path:
    cache = os.environ.get("DTL_FAST_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "dtl_fast")
    return Path(cache) / f"demo-digits-seed{seed}"


def _check_layout(root: Path) -> None:
    from dtl_fast.data import SPLITS

    missing = [s for s in SPLITS if not (root / s).is_dir()]
    if missing:
        raise ValueError(f"--data {root}: missing the split folder(s) {', '.join(missing)} "
                         f"(expected {', '.join(str(root / s) for s in SPLITS)}, each with one "
                         "folder per class)")


# ----------------------------------------------------------------------------------------------
# models

def _build_models(config: TrainConfig, num_classes: int, backend: str) -> dict:
    """The models to train, in a fixed order so that a seed gives the same DTL with or without
    the baselines."""
    from dtl_fast.models import DTL, ImageBaseline, VideoBaseline

    common = dict(in_channels=config.channels, encoder=config.encoder,
                  encoder_weights=config.encoder_weights, width=config.width)
    models = {"dtl": DTL(num_classes, **common, rnn=config.rnn, hidden_size=config.hidden_size,
                         dim=config.dim, num_heads=config.num_heads, num_layers=config.num_layers,
                         backend=backend)}
    if config.baselines:
        models["image_cnn"] = ImageBaseline(num_classes, **common)
        models["video_baseline"] = VideoBaseline(num_classes, **common, backend=backend)
    return models


def _rebuild_model(name: str, cfg: dict):
    from dtl_fast.models import DTL, ImageBaseline, VideoBaseline

    cls = {"dtl": DTL, "image_cnn": ImageBaseline, "video_baseline": VideoBaseline}[name]
    # the state_dict holds the encoder's weights: the file they first came from is not needed
    return cls(**dict(cfg, encoder_weights=None))


def _set_backend(model, backend: str) -> None:
    if hasattr(model, "set_backend"):
        model.set_backend(backend)
    elif hasattr(model, "backend"):
        model.backend = backend


def _autocast(device: torch.device, amp: str | None):
    if amp is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


@torch.no_grad()
def _accuracies(models: dict, loader, device: torch.device, amp: str | None) -> dict:
    """Accuracy in [0, 1] of each of the five heads (None for a model that was not trained)."""
    correct = {key: 0 for key, _ in HEADS}
    total = 0
    was_training = {name: m.training for name, m in models.items()}
    for m in models.values():
        m.eval()
    try:
        for batch in loader:
            # lengths stay on the CPU: the model checks them on the host, where lengths on the
            # GPU would cost a host sync in every module that takes them
            batch = batch.to(device, non_blocking=True)._replace(lengths=batch.lengths)
            labels = batch.labels
            with _autocast(device, amp):
                out = models["dtl"](batch.images, batch.videos, batch.lengths)
                preds = {"dtl_image": out.image, "dtl_video": out.video, "dtl_fused": out.fused}
                if "image_cnn" in models:
                    preds["image_cnn"] = models["image_cnn"](batch.images)
                if "video_baseline" in models:
                    preds["video_baseline"] = models["video_baseline"](batch.videos, batch.lengths)
            for key, logits in preds.items():
                correct[key] += int((logits.argmax(1) == labels).sum())
            total += int(labels.numel())
    finally:
        for name, m in models.items():
            m.train(was_training[name])
    present = {"dtl_image", "dtl_video", "dtl_fused"} | set(models)
    return {key: (correct[key] / total if key in present and total else None) for key, _ in HEADS}


def format_table(val: dict | None, test: dict | None) -> str:
    """The results table (markdown): one row per head, accuracies in percent."""
    def cell(acc):
        return "-" if acc is None else f"{100.0 * acc:.2f} %"
    lines = ["| method | val acc | test acc |", "| --- | ---: | ---: |"]
    for key, label in HEADS:
        lines.append(f"| {label} | {cell((val or {}).get(key))} | {cell((test or {}).get(key))} |")
    return "\n".join(lines)


def _format_val_line(epoch: int, epochs: int, val: dict) -> str:
    short = {"image_cnn": "image CNN", "video_baseline": "video baseline", "dtl_image": "DTL image",
             "dtl_video": "DTL video", "dtl_fused": "DTL fused"}
    parts = [f"{short[k]} {100 * v:.2f}%" for k, v in ((k, val.get(k)) for k, _ in HEADS) if v is not None]
    return f"epoch {epoch}/{epochs} val acc: " + ", ".join(parts)


# ----------------------------------------------------------------------------------------------
# outputs

def _machine(device: torch.device) -> dict:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine())
    return {"device": str(device), "device_name": name, "torch": str(torch.__version__),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "platform": platform.platform()}


def _write_csv(path: Path, rows: list) -> None:
    header = ["epoch", "global_step"] + [f"train_loss_{n}" for n in MODEL_NAMES] + \
             [f"val_acc_{k}" for k, _ in HEADS] + ["samples_per_s", "epoch_seconds"]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    for r in rows:
        w.writerow([r["epoch"], r["global_step"]] + [r["train_loss"].get(n, "") for n in MODEL_NAMES]
                   + ["" if r["val_acc"].get(k) is None else r["val_acc"][k] for k, _ in HEADS]
                   + [r["samples_per_s"], r["epoch_seconds"]])
    _atomic_write_text(path, buf.getvalue())


def _write_plot(path: Path, rows: list) -> bool:
    """curves.png: training loss and validation accuracy per epoch. matplotlib is optional: without
    it this warns and returns False. Uses the Agg canvas directly (no global backend switch)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        warnings.warn("matplotlib is not installed: no curves.png (pip install matplotlib)", stacklevel=2)
        return False
    epochs = [r["epoch"] for r in rows]
    fig = Figure(figsize=(10, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax_loss, ax_acc = fig.subplots(1, 2)
    labels = {"dtl": "DTL (dual-task loss)", "image_cnn": "image-only CNN", "video_baseline": "video-only"}
    for name in MODEL_NAMES:
        ys = [r["train_loss"].get(name) for r in rows]
        if all(y is not None for y in ys):
            ax_loss.plot(epochs, ys, marker="o", label=labels[name])
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("training loss")
    ax_loss.legend()
    for key, label in HEADS:
        ys = [r["val_acc"].get(key) for r in rows]
        if all(y is not None for y in ys):
            ax_acc.plot(epochs, [100 * y for y in ys], marker="o", label=label)
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylabel("validation accuracy (%)")
    ax_acc.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    _atomic_write_bytes(path, buf.getvalue())
    return True


def _write_outputs(out: Path, metrics: dict, plot: bool = False) -> None:
    _atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    _write_csv(out / "metrics.csv", metrics["epochs"])
    if plot:  # at the end only: matplotlib costs seconds per figure on a small CPU
        _write_plot(out / "curves.png", metrics["epochs"])


# ----------------------------------------------------------------------------------------------
# RNG state (for bit-identical resume)

def _rng_state(device: torch.device) -> dict:
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(),
             # lists, not numpy arrays, so the checkpoint loads with weights_only=True
             "numpy": (np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])),
             "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


# ----------------------------------------------------------------------------------------------
# training

def _log(dist_info: _Dist, *args) -> None:
    if dist_info.main:
        print(*args, flush=True)


def _loaders(config: TrainConfig, datasets: dict, dist_info: _Dist, device: torch.device):
    from torch.utils.data import DataLoader, DistributedSampler

    from dtl_fast.data import collate_multimodal

    pin = device.type == "cuda"
    # num_replicas=1 in one process too, so one process and N processes shuffle identically.
    sampler = DistributedSampler(datasets["train"], num_replicas=dist_info.world, rank=dist_info.rank,
                                 shuffle=True, seed=config.seed, drop_last=False)
    train_loader = DataLoader(datasets["train"], batch_size=config.batch_size // dist_info.world,
                              sampler=sampler, num_workers=config.workers, drop_last=False,
                              collate_fn=collate_multimodal, pin_memory=pin,
                              persistent_workers=config.workers > 0)
    evals = {split: DataLoader(datasets[split], batch_size=config.batch_size, shuffle=False,
                               num_workers=config.workers, collate_fn=collate_multimodal, pin_memory=pin)
             for split in ("validation", "test")}
    return sampler, train_loader, evals


def _open_datasets(root: Path, config: TrainConfig, dist_info: _Dist, classes=None,
                   splits=("train", "validation", "test")) -> dict:
    """Builds each split (each checks every file before anything trains)."""
    from dtl_fast.data import MultiModalFolder

    out = {}
    for split in splits:
        stats = {k: tuple(v) if len(v) > 1 else tuple(v) * config.channels
                 for k, v in (("mean", config.mean), ("std", config.std)) if v is not None}
        ds = MultiModalFolder(root, split, image_size=config.image_size,
                              frame_size=config.frame_size, max_frames=config.max_frames,
                              channels=config.channels, classes=classes,
                              on_bad_sample=config.on_bad_sample, **stats)
        if classes is None:
            classes = list(ds.classes)
        if len(ds) == 0:
            raise ValueError(f"--data {root}: the {split} split has no usable samples "
                             f"({len(ds.skipped)} skipped)")
        out[split] = ds
    return out


def _check_resume(state: dict, config: TrainConfig, path: Path) -> None:
    saved = state.get("config", {})
    now = dataclasses.asdict(config)
    diffs = [f"--{k.replace('_', '-')}: checkpoint {saved.get(k)!r}, this run {now[k]!r}"
             for k in RESUME_MUST_MATCH if saved.get(k) != now[k]]
    if diffs:
        raise ValueError(f"--resume: {path} was written with different settings that change the "
                         "model, the data or the batches: " + "; ".join(diffs)
                         + ". Use the checkpoint's settings, or another --out to start afresh.")


def train(config: TrainConfig) -> dict:
    """Trains DTL (and the baselines) per `config`; returns the metrics dict that is also written
    to OUT/metrics.json. Raises ValueError / BadSampleError naming the flag or file for bad
    input, before any training step. Under torchrun it joins the process group (and leaves it)."""
    t_start = time.perf_counter()
    config = dataclasses.replace(config)
    config.validate()
    dist_info = _dist_from_env()
    if dist_info.active and config.batch_size % dist_info.world:
        raise ValueError(f"--batch-size {config.batch_size} is the global batch and must be divisible "
                         f"by the {dist_info.world} processes (WORLD_SIZE)")
    device = _resolve_device(config.device, dist_info.local_rank)
    if device.type == "cuda":
        # Triton launches on the current device, whatever its tensors' device: cuda:N must be it
        torch.cuda.set_device(device)
    initialised = False
    if dist_info.active and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
        initialised = True
    try:
        return _train(config, dist_info, device, t_start)
    finally:
        if initialised and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _setup(config: TrainConfig, dist_info: _Dist, device: torch.device):
    out = Path(config.out)
    if dist_info.main:
        _check_out_writable(out)
    if config.data is None:
        from dtl_fast.data import build_demo_dataset

        root = _demo_root(config.seed)
        if dist_info.local_rank in (None, 0):  # one builder per machine (the cache is local)
            _log(dist_info, f"data: the bundled digits demo data set in {root}")
            build_demo_dataset(root, seed=config.seed)
    else:
        root = Path(config.data)
    return out, root


def _train(config: TrainConfig, dist_info: _Dist, device: torch.device, t_start: float) -> dict:
    error = None
    try:
        out, root = _setup(config, dist_info, device)
    except Exception as exc:  # noqa: BLE001 - re-raised below once every rank knows
        error = exc
    if not _all_ok(error is None, dist_info, device):
        raise error if error is not None else RuntimeError("another rank failed during setup (see its error)")
    root = root.resolve()  # after every rank knows the demo data is built (it may be a symlink)
    _check_layout(root)
    config.data = str(root)
    datasets = _open_datasets(root, config, dist_info)
    classes = list(datasets["train"].classes)
    skipped = [{"split": s, "path": str(p), "reason": str(r)}
               for s, ds in datasets.items() for p, r in getattr(ds, "skipped", [])]
    if skipped:
        _log(dist_info, f"skipped {len(skipped)} bad sample(s) (--on-bad-sample skip):")
        for item in skipped[:20]:
            _log(dist_info, f"  {item['path']}: {item['reason']}")
        if len(skipped) > 20:
            _log(dist_info, f"  and {len(skipped) - 20} more (all in metrics.json)")

    ckpt_path = out / CHECKPOINT_NAME
    state = None
    if config.resume:
        if not ckpt_path.is_file():
            raise ValueError(f"--resume: no checkpoint at {ckpt_path} (run without --resume to start)")
        state = load_checkpoint(ckpt_path)
        _check_resume(state, config, ckpt_path)
        if list(state["classes"]) != classes:
            raise ValueError(f"--resume: {ckpt_path} has classes {state['classes']}, the data in "
                             f"{root} has {classes}")

    backend = _module_backend(config.backend, device)
    _seed_everything(config.seed)
    models = _build_models(config, len(classes), backend)
    for m in models.values():
        m.to(device)
    optims = {name: torch.optim.Adam(m.parameters(), lr=config.lr) for name, m in models.items()}

    metrics = {"config": dataclasses.asdict(config), "classes": classes, "epochs": [],
               "skipped": skipped, "world_size": dist_info.world, "total_seconds": 0.0}
    start_epoch, global_step, prior_seconds = 0, 0, 0.0
    if state is not None:
        for name, m in models.items():
            m.load_state_dict(state["models"][name]["state_dict"])
            optims[name].load_state_dict(state["optimizers"][name])
        start_epoch, global_step = int(state["epoch"]), int(state["global_step"])
        metrics["epochs"] = list(state["metrics"].get("epochs", []))
        prior_seconds = float(state["metrics"].get("total_seconds", 0.0))
        _set_rng_state(state["rng"], device)
    metrics["config"]["epochs"] = config.epochs
    metrics["backend"] = {"requested": config.backend, "modules": backend, "device": str(device),
                          "amp": config.amp}
    metrics["machine"] = _machine(device)

    _log(dist_info, _describe_backend(config.backend, backend, device)
         + ("; amp bf16" if config.amp else "") + (f"; {dist_info.world} processes (DDP)" if dist_info.active else ""))
    _log(dist_info, f"data: {root}: {len(classes)} classes, "
         + ", ".join(f"{s} {len(ds)}" for s, ds in datasets.items()) + " samples")

    sampler, train_loader, eval_loaders = _loaders(config, datasets, dist_info, device)
    train_models = models
    if dist_info.active:
        from torch.nn.parallel import DistributedDataParallel as DDP

        # device_ids=None: the batch is already on the device, and DDP with device ids would
        # also move the CPU lengths to the GPU (the model would copy them back: a sync a step)
        ids = None
        if config.encoder == "resnet18" and device.type == "cuda":
            # ResNet-18's BatchNorm would normalise each rank's share alone; SyncBatchNorm
            # (CUDA only) uses the global batch, as one process does. The top module is never
            # a BatchNorm, so the conversion happens in place and `models` sees it.
            for m in models.values():
                torch.nn.SyncBatchNorm.convert_sync_batchnorm(m)
        train_models = {name: DDP(m, device_ids=ids) for name, m in models.items()}

    def session_seconds():
        return prior_seconds + (time.perf_counter() - t_start)

    if start_epoch >= config.epochs:
        _log(dist_info, f"--resume: {ckpt_path} already holds all {start_epoch} epoch(s) "
             f"(--epochs {config.epochs}); the run is complete, re-evaluating")
    elif start_epoch:
        _log(dist_info, f"--resume: continuing from {ckpt_path} at epoch {start_epoch + 1}")

    n_train = len(datasets["train"])
    for epoch in range(start_epoch, config.epochs):
        sampler.set_epoch(epoch)
        sums = torch.zeros(len(MODEL_NAMES) + 1, dtype=torch.float64)
        bar = Progress(n_train, f"epoch {epoch + 1}/{config.epochs}",
                       enabled=config.progress and dist_info.main)
        t0 = time.perf_counter()
        for m in models.values():
            m.train()
        for batch in train_loader:
            # lengths stay on the CPU: the model checks them on the host, where lengths on the
            # GPU would cost a host sync in every module that takes them
            batch = batch.to(device, non_blocking=True)._replace(lengths=batch.lengths)
            n = int(batch.labels.numel())
            losses = _step(train_models, optims, batch, device, config.amp)
            for i, name in enumerate(MODEL_NAMES):
                if name in losses:
                    sums[i] += losses[name] * n
            sums[-1] += n
            global_step += 1
            bar.update(n * dist_info.world, loss=losses["dtl"])
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - t0
        bar.close()
        if dist_info.active:  # every rank's losses, weighted by its samples
            sums_dev = sums.to(device)
            torch.distributed.all_reduce(sums_dev)
            sums = sums_dev.cpu()
        count = float(sums[-1])
        train_loss = {name: float(sums[i]) / count for i, name in enumerate(MODEL_NAMES) if name in models}
        if dist_info.main:
            val = _accuracies(models, eval_loaders["validation"], device, config.amp)
            row = {"epoch": epoch + 1, "global_step": global_step, "train_loss": train_loss,
                   "val_acc": val, "samples_per_s": count / seconds if seconds > 0 else None,
                   "epoch_seconds": seconds}
            metrics["epochs"].append(row)
            metrics["total_seconds"] = session_seconds()
            _log(dist_info, _format_val_line(epoch + 1, config.epochs, val)
                 + f" | train loss DTL {train_loss['dtl']:.4f} | {row['samples_per_s']:.1f} samples/s")
            # a JSON round trip: plain data only, so the checkpoint loads with weights_only=True
            metrics = json.loads(json.dumps(metrics))
            save_checkpoint(ckpt_path, {
                "format": CHECKPOINT_FORMAT, "epoch": epoch + 1, "global_step": global_step,
                "classes": classes, "config": dataclasses.asdict(config),
                "models": {name: {"config": m.config, "state_dict": m.state_dict()}
                           for name, m in models.items()},
                "optimizers": {name: o.state_dict() for name, o in optims.items()},
                "metrics": metrics, "rng": _rng_state(device),
            })
            _write_outputs(out, metrics)
        _barrier(dist_info)

    if dist_info.main:
        if metrics["epochs"]:
            final_val = metrics["epochs"][-1]["val_acc"]
        else:
            final_val = _accuracies(models, eval_loaders["validation"], device, config.amp)
        test = _accuracies(models, eval_loaders["test"], device, config.amp)
        metrics["val_acc"] = final_val
        metrics["test_acc"] = test
        metrics["total_seconds"] = session_seconds()
        metrics["complete"] = True
        table = format_table(final_val, test)
        print("\n" + table + "\n", flush=True)
        print(f"run time {metrics['total_seconds']:.1f} s on {metrics['machine']['device_name']} "
              f"({metrics['machine']['device']}); outputs in {out}", flush=True)
        header = (f"# dtl-fast train results\n\ndata: {root}; epochs {config.epochs}; batch "
                  f"{config.batch_size}; lr {config.lr}; backend {config.backend} ({backend} ran); "
                  f"device {device}; run time {metrics['total_seconds']:.1f} s\n\n")
        _atomic_write_text(out / "results.md", header + table + "\n")
        _write_outputs(out, metrics, plot=True)
    if dist_info.active:
        box = [metrics]
        torch.distributed.broadcast_object_list(box, src=0)
        metrics = box[0]
    return metrics


def _step(models: dict, optims: dict, batch, device: torch.device, amp: str | None) -> dict:
    """One optimizer step of every model on the same batch; returns each model's loss (float)."""
    from dtl_fast.models import dtl_loss

    losses = {}
    for name, model in models.items():
        with _autocast(device, amp):
            if name == "dtl":
                loss = dtl_loss(model(batch.images, batch.videos, batch.lengths), batch.labels)
            elif name == "image_cnn":
                loss = F.cross_entropy(model(batch.images).float(), batch.labels)
            else:
                loss = F.cross_entropy(model(batch.videos, batch.lengths).float(), batch.labels)
        optims[name].zero_grad(set_to_none=True)
        loss.backward()
        optims[name].step()
        losses[name] = float(loss.detach())
    return losses


# ----------------------------------------------------------------------------------------------
# evaluation of a checkpoint

def evaluate(checkpoint, data, *, device: str = "auto", batch_size: int = 64, workers: int = 0,
             backend: str = "fused", verbose: bool = True) -> dict:
    """Evaluates the five heads of a `dtl-fast train` checkpoint on DATA's validation and test
    splits, with the checkpoint's class list. Returns {"val_acc": {...}, "test_acc": {...},
    "epoch": int, "checkpoint": str, "data": str, "table": str}; prints the table if verbose.
    Raises FileNotFoundError / ValueError naming the checkpoint, the folder or the flag."""
    from torch.utils.data import DataLoader

    from dtl_fast.data import collate_multimodal

    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"--batch-size must be an integer >= 1, got {batch_size!r}")
    if not isinstance(workers, int) or workers < 0:
        raise ValueError(f"--workers must be an integer >= 0, got {workers!r}")
    state = load_checkpoint(checkpoint)
    root = Path(data)
    if not root.is_dir():
        raise ValueError(f"--data {data}: not a folder")
    missing = [s for s in ("validation", "test") if not (root / s).is_dir()]
    if missing:
        raise ValueError(f"--data {root}: missing the split folder(s) {', '.join(missing)}")
    dev = _resolve_device(device, None)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)  # Triton launches on the current device
    used = _module_backend(backend, dev)
    saved = state["config"]
    config = TrainConfig(**{k: v for k, v in saved.items() if k in {f.name for f in dataclasses.fields(TrainConfig)}})
    config.on_bad_sample = "error"
    classes = list(state["classes"])
    try:
        datasets = _open_datasets(root, config, _Dist(), classes=classes, splits=("validation", "test"))
    except ValueError as exc:
        raise ValueError(f"--data {root} does not match checkpoint {checkpoint} (classes "
                         f"{classes}): {exc}") from exc
    models = {}
    for name, entry in state["models"].items():
        m = _rebuild_model(name, dict(entry["config"]))
        m.load_state_dict(entry["state_dict"])
        _set_backend(m, used)
        models[name] = m.to(dev).eval()
    result = {"checkpoint": str(checkpoint), "data": str(root), "epoch": int(state["epoch"])}
    for split, key in (("validation", "val_acc"), ("test", "test_acc")):
        loader = DataLoader(datasets[split], batch_size=batch_size, shuffle=False, num_workers=workers,
                            collate_fn=collate_multimodal)
        result[key] = _accuracies(models, loader, dev, config.amp)
    result["table"] = format_table(result["val_acc"], result["test_acc"])
    if verbose:
        print(f"checkpoint {checkpoint} (epoch {result['epoch']}), data {root}, "
              + _describe_backend(backend, used, dev))
        print(result["table"])
    return result


# ----------------------------------------------------------------------------------------------
# entry point

def build_parser(prog: str = "python -m dtl_fast.train") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=(
        "Train DTL and the image-only / video-only baselines on a multimodal image + video folder; "
        "under torchrun it uses DistributedDataParallel."))
    return add_train_arguments(parser)


def run_config(config: TrainConfig, prog: str) -> int:
    """Runs train(config); a bad input becomes `prog: error: ...` on stderr and exit status 2."""
    from dtl_fast.data import BadSampleError

    try:
        train(config)
    except (ValueError, BadSampleError, FileNotFoundError, PermissionError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr, flush=True)
        return 2
    except RuntimeError as exc:
        if "pip install" not in str(exc):  # a missing optional package says how to get it
            raise
        print(f"{prog}: error: {exc}", file=sys.stderr, flush=True)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m dtl_fast.train ...` (what torchrun runs); returns the exit status."""
    args = build_parser().parse_args(argv)
    return run_config(config_from_args(args), "dtl_fast.train")


if __name__ == "__main__":
    sys.exit(main())
