"""Attention backends: which kernel computes attention, per attention layer.

diffusers has two kinds of attention layers, and a backend has to be selected differently on each:

- **direct** layers, whose processors call ``F.scaled_dot_product_attention`` themselves (the UNet's, ControlNet's
  and VAE's ``AttnProcessor2_0``, SD3's ``JointAttnProcessor2_0``, PixArt). diffusers' ``set_attention_backend`` is
  a no-op on them. The layer's ``forward`` is wrapped (on the instance, never the class) so that it runs under
  ``torch.nn.attention.sdpa_kernel``; dynamo traces that context manager into the compiled graph, and the processor
  object itself is not touched, so adapters loaded later and ``attn_processors`` keep working.
- **dispatcher** layers, whose processors carry ``_attention_backend`` and call diffusers' ``dispatch_attention_fn``
  (Flux, Wan, ...). Their backend is set with ``model.set_attention_backend``; the undo puts back every processor's
  own setting *and* the process-wide active backend, which diffusers' ``reset_attention_backend`` leaves behind.
"""
from __future__ import annotations

import functools
import logging
from collections import Counter
from typing import List, Optional, Tuple

import torch

from .. import capabilities
# The names of attention= and what each means on direct and dispatcher layers: one table, in attention_names.
from ..attention_names import DISPATCHER, DISPATCHER_ONLY, FAMILY, KERNELS
from ..components import module_device, module_dtype
from ..config import is_inductor
from ..layers import Applied, Layer, UnpicklableHook, attach, detach, find, mark, undo_all
from ..plan import Step
from ..report import SKIPPED
from .attention import FAMILIES, NAME, apply_attention, attention_modules, missing_classes

logger = logging.getLogger(__name__)

#: The order torch tries its kernels in by default; "auto" moves its pick to the front.
TORCH_ORDER = ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "MATH", "CUDNN_ATTENTION")


def dispatcher_layers(model: torch.nn.Module) -> List[Tuple[str, torch.nn.Module]]:
    """Attention layers whose processor goes through diffusers' attention dispatcher."""
    return [(n, m) for n, m in attention_modules(model) if hasattr(m.processor, "_attention_backend")]


def direct_layers(model: torch.nn.Module) -> List[Tuple[str, torch.nn.Module]]:
    """Attention layers whose processor is outside the dispatcher (it calls SDPA, or another kernel, itself)."""
    return [(n, m) for n, m in attention_modules(model) if not hasattr(m.processor, "_attention_backend")]


def _sdpa_backends(names):
    from torch.nn.attention import SDPBackend

    return [getattr(SDPBackend, n) for n in names]


class KernelForward(UnpicklableHook):
    """An attention layer's ``forward`` run under ``sdpa_kernel(kernels)``; ``prefer``: only moved to the front
    (fallback allowed), else nothing else allowed (a kernel that cannot run raises instead of silently falling
    back). dynamo traces the context manager into the compiled graph; the processor itself is not touched, so
    adapters loaded later and ``attn_processors`` keep working.

    The layer's ``forward`` becomes a method bound to the layer, of one function per attention class and kernel
    choice (:func:`_forward_under_kernels`), not this object: dynamo guards on the identity of a callable object
    installed as ``forward``, so an object per layer would give every block of a transformer compiled block by
    block a graph of its own (57 compiles instead of 2 for Flux). Where the layer already had a ``forward`` of its
    own, this object is installed and calls it, as other hooks do.
    """

    transform = "attention"

    def __init__(self, owner, kernels: Tuple[str, ...], prefer: bool):
        super().__init__(owner, "forward")
        self.kernels, self.prefer = tuple(kernels), prefer

    def install(self) -> "KernelForward":
        if self.had_own:
            return super().install()
        method = _forward_under_kernels(type(self.owner), self.kernels, self.prefer).__get__(self.owner)
        setattr(self.owner, self.name, method)
        return attach(self.owner, self)

    def holds_this(self, value) -> bool:
        return super().holds_this(value) or (
            getattr(value, "__self__", None) is self.owner
            and getattr(value, "__func__", None) is _forward_under_kernels(type(self.owner), self.kernels, self.prefer)
        )

    def around(self, *args, **kwargs):
        with _kernels_context(self.kernels, self.prefer):
            return self.inner(*args, **kwargs)

    @property
    def unpicklable(self) -> str:  # a bound function of a closure: pickle would drop the kernel silently
        return (f"the attention kernel {'preference' if self.prefer else 'choice'} {list(self.kernels)} set by "
                f"diffopt.optimize on {type(self.owner).__name__}")


def _kernels_context(kernels: Tuple[str, ...], prefer: bool):
    from torch.nn.attention import sdpa_kernel

    backends = _sdpa_backends(kernels)
    # set_priority (torch 2.6) is passed only when preferring, so forcing works on torch 2.3-2.5 too.
    return sdpa_kernel(backends, set_priority=True) if prefer else sdpa_kernel(backends)


@functools.lru_cache(maxsize=None)
def _forward_under_kernels(cls: type, kernels: Tuple[str, ...], prefer: bool):
    """``cls.forward`` under ``sdpa_kernel(kernels)``, as a function of the layer; the same function object for
    every layer of ``cls`` with that choice (see :class:`KernelForward`)."""
    forward = cls.forward

    @functools.wraps(forward)
    def forward_under_kernels(self, *args, **kwargs):
        with _kernels_context(kernels, prefer):
            return forward(self, *args, **kwargs)

    return forward_under_kernels


def kernel_of(attn: torch.nn.Module) -> Optional[Tuple[str, ...]]:
    """The SDPA kernels a layer's forward was wrapped with by diffopt, or None (also under a hook added since, such
    as accelerate's, which calls the wrapped forward)."""
    layer = find(attn, KernelForward)
    return layer.kernels if layer is not None else None


def _wrap_forwards(layers, kernels: Tuple[str, ...], prefer: bool) -> Optional[str]:
    if not layers:
        return None
    done = []
    try:
        for _, attn in layers:
            done.append((attn, KernelForward(attn, kernels, prefer).install()))
    except BaseException:
        _undo(done)
        raise
    verb = "prefer" if prefer else "sdpa_kernel"
    classes = Counter(type(attn.processor).__name__ for _, attn in layers)
    return f"{verb}({kernels[0] if prefer else ', '.join(kernels)}) on {len(layers)} layers (" + ", ".join(
        f"{n}x {c}" for c, n in classes.items()
    ) + ")"


def _undo(done) -> None:
    for owner, layer in reversed(done):
        layer.undo(owner)
        detach(owner, layer)


def _registry():
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

    return AttentionBackendName, _AttentionBackendRegistry


def _effective(processor, active):
    own = getattr(processor, "_attention_backend", None)
    return active if own is None else own


class DispatcherBackend(Layer):
    """What ``set_attention_backend`` changed: each processor's own setting (attribute absent, None or a backend)
    and diffusers' process-wide active backend, which its ``reset_attention_backend`` leaves behind."""

    transform = "attention"

    def __init__(self, before, active_before, target):
        self.before, self.active_before, self.target = before, active_before, target

    def undo(self, owner) -> None:
        for processor, had_own, value in self.before:
            if had_own:
                processor._attention_backend = value
            else:
                vars(processor).pop("_attention_backend", None)
        _, registry = _registry()
        if registry._active_backend == self.target:
            registry.set_active_backend(self.active_before)
        else:  # changed again since optimize (another model, the user): theirs now, leave it
            logger.info("diffopt: diffusers' active attention backend changed after optimize; left at %s",
                        registry._active_backend)


def _set_dispatcher(model: torch.nn.Module, name: str) -> Optional[str]:
    """``model.set_attention_backend(name)``, with a :class:`DispatcherBackend` layer on the model."""
    layers = dispatcher_layers(model)
    if not layers:
        return None  # set_attention_backend would still move the process-wide backend: do not call it
    backend_name, registry = _registry()
    target = backend_name(name)
    active_before = registry._active_backend
    processors = {id(m.processor): m.processor for _, m in layers}.values()
    if active_before == target and all(_effective(p, active_before) == target for p in processors):
        return None
    was = Counter(str(getattr(_effective(p, active_before), "value", _effective(p, active_before))) for p in processors)
    before = [(p, "_attention_backend" in vars(p), vars(p).get("_attention_backend")) for p in processors]
    layer = DispatcherBackend(before, active_before, target)
    try:
        model.set_attention_backend(name)
    except BaseException:
        layer.undo(model)
        raise
    attach(model, layer)
    return f"diffusers attention backend {name!r} on {len(before)} layers (was " + ", ".join(was) + ")"


def apply_attention_backend(
    model: torch.nn.Module, backend: str, *, prefer: bool = False, dispatcher: bool = True
) -> Optional[Applied]:
    """Select attention backend ``backend`` (a value of ``attention=`` other than "auto") on every layer of ``model``.

    Direct layers are first put on the family's processors (SDPA for every kernel), then, for a kernel, wrapped
    to run under ``sdpa_kernel``; dispatcher layers get ``set_attention_backend`` with diffusers' name for it.
    ``prefer=True`` (what "auto" uses) makes a kernel the first choice instead of the only one, on every layer:
    dispatcher layers go to diffusers' "native" backend and are wrapped like direct ones. ``dispatcher=False``
    leaves the dispatcher as it is. No gate is checked here: a forced kernel that cannot run raises when the model
    runs. Its layers sit on the modules they changed; returns what changed, or None when nothing did.

    Example::

        apply_attention_backend(unet, "flash")
        unet(**inputs)                    # FlashAttention, or an error where it cannot run
        diffopt.restore(unet)
    """
    if backend not in DISPATCHER and backend != "default":
        raise ValueError(f"attention backend must be one of {['default', *DISPATCHER]}, got {backend!r}")
    kernel = KERNELS.get(backend)
    since = mark()
    details = []
    try:
        if backend not in DISPATCHER_ONLY:
            details.append(apply_attention(model, FAMILY.get(backend, "sdpa")))
        if prefer and kernel:
            details.append(_set_dispatcher(model, "native"))
            order = (kernel,) + tuple(k for k in TORCH_ORDER if k != kernel)
            details.append(_wrap_forwards(attention_modules(model), order, prefer=True))
        else:
            if dispatcher and backend in DISPATCHER:
                details.append(_set_dispatcher(model, DISPATCHER[backend]))
            if kernel:
                details.append(_wrap_forwards(direct_layers(model), (kernel,), prefer=False))
    except BaseException:  # interrupted half-way: take off what this call added
        undo_all(model.modules(), since)
        raise
    details = [d.detail if isinstance(d, Applied) else d for d in details if d]
    return Applied("; ".join(details), since, model) if details else None


def compile_options(attention: Optional[str], options: dict) -> dict:
    """torch.compile options that keep ``attention="math"`` on the math kernel.

    Forcing MATH makes dynamo trace SDPA's math decomposition (matmul, softmax, matmul), and inductor's attention
    pattern matcher fuses that back into a fused SDPA kernel (FlashAttention on the CPU), so the request would be
    silently undone. Turning inductor's pattern matcher off for this module keeps it; a mode becomes its inductor
    options, since torch.compile takes one or the other (config.takes_mode).
    """
    if attention != "math" or not is_inductor(options):
        return options
    options = dict(options)
    inductor = {}
    mode = options.pop("mode", None)
    if mode not in (None, "default"):
        import torch._inductor

        inductor.update(torch._inductor.list_mode_options(mode, options.get("dynamic")))
    inductor.update(options.get("options") or {})
    inductor["pattern_matcher"] = False
    options["options"] = inductor
    return options


def _plan_backend(component, ctx) -> List[Step]:
    """A kernel ("flash", "math", ...), flex, sage or "auto"; or any choice on a model with dispatcher layers."""
    config, report = ctx.config, ctx.report
    module, name, explicit = component.module, config.attention, config.asks_for(NAME)
    device, dtype = module_device(module), module_dtype(module)
    prefix = ""
    if name == "auto":
        name, card = capabilities.auto_attention(device, dtype)
        prefix, explicit = f"auto -> {name} ({card}): ", False
    option = f"attention={config.attention!r}"
    gates = [capabilities.attention_backend(name, device, dtype)]
    direct = direct_layers(module)
    if direct and name in DISPATCHER_ONLY:
        classes = sorted({type(m.processor).__name__ for _, m in direct})
        gates.append(capabilities.Gate(
            f"{name} attention on {component.name}", False, "attention layers on diffusers' attention dispatcher",
            f"{len(direct)} layers whose {', '.join(classes)} call F.scaled_dot_product_attention themselves",
        ))
    # "sdpa" left at its default keeps a backend the user chose on the dispatcher (set_attention_backend, or the
    # DIFFUSERS_ATTN_BACKEND variable); named, it means diffusers' "native".
    dispatcher = name in DISPATCHER and (name != "sdpa" or explicit)
    # "auto" only prefers a kernel: dispatcher layers go to "native" and run under the same preference.
    prefer = config.attention == "auto" and name in KERNELS
    routed = dispatcher_layers(module)
    if dispatcher and routed:
        parallel = any(getattr(m.processor, "_parallel_config", None) is not None for _, m in routed)
        target = "native" if prefer else DISPATCHER[name]
        gates.append(capabilities.dispatcher_backend(target, context_parallel=parallel))
    for gate in gates:
        reason = capabilities.require_or_skip(gate, explicit, option)
        if reason:
            report.add(component.name, NAME, SKIPPED, prefix + reason)
            return []
    family = FAMILY.get(name, "sdpa")
    missing = missing_classes(family) if direct and name not in DISPATCHER_ONLY else []
    if missing:
        reason = f"{option}: diffusers {capabilities.installed_version('diffusers')} lacks {', '.join(missing)}"
        if explicit:
            raise capabilities.UnsupportedFeatureError(reason)
        report.add(component.name, NAME, SKIPPED, prefix + reason)
        return []

    def apply():
        applied = apply_attention_backend(module, name, prefer=prefer, dispatcher=dispatcher)
        detail = applied.detail if applied else None
        # "auto" always says what it picked, even where that was in place already.
        return prefix + (detail or "already in place") if prefix else detail

    return [Step(component.name, NAME, apply)]


def plan(ctx) -> List[Step]:
    """The ``attention`` option: processor families on direct layers, kernels and dispatcher backends otherwise."""
    if ctx.config.attention is None:
        return []
    steps = []
    for component in ctx.components:
        if ctx.config.attention not in FAMILIES or dispatcher_layers(component.module):
            steps += _plan_backend(component, ctx)
        else:
            steps += _plan_family(component, ctx)
    return steps


def _plan_family(component, ctx) -> List[Step]:
    family, explicit = ctx.config.attention, ctx.config.asks_for(NAME)
    gate = {"sdpa": capabilities.sdpa, "xformers": capabilities.xformers}.get(family)
    if gate is not None:
        reason = capabilities.require_or_skip(gate(), explicit, f"attention={family!r}")
        if reason:
            ctx.report.add(component.name, NAME, SKIPPED, reason)
            return []
    missing = missing_classes(family)
    if missing:
        found = capabilities.installed_version("diffusers")
        reason = f"attention={family!r}: diffusers {found} lacks {', '.join(missing)}"
        if explicit:
            raise capabilities.UnsupportedFeatureError(reason)
        ctx.report.add(component.name, NAME, SKIPPED, reason)
        return []
    return [Step(component.name, NAME, lambda module=component.module: apply_attention(module, family))]
