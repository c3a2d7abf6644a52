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


def counting_inductor(calls):
    """Inductor, with every call of a compiled graph appended to ``calls``: what ran compiled, seen from outside."""
    from torch._inductor.compile_fx import compile_fx

    def backend(gm, example_inputs):
        compiled = compile_fx(gm, example_inputs)

        def run(*args):
            calls.append(gm)
            return compiled(*args)

        run._boxed_call = getattr(compiled, "_boxed_call", False)  # dynamo passes a boxed graph its inputs as a list
        return run

    return backend


def test_controlnet_pipeline_compiles_both_networks():
    pipe = sd_pipeline(controlnet=tiny_controlnet())
    eager = run_pipeline(pipe)
    calls = []
    report = diffopt.optimize(pipe, compile={"backend": counting_inductor(calls)})
    compiled_components = {s.component for s in report.applied if s.transform == "compile"}
    assert compiled_components == {"unet", "controlnet"}
    assert rel_l2(run_pipeline(pipe), eager) < 1e-4
    assert len({id(gm) for gm in calls}) >= 2  # a graph each for the UNet and the ControlNet ran
    diffopt.restore(pipe)
    assert "_compiled_call_impl" not in vars(pipe.unet) and "_compiled_call_impl" not in vars(pipe.controlnet)
    ran_compiled = len(calls)
    restored = run_pipeline(pipe)
    assert len(calls) == ran_compiled  # no compiled graph runs after restore: both networks are eager again
    assert torch.equal(run_pipeline(pipe), restored)


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


def test_a_new_input_shape_is_announced_before_it_compiles(caplog):
    # A new shape compiles as long as a first call (minutes for a full-size model): say so before, not only after.
    # A batch size after dynamo made the batch dynamic, or a shape seen before, compiles nothing: no notice then.
    unet = tiny_unet()
    diffopt.optimize(unet, compile={"backend": "aot_eager"})
    size = unet.config.sample_size

    def call(batch, side=size):
        inputs = unet_inputs(unet, batch)
        inputs["sample"] = torch.randn(batch, unet.config.in_channels, side, side)
        caplog.clear()
        with torch.no_grad(), caplog.at_level("WARNING", logger="diffopt"):
            unet(**inputs)
        return [r.getMessage() for r in caplog.records if "new input shapes" in r.getMessage() or "again" in r.getMessage()]

    call(1)
    notices = call(2)
    assert len(notices) == 2 and "batch 1 -> 2" in notices[0] and "dynamic_batch=True" in notices[0]
    assert "compiled UNet2DConditionModel again" in notices[1]  # after the notice, and it did compile
    assert call(1) == [] and call(3) == []  # seen before; the batch is dynamic by now
    (notice, *_) = call(3, side=size * 2)  # a new resolution
    assert f"(3, 4, {size}, {size}) -> (3, 4, {size * 2}, {size * 2})" in notice and "dynamic_batch" not in notice
    diffopt.restore(unet)
    diffopt.optimize(unet, compile={"backend": "aot_eager"}, dynamic_batch=True)
    call(1)
    assert not [n for n in call(2) if "new input shapes" in n]  # compiled for every batch size already
    diffopt.restore(unet)


def _symbolic_inputs_of_each_graph(compile_with):
    """Compile three UNets in turn with ``compile_with(unet, backend)``, with IF's input channels (stage I: 3,
    stage II: 6, the x4 upscaler: 7) and sizes, and call each at batch 1 then 2. Returns, per captured graph, how
    many of its inputs are symbolic sizes (0: a static graph)."""
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
        call = compile_with(unet, recording)
        inputs = unet_inputs(unet)
        for batch in (1, 2):
            sample = torch.randn(batch, unet.config.in_channels, size, size)
            context = inputs["encoder_hidden_states"].expand(batch, -1, -1)
            with torch.no_grad():  # sample and timestep positional, as the pipelines pass them
                call(sample, inputs["timestep"], context)
    return symbolic


def test_each_model_starts_from_a_static_graph_and_keeps_torchs_rules_for_itself():
    def with_diffopt(unet, backend):
        diffopt.optimize(unet, compile={"backend": backend})
        return unet

    # Per model: a static graph, then on a second batch size torch's automatic dynamic shapes (symbolic batch).
    graphs = _symbolic_inputs_of_each_graph(with_diffopt)
    assert len(graphs) == 6 and graphs[0::2] == [0, 0, 0] and min(graphs[1::2]) > 0


def test_plain_torch_compile_traces_the_next_model_symbolically():
    # What diffopt's own entry per model avoids, and what diffusers' documented recipe does: torch.compile(unet) shares
    # UNet2DConditionModel.forward's code, so the second model's first graph is already symbolic, as if the first
    # had changed shape. On an H200, IF's stage II then had not compiled after 200 s; alone it took 75 s.
    graphs = _symbolic_inputs_of_each_graph(lambda unet, backend: torch.compile(unet, backend=backend))
    assert graphs[0] == 0 and graphs[2] > 0


def test_many_distinct_models_compile_in_one_process():
    # Ten models in one process (a notebook trying pipelines), none of which may hit dynamo's recompile limit (8).
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


def test_optimize_after_restore_reuses_the_graphs_and_a_dropped_model_is_freed():
    import gc
    import weakref

    graphs = []

    def counting(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    unet = tiny_unet()
    inputs = unet_inputs(unet)
    diffopt.optimize(unet, compile={"backend": counting})
    with torch.no_grad():
        first = unet(**inputs).sample
        diffopt.restore(unet)
        diffopt.optimize(unet, compile={"backend": counting})  # the same entry: dynamo's cached graph serves it
        assert torch.equal(unet(**inputs).sample, first)
    assert len(graphs) == 1
    diffopt.restore(unet)
    alive = weakref.ref(unet)
    del unet
    gc.collect()
    assert alive() is None  # the entry kept per model does not keep the model


@pytest.mark.parametrize("how", ["in place", "wrapped"])
def test_a_unet_compiled_outside_diffopt_keeps_its_compile_and_its_weight_layout(how):
    pipe = sd_pipeline()
    if how == "in place":
        pipe.unet.compile(backend="eager")
        unet = pipe.unet
    else:
        pipe.unet = torch.compile(pipe.unet, backend="eager")
        unet = pipe.unet._orig_mod
    strides = [p.stride() for p in unet.parameters()]
    report = diffopt.optimize(pipe)
    rows = {(step.component, step.transform): step for step in report.steps}
    assert rows[("unet", "compile")].status == "skipped" and "outside diffopt" in rows[("unet", "compile")].detail
    assert rows[("unet", "memory_format")].status == "skipped"
    assert [p.stride() for p in unet.parameters()] == strides
    diffopt.restore(pipe)
    assert [p.stride() for p in unet.parameters()] == strides


def test_apply_compile_over_a_compiled_module_puts_the_earlier_compile_back_on_undo():
    from diffopt.transforms.compile import apply_compile, compiled_by_diffopt

    unet = tiny_unet()
    unet.compile(backend="eager")
    theirs = vars(unet)["_compiled_call_impl"]
    applied = apply_compile(unet, {"backend": "eager"})
    assert compiled_by_diffopt(unet)
    applied.undo()
    assert vars(unet)["_compiled_call_impl"] is theirs and not compiled_by_diffopt(unet)
    fresh = tiny_unet()
    apply_compile(fresh, {"backend": "eager"}).undo()
    assert "_compiled_call_impl" not in vars(fresh)  # nothing was there before: nothing is put back
