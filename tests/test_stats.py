"""Coverage statistics against the independent test vectors of domain.md §3."""

from __future__ import annotations

import pytest
from scipy.stats import binom

from calibration.stats import (
    Transitions,
    chi2_pvalue,
    christoffersen_lr,
    kupiec_lr,
    traffic_light,
    transitions,
)


@pytest.mark.parametrize(("x", "expected"), [(0, 5.025), (4, 0.769), (6, 3.555), (7, 5.497)])
def test_kupiec_n250_p1pct(x: int, expected: float) -> None:
    """Kupiec LR matches the textbook values for n=250, p=1%."""
    assert kupiec_lr(250, x, 0.01) == pytest.approx(expected, abs=5e-4)


@pytest.mark.parametrize(("x", "expected"), [(35, 3.765), (40, 8.079), (45, 13.755)])
def test_kupiec_n500_p5pct(x: int, expected: float) -> None:
    """Kupiec LR matches the textbook values for n=500, p=5%."""
    assert kupiec_lr(500, x, 0.05) == pytest.approx(expected, abs=5e-4)


def test_kupiec_pvalue_n500_x40() -> None:
    """The χ²(1) p-value of LR=8.079 is 0.0045."""
    assert chi2_pvalue(kupiec_lr(500, 40, 0.05), 1) == pytest.approx(0.0045, abs=5e-5)


def test_basel_zones_n250_p1pct() -> None:
    """Basel zones for n=250, p=1%: green 0–4, yellow 5–9, red ≥ 10."""
    zones = [traffic_light(250, x, 0.01) for x in range(13)]
    assert zones == ["green"] * 5 + ["yellow"] * 5 + ["red"] * 3
    assert binom.cdf(4, 250, 0.01) == pytest.approx(0.8922, abs=5e-5)
    assert binom.cdf(5, 250, 0.01) == pytest.approx(0.9588, abs=5e-5)


@pytest.mark.parametrize(
    ("n", "p", "yellow_from", "red_from"),
    [(500, 0.01, 9, 15), (750, 0.005, 7, 13), (1000, 0.01, 15, 24), (250, 0.05, 18, 27)],
)
def test_basel_zone_boundaries(n: int, p: float, yellow_from: int, red_from: int) -> None:
    """Zone boundaries match the published tables for other n and p."""
    assert traffic_light(n, yellow_from - 1, p) == "green"
    assert traffic_light(n, yellow_from, p) == "yellow"
    assert traffic_light(n, red_from - 1, p) == "yellow"
    assert traffic_light(n, red_from, p) == "red"


def test_christoffersen_vector() -> None:
    """Breaches on days 40–42, 100–101, 200–204 of 250 at p=4% give LR_ind ≈ 39.44."""
    days = {*range(40, 43), *range(100, 102), *range(200, 205)}
    seq = [d in days for d in range(1, 251)]
    t = transitions(seq)
    assert t == Transitions(n00=236, n01=3, n10=3, n11=7)
    assert kupiec_lr(250, sum(seq), 0.04) == pytest.approx(0.0, abs=1e-12)
    assert christoffersen_lr(t) == pytest.approx(39.44, abs=5e-3)


def test_christoffersen_no_breaches_is_zero() -> None:
    """A sequence without breaches carries no evidence of clustering."""
    assert christoffersen_lr(transitions([False] * 100)) == 0.0
