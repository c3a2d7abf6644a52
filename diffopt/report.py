"""What optimize/restore did, component by component, in a form people and programs can read."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List

APPLIED, SKIPPED, UNCHANGED = "applied", "skipped", "unchanged"


@dataclass(frozen=True)
class Step:
    component: str  # e.g. "unet", "controlnet.nets.1", "vae.decoder"
    transform: str  # e.g. "attention", "memory_format", "compile"
    status: str  # APPLIED, SKIPPED or UNCHANGED
    detail: str  # what changed, or why it was skipped


@dataclass
class Report:
    """Returned by :func:`diffopt.optimize` and :func:`diffopt.restore`; ``print(report)`` shows a table.

    Example::

        report = diffopt.optimize(pipe)
        print(report)
        assert not report.skipped, report.skipped
    """

    action: str = "optimize"
    steps: List[Step] = field(default_factory=list)

    def add(self, component: str, transform: str, status: str, detail: str) -> None:
        self.steps.append(Step(component, transform, status, detail))

    @property
    def applied(self) -> List[Step]:
        return [s for s in self.steps if s.status == APPLIED]

    @property
    def skipped(self) -> List[Step]:
        return [s for s in self.steps if s.status == SKIPPED]

    def to_dict(self) -> dict:
        return {"action": self.action, "steps": [s.__dict__.copy() for s in self.steps]}

    def __str__(self) -> str:
        headers = ("component", "transform", "status", "detail")
        rows = [(s.component, s.transform, s.status, s.detail) for s in self.steps]
        if not rows:
            return f"diffopt.{self.action}: nothing to do"
        widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers[:-1])]

        def line(cells):
            return "  ".join(c.ljust(w) for c, w in zip(cells[:-1], widths)) + "  " + cells[-1]

        body = [line(headers), line(tuple("-" * w for w in widths) + ("-" * 6,))]
        body += [line(r) for r in rows]
        return f"diffopt.{self.action}:\n" + "\n".join(body)
