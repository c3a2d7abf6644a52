"""The options of :func:`diffopt.optimize` as one frozen, self-validating object.

``optimize(pipe, **options)`` is shorthand for ``optimize(pipe, OptimizeConfig(**options))``; the config
rejects a bad value before anything on the pipeline is touched.
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from numbers import Real
from typing import Any, FrozenSet, List, Mapping, Optional, Union

# ATTENTION_CHOICES: processor families ("sdpa": let torch pick the kernel, "default": the classic processors,
# "xformers"), torch's SDPA kernels forced by name, backends of diffusers' attention dispatcher, "auto" (the fastest
# the card has, see capabilities.AUTO_ATTENTION), and None: leave attention as it is. Derived from the one table of
# attention names, which imports nothing heavy, so that importing config still imports no torch.
from .attention_names import ATTENTION_CHOICES

# None and "preserve" both mean: leave the memory format as it is.
MEMORY_FORMAT_CHOICES = ("channels_last", "contiguous", "preserve", None)
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs", None)
COMPILE_KEYS = ("mode", "fullgraph", "dynamic", "backend", "options")
RESTORE_ATTENTION_CHOICES = ("default", "original")
# None: no quantization (the default; every quantized mode changes outputs, so it is opt-in).
QUANTIZE_CHOICES = ("fp8", "int8", "int8-weight-only", None)
# "deepcache" and "first_block" mean DeepCache() and FirstBlockCache() with their defaults; "auto" picks per
# denoiser (DeepCache for UNets, FirstBlockCache for transformers that have diffusers' cache hooks).
CACHE_CHOICES = ("deepcache", "first_block", "auto", None)


def _choices(values) -> str:
    return ", ".join(repr(v) for v in values)


def check_choice(name: str, value: Any, choices) -> None:
    if not isinstance(value, (str, type(None))):
        raise TypeError(f"{name} must be one of {_choices(choices)}, got {value!r} ({type(value).__name__})")
    if value not in choices:
        raise ValueError(f"{name} must be one of {_choices(choices)}, got {value!r}")


def check_bool(name: str, value: Any, none: bool = False) -> None:
    """``none``: None is a choice too (decided per pipeline)."""
    if not (isinstance(value, bool) or (none and value is None)):
        choices = "True, False or None" if none else "True or False"
        raise TypeError(f"{name} must be {choices}, got {value!r} ({type(value).__name__})")


def check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an integer >= {minimum}, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


@dataclass(frozen=True)
class DeepCache:
    """Step caching for UNets, in the manner of DeepCache (Ma et al., 2023): every ``interval``-th step runs the
    whole UNet and keeps the features that leave its deep part; the steps in between run only the shallow branch
    (``conv_in``, the first ``depth`` down blocks, the last ``depth`` up blocks, ``conv_out``) on the kept
    features. Larger ``interval`` or smaller ``depth`` is faster and further from the uncached image.

    Example::

        diffopt.optimize(pipe, cache=diffopt.DeepCache(interval=3, depth=1))
    """

    #: Steps per full UNet evaluation; 1 runs every step in full (the same image as without the cache).
    interval: int = 3
    #: Down/up blocks kept on cached steps, from the outside in; 1 <= depth < number of down blocks.
    depth: int = 1

    def __post_init__(self):
        check_int("DeepCache interval", self.interval, 1)
        check_int("DeepCache depth", self.depth, 1)


@dataclass(frozen=True)
class FirstBlockCache:
    """Step caching for transformers: diffusers' First Block Cache (after ParaAttention's). Every step runs the
    first transformer block; when its output moved less than ``threshold`` (relative mean absolute change) since
    the last full step, the other blocks are skipped and their last residual is added instead.

    Example::

        diffopt.optimize(pipe, cache=diffopt.FirstBlockCache(threshold=0.08))
    """

    #: Higher skips more steps (faster, further from the uncached image); 0 never skips.
    threshold: float = 0.05

    def __post_init__(self):
        value = self.threshold
        if isinstance(value, bool) or not isinstance(value, Real):
            raise TypeError(f"FirstBlockCache threshold must be a number >= 0, got {value!r} ({type(value).__name__})")
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"FirstBlockCache threshold must be a finite number >= 0, got {value!r}")


def is_inductor(options: Mapping[str, Any]) -> bool:
    """Whether torch.compile ``options`` (its keyword arguments) compile with inductor, torch's default backend."""
    return options.get("backend", "inductor") == "inductor"


def takes_mode(options: Mapping[str, Any], ignore_backend: bool = False) -> bool:
    """Whether a ``mode`` means anything beside torch.compile ``options``: torch.compile takes a mode or inductor
    options, never both (it raises on both), and a mode means nothing to a backend other than inductor (it is
    passed on and ignored). ``ignore_backend``: only the first half, the part that is an error when both are named."""
    return "options" not in options and (ignore_backend or is_inductor(options))


class FrozenOptions(dict):
    """A dict of torch.compile options that refuses changes: what a frozen config holds for ``compile={...}``."""

    def _frozen(self, *args, **kwargs):
        raise TypeError("OptimizeConfig.compile is read-only; build a new config (dataclasses.replace) to change it")

    __setitem__ = __delitem__ = clear = pop = popitem = setdefault = update = __ior__ = _frozen

    # copy and pickle rebuild a dict subclass item by item through __setitem__; these rebuild it whole instead.
    def __reduce__(self):
        return FrozenOptions, (dict(self),)

    def __copy__(self):
        return FrozenOptions(self)

    def __deepcopy__(self, memo):
        from copy import deepcopy

        return FrozenOptions(deepcopy(dict(self), memo))


CacheSetting = Union[None, str, DeepCache, FirstBlockCache]


def check_compile_cache(value: Any) -> None:
    if value is None or value is False or isinstance(value, (str, os.PathLike)):
        if isinstance(value, str) and not value.strip():
            raise ValueError("compile_cache must be None, False or a directory path, got an empty string")
        return
    raise TypeError(
        f"compile_cache must be None (the default directory), False (no saved compiles) or a directory path, "
        f"got {value!r} ({type(value).__name__})"
    )


def check_cache(value: Any) -> None:
    if isinstance(value, (DeepCache, FirstBlockCache)):
        return
    choices = f"{_choices(CACHE_CHOICES)}, diffopt.DeepCache(...) or diffopt.FirstBlockCache(...)"
    if not isinstance(value, (str, type(None))):
        raise TypeError(f"cache must be one of {choices}, got {value!r} ({type(value).__name__})")
    if value not in CACHE_CHOICES:
        raise ValueError(f"cache must be one of {choices}, got {value!r}")


@dataclass(frozen=True)
class OptimizeConfig:
    """What :func:`diffopt.optimize` applies. Each field is one option of ``optimize``.

    Example::

        config = OptimizeConfig(compile={"mode": "max-autotune"}, compile_vae=True)
        diffopt.optimize(pipe, config)
    """

    #: Attention: "sdpa", "default" (classic AttnProcessor / AttnAddedKVProcessor), a kernel ("flash", "cudnn",
    #: "efficient", "math", "flex", "sage", "xformers"), "auto" (the fastest the card has), or None to leave it.
    attention: Optional[str] = "sdpa"
    #: True, False, or a dict of torch.compile options (mode, fullgraph, dynamic, backend, options)
    #: laid over diffopt's per-device defaults.
    compile: Union[bool, Mapping[str, Any]] = True
    #: "channels_last", "contiguous", or "preserve"/None, for the convolutional components.
    memory_format: Optional[str] = "channels_last"
    #: Also optimize the VAE decoder (attention, and channels_last with compile, without CUDA graphs); off by
    #: default because its cold compile (20-30 s on an H200) pays for itself only after hundreds of images.
    compile_vae: bool = False
    #: Compile the denoiser's repeated transformer blocks, one graph per block class, instead of the whole
    #: denoiser (regional compilation): a first call in seconds instead of minutes for transformer pipelines (SD3,
    #: Flux, PixArt), whose dozens of blocks are then compiled once per class, with the code around the blocks left
    #: eager and CUDA graphs off unless compile['mode'] names them. None (the default): for denoisers whose blocks
    #: repeat, unless compile['mode'] asks for CUDA graphs; UNets compile whole. True: required (a UNet, whose
    #: blocks differ, is a ValueError). False: always the whole denoiser.
    compile_blocks: Optional[bool] = None
    #: Run the denoiser and ControlNets uncompiled while another process compiles them with the same options, then
    #: compile them here from what it saved, in a thread, while the calls go on: the first images come in seconds
    #: instead of after a minute or more of compiling, and so do the first calls at a new input shape. On CUDA the
    #: uncompiled calls replay CUDA graphs of the eager forward (faster than eager). Costs a second copy of the
    #: model's weights on its device while the other process runs. For models compiled whole (UNets, ControlNets);
    #: a transformer's blocks compile in seconds anyway. None (the default): on for those models on CUDA with CUDA
    #: graphs, where another process can build them, they hold 100 MiB of weights or more (a test's tiny random
    #: model compiles at its first call) and the device has room, with a report line where not.
    #: True: required for every such model (an error where one cannot). False: compile in this process.
    background_compile: Optional[bool] = None
    #: Compile every batch size into one graph (the inputs' batch dimension marked dynamic), so a new batch size
    #: costs a CUDA-graph recording instead of a recompile. Off by default: on an H200 it made the first call
    #: longer (SD1.5 92 s against 77 s; SD ControlNet 116 s against 73 s) for batch changes most users never make.
    dynamic_batch: bool = False
    #: Quantize the Linear layers of the denoiser and ControlNets with torchao: "fp8" (float8 activations
    #: and weights, CUDA compute capability >= 8.9), "int8" (int8 activations and weights), "int8-weight-only",
    #: or None. Opt-in: it changes outputs (see docs/guide.md, "Quantization", for the bound).
    quantize: Optional[str] = None
    #: Fuse each attention layer's query/key/value projections into one matmul with the model's own
    #: fuse_qkv_projections, where that is faithful. Off by default: no gain was measured on the SD1.5 UNet,
    #: and the fused weights are an extra copy of the projections.
    fuse_projections: bool = False
    #: Step caching, off by default: None, "deepcache", "first_block", "auto", or a :class:`DeepCache` /
    #: :class:`FirstBlockCache` with its settings. Needs a pipeline (its scheduler tells where a call starts).
    cache: CacheSetting = None
    #: Keep the scheduler's timesteps on the CPU, so schedulers that read them every step (DDIM, PNDM, DDPM, LCM,
    #: TCD) never wait for the GPU, and hand each timestep to the compiled UNet and ControlNets as a GPU fill.
    #: Applies to UNet pipelines on CUDA with such a scheduler, whose UNet and ControlNets diffopt compiles; off
    #: elsewhere without a report line, and a ValueError with the reason where named and impossible.
    cpu_timesteps: bool = True
    #: Make decoded images 8-bit on the device they were decoded on and copy only those bytes to the CPU, instead
    #: of converting them with numpy on the CPU: the same PIL images, byte for byte. Applies to pipelines whose
    #: ``image_processor`` is diffusers' VaeImageProcessor (or a subclass that makes images the same way), for
    #: ``output_type="pil"``; other output types run unchanged. Another image processor is reported as skipped;
    #: named where it cannot apply, a ValueError with the reason.
    device_postprocess: bool = True
    #: Where compiled kernels are saved after the first call and loaded from in the next process: None, the
    #: default (``$DIFFOPT_CACHE_DIR``, else ``$XDG_CACHE_HOME/diffopt``, else ``~/.cache/diffopt``), a directory,
    #: or False to neither save nor load. For images and serving, pass a directory and bake it in after one warm-up call.
    compile_cache: Union[None, bool, str, "os.PathLike"] = None
    #: The options the user named; a feature the installed versions lack is an error when named here
    #: and a skip with a reason otherwise. Filled in by :meth:`from_options`.
    explicit: FrozenSet[str] = field(default=frozenset(), repr=False, compare=False)

    def __post_init__(self):
        check_choice("attention", self.attention, ATTENTION_CHOICES)
        check_choice("memory_format", self.memory_format, MEMORY_FORMAT_CHOICES)
        check_bool("compile_vae", self.compile_vae)
        check_bool("compile_blocks", self.compile_blocks, none=True)
        check_bool("dynamic_batch", self.dynamic_batch)
        check_bool("background_compile", self.background_compile, none=True)
        check_cache(self.cache)
        check_choice("quantize", self.quantize, QUANTIZE_CHOICES)
        check_bool("fuse_projections", self.fuse_projections)
        check_bool("cpu_timesteps", self.cpu_timesteps)
        check_bool("device_postprocess", self.device_postprocess)
        check_compile_cache(self.compile_cache)
        if isinstance(self.compile, Mapping):
            self._check_compile_options(dict(self.compile))
            # A copy of the caller's dict that cannot change: later edits to theirs would skip validation.
            object.__setattr__(self, "compile", FrozenOptions(self.compile))
        elif not isinstance(self.compile, bool):
            raise TypeError(
                f"compile must be True, False or a dict of torch.compile options, got {self.compile!r} "
                f"({type(self.compile).__name__})"
            )
        # Options that only mean something for compiled graphs, with compiling turned off (checked once each value is).
        if self.compile_blocks is True and self.compile is False:
            raise ValueError("compile_blocks=True compiles the denoiser's blocks, but compile=False turns compiling off; "
                             "drop one of them")  # fmt: skip
        if self.background_compile is True and self.not_reproducible():
            raise ValueError(f"background_compile=True compiles in another process, which cannot reproduce "
                             f"{self.not_reproducible()[0]}; drop one of them")  # fmt: skip
        no_dynamic = self.compile is False or (isinstance(self.compile, Mapping) and self.compile.get("dynamic") is False)
        if self.dynamic_batch and no_dynamic:
            raise ValueError(f"dynamic_batch=True marks the batch dimension of compiled graphs dynamic, but "
                             f"compile={dict(self.compile) if isinstance(self.compile, Mapping) else self.compile!r} rules "
                             "that out; drop one of them")  # fmt: skip
        unknown = set(self.explicit) - set(self.option_names())
        if unknown:
            raise ValueError(f"unknown explicit options {sorted(unknown)}; options are {list(self.option_names())}")

    def not_reproducible(self) -> List[str]:
        """The options another process cannot reproduce, which a background compile would need to."""
        return [text for text, clash in (("compile=False", self.compile is False),
                                         (f"quantize={self.quantize!r}", self.quantize is not None),
                                         (f"cache={self.cache!r}", self.cache is not None)) if clash]  # fmt: skip

    @staticmethod
    def _check_compile_options(options: dict) -> None:
        unknown = sorted(set(options) - set(COMPILE_KEYS))
        if unknown:
            raise ValueError(f"compile got unknown torch.compile option(s) {unknown}; valid keys are {list(COMPILE_KEYS)}")
        if "mode" in options:
            check_choice("compile['mode']", options["mode"], COMPILE_MODES)
        for key in ("fullgraph",):
            if key in options:
                check_bool(f"compile[{key!r}]", options[key])
        # A bool or None, not merely equal to one: torch asserts on 1 and 0.
        if "dynamic" in options and not (options["dynamic"] is None or isinstance(options["dynamic"], bool)):
            raise ValueError(f"compile['dynamic'] must be True, False or None, got {options['dynamic']!r}")
        # A name or a compiler function; anything else would only fail at the first call, inside torch.compile.
        backend = options.get("backend")
        if not (backend is None or isinstance(backend, str) or callable(backend)):
            raise TypeError(f"compile['backend'] must be a backend name (torch._dynamo.list_backends()), a compiler "
                            f"function or None, got {options['backend']!r} ({type(options['backend']).__name__})")
        if "options" in options and not isinstance(options["options"], Mapping):
            raise TypeError(f"compile['options'] must be a dict of inductor options, got {options['options']!r}")
        if options.get("mode") is not None and not takes_mode(options, ignore_backend=True):
            raise ValueError("compile: torch.compile takes either 'mode' or 'options', not both")

    @classmethod
    def option_names(cls):
        return tuple(f.name for f in dataclasses.fields(cls) if f.name != "explicit")

    @classmethod
    def from_options(cls, config: "Optional[OptimizeConfig]" = None, **options) -> "OptimizeConfig":
        """Merge a config and keyword options; options the user named count as explicit."""
        unknown = sorted(set(options) - set(cls.option_names()))
        if unknown:
            raise TypeError(f"optimize() got unknown option(s) {unknown}; valid options are {list(cls.option_names())}")
        if config is None:
            base = cls()
            named = set(options)
        elif isinstance(config, cls):
            base = config
            # Fields a config sets away from their default are as good as named.
            named = {n for n in cls.option_names() if getattr(config, n) != getattr(cls, n, None)} | set(config.explicit)
            named |= set(options)
        else:
            raise TypeError(f"config must be a diffopt.OptimizeConfig or None, got {type(config).__name__}")
        values = {n: getattr(base, n) for n in cls.option_names()}
        values.update(options)
        return cls(**values, explicit=frozenset(named))

    def asks_for(self, name: str) -> bool:
        """True when the user named this option, so a missing capability must be an error."""
        return name in self.explicit
