"""Which way of compiling a ControlNet pipeline survives CUDA graphs? (tiny random models, on CUDA)
    python benchmarks/controlnet_cudagraphs.py {diffopt|docs|unet_graphs_only}"""
import sys

import torch

sys.path.insert(0, "tests")
from conftest import run_pipeline, sd_pipeline, tiny_controlnet  # noqa: E402

import diffopt  # noqa: E402

variant = sys.argv[1]
pipe = sd_pipeline(controlnet=tiny_controlnet()).to("cuda")
run = lambda: run_pipeline(pipe.to("cuda"), steps=3)  # noqa: E731
if variant == "diffopt":
    diffopt.optimize(pipe)
elif variant == "docs":
    pipe.unet = torch.compile(pipe.unet, mode="reduce-overhead", fullgraph=True)
    pipe.controlnet = torch.compile(pipe.controlnet, mode="reduce-overhead", fullgraph=True)
elif variant == "unet_graphs_only":
    pipe.unet.compile(mode="reduce-overhead", fullgraph=True)
    pipe.controlnet.compile(fullgraph=True)
try:
    for i in range(4):
        run()
    print("VARIANT", variant, "OK")
except Exception as e:  # noqa: BLE001
    print("VARIANT", variant, "FAILED", type(e).__name__, str(e)[:300])
