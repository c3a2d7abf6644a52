"""background_compile=True: calls run uncompiled while a child process compiles the same model, then compile here
from what the child saved. The children are real processes; tests wait for them instead of sleeping."""
import copy
import logging

import pytest
import torch
from conftest import (
    if_pipeline, rel_l2, run_pipeline, sd3_transformer, sd_pipeline, sdxl_pipeline, tiny_controlnet, tiny_unet,
    unet_inputs,
)
from test_roundtrip import assert_same, snapshot

import diffopt
from diffopt.capabilities import UnsupportedFeatureError
from diffopt.transforms.background_spec import (
    Undescribable, describe_call, describe_value, first_difference, make_call, structure,
)

pytestmark = [pytest.mark.compile, pytest.mark.usefixtures("compile_clean")]
FAST = {"backend": "aot_eager"}  # real dynamo graphs in parent and child, without inductor's code generation
CHILD_TIMEOUT = 900  # seconds: a child imports torch and diffusers and, with inductor, compiles C++ on the CPU


@pytest.fixture(autouse=True)
def fresh_counters():
    from torch._dynamo.utils import counters

    counters.clear()  # graphs() counts this test's compiles only


def graphs():
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def background_of(module):
    return vars(module)["_compiled_call_impl"].background


def wait_for_child(background):
    child = background.child
    assert child is not None, "no child process is running"
    child.process.wait(timeout=CHILD_TIMEOUT)
    return child


def test_a_call_is_described_by_shapes_strides_dtypes_and_plain_values():
    sample = torch.randn(2, 4, 8, 8).to(memory_format=torch.channels_last)
    timestep = torch.tensor(3).expand(2)  # stride 0, as pipelines expand a timestep over the batch
    kwargs = dict(sample=sample, timestep=timestep, extra={"ids": torch.zeros(2, 6, dtype=torch.long)},
                  residuals=[torch.ones(2, 3)], return_dict=False, scale=None, steps=4)  # fmt: skip
    with torch.inference_mode():
        described = describe_call((), kwargs)
    (grad, inference), args, made = make_call(described)
    assert (grad, inference) == (False, True) and args == ()
    assert made["sample"].stride() == sample.stride() and made["timestep"].stride() == (0,)
    assert made["extra"]["ids"].dtype == torch.long and isinstance(made["residuals"], list)
    assert (made["return_dict"], made["scale"], made["steps"]) == (False, None, 4)
    with torch.inference_mode():
        assert describe_call((), made) == described  # what the child makes selects the same graph
    assert describe_value(torch.zeros(2, 3)) != describe_value(torch.zeros(3, 2))

    class Box:  # not a plain value: another process could not make one
        pass

    with pytest.raises(Undescribable, match="Box"):
        describe_value({"box": [Box()]})
    # A ControlNet's conditioning scale: its value selects a recorded graph, not a compiled one.
    assert describe_call((), dict(scale=0.5)) != describe_call((), dict(scale=1.0))
    assert describe_call((), dict(scale=0.5), exact_floats=False) == describe_call((), dict(scale=1.0), exact_floats=False)
    assert isinstance(make_call(describe_call((), dict(scale=0.5), exact_floats=False))[2]["scale"], float)


def test_first_difference_names_what_the_copy_lacks_or_has_otherwise():
    unet = tiny_unet()
    ours = structure(unet)
    assert first_difference(structure(tiny_unet()), ours) is None
    changed = tiny_unet()
    changed.conv_in.to(memory_format=torch.channels_last)
    assert "conv_in.weight" in first_difference(structure(changed), ours)
    from diffusers.models.attention_processor import AttnProcessor

    changed = tiny_unet()
    name, attention = next((n, m) for n, m in changed.named_modules() if hasattr(m, "processor"))
    attention.set_processor(AttnProcessor())
    assert f"processor {name!r}" in first_difference(structure(changed), ours)


def compiled_calls(module):
    return vars(module)["_compiled_call_impl"].calls


def test_calls_run_uncompiled_until_a_thread_here_has_compiled_what_the_child_saved(tmp_path, monkeypatch, caplog):
    from torch._dynamo.utils import counters

    # Empty torch caches, inherited by the child: what the parent finds there, the child put there.
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    pipe = sd_pipeline()
    eager = run_pipeline(pipe)
    before = snapshot(pipe)
    report = diffopt.optimize(pipe, background_compile=True, compile_cache=tmp_path / "saved")
    assert "background process" in str(report)
    background = background_of(pipe.unet)
    caplog.set_level(logging.WARNING, logger="diffopt")
    uncompiled = run_pipeline(pipe)
    assert graphs() == 0 and compiled_calls(pipe.unet) == 0  # the eager forward ran: nothing compiled here
    assert rel_l2(uncompiled, eager) < 1e-5
    assert "compiling unet in a background process" in caplog.text
    child = wait_for_child(background)
    assert child.process.returncode == 0, child.log_tail()
    hits = dict(counters["inductor"]), dict(counters["aot_autograd"])
    # The next call takes the child in and starts the thread that compiles here; the calls go on meanwhile.
    assert rel_l2(run_pipeline(pipe), eager) < 1e-4
    assert not child.directory.exists() and (background.loading is not None or background.loaded)
    assert diffopt.wait_until_compiled(pipe, timeout=CHILD_TIMEOUT)
    assert background.loading is None and background.loaded == set(background.seen)
    assert graphs() >= 1 and "compiled in a background process" in caplog.text and "runs compiled" in caplog.text
    inductor = {k: v - hits[0].get(k, 0) for k, v in counters["inductor"].items()}
    aot = {k: v - hits[1].get(k, 0) for k, v in counters["aot_autograd"].items()}
    assert inductor.get("fxgraph_cache_hit", 0) >= 1 and inductor.get("fxgraph_cache_miss", 0) == 0, inductor
    assert aot.get("autograd_cache_hit", 0) >= 1 and aot.get("autograd_cache_miss", 0) == 0, aot
    calls, compiled_graphs = compiled_calls(pipe.unet), graphs()
    with torch._dynamo.config.patch(error_on_recompile=True):
        compiled = run_pipeline(pipe)
        assert torch.equal(run_pipeline(pipe), compiled)
    assert compiled_calls(pipe.unet) > calls and graphs() == compiled_graphs  # compiled code, compiled before
    assert rel_l2(compiled, eager) < 1e-4
    diffopt.restore(pipe, attention="original")
    assert_same(before, snapshot(pipe))
    assert torch.equal(run_pipeline(pipe), eager)
    # The next pipeline of this model finds the saved compile: a thread compiles from it at the first call, no child.
    again = sd_pipeline()
    report = diffopt.optimize(again, background_compile=True, compile_cache=tmp_path / "saved")
    assert "loaded from the saved compile in a thread" in str(report)
    assert rel_l2(run_pipeline(again), eager) < 1e-4
    assert background_of(again.unet).child is None and "loading unet from the saved compile" in caplog.text
    assert diffopt.wait_until_compiled(again, timeout=CHILD_TIMEOUT)
    calls = compiled_calls(again.unet)
    assert rel_l2(run_pipeline(again), eager) < 1e-4 and compiled_calls(again.unet) > calls
    diffopt.restore(again)


def test_a_new_shape_runs_uncompiled_while_a_child_compiles_every_shape_in_order(caplog):
    unet = tiny_unet()
    diffopt.optimize(unet, background_compile=True, compile=FAST, compile_cache=False)
    background = background_of(unet)
    caplog.set_level(logging.WARNING, logger="diffopt")
    with torch.inference_mode():
        unet(**unet_inputs(unet, batch=1))
        first = wait_for_child(background)
        assert first.process.returncode == 0, first.log_tail()
        assert diffopt.wait_until_compiled(unet, timeout=CHILD_TIMEOUT)
        compiled_one = graphs()
        assert compiled_one >= 1
        unet(**unet_inputs(unet, batch=2))  # a new shape: uncompiled, and a child for both shapes
        assert graphs() == compiled_one
        assert "compiling UNet2DConditionModel for new input shapes in a background process" in caplog.text
        second = wait_for_child(background)
        assert second.process.returncode == 0, second.log_tail()
        assert [s[2] for s in second.signatures] == [s[2] for s in first.signatures + [background.seen[1]]]
        assert diffopt.wait_until_compiled(unet, timeout=CHILD_TIMEOUT)
        assert graphs() > compiled_one  # compiled here now
        eager = unet._call_impl(**unet_inputs(unet, batch=2)).sample
        output = unet(**unet_inputs(unet, batch=2)).sample
        assert rel_l2(output, eager) < 1e-5
        assert "new input shapes" not in caplog.text.split("compiled in a background process")[-1]
    diffopt.restore(unet)
    assert "_compiled_call_impl" not in vars(unet)


def _two_controlnets():
    from diffusers import MultiControlNetModel

    return sd_pipeline(controlnet=MultiControlNetModel([tiny_controlnet(), tiny_controlnet()]))


@pytest.mark.parametrize("build", [sdxl_pipeline, _two_controlnets, if_pipeline], ids=["sdxl", "two-controlnets", "if"])
def test_every_compiled_model_of_a_pipeline_switches_when_its_child_is_done(build):
    pipe = build()
    eager = run_pipeline(pipe)
    report = diffopt.optimize(pipe, background_compile=True, compile=FAST, compile_cache=False)
    compiled = [s.component for s in report.applied if s.transform == "compile"]
    models = [pipe.unet] + list(getattr(getattr(pipe, "controlnet", None), "nets", []))
    assert len(compiled) == len(models)  # SDXL's added_cond_kwargs, each net of a MultiControlNet, IF's UNet
    assert rel_l2(run_pipeline(pipe), eager) < 1e-5 and graphs() == 0
    for model in models:
        child = wait_for_child(background_of(model))
        assert child.process.returncode == 0, child.log_tail()
    assert diffopt.wait_until_compiled(pipe, timeout=CHILD_TIMEOUT)
    calls = [compiled_calls(m) for m in models]
    assert rel_l2(run_pipeline(pipe), eager) < 1e-4
    assert graphs() >= len(models) and all(compiled_calls(m) > n for m, n in zip(models, calls))
    diffopt.restore(pipe)


def test_a_child_that_builds_another_model_costs_a_warning_and_the_model_compiles_here(caplog):
    from diffusers.models.attention_processor import AttnProcessor

    unet = tiny_unet()
    diffopt.optimize(unet, background_compile=True, compile=FAST, compile_cache=False)
    # Changed after optimize, so the child (which applies optimize's changes to a model built from the config)
    # builds something else: its graphs would not be this model's.
    name, attention = next((n, m) for n, m in unet.named_modules() if hasattr(m, "processor"))
    attention.processor = AttnProcessor()
    background = background_of(unet)
    caplog.set_level(logging.WARNING, logger="diffopt")
    with torch.inference_mode():
        eager = unet._call_impl(**unet_inputs(unet)).sample
        unet(**unet_inputs(unet))
        child = wait_for_child(background)
        assert child.process.returncode != 0
        assert diffopt.wait_until_compiled(unet)  # nothing to wait for: it gave up
        output = unet(**unet_inputs(unet)).sample
    assert background.given_up and f"processor {name!r}" in background.given_up
    assert "compiling it in this process instead" in caplog.text
    assert graphs() >= 1 and rel_l2(output, eager) < 1e-5
    assert not child.directory.exists()


def test_restore_ends_a_running_child_and_leaves_nothing_behind():
    unet = tiny_unet()
    before = snapshot(unet)
    with torch.inference_mode():
        eager = unet(**unet_inputs(unet)).sample
    diffopt.optimize(unet, background_compile=True, compile=FAST, compile_cache=False)
    background = background_of(unet)
    with torch.inference_mode():
        unet(**unet_inputs(unet))
    child = background.child
    assert child is not None and child.process.poll() is None  # still importing torch
    diffopt.restore(unet, attention="original")
    assert child.process.poll() is not None and not child.directory.exists()
    assert_same(before, snapshot(unet))
    with torch.inference_mode():
        assert torch.equal(unet(**unet_inputs(unet)).sample, eager)
    assert graphs() == 0


def test_a_copy_gets_a_background_compile_of_its_own():
    unet = tiny_unet()
    diffopt.optimize(unet, background_compile=True, compile=FAST, compile_cache=False)
    twin = copy.deepcopy(unet)
    ours, theirs = background_of(unet), background_of(twin)
    assert theirs is not ours and theirs.module is twin and theirs.child is None and not theirs.seen
    diffopt.restore(twin)
    assert "_compiled_call_impl" not in vars(twin) and background_of(unet) is ours


def test_models_another_process_cannot_build_are_refused_before_anything_changes():
    from diffusers import UNet2DConditionModel

    class LocalUNet(UNet2DConditionModel):  # defined here: another process cannot import it
        pass

    unet = LocalUNet(**{k: v for k, v in tiny_unet().config.items() if not k.startswith("_")}).eval()
    before = snapshot(unet)
    with pytest.raises(UnsupportedFeatureError, match="LocalUNet.*another process cannot import"):
        diffopt.optimize(unet, background_compile=True, compile=FAST)
    assert_same(before, snapshot(unet))
    with pytest.raises(UnsupportedFeatureError, match="backend is a function"):
        diffopt.optimize(tiny_unet(), background_compile=True, compile={"backend": lambda gm, inputs: gm})


def test_a_model_with_lora_layers_is_refused_and_a_fused_one_is_not(tmp_path):
    from _adapters import save_lora

    pipe = sd_pipeline()
    pipe.load_lora_weights(save_lora(tmp_path, seed=3))
    before = snapshot(pipe)
    with pytest.raises(UnsupportedFeatureError, match="layers a model built from its config lacks.*lora"):
        diffopt.optimize(pipe, background_compile=True, compile=FAST)
    assert_same(before, snapshot(pipe))
    pipe.fuse_lora()
    pipe.unload_lora_weights()  # the LoRA's change stays in the weights; its layers go
    report = diffopt.optimize(pipe, background_compile=True, compile=FAST, compile_cache=False)
    assert "background process" in str(report)
    diffopt.restore(pipe)


def test_fused_projections_are_not_taken_for_layers_the_config_lacks():
    unet = tiny_unet()
    options = dict(background_compile=True, fuse_projections=True, compile=FAST, compile_cache=False)
    diffopt.optimize(unet, **options)
    assert any(name.endswith("to_qkv.weight") for name, _ in unet.named_parameters())
    report = diffopt.optimize(unet, **options)  # checked before the previous optimization comes off
    assert "background process" in str(report)
    diffopt.restore(unet)


def test_the_vae_decoder_compiles_here_and_says_why():
    pipe = sd_pipeline()
    report = diffopt.optimize(pipe, background_compile=True, compile_vae=True, compile=FAST, compile_cache=False)
    (skipped,) = [s for s in report.skipped if s.transform == "background_compile"]
    assert skipped.component == "vae.decoder" and "compiles in this process" in skipped.detail
    assert background_of(pipe.unet) is not None and background_of(pipe.vae.decoder) is None
    diffopt.restore(pipe)


def test_transformer_blocks_compile_here_and_say_why():
    model = sd3_transformer(layers=4)  # blocks that repeat
    report = diffopt.optimize(model, background_compile=True, compile=FAST, compile_cache=False)
    (skipped,) = [s for s in report.skipped if s.transform == "background_compile"]
    assert "blocks compile in seconds" in skipped.detail
    assert not any(getattr(layer, "background", None) for layer in vars(model).get("_diffopt_layers", ()))
    diffopt.restore(model)


def test_the_benchmark_times_compiled_calls_after_a_first_call_run_uncompiled():
    from diffopt.bench import measure
    from diffopt.bench.pipelines import Stage
    from conftest import run_sd

    pipe = sd_pipeline()
    diffopt.optimize(pipe, background_compile=True, compile=FAST, compile_cache=False)
    stage = Stage(label="", pipe=pipe, call=lambda batch, output_type: run_sd(pipe, batch=batch), steps=2)
    settings = measure.CellSettings(size="tiny", device=torch.device("cpu"), dtype=torch.float32, warmup=2, repeats=2)
    results = []
    measure._measure_stage(stage, 1, settings, None, measure._Phase(), results)
    assert background_of(pipe.unet).loaded and graphs() >= 1  # compiled before the warm-up; the timed calls ran it
    assert compiled_calls(pipe.unet) >= 2 + 1  # the warm-up call and the two timed ones
    assert results[0].first_call_s > 0 and len(results[0].times_s) == 2
    diffopt.restore(pipe)


def _decide(model, config, device="cuda", free_gib=80.0, options=None, reserved=None, small=0):
    """wants_background for ``model`` as if it sat on ``device`` with ``free_gib`` free, and models under ``small``
    bytes of weights were small: the default's rules are about a CUDA device and full-size models, which a CPU test
    can only pretend to have."""
    from unittest import mock

    from diffopt.components import find_components
    from diffopt.plan import Context
    from diffopt.report import Report
    from diffopt.transforms import compile as compile_transform

    component = find_components(model)[0]
    ctx = Context(target=model, config=config, report=Report(), components=[component])
    options = {"mode": "reduce-overhead", "fullgraph": True} if options is None else options
    with mock.patch.object(compile_transform, "execution_device", lambda module: torch.device(device)), \
            mock.patch.object(torch.cuda, "mem_get_info", lambda device: (int(free_gib * 2**30), 80 * 2**30)), \
            mock.patch.object(compile_transform, "BACKGROUND_MIN_WEIGHTS", small):
        chosen = compile_transform.wants_background(component, options, ctx, {} if reserved is None else reserved)
    return chosen, [s.detail for s in ctx.report.skipped if s.transform == "background_compile"]


def test_by_default_models_on_cuda_with_cuda_graphs_compile_in_the_background_where_they_fit():
    from diffopt import OptimizeConfig

    default = OptimizeConfig()
    assert default.background_compile is None
    unet = tiny_unet()
    assert _decide(unet, default) == (True, [])
    # Silent where the compile uses no CUDA graphs (a CPU, or CUDA graphs turned off): it compiles here, as asked.
    assert _decide(unet, default, device="cpu") == (False, [])
    assert _decide(unet, default, options={"fullgraph": True}) == (False, [])
    # A small model (a test suite's): it compiles here, and the report says why.
    chosen, (detail,) = _decide(unet, default, small=100 << 20)
    assert not chosen and "a small model" in detail and "MiB of weights" in detail
    # Too little room for a second copy of the weights: it compiles here, and the report says why.
    chosen, (detail,) = _decide(unet, default, free_gib=1.0)
    assert not chosen and "1.0 GiB free" in detail and "a copy of the weights" in detail
    # Room is counted across the models of one pipeline: the second of two models that fit one at a time does not.
    reserved = {}
    assert _decide(unet, default, free_gib=4.5, reserved=reserved)[0]
    assert not _decide(unet, default, free_gib=4.5, reserved=reserved)[0]
    # What another process cannot reproduce costs a report line, not an error, when nothing was asked for.
    chosen, (detail,) = _decide(unet, OptimizeConfig(quantize="int8-weight-only"))
    assert not chosen and "cannot reproduce quantize='int8-weight-only'" in detail
    chosen, (detail,) = _decide(unet, default, options={"mode": "reduce-overhead", "backend": lambda gm, inputs: gm})
    assert not chosen and "backend is a function" in detail
    # Asked for by name: every such model, memory unchecked, and an error where one cannot.
    assert _decide(unet, OptimizeConfig(background_compile=True), device="cpu", free_gib=0.0, small=100 << 20) == (True, [])
    with pytest.raises(UnsupportedFeatureError, match="backend is a function"):
        _decide(unet, OptimizeConfig(background_compile=True), options={"backend": lambda gm, inputs: gm})
    assert _decide(unet, OptimizeConfig(background_compile=False)) == (False, [])


def test_cpu_models_compile_in_this_process_by_default():
    unet = tiny_unet()
    report = diffopt.optimize(unet, compile=FAST, compile_cache=False)
    assert background_of(unet) is None and not [s for s in report.steps if s.transform == "background_compile"]
    diffopt.restore(unet)


def test_the_loading_thread_sets_up_the_cuda_graph_state_torch_keeps_per_thread(monkeypatch):
    """torch 2.11 finds no CUDA-graph tree state in a thread it did not start, and asserts (newer versions set it up
    on demand, which is patched away here to act the same): the loading thread sets it up itself."""
    import threading

    from torch._inductor import cudagraph_trees

    from diffopt.transforms.background import _own_cuda_graph_trees

    def like_torch_2_11(local):
        raise AssertionError("no CUDA-graph tree state in this thread")

    monkeypatch.setattr(cudagraph_trees, "_initialize_tls", like_torch_2_11, raising=False)
    found = {}

    def thread(setup):
        if setup:
            _own_cuda_graph_trees()
        try:
            found[setup] = cudagraph_trees.get_obj(cudagraph_trees.local, "tree_manager_containers")
        except AssertionError as error:
            found[setup] = error

    for setup in (False, True):
        worker = threading.Thread(target=thread, args=(setup,))
        worker.start()
        worker.join()
    assert isinstance(found[False], AssertionError)  # what the GPU test met, without the setup
    assert isinstance(found[True], dict) and found[True] is not cudagraph_trees.local.tree_manager_containers
