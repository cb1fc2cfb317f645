"""``/v1/listings``: initial tiers for a new instrument from proxies (domain.md §6)."""

from __future__ import annotations

from typing import Annotated, Any

import anyio
import msgspec
from litestar import Controller, Request, post
from litestar.openapi.spec import Example
from litestar.params import Body

from calibration.calibrate import load_data_ref
from calibration.listing import ListingConfig, recommend_listing
from calibration.spec import MAX_HORIZON_BARS, MAX_INSTRUMENTS, DataRefSpec, Instrument, Short
from service.auth import requires
from service.backtests import load_within
from service.errors import COMMON, problem_responses
from service.limits import check_refs
from service.settings import Settings

_M = msgspec.Meta

EXAMPLE = Example(
    summary="LUNA as a new listing with a week of own history, BTC and ETH as proxies",
    value={
        "instrument": "LUNAUSDT",
        "own": {"instrument": "LUNAUSDT", "ref": "uploads/LUNAUSDT-30m.csv",
                "end": "2022-05-07"},
        "proxies": [{"instrument": "BTCUSDT", "ref": "uploads/BTCUSDT-30m.csv",
                     "end": "2022-05-07"},
                    {"instrument": "ETHUSDT", "ref": "uploads/ETHUSDT-30m.csv",
                     "end": "2022-05-07"}],
        "horizon_bars": 4, "confidence": 0.99,
        "bracket_caps_usd": [50000, 250000, 1000000], "tier_growth": 2.0, "im_to_mm": 2.0,
    },
)


class ListingRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The new instrument's (short) history, its proxies and the target tier structure."""

    instrument: Instrument
    proxies: Annotated[list[DataRefSpec], _M(
        min_length=1, max_length=MAX_INSTRUMENTS,
        description="instruments whose returns stand in for the new one's")]
    own: Annotated[DataRefSpec, _M(
        description="the new instrument's own (short) history; null: none")] | None = None
    horizon_bars: Annotated[int, _M(
        ge=1, le=MAX_HORIZON_BARS, description="close-out horizon (bars)")] | None = None
    horizon: Annotated[Short, _M(
        description="close-out horizon as a duration (`1h`, `2d`)")] | None = None
    confidence: Annotated[float, _M(
        gt=0, lt=1, description="expected-shortfall confidence (probability)")] = 0.99
    novelty_buffer: Annotated[float, _M(
        ge=0, le=10, description="extra margin for no own history (fraction of the margin)")] = (
        0.5)
    novelty_halflife_days: Annotated[float, _M(
        gt=0, le=3650, description="half-life of the novelty buffer in own history (days)")] = (
        30.0)
    tier_growth: Annotated[float, _M(
        ge=1, le=100, description="margin growth per notional bracket (ratio)")] = 2.0
    bracket_caps_usd: Annotated[list[Annotated[float, _M(gt=0, le=1e15)]], _M(
        min_length=1, max_length=64,
        description="upper notional of each bracket (USD); null: the default")] | None = None
    im_to_mm: Annotated[float, _M(ge=1, le=100, description="IM / MM (ratio)")] = 2.0
    floor_rate: Annotated[float, _M(
        ge=0, lt=1, description="smallest MM rate (fraction of notional)")] = 0.005


def _recommend(body: ListingRequest, settings: Settings) -> dict[str, Any]:
    root = settings.data_root
    refs = [(f"proxies[{i}]", p) for i, p in enumerate(body.proxies)]
    check_refs([*refs, *([("own", body.own)] if body.own is not None else [])], root,
               per_file=settings.max_file_rows)
    own = load_data_ref(body.own, root, "own") if body.own is not None else None
    budget = settings.max_sync_bars - (len(own) if own is not None else 0)
    proxies = load_within(body.proxies, root, budget, "proxies")
    fields: dict[str, Any] = {
        "horizon_bars": body.horizon_bars, "horizon": body.horizon,
        "confidence": body.confidence,
        "novelty_buffer": body.novelty_buffer,
        "novelty_halflife_days": body.novelty_halflife_days, "tier_growth": body.tier_growth,
        "im_to_mm": body.im_to_mm, "floor_rate": body.floor_rate,
    }
    if body.bracket_caps_usd is not None:
        fields["bracket_caps_usd"] = tuple(body.bracket_caps_usd)
    result = recommend_listing(body.instrument, own, proxies, ListingConfig(**fields))
    out = result.as_dict()
    out["data_fingerprints"] = {b.instrument: b.fingerprint
                                for b in [*proxies, *([own] if own is not None else [])]}
    return out


class ListingController(Controller):
    """Parameters for instruments that have little or no history yet."""

    path = "/v1/listings"
    tags = ["listings"]

    @post("/", guards=[requires("operator")], status_code=200,
          summary="Initial tiers (IM/MM by notional bracket, max leverage) for a new listing",
          description="Proxies' returns rescaled by the own/proxy volatility ratio over their "
                      "overlap, the most conservative ES taken, times a novelty buffer that "
                      "decays with own history. Works with no own history (proxies only).",
          responses=problem_responses(*COMMON, 400, 422))
    async def create(
        self, request: Request[Any, Any, Any],
        data: Annotated[ListingRequest, Body(examples=[EXAMPLE])],
    ) -> dict[str, Any]:
        result: dict[str, Any] = await anyio.to_thread.run_sync(
            _recommend, data, request.app.state.settings)
        return result
