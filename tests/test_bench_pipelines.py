"""Tiny benchmark pipelines of every kind run end to end, deterministically, and load from disk."""
import pytest
import torch

from diffopt.bench.measure import probe, CellSettings
from diffopt.bench.pipelines import PIPELINES, build_case


@pytest.fixture(autouse=True)
def _no_onednn():
    # oneDNN compiles a kernel per new convolution shape, seconds each on a small CPU; the reference kernels
    # run these 32-channel models in milliseconds.
    with torch.backends.mkldnn.flags(enabled=False):
        yield


@pytest.mark.parametrize("name", PIPELINES)
def test_tiny_pipeline_runs_one_step_end_to_end(name):
    case = build_case(name, size="tiny", steps=1)
    assert case.stages and case.label
    for stage in case.stages:
        batch = 1 if stage.single_batch else 2
        first = stage.call(batch, stage.timed_output)
        again = stage.call(batch, stage.timed_output)
        assert isinstance(first, torch.Tensor) and first.shape[0] == batch
        assert torch.isfinite(first).all()
        assert torch.equal(first, again), "same seed and inputs must give the same output"
        images = stage.call(batch, "pil")
        assert len(images) == batch and images[0].size[0] > 0
        assert {"unet", "transformer"} & set(stage.denoisers())


def test_if_is_three_stages_and_only_stage_one_is_batched():
    case = build_case("if", size="tiny", steps=1)
    assert [stage.label for stage in case.stages] == ["I", "II", "III"]
    assert [stage.single_batch for stage in case.stages] == [False, True, True]
    stage_one, stage_two, stage_three = (stage.call(1, stage.timed_output) for stage in case.stages)
    # 8 px -> 32 px (IF-II, x4) -> latent at 32 px that decodes to 128 px (x4 upscaler).
    assert stage_one.shape[-1] * 4 == stage_two.shape[-1] == stage_three.shape[-1]
    assert case.stages[2].call(1, "pil")[0].size == (4 * stage_three.shape[-1],) * 2


def test_controlnet_stage_runs_both_denoisers():
    case = build_case("sd-controlnet", size="tiny", steps=1)
    assert set(case.stages[0].denoisers()) == {"controlnet", "unet"}


def test_height_width_and_steps_override_the_defaults():
    case = build_case("sd-txt2img", size="tiny", steps=2, height=48, width=64)
    latents = case.stages[0].call(1, "latent")
    assert tuple(latents.shape[-2:]) == (24, 32)  # the tiny VAE downsamples by 2
    assert case.stages[0].steps == 2


def test_probe_counts_the_steps_img2img_really_runs_and_the_flops():
    settings = CellSettings(size="tiny", device=torch.device("cpu"), dtype=torch.float32, steps=5)
    (reference,) = probe("sd-img2img", [1], settings)
    assert reference.error is None
    (stage,) = reference.stages
    assert stage.steps == 4  # default strength 0.8 of 5 steps
    assert stage.flops_per_step > 0 and stage.output is not None


@pytest.mark.parametrize("name, negative", [("sd3-medium", True), ("flux-dev", False), ("flux-schnell", False)])
def test_transformer_pipelines_feed_their_architectures_prompt_embeddings(name, negative):
    case = build_case(name, size="tiny", steps=2)
    seen = []
    transformer = case.stages[0].denoisers()["transformer"]
    handle = transformer.register_forward_pre_hook(lambda m, a, k: seen.append(k), with_kwargs=True)
    try:
        case.stages[0].call(2, "latent")
    finally:
        handle.remove()
    config = transformer.config
    assert len(seen) == 2  # one transformer call per step
    text, pooled = seen[0]["encoder_hidden_states"], seen[0]["pooled_projections"]
    # Classifier-free guidance (SD3) doubles the batch; guidance-distilled Flux does not.
    assert text.shape[0] == pooled.shape[0] == (4 if negative else 2)
    assert (text.shape[-1], pooled.shape[-1]) == (config.joint_attention_dim, config.pooled_projection_dim)
    assert ("guidance" in seen[0] and seen[0]["guidance"] is not None) == bool(config.get("guidance_embeds"))


def test_probe_counts_the_transformer_calls_and_flops():
    settings = CellSettings(size="tiny", device=torch.device("cpu"), dtype=torch.float32, steps=3)
    (reference,) = probe("flux-schnell", [1], settings)
    assert reference.error is None
    (stage,) = reference.stages
    assert stage.steps == 3 and stage.flops_per_step > 0


def test_unknown_pipeline_names_the_choices():
    with pytest.raises(ValueError, match="sd-txt2img"):
        build_case("sd3", size="tiny")


@pytest.mark.parametrize("name", ["sd-controlnet", "if"])
def test_weights_dir_loads_a_saved_pipeline(tmp_path, name):
    built = build_case(name, size="tiny", steps=1)
    if name == "if":
        for index, stage in enumerate(built.stages, start=1):
            stage.pipe.save_pretrained(tmp_path / name / f"stage-{index}")
    else:
        built.stages[0].pipe.save_pretrained(tmp_path / name)
    # The folder has one sub-directory per pipeline, as --weights DIR expects for several pipelines.
    loaded = build_case(name, size="tiny", steps=1, weights=str(tmp_path))
    for original, reloaded in zip(built.stages, loaded.stages):
        assert type(reloaded.pipe) is type(original.pipe)
        batch = 1 if original.single_batch else 2
        expected = original.call(batch, original.timed_output)
        assert torch.allclose(reloaded.call(batch, reloaded.timed_output), expected, atol=1e-5)
