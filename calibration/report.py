"""The JSON report of a backtest: msgspec Structs shared by the CLI and the API.

Field names follow domain.md §3 (``observations``, ``breaches``, ``breach_rate``,
``kupiec_lr``, ``kupiec_pvalue``, ``christoffersen_lr``, ``conditional_coverage_lr``,
``traffic_light``, ``mean_margin_rate``, ``max_uncovered_loss``); rates are fractions of
notional, money is USD, times are ISO-8601 UTC strings. A figure that does not exist (the
mean shortfall of zero breaches) is ``null``, never a made-up number.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

TrafficLight = Literal["green", "yellow", "red", "insufficient"]


class SideCoverage(msgspec.Struct, frozen=True, kw_only=True):
    """Coverage statistics of one side (long or short) over one window.

    ``kupiec_pvalue`` is the two-sided χ²(1) p-value of the Kupiec POF statistic (too many
    *or* too few breaches); ``kupiec_pvalue_one_sided`` is ``1 - Φ(sign(x - np)·√LR)``, the
    evidence of too many breaches, which is what the calibration's Kupiec constraint tests.
    ``traffic_light`` is ``insufficient`` when the window is too short for any verdict
    (even zero breaches would not be green).

    Attributes:
        observations: margin bars tested (count).
        breaches: observations whose loss exceeded the margin (count).
        breach_rate: breaches / observations (fraction).
        expected_breach_rate: 1 - coverage level (fraction).
        kupiec_lr: Kupiec POF likelihood ratio (χ²(1) statistic).
        kupiec_pvalue: two-sided Kupiec p-value (probability).
        kupiec_pvalue_one_sided: one-sided Kupiec p-value, too many breaches (probability).
        christoffersen_lr: Christoffersen independence likelihood ratio (χ²(1) statistic).
        christoffersen_pvalue: its p-value (probability).
        conditional_coverage_lr: Kupiec + Christoffersen likelihood ratio (χ²(2) statistic).
        conditional_coverage_pvalue: its p-value (probability).
        traffic_light: Basel traffic light: green, yellow, red or insufficient.
        mean_margin_rate: mean margin tested (fraction of notional).
        max_uncovered_loss: largest loss beyond the margin (fraction of notional).
        mean_uncovered_loss: mean loss beyond the margin over breaches (fraction of notional).
        expected_shortfall: mean loss over breaches (fraction of notional).
        transitions: breach-sequence transition counts ``[n00, n01, n10, n11]`` (counts).
    """

    observations: int
    breaches: int
    breach_rate: float | None
    expected_breach_rate: float
    kupiec_lr: float | None
    kupiec_pvalue: float | None
    kupiec_pvalue_one_sided: float | None
    christoffersen_lr: float | None
    christoffersen_pvalue: float | None
    conditional_coverage_lr: float | None
    conditional_coverage_pvalue: float | None
    traffic_light: TrafficLight | None
    mean_margin_rate: float | None
    max_uncovered_loss: float
    mean_uncovered_loss: float | None
    expected_shortfall: float | None
    transitions: tuple[int, int, int, int]


class CoverageMetrics(msgspec.Struct, frozen=True, kw_only=True):
    """Coverage backtest of one instrument over one window (``all`` or a stress window).

    An observation (margin bar t) is in a window when its loss interval (t, t+h] overlaps
    it. ``capped_bars`` counts the window's observations whose margin rate the model produced
    above ``max_rate`` and was capped to it (domain.md §2).

    Attributes:
        window: ``all``, a stress window's name or an out-of-sample fold.
        start: first bar of the window, UTC ISO 8601 (null for ``all``).
        end: end of the window, UTC ISO 8601 (null for ``all``).
        long: coverage of long positions.
        short: coverage of short positions.
        mean_margin_rate: mean MM rate (fraction of notional).
        mean_im_rate: mean IM rate (fraction of notional).
        max_leverage: 1 / mean IM rate (ratio).
        peak_to_trough: max margin / min margin (ratio).
        max_increase_ratio: largest margin increase over 30 days (ratio).
        capped_bars: observations capped to ``max_rate`` (count).
    """

    window: str
    start: str | None
    end: str | None
    long: SideCoverage
    short: SideCoverage
    mean_margin_rate: float | None
    mean_im_rate: float | None
    max_leverage: float | None
    peak_to_trough: float | None
    max_increase_ratio: float | None
    capped_bars: int = 0


class LiquidationMetrics(msgspec.Struct, frozen=True, kw_only=True):
    """Liquidation/insolvency figures of one instrument over one window.

    Positions are counted in the window where they open; liquidations, bad debt and fees in
    the window where the liquidation triggers: each instrument's own. The venue has one
    insurance fund shared by all its instruments (domain.md §4): ``insurance_fund_min_usd``
    and ``insurance_fund_exhausted_at`` are that shared fund's over the window, the same for
    every instrument of a backtest (in a ``BacktestReport``; a single-instrument simulation
    reports its own fund). ``premature_liquidations`` counts the liquidations whose
    bankruptcy price was not reached in bars t..t+R, the trigger bar t included, and whose
    price ended that window back on the safe side of the liquidation price.

    Attributes:
        window: ``all``, a stress window's name or an out-of-sample fold.
        start: first bar of the window, UTC ISO 8601 (null for ``all``).
        end: end of the window, UTC ISO 8601 (null for ``all``).
        positions: positions opened (count).
        notional_opened_usd: notional of the positions opened (USD).
        liquidations: liquidations triggered (count).
        liquidated_notional_usd: notional liquidated (USD).
        premature_liquidations: liquidations the price recovered from (count).
        premature_share: premature liquidations / liquidations (fraction).
        bad_debt_usd: losses beyond the collateral (USD).
        bad_debt_bps: bad debt per notional opened (bps).
        bad_debt_positions: liquidations that left bad debt (count).
        worst_position_bad_debt_usd: the largest bad debt of one position (USD).
        fees_to_fund_usd: liquidation fees paid to the insurance fund (USD).
        insurance_fund_min_usd: the shared fund's lowest level in the window (USD).
        insurance_fund_exhausted_at: when the fund first fell below zero, UTC ISO 8601.
    """

    window: str
    start: str | None
    end: str | None
    positions: int
    notional_opened_usd: float
    liquidations: int
    liquidated_notional_usd: float
    premature_liquidations: int
    premature_share: float | None
    bad_debt_usd: float
    bad_debt_bps: float | None
    bad_debt_positions: int
    worst_position_bad_debt_usd: float
    fees_to_fund_usd: float
    insurance_fund_min_usd: float
    insurance_fund_exhausted_at: str | None


class FundPoint(msgspec.Struct, frozen=True, array_like=True):
    """One point of a fund path: ``[time, fund_usd]`` (a level of the fund, USD, or on an
    instrument's ``fund_contribution_path`` its cumulative net contribution, USD).

    Attributes:
        time: UTC ISO 8601 instant.
        fund_usd: fund level, or cumulative net contribution (USD).
    """

    time: str
    fund_usd: float


class RepairInfo(msgspec.Struct, frozen=True, kw_only=True):
    """One row an opt-in repair changed (``row`` 1-based in the file, ``time`` its bar).

    Attributes:
        row: data row in the file, 1-based, header excluded.
        time: open time of the bar, UTC ISO 8601.
        defect: what was wrong (``ohlc-range``, ``duplicates``).
        change: what the repair did, old → new values.
    """

    row: int
    time: str
    defect: str
    change: str


class DatasetInfo(msgspec.Struct, frozen=True, kw_only=True):
    """Where an instrument's bars came from, and what they were.

    ``suspect_prints`` holds the open times of bars whose wick reaches more than 50% beyond
    the body (``calibration.data.find_suspect_prints``): kept in the data, flagged here.
    ``close_only``: the source had closes only, so losses use closes (domain.md §1);
    ``newest_first``: the file was reversed on loading; ``repair_policy`` and ``repairs``:
    the opt-in repairs allowed and every row they changed; ``depth_stale_bars``: bars whose
    last order-book snapshot was too old to use (the ADV fallback applied).

    Attributes:
        instrument: instrument name.
        ref: data reference as given, relative to the data root.
        fingerprint: sha256 of the validated bars (hex).
        rows: bars loaded (count).
        start: open time of the first bar, UTC ISO 8601.
        end: open time of the last bar, UTC ISO 8601.
        bar_seconds: bar size (s).
        gaps: stretches of missing bars (count).
        missing_bars: bars missing in all gaps (count).
        suspect_prints: open times of suspect bars, UTC ISO 8601.
        close_only: the source had closes only.
        newest_first: the file was newest first and was reversed.
        repair_policy: the opt-in repairs allowed.
        repairs: every row a repair changed.
        depth_stale_bars: bars without a usable order-book snapshot (count).
    """

    instrument: str
    ref: str
    fingerprint: str
    rows: int
    start: str
    end: str
    bar_seconds: int
    gaps: int
    missing_bars: int
    suspect_prints: list[str] = []
    close_only: bool = False
    newest_first: bool = False
    repair_policy: list[str] = []
    repairs: list[RepairInfo] = []
    depth_stale_bars: int = 0


class InstrumentReport(msgspec.Struct, frozen=True, kw_only=True):
    """Every figure of one instrument, overall (``window="all"``) and per stress window.

    ``insurance_fund_path`` is kept for compatibility and left ``null`` by ``run_backtest``:
    there is no fund per instrument any more (a full fund each overstated the venue's
    resources); the venue's one fund is ``BacktestReport.insurance_fund_path``.
    ``fund_contribution_path`` is this instrument's own cumulative net contribution to that
    fund (fees in minus bad debt out, USD, from 0).

    Attributes:
        instrument: instrument name.
        coverage: coverage tests, overall and per window.
        liquidation: liquidation figures, overall and per window (null: not simulated).
        insurance_fund_path: always null (kept for compatibility).
        fund_contribution_path: this instrument's cumulative net contribution to the fund,
            ``[time, USD]`` pairs.
    """

    instrument: str
    coverage: list[CoverageMetrics]
    liquidation: list[LiquidationMetrics] | None = None
    insurance_fund_path: list[FundPoint] | None = None
    fund_contribution_path: list[FundPoint] | None = None


class BacktestReport(msgspec.Struct, frozen=True, kw_only=True):
    """The full report of one backtest run.

    ``horizon_bars`` is the close-out horizon (margin period of risk) in bars of
    ``bar_seconds``; ``horizon`` the duration those bars span (``1h``), ``horizon_seconds``
    the same in seconds. It sized the margin (``params.horizon_bars`` where the family has
    one) and is the coverage test's loss window.

    ``insurance_fund_*`` describe the venue's one insurance fund, shared by every instrument
    (domain.md §4): its start level, its path (the start, then the level after each time
    with a close-out of any instrument), its minimum and when it was first below zero (where
    exchanges turn to auto-deleveraging). ``null`` without a liquidation simulation.

    Attributes:
        engine_version: marginlab engine version.
        model: margin model family.
        params: the model's parameters with defaults filled in, each in its own units.
        horizon_bars: close-out horizon (bars).
        horizon: close-out horizon as a duration (``1h``).
        horizon_seconds: close-out horizon (s).
        bar_seconds: bar size (s).
        overlapping: every bar observed (true) or every horizon-th bar.
        coverage_level: VaR level tested (probability).
        margin_tested: ``mm`` or ``im``.
        notional_usd: notional the USD figures refer to (USD).
        datasets: where each instrument's bars came from.
        instruments: every figure per instrument.
        liquidation_config: the liquidation settings used (null: not simulated).
        insurance_fund_start_usd: the shared fund's start level (USD).
        insurance_fund_path: the shared fund's level over time, ``[time, USD]`` pairs.
        insurance_fund_min_usd: the shared fund's lowest level (USD).
        insurance_fund_exhausted_at: when it first fell below zero, UTC ISO 8601.
    """

    engine_version: str
    model: str
    params: dict[str, Any]
    horizon_bars: int
    horizon: str
    horizon_seconds: int
    bar_seconds: int
    overlapping: bool
    coverage_level: float
    margin_tested: Literal["mm", "im"]
    notional_usd: float
    datasets: list[DatasetInfo]
    instruments: list[InstrumentReport]
    liquidation_config: dict[str, Any] | None = None
    insurance_fund_start_usd: float | None = None
    insurance_fund_path: list[FundPoint] | None = None
    insurance_fund_min_usd: float | None = None
    insurance_fund_exhausted_at: str | None = None


def to_json(report: BacktestReport) -> bytes:
    """The report as JSON bytes (NaN and infinities are written as ``null``)."""
    return msgspec.json.encode(report)


def report_schema() -> dict[str, Any]:
    """JSON Schema of ``BacktestReport`` (for the API's OpenAPI document)."""
    schema: dict[str, Any] = msgspec.json.schema(BacktestReport)
    return schema
