"""Make decoded images 8-bit on the device they were decoded on.

For ``output_type="pil"``, diffusers' ``VaeImageProcessor.postprocess`` copies the decoded image to the CPU
(``pt_to_numpy``: ``.cpu().permute(0, 2, 3, 1).float().numpy()``) and converts it there (``numpy_to_pil``:
``(images * 255).round().astype("uint8")``): passes over float32 pixels on the CPU. The same float32 multiply, the
same rounding (half to even, in numpy and in torch) and the same cast on the image's own device give the same bytes,
and only those uint8 pixels are copied: on an H200, 7.07 ms -> 0.85 ms for one 512-px fp16 image, 22.5 -> 2.3 ms
for four (benchmarks/results/2026-11-30-h200-postprocess).

The cast to uint8 is defined only on [0, 255], so the hook takes over only where every image is denormalized
(``denormalize`` clamps to [0, 1]); everything else goes to diffusers' own ``postprocess``.
"""
from __future__ import annotations

from typing import List, Optional

import torch

from .. import capabilities
from ..components import is_pipeline
from ..layers import Applied, InstanceHook, mark
from ..plan import Step
from ..report import SKIPPED

NAME = "device_postprocess"
COMPONENT = "image_processor"

#: The methods of VaeImageProcessor the hook stands in for (postprocess, pt_to_numpy, numpy_to_pil) or relies on
#: (_denormalize_conditionally, and denormalize for its clamp): a processor that changes any of them makes its
#: images differently, and keeps its own postprocess.
REPLACED_METHODS = ("postprocess", "pt_to_numpy", "numpy_to_pil", "_denormalize_conditionally", "denormalize")


class PostprocessOnDevice(InstanceHook):
    """``image_processor.postprocess`` that makes PIL images from uint8 pixels computed on the image's device.
    Same signature as diffusers' method; anything but its PIL path on denormalized images goes to that method."""

    transform = NAME

    def around(self, image, output_type: str = "pil", do_denormalize: Optional[List[bool]] = None):
        if not (output_type == "pil" and takes_over(self.owner, image, do_denormalize)):
            return self.inner(image, output_type=output_type, do_denormalize=do_denormalize)
        return to_pil(self.owner, image, do_denormalize)


def takes_over(processor, image, do_denormalize) -> bool:
    """Whether ``image`` is a batch whose every image is denormalized, and so clamped to [0, 1]."""
    if not (isinstance(image, torch.Tensor) and image.dim() == 4 and image.is_floating_point()):
        return False
    if image.requires_grad:  # diffusers' .numpy() raises on it; keep that error
        return False
    if do_denormalize is None:
        return bool(processor.config.do_normalize)
    if isinstance(do_denormalize, (list, tuple)):
        # A short list makes diffusers raise IndexError; the original method keeps that too.
        batch = image.shape[0]
        return len(do_denormalize) >= batch and all(do_denormalize[:batch])
    return False


def to_pil(processor, image: torch.Tensor, do_denormalize) -> list:
    """What ``numpy_to_pil(pt_to_numpy(_denormalize_conditionally(image)))`` returns, computed on the image's device."""
    from PIL import Image

    image = processor._denormalize_conditionally(image, do_denormalize)
    # float32 before *255, as pt_to_numpy does: the product then rounds exactly as numpy's does. NaN survives the
    # clamp; numpy casts it to 0.
    pixels = torch.nan_to_num((image.float() * 255).round(), nan=0.0).to(torch.uint8)
    # NHWC made contiguous on the device, so that PIL reads the pixels without another copy on the CPU.
    pixels = pixels.permute(0, 2, 3, 1).contiguous().cpu().numpy()
    if pixels.shape[-1] == 1:  # grayscale, exactly as numpy_to_pil builds it
        return [Image.fromarray(one.squeeze(), mode="L") for one in pixels]
    return [Image.fromarray(one) for one in pixels]


def apply_device_postprocess(processor) -> Applied:
    since = mark()
    PostprocessOnDevice(processor, "postprocess").install()
    detail = "decoded images made 8-bit on their device; one copy of uint8 pixels to the CPU"
    return Applied(detail, since, processor)


def _blocker(target) -> Optional[str]:
    """Why the pipeline's image processor cannot take the hook, or None."""
    from diffusers.image_processor import VaeImageProcessor

    processor = getattr(target, COMPONENT, None)
    kind = type(processor).__name__
    if not isinstance(processor, VaeImageProcessor):
        return f"the pipeline's image_processor is {kind}, not diffusers' VaeImageProcessor"
    own = [name for name in REPLACED_METHODS if getattr(type(processor), name) is not getattr(VaeImageProcessor, name)]
    for name in REPLACED_METHODS:
        # Set on the instance by someone else (this transform's own hook comes off before it is applied again).
        if name in vars(processor) and not isinstance(vars(processor)[name], PostprocessOnDevice):
            own.append(name)
    if own:
        return f"{kind} makes its images its own way (its own {', '.join(own)})"
    return None


def plan(ctx) -> List[Step]:
    if not ctx.config.device_postprocess:
        return []
    named = ctx.config.asks_for(NAME)
    if not is_pipeline(ctx.target):
        if named:  # the default is silently off on a bare model; named, it is a mistake worth hearing about
            raise ValueError(f"device_postprocess=True needs a pipeline with an image_processor, got "
                             f"{type(ctx.target).__name__}")  # fmt: skip
        return []
    if getattr(ctx.target, COMPONENT, None) is None:
        # A pipeline that makes its images without an image processor (DeepFloyd IF; audio, video): nothing to do.
        if named:
            raise ValueError(f"device_postprocess=True: {type(ctx.target).__name__} has no image_processor")
        return []
    # A diffusers without the method it reuses: UnsupportedFeatureError when named, like every version gate.
    reason = capabilities.require_or_skip(capabilities.device_postprocess(), named, NAME)
    reason = reason or _blocker(ctx.target)
    if reason:
        if named:
            raise ValueError(f"device_postprocess=True: {reason}")
        ctx.report.add(COMPONENT, NAME, SKIPPED, reason)
        return []
    processor = ctx.target.image_processor
    return [Step(COMPONENT, NAME, lambda: apply_device_postprocess(processor))]
