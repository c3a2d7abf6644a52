"""Regional compilation: ``torch.compile`` of a transformer's repeated blocks instead of the whole model.

Flux has 19 double-stream and 38 single-stream blocks, SD3 Medium 24 joint blocks: the same code on the same shapes,
each with its own weights. Compiled whole, the model is one graph that inductor lowers and generates code for block
by block, so the first call pays for every block. Compiled here, each block class's ``forward`` is compiled once and
takes the block as an argument (its weights are graph inputs), so every block of a class runs the same graph (or one
more, where the first block of a class gets its input in another memory layout: Flux's first single-stream block),
and the first call pays for one block of each class. The code around the blocks (embeddings, final norm and
projection) runs eager. UNets are not covered: their down and up blocks differ in channels and resolution, so there is nothing to
share (compiling them one by one takes longer than compiling the whole UNet).

The first-block cache (cache.py) compiles this way too, because it decides between blocks on the host whether to
run the rest. Used alone (``compile_blocks``, by default for a denoiser whose blocks repeat), a hook on the model's
``forward`` logs the first call and keeps the compile cache (compile_cache.py) as the whole-model compiled call does.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Callable, Dict, List, Optional

import torch

from ..layers import Applied, InstanceHook, UnpicklableHook, layers_of, mark
from ..plan import Step
from ..report import SKIPPED
from .compile import (
    NAME, InputShapes, asks_for_cuda_graphs, compiled_report, compiling_notice, describe, graphs_compiled,
    mark_batch_dynamic, offloaded_inside, options_for, own_block_entry, raised_recompile_limit,
)

logger = logging.getLogger(__name__)


def _block_lists(model: torch.nn.Module) -> Dict[str, torch.nn.ModuleList]:
    """The model's top-level ``*blocks`` ModuleLists by name (``transformer_blocks``, ``single_transformer_blocks``)."""
    return {
        name: child
        for name, child in model.named_children()
        if name.endswith("blocks") and isinstance(child, torch.nn.ModuleList)
    }


def transformer_blocks(model: torch.nn.Module) -> List[torch.nn.Module]:
    """The repeated blocks: members of the model's ``*blocks`` ModuleLists, the modules diffusers' first-block cache
    hooks."""
    return [block for blocks in _block_lists(model).values() for block in blocks]


def _signature(block: torch.nn.Module) -> tuple:
    """What makes two blocks run one graph: their class and their weights' shapes and dtypes."""
    return (type(block),) + tuple((tuple(p.shape), p.dtype) for p in block.parameters())


#: The block lists of a UNet (and of its ControlNets): stages that change resolution and channels one to the next.
UNET_STAGES = ("down_blocks", "up_blocks")


def why_blocks_do_not_repeat(model: torch.nn.Module) -> Optional[str]:
    """Why ``model`` has no repeated blocks to compile one graph per class for, or None when it has: two blocks of
    one top-level ``*blocks`` list alike (one class, the same weight shapes). A block unlike the others (SD3's last,
    which has no context feed-forward) gets a graph of its own. A UNet is never one: even where two of its stages
    happen to be alike (a DDPM UNet2DModel's first two down blocks, both 128 channels), the rest differ, and compiling
    its stages one by one takes longer than compiling the whole UNet."""
    name, lists = type(model).__name__, _block_lists(model)
    if not any(len(blocks) for blocks in lists.values()):
        return f"{name} has no lists of transformer blocks"
    stages = [list_name for list_name in UNET_STAGES if list_name in lists]
    if stages:
        return (f"the blocks of {name}.{' and .'.join(stages)} are a UNet's stages, which differ in resolution and "
                "channels (compiling them one by one takes longer than the whole UNet); compile it whole")  # fmt: skip
    for blocks in lists.values():
        signatures = [_signature(block) for block in blocks]
        if len(set(signatures)) < len(signatures):
            return None
    names = " and .".join(sorted(lists))
    if all(len(blocks) < 2 for blocks in lists.values()):
        return f"{name}.{names} hold one block each, so no graph would be shared; compile it whole"
    return (f"the blocks of {name}.{names} differ from one another in class or weight shapes, so no graph would be "
            "shared; compile it whole")  # fmt: skip


def why_blocks_are_hooked(model: torch.nn.Module) -> Optional[str]:
    """Why compiling the block classes' ``forward`` would skip something, or None: a block whose ``forward`` was
    replaced on the instance by something other than diffopt (diffusers' cache hooks from ``enable_cache``, a
    patch). The compiled function runs the class's ``forward``, so that replacement would silently stop running;
    compiled whole, the model calls it as eager code does. diffusers' hooks that diffopt's own first-block cache put
    there are taken off before the blocks are compiled again."""
    if any(layer.transform == "cache" for layer in layers_of(model)):
        return None
    for list_name, blocks in _block_lists(model).items():
        for index, block in enumerate(blocks):
            forward = vars(block).get("forward")
            if forward is not None and not isinstance(forward, InstanceHook):
                return (f"{type(model).__name__}.{list_name}.{index} has a forward of its own on the instance (a "
                        "diffusers cache hook from enable_cache, or a patch), which the compiled blocks would skip")  # fmt: skip
    return None


class _NotPickled(UnpicklableHook):
    """Compiled code cannot be pickled; a deep copy shares what it compiled (the compiled function takes the block as
    an argument, so it serves the copy's blocks too)."""

    shared = ("compiled", "cache")
    unpicklable = "compiled blocks"


class _Uncompiled:
    """Shared by a model's compiled blocks and the hook on its ``forward``: set for a call of the model under an
    offload hook that moves every layer's weights inside the forward (accelerate's sequential offload, added after
    optimize). The compiled blocks cannot trace the hooks on their layers (a hard error under fullgraph=True), so
    they run their eager forward then, as a model compiled whole does (compile.CompiledCall)."""

    def __init__(self):
        self.now = False


class _CompiledBlock(_NotPickled):
    """A transformer block's ``forward`` through the compiled class function (shared by the blocks of a class)."""

    transform = "compile"

    def __init__(self, owner, function: Callable, dynamic_batch: bool, uncompiled: _Uncompiled):
        super().__init__(owner, "forward")
        self.compiled, self.dynamic_batch, self.uncompiled = function, dynamic_batch, uncompiled

    def around(self, *args, **kwargs):
        if self.uncompiled.now:
            return self.inner(*args, **kwargs)
        if self.dynamic_batch:  # as compile does for whole models: one graph for every batch size
            mark_batch_dynamic(args, kwargs)
        with raised_recompile_limit():  # as for whole models: a new shape or LoRA must not hit dynamo's limit of 8
            return self.compiled(self.owner, *args, **kwargs)


#: How long the first call of a transformer compiled block by block takes, as the notices say it.
BLOCKS_FIRST_CALL = "seconds to a minute"


class _BlocksCompiled(_NotPickled):
    """On the model's ``forward``: says what the first call compiles and how long it took, and saves the compiled
    blocks to the compile cache after every call that compiled something (a new shape too)."""

    transform = "compile"

    def __init__(self, owner, name: str, count: int, cache=None, uncompiled: Optional[_Uncompiled] = None,
                 dynamic_batch: bool = False):  # fmt: skip
        super().__init__(owner, "forward")
        self.label, self.count, self.cache, self.calls = name, count, cache, 0
        self.uncompiled, self.warned = uncompiled or _Uncompiled(), False
        self.shapes = InputShapes(name, BLOCKS_FIRST_CALL, dynamic_batch)

    def around(self, *args, **kwargs):
        why = offloaded_inside(self.owner, self.label)
        self.uncompiled.now = why is not None
        if why and not self.warned:  # once, as for a model compiled whole
            self.warned = True
            logger.warning("diffopt: %s; running its blocks uncompiled", why)
        first = self.calls == 0
        self.calls += 1
        self.shapes.notice(args, kwargs)
        if first:
            compiling_notice(f"the {self.count} blocks of {self.label}, one graph per block class", self.cache,
                             BLOCKS_FIRST_CALL)  # fmt: skip
        graphs, started = graphs_compiled(), time.perf_counter()
        with raised_recompile_limit():  # once for all the blocks of this call (theirs are nested, so free)
            output = self.inner(*args, **kwargs)
        if first or graphs_compiled() != graphs:
            compiled_report(f"the blocks of {self.label}", self.cache, first, time.perf_counter() - started)
        return output


def apply_block_compile(
    model: torch.nn.Module, options: Dict[str, Any], dynamic_batch: bool = False, name: Optional[str] = None,
    cache=None, purpose: str = "for the first-block cache",
) -> Optional[Applied]:  # fmt: skip
    """``torch.compile`` each transformer block's ``forward`` on its instance, one compiled function per block class
    (of this model: another model's blocks of the same class get their own, see compile.own_block_entry).

    With ``name`` (``compile_blocks=True``), a hook on the model's ``forward`` also logs the first call and saves
    to ``cache`` (a compile_cache.Entry). Without it (the first-block cache), hooks installed afterwards run in eager
    code around the compiled blocks: the cache decides on the host (``.item()`` of a residual difference) whether
    to run the remaining blocks, which inside one compiled model would be a graph break.
    """
    blocks = transformer_blocks(model)
    if not blocks:
        return None
    since, compiled, uncompiled = mark(), {}, _Uncompiled()
    for block in blocks:
        cls = type(block)
        if cls not in compiled:
            compiled[cls] = torch.compile(own_block_entry(model, cls), **options)
        function = compiled[cls]
        _CompiledBlock(block, function, dynamic_batch, uncompiled).install()
    if name is not None:
        _BlocksCompiled(model, name, len(blocks), cache, uncompiled, dynamic_batch).install()
    kinds = ", ".join(sorted(cls.__name__ for cls in compiled))
    detail = f"{describe(options)} on each of {len(blocks)} blocks ({kinds}), {purpose}"
    detail += ", dynamic batch" if dynamic_batch else ""
    detail += f"; {cache.detail}" if cache is not None else ""
    return Applied(detail, since, model)


# ---- planning ---------------------------------------------------------------------------------------------------


def plan(ctx) -> List[Step]:
    """The denoiser's repeated blocks instead of the whole denoiser (ControlNets and the VAE decoder compile as
    before). Runs before compile's own plan, which then leaves the denoiser to this step.

    ``compile_blocks=None`` (the default) takes this path for a denoiser whose blocks repeat, unless compile['mode']
    names CUDA graphs: on an H200 it made Flux.1-schnell's first call 9.6 s instead of 74 s and SD3 Medium's 7.5 s
    instead of 56 s, at 0.98-0.99x the whole model's steady speed (docs/benchmarks.md). UNets compile whole."""
    setting = ctx.config.compile_blocks
    if setting is False:
        return []
    denoiser = ctx.denoiser()
    if denoiser is None or ctx.compile_options.get(denoiser.name) is None or denoiser.name in ctx.block_compiled:
        return []  # not compiled (the reason is reported), or the first-block cache compiles its blocks already
    reason = why_blocks_do_not_repeat(denoiser.module)
    if setting is None and (reason or asks_for_cuda_graphs(ctx.config)):
        return []  # compiled whole: a UNet, or CUDA graphs asked for by name, which the whole model has run with
    if reason:
        raise ValueError(f"compile_blocks=True: {reason}")
    hooked = why_blocks_are_hooked(denoiser.module)
    if hooked and setting:
        raise ValueError(f"compile_blocks=True: {hooked}; remove it (disable_cache()) or pass compile_blocks=False")
    if hooked:
        ctx.report.add(denoiser.name, NAME, SKIPPED, f"blocks not compiled one by one: {hooked}; compiled whole")
        return []
    chosen = "compile_blocks" if setting else "compile_blocks, the default for transformers"
    options = options_for(denoiser, ctx, ctx.report, per_block=chosen)
    ctx.block_compiled.add(denoiser.name)
    if ctx.config.background_compile:
        ctx.report.add(denoiser.name, "background_compile", SKIPPED, "its blocks compile in seconds, in this process "
                       "(background_compile is for models compiled whole)")  # fmt: skip
    dynamic = ctx.config.dynamic_batch
    purpose = "one graph per block class" + ("" if setting else " (compile_blocks=False compiles it whole)")

    def apply():
        # Its own cache entry (loaded here, when the step runs, never in optimize's dry run): the key holds the
        # blocks marker, so these artifacts never stand in for the whole model's.
        cache = ctx.compile_cache(denoiser, {**options, "compile_blocks": True})
        return apply_block_compile(denoiser.module, options, dynamic, denoiser.name, cache, purpose)

    return [Step(denoiser.name, NAME, apply)]
