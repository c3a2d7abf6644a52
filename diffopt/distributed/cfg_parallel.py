"""CFG-parallel: the unconditional and conditional halves of each denoiser call run on two ranks.

Pipelines with classifier-free guidance call the denoiser once per step on a doubled batch,
``unet(cat([latents] * 2), t, encoder_hidden_states=cat([negative, positive]), added_cond_kwargs=..., ...)``.
With CFG-parallel, rank r of a group of n takes chunk r of every tensor whose first dimension is that batch
(including tensors nested in ``added_cond_kwargs`` and ControlNet residual lists), runs the real - possibly compiled -
module on it, and all-gathers the chunks so every rank gets the full output back. The rest of the pipeline (guidance,
scheduler, VAE) runs unchanged and identically on every rank.

How the split is installed, and why this way:

* pipelines test ``isinstance(self.controlnet, ControlNetModel)``, so the module object cannot be replaced by a
  wrapper; and forward hooks or an instance ``forward`` run *inside* ``Module.compile()``'s compiled ``_call_impl``,
  which would put the collective inside the compiled region.
* So the one module instance is moved to a subclass of its own class whose ``__call__`` splits, calls the base
  ``__call__`` (compiled or not) and gathers - the mechanism ``torch.nn.utils.parametrize`` uses. No class is
  modified, ``pipe.unet`` stays the same object, ``isinstance`` holds, and ``optimize()`` may run before or after.
  Undo sets ``__class__`` back and deletes the one attribute this module added.
"""

from __future__ import annotations

import functools
import logging
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
from torch.utils import _pytree as pytree

from ._collectives import all_gather_batch, check_ranks_agree, group_ranks, require_process_group

logger = logging.getLogger(__name__)

# The modules a pipeline runs once per step on the doubled batch, in the order they are looked up.
DENOISER_NAMES = ("unet", "transformer", "controlnet")

# The undo record, kept on the module it changed (as diffusers keeps `_diffusers_hook`).
STATE_ATTRIBUTE = "_diffopt_cfg_parallel"

# Where pipelines put the latents when they do not pass them first.
_SAMPLE_KEYWORDS = ("sample", "hidden_states")


@dataclass
class _SplitState:
    group: Any
    rank: int
    size: int
    original_class: type
    name: str
    pipe: Callable[[], Any]  # weak reference: the pipeline owns the module, not the other way round
    verify: bool
    last_step_index: int | None = None
    verified: bool = False
    warned_unsplit: set = field(default_factory=set)

    def due_for_check(self) -> bool:
        """Whether this call starts a new pipeline call; decided from values equal on all ranks in lockstep."""
        if not self.verify:
            return False
        scheduler = getattr(self.pipe(), "scheduler", None)
        step_index = getattr(scheduler, "step_index", None)
        previous, self.last_step_index = self.last_step_index, step_index
        if not self.verified or step_index is None:
            # First call, or a scheduler without a step counter (DDIM, DDPM, PNDM): check every call.
            return True
        # Within one pipeline call the step index only grows; a new call starts it again from the beginning.
        return previous is None or step_index <= previous


@dataclass
class CFGParallel:
    """What :func:`enable_cfg_parallel` changed. ``disable()`` (or leaving a ``with`` block) undoes it."""

    modules: dict[str, torch.nn.Module]
    group: Any
    rank: int
    size: int

    def disable(self) -> None:
        for module in self.modules.values():
            _unsplit(module)

    def __enter__(self) -> "CFGParallel":
        return self

    def __exit__(self, *exc_info) -> None:
        self.disable()


def new_cfg_group(size: int = 2):
    """Split the world into groups of `size` consecutive ranks and return the one this rank belongs to.

    Every rank must call it, once, in the same order relative to other group creations (torch.distributed's rule
    for ``new_group``). With 8 processes and ``size=2`` you get pairs (0,1), (2,3), ...; combine with
    :func:`~diffopt.distributed.generate_data_parallel` to give each pair its own prompts.

    Example::

        group = new_cfg_group()
        enable_cfg_parallel(pipe, group=group)
    """
    require_process_group()
    world = dist.get_world_size()
    if size < 2 or world % size:
        raise ValueError(f"size must be >= 2 and divide the world size {world}, got {size!r}")
    rank = dist.get_rank()
    mine = None
    for start in range(0, world, size):
        group = dist.new_group(list(range(start, start + size)))
        if start <= rank < start + size:
            mine = group
    return mine


def enable_cfg_parallel(
    pipe,
    *,
    group=None,
    components: Sequence[str] | None = None,
    verify: bool = True,
) -> CFGParallel:
    """Run the two halves of each classifier-free-guidance batch on two ranks.

    Every rank of `group` (default: the whole world, which must then have 2 ranks; see :func:`new_cfg_group` for
    more) calls this and then calls the pipeline with the same arguments and seeds; every rank gets the full result.
    A group of n > 2 ranks splits each batch n ways, which pays only for batches of several prompts. `components`
    defaults to those of ``("unet", "transformer", "controlnet")`` the pipeline has. With `verify`, enabling checks
    that all ranks hold equal weights, and the first step of every pipeline call checks that they got equal inputs
    (shapes, dtypes, seeds, prompts), raising the same RuntimeError on every rank instead of hanging or mixing images.

    Example (``torchrun --nproc-per-node 2 generate.py``)::

        torch.distributed.init_process_group()
        pipe = StableDiffusionXLPipeline.from_pretrained(..., torch_dtype=torch.float16).to(f"cuda:{local_rank}")
        diffopt.optimize(pipe)                      # before or after, either works
        with enable_cfg_parallel(pipe):
            image = pipe(prompt, generator=torch.Generator().manual_seed(0)).images[0]
    """
    require_process_group()
    if group is None and dist.get_world_size() != 2:
        raise ValueError(
            f"without a group, CFG-parallel needs a world of exactly 2 ranks, got {dist.get_world_size()}; "
            "with more, pass group=new_cfg_group() (pairs of ranks)"
        )
    group = group or dist.group.WORLD
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError(f"rank {dist.get_rank()} is not a member of the group {group_ranks(group)}")
    size = dist.get_world_size(group)
    if size < 2:
        raise ValueError(f"CFG-parallel needs a group of at least 2 ranks, got {size}")
    if size != 2:
        logger.info("CFG-parallel over %d ranks: each denoiser call is split %d ways along the batch", size, size)

    if any(cls.__name__ == "PAGMixin" for cls in type(pipe).__mro__):
        raise ValueError(
            f"{type(pipe).__name__} uses perturbed-attention guidance, whose attention processors mix the items of "
            "the batch; CFG-parallel needs a denoiser that treats them independently"
        )
    names = list(components) if components is not None else [
        name for name in DENOISER_NAMES if isinstance(getattr(pipe, name, None), torch.nn.Module)
    ]
    if not names:
        raise ValueError(f"{type(pipe).__name__} has none of the components {DENOISER_NAMES} to split")
    modules = {}
    for name in names:
        module = getattr(pipe, name, None)
        if not isinstance(module, torch.nn.Module):
            raise ValueError(f"components must name torch modules of the pipeline; {name!r} is {type(module).__name__}")
        if STATE_ATTRIBUTE in vars(module):
            raise RuntimeError(f"CFG-parallel is already enabled on pipe.{name}; call disable_cfg_parallel(pipe) first")
        modules[name] = module

    if verify:
        _check_weights_agree(modules, group)

    pipe_ref = weakref.ref(pipe)
    for name, module in modules.items():
        # Straight into the instance dict: torch.compile(module)'s wrapper would forward a setattr to the inner module.
        vars(module)[STATE_ATTRIBUTE] = _SplitState(group, rank, size, type(module), name, pipe_ref, verify)
        module.__class__ = _split_class(type(module))
    return CFGParallel(modules, group, rank, size)


def disable_cfg_parallel(pipe) -> bool:
    """Undo :func:`enable_cfg_parallel` on every component of `pipe`; return whether anything was enabled."""
    restored = False
    for name in DENOISER_NAMES + tuple(getattr(pipe, "components", {}) or {}):
        module = getattr(pipe, name, None)
        if isinstance(module, torch.nn.Module) and STATE_ATTRIBUTE in vars(module):
            _unsplit(module)
            restored = True
    return restored


def cfg_parallel_group(pipe):
    """The process group CFG-parallel splits `pipe`'s denoiser over, or None where it is not enabled."""
    for name in DENOISER_NAMES:
        state = getattr(getattr(pipe, name, None), "__dict__", {}).get(STATE_ATTRIBUTE)
        if state is not None:
            return state.group
    return None


def _unsplit(module: torch.nn.Module) -> None:
    state = vars(module).get(STATE_ATTRIBUTE)
    if state is None:
        return
    module.__class__ = state.original_class
    del vars(module)[STATE_ATTRIBUTE]


@functools.lru_cache(maxsize=None)
def _split_class(base: type) -> type:
    # One subclass per base class (not per enable), so that compiled code guarding on the type stays valid across
    # enable/disable cycles. Same name and module: diffusers writes `__class__.__name__` into saved configs.
    def __call__(self, *args, **kwargs):
        return _split_call(self, base.__call__, args, kwargs)

    return type(
        base.__name__,
        (base,),
        {"__call__": __call__, "__module__": base.__module__, "__qualname__": base.__qualname__},
    )


def _leading_batch(args: tuple, kwargs: dict) -> int | None:
    sample = args[0] if args else next((kwargs[k] for k in _SAMPLE_KEYWORDS if k in kwargs), None)
    return sample.shape[0] if isinstance(sample, torch.Tensor) and sample.dim() > 0 else None


def _is_batched(value, batch: int) -> bool:
    return isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == batch


def _split_call(module: torch.nn.Module, call: Callable, args: tuple, kwargs: dict):
    state: _SplitState = vars(module)[STATE_ATTRIBUTE]
    if state.due_for_check():
        _check_inputs_agree(state, args, kwargs)
        state.verified = True

    batch = _leading_batch(args, kwargs)
    if batch is None or batch % state.size:
        # Equal on all ranks (checked above), so all ranks take this branch together.
        if batch not in state.warned_unsplit:
            state.warned_unsplit.add(batch)
            logger.warning(
                "CFG-parallel: pipe.%s got a batch of %s, not divisible by %d ranks; every rank runs all of it",
                state.name, batch, state.size,
            )
        return call(module, *args, **kwargs)

    part = batch // state.size
    start = state.rank * part

    def take_chunk(value):
        return value.narrow(0, start, part) if _is_batched(value, batch) else value

    local_args, local_kwargs = pytree.tree_map(take_chunk, (args, kwargs))
    output = call(module, *local_args, **local_kwargs)

    leaves, spec = pytree.tree_flatten(output)
    positions = [i for i, leaf in enumerate(leaves) if _is_batched(leaf, part)]
    for i, full in zip(positions, all_gather_batch([leaves[i] for i in positions], state.group)):
        leaves[i] = full
    return pytree.tree_unflatten(leaves, spec)


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        # The device type only: each rank has its own cuda index.
        return f"Tensor{tuple(value.shape)}:{value.dtype}:{value.device.type}"
    if value is None or isinstance(value, (bool, int, float, str)):
        return repr(value)
    return type(value).__qualname__


def _check_inputs_agree(state: _SplitState, args: tuple, kwargs: dict) -> None:
    leaves_with_paths, spec = pytree.tree_flatten_with_path((args, kwargs))
    named = [(_argument_name(path), leaf) for path, leaf in leaves_with_paths]
    scheduler = getattr(state.pipe(), "scheduler", None)
    timesteps = getattr(scheduler, "timesteps", None)
    if isinstance(timesteps, torch.Tensor):
        named.append(("scheduler.timesteps", timesteps))
    signature = "\n".join(
        [
            f"step_index={getattr(scheduler, 'step_index', None)}",
            f"structure={spec}",
            *(f"{name}={_describe(leaf)}" for name, leaf in named),
        ]
    )
    tensors = [(name, leaf) for name, leaf in named if isinstance(leaf, torch.Tensor)]
    device = tensors[0][1].device if tensors else torch.device("cpu")
    check_ranks_agree(
        f"CFG-parallel inputs of pipe.{state.name}", signature, [t for _, t in tensors], state.group, device,
        names=[name for name, _ in tensors],
    )


def _argument_name(path) -> str:
    # ((args, kwargs)) paths read "[0][1]" or "[1]['added_cond_kwargs']['time_ids']": name them as the call does.
    where, *rest = path
    head = f"args[{rest[0].idx}]" if where.idx == 0 else rest[0].key
    return head + pytree.keystr(tuple(rest[1:]))


def _check_weights_agree(modules: dict[str, torch.nn.Module], group) -> None:
    tensors, shapes = [], []
    for name, module in modules.items():
        for key, tensor in [*module.named_parameters(), *module.named_buffers()]:
            if tensor.device.type == "meta":
                continue
            tensors.append(tensor)
            shapes.append(f"{name}.{key}{tuple(tensor.shape)}:{tensor.dtype}")
    device = tensors[0].device if tensors else torch.device("cpu")
    check_ranks_agree("CFG-parallel weights", "\n".join(shapes), tensors, group, device, exact=True)
