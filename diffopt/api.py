"""optimize() and restore().

``optimize`` plans every transform (``transforms.ORDER``) against the shared facts of the call, then applies the
steps in order; each transform records what it changed as layers on the objects it changed (see layers.py). A
failure or an interrupt at any point takes off every layer this call added. ``restore`` takes off every layer on
the objects a pipeline holds, newest first. Neither keeps anything on the side: the objects are the state.
"""
from __future__ import annotations

import copy
import logging
import weakref
from typing import Any, List, Optional, Tuple

from . import transforms
from .components import check_target, default_attention_family, find_components, is_pipeline
from .config import RESTORE_ATTENTION_CHOICES, OptimizeConfig, check_choice
from .layers import Layer, attach, layers_of, mark, undo_all
from .plan import Context, Step
from .report import APPLIED, SKIPPED, UNCHANGED, Report
from .transforms import compile as compile_transform
from .transforms import timesteps
from .transforms.attention import apply_attention

logger = logging.getLogger(__name__)


class Optimized(Layer):
    """On the pipeline (or bare model) and on each of its components: the options it was last optimized with, and
    a weak reference to what was optimized, so that a failed optimize can put them back. On the components too,
    because a pipeline that shares them (``from_pipe``) takes their layers off when it is optimized, and if that
    fails, the other pipeline's optimization must come back as well. Changes nothing itself."""

    transform = "optimize"

    def __init__(self, config: OptimizeConfig, target: Any):
        self.config = config
        self.target = weakref.ref(target)

    def optimized(self) -> Optional[Any]:
        """What was optimized with ``config``, or None when it is gone (or this record was unpickled)."""
        return self.target() if self.target is not None else None

    def undo(self, owner) -> None:
        pass

    # A weak reference cannot be pickled, and a copy must not point at the original pipeline.
    def __getstate__(self):
        return {**vars(self), "target": None}

    def __deepcopy__(self, memo):
        twin = copy.copy(self)  # the config is frozen: shared
        target = self.optimized()
        if target is not None and id(target) in memo:  # copied along with what it optimized: point at that copy
            twin.target = weakref.ref(memo[id(target)])
        return twin


#: The parts of a pipeline, beside its models, that transforms hook (timesteps and step caching the scheduler, the
#: 8-bit conversion the image processor); restore walks them, and the report names them by these names.
PIPELINE_PARTS = ("scheduler", "image_processor")


def _owners(target) -> List[Any]:
    """Every object optimize may have changed: the target, its scheduler and image processor, and every module of
    its denoiser, ControlNets and VAE (the VAE too, whatever compile_vae was: restore must not depend on the
    options)."""
    owners = [target]
    if is_pipeline(target):
        for name in PIPELINE_PARTS:
            part = getattr(target, name, None)
            if hasattr(part, "__dict__"):  # where layers are recorded; None and slotted objects hold none
                owners.append(part)
        for name in ("unet", "transformer", "controlnet", "vae"):
            module = getattr(target, name, None)
            if module is not None and hasattr(module, "modules"):
                owners += list(module.modules())
    else:
        owners += list(target.modules())
    return owners


def _component_names(target) -> dict:
    """id(object) -> the name the report uses for it: the component that holds it."""
    names = {id(target): "pipeline" if is_pipeline(target) else type(target).__name__}
    if is_pipeline(target):
        for name in PIPELINE_PARTS:
            if getattr(target, name, None) is not None:
                names[id(getattr(target, name))] = name
    for component in find_components(target, include_vae=True):
        for module in component.module.modules():
            names.setdefault(id(module), component.name)
    return names


def _plan(target, config: OptimizeConfig, report: Report) -> List[Step]:
    """Decide every step without touching anything; raises for bad input or explicit missing features."""
    components = find_components(target, include_vae=config.compile_vae)
    if not components:
        report.add(type(target).__name__, "-", SKIPPED, "no unet, transformer or controlnet found")
    ctx = Context(target, config, report, components, compile_cache=_compile_cache(config))
    # The facts other transforms depend on: what is compiled (and how), and where the timesteps live.
    ctx.compile_options = {c.name: compile_transform.options_for(c, ctx, report) for c in components}
    ctx.timesteps_on_cpu = timesteps.decide(ctx) is None
    steps: List[Step] = []
    for transform in transforms.ORDER:
        steps += transform.plan(ctx)
    return steps


def _compile_cache(config: OptimizeConfig):
    from . import compile_cache

    return compile_cache.entry_factory(config.compile_cache)


def optimize(target, config: Optional[OptimizeConfig] = None, **options) -> Report:
    """Make a diffusers pipeline (or a bare diffusers model) faster, in place.

    Runs, per component (the UNet or transformer, every ControlNet, and the VAE decoder when
    ``compile_vae=True``): attention processors, then fused QKV projections (opt-in), then memory format,
    then quantization (opt-in, not on the VAE), then ``torch.compile``. On a pipeline, decoded PIL images are
    also made 8-bit on their device (``device_postprocess``). Bad options raise before anything is
    touched; if a step fails, or the call is interrupted, everything it applied is undone. Calling it again
    replaces the previous optimization instead of stacking on it. Components shared with another pipeline
    (``from_pipe``) carry their optimization with them. LoRA and IP-Adapter weights may be loaded before or
    after; ``restore`` keeps them.

    Example::

        import diffopt
        report = diffopt.optimize(pipe)            # SDPA + channels_last + torch.compile
        print(report)                              # what was applied, what was skipped and why
        image = pipe(prompt).images[0]
        diffopt.restore(pipe)                      # back to eager, classic attention processors

    Options: see :class:`diffopt.OptimizeConfig`, one field per option.
    """
    config = OptimizeConfig.from_options(config, **options)
    check_target(target)
    # Dry run first: bad targets and missing features the user named raise here, with nothing touched.
    _plan(target, config, Report())

    # A notebook cell run twice: back to the original state first, so nothing is ever wrapped or converted twice.
    # This also takes off what another pipeline sharing these components (from_pipe) applied to them.
    undone, errors = undo_all(_owners(target))
    if errors:
        raise errors[0]
    report = Report("optimize")
    since = mark()
    try:
        steps = _plan(target, config, report)
        for step in steps:
            applied = step.apply()
            if applied is None:
                report.add(step.component, step.transform, UNCHANGED, "already in the requested state")
                continue
            detail = applied if isinstance(applied, str) else applied.detail
            report.add(step.component, step.transform, APPLIED, detail)
            logger.info("diffopt: %s %s: %s", step.component, step.transform, detail)
        if report.applied:
            owners = [target] + [c.module for c in find_components(target, include_vae=config.compile_vae)]
            for owner in {id(owner): owner for owner in owners}.values():  # a bare model is its own component
                attach(owner, Optimized(config, target))
    except BaseException:  # an error, or Ctrl-C half-way: leave nothing of this call behind
        undo_all(_owners(target), since)
        # And put back what the user had: this target and any pipeline sharing its components, each optimized
        # with its previous options, oldest first so that shared components end up as they were.
        for previous, previous_config in _previous_optimizations(undone):
            try:
                optimize(previous, previous_config)
            except Exception:  # the error that started the rollback is the one the user must see
                logger.exception("diffopt: re-applying the previous options after a failed optimize did not complete")
        raise
    _warn_pending_lora_hotswap(target)
    return report


def _previous_optimizations(undone) -> List[Tuple[Any, OptimizeConfig]]:
    """The targets whose optimization an undo took off, with their options, in the order they were optimized."""
    found = {}
    for _, layer in reversed(undone):  # undone is newest first
        target = layer.optimized() if isinstance(layer, Optimized) else None
        if target is not None:
            found.setdefault(id(target), (target, layer.config))
    return list(found.values())


def _warn_pending_lora_hotswap(target) -> None:
    # enable_lora_hotswap() only takes effect when the first LoRA is loaded, and peft refuses to prepare a
    # compiled model: that load, after optimize, would fail. Say so now, while the fix is one line away. peft
    # looks at the model itself, so a transformer whose blocks are compiled one by one (compile_blocks) loads fine.
    for component in find_components(target):
        compiled = compile_transform.compiled_by_diffopt(component.module)
        if compiled and getattr(component.module, "_prepare_lora_hotswap_kwargs", None) is not None:
            logger.warning(
                "diffopt: %s has LoRA hot-swap enabled but no LoRA loaded yet; loading the first LoRA into the "
                "compiled model will fail. Load it before diffopt.optimize (or restore, load, optimize again).",
                component.name,
            )


def restore(target, attention: str = "default") -> Report:
    """Undo :func:`optimize`: original modules uncompiled, original memory format, and attention on the
    classic processors (``attention="default"``: AttnProcessor, AttnAddedKVProcessor, IPAdapterAttnProcessor,
    the deterministic, exportable state; transformers such as SD3, Flux and PixArt go back to the processors
    diffusers builds them with) or exactly the processors that were there before optimize
    (``attention="original"``). Loaded LoRA and IP-Adapter weights stay. Components shared with another
    pipeline are restored too (the other pipeline then runs them restored). Safe on a pipeline that was never
    optimized; if an undo fails, the others still run and the failed one stays recorded, so restore can be
    called again.

    Example::

        diffopt.restore(pipe)
        torch.export.export(pipe.unet, args, kwargs)   # works on the classic processors
    """
    check_choice("restore attention", attention, RESTORE_ATTENTION_CHOICES)
    check_target(target)
    names = _component_names(target)
    report = Report("restore")
    done, errors = undo_all(_owners(target))
    seen = set()
    for owner, layer in reversed(done):  # in the order they were applied
        key = (names.get(id(owner), type(owner).__name__), layer.transform)
        if layer.transform != "optimize" and key not in seen:
            seen.add(key)
            report.add(*key, APPLIED, "undone")
    if errors:
        raise errors[0]
    if attention == "default":
        vae_touched = any(
            names.get(id(owner)) == "vae.decoder" and not isinstance(layer, Optimized) for owner, layer in done
        )
        for component in find_components(target, include_vae=vae_touched):
            family = default_attention_family(component.module)
            applied = apply_attention(component.module, family, record=False)
            detail = applied.detail if applied else None
            where = "the classic processors" if family == "default" else "its default SDPA processors"
            status, detail = (APPLIED, detail) if detail else (UNCHANGED, f"already on {where}")
            report.add(component.name, "attention", status, detail)
    return report


def is_optimized(target) -> bool:
    """Whether diffopt has changed anything on ``target`` or the objects it holds."""
    return any(layers_of(owner) for owner in _owners(target))


def wait_until_compiled(target, timeout: Optional[float] = None) -> bool:
    """Block until the models of ``target`` that compile in the background run compiled code for every input
    shape they have been called with, or for ``timeout`` seconds; True when none is left waiting. Benchmarks and
    servers call it after a first call (a warm-up) so that what follows is timed or served compiled.

    Example::

        diffopt.optimize(pipe)
        pipe(prompt, num_inference_steps=2)   # runs at once, uncompiled; the compile starts elsewhere
        diffopt.wait_until_compiled(pipe)     # about as long as a first compiled call would have taken
    """
    check_target(target)
    modules = [component.module for component in find_components(target)]
    return compile_transform.wait_for_background_compiles(modules, timeout)
