"""quantize=: opt-in torchao quantization of the denoiser's Linear layers. Validation and gates, the layer
filter, fidelity against the unquantized model, the exact round trip, and compile on top of it."""
import os
import subprocess
import sys

import pytest
import torch
from conftest import (
    if_unet, rel_l2, run_pipeline, sd_pipeline, sdxl_unet, tiny_controlnet, tiny_unet, unet_inputs,
)
from test_roundtrip import assert_same, snapshot

import diffopt
from diffopt import capabilities
from diffopt.config import QUANTIZE_CHOICES
from diffopt.transforms import quantize as quantize_transform

INT8_MODES = ("int8", "int8-weight-only")
TORCHAO = capabilities.quantize("int8", "cpu")
needs_torchao = pytest.mark.skipif(not TORCHAO.ok, reason=TORCHAO.reason)
FP8_SKIP = "fp8 needs a CUDA GPU of compute capability >= 8.9; on this machine only its gate can be tested"
# The fidelity bound asserted for int8 on the tiny UNet (relative L2 of the UNet output against the unquantized
# model). Symmetric per-row int8 rounds each weight to 1 of 255 levels spanning +-max|row|: for a row of
# Gaussian weights (max ~ 3.5 sigma) that is a relative RMS error of 3.5 / 127 / sqrt(12) ~ 0.8% per layer,
# and per-token activation rounding (int8) adds as much again. Residual connections add each block's error to
# a stream it does not scale, so the whole UNet should move by no more than one layer's rounding: 1e-2.
# Measured on this tiny UNet: ~4e-3 (int8) and ~2e-3 (int8-weight-only), torchao 0.17.0, fp32, CPU.
INT8_BOUND = 1e-2
# On CUDA in bfloat16 the unquantized reference itself rounds to 8 mantissa bits (0.4% per op), on top of int8's
# rounding: measured 1.4e-2 on an H200 (torch 2.11, torchao 0.17.0). The bf16 bound doubles the fp32 one.
INT8_BF16_BOUND = 2e-2
# fp8 (e4m3) keeps 3 mantissa bits: rounding moves a value by up to 2^-4 relative, ~2.5% RMS per layer for
# weights and activations together; the same residual argument gives 5e-2 for the whole UNet.
FP8_BOUND = 5e-2


def quantized_weights(module):
    return [m for m in module.modules() if isinstance(m, torch.nn.Linear) and type(m.weight) is not torch.nn.Parameter]


def classic_sd_controlnet_pipeline():
    pipe = sd_pipeline(controlnet=tiny_controlnet())
    pipe.unet.set_default_attn_processor()
    pipe.controlnet.set_default_attn_processor()
    return pipe


# --- validation and gates: no torchao needed -------------------------------------------------------------


def test_choices_are_the_transform_modes():
    assert set(QUANTIZE_CHOICES) - {None} == set(quantize_transform.MODES)


@pytest.mark.parametrize("value, error", [("int4", ValueError), ("FP8", ValueError), (8, TypeError), (True, TypeError)])
def test_bad_quantize_value_names_value_and_choices_and_touches_nothing(value, error):
    pipe = classic_sd_controlnet_pipeline()
    before = snapshot(pipe)
    with pytest.raises(error) as raised:
        diffopt.optimize(pipe, quantize=value)
    message = str(raised.value)
    assert repr(value) in message and "'int8-weight-only'" in message and "'fp8'" in message
    assert_same(before, snapshot(pipe))


def test_importing_diffopt_does_not_import_torchao():
    code = "import sys, diffopt; assert 'torchao' not in sys.modules, 'torchao imported'"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


@pytest.mark.parametrize("installed, found", [(None, "not installed"), ("0.14.1", "torchao 0.14.1")])
def test_missing_or_old_torchao_is_an_error_naming_it(monkeypatch, installed, found):
    from packaging.version import Version

    monkeypatch.setattr(capabilities, "torchao_version", lambda: installed and Version(installed))
    pipe = classic_sd_controlnet_pipeline()
    before = snapshot(pipe)
    with pytest.raises(diffopt.UnsupportedFeatureError) as raised:
        diffopt.optimize(pipe, quantize="int8", compile=False)
    assert f"torchao >= {capabilities.TORCHAO_MINIMUM}" in str(raised.value) and found in str(raised.value)
    assert_same(before, snapshot(pipe))


def test_fp8_on_cpu_is_an_error_naming_the_missing_capability_and_touches_nothing():
    pipe = classic_sd_controlnet_pipeline()
    eager = run_pipeline(pipe)
    before = snapshot(pipe)
    with pytest.raises(diffopt.UnsupportedFeatureError) as raised:
        diffopt.optimize(pipe, quantize="fp8")
    assert "compute capability >= 8.9" in str(raised.value) and "found" in str(raised.value)
    assert "on cpu" in str(raised.value)
    assert_same(before, snapshot(pipe))
    assert torch.equal(run_pipeline(pipe), eager)
    with pytest.raises(diffopt.UnsupportedFeatureError):
        diffopt.quantization_error(pipe.unet, unet_inputs(pipe.unet), "fp8")


def test_quantization_error_of_a_pipeline_names_the_model_it_takes():
    pipe = sd_pipeline()
    with pytest.raises(TypeError, match="one model .*pipe.unet.*got StableDiffusionPipeline"):
        diffopt.quantization_error(pipe, unet_inputs(pipe.unet))


# --- which layers ---------------------------------------------------------------------------------------


def _names(model, mode="int8"):
    chosen, skipped = quantize_transform.select_layers(model, mode)
    return [name for name, _ in chosen], skipped


@pytest.mark.parametrize("builder", [tiny_unet, sdxl_unet, if_unet])
def test_filter_keeps_per_sample_conditioning_and_narrow_layers(builder):
    model = builder()
    chosen, skipped = _names(model)
    conditioning = [
        n for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and ("embedding" in n or n.endswith("time_emb_proj"))
    ]  # fmt: skip
    assert conditioning and not set(conditioning) & set(chosen)
    assert skipped[quantize_transform.CONDITIONING] == len(conditioning)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert len(chosen) + sum(skipped.values()) == len(linears)
    assert any(n.endswith("to_q") for n in chosen) and any(n.endswith("to_out.0") for n in chosen)
    for name in chosen:
        linear = model.get_submodule(name)
        assert min(linear.in_features, linear.out_features) >= quantize_transform.MIN_FEATURES


def test_filter_on_a_transformer_keeps_adaln_modulation_and_the_output_projection():
    from diffusers import SD3Transformer2DModel

    # conftest's SD3 is 16 wide, under MIN_FEATURES; 32 wide here, so that its blocks qualify.
    model = SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, caption_projection_dim=32, pooled_projection_dim=32, out_channels=4,
    )
    chosen, skipped = _names(model)
    assert "proj_out" not in chosen and skipped[quantize_transform.OUTPUT] == 1
    assert not [n for n in chosen if ".norm" in n or n.startswith("norm_out") or n.startswith("time_text_embed")]
    assert any(n.endswith("attn.to_q") for n in chosen) and any(".ff." in n for n in chosen)


def test_fp8_filter_needs_features_in_multiples_of_16():
    model = tiny_unet(cross_attention_dim=40)  # cross-attention to_k / to_v: 40 -> 32 features
    int8, _ = _names(model, "int8")
    fp8, skipped = _names(model, "fp8")
    unaligned = [n for n in int8 if n.endswith(("attn2.to_k", "attn2.to_v"))]
    assert unaligned and not set(unaligned) & set(fp8)
    assert set(fp8) == set(int8) - set(unaligned)
    assert skipped[quantize_transform.UNALIGNED.format(16)] == len(unaligned)


def test_a_model_with_nothing_worth_quantizing_is_skipped_with_the_reason():
    # 16 channels: every attention and feed-forward input is narrower than MIN_FEATURES.
    unet = tiny_unet(block_out_channels=(16, 16), cross_attention_dim=16, norm_num_groups=4, attention_head_dim=4)
    if not TORCHAO.ok:
        pytest.skip(TORCHAO.reason)
    report = diffopt.optimize(unet, quantize="int8-weight-only", compile=False)
    (step,) = [s for s in report.steps if s.transform == "quantize"]
    assert step.status == "skipped" and "no Linear layer worth quantizing" in step.detail
    assert quantize_transform.NARROW in step.detail and not quantized_weights(unet)
    diffopt.restore(unet)


def test_a_float64_model_is_skipped_with_the_reason_instead_of_failing_in_torchao():
    unet = tiny_unet().to(torch.float64)
    if not TORCHAO.ok:
        pytest.skip(TORCHAO.reason)
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    for mode in INT8_MODES:
        report = diffopt.optimize(unet, quantize=mode, compile=False)
        (step,) = [s for s in report.steps if s.transform == "quantize"]
        assert step.status == "skipped" and quantize_transform.DTYPE in step.detail and not quantized_weights(unet)
    diffopt.restore(unet)
    assert all(torch.equal(value, unet.state_dict()[key]) for key, value in before.items())


# --- fidelity and round trip (torchao, CPU) -----------------------------------------------------------------


@needs_torchao
@pytest.mark.parametrize("builder", [tiny_unet, sdxl_unet])
def test_int8_fidelity_bound_and_weight_only_is_closer(builder):
    unet = builder()
    inputs = unet_inputs(unet, batch=2)
    state = {k: v.clone() for k, v in unet.state_dict().items()}
    parameters = list(unet.parameters())
    errors = {mode: diffopt.quantization_error(unet, inputs, mode) for mode in INT8_MODES}
    for mode, error in errors.items():
        assert 1e-5 < error < INT8_BOUND, (mode, error)  # it did quantize, and within the documented bound
    # Both round the weights the same way; int8 also rounds every activation.
    assert errors["int8-weight-only"] < errors["int8"]
    # The helper put the model back: same Parameters, same bits, nothing left on the layers.
    assert all(a is b for a, b in zip(parameters, unet.parameters()))
    assert all(torch.equal(v, unet.state_dict()[k]) for k, v in state.items())
    assert not [m for m in unet.modules() if "extra_repr" in vars(m)]


@needs_torchao
@pytest.mark.parametrize("mode", INT8_MODES)
def test_quantize_round_trip(mode):
    pipe = classic_sd_controlnet_pipeline()
    eager = run_pipeline(pipe)
    before = snapshot(pipe)
    parameters = {name: list(getattr(pipe, name).parameters()) for name in ("unet", "controlnet", "vae")}

    report = diffopt.optimize(pipe, quantize=mode, compile=False)
    steps = {s.component: s for s in report.steps if s.transform == "quantize"}
    assert set(steps) == {"unet", "controlnet"} and all(s.status == "applied" for s in steps.values())
    for name, step in steps.items():
        count = len(quantized_weights(getattr(pipe, name)))
        assert count > 0 and f"{count} of " in step.detail, step.detail
    assert not quantized_weights(pipe.vae)  # the VAE is never quantized
    quantized = run_pipeline(pipe)
    assert not torch.equal(quantized, eager)

    diffopt.restore(pipe)
    assert_same(before, snapshot(pipe))  # state_dict bit for bit, strides, module identity, attributes
    for name, params in parameters.items():
        now = list(getattr(pipe, name).parameters())
        assert len(now) == len(params) and all(a is b for a, b in zip(params, now)), name
        assert all(type(p) is torch.nn.Parameter for p in now)
    assert not [m for m in pipe.unet.modules() if "extra_repr" in vars(m)]
    assert torch.equal(run_pipeline(pipe), eager)


@needs_torchao
def test_optimize_again_replaces_the_quantization_instead_of_stacking():
    unet = tiny_unet()
    unet.set_default_attn_processor()
    inputs = unet_inputs(unet)
    with torch.no_grad():
        reference = unet(**inputs).sample
    parameters = list(unet.parameters())
    diffopt.optimize(unet, quantize="int8", compile=False)
    first = len(quantized_weights(unet))
    diffopt.optimize(unet, quantize="int8-weight-only", compile=False)
    assert len(quantized_weights(unet)) == first
    assert {type(m.weight.act_quant_kwargs) for m in quantized_weights(unet)} == {type(None)}  # weight-only now
    diffopt.optimize(unet, compile=False)  # no quantize: back to the original weights
    assert not quantized_weights(unet)
    assert all(a is b for a, b in zip(parameters, unet.parameters()))
    diffopt.restore(unet)
    with torch.no_grad():
        assert torch.equal(unet(**inputs).sample, reference)


@needs_torchao
def test_a_failure_half_way_puts_every_layer_back(monkeypatch):
    pipe = classic_sd_controlnet_pipeline()
    eager = run_pipeline(pipe)
    before = snapshot(pipe)
    real, calls = quantize_transform.torchao_config, []
    fail_at = len(quantize_transform.select_layers(pipe.unet, "int8")[0]) + 5

    def fail_on_the_fifth_layer_of_the_controlnet(mode, dtype):
        calls.append(1)
        if len(calls) == fail_at:  # every UNet layer went through, then the ControlNet fails
            raise RuntimeError("torchao failed")
        return real(mode, dtype)

    monkeypatch.setattr(quantize_transform, "torchao_config", fail_on_the_fifth_layer_of_the_controlnet)
    with pytest.raises(RuntimeError, match="torchao failed"):
        diffopt.optimize(pipe, quantize="int8", compile=False)
    assert len(calls) == fail_at
    assert not diffopt.api.is_optimized(pipe)
    assert not quantized_weights(pipe.unet) and not quantized_weights(pipe.controlnet)
    assert not [m for m in pipe.unet.modules() if "extra_repr" in vars(m)]
    assert_same(before, snapshot(pipe))
    assert torch.equal(run_pipeline(pipe), eager)


# --- compile on top of quantization ------------------------------------------------------------------------


@needs_torchao
@pytest.mark.compile
def test_int8_quantized_unet_compiles_and_matches_eager_quantized(compile_clean):
    """Dynamo traces through torchao's Int8Tensor: with aot_eager (no kernel changes) the compiled output is the
    eager quantized output bit for bit. Inductor reorders float arithmetic (1e-6 relative on the unquantized
    UNet), and dynamic int8 activation quantization turns a value that lands on the other side of a rounding
    boundary into a whole quantization step, so against eager int8 it differs on the scale of the int8 error
    itself: we assert the int8 bound there, and that it is no farther from the unquantized model than that."""
    unet = tiny_unet()
    unet.set_default_attn_processor()  # what restore puts back
    inputs = unet_inputs(unet)
    with torch.no_grad():
        reference = unet(**inputs).sample
    diffopt.optimize(unet, quantize="int8", compile=False)
    with torch.no_grad():
        eager_int8 = unet(**inputs).sample

    diffopt.optimize(unet, quantize="int8", compile={"backend": "aot_eager"})
    with torch.no_grad():
        assert torch.equal(unet(**inputs).sample, eager_int8)

    torch.compiler.reset()
    report = diffopt.optimize(unet, quantize="int8")  # inductor, fullgraph: diffopt's CPU defaults
    assert [s.status for s in report.steps if s.transform in ("quantize", "compile")] == ["applied", "applied"]
    with torch.no_grad():
        compiled = unet(**inputs).sample
        with torch._dynamo.config.patch(error_on_recompile=True):
            again = unet(**inputs).sample
    assert torch.equal(again, compiled)
    assert rel_l2(compiled, eager_int8) < INT8_BOUND
    assert rel_l2(compiled, reference) < INT8_BOUND
    diffopt.restore(unet)
    with torch.no_grad():
        assert torch.equal(unet(**inputs).sample, reference)


# --- GPU only ------------------------------------------------------------------------------------------------


def _fp8_gate():
    if not torch.cuda.is_available():
        return FP8_SKIP + " (no CUDA device)"
    gate = capabilities.quantize("fp8", "cuda")
    return "" if gate.ok else f"{FP8_SKIP} ({gate.reason})"


@pytest.mark.gpu
@pytest.mark.parametrize("mode, bound", [("fp8", FP8_BOUND), ("int8", INT8_BF16_BOUND)])
def test_gpu_quantize_moves_originals_off_the_gpu_and_back(mode, bound):
    reason = _fp8_gate() if mode == "fp8" else ("" if torch.cuda.is_available() else "needs a CUDA device")
    if not reason and not TORCHAO.ok:
        reason = TORCHAO.reason
    if reason:
        pytest.skip(reason)
    # bfloat16: the dtype torchao's per-row fp8 scales need.
    unet = tiny_unet(block_out_channels=(64, 128), cross_attention_dim=64).to("cuda", torch.bfloat16)
    unet.set_default_attn_processor()  # what restore puts back
    inputs = {k: v.to("cuda", torch.bfloat16 if v.is_floating_point() else v.dtype) for k, v in unet_inputs(unet).items()}
    state = {k: v.clone() for k, v in unet.state_dict().items()}
    parameters = list(unet.parameters())
    with torch.no_grad():
        reference = unet(**inputs).sample
    torch.cuda.synchronize()
    allocated = torch.cuda.memory_allocated()

    report = diffopt.optimize(unet, quantize=mode, compile=False)
    (step,) = [s for s in report.steps if s.transform == "quantize"]
    assert step.status == "applied" and "moved to cpu" in step.detail
    quantized = quantized_weights(unet)
    assert quantized and all(m._parameters["weight"].device.type == "cuda" for m in quantized)
    originals = [p for p in parameters if p.device.type == "cpu"]
    assert len(originals) == len(quantized)  # exactly the quantized layers' weights wait on the CPU
    assert torch.cuda.memory_allocated() < allocated  # 8-bit copies replaced the 16-bit weights on the GPU
    with torch.no_grad():
        assert rel_l2(unet(**inputs).sample, reference) < bound

    diffopt.restore(unet)
    assert all(a is b for a, b in zip(parameters, unet.parameters()))
    assert all(p.device.type == "cuda" for p in unet.parameters())
    assert all(torch.equal(v, unet.state_dict()[k]) for k, v in state.items())
    with torch.no_grad():
        assert torch.equal(unet(**inputs).sample, reference)


# --- diffopt bench --------------------------------------------------------------------------------------------


def test_bench_quantize_presets_and_specs():
    from diffopt.bench.recipes import resolve

    assert resolve("diffopt-int8").options == {"quantize": "int8"}
    assert resolve("diffopt-int8-weight-only").options == {"quantize": "int8-weight-only"}
    assert resolve("diffopt-fp8").options == {"quantize": "fp8"} and resolve("diffopt-fp8").compiles
    assert resolve("diffopt:quantize=fp8,compile=False").options == {"quantize": "fp8", "compile": False}


@pytest.fixture
def bench_settings():
    from diffopt.bench.measure import CellSettings

    # oneDNN compiles a kernel per new convolution shape: seconds on a small CPU, milliseconds without it.
    with torch.backends.mkldnn.flags(enabled=False):
        yield CellSettings(size="tiny", device=torch.device("cpu"), dtype=torch.float32, steps=1, warmup=1, repeats=1)


@needs_torchao
def test_bench_quantized_cell_reports_relative_l2_and_psnr(bench_settings):
    from diffopt.bench.measure import measure_cell, probe
    from diffopt.bench.recipes import resolve

    # (test_bench_run checks that the sdpa cell matches this reference: rel. L2 ~ 0, PSNR > 60 dB.)
    (reference,) = probe("sd-txt2img", [1], bench_settings)
    assert reference.error is None and reference.stages[0].image is not None
    cell = measure_cell("sd-txt2img", 1, resolve("diffopt:quantize=int8,compile=False"), bench_settings, reference)
    assert cell.ok, cell.error
    assert any("int8 dynamic activation" in note for note in cell.notes)
    (stage,) = cell.stages
    assert stage.relative_l2 > 1e-5 and 0 < stage.psnr_db < float("inf")


def test_bench_fp8_cell_on_cpu_records_the_missing_capability(bench_settings):
    from diffopt.bench.measure import measure_cell
    from diffopt.bench.recipes import resolve

    cell = measure_cell("sd-txt2img", 1, resolve("diffopt-fp8"), bench_settings)
    assert cell.status == "error" and "UnsupportedFeatureError in recipe" in cell.error
    assert "compute capability >= 8.9" in cell.error and not cell.stages


def test_filter_keeps_tied_weights():
    unet = tiny_unet()
    attn = unet.mid_block.attentions[0].transformer_blocks[0].attn1
    attn.to_k.weight = attn.to_q.weight  # tied: parking one would move the other's weight too
    chosen, skipped = _names(unet)
    tied = {f"mid_block.attentions.0.transformer_blocks.0.attn1.{n}" for n in ("to_q", "to_k")}
    assert not tied & set(chosen) and "mid_block.attentions.0.transformer_blocks.0.attn1.to_v" in chosen
    assert skipped[quantize_transform.SHARED] == 2
