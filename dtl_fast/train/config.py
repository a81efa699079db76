"""What `dtl-fast train` takes: the TrainConfig dataclass (checked by `validate`) and the
command-line flags that fill it, shared by `dtl-fast train` and `python -m dtl_fast.train`."""
from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

from dtl_fast.train.distributed import parse_device


@dataclass
class TrainConfig:
    """Everything `dtl-fast train` takes; field names are the flags without `--` (`-` -> `_`).

    data: dataset root (root/{train,validation,test}/<class>/...) or None for the bundled demo
    data, built once under $DTL_FAST_CACHE or ~/.cache/dtl_fast. batch_size is the global batch
    (each of N DDP ranks takes batch_size / N). backend: "fused" (Triton kernels on CUDA; on a
    CPU device the modules' "auto", dtl_fast's fastest CPU paths), "reference" or "auto".
    amp: None or "bf16" (torch.autocast). device: "auto" | "cpu" | "cuda" | "cuda:N".
    compile: torch.compile each model for training. cuda_graphs: None (auto: on where correct
    for the run, see dtl_fast.train.graphs), True (required: an error where it cannot be) or
    False. A multi-seed run (`--seeds`) is several of these, see dtl_fast.train.seeds.
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
    compile: bool = False
    cuda_graphs: bool | None = None

    def validate(self) -> None:
        """Raises ValueError naming the flag for a setting that cannot work."""
        def positive(name, value, minimum=1):
            if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
                raise ValueError(f"--{name.replace('_', '-')} must be an integer >= {minimum}, got {value!r}")
        for name in ("epochs", "batch_size", "image_size", "max_frames", "channels", "width",
                     "hidden_size", "dim", "num_heads", "num_layers"):
            positive(name, getattr(self, name))
        positive("workers", self.workers, 0)
        if self.channels not in (1, 3):
            raise ValueError(f"--channels must be 1 (grey) or 3 (RGB), got {self.channels!r}")
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
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"--seed must be an integer, got {self.seed!r}")
        if self.cuda_graphs not in (None, True, False):
            raise ValueError(f"--cuda-graphs must be on, off or left out (auto), got {self.cuda_graphs!r}")
        if not isinstance(self.compile, bool):
            raise ValueError(f"--compile must be True or False, got {self.compile!r}")
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
        if self.data is not None:
            check_out_outside_splits(self.out, self.data)
        else:  # the bundled demo set, built in the cache: --out stays out of that one too
            from dtl_fast.train.datasets import demo_root

            check_out_outside_splits(self.out, demo_root(self.seed), data_name="the demo data in")
        if self.encoder_weights is not None and not Path(self.encoder_weights).is_file():
            raise ValueError(f"--encoder-weights {self.encoder_weights}: no such file")
        parse_device(self.device)


def check_out_outside_splits(out, data, data_name: str = "--data") -> None:
    """Raises ValueError naming --out and the data (`data_name` `data`) when --out is the data
    folder itself or lies in (or is) one of its split folders (train/, validation/, test/):
    --out is made before the data is read, so it would be read as a class folder or hold samples
    of one, and the run's results.md / metrics.json would land among the data set's files."""
    from dtl_fast.data import SPLITS

    out_p, data_p = Path(out).resolve(), Path(data).resolve()
    if out_p == data_p:
        raise ValueError(f"--out {out} is {data_name} {data} ({data_p}): the run's files would be "
                         f"written into the data set. Choose an --out outside it")
    for split in SPLITS:
        folder = data_p / split
        if out_p == folder or folder in out_p.parents:
            raise ValueError(f"--out {out} lies inside the {split} split folder of {data_name} "
                             f"{data} ({folder}): its files would be read as a class of the data "
                             f"set. Choose an --out outside {data_p}/{{{','.join(SPLITS)}}}")


def add_sample_size_arguments(group) -> None:
    """--image-size, --frame-size, --max-frames, --channels with TrainConfig's defaults: what a
    sample is decoded to, shared by `dtl-fast train` and `dtl-fast data prepare` (a prepared data
    set must match the training run's values)."""
    d = TrainConfig()
    group.add_argument("--image-size", type=int, default=d.image_size,
                       help="images (and frames, unless --frame-size) are resized to this square "
                            "(default: %(default)s)")
    group.add_argument("--frame-size", type=int, default=d.frame_size,
                       help="video frames are resized to this square (default: --image-size)")
    group.add_argument("--max-frames", type=int, default=d.max_frames,
                       help="longer clips are subsampled uniformly to this (default: %(default)s)")
    group.add_argument("--channels", type=int, default=d.channels,
                       help="image channels, 1 or 3 (default: %(default)s)")


def add_train_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Adds every TrainConfig flag to `parser` (used by both `dtl-fast train` and
    `python -m dtl_fast.train`); `config_from_args` turns the parsed result into a TrainConfig."""
    d = TrainConfig()
    g = parser.add_argument_group("data")
    g.add_argument("--data", metavar="DIR", default=d.data,
                   help="dataset root with train/, validation/, test/ (one folder per class; "
                        "<sample>.png + <sample>.mp4 or a <sample>/ folder of frames), or the "
                        "output of `dtl-fast data prepare`; default: "
                        "the bundled digits demo data, built once in $DTL_FAST_CACHE or "
                        "~/.cache/dtl_fast")
    g.add_argument("--on-bad-sample", choices=("skip", "error"), default=d.on_bad_sample,
                   help="a missing / unreadable / corrupt file: fail before training starts, or "
                        "skip it and report it (default: %(default)s)")
    add_sample_size_arguments(g)
    g.add_argument("--mean", type=float, nargs="+", default=d.mean, metavar="M",
                   help="per-channel normalisation mean, 1 or --channels numbers "
                        "(default: ImageNet's 0.485 0.456 0.406)")
    g.add_argument("--std", type=float, nargs="+", default=d.std, metavar="S",
                   help="per-channel normalisation std (default: ImageNet's 0.229 0.224 0.225)")
    g.add_argument("--workers", type=int, default=d.workers,
                   help="DataLoader worker processes, and the processes that check the data "
                        "set's files before training (default: %(default)s)")
    g = parser.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=d.epochs, help="(default: %(default)s)")
    g.add_argument("--batch-size", type=int, default=d.batch_size,
                   help="the global batch: under torchrun each of N ranks takes batch-size/N "
                        "(default: %(default)s)")
    g.add_argument("--lr", type=float, default=d.lr, help="Adam learning rate (default: %(default)s)")
    g.add_argument("--seed", type=int, default=d.seed, action=_SeedAction,
                   help="seeds the models, the shuffling and the demo data (default: %(default)s)")
    g.add_argument("--seeds", type=_seeds_type, default=None, metavar="LIST|N",
                   help="a multi-seed run: train once per seed (0,1,2 or N = seeds 0..N-1), each "
                        "into OUT/seed-<s>/, and report mean +- std over seeds and the paired "
                        "difference DTL fused head - best baseline with its 95%% interval; not "
                        "with --seed")
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
    g.add_argument("--compile", action="store_true",
                   help="torch.compile each model for training (evaluation runs eagerly)")
    g.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=d.cuda_graphs,
                   help="capture each model's training step in a CUDA graph and replay it; default: "
                        "on where correct (CUDA, --backend fused, one process, no --compile), off "
                        "elsewhere; the run says which it used and why")
    g.add_argument("--out", metavar="DIR", default=d.out,
                   help="checkpoint.pt, best.pt, metrics.json, metrics.csv, results.md and "
                        "curves.png go here; with --seeds one OUT/seed-<s>/ per seed and "
                        "seeds.json / seeds.md here (default: %(default)s)")
    g.add_argument("--resume", action="store_true",
                   help="continue from OUT/checkpoint.pt at the epoch after the last one saved "
                        "(with --seeds: each seed from its own folder; a seed not started yet "
                        "starts)")
    g.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress bars")
    return parser


class _SeedAction(argparse.Action):
    """Stores --seed and notes that it was given (the default cannot tell), so that --seed with
    --seeds is an error."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        namespace.seed_given = True


def parse_seeds(text) -> list[int]:
    """The seeds of --seeds: "0,1,2" (distinct integers >= 0, in that order) or "N" (an integer
    >= 1: seeds 0..N-1). Raises ValueError naming --seeds for anything else."""
    usage = "--seeds must be N >= 1 (seeds 0..N-1) or a comma-separated list of distinct integers >= 0"
    if not isinstance(text, str):
        raise ValueError(f"{usage}, got {text!r}")
    raw = text.strip()
    if "," not in raw:
        if not raw.isdigit() or int(raw) < 1:
            raise ValueError(f"{usage}, got {text!r}")
        return list(range(int(raw)))
    items = [item.strip() for item in raw.split(",")]
    seeds = []
    for i, item in enumerate(items):
        if item == "":
            raise ValueError(f"{usage}, got {text!r} (item {i + 1} is empty)")
        if not item.isdigit():
            raise ValueError(f"{usage}, got {text!r} ({item!r} is not an integer >= 0)")
        if int(item) in seeds:
            raise ValueError(f"{usage}, got {text!r} (seed {int(item)} appears twice)")
        seeds.append(int(item))
    return seeds


def _seeds_type(text: str) -> list[int]:
    try:
        return parse_seeds(text)
    except ValueError as exc:  # argparse prints an ArgumentTypeError's message as it is
        raise argparse.ArgumentTypeError(str(exc).removeprefix("--seeds ")) from exc


def seeds_from_args(args: argparse.Namespace) -> list[int] | None:
    """The seeds of a multi-seed run (--seeds), or None for a single run (--seed). Raises
    ValueError naming both flags when both were given."""
    seeds = getattr(args, "seeds", None)
    if seeds is not None and getattr(args, "seed_given", False):
        raise ValueError("--seed and --seeds cannot be combined: --seed S is one run, --seeds "
                         "0,1,2 (or N) one run per seed")
    return seeds


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The TrainConfig of parsed `add_train_arguments` flags (other attributes are ignored;
    `--amp none/off/fp32/float32` means no autocast)."""
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    kwargs = {k: v for k, v in vars(args).items() if k in fields}
    if isinstance(kwargs.get("amp"), str) and kwargs["amp"].lower() in ("none", "off", "fp32", "float32"):
        kwargs["amp"] = None
    return TrainConfig(**kwargs)


def build_parser(prog: str = "python -m dtl_fast.train") -> argparse.ArgumentParser:
    """The parser of `python -m dtl_fast.train` (and of torchrun ... -m dtl_fast.train)."""
    parser = argparse.ArgumentParser(prog=prog, description=(
        "Train DTL and the image-only / video-only baselines on a multimodal image + video folder; "
        "under torchrun it uses DistributedDataParallel."))
    return add_train_arguments(parser)
