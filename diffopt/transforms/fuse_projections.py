"""Fused QKV projections: one matmul for query, key and value (key and value in cross-attention) instead of
three, through the model's own ``fuse_qkv_projections``.

Opt-in (``fuse_projections=True``): it gained 1-2% on the SD1.5 UNet on an H200, and the fused weights are a
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

from .. import capabilities
from ..components import DENOISER
from ..layers import Applied, Layer, attach, find, mark
from ..plan import Step
from ..report import SKIPPED
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
NAME = "fuse_projections"


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
    if any(getattr(attn, "fused_projections", False) for _, attn in layers) and find(model, FusedProjections) is None:
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


class FusedProjections(Layer):
    """On the fused model: per fused attention layer its processor before and ours, the children it had and its
    ``fused_projections`` flag; plus the LoRA guard and the state-dict hook. Undo removes exactly what fusing
    added and nothing the user set afterwards."""

    transform = NAME

    def __init__(self, fused, model_attr, guard_id: int, state_dict_id: int):
        self.fused, self.model_attr = fused, model_attr
        self.guard_id, self.state_dict_id = guard_id, state_dict_id

    def undo(self, owner) -> None:
        owner._forward_pre_hooks.pop(self.guard_id, None)
        owner._state_dict_hooks.pop(self.state_dict_id, None)
        for attn, old, ours, children, flag in self.fused.values():
            current = attn.processor
            # Put the unfused processor back unless the user set another since (an IP-Adapter loaded after
            # optimize); a fused processor built anew by a loader (same class as ours) needs the fused layers.
            if current is ours or type(current).__name__ in FAITHFUL:
                attn.set_processor(old)
            _unfuse_layer(attn, children, flag)
        _restore_attr(owner, "original_attn_processors", self.model_attr)


def apply_fuse_projections(model: torch.nn.Module) -> Optional[Applied]:
    """Fuse the QKV projections of ``model`` with its own ``fuse_qkv_projections``, keeping every processor the
    fused one would not reproduce; check :func:`blocker` first. A :class:`FusedProjections` layer on the model
    undoes it. Returns what changed, or None when no layer ended up fused."""
    saved: Dict[str, tuple] = {
        name: (attn, attn.processor, set(attn._modules), attn.__dict__.get("fused_projections", _MISSING))
        for name, attn in attention_modules(model)
    }
    since, model_attr = mark(), model.__dict__.get("original_attn_processors", _MISSING)
    device = next(model.parameters()).device
    try:
        # The fused Linear layers are built with random initial weights before diffusers copies the projections
        # in: keep that draw off the user's random stream, so an unseeded image is the same with and without.
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            model.fuse_qkv_projections()
    except BaseException:
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
    guard = model.register_forward_pre_hook(_LoraGuard(type(model).__name__, [v[0] for v in fused.values()]))
    clean = model._register_state_dict_hook(_DropFused(list(fused)))
    layer = FusedProjections(fused, model_attr, guard.id, clean.id)
    if not fused:
        layer.undo(model)
        return None
    attach(model, layer)
    processors = Counter(type(v[2]).__name__ for v in fused.values())
    detail = f"{len(fused)} attention layers fused (" + ", ".join(f"{n}x {p}" for p, n in processors.items()) + ")"
    if kept:
        detail += "; kept unfused for their processors: " + ", ".join(f"{n}x {p}" for p, n in kept.items())
    return Applied(detail, since, model)


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


class _DropFused:
    """A state-dict hook: the fused layers are a copy of ``to_q``/``to_k``/``to_v``, so ``state_dict()`` (and
    ``save_pretrained``) leaves them out and writes the checkpoint the model was loaded from."""

    def __init__(self, layers: List[str]):
        self.layers = layers

    def __call__(self, module, state_dict, prefix, local_metadata):
        for name in self.layers:
            for fused in FUSED_LAYERS:
                for key in (f"{prefix}{name}.{fused}.weight", f"{prefix}{name}.{fused}.bias"):
                    state_dict.pop(key, None)
        return state_dict


class _LoraGuard:
    """A forward pre-hook: a LoRA loaded after fusing wraps to_q/to_k/to_v, which the fused layers no longer read,
    so its effect would silently vanish. Refuse to run instead. (Under torch.compile this check is traced once and
    kept as guards on the projections, so it costs nothing per call.)"""

    def __init__(self, name: str, layers):
        self.name, self.layers = name, layers

    def __call__(self, module, args):
        for attn in self.layers:
            for proj in PROJECTIONS:
                if _is_lora(getattr(attn, proj, None)):
                    raise RuntimeError(
                        f"diffopt: a LoRA was loaded into {self.name} after its QKV projections were fused, and the "
                        "fused projections would ignore it. Call diffopt.optimize(pipe) again without "
                        "fuse_projections (or diffopt.restore(pipe)) after loading LoRA weights."
                    )


def plan(ctx) -> List[Step]:
    if not ctx.config.fuse_projections:
        return []
    steps = []
    for component in ctx.components:
        found = blocker(component.module)
        if found is not None:
            requirement, what = found
            # Only the denoiser makes a named fuse_projections an error: a VAE decoder or a ControlNet that cannot
            # fuse is no reason to refuse the rest. A model fused by the user is left alone, as for compile.
            if ctx.config.asks_for(NAME) and component.role == DENOISER and what != ALREADY_FUSED:
                raise capabilities.UnsupportedFeatureError(f"fuse_projections: fused QKV projections needs {requirement} (found {what})")
            ctx.report.add(component.name, NAME, SKIPPED, what if what == ALREADY_FUSED else f"fused QKV projections needs {requirement} (found {what})")
            continue
        steps.append(Step(component.name, NAME, lambda module=component.module: apply_fuse_projections(module)))
    return steps
