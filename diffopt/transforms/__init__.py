"""One file per transform. Each ``apply_*`` function changes one module and returns a :class:`Change`
holding the closure that undoes it (or None when there was nothing to change)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Change:
    detail: str  # what changed, for the report
    undo: Callable[[], None]
