"""One side of the compile-cache round trip (tests/test_compile_cache.py runs it in two fresh processes).

    python tests/_compile_cache_roundtrip.py save CACHE_DIR   # compile cold, call, save the artifacts
    python tests/_compile_cache_roundtrip.py load CACHE_DIR   # load the artifacts, then compile and call

Prints one JSON line: the cache result, inductor's cache counters, the output, and timings (for the record only).
Each side must run with its own empty TORCHINDUCTOR_CACHE_DIR, so that only the saved artifacts can make B warm.
"""
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conftest import tiny_unet, unet_inputs  # noqa: E402

from diffopt import compile_cache  # noqa: E402

OPTIONS = {"fullgraph": True}


def main(role, directory):
    directory = compile_cache.resolve_directory(directory)
    unet = tiny_unet()
    key = compile_cache.artifact_key(unet, OPTIONS, torch.device("cpu"), torch.float32)
    started = time.perf_counter()
    loaded = compile_cache.load(directory, key, "cpu") if role == "load" else None
    load_s = time.perf_counter() - started
    compiled = torch.compile(unet, **OPTIONS)
    started = time.perf_counter()
    with torch.no_grad():
        output = compiled(**unet_inputs(unet)).sample
    first_call_s = time.perf_counter() - started
    saved = compile_cache.save(directory, key, "cpu")
    counters = torch._dynamo.utils.counters
    print(json.dumps(dict(
        key=key, load=loaded and loaded.__dict__, save=saved.__dict__, load_s=load_s, first_call_s=first_call_s,
        inductor=dict(counters["inductor"]), aot_autograd=dict(counters["aot_autograd"]),
        output=output.flatten().tolist(),
    ), default=str))


if __name__ == "__main__":
    main(*sys.argv[1:3])
