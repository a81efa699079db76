"""The `dtl-fast` command."""
from __future__ import annotations

import argparse
import json
import sys


def _cmd_info(args) -> int:
    from dtl_fast.info import format_info, info

    data = info()
    print(json.dumps(data, indent=2) if args.json else format_info(data))
    return 0


def _missing_package(prog: str, exc: RuntimeError) -> int:
    """A missing optional package (its RuntimeError says `pip install ...`) as one error line
    and exit status 2, as `dtl-fast train` prints it; any other RuntimeError is re-raised."""
    from dtl_fast.train.entry import is_missing_dependency

    if not is_missing_dependency(exc):
        raise exc
    print(f"{prog}: error: {exc}", file=sys.stderr)
    return 2


def _cmd_demo(args) -> int:
    from dtl_fast import demo

    for flag, value in (("--batch", args.batch), ("--max-len", args.max_len)):
        if value < 1:
            print(f"dtl-fast demo: error: {flag} must be an integer >= 1, got {value}", file=sys.stderr)
            return 2
    try:
        demo.run(batch=args.batch, max_len=args.max_len, seed=args.seed)
    except RuntimeError as exc:  # scikit-learn's digits missing
        return _missing_package("dtl-fast demo", exc)
    return 0


def _cmd_train(args) -> int:
    from dtl_fast.train.entry import run_args

    return run_args(args, "dtl-fast train")


def _cmd_evaluate(args) -> int:
    from dtl_fast.data import BadSampleError
    from dtl_fast.train import evaluate

    try:
        evaluate(args.checkpoint, args.data, device=args.device, batch_size=args.batch_size,
                 workers=args.workers, backend=args.backend,
                 # both default to SUPPRESS (no "(default: None)" in --help): absent = not given
                 on_bad_sample=getattr(args, "on_bad_sample", None),
                 progress=getattr(args, "progress", None))
    except (ValueError, BadSampleError, OSError) as exc:
        print(f"dtl-fast evaluate: error: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:
        # a missing optional package (a resnet18 checkpoint without torchvision, .mp4 clips
        # without PyAV): the message says what to install, as `dtl-fast train` prints it
        return _missing_package("dtl-fast evaluate", exc)
    return 0


def _for_the_command_line(exc: BaseException) -> str:
    """An error of the Python API as the command line says it: its flags, not its keywords
    ("pass overwrite=True (--overwrite)" -> "pass --overwrite")."""
    return str(exc).replace("overwrite=True (--overwrite)", "--overwrite")


def _cmd_data_demo(args) -> int:
    from dtl_fast.data import build_demo_dataset

    try:
        kwargs = {} if args.samples_per_class is None else {"samples_per_class": args.samples_per_class}
        root = build_demo_dataset(args.dir, seed=args.seed, overwrite=args.overwrite, **kwargs)
    except (ValueError, OSError) as exc:
        print(f"dtl-fast data demo: error: {_for_the_command_line(exc)}", file=sys.stderr)
        return 2
    except RuntimeError as exc:  # scikit-learn's digits or Pillow missing
        return _missing_package("dtl-fast data demo", exc)
    print(f"demo data set (handwritten digits, image + video per sample, seed {args.seed}) in {root}")
    return 0


def _check_prepare_flags(args) -> str | None:
    """The first bad `data prepare` flag as an error message naming the flag, else None (the
    Python API's own checks name its arguments: image_size=, max_frames=, ...)."""
    for flag, value, low in (("--image-size", args.image_size, 1), ("--frame-size", args.frame_size, 1),
                             ("--max-frames", args.max_frames, 1), ("--workers", args.workers, 0)):
        if value is not None and value < low:
            return f"{flag} must be an integer >= {low}, got {value}"
    if args.channels not in (1, 3):
        return f"--channels must be 1 or 3, got {args.channels}"
    return None


def _cmd_data_prepare(args) -> int:
    import shlex

    from dtl_fast.data import BadSampleError
    from dtl_fast.data.prepared import prepare

    problem = _check_prepare_flags(args)
    if problem is not None:
        print(f"dtl-fast data prepare: error: {problem}", file=sys.stderr)
        return 2
    try:
        m = prepare(args.dir, args.out, image_size=args.image_size, frame_size=args.frame_size,
                    max_frames=args.max_frames, channels=args.channels,
                    on_bad_sample=args.on_bad_sample, workers=args.workers,
                    overwrite=args.overwrite, progress=args.progress)
    except (ValueError, BadSampleError, OSError, RuntimeError) as exc:
        print(f"dtl-fast data prepare: error: {_for_the_command_line(exc)}", file=sys.stderr)
        return 2
    counts = ", ".join(f"{split} {e['count']}" for split, e in m["splits"].items())
    skipped = sum(len(e["skipped"]) for e in m["splits"].values())
    size = sum(a["bytes"] for e in m["splits"].values() for a in e["arrays"].values())
    flags = f"--image-size {args.image_size}"
    if args.frame_size is not None:
        flags += f" --frame-size {args.frame_size}"
    flags += f" --max-frames {args.max_frames} --channels {args.channels}"
    if skipped:
        flags += " --on-bad-sample skip"
    print(f"prepared {counts} samples{f' ({skipped} skipped)' if skipped else ''}: "
          f"{size / 2**20:.1f} MiB in {args.out} ({m['seconds']:.1f} s)\n"
          f"train on it with: dtl-fast train --data {shlex.quote(args.out)} {flags}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dtl-fast", description=(
        "dtl_fast: fused kernels for DTL (dual task learning) multimodal models."))
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("info", help="versions, what was built, which backend runs each op")
    p.add_argument("--json", action="store_true", help="print as JSON")
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser("demo", help="frame pooling on a real batch of digit clips, checked and timed")
    p.add_argument("--batch", type=int, default=256, help="clips in the batch (default 256)")
    p.add_argument("--max-len", type=int, default=24, help="frames of the longest clip (default 24)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_demo)

    from dtl_fast.train import TrainConfig, add_train_arguments
    from dtl_fast.train.config import add_sample_size_arguments

    p = sub.add_parser("train", help="train DTL and the image-only / video-only baselines",
                       description="Train DTL (dual task learning) and the image-only / video-only "
                       "baselines on an image + video folder, print and write the results table, "
                       "metrics, curves and checkpoints. For several GPUs: torchrun "
                       "--nproc_per_node=N -m dtl_fast.train (same flags).")
    add_train_arguments(p)
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("evaluate", help="the results table of a checkpoint on a data set",
                       description="Evaluate the five heads of a `dtl-fast train` checkpoint on the "
                       "validation and test splits of DIR (with the checkpoint's classes).",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("checkpoint", metavar="CHECKPOINT",
                   help="OUT/checkpoint.pt (the last epoch) or OUT/best.pt (each model at its best "
                        "validation epoch) of `dtl-fast train`")
    # (no default: ArgumentDefaultsHelpFormatter would print "(default: None)" for it)
    p.add_argument("--data", metavar="DIR", required=True, default=argparse.SUPPRESS,
                   help="dataset root with validation/ and test/ (required)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--batch-size", type=int, default=64, metavar="N", help="samples per batch")
    p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    p.add_argument("--backend", choices=("fused", "reference", "auto"), default="fused",
                   help="fused: Triton kernels on CUDA ('auto' on a CPU device); reference: eager")
    p.add_argument("--on-bad-sample", choices=("error", "skip"), default=argparse.SUPPRESS,
                   help="a missing / unreadable / corrupt file: fail, or leave the sample out "
                        "(default: the checkpoint's run's --on-bad-sample)")
    p.add_argument("--no-progress", dest="progress", action="store_false",
                   default=argparse.SUPPRESS, help="no progress bars while the data's files are checked")
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("data", help="data sets: `data demo DIR` builds the bundled demo data, "
                       "`data prepare DIR OUT` decodes one once for fast training")
    data_sub = p.add_subparsers(dest="data_command", metavar="DATA_COMMAND")
    data_sub.required = True
    q = data_sub.add_parser("demo", help="build the bundled handwritten-digits image + video data set",
                            description="Build the bundled demo data set on disk from scikit-learn's "
                            "handwritten digits (no download): DIR/{train,validation,test}/<digit>/ "
                            "with an image and a clip per sample. Deterministic for a seed.",
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    q.add_argument("dir", metavar="DIR", help="where to build it: a new or empty folder (a symbolic "
                   "link is followed: its target is checked and built in, the link kept; a mount "
                   "point is refused: give a folder inside it)")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--overwrite", action="store_true",
                   help="rebuild DIR when it holds an earlier demo build (with other parameters, or "
                        "the same ones to repair it); a folder that is not a demo build is never "
                        "replaced")
    q.add_argument("--samples-per-class", type=int, default=None, metavar="N",
                   help="use N >= 3 digits of each class instead of all of scikit-learn's 1797 "
                        "(a small set for a quick try; 3 gives one per split)")
    q.set_defaults(func=_cmd_data_demo)

    d = TrainConfig()
    q = data_sub.add_parser(
        "prepare", help="decode a data set once into memory-mapped uint8 arrays for fast training",
        description="Decode every image and clip of DIR (DIR/{train,validation,test}/<class>/...) "
        "once, at the training resolution and frame budget, into memory-mapped uint8 arrays "
        "with a manifest in OUT. `dtl-fast train --data OUT` (same --image-size, --frame-size, "
        "--max-frames, --channels) then reads them directly: the same samples in the same order "
        "and bitwise the same tensors as training from DIR, without decoding in every epoch. "
        "OUT is written atomically; it is a snapshot: after changing DIR, prepare again with "
        "--overwrite.")
    q.add_argument("dir", metavar="DIR", help="the raw data set root")
    q.add_argument("out", metavar="OUT", help="where to write the prepared data set (new or empty "
                   "folder, or an earlier prepare's output with --overwrite; a symbolic link is "
                   "followed: its target is checked and written, the link kept; a mount point is "
                   "refused: give a folder inside it)")
    add_sample_size_arguments(q)
    q.add_argument("--on-bad-sample", choices=("skip", "error"), default=d.on_bad_sample,
                   help="a missing / unreadable / corrupt file: fail, or leave the sample out and "
                        "record it in the manifest (default: %(default)s)")
    q.add_argument("--workers", type=int, default=d.workers,
                   help="decoding processes; 0 decodes in this process (default: %(default)s)")
    q.add_argument("--overwrite", action="store_true",
                   help="replace OUT when it holds an earlier prepare's output (never anything else)")
    q.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    q.set_defaults(func=_cmd_data_prepare)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
