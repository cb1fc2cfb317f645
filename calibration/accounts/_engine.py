"""Account liquidation through the bars: the domain.md §7 core, cross, portfolio or isolated.

For an account opened at the close of bar e with signed units ``q_i = N_i / C_{i,e}`` and
collateral ``b_a``:

- ``equity_t = Σ_a b_a P_{a,t} + Σ_i q_i (P_{i,t} − C_{i,e})`` (stable collateral at 1);
- ``MM_t = Σ_i MM_i(|q_i| P_{i,t}, t)`` (each instrument's margin model at that notional);
- both at every price's adverse extreme for this account, one side per asset: the bar's low
  when the account is net long the asset (collateral units plus position units ≥ 0), its high
  when net short. OHLC does not say whether the extremes of different instruments coincide:
  this is the conservative reading;
- trigger: the first bar t in e+1..e+H (``holding_bars``) with ``equity_t <= MM_t``;
- close-out: every position and the collateral at the worst price over bars t..t+L
  (``latency_bars``, cut at the last bar; the same side rule), less ``spread_rate`` of each
  position's close-out notional and a liquidation fee ``min(fee_rate * gross, equity)`` when
  equity is positive; close-out equity below 0 is the account's bad debt, drawn from one
  insurance fund for the venue;
- an account that does not trigger closes without event.

Portfolio mode (domain.md §8) replaces ``MM_t`` by the portfolio model's ``mm_factor * IM_t``:
the account's largest scenario loss, positions and collateral revalued together at the same
adverse-extreme prices (``calibration.accounts._kernel_portfolio``). Everything else (equity,
trigger, close-out, fees, haircuts) is the cross rule; the isolated twins keep the
per-instrument models, so contagion figures compare portfolio with isolated. The pooled
figures (``bad_debt_cross_usd``, ``trigger_bar``) are then the portfolio accounts'.
The mechanics below run in portfolio mode too, with every "MM" of their rules (the trigger
test, a step's *restored* estimate, the capacity queue's equity / MM) the portfolio
requirement of what the account still holds, at the same marks; ``largest_requirement_first``
ranks a position by the portfolio requirement of that position alone. The close-out is the
mechanics' (fills, slippage, funding, fee, cascade volume) unchanged.

Isolated mode replays each position as an account of its own (its *isolated twin*), holding a
share of each of the account's collateral assets pro rata to the positions' entry IM
(domain.md §7). With one USD-collateralised position per account and no fees or slippage this
is §4's isolated replay (``calibration.liquidation``), which the tests prove bar for bar.

Mechanics (named switches of ``AccountConfig``; all off by default, which is the core above,
run by ``_kernel.replay`` bit for bit as before). Any of them on runs ``_kernel_mech``: every
account in time order, bar by bar (the cascade makes accounts interact), by these rules:

- ``funding``: each position pays ``q_i (D_{i,t} − D_{i,a})`` with ``D_i = cumsum(funding_rate_i
  · close_i)`` (price units, §4's convention: settled per bar on the current notional, longs pay
  a positive rate), ``a`` the entry bar or the bar of its last close-out step; summed per
  account, it is settled cash in equity (not weighted by ``upnl_weight``). An instrument without
  funding data pays none. Off by default: the §7 core has no funding, and turning it on where
  the data has it changes the figures of every perpetual; a close-out step settles funding to
  its bar ``t`` (§4: "funding to the trigger bar").
- slippage per instrument: closing ``Δ`` units of instrument i at step bar ``t`` pays
  ``min(1, spread_rate + impact_coef · (|Δ| C_{i,e} / depth_{i,t})^impact_exponent)`` of the
  fill notional (§4: the closed units' entry notional; bid depth when selling a long, ask when
  buying back a short, from the series' order-book depth when it has both, else
  ``depth_fraction_of_adv`` × the trailing ``adv_window_bars`` mean traded USD per day; zero
  depth: the capped 100%). ``impact_coef`` defaults to 0 here (the core is frictionless, as
  ``spread_rate`` = 0); §4's ``LiquidationConfig`` uses 0.01.
- ``cascade``: the entry notional of the units of instrument i closed by steps at bar s, longs
  ``QL_{i,s}`` and shorts ``QS_{i,s}`` over every account, moves bar s+1 of that instrument for
  every account: ``low × max(0, 1 − cascade_kappa · QL / bid_depth_s)``, ``high × (1 + min(1,
  cascade_kappa · QS / ask_depth_s))`` (§4's rule, per instrument). Bar s+1 depends only on
  steps at bar s, so one forward pass over the bars finds the fixed point exactly; the moved
  extremes are used for every later test, mark and fill. The isolated twins are a separate
  population with their own cascade.
- ``policy``: what a step closes. A step happens at a tested bar ``t`` where equity ≤ MM (the
  trigger test, at the marks: every asset's adverse extreme for the account at bar t). Its
  *estimate* revalues the account at those marks with the units ``Δ`` closed there, less their
  slippage and ``liquidation_fee_rate``; *restored* means that estimate's equity > the MM of
  what is left (nothing left: done). Policies:
  ``close_all`` closes every position (one step, the core);
  ``largest_requirement_first`` closes whole positions one at a time, largest ``MM_i`` at the
  marks first (ties: the market's instrument order), until restored or nothing is left;
  ``partial`` closes ``partial_fraction`` of each position's entry units (the last of
  ``ceil(1 / partial_fraction)`` steps closes the remainder);
  ``hedge_preserving`` first closes the unhedged residual per asset: for each asset with net
  units ``n_a`` (collateral plus positions, the same net as the adverse side), the positions on
  it with the sign of ``n_a`` lose ``min(1, |n_a| / Σ|q|)`` of their units pro rata, keeping the
  offsetting legs (and the collateral a short hedges); not restored, it closes everything.
  Books on different assets (long BTC / short ETH) have no hedge per asset and close as under
  ``close_all``.
  Each step fills at the worst price of bars ``t .. t+L`` (as the core, for the account's side
  at the step), the last position's step sells the collateral too; the fee is ``min(fee_rate ×
  fill notional, equity after the step)`` when positive (equity after a partial step: cash plus
  what is left open and the collateral at the step's marks). The account is tested again from
  bar ``t + max(1, L)`` (``partial``: ``t + max(1, L, cooldown_bars)``); a ``partial`` account
  whose estimate is not restored stays in liquidation past its holding window, and at the
  last bar of the data whatever it still holds is closed. ``trigger_bar`` is the first step,
  ``closeout_bar`` the last step's fill bar; bad debt is ``max(0, −equity)`` after the step
  that closes the last position (an account left with positions has none).

Capacity (domain.md §10; ``max_liquidations_per_bar``, ``max_liquidation_notional_per_bar``,
``queue_order``; unlimited by default). Every bar, each account due a test (the rules above)
whose equity ≤ MM at the bar's marks asks for a close-out step; the engine starts at most
``max_liquidations_per_bar`` of those steps, and a step only while the notional already started
in the bar (closed units × the bar's marks) is below ``max_liquidation_notional_per_bar`` (so
a step is never split by the cap, and the first one always starts). The order:
``most_undercollateralised`` (lowest equity / MM at the bar's marks first; MM 0 first of all)
or ``first_come`` (the earliest bar the account has waited since first); ties in entry
order. An account not served waits: it is tested again the next bar at that bar's marks (it
is not dropped at the end of its holding window while it waits); one back above MM leaves the
queue without a close-out; one served at bar s closes exactly as a step at s above (the fill
over s .. s+L, the fee, the cascade volume of bar s). Each step of a multi-step policy asks
for capacity again. At the data's last bar the queue is served whole (the data ends, so the
backlog is closed there). ``trigger_bar`` is the bar of the first step (the service);
``queued_bar`` the first bar the account asked; ``wait_bars`` the bars it waited before its
first step. With no limit every asking account is served in its bar: the figures are those
above bit for bit. The isolated twins queue in their own engine. When the capacity is the
only mechanic on (``close_all``, no impact, funding, cascade, backstop, keepers, oracle or ADL
feedback) the fast walk runs ``_kernel_queue.replay_queue``, ``_kernel_mech``'s walk
specialised to that case (the same figures bit for bit, as a test proves).

Contagion (computed in every run, from the account and its twins): *healthy-leg
liquidations* are positions closed with their account whose twin never triggered or
triggered strictly later; *hedge-break loss* is those legs' close-out loss, ``max(0, −PnL)``
at the account's close-out prices; *saved by cross* counts accounts that never triggered
although at least one twin did.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
from numpy.typing import NDArray

from calibration._errors import DataError, InsufficientData, InvalidParameters
from calibration.accounts._adl import AdlLedger, auto_deleverage
from calibration.accounts._arrays import AccountBook
from calibration.accounts._book import MARGIN_MODES, Account
from calibration.accounts._haircuts import HaircutSchedule
from calibration.accounts._kernel import (
    BookArrays,
    CollateralRules,
    MarketArrays,
    empty_outputs,
    replay,
)
from calibration.accounts._kernel_mech import (
    POLICIES,
    QUEUE_ORDERS,
    Mechanics,
    MechOutputs,
    Reductions,
    empty_mech_outputs,
    no_reductions,
    no_scenarios,
    replay_mech,
)
from calibration.accounts._kernel_portfolio import replay_portfolio
from calibration.accounts._kernel_queue import replay_queue
from calibration.accounts._market import Market, underlying_of, volume_depth_usd
from calibration.accounts._split import RowRunner, book_rows, check_workers
from calibration.horizon import resolve_horizon
from calibration.models import MarginModel, PortfolioMarginModel, TieredMargin
from calibration.models._portfolio_kernel import ScenarioArrays
from calibration.windows import StressWindow

FloatArray = NDArray[np.float64]
IntArray = NDArray[np.int64]


@dataclass(frozen=True, kw_only=True)
class AccountConfig:
    """How accounts are replayed.

    Attributes:
        mode: ``cross`` (one pooled requirement per account: the sum of per-instrument
            rates), ``portfolio`` (one pooled requirement from a portfolio margin model's
            scenarios, domain.md §8) or ``isolated`` (every position an account of its own,
            its collateral share pro rata to entry IM).
        holding_bars: bars an account stays open at most after its entry.
        latency_bars: bars between the trigger and the close-out (0: the trigger bar's
            adverse extreme).
        spread_rate: slippage on each position's close-out notional, fraction.
        liquidation_fee_rate: fee on the gross close-out notional paid to the fund,
            fraction (never more than the remaining equity).
        insurance_fund_usd: the venue's one fund at the start, USD.
        haircuts: collateral asset (``BTC``, ...) → ``HaircutSchedule``: what a holding counts
            for in the trigger test (domain.md §9); assets not named count at full value,
            stable ones always do. The close-out sells at market prices.
        upnl_weight: weight of a positive unrealised PnL as collateral in the trigger test
            (1: counted in full; Mango 2022 shows what that invites), in [0, 1].
        funding: settle each position's funding where its series has ``funding_rate``
            (module docstring, "Mechanics"); off by default.
        impact_coef, impact_exponent: market impact ``coef · (N / depth)^exponent`` of each
            position's close-out, per instrument (0: none, the default here).
        depth_fraction_of_adv, adv_window_bars: without order-book depth, ``depth = fraction ·
            ADV`` (USD per day over the trailing window, bars), as §4.
        cascade, cascade_kappa: liquidated notional moves the instrument's next bar by
            ``kappa · Q / depth`` for every account (shared across instruments).
        policy: ``close_all`` (default), ``largest_requirement_first``, ``partial`` or
            ``hedge_preserving`` (module docstring).
        partial_fraction: ``partial``: share of each position's entry units per step, (0, 1].
        cooldown_bars: ``partial``: bars between two steps of one account (>= 1).
        max_liquidations_per_bar: the engine's capacity, close-out steps started per bar at
            most (None: no limit; module docstring, "Capacity").
        max_liquidation_notional_per_bar: a step starts only while the notional started in
            the bar (units × the bar's marks) is below this, USD (None: no limit).
        queue_order: ``most_undercollateralised`` (lowest equity / MM served first) or
            ``first_come`` (earliest bar in the queue first); ties: entry order.
        adl: auto-deleveraging once the fund is exhausted (``calibration.accounts._adl``):
            the result's ``adl`` ledger; a deleveraged account holds fewer units (and has the
            fill's PnL in cash) from the bar after its fill, so its later test, close-out and
            bad debt follow what it still holds; off by default.
        backstop_threshold: the backstop vault takes over an account whose equity at a
            close-out step's marks is below this fraction of its MM (Hyperliquid: 2/3,
            venues.md HL1): every position and the collateral, closed out as the engine
            would; the vault keeps that close-out's equity (``backstop_pnl_usd``), the
            account ends at 0 and the fund takes neither fee nor bad debt. None: off.
        partial_full_ratio: ``partial``: a step whose marks put equity at or below this
            fraction of MM closes whole (Aave v3: health factor <= 0.95, venues.md AV1; the
            engine's equity / MM stands for the health factor). None: off.
        partial_min_leftover_usd: ``partial``: a step that would leave less than this open
            (USD at the step's marks) closes whole (Aave v3.3: leftover >= 1,000, AV2); 0: off.
        max_liquidations_per_block, block_seconds: a per-block limit (dYdX v4: 50
            liquidations per block, venues.md DY3): the engine starts at most
            ``max_liquidations_per_block × floor(bar_seconds / block_seconds)`` steps per bar
            (with ``max_liquidations_per_bar`` too, the tighter). None: no limit.
        keeper_bonus_rate: DeFi keepers (None: the engine liquidates by itself): a step
            happens only when ``keeper_bonus_rate × N − slippage × N − gas > 0`` for the keeper
            (N the step's notional at the marks); otherwise the account waits to the next bar
            (``keeper_declined``). The account pays the bonus out of what is left after the
            fee (Aave: liquidation bonus, venues.md AV4; Maker: chip/tip, MK2).
        keeper_gas_usd, gas_multiplier, gas_window: a keeper's gas cost of one liquidation,
            USD, times ``gas_multiplier`` inside ``gas_window`` (``NAME=FROM..TO`` as
            ``--stress-window``; Black Thursday's gas spike, venues.md M1).
        keeper_latency_bars: bars an account has been waiting liquidatable before a keeper
            acts.
        oracle_heartbeat_bars, oracle_deviation_rate: the margin check sees an oracle instead
            of the bar's extremes: it publishes the close at a bar when ``heartbeat`` bars
            have passed since its last update or the close moved at least ``deviation_rate``
            from it, and bar t's check reads what was published by bar t − 1 (Maker's OSM:
            one hour late, venues.md M1). None: off. Fills stay at the market's prices.
        partial_min_notional_usd: ``partial``: an account whose open notional at the step's
            marks is at most this closes whole in one step (Hyperliquid: partial only above
            100,000 USDC, venues.md HL2), USD; 0: always partial.
    """

    mode: str = "cross"
    holding_bars: int = 336
    latency_bars: int = 1
    spread_rate: float = 0.0
    liquidation_fee_rate: float = 0.0
    insurance_fund_usd: float = 200_000_000.0
    haircuts: Mapping[str, HaircutSchedule] = field(default_factory=dict)
    upnl_weight: float = 1.0
    funding: bool = False
    impact_coef: float = 0.0
    impact_exponent: float = 0.5
    depth_fraction_of_adv: float = 0.01
    adv_window_bars: int = 1440
    cascade: bool = False
    cascade_kappa: float = 0.01
    policy: str = "close_all"
    partial_fraction: float = 0.25
    cooldown_bars: int = 1
    max_liquidations_per_bar: int | None = None
    max_liquidation_notional_per_bar: float | None = None
    queue_order: str = "most_undercollateralised"
    adl: bool = False
    backstop_threshold: float | None = None
    partial_min_notional_usd: float = 0.0
    partial_full_ratio: float | None = None
    partial_min_leftover_usd: float = 0.0
    max_liquidations_per_block: int | None = None
    block_seconds: float = 1.0
    keeper_bonus_rate: float | None = None
    keeper_gas_usd: float = 0.0
    gas_multiplier: float = 1.0
    gas_window: str | None = None
    keeper_latency_bars: int = 0
    oracle_heartbeat_bars: int | None = None
    oracle_deviation_rate: float = 0.0

    @property
    def capacity_limited(self) -> bool:
        """Whether the engine's capacity can bind (domain.md §10)."""
        return (self.max_liquidations_per_bar is not None
                or self.max_liquidations_per_block is not None
                or (self.max_liquidation_notional_per_bar is not None
                    and math.isfinite(self.max_liquidation_notional_per_bar)))

    @property
    def mechanics(self) -> bool:
        """Whether any mechanism beyond the core (fees and spread aside) is on."""
        return (self.funding or self.impact_coef > 0 or self.cascade
                or self.policy != "close_all" or self.capacity_limited or self.adl
                or self.backstop_threshold is not None or self.keeper_bonus_rate is not None
                or self.oracle_heartbeat_bars is not None or self.oracle_deviation_rate > 0)

    @classmethod
    def from_mapping(cls, raw: Mapping[str, Any], **defaults: Any) -> AccountConfig:
        """From JSON-like fields over ``defaults``; unknown or malformed fields are refused
        with ``field`` = ``liquidation.<name>``. ``preset`` names a venue's configuration
        (``calibration.accounts.VENUE_PRESETS``); the other keys override its fields."""
        if not isinstance(raw, Mapping):
            raise InvalidParameters("liquidation must be an object", field="liquidation")
        known = set(cls.__dataclass_fields__)
        if "preset" in raw:
            from calibration.accounts._venue_presets import preset_fields

            try:
                preset = preset_fields(raw["preset"])
            except ValueError as exc:
                raise InvalidParameters(f"liquidation.preset: {exc}",
                                        field="liquidation.preset") from None
            raw = {**preset, **{k: v for k, v in raw.items() if k != "preset"}}
        for key in raw:
            if key not in known:
                raise InvalidParameters(f"liquidation: unknown field {key!r} (known: "
                                        f"{', '.join(sorted(known))})",
                                        field=f"liquidation.{key}")
        values = {**defaults, **dict(raw)}
        if "haircuts" in values:
            values["haircuts"] = _haircuts_from(values["haircuts"])
        config = cls(**values)
        config.validate()
        return config

    def validate(self) -> None:
        """Refuse settings that cannot run, naming the field."""
        def bad(name: str, why: str) -> InvalidParameters:
            return InvalidParameters(f"liquidation.{name} {why}", field=f"liquidation.{name}")

        if self.mode not in MARGIN_MODES:
            raise InvalidParameters(
                f"mode must be one of {', '.join(MARGIN_MODES)}, got {self.mode!r}",
                field="mode")
        for name, low in (("holding_bars", 1), ("latency_bars", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not (
                    low <= value <= 10**7):
                raise bad(name, f"must be a whole number in [{low}, 10000000]")
        for name in ("spread_rate", "liquidation_fee_rate"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not 0 <= value < 1:
                raise bad(name, "must be in [0, 1)")
        if not (isinstance(self.insurance_fund_usd, int | float)
                and math.isfinite(self.insurance_fund_usd) and self.insurance_fund_usd >= 0):
            raise bad("insurance_fund_usd", "must be a finite number >= 0")
        if not (isinstance(self.upnl_weight, int | float) and 0 <= self.upnl_weight <= 1):
            raise bad("upnl_weight", "must be in [0, 1]")
        for name in ("funding", "cascade", "adl"):
            if not isinstance(getattr(self, name), bool):
                raise bad(name, "must be true or false")
        checks = (("impact_coef", 0.0, 100.0, False), ("impact_exponent", 0.0, 3.0, True),
                  ("depth_fraction_of_adv", 0.0, 1e3, True), ("cascade_kappa", 0.0, 100.0, False),
                  ("partial_fraction", 0.0, 1.0, True))
        for name, low_v, high_v, open_low in checks:
            value = getattr(self, name)
            if (isinstance(value, bool) or not isinstance(value, int | float)
                    or not math.isfinite(value) or value > high_v
                    or (value <= low_v if open_low else value < low_v)):
                side = "(" if open_low else "["
                raise bad(name, f"must be in {side}{low_v:g}, {high_v:g}]")
        for name in ("adv_window_bars", "cooldown_bars"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 10**7:
                raise bad(name, "must be a whole number in [1, 10000000]")
        if self.policy not in POLICIES:
            raise bad("policy", f"must be one of {', '.join(POLICIES)}, got {self.policy!r}")
        cap = self.max_liquidations_per_bar
        if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int)
                                or not 1 <= cap <= 10**9):
            raise bad("max_liquidations_per_bar", "must be null or a whole number in "
                      "[1, 1000000000]")
        cap_usd = self.max_liquidation_notional_per_bar
        if cap_usd is not None and (isinstance(cap_usd, bool)
                                    or not isinstance(cap_usd, int | float)
                                    or math.isnan(cap_usd) or cap_usd <= 0):
            raise bad("max_liquidation_notional_per_bar", "must be null or a number > 0")
        bt = self.backstop_threshold
        if bt is not None and (isinstance(bt, bool) or not isinstance(bt, int | float)
                               or not 0 < bt <= 1):
            raise bad("backstop_threshold", "must be null or in (0, 1]")
        for name in ("partial_min_notional_usd", "partial_min_leftover_usd"):
            pmin = getattr(self, name)
            if (isinstance(pmin, bool) or not isinstance(pmin, int | float)
                    or not math.isfinite(pmin) or pmin < 0):
                raise bad(name, "must be a finite number >= 0")
        pfr = self.partial_full_ratio
        if pfr is not None and (isinstance(pfr, bool) or not isinstance(pfr, int | float)
                                or not math.isfinite(pfr)):
            raise bad("partial_full_ratio", "must be null or a finite number")
        per_block = self.max_liquidations_per_block
        if per_block is not None and (isinstance(per_block, bool)
                                      or not isinstance(per_block, int)
                                      or not 1 <= per_block <= 10**9):
            raise bad("max_liquidations_per_block", "must be null or a whole number in "
                      "[1, 1000000000]")
        kb = self.keeper_bonus_rate
        if kb is not None and (isinstance(kb, bool) or not isinstance(kb, int | float)
                               or not 0 <= kb < 1):
            raise bad("keeper_bonus_rate", "must be null or in [0, 1)")
        for name in ("keeper_gas_usd", "gas_multiplier"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int | float) or not (
                    math.isfinite(v) and v >= 0):
                raise bad(name, "must be a finite number >= 0")
        if self.gas_window is not None:
            if not isinstance(self.gas_window, str):
                raise bad("gas_window", "must be NAME=FROM..TO")
            try:
                StressWindow.parse(self.gas_window)
            except ValueError as exc:
                raise bad("gas_window", f"must be NAME=FROM..TO ({exc})") from None
        kl = self.keeper_latency_bars
        if isinstance(kl, bool) or not isinstance(kl, int) or not 0 <= kl <= 10**7:
            raise bad("keeper_latency_bars", "must be a whole number in [0, 10000000]")
        hb = self.oracle_heartbeat_bars
        if hb is not None and (isinstance(hb, bool) or not isinstance(hb, int)
                               or not 1 <= hb <= 10**7):
            raise bad("oracle_heartbeat_bars", "must be null or a whole number in "
                      "[1, 10000000]")
        dev = self.oracle_deviation_rate
        if isinstance(dev, bool) or not isinstance(dev, int | float) or not 0 <= dev < 1:
            raise bad("oracle_deviation_rate", "must be in [0, 1)")
        bs = self.block_seconds
        if (isinstance(bs, bool) or not isinstance(bs, int | float) or not math.isfinite(bs)
                or not 0.001 <= bs <= 86_400):
            raise bad("block_seconds", "must be in [0.001, 86400]")
        if self.queue_order not in QUEUE_ORDERS:
            raise bad("queue_order", f"must be one of {', '.join(QUEUE_ORDERS)}, got "
                      f"{self.queue_order!r}")
        for asset, schedule in self.haircuts.items():
            if not isinstance(schedule, HaircutSchedule):
                raise bad(f"haircuts.{asset}", "must be a haircut schedule")
            schedule.validate(f"liquidation.haircuts.{asset}")


def _haircuts_from(raw: Any) -> dict[str, HaircutSchedule]:
    """``{asset: {"caps_usd": [...], "ratios": [...]}}`` or ``{asset: ratio}`` (flat)."""
    if not isinstance(raw, Mapping):
        raise InvalidParameters("liquidation.haircuts must map assets to schedules",
                                field="liquidation.haircuts")
    out = {}
    for asset, spec in raw.items():
        where = f"liquidation.haircuts.{asset}"
        if isinstance(spec, HaircutSchedule):
            out[str(asset).upper()] = spec
        elif isinstance(spec, int | float) and not isinstance(spec, bool):
            out[str(asset).upper()] = HaircutSchedule((), (float(spec),))
        elif isinstance(spec, Mapping) and set(spec) <= {"caps_usd", "ratios"}:
            try:
                out[str(asset).upper()] = HaircutSchedule(
                    tuple(float(c) for c in spec.get("caps_usd", ())),
                    tuple(float(r) for r in spec.get("ratios", ())))
            except (TypeError, ValueError):
                raise InvalidParameters(f"{where}: caps_usd and ratios must be numbers",
                                        field=where) from None
        else:
            raise InvalidParameters(f"{where}: a ratio, or {{caps_usd, ratios}}", field=where)
        out[str(asset).upper()].validate(where)
    return out


@dataclass(frozen=True)
class _Schedules:
    mm: MarketArrays
    im_scale: FloatArray  # (k, n) IM rate series (ones for tiered)
    im_slope: FloatArray  # (k, B) IM rate per bracket (1 for rate models)
    first_valid_bar: int


def _schedules(market: Market, models: Sequence[MarginModel]) -> _Schedules:
    k, n = len(market.instruments), len(market)
    horizon = resolve_horizon({"params.horizon_bars": None}, market.bar_seconds)
    rows: list[tuple[str, FloatArray, FloatArray, FloatArray, FloatArray, float,
                     FloatArray | None, FloatArray | None]] = []
    width = 1
    for bars, model in zip(market.bars, models, strict=True):
        if isinstance(model, TieredMargin):
            caps, mmr, deduction = model.brackets()
            # IM is constant within a bracket: read it at each bracket's floor.
            floors = [1.0, *(float(c) for c in caps[:-1])]
            im = np.array([model._bracket_rates(f)[1] for f in floors])
            im = np.minimum(im, model.max_rate_cap())
            rows.append(("tiered", caps, mmr, deduction, im, model.max_rate_cap(), None, None))
            width = max(width, caps.shape[0])
        elif not model.notional_dependent:
            bound = model if model.horizon is not None else model.with_horizon(horizon.bars)
            r = bound.margin_rates(bars)
            rows.append(("rate", np.array([np.inf]), np.ones(1), np.zeros(1), np.ones(1),
                         r.max_rate, r.mm_rate, r.im_rate))
        else:
            raise InvalidParameters(
                f"{model.family}: a notional-dependent, time-varying model (the liquidity "
                "add-on) is not supported by the account engine yet", field="model")
    caps_m = np.full((k, width), np.inf)
    slope = np.zeros((k, width))
    offset = np.zeros((k, width))
    im_slope = np.zeros((k, width))
    mm_scale = np.ones((k, n))
    im_scale = np.ones((k, n))
    cap_rate = np.zeros(k)
    first = 0
    for i, (_, caps, mmr, deduction, im, cap, mm_series, im_series) in enumerate(rows):
        b = caps.shape[0]
        caps_m[i, : b - 1] = caps[:-1]
        slope[i, :b] = mmr
        slope[i, b:] = mmr[-1]
        offset[i, :b] = deduction
        offset[i, b:] = deduction[-1]
        im_slope[i, :b] = im
        im_slope[i, b:] = im[-1]
        cap_rate[i] = cap
        if mm_series is not None:
            mm_scale[i] = mm_series
            im_scale[i] = im_series
            valid = np.flatnonzero(~np.isnan(mm_series))
            first = max(first, int(valid[0]) if valid.size else n)
    unders = market.underlyings()
    assets = sorted(set(unders))
    return _Schedules(
        mm=MarketArrays(
            low=market.matrix("low"), high=market.matrix("high"), close=market.matrix("close"),
            mm_scale=mm_scale, caps=caps_m, mm_slope=slope, mm_offset=offset,
            cap_rate=cap_rate, inst_asset=np.array([assets.index(u) for u in unders],
                                                   dtype=np.int64)),
        im_scale=im_scale, im_slope=im_slope, first_valid_bar=first)


@dataclass(frozen=True)
class AccountResult:
    """Every account's outcome and its isolated twins'.

    Attributes:
        accounts: the accounts replayed (opened ones only), in order.
        skipped: ids of accounts not opened (entry before the data or inside the models'
            warm-up, or no bar after the entry), with the reason.
        entry_bar: each account's entry bar, shape ``(A,)``.
        trigger_bar: bar of the account's liquidation trigger, -1 if none, ``(A,)``.
        closeout_equity_usd: equity after the close-out (NaN if not liquidated), ``(A,)``.
        bad_debt_usd: ``max(0, -closeout_equity_usd)``, ``(A,)``.
        fee_usd: liquidation fee paid to the fund, ``(A,)``.
        positions: ``(account index, instrument index, entry notional USD)`` per position,
            shape ``(P, 3)`` as three arrays.
        twin_trigger_bar, twin_bad_debt_usd: each position's isolated twin, ``(P,)``.
        leg_liquidated: with mechanics on, whether the engine closed any of the position's
            units (a policy may leave legs open), ``(P,)``; empty otherwise (every leg of a
            liquidated account is closed).
        leg_closed_usd, twin_closed_usd: with mechanics on, the position's units closed ×
            fill price (USD), under the account and as its twin, ``(P,)``; empty otherwise.
        steps: with mechanics on, the close-out steps of each account, ``(A,)``.
        queued_bar, wait_bars: with mechanics on, the first bar each account asked for a
            close-out step (-1: never) and the bars it waited in the queue before its first
            step, ``(A,)`` (twins: ``twin_queued_bar``, ``twin_wait_bars``, ``(P,)``).
        backlog, started, started_usd: with mechanics on, per bar ``(n,)``: accounts left
            waiting after the bar's service, steps started, and their notional at the bar's
            marks (USD); ``twin_backlog`` the twins' queue.
        policy: the liquidation policy of the run.
        leg_pnl_usd: each position's PnL at its account's close-out prices (0 if the
            account was not liquidated), ``(P,)``.
        mode: the mode the headline figures are for (``cross``, ``portfolio`` or
            ``isolated``; ``mixed`` when accounts have modes of their own, then
            ``account_mode`` says each account's).
        account_mode: with ``mode="mixed"``, each account's mode, ``(A,)``; empty
            otherwise (every account in ``mode``).
        timestamp_ms: the market's bar times.
        instruments: the market's instruments.
        insurance_fund_usd: the fund's start level, USD.
        backstop_taken, backstop_pnl_usd: with mechanics on, whether the backstop vault took
            each account over and the vault's PnL on it (its close-out equity), USD, ``(A,)``
            (twins: ``twin_backstop_taken``, ``twin_backstop_pnl_usd``, ``(P,)``).
        keeper_declined, keeper_bonus_usd: with mechanics on, the bars keepers declined each
            account's step and the bonus it paid them, USD, ``(A,)``.
        adl: with ``AccountConfig.adl``, the auto-deleveraging ledger of the headline
            population (accounts; isolated: the twins, ``AdlFill.account`` a position index).
    """

    accounts: tuple[Account, ...]
    skipped: dict[str, str]
    entry_bar: IntArray
    trigger_bar: IntArray
    closeout_equity_usd: FloatArray
    bad_debt_usd: FloatArray
    fee_usd: FloatArray
    position_account: IntArray
    position_instrument: IntArray
    position_notional_usd: FloatArray
    twin_trigger_bar: IntArray
    twin_bad_debt_usd: FloatArray
    twin_fee_usd: FloatArray
    leg_pnl_usd: FloatArray
    mode: str
    timestamp_ms: IntArray
    instruments: tuple[str, ...]
    insurance_fund_usd: float
    closeout_bar: IntArray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    twin_closeout_bar: IntArray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    leg_liquidated: NDArray[np.bool_] = field(
        default_factory=lambda: np.zeros(0, dtype=np.bool_))
    leg_closed_usd: FloatArray = field(default_factory=lambda: np.zeros(0))
    twin_closed_usd: FloatArray = field(default_factory=lambda: np.zeros(0))
    steps: IntArray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    policy: str = "close_all"
    queued_bar: IntArray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    wait_bars: IntArray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    backlog: IntArray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    started: IntArray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    started_usd: FloatArray = field(default_factory=lambda: np.zeros(0))
    twin_queued_bar: IntArray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    twin_wait_bars: IntArray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    twin_backlog: IntArray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    account_mode: tuple[str, ...] = ()
    adl: AdlLedger | None = None
    backstop_taken: NDArray[np.bool_] = field(
        default_factory=lambda: np.zeros(0, dtype=np.bool_))
    backstop_pnl_usd: FloatArray = field(default_factory=lambda: np.zeros(0))
    twin_backstop_taken: NDArray[np.bool_] = field(
        default_factory=lambda: np.zeros(0, dtype=np.bool_))
    twin_backstop_pnl_usd: FloatArray = field(default_factory=lambda: np.zeros(0))
    keeper_declined: IntArray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    keeper_bonus_usd: FloatArray = field(default_factory=lambda: np.zeros(0))

    def modes(self) -> tuple[str, ...]:
        """Each account's margin mode, ``(A,)``."""
        return self.account_mode or (self.mode,) * len(self.accounts)

    def backstop_path(self) -> list[tuple[int, float]]:
        """The backstop vault's cumulative PnL under the headline mode: ``(bar, PnL so far)``
        at every close-out bar of an account it took over, USD (empty without takeovers)."""
        if self.mode == "isolated":
            taken, pnl, bars = (self.twin_backstop_taken, self.twin_backstop_pnl_usd,
                                self.twin_closeout_bar)
        else:
            taken, pnl, bars = self.backstop_taken, self.backstop_pnl_usd, self.closeout_bar
        if taken.size == 0:
            return []
        moves: dict[int, float] = {}
        for b, v in zip(bars[taken], pnl[taken], strict=True):
            moves[int(b)] = moves.get(int(b), 0.0) + float(v)
        total = 0.0
        out = []
        for b in sorted(moves):
            total += moves[b]
            out.append((b, total))
        return out

    def healthy_legs(self) -> NDArray[np.bool_]:
        """Per position: closed with its liquidated account, while its twin never triggered or
        triggered strictly later, shape ``(P,)``."""
        acc_trig = self.trigger_bar[self.position_account]
        twin = self.twin_trigger_bar
        closed = acc_trig >= 0 if self.leg_liquidated.size == 0 else self.leg_liquidated
        return closed & ((twin < 0) | (twin > acc_trig))

    def summary(self, start_ms: int | None = None, end_ms: int | None = None
                ) -> dict[str, Any]:
        """The ``accounts`` figures over accounts whose entry bar lies in ``[start, end)``
        (all when both are None): counts, bad debt under the headline mode and the other,
        and contagion. With accounts of mixed modes, the sum of ``summary_by_mode`` (every
        figure is a count or a sum over accounts, each under its own mode)."""
        if self.account_mode:
            parts = list(self.summary_by_mode(start_ms, end_ms).values())
            return {key: sum(p[key] for p in parts) for key in parts[0]}
        return self._summary(self._entered(start_ms, end_ms), self.mode != "isolated")

    def summary_by_mode(self, start_ms: int | None = None, end_ms: int | None = None
                        ) -> dict[str, dict[str, Any]]:
        """``summary`` per margin mode of the accounts (each mode present in the run)."""
        keep = self._entered(start_ms, end_ms)
        modes = np.array(self.modes(), dtype=object)
        return {m: self._summary(keep & (modes == m), m != "isolated")
                for m in MARGIN_MODES if (modes == m).any()}

    def _entered(self, start_ms: int | None, end_ms: int | None) -> NDArray[np.bool_]:
        ts = self.timestamp_ms[self.entry_bar] if self.entry_bar.size else self.entry_bar
        keep = np.ones(self.entry_bar.shape[0], dtype=bool)
        if start_ms is not None:
            keep &= ts >= start_ms
        if end_ms is not None:
            keep &= ts < end_ms
        return keep

    def _summary(self, keep: NDArray[np.bool_], headline_cross: bool) -> dict[str, Any]:
        pos_keep = keep[self.position_account] if keep.size else keep
        liquidated = keep & (self.trigger_bar >= 0)
        healthy = self.healthy_legs() & pos_keep
        twin_hit = np.zeros(keep.shape[0], dtype=bool)
        np.logical_or.at(twin_hit, self.position_account, self.twin_trigger_bar >= 0)
        saved = keep & (self.trigger_bar < 0) & twin_hit
        hedge_break = float(np.maximum(0.0, -self.leg_pnl_usd[healthy]).sum())
        cross_bad = float(self.bad_debt_usd[keep].sum())
        isolated_bad = float(self.twin_bad_debt_usd[pos_keep].sum())
        twin_liquidated = int((self.twin_trigger_bar[pos_keep] >= 0).sum())
        legs_closed = (self.trigger_bar[self.position_account] >= 0
                       if self.leg_liquidated.size == 0 else self.leg_liquidated)
        positions_in_liquidated = int((pos_keep & legs_closed).sum())
        return {
            "accounts": int(keep.sum()),
            "positions": int(pos_keep.sum()),
            "notional_opened_usd": float(np.abs(self.position_notional_usd[pos_keep]).sum()),
            "liquidated_accounts": int(liquidated.sum()) if headline_cross
            else int(twin_hit[keep].sum()),
            "liquidated_positions": positions_in_liquidated if headline_cross
            else twin_liquidated,
            "bad_debt_usd": cross_bad if headline_cross else isolated_bad,
            "bad_debt_cross_usd": cross_bad,
            "bad_debt_isolated_usd": isolated_bad,
            "healthy_leg_liquidations": int(healthy.sum()),
            "hedge_break_loss_usd": hedge_break,
            "saved_by_cross": int(saved.sum()),
        }

    def fund_path(self) -> list[tuple[int, float]]:
        """The venue's one fund under the headline mode: ``(bar, level after that bar's
        close-outs)`` for every bar with a close-out, from ``insurance_fund_usd`` (with ADL,
        the shortfall the counterparties absorbed is not the fund's)."""
        if self.adl is not None:
            return list(self.adl.fund_path)
        pooled = np.array([m != "isolated" for m in self.modes()], dtype=bool)
        moves: dict[int, float] = {}
        for bars, bad, fee, hit in (
                (self.closeout_bar, self.bad_debt_usd, self.fee_usd,
                 (self.trigger_bar >= 0) & pooled),
                (self.twin_closeout_bar, self.twin_bad_debt_usd, self.twin_fee_usd,
                 (self.twin_trigger_bar >= 0) & ~pooled[self.position_account])):
            for b, d, f in zip(bars[hit], bad[hit], fee[hit], strict=True):
                moves[int(b)] = moves.get(int(b), 0.0) + float(f) - float(d)
        level = float(self.insurance_fund_usd)
        out = []
        for b in sorted(moves):
            level += moves[b]
            out.append((b, level))
        return out


def _models_for(market: Market, model: MarginModel | Mapping[str, MarginModel]
                ) -> list[MarginModel]:
    if isinstance(model, MarginModel):
        return [model] * len(market.instruments)
    missing = [i for i in market.instruments if i not in model]
    if missing:
        raise InvalidParameters(f"no margin model for {missing[0]!r}", field="model")
    return [model[i] for i in market.instruments]


def simulate_accounts(
    market: Market,
    model: MarginModel | Mapping[str, MarginModel],
    accounts: Sequence[Account],
    config: AccountConfig | None = None,
    *,
    portfolio: PortfolioMarginModel | None = None,
    mechanics_kernel: bool = False,
    fast_start: bool = True,
    workers: int = 1,
) -> AccountResult:
    """Replay ``accounts`` through ``market`` (see the module docstring).

    Args:
        market: the aligned instruments.
        model: one margin model for every instrument, or one per instrument name (the
            requirement in cross and isolated mode; the isolated twins' in every mode).
        accounts: the accounts (explicit or from ``generate_population``), or an
            ``AccountBook`` of them (their arrays built once, e.g. before a fork).
        config: mode, holding, latency, fees and the fund.
        portfolio: the portfolio margin model of ``mode="portfolio"`` (required there, and
            only there).
        mechanics_kernel: run the mechanics kernel even with the core settings (the same
            figures, as the tests prove; it also reports each leg's closed notional).
        fast_start: without a cascade or funding, let the core kernel find each account's
            first trigger and the mechanics walk start there (the same figures, as the tests
            prove; False walks every account from its entry).
        workers: threads replaying the accounts and their twins (``_split``: contiguous
            blocks of rows on a pool, into one result): the same figures bit for bit as 1.
            With the mechanics only the core kernel's first-trigger search splits (the
            mechanics walk couples accounts through the queue and the cascade); the cross
            and twin walks then run on two threads at once.

    Raises:
        InvalidParameters: an account names an instrument or asset the market lacks, or a
            setting is out of range.
        InsufficientData: no account could open.
    """
    config = config or AccountConfig()
    config.validate()
    check_workers(workers)
    # The accounts as arrays (built here unless given so, ``AccountBook``).
    arrays = AccountBook.from_accounts(accounts, market.instruments)
    modes = {m or config.mode for m in arrays.modes()}
    if modes != {config.mode}:
        # Accounts of their own mode: each mode's accounts replayed as a run of that mode.
        from calibration.accounts._modes import simulate_mixed

        return simulate_mixed(market, model, accounts, config, portfolio=portfolio,
                              mechanics_kernel=mechanics_kernel, fast_start=fast_start,
                              workers=workers)
    if (config.mode == "portfolio") != (portfolio is not None):
        raise InvalidParameters(
            "mode portfolio needs a portfolio margin model, and only it takes one",
            field="portfolio_model")
    models = _models_for(market, model)
    sched = _schedules(market, models)
    scenarios = portfolio.scenarios(market) if portfolio is not None else None
    first_valid = max(sched.first_valid_bar,
                      int(scenarios.first_valid) if scenarios is not None else 0)
    names = market.instruments
    unders = market.underlyings()
    assets_sorted = sorted(set(unders))
    ts = market.timestamp_ms
    n, k = len(market), len(names)
    close = sched.mm.close
    collateral_assets = list(arrays.collateral_assets)
    col_inst = np.array([market.pricing_instrument(a) for a in collateral_assets],
                        dtype=np.int64)
    col_asset = np.array([assets_sorted.index(underlying_of(names[i])) for i in col_inst],
                         dtype=np.int64)
    entry_ms = arrays.entry_ms
    n_acc = len(arrays)
    # Each entry's bar is searchsorted(ts, entry_ms, "right") - 1, monotone in entry_ms: when
    # the earliest and the latest entries open, every account does, and each block finds its
    # own accounts' bars (inside the threads); else the late ones are skipped here, serially.
    e_first, e_last = ((int(np.searchsorted(ts, entry_ms.min(), side="right")) - 1,
                        int(np.searchsorted(ts, entry_ms.max(), side="right")) - 1)
                       if n_acc else (-1, -1))
    skipped: dict[str, str] = {}
    if n_acc and e_first >= max(first_valid, 0) and e_last + 1 < n:
        opened = arrays.accounts
        entry = np.empty(n_acc, dtype=np.int64)
        notional = arrays.notional_usd
        usd = np.ascontiguousarray(arrays.usd)
        col_units = np.ascontiguousarray(arrays.col_units)
        search = True
    else:
        e_all = np.searchsorted(ts, entry_ms, side="right") - 1
        late = (e_all < 0) | (e_all < first_valid) | (e_all + 1 >= n)
        keep = ~late
        for out in (int(v) for v in np.flatnonzero(late)):
            e = int(e_all[out])
            skipped[arrays.accounts[out].id] = (
                "entry before the data" if e < 0 else "no bar after the entry"
                if e + 1 >= n else "entry inside the margin models' warm-up")
        opened = (arrays.accounts if not late.any() else
                  tuple(a for a, ok in zip(arrays.accounts, keep, strict=True) if ok))
        if not opened:
            raise InsufficientData("no account could open: " + "; ".join(
                sorted({v for v in skipped.values()})))
        entry = e_all[keep].astype(np.int64)
        notional = arrays.notional_usd[keep]
        usd = arrays.usd[keep]
        col_units = arrays.col_units[keep]
        search = False
    n_acc = len(opened)
    rules = _collateral_rules(collateral_assets, config)
    mech = (_mechanics(market, config, scenarios) if config.mechanics or mechanics_kernel
            else None)
    n_assets = len(assets_sorted)
    spread, fee_rate = float(config.spread_rate), float(config.liquidation_fee_rate)
    # Dense (A, k) units at the entry closes, filled block by block (``prepare``).
    units = np.empty((n_acc, k))
    book = BookArrays(entry=entry, units=units, usd=usd, col_units=col_units,
                      col_inst=col_inst, col_asset=col_asset)

    def prepare(lo: int, hi: int) -> FloatArray:
        """Rows lo..hi of ``entry`` (when searched here) and ``units``; their entry closes."""
        if search:
            entry[lo:hi] = np.searchsorted(ts, entry_ms[lo:hi], side="right") - 1
        entry_close: FloatArray = close[:, entry[lo:hi]].T  # (rows, k)
        np.divide(notional[lo:hi], entry_close, out=units[lo:hi])
        return entry_close

    with RowRunner(workers) as runner:
        if mech is None:
            # Everything per block of accounts, on the threads: their set-up, their replay,
            # their positions and twins (after a barrier: the twins' rows follow the counts of
            # positions of the blocks before), the twins' replay and the figures of both.
            trig, eq, legs, fee = empty_outputs(n_acc, k)
            bad = np.empty(n_acc)
            closeout_bar = np.empty(n_acc, dtype=np.int64)
            blocks = runner.blocks(n_acc)
            positions: list[_Positions] = []

            def account_block(b: int) -> None:
                lo, hi = blocks[b]
                entry_close = prepare(lo, hi)
                rows = book_rows(book, lo, hi)
                if scenarios is not None:
                    replay_portfolio(sched.mm, rows, rules, scenarios, n_assets,
                                     config.holding_bars, config.latency_bars, spread,
                                     fee_rate, trig[lo:hi], eq[lo:hi], legs[lo:hi], fee[lo:hi])
                else:
                    replay(sched.mm, rows, rules, n_assets, config.holding_bars,
                           config.latency_bars, spread, fee_rate, trig[lo:hi], eq[lo:hi],
                           legs[lo:hi], fee[lo:hi])
                t = trig[lo:hi]
                bad[lo:hi] = np.where(t >= 0, np.maximum(0.0, -eq[lo:hi]), 0.0)
                closeout_bar[lo:hi] = np.minimum(t + config.latency_bars, n - 1)
                positions[b] = _positions(sched, units[lo:hi], entry_close, entry[lo:hi], lo)

            positions.extend(_NO_POSITIONS for _ in blocks)
            runner.each(len(blocks), account_block)
            runner.wait()
            starts = np.cumsum([0, *(p.account.shape[0] for p in positions)]).tolist()
            n_pos = starts[-1]
            pa = np.empty(n_pos, dtype=np.int64)
            pi = np.empty(n_pos, dtype=np.int64)
            p_notional, leg_pnl, t_bad, t_fee = (np.empty(n_pos) for _ in range(4))
            t_trig = np.empty(n_pos, dtype=np.int64)
            t_closeout_bar = np.empty(n_pos, dtype=np.int64)

            def twin_block(b: int) -> None:
                p, lo, hi = positions[b], starts[b], starts[b + 1]
                pa[lo:hi] = p.account
                pi[lo:hi] = p.inst
                p_notional[lo:hi] = p.notional
                leg_pnl[lo:hi] = legs[pa[lo:hi], p.inst]
                twins = _twin_book(book, pa[lo:hi], p.inst, p.share)
                t_eq, t_legs = np.empty(hi - lo), np.empty((hi - lo, k))
                replay(sched.mm, twins, rules, n_assets, config.holding_bars,
                       config.latency_bars, spread, fee_rate, t_trig[lo:hi], t_eq, t_legs,
                       t_fee[lo:hi])
                t = t_trig[lo:hi]
                t_bad[lo:hi] = np.where(t >= 0, np.maximum(0.0, -t_eq), 0.0)
                t_closeout_bar[lo:hi] = np.minimum(t + config.latency_bars, n - 1)

            runner.each(len(blocks), twin_block)
            runner.wait()
        else:
            prepare(0, n_acc)
            # The accounts and the twins are separate populations (each its own queue and
            # cascade): two walks, on two threads when there are.
            mech_accounts = runner.call(_run_mech, sched.mm, book, rules, mech, n_assets,
                                        config, fast_start)
            p = _positions(sched, units, close[:, entry].T, entry, 0)
            pa, pi, p_notional = p.account, p.inst, p.notional
            twins = _twin_book(book, pa, pi, p.share)
            # The twins keep the per-instrument models in every mode.
            mech_twins = runner.call(_run_mech, sched.mm, twins, rules,
                                     mech._replace(portfolio=False), n_assets, config,
                                     fast_start)
            mout, t_out = mech_accounts(), mech_twins()
    extra: dict[str, Any] = {}
    if mech is not None:
        if config.adl:
            # ADL feeds back: the headline population is walked again with the ledger's
            # fills until the fills reproduce themselves (``_adl_fixed_point``).
            if config.mode == "isolated":
                t_out, extra["adl"] = _adl_fixed_point(sched.mm, twins, rules,
                                                       mech._replace(portfolio=False),
                                                       n_assets, config, fast_start, t_out)
            else:
                mout, extra["adl"] = _adl_fixed_point(sched.mm, book, rules, mech, n_assets,
                                                      config, fast_start, mout)
        trig, eq, legs, fee = mout.trigger, mout.closeout_equity, mout.leg_pnl, mout.fee
        t_trig, t_fee = t_out.trigger, t_out.fee
        bad = mout.bad_debt
        t_bad = t_out.bad_debt
        closeout_bar, t_closeout_bar = mout.closeout_bar, t_out.closeout_bar
        leg_pnl = legs[pa, pi]
        extra |= {"leg_liquidated": mout.leg_closed_usd[pa, pi] > 0,
                  "leg_closed_usd": mout.leg_closed_usd[pa, pi],
                  "twin_closed_usd": t_out.leg_closed_usd[np.arange(pa.shape[0]), pi],
                  "steps": mout.steps, "queued_bar": mout.queued_bar,
                  "wait_bars": mout.wait_bars, "backlog": mout.backlog,
                  "started": mout.started, "started_usd": mout.started_usd,
                  "twin_queued_bar": t_out.queued_bar, "twin_wait_bars": t_out.wait_bars,
                  "twin_backlog": t_out.backlog,
                  "backstop_taken": mout.backstop == 1, "backstop_pnl_usd": mout.backstop_pnl,
                  "twin_backstop_taken": t_out.backstop == 1,
                  "twin_backstop_pnl_usd": t_out.backstop_pnl,
                  "keeper_declined": mout.keeper_declined, "keeper_bonus_usd": mout.keeper_bonus}
    return AccountResult(
        accounts=tuple(opened), skipped=skipped, entry_bar=book.entry, trigger_bar=trig,
        closeout_equity_usd=eq, bad_debt_usd=bad, fee_usd=fee, position_account=pa,
        position_instrument=pi, position_notional_usd=p_notional,
        twin_trigger_bar=t_trig, twin_bad_debt_usd=t_bad, twin_fee_usd=t_fee,
        leg_pnl_usd=leg_pnl, mode=config.mode, timestamp_ms=ts, instruments=names,
        insurance_fund_usd=float(config.insurance_fund_usd),
        closeout_bar=closeout_bar, twin_closeout_bar=t_closeout_bar, policy=config.policy,
        **extra,
    )


class _Positions(NamedTuple):
    """The positions of a block of accounts, in (account, instrument) order: ``account``
    the account's row in the book, ``inst`` the instrument, ``notional`` the signed entry
    notional (USD) and ``share`` the account's collateral share of its isolated twin (the
    position's entry IM over the account's)."""

    account: IntArray
    inst: IntArray
    notional: FloatArray
    share: FloatArray


_NO_POSITIONS = _Positions(np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64),
                           np.zeros(0), np.zeros(0))


def _positions(sched: _Schedules, units: FloatArray, entry_close: FloatArray,
               entry: IntArray, lo: int) -> _Positions:
    """The positions of the accounts ``lo ..`` whose rows ``units``, ``entry_close`` and
    ``entry`` are (a block, or every account with ``lo = 0``); each account's figures are its
    own, so a block's are those of the whole book, bit for bit."""
    row, inst = (v.astype(np.int64) for v in np.nonzero(units))
    q, c = units[row, inst], entry_close[row, inst]
    gross = np.abs(q) * c
    im = _entry_im(sched, inst, gross, entry[row])
    # Isolated twins: one position each, the account's collateral shared pro rata to IM.
    im_total = np.zeros(units.shape[0])
    np.add.at(im_total, row, im)
    total = im_total[row]
    share = np.where(total > 0, im / np.where(total > 0, total, 1.0), 0.0)
    return _Positions(row + lo if lo else row, inst, q * c, share)


def _twin_book(book: BookArrays, pa: IntArray, pi: IntArray, share: FloatArray) -> BookArrays:
    """The isolated twins of the positions ``(pa, pi)`` of ``book`` (account, instrument)."""
    n_pos = pa.shape[0]
    twin_units = np.zeros((n_pos, book.units.shape[1]))
    twin_units[np.arange(n_pos), pi] = book.units[pa, pi]
    return BookArrays(entry=book.entry[pa], units=twin_units, usd=book.usd[pa] * share,
                      col_units=book.col_units[pa] * share[:, None], col_inst=book.col_inst,
                      col_asset=book.col_asset)


def _entry_im(sched: _Schedules, inst: IntArray, gross: FloatArray,
              entry: IntArray) -> FloatArray:
    """Each position's IM at entry, USD, ``(P,)``: instrument ``inst`` at entry notional
    ``gross`` (USD) opened at bar ``entry``. The bracket is ``searchsorted(caps, gross,
    "right")`` (the caps at or below the notional, ``caps`` sorted and padded with inf),
    counted for every position at once."""
    caps = sched.mm.caps[inst]  # (P, B)
    bracket = (caps <= gross[:, None]).sum(axis=1)
    rate = sched.im_scale[inst, entry] * sched.im_slope[inst, bracket]
    im: FloatArray = np.minimum(rate, 1.0) * gross
    return im


def _adl_ledger(mm: MarketArrays, pop: BookArrays, out: MechOutputs,
                config: AccountConfig) -> AdlLedger:
    """The ADL ledger of one walk of ``pop``."""
    return auto_deleverage(
        close=mm.close, entry_bar=pop.entry, units=pop.units, usd=pop.usd,
        col_units=pop.col_units, col_inst=pop.col_inst, holding_bars=config.holding_bars,
        trigger_bar=out.trigger, closeout_bar=out.closeout_bar, bad_debt_usd=out.bad_debt,
        fee_usd=out.fee, leg_pnl_usd=out.leg_pnl, leg_closed_usd=out.leg_closed_usd,
        insurance_fund_usd=float(config.insurance_fund_usd))


def _adl_fixed_point(mm: MarketArrays, pop: BookArrays, rules: CollateralRules,
                     mech: Mechanics, n_assets: int, config: AccountConfig, fast_start: bool,
                     out: MechOutputs) -> tuple[MechOutputs, AdlLedger]:
    """The walk of ``pop`` with its ADL fills fed back, and their ledger.

    The ledger's fills at bar b depend on the walk up to b (close-outs, trigger bars) and on
    its own fills before b; the walk up to b depends on the fills before b only (a fill
    applies from the next bar). So from the walk without fills (``out``), walking again with
    the last ledger's fills makes at least one more ADL bar right each time: the fills repeat
    after at most one walk per ADL bar (plus the one that confirms them). Without ADL fills
    there is no second walk: the figures are those without feedback bit for bit."""
    ledger = _adl_ledger(mm, pop, out, config)
    applied = no_reductions()
    for _ in range(mm.close.shape[1] + 2):
        red = _reductions(ledger)
        if _same_reductions(red, applied):
            return out, ledger
        out = _run_mech(mm, pop, rules, mech, n_assets, config, fast_start, red)
        applied = red
        ledger = _adl_ledger(mm, pop, out, config)
    raise RuntimeError("ADL feedback did not reach a fixed point")  # pragma: no cover


def _reductions(ledger: AdlLedger) -> Reductions:
    """The ledger's fills as the walk's ``Reductions`` (already in bar order)."""
    f = ledger.fills
    return Reductions(bar=np.array([x.bar for x in f], dtype=np.int64),
                      account=np.array([x.account for x in f], dtype=np.int64),
                      instrument=np.array([x.instrument for x in f], dtype=np.int64),
                      units=np.array([x.units for x in f], dtype=np.float64),
                      price=np.array([x.price_usd for x in f], dtype=np.float64))


def _same_reductions(a: Reductions, b: Reductions) -> bool:
    """Whether two sets of fills are the same, bit for bit."""
    return all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def _run_mech(mm: MarketArrays, book: BookArrays, rules: CollateralRules, mech: Mechanics,
              n_assets: int, config: AccountConfig, fast_start: bool,
              red: Reductions | None = None) -> MechOutputs:
    """The mechanics walk over ``book``. Without a cascade (accounts meet only in the queue)
    or funding (the core's trigger test is then the mechanics'), and with ``fast_start``, the
    core kernel finds each account's first trigger, and only the accounts that trigger are
    walked, from that bar, in (entry, index) order (close in memory, the queue's tie order).

    ``red``: ADL fills fed back (``Reductions``, account indices of ``book``); an account with
    one joins the fast walk by the bar after its first fill at the latest."""
    n_acc, k = book.units.shape
    n = mm.close.shape[1]
    red = red if red is not None else no_reductions()
    oracle = config.oracle_heartbeat_bars is not None or config.oracle_deviation_rate > 0
    if not fast_start or config.cascade or config.funding or mech.portfolio or oracle:
        out = empty_mech_outputs(n_acc, k, n)
        replay_mech(mm, book, rules, mech, n_assets, config.holding_bars, config.latency_bars,
                    out, np.zeros(0, dtype=np.int64), red)
        return out
    trig, eq, legs, fee = empty_outputs(n_acc, k)
    replay(mm, book, rules, n_assets, config.holding_bars, config.latency_bars, 0.0, 0.0,
           trig, eq, legs, fee)
    if red.bar.shape[0]:
        # Until its first ADL fill an account's path is the core's; from the bar after, it
        # must be walked (its position changed).
        first_red = np.full(n_acc, n + 1, dtype=np.int64)
        np.minimum.at(first_red, red.account, red.bar + 1)
        hit = first_red <= n
        trig = np.where(hit, np.where(trig >= 0, np.minimum(trig, first_red), first_red),
                        trig)
    sel = np.flatnonzero(trig >= 0)
    sel = sel[np.argsort(book.entry[sel], kind="stable")]
    if red.bar.shape[0]:
        where = np.full(n_acc, -1, dtype=np.int64)
        where[sel] = np.arange(sel.shape[0])
        red = red._replace(account=where[red.account])
    sub = BookArrays(entry=book.entry[sel], units=book.units[sel], usd=book.usd[sel],
                     col_units=book.col_units[sel], col_inst=book.col_inst,
                     col_asset=book.col_asset)
    sub_out = empty_mech_outputs(sel.shape[0], k, n)
    if _LEAN_QUEUE and _queue_only(mech, red):
        replay_queue(mm, sub, rules, mech, n_assets, config.holding_bars, config.latency_bars,
                     sub_out, trig[sel])
    else:
        replay_mech(mm, sub, rules, mech, n_assets, config.holding_bars, config.latency_bars,
                    sub_out, trig[sel], red)
    out = empty_mech_outputs(n_acc, k, n)
    for name, value in sub_out._asdict().items():
        if name in ("backlog", "started", "started_usd"):
            getattr(out, name)[:] = value
        else:
            getattr(out, name)[sel] = value
    return out


#: Whether ``_run_mech`` may walk with ``replay_queue`` where it applies (a test turns it
#: off to compare it with the general walk).
_LEAN_QUEUE = True


def _queue_only(mech: Mechanics, red: Reductions) -> bool:
    """Whether the fast walk needs none of the mechanics but the queue (``_kernel_queue``):
    ``close_all``, no market impact, no funding, backstop, keepers or ADL fills fed back
    (the fast walk already excludes a cascade, the oracle and the portfolio requirement)."""
    return bool(mech.policy == POLICIES.index("close_all") and mech.impact_coef <= 0.0
                and mech.backstop_threshold <= 0.0 and mech.keeper_bonus_rate < 0.0
                and not mech.cascade and not mech.oracle and not mech.portfolio
                and red.bar.shape[0] == 0 and not mech.funding_cum.any())


def _mechanics(market: Market, config: AccountConfig,
               scenarios: ScenarioArrays | None = None) -> Mechanics:
    """The per-instrument funding and depth series the mechanics kernel reads, and the
    portfolio requirement's scenarios in portfolio mode."""
    k, n = len(market.instruments), len(market)
    funding = np.zeros((k, n))
    bid = np.zeros((k, n))
    ask = np.zeros((k, n))
    needs_depth = config.impact_coef > 0 or (config.cascade and config.cascade_kappa > 0)
    for i, bars in enumerate(market.bars):
        if config.funding and bars.funding_rate is not None:
            funding[i] = np.cumsum(np.asarray(bars.funding_rate, dtype=np.float64)
                                   * bars.close)
        from_volume = volume_depth_usd(bars, config.depth_fraction_of_adv,
                                       config.adv_window_bars)
        if bars.bid_depth_usd is not None and bars.ask_depth_usd is not None:
            # Bars without a fresh snapshot (NaN: before the first, or stale) read the
            # volume-based depth, as domain.md §1 says consumers do.
            book_bid = np.asarray(bars.bid_depth_usd, dtype=np.float64)
            book_ask = np.asarray(bars.ask_depth_usd, dtype=np.float64)
            gaps = np.isnan(book_bid) | np.isnan(book_ask)
            if gaps.any() and from_volume is None and needs_depth:
                raise DataError(f"{bars.instrument!r}: {int(gaps.sum())} bars have no fresh "
                                "order-book snapshot and the bars have no volume to fall back "
                                "on; cut the range to the depth file's span")
            fill = from_volume if from_volume is not None else np.zeros(n)
            bid[i] = np.where(np.isnan(book_bid), fill, book_bid)
            ask[i] = np.where(np.isnan(book_ask), fill, book_ask)
            continue
        if from_volume is None:
            if needs_depth:
                raise DataError(f"market impact and cascades need order-book depth or volume; "
                                f"{bars.instrument!r} has neither (set impact_coef=0 and "
                                "cascade=false)")
            continue
        bid[i] = from_volume
        ask[i] = from_volume
    steps = math.ceil(1.0 / float(config.partial_fraction) - 1e-9)
    return Mechanics(
        funding_cum=funding, bid_depth=bid, ask_depth=ask,
        spread_rate=float(config.spread_rate), impact_coef=float(config.impact_coef),
        impact_exponent=float(config.impact_exponent),
        fee_rate=float(config.liquidation_fee_rate), cascade=bool(config.cascade),
        cascade_kappa=float(config.cascade_kappa), policy=POLICIES.index(config.policy),
        partial_fraction=float(config.partial_fraction), partial_steps=max(1, steps),
        cooldown_bars=int(config.cooldown_bars),
        max_accounts_per_bar=_accounts_per_bar(config, market.bar_seconds),
        max_notional_per_bar=(np.inf if config.max_liquidation_notional_per_bar is None
                              else float(config.max_liquidation_notional_per_bar)),
        queue_order=QUEUE_ORDERS.index(config.queue_order),
        portfolio=scenarios is not None,
        scenarios=scenarios if scenarios is not None else no_scenarios(),
        backstop_threshold=(0.0 if config.backstop_threshold is None
                            else float(config.backstop_threshold)),
        partial_min_notional_usd=float(config.partial_min_notional_usd),
        partial_full_ratio=(-np.inf if config.partial_full_ratio is None
                            else float(config.partial_full_ratio)),
        partial_min_leftover_usd=float(config.partial_min_leftover_usd),
        blocks_per_bar=max(1, int(market.bar_seconds // config.block_seconds)),
        keeper_bonus_rate=(-1.0 if config.keeper_bonus_rate is None
                           else float(config.keeper_bonus_rate)),
        keeper_gas_usd=_gas_series(market, config),
        keeper_latency_bars=int(config.keeper_latency_bars),
        oracle=config.oracle_heartbeat_bars is not None or config.oracle_deviation_rate > 0,
        oracle_price=_oracle_prices(market.matrix("close"), config))


def _gas_series(market: Market, config: AccountConfig) -> FloatArray:
    """A keeper's gas cost of one liquidation per bar, USD, shape ``(n,)``."""
    gas = np.full(len(market), float(config.keeper_gas_usd))
    if config.gas_window is not None:
        w = StressWindow.parse(config.gas_window)
        ts = market.timestamp_ms
        gas[(ts >= w.start_ms) & (ts < w.end_ms)] *= float(config.gas_multiplier)
    return gas


def _oracle_prices(close: FloatArray, config: AccountConfig) -> FloatArray:
    """The price the margin check reads at each bar, ``(k, n)``: the close published at the
    oracle's last update strictly before the bar (heartbeat or deviation; module "Mechanics").
    Bar 0 reads its own close (nothing was published before)."""
    heartbeat = config.oracle_heartbeat_bars
    dev = float(config.oracle_deviation_rate)
    if heartbeat is None and dev <= 0:
        return np.zeros((0, 0))
    k, n = close.shape
    out = np.empty((k, n))
    for i in range(k):
        last = close[i, 0]
        last_t = 0
        out[i, 0] = last
        for t in range(1, n):
            out[i, t] = last
            c = close[i, t]
            if ((heartbeat is not None and t - last_t >= heartbeat)
                    or (dev > 0 and abs(c / last - 1.0) >= dev)):
                last, last_t = c, t
    return out


def _accounts_per_bar(config: AccountConfig, bar_seconds: int) -> int:
    """The engine's step starts per bar (-1: no limit): ``max_liquidations_per_bar`` and
    ``max_liquidations_per_block`` × the blocks in a bar, the tighter."""
    caps = []
    if config.max_liquidations_per_bar is not None:
        caps.append(int(config.max_liquidations_per_bar))
    if config.max_liquidations_per_block is not None:
        blocks = max(1, int(bar_seconds // config.block_seconds))
        caps.append(int(config.max_liquidations_per_block) * blocks)
    return min(caps) if caps else -1


def _collateral_rules(assets: Sequence[str], config: AccountConfig) -> CollateralRules:
    """The kernel's haircut bands for each non-stable collateral asset (full value where the
    config names no schedule)."""
    schedules = [config.haircuts.get(a.upper(), HaircutSchedule((), (1.0,))) for a in assets]
    width = max([1, *(len(s.ratios) for s in schedules)])
    m = len(assets)
    caps = np.full((m, width), np.inf)
    slope = np.ones((m, width))
    offset = np.zeros((m, width))
    for c, schedule in enumerate(schedules):
        cap, sl, off = schedule.bands()
        b = cap.shape[0]
        caps[c, : b - 1] = cap[:-1]
        slope[c, :b] = sl
        slope[c, b:] = sl[-1]
        offset[c, :b] = off
        offset[c, b:] = off[-1]
    return CollateralRules(hc_caps=caps, hc_slope=slope, hc_offset=offset,
                           upnl_weight=float(config.upnl_weight))


def windows_summary(result: AccountResult, windows: Sequence[StressWindow]
                    ) -> list[dict[str, Any]]:
    """``summary`` overall (``window="all"``), then per stress window that the data meets
    (accounts counted in the window where they open, as positions are in §4)."""
    out = [{"window": "all", **result.summary()}]
    ts = result.timestamp_ms
    for w in windows:
        if w.start_ms <= int(ts[-1]) and w.end_ms > int(ts[0]):
            out.append({"window": w.name, "start_ms": w.start_ms, "end_ms": w.end_ms,
                        **result.summary(w.start_ms, w.end_ms)})
    return out
