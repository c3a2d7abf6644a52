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


def _symbolic_inputs_of_each_graph(compile_options):
    """optimize() three UNets in turn, with IF's input channels (stage I: 3, stage II: 6, the x4 upscaler: 7) and
    their own sizes, with a backend that records, per captured graph, how many of its inputs are symbolic sizes."""
    from conftest import if_unet

    torch.compiler.reset()  # no shapes remembered from an earlier call
    symbolic = []

    def recording(gm, example_inputs):
        values = [node.meta.get("example_value") for node in gm.graph.nodes if node.op == "placeholder"]
        sizes = [size for value in values if isinstance(value, torch.Tensor) for size in value.shape]
        symbolic.append(sum(isinstance(value, torch.SymInt) for value in values + sizes))
        return gm.forward

    unets = [if_unet()] + [tiny_unet(in_channels=c, block_out_channels=(16, 32), cross_attention_dim=12) for c in (6, 7)]
    for unet, size in zip(unets, (8, 32, 32)):  # IF: 64, 256 and 256 px
        diffopt.optimize(unet, compile={"backend": recording, **compile_options})
        inputs = unet_inputs(unet)
        sample = torch.randn(1, unet.config.in_channels, size, size)
        with torch.no_grad():  # sample and timestep positional, as the pipelines pass them
            unet(sample, inputs.pop("timestep"), inputs["encoder_hidden_states"])
        diffopt.restore(unet)
    return symbolic


def test_each_model_compiles_static_graphs():
    # Every module compiled in place runs through one code object, so torch's automatic dynamic shapes see the next
    # model's inputs as the previous one's changing shape and trace it symbolically (on an H200, IF's three stages
    # then compiled too slowly to finish in 10 minutes). diffopt keeps each module's graph static.
    assert _symbolic_inputs_of_each_graph({}) == [0, 0, 0]
    # The failure this guards against, shown with torch's default (automatic dynamic shapes):
    first, *later = _symbolic_inputs_of_each_graph({"dynamic": None})
    assert first == 0 and min(later) > 0


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
