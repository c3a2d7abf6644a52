"""Tiny random diffusers models: every test runs on a CPU in milliseconds (compile tests in seconds)."""
import pytest
import os

# The suite compiles many throwaway models: none of them may land in (or load from) the user's compile cache.
# Tests of the cache point it at their own directories.
os.environ["DIFFOPT_CACHE_DIR"] = "off"
import torch

CROSS_DIM = 32
SAMPLE = 16  # latent side; images are 8x larger with the tiny VAE below


def tiny_unet(**overrides):
    from diffusers import UNet2DConditionModel

    config = dict(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=SAMPLE, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=CROSS_DIM, attention_head_dim=8, norm_num_groups=8,
    )
    config.update(overrides)
    torch.manual_seed(0)
    return UNet2DConditionModel(**config).eval()


def tiny_vae():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(
        block_out_channels=(8, 16), in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, sample_size=SAMPLE * 2,
    ).eval()


def tiny_controlnet(unet=None):
    from diffusers import ControlNetModel

    torch.manual_seed(1)
    return ControlNetModel.from_unet(unet or tiny_unet(), conditioning_embedding_out_channels=(8, 16)).eval()


def sd_pipeline(unet=None, controlnet=None):
    from diffusers import DDIMScheduler, StableDiffusionControlNetPipeline, StableDiffusionPipeline

    parts = dict(
        vae=tiny_vae(), text_encoder=None, tokenizer=None, unet=unet or tiny_unet(), scheduler=DDIMScheduler(steps_offset=1, clip_sample=False),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    if controlnet is not None:
        pipe = StableDiffusionControlNetPipeline(controlnet=controlnet, **parts)
    else:
        pipe = StableDiffusionPipeline(**parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def if_unet():
    """DeepFloyd-IF-style: SimpleCrossAttn blocks whose attention has added key/value projections."""
    return tiny_unet(
        down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
        up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn", encoder_hid_dim=24, encoder_hid_dim_type="text_proj",
        addition_embed_type="text", addition_embed_type_num_heads=2, in_channels=3, out_channels=6,
    )


def if_pipeline():
    from diffusers import DDPMScheduler, IFPipeline

    pipe = IFPipeline(
        tokenizer=None, text_encoder=None, unet=if_unet(), scheduler=DDPMScheduler(), safety_checker=None,
        feature_extractor=None, watermarker=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sdxl_unet():
    """SDXL-style: text_time additional embeddings, linear projections in the transformer blocks."""
    return tiny_unet(
        addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=16 + 6 * 8,
        use_linear_projection=True,
    )


def sdxl_pipeline():
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline(
        vae=tiny_vae(), text_encoder=None, text_encoder_2=None, tokenizer=None, tokenizer_2=None,
        unet=sdxl_unet(), scheduler=EulerDiscreteScheduler(),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sd3_transformer(layers=2):
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    return SD3Transformer2DModel(
        sample_size=SAMPLE, patch_size=2, in_channels=4, num_layers=layers, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=CROSS_DIM, caption_projection_dim=16, pooled_projection_dim=16, out_channels=4,
    ).eval()


def sd3_inputs(batch=1):
    g = torch.Generator().manual_seed(0)
    return dict(
        hidden_states=torch.randn(batch, 4, SAMPLE, SAMPLE, generator=g),
        encoder_hidden_states=torch.randn(batch, 7, CROSS_DIM, generator=g),
        pooled_projections=torch.randn(batch, 16, generator=g), timestep=torch.tensor([500] * batch),
    )


def flux_transformer():
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    # in_channels = 4 latent channels x a 2x2 patch: Flux packs latents before the transformer.
    return FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=CROSS_DIM, pooled_projection_dim=16, axes_dims_rope=(2, 2, 4),
    ).eval()


def pixart_transformer():
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(0)
    return PixArtTransformer2DModel(
        sample_size=SAMPLE, num_layers=2, patch_size=2, attention_head_dim=8, num_attention_heads=2,
        caption_channels=CROSS_DIM, in_channels=4, cross_attention_dim=16, out_channels=8, attention_bias=True,
        activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_single",
        norm_elementwise_affine=False, norm_eps=1e-6,
    ).eval()


def transformer_inputs(model, batch=1):
    """Direct inputs for the tiny SD3, Flux and PixArt transformers above (for model-level tests)."""
    from diffusers import FluxTransformer2DModel, PixArtTransformer2DModel

    if not isinstance(model, (FluxTransformer2DModel, PixArtTransformer2DModel)):
        return sd3_inputs(batch)
    g = torch.Generator().manual_seed(0)
    text = torch.randn(batch, 7, CROSS_DIM, generator=g)
    timestep = torch.tensor([500] * batch)
    if isinstance(model, PixArtTransformer2DModel):
        return dict(
            hidden_states=torch.randn(batch, 4, SAMPLE, SAMPLE, generator=g), encoder_hidden_states=text,
            timestep=timestep, added_cond_kwargs={"resolution": None, "aspect_ratio": None},
        )
    side = SAMPLE // 2  # packed: 2x2 latent patches per token
    ids = torch.stack(torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij"), -1).reshape(-1, 2)
    return dict(
        hidden_states=torch.randn(batch, side * side, 16, generator=g), encoder_hidden_states=text,
        pooled_projections=torch.randn(batch, 16, generator=g), timestep=timestep / 1000,
        img_ids=torch.cat([torch.zeros(side * side, 1), ids.float()], dim=1), txt_ids=torch.zeros(7, 3),
    )


def sd3_pipeline(layers=2):
    """``layers``: SD3's last block differs from the others (no context feed-forward), so two or more blocks alike
    take three."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    no_text = {f"{kind}{suffix}": None for kind in ("text_encoder", "tokenizer") for suffix in ("", "_2", "_3")}
    pipe = StableDiffusion3Pipeline(
        transformer=sd3_transformer(layers), scheduler=FlowMatchEulerDiscreteScheduler(), vae=tiny_vae(), **no_text
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def flux_pipeline():
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    pipe = FluxPipeline(
        transformer=flux_transformer(), scheduler=FlowMatchEulerDiscreteScheduler(), vae=tiny_vae(),
        text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pixart_pipeline():
    from diffusers import DPMSolverMultistepScheduler, PixArtSigmaPipeline

    pipe = PixArtSigmaPipeline(
        transformer=pixart_transformer(), scheduler=DPMSolverMultistepScheduler(), vae=tiny_vae(),
        text_encoder=None, tokenizer=None,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_transformer_pipeline(pipe, steps=2):
    """One seeded generation of the tiny SD3, Flux or PixArt-Sigma pipeline from random (pooled) prompt
    embeddings; returns the latents (Flux's packed)."""
    from diffusers import FluxPipeline, PixArtSigmaPipeline, StableDiffusion3Pipeline

    g = torch.Generator().manual_seed(0)
    # Drawn on the CPU (the same numbers everywhere), then put where the transformer is: SD3 and PixArt take given
    # embeddings as they are.
    where = dict(device=pipe.transformer.device, dtype=pipe.transformer.dtype)
    embeds = lambda *shape: torch.randn(*shape, generator=g).to(**where)  # noqa: E731
    common = dict(
        num_inference_steps=steps, height=SAMPLE * 2, width=SAMPLE * 2, output_type="latent",
        generator=torch.Generator().manual_seed(1),
    )
    if isinstance(pipe, StableDiffusion3Pipeline):
        extra = dict(
            prompt_embeds=embeds(1, 7, CROSS_DIM), negative_prompt_embeds=embeds(1, 7, CROSS_DIM),
            pooled_prompt_embeds=embeds(1, 16), negative_pooled_prompt_embeds=embeds(1, 16),
        )
    elif isinstance(pipe, FluxPipeline):
        extra = dict(prompt_embeds=embeds(1, 7, CROSS_DIM), pooled_prompt_embeds=embeds(1, 16))
    elif isinstance(pipe, PixArtSigmaPipeline):
        extra = dict(
            prompt_embeds=embeds(1, 7, CROSS_DIM), prompt_attention_mask=torch.ones(1, 7, device=where["device"]),
            negative_prompt=None, negative_prompt_embeds=embeds(1, 7, CROSS_DIM),
            negative_prompt_attention_mask=torch.ones(1, 7, device=where["device"]), use_resolution_binning=False,
        )
    else:
        raise TypeError(f"not a tiny transformer pipeline: {type(pipe).__name__}")
    with torch.inference_mode():
        return pipe(**extra, **common).images


def unet_inputs(unet, batch=1):
    """Direct UNet inputs matching the tiny builders above (for model-level tests)."""
    g = torch.Generator().manual_seed(0)
    cfg = unet.config
    kwargs = dict(
        sample=torch.randn(batch, cfg.in_channels, SAMPLE, SAMPLE, generator=g), timestep=torch.tensor(500),
        encoder_hidden_states=torch.randn(batch, 7, cfg.encoder_hid_dim or cfg.cross_attention_dim, generator=g),
    )
    if cfg.addition_embed_type == "text_time":
        kwargs["added_cond_kwargs"] = dict(
            text_embeds=torch.randn(batch, 16, generator=g), time_ids=torch.randn(batch, 6, generator=g)
        )
    return kwargs


def run_pipeline(pipe, steps=2):
    """One seeded generation for any of the tiny pipelines; returns latents (or IF's pixels)."""
    from diffusers import IFPipeline, StableDiffusionXLPipeline

    if hasattr(pipe, "transformer"):
        return run_transformer_pipeline(pipe, steps)

    if isinstance(pipe, IFPipeline):
        g = torch.Generator().manual_seed(0)
        with torch.inference_mode():
            return pipe(
                prompt_embeds=torch.randn(1, 7, 24, generator=g), negative_prompt_embeds=torch.randn(1, 7, 24, generator=g),
                num_inference_steps=steps, output_type="pt", height=SAMPLE, width=SAMPLE,
                generator=torch.Generator().manual_seed(1),
            ).images
    if isinstance(pipe, StableDiffusionXLPipeline):
        g = torch.Generator().manual_seed(2)
        extra = dict(
            pooled_prompt_embeds=torch.randn(1, 16, generator=g), negative_pooled_prompt_embeds=torch.randn(1, 16, generator=g)
        )
        return run_sd(pipe, steps, **extra)
    if hasattr(pipe, "controlnet"):
        nets = getattr(pipe.controlnet, "nets", [pipe.controlnet])
        g = torch.Generator().manual_seed(3)
        images = [torch.rand(1, 3, SAMPLE * 2, SAMPLE * 2, generator=g) for _ in nets]
        return run_sd(pipe, steps, image=images if len(nets) > 1 else images[0])
    return run_sd(pipe, steps)


def run_sd(pipe, steps=2, batch=1, **extra):
    """One seeded generation from random prompt embeddings; returns the latents."""
    g = torch.Generator().manual_seed(0)
    embeds = torch.randn(batch, 7, CROSS_DIM, generator=g)
    negative = torch.randn(batch, 7, CROSS_DIM, generator=g)
    with torch.inference_mode():
        return pipe(
            prompt_embeds=embeds, negative_prompt_embeds=negative, num_inference_steps=steps,
            output_type="latent", generator=torch.Generator().manual_seed(1), **extra,
        ).images


def rel_l2(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture
def compile_clean():
    """Fresh dynamo state before and after a test that compiles for real."""
    torch.compiler.reset()
    yield
    torch.compiler.reset()


@pytest.fixture(scope="module")
def steady_cpu():
    """For modules that time calls on the CPU. oneDNN compiles a kernel per new convolution shape: seconds on a small
    CPU, milliseconds without it. One thread: on a shared CPU a call's seconds then vary by a few percent, not by
    several times."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.backends.mkldnn.flags(enabled=False):
            yield
    finally:
        torch.set_num_threads(threads)


def vars_by_identity(owner) -> dict:
    """``vars(owner)`` by identity: a module's parameters cannot be compared with ``==``."""
    return {name: id(value) for name, value in vars(owner).items()}
