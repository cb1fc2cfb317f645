"""The close-out horizon (margin period of risk): one quantity per backtest or calibration.

domain.md §2: the horizon sizes the margin (√h in ``ewma``, h-bar losses in ``fhs``) and it is
the loss window of the coverage test (§3); the two are never different. It is given as bars
(``horizon_bars``) or as a duration (``"1h"``, ``"2d"``) converted with the series' bar size,
and the default is a duration, so the same request means the same risk on 1-minute and daily
bars.

A duration that is not a whole number of bars is rounded *up* (a horizon never shorter than
asked: 45 minutes on 30-minute bars is 2 bars, 1 hour on daily bars is 1 bar); every result
states the horizon in bars and as the duration those bars span, so the rounding is visible.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass

from calibration._errors import InvalidParameters

#: The horizon when a request names none: an hour, as a duration (60 bars of 1 minute,
#: 2 bars of 30 minutes, 1 bar of a day).
DEFAULT_HORIZON = "1h"

_UNITS = {"s": 1, "m": 60, "min": 60, "h": 3600, "d": 86_400, "w": 604_800}


def parse_duration(text: str, field: str = "horizon") -> int:
    """``"90s"`` → 90, ``"5m"``/``"5min"`` → 300, ``"1h"`` → 3600, ``"2d"`` → 172800 seconds.

    Raises:
        InvalidParameters: not a positive whole number followed by s, m, min, h, d or w.
    """
    clean = text.strip().lower()
    for unit in sorted(_UNITS, key=len, reverse=True):
        if clean.endswith(unit):
            number = clean[: -len(unit)].strip()
            if number.isdigit() and 0 < int(number) <= 10**7:
                return int(number) * _UNITS[unit]
    raise InvalidParameters(
        f"{field}: not a duration: {text[:40]!r} (use a number of bars, or e.g. 30m, 1h, 2d)",
        field=field,
    )


def format_duration(seconds: int) -> str:
    """Seconds as the largest exact unit: 3600 → ``1h``, 5400 → ``90m``, 172800 → ``2d``."""
    for unit, size in (("w", 604_800), ("d", 86_400), ("h", 3600), ("m", 60)):
        if seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


@dataclass(frozen=True, slots=True)
class Horizon:
    """A close-out horizon on one bar grid.

    Attributes:
        bars: the horizon in bars (what models and the coverage test use), ≥ 1.
        bar_seconds: the bar size it was converted with, seconds.
        source: the setting it came from (``"horizon"``, ``"params.horizon_bars"``, ...;
            ``"default"`` when none was given).
    """

    bars: int
    bar_seconds: int
    source: str = "default"

    @property
    def seconds(self) -> int:
        """The time the horizon spans, seconds (``bars * bar_seconds``)."""
        return self.bars * self.bar_seconds

    @property
    def duration(self) -> str:
        """The time the horizon spans, as ``1h`` / ``2d`` / ``90m``."""
        return format_duration(self.seconds)

    def describe(self) -> str:
        """``"2 bars of 30m = 1h"``: how a person reads it."""
        bar = format_duration(self.bar_seconds)
        plural = "bar" if self.bars == 1 else "bars"
        return f"{self.bars} {plural} of {bar} = {self.duration}"


def to_bars(value: object, bar_seconds: int, field: str) -> int:
    """One horizon setting in bars: a whole number of bars, a digit string, or a duration.

    Raises:
        InvalidParameters: not a positive whole number of bars nor a duration; ``field``
            names the setting.
    """
    if isinstance(value, str):
        text = value.strip()
        if text.isdigit():
            value = int(text)
        else:
            return max(1, math.ceil(parse_duration(text, field) / bar_seconds))
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InvalidParameters(
            f"{field} must be a whole number of bars or a duration like 1h, got {value!r}",
            field=field,
        )
    number = float(value)
    if not math.isfinite(number) or not number.is_integer() or not 1 <= number <= 10**7:
        raise InvalidParameters(
            f"{field} must be a whole number of bars between 1 and 10000000, got {value!r}",
            field=field,
        )
    return int(number)


def resolve_horizon(settings: Mapping[str, object], bar_seconds: int) -> Horizon:
    """The one horizon of a request from every place it may be set.

    Args:
        settings: setting name (its field path, e.g. ``"horizon"``,
            ``"params.horizon_bars"``) → value (``None`` where not set).
        bar_seconds: the series' bar size, seconds.

    Raises:
        InvalidParameters: a setting is malformed, or two settings give different horizons
            (in bars, after conversion); ``field`` names the second one.
    """
    if not (isinstance(bar_seconds, int) and bar_seconds > 0):
        raise InvalidParameters(f"bar size must be a positive number of seconds, got "
                                f"{bar_seconds!r}", field="bar_seconds")
    chosen: Horizon | None = None
    for field, value in settings.items():
        if value is None:
            continue
        bars = to_bars(value, bar_seconds, field)
        if chosen is None:
            chosen = Horizon(bars, bar_seconds, field)
        elif bars != chosen.bars:
            first = Horizon(chosen.bars, bar_seconds)
            second = Horizon(bars, bar_seconds)
            raise InvalidParameters(
                f"two different close-out horizons: {chosen.source} is {first.describe()}, "
                f"{field} is {second.describe()}; set the horizon once",
                field=field,
            )
    if chosen is None:
        chosen = Horizon(to_bars(DEFAULT_HORIZON, bar_seconds, "horizon"), bar_seconds)
    return chosen
