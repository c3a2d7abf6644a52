"""Image-space fidelity of a recipe: PSNR and SSIM of the decoded images against the eager reference's.

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


# SSIM as Wang et al. (2004) define it: an 11x11 Gaussian window with sigma 1.5, K1 = 0.01, K2 = 0.03.
SSIM_WINDOW, SSIM_SIGMA, SSIM_K1, SSIM_K2 = 11, 1.5, 0.01, 0.03


def ssim(
    image: Optional[torch.Tensor], reference: Optional[torch.Tensor], peak: float = 255.0, device=None
) -> Optional[float]:
    """Mean structural similarity of ``image`` against ``reference`` (``pixels`` tensors, (N, H, W, C)): computed
    per channel over every position where the window fits, then averaged; 1.0 when identical, None when either
    is missing or the shapes differ. On images smaller than the window (tiny IF stage I: 8 px) the window shrinks.
    ``device``: where to compute (the benchmark's GPU: seconds for a batch of 1024 px images on a CPU).

    Example:
        >>> flat = torch.full((1, 8, 8, 3), 100, dtype=torch.uint8)
        >>> ssim(flat, flat)
        1.0
    """
    if image is None or reference is None or image.shape != reference.shape:
        return None
    if torch.equal(image, reference):
        return 1.0
    # float64, with a separable window: float32 loses the variances (differences of nearly equal means) to rounding.
    x, y = (t.to(device).permute(0, 3, 1, 2).double() / peak for t in (image, reference))
    channels, height, width = x.shape[1:]
    size = min(SSIM_WINDOW, height, width)
    size -= 1 - size % 2  # odd: the window has a centre
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    gauss = torch.exp(-(coords**2) / (2 * SSIM_SIGMA**2))
    gauss = gauss / gauss.sum()
    rows = gauss.to(x.device).view(1, 1, size, 1).expand(channels, 1, size, 1)
    cols = gauss.to(x.device).view(1, 1, 1, size).expand(channels, 1, 1, size)

    def blur(t):
        return torch.nn.functional.conv2d(torch.nn.functional.conv2d(t, rows, groups=channels), cols, groups=channels)

    mu_x, mu_y = blur(x), blur(y)
    var_x, var_y, cov = blur(x * x) - mu_x**2, blur(y * y) - mu_y**2, blur(x * y) - mu_x * mu_y
    c1, c2 = SSIM_K1**2, SSIM_K2**2  # the data range is 1 after dividing by the peak
    index = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return index.mean().item()
