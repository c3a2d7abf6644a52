"""Finding the parts of a pipeline (or a bare model) that diffopt optimizes."""
from __future__ import annotations

from dataclasses import dataclass
from typing import List

import torch

DENOISER, CONTROLNET, VAE = "denoiser", "controlnet", "vae"
# Attribute names under which diffusers pipelines keep their denoiser, in the order we look.
DENOISER_ATTRS = ("unet", "transformer")


@dataclass(frozen=True)
class Component:
    name: str  # path from the pipeline, e.g. "unet" or "controlnet.nets.1"
    role: str  # DENOISER, CONTROLNET or VAE
    module: torch.nn.Module


def is_pipeline(obj) -> bool:
    from diffusers import DiffusionPipeline

    return isinstance(obj, DiffusionPipeline)


def check_target(obj) -> None:
    """Raise TypeError unless ``obj`` is something optimize/restore accept."""
    from diffusers import DiffusionPipeline, ModelMixin

    if isinstance(obj, (DiffusionPipeline, ModelMixin)):
        return
    raise TypeError(
        "diffopt expects a diffusers DiffusionPipeline or a diffusers model (UNet2DConditionModel, "
        f"ControlNetModel, a transformer, ...), got {type(obj).__module__}.{type(obj).__qualname__}"
    )


def _controlnets(name: str, module: torch.nn.Module) -> List[Component]:
    # MultiControlNetModel (and its newer Union twin) hold their nets in `.nets`; each is compiled alone so
    # that the Python loop over nets, which varies with the number of conditioning images, stays eager.
    nets = getattr(module, "nets", None)
    if isinstance(nets, torch.nn.ModuleList):
        return [Component(f"{name}.nets.{i}", CONTROLNET, net) for i, net in enumerate(nets)]
    return [Component(name, CONTROLNET, module)]


def find_components(target, *, include_vae: bool = False) -> List[Component]:
    """The modules to optimize, denoiser first. A bare model is its own single component."""
    check_target(target)
    if not is_pipeline(target):
        if "ControlNet" in type(target).__name__:
            return _controlnets(type(target).__name__, target)
        return [Component(type(target).__name__, DENOISER, target)]

    found = []
    for attr in DENOISER_ATTRS:
        module = getattr(target, attr, None)
        if isinstance(module, torch.nn.Module):
            found.append(Component(attr, DENOISER, module))
            break
    controlnet = getattr(target, "controlnet", None)
    if isinstance(controlnet, torch.nn.Module):
        found += _controlnets("controlnet", controlnet)
    vae = getattr(target, "vae", None)
    if include_vae and isinstance(getattr(vae, "decoder", None), torch.nn.Module):
        # The decoder is where VAE decode spends its time; post_quant_conv is one 1x1 conv.
        found.append(Component("vae.decoder", VAE, vae.decoder))
    return found


def module_device(module: torch.nn.Module) -> torch.device:
    for tensor in module.parameters():
        return tensor.device
    return torch.device("cpu")


def module_dtype(module: torch.nn.Module) -> torch.dtype:
    """The dtype of the first floating-point parameter: what the fused attention kernels are gated on."""
    for tensor in module.parameters():
        if tensor.is_floating_point():
            return tensor.dtype
    return torch.get_default_dtype()


def tensor_bytes(tensors) -> int:
    """The bytes ``tensors`` hold."""
    return sum(t.numel() * t.element_size() for t in tensors)


def conv_share(module: torch.nn.Module) -> float:
    """Share of the parameters that sit in 2-D convolutions: what channels_last can speed up."""
    total = sum(p.numel() for p in module.parameters())
    conv = sum(p.numel() for m in module.modules() if isinstance(m, torch.nn.Conv2d) for p in m.parameters(recurse=False))
    return conv / total if total else 0.0


def is_transformer(module: torch.nn.Module) -> bool:
    """A DiT-style model (SD3, Flux, PixArt, Sana, Wan, ...). diffusers builds these on SDPA-family processors
    (JointAttnProcessor2_0, FluxAttnProcessor, AttnProcessor2_0) and gives them no classic form, so those are
    the processors ``restore`` puts them back on."""
    return "Transformer" in type(module).__name__


def default_attention_family(module: torch.nn.Module) -> str:
    """The attention family ``restore(attention="default")`` leaves ``module`` on: the classic processors for
    UNets, ControlNets and VAEs (the deterministic, exportable state), the freshly built ones for transformers."""
    return "sdpa" if is_transformer(module) else "default"


def execution_device(module: torch.nn.Module) -> torch.device:
    """Where ``module`` runs: its offload hook's execution device (accelerate's model offload keeps the weights on
    the CPU between calls), else where its weights are."""
    device = getattr(getattr(module, "_hf_hook", None), "execution_device", None)
    if device is not None:
        return torch.device(device) if not isinstance(device, int) else torch.device("cuda", device)
    return module_device(module)
