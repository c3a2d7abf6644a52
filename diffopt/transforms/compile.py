"""torch.compile of a module, in place.

``nn.Module.compile`` keeps the module object (``pipe.unet is unet`` stays true, ``save_pretrained``
writes clean keys, ``isinstance`` checks in pipelines keep working); undo removes the compiled call so
the next call runs eager code again.
"""
from __future__ import annotations

import itertools
import types
import weakref
from typing import Any, Callable, Dict, Optional

import torch

from . import Change, set_instance_attr
from .timesteps import scalars_to_device

_ATTR = "_compiled_call_impl"
#: Modes whose compiled graphs replay as CUDA graphs (their outputs live in a pool the next replay reuses).
CUDA_GRAPH_MODES = ("reduce-overhead",)
#: Dynamo's recompile limit while a module compiled by diffopt runs (see apply_compile).
RECOMPILE_LIMIT = 64

_SERIAL = itertools.count()
# The entry of each module compiled so far (see own_entry), for as long as the module lives.
_ENTRIES: "weakref.WeakKeyDictionary[torch.nn.Module, Callable]" = weakref.WeakKeyDictionary()


def uses_cuda_graphs(options: Dict[str, Any]) -> bool:
    """Whether torch.compile ``options`` replay CUDA graphs: by mode, or by inductor's own option."""
    return options.get("mode") in CUDA_GRAPH_MODES or bool((options.get("options") or {}).get("triton.cudagraphs"))


def own_entry(module: torch.nn.Module) -> Callable:
    """``entry(module, *args, **kwargs)`` runs ``module._call_impl``, under a code object of the module's own: what
    diffopt compiles.

    Dynamo keeps its automatic-dynamic-shape state per traced code object (by file, line and name), so modules
    compiled through one shared entry (``nn.Module._call_impl``, which torch.compile also wraps in one shared
    ``inner``) looked like one model changing shape: DeepFloyd IF's stage II (6 channels, 256 px, after stage I's
    3 and 64) was traced with symbolic sizes and had not compiled after 200 s on an H200, where a static compile
    took 70 s. With an entry each, every model's first graph is static and torch's rules apply to it alone: its
    second batch size, or a new LoRA weight, recompiles once and then stays dynamic. The entry is defined here,
    outside torch's files, so dynamo starts at it instead of wrapping it; it takes the module as an argument
    rather than holding it, and is kept per module, so that optimize after restore finds the graphs compiled
    before (dynamo caches them on the code object).
    """
    entry = _ENTRIES.get(module)
    if entry is None:

        def call_module(module, *args, **kwargs):
            return module._call_impl(*args, **kwargs)

        code = call_module.__code__.replace(co_name=f"call_{type(module).__name__}_{next(_SERIAL)}")
        entry = _ENTRIES[module] = types.FunctionType(code, call_module.__globals__, code.co_name)
    return entry


def is_compiled(module: torch.nn.Module) -> bool:
    """Compiled by anyone: in place, or wrapped by ``torch.compile(module)``."""
    return getattr(module, _ATTR, None) is not None or hasattr(module, "_orig_mod")


def default_options(device: torch.device) -> Dict[str, Any]:
    """fullgraph everywhere (a graph break in a denoiser is a bug we want to hear about); CUDA graphs
    ("reduce-overhead") on CUDA, where per-kernel launch overhead dominates small batches; plain inductor
    elsewhere, where CUDA graphs do not exist."""
    if device.type == "cuda":
        return {"mode": "reduce-overhead", "fullgraph": True}
    return {"fullgraph": True}


def describe(options: Dict[str, Any]) -> str:
    return "torch.compile(" + ", ".join(f"{k}={v!r}" for k, v in options.items()) + ")"


def mark_batch_dynamic(args, kwargs) -> None:
    """Mark dim 0 of every tensor argument whose dim 0 is the batch (the first tensor's) as dynamic, one level
    into dicts, lists and tuples (SDXL's added_cond_kwargs, ControlNet residuals). "maybe": a size that must
    stay static (0 or 1) is specialized instead of raising."""
    values = []
    for value in list(args) + list(kwargs.values()):
        if isinstance(value, dict):
            values += value.values()
        elif isinstance(value, (list, tuple)):
            values += value
        else:
            values.append(value)
    tensors = [v for v in values if isinstance(v, torch.Tensor) and v.dim() > 0]
    if not tensors:
        return
    batch = tensors[0].shape[0]
    for tensor in tensors:
        if tensor.shape[0] == batch:
            torch._dynamo.maybe_mark_dynamic(tensor, 0)


def apply_compile(
    module: torch.nn.Module,
    options: Dict[str, Any],
    new_step: bool = False,
    dynamic_batch: bool = False,
    scalars_to: Optional[torch.device] = None,
) -> Optional[Change]:
    """Compile ``module`` in place with ``options``; undo returns it to eager execution.

    The extras run before each call, outside the compiled code:
    ``new_step`` calls ``torch.compiler.cudagraph_mark_step_begin()``, for the module that starts a denoising
    step (a ControlNet), so the CUDA graphs of one step never read outputs owned by the previous step's replays;
    ``dynamic_batch`` marks the inputs' batch dimension dynamic (see :func:`mark_batch_dynamic`);
    ``scalars_to`` moves 0-d CPU tensors (timesteps kept on the CPU, see transforms/timesteps.py) to that device.
    """
    # What nn.Module.compile does (through an entry of this module's own), kept in hand so the call below can run
    # around it.
    compiled_entry = torch.compile(own_entry(module), **options)
    dynamo_config = torch._dynamo.config
    limit_name = "recompile_limit" if hasattr(dynamo_config, "recompile_limit") else "cache_size_limit"  # < 2.6

    def call(*args, **kwargs):
        if scalars_to is not None:
            args, kwargs = scalars_to_device(args, kwargs, scalars_to)
        if new_step:
            torch.compiler.cudagraph_mark_step_begin()
        if dynamic_batch:
            mark_batch_dynamic(args, kwargs)
        # Dynamo's recompile limit (8 variants per code object) ends in a hard error under fullgraph=True. Our
        # entry is per model, so it counts one model's variants: shapes, and every LoRA load, fuse or unfuse, which
        # a notebook trying adapters runs through quickly. Raise it for our calls only.
        limit = getattr(dynamo_config, limit_name)
        setattr(dynamo_config, limit_name, max(limit, RECOMPILE_LIMIT))
        try:
            return compiled_entry(module, *args, **kwargs)
        finally:
            setattr(dynamo_config, limit_name, limit)

    undo = set_instance_attr(module, _ATTR, call)
    detail = describe(options) + "".join(
        [
            ", dynamic batch" if dynamic_batch else "",
            ", new CUDA-graph step per call" if new_step else "",
            f", CPU timesteps made on {scalars_to}" if scalars_to is not None else "",
        ]
    )
    return Change(detail, undo)
