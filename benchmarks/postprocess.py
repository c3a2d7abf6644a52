"""Time diffusers' VaeImageProcessor.postprocess(output_type="pil") against diffopt's device_postprocess hook on a
decoded SD1.5-sized image (fp16, 512x512, on the GPU), and check that both give the same bytes.

    python benchmarks/postprocess.py [BATCH ...]

Prints one RESULT json line per batch size: median milliseconds of each over 30 calls after 5 warm calls, the
image already decoded (the GPU idle) when each call starts.
"""
import json
import statistics
import sys
import time

import torch
from diffusers.image_processor import VaeImageProcessor

from diffopt.transforms.postprocess import apply_device_postprocess


def median_ms(call, image, repeats=30, warm=5):
    times = []
    for i in range(warm + repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        images = call(image)
        elapsed = time.perf_counter() - start
        if i >= warm:
            times.append(elapsed * 1e3)
    return statistics.median(times), images


for batch in [int(b) for b in sys.argv[1:]] or [1, 4]:
    torch.manual_seed(0)
    image = (torch.randn(batch, 3, 512, 512, device="cuda") * 0.6).half()  # a decoded image: mostly in [-1, 1]
    flags = [True] * batch  # what StableDiffusionPipeline passes without a safety checker
    plain, hooked = VaeImageProcessor(vae_scale_factor=8), VaeImageProcessor(vae_scale_factor=8)
    apply_device_postprocess(hooked)
    diffusers_ms, expected = median_ms(lambda x: plain.postprocess(x, output_type="pil", do_denormalize=flags), image)
    hooked_ms, got = median_ms(lambda x: hooked.postprocess(x, output_type="pil", do_denormalize=flags), image)
    same = [a.tobytes() for a in expected] == [b.tobytes() for b in got]
    print("RESULT", json.dumps(dict(batch=batch, diffusers_ms=round(diffusers_ms, 2), device_ms=round(hooked_ms, 2),
                                    identical=same, gpu=torch.cuda.get_device_name())))
