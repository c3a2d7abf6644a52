"""Image-space fidelity of a recipe: PSNR of the decoded images against the eager reference's.

Kept apart from the timing code so that other image metrics can sit beside it.

Example:
    >>> import torch
    >>> reference = torch.zeros(1, 8, 8, 3, dtype=torch.uint8)
    >>> round(psnr(reference + 1, reference), 1)
    48.1
"""
from __future__ import annotations

import math
from typing import Any, Optional

import numpy as np
import torch


def pixels(images: Any) -> Optional[torch.Tensor]:
    """A pipeline's ``output_type="pil"`` images as one uint8 tensor (N, H, W, C); None if they are not images."""
    if not isinstance(images, (list, tuple)) or not images:
        return None
    try:
        arrays = [np.asarray(image.convert("RGB")) for image in images]
    except AttributeError:  # not PIL images
        return None
    if len({a.shape for a in arrays}) != 1:
        return None
    return torch.from_numpy(np.stack(arrays))


def psnr(image: Optional[torch.Tensor], reference: Optional[torch.Tensor], peak: float = 255.0) -> Optional[float]:
    """Peak signal-to-noise ratio in dB of ``image`` against ``reference`` (8-bit: ``peak`` 255); ``inf`` when
    they are identical, None when either is missing or the shapes differ."""
    if image is None or reference is None or image.shape != reference.shape:
        return None
    mse = (image.double() - reference.double()).pow(2).mean().item()
    return math.inf if mse == 0 else 10 * math.log10(peak**2 / mse)
