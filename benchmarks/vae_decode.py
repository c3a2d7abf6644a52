"""VAE decode and post-processing to PIL, the part of a call after the denoising loop: one variant per process.

    python benchmarks/vae_decode.py VARIANT MODEL BATCH [--dtype fp16|fp32]

VARIANT: eager (the decoder as diffusers builds it, SDPA attention, contiguous), channels_last, compile
(channels_last + torch.compile, no CUDA graphs), compile-cudagraphs (channels_last + mode="reduce-overhead").
MODEL: sd15 (512 px) or sdxl (1024 px), random weights in the public architectures. Prints one JSON line:
the first decode (it compiles, for compiled variants; cold when the process starts with empty inductor and
triton caches), the median decode, the median post-processing to PIL with diffusers' VaeImageProcessor and with
8-bit conversion on the device, and whether both give the same bytes.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch

from diffopt.bench.configs import build_model

LATENT = {"sd15": ("sd15-vae", 64), "sdxl": ("sdxl-vae", 128)}
VARIANTS = ("eager", "channels_last", "compile", "compile-cudagraphs")


def timed(fn, repeats):
    times, out = [], None
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times, out


def to_pil_on_device(image: torch.Tensor):
    from PIL import Image

    pixels = (image * 0.5 + 0.5).clamp(0, 1).float().mul(255).round().to(torch.uint8)
    array = pixels.permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in array]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("variant", choices=VARIANTS)
    parser.add_argument("model", choices=sorted(LATENT))
    parser.add_argument("batch", type=int)
    parser.add_argument("--dtype", choices=("fp16", "fp32"), default="fp16")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    from diffusers.image_processor import VaeImageProcessor

    dtype = torch.float16 if args.dtype == "fp16" else torch.float32
    name, side = LATENT[args.model]
    vae = build_model(name, device="cuda", dtype=dtype)
    latents = torch.randn(args.batch, 4, side, side, device="cuda", dtype=dtype, generator=None)
    with torch.inference_mode():
        reference = vae.decode(latents).sample.clone()  # eager, before any change: what every variant is compared with
    if args.variant != "eager":
        vae.decoder.to(memory_format=torch.channels_last)
    if args.variant.startswith("compile"):
        mode = "reduce-overhead" if args.variant == "compile-cudagraphs" else None
        vae.decoder.compile(fullgraph=True, mode=mode)

    def decode():
        with torch.inference_mode():
            return vae.decode(latents).sample.clone()

    first, image = timed(decode, 1)
    times, image = timed(decode, args.repeats)
    processor = VaeImageProcessor(vae_scale_factor=8)
    post_times, pil = timed(lambda: processor.postprocess(image, output_type="pil"), args.repeats)
    device_times, pil_device = timed(lambda: to_pil_on_device(image), args.repeats)
    same_bytes = all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(pil, pil_device))
    ref_pixels = np.stack([np.asarray(p) for p in processor.postprocess(reference, output_type="pil")]).astype(int)
    max_level = int(np.abs(np.stack([np.asarray(p) for p in pil]).astype(int) - ref_pixels).max())
    print("RESULT " + json.dumps({
        "variant": args.variant, "model": args.model, "batch": args.batch, "dtype": args.dtype,
        "first_decode_s": first[0], "decode_ms": 1e3 * statistics.median(times),
        "postprocess_ms": 1e3 * statistics.median(post_times), "postprocess_on_device_ms": 1e3 * statistics.median(device_times),
        "postprocess_same_bytes": same_bytes, "max_8bit_level_vs_eager": max_level,
        "relative_l2_vs_eager": ((image.float() - reference.float()).norm() / reference.float().norm()).item(),
        "torch": torch.__version__, "gpu": torch.cuda.get_device_name(),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
