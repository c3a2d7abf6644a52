"""``diffopt env``: what this machine and its packages support, one line per ``diffopt.optimize`` option.

Every line comes from the gate ``optimize`` itself consults (:mod:`diffopt.capabilities`), for the device
``optimize`` would most likely see (the GPU if there is one, else the CPU) in its usual dtype. A gate that
fails is printed with its error instead of ending the report.

Example::

    $ diffopt env
    diffopt 0.1.0, torch 2.13.0+cpu, diffusers 0.42.1, torchao 0.17.0, triton not installed
    device: cpu (float32)
    attention=sdpa          yes
    attention=flash         yes
    attention=cudnn         no: cudnn attention needs a CUDA device (found cpu float32)
    ...
"""
from __future__ import annotations

import os

import importlib.metadata
from typing import Callable

from .attention_names import TABLE

# Every backend of attention= (not "auto", which gets its own line saying what it picks, nor None).
ATTENTION = tuple(row.name for row in TABLE)
QUANTIZE = ("int8", "int8-weight-only", "fp8")
PACKAGES = ("torch", "diffusers", "torchao", "triton")


def version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def verdict(gate: Callable[[], object]) -> str:
    """``"yes"``, ``"no: <reason>"``, or ``"unknown: <error>"`` when the gate itself raised."""
    try:
        found = gate()
    except Exception as error:  # noqa: BLE001 - one broken gate must not hide the others' answers
        return f"unknown: {type(error).__name__}: {error}"
    return "yes" if found.ok else f"no: {found.reason}"


def rows(device, dtype) -> list[tuple[str, str]]:
    from diffopt import capabilities

    found = [(f"attention={name}", verdict(lambda name=name: capabilities.attention_backend(name, device, dtype)))
             for name in ATTENTION]
    try:
        auto, where = capabilities.auto_attention(device, dtype)
        found.append(("attention=auto", f"picks {auto!r} on {where}"))
    except Exception as error:  # noqa: BLE001
        found.append(("attention=auto", f"unknown: {type(error).__name__}: {error}"))
    found.append(("compile", verdict(capabilities.compile)))
    found += [(f"quantize={mode}", verdict(lambda mode=mode: capabilities.quantize(mode, device))) for mode in QUANTIZE]
    found.append(("cache=first_block", verdict(capabilities.first_block_cache)))
    found.append(("cache=deepcache", "yes (built into diffopt, no package needed)"))
    found.append(("device_postprocess", verdict(capabilities.device_postprocess)))
    return found


def print_env() -> int:
    import torch

    import diffopt

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.float16 if cuda else torch.float32
    print(f"diffopt {diffopt.__version__}, " + ", ".join(f"{name} {version(name)}" for name in PACKAGES))
    card = f", {torch.cuda.get_device_name(device)}" if cuda else ""
    print(f"device: {device}{card} ({str(dtype).replace('torch.', '')})")
    found = rows(device, dtype)
    width = max(len(name) for name, _ in found)
    for name, answer in found:
        print(f"{name:<{width}}  {answer}")
    print(f"{'compile_cache':<{width}}  {compile_cache_line()}")
    return 0


def compile_cache_line() -> str:
    """Where saved compiles go by default, and how many entries are there."""
    from diffopt.compile_cache import ENV_VAR, resolve_directory
    from diffopt.paths import why_not_writable

    directory = resolve_directory(None)
    if directory is None:
        return f"off ({ENV_VAR}={os.environ.get(ENV_VAR, '')!r})"
    blocker = why_not_writable(directory)
    if blocker:
        return f"{directory}: {blocker}, so compiles will not be saved (move it with {ENV_VAR}, disable with {ENV_VAR}=off)"
    entries = len(list(directory.glob("*/meta.json"))) if directory.is_dir() else 0
    return f"{directory} ({entries} saved compiles; move it with {ENV_VAR}, disable with {ENV_VAR}=off)"
