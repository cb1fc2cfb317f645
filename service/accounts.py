"""``/v1/margin`` (what accounts must post now) and ``/v1/account-backtests``."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

import anyio
import msgspec
import numpy as np
from litestar import Controller, Request, Response, get, post
from litestar.exceptions import NotFoundException
from litestar.openapi import ResponseSpec
from litestar.params import Body, Parameter

from calibration._errors import InvalidParameters, MarginlabError
from calibration.accounts import (
    AccountBacktestReport,
    AccountConfig,
    Market,
    PopulationSpec,
    accounts_from_records,
    requirements_now,
    run_account_backtest,
)
from calibration.calibrate import load_data_ref
from calibration.models import make_model
from calibration.publishing import PUBLISHED_KINDS
from calibration.spec import DataRefSpec, Instrument, StressWindowSpec
from calibration.windows import DEFAULT_STRESS_WINDOWS, StressWindow
from service import examples
from service.auth import requires
from service.errors import COMMON, PayloadTooLarge, problem_responses
from service.jobs import MAX_REQUEUES, now_iso
from service.recommendations import load_published
from service.schemas import PublishedParameters
from service.settings import Settings
from service.state import State, Svc

_M = msgspec.Meta
log = logging.getLogger("marginlab.service")

#: Largest account-position count of one margin request.
MAX_MARGIN_POSITIONS = 1_000_000


class MarginAccount(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One account now: its positions at current notional, and optionally its equity."""

    id: Annotated[str, _M(max_length=128, description="the account's identifier")]
    positions: Annotated[dict[Instrument, float], _M(
        description="instrument → signed notional at the current mark price, USD")]
    equity_usd: Annotated[float | None, _M(
        description="the account's equity (collateral value + unrealised PnL), USD; "
                    "with it the answer gives the margin ratio")] = None


class MarginRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Accounts whose requirement is wanted under the published parameters.

    ``data`` names recent bars per instrument for models whose rates move with the market
    (``ewma``, ``fhs``); tiered parameters need none.
    """

    accounts: Annotated[list[MarginAccount], _M(max_length=100_000,
                                                description="the accounts (at most 100,000)")]
    data: Annotated[list[DataRefSpec], _M(max_length=32, description=(
        "recent bars of the instruments whose published model is time-varying"))] = []


class PositionMargin(msgspec.Struct, frozen=True, kw_only=True):
    """One position's requirement."""

    instrument: Annotated[str, _M(description="instrument name")]
    notional_usd: Annotated[float, _M(description="signed notional, USD")]
    mm_usd: Annotated[float, _M(description="maintenance margin, USD")]
    im_usd: Annotated[float, _M(description="initial margin, USD")]


class AccountMargin(msgspec.Struct, frozen=True, kw_only=True):
    """An account's cross-margin requirement: the sum of its positions'."""

    id: Annotated[str, _M(description="the account's identifier")]
    mm_usd: Annotated[float, _M(description="maintenance margin, USD")]
    im_usd: Annotated[float, _M(description="initial margin, USD")]
    margin_ratio: Annotated[float | None, _M(
        description="equity_usd / mm_usd (below 1: liquidatable); null without equity")]
    liquidatable: Annotated[bool | None, _M(
        description="equity_usd <= mm_usd; null without equity")]
    positions: Annotated[list[PositionMargin], _M(description="per position")]


class ParametersUsed(msgspec.Struct, frozen=True, kw_only=True):
    """The published parameters an answer used."""

    model: Annotated[str, _M(description="margin model family")]
    version: Annotated[int, _M(description="audit version of the published parameters")]
    as_of: Annotated[str | None, _M(
        description="open time (UTC ISO 8601) of the bar whose rates applied; null for "
                    "tiers (constant rates)")]


class MarginResponse(msgspec.Struct, frozen=True, kw_only=True):
    """Requirements per account, and the parameters used per instrument."""

    accounts: Annotated[list[AccountMargin], _M(description="per account, in request order")]
    parameters: Annotated[dict[str, ParametersUsed], _M(
        description="instrument → the published parameters used")]


def _margin(body: MarginRequest, published: dict[str, PublishedParameters],
            settings: Settings) -> MarginResponse:
    refs = {d.instrument: (i, d) for i, d in enumerate(body.data)}
    codes = {name: c for c, name in enumerate(published)}
    # One flat pass over the positions; everything after it is per instrument or vectorised
    # (a per-account numpy sum cost ~8 µs an account, more than the requirement itself).
    counts = [len(acc.positions) for acc in body.accounts]
    total = sum(counts)
    if total > MAX_MARGIN_POSITIONS:
        raise PayloadTooLarge(f"{total} positions; at most {MAX_MARGIN_POSITIONS} "
                              "per request", field="accounts")
    inst = [name for acc in body.accounts for name in acc.positions]
    notional = [value for acc in body.accounts for value in acc.positions.values()]
    code_arr = np.fromiter((codes[name] for name in inst), dtype=np.int64, count=total)
    notional_arr = np.array(notional, dtype=np.float64)
    mm = np.zeros(total)
    im = np.zeros(total)
    used: dict[str, ParametersUsed] = {}
    for name, pub in published.items():
        mine = code_arr == codes[name]
        if pub.model in PUBLISHED_KINDS:  # a haircut schedule or engine settings, no model
            raise InvalidParameters(f"{name} is published as {pub.model}, not as a margin "
                                    "model: no requirement to compute", field="accounts")
        model = make_model(pub.model, pub.params)
        bars = None
        if pub.model != "tiered":
            if name not in refs:
                raise InvalidParameters(f"{name} is published as {pub.model}, whose rates move "
                                        "with the market: name its recent bars in data",
                                        field="data")
            i, ref = refs[name]
            bars = load_data_ref(ref, settings.data_root, f"data[{i}]")
        req = requirements_now(model, notional_arr[mine], bars)
        mm[mine] = req.mm_usd
        im[mine] = req.im_usd
        used[name] = ParametersUsed(model=pub.model, version=pub.version, as_of=req.as_of)
    owner = np.repeat(np.arange(len(counts), dtype=np.int64), counts)
    total_mm = np.bincount(owner, weights=mm, minlength=len(counts)).tolist()
    total_im = np.bincount(owner, weights=im, minlength=len(counts)).tolist()
    mm_list = mm.tolist()
    im_list = im.tolist()
    out = []
    start = 0
    for j, acc in enumerate(body.accounts):
        stop = start + counts[j]
        ratio = liquidatable = None
        if acc.equity_usd is not None:
            ratio = acc.equity_usd / total_mm[j] if total_mm[j] > 0 else None
            liquidatable = acc.equity_usd <= total_mm[j]
        out.append(AccountMargin(
            id=acc.id, mm_usd=total_mm[j], im_usd=total_im[j], margin_ratio=ratio,
            liquidatable=liquidatable,
            positions=[PositionMargin(instrument=inst[p], notional_usd=notional[p],
                                      mm_usd=mm_list[p], im_usd=im_list[p])
                       for p in range(start, stop)]))
        start = stop
    return MarginResponse(accounts=out, parameters=used)


class AccountBacktestRequest(msgspec.Struct, frozen=True, kw_only=True,
                             forbid_unknown_fields=True):
    """An account backtest: the market's bars, the accounts (explicit or a population), the
    margin model of every instrument and the replay settings (see ``marginlab accounts
    backtest``)."""

    data: Annotated[list[DataRefSpec], _M(min_length=1, max_length=32,
                                          description="one instrument's bars each")]
    model: Annotated[str, _M(max_length=32, description="margin model family")]
    params: Annotated[dict[str, Any], _M(description="the family's parameters")] = {}
    accounts: Annotated[list[dict[str, Any]], _M(max_length=100_000, description=(
        "accounts: {id, entry (ISO time or epoch ms), collateral {asset: units}, positions "
        "{instrument: signed USD notional}, mode (optional: cross, isolated or portfolio; "
        "absent: the request's mode)}, at most 100,000"))] | None = None
    population: Annotated[dict[str, Any] | None, _M(
        description="a seeded population (PopulationSpec fields, modes for a seeded mix of "
                    "margin modes) instead of accounts")] = None
    mode: Annotated[Literal["cross", "isolated", "portfolio"], _M(
        description="margin mode of every account that names none")] = "cross"
    portfolio_model: Annotated[str | None, _M(description=(
        "accounts in portfolio mode: the scenario model (grid, historical, or a preset such as "
        "deribit_pme_2024 or paradex)"))] = None
    portfolio_params: Annotated[dict[str, Any], _M(
        description="portfolio mode: the scenario model's parameters")] = {}
    liquidation: Annotated[dict[str, Any], _M(description=(
        "holding_bars, latency_bars, spread_rate, liquidation_fee_rate, insurance_fund_usd, "
        "haircuts, upnl_weight"))] = {}
    stress_windows: Annotated[list[StressWindowSpec] | None, _M(
        description="named windows (null: the domain's crash episodes)")] = None
    frontier: Annotated[list[float | None], _M(max_length=64, description=(
        "capacities of the throughput-insolvency frontier (liquidations per bar, or USD per "
        "bar with frontier_kind notional; null: no limit), e.g. [1, 2, 5, 10, null]"))
                        ] | None = None
    frontier_kind: Annotated[Literal["accounts", "notional"], _M(
        description="what the frontier's capacities limit")] = "accounts"


def _capacities(raw: list[float | None] | None, kind: str) -> list[float] | None:
    """The frontier's capacities (null: no limit), refused naming ``frontier[i]``."""
    if raw is None:
        return None
    if not raw:
        raise InvalidParameters("frontier: give at least one capacity", field="frontier")
    out = []
    for i, c in enumerate(raw):
        value = math.inf if c is None else float(c)
        if math.isnan(value) or value <= 0 or (
                kind == "accounts" and math.isfinite(value)
                and (value != int(value) or value > 10**9)):
            raise InvalidParameters(
                f"frontier[{i}]: a capacity must be > 0 (whole and at most 1e9 for accounts) "
                f"or null, got {c!r}", field=f"frontier[{i}]")
        out.append(value)
    return out


#: Largest account backtest run as a job, bars summed over the instruments (above
#: ``MARGINLAB_MAX_SYNC_BARS`` a request becomes a job; above this it is refused).
MAX_JOB_BARS = 20_000_000


class AccountBacktestJob(msgspec.Struct, frozen=True, kw_only=True):
    """An account backtest too large to answer at once, run in the background."""

    id: Annotated[str, _M(description="the job's id (32 hex digits)")]
    state: Annotated[Literal["queued", "running", "succeeded", "failed"], _M(
        description="queued → running → succeeded or failed")]
    created_at: Annotated[str, _M(description="when it was accepted (UTC ISO 8601)")]
    started_at: Annotated[str | None, _M(description="when it started (UTC ISO 8601)")] = None
    finished_at: Annotated[str | None, _M(description="when it ended (UTC ISO 8601)")] = None
    error: Annotated[str | None, _M(description="why it failed")] = None
    status_url: Annotated[str, _M(description="where to read this job")]
    report: Annotated[AccountBacktestReport | None, _M(
        description="the account backtest, once succeeded")] = None


def _prepare(body: AccountBacktestRequest, settings: Settings
             ) -> tuple[Callable[[], AccountBacktestReport], int]:
    """Validate everything a run needs (data, model, settings, accounts) and return the run
    and the request's size in bars (all instruments); the run itself can still fail on the
    data (no account could open)."""
    series = [load_data_ref(d, settings.data_root, f"data[{i}]")
              for i, d in enumerate(body.data)]
    total = sum(len(b) for b in series)
    if total > MAX_JOB_BARS:
        raise PayloadTooLarge(f"{total} bars exceed the limit of {MAX_JOB_BARS} for an "
                              "account backtest; cut the range", field="data")
    market = Market.from_series(series)
    per_day = max(1, 86_400 // market.bar_seconds)
    config = AccountConfig.from_mapping(body.liquidation, mode=body.mode,
                                        holding_bars=7 * per_day)
    if (body.accounts is None) == (body.population is None):
        raise InvalidParameters("give either accounts or a population", field="accounts")
    accounts = accounts_from_records(body.accounts) if body.accounts is not None else None
    for k, acc in enumerate(accounts or ()):
        for name in acc.positions:
            if name not in market.instruments:
                raise InvalidParameters(f"accounts[{k}]: instrument {name!r} is not in the "
                                        "data", field=f"accounts[{k}].positions")
    population = (PopulationSpec.from_mapping(body.population)
                  if body.population is not None else None)
    make_model(body.model, body.params)  # refused now, not as a failed job
    frontier = _capacities(body.frontier, body.frontier_kind)
    windows = (DEFAULT_STRESS_WINDOWS if body.stress_windows is None else
               tuple(StressWindow.from_dates(w.name, w.start, w.end)
                     for w in body.stress_windows))

    def run() -> AccountBacktestReport:
        report, _ = run_account_backtest(market, body.model, body.params, accounts=accounts,
                                         population=population, config=config,
                                         stress_windows=windows,
                                         portfolio_model=body.portfolio_model,
                                         portfolio_params=body.portfolio_params or None,
                                         frontier=frontier, frontier_kind=body.frontier_kind)
        return report

    return run, total


class _StoredRequest(msgspec.Struct, frozen=True, kw_only=True):
    """What a job needs to run again after its process stopped: the request, and how many
    times a process began running it."""

    request: AccountBacktestRequest
    starts: int = 0


#: A job's lease: the process running (or queueing) it renews ``accountleases/<id>`` every
#: ``Settings.job_heartbeat_s`` (h); a lease older than 4h means that process is gone
#: (Redis mode; in embedded mode the one process's own start says so).
_LEASE_PERIODS = 4


def _lease_ttl_s(settings: Settings) -> int:
    """Lifetime of an account job's lease, seconds (20 by default)."""
    return _LEASE_PERIODS * settings.job_heartbeat_s


#: This process, as a lease names it.
_OWNER = uuid.uuid4().hex


async def _hold_lease(svc: State, job_id: str, settings: Settings) -> None:
    while True:
        try:
            await svc.put("accountleases", job_id, _OWNER,
                          expires_in=_lease_ttl_s(settings))
        except Exception as exc:  # the store away for a moment: the next renewal tries again
            log.warning("account backtest %s: lease not renewed (%s)", job_id,
                        type(exc).__name__)
        await asyncio.sleep(settings.job_heartbeat_s)


def _spawn(app_state: Any, svc: State, job: AccountBacktestJob,
           run: Callable[[], AccountBacktestReport]) -> None:
    """Queue ``job`` in this process (one job at a time per process)."""
    slots = getattr(app_state, "account_job_slots", None)
    if slots is None:
        slots = app_state.account_job_slots = asyncio.Semaphore(1)
    task = asyncio.create_task(_run_job(svc, job, run, slots, app_state.settings))
    _TASKS.add(task)  # a task nobody holds may be collected before it ends
    task.add_done_callback(_TASKS.discard)


async def _fail(svc: State, job: AccountBacktestJob, reason: str) -> None:
    await svc.put("accountjobs", job.id, msgspec.structs.replace(
        job, state="failed", error=reason, finished_at=now_iso()), expires_in=_JOB_TTL_S)
    await svc.drop_active(job.id, "accountjobs")
    await svc.delete("accountspecs", job.id)


async def resume_account_jobs(app_state: Any, svc: State, *, embedded: bool) -> list[str]:
    """Queue again, in this process, every account backtest job left ``queued`` or
    ``running`` by a process that stopped; returns their ids.

    The active set (``State.add_active(kind="accountjobs")``, as calibrations use it) names
    the jobs not ended. In embedded mode, at start, every one of them belonged to the process
    before; in Redis mode, one whose lease has lapsed (its API process died, or Redis lost
    the lease) is taken over, under a lock shared by the processes. A job is failed, with a
    reason, when its request was not kept, when it no longer validates (data deleted, ...),
    or when processes began running it more than ``MAX_REQUEUES`` times (it may be what
    kills them)."""
    settings: Settings = app_state.settings
    resumed: list[str] = []
    async with svc.lock("account-jobs-resume"):
        for job_id in await svc.active_ids("accountjobs"):
            job = await svc.get("accountjobs", job_id, AccountBacktestJob)
            if job is None or job.state in ("succeeded", "failed"):
                await svc.drop_active(job_id, "accountjobs")
                continue
            if not embedded and await svc.stores["accountleases"].exists(job_id):
                continue  # a live process has it
            stored = await svc.get("accountspecs", job_id, _StoredRequest)
            reason = None
            run: Callable[[], AccountBacktestReport] | None = None
            if stored is None:
                reason = ("its server process stopped (a restart or a crash) and its request "
                          "was not kept; submit it again")
            elif stored.starts > MAX_REQUEUES:
                reason = (f"its server process stopped (a restart or a crash) {stored.starts} "
                          "times while running it; submit it again, with fewer accounts or a "
                          "shorter range if it repeats")
            else:
                try:
                    run, _ = await anyio.to_thread.run_sync(_prepare, stored.request,
                                                            settings)
                except MarginlabError as exc:
                    reason = f"could not be resumed after its server process stopped: {exc}"
            if run is None:
                log.warning("account backtest %s failed at resumption: %s", job_id, reason)
                await _fail(svc, job, reason or "could not be resumed")
                continue
            log.warning("resuming account backtest %s, interrupted by a restart", job_id)
            job = msgspec.structs.replace(job, state="queued", started_at=None)
            await svc.put("accountjobs", job.id, job, expires_in=_JOB_TTL_S)
            await svc.put("accountleases", job.id, _OWNER,
                          expires_in=_lease_ttl_s(settings))
            _spawn(app_state, svc, job, run)
            resumed.append(job_id)
    return resumed


async def _run_job(svc: State, job: AccountBacktestJob, run: Callable[[], AccountBacktestReport],
                   slots: asyncio.Semaphore, settings: Settings) -> None:
    """Run one job after the ones before it (one at a time per process: the replay uses a
    core, and the API must stay responsive), recording each state, holding its lease until
    it ends; an ended job leaves the active set."""
    lease = asyncio.create_task(_hold_lease(svc, job.id, settings))
    try:
        await _run_held(svc, job, run, slots)
        await svc.drop_active(job.id, "accountjobs")
        await svc.delete("accountspecs", job.id)
    finally:
        lease.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await lease


async def _run_held(svc: State, job: AccountBacktestJob,
                    run: Callable[[], AccountBacktestReport], slots: asyncio.Semaphore) -> None:
    ttl = _JOB_TTL_S
    async with slots:
        stored = await svc.get("accountspecs", job.id, _StoredRequest)
        if stored is not None:  # counted before it runs: a run that kills its process counts
            await svc.put("accountspecs", job.id, msgspec.structs.replace(
                stored, starts=stored.starts + 1), expires_in=ttl)
        job = msgspec.structs.replace(job, state="running", started_at=now_iso())
        await svc.put("accountjobs", job.id, job, expires_in=ttl)
        try:
            report = await anyio.to_thread.run_sync(run)
        except MarginlabError as exc:
            job = msgspec.structs.replace(job, state="failed", error=str(exc))
        except Exception as exc:
            log.exception("account backtest %s stopped on an unexpected error", job.id)
            job = msgspec.structs.replace(job, state="failed", error=(
                f"internal error ({type(exc).__name__}) while running the account backtest; "
                f"submit it again, and report it if it repeats (server log: job {job.id})"))
        else:
            job = msgspec.structs.replace(job, state="succeeded", report=report)
        await svc.put("accountjobs", job.id, msgspec.structs.replace(
            job, finished_at=now_iso()), expires_in=ttl)


#: How long a job's record (and report) is kept, s.
_JOB_TTL_S = 7 * 86_400
_TASKS: set[asyncio.Task[None]] = set()


class AccountController(Controller):
    """Accounts: requirements now, and account-level backtests."""

    path = "/v1"
    tags = ["accounts"]

    @post("/margin", guards=[requires("reader")], status_code=200,
          summary="Margin requirement of accounts now, under the published parameters",
          description="Each position's MM and IM (USD) at its current notional under its "
                      "instrument's published model (at the latest bar with a margin for "
                      "time-varying models, whose recent bars `data` names), summed per "
                      "account (cross margin); with `equity_usd`, the margin ratio.",
          responses=problem_responses(*COMMON, 400, 404, 413, 422))
    async def margin(self, request: Request[Any, Any, Any],
                     data: Annotated[MarginRequest, Body(examples=[examples.MARGIN])]
                     ) -> MarginResponse:
        names = sorted({n for acc in data.accounts for n in acc.positions})
        published = {}
        for name in names:
            body, _ = await load_published(request.app.state, name)
            published[name] = msgspec.json.decode(body, type=PublishedParameters)
        result: MarginResponse = await anyio.to_thread.run_sync(
            _margin, data, published, request.app.state.settings)
        return result

    @post("/account-backtests", guards=[requires("reader")], status_code=200,
          summary="Run an account backtest (at once when small, else as a job)",
          description="Cross, isolated or portfolio replay of explicit accounts or a seeded "
                      "population (domain.md §7): liquidations, bad debt cross vs isolated, "
                      "healthy-leg liquidations, accounts saved by cross, overall and per "
                      "stress window, and every account's outcome. Validated before "
                      "anything runs. Up to MARGINLAB_MAX_SYNC_BARS bars (all instruments) "
                      "(times the replays a `frontier` asks for, one per capacity, plus one) "
                      "the report is the answer (200); above, a job (202, its status at "
                      "`status_url` and in Location); above "
                      f"{MAX_JOB_BARS:,} bars refused with 413.",
          responses={**problem_responses(*COMMON, 400, 413, 422), 202: ResponseSpec(
              data_container=AccountBacktestJob, generate_examples=False,
              description="too large to answer at once: the job, queued")})
    async def account_backtest(self, request: Request[Any, Any, Any], svc: Svc,
                               data: Annotated[AccountBacktestRequest,
                                             Body(examples=[examples.ACCOUNT_BACKTEST])]
                               ) -> Response[AccountBacktestReport | AccountBacktestJob]:
        settings: Settings = request.app.state.settings
        run, total = await anyio.to_thread.run_sync(_prepare, data, settings)
        # A frontier replays the path once per capacity besides the run itself.
        replays = 1 + (len(data.frontier) if data.frontier else 0)
        if total * replays <= settings.max_sync_bars:
            report = await anyio.to_thread.run_sync(run)
            return Response(report, status_code=200)
        job_id = uuid.uuid4().hex
        job = AccountBacktestJob(id=job_id, state="queued", created_at=now_iso(),
                                 status_url=f"/v1/account-backtests/{job_id}")
        await svc.put("accountjobs", job.id, job, expires_in=_JOB_TTL_S)
        # Kept so that a job whose process stops is run again (``resume_account_jobs``).
        await svc.put("accountspecs", job.id, _StoredRequest(request=data),
                      expires_in=_JOB_TTL_S)
        await svc.put("accountleases", job.id, _OWNER, expires_in=_lease_ttl_s(settings))
        await svc.add_active(job.id, "accountjobs")
        _spawn(request.app.state, svc, job, run)
        return Response(job, status_code=202, headers={"Location": job.status_url})

    @get("/account-backtests/{job_id:str}", guards=[requires("reader")],
         summary="An account backtest job: its state, and its report once succeeded",
         responses=problem_responses(*COMMON, 404))
    async def account_backtest_job(self, request: Request[Any, Any, Any], svc: Svc,
                                   job_id: Annotated[str, Parameter(
                                       description="job id (32 hex digits)", min_length=1,
                                       max_length=64, pattern=r"^[0-9A-Za-z_-]+$",
                                       examples=[examples.JOB_ID])]) -> AccountBacktestJob:
        job = await svc.get("accountjobs", job_id, AccountBacktestJob)
        if job is None:
            raise NotFoundException(f"no account backtest job {job_id!r}")
        limit = request.app.state.settings.job_timeout_s
        if job.state in ("queued", "running") and _age_s(job.created_at) > limit:
            # Its process stopped while it waited or ran: nothing will finish it.
            job = msgspec.structs.replace(
                job, state="failed", finished_at=now_iso(),
                error=f"not finished within the job time limit of {limit} s (the server "
                      "stopped while it ran?); submit it again")
            await svc.put("accountjobs", job.id, job, expires_in=_JOB_TTL_S)
        return job


def _age_s(iso: str) -> float:
    stamp = datetime.fromisoformat(iso.replace("Z", "+00:00"))
    return (datetime.now(UTC) - stamp).total_seconds()


__all__ = ["AccountController"]
