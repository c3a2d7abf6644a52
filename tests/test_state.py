"""The record of what optimize changed lives on the objects it changed, so it follows them: shared components,
deep copies and pickles; and an optimize that fails or is interrupted leaves nothing behind."""
import copy
import pickle
import threading

import pytest
import torch
from conftest import run_pipeline, sd_pipeline, tiny_unet, unet_inputs
from test_roundtrip import assert_same, snapshot

import diffopt
from diffopt.api import is_optimized
from diffopt.layers import layers_of


def eager_pipe():
    pipe = sd_pipeline()
    pipe.unet.set_default_attn_processor()
    return pipe


def leftovers(pipe):
    """Every trace of diffopt on the pipeline and what it holds: layers, instance-level forwards and hooks."""
    found = [name for name, m in pipe.unet.named_modules() if "forward" in vars(m) or layers_of(m)]
    found += sorted({"set_timesteps", "step", "_diffopt_layers"} & set(vars(pipe.scheduler)))
    found += sorted({"progress_bar", "maybe_free_model_hooks", "_diffopt_layers"} & set(vars(pipe)))
    found += sorted({"postprocess", "_diffopt_layers"} & set(getattr(getattr(pipe, "image_processor", None), "__dict__", {})))
    return found


@pytest.mark.parametrize("order", ["same", "reverse"])
def test_pipelines_sharing_components_optimize_and_restore_in_any_order(order):
    from diffusers import StableDiffusionImg2ImgPipeline

    pipe = eager_pipe()
    eager = run_pipeline(pipe)
    other = StableDiffusionImg2ImgPipeline.from_pipe(pipe)
    assert other.unet is pipe.unet and other.scheduler is pipe.scheduler
    diffopt.optimize(pipe, cache="deepcache", compile=False)
    diffopt.optimize(other, cache="deepcache", compile=False)
    assert not torch.equal(run_pipeline(pipe), eager)  # the shared UNet is cached for both
    for target in (pipe, other) if order == "same" else (other, pipe):
        diffopt.restore(target)
    assert leftovers(pipe) == [] and leftovers(other) == []
    assert torch.equal(run_pipeline(pipe), eager)
    assert diffopt.restore(pipe).applied == []  # nothing left to undo


@pytest.mark.parametrize("other_optimized", [False, True])
def test_a_failed_optimize_puts_back_the_optimization_of_a_pipeline_sharing_its_components(monkeypatch, other_optimized):
    from diffusers import StableDiffusionImg2ImgPipeline

    from diffopt.transforms import compile as compile_transform

    pipe = eager_pipe()
    other = StableDiffusionImg2ImgPipeline.from_pipe(pipe)
    if other_optimized:  # optimized last, so the shared UNet holds its options
        diffopt.optimize(pipe, compile=False, memory_format="contiguous")
    diffopt.optimize(other if other_optimized else pipe, compile=False)
    before, cached = snapshot(pipe), snapshot(other)
    monkeypatch.setattr(compile_transform, "apply_compile", lambda m, o, *extras, **kw: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):
        diffopt.optimize(pipe if other_optimized else other, compile=True)
    monkeypatch.undo()
    # The shared UNet is still optimized, as both pipelines had it: SDPA processors, channels_last weights.
    assert_same(before, snapshot(pipe))
    assert_same(cached, snapshot(other))
    diffopt.restore(pipe)
    diffopt.restore(other)
    assert leftovers(pipe) == [] and leftovers(other) == []


def test_restore_keeps_the_decoder_processors_when_compile_vae_changed_nothing_on_it():
    pipe = eager_pipe()
    processors = {name: type(p) for name, p in pipe.vae.attn_processors.items()}
    report = diffopt.optimize(pipe, compile=False, compile_vae=True)
    assert not [s for s in report.applied if s.component == "vae.decoder"]
    report = diffopt.restore(pipe)
    assert not [s for s in report.steps if s.component == "vae.decoder"]
    assert {name: type(p) for name, p in pipe.vae.attn_processors.items()} == processors
    assert not any(layers_of(m) for m in pipe.vae.modules())


def test_a_deep_copy_is_an_independent_optimized_pipeline():
    pipe = eager_pipe()
    eager = run_pipeline(pipe)
    diffopt.optimize(pipe, cache="deepcache", compile=False)
    cached = run_pipeline(pipe)
    twin = copy.deepcopy(pipe)
    assert torch.equal(run_pipeline(twin), cached)
    with torch.no_grad():
        for parameter in twin.unet.parameters():
            parameter.zero_()
    assert not torch.equal(run_pipeline(twin), cached)  # the copy runs its own blocks
    assert torch.equal(run_pipeline(pipe), cached)  # and the original its own
    diffopt.restore(twin)
    assert leftovers(twin) == [] and is_optimized(pipe)
    assert all(p.is_contiguous() for p in twin.unet.parameters())
    diffopt.restore(pipe)
    assert torch.equal(run_pipeline(pipe), eager)


def test_a_deep_copy_of_a_compiled_pipeline_runs_compiled_and_restores(compile_clean):
    from diffopt.transforms.compile import CompiledCall

    pipe = eager_pipe()
    eager = run_pipeline(pipe)
    diffopt.optimize(pipe, compile={"backend": "eager", "fullgraph": True})
    compiled = run_pipeline(pipe)
    twin = copy.deepcopy(pipe)
    call = vars(twin.unet).get("_compiled_call_impl")
    assert isinstance(call, CompiledCall) and call.module is twin.unet and call in layers_of(twin.unet)
    assert call is not vars(pipe.unet)["_compiled_call_impl"]
    assert torch.equal(run_pipeline(twin), compiled) and call.calls > 0  # the copy runs through its own compiled call
    assert twin.unet.config is not None and dict(pipe.unet.config) == dict(twin.unet.config)
    diffopt.restore(twin)
    assert leftovers(twin) == [] and "_compiled_call_impl" not in vars(twin.unet) and is_optimized(pipe)
    diffopt.restore(pipe)
    assert torch.equal(run_pipeline(pipe), eager)


def test_a_config_with_compile_options_copies_and_pickles():
    from diffopt.config import FrozenOptions, OptimizeConfig

    config = OptimizeConfig(compile={"backend": "eager", "options": {"max_autotune": False}})
    for twin in (copy.copy(config), copy.deepcopy(config), pickle.loads(pickle.dumps(config))):
        assert twin == config and type(twin.compile) is FrozenOptions
        with pytest.raises(TypeError, match="read-only"):
            twin.compile["mode"] = "default"


def test_pickle_carries_the_optimization_and_refuses_compiled_code():
    pipe = eager_pipe()
    eager = run_pipeline(pipe)
    diffopt.optimize(pipe, cache="deepcache", compile=False)
    cached = run_pipeline(pipe)
    loaded = pickle.loads(pickle.dumps(pipe))
    assert torch.equal(run_pipeline(loaded), cached)
    diffopt.restore(loaded)
    assert leftovers(loaded) == [] and torch.equal(run_pipeline(loaded), eager)

    diffopt.optimize(pipe, compile={"backend": "eager"})
    with pytest.raises(TypeError, match=r"restore\(pipe\) before pickling"):
        pickle.dumps(pipe)


@pytest.mark.parametrize("interrupt", [KeyboardInterrupt, RuntimeError])
def test_an_interrupted_optimize_leaves_nothing_behind(monkeypatch, interrupt):
    from diffopt.transforms import cache

    pipe = eager_pipe()
    eager = run_pipeline(pipe)
    before = snapshot(pipe)

    def interrupted(*args, **kwargs):  # after attention, memory format and the scheduler hooks were applied
        raise interrupt("stop")

    monkeypatch.setattr(cache, "apply_deepcache", interrupted)
    with pytest.raises(interrupt):
        diffopt.optimize(pipe, cache="deepcache", compile=False)
    assert_same(before, snapshot(pipe))
    assert leftovers(pipe) == [] and not is_optimized(pipe)
    assert torch.equal(run_pipeline(pipe), eager)


def test_a_processor_setter_failing_half_way_switches_no_layer(monkeypatch):
    from diffusers.models.attention_processor import Attention

    pipe = eager_pipe()
    before = snapshot(pipe)
    original, calls = Attention.set_processor, []

    def flaky(self, processor):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original(self, processor)

    monkeypatch.setattr(Attention, "set_processor", flaky)
    with pytest.raises(KeyboardInterrupt):
        diffopt.optimize(pipe, compile=False)
    monkeypatch.undo()
    assert_same(before, snapshot(pipe))


def test_restore_keeps_what_it_could_not_undo_and_can_be_retried(monkeypatch):
    from diffopt.transforms.memory_format import MemoryFormat

    pipe = eager_pipe()
    eager = run_pipeline(pipe)
    diffopt.optimize(pipe, compile=False)
    original = MemoryFormat.undo

    def failing(self, owner):
        raise OSError("device busy")

    monkeypatch.setattr(MemoryFormat, "undo", failing)
    with pytest.raises(OSError, match="device busy"):
        diffopt.restore(pipe)
    assert [type(layer).__name__ for layer in layers_of(pipe.unet)] == ["MemoryFormat"]
    monkeypatch.setattr(MemoryFormat, "undo", original)
    report = diffopt.restore(pipe)
    assert [(s.component, s.transform) for s in report.applied][0] == ("unet", "memory_format")
    assert leftovers(pipe) == [] and torch.equal(run_pipeline(pipe), eager)


def test_quantized_layers_restore_after_a_cast_and_to_meta():
    pytest.importorskip("torchao")
    pipe = eager_pipe()
    diffopt.optimize(pipe, compile=False, quantize="int8-weight-only")
    pipe.to(torch.bfloat16)
    diffopt.restore(pipe)
    assert {p.dtype for p in pipe.unet.parameters()} == {torch.bfloat16}
    run_pipeline(pipe)  # the restored weights match the activations: no dtype mismatch

    unet = tiny_unet()
    diffopt.optimize(unet, compile=False, quantize="int8-weight-only")
    unet.to("meta")
    diffopt.restore(unet)
    assert not is_optimized(unet)
    assert all(type(p) is torch.nn.Parameter and p.device.type == "meta" for p in unet.parameters())


def test_state_dict_after_quantize_and_fused_projections_is_the_original_checkpoint(tmp_path):
    pytest.importorskip("torchao")
    unet = tiny_unet()
    original = {k: v.clone() for k, v in unet.state_dict().items()}
    rng = torch.random.get_rng_state()
    diffopt.optimize(unet, compile=False, memory_format=None, fuse_projections=True)
    assert torch.equal(torch.random.get_rng_state(), rng)  # fusing draws nothing from the user's random stream
    assert unet.state_dict().keys() == original.keys()
    diffopt.optimize(unet, compile=False, memory_format=None, quantize="int8")
    state = unet.state_dict()
    assert state.keys() == original.keys()
    assert all(type(v) is torch.Tensor and torch.equal(v, original[k]) for k, v in state.items())
    unet.save_pretrained(tmp_path)  # safetensors can write it
    diffopt.restore(unet)


def test_compile_options_are_copied_and_frozen():
    options = {"backend": "eager"}
    config = diffopt.OptimizeConfig(compile=options)
    options["mode"] = "nonsense"
    assert dict(config.compile) == {"backend": "eager"}
    with pytest.raises(TypeError, match="read-only"):
        config.compile["mode"] = "max-autotune"


def test_model_offload_runs_outside_the_compiled_forward():
    accelerate = pytest.importorskip("accelerate")
    unet = tiny_unet()
    inputs = unet_inputs(unet)
    with torch.no_grad():
        eager = unet(**inputs).sample
    hook_calls = []
    unet, hook = accelerate.cpu_offload_with_hook(unet, execution_device="cpu")
    pre_forward = unet._hf_hook.pre_forward
    unet._hf_hook.pre_forward = lambda module, *a, **k: hook_calls.append(1) or pre_forward(module, *a, **k)
    report = diffopt.optimize(unet, compile={"backend": "eager"})
    assert [s.transform for s in report.applied if s.transform == "compile"] == ["compile"]
    with torch.no_grad():
        assert torch.allclose(unet(**inputs).sample, eager, atol=1e-5)
    assert hook_calls  # accelerate's hook ran, in eager code, around the compiled forward
    diffopt.restore(unet)
    assert not is_optimized(unet)


def test_sequential_offload_skips_compile_with_the_reason_or_refuses_when_named():
    accelerate = pytest.importorskip("accelerate")
    unet = tiny_unet()
    accelerate.cpu_offload(unet, execution_device="cpu")
    report = diffopt.optimize(unet)
    (skip,) = [s for s in report.skipped if s.transform == "compile"]
    assert "sequential CPU offload" in skip.detail and "enable_model_cpu_offload" in skip.detail
    diffopt.restore(unet)
    with pytest.raises(diffopt.UnsupportedFeatureError, match="sequential CPU offload.*compile=False"):
        diffopt.optimize(unet, compile=True)
    assert not is_optimized(unet)


def test_a_cached_model_refuses_a_second_thread_during_a_call():
    pipe = eager_pipe()
    diffopt.optimize(pipe, cache="deepcache", compile=False)
    inputs = unet_inputs(pipe.unet)
    errors = []

    def other_thread():
        try:
            with torch.no_grad():
                pipe.unet(**inputs)
        except RuntimeError as error:
            errors.append(str(error))

    # What every pipeline call does: progress_bar at its start, maybe_free_model_hooks at its end.
    pipe.progress_bar(total=1)
    worker = threading.Thread(target=other_thread)
    worker.start()
    worker.join()
    pipe.maybe_free_model_hooks()
    assert errors and "another thread" in errors[0]
    with torch.no_grad():
        pipe.unet(**inputs)  # between calls any thread may run it


def test_sequential_offload_added_after_optimize_runs_uncompiled_with_a_warning(caplog):
    import logging

    accelerate = pytest.importorskip("accelerate")
    unet = tiny_unet()
    inputs = unet_inputs(unet)
    with torch.no_grad():
        eager = unet(**inputs).sample
    diffopt.optimize(unet, compile={"backend": "eager"}, memory_format=None)
    accelerate.cpu_offload(unet, execution_device="cpu")
    with torch.no_grad(), caplog.at_level(logging.WARNING, logger="diffopt"):
        out = unet(**inputs).sample
        unet(**inputs)
    assert torch.allclose(out, eager, atol=1e-5)
    warnings = [r.getMessage() for r in caplog.records if "running it uncompiled" in r.getMessage()]
    assert len(warnings) == 1 and "sequential CPU offload" in warnings[0]
    assert not any(name.startswith("_diffopt") and name != "_diffopt_layers" for name in vars(unet))
