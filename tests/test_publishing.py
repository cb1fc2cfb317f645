"""Guardrails on publishing: accept inside, refuse outside with the figures, on effective
parameters (defaults filled in), for every parameter of every family."""

from __future__ import annotations

import inspect
import math
from typing import Any

import pytest

from calibration.models import (
    BINANCE_BTCUSDT_2021_CAPS_USD,
    BINANCE_BTCUSDT_2021_IMR,
    BINANCE_BTCUSDT_2021_MMR,
    FAMILIES,
    LiquidityAddon,
)
from calibration.publishing import (
    DEFAULT_RULES,
    ChangeRule,
    Guardrails,
    Violation,
    check_update,
    clamp_to_guardrails,
    guardrail_constraint,
    measure_change,
)

RAILS = Guardrails(max_change={"decay": 0.01, "floor_rate": 0.0025}, min_interval_s=86_400)
OLD = {"decay": 0.97, "floor_rate": 0.01, "confidence": 0.99}
REASON = "quarterly recalibration after the FTX window"


def check(old: dict[str, Any] | None, new: dict[str, Any], model: str = "ewma",
          rails: Guardrails = RAILS, **kw: Any) -> list[Violation]:
    return check_update(old, new, guardrails=rails, seconds_since_previous=90_000,
                        reason=REASON, model=model, **kw)


def by_parameter(violations: list[Violation]) -> dict[tuple[str, str | None], Violation]:
    return {(v.guardrail, v.parameter): v for v in violations}


def test_inside_every_guardrail_is_accepted() -> None:
    """Moves within max_change, a day apart, with a reason: no violation."""
    new = {"decay": 0.975, "floor_rate": 0.0125, "confidence": 0.995}
    assert check(OLD, new) == []


def test_exactly_at_the_limit_is_accepted() -> None:
    """A move of exactly max_change is allowed (the limit is inclusive)."""
    assert check(OLD, {**OLD, "floor_rate": 0.0125}) == []


def test_too_large_a_move_names_parameter_and_excess() -> None:
    """decay 0.97 → 0.99 breaks max_change 0.01 by 0.01, and says so."""
    [v] = check(OLD, {**OLD, "decay": 0.99})
    assert v.guardrail == "max_change"
    assert v.parameter == "decay"
    assert v.rule == "absolute"
    assert v.limit == 0.01
    assert v.actual == pytest.approx(0.02)
    assert v.excess == pytest.approx(0.01)


def test_too_soon_reports_the_wait() -> None:
    """An update 1 h after the previous one with a 24 h minimum must wait 23 h more."""
    [v] = check_update(OLD, OLD, guardrails=RAILS, seconds_since_previous=3_600, reason=REASON,
                       model="ewma")
    assert v.guardrail == "min_interval"
    assert v.excess == pytest.approx(82_800)


@pytest.mark.parametrize("reason", [None, "", "   ", "short"])
def test_a_reason_is_required(reason: str | None) -> None:
    """No (or a too short) reason is refused, even for a first publication."""
    [v] = check_update(None, OLD, guardrails=RAILS, seconds_since_previous=None, reason=reason,
                       model="ewma")
    assert v.guardrail == "reason"


def test_first_publication_has_no_change_limit() -> None:
    """With nothing published yet, only the reason is checked."""
    assert check(None, {"decay": 0.5}) == []


def test_a_family_switch_is_refused() -> None:
    """ewma → fhs cannot be an update: the parameters are not comparable."""
    [v] = check({"decay": 0.97}, {"decay": 0.97}, model="fhs", previous_model="ewma")
    assert v.guardrail == "model"


# --- one table, one rule --------------------------------------------------------------------


def test_every_parameter_of_every_family_has_a_rule() -> None:
    """Each keyword of every family's constructor and of the add-on is in DEFAULT_RULES."""
    names = set()
    for cls in [*FAMILIES.values(), LiquidityAddon]:
        sig = inspect.signature(cls.__init__)
        names |= {p.name for p in sig.parameters.values()
                  if p.kind is p.KEYWORD_ONLY and p.name != "base"}
    assert names - set(DEFAULT_RULES) == set()
    assert DEFAULT_RULES["horizon_bars"].kind == "relative"
    for name in ("mmr_schedule", "imr_schedule", "bracket_caps_usd"):
        assert DEFAULT_RULES[name].kind == "elementwise_relative"


def test_guardrails_never_leave_a_parameter_unguarded() -> None:
    """Configuring one limit keeps every other parameter at its default limit."""
    rails = Guardrails(max_change={"decay": 0.001})
    assert rails.rule("decay") == ChangeRule("absolute", 0.001)
    assert rails.rule("warmup_bars") == DEFAULT_RULES["warmup_bars"]
    assert rails.rule("no_such_parameter").kind == "fixed"


@pytest.mark.parametrize(("rule", "old", "new", "allowed"), [
    (ChangeRule("absolute", 0.0025), 0.01, 0.0125, True),      # exactly the limit
    (ChangeRule("absolute", 0.0025), 0.01, 0.01250001, False),
    (ChangeRule("absolute", 0.0), 0.5, 0.5, True),             # a zero limit allows no move
    (ChangeRule("absolute", 0.0), 0.5, 0.5 + 1e-6, False),
    (ChangeRule("relative", 0.25), 4, 5, True),                # 25% exactly
    (ChangeRule("relative", 0.25), 4, 3, True),
    (ChangeRule("relative", 0.25), 60, 76, False),             # 26.7%
    (ChangeRule("elementwise_relative", 0.5), [2.0, 4.0], [3.0, 2.0], True),
    (ChangeRule("elementwise_relative", 0.5), [2.0, 4.0], [3.0, 1.9], False),
    (ChangeRule("elementwise_relative", 0.5), [2.0, 4.0], [2.0, 4.0, 8.0], False),
    (ChangeRule("fixed", 0.0), "es", "es", True),
    (ChangeRule("fixed", 0.0), "es", "var", False),
])
def test_one_boundary_for_publishing_and_calibration(rule: ChangeRule, old: Any, new: Any,
                                                      allowed: bool) -> None:
    """measure_change allows a change equal to the limit, and the optimiser's scaled
    constraint value is ≤ 0 exactly when the move is allowed."""
    move = measure_change(old, new, rule)
    assert move.allowed is allowed
    assert (move.scaled <= 0) is allowed


@pytest.mark.parametrize("floor", [0.0125, 0.01250001, 0.015, 0.0075, 0.00749])
def test_calibration_constraint_agrees_with_the_publish_check(floor: float) -> None:
    """The calibration's guardrail constraint is feasible exactly when publishing accepts."""
    published = {"decay": 0.97, "floor_rate": 0.01}
    trial = {"decay": 0.97, "floor_rate": floor}
    value = guardrail_constraint("ewma", published, trial, {"floor_rate": 0.0025})
    accepted = check(published, trial, rails=Guardrails(max_change={"floor_rate": 0.0025})) == []
    assert (value <= 0) is accepted
    assert value == pytest.approx(max(-1.0, (abs(floor - 0.01) - 0.0025) / 0.0025), abs=1e-6)


# --- omission, reintroduction and horizons, per family ----------------------------------------


def test_ewma_omission_is_refused_and_measured_against_the_defaults() -> None:
    """The issue's case: {horizon_bars: 60} alone after decay 0.90 / floor 0.05 drops both
    (422 naming them) and would move them to the defaults 0.97 / 0.005."""
    old = {"decay": 0.90, "floor_rate": 0.05, "horizon_bars": 60}
    found = by_parameter(check(old, {"horizon_bars": 60}, rails=Guardrails()))
    assert set(found) == {("dropped", "decay"), ("dropped", "floor_rate"),
                          ("max_change", "decay"), ("max_change", "floor_rate")}
    assert found[("max_change", "decay")].actual == pytest.approx(0.97 - 0.90)
    assert found[("max_change", "floor_rate")].actual == pytest.approx(0.05 - 0.005)


def test_ewma_reintroduction_is_measured_from_the_default() -> None:
    """A parameter never published is at its default: giving it later may move it only the
    limit from there (decay default 0.97, limit 0.01)."""
    old = {"horizon_bars": 60}
    [v] = check(old, {"horizon_bars": 60, "decay": 0.5}, rails=Guardrails())
    assert (v.guardrail, v.parameter) == ("max_change", "decay")
    assert v.actual == pytest.approx(0.47)
    assert check(old, {"horizon_bars": 60, "decay": 0.98}, rails=Guardrails()) == []
    # the same for a bar count: warmup_bars default 500, relative limit 50%
    [w] = check(old, {"horizon_bars": 60, "warmup_bars": 2000}, rails=Guardrails())
    assert (w.parameter, w.rule) == ("warmup_bars", "relative")
    assert w.actual == pytest.approx((2000 - 500) / 500)


def test_horizon_changes_are_relative_and_resolve_the_default_duration() -> None:
    """horizon 4 → 5 bars is +25% (allowed), 4 → 6 is +50% (refused); the default (1h) is
    2 bars of 30 minutes but 60 bars of 1 minute; without a bar size it cannot be measured."""
    rails = Guardrails()
    assert check({"horizon_bars": 4}, {"horizon_bars": 5}, rails=rails) == []
    [v] = check({"horizon_bars": 4}, {"horizon_bars": 6}, rails=rails)
    assert (v.parameter, v.rule, v.actual, v.excess) == ("horizon_bars", "relative",
                                                          pytest.approx(0.5),
                                                          pytest.approx(0.25))
    assert check({}, {"horizon_bars": 2}, rails=rails, bar_seconds=1800) == []
    [far] = check({}, {"horizon_bars": 2}, rails=rails, bar_seconds=60)
    assert far.actual == pytest.approx((60 - 2) / 60)
    [unknown] = check({}, {"horizon_bars": 2}, rails=rails)
    assert unknown.parameter == "horizon_bars"
    assert math.isinf(unknown.actual)
    assert unknown.as_dict()["actual"] is None  # JSON has no infinity
    assert check({}, {}, rails=rails) == []  # the default on both sides is unchanged


def test_fhs_omission_reintroduction_and_fixed_measure() -> None:
    """fhs: window_bars dropped (500 → default 2000 is +300%), a measure switch is refused,
    and the one-year stressed look-back default resolves with the bar size."""
    rails = Guardrails()
    old = {"window_bars": 500, "horizon_bars": 4}
    found = by_parameter(check(old, {"horizon_bars": 4}, model="fhs", rails=rails))
    assert set(found) == {("dropped", "window_bars"), ("max_change", "window_bars")}
    assert found[("max_change", "window_bars")].actual == pytest.approx(3.0)
    [m] = check(old, {**old, "measure": "var"}, model="fhs", rails=rails)
    assert (m.parameter, m.rule) == ("measure", "fixed")
    year_of_hours = 365 * 24
    assert check(old, {**old, "stress_lookback_bars": year_of_hours}, model="fhs",
                 rails=rails, bar_seconds=3600) == []
    [lb] = check(old, {**old, "stress_lookback_bars": year_of_hours // 2}, model="fhs",
                 rails=rails, bar_seconds=3600)
    assert lb.actual == pytest.approx(0.5, abs=1e-3)


def _relative_max(a: list[float], b: list[float]) -> float:
    worst = 0.0
    for x, y in zip(a, b, strict=True):
        worst = max(worst, abs(y - x) / abs(x))
    return worst


def test_tiered_schedules_are_compared_element_wise_on_the_rates_in_force() -> None:
    """Dropping an explicit Binance mmr_schedule falls back to base_mmr × 2^k (capped at
    1/im_to_mm): refused with the largest per-bracket relative move; caps may move 50%."""
    rails = Guardrails()
    caps = list(BINANCE_BTCUSDT_2021_CAPS_USD)
    binance = [*BINANCE_BTCUSDT_2021_MMR, BINANCE_BTCUSDT_2021_MMR[-1]]
    derived = [min(0.004 * 2.0 ** k, 0.5) for k in range(len(caps) + 1)]
    old = {"mmr_schedule": list(BINANCE_BTCUSDT_2021_MMR)}
    found = by_parameter(check(old, {}, model="tiered", rails=rails))
    # the IM rates in force are im_to_mm (2) times the MM rates on both sides
    assert set(found) == {("dropped", "mmr_schedule"), ("max_change", "mmr_schedule"),
                          ("max_change", "imr_schedule")}
    assert found[("max_change", "mmr_schedule")].actual == pytest.approx(
        _relative_max(binance, derived))
    assert found[("max_change", "imr_schedule")].actual == pytest.approx(
        _relative_max([2 * r for r in binance], [2 * r for r in derived]))
    # an explicit IM table dropped falls back to 2 × MMR (Binance's 33.3% becomes 30%)
    imr_old = {"mmr_schedule": list(BINANCE_BTCUSDT_2021_MMR),
               "imr_schedule": list(BINANCE_BTCUSDT_2021_IMR)}
    [dropped, imr] = check(imr_old, {"mmr_schedule": list(BINANCE_BTCUSDT_2021_MMR)},
                           model="tiered", rails=Guardrails(max_change={"imr_schedule": 0.05}))
    assert (dropped.guardrail, dropped.parameter) == ("dropped", "imr_schedule")
    published_imr = [*BINANCE_BTCUSDT_2021_IMR, BINANCE_BTCUSDT_2021_IMR[-1]]
    assert imr.actual == pytest.approx(_relative_max(published_imr, [2 * r for r in binance]))
    # reintroducing a schedule after publishing none is measured from the derived one
    again = by_parameter(check({}, {"mmr_schedule": list(BINANCE_BTCUSDT_2021_MMR)},
                               model="tiered", rails=rails))
    assert set(again) == {("max_change", "mmr_schedule"), ("max_change", "imr_schedule")}
    assert again[("max_change", "mmr_schedule")].actual == pytest.approx(
        _relative_max(derived, binance))
    assert check({}, {"bracket_caps_usd": [c * 1.5 for c in caps]}, model="tiered",
                 rails=rails) == []
    [c] = check({}, {"bracket_caps_usd": [c * 1.6 for c in caps]}, model="tiered", rails=rails)
    assert (c.parameter, c.actual) == ("bracket_caps_usd", pytest.approx(0.6))
    fewer = check({}, {"bracket_caps_usd": caps[:-1]}, model="tiered", rails=rails)
    assert {"bracket_caps_usd", "mmr_schedule", "imr_schedule"} <= {v.parameter for v in fewer}


@pytest.mark.parametrize("model", ["ewma", "fhs", "tiered"])
def test_liquidity_addon_absent_is_a_zero_coefficient(model: str) -> None:
    """Dropping the add-on moves addon_coef to 0 (refused as dropped and too far); adding
    one later is measured from 0 (limit 0.05), and its exponent from the default 0.5."""
    rails = Guardrails()
    with_addon = {"addon_coef": 0.1}
    found = by_parameter(check(with_addon, {}, model=model, rails=rails))
    assert set(found) == {("dropped", "addon_coef"), ("max_change", "addon_coef")}
    assert found[("max_change", "addon_coef")].actual == pytest.approx(0.1)
    assert check({}, {"addon_coef": 0.05}, model=model, rails=rails) == []
    [v] = check({}, {"addon_coef": 0.3}, model=model, rails=rails)
    assert v.actual == pytest.approx(0.3)
    [e] = check({}, {"addon_coef": 0.05, "addon_exponent": 0.7}, model=model, rails=rails)
    assert (e.parameter, e.actual) == ("addon_exponent", pytest.approx(0.2))


# --- clamping ---------------------------------------------------------------------------------


def test_clamp_moves_at_most_max_change() -> None:
    """Automatic recalibration publishes the recommendation clamped into the guardrails:
    each rule's own kind (absolute, relative with whole bars), dropped ones kept."""
    old = {**OLD, "horizon_bars": 4, "warmup_bars": 500}
    rec = {"decay": 0.90, "floor_rate": 0.02, "confidence": 0.999, "horizon_bars": 9}
    clamped = clamp_to_guardrails(old, rec, RAILS, model="ewma")
    assert clamped == {"decay": pytest.approx(0.96), "floor_rate": pytest.approx(0.0125),
                       "confidence": pytest.approx(0.995), "horizon_bars": 5,
                       "warmup_bars": 500}
    assert check(old, clamped) == []
    only = clamp_to_guardrails(old, rec, RAILS, model="ewma", parameters=["decay"])
    assert only["floor_rate"] == 0.02


def test_elementwise_absolute_rule_by_hand() -> None:
    """Haircut ratios move at most 0.25 points per band: [0.95, 0.9] → [0.949, 0.8975] moves
    0.001 and 0.0025 (allowed, the boundary); → [0.95, 0.89] moves 0.01 (excess 0.0075);
    a different number of bands cannot be measured. Clamping keeps each band within reach."""
    from calibration.publishing import (
        ChangeRule,
        Guardrails,
        clamp_to_guardrails,
        measure_change,
    )

    rule = ChangeRule("elementwise_absolute", 0.0025)
    ok = measure_change([0.95, 0.9], [0.949, 0.8975], rule)
    assert ok.allowed
    assert ok.actual == pytest.approx(0.0025)
    far = measure_change([0.95, 0.9], [0.95, 0.89], rule)
    assert not far.allowed
    assert far.actual == pytest.approx(0.01)
    assert far.excess == pytest.approx(0.0075)
    assert not measure_change([0.95, 0.9], [0.95, 0.9, 0.8], rule).allowed
    clamped = clamp_to_guardrails({"caps_usd": [1e6], "ratios": [0.95, 0.9]},
                                  {"caps_usd": [1e6], "ratios": [0.99, 0.85]},
                                  guardrails=Guardrails(), model="haircuts")
    assert clamped["ratios"] == pytest.approx([0.9525, 0.8975])
