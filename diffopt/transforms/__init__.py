"""One file per transform. Each holds its planner, ``plan(ctx) -> [Step]`` (which reads its options from the
config, checks its gates, and reports what it skips and why), its ``apply_*`` function, and the layers that record
what it changed on the objects it changed, so that undo needs nothing but those objects.

:data:`ORDER` is the order they are planned and applied in; ``restore`` undoes in exactly the reverse order.
"""
from . import (
    attention_backend,
    cache,
    compile,
    compile_blocks,
    fuse_projections,
    memory_format,
    postprocess,
    quantize,
    timesteps,
)

# Processors first (compile must trace the final ones; fusing swaps some processors for fused ones, so it follows
# the attention family); memory format before compile (compiled graphs specialize on weight strides); quantization
# before compile (dynamo traces through torchao's weight subclasses, so the 8-bit matmuls and the activation
# quantization become part of the graph inductor fuses; quantizing a compiled module would swap the parameters its
# graph guards on, or leave CUDA graphs replaying the old weights); then CPU timesteps and the step cache (both hook
# the scheduler; the timesteps hook goes first so that it comes off last), the 8-bit image conversion anywhere
# before compile (it hooks only the image processor, which nothing else touches), compile last: it traces the cached
# forward, so that the block wrappers and the clock flag they read become the guards of two graphs (full step,
# cached step). The first-block cache is the exception that proves the order: it must wrap blocks that are already
# compiled, so its planner plans both. compile_blocks (a transformer's repeated blocks) runs just before compile and
# takes the denoiser from it.
ORDER = (attention_backend, fuse_projections, memory_format, quantize, timesteps, cache, postprocess, compile_blocks, compile)
