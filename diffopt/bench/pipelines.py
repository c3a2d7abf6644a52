"""The benchmark pipelines: built with random weights from :mod:`diffopt.bench.configs`, or loaded from disk.

Every pipeline is a :class:`BenchCase` of one or more :class:`Stage` s. SD and SDXL have one stage; "if" has
three, like the docs page's DeepFloyd IF benchmark: IF-I-M (64 px), IF-II-M (64 -> 256 px) and the SD x4
upscaler (256 -> 1024 px). A stage holds its pipeline and ``call(batch_size, output_type)``, which runs one
generation from fixed inputs: random prompt embeddings (no text encoder is built), random input images where
the pipeline needs one, and a generator seeded with 0, so two calls give the same output.

Example:
    >>> from diffopt.bench.pipelines import build_case
    >>> case = build_case("sd-txt2img", size="tiny", steps=2)
    >>> latents = case.stages[0].call(1, "latent")
    >>> tuple(latents.shape)
    (1, 4, 16, 16)
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np
import torch

from diffopt.bench.configs import build_model

# The docs page's six, run by default; "all" adds the transformer pipelines.
DOCS_PIPELINES = ("sd-txt2img", "sd-img2img", "sd-inpaint", "sd-controlnet", "if", "sdxl")
TRANSFORMER_PIPELINES = ("sd3-medium", "flux-dev", "flux-schnell")
PIPELINES = DOCS_PIPELINES + TRANSFORMER_PIPELINES
#: The stages of the pipelines that chain several, in order; ``--stages`` picks among them.
STAGES = {"if": ("I", "II", "III")}

# Row labels of the docs page's tables.
LABELS = {
    "sd-txt2img": "SD - txt2img",
    "sd-img2img": "SD - img2img",
    "sd-inpaint": "SD - inpaint",
    "sd-controlnet": "SD - controlnet",
    "if": "IF",
    "sdxl": "SDXL - txt2img",
    "sd3-medium": "SD3 Medium - txt2img",
    "flux-dev": "Flux.1 dev - txt2img",
    "flux-schnell": "Flux.1 schnell - txt2img",
}

# Steps per stage: DDIM 50 for SD1.5 and Euler 30 for SDXL, each IF pipeline's own default, and
# the model cards' 28 for SD3 Medium and Flux dev, 4 for the timestep-distilled Flux schnell.
FULL_STEPS = {
    "sd": 50, "sdxl": 30, "if-i": 100, "if-ii": 50, "x4": 75, "sd3-medium": 28, "flux-dev": 28, "flux-schnell": 4
}
TINY_STEPS = 3

# Output height of the first stage; IF-II and the x4 upscaler each multiply it by 4.
FULL_HEIGHT = {"sd": 512, "sdxl": 1024, "if": 64, "sd3-medium": 1024, "flux-dev": 1024, "flux-schnell": 1024}
TINY_HEIGHT = {"sd": 32, "sdxl": 32, "if": 8, "sd3-medium": 32, "flux-dev": 32, "flux-schnell": 32}

PROMPT_TOKENS = 77  # CLIP's and IF's T5 context length
# SD3 concatenates CLIP's 77 tokens and T5's 256 (its pipeline's max_sequence_length); Flux feeds T5 alone,
# 512 tokens for dev and 256 for schnell (their pipelines' defaults and the model cards).
T5_TOKENS = {"sd3-medium": PROMPT_TOKENS + 256, "flux-dev": 512, "flux-schnell": 256}

IMG2IMG_STRENGTH = 0.8  # StableDiffusionImg2ImgPipeline's default, which the docs page uses

# Noise added to the x4 upscaler's low-resolution input, as in the docs page's ``pipe_3(..., noise_level=100)``.
X4_NOISE_LEVEL = 100


@dataclass
class Stage:
    """One pipeline of a benchmark case and the function that runs it once.

    ``call(batch_size, output_type)`` returns ``.images`` of the pipeline output. ``timed_output`` is the
    output type of the timed calls: "latent" where the pipeline has a VAE, "pt" where it has none (IF I/II).
    ``batch_size`` is forced to 1 where ``single_batch`` is set: the docs page runs IF's upscalers at batch 1.
    """

    label: str
    pipe: Any
    call: Callable[[int, str], Any]
    steps: int
    timed_output: str = "latent"
    single_batch: bool = False

    def denoisers(self) -> dict[str, torch.nn.Module]:
        """The modules that run once per step, by attribute name: ``unet`` or ``transformer`` and, for
        ControlNet, ``controlnet``."""
        found = {}
        for name in ("controlnet", "unet", "transformer"):
            module = getattr(self.pipe, name, None)
            if isinstance(module, torch.nn.Module):
                found[name] = module
        return found


@dataclass
class BenchCase:
    name: str
    stages: list[Stage] = field(default_factory=list)

    @property
    def label(self) -> str:
        return LABELS.get(self.name, self.name)


def build_case(
    name: str,
    size: str = "tiny",
    device="cpu",
    dtype: torch.dtype = torch.float32,
    steps: Optional[int] = None,
    height: Optional[int] = None,
    width: Optional[int] = None,
    weights: Optional[str] = None,
    stages: Optional[list[str]] = None,
) -> BenchCase:
    """Build benchmark pipeline ``name`` with random weights, or load it from ``weights`` if given.

    ``weights`` is a directory written by ``save_pretrained``: either the pipeline itself, or a folder with one
    sub-directory per benchmark pipeline (``sd-txt2img/``, ``sdxl/``, ...). For "if" it must hold
    ``stage-1/``, ``stage-2/`` and ``stage-3/``. ``steps``, ``height`` and ``width`` override the defaults of
    ``size``; for "if", height and width are those of stage I. ``stages`` keeps only the named stages of a
    pipeline in :data:`STAGES` (each IF stage takes a fixed random image, so any of them runs alone).

    Example:
        >>> case = build_case("if", size="tiny", steps=1)
        >>> [stage.label for stage in case.stages]
        ['I', 'II', 'III']
    """
    if name not in _BUILDERS:
        raise ValueError(f"pipeline must be one of {list(PIPELINES)}, got {name!r}")
    if size not in ("full", "tiny"):
        raise ValueError(f"size must be one of ['full', 'tiny'], got {size!r}")
    check_stages([name], stages)
    heights = FULL_HEIGHT if size == "full" else TINY_HEIGHT
    family = "sd" if name.startswith("sd-") else name
    h = height or heights[family]
    w = width or height or heights[family]
    setup = _Setup(size, torch.device(device), dtype, steps)
    built = _BUILDERS[name](setup, h, w, _weights_dir(weights, name))
    return BenchCase(name, [stage for stage in built if not stages or stage.label in stages])


def check_stages(pipelines: list[str], stages: Optional[list[str]]) -> None:
    """Raise ValueError unless every pipeline has all of ``stages`` (None or empty: all stages, always fine)."""
    if not stages:
        return
    for name in pipelines:
        known = STAGES.get(name, ())
        unknown = [stage for stage in stages if stage not in known]
        picked = ",".join(unknown)
        if unknown and known:
            raise ValueError(f"{picked!r} not among the stages of {name!r}; choose from {', '.join(known)}")
        if unknown:
            having = ", ".join(f"{pipeline} ({', '.join(labels)})" for pipeline, labels in STAGES.items())
            raise ValueError(f"{picked!r}: {name!r} has one stage; only these pipelines have stages: {having}")


@dataclass
class _Setup:
    size: str
    device: torch.device
    dtype: torch.dtype
    steps: Optional[int]

    def model(self, name: str):
        return build_model(name, self.size, self.device, self.dtype)

    def steps_for(self, family: str) -> int:
        if self.steps is not None:
            return self.steps
        return FULL_STEPS[family] if self.size == "full" else TINY_STEPS

    def randn(self, *shape, seed: int = 1) -> torch.Tensor:
        # A CPU generator gives the same numbers on every device, so CPU and GPU runs see the same inputs.
        generator = torch.Generator().manual_seed(seed)
        return torch.randn(shape, generator=generator).to(self.device, self.dtype)

    def generator(self) -> torch.Generator:
        return torch.Generator(self.device).manual_seed(0)

    def prompt_embeddings(self, dim: int) -> Callable[[int], tuple]:
        """``batch_size -> (positive, negative)`` random prompt embeddings, made once per batch size so that
        creating them stays out of the timed calls."""
        make = lambda batch_size: tuple(  # noqa: E731
            self.randn(batch_size, PROMPT_TOKENS, dim, seed=seed) for seed in (1, 2)
        )
        return functools.lru_cache(maxsize=None)(make)


def _weights_dir(weights: Optional[str], name: str) -> Optional[str]:
    if weights is None:
        return None
    nested = os.path.join(weights, name)
    return nested if os.path.isdir(nested) else weights


def _load(cls, path: str, setup: _Setup, **absent):
    """``cls.from_pretrained(path)`` without the components the benchmark replaces by random embeddings."""
    pipe = cls.from_pretrained(path, torch_dtype=setup.dtype, **absent)
    return pipe.to(setup.device)


def _ready(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _random_image(height: int, width: int, seed: int = 2):
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def _square_mask(height: int, width: int):
    """White (repaint) square over the middle half of the image, black elsewhere."""
    from PIL import Image

    mask = np.zeros((height, width), dtype=np.uint8)
    mask[height // 4 : 3 * height // 4, width // 4 : 3 * width // 4] = 255
    return Image.fromarray(mask).convert("RGB")


# --- Stable Diffusion 1.5 ------------------------------------------------------------------------------

_NO_TEXT = dict(text_encoder=None, tokenizer=None, safety_checker=None, feature_extractor=None)


def _sd_scheduler():
    from diffusers import DDIMScheduler

    # SD1.5's scheduler_config.json; DDIMScheduler() alone costs the same but warns.
    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )


def _sd_pipe(cls, setup: _Setup, weights: Optional[str], unet: str = "sd15-unet", **extra_models):
    if weights:
        return _ready(_load(cls, weights, setup, requires_safety_checker=False, **_NO_TEXT))
    models = {key: setup.model(model) for key, model in extra_models.items()}
    pipe = cls(
        vae=setup.model("sd15-vae"),
        unet=setup.model(unet),
        scheduler=_sd_scheduler(),
        requires_safety_checker=False,
        **_NO_TEXT,
        **models,
    )
    return _ready(pipe)


def _sd_stage(pipe, setup: _Setup, height: int, width: int, strength: Optional[float] = None, **images) -> Stage:
    """``strength`` is for img2img, which takes its size from the input image and has no height/width."""
    steps = setup.steps_for("sd")
    dim = pipe.unet.config.cross_attention_dim
    if strength is None:
        extra = dict(height=height, width=width)
    else:
        # img2img runs strength x steps; with very few steps that would be none, so keep at least one.
        extra = dict(strength=max(strength, 1 / steps))
    embeddings = setup.prompt_embeddings(dim)

    def inputs(batch_size: int) -> dict:
        positive, negative = embeddings(batch_size)
        return dict(
            prompt_embeds=positive,
            negative_prompt_embeds=negative,
            **extra,
            # One input image per prompt: a single image for a batch is deprecated in diffusers.
            **{key: [image] * batch_size for key, image in images.items()},
        )

    return _stage("", pipe, setup, steps, inputs)


def _stage(label: str, pipe, setup: _Setup, steps: int, inputs: Callable[[int], dict], **options) -> Stage:
    """A Stage whose call runs ``pipe`` on ``inputs(batch_size)`` plus what every benchmark call passes: the step
    count, a freshly seeded generator and the output type, where "latent" stands for the stage's timed output."""
    timed_output = options.get("timed_output", "latent")

    def call(batch_size: int, output_type: str):
        return pipe(
            **inputs(batch_size),
            num_inference_steps=steps,
            output_type=timed_output if output_type == "latent" else output_type,
            generator=setup.generator(),
        ).images

    return Stage(label, pipe, call, steps, **options)


def _sd_txt2img(setup, height, width, weights):
    from diffusers import StableDiffusionPipeline

    return [_sd_stage(_sd_pipe(StableDiffusionPipeline, setup, weights), setup, height, width)]


def _sd_img2img(setup, height, width, weights):
    from diffusers import StableDiffusionImg2ImgPipeline

    pipe = _sd_pipe(StableDiffusionImg2ImgPipeline, setup, weights)
    # The default strength 0.8 runs 80% of the steps; measure.py counts the steps really run.
    return [_sd_stage(pipe, setup, height, width, strength=IMG2IMG_STRENGTH, image=_random_image(height, width))]


def _sd_inpaint(setup, height, width, weights):
    from diffusers import StableDiffusionInpaintPipeline

    pipe = _sd_pipe(StableDiffusionInpaintPipeline, setup, weights, unet="sd15-inpaint-unet")
    stage = _sd_stage(
        pipe, setup, height, width, image=_random_image(height, width), mask_image=_square_mask(height, width)
    )
    return [stage]


def _sd_controlnet(setup, height, width, weights):
    from diffusers import StableDiffusionControlNetPipeline

    pipe = _sd_pipe(StableDiffusionControlNetPipeline, setup, weights, controlnet="sd15-controlnet")
    # ``image`` is the conditioning image here (an edge map in the docs page's example).
    return [_sd_stage(pipe, setup, height, width, image=_random_image(height, width))]


# --- SDXL ------------------------------------------------------------------------------------------------


def _sdxl(setup, height, width, weights):
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    no_text = dict(text_encoder=None, text_encoder_2=None, tokenizer=None, tokenizer_2=None)
    if weights:
        pipe = _load(StableDiffusionXLPipeline, weights, setup, **no_text)
    else:
        vae, unet = setup.model("sdxl-vae"), setup.model("sdxl-unet")
        pipe = StableDiffusionXLPipeline(vae=vae, unet=unet, scheduler=EulerDiscreteScheduler(), **no_text)
    pipe = _ready(pipe)
    config = pipe.unet.config
    dim = config.cross_attention_dim
    # The pooled embedding fills what the 6 time ids leave of the added-condition projection.
    pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
    steps = setup.steps_for("sdxl")

    @functools.lru_cache(maxsize=None)
    def embeddings(batch_size):
        return dict(
            prompt_embeds=setup.randn(batch_size, PROMPT_TOKENS, dim, seed=1),
            negative_prompt_embeds=setup.randn(batch_size, PROMPT_TOKENS, dim, seed=2),
            pooled_prompt_embeds=setup.randn(batch_size, pooled, seed=3),
            negative_pooled_prompt_embeds=setup.randn(batch_size, pooled, seed=4),
        )

    size = dict(height=height, width=width)
    return [_stage("", pipe, setup, steps, lambda batch_size: dict(**embeddings(batch_size), **size))]


# --- DeepFloyd IF: stage I, stage II, and the SD x4 upscaler as stage III --------------------------------

_IF_ABSENT = dict(text_encoder=None, tokenizer=None, safety_checker=None, feature_extractor=None, watermarker=None)


def _if_scheduler(sample_max_value: float):
    from diffusers import DDPMScheduler

    # The schedulers diffusers' scripts/convert_if.py writes for both IF stages.
    return DDPMScheduler(
        variance_type="learned_range",
        beta_schedule="squaredcos_cap_v2",
        prediction_type="epsilon",
        thresholding=True,
        dynamic_thresholding_ratio=0.95,
        sample_max_value=sample_max_value,
    )


def _if(setup, height, width, weights):
    from diffusers import (
        DDIMScheduler,
        DDPMScheduler,
        IFPipeline,
        IFSuperResolutionPipeline,
        StableDiffusionUpscalePipeline,
    )

    stage_dir = (lambda n: os.path.join(weights, f"stage-{n}")) if weights else (lambda n: None)
    if weights:
        first = _load(IFPipeline, stage_dir(1), setup, requires_safety_checker=False, **_IF_ABSENT)
        second = _load(IFSuperResolutionPipeline, stage_dir(2), setup, requires_safety_checker=False, **_IF_ABSENT)
        third = _load(StableDiffusionUpscalePipeline, stage_dir(3), setup, **_IF_ABSENT)
    else:
        first = IFPipeline(
            unet=setup.model("if-i-m-unet"),
            scheduler=_if_scheduler(1.5),
            requires_safety_checker=False,
            **_IF_ABSENT,
        )
        second = IFSuperResolutionPipeline(
            unet=setup.model("if-ii-m-unet"),
            scheduler=_if_scheduler(1.0),
            image_noising_scheduler=DDPMScheduler(beta_schedule="squaredcos_cap_v2"),
            requires_safety_checker=False,
            **_IF_ABSENT,
        )
        # The x4 upscaler's own schedulers: v-prediction DDIM, and DDPM to noise the low-resolution input.
        third = StableDiffusionUpscalePipeline(
            vae=setup.model("x4-upscaler-vae"),
            unet=setup.model("x4-upscaler-unet"),
            scheduler=DDIMScheduler(
                beta_schedule="scaled_linear", beta_start=0.0001, beta_end=0.02, prediction_type="v_prediction"
            ),
            low_res_scheduler=DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.0001, beta_end=0.02),
            **_IF_ABSENT,
        )
    return [
        _if_stage("I", _ready(first), setup, height, width, "if-i", image=None),
        _if_stage("II", _ready(second), setup, 4 * height, 4 * width, "if-ii", image=(height, width)),
        _x4_stage(_ready(third), setup, 4 * height, 4 * width),
    ]


def _if_stage(label, pipe, setup: _Setup, height, width, family, image) -> Stage:
    steps = setup.steps_for(family)
    dim = pipe.unet.config.encoder_hid_dim  # T5-XXL's width; the UNet projects it down itself
    # Stage II upscales a stage-I output; a fixed random image in [-1, 1] has the same cost.
    low_res = None if image is None else setup.randn(1, 3, *image, seed=5).clamp(-1, 1)

    embeddings = setup.prompt_embeddings(dim)
    extra = {} if low_res is None else dict(image=low_res)

    def inputs(batch_size: int) -> dict:
        positive, negative = embeddings(batch_size)
        return dict(prompt_embeds=positive, negative_prompt_embeds=negative, height=height, width=width, **extra)

    # IF has no VAE: "pt" is the raw denoised image, the analogue of "latent".
    return _stage(label, pipe, setup, steps, inputs, timed_output="pt", single_batch=image is not None)


def _x4_stage(pipe, setup: _Setup, height, width) -> Stage:
    steps = setup.steps_for("x4")
    dim = pipe.unet.config.cross_attention_dim
    low_res = setup.randn(1, 3, height, width, seed=6).clamp(-1, 1)
    positive = setup.randn(1, PROMPT_TOKENS, dim, seed=1)
    negative = setup.randn(1, PROMPT_TOKENS, dim, seed=2)

    inputs = dict(prompt_embeds=positive, negative_prompt_embeds=negative, image=low_res, noise_level=X4_NOISE_LEVEL)
    return _stage("III", pipe, setup, steps, lambda batch_size: inputs, single_batch=True)


# --- Transformers: SD3 Medium, Flux.1 dev and schnell -----------------------------------------------------

_NO_T5 = dict(text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None)


def _sd3(setup, height, width, weights):
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    absent = dict(_NO_T5, text_encoder_3=None, tokenizer_3=None)
    if weights:
        pipe = _load(StableDiffusion3Pipeline, weights, setup, **absent)
    else:
        pipe = StableDiffusion3Pipeline(
            transformer=setup.model("sd3-medium-transformer"),
            vae=setup.model("sd3-vae"),
            scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),  # SD3 Medium's scheduler_config.json
            **absent,
        )
    # Classifier-free guidance (the default scale 7.0): the transformer runs on the doubled batch.
    return [_transformer_stage(_ready(pipe), setup, height, width, "sd3-medium", negative=True)]


def _flux(variant: str):
    def build(setup, height, width, weights):
        from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

        if weights:
            pipe = _load(FluxPipeline, weights, setup, **_NO_T5)
        else:
            # Each variant's scheduler_config.json: resolution-dependent shift for dev, a fixed one for schnell.
            scheduler = (
                FlowMatchEulerDiscreteScheduler(
                    shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                    base_image_seq_len=256, max_image_seq_len=4096,
                )
                if variant == "dev"
                else FlowMatchEulerDiscreteScheduler(shift=1.0)
            )
            pipe = FluxPipeline(
                transformer=setup.model(f"flux-{variant}-transformer"),
                vae=setup.model("flux-vae"),
                scheduler=scheduler,
                **_NO_T5,
            )
        # Guidance-distilled: no negative prompt and no doubled batch; dev takes the scale as an input.
        family = f"flux-{variant}"
        extra = dict(guidance_scale=3.5 if variant == "dev" else 0.0, max_sequence_length=T5_TOKENS[family])
        return [_transformer_stage(_ready(pipe), setup, height, width, family, negative=False, **extra)]

    return build


def _transformer_stage(pipe, setup: _Setup, height, width, family: str, negative: bool, **extra) -> Stage:
    """Random T5 (and CLIP) prompt embeddings and pooled CLIP embeddings of the transformer's widths."""
    steps = setup.steps_for(family)
    config = pipe.transformer.config
    tokens, dim, pooled = T5_TOKENS[family], config.joint_attention_dim, config.pooled_projection_dim

    @functools.lru_cache(maxsize=None)
    def embeddings(batch_size):
        found = dict(
            prompt_embeds=setup.randn(batch_size, tokens, dim, seed=1),
            pooled_prompt_embeds=setup.randn(batch_size, pooled, seed=3),
        )
        if negative:
            found.update(
                negative_prompt_embeds=setup.randn(batch_size, tokens, dim, seed=2),
                negative_pooled_prompt_embeds=setup.randn(batch_size, pooled, seed=4),
            )
        return found

    size = dict(height=height, width=width)
    return _stage("", pipe, setup, steps, lambda batch_size: dict(**embeddings(batch_size), **size, **extra))


_BUILDERS = {
    "sd-txt2img": _sd_txt2img,
    "sd-img2img": _sd_img2img,
    "sd-inpaint": _sd_inpaint,
    "sd-controlnet": _sd_controlnet,
    "if": _if,
    "sdxl": _sdxl,
    "sd3-medium": _sd3,
    "flux-dev": _flux("dev"),
    "flux-schnell": _flux("schnell"),
}
