"""Named liquidation configurations of real venues (domain.md §10: "presets name their
source and date"), as plain ``AccountConfig`` fields; every number cites ``venues.md`` (a
dated snapshot of public documentation; the key in brackets is its Sources list).

Where venues.md says nothing a field keeps the engine's default (documented per preset), and
the reductions to the engine's terms (equity / MM for a health factor, a per-block limit per
bar) are the engine's, not the venue's.
"""

from __future__ import annotations

from typing import Any

#: preset → (fields, source). ``"preset": NAME`` in the ``--liquidation`` JSON applies the
#: fields; keys given explicitly next to it override them.
VENUE_PRESETS: dict[str, tuple[dict[str, Any], str]] = {
    "hyperliquid": (
        {"policy": "partial", "partial_fraction": 0.2, "partial_min_notional_usd": 100_000.0,
         "cooldown_bars": 1, "backstop_threshold": 2.0 / 3.0, "adl": True},
        "venues.md §2 HL1 (equity < 2/3 MM: the backstop vault takes the positions and the "
        "margin), HL2 [3P] (above 100,000 USDC: 20% first, then a 30 s cooldown; 30 s is "
        "below one bar of the shipped data: 1 bar), §5 HL5 (ADL ranks opposite-side winners by "
        "unrealised PnL and leverage); snapshot of 2025 documentation"),
    "dydx_v4": (
        {"max_liquidations_per_block": 50, "block_seconds": 1.0,
         "liquidation_fee_rate": 0.005, "queue_order": "most_undercollateralised",
         "adl": True},
        "venues.md §4 DY3 (50 liquidation attempts per block, x/clob/flags/flags.go), §2 DY1 "
        "(most underwater first; an unfilled IOC goes to deleveraging), DY4 (max liquidation "
        "fee 5,000 ppm to the insurance fund); v4-chain protocol/ sources. block_seconds 1.0 "
        "is the engine's assumption (venues.md gives no block time)"),
    "aave_v3": (
        {"policy": "partial", "partial_fraction": 0.5, "partial_full_ratio": 0.95,
         "partial_min_notional_usd": 2_000.0, "partial_min_leftover_usd": 1_000.0,
         "adl": False},
        "venues.md §3 AV1 (close factor 50%, 100% at HF <= 0.95 or if reserve collateral/debt "
        "< $2,000, LiquidationLogic.sol), AV2 (leftover >= $1,000 unless a side hits 0; "
        "residual debt becomes a reserve deficit: no ADL; Aave v3.3 features). The engine's "
        "equity / MM stands for the health factor and the close factor applies to entry "
        "units"),
    "binance": (
        {"policy": "close_all", "adl": True},
        "venues.md §2 BN3 (Portfolio Margin: 100-105% uniMMR liquidation, <= 100% claim for "
        "loss) and §4 BN5 (forceOrder tapes undercount). venues.md gives no partial-liquidation "
        "fraction, liquidation fee or ADL ranking for Binance: the preset closes whole and uses "
        "the engine's ADL ranking (PnL rate × leverage)"),
}


def preset_fields(name: Any) -> dict[str, Any]:
    """The fields of preset ``name`` (a copy); ``ValueError`` naming the known ones."""
    if not isinstance(name, str) or name not in VENUE_PRESETS:
        raise ValueError(f"unknown preset {name!r} (known: {', '.join(sorted(VENUE_PRESETS))})")
    return dict(VENUE_PRESETS[name][0])
