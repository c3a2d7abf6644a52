"""One GPU vs CFG-parallel latency and data-parallel throughput, measured by one torchrun command.

    torchrun --nproc-per-node 2 examples/distributed_generate.py --json distributed.json
    torchrun --nproc-per-node 2 examples/distributed_generate.py --no-compile          # minutes shorter
    torchrun --nproc-per-node 2 examples/distributed_generate.py --optimizer regional  # compiles blocks only
    torchrun --nproc-per-node 2 examples/distributed_generate.py --model tiny         # CPU smoke test (gloo)

Every rank builds the same random-weight SDXL (rank 0's weights, broadcast) and feeds it the same random prompt
embeddings, so nothing is downloaded. Three phases:

1. one GPU: every rank warms up (and compiles) on its own, then rank 0 is timed while the others wait at a barrier,
   and times one VAE decode;
2. CFG-parallel: the two guidance halves on two ranks, timed from a common barrier (slowest rank counts);
3. data-parallel: --prompts images shared out over the ranks, throughput against one GPU's 1 / latency.

Latency includes the VAE decode, which CFG-parallel does not split (every rank decodes the whole image); the JSON
also gives the speed-up without it. --output-type latent leaves the decode out altogether.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
import torch.distributed as dist

from diffopt.bench.configs import model_config
from diffopt.distributed import enable_cfg_parallel, generate_data_parallel

# The public SDXL UNet architecture, shared with `diffopt bench`.
SDXL_UNET = model_config("sdxl-unet")
SDXL_VAE = dict(
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    layers_per_block=2,
    latent_channels=4,
    scaling_factor=0.13025,
    # As the fp16-fixed SDXL VAE: the stock config would cast the VAE to float32 on every call.
    force_upcast=False,
)
TINY_UNET = dict(
    sample_size=32,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(32, 64),
    layers_per_block=1,
    cross_attention_dim=32,
    norm_num_groups=8,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=8 * 6 + 32,
)
TINY_VAE = dict(
    block_out_channels=(8, 16),
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    latent_channels=4,
    norm_num_groups=8,
)
# (text tokens, text width, pooled width, image size) of the embeddings each model expects.
EMBEDDINGS = {"sdxl": (77, 2048, 1280, 1024), "tiny": (8, 32, 32, 64)}


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("sdxl", "tiny"), default="sdxl")
    parser.add_argument("--size", type=int, help="image height and width (default: 1024 for sdxl, 64 for tiny)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--guidance-scale", type=float, default=5.0)
    parser.add_argument("--dtype", choices=("float16", "bfloat16", "float32"), default="float16")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                        help="compile the UNet (default on); --no-compile saves the compile minutes")
    parser.add_argument("--optimizer", choices=("diffopt", "plain", "regional"), default="diffopt",
                        help="diffopt: diffopt.optimize(pipe); plain: channels_last + unet.compile(); regional: "
                        "channels_last + unet.compile_repeated_blocks(), the quickest compile")
    parser.add_argument("--compile-vae", action="store_true",
                        help="also optimize the VAE decoder (diffopt only): it runs unsplit on every rank")
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs per mode (the first one compiles)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per latency mode")
    parser.add_argument("--prompts", type=int, default=8, help="images for the data-parallel throughput")
    parser.add_argument("--output-type", choices=("pil", "np", "latent"), default="pil")
    parser.add_argument("--json", help="write the results here (rank 0)")
    parser.add_argument("--device", help="default: cuda:LOCAL_RANK if CUDA is available, else cpu")
    return parser.parse_args()


def init_distributed(requested: str | None) -> torch.device:
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device(requested or (f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        # Object collectives (data-parallel's gather) use the current device: each rank must have its own.
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def barrier(device: torch.device) -> None:
    if device.type == "cuda":
        dist.barrier(device_ids=[device.index])
    else:
        dist.barrier()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_pipeline(model: str, device: torch.device, dtype: torch.dtype):
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    torch.manual_seed(0)
    with device:  # initialize on the GPU: random SDXL weights take minutes on a CPU
        unet = UNet2DConditionModel(**(SDXL_UNET if model == "sdxl" else TINY_UNET))
        vae = AutoencoderKL(**(SDXL_VAE if model == "sdxl" else TINY_VAE))
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1, timestep_spacing="leading"
    )
    # No text encoders: the prompts arrive as embeddings, which the text encoders' few milliseconds would not change.
    pipe = StableDiffusionXLPipeline(
        vae=vae, unet=unet, scheduler=scheduler, text_encoder=None, text_encoder_2=None, tokenizer=None,
        tokenizer_2=None, add_watermarker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    pipe.to(device, dtype)
    # The seed should already give every rank the same weights; rank 0's copy makes sure of it, for a fraction of a
    # second, rather than let CFG-parallel's weight check stop the run.
    for module in (pipe.unet, pipe.vae):
        for tensor in [*module.parameters(), *module.buffers()]:
            dist.broadcast(tensor.data, src=0)
    return pipe


def optimize(pipe, args) -> dict:
    """Apply the chosen optimizer; return what was done, for the JSON."""
    if args.optimizer == "diffopt":
        import diffopt

        report = diffopt.optimize(
            pipe, attention="sdpa", compile=args.compile, memory_format="channels_last", compile_vae=args.compile_vae
        )
        if dist.get_rank() == 0:
            print(report, flush=True)
        return {"via": "diffopt.optimize", "compile": args.compile, "compile_vae": args.compile_vae,
                "report": report.to_dict()}
    pipe.unet.to(memory_format=torch.channels_last)
    if args.compile and args.optimizer == "regional":
        # Only the ~70 transformer blocks, one graph per shape: a fraction of the full UNet's compile time.
        pipe.unet.compile_repeated_blocks(fullgraph=True, dynamic=False)
    elif args.compile:
        pipe.unet.compile(fullgraph=True, dynamic=False)
    return {"via": args.optimizer, "compile": args.compile, "report": "channels_last UNet"}


def wait_until_compiled(pipe, args) -> None:
    """diffopt compiles on CUDA in a background process while the first calls run uncompiled: time compiled calls."""
    if args.optimizer == "diffopt":
        import diffopt

        diffopt.wait_until_compiled(pipe)


def embeddings(model: str, count: int, device: torch.device, dtype: torch.dtype) -> dict:
    tokens, width, pooled, _ = EMBEDDINGS[model]
    g = torch.Generator().manual_seed(1234)

    def draw(*shape):
        return torch.randn(count, *shape, generator=g).to(device, dtype)

    return dict(
        prompt_embeds=draw(tokens, width),
        negative_prompt_embeds=draw(tokens, width),
        pooled_prompt_embeds=draw(pooled),
        negative_pooled_prompt_embeds=draw(pooled),
    )


def timed(run, device: torch.device) -> tuple[float, object]:
    synchronize(device)
    start = time.perf_counter()
    result = run()
    synchronize(device)
    return time.perf_counter() - start, result


def as_array(images) -> torch.Tensor:
    import numpy as np

    if isinstance(images, torch.Tensor):
        return images.float().cpu()
    return torch.from_numpy(np.stack([np.asarray(image, dtype=np.float32) for image in images]))


def main() -> None:
    args = parse_args()
    device = init_distributed(args.device)
    rank, world = dist.get_rank(), dist.get_world_size()
    dtype = getattr(torch, args.dtype) if device.type == "cuda" else torch.float32
    size = args.size or EMBEDDINGS[args.model][3]

    def log(message):
        if rank == 0:
            print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)

    log(f"building {args.model} on {world} x {device.type} ({dtype})")
    pipe = build_pipeline(args.model, device, dtype)
    results = dict(
        model=args.model, size=size, steps=args.steps, guidance_scale=args.guidance_scale, dtype=str(dtype),
        world_size=world, output_type=args.output_type, torch=torch.__version__,
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        optimizer=optimize(pipe, args),
    )
    common = dict(num_inference_steps=args.steps, guidance_scale=args.guidance_scale, height=size, width=size,
                  output_type=args.output_type)
    one = embeddings(args.model, 1, device, dtype)

    def generate_one():
        return pipe(**one, **common, generator=torch.Generator().manual_seed(0)).images

    log("1/3 one GPU: warming up on every rank (the first call compiles)")
    for _ in range(args.warmup):
        generate_one()
    wait_until_compiled(pipe, args)
    barrier(device)
    if rank == 0:  # alone: the other GPUs wait at the barrier below
        single = [timed(generate_one, device) for _ in range(args.repeats)]
        single_images = single[-1][1]
        single = [seconds for seconds, _ in single]
        vae_decode = time_vae_decode(pipe, size, device, dtype, args) if args.output_type != "latent" else 0.0
        log(f"    one GPU: {statistics.median(single):.3f} s, of which VAE decode {vae_decode:.3f} s")
    barrier(device)

    log("2/3 CFG-parallel: warming up (the first call compiles the half batch)")
    with enable_cfg_parallel(pipe):
        for _ in range(args.warmup):
            generate_one()
        wait_until_compiled(pipe, args)  # the half batch is a new input shape
        cfg = []
        for _ in range(args.repeats):
            barrier(device)
            seconds, cfg_images = timed(generate_one, device)
            slowest = torch.tensor([seconds], dtype=torch.float64, device=device)
            dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
            cfg.append(slowest.item())
    log(f"    CFG-parallel: {statistics.median(cfg):.3f} s")

    log(f"3/3 data-parallel: {args.prompts} images over {world} ranks")
    many = embeddings(args.model, args.prompts, device, dtype)
    barrier(device)
    seconds, images = timed(lambda: generate_data_parallel(pipe, many, seed=0, **common), device)
    barrier(device)
    log(f"    data-parallel: {len(images) / seconds:.3f} images/s")

    if rank == 0:
        single_latency, cfg_latency = statistics.median(single), statistics.median(cfg)
        difference = (as_array(cfg_images) - as_array(single_images)).abs()
        results["single"] = dict(latency_s=single_latency, all_s=single, vae_decode_s=vae_decode)
        results["cfg_parallel"] = dict(
            latency_s=cfg_latency, all_s=cfg, speedup=single_latency / cfg_latency,
            # The VAE decode runs whole on every rank: the speed-up of what CFG-parallel does split.
            speedup_without_vae_decode=(single_latency - vae_decode) / (cfg_latency - vae_decode),
            max_abs_diff_vs_single=float(difference.nan_to_num(0.0).max()),
            nonfinite_fraction=float((~torch.isfinite(difference)).float().mean()),
        )
        results["data_parallel"] = dict(
            images=len(images), seconds=seconds, images_per_s=len(images) / seconds,
            single_images_per_s=1 / single_latency, speedup=len(images) / seconds * single_latency,
        )
        print(json.dumps(results, indent=2))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=2)
    barrier(device)  # gloo aborts a process that leaves while another is still connected
    dist.destroy_process_group()


def time_vae_decode(pipe, size: int, device: torch.device, dtype: torch.dtype, args) -> float:
    """Median seconds of one VAE decode of one image (as the pipeline does it), after a warm-up."""
    factor = pipe.vae_scale_factor
    latents = torch.randn(1, 4, size // factor, size // factor, generator=torch.Generator().manual_seed(0))
    latents = latents.to(device, dtype)

    def decode():
        with torch.no_grad():
            return pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False)[0]

    decode()
    return statistics.median(timed(decode, device)[0] for _ in range(args.repeats))


if __name__ == "__main__":
    main()
