"""The ``diffopt`` command. Subcommands register themselves here; ``bench`` is the only one so far.

Example::

    $ diffopt bench --pipelines sd-txt2img,sdxl --batch-sizes 1,4 --recipes sdpa,seed,diffopt
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional


def build_parser() -> argparse.ArgumentParser:
    from diffopt.bench.command import add_arguments

    parser = argparse.ArgumentParser(prog="diffopt", description="PyTorch 2 optimizations for diffusers pipelines")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    bench = commands.add_parser(
        "bench",
        help="benchmark pipelines x batch sizes x recipes",
        description="Time diffusers pipelines under several recipes (the seed page's PyTorch 2.0 benchmark) and "
        "write results.json, results.md and speedup.png.",
    )
    add_arguments(bench)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    """Entry point of the ``diffopt`` script and of ``python -m diffopt.bench``; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "bench":
        from diffopt.bench.command import run

        return run(args, ["diffopt", *argv])
    parser.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
