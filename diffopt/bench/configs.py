"""Architecture configs of the benchmark models, written out so that no download is needed.

The "full" configs are the public ones (same keyword arguments as the model's ``config.json`` on the Hub);
random weights with these shapes run at the same speed as the trained checkpoints. The "tiny" configs keep
each model's block types (cross-attention, added-KV attention, class embeddings, ...) at widths of 32-64
channels so that a CPU runs a whole pipeline in well under a second.

Parameter counts of the full configs (``tests/test_bench_configs.py`` checks them on the meta device):

========================  ==============  ================================================
model                         parameters  public figure
========================  ==============  ================================================
sd15-unet                    859,520,964  SD1.5 UNet, 859.52M
sd15-inpaint-unet            859,535,364  SD1.5 inpainting UNet (9 input channels)
sd15-controlnet              361,279,120  sd-controlnet-canny, 361M
sd15-vae                      83,653,863  SD VAE, 83.65M
sdxl-unet                  2,567,463,684  SDXL base UNet, 2.567B
sdxl-vae                      83,653,863  SDXL VAE (same shapes as SD's)
if-i-m-unet                  371,605,830  IF-I-M, "400M" on the model card
if-ii-m-unet                 482,483,334  IF-II-M, "450M" on the model card
x4-upscaler-unet             473,398,020  stable-diffusion-x4-upscaler UNet
x4-upscaler-vae               55,325,927  stable-diffusion-x4-upscaler VAE (3 blocks)
sd3-medium-transformer     2,028,328,000  SD3 Medium MMDiT, "2B" (2.03B on the Hub)
sd3-vae                       83,819,683  SD3 VAE (16 latent channels, no quant convs)
flux-dev-transformer      11,901,408,320  FLUX.1 [dev], "12B" (11.9B on the Hub)
flux-schnell-transformer  11,891,178,560  FLUX.1 [schnell]: dev without the guidance embedder
flux-vae                      83,819,683  FLUX.1 VAE (SD3's shapes, other scale and shift)
========================  ==============  ================================================

The IF configs follow the public IF-I-XL and IF-II-L ``config.json`` files (block types, attention, scale
factors, per-block layer counts) at the M widths: IF-I-M is the ADM-64 width 192 (IF-I-XL is 704, IF-I-L
320); IF-II-M is width 96 with IF-II-L's channel multipliers (1, 2, 4, 6, 8) and layers (2, 2, 3, 5, 5). The
same recipe gives IF-I-XL 4.35B and IF-II-L 1.24B, matching their cards (4.3B, 1.2B).

Example:
    >>> from diffopt.bench.configs import MODELS, build_model
    >>> MODELS["sd15-unet"].config["cross_attention_dim"]
    768
    >>> unet = build_model("sd15-unet", size="tiny")  # random weights, CPU, float32
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class ModelConfig:
    """One model's class name in ``diffusers`` and its constructor keyword arguments, full and tiny."""

    class_name: str
    config: dict[str, Any]
    tiny: dict[str, Any]


def _vae(block_out_channels, sample_size, scaling_factor, norm_num_groups=32):
    n = len(block_out_channels)
    return dict(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * n,
        up_block_types=["UpDecoderBlock2D"] * n,
        block_out_channels=list(block_out_channels),
        layers_per_block=2 if block_out_channels[0] >= 128 else 1,
        latent_channels=4,
        norm_num_groups=norm_num_groups,
        sample_size=sample_size,
        scaling_factor=scaling_factor,
    )


# --- Stable Diffusion 1.5: UNet2DConditionModel defaults are the SD1.5 UNet. ---------------------------
SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, cross_attention_dim=768, attention_head_dim=8)
TINY_SD15_UNET = dict(
    sample_size=32,
    in_channels=4,
    out_channels=4,
    block_out_channels=[32, 64],
    layers_per_block=1,
    down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
    cross_attention_dim=32,
    attention_head_dim=8,
)

# The ControlNet copies the UNet's encoder, so its config is the UNet's minus the decoder keys.
SD15_CONTROLNET = dict(cross_attention_dim=768, attention_head_dim=8)
TINY_SD15_CONTROLNET = dict(
    block_out_channels=[32, 64],
    layers_per_block=1,
    down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
    cross_attention_dim=32,
    attention_head_dim=8,
    # Two stages of stride 2 would need a 4x smaller latent than the 2-block tiny VAE gives.
    conditioning_embedding_out_channels=[16, 32],
)

SD15_VAE = _vae([128, 256, 512, 512], sample_size=512, scaling_factor=0.18215)
TINY_SD15_VAE = _vae([32, 64], sample_size=64, scaling_factor=0.18215)

# --- SDXL base (stabilityai/stable-diffusion-xl-base-1.0 unet/config.json). -------------------------------
SDXL_UNET = dict(
    sample_size=128,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    block_out_channels=[320, 640, 1280],
    transformer_layers_per_block=[1, 2, 10],
    attention_head_dim=[5, 10, 20],
    cross_attention_dim=2048,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    # 6 time ids x 256 + the 1280-wide pooled text embedding.
    projection_class_embeddings_input_dim=2816,
)
TINY_SDXL_UNET = dict(
    sample_size=32,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"],
    block_out_channels=[32, 64],
    layers_per_block=1,
    transformer_layers_per_block=[1, 2],
    attention_head_dim=[2, 4],
    cross_attention_dim=64,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=6 * 8 + 32,
)
SDXL_VAE = _vae([128, 256, 512, 512], sample_size=1024, scaling_factor=0.13025)
TINY_SDXL_VAE = _vae([32, 64], sample_size=64, scaling_factor=0.13025)

# --- DeepFloyd IF: pixel-space cascade, T5-XXL embeddings (4096 wide) projected by encoder_hid_proj. ------
_IF_COMMON = dict(
    act_fn="gelu",
    addition_embed_type="text",
    addition_embed_type_num_heads=64,
    attention_head_dim=64,
    cross_attention_norm="group_norm",
    encoder_hid_dim=4096,
    encoder_hid_dim_type="text_proj",
    mid_block_type="UNetMidBlock2DSimpleCrossAttn",
    resnet_time_scale_shift="scale_shift",
)
IF_I_M_UNET = dict(
    _IF_COMMON,
    sample_size=64,
    in_channels=3,
    out_channels=6,  # mean and variance: the scheduler uses variance_type="learned_range"
    block_out_channels=[192, 384, 576, 768],
    layers_per_block=3,
    cross_attention_dim=768,
    down_block_types=["ResnetDownsampleBlock2D"] + ["SimpleCrossAttnDownBlock2D"] * 3,
    up_block_types=["SimpleCrossAttnUpBlock2D"] * 3 + ["ResnetUpsampleBlock2D"],
)
TINY_IF_I_UNET = dict(
    IF_I_M_UNET,
    sample_size=16,
    block_out_channels=[32, 64],
    layers_per_block=1,
    cross_attention_dim=32,
    encoder_hid_dim=32,
    attention_head_dim=8,
    addition_embed_type_num_heads=2,
    down_block_types=["ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"],
    up_block_types=["SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"],
)
_SQRT2 = 1.4142271248762552  # IF-II's residual scale (1 / 0.7071), as stored in its config.json
IF_II_M_UNET = dict(
    _IF_COMMON,
    sample_size=256,
    in_channels=6,  # noisy image + the upscaled stage-I image
    out_channels=6,
    block_out_channels=[96, 192, 384, 576, 768],
    layers_per_block=[2, 2, 3, 5, 5],
    cross_attention_dim=768,
    down_block_types=["ResnetDownsampleBlock2D"] * 3 + ["SimpleCrossAttnDownBlock2D"] * 2,
    up_block_types=["SimpleCrossAttnUpBlock2D"] * 2 + ["ResnetUpsampleBlock2D"] * 3,
    class_embed_type="timestep",  # conditions on the noise level added to the stage-I image
    mid_block_scale_factor=_SQRT2,
    resnet_out_scale_factor=_SQRT2,
    resnet_skip_time_act=True,
    time_embedding_act_fn="gelu",
    time_embedding_dim=768,
)
TINY_IF_II_UNET = dict(
    IF_II_M_UNET,
    sample_size=64,
    block_out_channels=[32, 64],
    layers_per_block=[1, 2],
    cross_attention_dim=32,
    encoder_hid_dim=32,
    attention_head_dim=8,
    addition_embed_type_num_heads=2,
    down_block_types=["ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"],
    up_block_types=["SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"],
    time_embedding_dim=32,
)

# --- Stable Diffusion x4 upscaler (stage III of the docs page's IF benchmark). ----------------------------
X4_UNET = dict(
    sample_size=128,
    in_channels=7,  # 4 latent channels + the 3-channel low-resolution image
    out_channels=4,
    block_out_channels=[256, 512, 512, 1024],
    layers_per_block=2,
    down_block_types=["DownBlock2D"] + ["CrossAttnDownBlock2D"] * 3,
    up_block_types=["CrossAttnUpBlock2D"] * 3 + ["UpBlock2D"],
    cross_attention_dim=1024,
    attention_head_dim=8,
    num_class_embeds=1000,  # noise level of the low-resolution image, up to max_noise_level=350
    only_cross_attention=[True, True, True, False],
    use_linear_projection=True,
)
TINY_X4_UNET = dict(
    X4_UNET,
    sample_size=64,
    block_out_channels=[32, 64],
    layers_per_block=1,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"],
    cross_attention_dim=32,
    only_cross_attention=[True, False],
)
# Three blocks: the upscaler's latent has the low-resolution image's size and decodes 4x larger.
X4_VAE = _vae([128, 256, 512], sample_size=256, scaling_factor=0.08333)
TINY_X4_VAE = _vae([32, 32, 64], sample_size=256, scaling_factor=0.08333)


# --- Transformers: SD3 Medium and Flux.1 (stabilityai/stable-diffusion-3-medium-diffusers and ----------
# black-forest-labs/FLUX.1-{dev,schnell} config.json files). Their VAE is SD's with 16 latent channels and
# no quant convs; the shift/scale factors are what the pipelines read.
SD3_MEDIUM_TRANSFORMER = dict(
    sample_size=128,
    patch_size=2,
    in_channels=16,
    num_layers=24,
    attention_head_dim=64,
    num_attention_heads=24,
    joint_attention_dim=4096,  # T5-XXL width (CLIP-L + CLIP-G embeddings are padded to it)
    caption_projection_dim=1536,
    pooled_projection_dim=2048,  # CLIP-L (768) + CLIP-G (1280) pooled
    out_channels=16,
    pos_embed_max_size=192,
)
TINY_SD3_TRANSFORMER = dict(
    SD3_MEDIUM_TRANSFORMER,
    sample_size=16,
    num_layers=2,
    attention_head_dim=8,
    num_attention_heads=2,
    joint_attention_dim=32,
    caption_projection_dim=16,
    pooled_projection_dim=16,
    pos_embed_max_size=32,
)
FLUX_DEV_TRANSFORMER = dict(
    patch_size=1,
    in_channels=64,  # 16 latent channels x a 2x2 patch: the pipeline packs latents before the transformer
    num_layers=19,
    num_single_layers=38,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=4096,
    pooled_projection_dim=768,
    guidance_embeds=True,  # dev is guidance-distilled: the guidance scale is an input, no CFG batch
    axes_dims_rope=[16, 56, 56],
)
TINY_FLUX_DEV_TRANSFORMER = dict(
    FLUX_DEV_TRANSFORMER,
    num_layers=1,
    num_single_layers=2,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=32,
    pooled_projection_dim=16,
    axes_dims_rope=[4, 6, 6],
)
# schnell is timestep-distilled from the same architecture, without the guidance embedder.
FLUX_SCHNELL_TRANSFORMER = dict(FLUX_DEV_TRANSFORMER, guidance_embeds=False)
TINY_FLUX_SCHNELL_TRANSFORMER = dict(TINY_FLUX_DEV_TRANSFORMER, guidance_embeds=False)


def _vae16(block_out_channels, sample_size, scaling_factor, shift_factor):
    return dict(
        _vae(block_out_channels, sample_size, scaling_factor),
        latent_channels=16,
        shift_factor=shift_factor,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )


SD3_VAE = _vae16([128, 256, 512, 512], sample_size=1024, scaling_factor=1.5305, shift_factor=0.0609)
TINY_SD3_VAE = _vae16([32, 64], sample_size=64, scaling_factor=1.5305, shift_factor=0.0609)
FLUX_VAE = _vae16([128, 256, 512, 512], sample_size=1024, scaling_factor=0.3611, shift_factor=0.1159)
TINY_FLUX_VAE = _vae16([32, 64], sample_size=64, scaling_factor=0.3611, shift_factor=0.1159)


MODELS: dict[str, ModelConfig] = {
    "sd15-unet": ModelConfig("UNet2DConditionModel", SD15_UNET, TINY_SD15_UNET),
    "sd15-inpaint-unet": ModelConfig(
        "UNet2DConditionModel", dict(SD15_UNET, in_channels=9), dict(TINY_SD15_UNET, in_channels=9)
    ),
    "sd15-controlnet": ModelConfig("ControlNetModel", SD15_CONTROLNET, TINY_SD15_CONTROLNET),
    "sd15-vae": ModelConfig("AutoencoderKL", SD15_VAE, TINY_SD15_VAE),
    "sdxl-unet": ModelConfig("UNet2DConditionModel", SDXL_UNET, TINY_SDXL_UNET),
    "sdxl-vae": ModelConfig("AutoencoderKL", SDXL_VAE, TINY_SDXL_VAE),
    "if-i-m-unet": ModelConfig("UNet2DConditionModel", IF_I_M_UNET, TINY_IF_I_UNET),
    "if-ii-m-unet": ModelConfig("UNet2DConditionModel", IF_II_M_UNET, TINY_IF_II_UNET),
    "x4-upscaler-unet": ModelConfig("UNet2DConditionModel", X4_UNET, TINY_X4_UNET),
    "x4-upscaler-vae": ModelConfig("AutoencoderKL", X4_VAE, TINY_X4_VAE),
    "sd3-medium-transformer": ModelConfig("SD3Transformer2DModel", SD3_MEDIUM_TRANSFORMER, TINY_SD3_TRANSFORMER),
    "sd3-vae": ModelConfig("AutoencoderKL", SD3_VAE, TINY_SD3_VAE),
    "flux-dev-transformer": ModelConfig("FluxTransformer2DModel", FLUX_DEV_TRANSFORMER, TINY_FLUX_DEV_TRANSFORMER),
    "flux-schnell-transformer": ModelConfig(
        "FluxTransformer2DModel", FLUX_SCHNELL_TRANSFORMER, TINY_FLUX_SCHNELL_TRANSFORMER
    ),
    "flux-vae": ModelConfig("AutoencoderKL", FLUX_VAE, TINY_FLUX_VAE),
}

SIZES = ("full", "tiny")


def model_config(name: str, size: str = "full") -> dict[str, Any]:
    """A copy of the constructor keyword arguments of model ``name`` at ``size`` ("full" or "tiny")."""
    if name not in MODELS:
        raise ValueError(f"model must be one of {sorted(MODELS)}, got {name!r}")
    if size not in SIZES:
        raise ValueError(f"size must be one of {list(SIZES)}, got {size!r}")
    entry = MODELS[name]
    return dict(entry.config if size == "full" else entry.tiny)


def build_model(name: str, size: str = "full", device="cpu", dtype: torch.dtype = torch.float32, seed: int = 0):
    """Build model ``name`` with random weights, directly on ``device`` (use "meta" to only count parameters).

    Weights are initialised in float32 and then cast, so a seed gives the same weights for every dtype.

    Example:
        >>> unet = build_model("sdxl-unet", device="meta")
        >>> sum(p.numel() for p in unet.parameters())
        2567463684
    """
    import diffusers  # deferred: importing diffusers costs seconds and is not needed to read the configs

    config = model_config(name, size)
    cls = getattr(diffusers, MODELS[name].class_name)
    if str(device) != "meta":
        torch.manual_seed(seed)
    # Building on the target device skips a 10 GB float32 copy of SDXL in host memory.
    with torch.device(device):
        model = cls(**config)
    # nn.Module.to, not ModelMixin.to: the latter warns about float32-only modules, and these models have none.
    return torch.nn.Module.to(model, dtype=dtype).eval()


def parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
