"""The demo's transcript: one :class:`Step` per part of the story, what was expected
and what was observed, for people (:func:`render_step`) and programs (``--json``).

A step is ``ok`` when every expected key has exactly the expected value among
the observations; observations may say more than the expectations ask.
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass, field
from typing import Any

_WIDTH = 88


@dataclass
class Step:
    """One part of the story."""

    number: int
    name: str
    title: str
    explanation: str
    expected: dict[str, Any] = field(default_factory=dict)
    observed: dict[str, Any] = field(default_factory=dict)
    #: Ids and addresses involved (thread, Message-IDs, connections), for a closer look.
    details: dict[str, Any] = field(default_factory=dict)
    #: What changed, one line each, for people.
    changes: list[str] = field(default_factory=list)
    error: str | None = None

    @property
    def mismatches(self) -> dict[str, tuple[Any, Any]]:
        return {
            key: (want, self.observed.get(key))
            for key, want in self.expected.items()
            if self.observed.get(key) != want
        }

    @property
    def ok(self) -> bool:
        return self.error is None and not self.mismatches

    def as_json(self) -> dict[str, Any]:
        return {
            "number": self.number,
            "name": self.name,
            "title": self.title,
            "explanation": self.explanation,
            "ok": self.ok,
            "expected": self.expected,
            "observed": self.observed,
            "details": self.details,
            "changes": self.changes,
            "error": self.error,
        }


def _wrap(text: str, indent: str) -> list[str]:
    return textwrap.wrap(text, _WIDTH, initial_indent=indent, subsequent_indent=indent)


def render_step(step: Step) -> str:
    """A step for a reader: title, why, what changed, and any surprise."""
    mark = "ok" if step.ok else "NOT AS EXPECTED"
    head = f"{step.number:>2}. {step.title}"
    lines = [f"{head} {'.' * max(3, _WIDTH - len(head) - len(mark) - 2)} {mark}"]
    lines += _wrap(step.explanation, "    ")
    for change in step.changes:
        lines += textwrap.wrap(change, _WIDTH, initial_indent="    - ", subsequent_indent="      ")
    for key, (want, got) in step.mismatches.items():
        lines.append(f"    ! {key}: expected {want!r}, observed {got!r}")
    if step.error:
        lines.append(f"    ! {step.error}")
    return "\n".join(lines) + "\n"
