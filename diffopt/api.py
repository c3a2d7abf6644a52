"""optimize() and restore(): plan, apply in a fixed order, keep the undo list on the pipeline."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Tuple

from . import capabilities
from .components import (
    CONTROLNET, DENOISER, Component, check_target, conv_share, default_attention_family, find_components, module_device,
)
from .config import RESTORE_ATTENTION_CHOICES, OptimizeConfig, check_choice
from .report import APPLIED, SKIPPED, UNCHANGED, Report
from .transforms import attention as attention_transform
from .transforms.attention import apply_attention
from .transforms.compile import apply_compile, default_options, is_compiled
from .transforms.fuse_projections import ALREADY_FUSED, apply_fuse_projections
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


def _plan_compile(component: Component, config: OptimizeConfig, report: Report) -> List[_Step]:
    if config.compile is False:
        return []
    reason = capabilities.require_or_skip(capabilities.compile(), config.asks_for("compile"), "compile")
    if not reason and is_compiled(component.module):
        reason = "already compiled outside diffopt; left as it is"
    if reason:
        report.add(component.name, "compile", SKIPPED, reason)
        return []
    options = default_options(module_device(component.module))
    if not isinstance(config.compile, bool):  # a dict of torch.compile options over the defaults
        user = dict(config.compile)
        # torch.compile takes a mode or inductor options, never both, and modes mean nothing to other backends.
        if "mode" not in user and ("options" in user or user.get("backend", "inductor") != "inductor"):
            options.pop("mode", None)
        options.update(user)
    if component.role == CONTROLNET and options.get("mode") == "reduce-overhead" and not _names_mode(config):
        # Measured on an H200 (benchmarks/controlnet_cudagraphs.py): a ControlNet compiled in place with CUDA
        # graphs has its residuals overwritten by its next replay while the UNet's graph still reads them
        # ("accessing tensor output of CUDAGraphs that has been overwritten"). Without graphs it is correct.
        options.pop("mode")
        report.add(component.name, "compile", SKIPPED, "CUDA graphs off: its outputs feed the UNet's CUDA graph")
    return [_Step(component, "compile", lambda: apply_compile(component.module, options))]


def _names_mode(config: OptimizeConfig) -> bool:
    return not isinstance(config.compile, bool) and "mode" in config.compile


def _plan(target, config: OptimizeConfig, report: Report) -> List[_Step]:
    """Decide every step without touching anything; raises for bad input or explicit missing features."""
    components = find_components(target, include_vae=config.compile_vae)
    if not components:
        report.add(type(target).__name__, "-", SKIPPED, "no unet, transformer or controlnet found")
    steps: List[_Step] = []
    # Fixed order: processors first (compile must trace the final ones; fusing swaps some processors for
    # fused ones, so it follows the attention family), memory format before compile
    # (compiled graphs specialize on weight strides), compile last.
    for planner in (_plan_attention, _plan_fuse_projections, _plan_memory_format, _plan_compile):
        for component in components:
            steps += planner(component, config, report)
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
    then ``torch.compile``. Bad options raise before anything is touched; if a step fails, the steps already
    applied are undone. Calling it again replaces the previous optimization instead of stacking on it.
    LoRA and IP-Adapter weights may be loaded before or after; ``restore`` keeps them.

    Example::

        import diffopt
        report = diffopt.optimize(pipe)            # SDPA + channels_last + torch.compile
        print(report)                              # what was applied, what was skipped and why
        image = pipe(prompt).images[0]
        diffopt.restore(pipe)                      # back to eager, classic attention processors

    Options (see :class:`diffopt.OptimizeConfig`): ``attention``, ``compile``, ``memory_format``,
    ``compile_vae``, ``fuse_projections``.
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
