"""Attention processors, chosen per attention kind.

A blanket ``set_attn_processor(AttnProcessor2_0())`` breaks DeepFloyd IF (whose attention has added
key/value projections) and drops IP-Adapter weights, so each processor is mapped within its own kind.
Processors outside these kinds (LoRA, custom, joint/transformer processors that are SDPA already) are kept.
"""
from __future__ import annotations

from collections import Counter
from typing import Dict, List, Optional, Tuple

import torch

from ..attention_names import FAMILIES
from ..layers import Applied, Layer, attach, mark

# kind -> family -> diffusers class name. Names are resolved at call time: old diffusers lack some.
PROCESSORS: Dict[str, Dict[str, str]] = {
    "attention": {"default": "AttnProcessor", "sdpa": "AttnProcessor2_0", "xformers": "XFormersAttnProcessor"},
    "added_kv": {
        "default": "AttnAddedKVProcessor",
        "sdpa": "AttnAddedKVProcessor2_0",
        "xformers": "XFormersAttnAddedKVProcessor",
    },
    "ip_adapter": {
        "default": "IPAdapterAttnProcessor",
        "sdpa": "IPAdapterAttnProcessor2_0",
        "xformers": "IPAdapterXFormersAttnProcessor",
    },
    # SD3's joint attention has no classic (pre-SDPA) processor: "default" keeps it on JointAttnProcessor2_0.
    "joint": {"sdpa": "JointAttnProcessor2_0", "xformers": "XFormersJointAttnProcessor"},
}
# Sliced processors compute the same attention in slices to save memory; asking for a family replaces them.
SLICED = {"SlicedAttnProcessor": "attention", "SlicedAttnAddedKVProcessor": "added_kv"}
NAME = "attention"


def _processor_class(name: str):
    from diffusers.models import attention_processor

    return getattr(attention_processor, name, None)


def attention_modules(model: torch.nn.Module) -> List[Tuple[str, torch.nn.Module]]:
    """Every diffusers attention layer in ``model``, by qualified name."""
    return [(n, m) for n, m in model.named_modules() if hasattr(m, "set_processor") and hasattr(m, "processor")]


def processor_kind(attn: torch.nn.Module) -> Optional[str]:
    """The kind of the current processor, or None for processors we must not replace."""
    name = type(attn.processor).__name__
    for kind, family in PROCESSORS.items():
        if name in family.values():
            break
    else:
        kind = SLICED.get(name)
    if kind in ("attention", "added_kv"):
        # Decide from the layer, not the processor: a layer with added K/V projections needs the
        # added-KV processor even if someone installed a plain one.
        kind = "added_kv" if getattr(attn, "added_kv_proj_dim", None) is not None else "attention"
    return kind


def _convert(processor, kind: str, family: str):
    target = _processor_class(PROCESSORS[kind].get(family, ""))
    if target is None or type(processor) is target:
        return processor  # already there, or this diffusers has no such twin: keep it
    if kind != "ip_adapter":
        return target()
    # IP-Adapter processors carry the adapter's image projections: build the sibling with the same
    # shape and copy the weights over, on the same device and dtype.
    new = target(
        hidden_size=processor.hidden_size,
        cross_attention_dim=processor.cross_attention_dim,
        num_tokens=processor.num_tokens,
        scale=processor.scale,
    )
    new.load_state_dict(processor.state_dict())
    reference = next(processor.parameters(), None)
    if reference is not None:
        new.to(device=reference.device, dtype=reference.dtype)
    return new


def missing_classes(family: str) -> List[str]:
    """The plain processor class of ``family``, if the installed diffusers lacks it. Twins of rarer kinds
    (added-KV, IP-Adapter) that are missing only keep those layers as they are."""
    name = PROCESSORS["attention"][family]
    return [name] if _processor_class(name) is None else []


class Processor(Layer):
    """The processor an attention layer had before diffopt set ``ours``; undo puts it back unless the user set
    another since (load_ip_adapter, unload_ip_adapter): that one is theirs."""

    transform = NAME

    def __init__(self, previous, ours):
        self.previous, self.ours = previous, ours

    def undo(self, owner) -> None:
        if owner.processor is self.ours:
            owner.set_processor(self.previous)


def apply_attention(model: torch.nn.Module, family: str, record: bool = True) -> Optional[Applied]:
    """Switch every replaceable processor of ``model`` to ``family`` ("default", "sdpa" or "xformers"), each with a
    :class:`Processor` layer on its attention module (``record=False``: no layer, for the state ``restore`` leaves).
    Returns what it did, or None when nothing changed."""
    if family not in FAMILIES:
        raise ValueError(f"attention family must be one of {FAMILIES}, got {family!r}")
    since, after, kept, done = mark(), Counter(), Counter(), []
    try:
        for _, attn in attention_modules(model):
            kind = processor_kind(attn)
            if kind is None or family not in PROCESSORS[kind]:
                kept[type(attn.processor).__name__] += 1
                continue
            new = _convert(attn.processor, kind, family)
            if new is not attn.processor:
                layer = Processor(attn.processor, new)
                after[f"{type(attn.processor).__name__} -> {type(new).__name__}"] += 1
                attn.set_processor(new)
                done.append((attn, attach(attn, layer) if record else layer))
    except BaseException:  # a setter failing half-way: the layers switched so far go back
        from ..layers import detach

        for attn, layer in reversed(done):
            layer.undo(attn)
            if record:
                detach(attn, layer)
        raise
    if not done:
        return None
    detail = ", ".join(f"{n}x {change}" for change, n in after.items())
    if kept:
        detail += "; kept " + ", ".join(f"{n}x {name}" for name, n in kept.items())
    return Applied(detail, since, model)
