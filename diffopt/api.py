"""optimize() and restore(): plan, apply in a fixed order, keep the undo list on the pipeline."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Tuple

from . import capabilities
from .components import (
    CONTROLNET, DENOISER, Component, check_target, conv_share, default_attention_family, find_components, is_pipeline,
    is_transformer, module_device, module_dtype,
)
from .config import RESTORE_ATTENTION_CHOICES, DeepCache, FirstBlockCache, OptimizeConfig, check_choice
from .report import APPLIED, SKIPPED, UNCHANGED, Report
from .transforms import Change
from .transforms import attention as attention_transform
from .transforms import attention_backend
from .transforms import cache as cache_transform
from .transforms.attention import apply_attention
from .transforms.compile import CUDA_GRAPH_MODES, apply_compile, default_options, is_compiled, uses_cuda_graphs
from .transforms.fuse_projections import ALREADY_FUSED, apply_fuse_projections
from .transforms.memory_format import apply_memory_format
from .transforms import quantize as quantize_transform
from .transforms import timesteps as timesteps_transform

logger = logging.getLogger(__name__)

#: The attribute on the pipeline (or bare model) that holds what optimize did, until restore removes it.
STATE_ATTR = "_diffopt_state"
#: Below this share of parameters in conv layers, channels_last has nothing to speed up. Transformers hold at most a
#: patch-embedding conv (0% of SD3's or Flux's weights); the least conv-heavy UNet, SDXL's, holds 13%, and at
#: 1024 px its convolutions are still 24% of the FLOPs, so it keeps channels_last, as the seed recipe does.
MIN_CONV_SHARE_FOR_CHANNELS_LAST = 0.05


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
    if family is None:
        return []
    if family not in attention_transform.FAMILIES or attention_backend.dispatcher_layers(component.module):
        return _plan_attention_backend(component, config, report)
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


def _plan_attention_backend(component: Component, config: OptimizeConfig, report: Report) -> List[_Step]:
    """A kernel ("flash", "math", ...), flex, sage or "auto"; or any choice on a model with dispatcher layers."""
    module, name, explicit = component.module, config.attention, config.asks_for("attention")
    device, dtype = module_device(module), module_dtype(module)
    prefix = ""
    if name == "auto":
        name, card = capabilities.auto_attention(device, dtype)
        prefix, explicit = f"auto -> {name} ({card}): ", False
    option = f"attention={config.attention!r}"
    gates = [capabilities.attention_backend(name, device, dtype)]
    direct = attention_backend.direct_layers(module)
    if direct and name in attention_backend.DISPATCHER_ONLY:
        classes = sorted({type(m.processor).__name__ for _, m in direct})
        gates.append(capabilities.Gate(
            f"{name} attention on {component.name}", False, "attention layers on diffusers' attention dispatcher",
            f"{len(direct)} layers whose {', '.join(classes)} call F.scaled_dot_product_attention themselves",
        ))
    # "sdpa" left at its default keeps a backend the user chose on the dispatcher (set_attention_backend, or the
    # DIFFUSERS_ATTN_BACKEND variable); named, it means diffusers' "native".
    dispatcher = name in attention_backend.DISPATCHER and (name != "sdpa" or explicit)
    # "auto" only prefers a kernel: dispatcher layers go to "native" and run under the same preference.
    prefer = config.attention == "auto" and name in attention_backend.KERNELS
    routed = attention_backend.dispatcher_layers(module)
    if dispatcher and routed:
        parallel = any(getattr(m.processor, "_parallel_config", None) is not None for _, m in routed)
        target = "native" if prefer else attention_backend.DISPATCHER[name]
        gates.append(capabilities.dispatcher_backend(target, context_parallel=parallel))
    for gate in gates:
        reason = capabilities.require_or_skip(gate, explicit, option)
        if reason:
            report.add(component.name, "attention", SKIPPED, prefix + reason)
            return []
    family = attention_backend.FAMILY.get(name, "sdpa")
    missing = attention_transform.missing_classes(family) if direct and name not in attention_backend.DISPATCHER_ONLY else []
    if missing:
        reason = f"{option}: diffusers {capabilities.installed_version('diffusers')} lacks {', '.join(missing)}"
        if explicit:
            raise capabilities.UnsupportedFeatureError(reason)
        report.add(component.name, "attention", SKIPPED, prefix + reason)
        return []

    def apply():
        change = attention_backend.apply_attention_backend(module, name, prefer=prefer, dispatcher=dispatcher)
        if not prefix:
            return change
        # "auto" always says what it picked, even where that was in place already.
        return Change(prefix + (change.detail if change else "already in place"), change.undo if change else lambda: None)

    return [_Step(component, "attention", apply)]
def _plan_fuse_projections(component: Component, config: OptimizeConfig, report: Report) -> List[_Step]:
    if not config.fuse_projections:
        return []
    gate = capabilities.fuse_projections(component.module)
    if not gate.ok:
        # Only the denoiser makes a named fuse_projections an error: a VAE decoder or a ControlNet that cannot
        # fuse is no reason to refuse the rest. A model fused by the user is left alone, as for compile.
        if config.asks_for("fuse_projections") and component.role == DENOISER and gate.found != ALREADY_FUSED:
            raise capabilities.UnsupportedFeatureError(f"fuse_projections: {gate.reason}")
        reason = gate.found if gate.found == ALREADY_FUSED else gate.reason
        report.add(component.name, "fuse_projections", SKIPPED, reason)
        return []
    return [_Step(component, "fuse_projections", lambda: apply_fuse_projections(component.module))]


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


def _plan_quantize(component: Component, config: OptimizeConfig, report: Report) -> List[_Step]:
    mode = config.quantize
    if mode is None or component.role not in (DENOISER, CONTROLNET):
        return []  # the VAE runs once per image and is conv-bound: 8-bit Linear layers would not pay there
    gate = capabilities.quantize(mode, module_device(component.module))
    reason = capabilities.require_or_skip(gate, config.asks_for("quantize"), f"quantize={mode!r}")
    if reason:
        report.add(component.name, "quantize", SKIPPED, reason)
        return []
    chosen, skipped = quantize_transform.select_layers(component.module, mode)
    if not chosen:
        kept = quantize_transform.describe_skipped(skipped) or "it has none"
        report.add(component.name, "quantize", SKIPPED, f"no Linear layer worth quantizing ({kept})")
        return []
    return [_Step(component, "quantize", lambda: quantize_transform.apply_quantize(component.module, mode))]


def _plan_compile(component: Component, config: OptimizeConfig, report: Report, timesteps_on_cpu=False) -> List[_Step]:
    options = _compile_options(component, config, report)
    if options is None:
        return []
    # diffusers' ControlNet pipelines call cudagraph_mark_step_begin() each step only when the UNet and the
    # ControlNet are OptimizedModule wrappers; modules compiled in place do not pass that check, and without it
    # the UNet's CUDA graph reads residuals that the ControlNet's next replay has overwritten (seen on an H200).
    # So the first ControlNet of each step marks the step itself; later nets of a MultiControlNet must not,
    # or they would free the residuals of the nets before them.
    new_step = component.role == CONTROLNET and uses_cuda_graphs(options) and _first_net(component)
    # A batch dimension marked dynamic before the first trace gives one graph for every batch size: a new batch
    # size re-records CUDA graphs (1.6 s measured on an H200) instead of recompiling (80 s). dynamic=False wins.
    dynamic_batch = config.dynamic_batch and options.get("dynamic", None) is not False
    # With the scheduler's timesteps on the CPU (_plan_cpu_timesteps), the UNet and ControlNets get them as GPU
    # fills, each on its own device (a ControlNet may sit on another card than the UNet).
    on_cpu = timesteps_on_cpu and component.role in (DENOISER, CONTROLNET)
    scalars_to = module_device(component.module) if on_cpu else None
    return [_Step(component, "compile",
                  lambda: apply_compile(component.module, options, new_step, dynamic_batch, scalars_to))]  # fmt: skip


def _compile_options(component: Component, config: OptimizeConfig, report: Report, block_cached: bool = False):
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
    if block_cached and options.get("mode") in CUDA_GRAPH_MODES and not _names_mode(config):
        # The first-block cache decides on every step whether to skip the remaining blocks and reuses residuals
        # across steps; per-block CUDA graphs under that have not been run on a GPU, so they stay off unless
        # named. DeepCache keeps them: it copies what it keeps out of the graphs' pool after each full step, and
        # on an H100 its SD1.5 cell ran at 238 steps/s with graphs against 97 without, with the same output.
        options.pop("mode")
        report.add(component.name, "compile", SKIPPED, "CUDA graphs off: the first-block cache is untested with them")
    return attention_backend.compile_options(config.attention, options)


def _names_mode(config: OptimizeConfig) -> bool:
    return not isinstance(config.compile, bool) and "mode" in config.compile


def _dynamic_batch(config: OptimizeConfig) -> bool:
    """As _plan_compile decides it, for what the step cache compiles or keeps."""
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
        options = _compile_options(denoiser, config, report, block_cached=True)
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


def _plan_cpu_timesteps(target, components: List[Component], config: OptimizeConfig, report: Report):
    """The step that keeps the scheduler's timesteps on the CPU, and whether the compiled UNet and ControlNets
    must then make each timestep on their device; ([], False) where it does not apply. On by default where it
    applies, so a pipeline it does not fit gets no report line (``assert not report.skipped`` stays true on a
    CPU); named, the reason is reported, and it is an error where the pipeline could run on a GPU but cannot take
    it."""
    denoiser = next((c for c in components if c.role == DENOISER), None)
    if not config.cpu_timesteps or denoiser is None:
        return [], False
    named = config.asks_for("cpu_timesteps")
    device = module_device(denoiser.module)
    if device.type != "cuda":  # nothing waits for a GPU: a no-op, not a missing feature
        if named:
            reason = f"{denoiser.name} runs on {device.type}; only a GPU makes the loop wait"
            report.add("scheduler", "cpu_timesteps", SKIPPED, reason)
        return [], False
    reason = _cpu_timesteps_blocker(target, components, denoiser, config)
    if reason:
        if named:
            raise ValueError(f"cpu_timesteps=True: {reason}")
        return [], False
    scheduler = target.scheduler
    step = _Step(Component("scheduler", "scheduler", scheduler), "cpu_timesteps",
                 lambda: timesteps_transform.apply_cpu_timesteps(scheduler))  # fmt: skip
    return [step], True


def _cpu_timesteps_blocker(target, components, denoiser: Component, config: OptimizeConfig) -> Optional[str]:
    scheduler = getattr(target, "scheduler", None)
    if not is_pipeline(target) or not timesteps_transform.takes_device(scheduler):
        return f"needs a pipeline whose scheduler.set_timesteps takes a device, got {type(target).__name__}"
    kind = type(denoiser.module).__name__
    if is_transformer(denoiser.module):
        # They pass t.expand(batch), not one scalar, and flow-match schedulers index by step, not by timestep.
        return f"{kind} takes a batch of timesteps; only UNet pipelines are covered"
    if not any("UNet" in cls.__name__ for cls in type(denoiser.module).__mro__):
        return f"{kind} is not a UNet; only UNet pipelines are covered"
    if not timesteps_transform.waits_every_step(scheduler):
        return (f"{type(scheduler).__name__} does not read its timesteps every step, so there is no wait to remove "
                f"(covered: {', '.join(timesteps_transform.WAITING_SCHEDULERS)})")  # fmt: skip
    ours = _compiled_by_diffopt(target)
    for component in components:
        if component.role in (DENOISER, CONTROLNET) and not _will_compile(component, config, ours):
            # Eager code would copy each CPU timestep to the GPU with a blocking copy: the wait this removes.
            return f"{component.name} is not compiled by diffopt, so it would copy each timestep with a blocking copy"
    return None


def _compiled_by_diffopt(target) -> set:
    """Names of the components the target's current optimize compiled. optimize's dry run sees them compiled; the
    real run undoes that first, so they count as diffopt's, not as "compiled outside diffopt"."""
    state = _state_of(target)
    return {name for name, transform, _ in state.undo if transform == "compile"} if state else set()


def _will_compile(component: Component, config: OptimizeConfig, ours: set) -> bool:
    if component.name in ours:
        return config.compile is not False
    return _compile_options(component, config, Report()) is not None


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
    # Fixed order: processors first (compile must trace the final ones; fusing swaps some processors for
    # fused ones, so it follows the attention family), memory format before compile (compiled graphs specialize
    # on weight strides), quantization before compile (dynamo traces through torchao's weight subclasses, so the
    # 8-bit matmuls and the activation quantization become part of the graph inductor fuses; quantizing a
    # compiled module would swap the parameters its graph guards on and recompile, or leave CUDA graphs replaying
    # the old weights), then CPU timesteps and the step cache (both hook the scheduler), compile last. Compile
    # must trace the cached forward, so that the block wrappers and the clock flag they read become the guards of
    # two graphs (full step, cached step). In-place compile traces at the first call, when the wrappers are there
    # in either order; the order still matters for the rest: the first-block cache must wrap blocks that are
    # compiled already (its hooks capture block.forward; _plan_cache plans both), and the undo list must drop a
    # compiled call before it removes the wrappers that call traced.
    for planner in (_plan_attention, _plan_fuse_projections, _plan_memory_format, _plan_quantize):
        for component in components:
            steps += planner(component, config, report)
    cache_steps = _plan_cache(target, components, config, report)
    # Before the cache: its clock hooks wrap scheduler.set_timesteps too, and must come off first on undo.
    timestep_steps, timesteps_on_cpu = _plan_cpu_timesteps(target, components, config, report)
    steps += timestep_steps + cache_steps
    # The first-block cache compiles its transformer block by block (see _plan_cache): no whole-model compile.
    compiled = {step.component.name for step in cache_steps if step.transform == "compile"}
    for component in components:
        if component.name not in compiled:
            steps += _plan_compile(component, config, report, timesteps_on_cpu)
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
    ``compile_vae=True``): attention processors, then fused QKV projections (opt-in), then memory format,
    then quantization (opt-in, not on the VAE), then ``torch.compile``. Bad options raise before anything is
    touched; if a step fails, the steps already applied are undone. Calling it again replaces the previous
    optimization instead of stacking on it. LoRA and IP-Adapter weights may be loaded before or after;
    ``restore`` keeps them.

    Example::

        import diffopt
        report = diffopt.optimize(pipe)            # SDPA + channels_last + torch.compile
        print(report)                              # what was applied, what was skipped and why
        image = pipe(prompt).images[0]
        diffopt.restore(pipe)                      # back to eager, classic attention processors

    Options (see :class:`diffopt.OptimizeConfig`): ``attention``, ``compile``, ``memory_format``,
    ``compile_vae``, ``dynamic_batch``, ``fuse_projections``, ``quantize`` (opt-in: "fp8", "int8" or
    "int8-weight-only", with torchao), ``cache`` (opt-in step caching; see docs/caching.md).
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
    _warn_pending_lora_hotswap(steps)
    return report


def _warn_pending_lora_hotswap(steps: List[_Step]) -> None:
    # enable_lora_hotswap() only takes effect when the first LoRA is loaded, and peft refuses to prepare a
    # compiled model: that load, after optimize, would fail. Say so now, while the fix is one line away.
    for step in steps:
        module = step.component.module
        if step.transform == "compile" and getattr(module, "_prepare_lora_hotswap_kwargs", None) is not None:
            logger.warning(
                "diffopt: %s has LoRA hot-swap enabled but no LoRA loaded yet; loading the first LoRA into the "
                "compiled model will fail. Load it before diffopt.optimize (or restore, load, optimize again).",
                step.component.name,
            )


def restore(target, attention: str = "default") -> Report:
    """Undo :func:`optimize`: original modules uncompiled, original memory format, and attention on the
    classic processors (``attention="default"``: AttnProcessor, AttnAddedKVProcessor, IPAdapterAttnProcessor,
    the deterministic, exportable state; transformers such as SD3, Flux and PixArt go back to the processors
    diffusers builds them with) or exactly the processors that were there before optimize
    (``attention="original"``). Loaded LoRA and IP-Adapter weights stay. Safe on a pipeline that was never
    optimized.

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
            family = default_attention_family(component.module)
            change = apply_attention(component.module, family)
            where = "the classic processors" if family == "default" else "its default SDPA processors"
            status, detail = (APPLIED, change.detail) if change else (UNCHANGED, f"already on {where}")
            report.add(component.name, "attention", status, detail)
    return report
