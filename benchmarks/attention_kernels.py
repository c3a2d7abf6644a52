"""Which SDPA kernel torch picks by itself, and what each kernel costs, at the attention shapes of SD1.5 (batch 1
with classifier-free guidance, 512 px), SD3 Medium and Flux.1-dev (1024 px). Run once per kernel, each in a new
process, so that the first call of each shape includes whatever the kernel builds the first time it sees it:

    for kernel in default cudnn flash; do python benchmarks/attention_kernels.py $kernel; done

Prints one JSON line: per shape, the first call in ms and the mean of 50 calls in us (CUDA events);
for "default", also the names of the attention kernels torch launched.
"""
import json
import sys
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

kernel = sys.argv[1]
backend = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION, "default": None}[kernel]
half, bf16 = torch.float16, torch.bfloat16
SHAPES = {  # name: (batch, heads, query length, key length, head dim, dtype)
    "sd15-64x64-self": (2, 8, 4096, 4096, 40, half), "sd15-64x64-cross": (2, 8, 4096, 77, 40, half),
    "sd15-32x32-self": (2, 8, 1024, 1024, 80, half), "sd15-32x32-cross": (2, 8, 1024, 77, 80, half),
    "sd15-16x16-self": (2, 8, 256, 256, 160, half), "sd15-8x8-self": (2, 8, 64, 64, 160, half),
    "sd3": (2, 24, 4429, 4429, 64, bf16), "flux-dev": (1, 24, 4608, 4608, 128, bf16),
}


def inputs(batch, heads, queries, keys, dim, dtype):
    return (torch.randn(batch, heads, n, dim, device="cuda", dtype=dtype) for n in (queries, keys, keys))


result = {"kernel": kernel, "torch": torch.__version__, "gpu": torch.cuda.get_device_name()}
for name, shape in SHAPES.items():
    q, k, v = inputs(*shape)
    try:
        with sdpa_kernel(backend) if backend is not None else torch.no_grad():
            torch.cuda.synchronize()
            start = time.perf_counter()
            F.scaled_dot_product_attention(q, k, v)
            torch.cuda.synchronize()
            first = time.perf_counter() - start
            for _ in range(5):
                F.scaled_dot_product_attention(q, k, v)
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            for _ in range(50):
                F.scaled_dot_product_attention(q, k, v)
            end.record()
            torch.cuda.synchronize()
        result[name] = dict(first_ms=round(first * 1e3, 1), kernel_us=round(begin.elapsed_time(end) / 50 * 1e3, 1))
    except RuntimeError as error:  # a kernel that cannot run this shape
        result[name] = repr(error)[:120]
if backend is None:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profile:
        for shape in SHAPES.values():
            F.scaled_dot_product_attention(*inputs(*shape))
        torch.cuda.synchronize()
    result["kernels_launched"] = sorted({e.name[:60] for e in profile.events() if any(
        word in e.name.lower() for word in ("sdpa", "flash", "fmha"))})
print(json.dumps(result))
