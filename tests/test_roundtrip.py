"""optimize -> restore must give back the pipeline the user had: outputs, weights, processors, strides,
module identity, and not one leftover attribute."""
import pytest
import torch
from conftest import if_pipeline, rel_l2, run_pipeline, sd_pipeline, sdxl_pipeline, tiny_controlnet

import diffopt


def multi_controlnet_pipeline():
    from diffusers import MultiControlNetModel

    return sd_pipeline(controlnet=MultiControlNetModel([tiny_controlnet(), tiny_controlnet()]))


PIPELINES = {
    "sd": sd_pipeline,
    "controlnet": lambda: sd_pipeline(controlnet=tiny_controlnet()),
    "multi-controlnet": multi_controlnet_pipeline,
    "if": if_pipeline,
    "sdxl": sdxl_pipeline,
}


def modules_of(pipe):
    names = ("unet", "transformer", "controlnet", "vae")
    return {name: getattr(pipe, name) for name in names if getattr(pipe, name, None) is not None}


def snapshot(pipe):
    """Everything restore promises to bring back, by value and by identity."""
    snap = {"pipe_attrs": set(vars(pipe))}
    if getattr(pipe, "image_processor", None) is not None:
        snap["image_processor.attrs"] = set(vars(pipe.image_processor))
    for name, module in modules_of(pipe).items():
        snap[name] = module
        snap[f"{name}.state"] = {k: v.clone() for k, v in module.state_dict().items()}
        snap[f"{name}.strides"] = {k: v.stride() for k, v in module.state_dict().items()}
        snap[f"{name}.params"] = [id(p) for p in module.parameters()]
        snap[f"{name}.attrs"] = {n: set(vars(m)) for n, m in module.named_modules()}
        snap[f"{name}.hooks"] = {n: (len(m._forward_pre_hooks), len(m._forward_hooks)) for n, m in module.named_modules()}
        snap[f"{name}.processors"] = {
            n: type(m.processor) for n, m in module.named_modules() if hasattr(m, "set_processor")
        }
    return snap


def assert_same(before, after):
    assert before["pipe_attrs"] == after["pipe_attrs"]
    for key, value in before.items():
        if key.endswith(".state"):
            assert value.keys() == after[key].keys()
            for k in value:
                assert torch.equal(value[k], after[key][k]), k
        elif isinstance(value, torch.nn.Module):
            assert after[key] is value, f"{key} is not the original module object"
        else:
            assert after[key] == value, key


@pytest.mark.parametrize("kind", PIPELINES)
def test_restore_round_trip(kind):
    pipe = PIPELINES[kind]()
    for module in modules_of(pipe).values():
        for net in getattr(module, "nets", [module]):
            if hasattr(net, "set_default_attn_processor"):
                net.set_default_attn_processor()
    eager = run_pipeline(pipe)
    before = snapshot(pipe)

    report = diffopt.optimize(pipe, compile={"backend": "aot_eager"})
    # DeepFloyd IF makes its images without an image processor: nothing to convert on the device there.
    converts = {"device_postprocess"} if getattr(pipe, "image_processor", None) is not None else set()
    assert {s.transform for s in report.applied} == {"attention", "memory_format", "compile"} | converts
    assert diffopt.api.is_optimized(pipe)
    optimized = run_pipeline(pipe)
    assert rel_l2(optimized, eager) < 1e-4

    diffopt.restore(pipe)
    restored = run_pipeline(pipe)
    assert_same(before, snapshot(pipe))
    # Same as a never-optimized pipe on the classic processors, bit for bit, run after run.
    assert torch.equal(restored, eager)
    assert torch.equal(run_pipeline(pipe), restored)


def test_restore_original_gives_back_the_exact_processor_objects():
    pipe = sd_pipeline()
    originals = {n: m.processor for n, m in pipe.unet.named_modules() if hasattr(m, "set_processor")}
    pipe.unet.set_default_attn_processor()
    classic = {n: m.processor for n, m in pipe.unet.named_modules() if hasattr(m, "set_processor")}
    diffopt.optimize(pipe, compile=False)
    assert all(type(p).__name__ == "AttnProcessor2_0" for p in pipe.unet.attn_processors.values())
    diffopt.restore(pipe, attention="original")
    after = {n: m.processor for n, m in pipe.unet.named_modules() if hasattr(m, "set_processor")}
    assert all(after[n] is classic[n] for n in classic)
    assert originals.keys() == after.keys()


def test_restore_default_moves_sdpa_pipe_to_classic_processors():
    pipe = sd_pipeline()  # diffusers' default today is AttnProcessor2_0
    diffopt.optimize(pipe, compile=False)
    diffopt.restore(pipe)
    assert {type(p).__name__ for p in pipe.unet.attn_processors.values()} == {"AttnProcessor"}


def test_restore_on_never_optimized_pipe_is_safe():
    pipe = sd_pipeline()
    pipe.unet.set_default_attn_processor()
    eager = run_pipeline(pipe)
    before = snapshot(pipe)
    report = diffopt.restore(pipe)
    assert not report.applied
    assert_same(before, snapshot(pipe))
    assert torch.equal(run_pipeline(pipe), eager)


def test_bare_models_round_trip():
    from conftest import sd3_inputs, sd3_transformer, tiny_unet, unet_inputs

    for model, inputs in ((tiny_unet(), None), (sd3_transformer(), sd3_inputs())):
        inputs = inputs or unet_inputs(model)
        if hasattr(model, "set_default_attn_processor"):
            try:
                model.set_default_attn_processor()
            except ValueError:  # SD3's joint processors have no classic form
                pass
        with torch.no_grad():
            eager = model(**inputs).sample
        attrs = {n: set(vars(m)) for n, m in model.named_modules()}
        report = diffopt.optimize(model, compile={"backend": "aot_eager"})
        assert any(s.transform == "compile" for s in report.applied)
        with torch.no_grad():
            assert (model(**inputs).sample - eager).abs().max() < 1e-4
        diffopt.restore(model)
        assert {n: set(vars(m)) for n, m in model.named_modules()} == attrs
        with torch.no_grad():
            assert torch.equal(model(**inputs).sample, eager)


def test_transformer_skips_channels_last_with_a_reason():
    from conftest import sd3_transformer

    model = sd3_transformer()
    report = diffopt.optimize(model, compile=False)
    (skip,) = [s for s in report.skipped if s.transform == "memory_format"]
    assert "conv" in skip.detail
    diffopt.restore(model)


def test_save_pretrained_after_compile_writes_clean_weights(tmp_path):
    from safetensors.torch import load_file

    pipe = sd_pipeline()
    diffopt.optimize(pipe, compile={"backend": "aot_eager"})
    run_pipeline(pipe)
    pipe.save_pretrained(tmp_path)
    weights = load_file(str(next((tmp_path / "unet").glob("*.safetensors"))))
    assert weights and not any("_orig_mod" in k for k in weights)
    assert weights.keys() == pipe.unet.state_dict().keys()
    diffopt.restore(pipe)


def test_export_after_restore():
    from conftest import tiny_unet, unet_inputs

    unet = tiny_unet()
    diffopt.optimize(unet, compile={"backend": "aot_eager"})
    diffopt.restore(unet)
    inputs = unet_inputs(unet)
    exported = torch.export.export(unet, (), inputs)
    with torch.no_grad():
        assert torch.allclose(exported.module()(**inputs)[0], unet(**inputs).sample, atol=1e-5)


@pytest.mark.parametrize(
    "name, converted",
    [("sdxl-unet", True), ("sd15-unet", True), ("sd3-medium-transformer", False), ("flux-dev-transformer", False)],
)
def test_channels_last_threshold_splits_the_public_unets_from_the_transformers(name, converted):
    # SDXL's UNet holds only 13% of its weights in convs, yet they are 24% of its FLOPs at 1024 px: the default
    # must convert it (as diffusers' documented torch.compile recipe does, or diffopt would be slower than that recipe)
    # and still skip transformers, whose only conv is a patch embedding.
    from diffopt.transforms.memory_format import MIN_CONV_SHARE_FOR_CHANNELS_LAST
    from diffopt.bench.configs import build_model
    from diffopt.components import conv_share

    share = conv_share(build_model(name, "full", device="meta"))
    assert (share >= MIN_CONV_SHARE_FOR_CHANNELS_LAST) is converted


def test_compile_vae_compiles_the_decoder_matches_eager_and_restore_removes_every_layer():
    from diffopt.api import is_optimized
    from diffopt.layers import layers_of

    pipe = sd_pipeline()
    pipe.unet.set_default_attn_processor()  # restore's default puts every model on the classic processors
    pipe.vae.set_default_attn_processor()
    latents = run_pipeline(pipe)
    with torch.inference_mode():
        eager = pipe.vae.decode(latents).sample
    before = snapshot(pipe)

    report = diffopt.optimize(pipe, compile={"backend": "eager"}, compile_vae=True)
    assert {s.transform for s in report.applied if s.component == "vae.decoder"} == {"attention", "memory_format", "compile"}
    assert "_compiled_call_impl" in vars(pipe.vae.decoder)
    assert "_compiled_call_impl" not in vars(pipe.vae)  # only the decoder: the encoder is not what decode runs
    with torch.inference_mode():
        assert rel_l2(pipe.vae.decode(latents).sample, eager) < 1e-5

    diffopt.restore(pipe)
    assert not is_optimized(pipe)
    assert "_compiled_call_impl" not in vars(pipe.vae.decoder)
    assert not any(layers_of(m) for m in pipe.vae.modules())
    assert_same(before, snapshot(pipe))
    with torch.inference_mode():
        assert torch.equal(pipe.vae.decode(latents).sample, eager)


def test_without_compile_vae_the_vae_is_left_alone():
    pipe = sd_pipeline()
    report = diffopt.optimize(pipe, compile={"backend": "eager"})
    assert not [s for s in report.steps if s.component.startswith("vae")]
    assert "_compiled_call_impl" not in vars(pipe.vae.decoder)
    diffopt.restore(pipe)


def test_memory_format_contiguous_undoes_channels_last_and_restore_gives_it_back():
    from diffopt.layers import layers_of

    pipe = sd_pipeline()
    pipe.unet.to(memory_format=torch.channels_last)
    # 1x1 convs are contiguous in both formats: only the others have anything to convert.
    convs = [p for p in pipe.unet.parameters() if p.dim() == 4 and not p.is_contiguous()]
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
    strides = [p.stride() for p in convs]
    eager = run_pipeline(pipe)

    report = diffopt.optimize(pipe, memory_format="contiguous", compile=False)
    (row,) = [s for s in report.applied if (s.component, s.transform) == ("unet", "memory_format")]
    assert row.detail == f"{len(convs)} 4-D weights -> contiguous"
    assert all(p.is_contiguous() for p in convs)
    assert rel_l2(run_pipeline(pipe), eager) < 1e-5

    diffopt.restore(pipe)
    assert [p.stride() for p in convs] == strides
    assert not layers_of(pipe.unet)


@pytest.mark.parametrize("setting", ["preserve", None])
def test_memory_format_preserve_or_none_touches_no_stride(setting):
    pipe = sd_pipeline()
    pipe.unet.conv_in.to(memory_format=torch.channels_last)  # a mix: neither format throughout
    strides = {k: v.stride() for k, v in pipe.unet.state_dict().items()}
    report = diffopt.optimize(pipe, memory_format=setting, compile=False)
    assert not [s for s in report.steps if s.transform == "memory_format"]
    assert {k: v.stride() for k, v in pipe.unet.state_dict().items()} == strides
    diffopt.restore(pipe)
    assert {k: v.stride() for k, v in pipe.unet.state_dict().items()} == strides


def test_compile_vae_without_compile_leaves_the_decoder_contiguous_unless_named():
    pipe = sd_pipeline()
    report = diffopt.optimize(pipe, compile=False, compile_vae=True)
    (row,) = [s for s in report.steps if (s.component, s.transform) == ("vae.decoder", "memory_format")]
    assert row.status == "skipped" and "eager decoding is slower in channels_last" in row.detail
    assert all(p.is_contiguous() for p in pipe.vae.decoder.parameters())

    report = diffopt.optimize(pipe, compile=False, compile_vae=True, memory_format="channels_last")
    assert ("vae.decoder", "memory_format") in {(s.component, s.transform) for s in report.applied}
    diffopt.restore(pipe)
    assert all(p.is_contiguous() for p in pipe.vae.decoder.parameters())


def test_the_vae_decoder_compiles_without_cuda_graphs_unless_a_mode_is_named(monkeypatch):
    from diffopt.api import _plan
    from diffopt.config import OptimizeConfig
    from diffopt.report import Report
    from diffopt.transforms import compile as compile_transform

    # Plan as on a GPU: only the device decides the default mode, nothing is applied.
    monkeypatch.setattr(compile_transform, "execution_device", lambda module: torch.device("cuda"))
    pipe, real, ctx_options = sd_pipeline(), compile_transform.options_for, {}

    def spy(component, ctx, report=None, per_block=None):
        ctx_options[component.name] = real(component, ctx, report, per_block)
        return ctx_options[component.name]

    monkeypatch.setattr(compile_transform, "options_for", spy)
    for compile_option, vae_mode in ((True, None), ({"mode": "reduce-overhead"}, "reduce-overhead")):
        config = OptimizeConfig.from_options(compile=compile_option, compile_vae=True, cpu_timesteps=False)
        _plan(pipe, config, Report("optimize"))
        assert ctx_options["unet"].get("mode") == "reduce-overhead"
        assert ctx_options["vae.decoder"].get("mode") == vae_mode
