"""Fused QKV projections: one matmul for query, key and value (key and value in cross-attention) instead of
three, through the model's own ``fuse_qkv_projections``.

Opt-in (``fuse_projections=True``): the anchor measured no gain on the SD1.5 UNet, and the fused weights are a
copy, so the model holds its attention projections twice. diffusers' own fusion has three traps this file closes:

* UNet-style models (UNet, PixArt, SD3, the VAE) swap **every** processor for a fused one, which silently drops
  IP-Adapter, PAG and custom processors. Layers whose processor the fused one does not reproduce get their
  processor back and stay unfused.
* The fused layer reads a copy of ``to_q``/``to_k``/``to_v``; a LoRA injected into those afterwards is
  bypassed without a word. A forward pre-hook refuses to run such a model, naming the fix.
* ``unfuse_qkv_projections`` leaves the fused layers, the ``fused_projections`` flags and the model's
  ``original_attn_processors`` behind, and puts back processors captured at fuse time over ones loaded since
  (an IP-Adapter). The undo here removes exactly what fusing added and nothing the user set afterwards.
"""
from __future__ import annotations

from collections import Counter
from typing import Dict, List, Optional, Tuple

import torch

from . import Change
from .attention import attention_modules

# Fused processor (what a model's fuse_qkv_projections installs) -> the processors it computes the same thing as.
FAITHFUL = {
    "FusedAttnProcessor2_0": {"AttnProcessor", "AttnProcessor2_0", "FusedAttnProcessor2_0"},
    "FusedJointAttnProcessor2_0": {"JointAttnProcessor2_0", "FusedJointAttnProcessor2_0"},
    "FusedAuraFlowAttnProcessor2_0": {"AuraFlowAttnProcessor2_0", "FusedAuraFlowAttnProcessor2_0"},
    "FusedHunyuanAttnProcessor2_0": {"HunyuanAttnProcessor2_0", "FusedHunyuanAttnProcessor2_0"},
    "FusedCogVideoXAttnProcessor2_0": {"CogVideoXAttnProcessor2_0", "FusedCogVideoXAttnProcessor2_0"},
}
FUSED_LAYERS = ("to_qkv", "to_kv", "to_added_qkv")
PROJECTIONS = ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj")
# Names in a processor's __call__ that show it switches to the fused layers when attn.fused_projections is set
# (diffusers' dispatcher-era processors: Flux, Wan, ... through their _get_qkv_projections helper).
_READS_FUSED = {"fused_projections", "_get_qkv_projections"}
_MISSING = object()

ALREADY_FUSED = "already fused outside diffopt; left as it is"


def _is_lora(layer) -> bool:
    return hasattr(layer, "base_layer")  # peft's BaseTunerLayer wraps the original Linear as base_layer


def lora_projections(model: torch.nn.Module) -> List[str]:
    """Attention projections wrapped by peft LoRA layers, by qualified name."""
    return [
        f"{name}.{proj}" for name, attn in attention_modules(model) for proj in PROJECTIONS
        if _is_lora(getattr(attn, proj, None))
    ]


def _generic_fusion(model) -> bool:
    """True when the model uses diffusers' AttentionMixin.fuse_qkv_projections, which fuses the layers but
    keeps their processors (they must switch on ``attn.fused_projections`` themselves)."""
    try:
        from diffusers.models.attention import AttentionMixin
    except ImportError:  # diffusers before AttentionMixin: every model has its own, processor-swapping method
        return False
    return getattr(type(model), "fuse_qkv_projections", None) is AttentionMixin.fuse_qkv_projections


def _reads_fused(processor) -> bool:
    call = getattr(type(processor), "__call__", None)
    code = getattr(call, "__code__", None)
    return code is not None and bool(_READS_FUSED & set(code.co_names))


def blocker(model: torch.nn.Module) -> Optional[Tuple[str, str]]:
    """Why fusing ``model`` cannot be done faithfully, as (requirement, what was found); None when it can."""
    name = type(model).__name__
    if not callable(getattr(model, "fuse_qkv_projections", None)):
        return "a model with fuse_qkv_projections", f"{name} has none"
    layers = attention_modules(model)
    # LoRA first: a model diffopt fused before a LoRA was loaded must fail the check of a second optimize
    # while it is still fused, before anything is undone.
    lora = lora_projections(model)
    if lora:
        return (
            "no LoRA layers on the attention projections (fused ones would bypass them)",
            f"LoRA on {len(lora)} projections of {name}; fuse_lora() does not help, unload_lora_weights() does",
        )
    if any(getattr(attn, "fused_projections", False) for _, attn in layers):
        return "unfused projections", ALREADY_FUSED
    added = sorted({type(a.processor).__name__ for _, a in layers if "Added" in type(a.processor).__name__})
    if added:
        return "attention without added K/V projections", f"{', '.join(added)} in {name}"
    if _generic_fusion(model):
        from diffusers.models.attention import AttentionModuleMixin

        fusable = [m for m in model.modules() if isinstance(m, AttentionModuleMixin) and m._supports_qkv_fusion]
        if not any(_reads_fused(m.processor) for m in fusable):
            found = sorted({type(a.processor).__name__ for _, a in layers}) or ["no attention layers"]
            return "attention processors that use fused projections", f"{', '.join(found)} in {name}"
    return None


def apply_fuse_projections(model: torch.nn.Module) -> Optional[Change]:
    """Fuse the QKV projections of ``model`` with its own ``fuse_qkv_projections``, keeping every processor the
    fused one would not reproduce; check :func:`blocker` first. The undo removes the fused layers, flags,
    processors and guard it added and touches nothing else. None when no layer ended up fused."""
    saved: Dict[str, tuple] = {
        name: (attn, attn.processor, set(attn._modules), attn.__dict__.get("fused_projections", _MISSING))
        for name, attn in attention_modules(model)
    }
    model_attr = model.__dict__.get("original_attn_processors", _MISSING)
    try:
        model.fuse_qkv_projections()
    except Exception:
        _abandon(model, saved, model_attr)  # half-way through: leave the model as it was, then say why
        raise

    fused, kept = {}, Counter()
    for name, (attn, old, children, flag) in saved.items():
        new = attn.processor
        if new is not old and type(old).__name__ not in FAITHFUL.get(type(new).__name__, ()):
            # The fused processor would drop what this one does (IP-Adapter image attention, PAG, custom code).
            attn.set_processor(old)
            _unfuse_layer(attn, children, flag)
            kept[type(old).__name__] += 1
        elif getattr(attn, "fused_projections", False):
            fused[name] = (attn, old, new, children, flag)
    hook = model.register_forward_pre_hook(_lora_guard(model, [v[0] for v in fused.values()]))

    def undo():
        hook.remove()
        for attn, old, ours, children, flag in fused.values():
            current = attn.processor
            # Put the unfused processor back unless the user set another since (an IP-Adapter loaded after
            # optimize); a fused processor built anew by a loader (same class as ours) needs the fused layers.
            if current is ours or type(current).__name__ in FAITHFUL:
                attn.set_processor(old)
            _unfuse_layer(attn, children, flag)
        _restore_attr(model, "original_attn_processors", model_attr)

    if not fused:
        undo()
        return None
    processors = Counter(type(v[2]).__name__ for v in fused.values())
    detail = f"{len(fused)} attention layers fused (" + ", ".join(f"{n}x {p}" for p, n in processors.items()) + ")"
    if kept:
        detail += "; kept unfused for their processors: " + ", ".join(f"{n}x {p}" for p, n in kept.items())
    return Change(detail, undo)


def _abandon(model, saved, model_attr) -> None:
    for attn, old, children, flag in saved.values():
        if attn.processor is not old:
            attn.set_processor(old)
        _unfuse_layer(attn, children, flag)
    _restore_attr(model, "original_attn_processors", model_attr)


def _unfuse_layer(attn, children, flag) -> None:
    for layer in FUSED_LAYERS:
        if layer not in children:
            attn._modules.pop(layer, None)
    _restore_attr(attn, "fused_projections", flag)


def _restore_attr(obj, name, value) -> None:
    if value is _MISSING:
        obj.__dict__.pop(name, None)
    else:
        obj.__dict__[name] = value


def _lora_guard(model, layers):
    name = type(model).__name__

    def guard(module, args):
        # A LoRA loaded after fusing wraps to_q/to_k/to_v, which the fused layers no longer read: its effect
        # would silently vanish. Refuse to run instead. (Under torch.compile this check is traced once and kept
        # as guards on the projections, so it costs nothing per call.)
        for attn in layers:
            for proj in PROJECTIONS:
                if _is_lora(getattr(attn, proj, None)):
                    raise RuntimeError(
                        f"diffopt: a LoRA was loaded into {name} after its QKV projections were fused, and the fused "
                        "projections would ignore it. Call diffopt.optimize(pipe) again without fuse_projections "
                        "(or diffopt.restore(pipe)) after loading LoRA weights."
                    )

    return guard
