"""diffopt in one minute: time a Stable Diffusion pipeline, optimize it with one line, time it again,
check what changed in the output, then take it all back.

    python examples/quickstart.py                    # under a minute on a 2-core CPU (mostly compile)
    python examples/quickstart.py --no-compile       # seconds: attention processors + channels_last only
    python examples/quickstart.py --size small --steps 20 --device cuda

Nothing is downloaded: the UNet and VAE are built from small configs with random weights and the prompt
is random embeddings, so the "images" are noise. What the script shows is the workflow and the numbers:
speed before and after, the first-call compile cost, the output difference, and the round trip.
Everything runs in float32 so that the differences printed come from the optimizations, not the dtype.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

import diffopt
from diffopt.quiet import quiet_third_party

# UNet configs. "tiny" compiles in under a minute on a laptop CPU; "small" is closer to a real UNet's
# shape (two layers per block, 32x32 latents) and shows more of the speed-up, at a longer compile.
SIZES = {
    "tiny": dict(block_out_channels=(32, 64), layers_per_block=1, sample_size=16, cross_attention_dim=32),
    "small": dict(block_out_channels=(64, 128), layers_per_block=2, sample_size=32, cross_attention_dim=64),
}
#: Timed generations of each pipeline, eager and optimized taking turns, so that a burst of load from another
#: process slows both alike instead of one; the medians are compared.
TIMED_RUNS = 7
#: Untimed rounds first: a CPU's oneDNN kernels and caches settle over the first few calls of each pipeline.
WARMUP_ROUNDS = 2
#: Upper over lower quartile of one pipeline's timings above which the machine was too busy to trust the figure.
MAX_SPREAD = 1.5
# restore() puts the classic AttnProcessor back, which computes the same attention as the SDPA one the
# eager run used, in a different order: equal up to float32 rounding, not bit for bit.
RESTORE_TOLERANCE = 1e-4


def build_pipeline(size: str, device: str):
    """A StableDiffusionPipeline with a random UNet and VAE of the given size, and no text encoder."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    shape = SIZES[size]
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        **shape, in_channels=4, out_channels=4, attention_head_dim=8, norm_num_groups=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    )
    vae = AutoencoderKL(
        block_out_channels=(8, 16), latent_channels=4, norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
    )
    # Stable Diffusion's own scheduler settings (the bare defaults make diffusers print deprecation notes).
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, set_alpha_to_one=False, steps_offset=1,
    )
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=None, tokenizer=None, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def generate(pipe, steps: int) -> torch.Tensor:
    """One seeded generation; returns the latents (decoding noise into pixels would only add VAE time)."""
    g = torch.Generator().manual_seed(0)
    width = pipe.unet.config.cross_attention_dim
    prompt, negative = torch.randn(2, 1, 7, width, generator=g).to(pipe.device)
    with torch.inference_mode():
        latents = pipe(
            prompt_embeds=prompt, negative_prompt_embeds=negative, num_inference_steps=steps,
            output_type="latent", generator=torch.Generator().manual_seed(1),
        ).images
    # .cpu() waits for the GPU to finish (its work is asynchronous), so the timings below are complete.
    return latents.float().cpu()


def seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def interleaved_seconds(eager_pipe, pipe, steps: int) -> tuple[list[float], list[float]]:
    """Seconds of TIMED_RUNS generations of each pipeline, eager and optimized taking turns."""
    for _ in range(WARMUP_ROUNDS):
        generate(eager_pipe, steps), generate(pipe, steps)
    eager, optimized = [], []
    for _ in range(TIMED_RUNS):
        eager.append(seconds(lambda: generate(eager_pipe, steps)))
        optimized.append(seconds(lambda: generate(pipe, steps)))
    return eager, optimized


def spread(times: list[float]) -> float:
    """Upper over lower quartile: one slow outlier does not count, a busy machine's scatter does."""
    lower, _, upper = statistics.quantiles(times, n=4)
    return upper / lower


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=4, help="denoising steps per generation (default: 4)")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile (no compile wait)")
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny", help="UNet size (default: tiny)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="torch device (default: cuda if available, else cpu)")
    args = parser.parse_args(argv)

    # Two pipelines built alike (same seed, same weights): one stays eager, the other is optimized, so the two
    # can be timed in turns.
    eager_pipe, pipe = build_pipeline(args.size, args.device), build_pipeline(args.size, args.device)
    print(f"pipeline: StableDiffusionPipeline, {args.size} random UNet, {args.steps} steps, on {args.device}")

    # 1. Eager baseline. The first call pays one-off costs (allocations, lazy imports), so it is not timed.
    eager = generate(eager_pipe, args.steps)

    # 2. The one line. Everything it did, skipped or left unchanged is in the report. With no option named,
    # a feature the installed torch lacks is skipped with its reason; a named one (compile=True) would raise.
    report = diffopt.optimize(pipe, compile=False) if args.no_compile else diffopt.optimize(pipe)
    print(report)

    # 3. torch.compile is lazy: the first call traces and compiles. Time it apart from the steady state. On CUDA
    # the compile runs in a background process instead, while the first calls run uncompiled.
    compiled = [s.detail for s in report.applied if s.transform == "compile"]
    background = any("background process" in detail for detail in compiled)
    if background:
        print("compiling the UNet in a background process; the first calls run uncompiled meanwhile ...", flush=True)
    elif not args.no_compile:
        saved = any("loaded" in detail for detail in compiled)
        where = "GPU" if args.device.startswith("cuda") else f"{os.cpu_count()}-core CPU"
        if saved:
            # A warm start skips inductor's code generation; on a CPU the C++ compiler still runs for each kernel.
            speed = "seconds on a GPU; on a CPU, still tens of seconds" if where != "GPU" else "seconds"
            print(f"compiling the UNet from the compile saved by an earlier run ({speed}) ...", flush=True)
        else:
            print(f"compiling the UNet with torch.compile: the first call takes 20-60 s on a 2-core CPU, less on a "
                  f"bigger machine (this one: {where}), and is saved for the next run ...", flush=True)
    first_s = seconds(lambda: generate(pipe, args.steps))
    compile_wait_s = seconds(lambda: diffopt.wait_until_compiled(pipe))  # the timed calls below run compiled
    optimized = generate(pipe, args.steps)
    eager_times, optimized_times = interleaved_seconds(eager_pipe, pipe, args.steps)
    eager_s, optimized_s = statistics.median(eager_times), statistics.median(optimized_times)

    timed = f"(median of {TIMED_RUNS} generations, taking turns)"
    print(f"eager      : {args.steps / eager_s:8.2f} steps/s  {timed}")
    note = "torch.compile traces and compiles here, once" if not args.no_compile else "no compile"
    if background:
        note = f"uncompiled; the compile in the background finished {compile_wait_s:.1f} s after it"
    print(f"first call : {first_s:8.2f} s        ({note})")
    print(f"optimized  : {args.steps / optimized_s:8.2f} steps/s  {timed}")
    print(f"speed-up   : {eager_s / optimized_s:8.2f}x")
    worst = max(spread(eager_times), spread(optimized_times))
    if worst > MAX_SPREAD:
        print(f"warning    : timings varied {worst:.1f}x between runs (quartiles; the machine is busy?): the speed-up above is "
              "unreliable; run again on an idle machine")
    print(f"difference : relative L2 of latents vs eager = {rel_l2(optimized, eager):.1e}")

    # 4. Take it back: eager modules, original weight layout, classic attention processors.
    print(diffopt.restore(pipe))
    restored = rel_l2(generate(pipe, args.steps), eager)
    processors = sorted({type(p).__name__ for p in pipe.unet.attn_processors.values()})
    verdict = "matches eager" if restored <= RESTORE_TOLERANCE else "DOES NOT match eager"
    print(f"restore    : {verdict} (relative L2 = {restored:.1e}); attention processors: {', '.join(processors)}")
    return 0 if restored <= RESTORE_TOLERANCE else 1


if __name__ == "__main__":
    with quiet_third_party():  # torchao's and torch's messages about kernels this machine has no use for
        raise SystemExit(main())
