"""attention= names a kernel, and that kernel is the one that runs: eager and compiled, on direct-SDPA models
(UNet, ControlNet, VAE, SD3, PixArt) and on diffusers' attention dispatcher (Flux); restore takes it all back,
the process-wide dispatcher backend included.

On the CPU torch has two SDPA kernels: FlashAttention (aten::_scaled_dot_product_flash_attention_for_cpu, what
plain SDPA picks) and the math reference (aten::_scaled_dot_product_attention_math eager, bmm + softmax once
inductor compiles it). "math" must therefore visibly change what runs; "flash" is proven strict by forcing a kernel
the CPU lacks ("efficient"), which has to raise instead of falling back.
"""
import pytest
import torch
from conftest import CROSS_DIM, SAMPLE, rel_l2, sd3_inputs, sd3_transformer, sd_pipeline, tiny_controlnet, tiny_unet
from conftest import flux_transformer, tiny_vae, transformer_inputs, unet_inputs
from diffusers.models import attention_processor as ap
from test_roundtrip import assert_same, snapshot

import diffopt
from diffopt import capabilities
from diffopt.config import ATTENTION_CHOICES
from diffopt.transforms.attention import attention_modules
from diffopt.transforms.attention_backend import (
    DISPATCHER,
    TORCH_ORDER,
    apply_attention_backend,
    compile_options,
    dispatcher_layers,
    kernel_of,
)

FLASH_OP = "aten::_scaled_dot_product_flash_attention_for_cpu"
MATH_OP = "aten::_scaled_dot_product_attention_math"


def pixart():
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(0)
    return PixArtTransformer2DModel(
        sample_size=8, num_layers=1, attention_head_dim=8, num_attention_heads=2, in_channels=4, out_channels=8,
        cross_attention_dim=16, caption_channels=CROSS_DIM, norm_num_groups=1, patch_size=2,
    ).eval()


def controlnet():
    model = tiny_controlnet()
    torch.manual_seed(2)
    for p in model.controlnet_mid_block.parameters():  # zero-initialized: the output would be zeros
        torch.nn.init.normal_(p, std=0.2)
    return model


def _generator():
    return torch.Generator().manual_seed(0)


def run_unet(model):
    return model(**unet_inputs(model)).sample


def run_controlnet(model):
    g = _generator()
    return model(
        sample=torch.randn(1, 4, SAMPLE, SAMPLE, generator=g), timestep=torch.tensor(500),
        encoder_hidden_states=torch.randn(1, 7, CROSS_DIM, generator=g),
        controlnet_cond=torch.rand(1, 3, SAMPLE * 2, SAMPLE * 2, generator=g),
    ).mid_block_res_sample


def run_vae(model):
    return model(torch.randn(1, 3, SAMPLE * 2, SAMPLE * 2, generator=_generator())).sample


def run_sd3(model):
    return model(**sd3_inputs()).sample


def run_pixart(model):
    g = _generator()
    # A prompt mask, as PixArt pipelines pass it: the cross-attention gets an attention mask.
    return model(
        torch.randn(1, 4, 8, 8, generator=g), encoder_hidden_states=torch.randn(1, 5, CROSS_DIM, generator=g),
        timestep=torch.tensor([10]), added_cond_kwargs={"resolution": None, "aspect_ratio": None},
        encoder_attention_mask=torch.tensor([[1, 1, 1, 0, 0]]),
    ).sample


def run_flux(model):
    return model(**transformer_inputs(model)).sample


MODELS = {
    "unet": (tiny_unet, run_unet),
    "controlnet": (controlnet, run_controlnet),
    "vae": (tiny_vae, run_vae),
    "sd3": (sd3_transformer, run_sd3),
    "pixart": (pixart, run_pixart),
    "flux": (flux_transformer, run_flux),
}


def run(model, forward):
    with torch.no_grad():
        return forward(model)


def ops_of(model, forward):
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        out = run(model, forward)
    return out, {e.key for e in prof.key_averages()}


def model_state(model):
    """What restore must bring back on a bare model: processors (by identity), every attribute of every module
    and processor, weights."""
    layers = attention_modules(model)
    return {
        "processors": [id(m.processor) for _, m in layers],
        "module_attrs": {n: set(vars(m)) for n, m in model.named_modules()},
        "processor_attrs": [dict(vars(m.processor)) for _, m in layers if not isinstance(m.processor, torch.nn.Module)],
        "state": {k: v.clone() for k, v in model.state_dict().items()},
    }


def assert_model_state(before, after):
    for key in ("processors", "module_attrs", "processor_attrs"):
        assert before[key] == after[key], key
    for k, v in before["state"].items():
        assert torch.equal(v, after["state"][k]), k


@pytest.fixture(autouse=True)
def dispatcher_global():
    """Every test leaves diffusers' process-wide active backend as it found it; the tests that claim restore does
    this check it themselves, this only keeps a failing test from poisoning the next."""
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    active = _AttentionBackendRegistry._active_backend
    yield active
    _AttentionBackendRegistry.set_active_backend(active)


def active_backend():
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    return _AttentionBackendRegistry._active_backend


# ---- the requested kernel is the one that runs ---------------------------------------------------------------------


@pytest.mark.parametrize("kernel", ["flash", "math"])
@pytest.mark.parametrize("kind", MODELS)
def test_requested_kernel_runs_eager_and_restore_is_exact(kind, kernel):
    build, forward = MODELS[kind]
    model = build()
    plain, ops = ops_of(model, forward)
    assert FLASH_OP in ops and MATH_OP not in ops  # what SDPA picks on the CPU when left alone
    before = model_state(model)

    report = diffopt.optimize(model, attention=kernel, compile=False, memory_format=None)
    (step,) = [s for s in report.applied if s.transform == "attention"]
    out, ops = ops_of(model, forward)
    if kernel == "flash":
        assert FLASH_OP in ops and MATH_OP not in ops
    else:
        assert MATH_OP in ops and FLASH_OP not in ops
    assert rel_l2(out, plain) < 1e-5  # fidelity against eager SDPA
    if kind == "flux":
        assert DISPATCHER[kernel] in step.detail
        assert active_backend().value == DISPATCHER[kernel]
    else:
        assert "sdpa_kernel" in step.detail
        assert {kernel_of(m) for _, m in attention_modules(model)} == {(f"{kernel.upper()}_ATTENTION",) if kernel == "flash" else ("MATH",)}

    diffopt.restore(model, attention="original")
    assert_model_state(before, model_state(model))
    assert torch.equal(run(model, forward), plain)  # bit for bit the never-optimized model
    assert active_backend().value == "native"


def test_forcing_a_kernel_the_cpu_lacks_raises_instead_of_falling_back():
    # Past the gates on purpose: "efficient" is CUDA-only, so a forced kernel that was silently ignored would run.
    unet = tiny_unet()
    change = apply_attention_backend(unet, "efficient")
    with pytest.raises(RuntimeError, match="No viable backend"):
        run(unet, run_unet)
    change.undo()
    run(unet, run_unet)

    model = flux_transformer()  # the same through diffusers' dispatcher ("_native_efficient")
    change = apply_attention_backend(model, "efficient")
    with pytest.raises(RuntimeError, match="No viable backend"):
        run(model, run_flux)
    change.undo()
    run(model, run_flux)


@pytest.mark.compile
def test_forced_kernel_survives_torch_compile(compile_clean):
    unet = tiny_unet()
    change = apply_attention_backend(unet, "efficient")
    unet.compile(fullgraph=True)
    # Raised while dynamo traces the graph (fake tensors under the forced kernel), so it comes wrapped in dynamo's
    # TorchRuntimeError, a RuntimeError; a kernel dropped by dynamo would trace and run on the CPU's flash kernel.
    with pytest.raises(RuntimeError, match="No viable backend for scaled_dot_product_attention"):
        run(unet, run_unet)  # the forced kernel is traced into the graph, not dropped by dynamo
    change.undo()


@pytest.mark.compile
@pytest.mark.parametrize("kernel", ["math", "flash"])
def test_requested_kernel_runs_compiled(compile_clean, kernel):
    unet = tiny_unet()
    plain = run(unet, run_unet)
    before = model_state(unet)
    report = diffopt.optimize(unet, attention=kernel, memory_format=None)
    (compiled,) = [s for s in report.applied if s.transform == "compile"]
    # inductor would fuse math's matmul-softmax-matmul back into a flash kernel: its pattern matcher is off here.
    assert ("'pattern_matcher': False" in compiled.detail) == (kernel == "math")
    run(unet, run_unet)  # compiles
    with torch._dynamo.config.patch(error_on_recompile=True):
        out, ops = ops_of(unet, run_unet)
    if kernel == "math":
        assert FLASH_OP not in ops and "aten::bmm" in ops
    else:
        assert FLASH_OP in ops and "aten::bmm" not in ops
    assert rel_l2(out, plain) < 1e-5
    diffopt.restore(unet, attention="original")
    assert_model_state(before, model_state(unet))
    assert torch.equal(run(unet, run_unet), plain)


@pytest.mark.compile
def test_dispatcher_kernel_runs_compiled(compile_clean):
    model = flux_transformer()
    plain = run(model, run_flux)
    diffopt.optimize(model, attention="math")
    run(model, run_flux)
    with torch._dynamo.config.patch(error_on_recompile=True):
        out, ops = ops_of(model, run_flux)
    assert FLASH_OP not in ops and "aten::bmm" in ops
    assert rel_l2(out, plain) < 1e-5
    diffopt.restore(model, attention="original")
    assert active_backend().value == "native"
    assert torch.equal(run(model, run_flux), plain)


def test_processors_swapped_after_optimize_still_run_the_kernel():
    # The kernel lives on the attention layer, not in a wrapper processor: set_attn_processor (what adapter loaders
    # do) keeps it, and attn_processors shows real processors.
    unet = tiny_unet()
    diffopt.optimize(unet, attention="math", compile=False)
    assert {type(p) for p in unet.attn_processors.values()} == {ap.AttnProcessor2_0}
    unet.set_attn_processor(ap.AttnProcessor2_0())
    _, ops = ops_of(unet, run_unet)
    assert MATH_OP in ops and FLASH_OP not in ops
    diffopt.restore(unet)
    assert all("forward" not in vars(m) for _, m in attention_modules(unet))


def test_pipeline_round_trip_with_a_kernel():
    from conftest import run_pipeline

    pipe = sd_pipeline()
    pipe.unet.set_default_attn_processor()
    pipe.vae.set_default_attn_processor()

    eager = run_pipeline(pipe)
    before = snapshot(pipe)
    diffopt.optimize(pipe, attention="math", compile=False, compile_vae=True)
    assert {kernel_of(m) for _, m in attention_modules(pipe.vae.decoder)} == {("MATH",)}
    assert rel_l2(run_pipeline(pipe), eager) < 1e-4
    diffopt.restore(pipe)
    assert_same(before, snapshot(pipe))
    assert torch.equal(run_pipeline(pipe), eager)


# ---- diffusers' attention dispatcher --------------------------------------------------------------------------------


def test_diffusers_own_reset_leaves_the_process_wide_backend_and_restore_does_not():
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

    model = flux_transformer()
    model.set_attention_backend("_native_math")
    model.reset_attention_backend()
    assert active_backend().value == "_native_math"  # left behind: what diffopt's undo must not do
    _AttentionBackendRegistry.set_active_backend(AttentionBackendName("native"))
    diffopt.optimize(model, attention="math", compile=False)
    assert active_backend().value == "_native_math"
    diffopt.restore(model)
    assert active_backend().value == "native"


def test_dispatcher_restore_puts_back_a_global_backend_set_before(dispatcher_global):
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

    # As DIFFUSERS_ATTN_BACKEND=_native_math would: the process-wide default, no per-processor setting.
    _AttentionBackendRegistry.set_active_backend(AttentionBackendName("_native_math"))
    model = flux_transformer()
    before = model_state(model)
    diffopt.optimize(model, attention="flash", compile=False)
    assert {m.processor._attention_backend.value for _, m in dispatcher_layers(model)} == {"_native_flash"}
    diffopt.restore(model)
    assert active_backend().value == "_native_math"
    assert_model_state(before, model_state(model))  # no _attention_backend left on a processor


def test_sdpa_left_at_default_keeps_the_users_dispatcher_backend_and_named_replaces_it():
    model = flux_transformer()
    model.set_attention_backend("_native_math")
    report = diffopt.optimize(model, compile=False)
    assert {m.processor._attention_backend.value for _, m in dispatcher_layers(model)} == {"_native_math"}
    assert not [s for s in report.applied if s.transform == "attention"]
    report = diffopt.optimize(model, attention="sdpa", compile=False)
    assert {m.processor._attention_backend.value for _, m in dispatcher_layers(model)} == {"native"}
    (step,) = [s for s in report.applied if s.transform == "attention"]
    assert "'native'" in step.detail and "was _native_math" in step.detail
    diffopt.restore(model)
    assert {m.processor._attention_backend.value for _, m in dispatcher_layers(model)} == {"_native_math"}
    assert active_backend().value == "_native_math"


def test_flex_on_the_dispatcher_calls_flex_attention(monkeypatch):
    import torch.nn.attention.flex_attention as flex_module

    calls = []
    real = flex_module.flex_attention

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(flex_module, "flex_attention", counting)
    model = flux_transformer()
    plain = run(model, run_flux)
    diffopt.optimize(model, attention="flex", compile=False)
    out = run(model, run_flux)
    assert len(calls) == len(dispatcher_layers(model))
    assert rel_l2(out, plain) < 1e-5
    diffopt.restore(model)
    calls.clear()
    assert torch.equal(run(model, run_flux), plain) and not calls


# ---- errors ----------------------------------------------------------------------------------------------------------


def test_attention_names_come_from_one_table():
    from diffopt import attention_names
    from diffopt.transforms import attention as family_transform
    from diffopt.transforms import attention_backend

    # The order error messages and the docs list them in.
    assert ATTENTION_CHOICES == (
        "sdpa", "default", "flash", "cudnn", "efficient", "math", "flex", "sage", "xformers", "auto", None
    )
    # Every other list of names is the table's, not a copy that could drift from it.
    assert attention_backend.KERNELS is attention_names.KERNELS
    assert attention_backend.DISPATCHER is attention_names.DISPATCHER
    assert attention_backend.DISPATCHER_ONLY is attention_names.DISPATCHER_ONLY
    assert family_transform.FAMILIES is attention_names.FAMILIES
    assert set(attention_names.KERNELS.values()) == set(TORCH_ORDER)  # "auto" reorders exactly torch's kernels
    assert {f for kinds in family_transform.PROCESSORS.values() for f in kinds} <= set(attention_names.FAMILIES)
    for picks in capabilities.AUTO_ATTENTION.values():  # "auto" picks a forced kernel, else plain SDPA
        assert picks[-1] == "sdpa" and set(picks[:-1]) <= set(attention_names.KERNELS)


def test_every_attention_choice_has_its_own_gate():
    # A name the gates do not know must not pass as if it needed nothing.
    from diffopt.attention_names import TABLE

    cpu = torch.device("cpu")
    for row in TABLE:
        assert capabilities.attention_backend(row.name, cpu, torch.float32).feature.lower().startswith(row.name)
    with pytest.raises(ValueError, match="no capability gate for attention backend 'flash2'"):
        capabilities.attention_backend("flash2", cpu, torch.float32)


def test_config_and_the_names_table_import_no_torch():
    import ast
    from pathlib import Path

    import diffopt.attention_names
    import diffopt.config

    for module in (diffopt.config, diffopt.attention_names):
        tree = ast.parse(Path(module.__file__).read_text())
        imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        imported |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and not n.level}
        assert not {name.split(".")[0] for name in imported} & {"torch", "diffusers"}, module.__name__


def test_unknown_attention_lists_every_choice():
    unet = tiny_unet()
    before = model_state(unet)
    with pytest.raises(ValueError) as info:
        diffopt.optimize(unet, attention="flash2")
    for choice in ATTENTION_CHOICES:
        assert repr(choice) in str(info.value)
    assert_model_state(before, model_state(unet))


@pytest.mark.parametrize(
    "kind, attention, words",
    [
        ("pipe", "efficient", ["attention='efficient'", "CUDA device", "cpu float32"]),
        ("pipe", "cudnn", ["attention='cudnn'", "CUDA device"]),
        ("pipe", "sage", ["attention='sage'", "sageattention package", "not installed"]),
        ("pipe", "xformers", ["attention='xformers'", "xformers package"]),
        ("pipe", "flex", ["attention='flex'", "dispatcher", "AttnProcessor2_0", "F.scaled_dot_product_attention"]),
        ("sd3", "flex", ["dispatcher", "JointAttnProcessor2_0"]),
        ("flux", "sage", ["sageattention"]),
        ("flux", "xformers", ["xformers"]),
        ("flux", "efficient", ["CUDA device"]),
    ],
)
def test_missing_backend_is_an_error_naming_what_is_missing(kind, attention, words):
    target = {"pipe": sd_pipeline, "sd3": sd3_transformer, "flux": flux_transformer}[kind]()
    model = target.unet if kind == "pipe" else target
    before = model_state(model)
    with pytest.raises(diffopt.UnsupportedFeatureError) as info:
        diffopt.optimize(target, attention=attention, compile_vae=True)
    for word in words:
        assert word in str(info.value)
    assert_model_state(before, model_state(model))
    assert not diffopt.api.is_optimized(target)


def test_context_parallel_model_needs_a_backend_that_supports_it():
    # What enable_parallelism leaves on the processors; set_attention_backend would refuse "_native_math" half-way.
    model = flux_transformer()
    for _, attn in dispatcher_layers(model):
        attn.processor._parallel_config = object()
    before = model_state(model)
    with pytest.raises(diffopt.UnsupportedFeatureError, match="context parallelism"):
        diffopt.optimize(model, attention="math", compile=False)
    assert_model_state(before, model_state(model))
    report = diffopt.optimize(model, attention="flash", compile=False)  # _native_flash supports it
    assert [s for s in report.applied if s.transform == "attention"]
    diffopt.restore(model)


def test_flex_missing_from_torch(monkeypatch):
    real = capabilities.importlib.util.find_spec
    monkeypatch.setattr(
        capabilities.importlib.util, "find_spec", lambda name: None if name.endswith("flex_attention") else real(name)
    )
    with pytest.raises(diffopt.UnsupportedFeatureError, match="flex_attention"):
        diffopt.optimize(flux_transformer(), attention="flex", compile=False)


@pytest.mark.parametrize(
    "name, capability, dtype, ok, words",
    [
        ("flash", (9, 0), torch.bfloat16, True, []),
        ("flash", (8, 0), torch.float16, True, []),
        ("flash", (7, 5), torch.float16, False, ["compute capability >= 8.0", "cuda sm75 float16"]),
        ("flash", (9, 0), torch.float32, False, ["float16/bfloat16", "cuda sm90 float32"]),
        ("cudnn", (9, 0), torch.bfloat16, True, []),
        ("cudnn", (7, 5), torch.bfloat16, False, ["compute capability >= 8.0"]),
        ("efficient", (7, 5), torch.float32, True, []),
        ("math", (6, 0), torch.float32, True, []),
    ],
)
def test_cuda_gates(monkeypatch, name, capability, dtype, ok, words):
    monkeypatch.setattr(capabilities, "cuda_capability", lambda device: capability)
    monkeypatch.setattr(torch.backends.cudnn, "is_available", lambda: True)
    gate = capabilities.attention_backend(name, torch.device("cuda"), dtype)
    assert gate.ok == ok
    for word in words:
        assert word in gate.reason


# ---- auto -------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "device, capability, dtype, picked",
    [
        ("cuda", (9, 0), torch.bfloat16, "cudnn" if torch.backends.cudnn.is_available() else "flash"),
        ("cuda", (8, 0), torch.float16, "flash"),
        ("cuda", (9, 0), torch.float32, "sdpa"),
        ("cuda", (7, 5), torch.float16, "sdpa"),
        ("cpu", None, torch.float32, "sdpa"),
        ("cpu", None, torch.bfloat16, "sdpa"),
    ],
)
def test_auto_table(monkeypatch, device, capability, dtype, picked):
    monkeypatch.setattr(capabilities, "cuda_capability", lambda d: capability)
    assert capabilities.auto_attention(torch.device(device), dtype)[0] == picked


def test_auto_falls_back_to_classic_processors_without_sdpa(monkeypatch):
    monkeypatch.setattr(capabilities, "sdpa", lambda: capabilities.Gate("SDPA attention", False, "torch >= 2.0", "1.13"))
    assert capabilities.auto_attention(torch.device("cpu"), torch.float32)[0] == "default"


def test_auto_says_what_it_picked():
    unet = tiny_unet()
    report = diffopt.optimize(unet, attention="auto", compile=False)
    (step,) = [s for s in report.applied if s.transform == "attention"]
    assert step.detail.startswith("auto -> sdpa (cpu float32)")
    unet.set_default_attn_processor()
    report = diffopt.optimize(unet, attention="auto", compile=False)
    (step,) = [s for s in report.applied if s.transform == "attention"]
    assert "AttnProcessor -> AttnProcessor2_0" in step.detail


@pytest.mark.parametrize("kind", ["unet", "flux"])
def test_auto_prefers_a_kernel_and_falls_back_where_it_cannot_run(monkeypatch, kind):
    # Pretend the table says "efficient" for this CPU: auto makes it the first choice, never the only one, so the
    # model still runs (torch falls back), unlike attention="efficient", which raises (test above).
    monkeypatch.setitem(capabilities.AUTO_ATTENTION, "cpu", ("efficient", "sdpa"))
    real = capabilities.attention_backend
    monkeypatch.setattr(
        capabilities, "attention_backend",
        lambda name, device, dtype: capabilities.Gate("efficient", True) if name == "efficient" else real(name, device, dtype),
    )
    build, forward = MODELS[kind]
    model = build()
    plain = run(model, forward)
    report = diffopt.optimize(model, attention="auto", compile=False)
    (step,) = [s for s in report.applied if s.transform == "attention"]
    assert step.detail.startswith("auto -> efficient")
    assert {kernel_of(m) for _, m in attention_modules(model)} == {("EFFICIENT_ATTENTION",) + tuple(
        k for k in TORCH_ORDER if k != "EFFICIENT_ATTENTION")}
    assert rel_l2(run(model, forward), plain) < 1e-5
    diffopt.restore(model, attention="original")
    assert torch.equal(run(model, forward), plain)
    assert active_backend().value == "native"


def test_none_leaves_attention_as_it_is():
    unet = tiny_unet()
    unet.set_default_attn_processor()
    report = diffopt.optimize(unet, attention=None, compile=False)
    assert not [s for s in report.steps if s.transform == "attention"]
    assert {type(p) for p in unet.attn_processors.values()} == {ap.AttnProcessor}


# ---- compile options for math ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "attention, options, expected",
    [
        ("math", {"fullgraph": True}, {"fullgraph": True, "options": {"pattern_matcher": False}}),
        ("math", {"mode": "reduce-overhead", "fullgraph": True},
         {"fullgraph": True, "options": {"triton.cudagraphs": True, "pattern_matcher": False}}),
        ("math", {"options": {"max_autotune": True}}, {"options": {"max_autotune": True, "pattern_matcher": False}}),
        ("math", {"backend": "aot_eager"}, {"backend": "aot_eager"}),
        ("flash", {"mode": "reduce-overhead"}, {"mode": "reduce-overhead"}),
    ],
)
def test_compile_options_keep_math(attention, options, expected):
    assert compile_options(attention, options) == expected
