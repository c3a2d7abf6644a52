"""Context-parallel for transformer denoisers: a thin path to diffusers' own ``enable_parallelism``.

diffusers (0.36 and later) splits the image tokens of some transformers (Flux, Wan, QwenImage, LTX, ...) across
ranks with ring or Ulysses attention. This module adds what diffusers leaves out: a clear error where the installed
diffusers or the model cannot do it, and an undo, which diffusers does not offer.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ._collectives import require_process_group

logger = logging.getLogger(__name__)

STATE_ATTRIBUTE = "_diffopt_context_parallel"

# What diffusers' hook registry leaves on a module after its last hook is removed.
_HOOK_LEFTOVERS = ("forward", "_diffusers_hook")


def context_parallel_unavailable(model) -> str | None:
    """Why `model` cannot be context-parallelized with the installed diffusers, or None if it can."""
    import diffusers

    version = diffusers.__version__
    try:
        from diffusers import ContextParallelConfig  # noqa: F401
        from diffusers.hooks.context_parallel import remove_context_parallel  # noqa: F401
    except ImportError:
        return f"diffusers {version} has no context parallelism (ContextParallelConfig came in 0.36)"
    if not isinstance(model, torch.nn.Module) or not hasattr(model, "enable_parallelism"):
        return f"{type(model).__name__} is not a diffusers model with enable_parallelism()"
    if getattr(model, "_cp_plan", None) is None:
        return (
            f"diffusers {version} has no context-parallel plan for {type(model).__name__}; "
            "for UNet pipelines use enable_cfg_parallel()"
        )
    return None


@dataclass
class ContextParallel:
    """What :func:`enable_context_parallel` changed. ``disable()`` (or leaving a ``with`` block) undoes it."""

    model: torch.nn.Module

    def disable(self) -> None:
        undo = vars(self.model).pop(STATE_ATTRIBUTE, None)
        if undo is not None:
            undo()

    def __enter__(self) -> "ContextParallel":
        return self

    def __exit__(self, *exc_info) -> None:
        self.disable()


def enable_context_parallel(
    pipe,
    *,
    ring_degree: int | None = None,
    ulysses_degree: int | None = None,
    mesh=None,
    component: str = "transformer",
) -> ContextParallel:
    """Split the tokens of ``pipe.transformer`` over the ranks with diffusers' context parallelism.

    Every rank calls this and then the pipeline with equal arguments and seeds. Without degrees, Ulysses attention
    spans the whole world (the head count must divide by it): it works on diffusers' default "native" attention
    backend, while ring attention needs a backend that returns the log-sum-exp (flash, cuDNN; see
    ``model.set_attention_backend``).

    Example (``torchrun --nproc-per-node 2 generate.py``)::

        torch.distributed.init_process_group()
        torch.cuda.set_device(local_rank)
        pipe = FluxPipeline.from_pretrained(..., torch_dtype=torch.bfloat16).to("cuda")
        with enable_context_parallel(pipe, ulysses_degree=2):
            image = pipe(prompt, generator=torch.Generator().manual_seed(0)).images[0]
    """
    require_process_group()
    model = getattr(pipe, component, None)
    reason = context_parallel_unavailable(model)
    if reason is not None:
        raise RuntimeError(f"context parallel is not available: {reason}")
    if STATE_ATTRIBUTE in vars(model) or getattr(model, "_parallel_config", None) is not None:
        raise RuntimeError(f"pipe.{component} is already parallelized; disable it first")
    if ring_degree is None and ulysses_degree is None and mesh is None:
        ulysses_degree = dist.get_world_size()

    from diffusers import ContextParallelConfig

    config = ContextParallelConfig(ring_degree=ring_degree, ulysses_degree=ulysses_degree, mesh=mesh)
    undo = _undo_for(model)
    try:
        model.enable_parallelism(config=config)
    except BaseException:
        # diffusers records the config on the model before it checks the attention backend.
        undo()
        raise
    setattr(model, STATE_ATTRIBUTE, undo)
    return ContextParallel(model)


def disable_context_parallel(pipe, *, component: str = "transformer") -> bool:
    """Undo :func:`enable_context_parallel`; return whether it was enabled."""
    model = getattr(pipe, component, None)
    if not isinstance(model, torch.nn.Module) or STATE_ATTRIBUTE not in vars(model):
        return False
    ContextParallel(model).disable()
    return True


def _undo_for(model: torch.nn.Module):
    """Record what enable_parallelism will touch and return the function that puts it back."""
    from diffusers.hooks.context_parallel import remove_context_parallel

    plan = model._cp_plan
    before = {module: {key: vars(module)[key] for key in _HOOK_LEFTOVERS if key in vars(module)}
              for module in model.modules()}
    processors = {
        id(processor): (processor, vars(processor).copy())
        for module in model.modules()
        if (processor := getattr(module, "processor", None)) is not None and hasattr(processor, "__dict__")
    }
    model_had_config = "_parallel_config" in vars(model)
    model_config = vars(model).get("_parallel_config")

    def undo() -> None:
        remove_context_parallel(model, plan)
        for module, saved in before.items():
            for key in _HOOK_LEFTOVERS:
                if key in saved:
                    setattr(module, key, saved[key])
                elif key in vars(module) and not getattr(vars(module).get("_diffusers_hook"), "hooks", None):
                    delattr(module, key)
        for processor, saved in processors.values():
            vars(processor).clear()
            vars(processor).update(saved)
        if model_had_config:
            model._parallel_config = model_config
        else:
            vars(model).pop("_parallel_config", None)

    return undo
