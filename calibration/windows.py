"""Named stress windows: every backtest figure is also reported per window."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta

from calibration._errors import InvalidParameters


@dataclass(frozen=True, slots=True)
class StressWindow:
    """A named period ``[start_ms, end_ms)`` in epoch milliseconds UTC."""

    name: str
    start_ms: int
    end_ms: int

    @classmethod
    def from_dates(cls, name: str, first_day: str, last_day: str | None = None) -> StressWindow:
        """A window covering whole UTC days ``first_day .. last_day`` (ISO dates, inclusive)."""
        try:
            d0 = date.fromisoformat(first_day)
            d1 = date.fromisoformat(last_day or first_day)
        except ValueError as exc:
            raise InvalidParameters(
                f"stress window {name!r}: {exc}", field="stress_windows"
            ) from exc
        if d1 < d0:
            raise InvalidParameters(
                f"stress window {name!r} ends before it starts", field="stress_windows"
            )
        start = datetime(d0.year, d0.month, d0.day, tzinfo=UTC)
        try:
            end = datetime(d1.year, d1.month, d1.day, tzinfo=UTC) + timedelta(days=1)
        except OverflowError:  # the day after 9999-12-31 has no datetime
            raise InvalidParameters(f"stress window {name!r} ends after 9999-12-30",
                                    field="stress_windows") from None
        return cls(name, int(start.timestamp() * 1000), int(end.timestamp() * 1000))

    @classmethod
    def parse(cls, text: str) -> StressWindow:
        """``NAME=YYYY-MM-DD[..YYYY-MM-DD]`` (as the CLI takes it)."""
        name, sep, span = text.partition("=")
        if not sep or not name:
            raise InvalidParameters(
                f"stress window {text!r} must look like NAME=2022-05-09..2022-05-13",
                field="stress_windows",
            )
        first, _, last = span.partition("..")
        return cls.from_dates(name, first, last or None)


#: The crash episodes of domain.md ("Stress windows in ../shared/data").
DEFAULT_STRESS_WINDOWS: tuple[StressWindow, ...] = (
    StressWindow.from_dates("black_thursday_2020", "2020-03-12", "2020-03-13"),
    StressWindow.from_dates("may_2021_crash", "2021-05-19"),
    StressWindow.from_dates("luna_ust_2022", "2022-05-09", "2022-05-13"),
    StressWindow.from_dates("ftx_2022", "2022-11-08", "2022-11-10"),
    StressWindow.from_dates("yen_carry_2024", "2024-08-05"),
    StressWindow.from_dates("oct_2025_cascade", "2025-10-10"),
)


def windows_overlapping(
    windows: Sequence[StressWindow], first_ms: int, last_ms: int
) -> list[StressWindow]:
    """The windows that share at least one instant with ``[first_ms, last_ms]``."""
    return [w for w in windows if w.start_ms <= last_ms and w.end_ms > first_ms]
