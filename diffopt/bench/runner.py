"""The whole benchmark: every pipeline x batch size x recipe, with its references, as one :class:`BenchRun`.

Example:
    >>> from diffopt.bench.runner import BenchSettings, run_benchmark
    >>> run = run_benchmark(BenchSettings(pipelines=["sd-txt2img"], recipes=["classic", "sdpa"], device="cpu",
    ...                                   size="tiny", steps=1, warmup=1, repeats=1))
    >>> [(cell.recipe, cell.status) for cell in run.cells]
    [('classic', 'ok'), ('sdpa', 'ok')]
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Callable, Optional

import torch

from diffopt.bench.env import environment, matmul_peak_flops
from diffopt.bench.measure import (
    CellResult,
    CellSettings,
    Interrupted,
    Reference,
    StageReference,
    StageResult,
    add_mfu,
    measure_cell,
    probe,
)
from diffopt.bench.pipelines import SEED_PIPELINES, STAGES, check_stages
from diffopt.bench.recipes import resolve

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}

# Off CUDA, compile recipes would spend minutes in inductor for a tiny model, so the default stays eager.
DEFAULT_RECIPES = {"cuda": ["sdpa", "seed", "diffopt"], "cpu": ["classic", "sdpa", "diffopt-nocompile"]}


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass
class BenchSettings:
    """What to run. ``None`` fields take the device's defaults (see :meth:`resolved`)."""

    pipelines: list[str] = field(default_factory=lambda: list(SEED_PIPELINES))
    batch_sizes: Optional[list[int]] = None
    recipes: Optional[list[str]] = None
    device: Optional[str] = None
    size: Optional[str] = None
    dtype: Optional[str] = None
    steps: Optional[int] = None
    height: Optional[int] = None
    width: Optional[int] = None
    weights: Optional[str] = None
    warmup: Optional[int] = None
    repeats: Optional[int] = None
    #: Only these stages of multi-stage pipelines (IF); None: all of them.
    stages: Optional[list[str]] = None

    def resolved(self) -> "BenchSettings":
        """A copy with the defaults filled in: on CUDA the seed's setup (full size, fp16, batch 1 and 4,
        3 warm + 3 timed calls), elsewhere a quick tiny float32 run."""
        device = self.device or default_device()
        cuda = torch.device(device).type == "cuda"
        return BenchSettings(
            pipelines=list(self.pipelines),
            batch_sizes=self.batch_sizes or ([1, 4] if cuda else [1]),
            recipes=self.recipes or list(DEFAULT_RECIPES["cuda" if cuda else "cpu"]),
            device=device,
            size=self.size or ("full" if cuda else "tiny"),
            dtype=self.dtype or ("fp16" if cuda else "fp32"),
            steps=self.steps,
            height=self.height,
            width=self.width,
            weights=self.weights,
            warmup=self.warmup if self.warmup is not None else (3 if cuda else 2),
            repeats=self.repeats if self.repeats is not None else (7 if cuda else 2),
            stages=self.stages,
        )


@dataclass
class BenchRun:
    settings: BenchSettings
    environment: dict
    matmul_peak_flops: Optional[float]
    references: list[Reference]
    cells: list[CellResult]
    wall_s: float = 0.0
    #: Why the run ended before its last cell (see :class:`Interrupted`), else None.
    interrupted: Optional[str] = None

    def to_json(self) -> dict:
        """Everything measured, as plain data; reference outputs (tensors) are left out."""
        references = []
        for reference in self.references:
            data = asdict(reference)
            for stage in data["stages"]:
                stage.pop("output", None)
                stage.pop("image", None)
            references.append(data)
        return {
            "settings": asdict(self.settings),
            "environment": self.environment,
            "matmul_peak_flops": self.matmul_peak_flops,
            "wall_s": self.wall_s,
            "interrupted": self.interrupted,
            "references": references,
            "cells": [asdict(cell) for cell in self.cells],
        }


class NullProgress:
    """The progress interface run_benchmark reports to; output.py draws it."""

    def start(self, total: int) -> None: ...

    def begin(self, description: str) -> None: ...

    def end(self) -> None: ...


def run_benchmark(
    settings: BenchSettings,
    progress=None,
    argv: Optional[list[str]] = None,
    checkpoint: Optional[Callable[[BenchRun], None]] = None,
) -> BenchRun:
    """Run every cell of ``settings``; failures are recorded in their cells. Recipes are checked first.

    ``checkpoint(run)`` is called after every cell with the results so far, so that a run killed by a time
    limit still leaves the cells it finished (the CLI rewrites results.json each time). An :class:`Interrupted`
    raised inside a cell ends the run after that cell, whose finished stages are kept (an IF cell stopped in
    stage III still has stages I and II); raised in an eager reference, it ends the run with the cells so far.
    """
    settings = settings.resolved()
    recipes = [resolve(spec) for spec in settings.recipes]  # fail before an hour of work, not during it
    check_stages(settings.pipelines, settings.stages)
    progress = progress or NullProgress()
    device = torch.device(settings.device)
    cell_settings = CellSettings(
        size=settings.size,
        device=device,
        dtype=DTYPES[settings.dtype],
        steps=settings.steps,
        height=settings.height,
        width=settings.width,
        weights=settings.weights,
        warmup=settings.warmup,
        repeats=settings.repeats,
        stages=settings.stages,
    )
    start = time.perf_counter()
    run = BenchRun(settings, environment(device, argv), matmul_peak_flops(device, cell_settings.dtype), [], [])
    progress.start(len(settings.pipelines) * (1 + len(settings.batch_sizes) * len(recipes)))
    where = "before the first cell"
    try:
        for pipeline in settings.pipelines:
            where = f"the eager reference of {pipeline}"
            progress.begin(f"{pipeline}: eager reference")
            references = probe(pipeline, settings.batch_sizes, cell_settings)
            run.references.extend(references)
            progress.end()
            where = f"between cells of {pipeline}"
            for reference in references:
                for recipe in recipes:
                    progress.begin(f"{pipeline} batch {reference.batch_size}: {recipe.name}")
                    cell = measure_cell(pipeline, reference.batch_size, recipe, cell_settings, reference)
                    if not recipe.caches:  # a cached step does a fraction of the counted FLOPs: MFU would overstate
                        add_mfu(cell, run.matmul_peak_flops)
                    run.cells.append(cell)
                    run.wall_s = time.perf_counter() - start
                    if cell.status == "interrupted":
                        run.interrupted = f"{cell.error}, batch {cell.batch_size} of {pipeline}, recipe {recipe.name}"
                    if checkpoint is not None:
                        checkpoint(run)
                    progress.end()
                    if run.interrupted:
                        return run
    except Interrupted as error:  # outside a cell: nothing of it to keep
        run.interrupted = f"interrupted ({error}) in {where}"
        if checkpoint is not None:
            checkpoint(run)
    run.wall_s = time.perf_counter() - start
    return run


def load_run(path: str) -> BenchRun:
    """Read a results.json (or the directory holding one) back into a BenchRun, reference outputs excepted."""
    if os.path.isdir(path):
        path = os.path.join(path, "results.json")
    with open(path) as handle:
        data = json.load(handle)
    cells = [
        CellResult(**{**cell, "stages": [StageResult(**stage) for stage in cell["stages"]]})
        for cell in data["cells"]
    ]
    references = [
        Reference(**{**ref, "stages": [StageReference(**stage) for stage in ref["stages"]]})
        for ref in data["references"]
    ]
    return BenchRun(
        BenchSettings(**data["settings"]),
        data["environment"],
        data["matmul_peak_flops"],
        references,
        cells,
        data.get("wall_s", 0.0),
        data.get("interrupted"),
    )


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
