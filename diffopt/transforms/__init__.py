"""One file per transform. Each ``apply_*`` function changes one module and returns a :class:`Change`
holding the closure that undoes it (or None when there was nothing to change)."""
from __future__ import annotations

import functools
import inspect
import types
from dataclasses import dataclass
from typing import Any, Callable


@dataclass(frozen=True)
class Change:
    detail: str  # what changed, for the report
    undo: Callable[[], None]


def set_instance_attr(obj: Any, name: str, value: Any) -> Callable[[], None]:
    """Set ``obj.name`` on the instance, never its class; return the undo (the previous instance attribute put
    back, or ours removed so the class's shows through again)."""
    had, previous = name in vars(obj), vars(obj).get(name)
    setattr(obj, name, value)

    def undo():
        if had:
            setattr(obj, name, previous)
        else:
            vars(obj).pop(name, None)

    return undo


def current_function(obj: Any, name: str) -> Callable:
    """What ``obj.name`` runs now, as a function of ``(self, ...)``: the class's function, or the function of a
    method already bound to ``obj`` on the instance (an earlier hook), or a plain callable stored on the
    instance (which then ignores ``self``).

    A hook built on it and bound to ``obj`` with :func:`types.MethodType` survives ``copy.deepcopy(obj)``: the copy's
    hook is rebound to the copy and calls the copy's implementation, where a closure over ``obj.name`` would keep
    driving the original (TextToVideoZero deep-copies its scheduler on every call)."""
    own = vars(obj).get(name)
    if own is None:
        return getattr(type(obj), name)
    if isinstance(own, types.MethodType) and own.__self__ is obj:
        return own.__func__

    @functools.wraps(own)
    def call(self, *args, **kwargs):
        return own(*args, **kwargs)

    call.__signature__ = inspect.Signature(
        [inspect.Parameter("self", inspect.Parameter.POSITIONAL_ONLY), *inspect.signature(own).parameters.values()]
    )
    return call
