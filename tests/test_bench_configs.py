"""The benchmark's architecture configs: full sizes match the public models, tiny ones keep their structure."""
import pytest
import torch

from diffopt.bench.configs import MODELS, build_model, model_config, parameter_count

# Public parameter counts: exact where the model card or config gives them, else the rounded card figure.
PUBLIC = {
    "sd15-unet": (859.52e6, 0.001),
    "sd15-inpaint-unet": (859.54e6, 0.001),
    "sd15-controlnet": (361.28e6, 0.001),
    "sd15-vae": (83.65e6, 0.001),
    "sdxl-unet": (2567.46e6, 0.001),
    "sdxl-vae": (83.65e6, 0.001),
    "x4-upscaler-unet": (473.40e6, 0.001),
    "if-i-m-unet": (400e6, 0.10),  # model card: "400M"
    "if-ii-m-unet": (450e6, 0.10),  # model card: "450M"
    "sd3-medium-transformer": (2.03e9, 0.005),  # the Hub's 2.03B for the transformer ("2B" on the card)
    "flux-dev-transformer": (11.9e9, 0.005),  # the Hub's 11.9B ("12B" on the card)
    "flux-schnell-transformer": (11.9e9, 0.005),
}


@pytest.mark.parametrize("name", sorted(PUBLIC))
def test_full_config_has_the_public_parameter_count(name):
    expected, tolerance = PUBLIC[name]
    model = build_model(name, "full", device="meta")
    assert parameter_count(model) == pytest.approx(expected, rel=tolerance)
    assert all(p.device.type == "meta" for p in model.parameters())


def test_if_configs_scale_to_the_published_large_models():
    # IF-I-M/IF-II-M are the public IF-I-XL / IF-II-L configs at M width; at XL/L width they must hit the cards.
    xl = dict(model_config("if-i-m-unet"), block_out_channels=[704, 1408, 2112, 2816], cross_attention_dim=2816)
    large = dict(
        model_config("if-ii-m-unet"),
        block_out_channels=[160, 320, 640, 960, 1280],
        cross_attention_dim=1280,
        time_embedding_dim=1280,
    )
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        assert parameter_count(UNet2DConditionModel(**xl)) == pytest.approx(4.3e9, rel=0.02)
        assert parameter_count(UNet2DConditionModel(**large)) == pytest.approx(1.2e9, rel=0.05)


def _structure(model):
    blocks = [type(b).__name__ for b in getattr(model, "down_blocks", [])]
    blocks += [type(b).__name__ for b in getattr(model, "up_blocks", [])]
    mid = getattr(model, "mid_block", None)
    extra = [
        type(getattr(model, attr, None)).__name__
        for attr in ("class_embedding", "add_embedding", "encoder_hid_proj", "controlnet_cond_embedding")
    ]
    return blocks, type(mid).__name__, extra, getattr(model, "config").in_channels


@pytest.mark.parametrize("name", sorted(MODELS))
def test_tiny_config_keeps_the_structure_of_the_full_one(name):
    full = build_model(name, "full", device="meta")
    tiny = build_model(name, "tiny")
    full_blocks, full_mid, full_extra, full_in = _structure(full)
    tiny_blocks, tiny_mid, tiny_extra, tiny_in = _structure(tiny)
    assert set(tiny_blocks) <= set(full_blocks)
    assert (tiny_mid, tiny_extra, tiny_in) == (full_mid, full_extra, full_in)
    assert parameter_count(tiny) < 2e6


TRANSFORMERS = [name for name, entry in MODELS.items() if "Transformer" in entry.class_name]


@pytest.mark.parametrize("name", TRANSFORMERS)
def test_tiny_transformers_keep_every_module_type_of_the_full_one(name):
    # Joint and single-stream blocks, the guidance embedder (Flux dev only), norms, rotary embeddings, ...
    full = build_model(name, "full", device="meta")
    tiny = build_model(name, "tiny")
    assert {type(m).__name__ for m in tiny.modules()} == {type(m).__name__ for m in full.modules()}
    assert tiny.config.in_channels == full.config.in_channels
    assert tiny.config.get("guidance_embeds") == full.config.get("guidance_embeds")


def test_flux_dev_and_schnell_differ_only_by_the_guidance_embedder():
    dev, schnell = (build_model(f"flux-{v}-transformer", device="meta") for v in ("dev", "schnell"))
    extra = {k for k, _ in dev.named_parameters()} - {k for k, _ in schnell.named_parameters()}
    assert extra and all(".guidance_embedder." in k for k in extra)
    assert {k for k, _ in schnell.named_parameters()} <= {k for k, _ in dev.named_parameters()}


def test_if_unets_use_added_kv_attention_and_the_x4_unet_cross_attention_only():
    from diffusers.models.attention_processor import AttnAddedKVProcessor2_0

    stage_one = build_model("if-i-m-unet", "tiny")
    assert {type(p) for p in stage_one.attn_processors.values()} == {AttnAddedKVProcessor2_0}
    assert stage_one.config.encoder_hid_dim_type == "text_proj"
    stage_two = build_model("if-ii-m-unet", "tiny")
    assert stage_two.config.class_embed_type == "timestep"
    x4 = build_model("x4-upscaler-unet", "tiny")
    assert x4.class_embedding.num_embeddings == 1000  # noise levels up to max_noise_level=350


def test_build_model_is_seeded_and_casts():
    first = build_model("sd15-vae", "tiny", dtype=torch.float16)
    second = build_model("sd15-vae", "tiny", dtype=torch.float16)
    assert all(p.dtype == torch.float16 for p in first.parameters())
    assert all(torch.equal(a, b) for a, b in zip(first.parameters(), second.parameters()))
    assert not first.training


def test_unknown_model_or_size_is_rejected_with_choices():
    with pytest.raises(ValueError, match="sd15-unet"):
        model_config("sd16-unet")
    with pytest.raises(ValueError, match="'huge'"):
        model_config("sd15-unet", "huge")
