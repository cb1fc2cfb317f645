"""One contract for every margin-model family (domain.md §2, style.md §5–7), then the maths.

The contract suite is parametrized over ``CASES``: a new family proves itself by adding a case
and passing the same tests. Family-specific tests follow: tier continuity and the Binance 2021
table for ``tiered``, and the engine's EWMA and FHS rates against the plain references in
``reference_models``.
"""

from __future__ import annotations

import inspect
import itertools
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from calibration import BarSeries, InsufficientData, InvalidParameters, MarginlabError
from calibration.data import bars_from_frame, with_depth
from calibration.models import (
    BINANCE_BTCUSDT_2021_CAPS_USD,
    BINANCE_BTCUSDT_2021_MMR,
    FAMILIES,
    EwmaMargin,
    FhsMargin,
    LiquidityAddon,
    MarginModel,
    TieredMargin,
    make_model,
)
from calibration.models._liquidity import ADDON_PARAMS
from tests import reference_models as ref

N_BARS = 80
BAR_MS = 60_000
T0_MS = 1_600_000_000_000

FAST = settings(max_examples=30, deadline=None)

# ---------------------------------------------------------------------------------------------
# Bars


def walk_frame(
    seed: int, n: int = N_BARS, vol: float = 0.01, price0: float = 100.0
) -> pd.DataFrame:
    """A random-walk OHLCV frame of ``n`` one-minute bars, OHLC consistent, volume > 0."""
    rng = np.random.default_rng(seed)
    returns = rng.normal(0.0, vol, n)
    close = price0 * np.exp(np.cumsum(returns))
    open_ = np.r_[price0, close[:-1]]
    wick_up, wick_down = np.abs(rng.normal(0.0, vol / 2, (2, n)))
    return pd.DataFrame(
        {
            "timestamp_ms": T0_MS + BAR_MS * np.arange(n, dtype=np.int64),
            "open": open_,
            "high": np.maximum(open_, close) * np.exp(wick_up),
            "low": np.minimum(open_, close) * np.exp(-wick_down),
            "close": close,
            "volume": rng.uniform(1.0, 100.0, n),
        }
    )


def to_bars(frame: pd.DataFrame) -> BarSeries:
    """Validated bars from a frame (the public path every caller takes)."""
    return bars_from_frame(frame, instrument="TEST")


def perturb_after(
    frame: pd.DataFrame, t: int, seed: int, vol: float, prices: bool, volume: bool
) -> pd.DataFrame:
    """``frame`` with every bar after ``t`` redrawn (prices, volume or both), OHLC consistent."""
    out = frame.copy()
    tail = slice(t + 1, len(frame))
    m = len(frame) - t - 1
    rng = np.random.default_rng(seed)
    if prices:
        close = frame["close"].iloc[t] * np.exp(np.cumsum(rng.normal(0.0, vol, m)))
        open_ = np.r_[frame["close"].iloc[t], close[:-1]]
        up, down = np.abs(rng.normal(0.0, vol, (2, m)))
        out.loc[out.index[tail], "open"] = open_
        out.loc[out.index[tail], "close"] = close
        out.loc[out.index[tail], "high"] = np.maximum(open_, close) * np.exp(up)
        out.loc[out.index[tail], "low"] = np.minimum(open_, close) * np.exp(-down)
    if volume:
        out.loc[out.index[tail], "volume"] = rng.uniform(0.0, 1e6, m)
    return out


# ---------------------------------------------------------------------------------------------
# The families under contract

#: Public hyperparameter names of domain.md §2, per family.
PUBLIC_NAMES: dict[str, tuple[str, ...]] = {
    "tiered": ("base_mmr", "tier_growth", "bracket_caps_usd", "im_to_mm"),
    "ewma": ("decay", "confidence", "horizon_bars", "floor_rate", "apc_buffer", "warmup_bars"),
    "fhs": ("window_bars", "confidence", "decay", "horizon_bars", "stress_weight", "floor_rate"),
    "liquidity": ("addon_coef", "addon_exponent"),
}

EWMA_PARAMS = {
    "decay": 0.94, "confidence": 0.99, "horizon_bars": 3, "floor_rate": 0.001,
    "apc_buffer": 0.25, "warmup_bars": 10,
}


@dataclass(frozen=True)
class Case:
    """One model family with small (fast) parameters and the values it must refuse."""

    id: str
    family: str
    params: Mapping[str, Any]
    invalid: tuple[tuple[str, Any], ...]
    addon: Mapping[str, Any] = field(default_factory=dict)
    #: Whether the rate depends on prices only through returns (scale invariant as it is).
    vol_based: bool = True

    def model(self, **overrides: Any) -> MarginModel:
        """The validated model, through the public factory."""
        return make_model(self.family, {**self.params, **self.addon, **overrides})

    def construct(self, **kwargs: Any) -> MarginModel:
        """The model built directly from its classes, without any validation."""
        base = FAMILIES[self.family](**{k: v for k, v in kwargs.items() if k not in ADDON_PARAMS})
        if not self.addon:
            return base
        return LiquidityAddon(base=base, **{k: v for k, v in kwargs.items() if k in ADDON_PARAMS})

    def classes(self) -> list[type[MarginModel]]:
        """The model classes this case exercises."""
        return [FAMILIES[self.family], *([LiquidityAddon] if self.addon else [])]

    def public_names(self) -> list[tuple[type[MarginModel], str]]:
        """(class, public name) pairs that domain.md §2 promises."""
        pairs = [(FAMILIES[self.family], name) for name in PUBLIC_NAMES[self.family]]
        if self.addon:
            pairs += [(LiquidityAddon, name) for name in PUBLIC_NAMES["liquidity"]]
        return pairs


CASES = [
    Case(
        id="tiered",
        family="tiered",
        params={"base_mmr": 0.004, "tier_growth": 2.0, "im_to_mm": 2.0,
                "bracket_caps_usd": (50_000.0, 250_000.0, 1_000_000.0)},
        invalid=(
            ("base_mmr", 0.0), ("base_mmr", 1.5), ("base_mmr", "0.01"), ("base_mmr", math.nan),
            ("tier_growth", 0.5), ("im_to_mm", 0.9), ("im_to_mm", None),
            ("bracket_caps_usd", (250_000.0, 50_000.0)), ("bracket_caps_usd", 5),
            ("bracket_caps_usd", "50000"), ("mmr_schedule", (0.01,)),
            ("mmr_schedule", (0.02, 0.01, 0.03, 0.04)), ("mmr_schedule", 0.01),
        ),
        vol_based=False,
    ),
    Case(
        id="ewma",
        family="ewma",
        params=EWMA_PARAMS,
        invalid=(
            ("decay", 1.0), ("decay", 0.0), ("decay", "0.9"), ("decay", math.nan),
            ("confidence", 0.5), ("confidence", 1.0), ("horizon_bars", 0),
            ("horizon_bars", 2.5), ("horizon_bars", True), ("floor_rate", -0.01),
            ("floor_rate", 1.0), ("apc_buffer", -0.1), ("warmup_bars", 1),
            ("warmup_bars", math.inf), ("warmup_bars", 10**400), ("im_to_mm", 0.5),
        ),
    ),
    Case(
        id="fhs",
        family="fhs",
        params={"window_bars": 20, "confidence": 0.95, "decay": 0.94, "horizon_bars": 3,
                "stress_weight": 0.25, "floor_rate": 0.001, "warmup_bars": 10},
        invalid=(
            ("window_bars", 5), ("window_bars", 20.5), ("confidence", 1.0), ("decay", 0.0),
            ("horizon_bars", 0), ("stress_weight", 1.5), ("stress_weight", -0.1),
            ("floor_rate", 1.0), ("warmup_bars", 1), ("measure", "cvar"), ("im_to_mm", 0),
        ),
    ),
    Case(
        id="ewma+liquidity",
        family="ewma",
        params=EWMA_PARAMS,
        addon={"addon_coef": 0.05, "addon_exponent": 0.5, "adv_window_bars": 5},
        invalid=(
            ("addon_coef", -0.1), ("addon_coef", "0.1"), ("addon_exponent", 0.0),
            ("addon_exponent", 3.5), ("adv_window_bars", 0), ("adv_window_bars", 1.5),
            ("decay", 1.5),
        ),
    ),
]
CASE_IDS = [c.id for c in CASES]
INVALID = [
    pytest.param(case, name, value, id=f"{case.id}-{name}={value!r}")
    for case in CASES for name, value in case.invalid
]


def same(a: np.ndarray, b: np.ndarray) -> bool:
    """Bit-for-bit equal, NaN equal to NaN."""
    return a.shape == b.shape and bool(np.array_equal(a, b, equal_nan=True))


# ---------------------------------------------------------------------------------------------
# (a) no look-ahead


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@FAST
@given(
    seed=st.integers(0, 2**32 - 1),
    t=st.integers(0, N_BARS - 2),
    pert_seed=st.integers(0, 2**32 - 1),
    vol=st.floats(0.0005, 0.2),
    what=st.sampled_from(["prices", "volume", "both"]),
    notional=st.sampled_from([10_000.0, 400_000.0, 5e6]),
)
def test_no_look_ahead(
    case: Case, seed: int, t: int, pert_seed: int, vol: float, what: str, notional: float
) -> None:
    """Changing any bars after t (prices or volume) leaves MM and IM at bars <= t unchanged."""
    frame = walk_frame(seed)
    changed = perturb_after(frame, t, pert_seed, vol, what != "volume", what != "prices")
    model = case.model()
    before = model.margin_rates(to_bars(frame), notional_usd=notional)
    after = model.margin_rates(to_bars(changed), notional_usd=notional)
    assert same(before.mm_rate[: t + 1], after.mm_rate[: t + 1])
    assert same(before.im_rate[: t + 1], after.im_rate[: t + 1])


# ---------------------------------------------------------------------------------------------
# (b) rates are non-negative, NaN only during warm-up


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@FAST
@given(
    seed=st.integers(0, 2**32 - 1),
    vol=st.floats(0.0005, 0.1),
    notional=st.floats(1.0, 1e9),
)
def test_rates_nonnegative_and_nan_only_in_warmup(
    case: Case, seed: int, vol: float, notional: float
) -> None:
    """Rates are NaN exactly before first_valid_bar, then finite, >= 0, with IM >= MM."""
    model = case.model()
    rates = model.margin_rates(to_bars(walk_frame(seed, vol=vol)), notional_usd=notional)
    first = rates.first_valid_bar
    assert first == model.first_valid_bar()
    for rate in (rates.mm_rate, rates.im_rate):
        assert rate.shape == (N_BARS,)
        assert np.isnan(rate[:first]).all()
        assert np.isfinite(rate[first:]).all()
        assert (rate[first:] >= 0).all()
    assert (rates.im_rate[first:] >= rates.mm_rate[first:]).all()


@pytest.mark.parametrize("case", [c for c in CASES if c.family != "tiered"], ids=lambda c: c.id)
def test_too_short_series_raises_insufficient_data(case: Case) -> None:
    """A series that ends before the warm-up does raises InsufficientData, not NaN rates."""
    model = case.model()
    short = to_bars(walk_frame(1, n=model.first_valid_bar()))
    with pytest.raises(InsufficientData):
        model.margin_rates(short)


# ---------------------------------------------------------------------------------------------
# (c) __init__ only stores; get_params; validation


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_init_only_stores_absurd_values(case: Case) -> None:
    """Construction with absurd values does not raise, and get_params returns them as passed."""
    absurd: dict[str, Any] = {name: f"absurd-{name}" for cls in case.classes()
                              for name in cls.param_names() if name != "base"}
    model = case.construct(**absurd)
    params = model.get_params()
    for name, value in absurd.items():
        assert params[name] is value


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_get_params_returns_what_was_passed(case: Case) -> None:
    """get_params returns every passed value unchanged and round-trips through make_model."""
    model = case.model()
    params = model.get_params()
    for name, value in {**case.params, **case.addon}.items():
        assert params[name] is value
    if not case.addon:
        assert list(params) == type(model).param_names()
    assert make_model(case.family, params).get_params() == params


@pytest.mark.parametrize(("case", "name", "value"), INVALID)
def test_invalid_value_names_the_field(case: Case, name: str, value: Any) -> None:
    """An out-of-range or non-numeric value raises InvalidParameters naming that parameter."""
    model = case.construct(**{**case.params, **case.addon, name: value})
    bars = to_bars(walk_frame(0))
    with pytest.raises(InvalidParameters) as from_validate:
        model.validate()
    with pytest.raises(InvalidParameters) as from_rates:
        model.margin_rates(bars)
    with pytest.raises(InvalidParameters) as from_factory:
        case.model(**{name: value})
    for info in (from_validate, from_rates, from_factory):
        assert info.value.field is not None
        assert info.value.field.split("[")[0] == name


# ---------------------------------------------------------------------------------------------
# (d) keyword-only hyperparameters with the public names


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_hyperparameters_are_keyword_only(case: Case) -> None:
    """Every hyperparameter of every class in the case is keyword-only; positional calls fail."""
    for cls in case.classes():
        params = list(inspect.signature(cls.__init__).parameters.values())[1:]
        assert params
        assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in params)
    with pytest.raises(TypeError):
        FAMILIES[case.family](0.5)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_public_parameter_names_exist(case: Case) -> None:
    """The public names of domain.md §2 are hyperparameters of the family (and the add-on)."""
    for cls, name in case.public_names():
        assert name in cls.param_names()


# ---------------------------------------------------------------------------------------------
# (e) docstrings state units


def documented_args(cls: type) -> dict[str, str]:
    """The ``Args:`` entries of a class docstring, name → description."""
    doc = inspect.getdoc(cls) or ""
    assert "Args:" in doc, f"{cls.__name__} documents no Args"
    entries: dict[str, str] = {}
    current = None
    for line in doc.split("Args:", 1)[1].splitlines()[1:]:
        match = re.match(r"^    (\w+): ?(.*)$", line)
        if match:
            current = match[1]
            entries[current] = match[2]
        elif current is not None and line.startswith("        "):
            entries[current] += " " + line.strip()
        else:
            break
    return entries


def expected_unit(name: str) -> str | None:
    """The unit a hyperparameter's name says it carries."""
    if name.endswith("_bars"):
        return "bars"
    if name.endswith("_usd"):
        return "USD"
    if name.endswith(("_rate", "mmr", "_schedule", "_coef", "_buffer")):
        return "fraction"
    return None


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_docstrings_state_units(case: Case) -> None:
    """Each hyperparameter is documented, and rates say 'fraction', lengths 'bars', caps 'USD'."""
    for cls in case.classes():
        args = documented_args(cls)
        assert "fraction" in (inspect.getdoc(cls) or "")
        for name in cls.param_names():
            assert name in args, f"{cls.__name__}.{name} is not documented"
            unit = expected_unit(name)
            if unit is not None:
                assert unit in args[name], f"{cls.__name__}.{name}: no unit {unit!r}"


# ---------------------------------------------------------------------------------------------
# (f) scale invariance


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@FAST
@given(seed=st.integers(0, 2**32 - 1), scale=st.floats(1e-3, 1e4))
def test_rates_are_scale_invariant(case: Case, seed: int, scale: float) -> None:
    """Multiplying every price by a constant (same USD volume) leaves the rates unchanged."""
    frame = walk_frame(seed)
    scaled = frame.copy()
    for name in ("open", "high", "low", "close"):
        scaled[name] = frame[name] * scale
    scaled["volume"] = frame["volume"] / scale  # the same traded notional in USD
    model = case.model()
    before = model.margin_rates(to_bars(frame))
    after = model.margin_rates(to_bars(scaled))
    for a, b in ((before.mm_rate, after.mm_rate), (before.im_rate, after.im_rate)):
        if case.vol_based:
            np.testing.assert_allclose(b, a, rtol=1e-9, atol=0.0)
        else:
            assert same(a, b)


# ---------------------------------------------------------------------------------------------
# tiered: continuity, the piecewise reference, Binance 2021

caps_strategy = st.lists(
    st.floats(1e3, 1e9), min_size=1, max_size=8, unique=True
).map(sorted).filter(lambda caps: all(b > a * (1 + 1e-6) for a, b in itertools.pairwise(caps)))


@FAST
@given(
    caps=caps_strategy,
    base_mmr=st.floats(1e-4, 0.1),
    tier_growth=st.floats(1.0, 3.0),
    im_to_mm=st.floats(1.0, 5.0),
)
def test_tiered_mm_continuous_at_every_cap(
    caps: list[float], base_mmr: float, tier_growth: float, im_to_mm: float
) -> None:
    """MM(N) in USD has no jump at any bracket cap (deductions make the tiers continuous)."""
    model = TieredMargin(base_mmr=base_mmr, tier_growth=tier_growth, bracket_caps_usd=caps,
                         im_to_mm=im_to_mm)
    model.validate()
    for cap in caps:
        below = model.maintenance_usd(cap)
        above = model.maintenance_usd(float(np.nextafter(cap, np.inf)))
        assert above == pytest.approx(below, rel=1e-9)
        assert above >= below - 1e-9 * cap


@FAST
@given(
    caps=caps_strategy,
    base_mmr=st.floats(1e-4, 0.1),
    tier_growth=st.floats(1.0, 3.0),
    im_to_mm=st.floats(1.0, 5.0),
    notional=st.floats(1.0, 2e9),
)
def test_tiered_rates_match_piecewise_reference(
    caps: list[float], base_mmr: float, tier_growth: float, im_to_mm: float, notional: float
) -> None:
    """N·mmr_k − deduction_k equals the sum of bracket slices times MMR; IM = mmr_k·im_to_mm."""
    model = TieredMargin(base_mmr=base_mmr, tier_growth=tier_growth, bracket_caps_usd=caps,
                         im_to_mm=im_to_mm)
    mmrs = ref.tier_mmrs(len(caps) + 1, base_mmr=base_mmr, tier_growth=tier_growth,
                         im_to_mm=im_to_mm)
    expected_mm = ref.tiered_maintenance_usd(notional, caps, mmrs)
    assert model.maintenance_usd(notional) == pytest.approx(expected_mm, rel=1e-9, abs=1e-9)
    rates = model.margin_rates(to_bars(walk_frame(0, n=5)), notional_usd=notional)
    np.testing.assert_allclose(rates.mm_rate, expected_mm / notional, rtol=1e-9)
    k = ref.tier_index(notional, caps)
    np.testing.assert_allclose(rates.im_rate, mmrs[k] * im_to_mm, rtol=1e-12)


#: Binance's published "maintenance amount" (USD) for the 2021 BTCUSDT brackets.
BINANCE_2021_MAINTENANCE_AMOUNTS_USD = (
    0, 50, 1_300, 16_300, 266_300, 1_266_300, 2_516_300, 5_016_300, 25_016_300, 100_016_300,
)


def binance_2021() -> TieredMargin:
    """The 2021 Binance BTCUSDT table."""
    model = TieredMargin(mmr_schedule=BINANCE_BTCUSDT_2021_MMR,
                         bracket_caps_usd=BINANCE_BTCUSDT_2021_CAPS_USD)
    model.validate()
    return model


def test_binance_btcusdt_2021_maintenance_amounts() -> None:
    """The 2021 BTCUSDT table reproduces Binance's published maintenance amounts."""
    _, mmr, deduction = binance_2021().brackets()
    np.testing.assert_allclose(mmr[:10], BINANCE_BTCUSDT_2021_MMR, rtol=0, atol=0)
    np.testing.assert_allclose(deduction[:10], BINANCE_2021_MAINTENANCE_AMOUNTS_USD,
                               rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    ("notional", "mm_usd", "im_rate"),
    [
        (10_000.0, 40.0, 0.008),
        (49_999.0, 199.996, 0.008),
        (50_000.0, 200.0, 0.010),  # [floor, cap): a cap opens the next bracket
        (100_000.0, 450.0, 0.010),
        (1_000_000.0, 8_700.0, 0.050),
        (5_000_000.0, 108_700.0, 0.050),
        (400_000_000.0, 99_983_700.0, 1.0),
    ],
)
def test_binance_btcusdt_2021_examples(notional: float, mm_usd: float, im_rate: float) -> None:
    """Hand-computed Binance 2021 MM (N·MMR − amount) and IM rates at sample notionals."""
    model = binance_2021()
    assert model.maintenance_usd(notional) == pytest.approx(mm_usd, rel=1e-12)
    caps = list(BINANCE_BTCUSDT_2021_CAPS_USD)
    reference = ref.tiered_maintenance_usd(
        notional, caps, ref.tier_mmrs(len(caps) + 1, base_mmr=0, tier_growth=1, im_to_mm=2,
                                      mmr_schedule=BINANCE_BTCUSDT_2021_MMR))
    assert reference == pytest.approx(mm_usd, rel=1e-12)
    rates = model.margin_rates(to_bars(walk_frame(0, n=3)), notional_usd=notional)
    np.testing.assert_allclose(rates.mm_rate, mm_usd / notional, rtol=1e-12)
    np.testing.assert_allclose(rates.im_rate, im_rate, rtol=1e-12)


# Binance USD-M BTCUSDT brackets 2021 as published (domain.md §2): floor USD, MMR %, IMR %.
# Typed in from the table, not derived from the library's constants.
BINANCE_2021_TABLE = [
    (0, 0.40, 0.80), (50_000, 0.50, 1.00), (250_000, 1.00, 2.00), (1_000_000, 2.50, 5.00),
    (10_000_000, 5.0, 10.0), (20_000_000, 10.0, 20.0), (50_000_000, 12.5, 25.0),
    (100_000_000, 15.0, 33.3), (200_000_000, 25.0, 50.0), (300_000_000, 50.0, 100.0),
]


def binance_2021_with_imr() -> TieredMargin:
    return TieredMargin(mmr_schedule=[m / 100 for _, m, _ in BINANCE_2021_TABLE],
                        imr_schedule=[i / 100 for _, _, i in BINANCE_2021_TABLE],
                        bracket_caps_usd=[f for f, _, _ in BINANCE_2021_TABLE[1:]] + [5e8])


@pytest.mark.parametrize("k", range(len(BINANCE_2021_TABLE)))
def test_binance_2021_table_bracket_by_bracket(k: int) -> None:
    """Each published bracket's MMR and IMR (33.3% included) at its floor, inside, and just
    below its cap; the maintenance amount keeps MM continuous at every boundary."""
    model = binance_2021_with_imr()
    floor, mmr_pct, imr_pct = BINANCE_2021_TABLE[k]
    cap = BINANCE_2021_TABLE[k + 1][0] if k + 1 < len(BINANCE_2021_TABLE) else 5e8
    bars = to_bars(walk_frame(0, n=3))
    for notional in (max(floor, 1.0), (floor + cap) / 2, cap - 1.0):
        rates = model.margin_rates(bars, notional_usd=notional)
        assert model.bracket_of(notional) == k
        assert float(rates.im_rate[0]) == pytest.approx(imr_pct / 100, rel=1e-12)
        # MM(N) = N·mmr_k − amount_k with amount_k from the floors below (hand recursion).
        amount = sum(BINANCE_2021_TABLE[j][0] * (BINANCE_2021_TABLE[j][1]
                                                 - BINANCE_2021_TABLE[j - 1][1]) / 100
                     for j in range(1, k + 1))
        assert model.maintenance_usd(notional) == pytest.approx(
            notional * mmr_pct / 100 - amount, rel=1e-12)
    if k > 0:  # a floor belongs to its own bracket, the notional just below to the one before
        assert model.bracket_of(floor) == k
        assert model.bracket_of(floor - 0.01) == k - 1
        assert model.maintenance_usd(floor) == pytest.approx(
            model.maintenance_usd(floor - 1e-6), rel=1e-9)


def test_binance_2021_33_3_percent_not_from_im_to_mm() -> None:
    """100M–200M is 15% / 33.3%: no single im_to_mm gives it with its neighbours."""
    model = binance_2021_with_imr()
    rates = model.margin_rates(to_bars(walk_frame(0, n=3)), notional_usd=150e6)
    assert float(rates.im_rate[0]) == pytest.approx(0.333)
    # mmr × im_to_mm with Binance's ratio of 2 gives 30% there, not the published 33.3%.
    ratio_only = TieredMargin(mmr_schedule=[m / 100 for _, m, _ in BINANCE_2021_TABLE],
                              bracket_caps_usd=[f for f, _, _ in BINANCE_2021_TABLE[1:]] + [5e8])
    ratio_rates = ratio_only.margin_rates(to_bars(walk_frame(0, n=3)), notional_usd=150e6)
    assert float(ratio_rates.im_rate[0]) == pytest.approx(0.30)


def test_imr_schedule_below_mmr_is_refused() -> None:
    """An IM rate below its bracket's MMR is refused with the entry named."""
    with pytest.raises(InvalidParameters) as info:
        TieredMargin(mmr_schedule=[0.01, 0.02], imr_schedule=[0.02, 0.015],
                     bracket_caps_usd=[1e6]).validate()
    assert info.value.field == "imr_schedule[1]"


# ---------------------------------------------------------------------------------------------
# ewma and fhs against the plain references

CONFIDENCES = st.sampled_from([0.9, 0.95, 0.975, 0.99, 0.995, 0.999])


@FAST
@given(
    seed=st.integers(0, 2**32 - 1),
    vol=st.floats(0.001, 0.05),
    decay=st.floats(0.5, 0.999),
    confidence=CONFIDENCES,
    horizon_bars=st.integers(1, 10),
    floor_rate=st.floats(0.0, 0.02),
    apc_buffer=st.floats(0.0, 1.0),
    warmup_bars=st.integers(2, 40),
)
def test_ewma_matches_reference(
    seed: int, vol: float, decay: float, confidence: float, horizon_bars: int,
    floor_rate: float, apc_buffer: float, warmup_bars: int,
) -> None:
    """EWMA variance and rate equal the plain-Python reference on random walks (rtol 1e-9)."""
    params = {"decay": decay, "confidence": confidence, "horizon_bars": horizon_bars,
              "floor_rate": floor_rate, "apc_buffer": apc_buffer, "warmup_bars": warmup_bars}
    frame = walk_frame(seed, n=120, vol=vol)
    bars = to_bars(frame)
    model = make_model("ewma", params)
    assert isinstance(model, EwmaMargin)
    close = frame["close"].tolist()
    np.testing.assert_allclose(
        model.variance(bars), ref.ewma_variance(close, decay, warmup_bars), rtol=1e-9, atol=0
    )
    rates = model.margin_rates(bars)
    expected = ref.ewma_rate(close, **params)
    np.testing.assert_allclose(rates.mm_rate, expected, rtol=1e-9, atol=0)
    # IM is im_to_mm x MM, but never above max_rate (100% of notional).
    mm = np.asarray(expected)
    im = np.minimum(2.0 * mm, np.maximum(mm, 1.0))
    np.testing.assert_allclose(rates.im_rate, im, rtol=1e-9, atol=0)
    capped = [v for v in ref.ewma_rate(close, **params, max_rate=math.inf) if v > 1.0]
    assert rates.capped_bars == len(capped)


@FAST
@given(
    seed=st.integers(0, 2**32 - 1),
    vol=st.floats(0.001, 0.05),
    window_bars=st.integers(10, 40),
    confidence=CONFIDENCES,
    decay=st.floats(0.5, 0.999),
    horizon_bars=st.integers(1, 5),
    stress_weight=st.floats(0.0, 1.0),
    floor_rate=st.floats(0.0, 0.02),
    warmup_bars=st.integers(2, 20),
    measure=st.sampled_from(["es", "var"]),
    max_rate=st.sampled_from([1.0, 0.5, 0.05]),
    stress_lookback_bars=st.sampled_from([None, 1, 3, 17]),
)
def test_fhs_matches_reference(
    seed: int, vol: float, window_bars: int, confidence: float, decay: float,
    horizon_bars: int, stress_weight: float, floor_rate: float, warmup_bars: int, measure: str,
    max_rate: float, stress_lookback_bars: int | None,
) -> None:
    """FHS rates (ES and VaR, bounded stress look-back, floor, cap) equal the plain-Python
    reference (rtol 1e-9)."""
    params = {"window_bars": window_bars, "confidence": confidence, "decay": decay,
              "horizon_bars": horizon_bars, "stress_weight": stress_weight,
              "floor_rate": floor_rate, "warmup_bars": warmup_bars, "measure": measure,
              "max_rate": max_rate, "stress_lookback_bars": stress_lookback_bars}
    frame = walk_frame(seed, n=100, vol=vol)
    model = make_model("fhs", params)
    assert isinstance(model, FhsMargin)
    assert model.tail_count() == ref.fhs_tail_count(window_bars, confidence)
    rates = model.margin_rates(to_bars(frame))
    expected = ref.fhs_rate(frame["close"].tolist(), **params)
    np.testing.assert_allclose(rates.mm_rate, expected, rtol=1e-9, atol=0)
    assert rates.first_valid_bar == warmup_bars + horizon_bars + window_bars - 1


def test_ewma_reference_values_by_hand() -> None:
    """The EWMA reference itself: seed = sample variance of r_1..r_W, then the recursion."""
    close = [100.0, 101.0, 99.0, 100.0, 102.0]
    r = [math.log(101 / 100), math.log(99 / 101), math.log(100 / 99), math.log(102 / 100)]
    seed = (r[0] ** 2 + r[1] ** 2 - (r[0] + r[1]) ** 2 / 2) / 1
    variance = ref.ewma_variance(close, 0.9, 2)
    assert math.isnan(variance[0])
    assert math.isnan(variance[1])
    assert variance[2] == pytest.approx(seed, rel=1e-12)
    assert variance[3] == pytest.approx(0.9 * seed + 0.1 * r[2] ** 2, rel=1e-12)
    z99 = 2.3263478740408408
    rate = ref.ewma_rate(close, decay=0.9, confidence=0.99, horizon_bars=4, floor_rate=0.0,
                         apc_buffer=0.25, warmup_bars=2)
    assert rate[2] == pytest.approx(z99 * math.sqrt(seed) * 2 * 1.25, rel=1e-12)


# ---------------------------------------------------------------------------------------------
# make_model errors


def test_make_model_unknown_family() -> None:
    """An unknown family raises InvalidParameters with field 'model'."""
    with pytest.raises(InvalidParameters) as info:
        make_model("garch", {})
    assert info.value.field == "model"


@pytest.mark.parametrize("family", ["tiered", "ewma", "fhs"])
def test_make_model_unknown_parameter(family: str) -> None:
    """An unknown parameter raises InvalidParameters whose field is that name."""
    with pytest.raises(InvalidParameters) as info:
        make_model(family, {"lambda_": 0.94})
    assert info.value.field == "lambda_"


def test_make_model_wraps_addon_parameters() -> None:
    """Add-on parameters with any family wrap the model in LiquidityAddon with those values."""
    model = make_model("fhs", {"window_bars": 20, "addon_coef": 0.05, "addon_exponent": 0.7})
    assert isinstance(model, LiquidityAddon)
    assert isinstance(model.base, FhsMargin)
    assert (model.addon_coef, model.addon_exponent, model.base.window_bars) == (0.05, 0.7, 20)


def test_errors_are_marginlab_value_errors() -> None:
    """InvalidParameters is both a MarginlabError and a ValueError."""
    with pytest.raises(InvalidParameters) as info:
        make_model("ewma", {"decay": 2})
    assert isinstance(info.value, MarginlabError)
    assert isinstance(info.value, ValueError)


def test_numpy_scalars_are_numbers() -> None:
    """numpy integers and floats (from a grid) are accepted as hyperparameter values."""
    model = make_model("ewma", {"horizon_bars": np.int64(3), "warmup_bars": np.int32(10),
                                "decay": np.float64(0.94)})
    rates = model.margin_rates(to_bars(walk_frame(0)))
    assert np.isfinite(rates.mm_rate[10:]).all()


# ---------------------------------------------------------------------------------------------
# liquidity add-on specifics


def test_addon_falls_back_to_volume_before_first_depth_snapshot() -> None:
    """Where no depth snapshot is known yet, the add-on uses the ADV, not a 100% margin."""
    frame = walk_frame(3)
    bars = to_bars(frame)
    first_snapshot = 40
    # One snapshot per bar from first_snapshot on (depth is carried only a few minutes).
    snapshots = bars.timestamp_ms[first_snapshot:]
    depth = pd.DataFrame({
        "timestamp_ms": snapshots, "bid_depth_usd": 2e6, "ask_depth_usd": 3e6,
    })
    deep = with_depth(bars, depth)
    model = make_model("ewma", {**EWMA_PARAMS, "addon_coef": 0.05, "adv_window_bars": 5})
    with_book = model.margin_rates(deep, notional_usd=50_000.0).mm_rate
    volume_only = model.margin_rates(bars, notional_usd=50_000.0).mm_rate
    assert same(with_book[:first_snapshot], volume_only[:first_snapshot])
    base = make_model("ewma", EWMA_PARAMS).margin_rates(bars).mm_rate
    np.testing.assert_allclose(with_book[first_snapshot:],
                               base[first_snapshot:] + 0.05 * (50_000.0 / 2e6) ** 0.5, rtol=1e-12)


def test_zero_addon_coef_with_no_volume_is_the_base_rate() -> None:
    """addon_coef = 0 adds nothing even where traded volume is zero (no 0·inf = NaN)."""
    frame = walk_frame(4)
    frame["volume"] = 0.0
    bars = to_bars(frame)
    model = make_model("ewma", {**EWMA_PARAMS, "addon_coef": 0.0})
    base = make_model("ewma", EWMA_PARAMS).margin_rates(bars)
    assert same(model.margin_rates(bars).mm_rate, base.mm_rate)


def test_fhs_flat_warmup_does_not_crash() -> None:
    """A warm-up with no price change (zero seed variance) does not crash FHS."""
    frame = walk_frame(5)
    for name in ("open", "high", "low", "close"):
        frame.loc[:20, name] = 100.0
    rates = make_model("fhs", {"window_bars": 20, "warmup_bars": 10, "horizon_bars": 3}
                       ).margin_rates(to_bars(frame))
    assert not np.isnan(rates.mm_rate[rates.first_valid_bar:]).any()
