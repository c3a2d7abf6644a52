"""``diffopt bench``: command-line options, their validation, and the run that writes the results.

Every list option is checked before anything is built, and a bad value is named with the choices::

    $ diffopt bench --pipelines sd-txt2img,sd3
    diffopt bench: error: argument --pipelines: unknown pipeline 'sd3'; choose from: sd-txt2img, ...
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable

from diffopt.bench.pipelines import PIPELINES, STAGES, TINY_STEPS, check_stages
from diffopt.bench.recipes import resolve, split_specs
from diffopt.bench.runner import DEFAULTS, DTYPES, BenchSettings, run_benchmark
from diffopt.paths import why_not_writable

#: The exit status of a run ended by Ctrl-C, as a shell reports it (128 + SIGINT).
INTERRUPTED_STATUS = 130

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


def _image_side(text: str) -> int:
    value = _positive_int(text)
    if value % 8:  # every pipeline's VAE or UNet halves the image three times
        raise argparse.ArgumentTypeError(f"expected a multiple of 8, got {text!r}")
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


_STAGE_CHOICES = "; ".join(f"{name}: {','.join(labels)}" for name, labels in STAGES.items())


def _default(key: str) -> str:
    """``"default: 1,4 on CUDA, 1 on CPU"``, from :data:`DEFAULTS`, so that --help never drifts from the code."""

    def shown(value):
        return ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)

    cuda, cpu = shown(DEFAULTS["cuda"][key]), shown(DEFAULTS["cpu"][key])
    return f"default: {cuda} on CUDA, {cpu} on CPU"


def add_arguments(parser: argparse.ArgumentParser) -> None:  # fmt: skip
    parser.add_argument("--pipelines", type=_pipelines, default=None,
                        help=f"comma-separated, or 'all': {','.join(PIPELINES)} ({_default('pipelines')})")
    parser.add_argument("--batch-sizes", type=_comma_list(_positive_int), default=None,
                        help=f"comma-separated ({_default('batch_sizes')})")
    parser.add_argument("--recipes", type=_recipes, default=None,
                        help="comma-separated recipe specs: classic, sdpa, diffusers-compile (the docs page's "
                             "torch.compile recipe), compile, diffopt, diffopt:key=value,... "
                             f"or a preset ({_default('recipes')})")
    parser.add_argument("--steps", type=_positive_int, default=None,
                        help="denoising steps of every stage (default: SD 50, SDXL 30, IF 100/50/75, SD3 and "
                             f"Flux dev 28, Flux schnell 4; tiny: {TINY_STEPS})")
    parser.add_argument("--height", type=_image_side, default=None, help="image height (IF: of stage I)")
    parser.add_argument("--width", type=_image_side, default=None, help="image width (default: --height)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help=_default("dtype"))
    parser.add_argument("--device", type=_device, default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--size", choices=["full", "tiny"], default=None,
                        help=f"model configs: public sizes, or tiny ones for CPU and CI ({_default('size')})")
    parser.add_argument("--weights", type=_directory, default=None,
                        help="load pipelines with from_pretrained from DIR (or DIR/<pipeline>/) instead of "
                             "building random weights")
    parser.add_argument("--warmup", type=_positive_int, default=None,
                        help="warm calls per stage, the first of which is reported as 'first call' "
                             f"({_default('warmup')})")
    parser.add_argument("--repeats", type=_positive_int, default=None,
                        help="timed calls per stage, three times over: to latents (steps/s uses their median), "
                             "to PIL images (end-to-end seconds), and to PIL images with the decode and "
                             f"post-processing timed apart ({_default('repeats')})")
    parser.add_argument("--stages", type=_comma_list(str), default=None,
                        help=f"time only these stages of a multi-stage pipeline ({_STAGE_CHOICES}; default: all)")
    parser.add_argument("--warm-start", action="store_true", default=False,
                        help="after each cell of a compiling recipe, apply the recipe again in a new process with "
                             "empty inductor and triton caches and the diffopt compile cache (DIFFOPT_CACHE_DIR) "
                             "that cell filled, and report its time to the first image next to the cold one; each "
                             "cell's caches are temporary directories (default: off)")
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"output directory (default: {DEFAULT_OUT})")


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
        warm_start=getattr(args, "warm_start", False),
    )


def check(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """What argparse cannot check option by option: a CUDA device that is not there, and --stages against the
    pipelines (the default ones depend on the device). Exits with status 2 and the reason, before anything is
    built."""
    import torch

    if args.device and args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("argument --device: cuda, but torch.cuda.is_available() is False on this machine")
    try:
        check_stages(settings_from(args).resolved().pipelines, args.stages)
    except ValueError as error:
        parser.error(f"argument --stages: {error}")
    # Checked before the run, which may take hours, rather than when its files are written.
    problem = why_not_writable(args.out)
    if problem:
        parser.error(f"argument --out: cannot write results under {args.out!r}: {problem}")


def run(args: argparse.Namespace, argv: list[str]) -> int:
    """Run the benchmark, print the tables, write the files. Exit status 1 if no cell succeeded; 130 if Ctrl-C
    stopped the run (the cells it finished are printed and written all the same)."""
    from diffopt.bench.output import RichProgress

    progress = RichProgress()
    try:
        result = run_benchmark(settings_from(args), progress=progress, argv=argv)
    finally:
        progress.stop()
    status = _report(result, args.out)
    if result.interrupted:
        print(f"diffopt bench: stopped by Ctrl-C ({result.interrupted}); the results above are the cells it "
              "finished", file=sys.stderr)
        return INTERRUPTED_STATUS
    return status


def _report(result, out_dir: str) -> int:
    from diffopt.bench.output import print_tables, write_outputs

    print_tables(result)
    for kind, path in write_outputs(result, out_dir).items():
        if path:
            print(f"{kind}: {path}")
    return 0 if any(cell.ok for cell in result.cells) else 1
