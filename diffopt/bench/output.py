"""What a benchmark run writes: console tables, results.md, results.json, speedup.png, first_image.png, and the
progress bar.

After the speed tables, an end-to-end table per batch size: a row per pipeline and recipe with the seconds of a
call from ``pipe(...)`` to PIL images, images/s, where the call goes (denoising loop, VAE decode, post-processing)
and the end-to-end speed-up over eager sdpa and over the docs page's compile recipe, where the run has them. Then a
time-to-first-image table per batch size: a row per pipeline and recipe with the recipe's
optimize time, cold first call, their sum, the first call at the next batch size, the steady seconds per call and
the break-even image count against eager sdpa (with ``--warm-start``, the same from a new process).

The tables look like those of the diffusers 'PyTorch 2.0' docs page: one per batch size, a row per pipeline, a column per recipe, steps/s
in the cells (one per stage for IF, whose row label names the stages) or what went wrong ("OOM after warmup"). rich and
matplotlib are optional (``pip install diffopt[bench]``): without rich the tables print as markdown, without
matplotlib the chart is skipped with a message.

Example:
    >>> from diffopt.bench.output import write_outputs
    >>> paths = write_outputs(run, "bench-out")   # doctest: +SKIP
"""
from __future__ import annotations

import json
import os
import sys
from typing import Optional

from diffopt.bench.first_image import add_break_even
from diffopt.bench.measure import CellResult
from diffopt.bench.pipelines import LABELS, STAGES
from diffopt.bench.recipes import REFERENCE, resolve
from diffopt.bench.runner import BenchRun


def format_cell(cell: Optional[CellResult]) -> str:
    """steps/s of each stage, in the order the row label names them ("59.97 / 15.30 / 27.57" for IF), or the failure
    as the docs page writes it."""
    if cell is None:
        return "-"
    measured = " / ".join(f"{stage.steps_per_s:.2f}" for stage in cell.stages)
    if cell.ok:
        return measured
    reason = cell.error or cell.status
    # An IF cell can fail in stage III after stages I and II were measured: keep those numbers.
    return f"{measured} / {reason}" if measured else reason


def _summed_seconds(
    cell: Optional[CellResult], labels: Optional[list[str]] = None, field: str = "median_s"
) -> Optional[float]:
    """A seconds ``field`` of the stages, summed; None for a failed cell, one of other stages than ``labels``, or
    a stage without the field (results written before it was measured)."""
    if cell is None or not cell.ok or not cell.stages:
        return None
    if labels is not None and [stage.label for stage in cell.stages] != labels:
        return None  # IF stage II alone against all three stages would be no speed-up at all
    values = [getattr(stage, field) for stage in cell.stages]
    return None if any(value is None for value in values) else sum(values)


#: What the chart compares with, in order of preference: eager SDPA, else the docs page's compile recipe (a run
#: that times only compiled recipes), else plain torch.compile.
CHART_BASELINES = (REFERENCE, "diffusers-compile", "compile")


def speedups(
    run: BenchRun, baseline: str = REFERENCE, field: str = "median_s"
) -> dict[tuple[str, int], dict[str, float]]:
    """Speed-up of each recipe over ``baseline`` per (pipeline, batch size): ratio of the summed median seconds
    of the stages' timed calls (for one-stage pipelines, the ratio of steps/s); ``field="end_to_end_s"``: of their
    calls to PIL images."""
    result: dict[tuple[str, int], dict[str, float]] = {}
    for (pipeline, batch_size), cells in _grid(run).items():
        reference = _summed_seconds(cells.get(baseline), field=field)
        if reference is None:
            continue
        labels = [stage.label for stage in cells[baseline].stages]
        result[(pipeline, batch_size)] = {
            recipe: reference / seconds
            for recipe, cell in cells.items()
            if (seconds := _summed_seconds(cell, labels, field))
        }
    return result


def _grid(run: BenchRun) -> dict[tuple[str, int], dict[str, CellResult]]:
    grid: dict[tuple[str, int], dict[str, CellResult]] = {}
    for cell in run.cells:
        grid.setdefault((cell.pipeline, cell.batch_size), {})[cell.recipe] = cell
    return grid


def _recipes(run: BenchRun) -> list[str]:
    return list(dict.fromkeys(cell.recipe for cell in run.cells))


def _title(run: BenchRun, batch_size: int) -> str:
    where = run.environment.get("gpu") or run.environment.get("device", "?")
    return f"{where} (batch size: {batch_size}), steps/s"


def table_rows(run: BenchRun, batch_size: int) -> list[list[str]]:
    grid, recipes = _grid(run), _recipes(run)
    rows = []
    for pipeline in run.settings.pipelines:
        cells = grid.get((pipeline, batch_size), {})
        rows.append([_row_label(run, pipeline, batch_size)] + [format_cell(cells.get(recipe)) for recipe in recipes])
    return rows


def _row_label(run: BenchRun, pipeline: str, batch_size: int) -> str:
    """The docs page's row label; a multi-stage pipeline's also names its stages in the order of the numbers in its
    cells: "IF (stages I / II / III)", "IF (stage II)". The stages are those the eager reference ran for this row
    (merged runs may differ by batch size), else those the settings picked."""
    label, every = LABELS.get(pipeline, pipeline), STAGES.get(pipeline, ())
    if not every:
        return label
    timed = [stage.label for ref in run.references
             if (ref.pipeline, ref.batch_size) == (pipeline, batch_size) and not ref.error for stage in ref.stages]
    picked = [stage for stage in every if stage in (timed or run.settings.stages or every)]
    return f"{label} (stage{'s' if len(picked) > 1 else ''} {' / '.join(picked)})"


def has_quality(run: BenchRun) -> bool:
    """Quality tables are for runs with a recipe that changes the image by design (step caching, quantization)."""
    lossy = False
    for spec in run.settings.recipes or []:
        try:
            lossy = lossy or resolve(spec).changes_output
        except (ValueError, TypeError):  # a recipe registered only while that run was made
            continue
    return lossy and any(stage.psnr_db is not None for cell in run.cells for stage in cell.stages)


def quality_note(run: BenchRun) -> str:
    """What the quality numbers compare, and how far to trust them."""
    where = f"the weights in {run.settings.weights}" if run.settings.weights else "random weights"
    note = (
        f"Against eager {REFERENCE}, same seed, on {where}: speed-up, then PSNR (dB; inf = identical) and SSIM "
        "of the decoded image, then the relative L2 of the latents."
    )
    if not run.settings.weights:
        note += (
            " Quality on random weights is only indicative: a trained model's features change between steps "
            "differently, so measure step caching on a real checkpoint (--weights) before trusting a setting."
        )
    return note


def format_quality(cell: Optional[CellResult], speedup: Optional[float]) -> str:
    """``1.85x, 31.2 dB, 0.951, 2.1e-02`` (per stage, joined by " / ", for IF), or "-"."""
    if cell is None or not cell.ok or not cell.stages:
        return "-"
    stages = [
        ", ".join([_number(stage.psnr_db, "{:.1f} dB"), _number(stage.ssim, "{:.3f}"), _number(stage.relative_l2, "{:.1e}")])
        for stage in cell.stages
    ]
    return (f"{speedup:.2f}x, " if speedup else "") + " / ".join(stages)


def quality_rows(run: BenchRun, batch_size: int) -> list[list[str]]:
    grid, recipes, ups = _grid(run), _recipes(run), speedups(run)
    rows = []
    for pipeline in run.settings.pipelines:
        cells, factors = grid.get((pipeline, batch_size), {}), ups.get((pipeline, batch_size), {})
        qualities = [format_quality(cells.get(recipe), factors.get(recipe)) for recipe in recipes]
        rows.append([_row_label(run, pipeline, batch_size)] + qualities)
    return rows


#: The recipes the end-to-end table gives a speed-up against, those of them the run has: eager SDPA, and the docs
#: page's compile recipe.
END_TO_END_BASELINES = (REFERENCE, "diffusers-compile")

END_TO_END_NOTE = (
    "A call from `pipe(...)` to PIL images, median of the timed calls; IF: per stage, each stage's own call "
    "(I / II / III). Split, medians of separate calls: decode = `vae.decode` (none in IF stages I and II), "
    "post-processing = tensor to PIL images (IF I and II: `numpy_to_pil`), loop = the rest of the call (denoising "
    "loop, input and latent preparation, scheduler and host work; SDXL's and the x4 upscaler's fp16 VAE casts to "
    "float32 and back). "
    "Speed-up: the baseline's end-to-end seconds (summed over the stages) over the recipe's."
)

OLD_END_TO_END_NOTE = (
    " Some of these results were written before the calls to PIL images were repeated: they have no loop, decode "
    "or post-processing, and their end-to-end s is a single call, the first to decode."
)


def end_to_end_note(run: BenchRun) -> str:
    """What the end-to-end table shows; results written before the calls to PIL images were repeated are said to
    hold a single one (the first, which may include the VAE's first run)."""
    single = any(stage.end_to_end_s is not None and stage.end_to_end_times_s is None
                 for cell in run.cells for stage in cell.stages)  # fmt: skip
    return END_TO_END_NOTE + (OLD_END_TO_END_NOTE if single else "")


def end_to_end_baselines(run: BenchRun) -> list[str]:
    recipes = _recipes(run)
    return [baseline for baseline in END_TO_END_BASELINES if baseline in recipes]


def end_to_end_header(run: BenchRun) -> list[str]:
    header = ["Pipeline", "Recipe", "end-to-end s", "images/s", "loop s", "decode s", "post-processing s"]
    return header + [f"speed-up vs {baseline}" for baseline in end_to_end_baselines(run)]


def _per_stage(cell: CellResult, field: str, pattern: str = "{:.3f}") -> str:
    """A stage field of each stage, joined by " / " (one number for one-stage pipelines); "-" where missing."""
    return " / ".join(_number(getattr(stage, field), pattern) for stage in cell.stages)


def _images_per_s(cell: CellResult) -> str:
    return " / ".join(_number(stage.end_to_end_s and stage.batch_size / stage.end_to_end_s, "{:.2f}")
                      for stage in cell.stages)  # fmt: skip


def _cells(run: BenchRun, batch_size: int):
    """``(row label, recipe, cell)`` for every cell of ``batch_size``, pipelines in run order, recipes in table order:
    the rows of the per-recipe tables (end to end, time to first image)."""
    grid, recipes = _grid(run), _recipes(run)
    for pipeline in run.settings.pipelines:
        cells = grid.get((pipeline, batch_size), {})
        for recipe in recipes:
            if recipe in cells:
                yield _row_label(run, pipeline, batch_size), recipe, cells[recipe]


def _failed_row(label: str, recipe: str, width: int, cell: CellResult) -> list[str]:
    """A row of ``width`` columns for a cell that has no numbers: dashes, then its error."""
    return [label, recipe] + ["-"] * (width - 3) + [cell.error or cell.status]


def end_to_end_rows(run: BenchRun, batch_size: int) -> list[list[str]]:
    """A row per pipeline and recipe: seconds of a call to PIL images, images per second (the stage's batch over
    those seconds), the call's split into loop, decode and post-processing, then the end-to-end speed-up over
    each baseline of the same pipeline and batch size ("-": that baseline did not finish, ran other stages, or
    its results have no end-to-end seconds). A failed cell's error follows its last number."""
    baselines = end_to_end_baselines(run)
    ups = {baseline: speedups(run, baseline, field="end_to_end_s") for baseline in baselines}
    rows = []
    for label, recipe, cell in _cells(run, batch_size):
        if not cell.stages:
            rows.append(_failed_row(label, recipe, len(end_to_end_header(run)), cell))
            continue
        factors = [ups[baseline].get((cell.pipeline, batch_size), {}).get(recipe) for baseline in baselines]
        row = [label, recipe, _per_stage(cell, "end_to_end_s"), _images_per_s(cell), _per_stage(cell, "loop_s"),
               _per_stage(cell, "decode_s"), _per_stage(cell, "postprocess_s")]  # fmt: skip
        row += [_number(factor, "{:.2f}x") for factor in factors]
        if not cell.ok:
            row[-1] = f"{row[-1]} ({cell.error or cell.status})"
        rows.append(row)
    return rows


def _end_to_end_title(batch_size: int) -> str:
    return f"End to end (batch size: {batch_size}), seconds per call to PIL images"


def has_warm_start(run: BenchRun) -> bool:
    return bool(getattr(run.settings, "warm_start", False)) or any(
        cell.warm_optimize_s is not None or cell.warm_error for cell in run.cells
    )


def first_image_header(run: BenchRun) -> list[str]:
    """The time-to-first-image table's columns; the warm ones only for a --warm-start run."""
    header = ["Pipeline", "Recipe", "optimize s", "first call s", "to first image s", "new batch first call s",
              "steady s/call", f"break-even images vs {REFERENCE}"]  # fmt: skip
    if has_warm_start(run):
        header += ["warm optimize s", "warm first call s", "warm to first image s", "warm break-even images"]
    return header


def _stage_sum(cell: CellResult, field: str) -> Optional[float]:
    values = [getattr(stage, field) for stage in cell.stages]
    return sum(values) if values and all(value is not None for value in values) else None


def _break_even(value: Optional[int]) -> str:
    return "-" if value is None else str(value)


def first_image_rows(run: BenchRun, batch_size: int) -> list[list[str]]:
    """A row per pipeline and recipe: the recipe's time (optimize), its cold first call (summed over the stages),
    the time to the first image (:func:`time_to_first_image`), the first call at the run's next batch size on the
    same pipeline, the steady seconds per call (median), and after how many images it has cost less than eager
    sdpa ("-": never, or no sdpa cell); with --warm-start, the same in a new process that loaded the saved compile."""
    warm = has_warm_start(run)
    rows = []
    for label, recipe, cell in _cells(run, batch_size):
        if not cell.ok and not cell.stages:
            rows.append(_failed_row(label, recipe, len(first_image_header(run)), cell))
            continue
        first = _stage_sum(cell, "first_call_s")
        to_image = time_to_first_image(cell)
        # IF's upscalers always run at batch 1: the stages that met a new shape are those that count.
        new = [stage for stage in cell.stages if stage.new_shape_first_call_s is not None]
        new_shape_text = "-"
        if new:
            seconds = sum(stage.new_shape_first_call_s for stage in new)
            new_shape_text = f"{seconds:.2f} (batch {new[0].new_shape_batch_size})"
        row = [label, recipe, _number(cell.optimize_s, "{:.2f}"), _number(first, "{:.2f}"),
               _number(to_image, "{:.2f}"), new_shape_text, _number(_stage_sum(cell, "median_s"), "{:.3f}"),
               _break_even(cell.break_even_images)]  # fmt: skip
        if warm:
            warm_first = _stage_sum(cell, "warm_first_call_s")
            warm_to_image = time_to_first_image(cell, warm=True)
            if cell.warm_error:
                row += ["-", "-", cell.warm_error, "-"]
            else:
                row += [_number(cell.warm_optimize_s, "{:.2f}"), _number(warm_first, "{:.2f}"),
                        _number(warm_to_image, "{:.2f}"), _break_even(cell.warm_break_even_images)]  # fmt: skip
        if not cell.ok:
            row[-1] = f"{row[-1]} ({cell.error or cell.status})"
        rows.append(row)
    return rows


def _first_image_title(run: BenchRun, batch_size: int) -> str:
    return f"Time to first image (batch size: {batch_size}), seconds"


def to_markdown(run: BenchRun) -> str:
    """results.md: the speed tables, the quality tables (when a recipe caches), every number of every cell, then
    the environment."""
    recipes = _recipes(run)
    lines = ["# diffopt bench results", ""]
    for batch_size in run.settings.batch_sizes:
        lines += [f"## {_title(run, batch_size)}", ""]
        lines += [_md_row(["Pipeline"] + recipes), _md_row([":-:"] * (1 + len(recipes)))]
        lines += [_md_row(row) for row in table_rows(run, batch_size)] + [""]
    lines += _end_to_end_markdown(run)
    if has_quality(run):
        for batch_size in run.settings.batch_sizes:
            lines += [f"## Quality (batch size: {batch_size}): speed-up, PSNR, SSIM, latent rel. L2", ""]
            lines += [quality_note(run), ""]
            lines += [_md_row(["Pipeline"] + recipes), _md_row([":-:"] * (1 + len(recipes)))]
            lines += [_md_row(row) for row in quality_rows(run, batch_size)] + [""]
    header = first_image_header(run)
    for batch_size in run.settings.batch_sizes:
        lines += [f"## {_first_image_title(run, batch_size)}", ""]
        lines += [_md_row(header), _md_row([":-:"] * len(header))]
        lines += [_md_row(row) for row in first_image_rows(run, batch_size)] + [""]
    lines += ["## Details", "", _md_row(_DETAIL_HEADER), _md_row(["---"] * len(_DETAIL_HEADER))]
    lines += [_md_row(row) for row in _detail_rows(run)]
    lines += ["", "## Environment", ""]
    lines += [f"- {key}: {value}" for key, value in sorted(run.environment.items()) if key != "argv"]
    lines += [
        f"- command: `{' '.join(run.environment.get('argv', []))}`",
        f"- matmul peak: {_tflops(run.matmul_peak_flops)} TFLOP/s",
        f"- wall time: {run.wall_s:.0f} s",
        "",
    ]
    return "\n".join(lines)


def _end_to_end_markdown(run: BenchRun) -> list[str]:
    header, lines = end_to_end_header(run), []
    for batch_size in run.settings.batch_sizes:
        lines += [f"## {_end_to_end_title(batch_size)}", "", end_to_end_note(run), ""]
        lines += [_md_row(header), _md_row([":-:"] * len(header))]
        lines += [_md_row(row) for row in end_to_end_rows(run, batch_size)] + [""]
    return lines


_DETAIL_HEADER = [
    "pipeline", "batch", "recipe", "stage", "steps", "steps/s", "optimize s", "first call s",
    "new-shape first call s", "warm first call s", "end-to-end s", "first decode call s",
    "peak GiB", "GFLOP/step", "MFU", "rel. L2 vs sdpa", "PSNR dB vs sdpa", "SSIM vs sdpa", "status",
]  # fmt: skip


def _detail_rows(run: BenchRun) -> list[list[str]]:
    rows = []
    for cell in run.cells:
        status = cell.error or cell.status
        peak = f"{cell.peak_memory_bytes / 2**30:.2f}" if cell.peak_memory_bytes else "-"
        if not cell.stages:
            rows.append([cell.pipeline, str(cell.batch_size), cell.recipe] + ["-"] * (len(_DETAIL_HEADER) - 4) + [status])
        for stage in cell.stages:
            rows.append([
                cell.pipeline, str(stage.batch_size), cell.recipe, stage.label or "-", str(stage.steps),
                f"{stage.steps_per_s:.2f}", _number(cell.optimize_s, "{:.2f}"), f"{stage.first_call_s:.2f}",
                _new_shape(stage), _number(stage.warm_first_call_s, "{:.2f}"), _number(stage.end_to_end_s, "{:.3f}"),
                _number(stage.first_decode_call_s, "{:.3f}"), peak,
                _number(stage.flops_per_step and stage.flops_per_step / 1e9, "{:,.1f}"), _number(stage.mfu, "{:.1%}"),
                _number(stage.relative_l2, "{:.2e}"), _number(stage.psnr_db, "{:.1f}"), _number(stage.ssim, "{:.4f}"),
                status,
            ])  # fmt: skip
    return rows


def _new_shape(stage) -> str:
    if stage.new_shape_first_call_s is None:
        return "-"
    return f"{stage.new_shape_first_call_s:.2f} (batch {stage.new_shape_batch_size})"


def _number(value, pattern: str) -> str:
    return "-" if value is None else pattern.format(value)


def _tflops(flops, pattern: str = "{:.0f}") -> str:
    return "-" if not flops else pattern.format(flops / 1e12)


def _md_row(cells: list[str]) -> str:
    return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"


def print_tables(run: BenchRun, console=None) -> None:
    """The speed tables on the console: rich tables when rich is installed, markdown otherwise."""
    add_break_even(run.cells)  # as in write_outputs: cells merged from several runs
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print(to_markdown(run).split("## Details")[0], file=console or sys.stdout)
        return
    if console is None:
        console = Console()
        if not console.is_terminal:  # a log file: rich would wrap the cells at 80 columns
            console = Console(width=200)
    def print_table(title, rows):
        table = Table(title=title)
        table.add_column("Pipeline")
        for recipe in _recipes(run):
            table.add_column(recipe, justify="center")
        for row in rows:
            table.add_row(*row)
        console.print(table)

    def print_row_table(title, header, rows):
        table = Table(title=title)
        for column in header:
            table.add_column(column, justify="left" if column in ("Pipeline", "Recipe") else "center")
        for row in rows:
            table.add_row(*row)
        console.print(table)

    for batch_size in run.settings.batch_sizes:
        print_table(_title(run, batch_size), table_rows(run, batch_size))
    for batch_size in run.settings.batch_sizes:
        print_row_table(_end_to_end_title(batch_size), end_to_end_header(run), end_to_end_rows(run, batch_size))
    console.print(end_to_end_note(run))
    for batch_size in run.settings.batch_sizes:
        print_row_table(_first_image_title(run, batch_size), first_image_header(run), first_image_rows(run, batch_size))
    if has_quality(run):
        for batch_size in run.settings.batch_sizes:
            title = f"Quality (batch size: {batch_size}): speed-up, PSNR, SSIM, latent rel. L2"
            print_table(title, quality_rows(run, batch_size))
        console.print(quality_note(run))


def write_json(run: BenchRun, out_dir: str) -> str:
    """results.json, written to a temporary name first so that a killed run never leaves half a file."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "results.json")
    with open(path + ".tmp", "w") as handle:
        json.dump(run.to_json(), handle, indent=2, default=str)
    os.replace(path + ".tmp", path)
    return path


def write_outputs(run: BenchRun, out_dir: str) -> dict[str, Optional[str]]:
    """Write results.json, results.md and speedup.png into ``out_dir``; returns the paths (None if skipped)."""
    add_break_even(run.cells)  # a merged run (benchmarks/merge_runs.py) may pair cells with another run's sdpa
    paths: dict[str, Optional[str]] = {"json": write_json(run, out_dir)}
    paths["markdown"] = os.path.join(out_dir, "results.md")
    with open(paths["markdown"], "w") as handle:
        handle.write(to_markdown(run))
    paths["chart"] = plot_speedups(run, os.path.join(out_dir, "speedup.png"))
    paths["first image chart"] = plot_first_image(run, os.path.join(out_dir, "first_image.png"))
    return paths


def time_to_first_image(cell: CellResult, warm: bool = False) -> Optional[float]:
    """optimize + the stages' first calls (cold, or of the --warm-start process); None when not measured. Cold, it
    adds what the first call to PIL images took beyond a steady one (:func:`_first_decode_extra`): the first calls
    return latents, and a recipe that compiles the VAE decoder pays for that compile only when it first decodes."""
    # A cold cell without an optimize time (results from before it was recorded) counts it as 0, as break-even does.
    optimize = cell.warm_optimize_s if warm else (cell.optimize_s or 0.0)
    first = _stage_sum(cell, "warm_first_call_s" if warm else "first_call_s") if cell.stages else None
    if optimize is None or first is None:
        return None
    return optimize + first + (0.0 if warm else _first_decode_extra(cell))


def _first_decode_extra(cell: CellResult) -> float:
    """Seconds the stages' first calls to PIL images took beyond their steady calls to PIL images (the decoder's
    compile and first-run costs); a stage where either was not measured adds 0."""
    return sum(max(0.0, stage.first_decode_call_s - stage.end_to_end_s) for stage in cell.stages
               if stage.first_decode_call_s is not None and stage.end_to_end_s is not None)


def plot_first_image(run: BenchRun, path: str) -> Optional[str]:
    """Horizontal bars of the time to the first image per pipeline, batch size and recipe: cold, and in a new
    process after --warm-start. None (silently: speedup.png already says why) without matplotlib or data."""
    bars = [(f"{_row_label(run, cell.pipeline, cell.batch_size)}, batch {cell.batch_size}: {cell.recipe}",
             time_to_first_image(cell), time_to_first_image(cell, warm=True))
            for cell in run.cells if time_to_first_image(cell) is not None]  # fmt: skip
    if not bars:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    figure, axis = plt.subplots(figsize=(9, 0.5 * len(bars) + 1.5))
    positions = range(len(bars))
    has_warm = any(warm is not None for _, _, warm in bars)
    height = 0.4 if has_warm else 0.8
    axis.barh([p - height / 2 * has_warm for p in positions], [cold for _, cold, _ in bars], height,
              label="cold (this process, empty caches)")
    if has_warm:
        warm_values = [warm or 0.0 for _, _, warm in bars]
        axis.barh([p + height / 2 for p in positions], warm_values, height,
                  label="new process: empty torch caches, diffopt's saved compile (--warm-start)")
        # Below the axes, as in speedup.png: inside, it would cover the longest bars.
        axis.legend(loc="upper center", bbox_to_anchor=(0.5, -0.25), ncol=2)
    values = [v for _, cold, warm in bars for v in (cold, warm) if v]
    if values and max(values) > 100 * min(values):  # eager's tenths of a second next to a minute of compile
        axis.set_xscale("log")
    axis.set_yticks(list(positions))
    axis.set_yticklabels([label for label, _, _ in bars])
    axis.invert_yaxis()
    axis.set_xlabel("seconds from optimize to the first image (optimize + first call)")
    axis.set_title(run.environment.get("gpu") or run.environment.get("device", ""))
    figure.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(figure)
    return path


def plot_speedups(run: BenchRun, path: str) -> Optional[str]:
    """Bar chart of the speed-up over eager ``sdpa`` (else the first of :data:`CHART_BASELINES` the run has) per
    pipeline, one panel per batch size, like the docs page's figures. Returns None, with a message on stderr,
    when matplotlib or every baseline is missing."""
    baseline, data = next(((b, d) for b in CHART_BASELINES if (d := speedups(run, b))), (None, {}))
    if not data:
        names = ", ".join(repr(b) for b in CHART_BASELINES)
        print(f"speedup.png skipped: no successful cell of {names} to compare with", file=sys.stderr)
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display on a server; select before pyplot is imported
        import matplotlib.pyplot as plt
    except ImportError:
        print("speedup.png skipped: matplotlib is not installed (pip install diffopt[bench])", file=sys.stderr)
        return None
    figure = speedup_figure(run, baseline, data, plt)
    figure.savefig(path, dpi=120, bbox_inches="tight")  # "tight": the saved image grows to hold the legend
    plt.close(figure)
    return path


def speedup_figure(run: BenchRun, baseline: str, data: dict, plt):
    """The chart :func:`plot_speedups` saves: bars per pipeline and recipe, a panel per batch size, and one
    legend below the panels."""
    recipes, batch_sizes = _recipes(run), run.settings.batch_sizes
    figure, axes = plt.subplots(1, len(batch_sizes), figsize=(6 * len(batch_sizes), 4.5), squeeze=False)
    width = 0.8 / max(len(recipes), 1)
    for axis, batch_size in zip(axes[0], batch_sizes):
        pipelines = run.settings.pipelines
        for index, recipe in enumerate(recipes):
            values = [data.get((pipeline, batch_size), {}).get(recipe, 0.0) for pipeline in pipelines]
            positions = [p + (index - (len(recipes) - 1) / 2) * width for p in range(len(pipelines))]
            axis.bar(positions, values, width, label=recipe)
        axis.axhline(1.0, color="grey", linewidth=0.8)
        axis.set_xticks(range(len(pipelines)))
        axis.set_xticklabels([_row_label(run, p, batch_size) for p in pipelines], rotation=30, ha="right")
        axis.set_title(f"batch size {batch_size}")
        axis.set_ylabel(f"speed-up over {'eager ' if baseline == REFERENCE else ''}{baseline}")
    figure.suptitle(run.environment.get("gpu") or run.environment.get("device", ""))
    figure.tight_layout()
    # One legend for every panel, below them: inside an axis it would cover the bars of some pipeline.
    handles, labels = axes[0][0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=min(len(recipes), 4))
    return figure


class RichProgress:
    """A rich progress bar over the cells; prints one line per cell when rich is missing."""

    def __init__(self):
        self._bar = None
        self._task = None
        self._done = 0
        self._total = 0

    def start(self, total: int) -> None:
        self._total = total
        try:
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
        except ImportError:
            return
        columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"))
        self._bar = Progress(*columns, TimeElapsedColumn())
        self._bar.start()
        self._task = self._bar.add_task("diffopt bench", total=total)

    def begin(self, description: str) -> None:
        if self._bar is not None:
            self._bar.update(self._task, description=description)
        else:
            print(f"[{self._done + 1}/{self._total}] {description}", file=sys.stderr, flush=True)

    def end(self) -> None:
        self._done += 1
        if self._bar is not None:
            self._bar.advance(self._task)
            if self._done >= self._total:
                self._bar.stop()

    def stop(self) -> None:
        if self._bar is not None:
            self._bar.stop()
