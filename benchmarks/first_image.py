"""Time to the first image: from building an optimized pipeline to its first image, then the steady speed.

Run each recipe in its own process; point TORCHINDUCTOR_CACHE_DIR and TRITON_CACHE_DIR at empty directories for
a cold start, and DIFFOPT_CACHE_DIR at a directory an earlier run filled for a warm one. Prints one JSON line.

    python benchmarks/first_image.py diffopt sd15 1,4,1
    python benchmarks/first_image.py diffopt:dynamic_batch=True sd15 1,4,1
    python benchmarks/first_image.py diffusers-compile sd15 1
    python benchmarks/first_image.py eager sd15 1
    python benchmarks/first_image.py diffopt sd15 1,1@768,1       # BATCH@SIZE: a new resolution (SD1.5 and SDXL)
    python benchmarks/first_image.py diffopt sd3-medium 1,4,1     # any pipeline of diffopt bench (bf16 but SD1.5/SDXL)
    python benchmarks/first_image.py diffopt:background_compile=True sd15 1,4 --for=120   # every call's time, 120 s a shape
"""
import json
import sys
import time

import torch

import diffusers
from diffusers import DDIMScheduler, EulerDiscreteScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

from diffopt.bench.configs import build_model

flags = [a for a in sys.argv[1:] if a.startswith("--for=")]
argv = [a for a in sys.argv[1:] if not a.startswith("--for=")]
# --for=SECONDS: call each shape again and again for that long (at least six calls) and keep every call's time, the
# timeline of a recipe whose speed changes on its own (background_compile: eager calls, then compiled ones).
keep_calling = float(flags[-1].split("=", 1)[1]) if flags else None
recipe, model = argv[0], argv[1]
shapes = [(int(item.split("@")[0]), int(item.split("@")[1]) if "@" in item else None) for item in argv[2].split(",")]
steps = int(argv[3]) if len(argv) > 3 else (50 if model == "sd15" else 30 if model == "sdxl" else None)
device, dtype = "cuda", torch.float16 if model in ("sd15", "sdxl") else torch.bfloat16
start = time.perf_counter()
stage, size = None, None
if model not in ("sd15", "sdxl"):  # a pipeline of diffopt bench, with its own inputs and step count
    from diffopt.bench.pipelines import build_case

    if any(height for _, height in shapes):
        sys.exit("BATCH@SIZE is for sd15 and sdxl")
    (stage,) = build_case(model, size="full", device=torch.device(device), dtype=dtype, steps=steps).stages
    pipe, steps = stage.pipe, stage.steps
elif model == "sd15":
    unet, vae, size, context = build_model("sd15-unet", device=device, dtype=dtype), build_model("sd15-vae", device=device, dtype=dtype), 512, (77, 768)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=None, tokenizer=None, unet=unet, scheduler=DDIMScheduler(),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
else:
    unet, vae, size, context = build_model("sdxl-unet", device=device, dtype=dtype), build_model("sdxl-vae", device=device, dtype=dtype), 1024, (77, 2048)
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=None, text_encoder_2=None, tokenizer=None, tokenizer_2=None,
                                     unet=unet, scheduler=EulerDiscreteScheduler())
pipe.set_progress_bar_config(disable=True)
built = time.perf_counter() - start


def call(batch, height=None):
    if stage is not None:
        torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.inference_mode():
            out = stage.call(batch, "latent")
        torch.cuda.synchronize()
        return time.perf_counter() - t, out
    g = torch.Generator(device).manual_seed(0)
    kwargs = dict(prompt_embeds=torch.randn(batch, *context, device=device, dtype=dtype, generator=g),
                  negative_prompt_embeds=torch.randn(batch, *context, device=device, dtype=dtype, generator=g),
                  num_inference_steps=steps, height=height or size, width=height or size, output_type="latent")
    if model == "sdxl":
        kwargs.update(pooled_prompt_embeds=torch.randn(batch, 1280, device=device, dtype=dtype, generator=g),
                      negative_pooled_prompt_embeds=torch.randn(batch, 1280, device=device, dtype=dtype, generator=g))
    torch.cuda.synchronize()
    t = time.perf_counter()
    with torch.inference_mode():
        out = pipe(**kwargs).images
    torch.cuda.synchronize()
    return time.perf_counter() - t, out


start = time.perf_counter()
detail = ""
if recipe.startswith("diffopt"):
    import diffopt

    import ast

    options = {key: ast.literal_eval(value) for key, value in (item.split("=", 1) for item in recipe.split(":")[1:])}
    report = diffopt.optimize(pipe, **options)
    detail = [s.detail for s in report.applied if s.transform == "compile"]
elif recipe == "diffusers-compile":  # the diffusers docs' recipe: SDPA + channels_last + compile(reduce-overhead)
    pipe.unet.to(memory_format=torch.channels_last)
    pipe.unet = torch.compile(pipe.unet, mode="reduce-overhead", fullgraph=True)
optimize_s = time.perf_counter() - start
result = dict(recipe=recipe, model=model, steps=steps, gpu=torch.cuda.get_device_name(), torch=torch.__version__,
              diffusers=diffusers.__version__, build_s=round(built, 1), optimize_s=round(optimize_s, 2), compile=detail, shapes=[])
def compile_phases():
    """Seconds spent per compile phase so far (dynamo tracing, AOTAutograd, inductor, ...), and cache hits."""
    from torch._dynamo.utils import compile_times, counters

    names, values = compile_times(repr="csv", aggregate=True)
    phases = {n: round(float(v), 2) for n, v in zip(names, values) if float(v) >= 0.05}
    return dict(phases=phases, inductor={k: v for k, v in counters["inductor"].items() if "cache" in k},
                aot_autograd={k: v for k, v in counters["aot_autograd"].items() if "cache" in k or "hit" in k})


for index, (batch, height) in enumerate(shapes):
    first, latents = call(batch, height)
    if index == 0:
        result["first_compile"] = compile_phases()
    calls = [first]
    while len(calls) < 6 or (keep_calling is not None and sum(calls) < keep_calling):
        calls.append(call(batch, height)[0])
    times = sorted(calls[-5:])
    result["shapes"].append(dict(batch=batch, height=height or size, first_call_s=round(first, 2),
                                 steady_s=round(times[2], 4), steps_per_s=round(steps / times[2], 2)))
    if keep_calling is not None:
        result["shapes"][-1]["calls_s"] = [round(t, 3) for t in calls]
    if index == 0:
        result["latents"] = latents.float().cpu().flatten()[:4096].tolist()
    print("SHAPE", json.dumps(result["shapes"][-1]), flush=True)  # what a run cut short still shows
# This process's peak (the background compile's process holds its own memory besides).
result["peak_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
print("RESULT", json.dumps(result), flush=True)
