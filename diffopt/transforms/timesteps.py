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
import types

import torch

from . import Change, current_function, set_instance_attr

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


def apply_cpu_timesteps(scheduler) -> Change:
    """Make ``scheduler.set_timesteps`` put its timesteps on the CPU whatever device the pipeline asks for.
    An instance attribute; the undo removes it.

    It is a method bound to the scheduler around :func:`current_function`, not a closure over this scheduler's
    bound method, so ``copy.deepcopy(scheduler)`` gives a copy whose hook sets the copy's timesteps."""
    function = current_function(scheduler, "set_timesteps")  # an earlier instance-level hook is kept, not bypassed
    signature = inspect.signature(function)  # with self

    # functools.wraps keeps the signature: retrieve_timesteps asks set_timesteps which arguments it accepts.
    @functools.wraps(function)
    def set_timesteps_on_cpu(self, *args, **kwargs):
        bound = signature.bind(self, *args, **kwargs)
        bound.arguments["device"] = "cpu"
        return function(*bound.args, **bound.kwargs)

    undo = set_instance_attr(scheduler, "set_timesteps", types.MethodType(set_timesteps_on_cpu, scheduler))
    detail = f"{type(scheduler).__name__} keeps its timesteps on the CPU: reading them never waits for the GPU"
    return Change(detail, undo)


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
