"""The ``mil`` command: plugins, make-benchmark, check-data, train, federate, eval, export.

Each sub-command imports what it needs only when it runs, so ``mil plugins`` stays quick.
"""
# The top floor of the package: one small module per command (cli/<command>.py: its arguments, the
# library call, what it prints), which nothing below imports (docs/architecture.md).

from __future__ import annotations

import argparse
import os
import sys

from mil_plugins.cli import check_data, export, federate, make_benchmark, plugins, train
from mil_plugins.cli import eval as eval_command

#: in the order ``mil --help`` lists them
COMMANDS = (plugins, make_benchmark, check_data, train, federate, eval_command, export)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mil", description=__doc__)
    # `deepspeed ... $(which mil) train RECIPE` runs `mil --local_rank=N train RECIPE`: accepted
    # before the command too, and ignored (ranks come from the environment)
    parser.add_argument("--local_rank", "--local-rank", dest="launcher_local_rank", type=int,
                        default=None, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True)

    for command in COMMANDS:
        command.add_parser(sub)
    return parser


#: errors whose message says what is wrong (bad recipe, data, plugin, checkpoint): shown without
#: a traceback unless MIL_DEBUG=1
USER_ERRORS = (ValueError, TypeError, LookupError, OSError)


def run_friendly(func, *args) -> int:
    try:
        return int(func(*args) or 0)
    except KeyboardInterrupt:
        return 130
    except USER_ERRORS as exc:
        if os.environ.get("MIL_DEBUG"):
            raise
        print(f"mil: error: {exc}", file=sys.stderr)
        print("(set MIL_DEBUG=1 for the traceback)", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_friendly(args.func, args)
