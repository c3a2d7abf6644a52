"""Compile for real (inductor on the CPU): fidelity against eager, and no recompiles once warm."""
import pytest
import torch
from conftest import (
    flux_transformer, pixart_transformer, rel_l2, run_pipeline, sd3_transformer, sd_pipeline, tiny_controlnet,
    transformer_inputs,
)

import diffopt

pytestmark = [pytest.mark.compile, pytest.mark.usefixtures("compile_clean")]


def test_sd_pipeline_inductor_matches_eager_and_does_not_recompile():
    pipe = sd_pipeline()
    eager = run_pipeline(pipe)
    report = diffopt.optimize(pipe)
    assert "fullgraph=True" in str(report)
    compiled = run_pipeline(pipe)
    assert rel_l2(compiled, eager) < 1e-4
    with torch._dynamo.config.patch(error_on_recompile=True):
        again = run_pipeline(pipe)  # same shapes, new timesteps values: must reuse the graph
    assert torch.equal(again, compiled)
    diffopt.restore(pipe)
    assert "_compiled_call_impl" not in vars(pipe.unet)


def test_controlnet_pipeline_compiles_both_networks():
    pipe = sd_pipeline(controlnet=tiny_controlnet())
    eager = run_pipeline(pipe)
    report = diffopt.optimize(pipe)
    compiled_components = {s.component for s in report.applied if s.transform == "compile"}
    assert compiled_components == {"unet", "controlnet"}
    assert rel_l2(run_pipeline(pipe), eager) < 1e-4
    diffopt.restore(pipe)
    assert torch.equal(run_pipeline(pipe), run_pipeline(pipe))


@pytest.mark.parametrize("build", [sd3_transformer, flux_transformer, pixart_transformer], ids=["sd3", "flux", "pixart"])
def test_transformer_inductor_matches_eager_and_does_not_recompile(build):
    model = build()
    inputs = transformer_inputs(model, batch=2)
    with torch.no_grad():
        eager = model(**inputs).sample
    diffopt.optimize(model)
    with torch.no_grad():
        assert rel_l2(model(**inputs).sample, eager) < 1e-4
        # Same shapes, another timestep: the graph must be reused.
        with torch._dynamo.config.patch(error_on_recompile=True):
            model(**dict(inputs, timestep=inputs["timestep"] * 3 // 4))
    diffopt.restore(model)
    assert "_compiled_call_impl" not in vars(model)
