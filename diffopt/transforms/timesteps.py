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

import functools
import inspect

import torch

from . import Change, set_instance_attr


def takes_device(scheduler) -> bool:
    """Whether ``scheduler.set_timesteps`` accepts a ``device`` argument (every diffusers scheduler does)."""
    set_timesteps = getattr(scheduler, "set_timesteps", None)
    if not callable(set_timesteps):
        return False
    try:
        return "device" in inspect.signature(set_timesteps).parameters
    except (TypeError, ValueError):  # a builtin or C callable without a signature
        return False


def apply_cpu_timesteps(scheduler) -> Change:
    """Make ``scheduler.set_timesteps`` put its timesteps on the CPU whatever device the pipeline asks for.
    An instance attribute; the undo removes it."""
    set_timesteps = scheduler.set_timesteps
    signature = inspect.signature(set_timesteps)

    # functools.wraps keeps the signature: retrieve_timesteps asks set_timesteps which arguments it accepts.
    @functools.wraps(set_timesteps)
    def set_timesteps_on_cpu(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.arguments["device"] = "cpu"
        return set_timesteps(*bound.args, **bound.kwargs)

    undo = set_instance_attr(scheduler, "set_timesteps", set_timesteps_on_cpu)
    detail = f"{type(scheduler).__name__} keeps its timesteps on the CPU: reading them never waits for the GPU"
    return Change(detail, undo)


def scalars_to_device(args: tuple, kwargs: dict, device: torch.device):
    """``args`` and ``kwargs`` with every 0-d CPU tensor (the timestep) made on ``device`` by a fill kernel
    from its host value, which queues behind the GPU's work instead of waiting for it."""

    def move(value):
        if isinstance(value, torch.Tensor) and value.dim() == 0 and value.device.type == "cpu":
            return torch.full((), value.item(), dtype=value.dtype, device=device)
        return value

    return tuple(move(a) for a in args), {k: move(v) for k, v in kwargs.items()}
