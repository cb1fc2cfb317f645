"""Guardrails on publishing margin parameters (pure: the service stores, this decides).

An update may move each guarded parameter by at most ``max_change[name]`` (absolute, in the
parameter's units, as Aave's risk stewards cap LTV moves at 0.25% per update), may come no
sooner than ``min_interval_s`` after the previous one, and must say why. A violation names
the guardrail and by how much it is exceeded; callers refuse the whole update.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Guardrails:
    """Server-side limits on one update of published parameters.

    Attributes:
        max_change: parameter → largest absolute change per update.
        min_interval_s: seconds that must pass between two updates of an instrument.
        require_reason: an update must carry a non-empty reason.
        min_reason_chars: shortest acceptable reason.
    """

    max_change: Mapping[str, float] = field(default_factory=dict)
    min_interval_s: float = 0.0
    require_reason: bool = True
    min_reason_chars: int = 10


@dataclass(frozen=True)
class Violation:
    """One guardrail an update breaks, with the figures.

    Attributes:
        guardrail: ``max_change``, ``min_interval`` or ``reason``.
        parameter: the parameter at fault (``max_change`` only).
        limit: the allowed amount (change in parameter units, or seconds).
        actual: the requested amount.
        excess: ``actual - limit`` (how much too far, or too soon in seconds).
        message: one sentence for people.
    """

    guardrail: str
    parameter: str | None
    limit: float
    actual: float
    excess: float
    message: str

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form (for problem details)."""
        return {"guardrail": self.guardrail, "parameter": self.parameter, "limit": self.limit,
                "actual": self.actual, "excess": self.excess, "message": self.message}


def check_update(
    previous: Mapping[str, Any] | None,
    new: Mapping[str, Any],
    *,
    guardrails: Guardrails,
    seconds_since_previous: float | None,
    reason: str | None,
) -> list[Violation]:
    """Every guardrail the update ``previous → new`` breaks (empty: it may be published).

    The first publication of an instrument (``previous is None``) is not limited by
    ``max_change`` or ``min_interval_s``; it still needs a reason.
    """
    violations: list[Violation] = []
    text = (reason or "").strip()
    if guardrails.require_reason and len(text) < guardrails.min_reason_chars:
        violations.append(Violation(
            "reason", None, float(guardrails.min_reason_chars), float(len(text)),
            float(guardrails.min_reason_chars - len(text)),
            f"a reason of at least {guardrails.min_reason_chars} characters is required",
        ))
    if previous is None:
        return violations
    if seconds_since_previous is not None and seconds_since_previous < guardrails.min_interval_s:
        wait = guardrails.min_interval_s - seconds_since_previous
        violations.append(Violation(
            "min_interval", None, guardrails.min_interval_s, seconds_since_previous, wait,
            f"the last update was {seconds_since_previous:.0f} s ago; updates must be at least "
            f"{guardrails.min_interval_s:.0f} s apart (wait {wait:.0f} s more)",
        ))
    for name, limit in sorted(guardrails.max_change.items()):
        old, cur = previous.get(name), new.get(name)
        if not (isinstance(old, int | float) and isinstance(cur, int | float)):
            continue
        move = abs(float(cur) - float(old))
        if move > limit + 1e-12 * max(1.0, abs(float(old))):
            violations.append(Violation(
                "max_change", name, float(limit), move, move - float(limit),
                f"{name} would move by {move:.6g} ({old:.6g} → {cur:.6g}); the limit per "
                f"update is {limit:.6g} (exceeded by {move - limit:.6g})",
            ))
    return violations


def clamp_to_guardrails(previous: Mapping[str, Any], new: Mapping[str, Any],
                        guardrails: Guardrails) -> dict[str, Any]:
    """``new`` with each guarded parameter moved at most ``max_change`` from ``previous``
    (for automatic recalibration, which publishes only inside the guardrails)."""
    out = dict(new)
    for name, limit in guardrails.max_change.items():
        old, cur = previous.get(name), new.get(name)
        if isinstance(old, int | float) and isinstance(cur, int | float) and math.isfinite(cur):
            out[name] = min(max(float(cur), float(old) - limit), float(old) + limit)
    return out
