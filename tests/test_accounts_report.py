"""The account backtest's HTML page: written by ``marginlab accounts backtest --report``, the
same page from the library, opened in headless Chromium, its figures the hand-checked ones."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pandas as pd
import pytest

from calibration.accounts import (
    Account,
    AccountConfig,
    Market,
    render_account_report,
    run_account_backtest,
)
from calibration.windows import StressWindow
from tests.test_accounts import FLAT, FLAT_1PCT, GAP80, MIN, T0, series
from tests.test_report_browser import ARTIFACTS, CHROMIUM_FLAGS, _chromium

DIP = (100.0, 100.0, 99.0, 99.5)
#: A gaps 20% down at bar 3, B too, C dips 1%.
ROWS = {"AUSDT": [FLAT] * 3 + [GAP80] * 3, "BUSDT": [FLAT] * 3 + [GAP80] * 3,
        "CUSDT": [FLAT] * 3 + [DIP] * 3}
#: The two hand cases of tests/test_accounts.py on one market: a hedge (long A / short B)
#: that cross saves while its long twin leaves 1,000 USD of bad debt, and a long A / long C
#: basket whose A loss takes down the healthy C leg (cross bad debt 100 USD; A's twin 1,000).
ACCOUNTS = [
    {"id": "hedge", "entry": T0 + 2 * MIN, "collateral": {"USDT": 2000},
     "positions": {"AUSDT": 10_000, "BUSDT": -10_000}},
    {"id": "basket", "entry": T0 + 2 * MIN, "collateral": {"USDT": 2000},
     "positions": {"AUSDT": 10_000, "CUSDT": 10_000}},
]
WINDOW = StressWindow.from_dates("hand_drop", "2020-09-13")  # T0 is 2020-09-13 12:26 UTC


def _market() -> Market:
    return Market.from_series([series(name, rows) for name, rows in ROWS.items()])


def _write_inputs(root: Path) -> list[str]:
    for name, rows in ROWS.items():
        b = series(name, rows)
        pd.DataFrame({"timestamp_ms": b.timestamp_ms, "open": b.open, "high": b.high,
                      "low": b.low, "close": b.close}).to_csv(root / f"{name}.csv",
                                                             index=False)
    (root / "accounts.json").write_text(json.dumps(ACCOUNTS))
    return ["accounts", "backtest", *(x for name in ROWS for x in ("--data",
                                                                   f"{name}={name}.csv")),
            "--accounts", "accounts.json", "--model", "tiered", "--params",
            json.dumps(FLAT_1PCT), "--liquidation",
            '{"holding_bars": 3, "latency_bars": 0, "insurance_fund_usd": 500}',
            "--stress-window", "hand_drop=2020-09-13"]


def _cells(page: str, table_id: str) -> list[list[str]]:
    table = page[page.index(f"<table id='{table_id}'>"):]
    table = table[: table.index("</table>")]
    return [re.findall(r"<td>(.*?)</td>", row) for row in table.split("<tr>")[2:]]


def test_library_page_carries_the_hand_figures() -> None:
    """Per window (all, hand_drop): 2 accounts, 4 positions, cross bad debt 100 USD, isolated
    2,000 USD (A's twin 1,000 in each account), 1 healthy leg (C, 100 units closed at its low
    of 99: a 100 USD hedge-break loss), 1 account saved (the hedge); the worst account is
    the basket at 100 USD, triggered at bar 3; the fund goes 500 → 400 USD."""
    report, result = run_account_backtest(
        _market(), "tiered", FLAT_1PCT, accounts=[
            Account(id=a["id"], entry_ms=a["entry"], collateral=a["collateral"],
                    positions=a["positions"]) for a in ACCOUNTS],
        config=AccountConfig(holding_bars=3, latency_bars=0, insurance_fund_usd=500.0),
        stress_windows=[WINDOW])
    page = render_account_report(report, result)
    for row in _cells(page, "figures"):
        assert row == [row[0], "2", "4", "40,000", "1", "2", "100", "2,000", "1", "100",
                       "1"], row
    assert [r[0] for r in _cells(page, "figures")] == ["all", "hand_drop"]
    assert _cells(page, "worst") == [["basket", "2020-09-13T12:29:40Z", "2", "20,000",
                                      "100"]]
    assert "at its lowest 400 USD, never exhausted" in page
    assert page.count("<svg") == 3
    for unit in ("bad debt (USD)", "count", "insurance fund (USD)"):
        assert f">{unit}<" in page, unit
    for name in ("healthy legs", "hedge-break loss", "saved by cross",
                 "bad debt cross / isolated", "adverse extremes"):
        assert f"<li><b>{name}</b>: " in page, name


@pytest.mark.slow
def test_cli_report_renders_in_chromium(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                        ) -> None:
    """``--report FILE`` writes the page the library renders; Chromium loads it with no
    console error and every chart drawn; a screenshot goes to test-artifacts/."""
    from calibration.cli import main

    exe = _chromium()
    monkeypatch.setenv("MARGINLAB_DATA_ROOT", str(tmp_path))
    out = tmp_path / "accounts.html"
    assert main([*_write_inputs(tmp_path), "--report", str(out), "--json"]) == 0
    page_file = out.read_text()
    assert "<h1>Account backtest: tiered, cross margin</h1>" in page_file
    profile = tmp_path / "profile"
    dom = subprocess.run(
        [exe, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--enable-logging=stderr",
         "--v=0", "--dump-dom", out.as_uri()],
        capture_output=True, text=True, timeout=120, check=False)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert [line for line in dom.stderr.splitlines() if "CONSOLE" in line] == []
    rendered = dom.stdout
    assert rendered.count("<svg") == 3
    for chart in ("chart-bad-debt", "chart-contagion", "chart-fund"):
        block = rendered[rendered.index(f'id="{chart}"'):]
        block = block[: block.index("</svg>")]
        assert block.count("<path") > 5, chart  # drawn content, not an empty frame
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "account-report.png"
    subprocess.run(
        [exe, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--window-size=1300,2600",
         "--hide-scrollbars", f"--screenshot={shot}", out.as_uri()],
        capture_output=True, timeout=120, check=True)
    assert shot.stat().st_size > 20_000


def test_cli_report_unwritable_names_the_field(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    """A report path that cannot be written exits 2 naming ``report``."""
    from calibration.cli import main

    monkeypatch.setenv("MARGINLAB_DATA_ROOT", str(tmp_path))
    args = _write_inputs(tmp_path)
    assert main([*args, "--report", str(tmp_path / "missing" / "x.html")]) == 2
    assert "report" in capsys.readouterr().err
