"""Compile for real (inductor on the CPU): fidelity against eager, and no recompiles once warm."""
import pytest
import torch
from conftest import (
    flux_transformer, pixart_transformer, rel_l2, run_pipeline, sd3_transformer, sd_pipeline, tiny_controlnet,
    tiny_unet, transformer_inputs, unet_inputs,
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


def test_one_graph_serves_every_batch_size():
    unet = tiny_unet()
    eager = {}
    with torch.no_grad():
        for batch in (2, 4, 3):
            eager[batch] = unet(**unet_inputs(unet, batch)).sample
    assert "dynamic batch" in str(diffopt.optimize(unet, dynamic_batch=True))
    with torch.no_grad():
        assert rel_l2(unet(**unet_inputs(unet, 2)).sample, eager[2]) < 1e-4
        with torch._dynamo.config.patch(error_on_recompile=True):
            for batch in (4, 3, 2):
                assert rel_l2(unet(**unet_inputs(unet, batch)).sample, eager[batch]) < 1e-4
    diffopt.restore(unet)


def test_by_default_a_new_batch_size_recompiles():
    unet = tiny_unet()
    diffopt.optimize(unet, compile={"backend": "aot_eager"})
    with torch.no_grad():
        unet(**unet_inputs(unet, 2))
        with torch._dynamo.config.patch(error_on_recompile=True), pytest.raises(Exception, match="[Rr]ecompil"):
            unet(**unet_inputs(unet, 4))
    diffopt.restore(unet)


def test_many_distinct_models_compile_in_one_process():
    # Modules compiled in place share nn.Module._call_impl's code object and so one recompile limit (8).
    from diffusers import UNet2DConditionModel

    for dim in range(8, 8 + 4 * 10, 4):  # ten architectures, one graph each
        unet = UNet2DConditionModel(
            sample_size=8, block_out_channels=(8,), layers_per_block=1, norm_num_groups=4, cross_attention_dim=dim,
            down_block_types=("CrossAttnDownBlock2D",), up_block_types=("CrossAttnUpBlock2D",), attention_head_dim=2,
        )
        diffopt.optimize(unet, compile={"backend": "eager"})
        with torch.no_grad():
            unet(torch.randn(2, 4, 8, 8), 1, torch.randn(2, 3, dim))
    assert torch._dynamo.config.recompile_limit == 8  # raised only while our modules run
