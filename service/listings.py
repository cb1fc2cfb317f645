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
from calibration.spec import DataRefSpec
from service.auth import requires
from service.errors import COMMON, problem_responses
from service.settings import Settings

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

    instrument: str
    proxies: list[DataRefSpec]
    own: DataRefSpec | None = None
    horizon_bars: int | None = None
    horizon: str | None = None
    confidence: float = 0.99
    novelty_buffer: float = 0.5
    novelty_halflife_days: float = 30.0
    tier_growth: float = 2.0
    bracket_caps_usd: list[float] | None = None
    im_to_mm: float = 2.0
    floor_rate: float = 0.005


def _recommend(body: ListingRequest, settings: Settings) -> dict[str, Any]:
    root = settings.data_root
    own = load_data_ref(body.own, root, "own") if body.own is not None else None
    proxies = [load_data_ref(p, root, f"proxies[{i}]") for i, p in enumerate(body.proxies)]
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
