"""The command-line entry of `dtl-fast train` and `python -m dtl_fast.train` (what torchrun
runs): flags to TrainConfig, train, and bad input turned into `prog: error: ...` and exit
status 2, printed by rank 0 only under torchrun (an error that one rank alone raised, by that
rank)."""
from __future__ import annotations

import sys

from dtl_fast.train.config import TrainConfig, build_parser, config_from_args, seeds_from_args
from dtl_fast.train.distributed import dist_from_env
from dtl_fast.train.loop import train


def run_config(config: TrainConfig, prog: str, seeds: list | None = None) -> int:
    """Runs train(config), or train_seeds(config, seeds) for a multi-seed run; a bad input
    becomes `prog: error: ...` on stderr and exit status 2. Under torchrun every rank returns 2
    and only rank 0 prints an error that train raised on every rank (setup, data check,
    resume); one raised on a single rank is printed there."""
    from dtl_fast.data import BadSampleError
    from dtl_fast.train.seeds import train_seeds

    try:
        if seeds is None:
            train(config)
        else:
            train_seeds(config, seeds)
    except (ValueError, BadSampleError, FileNotFoundError, FileExistsError, PermissionError) as exc:
        _report(prog, exc)
        return 2
    except RuntimeError as exc:
        if not is_missing_dependency(exc):
            raise
        _report(prog, exc)
        return 2
    return 0


def is_missing_dependency(exc: BaseException) -> bool:
    """True for the RuntimeError that dtl_fast raises when an optional package (torchvision for
    --encoder resnet18, PyAV for video files, ...) is missing: its message says how to get it
    (`pip install ...`), so the command prints it as an error, not as a traceback."""
    return isinstance(exc, RuntimeError) and "pip install" in str(exc)


def _report(prog: str, exc: BaseException) -> None:
    """Prints the error on rank 0; on another rank only when it was not raised on every rank
    (a file that went bad mid-epoch on this rank alone: rank 0 never sees it)."""
    dist = dist_from_env()
    if dist.main:
        print(f"{prog}: error: {exc}", file=sys.stderr, flush=True)
    elif not getattr(exc, "raised_on_every_rank", False):
        print(f"{prog}: error: [rank {dist.rank}] {exc}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    """`python -m dtl_fast.train ...` (what torchrun runs); returns the exit status."""
    return run_args(build_parser().parse_args(argv), "dtl_fast.train")


def run_args(args, prog: str) -> int:
    """Runs parsed `add_train_arguments` flags: one run (--seed) or one per seed (--seeds);
    --seed with --seeds is exit status 2 naming both."""
    try:
        seeds = seeds_from_args(args)
    except ValueError as exc:
        _report(prog, exc)
        return 2
    return run_config(config_from_args(args), prog, seeds)
