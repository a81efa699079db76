"""The command-line entry of `dtl-fast train` and `python -m dtl_fast.train` (what torchrun
runs): flags to TrainConfig, train, and bad input turned into `prog: error: ...` and exit
status 2, printed by rank 0 only under torchrun."""
from __future__ import annotations

import sys

from dtl_fast.train.config import TrainConfig, build_parser, config_from_args
from dtl_fast.train.distributed import dist_from_env
from dtl_fast.train.loop import train


def run_config(config: TrainConfig, prog: str) -> int:
    """Runs train(config); a bad input becomes `prog: error: ...` on stderr and exit status 2.
    Under torchrun every rank returns 2 and only rank 0 prints (train raises the same error on
    every rank)."""
    from dtl_fast.data import BadSampleError

    try:
        train(config)
    except (ValueError, BadSampleError, FileNotFoundError, PermissionError) as exc:
        _report(prog, exc)
        return 2
    except RuntimeError as exc:
        if "pip install" not in str(exc):  # a missing optional package says how to get it
            raise
        _report(prog, exc)
        return 2
    return 0


def _report(prog: str, exc: BaseException) -> None:
    if dist_from_env().main:
        print(f"{prog}: error: {exc}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    """`python -m dtl_fast.train ...` (what torchrun runs); returns the exit status."""
    args = build_parser().parse_args(argv)
    return run_config(config_from_args(args), "dtl_fast.train")
