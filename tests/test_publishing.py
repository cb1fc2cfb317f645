"""Guardrails on publishing: accept inside, refuse outside with the figures."""

from __future__ import annotations

import pytest

from calibration.publishing import Guardrails, check_update, clamp_to_guardrails

RAILS = Guardrails(max_change={"decay": 0.01, "floor_rate": 0.0025}, min_interval_s=86_400)
OLD = {"decay": 0.97, "floor_rate": 0.01, "confidence": 0.99}
REASON = "quarterly recalibration after the FTX window"


def test_inside_every_guardrail_is_accepted() -> None:
    """Moves within max_change, a day apart, with a reason: no violation."""
    new = {"decay": 0.975, "floor_rate": 0.0125, "confidence": 0.995}
    assert check_update(OLD, new, guardrails=RAILS, seconds_since_previous=90_000,
                        reason=REASON) == []


def test_exactly_at_the_limit_is_accepted() -> None:
    """A move of exactly max_change is allowed (the limit is inclusive)."""
    new = {**OLD, "floor_rate": 0.0125}
    assert check_update(OLD, new, guardrails=RAILS, seconds_since_previous=86_400,
                        reason=REASON) == []


def test_too_large_a_move_names_parameter_and_excess() -> None:
    """decay 0.97 → 0.99 breaks max_change 0.01 by 0.01, and says so."""
    new = {**OLD, "decay": 0.99}
    [v] = check_update(OLD, new, guardrails=RAILS, seconds_since_previous=90_000, reason=REASON)
    assert v.guardrail == "max_change"
    assert v.parameter == "decay"
    assert v.limit == 0.01
    assert v.actual == pytest.approx(0.02)
    assert v.excess == pytest.approx(0.01)


def test_too_soon_reports_the_wait() -> None:
    """An update 1 h after the previous one with a 24 h minimum must wait 23 h more."""
    [v] = check_update(OLD, OLD, guardrails=RAILS, seconds_since_previous=3_600, reason=REASON)
    assert v.guardrail == "min_interval"
    assert v.excess == pytest.approx(82_800)


@pytest.mark.parametrize("reason", [None, "", "   ", "short"])
def test_a_reason_is_required(reason: str | None) -> None:
    """No (or a too short) reason is refused, even for a first publication."""
    [v] = check_update(None, OLD, guardrails=RAILS, seconds_since_previous=None, reason=reason)
    assert v.guardrail == "reason"


def test_first_publication_has_no_change_limit() -> None:
    """With nothing published yet, only the reason is checked."""
    assert check_update(None, {"decay": 0.5}, guardrails=RAILS, seconds_since_previous=None,
                        reason=REASON) == []


def test_clamp_moves_at_most_max_change() -> None:
    """Automatic recalibration publishes the recommendation clamped into the guardrails."""
    clamped = clamp_to_guardrails(OLD, {"decay": 0.90, "floor_rate": 0.02, "confidence": 0.999},
                                  RAILS)
    assert clamped == {"decay": pytest.approx(0.96), "floor_rate": pytest.approx(0.0125),
                       "confidence": 0.999}
    assert check_update(OLD, clamped, guardrails=RAILS, seconds_since_previous=90_000,
                        reason=REASON) == []
