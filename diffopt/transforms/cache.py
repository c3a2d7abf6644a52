"""Step caching: reuse, on some denoising steps, work done on an earlier step of the same call.

* :func:`apply_deepcache` (UNets, and the ControlNets that feed them): DeepCache. On a full step every block runs
  and the output of the deepest up block that the shallow branch does not keep is stored; on a cached step the
  deep down blocks return what they returned on the last full step, the mid block passes its input through and
  the deep up blocks return the stored feature, so only ``conv_in``, the first ``depth`` down blocks, the last
  ``depth`` up blocks and ``conv_out`` compute. The UNet's own ``forward`` is untouched: only the ``forward`` of
  the skipped blocks is replaced, on those instances, so the skip-connection and ControlNet plumbing stays
  diffusers' own, whatever its version.
* :func:`apply_first_block_cache` (transformers): diffusers' First Block Cache hooks, with its blocks compiled
  one by one when compile is on (see there).
* :class:`StepClock` and :func:`attach_clock`: where the pipeline is in its denoising loop. Every cached module
  reads the same clock, so a UNet and its ControlNet always agree on whether a step is cached.

How a call is recognised (the reset signal). The clock restarts, dropping every stored feature, whenever the
pipeline calls ``scheduler.set_timesteps`` or ``pipe.progress_bar``: every diffusers pipeline does both at the
start of ``__call__``, before the first denoiser call, and neither depends on the pipeline's class (which we may
not patch) nor on timestep values (which would have to be read on the host inside the compiled region). It
restarts again at ``pipe.maybe_free_model_hooks``, which pipelines call when they are done: the kept features
do not hold memory between calls, and a denoiser shared with another pipeline is never left armed. A restart in
the middle of a call only costs speed: the next step runs in full. ``scheduler.step`` advances the clock, so the
decision for the next denoiser call is made in eager Python before the call; inside the compiled UNet it is a
Python bool that dynamo guards on, which gives exactly two graphs (full step, cached step) and no graph break.
If ``pipe.scheduler`` is replaced after optimize, the next ``progress_bar`` call moves the hooks to the new one.
"""
from __future__ import annotations

import functools
import types
from typing import Any, Callable, Dict, List, Optional

import torch

from . import Change, current_function, set_instance_attr

# The instance attributes diffusers' cache hooks leave behind after disable_cache(); removed on undo if new.
_DIFFUSERS_HOOK_ATTRS = ("_diffusers_hook", "forward", "_cache_config")


class StepClock:
    """Shared by the cached modules of one pipeline. ``reuse`` is True when the next denoiser call may skip its
    deep branch: after ``scheduler.step`` advanced the step count to one that is not a multiple of ``interval``."""

    def __init__(self, interval: Optional[int] = None):
        self.interval = interval  # None: the clock only restarts (first-block cache keeps its own decision)
        self.step = 0
        self.reuse = False
        self.listeners: List[Callable[[], None]] = []  # run at every restart
        self.settlers: List[Callable[[], None]] = []  # run at every step, in eager code, before `reuse` is set

    def start(self) -> None:
        self.step = 0
        self.reuse = False
        for listener in list(self.listeners):
            listener()

    def advance(self) -> None:
        for settle in list(self.settlers):
            settle()
        self.step += 1
        self.reuse = bool(self.interval and self.interval > 1 and self.step % self.interval)


class _SchedulerHooks:
    """``set_timesteps`` restarts the clock, ``step`` advances it; on one scheduler instance at a time."""

    def __init__(self, clock: StepClock):
        self.clock = clock
        self.scheduler = None
        self._undo: List[Callable[[], None]] = []

    def attach(self, scheduler) -> None:
        self._undo = [_hook(scheduler, "set_timesteps", self.clock.start), _hook(scheduler, "step", self.clock.advance)]
        self.scheduler = scheduler

    def detach(self) -> None:
        for undo in reversed(self._undo):
            undo()
        self._undo, self.scheduler = [], None


def _hook(scheduler, name: str, after: Callable[[], None]) -> Callable[[], None]:
    """``scheduler.name`` runs as before, then ``after()``; returns the undo. A method bound around
    :func:`current_function`, so a deep-copied scheduler's hook calls the copy (and still drives this clock)."""
    function = current_function(scheduler, name)

    # functools.wraps keeps inspect.signature: retrieve_timesteps asks set_timesteps which arguments it takes.
    @functools.wraps(function)
    def hooked(self, *args, **kwargs):
        result = function(self, *args, **kwargs)
        after()
        return result

    return set_instance_attr(scheduler, name, types.MethodType(hooked, scheduler))


def attach_clock(pipe, clock: StepClock) -> Change:
    """Hook ``pipe.scheduler`` and ``pipe.progress_bar`` (instance attributes only) so that ``clock`` follows
    the denoising loop of every call; the undo removes every hook."""
    hooks = _SchedulerHooks(clock)
    hooks.attach(pipe.scheduler)
    progress_bar = pipe.progress_bar

    @functools.wraps(progress_bar)
    def hooked_progress_bar(*args, **kwargs):
        if pipe.scheduler is not hooks.scheduler:  # replaced after optimize: follow the new one
            hooks.detach()
            hooks.attach(pipe.scheduler)
        clock.start()
        return progress_bar(*args, **kwargs)

    undo = [set_instance_attr(pipe, "progress_bar", hooked_progress_bar)]
    free_hooks = getattr(pipe, "maybe_free_model_hooks", None)
    if callable(free_hooks):

        @functools.wraps(free_hooks)
        def hooked_free_hooks(*args, **kwargs):
            clock.start()
            return free_hooks(*args, **kwargs)

        undo.append(set_instance_attr(pipe, "maybe_free_model_hooks", hooked_free_hooks))

    def undo_all():
        for step in reversed(undo):
            step()
        hooks.detach()

    detail = (
        "restarts at scheduler.set_timesteps and pipe.progress_bar (start of every call) and "
        "pipe.maybe_free_model_hooks (end), advances at scheduler.step"
    )
    return Change(detail, undo_all)


# --- DeepCache ------------------------------------------------------------------------------------------------


class _Slot:
    """One kept value. Written as an attribute, never as a dict item: dynamo guards on a dict's keys when it
    traces an insertion, which would make the second full step recompile."""

    value: Any = None


class _Store:
    """What one module kept from its last full step. Written inside the compiled graph (a side effect dynamo
    replays), read on cached steps only, cleared in eager code when the clock restarts.

    ``settle`` runs in eager code after each full step (at ``scheduler.step``). With ``own``, it copies the kept
    tensors: a compiled module's outputs may live in a CUDA-graph pool that the next replay reuses. With
    ``dynamic_batch``, it marks their batch dimension dynamic, as compile marks the inputs', so that the cached
    step's graph too serves every batch size instead of recompiling for the next one.
    """

    def __init__(self, own: bool = False, dynamic_batch: bool = False):
        self.slots: List[_Slot] = []
        self.complete = False
        self.fresh = False  # set inside the full step's graph, cleared by settle
        self.own, self.dynamic_batch = own, dynamic_batch

    def slot(self) -> _Slot:
        self.slots.append(_Slot())
        return self.slots[-1]

    def clear(self) -> None:
        for slot in self.slots:
            slot.value = None
        self.complete = self.fresh = False

    def settle(self) -> None:
        if not self.fresh:
            return
        self.fresh = False
        if self.own or self.dynamic_batch:
            for slot in self.slots:
                slot.value = _map_tensors(slot.value, self._settle)

    def _settle(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.own:
            tensor = tensor.clone()  # keeps the memory format
        if self.dynamic_batch and tensor.dim() > 0:
            torch._dynamo.maybe_mark_dynamic(tensor, 0)
        return tensor


def _map_tensors(value, fn):
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, (tuple, list)):
        return type(value)(_map_tensors(item, fn) for item in value)
    return value


def is_deepcache_model(module: torch.nn.Module) -> bool:
    """UNets (and ControlNets) built from diffusers' down/mid/up block lists, which DeepCache knows how to cut."""
    from diffusers import ControlNetModel, UNet2DConditionModel

    return isinstance(module, (UNet2DConditionModel, ControlNetModel))


def max_depth(module: torch.nn.Module) -> int:
    """The deepest valid ``DeepCache.depth``: at least one down block must be left to skip."""
    return len(module.down_blocks) - 1


def apply_deepcache(
    module: torch.nn.Module, interval: int, depth: int, clock: StepClock, own: bool = False, dynamic_batch: bool = False
) -> Optional[Change]:
    """Make ``module`` (a UNet2DConditionModel, or a ControlNetModel) skip its deep blocks when ``clock.reuse``.

    A ControlNet on a cached step runs only its first ``depth`` down blocks: the residuals it hands to the
    shallow branch of the UNet are fresh, and the deep ones, which the cached UNet step never reads (its deep up
    blocks are skipped), come from the last full step's deep blocks. ControlNet and UNet read the same clock, so
    they are cached on the same steps.

    ``own`` and ``dynamic_batch`` are for compiled modules (see :class:`_Store`). Returns the Change whose undo
    removes every wrapper (the blocks' ``forward`` attributes).
    """
    if not 1 <= depth <= max_depth(module):
        raise ValueError(f"DeepCache depth must be between 1 and {max_depth(module)} for this model, got {depth}")
    store = _Store(own, dynamic_batch)
    keep = interval > 1  # interval 1 never reads the store: keep nothing, trace nothing extra
    undo: List[Callable[[], None]] = []

    def cached(block: torch.nn.Module, on_cached_step: Callable, on_full_step: Callable) -> None:
        original = block.forward

        @functools.wraps(original)
        def forward(*args, **kwargs):
            # `clock.reuse` is read first: on full steps dynamo guards on it alone, so writing the store does not
            # make the next full step recompile.
            if clock.reuse and store.complete:
                return on_cached_step(args, kwargs)
            output = original(*args, **kwargs)
            if keep:
                on_full_step(output)
            return output

        undo.append(set_instance_attr(block, "forward", forward))

    up_blocks = getattr(module, "up_blocks", None)  # None: a ControlNet, which ends after its mid block
    last = len(module.down_blocks) - 1

    # Deep down blocks: on cached steps, what they returned on the last full step. Their consumers (the deeper
    # blocks, mid, deep up blocks) are skipped too; only ControlNet additions still touch them, which need shapes.
    for index in range(depth, len(module.down_blocks)):
        slot = store.slot()

        def keep_down(output, slot=slot, completes=up_blocks is None and index == last):
            slot.value = output
            store.fresh = True
            if completes:
                store.complete = True

        cached(module.down_blocks[index], lambda a, k, slot=slot: slot.value, keep_down)
    if module.mid_block is not None:
        # The mid block keeps the shape of its input: pass it through; nothing reads it on a cached step.
        cached(module.mid_block, lambda a, k: a[0] if a else k["hidden_states"], lambda output: None)
    if up_blocks is not None:
        feature, kept = len(up_blocks) - depth - 1, store.slot()  # its output feeds the shallow up blocks

        def keep_feature(output):
            kept.value = output
            store.complete = store.fresh = True

        for index in range(feature + 1):
            cached(up_blocks[index], lambda a, k: kept.value, keep_feature if index == feature else lambda output: None)

    clock.listeners.append(store.clear)
    clock.settlers.append(store.settle)

    def undo_all():
        if store.clear in clock.listeners:
            clock.listeners.remove(store.clear)
        if store.settle in clock.settlers:
            clock.settlers.remove(store.settle)
        store.clear()
        for step in reversed(undo):
            step()

    kind = "shallow branch" if up_blocks is not None else "shallow residuals"
    every = f"{interval - 1} of every {interval} steps" if interval > 1 else "no step (interval=1)"
    parts = f"down_blocks[:{depth}]" + (f" and up_blocks[-{depth}:]" if up_blocks is not None else "")
    return Change(f"DeepCache(interval={interval}, depth={depth}): on {every} only {parts} run ({kind})", undo_all)


# --- First Block Cache (transformers) -------------------------------------------------------------------------


def has_cache_hooks(model: torch.nn.Module) -> bool:
    """The model takes diffusers' cache configs (CacheMixin: Flux, Wan, LTX, QwenImage, ...)."""
    return all(callable(getattr(model, name, None)) for name in ("enable_cache", "disable_cache", "_reset_stateful_cache"))


def transformer_blocks(model: torch.nn.Module) -> List[torch.nn.Module]:
    """The repeated blocks: members of the model's ``*blocks`` ModuleLists (``transformer_blocks``,
    ``single_transformer_blocks``, ...), the modules diffusers' first-block cache hooks."""
    return [
        block
        for name, child in model.named_children()
        if name.endswith("blocks") and isinstance(child, torch.nn.ModuleList)
        for block in child
    ]


def apply_block_compile(model: torch.nn.Module, options: Dict[str, Any], dynamic_batch: bool = False) -> Optional[Change]:
    """``torch.compile`` each transformer block's ``forward`` on its instance, so that hooks installed afterwards
    (the first-block cache) run in eager code around the compiled blocks.

    The first-block cache decides on the host whether to run the remaining blocks (``.item()`` of a residual
    difference); inside one compiled model that decision would be a graph break. Compiled per block, every
    compiled region is one whole block (fullgraph holds) and the decision sits between regions. The class's
    ``forward`` is compiled once and takes the block as an argument, so blocks of one class share one graph
    instead of counting against dynamo's recompile limit one by one (Flux has 38 single blocks).
    """
    from .compile import describe, mark_batch_dynamic

    blocks = transformer_blocks(model)
    if not blocks:
        return None
    compiled: Dict[type, Callable] = {}
    undo = []
    for block in blocks:
        cls = type(block)
        function = compiled.setdefault(cls, torch.compile(cls.forward, **options))

        @functools.wraps(cls.forward)
        def forward(*args, _block=block, _function=function, **kwargs):
            if dynamic_batch:  # as compile does for whole models: one graph for every batch size
                mark_batch_dynamic(args, kwargs)
            return _function(_block, *args, **kwargs)

        undo.append(set_instance_attr(block, "forward", forward))

    def undo_all():
        for step in reversed(undo):
            step()

    kinds = ", ".join(sorted(cls.__name__ for cls in compiled))
    detail = f"{describe(options)} on each of {len(blocks)} blocks ({kinds}), for the first-block cache"
    return Change(detail + (", dynamic batch" if dynamic_batch else ""), undo_all)


def apply_first_block_cache(model: torch.nn.Module, threshold: float, clock: StepClock) -> Change:
    """diffusers' First Block Cache on ``model`` (``enable_cache(FirstBlockCacheConfig(threshold))``), its state
    reset whenever ``clock`` restarts. The undo calls ``disable_cache()`` and deletes the attributes that leaves
    behind (``_diffusers_hook``, the blocks' ``forward``, ``_cache_config``) where they were not there before."""
    from diffusers.hooks import FirstBlockCacheConfig

    before = {module: {name for name in _DIFFUSERS_HOOK_ATTRS if name in vars(module)} for module in model.modules()}
    model.enable_cache(FirstBlockCacheConfig(threshold=threshold))
    # diffusers resets the state at the end of a call (maybe_free_model_hooks); a call that raised never gets
    # there, so reset at the start of every call as well.
    reset = model._reset_stateful_cache
    clock.listeners.append(reset)

    def undo():
        if reset in clock.listeners:
            clock.listeners.remove(reset)
        model.disable_cache()
        for module, had in before.items():
            for name in _DIFFUSERS_HOOK_ATTRS:
                if name not in had:
                    vars(module).pop(name, None)

    detail = (
        f"diffusers First Block Cache (threshold={threshold}): the other blocks are skipped while the first "
        "block's output moves less than that; reset at the start of every call"
    )
    return Change(detail, undo)
