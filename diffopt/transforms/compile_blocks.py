"""Regional compilation: ``torch.compile`` of a transformer's repeated blocks instead of the whole model.

Flux has 19 double-stream and 38 single-stream blocks, SD3 Medium 24 joint blocks: the same code on the same shapes,
each with its own weights. Compiled whole, the model is one graph that inductor lowers and generates code for block
by block, so the first call pays for every block. Compiled here, each block class's ``forward`` is compiled once and
takes the block as an argument (its weights are graph inputs), so every block of a class runs the same graph (or one
more, where the first block of a class gets its input in another memory layout: Flux's first single-stream block),
and the first call pays for one block of each class. The code around the blocks (embeddings, final norm and projection) runs
eager. UNets are not covered: their down and up blocks differ in channels and resolution, so there is nothing to
share (compiling them one by one takes longer than compiling the whole UNet).

The first-block cache (cache.py) compiles this way too, because it decides between blocks on the host whether to
run the rest. Used alone (``compile_blocks=True``), a hook on the model's ``forward`` logs the first call and keeps
the compile cache (compile_cache.py) as the whole-model compiled call does.
"""
from __future__ import annotations

import time
from typing import Any, Callable, Dict, List, Optional

import torch

from ..layers import Applied, InstanceHook, mark
from ..plan import Step
from .compile import NAME, compiled_report, compiling_notice, describe, graphs_compiled, mark_batch_dynamic, options_for


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


def why_blocks_do_not_repeat(model: torch.nn.Module) -> Optional[str]:
    """Why ``model`` has no repeated blocks to compile one graph per class for, or None when it has: every
    top-level ``*blocks`` list holds blocks of one class (a UNet's down and up blocks are of several)."""
    lists = _block_lists(model)
    if not any(len(blocks) for blocks in lists.values()):
        return f"{type(model).__name__} has no lists of transformer blocks"
    mixed = sorted(name for name, blocks in lists.items() if len({type(block) for block in blocks}) > 1)
    if mixed:
        return (f"the blocks of {type(model).__name__}.{mixed[0]} are of different classes and shapes (a UNet's), so "
                "no graph would be shared; compile it whole")  # fmt: skip
    return None


class _NotPickled(InstanceHook):
    """Compiled code cannot be pickled; ``copy.deepcopy`` copies the hook with its module and shares what it
    compiled (the compiled function takes the block as an argument, so it serves the copy's blocks too)."""

    shared = ("compiled", "cache")

    def __reduce_ex__(self, protocol):
        raise TypeError("diffopt: compiled blocks cannot be pickled; call diffopt.restore(pipe) before pickling")

    def __deepcopy__(self, memo):
        from copy import deepcopy

        twin = object.__new__(type(self))
        memo[id(self)] = twin
        for key, value in vars(self).items():
            setattr(twin, key, value if key in self.shared else deepcopy(value, memo))
        return twin


class _CompiledBlock(_NotPickled):
    """A transformer block's ``forward`` through the compiled class function (shared by the blocks of a class)."""

    transform = "compile"

    def __init__(self, owner, function: Callable, dynamic_batch: bool):
        super().__init__(owner, "forward")
        self.compiled, self.dynamic_batch = function, dynamic_batch

    def around(self, *args, **kwargs):
        if self.dynamic_batch:  # as compile does for whole models: one graph for every batch size
            mark_batch_dynamic(args, kwargs)
        return self.compiled(self.owner, *args, **kwargs)


class _BlocksCompiled(_NotPickled):
    """On the model's ``forward``: says what the first call compiles and how long it took, and saves the compiled
    blocks to the compile cache after every call that compiled something (a new shape too)."""

    transform = "compile"

    def __init__(self, owner, name: str, count: int, cache=None):
        super().__init__(owner, "forward")
        self.label, self.count, self.cache, self.calls = name, count, cache, 0

    def around(self, *args, **kwargs):
        first = self.calls == 0
        self.calls += 1
        if first:
            compiling_notice(f"the {self.count} blocks of {self.label}, one graph per block class", self.cache,
                             "seconds to a minute")  # fmt: skip
        graphs, started = graphs_compiled(), time.perf_counter()
        output = self.inner(*args, **kwargs)
        if first or graphs_compiled() != graphs:
            compiled_report(f"the blocks of {self.label}", self.cache, first, time.perf_counter() - started)
        return output


def apply_block_compile(
    model: torch.nn.Module, options: Dict[str, Any], dynamic_batch: bool = False, name: Optional[str] = None,
    cache=None, purpose: str = "for the first-block cache",
) -> Optional[Applied]:  # fmt: skip
    """``torch.compile`` each transformer block's ``forward`` on its instance, one compiled function per block class.

    With ``name`` (``compile_blocks=True``), a hook on the model's ``forward`` also logs the first call and saves
    to ``cache`` (a compile_cache.Entry). Without it (the first-block cache), hooks installed afterwards run in eager
    code around the compiled blocks: the cache decides on the host (``.item()`` of a residual difference) whether
    to run the remaining blocks, which inside one compiled model would be a graph break.
    """
    blocks = transformer_blocks(model)
    if not blocks:
        return None
    since, compiled = mark(), {}
    for block in blocks:
        cls = type(block)
        function = compiled.setdefault(cls, torch.compile(cls.forward, **options))
        _CompiledBlock(block, function, dynamic_batch).install()
    if name is not None:
        _BlocksCompiled(model, name, len(blocks), cache).install()
    kinds = ", ".join(sorted(cls.__name__ for cls in compiled))
    detail = f"{describe(options)} on each of {len(blocks)} blocks ({kinds}), {purpose}"
    detail += ", dynamic batch" if dynamic_batch else ""
    detail += f"; {cache.detail}" if cache is not None else ""
    return Applied(detail, since, model)


# ---- planning ---------------------------------------------------------------------------------------------------


def plan(ctx) -> List[Step]:
    """``compile_blocks=True``: the denoiser's repeated blocks instead of the whole denoiser (ControlNets and the VAE
    decoder compile as before). Runs before compile's own plan, which then leaves the denoiser to this step."""
    if not ctx.config.compile_blocks:
        return []
    denoiser = ctx.denoiser()
    if denoiser is None or ctx.compile_options.get(denoiser.name) is None or denoiser.name in ctx.block_compiled:
        return []  # not compiled (the reason is reported), or the first-block cache compiles its blocks already
    reason = why_blocks_do_not_repeat(denoiser.module)
    if reason:
        raise ValueError(f"compile_blocks=True: {reason}")
    options = options_for(denoiser, ctx, ctx.report, per_block="compile_blocks")
    ctx.block_compiled.add(denoiser.name)
    dynamic = ctx.config.dynamic_batch

    def apply():
        # Its own cache entry (loaded here, when the step runs, never in optimize's dry run): the key holds the
        # blocks marker, so these artifacts never stand in for the whole model's.
        cache = ctx.compile_cache(denoiser, {**options, "compile_blocks": True})
        return apply_block_compile(denoiser.module, options, dynamic, denoiser.name, cache, "one graph per block class")

    return [Step(denoiser.name, NAME, apply)]
