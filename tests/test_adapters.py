"""LoRA and IP-Adapter on optimized pipelines: loading, mixing, fusing, unloading and hot-swapping work
before and after optimize, show in the output exactly as on a pipeline never optimized, and survive restore.

The adapters are made here with random weights and saved locally with safetensors (``_adapters.py``)."""
import logging

import pytest
import torch
from _adapters import image_embeds, save_ip_adapter, save_lora
from conftest import flux_pipeline, flux_transformer, rel_l2, run_pipeline, run_sd, sd_pipeline

import diffopt
from diffopt.transforms.fuse_projections import lora_projections

# Captured by dynamo with fullgraph (guards, recompiles and graph breaks are all real) but run by the eager
# backend, without inductor's minutes of code generation on a CPU; the inductor test is the hot-swap one.
TRACE = {"backend": "eager"}
CLOSE = 1e-5  # optimized vs never optimized, float32

# Dynamo caches graphs per code object, across pipes: a fresh start per test keeps the recompile limit away.
pytestmark = pytest.mark.usefixtures("compile_clean")


@pytest.fixture(scope="module")
def loras(tmp_path_factory):
    pytest.importorskip("peft")
    directory = tmp_path_factory.mktemp("loras")
    return {name: save_lora(directory, seed, name=f"{name}.safetensors") for name, seed in (("a", 1), ("b", 2))}


def both(*pipes, call):
    """Run ``call`` on each pipe: the optimized one and its never-optimized reference get the same treatment."""
    for pipe in pipes:
        call(pipe)


@pytest.fixture(scope="module")
def flux_loras(tmp_path_factory):
    pytest.importorskip("peft")
    from diffusers import FluxPipeline

    directory = tmp_path_factory.mktemp("flux_loras")
    return {
        name: save_lora(directory, seed, f"{name}.safetensors", model=flux_transformer(), pipeline_class=FluxPipeline)
        for name, seed in (("a", 1), ("b", 2))
    }


@pytest.mark.compile
def test_lora_lifecycle_on_a_compiled_pipe_matches_the_unoptimized_one(flux_loras):
    # The breakage users report: a LoRA loaded, re-weighted or fused after compile that the compiled graph
    # never sees. Every step below must reach the output, exactly as on a pipe never optimized.
    pipe, reference = flux_pipeline(), flux_pipeline()
    base = run_pipeline(reference)
    pipe.load_lora_weights(flux_loras["a"], adapter_name="a")  # one loaded before optimize
    reference.load_lora_weights(flux_loras["a"], adapter_name="a")
    diffopt.optimize(pipe, compile=TRACE)

    def check(label, differs_from_base=True):
        expected = run_pipeline(reference)
        assert rel_l2(run_pipeline(pipe), expected) < CLOSE, label
        assert (rel_l2(expected, base) > 1e-2) == differs_from_base, label
        return expected

    only_a = check("a, loaded before optimize")
    both(pipe, reference, call=lambda p: p.load_lora_weights(flux_loras["b"], adapter_name="b"))
    mixed = check("b loaded after optimize")
    assert rel_l2(mixed, only_a) > 1e-3
    both(pipe, reference, call=lambda p: p.set_adapters(["a", "b"], adapter_weights=[0.5, 1.5]))
    weighted = check("set_adapters with weights")
    assert rel_l2(weighted, mixed) > 1e-3
    both(pipe, reference, call=lambda p: p.fuse_lora(lora_scale=0.7))
    check("fuse_lora")
    both(pipe, reference, call=lambda p: p.unfuse_lora())
    check("unfuse_lora")
    diffopt.restore(pipe)  # keeps both adapters and their weights
    assert set(pipe.transformer.peft_config) == {"a", "b"}
    check("restored")
    diffopt.optimize(pipe, compile=TRACE)
    both(pipe, reference, call=lambda p: p.unload_lora_weights())
    check("unload_lora_weights", differs_from_base=False)
    assert not lora_projections(pipe.transformer)
    diffopt.restore(pipe)


def test_load_fuse_unfuse_and_unload_on_an_optimized_unet(loras):
    # Eager: what optimize changes besides compile (SDPA processors, channels_last weights) under the LoRA calls.
    pipe, reference = sd_pipeline(), sd_pipeline()
    base = run_pipeline(reference)
    diffopt.optimize(pipe, compile=False)
    steps = [  # set_adapters and several adapters: see the Flux test above
        lambda p: p.load_lora_weights(loras["a"], adapter_name="a"),
        lambda p: p.fuse_lora(lora_scale=0.7),
        lambda p: p.unfuse_lora(),
    ]
    for index, step in enumerate(steps):
        both(pipe, reference, call=step)
        expected = run_pipeline(reference)
        assert rel_l2(run_pipeline(pipe), expected) < CLOSE, index
        assert rel_l2(expected, base) > 1e-2, index
    both(pipe, reference, call=lambda p: p.unload_lora_weights())
    assert rel_l2(run_pipeline(pipe), base) < CLOSE


@pytest.mark.parametrize("attention", ["default", "original"])
def test_restore_keeps_loaded_loras(loras, attention):
    pipe, reference = sd_pipeline(), sd_pipeline()
    pipe.load_lora_weights(loras["a"], adapter_name="a")  # one before optimize
    diffopt.optimize(pipe, compile=False)
    pipe.load_lora_weights(loras["b"], adapter_name="b")  # one after
    pipe.set_adapters(["a", "b"], adapter_weights=[1.0, 0.5])
    diffopt.restore(pipe, attention=attention)

    assert set(pipe.unet.peft_config) == {"a", "b"} and lora_projections(pipe.unet)
    assert "_compiled_call_impl" not in vars(pipe.unet)
    both(reference, call=lambda p: p.load_lora_weights(loras["a"], adapter_name="a"))
    both(reference, call=lambda p: p.load_lora_weights(loras["b"], adapter_name="b"))
    reference.set_adapters(["a", "b"], adapter_weights=[1.0, 0.5])
    if attention == "default":
        reference.unet.set_default_attn_processor()
    # Eager again, original strides, same processors: the never-optimized pipe's numbers. (Not bit for bit:
    # on a busy CPU, MKL's thread count, and with it the summation order, may differ between two calls.)
    assert rel_l2(run_pipeline(pipe), run_pipeline(reference)) < 1e-6


# Loaded after optimize, the adapter's processors replace the compiled ones: traced (once) to show the
# compiled UNet picks them up. Loaded before, eager suffices: the processors are the same either way.
@pytest.mark.parametrize(
    "when, compile",
    [("before", False), pytest.param("after", TRACE, marks=pytest.mark.compile)],
    ids=["before", "after"],
)
def test_ip_adapter_loaded_before_or_after_optimize_matches_the_unoptimized_pipe(tmp_path, when, compile):
    pipe, reference = sd_pipeline(), sd_pipeline()
    options = save_ip_adapter(tmp_path, reference.unet)
    reference.load_ip_adapter(**options)
    expected = run_sd(reference, ip_adapter_image_embeds=image_embeds())
    assert rel_l2(expected, run_sd(reference, ip_adapter_image_embeds=image_embeds(seed=6))) > 1e-2

    if when == "before":
        pipe.load_ip_adapter(**options)
    diffopt.optimize(pipe, compile=compile)
    if when == "after":
        run_pipeline(pipe)
        pipe.load_ip_adapter(**options)
    assert rel_l2(run_sd(pipe, ip_adapter_image_embeds=image_embeds()), expected) < CLOSE

    both(pipe, reference, call=lambda p: p.set_ip_adapter_scale(0.3))
    expected = run_sd(reference, ip_adapter_image_embeds=image_embeds())
    assert rel_l2(run_sd(pipe, ip_adapter_image_embeds=image_embeds()), expected) < CLOSE

    diffopt.restore(pipe)
    assert "IPAdapterAttnProcessor" in {type(p).__name__ for p in pipe.unet.attn_processors.values()}
    assert rel_l2(run_sd(pipe, ip_adapter_image_embeds=image_embeds()), expected) < CLOSE

    both(pipe, reference, call=lambda p: p.unload_ip_adapter())
    assert rel_l2(run_pipeline(pipe), run_pipeline(reference)) < CLOSE


def test_ip_adapter_loaded_after_optimize_replaced_the_processors_survives_restore_original(tmp_path):
    # optimize swaps the classic processors for SDPA ones; load_ip_adapter then replaces those. Undoing
    # optimize must not put the classic processors back over the adapter's.
    pipe = sd_pipeline()
    pipe.unet.set_default_attn_processor()
    diffopt.optimize(pipe, compile=False)
    pipe.load_ip_adapter(**save_ip_adapter(tmp_path, pipe.unet))
    expected = run_sd(pipe, ip_adapter_image_embeds=image_embeds())
    adapter = {n: p for n, p in pipe.unet.attn_processors.items() if "IPAdapter" in type(p).__name__}
    diffopt.restore(pipe, attention="original")
    assert all(pipe.unet.attn_processors[n] is p for n, p in adapter.items())
    # The self-attention layers are back on the classic processors: same attention, other rounding.
    assert rel_l2(run_sd(pipe, ip_adapter_image_embeds=image_embeds()), expected) < CLOSE


def test_lora_loaded_into_fused_projections_is_refused_not_ignored(loras):
    pipe, reference = sd_pipeline(), sd_pipeline()
    diffopt.optimize(pipe, fuse_projections=True, compile=False)
    pipe.load_lora_weights(loras["a"], adapter_name="a")
    with pytest.raises(RuntimeError, match="LoRA was loaded into UNet2DConditionModel after its QKV projections"):
        run_pipeline(pipe)

    # Asking to fuse again names the LoRA and changes nothing; optimizing without fusing unfuses and works.
    wrapped = len(lora_projections(pipe.unet))  # q, k and v of every attention layer
    assert wrapped == 3 * len(pipe.unet.attn_processors)
    with pytest.raises(diffopt.UnsupportedFeatureError, match=f"fuse_projections: .*LoRA on {wrapped} projections"):
        diffopt.optimize(pipe, fuse_projections=True, compile=False)
    report = diffopt.optimize(pipe, compile=False)
    assert not [s for s in report.steps if s.transform == "fuse_projections"]
    reference.load_lora_weights(loras["a"], adapter_name="a")
    assert rel_l2(run_pipeline(pipe), run_pipeline(reference)) < CLOSE


def test_enabling_hotswap_then_optimizing_before_any_lora_warns(caplog):
    pytest.importorskip("peft")
    pipe = sd_pipeline()
    pipe.enable_lora_hotswap(target_rank=8)
    with caplog.at_level(logging.WARNING, logger="diffopt.api"):
        diffopt.optimize(pipe, compile=TRACE)
    assert "hot-swap enabled but no LoRA loaded yet" in caplog.text
    diffopt.restore(pipe)


@pytest.mark.compile
def test_lora_hotswap_on_a_compiled_flux_transformer_does_not_recompile(tmp_path):
    pytest.importorskip("peft")
    from diffusers import FluxPipeline

    first, second = (
        save_lora(tmp_path, seed, name=f"{seed}.safetensors", model=flux_transformer(), pipeline_class=FluxPipeline)
        for seed in (1, 2)
    )
    reference = flux_pipeline()
    reference.load_lora_weights(second)
    expected = run_pipeline(reference)

    pipe = flux_pipeline()
    pipe.enable_lora_hotswap(target_rank=8)  # before the first LoRA, as diffusers requires
    pipe.load_lora_weights(first)  # adapter "default_0"; hot-swap pads it to rank 8
    eager_first = run_pipeline(pipe)
    diffopt.optimize(pipe)  # inductor
    compiled_first = run_pipeline(pipe)
    assert rel_l2(compiled_first, eager_first) < 1e-4
    with torch._dynamo.config.patch(error_on_recompile=True):
        pipe.load_lora_weights(second, hotswap=True, adapter_name="default_0")
        swapped = run_pipeline(pipe)
    assert rel_l2(swapped, expected) < 1e-4
    assert rel_l2(swapped, compiled_first) > 1e-2  # the new weights are in use
    diffopt.restore(pipe)
    assert rel_l2(run_pipeline(pipe), expected) < 1e-5  # restore keeps the swapped-in adapter


@pytest.mark.gpu
@pytest.mark.compile
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_fuse_lora_shows_under_cuda_graphs(loras):
    # reduce-overhead replays CUDA graphs that read the weights at recorded addresses; fuse_lora writes merged
    # weights (peft may rebind .data). The replayed graph must see them, or the LoRA silently vanishes.
    # The bound: cuDNN runs fp32 convolutions in TF32 by default, and channels_last makes it pick other algorithms
    # than the reference's (1.9e-3 measured on an H100); the fused LoRA moves the output by 0.43, far above it.
    bound = 1e-2
    pipe, reference = sd_pipeline().to("cuda"), sd_pipeline().to("cuda")
    base = run_pipeline(reference).float().cpu()
    diffopt.optimize(pipe)  # CUDA defaults: reduce-overhead
    for _ in range(3):
        run_pipeline(pipe)
    both(pipe, reference, call=lambda p: p.load_lora_weights(loras["a"], adapter_name="a"))
    both(pipe, reference, call=lambda p: p.fuse_lora())
    expected = run_pipeline(reference).float().cpu()
    assert rel_l2(expected, base) > 10 * bound  # the LoRA shows in the output, so a vanished one cannot pass
    for _ in range(2):
        assert rel_l2(run_pipeline(pipe).float().cpu(), expected) < bound
    both(pipe, reference, call=lambda p: p.unfuse_lora())
    assert rel_l2(run_pipeline(pipe).float().cpu(), run_pipeline(reference).float().cpu()) < bound
    diffopt.restore(pipe)


@pytest.mark.compile
def test_new_adapter_weights_recompile_once_then_reuse_one_graph(loras):
    # peft keeps set_adapters weights as Python floats; torch specializes a float, then on its first change makes it
    # a graph input. diffopt must leave that to torch (no dynamic=False), or every new weight would recompile and
    # a weight sweep would hit dynamo's recompile limit, a hard error under fullgraph=True.
    pipe = sd_pipeline()
    pipe.load_lora_weights(loras["a"], adapter_name="a")
    graphs = []

    def counting(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    diffopt.optimize(pipe, compile={"backend": counting})
    for weight in (0.5, 1.0, 1.5, 2.0, 2.5):
        pipe.set_adapters(["a"], adapter_weights=[weight])
        run_pipeline(pipe)
    assert len(graphs) == 2
    diffopt.restore(pipe)
