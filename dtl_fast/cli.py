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


def _cmd_demo(args) -> int:
    from dtl_fast import demo

    demo.run(batch=args.batch, max_len=args.max_len, seed=args.seed)
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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
