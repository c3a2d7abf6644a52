"""CUDA graphs of a model's eager forward, for the calls that run uncompiled while a background compile runs.

An eager SD1.5 UNet step launches about a thousand small kernels, and the host is the bottleneck: on an H200 an
image took 1.37 s eager against 0.33 s compiled. Recorded once per input signature into a ``torch.cuda.CUDAGraph``,
the same kernels replay with one launch, so the calls before the compiled code is ready run at the speed of the
GPU, with nothing compiled: recording costs three eager calls (two to warm up cuBLAS and cuDNN, one to record).

A replay reads its inputs from the buffers it was recorded with and the weights from where they were, so each call
copies its tensors into those buffers, and a graph is dropped when any weight has moved (a LoRA loaded, a model
moved) and recorded again. Outputs are copied out, so a later replay never overwrites what a caller kept. Where a
recording fails (a forward that synchronizes with the host, a CPU input), that signature runs plain eager code.
"""
from __future__ import annotations

import logging
from typing import Any, Dict, Hashable, Optional, Tuple

import torch
from torch.utils._pytree import tree_flatten, tree_map_only, tree_unflatten

logger = logging.getLogger(__name__)
#: Warm-up calls before recording: the first call picks cuBLAS/cuDNN algorithms and allocates their workspaces,
#: which must not happen during the recording.
WARMUP_CALLS = 2


class Recorded:
    """One signature's graph: its input buffers, its output and the weights it reads."""

    def __init__(self, graph, inputs, output, weights):
        self.graph, self.inputs, self.output, self.weights = graph, inputs, output, weights

    def replay(self, args, kwargs):
        flat, _ = tree_flatten((args, kwargs))
        for buffer, value in zip(self.inputs, flat):
            if isinstance(buffer, torch.Tensor):
                buffer.copy_(value)
        self.graph.replay()
        return tree_map_only(torch.Tensor, torch.clone, self.output)


def weight_pointers(module: torch.nn.Module) -> Tuple[int, ...]:
    return tuple(t.data_ptr() for t in module.parameters()) + tuple(t.data_ptr() for t in module.buffers())


class EagerGraphs:
    """The recorded eager graphs of one CUDA model, per call signature."""

    def __init__(self, module: torch.nn.Module, name: str):
        self.module, self.name = module, name
        self.recorded: Dict[Hashable, Optional[Recorded]] = {}  # None: recording failed, run plain eager code
        self.replays = 0

    def call(self, signature: Hashable, args, kwargs, record: bool = True) -> Any:
        """The module's output for this call, from the graph recorded for ``signature`` (recorded now if new and
        ``record``; plain eager code if not)."""
        recorded = self.recorded.get(signature, False)
        if recorded is not False and recorded is not None and recorded.weights != weight_pointers(self.module):
            recorded = False  # a weight moved: the graph would read the old memory
        if recorded is False and record:
            recorded = self.recorded[signature] = self._record(args, kwargs)
        if not recorded:
            return self.module._call_impl(*args, **kwargs)
        self.replays += 1
        return recorded.replay(args, kwargs)

    def _record(self, args, kwargs) -> Optional[Recorded]:
        flat, spec = tree_flatten((args, kwargs))
        tensors = [t for t in flat if isinstance(t, torch.Tensor)]
        if not tensors or any(not t.is_cuda for t in tensors):
            return None  # a CPU input would be read once, at recording time
        device = tensors[0].device
        inputs = [t.clone() if isinstance(t, torch.Tensor) else t for t in flat]
        static_args, static_kwargs = tree_unflatten(inputs, spec)
        try:
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                for _ in range(WARMUP_CALLS):
                    self.module._call_impl(*static_args, **static_kwargs)
            torch.cuda.current_stream(device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                output = self.module._call_impl(*static_args, **static_kwargs)
        except Exception as error:  # noqa: BLE001 - not recordable: plain eager calls, as without this
            logger.warning("diffopt: %s: its uncompiled calls run without CUDA graphs (recording failed: %s: %s)",
                           self.name, type(error).__name__, str(error).splitlines()[0] if str(error) else "")  # fmt: skip
            return None
        return Recorded(graph, inputs, output, weight_pointers(self.module))

    def clear(self) -> None:
        """Free every graph and its memory pool (compiled code takes over, or the model is restored)."""
        self.recorded.clear()
