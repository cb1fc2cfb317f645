"""Plain-Python portfolio requirements (domain.md §8), written apart from the engine.

No numpy, no shared code with ``calibration.models._portfolio``: the grid enumerates its
scenarios one by one (the full product with ``itertools.product``, or the together / singles /
pairs-against set), the historical model sorts its joint scenario losses. Exposures are USD
per instrument; ``factor`` maps an instrument to its underlying asset.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence

from tests import reference_models as ref_models


def grid_points(points: int) -> list[float]:
    """Multiples of the range from -1 to 1, evenly spaced."""
    return [-1.0 + 2.0 * j / (points - 1) for j in range(points)]


def grid_im(exposure: Mapping[str, float], factor: Mapping[str, str],
            ranges: Mapping[str, float], *, points: int, joint: str = "product",
            credit: float = 0.0, extended: Sequence[tuple[float, float]] = (),
            min_delta_rate: float = 0.0, hedged_delta_rate: float = 0.0) -> float:
    """The grid IM of ``exposure`` with factor scan ranges ``ranges`` (simple returns)."""
    factors: list[str] = []
    for inst in exposure:
        if factor[inst] not in factors:
            factors.append(factor[inst])
    pts = grid_points(points)

    def loss(moves: Mapping[str, float]) -> float:
        return -sum(x * moves[factor[i]] for i, x in exposure.items())

    scenarios: list[tuple[dict[str, float], bool]] = []
    if joint == "product":
        for combo in itertools.product(pts, repeat=len(factors)):
            together = len(set(combo)) == 1
            scenarios.append(({f: m * ranges[f] for f, m in zip(factors, combo, strict=True)},
                              together))
    else:
        for m in pts:
            scenarios.append(({f: m * ranges[f] for f in factors}, True))
            for f in factors:
                scenarios.append(({g: (m * ranges[g] if g == f else 0.0) for g in factors},
                                  len(factors) == 1 or m == 0.0))
            for f, g in itertools.combinations(factors, 2):
                moves = {h: 0.0 for h in factors}
                moves[f] = m * ranges[f]
                moves[g] = -m * ranges[g]
                scenarios.append((moves, m == 0.0))
    best = 0.0
    for moves, together in scenarios:
        value = loss(moves)
        best = max(best, value if together else (1.0 - credit) * value)
    for move, weight in extended:
        for f in factors:
            best = max(best, weight * loss({g: (move if g == f else 0.0) for g in factors}))
        best = max(best, weight * loss({g: move for g in factors}))
    delta = 0.0
    for f in factors:
        lng = sum(x for i, x in exposure.items() if factor[i] == f and x > 0)
        sht = sum(-x for i, x in exposure.items() if factor[i] == f and x < 0)
        delta += min_delta_rate * abs(lng - sht) + hedged_delta_rate * min(lng, sht)
    return max(best, delta)


class Historical:
    """The historical (FHS) model's scenarios on closes ``close[instrument]`` (lists)."""

    def __init__(self, close: Mapping[str, Sequence[float]], *, window: int, confidence: float,
                 decay: float, horizon: int, warmup: int, measure: str = "es") -> None:
        self.window = window
        self.horizon = horizon
        self.measure = measure
        self.tail = max(1, math.ceil(window * (1.0 - confidence) - 1e-9))
        self.first = warmup + horizon + window - 1
        self.sigma: dict[str, list[float]] = {}
        self.z: dict[str, list[float]] = {}
        for inst, c in close.items():
            var = ref_models.ewma_variance(c, decay, warmup)
            self.sigma[inst] = [math.sqrt(v) for v in var]
            z = [math.nan] * len(c)
            for s in range(warmup + horizon, len(c)):
                z[s] = math.log(c[s] / c[s - horizon]) / math.sqrt(max(var[s - horizon],
                                                                         1e-20))
            self.z[inst] = z

    def scenario_returns(self, t: int) -> list[dict[str, float]]:
        """The window's joint simple returns at bar t, newest first."""
        return [{i: math.exp(self.z[i][t - j] * self.sigma[i][t]) - 1.0 for i in self.z}
                for j in range(self.window)]

    def im(self, exposure: Mapping[str, float], t: int) -> float:
        """ES (or VaR) of the exposure's losses over the window at bar t; NaN in warm-up."""
        if t < self.first:
            return math.nan
        losses = sorted((-sum(x * r[i] for i, x in exposure.items())
                         for r in self.scenario_returns(t)), reverse=True)
        risk = (sum(losses[: self.tail]) / self.tail if self.measure == "es"
                else losses[self.tail - 1])
        return max(0.0, risk)
