"""One file per transform. Each ``apply_*`` function changes one module and returns a :class:`Change`
holding the closure that undoes it (or None when there was nothing to change)."""
from __future__ import annotations

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
