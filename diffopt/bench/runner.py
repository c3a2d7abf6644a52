"""The whole benchmark: every pipeline x batch size x recipe, with its references, as one :class:`BenchRun`.

Example:
    >>> from diffopt.bench.runner import BenchSettings, run_benchmark
    >>> run = run_benchmark(BenchSettings(pipelines=["sd-txt2img"], recipes=["classic", "sdpa"], device="cpu",
    ...                                   size="tiny", steps=1, warmup=1, repeats=1))
    >>> [(cell.recipe, cell.status) for cell in run.cells]
    [('classic', 'ok'), ('sdpa', 'ok')]
"""
from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Optional

import torch

from diffopt.bench.env import environment, matmul_peak_flops
from diffopt.bench.first_image import add_break_even, isolated_caches, record_warm, warm_first_call
from diffopt.bench.measure import (
    CellResult,
    CellSettings,
    Reference,
    StageReference,
    StageResult,
    add_mfu,
    measure_cell,
    probe,
)
from diffopt.bench.pipelines import DOCS_PIPELINES, check_stages
from diffopt.bench.recipes import resolve

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}

#: What a run does unless told otherwise, by device type. On CUDA: the docs page's setup (its six pipelines at
#: full size, fp16, batch 1 and 4). On a CPU: one tiny float32 pipeline, so that the three recipes worth comparing
#: (eager, the docs page's compile recipe, diffopt) finish in minutes; inductor compiles each compiled recipe once.
DEFAULTS = {
    "cuda": dict(pipelines=list(DOCS_PIPELINES), batch_sizes=[1, 4], recipes=["sdpa", "diffusers-compile", "diffopt"],
                 size="full", dtype="fp16", warmup=3, repeats=7),
    "cpu": dict(pipelines=["sd-txt2img"], batch_sizes=[1], recipes=["sdpa", "diffusers-compile", "diffopt"],
                size="tiny", dtype="fp32", warmup=2, repeats=3),
}  # fmt: skip


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass
class BenchSettings:
    """What to run. ``None`` fields take the device's defaults (see :meth:`resolved`)."""

    pipelines: Optional[list[str]] = None
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
    #: After each cell of a compiling recipe, apply the recipe again in a new process with empty inductor and
    #: triton caches and the diffopt compile cache the cell filled, and time its first call.
    warm_start: bool = False

    def resolved(self) -> "BenchSettings":
        """A copy with the :data:`DEFAULTS` of its device type filled in (CUDA's on CUDA, the CPU's elsewhere)."""
        device = self.device or default_device()
        defaults = DEFAULTS["cuda" if torch.device(device).type == "cuda" else "cpu"]
        filled = {key: value if value is not None else copy.copy(defaults.get(key)) for key, value in asdict(self).items()}
        filled.update(device=device, pipelines=list(filled["pipelines"]))
        return BenchSettings(**filled)


@dataclass
class BenchRun:
    settings: BenchSettings
    environment: dict
    matmul_peak_flops: Optional[float]
    references: list[Reference]
    cells: list[CellResult]
    wall_s: float = 0.0
    #: Where Ctrl-C stopped the run before its last cell, else None.
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


def run_benchmark(settings: BenchSettings, progress=None, argv: Optional[list[str]] = None) -> BenchRun:
    """Run every cell of ``settings``; failures are recorded in their cells. Recipes are checked first.

    Ctrl-C (KeyboardInterrupt) inside a cell ends the run after that cell, whose finished stages are kept (an IF
    cell stopped in stage III still has stages I and II); in an eager reference, it ends the run with the cells
    so far. Either way the run is returned, with ``interrupted`` saying where it stopped.

    Time to the first image: every cell but those of the last batch size also times one call at the next batch
    size on its optimized pipeline; cells of compiling recipes run with temporary compile caches of their own
    (:func:`diffopt.bench.first_image.isolated_caches`), and with ``warm_start`` are followed by a new process
    that loads what they saved; ``break_even_images`` is set on every cell at the end.
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
    warm = sum(recipe.compiles for recipe in recipes) if settings.warm_start else 0
    progress.start(len(settings.pipelines) * (1 + len(settings.batch_sizes) * (len(recipes) + warm)))
    where = "before the first cell"
    try:
        for pipeline in settings.pipelines:
            where = f"the eager reference of {pipeline}"
            progress.begin(f"{pipeline}: eager reference")
            references = probe(pipeline, settings.batch_sizes, cell_settings)
            run.references.extend(references)
            progress.end()
            where = f"between cells of {pipeline}"
            for index, reference in enumerate(references):
                # The next batch size's first call on this cell's pipeline: the cost of a new shape.
                following = references[index + 1].batch_size if index + 1 < len(references) else None
                for recipe in recipes:
                    progress.begin(f"{pipeline} batch {reference.batch_size}: {recipe.name}")
                    cell = _cell(pipeline, reference, recipe, cell_settings, following, settings.warm_start, progress)
                    if not recipe.caches:  # a cached step does a fraction of the counted FLOPs: MFU would overstate
                        add_mfu(cell, run.matmul_peak_flops)
                    run.cells.append(cell)
                    run.wall_s = time.perf_counter() - start
                    progress.end()
                    if cell.status == "interrupted" or cell.warm_error == WARM_INTERRUPTED:
                        run.interrupted = f"{cell.error or cell.warm_error}, batch {cell.batch_size} of {pipeline}, recipe {recipe.name}"
                        add_break_even(run.cells)
                        return run
    except KeyboardInterrupt:  # outside a cell: nothing of it to keep
        run.interrupted = f"interrupted in {where}"
    add_break_even(run.cells)
    run.wall_s = time.perf_counter() - start
    return run


WARM_INTERRUPTED = "interrupted in the warm start"


def _cell(pipeline, reference, recipe, cell_settings, following, warm_start, progress) -> CellResult:
    """One cell; a compiling recipe's with compile caches of its own (a cold first call, the user's caches left
    alone) and, with ``warm_start``, then again in a new process that loads what the cell's compile saved."""
    if not recipe.compiles:
        return measure_cell(pipeline, reference.batch_size, recipe, cell_settings, reference, following)
    root = tempfile.mkdtemp(prefix="diffopt-bench-")
    try:
        with isolated_caches(root):
            cell = measure_cell(pipeline, reference.batch_size, recipe, cell_settings, reference, following)
        if warm_start:
            progress.end()
            progress.begin(f"{pipeline} batch {reference.batch_size}: {recipe.name}, warm start in a new process")
            if cell.ok:
                try:
                    warm = warm_first_call(pipeline, reference.batch_size, recipe.name, cell_settings, root)
                except KeyboardInterrupt:  # the cold cell is complete: keep it, and end the run after it
                    warm = {"error": WARM_INTERRUPTED}
                record_warm(cell, warm)
            else:
                cell.warm_error = "no warm start: the cold cell failed"
        return cell
    finally:
        shutil.rmtree(root, ignore_errors=True)


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
