"""Time to the first image: the compile caches a cell runs with, the warm start in a new process, break-even.

A compiled recipe's first call pays for compilation; whether that is worth it depends on how many images follow.
Three things here:

* :func:`isolated_caches`: the cell of a compiling recipe runs with its own, empty, inductor and triton cache
  directories and diffopt compile cache (``DIFFOPT_CACHE_DIR``), so that its first call is cold on every run and
  the user's own caches are neither used nor filled;
* :func:`warm_first_call`: with ``--warm-start``, the same recipe applied again in a new process
  (``python -m diffopt.bench._first_call``) with new empty inductor and triton caches, as on a new machine or in a
  new container, and the diffopt compile cache the cold cell filled: what a user's second process pays;
* :func:`break_even_images`: after how many images the recipe's total time is below eager sdpa's.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import subprocess
import sys
from typing import Iterable, Iterator, Optional

from diffopt.bench.measure import CellResult, CellSettings
from diffopt.bench.recipes import REFERENCE

#: The environment variables that point torch's and diffopt's compile caches somewhere.
CACHE_VARIABLES = ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR", "DIFFOPT_CACHE_DIR")


def cache_environment(root: str, process: str) -> dict[str, str]:
    """The cache directories of one process of a cell: its own inductor and triton caches under ``root``
    (``process`` names them: "cold", "warm"), and the diffopt compile cache every process of the cell shares."""
    return {
        "TORCHINDUCTOR_CACHE_DIR": os.path.join(root, f"inductor-{process}"),
        "TRITON_CACHE_DIR": os.path.join(root, f"triton-{process}"),
        "DIFFOPT_CACHE_DIR": os.path.join(root, "diffopt"),
    }


@contextlib.contextmanager
def isolated_caches(root: str) -> Iterator[dict[str, str]]:
    """Point this process's compile caches at empty directories under ``root`` for the ``with`` block, then put
    back what was there. torch reads ``TORCHINDUCTOR_CACHE_DIR`` each time it compiles, diffopt reads
    ``DIFFOPT_CACHE_DIR`` in ``optimize``, so setting them between cells is enough."""
    saved = {name: os.environ.get(name) for name in CACHE_VARIABLES}
    variables = cache_environment(root, "cold")
    os.environ.update(variables)
    try:
        yield variables
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def warm_first_call(
    pipeline: str, batch_size: int, recipe: str, settings: CellSettings, root: str, timeout_s: Optional[float] = None
) -> dict:
    """Run ``python -m diffopt.bench._first_call`` on one cell, with the warm caches of ``root``.

    Returns its JSON line as a dict (``build_s``, ``optimize_s``, ``first_call_s``: one per stage, ``labels``)
    or ``{"error": "..."}``; never raises, except on Ctrl-C.
    """
    request = {
        "pipeline": pipeline,
        "batch_size": batch_size,
        "recipe": recipe,
        "size": settings.size,
        "device": str(settings.device),
        "dtype": str(settings.dtype).replace("torch.", ""),
        "steps": settings.steps,
        "height": settings.height,
        "width": settings.width,
        "weights": settings.weights,
        "stages": settings.stages,
    }
    environment = {**os.environ, **cache_environment(root, "warm")}
    # The child imports this diffopt, wherever it was imported from (a checkout on PYTHONPATH included).
    package_parent = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [package_parent, environment.get("PYTHONPATH")]))
    command = [sys.executable, "-m", "diffopt.bench._first_call", json.dumps(request)]
    try:
        done = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"error": f"warm start took more than {timeout_s:.0f} s"}
    for line in reversed(done.stdout.splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                break
    lines = (done.stderr or done.stdout).strip().splitlines()
    return {"error": f"warm start exited with status {done.returncode}: {lines[-1] if lines else 'no output'}"[:400]}


def record_warm(cell: CellResult, result: dict) -> None:
    """Copy a :func:`warm_first_call` result into ``cell``."""
    if "error" in result:
        cell.warm_error = result["error"]
        return
    cell.warm_optimize_s = result["optimize_s"]
    for stage, seconds in zip(cell.stages, result["first_call_s"]):
        stage.warm_first_call_s = seconds


def break_even_images(
    optimize_s: float,
    first_call_s: float,
    steady_s: float,
    reference_first_call_s: float,
    reference_steady_s: float,
    batch_size: int = 1,
) -> Optional[int]:
    """The number of images after which a recipe has cost less time than the eager reference, or None if never.

    With ``c`` calls of ``batch_size`` images each, the recipe has taken
    ``T(c) = optimize_s + first_call_s + (c - 1) * steady_s`` and the reference (eager sdpa, which applies nothing)
    ``R(c) = reference_first_call_s + (c - 1) * reference_steady_s``, steady seconds being per call (the median
    of the timed calls; at batch 1, per image). The answer is ``c * batch_size`` for the smallest ``c >= 1`` with
    ``T(c) < R(c)``: with ``D = optimize_s + first_call_s - reference_first_call_s``, ``c = 1`` if ``D < 0``,
    else ``c = floor(D / (reference_steady_s - steady_s)) + 2`` when the recipe is faster per call, and never
    (None) when it is not.

    Example:
        >>> break_even_images(0.0, 60.0, 1.0, 5.0, 2.0)  # 55 s behind, 1 s per image gained: the 57th image
        57
        >>> break_even_images(0.0, 60.0, 2.0, 5.0, 2.0) is None
        True
    """
    behind = optimize_s + first_call_s - reference_first_call_s
    if behind < 0:
        return batch_size
    gain = reference_steady_s - steady_s
    if gain <= 0:
        return None
    return (math.floor(behind / gain) + 2) * batch_size


def _seconds(cell: Optional[CellResult], field: str) -> Optional[float]:
    """A stage field summed over the cell's stages; None for a failed cell or a missing value."""
    if cell is None or not cell.ok or not cell.stages:
        return None
    values = [getattr(stage, field) for stage in cell.stages]
    return None if any(value is None for value in values) else sum(values)


def add_break_even(cells: Iterable[CellResult]) -> None:
    """Set ``break_even_images`` (and, after a warm start, ``warm_break_even_images``) of every successful cell
    against the eager :data:`~diffopt.bench.recipes.REFERENCE` cell of its pipeline and batch size. The warm one
    puts the warm start's optimize time and first calls in place of the cold ones; the reference keeps its own
    (eager has nothing to load). The reference cell itself, and cells without one, get None."""
    cells = list(cells)
    references = {(c.pipeline, c.batch_size): c for c in cells if c.recipe == REFERENCE}
    for cell in cells:
        reference = references.get((cell.pipeline, cell.batch_size))
        cell.break_even_images = cell.warm_break_even_images = None
        if reference is None or reference is cell or cell.recipe == REFERENCE:
            continue
        reference_first, reference_steady = _seconds(reference, "first_call_s"), _seconds(reference, "median_s")
        steady = _seconds(cell, "median_s")
        if reference_first is None or reference_steady is None or steady is None:
            continue
        batch = cell.batch_size
        first = _seconds(cell, "first_call_s")
        cell.break_even_images = break_even_images(
            cell.optimize_s or 0.0, first, steady, reference_first, reference_steady, batch
        )
        warm_first = _seconds(cell, "warm_first_call_s")
        if warm_first is not None and cell.warm_optimize_s is not None:
            cell.warm_break_even_images = break_even_images(
                cell.warm_optimize_s, warm_first, steady, reference_first, reference_steady, batch
            )
