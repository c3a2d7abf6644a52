"""SD3, Flux and PixArt-Sigma pipelines: optimize puts each transformer on its own SDPA-family processors,
compiles it, and restore gives back the pipeline a fresh build has, bit for bit."""
import pytest
import torch
from conftest import (
    flux_pipeline, flux_transformer, pixart_pipeline, pixart_transformer, rel_l2, run_pipeline, sd3_pipeline,
    sd3_transformer, transformer_inputs,
)
from diffusers.models import attention_processor as ap
from test_roundtrip import assert_same, snapshot

import diffopt

# Dynamo caches graphs per code object, and diffusers' forward wrappers are shared by every transformer class:
# a fresh start per test keeps the recompile limit (8) from counting other tests' models.
pytestmark = pytest.mark.usefixtures("compile_clean")

PIPELINES = {"sd3": sd3_pipeline, "flux": flux_pipeline, "pixart": pixart_pipeline}
MODELS = {"sd3": sd3_transformer, "flux": flux_transformer, "pixart": pixart_transformer}
# What diffusers 0.42 builds each transformer with; optimize(attention="sdpa") must end there.
SDPA = {"sd3": {"JointAttnProcessor2_0"}, "flux": {"FluxAttnProcessor"}, "pixart": {"AttnProcessor2_0"}}


def processor_names(model):
    return {type(p).__name__ for p in model.attn_processors.values()}


@pytest.mark.parametrize("kind", PIPELINES)
def test_fresh_builds_are_on_the_sdpa_processors_optimize_expects(kind):
    # Guards the table above against a diffusers upgrade that changes a model's processors.
    assert processor_names(MODELS[kind]()) == SDPA[kind]


@pytest.mark.parametrize("kind", PIPELINES)
def test_transformer_pipeline_round_trip(kind):
    pipe = PIPELINES[kind]()
    eager = run_pipeline(pipe)
    before = snapshot(pipe)

    report = diffopt.optimize(pipe, compile={"backend": "aot_eager"})
    rows = {(s.component, s.transform): s.status for s in report.steps}
    assert rows == {
        ("transformer", "attention"): "unchanged",  # already on its SDPA processors
        ("transformer", "memory_format"): "skipped",  # a DiT has next to no conv weights
        ("transformer", "compile"): "applied",
        ("image_processor", "device_postprocess"): "applied",  # PixArt's own subclass makes images diffusers' way
    }
    assert processor_names(pipe.transformer) == SDPA[kind]
    assert rel_l2(run_pipeline(pipe), eager) < 1e-4

    report = diffopt.restore(pipe)
    assert ("transformer", "attention", "unchanged") in {(s.component, s.transform, s.status) for s in report.steps}
    assert_same(before, snapshot(pipe))
    assert processor_names(pipe.transformer) == SDPA[kind]
    assert torch.equal(run_pipeline(pipe), eager)


def test_pixart_classic_processors_go_to_sdpa_and_restore_to_the_fresh_build():
    pipe = pixart_pipeline()
    fresh = run_pipeline(pipe)
    pipe.transformer.set_default_attn_processor()
    classic_objects = dict(pipe.transformer.attn_processors)
    assert processor_names(pipe.transformer) == {"AttnProcessor"}
    classic = run_pipeline(pipe)

    report = diffopt.optimize(pipe, compile=False)
    assert "4x AttnProcessor -> AttnProcessor2_0" in str(report)
    assert processor_names(pipe.transformer) == SDPA["pixart"]
    assert rel_l2(run_pipeline(pipe), classic) < 1e-5

    # "default" means what a fresh PixArt has (SDPA), not the classic processors UNets go back to.
    diffopt.restore(pipe)
    assert processor_names(pipe.transformer) == SDPA["pixart"]
    assert torch.equal(run_pipeline(pipe), fresh)

    diffopt.optimize(pipe, compile=False, attention="default")
    assert processor_names(pipe.transformer) == {"AttnProcessor"}
    diffopt.restore(pipe, attention="original")
    assert processor_names(pipe.transformer) == SDPA["pixart"]


def test_sd3_xformers_joint_processors_are_mapped_to_sdpa_and_back():
    model = sd3_transformer()
    inputs = transformer_inputs(model)
    with torch.no_grad():
        reference = model(**inputs).sample
    model.set_attn_processor(ap.XFormersJointAttnProcessor())  # what attention="xformers" gives; needs CUDA to run
    xformers = dict(model.attn_processors)
    report = diffopt.optimize(model, compile=False)
    assert "2x XFormersJointAttnProcessor -> JointAttnProcessor2_0" in str(report)
    with torch.no_grad():
        assert torch.equal(model(**inputs).sample, reference)
    diffopt.restore(model, attention="original")
    assert all(model.attn_processors[n] is p for n, p in xformers.items())
    # The default restore leaves a transformer on the processors a fresh build has.
    diffopt.restore(model)
    assert processor_names(model) == SDPA["sd3"]


@pytest.mark.parametrize("kind", MODELS)
def test_bare_transformers_round_trip_with_classic_restore_untouched(kind):
    model = MODELS[kind]()
    inputs = transformer_inputs(model, batch=2)
    with torch.no_grad():
        eager = model(**inputs).sample
    attrs = {n: set(vars(m)) for n, m in model.named_modules()}
    diffopt.optimize(model, compile={"backend": "aot_eager"})
    with torch.no_grad():
        assert rel_l2(model(**inputs).sample, eager) < 1e-5
    diffopt.restore(model)
    assert {n: set(vars(m)) for n, m in model.named_modules()} == attrs
    assert processor_names(model) == SDPA[kind]
    with torch.no_grad():
        assert torch.equal(model(**inputs).sample, eager)
