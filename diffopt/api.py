"""optimize() and restore(): plan, apply in a fixed order, keep the undo list on the pipeline."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Tuple

from . import capabilities
from .components import CONTROLNET, DENOISER, Component, check_target, conv_share, find_components, is_pipeline, module_device
from .config import RESTORE_ATTENTION_CHOICES, DeepCache, FirstBlockCache, OptimizeConfig, check_choice
from .report import APPLIED, SKIPPED, UNCHANGED, Report
from .transforms import attention as attention_transform
from .transforms import cache as cache_transform
from .transforms.attention import apply_attention
from .transforms.compile import CUDA_GRAPH_MODES, apply_compile, default_options, is_compiled
from .transforms.memory_format import apply_memory_format

logger = logging.getLogger(__name__)

#: The attribute on the pipeline (or bare model) that holds what optimize did, until restore removes it.
STATE_ATTR = "_diffopt_state"
#: Below this share of parameters in conv layers, channels_last has nothing to speed up.
MIN_CONV_SHARE_FOR_CHANNELS_LAST = 0.2


@dataclass
class _Step:
    component: Component
    transform: str
    apply: Callable[[], Optional["object"]]  # returns a transforms.Change or None


@dataclass
class _State:
    config: OptimizeConfig
    undo: List[Tuple[str, str, Callable[[], None]]] = field(default_factory=list)
    report: Report = field(default_factory=Report)


def _plan_attention(component: Component, config: OptimizeConfig, report: Report) -> List[_Step]:
    family = config.attention
    if family in ("auto", None):
        return []
    gate = {"sdpa": capabilities.sdpa, "xformers": capabilities.xformers}.get(family)
    if gate is not None:
        reason = capabilities.require_or_skip(gate(), config.asks_for("attention"), f"attention={family!r}")
        if reason:
            report.add(component.name, "attention", SKIPPED, reason)
            return []
    missing = attention_transform.missing_classes(family)
    if missing:
        found = capabilities.installed_version("diffusers")
        reason = f"attention={family!r}: diffusers {found} lacks {', '.join(missing)}"
        if config.asks_for("attention"):
            raise capabilities.UnsupportedFeatureError(reason)
        report.add(component.name, "attention", SKIPPED, reason)
        return []
    return [_Step(component, "attention", lambda: apply_attention(component.module, family))]


def _plan_memory_format(component: Component, config: OptimizeConfig, report: Report) -> List[_Step]:
    fmt = config.memory_format
    if fmt in ("preserve", None):
        return []
    share = conv_share(component.module)
    if fmt == "channels_last" and share < MIN_CONV_SHARE_FOR_CHANNELS_LAST and not config.asks_for("memory_format"):
        report.add(
            component.name, "memory_format", SKIPPED,
            f"only {share:.0%} of its weights are in conv layers; channels_last would not pay",
        )
        return []
    return [_Step(component, "memory_format", lambda: apply_memory_format(component.module, fmt))]


def _plan_compile(component: Component, config: OptimizeConfig, report: Report, cached: bool = False) -> List[_Step]:
    options = _compile_options(component, config, report, cached)
    if options is None:
        return []
    # diffusers' ControlNet pipelines call cudagraph_mark_step_begin() each step only when the UNet and the
    # ControlNet are OptimizedModule wrappers; modules compiled in place do not pass that check, and without it
    # the UNet's CUDA graph reads residuals that the ControlNet's next replay has overwritten (seen on an H200).
    # So the first ControlNet of each step marks the step itself; later nets of a MultiControlNet must not,
    # or they would free the residuals of the nets before them.
    new_step = component.role == CONTROLNET and options.get("mode") in CUDA_GRAPH_MODES and _first_net(component)
    dynamic_batch = _dynamic_batch(config)
    return [_Step(component, "compile", lambda: apply_compile(component.module, options, new_step, dynamic_batch))]


def _compile_options(component: Component, config: OptimizeConfig, report: Report, cached: bool = False):
    """The torch.compile options for ``component``, or None (with the reason in the report) when it is not compiled."""
    if config.compile is False:
        return None
    reason = capabilities.require_or_skip(capabilities.compile(), config.asks_for("compile"), "compile")
    if not reason and is_compiled(component.module):
        reason = "already compiled outside diffopt; left as it is"
    if reason:
        report.add(component.name, "compile", SKIPPED, reason)
        return None
    options = default_options(module_device(component.module))
    if not isinstance(config.compile, bool):  # a dict of torch.compile options over the defaults
        user = dict(config.compile)
        # torch.compile takes a mode or inductor options, never both, and modes mean nothing to other backends.
        if "mode" not in user and ("options" in user or user.get("backend", "inductor") != "inductor"):
            options.pop("mode", None)
        options.update(user)
    if cached and options.get("mode") in CUDA_GRAPH_MODES and not _names_mode(config):
        # Not measured yet: a cached step reads features that a full step's graph produced, and a CUDA-graph
        # replay may overwrite earlier outputs (as ControlNet residuals were, see _plan_compile). The cache copies
        # what it keeps out of the graph's pool after each full step, but until a GPU run shows the pair correct
        # and faster, graphs stay off; naming compile={"mode": "reduce-overhead"} turns them on.
        options.pop("mode")
        report.add(component.name, "compile", SKIPPED, "CUDA graphs off: the step cache keeps outputs across replays")
    return options


def _names_mode(config: OptimizeConfig) -> bool:
    return not isinstance(config.compile, bool) and "mode" in config.compile


def _dynamic_batch(config: OptimizeConfig) -> bool:
    # A batch dimension marked dynamic before the first trace gives one graph for every batch size: a new batch
    # size re-records CUDA graphs (1.6 s measured on an H200) instead of recompiling (80 s). dynamic=False wins.
    return config.dynamic_batch and (isinstance(config.compile, bool) or config.compile.get("dynamic", None) is not False)


def _first_net(component: Component) -> bool:
    return ".nets." not in component.name or component.name.endswith(".nets.0")


def _plan_cache(target, components: List[Component], config: OptimizeConfig, report: Report) -> List[_Step]:
    if config.cache is None:
        return []
    denoiser = next((c for c in components if c.role == DENOISER), None)
    if not is_pipeline(target) or getattr(target, "scheduler", None) is None:
        raise ValueError(
            f"cache={config.cache!r} needs a pipeline with a scheduler, got {type(target).__name__}: the cache "
            "learns where each call starts and which step it is at from the pipeline's scheduler; pass the pipeline"
        )
    if denoiser is None:
        return []
    previous = _state_of(target)
    ours = previous is not None and previous.config.cache is not None  # optimize undoes it before applying
    setting = _resolve_cache(config.cache, denoiser, report, ours)
    if setting is None:
        return []
    clock = cache_transform.StepClock(setting.interval if isinstance(setting, DeepCache) else None)
    steps = [_Step(Component("scheduler", "scheduler", target.scheduler), "cache",
                   lambda: cache_transform.attach_clock(target, clock))]  # fmt: skip
    if isinstance(setting, FirstBlockCache):
        options = _compile_options(denoiser, config, report, cached=True)
        if options is not None:
            steps.append(_Step(denoiser, "compile", lambda: cache_transform.apply_block_compile(
                denoiser.module, options, _dynamic_batch(config))))  # fmt: skip
        steps.append(_Step(denoiser, "cache",
                           lambda: cache_transform.apply_first_block_cache(denoiser.module, setting.threshold, clock)))  # fmt: skip
        for component in components:
            if component.role == CONTROLNET:
                report.add(component.name, "cache", SKIPPED, "the first-block cache applies to the denoiser only")
        return steps
    for component in components:
        if component.role not in (DENOISER, CONTROLNET):
            continue
        if not cache_transform.is_deepcache_model(component.module):
            # Only a ControlNet can get here (the denoiser was checked): it then runs in full every step, which
            # is correct, since a cached UNet step reads only its shallow residuals.
            report.add(component.name, "cache", SKIPPED, f"{type(component.module).__name__} runs in full every step")
            continue
        # Compiled modules (compile is applied after this step) need what they keep copied and batch-dynamic.
        compiled = config.compile is not False
        steps.append(_Step(component, "cache", lambda c=component: cache_transform.apply_deepcache(
            c.module, setting.interval, setting.depth, clock, own=compiled, dynamic_batch=compiled and _dynamic_batch(config))))  # fmt: skip
    return steps


def _resolve_cache(value, denoiser: Component, report: Report, ours: bool = False):
    """The DeepCache / FirstBlockCache for this denoiser. A kind that does not fit it raises (the user named it);
    "auto" skips, with the reason, where nothing fits."""
    module, given = denoiser.module, value  # messages name what the user gave
    kind = type(module).__name__
    if value == "auto":
        value = DeepCache() if cache_transform.is_deepcache_model(module) else FirstBlockCache()
        named = False
    else:
        value = {"deepcache": DeepCache(), "first_block": FirstBlockCache()}.get(value, value)
        named = True
    if isinstance(value, DeepCache):
        if not cache_transform.is_deepcache_model(module):
            raise ValueError(
                f"cache={given!r} works on UNet2DConditionModel denoisers, got {kind}; "
                "for transformers use cache='first_block' (diffopt.FirstBlockCache) or 'auto'"
            )
        deepest = cache_transform.max_depth(module)
        if value.depth > deepest:
            raise ValueError(f"DeepCache depth must be between 1 and {deepest} for this {kind}, got {value.depth}")
        return value
    reason = capabilities.require_or_skip(capabilities.first_block_cache(), named, f"cache={given!r}")
    if not reason and not cache_transform.has_cache_hooks(module):
        reason = f"diffusers {capabilities.installed_version('diffusers')} has no cache hooks (CacheMixin) on {kind}"
        if cache_transform.is_deepcache_model(module):
            reason = f"the first-block cache hooks transformer blocks; {kind} is a UNet: use cache='deepcache' or 'auto'"
        if named:
            raise ValueError(f"cache={given!r}: {reason}")
    if not reason and getattr(module, "is_cache_enabled", False) and not ours:
        reason = f"{kind} already has a diffusers cache enabled ({type(module._cache_config).__name__}); disable_cache() it first"
        if named:
            raise ValueError(f"cache={given!r}: {reason}")
    if reason:
        report.add(denoiser.name, "cache", SKIPPED, reason)
        return None
    return value


def _plan(target, config: OptimizeConfig, report: Report) -> List[_Step]:
    """Decide every step without touching anything; raises for bad input or explicit missing features."""
    components = find_components(target, include_vae=config.compile_vae)
    if not components:
        report.add(type(target).__name__, "-", SKIPPED, "no unet, transformer or controlnet found")
    steps: List[_Step] = []
    # Fixed order: processors first (compile must trace the final ones), memory format before compile
    # (compiled graphs specialize on weight strides), then the step cache, compile last. Compile must trace the
    # cached forward, so that the block wrappers and the clock flag they read become the guards of two graphs
    # (full step, cached step). In-place compile traces at the first call, when the wrappers are there in either
    # order; the order still matters for the rest: the compile planner must know which components are cached
    # (CUDA graphs, dynamic kept features), the first-block cache must wrap blocks that are compiled already
    # (its hooks capture block.forward; _plan_cache plans both), and the undo list must drop a compiled call
    # before it removes the wrappers that call traced.
    for planner in (_plan_attention, _plan_memory_format):
        for component in components:
            steps += planner(component, config, report)
    cache_steps = _plan_cache(target, components, config, report)
    steps += cache_steps
    cached = {step.component.name for step in cache_steps}
    # The first-block cache compiles its transformer block by block (see _plan_cache): no whole-model compile.
    compiled = {step.component.name for step in cache_steps if step.transform == "compile"}
    for component in components:
        if component.name not in compiled:
            steps += _plan_compile(component, config, report, cached=component.name in cached)
    return steps


def _apply(steps: List[_Step], state: _State) -> None:
    for step in steps:
        change = step.apply()
        if change is None:
            state.report.add(step.component.name, step.transform, UNCHANGED, "already in the requested state")
            continue
        state.undo.append((step.component.name, step.transform, change.undo))
        state.report.add(step.component.name, step.transform, APPLIED, change.detail)
        logger.info("diffopt: %s %s: %s", step.component.name, step.transform, change.detail)


def _undo_all(state: _State) -> List[Tuple[str, str]]:
    """Run the undo list backwards. Every undo runs even if one fails; the first error is re-raised."""
    done, errors = [], []
    while state.undo:
        component, transform, undo = state.undo.pop()
        try:
            undo()
            done.append((component, transform))
        except Exception as error:  # keep undoing the rest; report the first failure at the end
            errors.append(error)
    if errors:
        raise errors[0]
    return done


def _state_of(target) -> Optional[_State]:
    return vars(target).get(STATE_ATTR)


def optimize(target, config: Optional[OptimizeConfig] = None, **options) -> Report:
    """Make a diffusers pipeline (or a bare diffusers model) faster, in place.

    Runs, per component (the UNet or transformer, every ControlNet, and the VAE decoder when
    ``compile_vae=True``): attention processors, then memory format, then ``torch.compile``. Bad options
    raise before anything is touched; if a step fails, the steps already applied are undone. Calling it
    again replaces the previous optimization instead of stacking on it.

    Example::

        import diffopt
        report = diffopt.optimize(pipe)            # SDPA + channels_last + torch.compile
        print(report)                              # what was applied, what was skipped and why
        image = pipe(prompt).images[0]
        diffopt.restore(pipe)                      # back to eager, classic attention processors

    Options (see :class:`diffopt.OptimizeConfig`): ``attention``, ``compile``, ``memory_format``,
    ``compile_vae``, ``cache`` (off by default; see docs/caching.md).
    """
    config = OptimizeConfig.from_options(config, **options)
    # Dry run first: bad targets and missing features the user named raise here, with nothing touched.
    _plan(target, config, Report())

    previous = _state_of(target)
    if previous is not None:
        # A notebook cell run twice: go back to the original state, then apply the new options, so
        # nothing is ever wrapped or converted twice.
        _undo_all(previous)
        delattr(target, STATE_ATTR)
    report = Report("optimize")
    steps = _plan(target, config, report)

    state = _State(config=config, report=report)
    try:
        _apply(steps, state)
    except Exception:
        try:
            _undo_all(state)
            if previous is not None:
                # Leave the pipeline as the user had it: optimized with the previous options.
                optimize(target, previous.config)
        except Exception:  # the error that started the rollback is the one the user must see
            logger.exception("diffopt: rollback after a failed optimize did not complete")
        raise
    if state.undo:
        setattr(target, STATE_ATTR, state)
    return report


def restore(target, attention: str = "default") -> Report:
    """Undo :func:`optimize`: original modules uncompiled, original memory format, and attention on the
    classic processors (``attention="default"``: AttnProcessor, AttnAddedKVProcessor, IPAdapterAttnProcessor,
    the deterministic, exportable state) or exactly the processors that were there before optimize
    (``attention="original"``). Safe on a pipeline that was never optimized.

    Example::

        diffopt.restore(pipe)
        torch.export.export(pipe.unet, args, kwargs)   # works on the classic processors
    """
    check_choice("restore attention", attention, RESTORE_ATTENTION_CHOICES)
    check_target(target)
    state = _state_of(target)
    components = find_components(target, include_vae=bool(state and state.config.compile_vae))
    report = Report("restore")
    if state is not None:
        try:
            for component, transform in _undo_all(state):
                report.add(component, transform, APPLIED, "undone")
        finally:
            delattr(target, STATE_ATTR)
    if attention == "default":
        for component in components:
            change = apply_attention(component.module, "default")
            status, detail = (APPLIED, change.detail) if change else (UNCHANGED, "already on the classic processors")
            report.add(component.name, "attention", status, detail)
    return report
