"""LoRA and IP-Adapter weights for the tiny models, made by the tests and saved locally with safetensors."""
import os

import torch
from conftest import CROSS_DIM

IMAGE_EMBED_DIM = 12  # width of the (absent) image encoder's embeddings


def save_lora(directory, seed, name="lora.safetensors", rank=4, model=None, pipeline_class=None):
    """A LoRA with random, non-zero weights on the attention projections of ``model`` (a fresh tiny UNet by
    default), saved the way diffusers' trainers do; returns the file's path."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from conftest import tiny_unet

    model = model if model is not None else tiny_unet()
    torch.manual_seed(seed)
    # init_lora_weights=False: random B as well as A, so the adapter changes the output from the first step.
    config = LoraConfig(
        r=rank, lora_alpha=rank, init_lora_weights=False, target_modules=["to_q", "to_k", "to_v", "to_out.0"]
    )
    model.add_adapter(config)
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(model))
    pipeline_class = pipeline_class or StableDiffusionPipeline
    key = "unet_lora_layers" if pipeline_class is StableDiffusionPipeline else "transformer_lora_layers"
    pipeline_class.save_lora_weights(directory, **{key: layers}, weight_name=name, safe_serialization=True)
    return os.path.join(str(directory), name)


def save_ip_adapter(directory, unet, seed=0, name="ip_adapter.safetensors"):
    """An IP-Adapter (plain ImageProjection, 4 image tokens) for ``unet``'s cross-attention layers, in the
    layout of the published checkpoints: ``image_proj.*`` and ``ip_adapter.<id>.to_{k,v}_ip.weight``."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    weights = {
        "image_proj.proj.weight": torch.randn(4 * CROSS_DIM, IMAGE_EMBED_DIM, generator=g) * 0.3,
        "image_proj.proj.bias": torch.randn(4 * CROSS_DIM, generator=g) * 0.3,
        "image_proj.norm.weight": torch.ones(CROSS_DIM),
        "image_proj.norm.bias": torch.zeros(CROSS_DIM),
    }
    # diffusers numbers the cross-attention processors 1, 3, 5, ... in attn_processors order.
    cross = [n for n in unet.attn_processors if not n.endswith("attn1.processor")]
    for index, processor_name in enumerate(cross):
        attn = unet.get_submodule(processor_name[: -len(".processor")])
        for proj in ("to_k_ip", "to_v_ip"):
            weight = torch.randn(attn.inner_dim, CROSS_DIM, generator=g) * 0.3
            weights[f"ip_adapter.{2 * index + 1}.{proj}.weight"] = weight
    save_file(weights, os.path.join(str(directory), name))
    # What pipe.load_ip_adapter(**...) takes: a local folder, no image encoder (embeddings are passed directly).
    return dict(
        pretrained_model_name_or_path_or_dict=str(directory), subfolder="", weight_name=name, image_encoder_folder=None
    )


def image_embeds(seed=5):
    """Precomputed image embeddings for ``ip_adapter_image_embeds``: negative and positive, as with CFG."""
    return [torch.randn(2, 1, IMAGE_EMBED_DIM, generator=torch.Generator().manual_seed(seed))]
