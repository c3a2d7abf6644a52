"""How far a recipe's decoded image is from the reference image of the same seed: PSNR and SSIM, in torch only.

Both take float tensors of shape (N, C, H, W) with values in [0, 1] (:func:`to_tensor` turns a pipeline's PIL
output into one). SSIM is the mean structural similarity of Wang et al. (2004): an 11x11 Gaussian window with
sigma 1.5, K1 = 0.01, K2 = 0.03, computed per channel over the valid region and averaged; on images smaller than
the window, the window shrinks to the image.

Example:
    >>> import torch
    >>> a = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    >>> psnr(a, a), round(ssim(a, a), 6)
    (inf, 1.0)
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch

WINDOW, SIGMA, K1, K2 = 11, 1.5, 0.01, 0.03


def to_tensor(images) -> Optional[torch.Tensor]:
    """A list of PIL images (or a tensor already) -> float32 (N, C, H, W) in [0, 1]; None if there is nothing."""
    if isinstance(images, torch.Tensor):
        return images.detach().float().cpu()
    if not images:
        return None
    arrays = [np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0 for image in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def psnr(image: torch.Tensor, reference: torch.Tensor, data_range: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB; ``inf`` for identical images."""
    mse = torch.mean((image.double() - reference.double()) ** 2).item()
    return math.inf if mse == 0 else 10 * math.log10(data_range**2 / mse)


def _window(size: int, channels: int) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    gauss = torch.exp(-(coords**2) / (2 * SIGMA**2))
    gauss = gauss / gauss.sum()
    return torch.outer(gauss, gauss).expand(channels, 1, size, size).contiguous()


def ssim(image: torch.Tensor, reference: torch.Tensor, data_range: float = 1.0) -> float:
    """Mean SSIM over the batch, channels and valid window positions; 1.0 for identical images."""
    x, y = image.double(), reference.double()
    channels, height, width = x.shape[-3:]
    size = min(WINDOW, height, width)
    size -= 1 - size % 2  # odd, so the window has a centre
    window = _window(size, channels)

    def blur(t):
        return torch.nn.functional.conv2d(t, window, groups=channels)

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = (K1 * data_range) ** 2, (K2 * data_range) ** 2
    index = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return index.mean().item()


def compare(image: Optional[torch.Tensor], reference: Optional[torch.Tensor]):
    """(PSNR dB, SSIM) of ``image`` against ``reference``, or (None, None) if either is missing or shapes differ."""
    if image is None or reference is None or image.shape != reference.shape:
        return None, None
    return psnr(image, reference), ssim(image, reference)
