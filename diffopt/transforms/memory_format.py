"""Memory format of a module's 4-D weights (channels_last lets cuDNN and inductor skip layout transposes)."""
from __future__ import annotations

from typing import List, Optional

import torch

from ..components import VAE, conv_share
from ..layers import Applied, Layer, attach, mark
from ..plan import Step
from ..report import SKIPPED
from .compile import compiled_elsewhere

NAME = "memory_format"
FORMATS = {"channels_last": torch.channels_last, "contiguous": torch.contiguous_format}
#: Below this share of parameters in conv layers, channels_last has nothing to speed up. Transformers hold at most a
#: patch-embedding conv (0% of SD3's or Flux's weights); the least conv-heavy UNet, SDXL's, holds 13%, and at
#: 1024 px its convolutions are still 24% of the FLOPs, so it keeps channels_last.
MIN_CONV_SHARE_FOR_CHANNELS_LAST = 0.05


class MemoryFormat(Layer):
    """Each converted tensor and the strides it had. Tensors keep their identity (only ``.data`` changes), so
    optimizers, LoRA layers and user references still point at the live weights; only strides are remembered,
    never a copy, and undo follows a later ``.to(dtype)`` or ``.to(device)`` (it re-strides what is there now)."""

    transform = NAME

    def __init__(self, changed, name: str):
        self.changed = changed  # [(tensor, stride)]
        self.detail = f"{len(changed)} 4-D weights -> {name}"

    def undo(self, owner) -> None:
        for tensor, stride in self.changed:
            if tensor.stride() != stride and tensor.device.type != "meta":
                original = torch.empty_strided(tensor.shape, stride, dtype=tensor.dtype, device=tensor.device)
                tensor.data = original.copy_(tensor.data)


def apply_memory_format(module: torch.nn.Module, name: str) -> Optional[Applied]:
    """Convert the 4-D parameters and buffers of ``module`` to ``name`` (a :class:`MemoryFormat` attached to it);
    returns what changed, or None."""
    fmt = FORMATS[name]
    tensors = [t for t in list(module.parameters()) + list(module.buffers()) if t.dim() == 4]
    changed = [(t, t.stride()) for t in tensors if not t.is_contiguous(memory_format=fmt)]
    if not changed:
        return None
    since, layer = mark(), MemoryFormat(changed, name)
    try:
        for tensor, _ in changed:
            tensor.data = tensor.data.contiguous(memory_format=fmt)
    except BaseException:
        layer.undo(module)
        raise
    return Applied(attach(module, layer).detail, since, module)


def plan(ctx) -> List[Step]:
    fmt, steps = ctx.config.memory_format, []
    if fmt in ("preserve", None):
        return steps
    for component in ctx.components:
        share = conv_share(component.module)
        if fmt == "channels_last" and share < MIN_CONV_SHARE_FOR_CHANNELS_LAST and not ctx.config.asks_for(NAME):
            reason = f"only {share:.0%} of its weights are in conv layers; channels_last would not pay"
            ctx.report.add(component.name, NAME, SKIPPED, reason)
            continue
        if compiled_elsewhere(component.module) and not ctx.config.asks_for(NAME):
            # Its graphs guard on the weights' strides: a new layout would make torch compile it again.
            ctx.report.add(component.name, NAME, SKIPPED, "compiled outside diffopt; its weights keep their layout")
            continue
        if (fmt == "channels_last" and component.role == VAE and ctx.compile_options.get(component.name) is None
                and not ctx.config.asks_for(NAME)):
            # Eager decoding is slower in channels_last (GroupNorm and upsampling take slower kernels): the SD1.5
            # decoder at 512 px on an H200 took 26.4 against 21.8 ms. Compiled, inductor fuses around the convs.
            ctx.report.add(component.name, NAME, SKIPPED, "not compiled, and eager decoding is slower in channels_last")
            continue
        steps.append(Step(component.name, NAME, lambda module=component.module: apply_memory_format(module, fmt)))
    return steps
