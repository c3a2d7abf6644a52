"""What only a CUDA card can show: real CUDA graphs, and the fused SDPA kernels. Skipped without one."""
import pytest
import torch
from conftest import rel_l2, run_pipeline, sd3_pipeline, sd_pipeline, tiny_controlnet, tiny_unet, unet_inputs

import diffopt
from diffopt import capabilities
from diffopt.bench.env import count_gpu_waits

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.usefixtures("compile_clean"),
]
# fp16 compiled against fp16 eager: inductor's fusions round differently, nothing more.
FP16_BOUND = 2e-2


def _controlnets(count):
    from diffusers import MultiControlNetModel

    return tiny_controlnet() if count == 1 else MultiControlNetModel([tiny_controlnet() for _ in range(count)])


@pytest.mark.compile
@pytest.mark.parametrize("nets", [1, 2])
def test_controlnet_pipeline_with_cuda_graphs_runs_and_matches_eager(nets):
    # In-place compiled ControlNets with CUDA graphs once failed with "accessing tensor output of CUDAGraphs that
    # has been overwritten"; the step mark at the first net is what keeps them correct.
    pipe = sd_pipeline(controlnet=_controlnets(nets)).to("cuda", torch.float16)
    eager = run_pipeline(pipe, steps=3).float()
    report = diffopt.optimize(pipe, background_compile=False)  # compiled from the first call
    compiled = {s.component: s.detail for s in report.applied if s.transform == "compile"}
    assert all("reduce-overhead" in detail for detail in compiled.values()), compiled
    outputs = [run_pipeline(pipe, steps=3).float() for _ in range(3)]  # warm-up, recording, replays
    assert all(torch.equal(outputs[-1], out) for out in outputs[1:])
    assert rel_l2(outputs[-1], eager) < FP16_BOUND
    diffopt.restore(pipe)


@pytest.mark.compile
def test_dynamic_batch_rerecords_instead_of_recompiling_under_cuda_graphs():
    unet = tiny_unet().to("cuda", torch.float16)
    inputs = {b: {k: v.to("cuda", torch.float16) for k, v in unet_inputs(unet, b).items()} for b in (2, 4)}
    with torch.no_grad():
        eager = {b: unet(**inputs[b]).sample.float() for b in inputs}
    diffopt.optimize(unet, dynamic_batch=True, background_compile=False)
    with torch.no_grad():
        unet(**inputs[2])
        with torch._dynamo.config.patch(error_on_recompile=True):
            for batch in (4, 2, 4):
                for _ in range(2):
                    out = unet(**inputs[batch]).sample.float()
                assert rel_l2(out, eager[batch]) < FP16_BOUND
    diffopt.restore(unet)


@pytest.mark.compile
def test_cpu_timesteps_take_the_per_step_sync_out_of_the_loop_and_keep_the_output():
    # DDIM reads its timestep on the CPU every step; with GPU timesteps that read waits for the UNet's graph.
    pipe = sd_pipeline().to("cuda", torch.float16)
    eager = run_pipeline(pipe, steps=4).float()
    results = {}
    for keep_on_cpu in (True, False):
        diffopt.optimize(pipe, cpu_timesteps=keep_on_cpu, background_compile=False)
        for _ in range(3):  # warm-up, CUDA-graph recording, replay
            run_pipeline(pipe, steps=4)
        results[keep_on_cpu] = {
            steps: count_gpu_waits(lambda: run_pipeline(pipe, steps=steps).float()) for steps in (4, 8)}  # fmt: skip
        assert (pipe.scheduler.timesteps.device.type == "cpu") == keep_on_cpu
    diffopt.restore(pipe)
    syncs = {k: {steps: count for steps, (_, count) in v.items()} for k, v in results.items()}
    # Four more steps: without it, at least one more wait per step (6 per DDIM step measured on an H100); with it,
    # none (the fixed waits of a call, input copies, went 4 -> 3 between the two step counts there).
    assert syncs[False][8] - syncs[False][4] >= 4, syncs
    assert syncs[True][8] - syncs[True][4] < 4, syncs
    with_cpu, without = results[True][4][0], results[False][4][0]
    assert rel_l2(with_cpu, without) < 1e-3 and rel_l2(with_cpu, eager) < FP16_BOUND


@pytest.mark.compile
def test_deepcache_under_cuda_graphs_gives_the_graph_less_output():
    # A cached step reads features a full step's graph produced; the cache copies them out of the graphs' pool.
    # If it did not, the next replay would overwrite them and the two outputs below would differ.
    pipe = sd_pipeline().to("cuda", torch.float16)
    outputs = {}
    for name, compile_options in (("graphs", True), ("no graphs", {"mode": None})):
        report = diffopt.optimize(pipe, cache=diffopt.DeepCache(interval=2), compile=compile_options)
        (detail,) = [s.detail for s in report.applied if s.transform == "compile"]
        assert ("reduce-overhead" in detail) == (name == "graphs"), detail
        outputs[name] = [run_pipeline(pipe, steps=6).float() for _ in range(3)][-1]  # warm-up, recording, replay
    diffopt.restore(pipe)
    assert rel_l2(outputs["graphs"], outputs["no graphs"]) < 1e-3


# How each backend's kernel is named (torch 2.11 on sm90: pytorch_flash::flash_fwd_kernel,
# cudnn_generated_fort_native_sdpa_sm90_flash_fprop..., fmha_cutlassF_...); convolutions are cuDNN kernels too, so
# "cudnn" alone says nothing. "math" launches none of them.
def _attention_kernels(names):
    return {
        "cudnn": [n for n in names if "cudnn" in n and "sdpa" in n],
        "flash": [n for n in names if "flash_fwd" in n and "sdpa" not in n],
        "efficient": [n for n in names if "fmha" in n or "efficient_attention" in n or "mem_eff" in n],
    }


# Compiled: the kernel choice is traced into the graph (each layer's forward runs under sdpa_kernel); CUDA graphs off
# so that the profiler names every kernel of the call.
COMPILED = {"options": {"triton.cudagraphs": False}}


@pytest.mark.parametrize("backend, compile", [
    ("flash", False), ("cudnn", False), ("efficient", False), ("math", False),
    pytest.param("flash", COMPILED, marks=pytest.mark.compile, id="flash-compiled"),
    pytest.param("cudnn", COMPILED, marks=pytest.mark.compile, id="cudnn-compiled"),
])  # fmt: skip
def test_requested_sdpa_kernel_is_the_one_launched(backend, compile):
    # One head of 64 and 128 channels: a head size every fused kernel takes (the default tiny UNet's is 4).
    unet = tiny_unet(block_out_channels=(64, 128), attention_head_dim=1).to("cuda", torch.float16)
    gate = capabilities.attention_backend(backend, torch.device("cuda"), torch.float16)
    if not gate.ok:
        pytest.skip(gate.reason)
    inputs = {k: v.to("cuda", torch.float16) for k, v in unet_inputs(unet, 2).items()}
    with torch.no_grad():
        reference = unet(**inputs).sample.float()
    diffopt.optimize(unet, attention=backend, compile=compile, background_compile=False)
    with torch.no_grad():
        if compile:
            unet(**inputs)  # compiles
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            out = unet(**inputs).sample.float()
            torch.cuda.synchronize()
    launched = {k: v for k, v in _attention_kernels([e.key.lower() for e in prof.key_averages()]).items() if v}
    assert list(launched) == ([] if backend == "math" else [backend]), launched
    assert rel_l2(out, reference) < FP16_BOUND
    diffopt.restore(unet)


@pytest.mark.compile
def test_model_cpu_offload_composes_with_compile_on_cuda():
    # accelerate's hook moves the UNet to the GPU outside the compiled forward; CUDA graphs are left out, since the
    # weights come back at new addresses on every call.
    pytest.importorskip("accelerate")
    pipe = sd_pipeline().to(torch.float16)
    pipe.enable_model_cpu_offload()
    eager = run_pipeline(pipe, steps=3).float()
    report = diffopt.optimize(pipe)
    (compiled,) = [s.detail for s in report.applied if s.transform == "compile"]
    assert "reduce-overhead" not in compiled
    outputs = [run_pipeline(pipe, steps=3).float() for _ in range(2)]
    assert torch.equal(outputs[0], outputs[1]) and rel_l2(outputs[-1], eager) < FP16_BOUND
    diffopt.restore(pipe)
    assert not diffopt.api.is_optimized(pipe)


@pytest.mark.compile
def test_transformer_blocks_compile_by_default_and_cuda_graphs_named_compile_it_whole():
    # The default for transformers: one graph per block class, CUDA graphs off, the same output as eager. Naming
    # reduce-overhead compiles the model whole, with its CUDA graphs, replay after replay the same output.
    pipe = sd3_pipeline(layers=3).to("cuda", torch.float16)
    eager = run_pipeline(pipe).float()
    report = diffopt.optimize(pipe)
    (row,) = [s for s in report.applied if s.component == "transformer" and s.transform == "compile"]
    assert "one graph per block class" in row.detail and "reduce-overhead" not in row.detail
    assert rel_l2(run_pipeline(pipe).float(), eager) < FP16_BOUND
    diffopt.restore(pipe)
    report = diffopt.optimize(pipe, compile={"mode": "reduce-overhead"}, background_compile=False)
    (row,) = [s for s in report.applied if s.component == "transformer" and s.transform == "compile"]
    assert "blocks" not in row.detail and "reduce-overhead" in row.detail
    outputs = [run_pipeline(pipe).float() for _ in range(3)]  # warm-up, recording, replays
    assert torch.equal(outputs[1], outputs[2]) and rel_l2(outputs[-1], eager) < FP16_BOUND
    diffopt.restore(pipe)


def test_by_default_a_small_model_compiles_at_its_first_call_and_the_report_says_why():
    pipe = sd_pipeline().to("cuda", torch.float16)
    report = diffopt.optimize(pipe)
    (skipped,) = [s for s in report.skipped if s.transform == "background_compile"]
    assert skipped.component == "unet" and "a small model" in skipped.detail
    assert vars(pipe.unet)["_compiled_call_impl"].background is None
    diffopt.restore(pipe)


@pytest.mark.compile
@pytest.mark.parametrize("nets", [0, 1])
def test_background_compile_replays_eager_cuda_graphs_then_switches_to_the_compiled_model(tmp_path, monkeypatch, nets):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))  # inherited by the child
    pipe = sd_pipeline(controlnet=_controlnets(nets) if nets else None).to("cuda", torch.float16)
    eager = run_pipeline(pipe, steps=3).float()
    # Named: by default, models this small compile in the foreground (full-size ones in the background).
    report = diffopt.optimize(pipe, background_compile=True, compile_cache=tmp_path / "saved")
    assert "CUDA graphs of the eager forward" in str(report)
    models = [pipe.unet] + ([pipe.controlnet] if nets else [])
    calls = [vars(m)["_compiled_call_impl"] for m in models]
    backgrounds = [call.background for call in calls]
    uncompiled = [run_pipeline(pipe, steps=3).float() for _ in range(2)]
    assert all(b.eager_graphs.replays >= 5 for b in backgrounds)  # every step after the first call's recording
    assert torch.equal(uncompiled[0], uncompiled[1]) and rel_l2(uncompiled[1], eager) < 1e-3
    assert all(call.calls == 0 for call in calls)
    assert diffopt.wait_until_compiled(pipe, timeout=600), [b.given_up for b in backgrounds]
    assert all(b.loaded and not b.given_up and not b.eager_graphs.recorded for b in backgrounds)
    # The first compiled calls here record the CUDA graphs of the code the thread compiled, then replay them.
    compiled = [run_pipeline(pipe, steps=3).float() for _ in range(3)]
    assert torch.equal(compiled[1], compiled[2]) and rel_l2(compiled[2], eager) < FP16_BOUND
    assert all(call.calls >= 9 for call in calls)
    diffopt.restore(pipe)
    assert torch.equal(run_pipeline(pipe, steps=3).float(), run_pipeline(pipe, steps=3).float())
    # A new pipeline of the same model in this process: the saved compile is loaded in a thread, with no child.
    again = sd_pipeline(controlnet=_controlnets(nets) if nets else None).to("cuda", torch.float16)
    report = diffopt.optimize(again, background_compile=True, compile_cache=tmp_path / "saved")
    assert "loaded from the saved compile in a thread" in str(report)
    assert rel_l2(run_pipeline(again, steps=3).float(), eager) < FP16_BOUND
    assert diffopt.wait_until_compiled(again, timeout=600)
    outputs = [run_pipeline(again, steps=3).float() for _ in range(3)]
    assert torch.equal(outputs[1], outputs[2]) and rel_l2(outputs[2], eager) < FP16_BOUND
    assert vars(again.unet)["_compiled_call_impl"].background.child is None
    diffopt.restore(again)
