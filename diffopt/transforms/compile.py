"""torch.compile of a module, in place.

The compiled call is a :class:`CompiledCall` stored as the module's ``_compiled_call_impl``, which is what
``nn.Module.compile`` sets: the module object stays the user's (``pipe.unet is unet``, ``save_pretrained`` writes
clean keys, pipelines' ``isinstance`` checks hold), and undo removes it so the next call runs eager code again.
"""
from __future__ import annotations

import difflib
import itertools
import logging
import threading
import time
import types
import weakref
from typing import Any, Callable, Dict, List, Mapping, Optional

import torch

from .. import capabilities
from ..components import CONTROLNET, DENOISER, VAE, Component, execution_device, tensor_bytes
from ..config import takes_mode
from ..layers import ATTR as LAYERS
from ..layers import Applied, Layer, attach, mark
from ..report import SKIPPED
from ..plan import Step
from .background import COMPILE, MODEL_OPTIONS, BackgroundCompile
from .background_spec import why_not_rebuildable
from .timesteps import scalars_to_device

logger = logging.getLogger(__name__)

NAME = "compile"
_ATTR = "_compiled_call_impl"
#: Modes whose compiled graphs replay as CUDA graphs (their outputs live in a pool the next replay reuses), each
#: with the mode that does the same without them (None: inductor's default). "max-autotune" records CUDA graphs too
#: (``torch._inductor.list_mode_options("max-autotune")`` sets ``triton.cudagraphs``).
CUDA_GRAPH_MODES = {"reduce-overhead": None, "max-autotune": "max-autotune-no-cudagraphs"}
#: Dynamo's recompile limit while a module compiled by diffopt runs (see CompiledCall.__call__).
RECOMPILE_LIMIT = 64
#: How long a whole model's first compiled call takes, as the notices say it.
FIRST_CALL = "a minute or more for a full-size model"

_SERIAL = itertools.count()
# The entries of each module compiled so far (see own_entry), for as long as the module lives.
_ENTRIES: "weakref.WeakKeyDictionary[torch.nn.Module, Dict[str, Callable]]" = weakref.WeakKeyDictionary()


def uses_cuda_graphs(options: Dict[str, Any]) -> bool:
    """Whether torch.compile ``options`` replay CUDA graphs: by mode, or by inductor's own option."""
    return options.get("mode") in CUDA_GRAPH_MODES or bool((options.get("options") or {}).get("triton.cudagraphs"))


def own_entry(module: torch.nn.Module, via: str = "_call_impl") -> Callable:
    """``entry(module, *args, **kwargs)`` runs ``module.<via>`` under a code object of the module's own: what
    diffopt compiles (``via="_old_forward"``: the forward under an offload hook, whose hook runs outside).

    Dynamo keeps its automatic-dynamic-shape state per traced code object (by file, line and name), so modules
    compiled through one shared entry (``nn.Module._call_impl``, which torch.compile also wraps in one shared
    ``inner``) looked like one model changing shape: DeepFloyd IF's stage II (6 channels, 256 px, after stage I's
    3 and 64) was traced with symbolic sizes and had not compiled after 200 s on an H200, where a static compile
    took 70 s. With an entry each, every model's first graph is static and torch's rules apply to it alone: its
    second batch size, or a new LoRA weight, recompiles once and then stays dynamic. The entry takes the module as
    an argument rather than holding it, and is kept per module, so that optimize after restore finds the graphs
    compiled before (dynamo caches them on the code object) and a dropped model is freed.
    """
    entries = _ENTRIES.setdefault(module, {})
    if via not in entries:

        def call_module(module, *args, **kwargs):
            return getattr(module, via)(*args, **kwargs)

        entries[via] = renamed(call_module, f"call_{type(module).__name__}")
    return entries[via]


def own_block_entry(model: torch.nn.Module, cls: type) -> Callable:
    """``entry(block, *args, **kwargs)`` runs ``cls.forward`` on a block of ``model`` under a code object of the
    model's own, as :func:`own_entry` does for whole models: the blocks of one model share its graphs, and another
    model with blocks of the same class (another size in the same notebook) gets graphs and a recompile count of
    its own instead of adding to one shared ``cls.forward``."""
    entries = _ENTRIES.setdefault(model, {})
    key = f"blocks:{cls.__module__}.{cls.__qualname__}"
    if key not in entries:
        forward = cls.forward

        def call_block(block, *args, **kwargs):
            return forward(block, *args, **kwargs)

        entries[key] = renamed(call_block, f"call_{cls.__name__}_of_{type(model).__name__}")
    return entries[key]


def name_entry(module: torch.nn.Module, name: str) -> Callable:
    """Give ``module`` an entry (see :func:`own_entry`) whose code object is named ``name`` exactly: a background
    compile's child uses the parent's name, so that dynamo's per-code-object choices (a dynamic batch dimension,
    kept from one process to the next) are the same in both processes."""
    _ENTRIES.setdefault(module, {})["_call_impl"] = entry = _with_code_name(own_entry(module), name)
    return entry


def renamed(function: Callable, name: str) -> Callable:
    """A copy of ``function`` with a code object of its own, named ``name`` and a serial number (dynamo keeps its
    graphs and its recompile count per code object)."""
    return _with_code_name(function, f"{name}_{next(_SERIAL)}")


def _with_code_name(function: Callable, name: str) -> Callable:
    code = function.__code__.replace(co_name=name)
    return types.FunctionType(code, function.__globals__, name, None, function.__closure__)


def is_compiled(module: torch.nn.Module) -> bool:
    """Compiled by anyone: in place, or wrapped by ``torch.compile(module)``."""
    return getattr(module, _ATTR, None) is not None or hasattr(module, "_orig_mod")


def compiled_by_diffopt(module: torch.nn.Module) -> bool:
    return isinstance(vars(module).get(_ATTR), CompiledCall)


def compiled_elsewhere(module: torch.nn.Module) -> bool:
    """Compiled by someone else: diffopt leaves its compile, and the weight strides its graphs guard on, as they are."""
    return is_compiled(module) and not compiled_by_diffopt(module)


def default_options(device: torch.device) -> Dict[str, Any]:
    """fullgraph everywhere (a graph break in a denoiser is a bug we want to hear about); CUDA graphs
    ("reduce-overhead") on CUDA, where per-kernel launch overhead dominates small batches; plain inductor
    elsewhere, where CUDA graphs do not exist."""
    if device.type == "cuda":
        return {"mode": "reduce-overhead", "fullgraph": True}
    return {"fullgraph": True}


def without_cuda_graphs(options: Dict[str, Any]) -> Dict[str, Any]:
    """The same options with CUDA graphs off, whether a mode or inductor's own option asked for them."""
    options = dict(options)
    mode = options.get("mode")
    if mode in CUDA_GRAPH_MODES:
        if CUDA_GRAPH_MODES[mode] is None:
            options.pop("mode")
        else:
            options["mode"] = CUDA_GRAPH_MODES[mode]
    inductor = options.get("options")
    if inductor and inductor.get("triton.cudagraphs"):
        options["options"] = {**inductor, "triton.cudagraphs": False}
    return options


def describe(options: Dict[str, Any]) -> str:
    return "torch.compile(" + ", ".join(f"{k}={v!r}" for k, v in options.items()) + ")"


def _input_tensors(args, kwargs) -> List[torch.Tensor]:
    """The tensor arguments of a call with at least one dimension, one level into dicts, lists and tuples (SDXL's
    added_cond_kwargs, ControlNet residuals), in order."""
    values = []
    for value in list(args) + list(kwargs.values()):
        if isinstance(value, dict):
            values += value.values()
        elif isinstance(value, (list, tuple)):
            values += value
        else:
            values.append(value)
    return [v for v in values if isinstance(v, torch.Tensor) and v.dim() > 0]


def mark_batch_dynamic(args, kwargs) -> None:
    """Mark dim 0 of every tensor argument whose dim 0 is the batch (the first tensor's) as dynamic. "maybe": a
    size that must stay static (0 or 1) is specialized instead of raising."""
    tensors = _input_tensors(args, kwargs)
    if not tensors:
        return
    batch = tensors[0].shape[0]
    for tensor in tensors:
        if tensor.shape[0] == batch:
            torch._dynamo.maybe_mark_dynamic(tensor, 0)


# ---- offload ----------------------------------------------------------------------------------------------------


def offload_blocker(module: torch.nn.Module) -> Optional[str]:
    """Why ``module`` cannot be compiled under the offload it has, or None. Model offload (accelerate's CpuOffload
    on the whole model, ``enable_model_cpu_offload``) composes: its hook runs outside the compiled call. Offload
    that moves weights layer by layer inside the forward cannot run in one graph."""
    for name, sub in module.named_modules():
        hook = getattr(sub, "_hf_hook", None)
        if hook is not None and (name or not _is_model_offload(hook)):
            return ("sequential CPU offload (enable_sequential_cpu_offload) moves every layer's weights inside the "
                    "forward; use enable_model_cpu_offload() to compile with offload")  # fmt: skip
        registry = getattr(sub, "_diffusers_hook", None)
        if registry is not None and any("offload" in key for key in getattr(registry, "hooks", {})):
            return ("group offload (enable_group_offload) moves weights block by block inside the forward; use "
                    "enable_model_cpu_offload() to compile with offload")  # fmt: skip
    return None


def _is_model_offload(hook) -> bool:
    return type(hook).__name__ == "CpuOffload"


def offloaded_inside(module: torch.nn.Module, name: str) -> Optional[str]:
    """Why a call of ``module`` must run its eager forward now, or None: an offload hook added after optimize that
    moves every layer's weights inside the forward (accelerate's sequential offload), whose hooks on the layers a
    compiled graph cannot trace. Model offload (one move around the whole forward) is not such a hook."""
    hook = getattr(module, "_hf_hook", None)
    if hook is None or "_old_forward" not in vars(module) or _is_model_offload(hook):
        return None
    return offload_blocker(module) or f"{type(hook).__name__} on {name}"


# ---- the compiled call ------------------------------------------------------------------------------------------


class CompiledCall(Layer):
    """The module's ``_compiled_call_impl``. The extras run before each call, outside the compiled code:
    ``new_step`` calls ``torch.compiler.cudagraph_mark_step_begin()``, for the module that starts a denoising step
    (a ControlNet), so the CUDA graphs of one step never read outputs owned by the previous step's replays;
    ``dynamic_batch`` marks the inputs' batch dimension dynamic (see :func:`mark_batch_dynamic`);
    ``scalars_to`` moves 0-d CPU tensors (timesteps kept on the CPU, see timesteps.py) to that device.

    A model offload hook (accelerate's ``CpuOffload``, added before or after optimize) runs in eager code around the
    compiled forward, which then runs without CUDA graphs (the weights move between calls). ``copy.deepcopy``
    gives the copy a compiled call of its own; pickling refuses, since compiled code cannot be pickled.
    """

    transform = NAME

    def __init__(self, module, name: str, options, new_step=False, dynamic_batch=False, scalars_to=None, cache=None,
                 background=None):  # fmt: skip
        self.module, self.name, self.options = module, name, dict(options)
        self.new_step, self.dynamic_batch, self.scalars_to = new_step, dynamic_batch, scalars_to
        self.cache = cache  # a compile_cache.Entry, or None
        # A background.BackgroundCompile (sharing ``cache``), or None: which calls run uncompiled while another
        # process compiles.
        self.background = background
        self.compiled = torch.compile(own_entry(module), **self.options)
        self.offloaded = None  # compiled lazily, the first time an offload hook is found
        self.replaced = None  # the compiled call this one stands in for (apply_compile), put back by undo
        self.calls, self.warned, self.shapes = 0, False, InputShapes(name, FIRST_CALL, dynamic_batch)
        self.detail = describe(self.options) + "".join([
            ", dynamic batch" if dynamic_batch else "",
            ", new CUDA-graph step per call" if new_step else "",
            f", CPU timesteps made on {scalars_to}" if scalars_to is not None else "",
            f", {background.detail}" if background is not None else "",
            f"; {cache.detail}" if cache is not None else "",
        ])  # fmt: skip

    def __call__(self, *args, **kwargs):
        module = self.module
        for layer in vars(module).get(LAYERS, ()):  # eager checks of other layers (a step cache's thread check)
            if hasattr(layer, "before_call"):
                layer.before_call()
        if self.scalars_to is not None:
            args, kwargs = scalars_to_device(args, kwargs, self.scalars_to)
        if self.new_step:
            torch.compiler.cudagraph_mark_step_begin()
        hook = getattr(module, "_hf_hook", None)
        if self.background is not None and hook is None:
            output = self.background.call(args, kwargs, self.run_compiled)
            if output is not COMPILE:
                return output
        return self.run_compiled(args, kwargs, hook)

    def run_compiled(self, args, kwargs, hook=None):
        """The call, compiled (compiling it first if new), with its notices; a background compile's thread runs it
        too, on inputs it made."""
        module = self.module
        if self.dynamic_batch:
            mark_batch_dynamic(args, kwargs)
        first = self.calls == 0
        self.calls += 1
        if self.background is None or self.background.given_up:  # a background compile announces its work itself
            self.shapes.notice(args, kwargs)
            if first:
                compiling_notice(self.name, self.cache, FIRST_CALL)
        graphs, started = graphs_compiled(), time.perf_counter()
        uncompiled = offloaded_inside(module, self.name)
        with raised_recompile_limit():
            if uncompiled:
                if not self.warned:  # once per compiled call, and nothing left on the module
                    self.warned = True
                    logger.warning("diffopt: %s; running it uncompiled", uncompiled)
                output = module._call_impl(*args, **kwargs)
            elif hook is not None and "_old_forward" in vars(module):  # model offload: its hook runs outside
                output = self._offloaded_call(hook, args, kwargs)
            else:
                output = self.compiled(module, *args, **kwargs)
        if first or graphs_compiled() != graphs:
            compiled_report(self.name, self.cache, first, time.perf_counter() - started)
        return output

    def _offloaded_call(self, hook, args, kwargs):
        module = self.module
        if self.offloaded is None:
            self.offloaded = torch.compile(own_entry(module, "_old_forward"), **without_cuda_graphs(self.options))
        args, kwargs = hook.pre_forward(module, *args, **kwargs)
        with torch.no_grad() if getattr(hook, "no_grad", False) else _nothing():
            output = self.offloaded(module, *args, **kwargs)
        return hook.post_forward(module, output)

    def undo(self, owner) -> None:
        if self.background is not None:
            self.background.stop()
        if vars(owner).get(_ATTR) is self:
            if self.replaced is None:
                vars(owner).pop(_ATTR)
            else:
                vars(owner)[_ATTR] = self.replaced

    def __deepcopy__(self, memo):
        from copy import deepcopy

        module = deepcopy(self.module, memo)  # memo: the copy of the module being copied
        twin = CompiledCall(module, self.name, self.options, self.new_step, self.dynamic_batch, self.scalars_to,
                            self.cache)  # fmt: skip
        if self.background is not None:
            twin.background = self.background.copy_for(module)
        twin.order = self.order  # the copy's undo runs in the same order as the original's
        # torch's Module.__getstate__ leaves _compiled_call_impl out of a copy (torch >= 2.5), so the copy reaches
        # this layer only through its record; install it where the original has it, or the copy runs uncompiled.
        # (twin.replaced stays None for the same reason: the copy never had the call this one replaced.)
        if vars(self.module).get(_ATTR) is self and _ATTR not in vars(module):
            vars(module)[_ATTR] = twin
        return twin

    def __reduce_ex__(self, protocol):
        raise TypeError(
            f"diffopt: {self.name} is compiled by diffopt.optimize and compiled code cannot be pickled; call "
            "diffopt.restore(pipe) before pickling (and diffopt.optimize(pipe) again after loading)"
        )


class InputShapes:
    """The input shapes a compiled model has been called with, so that a call with new ones says *before* it runs
    that it may compile again, which takes as long as a first call: a long call is never silent. "May": a graph
    made dynamic by an earlier shape change covers the new one without compiling (dynamo decides that)."""

    def __init__(self, name: str, expected: str, dynamic_batch: bool = False):
        self.name, self.expected, self.dynamic_batch = name, expected, dynamic_batch
        self.seen, self.last = set(), None
        # Input shapes (past the batch) whose batch has already changed to a size of 2 or more once: dynamo keeps a
        # graph with a dynamic batch for them from then on (a size change that recompiles makes the size dynamic),
        # so later batch sizes compile nothing new.
        self.batch_dynamic = set()

    def notice(self, args, kwargs) -> None:
        shapes = tuple(tuple(t.shape) for t in _input_tensors(args, kwargs))
        last, self.last = self.last, shapes
        if shapes in self.seen:
            return
        self.seen.add(shapes)
        if last is None or not shapes or not last:  # the first call has its own notice
            return
        before, now = last[0], shapes[0]
        batch_only = before[1:] == now[1:] and before[:1] != now[:1]
        if batch_only and self.dynamic_batch:  # compiled for every batch size already
            return
        if batch_only and now[0] > 1:
            if now[1:] in self.batch_dynamic:
                return
            self.batch_dynamic.add(now[1:])
        change = f"batch {before[0]} -> {now[0]}" if batch_only else f"input {before} -> {now}"
        hint = "; dynamic_batch=True compiles one graph for every batch size" if batch_only else ""
        logger.warning("diffopt: %s called with new input shapes (%s): it may compile again (%s)%s", self.name,
                       change, self.expected, hint)  # fmt: skip


def graphs_compiled() -> int:
    """How many graphs dynamo has compiled in this process: a call that raises it compiled something."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def compiling_notice(name: str, cache, expected: str) -> None:
    """Before a first compiled call: what is compiled, and whether from ``cache`` (a compile_cache.Entry, or None)
    or for about ``expected``. A long first call is never silent."""
    saved = cache is not None and cache.loaded.status == "loaded"
    logger.warning("diffopt: compiling %s with torch.compile (first call; %s)...", name,
                   "from the saved compile" if saved else expected)  # fmt: skip


def compiled_report(name: str, cache, first: bool, seconds: float) -> None:
    """After a call that compiled ``name``: say what it cost, and keep what it compiled in ``cache`` (a
    compile_cache.Entry, or None). Every new shape or variant (a batch size, a LoRA, the cached step of a step
    cache) is saved too, so that a new process finds all of them."""
    if first:
        logger.warning("diffopt: compiled %s in %.1f s", name, seconds)
    elif seconds > 1.0:
        logger.warning("diffopt: compiled %s again for new inputs (a new shape or setting) in %.1f s", name, seconds)
    saved = cache.after_compile(first) if cache is not None else None
    if saved is not None:
        logger.info("diffopt: %s", saved.detail)


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


class raised_recompile_limit:
    """Dynamo's recompile limit (8 variants per code object) ends in a hard error under fullgraph=True. Our entry
    is per model, so it counts one model's variants: shapes, and every LoRA load, fuse or unfuse, which a notebook
    trying adapters runs through quickly. Raised for our calls only, and put back after. Nested uses (the compiled
    blocks inside a model call that raised it already) write nothing: dynamo's config costs microseconds a write."""

    depth = 0  # the uses entered and not yet left, in this process (a background compile's thread included)
    name = before = None  # the config field and its value before the outermost use
    lock = threading.Lock()

    def __init__(self, limit: int = RECOMPILE_LIMIT):
        self.limit = limit

    def __enter__(self):
        cls = type(self)
        with cls.lock:
            if cls.depth == 0:
                config = torch._dynamo.config
                cls.name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"  # torch < 2.6
                cls.before = getattr(config, cls.name)
                setattr(config, cls.name, max(cls.before, self.limit))
            cls.depth += 1

    def __exit__(self, *exc):
        cls = type(self)
        with cls.lock:
            cls.depth -= 1
            if cls.depth == 0:
                setattr(torch._dynamo.config, cls.name, cls.before)
        return False


def apply_compile(module, options, new_step=False, dynamic_batch=False, scalars_to=None, name=None, cache=None,
                  background=None):  # fmt: skip
    """Compile ``module`` in place with ``options`` (a :class:`CompiledCall` attached to it). ``background``: a
    background.BackgroundCompile that runs the first calls uncompiled while another process compiles."""
    since = mark()
    call = CompiledCall(module, name or type(module).__name__, options, new_step, dynamic_batch, scalars_to, cache,
                        background)  # fmt: skip
    call.replaced = vars(module).get(_ATTR)  # a compiled call that was there before: undo puts it back
    setattr(module, _ATTR, call)
    return Applied(attach(module, call).detail, since, module)


# ---- planning ---------------------------------------------------------------------------------------------------


def names_mode(config) -> bool:
    return not isinstance(config.compile, bool) and "mode" in config.compile


def asks_for_cuda_graphs(config) -> bool:
    """The user's compile options name CUDA graphs (a mode, or inductor's own option)."""
    return not isinstance(config.compile, bool) and uses_cuda_graphs(dict(config.compile))


#: Keys of torch.compile's ``options`` that torch.compile reads itself rather than inductor's config.
TORCH_COMPILE_OPTIONS = frozenset({"guard_filter_fn", "use_aoti"})


def check_inductor_options(options: Mapping) -> None:
    """Name the unknown keys of ``compile['options']`` here, before anything changes; inductor's own error comes at
    the first call and lists all of its several hundred options."""
    from torch._inductor import list_options  # imported only when options are given: inductor is slow to import

    # torch.compile takes these out of `options` itself before inductor sees the rest.
    valid = list_options()
    unknown = sorted(str(key) for key in set(options) - set(valid) - TORCH_COMPILE_OPTIONS)
    if unknown:
        close = {key: difflib.get_close_matches(key, valid, n=1) for key in unknown}
        hints = ", ".join(f"{key!r} (did you mean {match[0]!r}?)" if match else repr(key) for key, match in close.items())
        raise ValueError(f"compile['options'] has unknown inductor option(s) {hints}; torch._inductor.list_options() "
                         "lists the valid ones")  # fmt: skip


def check_backend(backend: Any) -> None:
    """Name an unknown backend here, before anything changes: torch.compile raises only when it is applied, after
    the previous optimization was taken off (a compiled model then compiles again)."""
    if not isinstance(backend, str):
        return  # a compiler function (config checked the type)
    from torch._dynamo.backends.registry import list_backends, lookup_backend
    from torch._dynamo.exc import InvalidBackend

    try:
        lookup_backend(backend)
    except InvalidBackend:
        valid = list_backends(exclude_tags=())
        raise ValueError(f"compile['backend'] must be one of {valid} or a compiler function, got {backend!r}") from None


def options_for(component: Component, ctx, report=None, per_block: Optional[str] = None) -> Optional[Dict[str, Any]]:
    """The torch.compile options for ``component``, or None (with the reason in ``report``) when it is not
    compiled. ``per_block``: why its blocks are compiled one by one (the first-block cache, ``compile_blocks``), which
    turns CUDA graphs off unless a mode is named. Raises where the user named compile and it cannot run."""
    from . import attention_backend

    config = ctx.config
    if config.compile is False:
        return None
    explicit = config.asks_for("compile")
    reason = capabilities.require_or_skip(capabilities.compile(), explicit, "compile")
    module = component.module
    if not reason and compiled_elsewhere(module):
        reason = "already compiled outside diffopt; left as it is"
    if not reason:
        reason = offload_blocker(module) or ""
        if reason and explicit:
            raise capabilities.UnsupportedFeatureError(f"compile of {component.name}: {reason}, or pass compile=False")
    if reason:
        if report is not None:
            report.add(component.name, NAME, SKIPPED, reason)
        return None
    device = execution_device(module)
    options = default_options(device)
    if not isinstance(config.compile, bool):  # a dict of torch.compile options over the defaults
        user = dict(config.compile)
        check_inductor_options(user.get("options") or {})
        check_backend(user.get("backend"))
        if "mode" not in user and not takes_mode(user):  # the default mode gives way (config.takes_mode)
            options.pop("mode", None)
        options.update(user)
    if component.role == VAE and uses_cuda_graphs(options) and not names_mode(config):
        # The decoder runs once per call, so CUDA graphs save little (SD1.5 at 512 px on an H200: 7.6 against
        # 8.1 ms), and SDXL's pipeline casts its VAE to float32 and back around every decode (force_upcast): new
        # weight storage each call, which CUDA graphs would re-record every time.
        options = without_cuda_graphs(options)
    if getattr(module, "_hf_hook", None) is not None and uses_cuda_graphs(options):
        # Model offload moves the weights between calls: CUDA graphs would re-record every call.
        options = without_cuda_graphs(options)
    if per_block and uses_cuda_graphs(options) and not names_mode(config):
        # One compiled block function replayed with each block's weights would record a CUDA graph per block, and
        # the first-block cache also skips blocks and reuses residuals across steps: per-block CUDA graphs have not
        # been run on a GPU, so they stay off unless named. (DeepCache compiles whole models and keeps them.)
        options = without_cuda_graphs(options)
        if report is not None:
            report.add(component.name, NAME, SKIPPED, f"CUDA graphs off for blocks compiled one by one ({per_block}); "
                       "name compile['mode'] to have them")  # fmt: skip
    return attention_backend.compile_options(config.attention, options)


def _first_net(component: Component) -> bool:
    return ".nets." not in component.name or component.name.endswith(".nets.0")


def plan(ctx) -> List[Step]:
    steps, reserved = [], {}  # reserved: device memory the background compiles planned so far will take
    for component in ctx.components:
        options = ctx.compile_options.get(component.name)
        if options is None or component.name in ctx.block_compiled:
            continue
        # diffusers' ControlNet pipelines call cudagraph_mark_step_begin() each step only when the UNet and the
        # ControlNet are OptimizedModule wrappers; modules compiled in place do not pass that check, and without
        # it the UNet's CUDA graph reads residuals that the ControlNet's next replay has overwritten (seen on an
        # H200). So the first ControlNet of each step marks the step itself; later nets of a MultiControlNet must
        # not, or they would free the residuals of the nets before them.
        new_step = component.role == CONTROLNET and uses_cuda_graphs(options) and _first_net(component)
        # With the scheduler's timesteps on the CPU, the UNet and ControlNets get them as GPU fills, each on its
        # own device (a ControlNet may sit on another card than the UNet).
        on_cpu = ctx.timesteps_on_cpu and component.role in (DENOISER, CONTROLNET)
        scalars_to = execution_device(component.module) if on_cpu else None

        in_background = wants_background(component, options, ctx, reserved)

        def apply(component=component, options=options, new_step=new_step, scalars_to=scalars_to,
                  in_background=in_background):  # fmt: skip
            cache = ctx.compile_cache(component, options, defer_load=in_background)
            background = background_for(component, options, new_step, ctx, cache) if in_background else None
            return apply_compile(component.module, options, new_step, ctx.config.dynamic_batch, scalars_to,
                                 component.name, cache, background)  # fmt: skip

        steps.append(Step(component.name, NAME, apply))
    return steps


def wait_for_background_compiles(modules, timeout: Optional[float] = None) -> bool:
    """Wait until every background compile of ``modules`` has compiled, here, the inputs its model was called with
    (or gave up and left them to compile at their next call), or ``timeout`` seconds in all; True if none waits."""
    deadline = None if timeout is None else time.perf_counter() + timeout
    done = True
    for module in modules:
        call = vars(module).get(_ATTR)
        if isinstance(call, CompiledCall) and call.background is not None:
            left = None if deadline is None else max(deadline - time.perf_counter(), 0.0)
            done = call.background.wait(call.run_compiled, left) and done
    return done


def wants_background(component: Component, options: Dict[str, Any], ctx, reserved: Dict[str, int]) -> bool:
    """Whether ``component`` compiles in a background process. ``background_compile=True``: every denoiser and
    ControlNet, or an error saying why one cannot. None (the default): those on CUDA whose compiled code replays CUDA
    graphs (the uncompiled calls replay CUDA graphs of the eager forward, so the first images come at once and at
    better than eager speed), where another process can build the model, the model is not small, and the device has
    room for it; the others compile here, with a report line saying why. ``reserved`` (per device) adds up the
    memory of the ones planned so far."""
    setting = ctx.config.background_compile
    if setting is False:
        return False
    if component.role not in (DENOISER, CONTROLNET):
        if setting:  # the decoder runs once per call and is not a model diffusers builds from a config of its own
            ctx.report.add(component.name, "background_compile", SKIPPED, "the VAE decoder compiles in this process, "
                           "at its first decode")  # fmt: skip
        return False
    device = execution_device(component.module)
    if setting is None and (device.type != "cuda" or not uses_cuda_graphs(options)):
        return False  # plain inductor (a CPU, or CUDA graphs off): a foreground compile, as asked, with no report line
    reason = why_no_background(component, options, ctx.config)
    if reason is None and setting is None:
        reason = background_room(component.module, device, reserved)
    if reason is None:
        return True
    if setting:
        raise capabilities.UnsupportedFeatureError(f"background_compile for {component.name}: {reason}; pass "
                                                   "background_compile=False")  # fmt: skip
    ctx.report.add(component.name, "background_compile", SKIPPED, f"{reason}: it compiles at its first call, in "
                   "this process")  # fmt: skip
    return False


def why_no_background(component: Component, options: Dict[str, Any], config) -> Optional[str]:
    """Why another process cannot compile ``component`` for this one, or None."""
    clashes = config.not_reproducible()
    if clashes:
        return f"another process cannot reproduce {clashes[0]}"
    module = component.module
    reason = why_not_rebuildable(module)
    if reason is None and not isinstance(options.get("backend", "inductor"), str):
        reason = "its compile backend is a function, which another process cannot be given"
    if reason is None and getattr(module, "_hf_hook", None) is not None:
        reason = "it has a CPU offload hook, under which its compiled forward runs in this process"
    return reason


#: Device memory a background compile takes besides a second copy of the weights: the other process's CUDA
#: context, the activations of its compile runs and its CUDA-graph pool. (The recorded eager graphs here take no
#: more than an eager call: SDXL's peak on an H200 was 9.6 GiB either way.) An allowance, not a measurement of the
#: other process, so a card that fits the model twice with little to spare compiles in the foreground.
BACKGROUND_HEADROOM = 4 << 30
#: By default, models with less weight than this compile in the foreground: a test suite's tiny random models, whose
#: compile is short and which a test expects compiled after its first call, not another process each. Full-size
#: denoisers and ControlNets hold hundreds of MiB or more.
BACKGROUND_MIN_WEIGHTS = 100 << 20


def background_room(module: torch.nn.Module, device: torch.device, reserved: Dict[str, int]) -> Optional[str]:
    """Why ``module`` does not compile in the background by default (a small model, or no room on ``device`` for a
    second copy of its weights plus :data:`BACKGROUND_HEADROOM`), or None, reserving that room in ``reserved``."""
    weights = tensor_bytes(list(module.parameters()) + list(module.buffers()))
    if weights < BACKGROUND_MIN_WEIGHTS:
        return (f"a small model ({weights / 2**20:.1f} MiB of weights, under {BACKGROUND_MIN_WEIGHTS >> 20} MiB) "
                "compiles quickly; background_compile=True compiles it in another process anyway")  # fmt: skip
    need = 2 * weights + BACKGROUND_HEADROOM
    free, _ = torch.cuda.mem_get_info(device)
    free -= reserved.get(str(device), 0)
    if need > free:
        return (f"{device} has {free / 2**30:.1f} GiB free, and compiling in another process takes about "
                f"{need / 2**30:.1f} GiB (a copy of the weights and the compile's work)")  # fmt: skip
    reserved[str(device)] = reserved.get(str(device), 0) + need
    return None


def background_for(component: Component, options: Dict[str, Any], new_step: bool, ctx, cache):
    """The BackgroundCompile for ``component``. Where optimize found a saved compile, it needs no child: a thread
    loads it while the first calls run uncompiled."""
    config = ctx.config
    module = component.module
    # The uncompiled calls replay CUDA graphs of the eager forward where the compiled ones will replay CUDA graphs.
    eager_graphs = execution_device(module).type == "cuda" and uses_cuda_graphs(options)
    return BackgroundCompile(
        module, component.name, options, dynamic_batch=config.dynamic_batch, new_step=new_step,
        model_options={name: getattr(config, name) for name in MODEL_OPTIONS},
        entry_name=own_entry(module).__code__.co_name, cache=cache, cuda_graphs=eager_graphs,
        saved=cache is not None and cache.loaded.status == "found",
    )
