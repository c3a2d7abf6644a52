"""Bad input is rejected before anything changes, with messages that name the value and the choices;
version gates skip with a reason or raise when the user named the option."""
import pytest
import torch
from conftest import rel_l2, run_pipeline, sd_pipeline, tiny_unet
from packaging.version import Version
from test_roundtrip import assert_same, snapshot

import diffopt
from diffopt import capabilities


@pytest.fixture
def pipe():
    p = sd_pipeline()
    p.unet.set_default_attn_processor()
    return p


@pytest.mark.parametrize(
    "options, error, words",
    [
        (dict(attention="fast"), ValueError, ["'fast'", "'sdpa'", "'default'", "'xformers'"]),
        (dict(attention=2), TypeError, ["2", "'sdpa'"]),
        (dict(memory_format="nhwc"), ValueError, ["'nhwc'", "'channels_last'"]),
        (dict(compile="yes"), TypeError, ["'yes'", "dict"]),
        (dict(compile={"mode": "turbo"}), ValueError, ["'turbo'", "'reduce-overhead'"]),
        (dict(compile={"fullgrph": True}), ValueError, ["fullgrph", "fullgraph"]),
        (dict(compile={"dynamic": 1}), ValueError, ["compile['dynamic']", "1", "True, False or None"]),
        (dict(compile={"options": {"max_autotun": True}}), ValueError, ["'max_autotun'", "'max_autotune'", "list_options"]),
        (dict(compile={"backend": "inductr"}), ValueError, ["compile['backend']", "'inductr'", "'aot_eager'"]),
        (dict(compile={"backend": 3}), TypeError, ["compile['backend']", "3", "compiler function"]),
        (dict(compile_vae="no"), TypeError, ["'no'"]),
        (dict(compile_blocks="no"), TypeError, ["compile_blocks", "'no'"]),
        (dict(compile_blocks=True), ValueError, ["compile_blocks=True", "UNet2DConditionModel.down_blocks"]),
        (dict(dynamic_batch=True, compile=False), ValueError, ["dynamic_batch=True", "compile=False"]),
        (dict(dynamic_batch=True, compile={"dynamic": False}), ValueError, ["dynamic_batch=True", "'dynamic': False"]),
        (dict(background_compile="yes"), TypeError, ["background_compile", "'yes'", "True, False or None"]),
        (dict(background_compile=True, compile=False), ValueError, ["background_compile=True", "compile=False"]),
        (dict(background_compile=True, quantize="int8"), ValueError, ["background_compile=True", "quantize='int8'"]),
        (dict(background_compile=True, cache="deepcache"), ValueError, ["background_compile=True", "cache='deepcache'"]),
        (dict(atention="sdpa"), TypeError, ["atention", "attention"]),
    ],
)
def test_bad_options_raise_before_anything_changes(pipe, options, error, words):
    before = snapshot(pipe)
    with pytest.raises(error) as info:
        diffopt.optimize(pipe, **options)
    for word in words:
        assert word in str(info.value)
    assert_same(before, snapshot(pipe))


@pytest.mark.parametrize("target", [object(), torch.nn.Linear(2, 2), "pipe", None])
def test_non_pipeline_targets_are_type_errors(target):
    with pytest.raises(TypeError, match="DiffusionPipeline"):
        diffopt.optimize(target)
    with pytest.raises(TypeError, match="DiffusionPipeline"):
        diffopt.restore(target)


def test_restore_rejects_unknown_attention_mode(pipe):
    with pytest.raises(ValueError, match="'original'"):
        diffopt.restore(pipe, attention="sdpa")


def fake_versions(monkeypatch, **versions):
    real = capabilities.installed_version
    monkeypatch.setattr(
        capabilities, "installed_version", lambda pkg: Version(versions[pkg]) if pkg in versions else real(pkg)
    )


@pytest.mark.parametrize(
    "package, version, option, value",
    [
        ("torch", "1.13.1", "attention", "sdpa"),
        ("diffusers", "0.13.0", "attention", "sdpa"),
        ("torch", "1.13.1", "compile", True),
        ("torch", "2.1.2", "compile", True),
    ],
)
def test_gates_skip_defaults_and_raise_when_named(monkeypatch, pipe, package, version, option, value):
    fake_versions(monkeypatch, **{package: version})
    before = snapshot(pipe)
    # Left at its default: skipped, with the versions in the reason.
    report = diffopt.optimize(pipe, **({} if option == "attention" else {"attention": None}))
    (skip,) = [s for s in report.skipped if s.transform == option]
    assert f"{package} {version}" in skip.detail and ">=" in skip.detail
    diffopt.restore(pipe, attention="original")
    assert_same(before, snapshot(pipe))
    # Named explicitly: an error naming found and required versions, and nothing changed.
    with pytest.raises(diffopt.UnsupportedFeatureError) as info:
        diffopt.optimize(pipe, **{option: value})
    assert f"{package} {version}" in str(info.value) and ">=" in str(info.value)
    assert_same(before, snapshot(pipe))


def test_xformers_missing_is_an_error(monkeypatch, pipe):
    monkeypatch.setattr(capabilities.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(diffopt.UnsupportedFeatureError, match="xformers"):
        diffopt.optimize(pipe, attention="xformers", compile=False)


def test_failure_half_way_undoes_applied_steps(monkeypatch, pipe):
    from diffopt.transforms import compile as compile_transform

    eager = run_pipeline(pipe)
    before = snapshot(pipe)

    def broken_compile(module, options, *extras):
        raise RuntimeError("compile exploded")

    monkeypatch.setattr(compile_transform, "apply_compile", broken_compile)
    with pytest.raises(RuntimeError, match="compile exploded"):
        diffopt.optimize(pipe)
    assert_same(before, snapshot(pipe))
    assert torch.equal(run_pipeline(pipe), eager)


def test_failed_second_call_leaves_the_first_optimization(monkeypatch, pipe):
    from diffopt.transforms import compile as compile_transform

    diffopt.optimize(pipe, compile=False)
    optimized = snapshot(pipe)
    monkeypatch.setattr(compile_transform, "apply_compile", lambda m, o, *extras: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):
        diffopt.optimize(pipe, compile=True)
    monkeypatch.undo()
    after = snapshot(pipe)
    assert after["unet.processors"] == optimized["unet.processors"]
    assert after["unet.strides"] == optimized["unet.strides"]


def test_an_unknown_backend_leaves_a_compiled_pipeline_compiled(pipe):
    diffopt.optimize(pipe, compile={"backend": "eager"})
    compiled = pipe.unet._compiled_call_impl
    with pytest.raises(ValueError, match="inductr"):
        diffopt.optimize(pipe, compile={"backend": "inductr"})
    assert pipe.unet._compiled_call_impl is compiled  # not taken off and compiled again


def test_second_call_reconciles_instead_of_stacking(pipe):
    diffopt.optimize(pipe, compile={"backend": "aot_eager"})
    first = pipe.unet._compiled_call_impl
    report = diffopt.optimize(pipe, memory_format=None, compile={"backend": "eager"})
    assert pipe.unet._compiled_call_impl is not first
    # The compiled call wraps the module's own eager call, never the previous compiled one: one compile layer.
    from diffopt.layers import layers_of
    from diffopt.transforms.compile import CompiledCall

    assert [layer for layer in layers_of(pipe.unet) if isinstance(layer, CompiledCall)] == [pipe.unet._compiled_call_impl]
    assert "eager" in str(report) and not any(s.transform == "memory_format" for s in report.steps)
    assert pipe.unet.conv_in.weight.is_contiguous()
    diffopt.restore(pipe)
    assert "_compiled_call_impl" not in vars(pipe.unet)


def test_user_compiled_module_is_left_alone():
    unet = tiny_unet()
    unet.compile(backend="eager")
    user_compiled = unet._compiled_call_impl
    report = diffopt.optimize(unet)
    assert any(s.transform == "compile" and "already compiled" in s.detail for s in report.skipped)
    diffopt.restore(unet)
    assert unet._compiled_call_impl is user_compiled


def test_config_object_and_explicit_options():
    config = diffopt.OptimizeConfig(compile=False, attention="default")
    assert diffopt.OptimizeConfig.from_options(config).explicit == {"compile", "attention"}
    merged = diffopt.OptimizeConfig.from_options(config, memory_format=None)
    assert merged.memory_format is None and merged.attention == "default"
    with pytest.raises(TypeError, match="OptimizeConfig"):
        diffopt.optimize(tiny_unet(), {"compile": False})


def test_report_prints_a_table(pipe):
    report = diffopt.optimize(pipe, compile=False)
    text = str(report)
    assert "component" in text and "unet" in text and "channels_last" in text
    assert report.to_dict()["steps"][0]["component"] == "unet"


def test_import_changes_nothing_global():
    import subprocess
    import sys

    code = """
import torch, torch._dynamo.config as d, torch._inductor.config as i
before = (repr(i.get_config_copy()), repr(d.get_config_copy()), torch.backends.cudnn.benchmark,
          torch.backends.cuda.matmul.allow_tf32, torch.get_float32_matmul_precision())
import diffopt
after = (repr(i.get_config_copy()), repr(d.get_config_copy()), torch.backends.cudnn.benchmark,
         torch.backends.cuda.matmul.allow_tf32, torch.get_float32_matmul_precision())
print("SAME" if before == after else "CHANGED")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().endswith("SAME"), out.stdout + out.stderr


def test_cuda_default_mode_gives_way_to_options_and_other_backends(monkeypatch, pipe):
    from diffopt.transforms import compile as compile_transform

    monkeypatch.setattr(compile_transform, "default_options", lambda device: {"mode": "reduce-overhead", "fullgraph": True})
    report = diffopt.optimize(pipe, compile={"backend": "aot_eager"})
    (step,) = [s for s in report.applied if s.transform == "compile"]
    assert "mode" not in step.detail and "aot_eager" in step.detail
    report = diffopt.optimize(pipe, compile={"backend": "aot_eager", "mode": "reduce-overhead"})
    assert "reduce-overhead" in [s for s in report.applied if s.transform == "compile"][0].detail
    diffopt.restore(pipe)
    with pytest.raises(ValueError, match="mode.*options|options.*mode"):
        diffopt.optimize(pipe, compile={"mode": "default", "options": {"freezing": True}})


@pytest.mark.parametrize(
    "options, graphs, without",
    [
        ({"mode": "reduce-overhead", "fullgraph": True}, True, {"fullgraph": True}),
        ({"mode": "max-autotune"}, True, {"mode": "max-autotune-no-cudagraphs"}),  # it records CUDA graphs too
        ({"options": {"triton.cudagraphs": True, "freezing": True}}, True,
         {"options": {"triton.cudagraphs": False, "freezing": True}}),
        ({"mode": "max-autotune-no-cudagraphs"}, False, {"mode": "max-autotune-no-cudagraphs"}),
        ({"mode": "default"}, False, {"mode": "default"}),
    ],
)
def test_which_options_record_cuda_graphs_and_the_same_without_them(options, graphs, without):
    from diffopt.transforms.compile import uses_cuda_graphs, without_cuda_graphs

    assert uses_cuda_graphs(options) is graphs
    assert without_cuda_graphs(options) == without and not uses_cuda_graphs(without)


@pytest.mark.parametrize("nets", [1, 2])
def test_first_controlnet_starts_a_cuda_graph_step_on_every_call(monkeypatch, nets):
    # diffusers marks each step only for OptimizedModule wrappers; in-place compiled ControlNets must do it
    # themselves, once per step: the second net of a MultiControlNet must not free the first net's residuals.
    from conftest import tiny_controlnet
    from diffusers import MultiControlNetModel

    from diffopt.transforms import compile as compile_transform

    controlnet = tiny_controlnet() if nets == 1 else MultiControlNetModel([tiny_controlnet() for _ in range(nets)])
    pipe = sd_pipeline(controlnet=controlnet)
    eager = run_pipeline(pipe, steps=3)
    monkeypatch.setattr(compile_transform, "default_options", lambda device: {"mode": "reduce-overhead", "fullgraph": True, "backend": "aot_eager"})
    marks = []
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))
    report = diffopt.optimize(pipe)
    details = {s.component: s.detail for s in report.applied if s.transform == "compile"}
    first = "controlnet" if nets == 1 else "controlnet.nets.0"
    assert "new CUDA-graph step per call" in details[first] and "reduce-overhead" in details[first]
    assert not any("new CUDA-graph step" in d for c, d in details.items() if c != first)
    assert rel_l2(run_pipeline(pipe, steps=3), eager) < 1e-4  # channels_last reorders the conv sums
    assert len(marks) == 3  # one per denoising step
    diffopt.optimize(pipe, compile={"backend": "aot_eager"})  # no CUDA graphs: nothing to mark
    marks.clear()
    run_pipeline(pipe, steps=3)
    assert marks == []
    diffopt.optimize(pipe, compile={"backend": "aot_eager", "mode": "max-autotune"})  # CUDA graphs again
    marks.clear()
    run_pipeline(pipe, steps=3)
    assert len(marks) == 3
    diffopt.restore(pipe)


@pytest.mark.parametrize(
    "options, takes, ignoring_backend",
    [
        ({}, True, True),
        ({"backend": "inductor", "fullgraph": True}, True, True),
        ({"options": {"triton.cudagraphs": False}}, False, False),
        ({"backend": "aot_eager"}, False, True),  # passed on to the backend, which ignores it: not an error
    ],
)
def test_takes_mode_is_torch_compiles_rule(options, takes, ignoring_backend):
    from diffopt.config import takes_mode

    assert takes_mode(options) is takes
    assert takes_mode(options, ignore_backend=True) is ignoring_backend


def test_mode_and_inductor_options_together_are_refused_and_a_mode_for_another_backend_is_not():
    with pytest.raises(ValueError, match="either 'mode' or 'options', not both"):
        diffopt.OptimizeConfig(compile={"mode": "max-autotune", "options": {"epilogue_fusion": True}})
    diffopt.OptimizeConfig(compile={"mode": "max-autotune", "backend": "aot_eager"})
    diffopt.OptimizeConfig(compile={"mode": None, "options": {"epilogue_fusion": True}})
