"""Coverage tests: Kupiec POF, Christoffersen independence, Basel traffic light (domain.md §3)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

# scipy.special, not scipy.stats: the same functions without ~0.5 s of import in every
# worker process (bdtr is the binomial CDF, chdtrc the chi-square upper tail).
from scipy.special import bdtr, chdtrc, ndtr, xlogy

from calibration._errors import InvalidParameters


def _check(n: int, x: int, p: float) -> None:
    if n < 0 or x < 0 or x > n:
        raise InvalidParameters(f"need 0 <= breaches <= observations, got x={x}, n={n}")
    if not 0.0 < p < 1.0:
        raise InvalidParameters(f"expected breach rate must be in (0, 1), got {p}")


def kupiec_lr(n: int, x: int, p: float) -> float:
    """Kupiec proportion-of-failures likelihood ratio (χ² with 1 degree of freedom).

    ``LR = -2 ln[(1-p)^(n-x) p^x] + 2 ln[(1-x/n)^(n-x) (x/n)^x]`` with ``0 ln 0 = 0``.
    """
    _check(n, x, p)
    if n == 0:
        return 0.0
    phat = x / n
    null = xlogy(n - x, 1.0 - p) + xlogy(x, p)
    alt = xlogy(n - x, 1.0 - phat) + xlogy(x, phat)
    return float(max(0.0, -2.0 * null + 2.0 * alt))


def kupiec_pvalue_one_sided(n: int, x: int, p: float) -> float:
    """One-sided Kupiec p-value: the evidence of *too many* breaches (domain.md §3).

    The signed root ``z = sign(x - n p) * sqrt(LR_pof)`` is asymptotically standard normal
    under the null, so ``1 - Φ(z)`` tests "breach rate above p" at its nominal size. The
    two-sided χ²(1) value ``kupiec_pvalue`` rejects at α both too many and too few
    breaches, so comparing it with α tests "too many" at size α/2. Fewer breaches than
    expected give a p-value above 0.5: never a rejection.
    """
    lr = kupiec_lr(n, x, p)
    if n == 0:
        return 1.0
    sign = 1.0 if x > n * p else (-1.0 if x < n * p else 0.0)
    return float(1.0 - ndtr(sign * lr**0.5))


def chi2_pvalue(lr: float, dof: int) -> float:
    """Upper-tail p-value of a likelihood ratio under χ²(dof)."""
    return float(chdtrc(dof, lr))


@dataclass(frozen=True, slots=True)
class Transitions:
    """Counts of consecutive breach states (0 = covered, 1 = breach): ``nij`` is i → j."""

    n00: int
    n01: int
    n10: int
    n11: int


def transitions(breaches: list[bool] | tuple[bool, ...]) -> Transitions:
    """Transition counts of a breach sequence (plain Python; the engine counts in a kernel)."""
    counts = [0, 0, 0, 0]
    for prev, cur in itertools.pairwise(breaches):
        counts[2 * int(prev) + int(cur)] += 1
    return Transitions(*counts)


def christoffersen_lr(t: Transitions) -> float:
    """Christoffersen independence likelihood ratio (χ² with 1 degree of freedom).

    ``π0 = n01/(n00+n01)``, ``π1 = n11/(n10+n11)``, ``π = (n01+n11)/total``;
    ``LR = -2 ln[(1-π)^(n00+n10) π^(n01+n11)] + 2 ln[(1-π0)^n00 π0^n01 (1-π1)^n10 π1^n11]``.
    """
    total = t.n00 + t.n01 + t.n10 + t.n11
    if total == 0:
        return 0.0
    pi = (t.n01 + t.n11) / total
    pi0 = t.n01 / (t.n00 + t.n01) if t.n00 + t.n01 else 0.0
    pi1 = t.n11 / (t.n10 + t.n11) if t.n10 + t.n11 else 0.0
    null = xlogy(t.n00 + t.n10, 1.0 - pi) + xlogy(t.n01 + t.n11, pi)
    alt = (
        xlogy(t.n00, 1.0 - pi0) + xlogy(t.n01, pi0) + xlogy(t.n10, 1.0 - pi1) + xlogy(t.n11, pi1)
    )
    return float(max(0.0, -2.0 * null + 2.0 * alt))


def binomial_cdf(x: int, n: int, p: float) -> float:
    """P(X <= x) for X ~ Binomial(n, p)."""
    return 1.0 if x >= n else float(bdtr(x, n, p))


#: Basel green-zone bound of the binomial CDF.
GREEN_BELOW = 0.95


def verdict_possible(n: int, p: float) -> bool:
    """Whether ``n`` observations can give any traffic-light verdict at breach rate ``p``.

    Below ``n* = ln 0.95 / ln(1 - p)`` observations (5 at p = 1%, 1 at p = 5%), even zero
    breaches have ``F(0) = (1 - p)^n >= 0.95``: not green, yet no evidence of anything.
    """
    return n > 0 and (1.0 - p) ** n < GREEN_BELOW


def traffic_light(n: int, x: int, p: float) -> str:
    """Basel (1996) zone from the binomial CDF F(x; n, p).

    ``green`` if F < 0.95, ``yellow`` if 0.95 ≤ F < 0.9999, ``red`` if F ≥ 0.9999;
    ``insufficient`` when the window is too short for any verdict, ``(1 - p)^n >= 0.95``
    (domain.md §3): an operator reads yellow as "too many breaches", which a window where
    zero breaches is not green cannot show.
    """
    _check(n, x, p)
    if not verdict_possible(n, p):
        return "insufficient"
    f = binomial_cdf(x, n, p)
    if f < GREEN_BELOW:
        return "green"
    if f < 0.9999:
        return "yellow"
    return "red"
