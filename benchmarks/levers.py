"""Ablation: one lever at a time on SD1.5 (random weights, public architecture), so that what each lever adds to
the speed-up can be told apart from the others. Measured the way benchmarks/anchors/bench_anchor.py measures (fp16,
512x512, DDIM 50 steps, output_type="latent", steps/s of the whole pipeline call, median of 3 after warm calls).

    python benchmarks/levers.py VARIANT [BATCH] [STEPS]

VARIANT joins tokens with '+': docs (diffusers' recipe: SDPA + channels_last + compile reduce-overhead fullgraph),
cudnn_bench (torch.backends.cudnn.benchmark during capture), cudnn_attn / flash_attn / efficient_attn
(SDPA kernel forced while compiling and running), freezing (inductor freezing + CUDA graphs),
diffopt (diffopt.optimize defaults), nocputs (with diffopt: cpu_timesteps=False, the timesteps left on the
GPU where the pipeline puts them), dynbatch (batch dimension of the UNet inputs marked dynamic before the
compiled call, so a new batch size re-records CUDA graphs instead of recompiling), switch (also time the first
call after switching to batch 4 and back to 1), profile (kernel time per category over one call, from
torch.profiler), stepgraph (UNet + guidance + DDIM update compiled as one CUDA graph, the loop driven by this
script instead of the pipeline). Prints one RESULT json line (and a PROFILE line).
"""
import contextlib
import json
import sys
import time

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

from diffopt.bench.env import count_gpu_waits

variant = sys.argv[1]
batch = int(sys.argv[2]) if len(sys.argv) > 2 else 1
steps = int(sys.argv[3]) if len(sys.argv) > 3 else 50
tokens = set(variant.split("+"))
dev, dt = "cuda", torch.float16
torch.manual_seed(0)
VAE = dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
           block_out_channels=[128, 256, 512, 512], layers_per_block=2, latent_channels=4, norm_num_groups=32, sample_size=512)
with torch.device(dev):
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8).to(dt)
    vae = AutoencoderKL(**VAE).to(dt)
pipe = StableDiffusionPipeline(vae=vae, text_encoder=None, tokenizer=None, unet=unet, scheduler=DDIMScheduler(),
                               safety_checker=None, feature_extractor=None, requires_safety_checker=False)
pipe.set_progress_bar_config(disable=True)
g = torch.Generator(dev).manual_seed(0)
pe = torch.randn(batch, 77, 768, device=dev, dtype=dt, generator=g)
ne = torch.randn(batch, 77, 768, device=dev, dtype=dt, generator=g)


def call():
    torch.cuda.synchronize()
    t = time.perf_counter()
    with torch.inference_mode():
        out = pipe(prompt_embeds=pe, negative_prompt_embeds=ne, num_inference_steps=steps, output_type="latent",
                   generator=torch.Generator(dev).manual_seed(1)).images
    torch.cuda.synchronize()
    return time.perf_counter() - t, out.float().clone()


_, reference = call()  # eager SDPA, the diffusers default

from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

kernel = {"cudnn_attn": SDPBackend.CUDNN_ATTENTION, "flash_attn": SDPBackend.FLASH_ATTENTION,
          "efficient_attn": SDPBackend.EFFICIENT_ATTENTION}
scope = contextlib.ExitStack()
for tok, backend in kernel.items():
    if tok in tokens:
        scope.enter_context(sdpa_kernel([backend]))
if "cudnn_bench" in tokens:
    torch.backends.cudnn.benchmark = True
if "diffopt" in tokens:
    import diffopt
    print(diffopt.optimize(pipe, cpu_timesteps="nocputs" not in tokens), flush=True)
elif "docs" in tokens:
    pipe.unet.to(memory_format=torch.channels_last)
    if "freezing" in tokens:
        pipe.unet = torch.compile(pipe.unet, fullgraph=True, options={"freezing": True, "triton.cudagraphs": True})
    else:
        pipe.unet = torch.compile(pipe.unet, mode="reduce-overhead", fullgraph=True)

if "dynbatch" in tokens:
    # Mark the batch dimension before the compiled call sees the tensors: one graph serves every batch size.
    inner = pipe.unet.forward

    def forward(sample, timestep, encoder_hidden_states, *args, **kwargs):
        torch._dynamo.maybe_mark_dynamic(sample, 0)
        torch._dynamo.maybe_mark_dynamic(encoder_hidden_states, 0)
        return inner(sample, timestep, encoder_hidden_states, *args, **kwargs)

    pipe.unet.forward = forward

if "stepgraph" in tokens:
    # The whole denoising step in one CUDA graph: UNet, guidance and the DDIM update. The pipeline runs the last
    # two eagerly between graph replays (1.6 ms of a 7.7 ms step in a kernel profile of this benchmark's SD1.5 run),
    # and DDIM's timestep indexing synchronizes every step. Per-step scalars are precomputed on the GPU and passed as
    # 0-d tensors so one graph serves every step. Checked on CPU against StableDiffusionPipeline + DDIM: identical latents.
    pipe.unet.to(memory_format=torch.channels_last)
    sched = pipe.scheduler
    sched.set_timesteps(steps, device=dev)
    timesteps = sched.timesteps
    alphas = sched.alphas_cumprod.to(dev, torch.float32)
    previous = timesteps - sched.config.num_train_timesteps // steps
    alpha_t = alphas[timesteps]
    alpha_prev = torch.where(previous >= 0, alphas[previous.clamp(min=0)], torch.tensor(float(sched.final_alpha_cumprod), device=dev))
    clip = sched.config.clip_sample_range if sched.config.clip_sample else None
    unet = pipe.unet

    def step(latents, t, at, ap, emb):
        eps = unet(torch.cat([latents] * 2), t, encoder_hidden_states=emb).sample
        uncond, cond = eps.chunk(2)
        eps = uncond + 7.5 * (cond - uncond)
        x0 = (latents - (1 - at).sqrt() * eps) / at.sqrt()
        if clip is not None:
            x0 = x0.clamp(-clip, clip)
        return ap.sqrt() * x0 + (1 - ap).sqrt() * eps

    compiled_step = torch.compile(step, mode="reduce-overhead", fullgraph=True)

    def call():
        torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.inference_mode():
            latents = pipe.prepare_latents(batch, 4, 512, 512, dt, dev, torch.Generator(dev).manual_seed(1))
            emb = torch.cat([ne, pe])
            for i in range(steps):
                latents = compiled_step(latents, timesteps[i], alpha_t[i], alpha_prev[i], emb).clone()
        torch.cuda.synchronize()
        return time.perf_counter() - t, latents.float().clone()



torch.cuda.reset_peak_memory_stats()
with scope:
    first, _ = call()
    for _ in range(2):
        call()
    runs = [call() for _ in range(3)]
    _, syncs = count_gpu_waits(call)  # CPU/GPU waits in one call
times = sorted(t for t, _ in runs)
out = runs[0][1]
rel = ((out - reference).norm() / reference.norm()).item()
extra = {}
if "switch" in tokens:
    with scope:
        for b in (4, 1):
            pe = torch.randn(b, 77, 768, device=dev, dtype=dt, generator=g)
            ne = torch.randn(b, 77, 768, device=dev, dtype=dt, generator=g)
            extra[f"first_after_switch_to_bs{b}_s"] = round(call()[0], 2)
            extra[f"steady_bs{b}_steps_per_s"] = round(steps / sorted(call()[0] for _ in range(3))[1], 2)
if "profile" in tokens:
    from torch.profiler import ProfilerActivity, profile

    with scope, profile(activities=[ProfilerActivity.CUDA]) as prof:
        call()
    categories = {}
    for event in prof.key_averages():
        name = event.key.lower()
        kind = ("attention" if any(k in name for k in ("flash", "fmha", "attention", "sdpa")) else
                "conv" if any(k in name for k in ("conv", "fprop", "dgrad", "implicit", "winograd")) else
                "gemm" if any(k in name for k in ("gemm", "nvjet", "cutlass", "matmul", "sm90_xmma")) else
                "triton" if "triton" in name else "other")
        categories[kind] = categories.get(kind, 0.0) + event.device_time_total / 1e3 / steps  # ms per step
    top = sorted(prof.key_averages(), key=lambda e: -e.device_time_total)[:12]
    print("PROFILE", json.dumps({"ms_per_step": {k: round(v, 3) for k, v in categories.items()},
                                 "top": [(e.key[:90], round(e.device_time_total / 1e3 / steps, 3), e.count // steps) for e in top]}), flush=True)
res = dict(variant=variant, batch=batch, steps=steps, first_s=round(first, 2), steps_per_s=round(steps / times[1], 2),
           syncs_per_call=syncs,
           peak_gb=round(torch.cuda.max_memory_allocated() / 2**30, 2), rel_l2_vs_eager_sdpa=rel, **extra,
           gpu=torch.cuda.get_device_name(), torch=torch.__version__, diffusers=__import__("diffusers").__version__)
print("RESULT", json.dumps(res), flush=True)
