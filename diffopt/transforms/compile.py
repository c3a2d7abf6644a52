"""torch.compile of a module, in place.

``nn.Module.compile`` keeps the module object (``pipe.unet is unet`` stays true, ``save_pretrained``
writes clean keys, ``isinstance`` checks in pipelines keep working); undo removes the compiled call so
the next call runs eager code again.
"""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch

from . import Change

_ATTR = "_compiled_call_impl"


def is_compiled(module: torch.nn.Module) -> bool:
    """Compiled by anyone: in place, or wrapped by ``torch.compile(module)``."""
    return getattr(module, _ATTR, None) is not None or hasattr(module, "_orig_mod")


def default_options(device: torch.device) -> Dict[str, Any]:
    """fullgraph everywhere (a graph break in a denoiser is a bug we want to hear about); CUDA graphs
    ("reduce-overhead") on CUDA, where per-kernel launch overhead dominates small batches; plain inductor
    elsewhere, where CUDA graphs do not exist."""
    if device.type == "cuda":
        return {"mode": "reduce-overhead", "fullgraph": True}
    return {"fullgraph": True}


def describe(options: Dict[str, Any]) -> str:
    return "torch.compile(" + ", ".join(f"{k}={v!r}" for k, v in options.items()) + ")"


def apply_compile(module: torch.nn.Module, options: Dict[str, Any]) -> Optional[Change]:
    """Compile ``module`` in place with ``options``; undo returns it to eager execution."""
    had_own = _ATTR in module.__dict__
    previous = module.__dict__.get(_ATTR)
    module.compile(**options)

    def undo():
        if had_own:
            module.__dict__[_ATTR] = previous
        else:
            module.__dict__.pop(_ATTR, None)

    return Change(describe(options), undo)
