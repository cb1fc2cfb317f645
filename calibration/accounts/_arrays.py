"""Accounts as dense arrays over a market's instruments (``AccountBook``).

``simulate_accounts`` turns a list of ``Account`` objects into these arrays on every call (a
Python loop over every account's positions and balances). Built once, the arrays can be
replayed many times, or split by index (``take``) between processes forked after building
them: a forked child then reads the parent's arrays and never walks the accounts' Python
objects (whose reference counts would copy their pages into the child).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import overload

import numpy as np
from numpy.typing import NDArray

from calibration._errors import InvalidParameters
from calibration.accounts._book import MARGIN_MODES, Account
from calibration.accounts._market import STABLE_ASSETS


@dataclass(frozen=True, eq=False)
class AccountBook(Sequence[Account]):
    """``accounts`` (A) as arrays over ``instruments`` (k) and ``collateral_assets`` (m).

    Attributes:
        accounts: the accounts, in order (also what the book is as a sequence).
        instruments: the market's instruments the columns of ``notional_usd`` follow.
        collateral_assets: the non-stable collateral assets (upper case, in order of first
            appearance), the columns of ``col_units``.
        entry_ms: entry times, epoch ms, ``(A,)``.
        notional_usd: signed entry notional per instrument, USD, ``(A, k)``.
        usd: stable collateral (USDT, USDC, USD at 1), USD, ``(A,)``.
        col_units: units of each non-stable collateral asset, ``(A, m)``.
        mode_index: each account's own margin mode as its index in ``MARGIN_MODES``, -1
            for none (the run's), ``(A,)``.
    """

    accounts: tuple[Account, ...]
    instruments: tuple[str, ...]
    collateral_assets: tuple[str, ...]
    entry_ms: NDArray[np.int64]
    notional_usd: NDArray[np.float64]
    usd: NDArray[np.float64]
    col_units: NDArray[np.float64]
    mode_index: NDArray[np.int8]

    @classmethod
    def from_accounts(cls, accounts: Sequence[Account],
                      instruments: Sequence[str]) -> AccountBook:
        """The arrays of ``accounts`` over ``instruments`` (a market's, in its order).

        Raises:
            InvalidParameters: an account names an instrument not in ``instruments``.
        """
        if isinstance(accounts, AccountBook) and accounts.instruments == tuple(instruments):
            return accounts
        names = tuple(instruments)
        accounts = tuple(accounts)
        assets: list[str] = []
        for acc in accounts:
            for asset in acc.collateral:
                key = asset.upper()
                if key not in STABLE_ASSETS and key not in assets:
                    assets.append(key)
        index = {name: i for i, name in enumerate(names)}
        col_index = {a: c for c, a in enumerate(assets)}
        n_acc = len(accounts)
        notional = np.zeros((n_acc, len(names)))
        usd = np.zeros(n_acc)
        col_units = np.zeros((n_acc, len(assets)))
        for j, acc in enumerate(accounts):
            for name, value in acc.positions.items():
                i = index.get(name)
                if i is None:
                    raise InvalidParameters(f"account {acc.id!r}: instrument {name!r} is not "
                                            f"in the market ({', '.join(names)})",
                                            field="accounts.positions")
                notional[j, i] += value
            for asset, amount in acc.collateral.items():
                key = asset.upper()
                if key in STABLE_ASSETS:
                    usd[j] += amount
                else:
                    col_units[j, col_index[key]] += amount
        for acc in accounts:
            if acc.mode is not None and acc.mode not in MARGIN_MODES:
                raise InvalidParameters(f"account {acc.id!r}: mode must be one of "
                                        f"{', '.join(MARGIN_MODES)}, got {acc.mode!r}",
                                        field="accounts.mode")
        entry = np.fromiter((a.entry_ms for a in accounts), dtype=np.int64, count=n_acc)
        mode_index = np.fromiter((-1 if a.mode is None else MARGIN_MODES.index(a.mode)
                                  for a in accounts), dtype=np.int8, count=n_acc)
        return cls(accounts=accounts, instruments=names, collateral_assets=tuple(assets),
                   entry_ms=entry, notional_usd=notional, usd=usd, col_units=col_units,
                   mode_index=mode_index)

    def take(self, rows: NDArray[np.int64] | Sequence[int]) -> AccountBook:
        """The accounts at ``rows`` (indices, in that order), arrays sliced (same columns)."""
        idx = np.asarray(rows, dtype=np.int64)
        return AccountBook(
            accounts=tuple(self.accounts[int(i)] for i in idx), instruments=self.instruments,
            collateral_assets=self.collateral_assets, entry_ms=self.entry_ms[idx],
            notional_usd=self.notional_usd[idx], usd=self.usd[idx],
            col_units=self.col_units[idx], mode_index=self.mode_index[idx])

    def modes(self) -> set[str | None]:
        """The accounts' own margin modes (None: the run's)."""
        idx = self.mode_index
        codes = ([int(idx[0])] if idx.size and idx.min() == idx.max()  # one mode: no sort
                 else np.unique(idx).tolist())
        return {None if c < 0 else MARGIN_MODES[c] for c in codes}

    def __len__(self) -> int:
        return len(self.accounts)

    @overload
    def __getitem__(self, item: int) -> Account: ...

    @overload
    def __getitem__(self, item: slice) -> Sequence[Account]: ...

    def __getitem__(self, item: int | slice) -> Account | Sequence[Account]:
        return self.accounts[item]

    def __iter__(self) -> Iterator[Account]:
        return iter(self.accounts)
