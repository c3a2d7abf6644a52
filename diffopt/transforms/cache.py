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

import threading
from typing import Any, Callable, List, Optional

import torch

from .. import capabilities
from ..components import Component, is_pipeline
from ..config import DeepCache, FirstBlockCache
from ..layers import Applied, InstanceHook, Layer, attach, detach, find, layers_of, mark, undo_all
from ..plan import Step
from ..report import SKIPPED
from . import compile as compile_transform
from .compile_blocks import apply_block_compile

NAME = "cache"
# The instance attributes diffusers' cache hooks leave behind after disable_cache(); removed on undo if new.
_DIFFUSERS_HOOK_ATTRS = ("_diffusers_hook", "forward", "_cache_config")


class StepClock:
    """Shared by the cached modules of one pipeline. ``reuse`` is True when the next denoiser call may skip its
    deep branch: after ``scheduler.step`` advanced the step count to one that is not a multiple of ``interval``."""

    def __init__(self, interval: Optional[int] = None):
        self.interval = interval  # None: the clock only restarts (first-block cache keeps its own decision)
        self.step = 0
        self.reuse = False
        self.thread: Optional[int] = None  # the thread whose pipeline call is running, between its start and end
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


class _ClockHook(InstanceHook):
    """``scheduler.<name>`` runs as before, then ``clock.start`` (set_timesteps) or ``clock.advance`` (step)."""

    transform = NAME

    def __init__(self, owner, name: str, clock: StepClock):
        super().__init__(owner, name)
        self.clock = clock

    def around(self, *args, **kwargs):
        result = self.inner(*args, **kwargs)
        self.clock.start() if self.name == "set_timesteps" else self.clock.advance()
        return result


class _CallHook(InstanceHook):
    """``pipe.progress_bar`` (start of every call) and ``pipe.maybe_free_model_hooks`` (its end) restart the clock.
    At the start, a scheduler replaced since optimize gets the scheduler hooks moved to it."""

    transform = NAME

    def __init__(self, owner, name: str, clock: StepClock):
        super().__init__(owner, name)
        self.clock = clock
        self.scheduler_hooks: List[_ClockHook] = []

    def hook_scheduler(self) -> None:
        scheduler = self.owner.scheduler
        self.scheduler_hooks = [_ClockHook(scheduler, n, self.clock).install() for n in ("set_timesteps", "step")]

    def unhook_scheduler(self) -> None:
        for hook in reversed(self.scheduler_hooks):
            if hook in layers_of(hook.owner):  # not taken off already (by an optimize of a pipeline sharing it)
                hook.undo(hook.owner)
                detach(hook.owner, hook)
        self.scheduler_hooks = []

    def around(self, *args, **kwargs):
        hooked = self.scheduler_hooks[0].owner if self.scheduler_hooks else None
        if hooked is not None and self.owner.scheduler is not hooked:  # replaced after optimize: follow the new one
            self.unhook_scheduler()
            self.hook_scheduler()
        self.clock.start()
        # A call starts at progress_bar and ends at maybe_free_model_hooks: the cache belongs to that thread meanwhile.
        self.clock.thread = threading.get_ident() if self.name == "progress_bar" else None
        return self.inner(*args, **kwargs)

    def undo(self, owner) -> None:
        super().undo(owner)
        if self.scheduler_hooks and self.scheduler_hooks[0].owner is not owner.scheduler:
            self.unhook_scheduler()  # on a scheduler the pipeline no longer holds, where restore would not look


def attach_clock(pipe, clock: StepClock) -> Applied:
    """Hook ``pipe.scheduler``, ``pipe.progress_bar`` and ``pipe.maybe_free_model_hooks`` (instance attributes
    only) so that ``clock`` follows the denoising loop of every call; each hook is a layer on what it changed."""
    since, start = mark(), _CallHook(pipe, "progress_bar", clock)
    start.hook_scheduler()
    start.install()
    if callable(getattr(pipe, "maybe_free_model_hooks", None)):
        _CallHook(pipe, "maybe_free_model_hooks", clock).install()
    detail = (
        "restarts at scheduler.set_timesteps and pipe.progress_bar (start of every call) and "
        "pipe.maybe_free_model_hooks (end), advances at scheduler.step"
    )
    return Applied(detail, since, pipe, pipe.scheduler)


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


class _CachedBlock(InstanceHook):
    """A block's ``forward`` under DeepCache. On a cached step a deep down block returns what it returned on the
    last full step, the mid block passes its input through, a deep up block returns the kept feature. On a full
    step the block runs and, where it is the one that keeps, stores its output."""

    transform = NAME

    def __init__(self, owner, role: str, store: "_Store", clock: StepClock, slot, keeps: bool, completes: bool = False):
        super().__init__(owner, "forward")
        self.role, self.store, self.clock, self.slot = role, store, clock, slot
        self.keeps, self.completes = keeps, completes

    def around(self, *args, **kwargs):
        if not torch.compiler.is_compiling():  # compiled, the check runs before the graph (CompiledCall)
            check_thread(self.clock)
        store = self.store
        # `clock.reuse` is read first: on full steps dynamo guards on it alone, so writing the store does not
        # make the next full step recompile.
        if self.clock.reuse and store.complete:
            if self.role == "mid":  # it keeps the shape of its input; nothing reads it on a cached step
                return args[0] if args else kwargs["hidden_states"]
            return self.slot.value
        output = self.inner(*args, **kwargs)
        if self.keeps:
            self.slot.value = output
            store.fresh = True
            if self.completes:
                store.complete = True
        return output


def check_thread(clock: StepClock) -> None:
    """The blocks read one clock: a second thread running the model during another thread's cached call would
    read that call's cache. Refuse instead of returning a corrupt image."""
    if clock.thread is not None and clock.thread != threading.get_ident():
        raise RuntimeError(
            "diffopt: this model runs a step cache for a pipeline call in progress in another thread, and one cached "
            "model cannot serve two threads at once. Give each thread its own components (copy.deepcopy(pipe)), or "
            "optimize without cache="
        )


class _DeepCacheState(Layer):
    """On the UNet (or ControlNet): its store, registered with the clock; undo unregisters and empties it.
    ``before_call`` runs in eager code before a compiled call of the model."""

    transform = NAME

    def before_call(self) -> None:
        check_thread(self.clock)

    def __init__(self, store: "_Store", clock: StepClock, detail: str):
        self.store, self.clock, self.detail = store, clock, detail
        clock.listeners.append(store.clear)
        clock.settlers.append(store.settle)

    def undo(self, owner) -> None:
        if self.store.clear in self.clock.listeners:
            self.clock.listeners.remove(self.store.clear)
        if self.store.settle in self.clock.settlers:
            self.clock.settlers.remove(self.store.settle)
        self.store.clear()


def is_deepcache_model(module: torch.nn.Module) -> bool:
    """UNets (and ControlNets) built from diffusers' down/mid/up block lists, which DeepCache knows how to cut."""
    from diffusers import ControlNetModel, UNet2DConditionModel

    return isinstance(module, (UNet2DConditionModel, ControlNetModel))


def max_depth(module: torch.nn.Module) -> int:
    """The deepest valid ``DeepCache.depth``: at least one down block must be left to skip."""
    return len(module.down_blocks) - 1


def apply_deepcache(
    module: torch.nn.Module, interval: int, depth: int, clock: StepClock, own: bool = False, dynamic_batch: bool = False
) -> Applied:
    """Make ``module`` (a UNet2DConditionModel, or a ControlNetModel) skip its deep blocks when ``clock.reuse``.

    A ControlNet on a cached step runs only its first ``depth`` down blocks: the residuals it hands to the
    shallow branch of the UNet are fresh, and the deep ones, which the cached UNet step never reads (its deep up
    blocks are skipped), come from the last full step's deep blocks. ControlNet and UNet read the same clock, so
    they are cached on the same steps. The UNet's own ``forward`` is untouched: only the ``forward`` of the skipped
    blocks is replaced, on those instances, so the skip-connection and ControlNet plumbing stays diffusers' own.

    ``own`` and ``dynamic_batch`` are for compiled modules (see :class:`_Store`).
    """
    if not 1 <= depth <= max_depth(module):
        raise ValueError(f"DeepCache depth must be between 1 and {max_depth(module)} for this model, got {depth}")
    store = _Store(own, dynamic_batch)
    keep = interval > 1  # interval 1 never reads the store: keep nothing, trace nothing extra
    up_blocks = getattr(module, "up_blocks", None)  # None: a ControlNet, which ends after its mid block
    last = len(module.down_blocks) - 1
    kind = "shallow branch" if up_blocks is not None else "shallow residuals"
    every = f"{interval - 1} of every {interval} steps" if interval > 1 else "no step (interval=1)"
    parts = f"down_blocks[:{depth}]" + (f" and up_blocks[-{depth}:]" if up_blocks is not None else "")
    detail = f"DeepCache(interval={interval}, depth={depth}): on {every} only {parts} run ({kind})"
    since = mark()
    try:
        attach(module, _DeepCacheState(store, clock, detail))
        # Deep down blocks: on cached steps, what they returned on the last full step. Their consumers (the deeper
        # blocks, mid, deep up blocks) are skipped too; only ControlNet additions still touch them.
        for index in range(depth, len(module.down_blocks)):
            completes = up_blocks is None and index == last
            _CachedBlock(module.down_blocks[index], "down", store, clock, store.slot(), keep, completes).install()
        if module.mid_block is not None:
            _CachedBlock(module.mid_block, "mid", store, clock, None, False).install()
        if up_blocks is not None:
            feature, kept = len(up_blocks) - depth - 1, store.slot()  # its output feeds the shallow up blocks
            for index in range(feature + 1):
                keeps = keep and index == feature
                _CachedBlock(up_blocks[index], "up", store, clock, kept, keeps, keeps).install()
    except BaseException:
        undo_all(module.modules(), since)
        raise
    return Applied(detail, since, module)


# --- First Block Cache (transformers) -------------------------------------------------------------------------


def has_cache_hooks(model: torch.nn.Module) -> bool:
    """The model takes diffusers' cache configs (CacheMixin: Flux, Wan, LTX, QwenImage, ...)."""
    return all(callable(getattr(model, name, None)) for name in ("enable_cache", "disable_cache", "_reset_stateful_cache"))


class _FirstBlockCache(Layer):
    """diffusers' cache hooks on a transformer: undo calls ``disable_cache()`` and deletes the attributes that
    leaves behind where they were not there before."""

    transform = NAME

    def __init__(self, before, clock: StepClock):
        self.before, self.clock = before, clock

    def undo(self, owner) -> None:
        if owner._reset_stateful_cache in self.clock.listeners:
            self.clock.listeners.remove(owner._reset_stateful_cache)
        if getattr(owner, "is_cache_enabled", False):
            owner.disable_cache()
        for module, had in self.before.items():
            for name in _DIFFUSERS_HOOK_ATTRS:
                if name not in had:
                    vars(module).pop(name, None)


def apply_first_block_cache(model: torch.nn.Module, threshold: float, clock: StepClock) -> Applied:
    """diffusers' First Block Cache on ``model`` (``enable_cache(FirstBlockCacheConfig(threshold))``), its state
    reset whenever ``clock`` restarts."""
    from diffusers.hooks import FirstBlockCacheConfig

    before = {module: {name for name in _DIFFUSERS_HOOK_ATTRS if name in vars(module)} for module in model.modules()}
    since, layer = mark(), _FirstBlockCache(before, clock)
    try:
        model.enable_cache(FirstBlockCacheConfig(threshold=threshold))
        # diffusers resets the state at the end of a call (maybe_free_model_hooks); a call that raised never gets
        # there, so reset at the start of every call as well.
        clock.listeners.append(model._reset_stateful_cache)
    except BaseException:
        layer.undo(model)
        raise
    attach(model, layer)
    detail = (
        f"diffusers First Block Cache (threshold={threshold}): the other blocks are skipped while the first "
        "block's output moves less than that; reset at the start of every call"
    )
    return Applied(detail, since, model)


# --- planning -------------------------------------------------------------------------------------------------


def plan(ctx) -> List[Step]:
    config, target = ctx.config, ctx.target
    if config.cache is None:
        return []
    if not is_pipeline(target) or getattr(target, "scheduler", None) is None:
        raise ValueError(
            f"cache={config.cache!r} needs a pipeline with a scheduler, got {type(target).__name__}: the cache "
            "learns where each call starts and which step it is at from the pipeline's scheduler; pass the pipeline"
        )
    denoiser = ctx.denoiser()
    if denoiser is None:
        return []
    setting = resolve(config.cache, denoiser, ctx.report)
    if setting is None:
        return []
    clock = StepClock(setting.interval if isinstance(setting, DeepCache) else None)
    steps = [Step("scheduler", NAME, lambda: attach_clock(target, clock))]
    if isinstance(setting, FirstBlockCache):
        options = ctx.compile_options.get(denoiser.name)
        if options is not None:
            options = compile_transform.options_for(denoiser, ctx, ctx.report, per_block="the first-block cache")
        if options is not None and config.compile_blocks is False:
            # The cache decides between blocks on the host, so its compiled code is the blocks', never the whole model's.
            raise ValueError(f"compile_blocks=False asks for {denoiser.name} compiled whole, but the first-block cache "
                             f"(cache={config.cache!r}) compiles its blocks one by one, deciding between them whether "
                             "to run the rest; drop one of them")  # fmt: skip
        if options is not None:
            # Blocks first: the cache hooks must wrap compiled blocks (see apply_block_compile).
            ctx.block_compiled.add(denoiser.name)
            dynamic = config.dynamic_batch
            steps.append(Step(denoiser.name, "compile", lambda: apply_block_compile(denoiser.module, options, dynamic)))
        steps.append(Step(denoiser.name, NAME,
                          lambda: apply_first_block_cache(denoiser.module, setting.threshold, clock)))  # fmt: skip
        return steps
    for component in ctx.components:
        if component.role == "vae" or not is_deepcache_model(component.module):
            continue
        options = ctx.compile_options.get(component.name)
        own = options is not None and compile_transform.uses_cuda_graphs(options)
        dynamic = options is not None and config.dynamic_batch

        def apply(module=component.module, own=own, dynamic=dynamic):
            return apply_deepcache(module, setting.interval, setting.depth, clock, own, dynamic)

        steps.append(Step(component.name, NAME, apply))
    return steps


def resolve(value, denoiser: Component, report):
    """The DeepCache / FirstBlockCache for this denoiser. A kind that does not fit it raises (the user named it);
    "auto" skips, with the reason, where nothing fits."""
    module, given = denoiser.module, value  # messages name what the user gave
    kind = type(module).__name__
    if value == "auto":
        value = DeepCache() if is_deepcache_model(module) else FirstBlockCache()
        named = False
    else:
        value = {"deepcache": DeepCache(), "first_block": FirstBlockCache()}.get(value, value)
        named = True
    if isinstance(value, DeepCache):
        if not is_deepcache_model(module):
            raise ValueError(
                f"cache={given!r} works on UNet2DConditionModel denoisers, got {kind}; "
                "for transformers use cache='first_block' (diffopt.FirstBlockCache) or 'auto'"
            )
        deepest = max_depth(module)
        if value.depth > deepest:
            raise ValueError(f"DeepCache depth must be between 1 and {deepest} for this {kind}, got {value.depth}")
        return value
    reason = capabilities.require_or_skip(capabilities.first_block_cache(), named, f"cache={given!r}")
    if not reason and not has_cache_hooks(module):
        reason = f"diffusers {capabilities.installed_version('diffusers')} has no cache hooks (CacheMixin) on {kind}"
        if is_deepcache_model(module):
            reason = f"the first-block cache hooks transformer blocks; {kind} is a UNet: use cache='deepcache' or 'auto'"
        if named:
            raise ValueError(f"cache={given!r}: {reason}")
    ours = find(module, _FirstBlockCache) is not None  # optimize undoes it before applying again
    if not reason and getattr(module, "is_cache_enabled", False) and not ours:
        reason = f"{kind} already has a diffusers cache enabled ({type(module._cache_config).__name__}); disable_cache() it first"
        if named:
            raise ValueError(f"cache={given!r}: {reason}")
    if reason:
        report.add(denoiser.name, NAME, SKIPPED, reason)
        return None
    return value
