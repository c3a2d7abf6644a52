"""Run a diffusers pipeline on several processes launched by ``torchrun`` or ``accelerate launch``.

It reuses the process group the launcher set up (``torch.distributed.init_process_group()``) and never starts
processes itself. Three ways to use more than one GPU:

* :func:`generate_data_parallel` - more images per second: prompts are shared out, images come back in order.
* :func:`enable_cfg_parallel` - one image sooner: the two classifier-free-guidance halves run on two ranks.
* :func:`enable_context_parallel` - one image sooner on transformers that diffusers can context-parallelize.

See docs/distributed.md.
"""

from .cfg_parallel import CFGParallel, cfg_parallel_group, disable_cfg_parallel, enable_cfg_parallel, new_cfg_group
from .context_parallel import (
    ContextParallel,
    context_parallel_unavailable,
    disable_context_parallel,
    enable_context_parallel,
)
from .data_parallel import gather, generate_data_parallel, shard

__all__ = [
    "CFGParallel",
    "ContextParallel",
    "cfg_parallel_group",
    "context_parallel_unavailable",
    "disable_cfg_parallel",
    "disable_context_parallel",
    "enable_cfg_parallel",
    "enable_context_parallel",
    "gather",
    "generate_data_parallel",
    "new_cfg_group",
    "shard",
]
