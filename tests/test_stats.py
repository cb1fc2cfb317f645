"""Coverage statistics against the independent test vectors of domain.md §3."""

from __future__ import annotations

import pytest
from scipy.stats import binom, norm

from calibration.stats import (
    Transitions,
    chi2_pvalue,
    christoffersen_lr,
    kupiec_lr,
    kupiec_pvalue_one_sided,
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


@pytest.mark.parametrize(("x", "lr"), [(7, 5.497), (6, 3.555), (4, 0.769), (0, 5.025)])
def test_one_sided_kupiec_n250_p1pct(x: int, lr: float) -> None:
    """One-sided p = 1 - Φ(sign(x - np)·√LR) from the textbook LR values (n=250, p=1%)."""
    sign = 1.0 if x > 2.5 else -1.0
    expected = 1.0 - norm.cdf(sign * lr**0.5)
    assert kupiec_pvalue_one_sided(250, x, 0.01) == pytest.approx(expected, abs=2e-4)


def test_one_sided_kupiec_hand_value() -> None:
    """n=250, p=1%, x=7: z = √5.497 = 2.3446, p = 0.00952 (two-sided: 0.01905)."""
    assert kupiec_pvalue_one_sided(250, 7, 0.01) == pytest.approx(0.00952, abs=5e-5)
    assert chi2_pvalue(kupiec_lr(250, 7, 0.01), 1) == pytest.approx(0.01905, abs=5e-5)


def test_one_sided_kupiec_has_nominal_size() -> None:
    """Under the null, "reject when too many breaches" has size ≈ α one-sided, ≈ α/2 when the
    two-sided p-value is compared with α (exact binomial sums, n=1000, p=1%, α=5%)."""
    n, p, alpha = 1000, 0.01, 0.05
    pmf = binom.pmf(range(n + 1), n, p)
    one_sided = sum(pmf[x] for x in range(n + 1)
                    if kupiec_pvalue_one_sided(n, x, p) < alpha)
    two_sided_upper = sum(pmf[x] for x in range(n + 1)
                          if x > n * p and chi2_pvalue(kupiec_lr(n, x, p), 1) < alpha)
    assert 0.03 < one_sided < 0.07
    assert 0.01 < two_sided_upper < 0.035
    assert one_sided > 1.5 * two_sided_upper


def test_one_sided_kupiec_few_breaches_never_reject() -> None:
    """Fewer breaches than expected give a one-sided p-value above one half."""
    assert all(kupiec_pvalue_one_sided(500, x, 0.01) > 0.5 for x in range(5))


@pytest.mark.parametrize(("n", "p", "shortest"), [(250, 0.01, 6), (1, 0.05, 2), (1, 0.01, 6)])
def test_insufficient_window(n: int, p: float, shortest: int) -> None:
    """A window where zero breaches would not be green is insufficient: (1-p)^n ≥ 0.95 up to
    n = 5 at p = 1% (0.99^5 = 0.951, 0.99^6 = 0.941) and n = 1 at p = 5% (0.95^1 = 0.95)."""
    assert traffic_light(shortest - 1, 0, p) == "insufficient"
    assert traffic_light(shortest, 0, p) == "green"
    if n >= shortest:
        assert traffic_light(n, 0, p) == "green"
    else:
        assert traffic_light(n, 0, p) == "insufficient"
