"""The child process of a background compile (background.py): ``python -m diffopt.transforms.background_child SPEC``.

It builds the parent's model from its config on the parent's device, with the parent's dtypes and diffopt changes,
checks that what it built is the parent's model (or exits with the first difference), and compiles it with the
parent's options and settings for every input signature of the spec, in order. What it compiles goes to the
parent's compile cache entry and to torch's on-disk caches, where the parent finds it.
"""
from __future__ import annotations

import importlib
import logging
import os
import pathlib
import pickle
import sys
import time
from typing import Any, Dict, List, Optional

import torch

from .. import compile_cache
from ..api import optimize
from .background_spec import first_difference, make_call, structure
from .compile import apply_compile, name_entry


def build_copy(spec: Dict[str, Any]) -> torch.nn.Module:
    """The model of ``spec`` built from its config on its device, with its parameters' dtypes and requires_grad,
    and the diffopt changes of ``spec["model_options"]``."""
    module_name, qualname = spec["model"]
    cls = importlib.import_module(module_name)
    for part in qualname.split("."):
        cls = getattr(cls, part)
    with torch.device("meta"):
        model = cls.from_config(spec["config"])
    model = model.to_empty(device=spec["device"]).eval()
    tensors = {entry[1]: entry for entry in spec["structure"] if entry[0] == "tensor"}
    with torch.no_grad():
        for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
            entry = tensors.get(name)
            if entry is not None:
                tensor.data = tensor.data.to(getattr(torch, entry[3].replace("torch.", "")))
            tensor.data.zero_()  # to_empty leaves whatever memory held: no NaNs in the runs that compile
    for name, tensor in model.named_parameters():
        entry = tensors.get(name)
        if entry is not None:
            tensor.requires_grad_(entry[5])
    optimize(model, compile=False, compile_cache=False, **spec["model_options"])
    return model


def run_child(spec: Dict[str, Any]) -> None:
    import torch._dynamo.config
    import torch._inductor.config

    torch._inductor.config.load_config(spec["settings"]["inductor"])
    torch._dynamo.config.load_config(spec["settings"]["dynamo"])
    started = time.perf_counter()
    model = build_copy(spec)
    difference = first_difference(structure(model), spec["structure"])
    if difference:
        sys.exit(f"the model built from its config differs from the one to compile: {difference}")
    print(f"built {spec['name']} in {time.perf_counter() - started:.1f} s", flush=True)
    cache = None
    if spec["cache"] is not None:
        directory, key = spec["cache"]
        cache = compile_cache.Entry(pathlib.Path(directory), key, spec["device"])
    name_entry(model, spec["entry_name"])
    apply_compile(model, spec["options"], spec["new_step"], spec["dynamic_batch"], None, spec["name"], cache)
    for signature in spec["signatures"]:
        (grad, inference), args, kwargs = make_call(signature)
        started = time.perf_counter()
        with torch.inference_mode(inference), torch.set_grad_enabled(grad):
            model(*args, **kwargs)
        if spec["device"].startswith("cuda"):
            torch.cuda.synchronize()
        print(f"compiled for {signature[1:]!r:.200} in {time.perf_counter() - started:.1f} s", flush=True)


def main(argv: Optional[List[str]] = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    try:
        os.nice(5)  # the uncompiled calls in the parent keep their core
    except (AttributeError, OSError):
        pass
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    spec = pickle.loads(pathlib.Path(argv[0]).read_bytes())
    run_child(spec)


if __name__ == "__main__":
    main()
