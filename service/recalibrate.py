"""Scheduled recalibration: re-run a stored spec through the API and publish inside guardrails.

``marginlab recalibrate --spec SPEC --instrument X --every 1d --api URL`` submits the spec,
waits for the result and, when the recommendation is feasible, asks the API to publish it
(the server enforces the guardrails: a refused update changes nothing and is reported, and
the next run tries again). ``--clamp`` publishes the recommendation moved at most
``max_change`` per parameter instead, stepping towards it over successive runs.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

from calibration._errors import MarginlabError


class ApiError(MarginlabError):
    """The API refused a request or could not be reached."""

    def __init__(self, message: str, status: int | None = None,
                 body: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.body = body or {}


def _call(api: str, method: str, path: str, key: str | None,
          body: object | None = None) -> tuple[int, dict[str, Any]]:
    data = None if body is None else json.dumps(body).encode()
    headers = {"content-type": "application/json"}
    if key:
        headers["authorization"] = f"Bearer {key}"
    req = urllib.request.Request(api.rstrip("/") + path, data=data, headers=headers,
                                 method=method)
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as exc:
        payload = json.loads(exc.read() or b"{}")
        raise ApiError(payload.get("detail", str(exc)), exc.code, payload) from None
    except OSError as exc:
        raise ApiError(f"cannot reach {api}: {exc}") from None


def recalibrate_once(api: str, spec: dict[str, Any], instrument: str, *, key: str | None,
                     clamp: bool = False, poll_s: float = 1.0,
                     log: Callable[[str], None] = print) -> dict[str, Any]:
    """One run: calibrate, then publish if feasible and inside the guardrails.

    Returns ``{"calibration_id", "state", "published": bool, "version"?, "refused"?}``.
    """
    _, job = _call(api, "POST", "/v1/calibrations", key, spec)
    job_id = job["id"]
    log(f"calibration {job_id}: {job['state']}{' (cached)' if job.get('cached') else ''}")
    while job["state"] in ("queued", "running"):
        time.sleep(poll_s)
        _, job = _call(api, "GET", f"/v1/calibrations/{job_id}", key)
    outcome: dict[str, Any] = {"calibration_id": job_id, "state": job["state"],
                               "published": False}
    if job["state"] != "succeeded":
        log(f"calibration ended {job['state']}: {job.get('error') or 'no result'}")
        return outcome
    _, result = _call(api, "GET", f"/v1/calibrations/{job_id}/result", key)
    rec = result.get("recommendation")
    if not rec or not rec.get("feasible"):
        log("the recommendation is not feasible: nothing published")
        return outcome
    try:
        _, current = _call(api, "GET", f"/v1/recommendations/{instrument}", key)
    except ApiError as exc:
        if exc.status != 404:
            raise
        current = None
    # a recommendation with account-level (dotted) keys publishes sets under other keys
    # too: only the server can tell whether they changed
    account_level = any("." in name for name in rec["params"])
    if not account_level and current is not None and current.get("params") == rec["params"]:
        log(f"{instrument}: the recommendation equals the published parameters; unchanged")
        return outcome
    reason = f"scheduled recalibration {job_id[:8]} (trial {rec['trial']})"
    body: dict[str, Any] = {"calibration_id": job_id, "reason": reason}
    try:
        _, published = _call(api, "POST", f"/v1/recommendations/{instrument}", key, body)
    except ApiError as exc:
        violations = exc.body.get("violations") or []
        # --clamp steps the model's parameters only: a refused account-level set (a
        # violation with its own key) is reported, not clamped
        if (exc.status != 422 or not violations or not clamp or current is None
                or any(v.get("key") for v in violations)):
            log(f"not published: {exc}")
            outcome["refused"] = exc.body.get("violations") or str(exc)
            return outcome
        from calibration.publishing import Guardrails, clamp_to_guardrails

        # The server's limits of the parameters it refused; the others are inside already.
        limits = {v["parameter"]: v["limit"] for v in exc.body["violations"]
                  if v["guardrail"] == "max_change"}
        dropped = [v["parameter"] for v in exc.body["violations"] if v["guardrail"] == "dropped"]
        # the model's parameters alone (a clamped update publishes no account-level set)
        model_params = {k: v for k, v in rec["params"].items() if "." not in k}
        params = clamp_to_guardrails(current["params"], model_params,
                                     Guardrails(max_change=limits), model=result["model"],
                                     parameters=[*limits, *dropped],
                                     bar_seconds=result.get("bar_seconds"))
        _, published = _call(api, "POST", f"/v1/recommendations/{instrument}", key, {
            "params": params, "model": result["model"],
            "reason": reason + ", clamped to the guardrails"})
    log(f"published {instrument} version {published['version']}: {published['params']}")
    outcome.update(published=True, version=published["version"])
    return outcome


def run_schedule(api: str, spec: dict[str, Any], instrument: str, *, every_s: float,
                 key: str | None, clamp: bool, once: bool) -> int:
    """Recalibrate now and then every ``every_s`` seconds (until interrupted)."""
    while True:
        started = time.time()
        try:
            recalibrate_once(api, spec, instrument, key=key, clamp=clamp)
        except ApiError as exc:
            if once:
                raise
            print(f"run failed: {exc}; retrying at the next slot")
        if once:
            return 0
        time.sleep(max(0.0, every_s - (time.time() - started)))
