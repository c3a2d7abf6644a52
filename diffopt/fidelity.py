"""How far an opt-in, output-changing optimization moves a model's output: measured, not assumed.

Example::

    from diffopt import quantization_error
    error = quantization_error(pipe.unet, dict(sample=latents, timestep=t, encoder_hidden_states=text))
    print(f"int8 moves the UNet output by {error:.2%} (relative L2)")
"""
from __future__ import annotations

from typing import Any, Mapping

import torch

from . import capabilities
from .components import module_device
from .config import QUANTIZE_CHOICES, check_choice
from .layers import layers_of
from .transforms.compile import is_compiled
from .transforms.quantize import apply_quantize


def relative_l2(output: torch.Tensor, reference: torch.Tensor) -> float:
    """||output - reference|| / ||reference||, in float64."""
    output, reference = output.detach().double(), reference.detach().double()
    return ((output - reference).norm() / reference.norm()).item()


def _sample(output: Any) -> torch.Tensor:
    """The prediction of a diffusers model call: ``.sample`` of its output dataclass, or the first of a tuple."""
    if isinstance(output, torch.Tensor):
        return output
    sample = getattr(output, "sample", None)
    return sample if isinstance(sample, torch.Tensor) else output[0]


def quantization_error(model: torch.nn.Module, inputs: Mapping[str, Any], quantize: str = "int8") -> float:
    """Relative L2 of ``model(**inputs)`` quantized with ``quantize`` against the same model unquantized, both
    eager. The model is quantized in place for the second call and put back exactly (same Parameters, same
    bits) before this returns, even if the call fails.

    Run it on the model as loaded, before :func:`diffopt.optimize` or after :func:`diffopt.restore`: a compiled
    model would recompile for the quantized weights, and an optimized one would compare two optimized runs.

    Example::

        inputs = dict(sample=latents, timestep=torch.tensor(500), encoder_hidden_states=text_embeddings)
        assert diffopt.quantization_error(pipe.unet, inputs, "int8") < 1e-2
    """
    check_choice("quantize", quantize, [c for c in QUANTIZE_CHOICES if c is not None])
    if not isinstance(model, torch.nn.Module):  # a pipeline: which of its models is for the caller to say
        raise TypeError("quantization_error takes one model (a torch.nn.Module such as pipe.unet or "
                        f"pipe.transformer), got {type(model).__name__}")
    if is_compiled(model) or any(layers_of(module) for module in model.modules()):
        raise ValueError("quantization_error measures an eager model: call it before diffopt.optimize or after restore")
    gate = capabilities.quantize(quantize, module_device(model))
    capabilities.require_or_skip(gate, True, f"quantize={quantize!r}")
    with torch.inference_mode():
        reference = _sample(model(**inputs))
    # Quantized and put back outside inference mode: the original weights moved off and back onto the GPU
    # must stay ordinary tensors, not inference tensors.
    applied = apply_quantize(model, quantize)
    if applied is None:
        return 0.0  # no layer qualifies: the output is the reference itself
    try:
        with torch.inference_mode():
            quantized = _sample(model(**inputs))
    finally:
        applied.undo()
    return relative_l2(quantized, reference)
