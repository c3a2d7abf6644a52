"""``diffopt bench``: command-line options, their validation, and the run that writes the results.

Every list option is checked before anything is built, and a bad value is named with the choices::

    $ diffopt bench --pipelines sd-txt2img,sd3
    diffopt bench: error: argument --pipelines: unknown pipeline 'sd3'; choose from: sd-txt2img, ...
"""
from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import threading
from typing import Callable

from diffopt.bench.pipelines import PIPELINES, SEED_PIPELINES, STAGES, check_stages
from diffopt.bench.recipes import resolve, split_specs
from diffopt.bench.runner import DEFAULT_RECIPES, DTYPES, BenchSettings, load_run, merge_runs, run_benchmark

DEFAULT_OUT = "bench-out"


def _comma_list(convert: Callable[[str], object]) -> Callable[[str], list]:
    def parse(text: str) -> list:
        items = [item.strip() for item in text.split(",") if item.strip()]
        if not items:
            raise argparse.ArgumentTypeError("expected a comma-separated list, got an empty value")
        return [convert(item) for item in items]

    return parse


def _pipeline(name: str) -> str:
    if name not in PIPELINES:
        raise argparse.ArgumentTypeError(f"unknown pipeline {name!r}; choose from: {', '.join(PIPELINES)}")
    return name


def _pipelines(text: str) -> list[str]:
    return list(PIPELINES) if text.strip() == "all" else _comma_list(_pipeline)(text)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _recipes(text: str) -> list[str]:
    specs = split_specs(text)
    if not specs:
        raise argparse.ArgumentTypeError("expected a comma-separated list of recipes, got an empty value")
    for spec in specs:
        try:
            resolve(spec)
        except (ValueError, TypeError) as error:  # TypeError: a cache setting of the wrong type
            raise argparse.ArgumentTypeError(str(error)) from None
    return specs


def _device(text: str) -> str:
    if text.split(":")[0] not in ("cuda", "cpu"):
        raise argparse.ArgumentTypeError(f"device must be cuda, cuda:N or cpu, got {text!r}")
    return text


def _directory(text: str) -> str:
    if not os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"weights directory {text!r} does not exist")
    return text


def _results(text: str) -> str:
    path = os.path.join(text, "results.json") if os.path.isdir(text) else text
    if not os.path.isfile(path):
        raise argparse.ArgumentTypeError(f"no results.json at {text!r}")
    return path


_STAGE_CHOICES = "; ".join(f"{name}: {','.join(labels)}" for name, labels in STAGES.items())


def add_arguments(parser: argparse.ArgumentParser) -> None:  # fmt: skip
    parser.add_argument("--pipelines", type=_pipelines, default=list(SEED_PIPELINES),
                        help=f"comma-separated, or 'all': {','.join(PIPELINES)} "
                             f"(default: the seed page's {','.join(SEED_PIPELINES)})")
    parser.add_argument("--batch-sizes", type=_comma_list(_positive_int), default=None,
                        help="comma-separated (default: 1,4 on CUDA, 1 on CPU)")
    parser.add_argument("--recipes", type=_recipes, default=None,
                        help="comma-separated recipe specs: classic, sdpa, seed, compile, diffopt, "
                             "diffopt:key=value,... "
                             f"or a preset (default: {','.join(DEFAULT_RECIPES['cuda'])} on CUDA, "
                             f"{','.join(DEFAULT_RECIPES['cpu'])} on CPU)")
    parser.add_argument("--steps", type=_positive_int, default=None,
                        help="denoising steps of every stage (default: SD 50, SDXL 30, IF 100/50/75, SD3 and "
                             "Flux dev 28, Flux schnell 4; tiny: 3)")
    parser.add_argument("--height", type=_positive_int, default=None, help="image height (IF: of stage I)")
    parser.add_argument("--width", type=_positive_int, default=None, help="image width (default: --height)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: fp16 on CUDA, fp32 on CPU")
    parser.add_argument("--device", type=_device, default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--size", choices=["full", "tiny"], default=None,
                        help="model configs: public sizes, or tiny ones for CPU and CI (default: full on CUDA)")
    parser.add_argument("--weights", type=_directory, default=None,
                        help="load pipelines with from_pretrained from DIR (or DIR/<pipeline>/) instead of "
                             "building random weights")
    parser.add_argument("--warmup", type=_positive_int, default=None,
                        help="warm calls per stage, the first of which is reported as 'first call' "
                             "(default: 3 on CUDA)")
    parser.add_argument("--repeats", type=_positive_int, default=None,
                        help="timed calls per stage; steps/s uses their median (default: 3 on CUDA)")
    parser.add_argument("--stages", type=_comma_list(str), default=None,
                        help=f"only these stages of a multi-stage pipeline ({_STAGE_CHOICES}; default: all); "
                             "--merge joins runs of other stages into one row")
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"output directory (default: {DEFAULT_OUT})")
    parser.add_argument("--merge", nargs="+", type=_results, metavar="DIR",
                        help="run nothing: merge the results.json of earlier runs (DIR or file) into --out")


def settings_from(args: argparse.Namespace) -> BenchSettings:
    return BenchSettings(
        pipelines=args.pipelines,
        batch_sizes=args.batch_sizes,
        recipes=args.recipes,
        device=args.device,
        size=args.size,
        dtype=args.dtype,
        steps=args.steps,
        height=args.height,
        width=args.width,
        weights=args.weights,
        warmup=args.warmup,
        repeats=args.repeats,
        stages=args.stages,
    )


#: The exit status of a run stopped by SIGTERM, as `timeout` reports one it stopped.
INTERRUPTED_STATUS = 124


def run(args: argparse.Namespace, argv: list[str]) -> int:
    """Run the benchmark, print the tables, write the files. Exit status 1 if no cell succeeded, 124 if SIGTERM
    stopped the run (its finished cells and stages are written all the same)."""
    import torch

    from diffopt.bench.output import RichProgress, write_json

    if args.merge and args.stages:
        raise SystemExit("diffopt bench: error: --stages picks what a run times; --merge runs nothing (leave one out)")
    if args.merge:
        result = merge_runs([load_run(path) for path in args.merge])
        return _report(result, args.out)
    settings = settings_from(args)
    if settings.device and settings.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("diffopt bench: error: --device cuda, but torch.cuda.is_available() is False")
    try:
        check_stages(settings.pipelines, settings.stages)
    except ValueError as error:
        raise SystemExit(f"diffopt bench: error: --stages: {error}") from None
    progress = RichProgress()
    try:
        # results.json after every cell: a run cut by a time limit keeps what it measured (see --merge).
        save = lambda partial: write_json(partial, args.out)  # noqa: E731
        with _sigterm_interrupts():
            result = run_benchmark(settings, progress=progress, argv=argv, checkpoint=save)
    finally:
        progress.stop()
    status = _report(result, args.out)
    if result.interrupted:
        print(f"diffopt bench: stopped: {result.interrupted}; the results above are what it finished", file=sys.stderr)
        return INTERRUPTED_STATUS
    return status


@contextlib.contextmanager
def _sigterm_interrupts():
    """While the run lasts, SIGTERM (what `timeout` and job schedulers send) raises Interrupted, once: the run
    records the stages the current cell finished, ends, and writes its tables and files. A second SIGTERM while
    that happens is ignored rather than lose the cell. Signal handlers belong to the main thread, so a run started
    from another thread keeps the default (the process ends, the cells written so far stay in results.json)."""
    from diffopt.bench.measure import Interrupted

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    raised = []

    def interrupt(signum, frame):
        if not raised:
            raised.append(signum)
            raise Interrupted(signal.Signals(signum).name)

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        # None: a handler installed outside Python, which cannot be put back; the default is the next best.
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def _report(result, out_dir: str) -> int:
    from diffopt.bench.output import print_tables, write_outputs

    print_tables(result)
    for kind, path in write_outputs(result, out_dir).items():
        if path:
            print(f"{kind}: {path}")
    return 0 if any(cell.ok for cell in result.cells) else 1
