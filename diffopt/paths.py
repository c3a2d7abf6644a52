"""Whether a directory can be written, checked before the work that would write there, and without creating it."""
from __future__ import annotations

import os
from typing import Optional


def why_not_writable(path) -> Optional[str]:
    """Why files cannot be written under the directory ``path`` (an existing part of it that is a file, no write
    permission), or None. Creates nothing: the nearest part of ``path`` that exists must be a writable directory."""
    probe = os.path.abspath(os.fspath(path))
    while not os.path.exists(probe) and os.path.dirname(probe) != probe:
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        return f"{probe!r} is not a directory"
    if not os.access(probe, os.W_OK | os.X_OK):
        return f"{probe!r} is not writable"
    return None
