"""Memory format of a module's 4-D weights (channels_last lets cuDNN and inductor skip layout transposes)."""
from __future__ import annotations

from typing import Optional

import torch

from . import Change

FORMATS = {"channels_last": torch.channels_last, "contiguous": torch.contiguous_format}


def apply_memory_format(module: torch.nn.Module, name: str) -> Optional[Change]:
    """Convert the 4-D parameters and buffers of ``module`` to ``name``; undo restores each tensor's strides.

    Tensors keep their identity (only ``.data`` changes), so optimizers, LoRA layers and user references
    still point at the live weights. Only strides are remembered, never a copy of the weights.
    """
    fmt = FORMATS[name]
    tensors = [t for t in list(module.parameters()) + list(module.buffers()) if t.dim() == 4]
    changed = [(t, t.stride()) for t in tensors if not t.is_contiguous(memory_format=fmt)]
    if not changed:
        return None
    for tensor, _ in changed:
        tensor.data = tensor.data.contiguous(memory_format=fmt)

    def undo():
        for tensor, stride in changed:
            if tensor.stride() != stride:
                original = torch.empty_strided(tensor.shape, stride, dtype=tensor.dtype, device=tensor.device)
                tensor.data = original.copy_(tensor.data)

    return Change(f"{len(changed)} 4-D weights -> {name}", undo)
