"""diffopt.distributed on two CPU processes (gloo): every parallel result equals the single-process one.

Scenarios (functions named ``scenario_*``) run on both ranks of a shared pair of workers (see _two_ranks.py) and
assert inside the workers; the tests around them check what the two ranks returned.
"""

from __future__ import annotations

import inspect
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from _two_ranks import TwoRanks
from conftest import CROSS_DIM, SAMPLE, rel_l2, sd3_transformer, sdxl_unet, tiny_controlnet, tiny_unet, tiny_vae

REPO = Path(__file__).resolve().parents[1]

# Splitting a batch changes float32 rounding (GEMMs of batch 1 instead of 2), never the result; a wrong half or a
# wrong order gives differences of order 1.
MAX_REL_DIFF = 2e-5


def assert_same_image(got, want):
    got, want = torch.as_tensor(got), torch.as_tensor(want)
    assert got.shape == want.shape
    assert rel_l2(got, want) < MAX_REL_DIFF, f"relative L2 {rel_l2(got, want):.2e}"


@pytest.fixture(scope="module")
def two_ranks():
    pool = TwoRanks()
    yield pool
    pool.close()


# ----------------------------------------------------------------------------------------------------------------
# Tiny random pipelines from conftest's models; their builders seed torch, so both ranks hold the same weights.


def _scheduler(kind: str = "euler"):
    from diffusers import DDIMScheduler, EulerDiscreteScheduler

    if kind == "ddim":  # no step_index: CFG-parallel then checks its inputs at every step
        return DDIMScheduler(steps_offset=1, clip_sample=False)
    return EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)


def build_sd(scheduler: str = "euler"):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=tiny_vae(), text_encoder=None, tokenizer=None, unet=tiny_unet(), scheduler=_scheduler(scheduler),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_sdxl():
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline(
        vae=tiny_vae(), text_encoder=None, text_encoder_2=None, tokenizer=None, tokenizer_2=None, unet=sdxl_unet(),
        scheduler=_scheduler(),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_controlnet():
    from diffusers import StableDiffusionControlNetPipeline

    unet = tiny_unet()
    controlnet = tiny_controlnet(unet)
    torch.manual_seed(2)
    with torch.no_grad():
        # A fresh ControlNet's output convolutions are zero: its residuals would change nothing and prove nothing.
        for weight in [*controlnet.controlnet_down_blocks.parameters(), *controlnet.controlnet_mid_block.parameters()]:
            weight.normal_(std=0.1)
    pipe = StableDiffusionControlNetPipeline(
        vae=tiny_vae(), text_encoder=None, tokenizer=None, unet=unet, controlnet=controlnet,
        scheduler=_scheduler(), safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_multi_controlnet():
    from diffusers import MultiControlNetModel

    pipe = build_controlnet()
    second = build_controlnet().controlnet
    with torch.no_grad():
        for weight in second.controlnet_down_blocks.parameters():
            weight.neg_()  # a second ControlNet that differs from the first
    pipe.controlnet = MultiControlNetModel([pipe.controlnet, second])
    return pipe


def build_sd3():
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    torch.manual_seed(0)
    vae = AutoencoderKL(
        block_out_channels=(8, 16), latent_channels=4, norm_num_groups=8, shift_factor=0.0, scaling_factor=1.0,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
    )
    pipe = StableDiffusion3Pipeline(
        transformer=sd3_transformer(), scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None,
        tokenizer=None, text_encoder_2=None, tokenizer_2=None, text_encoder_3=None, tokenizer_3=None,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


BUILDERS = {
    "sd": build_sd,
    "sd-ddim": lambda: build_sd("ddim"),
    "sdxl": build_sdxl,
    "controlnet": build_controlnet,
    "multi-controlnet": build_multi_controlnet,
    "sd3": build_sd3,
}


def call_kwargs(kind: str, prompts: int = 1, size: int = 2 * SAMPLE, seed: int = 0, **extra) -> dict:
    """Pipeline arguments for `prompts` distinct random prompts; equal on every rank for equal arguments."""
    g = torch.Generator().manual_seed(1234)
    kwargs = dict(
        prompt_embeds=torch.randn(prompts, 7, CROSS_DIM, generator=g),
        negative_prompt_embeds=torch.randn(prompts, 7, CROSS_DIM, generator=g),
        num_inference_steps=3,
        guidance_scale=7.0,
        height=size,
        width=size,
        output_type="latent",
        generator=torch.Generator().manual_seed(seed),
    )
    if kind in ("sdxl", "sd3"):
        kwargs.update(
            pooled_prompt_embeds=torch.randn(prompts, 16, generator=g),
            negative_pooled_prompt_embeds=torch.randn(prompts, 16, generator=g),
        )
    if kind == "controlnet":
        kwargs["image"] = torch.rand(prompts, 3, size, size, generator=g)
    if kind == "multi-controlnet":
        kwargs["image"] = [torch.rand(prompts, 3, size, size, generator=g) for _ in range(2)]
    kwargs.update(extra)
    return kwargs


class BatchSizes:
    """Records the batch each call of a module saw (a forward pre-hook, removed by `remove()`)."""

    def __init__(self, module):
        self.seen = []
        self._handle = module.register_forward_pre_hook(self._record, with_kwargs=True)

    def _record(self, module, args, kwargs):
        self.seen.append((args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))).shape[0])

    def remove(self):
        self._handle.remove()


# ----------------------------------------------------------------------------------------------------------------
# CFG-parallel


def scenario_cfg_matches_single(rank, kind, prompts, extra):
    from diffopt.distributed import enable_cfg_parallel

    pipe = BUILDERS[kind]()
    expected = pipe(**call_kwargs(kind, prompts, **extra)).images
    if "controlnet" in kind:  # the residuals matter, so splitting them wrongly would show
        scale = 0.0 if kind == "controlnet" else [0.0, 0.0]
        uncontrolled = pipe(**call_kwargs(kind, prompts, controlnet_conditioning_scale=scale, **extra)).images
        assert rel_l2(uncontrolled, expected) > 1e-3
    denoiser = pipe.unet if hasattr(pipe, "unet") else pipe.transformer
    denoisers = [m for m in (denoiser, getattr(pipe, "controlnet", None)) if m is not None]
    recorders = [BatchSizes(m) for m in denoisers]
    with enable_cfg_parallel(pipe):
        got = pipe(**call_kwargs(kind, prompts, **extra)).images
    for recorder in recorders:
        recorder.remove()
    assert_same_image(got, expected)
    return {"latents": got, "batches": [r.seen for r in recorders], "rel_l2": rel_l2(got, expected)}


@pytest.mark.parametrize(
    "kind, prompts, extra",
    [
        ("sd", 1, {}),
        ("sd", 2, {}),
        ("sd-ddim", 1, {}),
        ("sdxl", 1, {}),
        ("sdxl", 2, {}),
        ("controlnet", 1, {}),
        ("controlnet", 1, {"guess_mode": True}),
        ("multi-controlnet", 1, {}),
        ("sd3", 1, {}),
    ],
    ids=["sd", "sd-batch2", "sd-ddim", "sdxl", "sdxl-batch2", "controlnet", "controlnet-guess-mode",
         "multi-controlnet", "sd3-transformer"],
)
def test_cfg_parallel_equals_single_process(two_ranks, kind, prompts, extra):
    ranks = two_ranks.run(scenario_cfg_matches_single, kind, prompts, extra)
    # Both ranks end with the same image (each rebuilt the full batch from the gathered halves) ...
    torch.testing.assert_close(ranks[0]["latents"], ranks[1]["latents"], rtol=0, atol=0)
    # ... and each ran its denoisers on half of the doubled batch, 3 steps.
    unet_batches = ranks[0]["batches"][0]
    assert unet_batches == [prompts] * 3
    if "controlnet" in kind:
        # Guess mode runs the ControlNet on the conditional half only: a batch of 1 cannot be split, so both ranks
        # run it whole.
        assert ranks[0]["batches"][1] == [1 if extra.get("guess_mode") else prompts] * 3


def scenario_cfg_round_trip(rank):
    from diffusers import ControlNetModel, UNet2DConditionModel

    from diffopt.distributed import disable_cfg_parallel, enable_cfg_parallel

    pipe = build_controlnet()
    unet, controlnet = pipe.unet, pipe.controlnet
    before = {name: (type(m), set(vars(m)), inspect.signature(m.forward)) for name, m in
              (("unet", unet), ("controlnet", controlnet))}
    config_before = dict(pipe.config)
    expected = pipe(**call_kwargs("controlnet")).images

    handle = enable_cfg_parallel(pipe)
    assert set(handle.modules) == {"unet", "controlnet"}
    assert pipe.unet is unet and pipe.controlnet is controlnet
    assert isinstance(unet, UNet2DConditionModel) and isinstance(controlnet, ControlNetModel)
    assert type(unet) is not UNet2DConditionModel  # the instance moved to the splitting subclass
    assert json.loads(unet.to_json_string())["_class_name"] == "UNet2DConditionModel"  # what save_pretrained writes
    with pytest.raises(RuntimeError, match="already enabled"):
        enable_cfg_parallel(pipe)
    assert disable_cfg_parallel(pipe) is True
    assert disable_cfg_parallel(pipe) is False

    for name, module in (("unet", unet), ("controlnet", controlnet)):
        assert (type(module), set(vars(module)), inspect.signature(module.forward)) == before[name]
    assert dict(pipe.config) == config_before
    torch.testing.assert_close(pipe(**call_kwargs("controlnet")).images, expected, rtol=0, atol=0)


def test_cfg_parallel_round_trip_leaves_nothing_behind(two_ranks):
    two_ranks.run(scenario_cfg_round_trip)


def scenario_cfg_rejects_mismatch(rank, case):
    from diffopt.distributed import enable_cfg_parallel

    if case == "weights":
        pipe = build_sd()
        with torch.no_grad():
            pipe.unet.conv_in.bias[0] += rank  # one number differs
        with pytest.raises(RuntimeError, match="CFG-parallel weights") as error:
            enable_cfg_parallel(pipe)
        assert "_diffopt_cfg_parallel" not in vars(pipe.unet)
        return str(error.value)
    pipe = build_sd()
    kwargs = {
        "seed": call_kwargs("sd", seed=rank),
        "shape": call_kwargs("sd", size=32 if rank == 0 else 16),
        "prompt": call_kwargs("sd", prompt_embeds=torch.full((1, 7, CROSS_DIM), float(rank))),
        "steps": call_kwargs("sd", num_inference_steps=3 + rank),
    }[case]
    with enable_cfg_parallel(pipe):
        with pytest.raises(RuntimeError, match="CFG-parallel inputs of pipe.unet") as error:
            pipe(**kwargs)
        # The pair is still usable after the error: no rank is left waiting in a collective.
        pipe(**call_kwargs("sd"))
    return str(error.value)


@pytest.mark.parametrize("case, reason", [
    ("seed", "different values (different seeds, latents or prompts): args[0] of rank 1 differs"),
    ("prompt", "different values (different seeds, latents or prompts): encoder_hidden_states of rank 1"),
    ("shape", "different shapes, dtypes or options:\n  rank 0: args[0]=Tensor(2, 4, 16, 16)"),
    ("steps", "different shapes, dtypes or options:\n  rank 0: scheduler.timesteps=Tensor(3,)"),
    ("weights", "CFG-parallel weights: ranks hold different values"),
])
def test_cfg_parallel_mismatch_raises_on_every_rank(two_ranks, case, reason):
    messages = two_ranks.run(scenario_cfg_rejects_mismatch, case, timeout=90)
    assert messages[0] == messages[1]
    assert reason in messages[0], messages[0]


def _recording_backend(graphs):
    from torch._dynamo.backends.registry import lookup_backend

    aot_eager = lookup_backend("aot_eager")

    def backend(gm, example_inputs):
        graphs.append(gm)
        return aot_eager(gm, example_inputs)

    return backend


def scenario_cfg_with_compile(rank, order):
    from torch._dynamo.utils import counters

    from diffopt.distributed import enable_cfg_parallel

    torch.compiler.reset()
    counters.clear()
    pipe = build_sd()
    expected = pipe(**call_kwargs("sd")).images
    graphs = []
    compile_kwargs = {"backend": _recording_backend(graphs), "fullgraph": True, "dynamic": False}
    if order == "compile-then-enable":
        pipe.unet.compile(**compile_kwargs)  # in place, as diffopt.optimize does
        pipe(**call_kwargs("sd"))  # compiles the full batch of 2
        graphs.clear()
        handle = enable_cfg_parallel(pipe)
    elif order == "enable-then-compile":
        handle = enable_cfg_parallel(pipe)
        pipe.unet.compile(**compile_kwargs)
    else:  # the classic recipe: pipe.unet becomes an OptimizedModule wrapping the UNet
        pipe.unet = torch.compile(pipe.unet, **compile_kwargs)
        handle = enable_cfg_parallel(pipe)
    with handle:
        got = pipe(**call_kwargs("sd")).images
        again = pipe(**call_kwargs("sd")).images
    assert_same_image(got, expected)
    torch.testing.assert_close(again, got, rtol=0, atol=0)
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert graphs, "the UNet did not run compiled"
    # The split and the all-gather happen around the compiled UNet, never inside a captured graph.
    targets = {str(node.target) for gm in graphs for node in gm.graph.nodes}
    assert not [t for t in targets if "all_gather" in t or "c10d" in t or "distributed" in t], targets
    # ... and the compiled UNet saw this rank's half: latents of batch 1, not the doubled batch of 2.
    latents = [node.meta["example_value"].shape[0] for gm in graphs for node in gm.graph.find_nodes(op="placeholder")
               if tuple(getattr(node.meta.get("example_value"), "shape", ())[1:]) == (4, 16, 16)]
    assert latents and set(latents) == {1}, latents
    if order == "compile-then-enable":
        # Disabling goes back to the full-batch graph compiled before: no recompile.
        with torch._dynamo.config.patch(error_on_recompile=True):
            assert_same_image(pipe(**call_kwargs("sd")).images, expected)
    torch.compiler.reset()
    return got


@pytest.mark.compile
@pytest.mark.parametrize("order", ["compile-then-enable", "enable-then-compile", "torch.compile-wrapper"])
def test_cfg_parallel_with_compiled_unet(two_ranks, order):
    ranks = two_ranks.run(scenario_cfg_with_compile, order, timeout=180)
    torch.testing.assert_close(ranks[0], ranks[1], rtol=0, atol=0)


def scenario_cfg_with_optimize(rank, options, order):
    import diffopt
    from diffopt.distributed import enable_cfg_parallel

    torch.compiler.reset()
    pipe = build_sdxl()
    expected = pipe(**call_kwargs("sdxl")).images
    unet = pipe.unet
    if order == "optimize-then-enable":
        diffopt.optimize(pipe, **options)
        handle = enable_cfg_parallel(pipe)
    else:
        handle = enable_cfg_parallel(pipe)
        diffopt.optimize(pipe, **options)
    got = pipe(**call_kwargs("sdxl")).images
    # Undo in the same order as applied, not the reverse: neither depends on the other.
    if order == "optimize-then-enable":
        diffopt.restore(pipe)
        handle.disable()
    else:
        handle.disable()
        diffopt.restore(pipe)
    assert pipe.unet is unet and type(unet).__name__ == "UNet2DConditionModel"
    assert "_diffopt_cfg_parallel" not in vars(unet) and getattr(unet, "_compiled_call_impl", None) is None
    assert_same_image(got, expected)
    torch.compiler.reset()


@pytest.mark.parametrize("options, order", [
    pytest.param(dict(attention="sdpa", compile=False, memory_format="channels_last"), "optimize-then-enable",
                 id="no-compile"),
    pytest.param(dict(attention="sdpa", compile=False, memory_format="channels_last"), "enable-then-optimize",
                 id="no-compile-enable-first"),
    pytest.param(dict(attention="sdpa", compile=True, memory_format="channels_last"), "optimize-then-enable",
                 id="compile", marks=pytest.mark.compile),
])
def test_cfg_parallel_composes_with_optimize(two_ranks, options, order):
    two_ranks.run(scenario_cfg_with_optimize, options, order, timeout=300)


def scenario_new_cfg_group(rank):
    import torch.distributed as dist

    from diffopt.distributed import cfg_parallel_group, enable_cfg_parallel, new_cfg_group

    group = new_cfg_group()
    assert dist.get_process_group_ranks(group) == [0, 1]
    pipe = build_sd()
    with pytest.raises(ValueError, match="size must be >= 2"):
        new_cfg_group(3)
    assert cfg_parallel_group(pipe) is None
    with enable_cfg_parallel(pipe, group=group):
        assert cfg_parallel_group(pipe) is group
    assert cfg_parallel_group(pipe) is None


def test_new_cfg_group_pairs_ranks(two_ranks):
    two_ranks.run(scenario_new_cfg_group)


def scenario_refuses_pag(rank):
    from diffusers import StableDiffusionPAGPipeline

    from diffopt.distributed import enable_cfg_parallel

    pipe = StableDiffusionPAGPipeline(
        vae=tiny_vae(), text_encoder=None, tokenizer=None, unet=tiny_unet(), scheduler=_scheduler(),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False, pag_applied_layers=["mid"],
    )
    with pytest.raises(ValueError, match="perturbed-attention guidance"):
        enable_cfg_parallel(pipe)
    assert "_diffopt_cfg_parallel" not in vars(pipe.unet)


def test_cfg_parallel_refuses_pipelines_that_mix_the_batch(two_ranks):
    two_ranks.run(scenario_refuses_pag)


def test_enable_without_process_group_says_how_to_launch():
    from diffopt.distributed import enable_cfg_parallel, generate_data_parallel

    pipe = build_sd()
    with pytest.raises(RuntimeError, match="torchrun"):
        enable_cfg_parallel(pipe)
    with pytest.raises(RuntimeError, match="torchrun"):
        generate_data_parallel(pipe, ["a prompt"])
    assert type(pipe.unet).__name__ == "UNet2DConditionModel" and "_diffopt_cfg_parallel" not in vars(pipe.unet)


# ----------------------------------------------------------------------------------------------------------------
# Data-parallel


def scenario_data_parallel(rank, count, batch_size, output_type, with_cfg):
    from diffopt.distributed import enable_cfg_parallel, generate_data_parallel

    pipe = build_sd()
    g = torch.Generator().manual_seed(99)
    embeds = torch.randn(count, 7, CROSS_DIM, generator=g)
    negative = torch.randn(count, 7, CROSS_DIM, generator=g)
    common = dict(num_inference_steps=2, guidance_scale=5.0, height=32, width=32, output_type=output_type)
    # Single-process reference: image i from its own generator seeded 7 + i.
    expected = [
        pipe(prompt_embeds=embeds[i : i + 1], negative_prompt_embeds=negative[i : i + 1],
             generator=torch.Generator().manual_seed(7 + i), **common).images[0]
        for i in range(count)
    ]
    recorder = BatchSizes(pipe.unet)
    handle = enable_cfg_parallel(pipe) if with_cfg else None
    images = generate_data_parallel(
        pipe, {"prompt_embeds": embeds, "negative_prompt_embeds": negative}, batch_size=batch_size, seed=7, **common
    )
    if handle is not None:
        handle.disable()
    recorder.remove()
    assert len(images) == count
    for got, want in zip(images, expected):
        assert_same_image(got, want)
    return {"images": [torch.as_tensor(image) for image in images], "unet_calls": len(recorder.seen)}


@pytest.mark.parametrize(
    "count, batch_size, output_type",
    [(5, 1, "latent"), (5, 2, "latent"), (1, 1, "latent"), (0, 1, "latent"), (3, 1, "np")],
    ids=["5-prompts", "5-prompts-batch2", "1-prompt", "no-prompts", "3-prompts-numpy"],
)
def test_data_parallel_in_order_without_duplicates(two_ranks, count, batch_size, output_type):
    ranks = two_ranks.run(scenario_data_parallel, count, batch_size, output_type, False)
    for got, want in zip(ranks[0]["images"], ranks[1]["images"]):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    # Contiguous balanced shares (rank 1 gets the extra one): each prompt generated exactly once, 2 steps each.
    shares = [len(range(count * r // 2, count * (r + 1) // 2)) for r in range(2)]
    calls = [-(-share // batch_size) * 2 for share in shares]
    assert [rank["unet_calls"] for rank in ranks] == calls


def test_data_parallel_over_cfg_pairs(two_ranks):
    # With CFG-parallel on, the pair is one replica: both ranks take every prompt, each running half of each batch.
    ranks = two_ranks.run(scenario_data_parallel, 3, 1, "latent", True)
    assert [rank["unet_calls"] for rank in ranks] == [3 * 2, 3 * 2]
    for got, want in zip(ranks[0]["images"], ranks[1]["images"]):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def scenario_shard_and_gather(rank, count):
    from diffopt.distributed import gather, shard

    mine = shard(list(range(count)))
    return mine, gather([f"image {i}" for i in mine])


def test_shard_and_gather_helpers(two_ranks):
    ranks = two_ranks.run(scenario_shard_and_gather, 7)
    assert [mine for mine, _ in ranks] == [[0, 1, 2], [3, 4, 5, 6]]
    assert ranks[0][1] == ranks[1][1] == [f"image {i}" for i in range(7)]


def scenario_data_parallel_disagreement(rank):
    from diffopt.distributed import generate_data_parallel

    pipe = build_sd()
    with pytest.raises(ValueError, match="ranks disagree"):
        generate_data_parallel(pipe, torch.zeros(4 + rank, 7, CROSS_DIM), num_inference_steps=1)


def test_data_parallel_rejects_ranks_with_different_prompt_counts(two_ranks):
    two_ranks.run(scenario_data_parallel_disagreement)


def test_data_parallel_argument_errors():
    from diffopt.distributed import generate_data_parallel

    pipe = build_sd()
    with pytest.raises(ValueError, match="either seed"):
        generate_data_parallel(pipe, ["a"], seed=0, generator=torch.Generator())
    with pytest.raises(ValueError, match="same length"):
        generate_data_parallel(pipe, {"prompt_embeds": torch.zeros(2, 7, 32), "negative_prompt_embeds": torch.ones(3)})
    with pytest.raises(TypeError, match="list of prompts"):
        generate_data_parallel(pipe, "one prompt")


# ----------------------------------------------------------------------------------------------------------------
# Context-parallel (diffusers' enable_parallelism)


def test_context_parallel_gate_names_the_reason(monkeypatch):
    import builtins

    from diffopt.distributed import context_parallel_unavailable

    unet = build_sd().unet
    assert "no context-parallel plan for UNet2DConditionModel" in context_parallel_unavailable(unet)
    assert "not a diffusers model" in context_parallel_unavailable(None)

    real_import = builtins.__import__

    def import_without_context_parallel(name, globals=None, locals=None, fromlist=(), level=0):
        if name == "diffusers" and fromlist and "ContextParallelConfig" in fromlist:
            raise ImportError("cannot import name 'ContextParallelConfig'")
        return real_import(name, globals, locals, fromlist, level)

    monkeypatch.setattr(builtins, "__import__", import_without_context_parallel)
    assert "came in 0.36" in context_parallel_unavailable(unet)


def _tiny_flux(seed: int = 0):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    return FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8],
    )


def _flux_inputs():
    g = torch.Generator().manual_seed(0)
    return dict(
        hidden_states=torch.randn(1, 16, 4, generator=g),
        encoder_hidden_states=torch.randn(1, 8, 32, generator=g),
        pooled_projections=torch.randn(1, 32, generator=g),
        timestep=torch.tensor([0.5]),
        img_ids=torch.randn(16, 3, generator=g),
        txt_ids=torch.zeros(8, 3),
        return_dict=False,
    )


def scenario_context_parallel(rank):
    from types import SimpleNamespace
    from unittest import mock

    from diffopt.distributed import disable_context_parallel, enable_context_parallel

    model = _tiny_flux()
    inputs = _flux_inputs()
    with torch.no_grad():
        expected = model(**inputs)[0]
    before = {name: set(vars(m)) for name, m in model.named_modules()}
    pipe = SimpleNamespace(transformer=model)
    # diffusers picks the device as rank % accelerator count, which is rank % 0 on a CPU-only host.
    with mock.patch.object(torch.accelerator, "device_count", return_value=max(1, torch.accelerator.device_count())):
        enable_context_parallel(pipe)  # Ulysses over both ranks
    with torch.no_grad():
        got = model(**inputs)[0]
    assert disable_context_parallel(pipe) is True
    assert {name: set(vars(m)) for name, m in model.named_modules()} == before
    assert_same_image(got, expected)
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs)[0], expected, rtol=0, atol=0)


def test_context_parallel_equals_single_process_and_undoes(two_ranks):
    two_ranks.run(scenario_context_parallel)


# ----------------------------------------------------------------------------------------------------------------
# The measurement script, at tiny size on CPU: it must run end to end before anyone spends GPU time on it.


def test_example_script_runs_on_two_cpu_processes(tmp_path):
    out = tmp_path / "result.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        str(REPO / "examples" / "distributed_generate.py"), "--model", "tiny", "--steps", "2", "--repeats", "1",
        "--prompts", "3", "--no-compile", "--json", str(out),
    ]
    # Its own session, so that a timeout ends torchrun's workers too, not only torchrun.
    launcher = subprocess.Popen(command, env=env, cwd=tmp_path, start_new_session=True)
    try:
        assert launcher.wait(timeout=240) == 0
    except subprocess.TimeoutExpired:
        os.killpg(launcher.pid, signal.SIGKILL)
        launcher.wait()
        pytest.fail("examples/distributed_generate.py --model tiny did not finish within 240 s")
    result = json.loads(out.read_text())
    assert result["world_size"] == 2
    assert result["cfg_parallel"]["max_abs_diff_vs_single"] <= 2  # PIL images: rounding may move a level or two
    assert result["data_parallel"]["images"] == 3 and result["data_parallel"]["images_per_s"] > 0
