"""Join the results.json of several ``diffopt bench`` runs into one results directory.

A long benchmark on a machine with a time limit per command is split into runs that each fit: one per
pipeline, batch size or (DeepFloyd IF) ``--stages`` subset. This script joins them into the tables one run
would have written::

    python benchmarks/merge_runs.py --out bench-out/all bench-out/if-I bench-out/if-II,III bench-out/sdxl

Each argument is a results directory or a results.json file. A later run's cell replaces an earlier one's,
except that a cell Ctrl-C interrupted never replaces a finished one, and cells of other IF stages are joined
(see :func:`merge_runs`).
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import asdict, replace
from typing import Optional

from diffopt.bench.measure import CellResult, Reference
from diffopt.bench.output import print_tables, write_outputs
from diffopt.bench.pipelines import STAGES
from diffopt.bench.runner import BenchRun, BenchSettings, load_run


def merge_runs(runs: list[BenchRun]) -> BenchRun:
    """One run from several (a long benchmark split into commands that each fit a time limit).

    Pipelines, batch sizes and recipes are the union in first-seen order; a cell measured twice keeps its
    last measurement, unless that one was interrupted and an earlier one finished. Two finished cells of other
    stages of one pipeline (``--stages I`` and ``--stages II`` runs) become one cell with both, as do their
    references; so does a cell interrupted after stage I with a later ``--stages II,III`` run that resumes it.
    Overlapping stages are not joined: the later cell wins whole. Join runs of one machine and one set of
    settings: the merged settings are the first run's (each stage keeps its own step count). The environment is
    the first run's, with the others' GPUs listed if they differ.
    """
    first = runs[0]
    cells: dict[tuple, CellResult] = {}
    references: dict[tuple, Reference] = {}
    for run in runs:
        for cell in run.cells:
            key = (cell.pipeline, cell.batch_size, cell.recipe)
            cells[key] = _merged_cell(cells.get(key), cell)
        for reference in run.references:
            key = (reference.pipeline, reference.batch_size)
            references[key] = _merged_reference(references.get(key), reference)
    settings = BenchSettings(**asdict(first.settings))
    settings.pipelines = _union(run.settings.pipelines for run in runs)
    settings.batch_sizes = sorted(_union(run.settings.batch_sizes for run in runs))
    settings.recipes = _union(run.settings.recipes for run in runs)
    # None (all stages) wins over any subset.
    subsets = [run.settings.stages for run in runs]
    settings.stages = None if None in subsets else _union(subsets)
    environment = dict(first.environment)
    gpus = _union([run.environment.get("gpu")] for run in runs)
    if len(gpus) > 1:
        environment["gpu"] = " + ".join(str(gpu) for gpu in gpus)  # numbers from different cards: say so
    environment["merged_from"] = [run.environment.get("argv") for run in runs]
    return BenchRun(
        settings,
        environment,
        first.matmul_peak_flops,
        list(references.values()),
        list(cells.values()),
        sum(run.wall_s for run in runs),
    )


def _merged_cell(earlier: Optional[CellResult], later: CellResult) -> CellResult:
    if earlier is None:
        return later
    if later.ok and _other_stages(earlier, later) and (earlier.ok or _resumes(earlier, later)):
        return _joined_cell(earlier, later)
    return earlier if later.status == "interrupted" and earlier.ok else later


def _merged_reference(earlier: Optional[Reference], later: Reference) -> Reference:
    if earlier is None or earlier.error:
        return later
    held, new = ({stage.label for stage in ref.stages} for ref in (earlier, later))
    if later.error or new <= held:
        return earlier  # a failed reference never replaces a good one; one of stages already held adds nothing
    if _other_stages(earlier, later):
        return replace(earlier, stages=_in_stage_order(later.pipeline, earlier.stages + later.stages))
    return later


def _other_stages(earlier, later) -> bool:
    """Whether two results of one multi-stage pipeline hold different stages, none of them twice."""
    first, second = ([stage.label for stage in result.stages] for result in (earlier, later))
    return bool(first) and bool(second) and all(first + second) and not set(first) & set(second)


def _resumes(interrupted: CellResult, later: CellResult) -> bool:
    """Whether ``later`` times exactly the stages after the last one ``interrupted`` finished."""
    order = list(STAGES.get(interrupted.pipeline, ()))
    if interrupted.status != "interrupted" or not interrupted.stages or interrupted.stages[-1].label not in order:
        return False
    after = order[order.index(interrupted.stages[-1].label) + 1:]
    return [stage.label for stage in later.stages] == after


def _in_stage_order(pipeline: str, stages: list) -> list:
    order = STAGES.get(pipeline, ())
    return sorted(stages, key=lambda stage: order.index(stage.label) if stage.label in order else len(order))


def _joined_cell(earlier: CellResult, later: CellResult) -> CellResult:
    """One cell from two runs of other stages: each ran in its own process, so the peak is the larger one."""
    peaks = [cell.peak_memory_bytes for cell in (earlier, later) if cell.peak_memory_bytes is not None]
    builds = [cell.build_s for cell in (earlier, later) if cell.build_s is not None]
    return replace(
        earlier,
        status="ok",  # both finished, or the later one finished what the interrupted one began
        error=None,
        traceback=None,
        build_s=max(builds) if builds else None,
        peak_memory_bytes=max(peaks) if peaks else None,
        notes=_union([earlier.notes, later.notes]),
        stages=_in_stage_order(earlier.pipeline, earlier.stages + later.stages),
    )


def _union(lists) -> list:
    return list(dict.fromkeys(item for items in lists for item in items))


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", metavar="RUN", help="a results directory or results.json file")
    parser.add_argument("--out", required=True, help="directory for the merged results.json, results.md, speedup.png")
    args = parser.parse_args(argv)
    try:
        runs = [load_run(path) for path in args.runs]
    except (OSError, ValueError, KeyError) as error:
        parser.error(f"cannot read a run: {error}")
    merged = merge_runs(runs)
    print_tables(merged)
    for kind, path in write_outputs(merged, args.out).items():
        if path:
            print(f"{kind}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
