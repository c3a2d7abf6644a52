"""A managed on-disk cache of torch's portable compile artifacts, so a new process starts warm.

torch.compile of a denoiser costs a minute or more in every new process; torch can serialize what it compiled
(``torch.compiler.save_cache_artifacts``) and hot-load it elsewhere (``load_cache_artifacts``), which turns the
next process's compile into cache hits. This module decides where those blobs live, which one fits this model
and machine, and reports in one sentence what happened. Interface (what the compile transform calls)::

    directory = resolve_directory(setting)       # setting: the compile_cache option (None, False or a path)
    key = artifact_key(module, options, device, dtype)
    result = load(directory, key, device)        # BEFORE the module's first compiled call in this process
    ...                                          # compile and run the first call
    result = save(directory, key, device)        # after the first compiled call

``load``/``save`` return a :class:`CacheResult` (``status``, ``detail`` for a report line, ``path``, ``nbytes``)
and never raise: a broken cache costs a ``RuntimeWarning`` and a recompile, never a failed generation.
Layout: ``<directory>/<key>/artifacts.bin`` and ``<directory>/<key>/meta.json`` (fingerprint, time, size).
``save`` writes everything compiled in the process so far (loaded artifacts included), so calling it again after
a recompile (a new shape) only makes the entry more complete (see ``_one_batch_per_kind`` for what that takes).

What the artifacts hold: inductor's and AOTAutograd's cache entries (generated code), plus on CUDA the built Triton
kernels. On the CPU the C++ kernels travel as source: a warm process skips tracing and lowering but still runs the
C++ compiler (a tiny UNet on 2 cores: 79 s instead of 126 s), so the cache pays off mostly on GPUs.
``copy_entries`` copies entries into another cache directory (a container image, a serving volume).
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import pathlib
import platform
import shutil
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Optional

import torch

ENV_VAR = "DIFFOPT_CACHE_DIR"
_OFF_VALUES = ("", "0", "off", "false")
ARTIFACTS, META = "artifacts.bin", "meta.json"
HOW_TO_MOVE = f"move it with the compile_cache option or {ENV_VAR}=/a/writable/dir, or disable it with compile_cache=False or {ENV_VAR}=off"


@dataclass(frozen=True)
class CacheResult:
    status: str  # "loaded", "found" (not loaded yet), "missing", "mismatch", "saved", "disabled" or "failed"
    detail: str  # one sentence for a report line
    path: Optional[pathlib.Path] = None
    nbytes: int = 0


def resolve_directory(setting: Any = None) -> Optional[pathlib.Path]:
    """The cache directory for the ``compile_cache`` option, or None when the cache is off. Creates nothing."""
    if setting is False:
        return None
    if setting is None:
        value = os.environ.get(ENV_VAR)
        if value is not None:
            return None if value.strip().lower() in _OFF_VALUES else pathlib.Path(value).expanduser()
        xdg = os.environ.get("XDG_CACHE_HOME", "")
        # The XDG spec says a relative XDG_CACHE_HOME is invalid and must be ignored.
        base = pathlib.Path(xdg) if os.path.isabs(xdg) else pathlib.Path.home() / ".cache"
        return base / "diffopt"
    choices = f"compile_cache={setting!r}: expected None (default location), False (off) or a directory path"
    path = os.fspath(setting) if isinstance(setting, (str, os.PathLike)) else None
    if not isinstance(path, str):  # True, numbers, bytes paths
        raise TypeError(choices)
    if not path.strip():
        raise ValueError(choices)
    return pathlib.Path(path).expanduser()


def package_version(name: str) -> str:
    """The version of torch, triton, diffusers or diffopt, read without importing what is not imported yet."""
    if name == "torch":
        return torch.__version__  # with its local tag: a +cu126 build's kernels are not a +cu130 build's
    if name == "diffopt":
        from . import __version__

        return __version__
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


def _cpu_model() -> str:
    # Inductor's C++ kernels use the vector instructions of the CPU they were built on (AVX-512 code dies on an
    # AVX2-only machine), so a CPU artifact is only trusted on the same CPU model.
    try:
        with open("/proc/cpuinfo") as lines:
            return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "unknown")
    except OSError:
        return "unknown"


def environment_fingerprint(device) -> Dict[str, str]:
    """Everything outside the model that makes an artifact invalid, readably (stored in each meta.json)."""
    device = torch.device(device)
    found = {name: package_version(name) for name in ("torch", "triton", "diffusers", "diffopt")}
    found.update(python="%d.%d" % sys.version_info[:2], device=device.type)
    if device.type == "cuda":  # queried only for CUDA models: a CPU run never initializes CUDA
        found["gpu"] = torch.cuda.get_device_name(device)
        found["compute capability"] = "%d.%d" % torch.cuda.get_device_capability(device)
    else:
        found["cpu"] = f"{platform.machine()} {_cpu_model()}"
    return found


def _digest(value: Any) -> str:
    # Callables (a guard_filter_fn in options) by name: their repr holds an address that changes every run.
    name = lambda v: f"{getattr(v, '__module__', '')}.{getattr(v, '__qualname__', v)}" if callable(v) else str(v)  # noqa: E731
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=name).encode()).hexdigest()[:16]


def artifact_key(module: torch.nn.Module, options: Dict[str, Any], device, dtype) -> str:
    """``<model digest>-<environment digest>``: 33 hex characters and a dash. The model part (class, config,
    dtype, compile options) lets :func:`load` find the entry another environment saved for the same model."""
    config = getattr(module, "config", None) or {}
    # Keys such as _name_or_path or _diffusers_version say where the weights came from, not what is compiled.
    config = {k: v for k, v in dict(config).items() if not k.startswith("_")}
    cls = type(module)
    model = _digest([f"{cls.__module__}.{cls.__qualname__}", config, str(dtype), options])
    return f"{model}-{_digest(environment_fingerprint(device))}"


def _shown(path: pathlib.Path) -> str:
    home = str(pathlib.Path.home())
    return "~" + str(path)[len(home):] if str(path).startswith(home + os.sep) else str(path)


def _mb(nbytes: int) -> str:
    return f"{nbytes / 1e6:.1f} MB"


def _unavailable(directory: Optional[pathlib.Path]) -> Optional[CacheResult]:
    if not hasattr(torch.compiler, "save_cache_artifacts"):
        return CacheResult("disabled", f"torch {torch.__version__} cannot save compiled kernels (needs torch >= 2.7)")
    if directory is None:
        return CacheResult("disabled", f"compile cache off (compile_cache=False or {ENV_VAR}=off)")
    return None


def _failed(what: str, path: pathlib.Path, error: Any, advice: str = HOW_TO_MOVE) -> CacheResult:
    warnings.warn(f"diffopt compile cache: {what} {path} failed ({error}); {advice}", RuntimeWarning, stacklevel=3)
    return CacheResult("failed", f"{what} {_shown(path)} failed ({error}): compiling from scratch", path)


def _differences(saved: Dict[str, str], current: Dict[str, str]) -> str:
    fields = sorted(set(saved) | set(current))
    return ", ".join(f"{f} {saved.get(f, 'absent')}, this is {f} {current.get(f, 'absent')}" for f in fields if saved.get(f) != current.get(f))


def load(directory: Optional[pathlib.Path], key: str, device, probe: bool = False) -> CacheResult:
    """Hot-load the artifacts saved under ``key`` into torch's caches, if they were saved for this environment.
    ``probe``: only check that they were (status "found"), for a load later in a thread (a background compile's:
    loading a full-size model's artifacts takes seconds)."""
    unavailable = _unavailable(directory)
    if unavailable:
        return unavailable
    entry, current = pathlib.Path(directory) / key, environment_fingerprint(device)
    if not (entry / META).exists():
        # Another environment's entry for the same model explains the miss (a torch upgrade, another card).
        for other in sorted(pathlib.Path(directory).glob(key.split("-")[0] + "-*/" + META)):
            try:
                saved = json.loads(other.read_text())["fingerprint"]
            except (OSError, ValueError, KeyError, TypeError):
                continue
            return CacheResult("mismatch", f"saved for {_differences(saved, current)}: recompiling", other.parent)
        return CacheResult("missing", f"nothing saved in {_shown(entry)} yet: compiling from scratch", entry)
    try:
        meta = json.loads((entry / META).read_text())
        saved = meta["fingerprint"]
        if saved != current:  # never hand torch kernels built for other versions or hardware
            return CacheResult("mismatch", f"saved for {_differences(saved, current)}: recompiling", entry)
        if probe:
            return CacheResult("found", f"found {_mb(meta['size'])} of compiled kernels in {_shown(entry)}, saved by an "
                               "earlier run on this card and versions: loaded at the first call", entry, meta["size"])  # fmt: skip
        data = (entry / ARTIFACTS).read_bytes()
        if len(data) != meta["size"]:
            raise ValueError(f"{len(data)} bytes where {meta['size']} were written")
        # torch logs and returns None for bytes it cannot unpickle.
        if torch.compiler.load_cache_artifacts(data) is None:
            raise ValueError("torch could not read the artifacts")
    except Exception as error:  # noqa: BLE001 - a broken cache must only cost a recompile
        return _failed("loading", entry, f"{type(error).__name__}: {error}", f"delete {entry} to start it over; {HOW_TO_MOVE}")
    where = "card" if current["device"] == "cuda" else "machine"
    detail = f"loaded {_mb(len(data))} of compiled kernels from {_shown(entry)}, saved by an earlier run on this {where} and versions"
    return CacheResult("loaded", detail, entry, len(data))


def _write_atomically(path: pathlib.Path, data: bytes) -> None:
    # A temporary file in the same directory and os.replace: a reader sees the old file or the new one, never half.
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise


def save(directory: Optional[pathlib.Path], key: str, device) -> CacheResult:
    """Write everything torch compiled in this process so far under ``key``."""
    unavailable = _unavailable(directory)
    if unavailable:
        return unavailable
    entry = pathlib.Path(directory) / key
    try:
        saved = torch.compiler.save_cache_artifacts()
    except Exception as error:  # noqa: BLE001
        return _failed("saving compiled kernels to", entry, f"{type(error).__name__}: {error}")
    if saved is None:
        return CacheResult("missing", "torch compiled nothing it can save in this process: nothing written", entry)
    data = _one_batch_per_kind(saved[0])
    meta = dict(fingerprint=environment_fingerprint(device), created=time.strftime("%Y-%m-%dT%H:%M:%S%z"), size=len(data))
    try:
        entry.mkdir(parents=True, exist_ok=True)
        _write_atomically(entry / ARTIFACTS, data)
        _write_atomically(entry / META, json.dumps(meta, indent=1).encode())  # last: a meta.json vouches for its blob
    except OSError as error:
        return _failed("saving compiled kernels to", entry, f"{type(error).__name__}: {error}")
    return CacheResult("saved", f"saved {_mb(len(data))} of compiled kernels to {_shown(entry)}", entry, len(data))


def _one_batch_per_kind(data: bytes) -> bytes:
    """torch's blob holds one (kind, artifacts) batch per ``save_cache_artifacts`` call that found new artifacts,
    and ``load_cache_artifacts`` reads the batches into a dict, which keeps only the last batch of each kind: after
    a second shape compiled, a new process got that shape's graphs and not the first's, and compiled it again (SD3
    Medium on an H200: a 13-s warm first call where 5 s were expected). So the batches of a kind are merged into one
    here. Reads torch's private blob format; where that has changed, the blob is written as torch made it."""
    try:
        from torch.compiler._cache import (
            CacheArtifactManager, _deserialize_single_cache, _serialize_single_cache,
        )
        from torch.utils._appending_byte_serializer import AppendingByteSerializer

        CacheArtifactManager._ensure_cache_artifacts_registered()
        batches = AppendingByteSerializer.to_list(data, deserialize_fn=_deserialize_single_cache)
        merged: Dict[str, list] = {}
        for kind, artifacts in batches:
            merged.setdefault(kind, []).extend(artifacts)
        if len(merged) == len(batches):
            return data  # one batch per kind already
        writer = AppendingByteSerializer(serialize_fn=_serialize_single_cache)
        writer.extend(merged.items())
        return writer.to_bytes()
    except Exception:  # noqa: BLE001 - another torch's format: keep what torch wrote
        return data


def copy_entries(src_dir, dst_dir, keys: Iterable[str]) -> List[pathlib.Path]:
    """Copy the entries ``keys`` from one cache directory to another (e.g. into a container image); returns them."""
    copied = []
    for key in keys:
        copied.append(pathlib.Path(shutil.copytree(pathlib.Path(src_dir) / key, pathlib.Path(dst_dir) / key, dirs_exist_ok=True)))
    return copied


class Entry:
    """One compiled model's place in the cache, for the compile transform: loaded when it is created (before the
    model's first compiled call), saved after every call that compiled something."""

    def __init__(self, directory: pathlib.Path, key: str, device, defer_load: bool = False):
        self.directory, self.key, self.device = directory, key, device
        # defer_load: only found now (status "found"); a background compile's thread loads it with reload()
        self.loaded = load(directory, key, device, probe=defer_load)

    def reload(self) -> None:
        """Load the entry again: another process (a background compile) has saved to it since."""
        self.loaded = load(self.directory, self.key, self.device)

    @property
    def detail(self) -> str:
        if self.loaded.status == "missing":
            return f"no saved compile yet; it is saved to {_shown(self.directory)} after the first call"
        return self.loaded.detail

    def after_compile(self, first: bool) -> Optional[CacheResult]:
        """Save after a call that compiled: the first one, unless its compile came from this entry (nothing new to
        write), and every later one (a new shape, a LoRA), so the entry grows with what the process compiled."""
        if first and self.loaded.status == "loaded":
            return None
        return save(self.directory, self.key, self.device)


def entry_factory(setting: Any):
    """``entry(component, options)`` for the ``compile_cache`` option: an :class:`Entry` for a model compiled with
    inductor, None where the cache is off or the backend is another (its graphs are not inductor's to cache)."""
    directory = resolve_directory(setting)

    def entry(component, options: Dict[str, Any], defer_load: bool = False) -> Optional[Entry]:
        if directory is None or options.get("backend", "inductor") != "inductor":
            return None
        from .components import execution_device, module_dtype

        device = execution_device(component.module)
        key = artifact_key(component.module, options, device, module_dtype(component.module))
        return Entry(directory, key, device, defer_load)

    return entry
