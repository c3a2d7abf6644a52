"""compile_blocks: a transformer's repeated blocks compiled one graph per block class instead of the whole model
(the default for transformers, True to require it); same output as eager, shared graphs, its own compile-cache
entry, and restore leaves nothing behind. UNets compile whole unless compile_blocks=True, which refuses them."""
import pytest
import torch
from conftest import (
    CROSS_DIM, rel_l2, run_pipeline, sd3_pipeline, sd3_transformer, sd_pipeline, transformer_inputs, vars_by_identity,
)
from test_roundtrip import assert_same, snapshot
from torch._dynamo.utils import counters

import diffopt
from diffopt import compile_cache
from diffopt.transforms.compile_blocks import why_blocks_do_not_repeat

pytestmark = pytest.mark.usefixtures("compile_clean")
FAST = {"backend": "aot_eager"}  # real dynamo tracing and graph sharing, without inductor's code generation


def deeper_flux(single=3):
    """Two double-stream and ``single`` single-stream blocks: blocks of two classes."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    return FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=2, num_single_layers=single, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=CROSS_DIM, pooled_projection_dim=16, axes_dims_rope=(2, 2, 4),
    ).eval()


def run(model, inputs):
    with torch.inference_mode():
        return model(**inputs).sample


def graphs_for(model):
    """Optimize ``model`` with compile_blocks, check calls at batch 1 and then 2 against eager, and count the graphs
    the first call compiled and those the new batch size added."""
    inputs, larger = transformer_inputs(model), transformer_inputs(model, batch=2)
    eager, eager_larger = run(model, inputs), run(model, larger)
    report = diffopt.optimize(model, compile=FAST, compile_blocks=True)
    (row,) = [s for s in report.steps if s.transform == "compile"]
    assert row.status == "applied" and "FluxSingleTransformerBlock, FluxTransformerBlock" in row.detail
    torch._dynamo.reset()
    counters.clear()
    assert rel_l2(run(model, inputs), eager) < 1e-5
    graphs = counters["stats"]["unique_graphs"]
    assert rel_l2(run(model, inputs), eager) < 1e-5
    assert counters["stats"]["unique_graphs"] == graphs  # the second call compiles nothing
    assert rel_l2(run(model, larger), eager_larger) < 1e-5
    added = counters["stats"]["unique_graphs"] - graphs
    diffopt.restore(model)
    return graphs, added


def test_blocks_of_one_class_share_graphs_whatever_the_depth():
    # One graph per block class, plus one for the first single-stream block, whose input is a whole tensor where
    # the others get views of their predecessor's split output: three, for five blocks or for eight. A new batch
    # size compiles those three again, not one per block.
    assert graphs_for(deeper_flux(single=3)) == graphs_for(deeper_flux(single=6)) == (3, 3)


def test_restore_gives_back_the_model_bit_for_bit_with_no_leftover_attributes():
    model = deeper_flux()
    inputs = transformer_inputs(model)
    eager = run(model, inputs)
    before = {name: vars_by_identity(module) for name, module in model.named_modules()}
    processors = dict(model.attn_processors)

    diffopt.optimize(model, compile=FAST, compile_blocks=True)
    assert all("forward" in vars(block) for block in model.transformer_blocks)
    run(model, inputs)
    diffopt.restore(model)

    assert {name: vars_by_identity(module) for name, module in model.named_modules()} == before
    assert model.attn_processors == processors
    assert torch.equal(run(model, inputs), eager)


def test_pipeline_round_trip():
    pipe = sd3_pipeline(layers=3)
    eager = run_pipeline(pipe)
    before = snapshot(pipe)

    report = diffopt.optimize(pipe, compile=FAST, compile_blocks=True)
    assert ("transformer", "compile", "applied") in {(s.component, s.transform, s.status) for s in report.steps}
    assert rel_l2(run_pipeline(pipe), eager) < 1e-4

    diffopt.restore(pipe)
    assert_same(before, snapshot(pipe))
    assert torch.equal(run_pipeline(pipe), eager)


def test_a_unet_is_refused_and_left_as_it_was():
    pipe = sd_pipeline()
    before = snapshot(pipe)
    with pytest.raises(ValueError, match=r"compile_blocks=True: the blocks of UNet2DConditionModel\.down_blocks"):
        diffopt.optimize(pipe, compile_blocks=True)
    assert_same(before, snapshot(pipe))
    assert why_blocks_do_not_repeat(deeper_flux()) is None


@pytest.mark.parametrize("value", ["yes", 1, 0.0])
def test_compile_blocks_must_be_a_bool_or_none(value):
    with pytest.raises(TypeError, match=rf"compile_blocks must be True, False or None, got {value!r}"):
        diffopt.OptimizeConfig(compile_blocks=value)


def compile_row(report):
    (row,) = [s for s in report.steps if s.transform == "compile" and s.status == "applied"]
    return row


def test_by_default_a_transformer_compiles_its_blocks_and_false_compiles_it_whole():
    model = deeper_flux()
    inputs = transformer_inputs(model)
    eager = run(model, inputs)

    report = diffopt.optimize(model, compile=FAST)
    assert "one graph per block class (compile_blocks=False compiles it whole)" in compile_row(report).detail
    assert all("forward" in vars(block) for block in model.transformer_blocks)
    assert rel_l2(run(model, inputs), eager) < 1e-5
    diffopt.restore(model)

    report = diffopt.optimize(model, compile=FAST, compile_blocks=False)
    assert "blocks" not in compile_row(report).detail
    assert not any("forward" in vars(block) for block in model.transformer_blocks)
    assert rel_l2(run(model, inputs), eager) < 1e-5
    diffopt.restore(model)
    assert torch.equal(run(model, inputs), eager)


def test_by_default_cuda_graphs_asked_for_by_name_compile_the_transformer_whole():
    model = deeper_flux()
    report = diffopt.optimize(model, compile={"mode": "reduce-overhead", "backend": "eager"})
    assert "blocks" not in compile_row(report).detail and "reduce-overhead" in compile_row(report).detail
    assert not any("forward" in vars(block) for block in model.transformer_blocks)
    diffopt.restore(model)


def test_by_default_a_unet_compiles_whole():
    pipe = sd_pipeline()
    report = diffopt.optimize(pipe, compile=FAST)
    assert "blocks" not in compile_row(report).detail
    assert not any("forward" in vars(module) for module in pipe.unet.modules())
    diffopt.restore(pipe)


def test_compile_blocks_with_compile_off_is_an_error():
    with pytest.raises(ValueError, match="compile_blocks=True .* compile=False"):
        diffopt.optimize(deeper_flux(), compile=False, compile_blocks=True)


@pytest.mark.compile
def test_inductor_blocks_are_saved_to_their_own_compile_cache_entry(tmp_path, caplog):
    model = deeper_flux()
    inputs = transformer_inputs(model)
    eager = run(model, inputs)

    report = diffopt.optimize(model, compile_blocks=True, compile_cache=tmp_path)
    (row,) = [s for s in report.steps if s.transform == "compile"]
    assert "no saved compile yet" in row.detail
    with caplog.at_level("INFO", logger="diffopt"):
        assert rel_l2(run(model, inputs), eager) < 1e-4
    assert "compiling the 5 blocks of FluxTransformer2DModel" in caplog.text
    assert "compiled the blocks of FluxTransformer2DModel in" in caplog.text
    (entry,) = [path.parent for path in tmp_path.glob(f"*/{compile_cache.META}")]  # the entry was written
    assert (entry / compile_cache.ARTIFACTS).stat().st_size > 0

    # A whole-model compile of the same model uses another entry: blocks' artifacts never stand in for it.
    diffopt.restore(model)
    report = diffopt.optimize(model, compile_cache=tmp_path, compile={"backend": "inductor"})
    (row,) = [s for s in report.steps if s.transform == "compile"]
    assert "no saved compile yet" in row.detail
    diffopt.restore(model)
    # And the blocks again find theirs.
    report = diffopt.optimize(model, compile_blocks=True, compile_cache=tmp_path)
    (row,) = [s for s in report.steps if s.transform == "compile"]
    assert "loaded" in row.detail and str(entry.name) in row.detail
    diffopt.restore(model)


def test_a_deep_copy_runs_its_own_compiled_blocks_and_restores_alone_and_pickling_refuses():
    import copy
    import pickle

    model = deeper_flux()
    inputs = transformer_inputs(model)
    eager = run(model, inputs)
    diffopt.optimize(model, compile=FAST, compile_blocks=True)
    twin = copy.deepcopy(model)
    assert all(block.forward.owner is block for block in twin.transformer_blocks)  # hooks on the copy's blocks
    assert rel_l2(run(twin, inputs), eager) < 1e-5
    diffopt.restore(twin)
    assert not any("forward" in vars(module) for module in twin.modules())
    assert "forward" in vars(model.transformer_blocks[0])  # the original is still compiled
    with pytest.raises(TypeError, match="restore"):
        pickle.dumps(model)
    diffopt.restore(model)
    assert torch.equal(run(model, inputs), eager) and torch.equal(run(twin, inputs), eager)


def test_cuda_graphs_are_off_for_compiled_blocks_unless_a_mode_is_named(monkeypatch):
    from diffopt.transforms import compile as compile_transform

    cuda_like = {"mode": "reduce-overhead", "fullgraph": True, "backend": "eager"}  # the CUDA defaults, runnable here
    monkeypatch.setattr(compile_transform, "default_options", lambda device: dict(cuda_like))
    model = deeper_flux()
    report = diffopt.optimize(model, compile_blocks=True)
    (step,) = report.applied
    assert step.transform == "compile" and "reduce-overhead" not in step.detail
    assert any("CUDA graphs off" in s.detail and "compile_blocks" in s.detail for s in report.skipped)
    report = diffopt.optimize(model, compile_blocks=True, compile={"mode": "reduce-overhead", "backend": "eager"})
    assert "reduce-overhead" in [s for s in report.applied if s.transform == "compile"][0].detail
    assert not any("CUDA graphs" in s.detail for s in report.skipped)
    diffopt.restore(model)


def test_many_distinct_transformers_compile_their_blocks_in_one_process():
    # Ten Flux sizes in one process (a notebook trying models): the blocks of each model compile under a code object
    # of that model's own, so none adds to another's recompile count (dynamo's limit is 8, a hard error under
    # fullgraph=True), and each model's blocks still share one graph per class.
    from diffusers import FluxTransformer2DModel
    from diffusers.models.transformers.transformer_flux import FluxTransformerBlock
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list as graphs_on

    for width in range(1, 11):
        torch.manual_seed(0)
        model = FluxTransformer2DModel(
            patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=8,
            num_attention_heads=width, joint_attention_dim=CROSS_DIM, pooled_projection_dim=16, axes_dims_rope=(2, 2, 4),
        ).eval()
        inputs = transformer_inputs(model)
        eager = run(model, inputs)
        diffopt.optimize(model, compile={"backend": "eager"})
        counters.clear()
        assert rel_l2(run(model, inputs), eager) < 1e-5
        assert counters["stats"]["unique_graphs"] <= 3  # per class (and Flux's first single block), not per block
        diffopt.restore(model)
    assert graphs_on(FluxTransformerBlock.forward.__code__) == []  # the class's own code gathered no graphs
    assert torch._dynamo.config.recompile_limit == 8  # raised only while the blocks run


def test_a_unet_with_two_alike_stages_still_compiles_whole_by_default():
    # A DDPM-style UNet2DModel whose first two down blocks are alike (32 channels in and out, both downsampling):
    # its stages still differ from one another, and the default must compile it whole, as documented for UNets.
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=16, in_channels=3, out_channels=3, block_out_channels=(32, 32, 64), norm_num_groups=8,
        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
    ).eval()
    assert "a UNet's stages" in why_blocks_do_not_repeat(unet)
    report = diffopt.optimize(unet, compile=FAST)
    assert "blocks" not in compile_row(report).detail
    assert not any("forward" in vars(module) for module in unet.modules())
    diffopt.restore(unet)
    before = {name: vars_by_identity(module) for name, module in unet.named_modules()}
    with pytest.raises(ValueError, match=r"compile_blocks=True: the blocks of UNet2DModel\.down_blocks"):
        diffopt.optimize(unet, compile=FAST, compile_blocks=True)
    assert {name: vars_by_identity(module) for name, module in unet.named_modules()} == before


def test_one_block_per_list_is_named_as_such():
    from conftest import flux_transformer

    reason = why_blocks_do_not_repeat(flux_transformer())
    assert reason.startswith("FluxTransformer2DModel.single_transformer_blocks and .transformer_blocks hold one block")
    assert "UNet" not in reason


def test_blocks_with_a_diffusers_cache_of_the_users_own_compile_whole_instead_of_skipping_it():
    # diffusers' enable_cache hooks each block's forward on the instance; compiled blocks run the class's forward,
    # which would silently drop the user's cache. The default compiles the model whole then, hooks and all.
    from diffusers.hooks import FirstBlockCacheConfig

    model = deeper_flux()
    model.enable_cache(FirstBlockCacheConfig(threshold=0.5))
    report = diffopt.optimize(model, compile={"backend": "eager", "fullgraph": False})
    assert "blocks" not in compile_row(report).detail
    (skip,) = [s for s in report.skipped if s.transform == "compile"]
    assert "transformer_blocks.0 has a forward of its own" in skip.detail
    assert all(not isinstance(vars(block)["forward"], diffopt.layers.InstanceHook) for block in model.transformer_blocks)
    diffopt.restore(model)
    before = {name: vars_by_identity(module) for name, module in model.named_modules()}
    with pytest.raises(ValueError, match="compile_blocks=True: .*has a forward of its own.*disable_cache"):
        diffopt.optimize(model, compile=FAST, compile_blocks=True)
    assert {name: vars_by_identity(module) for name, module in model.named_modules()} == before
    model.disable_cache()


def test_diffopts_own_first_block_cache_does_not_count_as_a_users_hook():
    from conftest import run_transformer_pipeline

    pipe = flux_blocks_pipeline()
    diffopt.optimize(pipe, compile=FAST, cache="first_block")
    run_transformer_pipeline(pipe)
    # Optimized again: the cache's hooks on the blocks are diffopt's, taken off before the blocks compile again.
    report = diffopt.optimize(pipe, compile=FAST, compile_blocks=True)
    assert "one graph per block class" in compile_row(report).detail
    diffopt.restore(pipe)


def flux_blocks_pipeline():
    from conftest import tiny_vae
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    pipe = FluxPipeline(
        transformer=deeper_flux(), scheduler=FlowMatchEulerDiscreteScheduler(), vae=tiny_vae(), text_encoder=None,
        tokenizer=None, text_encoder_2=None, tokenizer_2=None,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_sequential_offload_added_after_optimize_runs_the_blocks_uncompiled_with_a_warning(caplog):
    # As a model compiled whole does: the blocks cannot trace accelerate's hooks on their layers (under
    # fullgraph=True that was a hard error at the first call).
    accelerate = pytest.importorskip("accelerate")
    model = deeper_flux()
    inputs = transformer_inputs(model)
    eager = run(model, inputs)
    diffopt.optimize(model, compile=FAST)
    accelerate.cpu_offload(model, execution_device="cpu")
    with caplog.at_level("WARNING", logger="diffopt"):
        assert rel_l2(run(model, inputs), eager) < 1e-5
        run(model, inputs)
    warnings = [r.getMessage() for r in caplog.records if "running its blocks uncompiled" in r.getMessage()]
    assert len(warnings) == 1 and "sequential CPU offload" in warnings[0]
    accelerate.hooks.remove_hook_from_submodules(model)
    assert rel_l2(run(model, inputs), eager) < 1e-5  # compiled again once the offload is gone
    diffopt.restore(model)


def test_lora_hotswap_enabled_before_optimize_loads_into_compiled_blocks_without_a_false_warning(tmp_path, caplog):
    # peft refuses to prepare hot-swap on a model compiled whole; blocks compiled one by one leave the model itself
    # uncompiled, so the first LoRA loads after optimize and the warning that it would fail must not be given.
    pytest.importorskip("peft")
    from _adapters import save_lora
    from diffusers import FluxPipeline

    lora = save_lora(tmp_path, 1, model=deeper_flux(), pipeline_class=FluxPipeline)
    pipe, reference = flux_blocks_pipeline(), flux_blocks_pipeline()
    reference.load_lora_weights(lora)
    pipe.enable_lora_hotswap(target_rank=8)
    with caplog.at_level("WARNING", logger="diffopt"):
        diffopt.optimize(pipe, compile={"backend": "eager"})
    assert "hot-swap enabled but no LoRA loaded yet" not in caplog.text
    pipe.load_lora_weights(lora)
    assert rel_l2(run_pipeline(pipe), run_pipeline(reference)) < 1e-5
    diffopt.restore(pipe)


def test_compile_blocks_false_with_the_first_block_cache_is_an_error_and_changes_nothing():
    # The cache decides between blocks on the host, so it always compiles them one by one: asking for the whole
    # model as well is a contradiction to name, not to resolve silently.
    pipe = flux_blocks_pipeline()
    before = snapshot(pipe)
    with pytest.raises(ValueError, match=r"compile_blocks=False .* first-block cache \(cache='first_block'\)"):
        diffopt.optimize(pipe, compile=FAST, compile_blocks=False, cache="first_block")
    assert_same(before, snapshot(pipe))
    report = diffopt.optimize(pipe, compile=False, compile_blocks=False, cache="first_block")  # nothing compiled
    assert ("transformer", "cache") in {(s.component, s.transform) for s in report.applied}
    diffopt.restore(pipe)


def _pretend_flash_runs_here(monkeypatch):
    # The gates keep FlashAttention to CUDA cards; torch's CPU build has a FlashAttention kernel of its own, which
    # is all these tests need. "auto" on this CPU then prefers it.
    from diffopt import capabilities

    real = capabilities.attention_backend
    monkeypatch.setattr(capabilities, "attention_backend", lambda name, device, dtype: (
        capabilities.Gate(name, True) if name == "flash" else real(name, device, dtype)))
    monkeypatch.setitem(capabilities.AUTO_ATTENTION, "cpu", ("flash", "sdpa"))


@pytest.mark.parametrize("kind, attention", [("sd3", "flash"), ("flux", "auto")])
def test_attention_kernels_keep_one_graph_per_block_class(monkeypatch, kind, attention):
    # A forced kernel (SD3's processors call SDPA themselves) and a preferred one (Flux's go through diffusers'
    # dispatcher) wrap every attention layer's forward. Were each wrapper an object of its own, dynamo would guard
    # on its identity and compile every block again: on an H200, Flux.1-dev's first call took 68 s instead of 14.
    _pretend_flash_runs_here(monkeypatch)
    graphs = {}
    for choice in ("sdpa", attention):
        model = sd3_transformer(layers=4) if kind == "sd3" else deeper_flux(single=4)
        inputs = transformer_inputs(model)
        eager = run(model, inputs)
        report = diffopt.optimize(model, attention=choice, compile=FAST, compile_blocks=True)
        assert choice == "sdpa" or any("FLASH_ATTENTION" in s.detail for s in report.applied if s.transform == "attention")
        torch._dynamo.reset()
        counters.clear()
        assert rel_l2(run(model, inputs), eager) < 1e-5
        graphs[choice] = counters["stats"]["unique_graphs"]
        diffopt.restore(model)
        assert not any("forward" in vars(module) for module in model.modules())
    assert graphs[attention] == graphs["sdpa"] < 4


def test_attention_kernels_follow_a_deep_copy_and_pickling_refuses(monkeypatch):
    import copy
    import pickle

    from diffopt.transforms.attention import attention_modules
    from diffopt.transforms.attention_backend import kernel_of

    _pretend_flash_runs_here(monkeypatch)
    model = sd3_transformer(layers=2)
    inputs = transformer_inputs(model)
    eager = run(model, inputs)
    diffopt.optimize(model, attention="flash", compile=False)
    twin = copy.deepcopy(model)
    for _, layer in attention_modules(twin):
        assert layer.forward.__self__ is layer and kernel_of(layer) == ("FLASH_ATTENTION",)  # bound to the copy
    assert rel_l2(run(twin, inputs), eager) < 1e-5
    diffopt.restore(twin)
    assert not any("forward" in vars(module) for module in twin.modules())
    assert all(kernel_of(layer) == ("FLASH_ATTENTION",) for _, layer in attention_modules(model))  # still on
    with pytest.raises(TypeError, match="restore"):
        pickle.dumps(model)
    diffopt.restore(model)
    assert torch.equal(run(model, inputs), run(twin, inputs))
    pickle.dumps(model)
