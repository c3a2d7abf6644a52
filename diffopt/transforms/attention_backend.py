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
from typing import Dict, List, Optional, Tuple

import torch

from . import Change
from .attention import apply_attention, attention_modules

logger = logging.getLogger(__name__)

#: Our name -> torch SDPBackend member forced on direct layers (None: no kernel is forced).
KERNELS: Dict[str, Optional[str]] = {
    "flash": "FLASH_ATTENTION",
    "cudnn": "CUDNN_ATTENTION",
    "efficient": "EFFICIENT_ATTENTION",
    "math": "MATH",
}
#: Our name -> diffusers' attention-dispatcher backend. "flash" is torch's FlashAttention kernel, as on direct layers,
#: not diffusers' "flash" (the flash-attn package). "default" has no dispatcher twin: those layers are left alone.
DISPATCHER: Dict[str, str] = {
    "sdpa": "native",
    "flash": "_native_flash",
    "cudnn": "_native_cudnn",
    "efficient": "_native_efficient",
    "math": "_native_math",
    "flex": "flex",
    "sage": "sage",
    "xformers": "xformers",
}
#: Backends that exist only behind diffusers' dispatcher: a processor calling F.scaled_dot_product_attention has
#: no way to reach flex_attention or sageattn short of replacing the processor, which diffopt does not do.
DISPATCHER_ONLY = ("flex", "sage")
#: The processor family direct layers are put on before a backend applies (kernels need SDPA processors).
FAMILY = {"default": "default", "xformers": "xformers"}
#: The order torch tries its kernels in by default; "auto" moves its pick to the front.
TORCH_ORDER = ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "MATH", "CUDNN_ATTENTION")
_MARK = "__diffopt_sdpa_kernel__"


def dispatcher_layers(model: torch.nn.Module) -> List[Tuple[str, torch.nn.Module]]:
    """Attention layers whose processor goes through diffusers' attention dispatcher."""
    return [(n, m) for n, m in attention_modules(model) if hasattr(m.processor, "_attention_backend")]


def direct_layers(model: torch.nn.Module) -> List[Tuple[str, torch.nn.Module]]:
    """Attention layers whose processor is outside the dispatcher (it calls SDPA, or another kernel, itself)."""
    return [(n, m) for n, m in attention_modules(model) if not hasattr(m.processor, "_attention_backend")]


def kernel_of(attn: torch.nn.Module) -> Optional[Tuple[str, ...]]:
    """The SDPA kernels a layer's forward was wrapped with by diffopt, or None."""
    forward = attn.__dict__.get("forward")
    return getattr(forward, _MARK, None)


def _sdpa_backends(names):
    from torch.nn.attention import SDPBackend

    return [getattr(SDPBackend, n) for n in names]


def _under_kernel(inner, backends, prefer: bool):
    from torch.nn.attention import sdpa_kernel

    @functools.wraps(inner)  # keeps inspect.signature(attn.forward) and points __wrapped__ at the original
    def forward_under_kernel(*args, **kwargs):
        # set_priority (torch 2.6) is passed only when preferring, so forcing works on torch 2.3-2.5 too.
        with sdpa_kernel(backends, set_priority=True) if prefer else sdpa_kernel(backends):
            return inner(*args, **kwargs)

    return forward_under_kernel


def _wrap_forwards(layers, kernels: Tuple[str, ...], prefer: bool) -> Optional[Change]:
    """Run each layer's forward under sdpa_kernel(kernels); ``prefer``: only move them to the front (fallback
    allowed), else allow nothing else (a kernel that cannot run raises instead of silently falling back)."""
    if not layers:
        return None
    backends = _sdpa_backends(kernels)
    before = []
    for _, attn in layers:
        had_own = "forward" in attn.__dict__
        previous = attn.__dict__.get("forward")
        # attn.forward is the class's forward bound to attn, or a hook someone installed before us.
        ours = _under_kernel(attn.forward, backends, prefer)
        setattr(ours, _MARK, tuple(kernels))
        attn.forward = ours
        before.append((attn, had_own, previous, ours))

    def undo():
        for attn, had_own, previous, ours in reversed(before):
            if attn.__dict__.get("forward") is not ours:
                # Someone wrapped forward after us (an offload hook, ...): unwrapping would drop theirs.
                logger.warning("diffopt: %s.forward was replaced after optimize; left as it is", type(attn).__name__)
                continue
            if had_own:
                attn.forward = previous
            else:
                del attn.forward

    verb = "prefer" if prefer else "sdpa_kernel"
    classes = Counter(type(attn.processor).__name__ for _, attn in layers)
    detail = f"{verb}({kernels[0] if prefer else ', '.join(kernels)}) on {len(layers)} layers (" + ", ".join(
        f"{n}x {c}" for c, n in classes.items()
    ) + ")"
    return Change(detail, undo)


def _registry():
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

    return AttentionBackendName, _AttentionBackendRegistry


def _effective(processor, active):
    own = getattr(processor, "_attention_backend", None)
    return active if own is None else own


def _set_dispatcher(model: torch.nn.Module, name: str) -> Optional[Change]:
    """``model.set_attention_backend(name)``, with an undo that puts back each processor's own setting (attribute
    absent, None or a backend) and diffusers' process-wide active backend."""
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
    model.set_attention_backend(name)

    def undo():
        for processor, had_own, value in before:
            if had_own:
                processor._attention_backend = value
            else:
                vars(processor).pop("_attention_backend", None)
        if registry._active_backend == target:
            registry.set_active_backend(active_before)
        else:  # changed again since optimize (another model, the user): theirs now, leave it
            logger.info("diffopt: diffusers' active attention backend changed after optimize; left at %s",
                        registry._active_backend)

    return Change(
        f"diffusers attention backend {name!r} on {len(before)} layers (was " + ", ".join(was) + ")", undo
    )


def apply_attention_backend(
    model: torch.nn.Module, backend: str, *, prefer: bool = False, dispatcher: bool = True
) -> Optional[Change]:
    """Select attention backend ``backend`` (a value of ``attention=`` other than "auto") on every layer of ``model``.

    Direct layers are first put on the family's processors (SDPA for every kernel), then, for a kernel, wrapped
    to run under ``sdpa_kernel``; dispatcher layers get ``set_attention_backend`` with diffusers' name for it.
    ``prefer=True`` (what "auto" uses) makes a kernel the first choice instead of the only one, on every layer:
    dispatcher layers go to diffusers' "native" backend and are wrapped like direct ones. ``dispatcher=False``
    leaves the dispatcher as it is. No gate is checked here: a forced kernel that cannot run raises when the model
    runs. Returns None when nothing changed.

    Example::

        change = apply_attention_backend(unet, "flash")
        unet(**inputs)                    # FlashAttention, or an error where it cannot run
        change.undo()
    """
    if backend not in DISPATCHER and backend != "default":
        raise ValueError(f"attention backend must be one of {['default', *DISPATCHER]}, got {backend!r}")
    kernel = KERNELS.get(backend)
    changes = []
    try:
        if backend not in DISPATCHER_ONLY:
            changes.append(apply_attention(model, FAMILY.get(backend, "sdpa")))
        if prefer and kernel:
            changes.append(_set_dispatcher(model, "native"))
            order = (kernel,) + tuple(k for k in TORCH_ORDER if k != kernel)
            changes.append(_wrap_forwards(attention_modules(model), order, prefer=True))
        else:
            if dispatcher and backend in DISPATCHER:
                changes.append(_set_dispatcher(model, DISPATCHER[backend]))
            if kernel:
                changes.append(_wrap_forwards(direct_layers(model), (kernel,), prefer=False))
    except Exception:
        for change in reversed([c for c in changes if c is not None]):
            change.undo()
        raise
    changes = [c for c in changes if c is not None]
    if not changes:
        return None

    def undo():
        for change in reversed(changes):
            change.undo()

    return Change("; ".join(c.detail for c in changes), undo)


def compile_options(attention: Optional[str], options: dict) -> dict:
    """torch.compile options that keep ``attention="math"`` on the math kernel.

    Forcing MATH makes dynamo trace SDPA's math decomposition (matmul, softmax, matmul), and inductor's attention
    pattern matcher fuses that back into a fused SDPA kernel (FlashAttention on the CPU), so the request would be
    silently undone. Turning inductor's pattern matcher off for this module keeps it; a mode becomes its inductor
    options, since torch.compile takes one or the other.
    """
    if attention != "math" or options.get("backend", "inductor") != "inductor":
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
