"""Keep the scheduler's timesteps on the CPU, so the denoising loop never waits for the GPU.

DDIM, PNDM and DDPM index their CPU ``alphas_cumprod`` with the current timestep and branch on it
(``if prev_timestep >= 0``). With the timesteps on the GPU, as pipelines put them, each of those reads copies
the timestep back and blocks until the GPU has finished the step's UNet: every step the GPU then idles while
the CPU does the scheduler update and launches the next CUDA-graph replay (1.6 ms of a 7.7 ms SD1.5 step on an
H200). With CPU timesteps the scheduler reads plain host values, and the CPU queues steps ahead of the GPU.

The compiled UNet and ControlNets must then receive each timestep on the GPU without a blocking copy (an
eager ``.to("cuda")`` of a CPU tensor waits for the stream; a CPU input would keep inductor off CUDA graphs):
:func:`scalars_to_device` makes it with a fill kernel from the host value, before the compiled call.
"""
from __future__ import annotations

import inspect
from typing import List, Optional

import torch

from ..components import CONTROLNET, DENOISER, execution_device, is_pipeline, is_transformer
from ..layers import Applied, InstanceHook, mark
from ..plan import Step
from ..report import SKIPPED

NAME = "cpu_timesteps"

#: Schedulers that read the current timestep on the CPU every step (``alphas_cumprod[timestep]``, ``if t > 0``),
#: and so wait for the GPU when the timesteps live there. Others (Euler, DPM-Solver, flow matching, ...) index
#: CPU sigmas by a step counter: nothing to gain, so they keep what the pipeline asks for.
WAITING_SCHEDULERS = (
    "DDIMScheduler", "DDIMParallelScheduler", "DDPMScheduler", "DDPMParallelScheduler", "PNDMScheduler",
    "LCMScheduler", "TCDScheduler",
)


def waits_every_step(scheduler) -> bool:
    """Whether ``scheduler`` is (a subclass of) one of :data:`WAITING_SCHEDULERS`, by class name, so that no
    scheduler module needs importing."""
    return any(cls.__name__ in WAITING_SCHEDULERS for cls in type(scheduler).__mro__)


def takes_device(scheduler) -> bool:
    """Whether ``scheduler.set_timesteps`` accepts a ``device`` argument (every diffusers scheduler does)."""
    set_timesteps = getattr(scheduler, "set_timesteps", None)
    if not callable(set_timesteps):
        return False
    try:
        return "device" in inspect.signature(set_timesteps).parameters
    except (TypeError, ValueError):  # a builtin or C callable without a signature
        return False


class TimestepsOnCpu(InstanceHook):
    """``scheduler.set_timesteps`` with ``device="cpu"`` whatever device the pipeline asks for. Installed on the
    instance around what was there (an earlier hook is kept, not bypassed), so a deep-copied scheduler's hook sets
    the copy's timesteps."""

    transform = NAME

    def around(self, *args, **kwargs):
        bound = inspect.signature(self.__wrapped__).bind(*args, **kwargs)
        bound.arguments["device"] = "cpu"
        return self.inner(*bound.args, **bound.kwargs)


def apply_cpu_timesteps(scheduler) -> Applied:
    since = mark()
    TimestepsOnCpu(scheduler, "set_timesteps").install()
    detail = f"{type(scheduler).__name__} keeps its timesteps on the CPU: reading them never waits for the GPU"
    return Applied(detail, since, scheduler)


#: CPU tensors up to this many elements are moved by scalars_to_device (a timestep, or one per batch item).
SMALL = 4096


def scalars_to_device(args: tuple, kwargs: dict, device: torch.device):
    """``args`` and ``kwargs`` with every small CPU tensor of at most one dimension (a timestep, ``t.expand(batch)``
    or ``t[None]`` from CPU timesteps) on ``device``, without making the CPU wait for the GPU: a fill kernel from
    the host value when all values are equal (the usual case), else an asynchronous copy from pinned memory.
    An eager ``.to(device)`` of a CPU tensor waits for the stream, and a CPU input would keep inductor off CUDA
    graphs."""

    def move(value):
        if not (isinstance(value, torch.Tensor) and value.device.type == "cpu" and value.dim() <= 1):
            return value
        if value.numel() > SMALL or value.numel() == 0:
            return value
        first = value.reshape(-1)[0]
        if value.dim() == 0 or bool((value == first).all()):
            return torch.full(value.shape, first.item(), dtype=value.dtype, device=device)
        if torch.device(device).type == "cuda":
            return value.pin_memory().to(device, non_blocking=True)
        return value.to(device)

    return tuple(move(a) for a in args), {k: move(v) for k, v in kwargs.items()}


def decide(ctx) -> Optional[str]:
    """Whether this optimize call keeps the timesteps on the CPU: None when it does, else why not. On by default
    where it applies, so a pipeline it does not fit gets no report line (``assert not report.skipped`` stays true
    on a CPU); named, the reason is reported, and it is an error where the pipeline could run on a GPU but cannot
    take it."""
    denoiser = ctx.denoiser()
    if not ctx.config.cpu_timesteps or denoiser is None:
        return "off"
    named = ctx.config.asks_for(NAME)
    device = execution_device(denoiser.module)
    if device.type != "cuda":  # nothing waits for a GPU: a no-op, not a missing feature
        if named:
            ctx.report.add("scheduler", NAME, SKIPPED, f"{denoiser.name} runs on {device.type}; only a GPU makes the loop wait")
        return "not on a GPU"
    reason = _blocker(ctx, denoiser)
    if reason and named:
        raise ValueError(f"cpu_timesteps=True: {reason}")
    return reason


def _blocker(ctx, denoiser) -> Optional[str]:
    scheduler = getattr(ctx.target, "scheduler", None)
    if not is_pipeline(ctx.target) or not takes_device(scheduler):
        return f"needs a pipeline whose scheduler.set_timesteps takes a device, got {type(ctx.target).__name__}"
    kind = type(denoiser.module).__name__
    if is_transformer(denoiser.module):
        # They pass t.expand(batch), not one scalar, and flow-match schedulers index by step, not by timestep.
        return f"{kind} takes a batch of timesteps; only UNet pipelines are covered"
    if not any("UNet" in cls.__name__ for cls in type(denoiser.module).__mro__):
        return f"{kind} is not a UNet; only UNet pipelines are covered"
    if not waits_every_step(scheduler):
        return (f"{type(scheduler).__name__} does not read its timesteps every step, so there is no wait to remove "
                f"(covered: {', '.join(WAITING_SCHEDULERS)})")  # fmt: skip
    for component in ctx.components:
        if component.role in (DENOISER, CONTROLNET) and ctx.compile_options.get(component.name) is None:
            # Eager code would copy each CPU timestep to the GPU with a blocking copy: the wait this removes.
            return f"{component.name} is not compiled by diffopt, so it would copy each timestep with a blocking copy"
    return None


def plan(ctx) -> List[Step]:
    if not ctx.timesteps_on_cpu:
        return []
    scheduler = ctx.target.scheduler
    return [Step("scheduler", NAME, lambda: apply_cpu_timesteps(scheduler))]
