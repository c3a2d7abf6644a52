"""The ``diffopt`` command: ``diffopt bench`` (the benchmark), ``diffopt env`` (what this machine supports) and
``diffopt --version``.

Example::

    $ diffopt bench --pipelines sd-txt2img,sdxl --batch-sizes 1,4 --recipes sdpa,diffusers-compile,diffopt
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional

#: The exit status of a command stopped by Ctrl-C, as a shell reports one SIGINT ended (128 + 2).
INTERRUPTED_STATUS = 130


def build_parser() -> argparse.ArgumentParser:
    from diffopt import __version__
    from diffopt.bench.command import add_arguments

    parser = argparse.ArgumentParser(prog="diffopt", description="PyTorch 2 optimizations for diffusers pipelines")
    parser.add_argument("--version", action="version", version=f"diffopt {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    bench = commands.add_parser(
        "bench",
        help="benchmark pipelines x batch sizes x recipes",
        description="Time diffusers pipelines under several recipes (the benchmark of the diffusers 'PyTorch 2.0' "
        "docs page): eager, that page's torch.compile recipe and diffopt side by side. Writes results.json, "
        "results.md and speedup.png.",
    )
    add_arguments(bench)
    bench.set_defaults(command_parser=bench)  # so that checks after parsing report as `diffopt bench: error:`
    commands.add_parser(
        "env",
        help="what this machine and its packages support, option by option",
        description="Print the versions of torch, diffusers, torchao and triton, the device, and for each "
        "diffopt.optimize option (attention backends, compile, quantize, cache) whether it can run here, and why not.",
    )
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    """Entry point of the ``diffopt`` script and of ``python -m diffopt.bench``; returns the exit status."""
    from diffopt.quiet import quiet_third_party

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        with quiet_third_party():
            if args.command == "bench":
                from diffopt.bench.command import check, run

                check(args.command_parser, args)
                return run(args, ["diffopt", *argv])
            if args.command == "env":
                from diffopt.env_report import print_env

                return print_env()
    except KeyboardInterrupt:  # Ctrl-C outside a benchmark cell: nothing to keep, no traceback to read
        print("diffopt: stopped by Ctrl-C", file=sys.stderr)
        return INTERRUPTED_STATUS
    parser.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
