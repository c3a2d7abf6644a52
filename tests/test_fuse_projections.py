"""fuse_projections=True: the model's own fused QKV projections, really used, faithful to the unfused model,
never dropping IP-Adapter processors, and undone to the exact unfused weights, processors and attributes."""
import pytest
import torch
from _adapters import image_embeds, save_ip_adapter
from conftest import (
    flux_transformer, if_pipeline, pixart_transformer, rel_l2, run_sd, sd3_transformer, sd_pipeline,
    tiny_controlnet, tiny_unet, transformer_inputs, unet_inputs,
)
from test_roundtrip import assert_same, snapshot

import diffopt
from diffopt.transforms.fuse_projections import FUSED_LAYERS, apply_fuse_projections

# Dynamo caches graphs per code object, and diffusers' forward wrappers are shared by every transformer class:
# a fresh start per test keeps the recompile limit (8) from counting other tests' models.
pytestmark = pytest.mark.usefixtures("compile_clean")

MODELS = {"unet": tiny_unet, "sd3": sd3_transformer, "flux": flux_transformer, "pixart": pixart_transformer}
# What the model's own fuse_qkv_projections installs (Flux keeps its processor, which reads the fused layers).
FUSED = {"unet": "FusedAttnProcessor2_0", "sd3": "FusedJointAttnProcessor2_0", "flux": "FluxAttnProcessor",
         "pixart": "FusedAttnProcessor2_0"}


def inputs_for(model):
    return unet_inputs(model, batch=2) if "UNet" in type(model).__name__ else transformer_inputs(model, batch=2)


def model_state(model):
    """Weights by value, processors by identity, instance attributes and hooks of every submodule."""
    return dict(
        weights={k: v.clone() for k, v in model.state_dict().items()},
        processors={n: m.processor for n, m in model.named_modules() if hasattr(m, "set_processor")},
        attrs={n: set(vars(m)) for n, m in model.named_modules()},
        hooks={n: (len(m._forward_pre_hooks), len(m._forward_hooks)) for n, m in model.named_modules()},
    )


def assert_same_state(before, after):
    assert before["weights"].keys() == after["weights"].keys()
    assert all(torch.equal(before["weights"][k], after["weights"][k]) for k in before["weights"])
    assert before["processors"].keys() == after["processors"].keys()
    assert all(before["processors"][n] is after["processors"][n] for n in before["processors"])
    assert before["attrs"] == after["attrs"]
    assert before["hooks"] == after["hooks"]


def fused_layers(model):
    return [m for m in model.modules() if getattr(m, "fused_projections", False)]


@pytest.mark.parametrize("kind", MODELS)
def test_fuse_round_trip_and_fidelity(kind):
    model = MODELS[kind]()
    inputs = inputs_for(model)
    with torch.no_grad():
        unfused = model(**inputs).sample
    before = model_state(model)

    # Traced by dynamo (aot_eager: no inductor wait) to show the fused processors and the LoRA guard compile.
    report = diffopt.optimize(model, fuse_projections=True, compile={"backend": "aot_eager"})
    (row,) = [s for s in report.steps if s.transform == "fuse_projections"]
    assert row.status == "applied" and FUSED[kind] in row.detail, row
    assert fused_layers(model)
    assert {type(m.processor).__name__ for m in fused_layers(model)} == {FUSED[kind]}
    assert any(hasattr(m, layer) for m in fused_layers(model) for layer in FUSED_LAYERS)
    with torch.no_grad():
        assert rel_l2(model(**inputs).sample, unfused) < 1e-5

    diffopt.restore(model, attention="original")
    assert_same_state(before, model_state(model))
    assert not any(hasattr(m, layer) for m in model.modules() for layer in FUSED_LAYERS)
    assert "original_attn_processors" not in vars(model)
    with torch.no_grad():
        assert torch.equal(model(**inputs).sample, unfused)


@pytest.mark.parametrize("kind", MODELS)
def test_fused_layers_are_the_ones_computing(kind):
    # If the fused layers were created but not used, scaling the unfused key weights would change the output.
    model = MODELS[kind]()
    inputs = inputs_for(model)
    change = apply_fuse_projections(model)
    with torch.no_grad():
        fused = model(**inputs).sample
        for attn in fused_layers(model):
            attn.to_k.weight.mul_(3)
        assert torch.equal(model(**inputs).sample, fused)
    change.undo()
    with torch.no_grad():
        assert rel_l2(model(**inputs).sample, fused) > 1e-3  # back on to_k, scaled


def test_ip_adapter_processors_are_kept_working_on_unfused_layers(tmp_path):
    reference = sd_pipeline()
    pipe = sd_pipeline()
    for p in (reference, pipe):
        p.load_ip_adapter(**save_ip_adapter(tmp_path, p.unet))
    expected = run_sd(reference, ip_adapter_image_embeds=image_embeds())
    without = run_sd(reference, ip_adapter_image_embeds=[torch.zeros_like(image_embeds()[0])])
    assert rel_l2(expected, without) > 1e-2  # the adapter matters
    ip_processors = {n: p for n, p in pipe.unet.attn_processors.items() if "IPAdapter" in type(p).__name__}
    assert ip_processors
    assert torch.equal(run_sd(pipe, ip_adapter_image_embeds=image_embeds()), expected)
    before = snapshot(pipe)

    report = diffopt.optimize(pipe, fuse_projections=True, compile=False, memory_format=None)
    assert f"kept unfused for their processors: {len(ip_processors)}x IPAdapterAttnProcessor2_0" in str(report)
    for name, processor in ip_processors.items():
        attn = pipe.unet.get_submodule(name[: -len(".processor")])
        assert attn.processor is processor and not attn.fused_projections and not hasattr(attn, "to_kv")
    assert fused_layers(pipe.unet)  # the self-attention layers are fused
    assert rel_l2(run_sd(pipe, ip_adapter_image_embeds=image_embeds()), expected) < 1e-5

    diffopt.restore(pipe, attention="original")
    assert_same(before, snapshot(pipe))
    assert torch.equal(run_sd(pipe, ip_adapter_image_embeds=image_embeds()), expected)


def test_ip_adapter_loaded_after_fusing_survives_restore(tmp_path):
    pipe = sd_pipeline()
    reference = sd_pipeline()
    diffopt.optimize(pipe, fuse_projections=True, compile=False)
    options = save_ip_adapter(tmp_path, pipe.unet)
    for p in (reference, pipe):
        p.load_ip_adapter(**options)
    expected = run_sd(reference, ip_adapter_image_embeds=image_embeds())
    assert rel_l2(run_sd(pipe, ip_adapter_image_embeds=image_embeds()), expected) < 1e-5
    diffopt.restore(pipe)
    assert not fused_layers(pipe.unet)
    assert not any(hasattr(m, layer) for m in pipe.unet.modules() for layer in FUSED_LAYERS)
    names = {type(p).__name__ for p in pipe.unet.attn_processors.values()}
    assert names == {"AttnProcessor", "IPAdapterAttnProcessor"}  # classic, adapter kept
    assert rel_l2(run_sd(pipe, ip_adapter_image_embeds=image_embeds()), expected) < 1e-5


def test_added_kv_denoiser_is_an_error_when_named_and_nothing_changes():
    pipe = if_pipeline()
    before = snapshot(pipe)
    with pytest.raises(diffopt.UnsupportedFeatureError, match="fuse_projections: .*AttnAddedKVProcessor2_0"):
        diffopt.optimize(pipe, fuse_projections=True)
    assert_same(before, snapshot(pipe))


def test_components_that_cannot_fuse_are_skipped_with_reasons():
    pipe = sd_pipeline(controlnet=tiny_controlnet())
    report = diffopt.optimize(pipe, fuse_projections=True, compile=False, compile_vae=True)
    rows = {s.component: s for s in report.steps if s.transform == "fuse_projections"}
    assert rows["unet"].status == "applied"
    # ControlNetModel's generic fuse_qkv_projections keeps AttnProcessor2_0, which never reads fused layers.
    assert rows["controlnet"].status == "skipped" and "AttnProcessor2_0" in rows["controlnet"].detail
    assert rows["vae.decoder"].status == "skipped" and "fuse_qkv_projections" in rows["vae.decoder"].detail
    diffopt.restore(pipe)
    assert not fused_layers(pipe.unet)


def test_off_by_default_and_a_model_fused_by_the_user_is_left_alone():
    model = tiny_unet()
    assert not [s for s in diffopt.optimize(model, compile=False).steps if s.transform == "fuse_projections"]
    diffopt.restore(model)
    model.fuse_qkv_projections()
    report = diffopt.optimize(model, fuse_projections=True, compile=False)
    (row,) = [s for s in report.steps if s.transform == "fuse_projections"]
    assert row.status == "skipped" and "already fused outside diffopt" in row.detail
    diffopt.restore(model)
    assert fused_layers(model)


def test_second_optimize_refuses_nothing_and_stacks_nothing():
    model = tiny_unet()
    before = model_state(model)
    diffopt.optimize(model, fuse_projections=True, compile=False)
    fused = len(fused_layers(model))
    report = diffopt.optimize(model, fuse_projections=True, compile=False)  # unfuses, then fuses again
    assert [s.status for s in report.steps if s.transform == "fuse_projections"] == ["applied"]
    assert len(fused_layers(model)) == fused and len(model._forward_pre_hooks) == 1
    diffopt.restore(model, attention="original")
    assert_same_state(before, model_state(model))


def test_a_failing_fuse_leaves_the_model_as_it_was(monkeypatch):
    model = tiny_unet()
    before = model_state(model)
    real = type(model).fuse_qkv_projections

    def fuse_then_fail(self):
        real(self)
        raise RuntimeError("out of memory, say")

    monkeypatch.setattr(type(model), "fuse_qkv_projections", fuse_then_fail)
    with pytest.raises(RuntimeError, match="out of memory"):
        diffopt.optimize(model, fuse_projections=True, compile=False)
    assert_same_state(before, model_state(model))
    assert not diffopt.api.is_optimized(model)


@pytest.mark.parametrize("value", ["yes", 1, None])
def test_fuse_projections_must_be_a_bool(value):
    with pytest.raises(TypeError, match=f"fuse_projections must be True or False, got {value!r}"):
        diffopt.optimize(tiny_unet(), fuse_projections=value)
