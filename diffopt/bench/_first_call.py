"""``python -m diffopt.bench._first_call '<json>'``: one cell's build, recipe and first call, in a process of its own.

What ``diffopt bench --warm-start`` runs (:func:`diffopt.bench.first_image.warm_first_call`) after a cell, with the
compile caches that cell's environment names. The argument is a JSON object: ``pipeline``, ``batch_size``,
``recipe`` (a spec), and the cell settings ``size``, ``device``, ``dtype`` ("float16"...), ``steps``, ``height``,
``width``, ``weights``, ``stages``. Prints one JSON line on stdout::

    {"build_s": 2.1, "optimize_s": 0.4, "first_call_s": [16.2], "labels": [""]}
"""
from __future__ import annotations

import json
import sys
import time


def main(argv: list[str]) -> int:
    import torch

    from diffopt.bench.env import sync
    from diffopt.bench.measure import CellSettings, _batch, _timed
    from diffopt.bench.recipes import resolve

    request = json.loads(argv[0])
    device = torch.device(request["device"])
    settings = CellSettings(
        size=request["size"],
        device=device,
        dtype=getattr(torch, request["dtype"]),
        steps=request.get("steps"),
        height=request.get("height"),
        width=request.get("width"),
        weights=request.get("weights"),
        stages=request.get("stages"),
    )
    recipe = resolve(request["recipe"])
    start = time.perf_counter()
    case = settings.build(request["pipeline"])
    build_s = time.perf_counter() - start
    # The bench's cold cell runs after the eager reference, which already paid for the device's libraries
    # (cuBLAS handles, CUDA context): pay for them here too, before the clock, so that the two compare.
    probe = torch.ones(64, 64, device=device, dtype=settings.dtype)
    (probe @ probe).sum().item()
    sync(device)
    start = time.perf_counter()
    for stage in case.stages:
        recipe.apply(stage.pipe)
    sync(device)
    optimize_s = time.perf_counter() - start
    first_call_s = [
        _timed(stage, _batch(stage, request["batch_size"]), stage.timed_output, device)[0] for stage in case.stages
    ]
    result = {
        "build_s": build_s,
        "optimize_s": optimize_s,
        "first_call_s": first_call_s,
        "labels": [stage.label for stage in case.stages],
    }
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
