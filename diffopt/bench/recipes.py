"""Recipes: what the benchmark does to a freshly built pipeline before timing it.

A recipe is a function ``recipe(pipe, **options) -> str | None`` that changes ``pipe`` in place and may return
a note for the results (``diffopt`` returns its report). A recipe spec on the command line is a name with
optional options, ``name:key=value,key=value``; values are read as Python literals when they parse as one
(``compile=False``, ``mode='max-autotune'``) and kept as strings otherwise (``attention=sdpa``).

=====================  ==========================================================================================
``classic``            eager, the pre-PyTorch-2 attention processors (``set_default_attn_processor``)
``sdpa``               eager, diffusers' default (scaled_dot_product_attention): the reference of every comparison
``diffusers-compile``  the recipe of the diffusers 'PyTorch 2.0' docs page: channels_last +
                       ``torch.compile(mode="reduce-overhead", fullgraph=True)`` on the UNet and the ControlNet
                       (default mode off CUDA: no CUDA graphs)
``compile``            plain ``torch.compile`` of the denoiser (``pipe.transformer`` or ``pipe.unet``), default
                       arguments: what most users write, for diffopt to be measured against in the same run
``diffopt``            ``diffopt.optimize(pipe, **options)``
=====================  ==========================================================================================

``PRESETS`` names a spec, so that a configuration worth tracking gets a short column title; add to it freely.

Step caching (``diffopt:cache=...``) takes the values of ``optimize(cache=...)`` (``deepcache``, ``first_block``,
``auto``) and, since a spec cannot build a ``diffopt.DeepCache``, its settings as ``cache_interval``,
``cache_depth`` and ``cache_threshold``: ``diffopt:cache=deepcache,cache_interval=5``.

Example:
    >>> from diffopt.bench.recipes import resolve
    >>> recipe = resolve("diffopt:compile=False")
    >>> recipe.name, recipe.options
    ('diffopt:compile=False', {'compile': False})
"""
from __future__ import annotations

import ast
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

# Modules that run once per denoising step; everything else (VAE, schedulers) runs once per image.
DENOISERS = ("unet", "transformer", "controlnet")


def _denoisers(pipe):
    return [getattr(pipe, name) for name in DENOISERS if isinstance(getattr(pipe, name, None), torch.nn.Module)]


def classic(pipe) -> None:
    """Eager with the attention processors diffusers used before SDPA (AttnProcessor, AttnAddedKVProcessor)."""
    for module in _denoisers(pipe):
        if not hasattr(module, "set_default_attn_processor"):
            # SD3's and Flux's transformers were written for SDPA: there is no classic form to measure.
            raise ValueError(f"classic: {type(module).__name__} has no pre-SDPA attention processors")
        module.set_default_attn_processor()


def sdpa(pipe) -> None:
    """Eager, as diffusers builds it: SDPA attention processors. Changes nothing."""


def diffusers_compile(pipe) -> None:
    """The docs page's recipe: SDPA (default) + channels_last + torch.compile(fullgraph=True) per denoiser."""
    # CUDA graphs ("reduce-overhead") exist only on CUDA; elsewhere the recipe falls back to the default mode.
    mode = "reduce-overhead" if pipe.device.type == "cuda" else "default"
    for name in DENOISERS:
        module = getattr(pipe, name, None)
        if isinstance(module, torch.nn.Module):
            module.to(memory_format=torch.channels_last)
            setattr(pipe, name, torch.compile(module, mode=mode, fullgraph=True))


def plain_compile(pipe) -> None:
    """``torch.compile`` of the denoiser with default arguments, as most users write it: the transformer where
    the pipeline has one, else the UNet (a ControlNet stays eager). No memory format, no processor change."""
    for name in ("transformer", "unet"):
        module = getattr(pipe, name, None)
        if isinstance(module, torch.nn.Module):
            setattr(pipe, name, torch.compile(module))
            return


def diffopt(pipe, **options) -> Optional[str]:
    """``diffopt.optimize(pipe, **options)``; the report's text becomes the cell's note."""
    # Imported here: the benchmark must run, and record the failure in this cell, even without diffopt's core.
    import diffopt as library

    return str(library.optimize(pipe, **options))


RECIPES: dict[str, Callable[..., Optional[str]]] = {
    "classic": classic,
    "sdpa": sdpa,
    "diffusers-compile": diffusers_compile,
    "compile": plain_compile,
    "diffopt": diffopt,
}

# Short names for specs; e.g. PRESETS["diffopt-max-autotune"] = "diffopt:mode='max-autotune'".
PRESETS: dict[str, str] = {
    "diffopt-nocompile": "diffopt:compile=False",
    # A transformer compiled whole instead of block by block (diffopt's default for transformers): compare first
    # calls and steady speed; on a UNet pipeline it is diffopt itself.
    "diffopt-whole": "diffopt:compile_blocks=False",
    # Regional compilation required (a UNet pipeline's cell fails with the ValueError).
    "diffopt-blocks": "diffopt:compile_blocks=True",
    # Opt-in quantization (torchao): their cells' rel. L2 and PSNR columns show what it costs in fidelity.
    "diffopt-fp8": "diffopt:quantize='fp8'",
    "diffopt-int8": "diffopt:quantize='int8'",
    "diffopt-int8-weight-only": "diffopt:quantize='int8-weight-only'",
    # DeepCache's uniform intervals for SD1.5 (N=3 and N=5 in the paper); "auto" also covers transformers.
    "diffopt-deepcache3": "diffopt:cache='deepcache',cache_interval=3",
    "diffopt-deepcache5": "diffopt:cache='deepcache',cache_interval=5",
    "diffopt-cache": "diffopt:cache='auto'",
}

# Recipe options that are settings of the cache object: option -> (field, diffopt class that has it).
CACHE_SETTINGS = {
    "cache_interval": ("interval", "DeepCache"),
    "cache_depth": ("depth", "DeepCache"),
    "cache_threshold": ("threshold", "FirstBlockCache"),
}

REFERENCE = "sdpa"  # eager diffusers default: speed-ups and output differences are measured against it


@dataclass(frozen=True)
class Recipe:
    """A resolved recipe spec: its column name, the function and the options it is called with."""

    name: str
    function: Callable[..., Optional[str]] = field(compare=False)
    options: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def compiles(self) -> bool:
        """Whether the recipe calls torch.compile (the first call then includes compilation)."""
        if self.function in (diffusers_compile, plain_compile):
            return True
        return self.function is diffopt and self.options.get("compile", True) is not False

    @property
    def caches(self) -> bool:
        """Whether the recipe turns on step caching (fewer FLOPs per step than the reference counted)."""
        return self.function is diffopt and self.options.get("cache") is not None

    @property
    def changes_output(self) -> bool:
        """Whether the recipe changes the image by design (step caching, quantization), not only by rounding."""
        return self.caches or (self.function is diffopt and self.options.get("quantize") is not None)

    def apply(self, pipe) -> Optional[str]:
        return self.function(pipe, **self.options)


def choices() -> list[str]:
    return sorted(RECIPES) + sorted(PRESETS)


def resolve(spec: str) -> Recipe:
    """Turn a spec such as ``"diffusers-compile"``, ``"diffopt-nocompile"`` or ``"diffopt:compile=False"`` into a Recipe.

    Raises ``ValueError`` naming the bad value and the choices.
    """
    name = spec.strip()
    expanded = PRESETS.get(name, name)
    base, _, option_text = expanded.partition(":")
    if base in PRESETS:  # "diffopt-nocompile:attention=flash": a preset is a whole spec, not a base for options
        raise ValueError(
            f"recipe {base!r} is a preset and takes no options; write its spec with yours: "
            f"{PRESETS[base]},{option_text}"
        )
    if base not in RECIPES:
        raise ValueError(f"unknown recipe {base!r}; choose from: {', '.join(choices())}")
    options = parse_options(option_text)
    if options and base != "diffopt":
        raise ValueError(f"recipe {base!r} takes no options, got {option_text!r}")
    if base == "diffopt":
        options = cache_options(options)
        check_optimize_options(options)
    return Recipe(name, RECIPES[base], options)


def check_optimize_options(options: dict[str, Any]) -> None:
    """Raise ``ValueError`` / ``TypeError`` naming a bad ``diffopt:`` option or value, as ``optimize`` would, so that
    ``diffopt:compile=maybe`` fails before any pipeline is built rather than in every cell."""
    import dataclasses

    from diffopt import OptimizeConfig

    known = [f.name for f in dataclasses.fields(OptimizeConfig) if f.init and not f.name.startswith("_")]
    known = [name for name in known if name != "explicit"]
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ValueError(f"unknown diffopt option(s) {unknown}; choose from: {', '.join(known)}")
    OptimizeConfig(**options)


def cache_options(options: dict[str, Any]) -> dict[str, Any]:
    """Fold ``cache_interval`` / ``cache_depth`` / ``cache_threshold`` into the ``cache`` object they configure.

    Raises ``ValueError`` / ``TypeError`` naming the bad value, so that ``--recipes`` fails before any work.

    Example:
        >>> cache_options({"cache": "deepcache", "cache_interval": 5})
        {'cache': DeepCache(interval=5, depth=1)}
    """
    import diffopt.config as config

    if "cache" in options:
        config.check_cache(options["cache"])
    settings = {key: options[key] for key in CACHE_SETTINGS if key in options}
    if not settings:
        return options

    kinds = {CACHE_SETTINGS[key][1] for key in settings}
    named = {"deepcache": "DeepCache", "first_block": "FirstBlockCache"}.get(options.get("cache"))
    if len(kinds) > 1 or (named and kinds != {named}) or options.get("cache") not in (None, "deepcache", "first_block"):
        raise ValueError(
            f"recipe options {sorted(settings)} do not fit cache={options.get('cache')!r}: cache_interval and "
            "cache_depth set cache='deepcache', cache_threshold sets cache='first_block'"
        )
    cls = getattr(config, kinds.pop())
    rest = {key: value for key, value in options.items() if key not in CACHE_SETTINGS}
    rest["cache"] = cls(**{CACHE_SETTINGS[key][0]: value for key, value in settings.items()})
    return rest


def parse_options(text: str) -> dict[str, Any]:
    """``"compile=False,mode=max-autotune"`` -> ``{"compile": False, "mode": "max-autotune"}``."""
    options: dict[str, Any] = {}
    for item in split_top_level(text):
        key, equals, value = item.partition("=")
        if not equals or not key.strip():
            raise ValueError(f"recipe option must look like key=value, got {item!r}")
        if key.strip() in options:  # the last one would win silently, under a recipe name that shows both
            raise ValueError(f"recipe option {key.strip()!r} given twice in {text!r}")
        options[key.strip()] = _literal(value.strip())
    return options


def _literal(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def split_top_level(text: str) -> list[str]:
    """Split on the commas outside brackets and quotes: ``"a=1,b=(2, 3)"`` -> ``["a=1", "b=(2, 3)"]``."""
    items, current, depth, quote = [], [], 0, None
    for char in text:
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
        elif char == "," and depth == 0:
            items.append("".join(current))
            current = []
            continue
        current.append(char)
    items.append("".join(current))
    return [item.strip() for item in items if item.strip()]


def split_specs(text: str) -> list[str]:
    """Split a ``--recipes`` value on commas, keeping ``diffopt:a=1,b=2`` together.

    A comma-separated item of the form key=value (no ":" before its "=") continues the options of the item
    before it; commas inside brackets or quotes do not split.

    Example:
        >>> split_specs("sdpa,diffopt:compile=False,attention=sdpa,diffusers-compile")
        ['sdpa', 'diffopt:compile=False,attention=sdpa', 'diffusers-compile']
    """
    specs: list[str] = []
    for item in split_top_level(text):
        if specs and "=" in item and ":" not in item.partition("=")[0]:
            specs[-1] += "," + item
        else:
            specs.append(item)
    return specs
