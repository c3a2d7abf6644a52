"""What every transform's planner gets and returns: the shared facts of one optimize call, and its steps."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Set

from .components import Component
from .config import OptimizeConfig
from .report import Report


@dataclass
class Step:
    """One change to apply: ``apply()`` makes it, attaching its layers to what it changed, and returns what it did for
    the report (None: nothing needed changing)."""

    component: str  # e.g. "unet", "controlnet.nets.1", "scheduler"
    transform: str  # the option that asked for it
    apply: Callable[[], Any]


@dataclass
class Context:
    """The facts that cross transforms, decided once per optimize call before any step is planned."""

    target: Any
    config: OptimizeConfig
    report: Report
    components: List[Component]
    #: torch.compile options per component name; None where it is not compiled (compile decides).
    compile_options: Dict[str, Optional[dict]] = field(default_factory=dict)
    #: The scheduler keeps its timesteps on the CPU; compiled models then make them on their device.
    timesteps_on_cpu: bool = False
    #: Components that the first-block cache compiles block by block instead of whole.
    block_compiled: Set[str] = field(default_factory=set)
    #: ``compile_cache(component, options, defer_load=False)``: the saved-compile entry for a model, or None.
    compile_cache: Callable[..., Any] = lambda component, options, defer_load=False: None

    def denoiser(self) -> Optional[Component]:
        from .components import DENOISER

        return next((c for c in self.components if c.role == DENOISER), None)
