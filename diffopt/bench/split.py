"""Where an end-to-end call goes: the VAE decode, the post-processing to PIL images, and the rest of the call.

:func:`split_targets` names the methods of a pipeline that do the two parts after the denoising loop:

* ``decode``: ``pipe.vae.decode``, where the pipeline has a VAE (not DeepFloyd IF's stages I and II);
* ``postprocess``: ``pipe.image_processor.postprocess`` (tensor to PIL images) where the pipeline has an image
  processor, else ``pipe.numpy_to_pil`` (DeepFloyd IF: the pipeline scales the image to [0, 1] and copies it to
  the host as a numpy array itself, then calls ``numpy_to_pil``; that scaling and copy are not in the part).

:func:`timed_methods` replaces them, for a ``with`` block only, by wrappers that wait for the device before and
after (:func:`diffopt.bench.env.sync`) and record the wall seconds of each call. The wrappers are instance
attributes written straight into ``vars(owner)``: the class is never touched, no ``__setattr__`` runs (a
``torch.compile`` wrapper would forward it to the module inside), and on the way out, error or not, ``vars(owner)``
gets back exactly what it had: an instance attribute that was there before (another library's hook) is put
back, one that was not is deleted.

:func:`labelled_methods` puts the same methods, the same way, inside ``torch.profiler.record_function`` ranges
named after their part, so that a profile of a call says which of its ops (and, on CUDA, which kernels) the decode
and the post-processing launched; it adds no synchronization, so the profiled call runs as a user's would.

Example:
    >>> import torch
    >>> from diffopt.bench.pipelines import build_case
    >>> stage = build_case("sd-txt2img", size="tiny", steps=1).stages[0]
    >>> with timed_methods(split_targets(stage.pipe), torch.device("cpu")) as seconds:
    ...     images = stage.call(1, "pil")
    >>> sorted(seconds), len(seconds["decode"]), "decode" in vars(stage.pipe.vae)
    (['decode', 'postprocess'], 1, False)
"""
from __future__ import annotations

import contextlib
import functools
import time
from typing import Any, Callable, Iterator

import torch

from diffopt.bench.env import sync

DECODE = "decode"
POSTPROCESS = "postprocess"


def split_targets(pipe) -> dict[str, tuple[Any, str]]:
    """``{part: (owner, method name)}`` of what to time in ``pipe``'s call to PIL images; a part the pipeline
    does not have is left out."""
    targets: dict[str, tuple[Any, str]] = {}
    vae = getattr(pipe, "vae", None)
    if vae is not None and callable(getattr(vae, "decode", None)):
        targets[DECODE] = (vae, "decode")
    processor = getattr(pipe, "image_processor", None)
    if processor is not None and callable(getattr(processor, "postprocess", None)):
        targets[POSTPROCESS] = (processor, "postprocess")
    elif callable(getattr(pipe, "numpy_to_pil", None)):
        targets[POSTPROCESS] = (pipe, "numpy_to_pil")
    return targets


@contextlib.contextmanager
def timed_methods(targets: dict[str, tuple[Any, str]], device: torch.device) -> Iterator[dict[str, list[float]]]:
    """Time every call of each target's method inside the ``with`` block; yields ``{part: [seconds, ...]}``,
    one entry per call (a part called twice in one pipeline call has two). A method that cannot be replaced on
    the instance (a property, ``__slots__``) is left alone and its list stays empty."""
    seconds: dict[str, list[float]] = {part: [] for part in targets}
    with _wrapped_methods(targets, lambda part, method: _timing_wrapper(method, seconds[part], device)):
        yield seconds


@contextlib.contextmanager
def labelled_methods(targets: dict[str, tuple[Any, str]]) -> Iterator[list[str]]:
    """Run every call of each target's method inside the ``with`` block in a
    ``torch.profiler.record_function(part)`` range; yields the parts so labelled (a method that cannot be replaced
    on the instance is left alone, and its part is not among them). Outside a profiler a range costs next to
    nothing, but nothing else changes either: no synchronization, no timing."""
    with _wrapped_methods(targets, _labelling_wrapper) as parts:
        yield parts


@contextlib.contextmanager
def _wrapped_methods(
    targets: dict[str, tuple[Any, str]], wrap: Callable[[str, Callable], Callable]
) -> Iterator[list[str]]:
    """Put ``wrap(part, method)`` in place of each target's method for the ``with`` block, in ``vars(owner)``;
    yields the parts replaced. On the way out, error or not, every ``vars(owner)`` gets back what it had."""
    installed: list[tuple[Any, str, bool, Any]] = []
    parts: list[str] = []
    try:
        for part, (owner, name) in targets.items():
            if _replaceable(owner, name):
                installed.append(_install(owner, name, wrap(part, getattr(owner, name))))
                parts.append(part)
        yield parts
    finally:
        for owner, name, had_own, previous in reversed(installed):
            _restore(owner, name, had_own, previous)


def _timing_wrapper(function: Callable, seconds: list[float], device: torch.device) -> Callable:
    # Synchronized on both sides: on CUDA the decode's kernels would otherwise be counted in whatever waits next.
    @functools.wraps(function)  # the same name and inspect.signature as the method it stands for
    def timed(*args, **kwargs):
        sync(device)
        start = time.perf_counter()
        result = function(*args, **kwargs)
        sync(device)
        seconds.append(time.perf_counter() - start)
        return result

    return timed


def _labelling_wrapper(part: str, function: Callable) -> Callable:
    @functools.wraps(function)
    def labelled(*args, **kwargs):
        with torch.profiler.record_function(part):
            return function(*args, **kwargs)

    return labelled


def _replaceable(owner: Any, name: str) -> bool:
    """Whether an instance attribute ``name`` on ``owner`` would be what ``owner.name`` finds: not with
    ``__slots__`` (no ``vars``), nor when the class has a data descriptor (a property) of that name."""
    try:
        vars(owner)
    except TypeError:
        return False
    return not hasattr(getattr(type(owner), name, None), "__set__")


def _install(owner: Any, name: str, wrapper: Callable) -> tuple[Any, str, bool, Any]:
    """Write ``wrapper`` into ``vars(owner)``; returns what :func:`_restore` needs to undo it."""
    namespace = vars(owner)
    had_own, previous = name in namespace, namespace.get(name)
    namespace[name] = wrapper
    return owner, name, had_own, previous


def _restore(owner: Any, name: str, had_own: bool, previous: Any) -> None:
    namespace = vars(owner)
    if had_own:
        namespace[name] = previous
    else:
        namespace.pop(name, None)
