"""The one margin-model interface every family implements."""

from __future__ import annotations

import functools
import inspect
import math
import numbers
from abc import ABC, abstractmethod
from dataclasses import dataclass
from functools import cached_property
from typing import Any, ClassVar

import numpy as np
from numpy.typing import NDArray

from calibration import _kernels
from calibration._bars import BarSeries
from calibration._errors import InsufficientData, InvalidParameters

FloatArray = NDArray[np.float64]

#: Notional (USD) at which notional-dependent models are evaluated when the caller names none.
DEFAULT_NOTIONAL_USD = 10_000.0


@dataclass(frozen=True)
class MarginRates:
    """Margin rates of one position size through time.

    Attributes:
        mm_rate: maintenance margin per bar as a fraction of notional, shape ``(n,)``; NaN
            before ``first_valid_bar`` (warm-up: no margin is produced); never above
            ``max_rate``.
        im_to_mm: IM rate / MM rate, the same at every bar (every family keeps IM
            proportional to MM, so the IM series is derived only when asked for). IM is
            capped at ``max_rate`` unless MM itself is higher.
        first_valid_bar: index of the first bar with a margin.
        max_rate: the cap on both rates, fraction of notional (1.0: 100%, 1x leverage).
        capped: per bar, whether the model's MM rate was above ``max_rate`` and capped,
            shape ``(n,)`` (``None``: no bar was).
        im_total: the sum of the IM rates from ``first_valid_bar`` on (NaN bars count 0,
            numpy's pairwise order: ``np.nansum(im_rate[first_valid_bar:])`` to the bit) and
            the number of bars with a rate, when the family computed them with the rates
            (``None``: ``calibration.margins.mean_im_rate`` sums them itself).
    """

    mm_rate: FloatArray
    im_to_mm: float
    first_valid_bar: int
    max_rate: float = 1.0
    capped: NDArray[np.bool_] | None = None
    im_total: tuple[float, int] | None = None

    @cached_property
    def im_rate(self) -> FloatArray:
        """Initial margin per bar as a fraction of notional, shape ``(n,)``; NaN in warm-up."""
        result: FloatArray = np.minimum(
            self.mm_rate * self.im_to_mm, np.maximum(self.mm_rate, self.max_rate)
        )
        return result

    def im_at(self, index: Any) -> Any:
        """``im_rate[index]`` (an index array or one bar), computed at those bars only when
        the full series has not been stored: the same operations per bar, so the same bits.
        """
        if "im_rate" in self.__dict__:  # the cached_property was computed
            return self.im_rate[index]
        mm = self.mm_rate[index]
        return np.minimum(mm * self.im_to_mm, np.maximum(mm, self.max_rate))

    @property
    def capped_bars(self) -> int:
        """How many bars had their rate capped at ``max_rate``."""
        return 0 if self.capped is None else int(np.count_nonzero(self.capped))


@dataclass(frozen=True)
class Rule:
    """The admissible values of one hyperparameter (used by ``validate``)."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    integer: bool = False
    optional: bool = False

    def check(self, name: str, value: Any) -> None:
        if value is None and self.optional:
            return
        # numbers.Real, not int | float: numpy scalars (np.int64 from a grid) are numbers too.
        if isinstance(value, bool | np.bool_) or not isinstance(value, numbers.Real):
            raise InvalidParameters(f"{name} must be a number, got {value!r}", field=name)
        try:
            number = float(value)
        except OverflowError:  # an int beyond float range
            number = math.inf
        if not math.isfinite(number):
            raise InvalidParameters(f"{name} must be finite, got {value!r}", field=name)
        if self.integer and not number.is_integer():
            raise InvalidParameters(f"{name} must be a whole number of bars, got {value!r}",
                                    field=name)
        if self.low is not None and (number <= self.low if self.low_open else number < self.low):
            op = ">" if self.low_open else ">="
            raise InvalidParameters(f"{name} must be {op} {self.low}, got {value!r}", field=name)
        if self.high is not None and (
            number >= self.high if self.high_open else number > self.high
        ):
            op = "<" if self.high_open else "<="
            raise InvalidParameters(f"{name} must be {op} {self.high}, got {value!r}", field=name)


@functools.cache
def _keyword_only_names(init: Any) -> tuple[str, ...]:
    # Cached: ``inspect.signature`` costs ~50 us, and a trial asks a model for its names
    # some 40 times (``get_params``, ``with_horizon``, ``_bound``).
    sig = inspect.signature(init)
    return tuple(p.name for p in sig.parameters.values() if p.kind is p.KEYWORD_ONLY)


class Hyperparameters:
    """scikit-learn's estimator rules, shared by every model interface: keyword-only
    hyperparameters that ``__init__`` only stores, read back by ``get_params`` and checked
    against ``rules`` by ``validate``."""

    #: Admissible values per hyperparameter.
    rules: ClassVar[dict[str, Rule]] = {}

    @classmethod
    def param_names(cls) -> list[str]:
        """The hyperparameter names, in ``__init__`` order."""
        return list(_keyword_only_names(cls.__init__))

    def get_params(self) -> dict[str, Any]:
        """The hyperparameters as passed (scikit-learn style)."""
        return {name: getattr(self, name) for name in self.param_names()}

    def validate(self) -> None:
        """Raise ``InvalidParameters`` naming the first hyperparameter out of range."""
        for name, rule in self.rules.items():
            rule.check(name, getattr(self, name))


class MarginModel(Hyperparameters, ABC):
    """A margin model: bars up to and including bar t → IM and MM rates at bar t.

    Follows scikit-learn's estimator rules: hyperparameters are keyword-only and named as in
    domain.md §2, ``__init__`` only stores them, and ``margin_rates`` does the work. Rates are
    fractions of notional (0.01 = 1%). No look-ahead: changing any bar after t leaves the
    rates at t unchanged.
    """

    #: The family name used by the CLI, the API and reports (``tiered``, ``ewma``, ...).
    family: ClassVar[str]
    #: Whether the rate depends on the position's notional (tiers, liquidity add-on).
    notional_dependent: ClassVar[bool] = False

    @property
    def horizon(self) -> int | None:
        """The close-out horizon the model is set to, in bars; ``None`` when it has none or
        it is unset (then ``margin_rates`` uses ``horizon.DEFAULT_HORIZON`` on the series'
        bars)."""
        value = getattr(self, "horizon_bars", None)
        return None if value is None else int(value)

    def horizon_set(self) -> int:
        """The horizon in bars, for families whose rates need it.

        Raises:
            InvalidParameters: it is unset (``margin_rates`` fills in the default first).
        """
        horizon = self.horizon
        if horizon is None:
            raise InvalidParameters(
                f"{self.family}: horizon_bars is unset; set it, or call margin_rates, which "
                "fills in the default duration on the series' bars", field="horizon_bars")
        return horizon

    def with_horizon(self, horizon_bars: int) -> MarginModel:
        """The same model with its close-out horizon set to ``horizon_bars`` (a new model;
        ``self`` when the family has no horizon, like ``tiered``)."""
        if "horizon_bars" not in self.param_names():
            return self
        params = self.get_params()
        params["horizon_bars"] = int(horizon_bars)
        return type(self)(**params)

    def _bound(self, bar_seconds: int) -> MarginModel:
        """``self`` with the default horizon filled in on bars of ``bar_seconds``."""
        if "horizon_bars" in self.param_names() and self.horizon is None:
            from calibration.horizon import DEFAULT_HORIZON, to_bars

            return self.with_horizon(to_bars(DEFAULT_HORIZON, bar_seconds, "horizon"))
        return self

    @property
    def coverage_level(self) -> float | None:
        """The confidence level the model targets, if it has one (e.g. 0.99)."""
        value = getattr(self, "confidence", None)
        return None if value is None else float(value)

    def margin_rates(
        self, bars: BarSeries, *, notional_usd: float = DEFAULT_NOTIONAL_USD
    ) -> MarginRates:
        """IM and MM rates per bar for a position of ``notional_usd``.

        Raises:
            InvalidParameters: a hyperparameter is out of range.
            InsufficientData: the series is too short for the warm-up.
        """
        self.validate()
        if not (math.isfinite(notional_usd) and notional_usd > 0):
            raise InvalidParameters(
                f"notional_usd must be positive, got {notional_usd!r}", field="notional_usd"
            )
        model = self._bound(bars.bar_seconds)
        first = model.first_valid_bar()
        if first >= len(bars):
            model._mm_rate(bars, notional_usd)  # a family's own refusal comes first
            raise InsufficientData(
                f"{self.family} needs more than {first} bars before its first margin; "
                f"the series {bars.instrument!r} has {len(bars)}"
            )
        return model._capped_rates(bars, notional_usd)

    def _capped_rates(self, bars: BarSeries, notional_usd: float) -> MarginRates:
        """``_mm_rate`` capped at ``max_rate_cap()``, as ``MarginRates`` (on a bound model
        and a series longer than the warm-up). A family may fuse these passes in one kernel
        (``EwmaMargin``); the rates, the mask and their bits must stay these."""
        raw = self._mm_rate(bars, notional_usd)
        first = self.first_valid_bar()
        cap = self.max_rate_cap()
        im_to_mm = self._im_to_mm(notional_usd)
        # One pass without a mask array for the usual case, no bar above the cap.
        if not _kernels.any_above(np.ascontiguousarray(raw, dtype=np.float64), float(cap)):
            return MarginRates(mm_rate=raw, im_to_mm=im_to_mm, first_valid_bar=first,
                               max_rate=cap, capped=None)
        mm, capped = _kernels.cap_rates(np.ascontiguousarray(raw, dtype=np.float64),
                                        float(cap))
        return MarginRates(mm_rate=mm, im_to_mm=im_to_mm, first_valid_bar=first,
                           max_rate=cap, capped=capped)

    def max_rate_cap(self) -> float:
        """The cap on the rates, fraction of notional (``max_rate``; 1.0 without one)."""
        return float(getattr(self, "max_rate", 1.0))

    def first_valid_bar(self) -> int:
        """Index of the first bar with a margin (the warm-up length in bars)."""
        return 0

    def _im_to_mm(self, notional_usd: float) -> float:
        """IM rate / MM rate for a position of ``notional_usd``; by default ``im_to_mm``."""
        return float(getattr(self, "im_to_mm", 2.0))

    @abstractmethod
    def _mm_rate(self, bars: BarSeries, notional_usd: float) -> FloatArray:
        """MM rate per bar, shape ``(n,)``, NaN before ``first_valid_bar()``."""

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"{type(self).__name__}({args})"
