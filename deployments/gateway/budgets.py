"""Per-key budgets (USD per period; pacing hard or zcl) and rate limits (requests per minute), durable.

How a request is admitted (the ingress, per request):

    ticket = await gate.admit_request(principal, bounds, routed=..., max_cost_usd=cap)
        # bounds: each reachable model's maximum cost for this request (cost.CostModel)
        # 400 max_cost_too_low | 429 budget_exceeded | rate_limited, or a reservation (+ allowed models, z)
    ... call the model (the router picks among ticket.allowed_models, paced by ticket.pacing_z) ...
    await ticket.settle(result.cost_usd)                 # the reservation becomes the actual cost

The ledger
----------
One named, detached Ray actor (`LedgerActor`, get-or-create by name in the `banditrouter` namespace, like the
event buffer; `max_restarts=-1`) owns a SQLite file (WAL) at `<gateway.state_dir>/ledger.sqlite`. Every
ingress replica on every node talks to it. It is a *sequential* actor (one method at a time), and `admit`
checks and reserves in one call, so between the check `settled + reserved + max_cost <= budget` and the
reservation no other admission can run. Hence, under any concurrency:

    settled spend + open reservations <= budget            at every moment, and so
    total spend <= budget                                  as long as each request's actual cost <= the maximum
                                                           reserved for it (`cost.CostModel`'s bound)

which is stronger than the issue's "spend <= budget + one request's maximum cost". Were a backend ever to
charge more than the reserved maximum, the excess is recorded (spend is never under-reported) and the key is
refused from then on.

Periods (deployments/gateway/periods.py): UTC calendar periods `hour`, `day` (from 00:00), `week` (from
Monday 00:00), `month` (from the 1st, 00:00), `total` (never resets), and short fixed periods "<N>s" (N >= 10
seconds, epoch-aligned: start = floor(t / N) * N) for demos and tests. A cost counts in the period its request
was *admitted* in (that is where it was reserved). Spend is kept per (key, period kind, period start) for the
five calendar kinds at once, so a key whose budget period is changed in the key store keeps its true spend;
a "<N>s" period is charged too when the admitting key had it (the reservation records its period), so a key
moved to a *new* "<N>s" period starts that period's count from its next request.

Refusals:
- `rate_limited`: the key made `rate_limit_per_min` admitted requests in the last 60 s (a sliding-window log:
  at most N admitted requests in ANY 60 s window; refused requests take no slot). Retry-After = seconds until
  the oldest of them leaves the window.
- `budget_exceeded`: settled + reserved + this request's maximum > budget. Retry-After = seconds until the
  period resets; with period `total` there is no Retry-After (waiting does not help: an operator has to raise
  the budget). When only in-flight reservations stand in the way (settled + max fits) Retry-After is 1 s:
  reservations settle as their requests finish. A request whose maximum alone exceeds the budget gets no
  Retry-After and a message saying to lower max_tokens.

Reservations that are never settled (the ingress replica died mid-request) expire after `reservation_ttl_s`
(default 3 x router.model_timeout_s + 300 s, longer than any request can run) and are charged at their
maximum: conservative, the budget can only be under-used, never overrun. A settle that arrives after the
expiry still corrects the charge to the actual cost (expired reservations are kept for another TTL).

Restarts: all state (spend per period, open reservations, the rate windows) is in SQLite, committed before
`admit`/`settle` return, so it survives the actor's restart (Ray restarts it on its node) and a restart of the
whole app with the same state_dir. `admit` and `settle` are idempotent by reservation id (the Gate draws it),
so Ray retrying a call across an actor restart (`max_task_retries=-1`) neither reserves nor charges twice. On a
multi-node cluster the state_dir must be on the head node or shared storage (the actor may restart elsewhere).

Pacing (issue 12): a key's budget has `pacing: hard | zcl`.
- `hard`: the above, unchanged: one reservation of the request's maximum (over every model it can reach).
- `zcl` (a routed request, model "router"): `admit_paced` is given each model's cost bound for the request and,
  in the same sequential call, finds the *affordable* models (settled + reserved + bound_m <= budget, and
  bound_m <= `pacing.reserve_share` (default 0.25) of that headroom, or else the cheapest that fits: so a few
  concurrent requests that could each reach a dear model do not reserve the whole budget between them), refuses
  with 429 only when none is (even the cheapest would overspend: the same messages and Retry-After as hard,
  judged on the cheapest bound), and otherwise reserves max(bound over the affordable set) and answers that set
  with the pacing figures. The router then picks among those models only (`RouteRequest.allowed_models`), so the
  invariant above holds for zcl keys as well. The period is cut into `n_bins` equal time bins
  (`banditrouter.pacing.TimeBins`, n_bins = `pacing.bins` in the config, default 48); the key's settled spend
  at a bin's start is recorded the first time the ledger sees that bin (table `bin_starts`, keyed by key,
  period, period start, n_bins and bin), so

      z = bin_fraction_spent(budget, n_bins, bin, spent_at_bin_start, spent_now)        (banditrouter/pacing.py)

  is the same for every ingress replica and survives restarts. z uses *settled* spend: reservations are upper
  bounds (often far above the actual cost), and counting them would make z jump with concurrency; the hard
  check on settled + reserved is what keeps spend under the budget, z only steers the choice. A zcl budget
  needs a period that ends (not `total`).
A direct request for one model (model != "router") is admitted like `hard` for every key: there is no routing
choice to pace. `routing.max_cost_usd` (per request) removes models whose bound exceeds it before either rule
(`within_cap`): a cap below every reachable model's bound is the caller's error, 400 `max_cost_too_low`.

`usage(key, period)` returns the period's spend, reservations and bounds (with `n_bins`, the current bin and
z), for `GET /v1/budget`.

Schema migration: a ledger.sqlite from before issue 12 has reservations without `period` / `models` columns;
opening it adds them (NULL: a calendar-period, hard reservation) and creates `bin_starts`, in place.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import sqlite3
import threading
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray

from deployments.gateway.errors import ApiError
from deployments.gateway.periods import CALENDAR_PERIODS, check_period, custom_period_seconds, describe, period_bounds

__all__ = ["PERIODS", "Gate", "Ledger", "LedgerActor", "Ticket", "pacing_bins", "period_bounds", "within_cap"]

log = logging.getLogger(__name__)

PERIODS = CALENDAR_PERIODS
RATE_WINDOW_S = 60.0
"""Rate limits are requests per minute over a sliding 60 s window."""
LEDGER_PREFIX = "banditrouter-ledger"
DEFAULT_PACING_BINS = 48
"""Time bins per budget period for zcl pacing when the config has no `pacing.bins`."""
DEFAULT_RESERVE_SHARE = 0.25
"""The largest share of its unreserved headroom one zcl request may reserve when `pacing.reserve_share` is unset."""
_EPS = 1e-12  # float slack on the budget comparison (sums of many small costs)


# ---------------------------------------------------------------------------------------------------------
# the ledger's logic (plain Python + SQLite; the actor wraps one)
# ---------------------------------------------------------------------------------------------------------
_SCHEMA = """
CREATE TABLE IF NOT EXISTS totals (
    key_id TEXT NOT NULL, period TEXT NOT NULL, start REAL NOT NULL, usd REAL NOT NULL,
    PRIMARY KEY (key_id, period, start)
);
CREATE TABLE IF NOT EXISTS reservations (
    id TEXT PRIMARY KEY, key_id TEXT NOT NULL, t REAL NOT NULL, max_usd REAL NOT NULL,
    expires REAL NOT NULL, state TEXT NOT NULL,  -- open | expired (charged at max_usd, kept for a late settle)
    period TEXT,  -- the admitting key's period; a "<N>s" one is charged besides the calendar ones
    models TEXT   -- zcl: JSON list of the models the admission allowed (answered again to a retried call)
);
CREATE INDEX IF NOT EXISTS reservations_key ON reservations (key_id, state, t);
CREATE INDEX IF NOT EXISTS reservations_expiry ON reservations (state, expires);
CREATE TABLE IF NOT EXISTS hits (id TEXT PRIMARY KEY, key_id TEXT NOT NULL, t REAL NOT NULL);
CREATE INDEX IF NOT EXISTS hits_key ON hits (key_id, t);
CREATE TABLE IF NOT EXISTS bin_starts (
    key_id TEXT NOT NULL, period TEXT NOT NULL, start REAL NOT NULL, n_bins INTEGER NOT NULL, bin INTEGER NOT NULL,
    spent REAL NOT NULL, period_end REAL NOT NULL, t REAL NOT NULL,
    PRIMARY KEY (key_id, period, start, n_bins, bin)
);
"""
_ADDED_COLUMNS = {"reservations": (("period", "TEXT"), ("models", "TEXT"))}
"""Columns added since the first schema: added in place to a ledger file that lacks them."""


def _migrate(db: sqlite3.Connection) -> list[str]:
    """Bring an older ledger file's tables up to `_SCHEMA` (new tables come from CREATE IF NOT EXISTS)."""
    added = []
    for table, columns in _ADDED_COLUMNS.items():
        have = {row[1] for row in db.execute(f"PRAGMA table_info({table})")}
        for name, kind in columns:
            if name not in have:
                db.execute(f"ALTER TABLE {table} ADD COLUMN {name} {kind}")
                added.append(f"{table}.{name}")
    return added


def _check_bounds(bounds: Mapping[str, float]) -> dict[str, float]:
    if not isinstance(bounds, Mapping) or not bounds:
        raise ValueError("bounds must be a non-empty mapping of model name to maximum cost")
    out = {}
    for m, b in bounds.items():
        if not (isinstance(m, str) and isinstance(b, (int, float)) and math.isfinite(b) and b >= 0):
            raise ValueError(f"bounds[{m!r}] must be a finite number >= 0, got {b!r}")
        out[m] = float(b)
    return out


class Ledger:
    """Spend, reservations and rate windows per key in one SQLite file.

    Every public method runs whole under one lock and one transaction, so calls from several threads are
    serialised exactly as the actor serialises its calls (the unit tests drive it from threads).
    `now` (epoch seconds) may be injected; by default the ledger's own clock, so every ingress replica is
    judged by one clock."""

    def __init__(self, path: str | Path, reservation_ttl_s: float = 660.0, clock=time.time):
        if not reservation_ttl_s > 0:
            raise ValueError("reservation_ttl_s must be positive")
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.ttl = float(reservation_ttl_s)
        self.clock = clock
        self.lock = threading.Lock()
        self.db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")  # WAL: durable across process crashes; fsync at checkpoints
        self.db.executescript(_SCHEMA)  # an older file keeps its tables as they were; _migrate adds the new columns
        added = _migrate(self.db)
        if added:
            log.warning("ledger %s: migrated to the current schema (added %s)", self.path, ", ".join(added))
        self._last_prune = -math.inf

    # -- helpers (called inside a transaction) ------------------------------------------------------------
    def _charge(self, key_id: str, t: float, usd: float, period: str | None = None) -> None:
        """Add `usd` (may be negative: a late settle below the charged maximum) to every calendar period holding
        t, and to the "<N>s" period holding t when the reservation was made under one."""
        kinds = PERIODS if period is None or period in PERIODS else (*PERIODS, period)
        for p in kinds:
            start, _ = period_bounds(p, t)
            self.db.execute(
                "INSERT INTO totals (key_id, period, start, usd) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (key_id, period, start) DO UPDATE SET usd = usd + excluded.usd",
                (key_id, p, start, usd),
            )

    def _expire(self, now: float) -> int:
        """Open reservations past their TTL are charged at their maximum; expired ones kept one more TTL for a
        late settle are dropped."""
        rows = self.db.execute(
            "SELECT id, key_id, t, max_usd, period FROM reservations WHERE state = 'open' AND expires <= ?", (now,)
        ).fetchall()
        for rid, key_id, t, max_usd, period in rows:
            self._charge(key_id, t, max_usd, period)
            self.db.execute("UPDATE reservations SET state = 'expired', expires = ? WHERE id = ?", (now + self.ttl, rid))
        if rows:
            log.warning("ledger: %d reservation(s) never settled; charged at their maximum", len(rows))
        self.db.execute("DELETE FROM reservations WHERE state = 'expired' AND expires <= ?", (now,))
        if now - self._last_prune > RATE_WINDOW_S:  # bounded by construction: old windows and periods go
            self._last_prune = now
            self.db.execute("DELETE FROM hits WHERE t <= ?", (now - RATE_WINDOW_S,))
            self.db.execute(
                f"DELETE FROM totals WHERE period IN ({','.join('?' * (len(PERIODS) - 1))}) AND start < ?",
                (*[p for p in PERIODS if p != "total"], now - 70 * 86400.0),
            )
            # "<N>s" periods: drop those that ended over two TTLs ago (past any late settle)
            for (p,) in self.db.execute(
                f"SELECT DISTINCT period FROM totals WHERE period NOT IN ({','.join('?' * len(PERIODS))})", PERIODS
            ).fetchall():
                n = custom_period_seconds(p)
                self.db.execute("DELETE FROM totals WHERE period = ? AND start + ? < ?", (p, n, now - 2 * self.ttl))
            self.db.execute("DELETE FROM bin_starts WHERE period_end < ?", (now - RATE_WINDOW_S,))
        return len(rows)

    def _spent(self, key_id: str, period: str, start: float) -> float:
        row = self.db.execute(
            "SELECT usd FROM totals WHERE key_id = ? AND period = ? AND start = ?", (key_id, period, start)
        ).fetchone()
        return float(row[0]) if row else 0.0

    def _reserved(self, key_id: str, start: float) -> float:
        row = self.db.execute(
            "SELECT COALESCE(SUM(max_usd), 0) FROM reservations WHERE key_id = ? AND state = 'open' AND t >= ?",
            (key_id, start),
        ).fetchone()
        return float(row[0])

    def _tx(self, fn, *args):
        with self.lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                out = fn(*args)
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
            self.db.execute("COMMIT")
            return out

    def _seen(self, rid: str) -> tuple | None:
        """(max_usd, models) of an admission already recorded under `rid` (a call Ray retried), else None."""
        row = self.db.execute("SELECT max_usd, models FROM reservations WHERE id = ?", (rid,)).fetchone()
        if row is not None:
            return row
        return (None, None) if self.db.execute("SELECT 1 FROM hits WHERE id = ?", (rid,)).fetchone() else None

    def _rate_refusal(self, key_id: str, rate_per_min: int | None, now: float) -> dict[str, Any] | None:
        if rate_per_min is None:
            return None
        since = now - RATE_WINDOW_S
        (n,) = self.db.execute("SELECT COUNT(*) FROM hits WHERE key_id = ? AND t > ?", (key_id, since)).fetchone()
        if n < rate_per_min:
            return None
        # the slot that frees first: once n - rate + 1 of them have left the window, one more fits
        (oldest,) = self.db.execute(
            "SELECT t FROM hits WHERE key_id = ? AND t > ? ORDER BY t LIMIT 1 OFFSET ?", (key_id, since, n - rate_per_min)
        ).fetchone()
        return {
            "ok": False,
            "code": "rate_limited",
            "retry_after_s": max(oldest + RATE_WINDOW_S - now, 0.001),
            "message": f"rate limit of {rate_per_min} requests per minute reached for this key",
        }

    def _reserve(self, rid, key_id, now, max_cost, period, models=None) -> None:
        self.db.execute(
            "INSERT INTO reservations (id, key_id, t, max_usd, expires, state, period, models)"
            " VALUES (?, ?, ?, ?, ?, 'open', ?, ?)",
            (rid, key_id, now, max_cost, now + self.ttl, period, None if models is None else json.dumps(models)),
        )

    def _pacing(self, key_id: str, budget: float, period: str, n_bins: int, now: float, spent: float) -> dict[str, Any]:
        """The current bin and z; the bin's start spend is recorded the first time the ledger sees the bin."""
        from banditrouter.pacing import TimeBins, bin_fraction_spent

        start, end = period_bounds(period, now)
        bins = TimeBins(start, end, n_bins)
        i = bins.index(now)
        key = (key_id, period, start, n_bins, i)
        row = self.db.execute(
            "SELECT spent FROM bin_starts WHERE key_id = ? AND period = ? AND start = ? AND n_bins = ? AND bin = ?", key
        ).fetchone()
        if row is None:
            self.db.execute(
                "INSERT INTO bin_starts (key_id, period, start, n_bins, bin, spent, period_end, t)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (*key, spent, end, now),
            )
            at_start = spent
        else:
            at_start = float(row[0])
        return {
            "n_bins": n_bins,
            "bin": i,
            "bin_start": bins.bin_start(i),
            "bin_end": bins.bin_start(i + 1) if i + 1 < n_bins else end,
            "spent_at_bin_start": at_start,
            "z": bin_fraction_spent(budget, n_bins, i, at_start, spent),
        }

    # -- the API ------------------------------------------------------------------------------------------
    def admit(
        self,
        reservation_id: str,
        key_id: str,
        budget_usd: float | None,
        period: str,
        rate_per_min: int | None,
        max_cost: float,
        now: float | None = None,
    ) -> dict[str, Any]:
        """Admit one request of maximum cost `max_cost` for `key_id`, or refuse it (`hard` pacing).

        {"ok": True, "spent", "reserved", "budget", "period_start", "period_end"} after recording the
        admission (a rate-window slot, and with a budget a reservation of max_cost), or {"ok": False, "code":
        "rate_limited" | "budget_exceeded", "retry_after_s": float | None, "message"}. Idempotent by
        `reservation_id`: a repeated call answers ok without reserving again."""
        if not (isinstance(max_cost, (int, float)) and math.isfinite(max_cost) and max_cost >= 0):
            raise ValueError(f"max_cost must be a finite number >= 0, got {max_cost!r}")
        self._check(budget_usd, rate_per_min, period)
        return self._tx(self._admit, reservation_id, key_id, budget_usd, period, rate_per_min, float(max_cost), now)

    @staticmethod
    def _check(budget_usd, rate_per_min, period) -> None:
        if budget_usd is not None and not (math.isfinite(budget_usd) and budget_usd >= 0):
            raise ValueError(f"budget_usd must be a finite number >= 0, got {budget_usd!r}")
        if rate_per_min is not None and rate_per_min < 1:
            raise ValueError(f"rate_per_min must be >= 1, got {rate_per_min!r}")
        check_period(period)

    def _admit(self, rid, key_id, budget_usd, period, rate_per_min, max_cost, now) -> dict[str, Any]:
        now = self.clock() if now is None else float(now)
        self._expire(now)
        start, end = period_bounds(period, now)
        figures = {"budget": budget_usd, "period_start": start, "period_end": end}
        if self._seen(rid) is not None:  # a retried call: it was admitted already
            return {"ok": True, "spent": self._spent(key_id, period, start), "reserved": self._reserved(key_id, start), **figures}
        refusal = self._rate_refusal(key_id, rate_per_min, now)
        if refusal is not None:
            return refusal
        spent = reserved = 0.0
        if budget_usd is not None:
            spent, reserved = self._spent(key_id, period, start), self._reserved(key_id, start)
            if spent + reserved + max_cost > budget_usd + _EPS:
                return self._refusal(budget_usd, period, spent, reserved, max_cost, now, end)
        self.db.execute("INSERT INTO hits (id, key_id, t) VALUES (?, ?, ?)", (rid, key_id, now))
        if budget_usd is not None:
            self._reserve(rid, key_id, now, max_cost, period)
            reserved += max_cost
        return {"ok": True, "spent": spent, "reserved": reserved, **figures}

    def admit_paced(
        self,
        reservation_id: str,
        key_id: str,
        budget_usd: float,
        period: str,
        rate_per_min: int | None,
        bounds: Mapping[str, float],
        n_bins: int,
        now: float | None = None,
        reserve_share: float = DEFAULT_RESERVE_SHARE,
    ) -> dict[str, Any]:
        """Admit one routed request of a `zcl` key, given each model's cost bound for it, or refuse it.

        Affordable models: settled + reserved + bound_m <= budget, and bound_m <= reserve_share x that headroom
        (budget - settled - reserved); when no model passes the share, the cheapest that fits. None: {"ok": False, "code":
        "budget_exceeded", ...} judged as `admit` would judge the cheapest bound. Else reserves max(bound over
        the affordable models) and answers {"ok": True, "allowed": [models, in `bounds` order], "max_cost",
        "spent", "reserved" (with this reservation), "budget", "period_start", "period_end", "n_bins", "bin",
        "bin_start", "bin_end", "spent_at_bin_start", "z"} (z computed before this request; see the module
        docstring). Rate limits as `admit`. Idempotent by `reservation_id` (a retried call answers the same
        allowed set and reserves nothing more)."""
        bounds = _check_bounds(bounds)
        if budget_usd is None:
            raise ValueError("admit_paced needs a budget")
        self._check(budget_usd, rate_per_min, period)
        if period == "total":
            raise ValueError("zcl pacing needs a budget period that ends; 'total' never does")
        if not (isinstance(n_bins, int) and n_bins >= 1):
            raise ValueError(f"n_bins must be an integer >= 1, got {n_bins!r}")
        if not (isinstance(reserve_share, (int, float)) and 0 < reserve_share <= 1):
            raise ValueError(f"reserve_share must lie in (0, 1], got {reserve_share!r}")
        return self._tx(
            self._admit_paced, reservation_id, key_id, float(budget_usd), period, rate_per_min, bounds, n_bins, now, reserve_share
        )

    def _admit_paced(self, rid, key_id, budget, period, rate_per_min, bounds, n_bins, now, share) -> dict[str, Any]:
        now = self.clock() if now is None else float(now)
        self._expire(now)
        start, end = period_bounds(period, now)
        figures = {"budget": budget, "period_start": start, "period_end": end}
        seen = self._seen(rid)
        if seen is not None:  # a retried call: answer what was admitted
            max_cost, models = seen
            allowed = json.loads(models) if models else list(bounds)
            spent = self._spent(key_id, period, start)
            return {
                "ok": True,
                "allowed": allowed,
                "max_cost": max(bounds[m] for m in allowed) if max_cost is None else float(max_cost),
                "spent": spent,
                "reserved": self._reserved(key_id, start),
                **figures,
                **self._pacing(key_id, budget, period, n_bins, now, spent),
            }
        refusal = self._rate_refusal(key_id, rate_per_min, now)
        if refusal is not None:
            return refusal
        spent, reserved = self._spent(key_id, period, start), self._reserved(key_id, start)
        headroom = budget - spent - reserved
        fits = [m for m, b in bounds.items() if b <= headroom + _EPS]
        if not fits:  # even the cheapest model would overspend
            return self._refusal(budget, period, spent, reserved, min(bounds.values()), now, end)
        # one request may tie up at most `share` of the headroom, so requests in flight together leave room for more
        # (n of them reserve at most 1 - (1 - share)^n of it): without this, a few concurrent requests that could
        # each reach a dear model reserve the whole budget and the next one is refused while little is spent
        allowed = [m for m in fits if bounds[m] <= share * headroom + _EPS] or [min(fits, key=bounds.__getitem__)]
        max_cost = max(bounds[m] for m in allowed)
        self.db.execute("INSERT INTO hits (id, key_id, t) VALUES (?, ?, ?)", (rid, key_id, now))
        self._reserve(rid, key_id, now, max_cost, period, allowed)
        return {
            "ok": True,
            "allowed": allowed,
            "max_cost": max_cost,
            "spent": spent,
            "reserved": reserved + max_cost,
            **figures,
            **self._pacing(key_id, budget, period, n_bins, now, spent),
        }

    @staticmethod
    def _refusal(budget, period, spent, reserved, max_cost, now, end) -> dict[str, Any]:
        where = describe(period)
        if max_cost > budget + _EPS:
            retry, msg = (
                None,
                (
                    f"this request's maximum cost (${max_cost:.6g}) exceeds the key's whole budget (${budget:.6g} {where});"
                    " lower max_tokens or shorten the prompt"
                ),
            )
        elif spent + max_cost <= budget + _EPS:  # only in-flight requests' reservations are in the way
            retry, msg = 1.0, f"the key's budget (${budget:.6g} {where}) is held by requests in flight; retry shortly"
        else:
            retry = None if end is None else max(end - now, 1.0)
            resets = "it does not reset" if end is None else f"it resets in {int(end - now)} s"
            msg = f"the key's budget of ${budget:.6g} {where} is spent (${spent:.6g} settled); {resets}"
        return {"ok": False, "code": "budget_exceeded", "retry_after_s": retry, "message": msg}

    def settle(self, reservation_id: str, cost: float, now: float | None = None) -> dict[str, Any]:
        """Replace the reservation by the actual cost (NaN/inf: its maximum; negative: 0). Idempotent:
        {"status": "settled" | "settled_late" (after expiry: the charged maximum corrected) | "unknown"
        (already settled, or never reserved), "charged": usd}."""
        if isinstance(cost, (int, float)) and math.isfinite(cost):
            cost = max(0.0, float(cost))
        else:
            cost = None
        return self._tx(self._settle, reservation_id, cost, now)

    def _settle(self, rid: str, cost: float | None, now: float | None) -> dict[str, Any]:
        now = self.clock() if now is None else float(now)
        row = self.db.execute("SELECT key_id, t, max_usd, state, period FROM reservations WHERE id = ?", (rid,)).fetchone()
        if row is None:
            return {"status": "unknown", "charged": 0.0}
        key_id, t, max_usd, state, period = row
        usd = max_usd if cost is None else cost
        if usd > max_usd + _EPS:
            log.warning("ledger: key %s charged $%.6g over a reserved maximum of $%.6g", key_id, usd, max_usd)
        self._charge(key_id, t, usd if state == "open" else usd - max_usd, period)
        self.db.execute("DELETE FROM reservations WHERE id = ?", (rid,))
        self._expire(now)
        return {"status": "settled" if state == "open" else "settled_late", "charged": usd}

    def usage(
        self, key_id: str, period: str, now: float | None = None, *, n_bins: int | None = None, budget_usd: float | None = None
    ) -> dict[str, Any]:
        """{"spent", "reserved", "period_start", "period_end"} of the key's current period; with `n_bins` and
        `budget_usd` (a zcl key) also the pacing figures of `admit_paced` (the current bin, its start spend,
        z), recording the bin's start spend if this is the first time the bin is seen."""
        check_period(period)
        paced = n_bins is not None
        if paced and (budget_usd is None or period == "total"):
            raise ValueError("pacing figures need a budget and a period that ends")

        def read():
            t = self.clock() if now is None else float(now)
            self._expire(t)
            start, end = period_bounds(period, t)
            out = {
                "spent": self._spent(key_id, period, start),
                "reserved": self._reserved(key_id, start),
                "period_start": start,
                "period_end": end,
            }
            if paced:
                out.update(self._pacing(key_id, float(budget_usd), period, int(n_bins), t, out["spent"]))
            return out

        return self._tx(read)

    def close(self) -> None:
        with self.lock:
            self.db.close()


# ---------------------------------------------------------------------------------------------------------
# the actor
# ---------------------------------------------------------------------------------------------------------
@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)
class LedgerActor:
    """A sequential actor (no max_concurrency, no async methods): one call at a time, which is what makes
    check-and-reserve atomic across every ingress replica."""

    def __init__(self, path: str, reservation_ttl_s: float):
        self.ledger = Ledger(path, reservation_ttl_s)

    def admit(self, *args, **kwargs) -> dict[str, Any]:
        return self.ledger.admit(*args, **kwargs)

    def settle(self, *args, **kwargs) -> dict[str, Any]:
        return self.ledger.settle(*args, **kwargs)

    def admit_paced(self, *args, **kwargs) -> dict[str, Any]:
        return self.ledger.admit_paced(*args, **kwargs)

    def usage(self, *args, **kwargs) -> dict[str, Any]:
        return self.ledger.usage(*args, **kwargs)

    def path(self) -> str:
        return str(self.ledger.path)


def ledger_path(cfg) -> Path:
    return Path(cfg.gateway.state_dir) / "ledger.sqlite"


def ledger_name(path: Path) -> str:
    """One actor per ledger file: an app started with another state_dir never finds a ledger writing elsewhere."""
    import hashlib

    return f"{LEDGER_PREFIX}-{hashlib.sha256(str(Path(path).resolve()).encode()).hexdigest()[:12]}"


def reservation_ttl(cfg) -> float:
    """Longer than any request runs: a queue wait plus model calls (retries, a fallback) of router.model_timeout_s."""
    return 3.0 * float(cfg.router.model_timeout_s) + 300.0


def get_or_create_ledger(cfg):
    from learner.actors import NAMESPACE

    path = ledger_path(cfg)
    return LedgerActor.options(name=ledger_name(path), namespace=NAMESPACE, get_if_exists=True, lifetime="detached").remote(
        str(path), reservation_ttl(cfg)
    )


def kill_ledgers(no_restart: bool = True) -> int:
    """Kill every ledger actor (tests; `banditrouter serve` on exit). State stays in SQLite. Returns how many."""
    import ray
    from ray.util import list_named_actors

    from learner.actors import NAMESPACE

    n = 0
    for a in list_named_actors(all_namespaces=True):
        if a.get("namespace") == NAMESPACE and a.get("name", "").startswith(LEDGER_PREFIX):
            try:
                ray.kill(ray.get_actor(a["name"], namespace=NAMESPACE), no_restart=no_restart)
                n += 1
            except ValueError:
                pass
    return n


# ---------------------------------------------------------------------------------------------------------
# per-request cost cap, bins from the config
# ---------------------------------------------------------------------------------------------------------
def within_cap(bounds: Mapping[str, float], cap_usd: float | None, *, routed: bool) -> dict[str, float]:
    """The models (with their bounds) whose maximum cost for this request is <= `routing.max_cost_usd`; all of
    `bounds` without a cap. None left: ApiError 400 `max_cost_too_low` naming the cheapest bound (a cap no model
    can meet is the caller's error, not the key's budget: waiting does not help, so not a 429)."""
    if cap_usd is None:
        return dict(bounds)
    kept = {m: b for m, b in bounds.items() if b <= cap_usd + _EPS}
    if kept:
        return kept
    cheapest = min(bounds, key=bounds.get)
    if routed:
        msg = (
            f"routing.max_cost_usd (${cap_usd:.6g}) is below every model's maximum cost for this request; the cheapest"
            f" is {cheapest!r} at ${bounds[cheapest]:.6g}: raise the cap, lower max_tokens or shorten the prompt"
        )
    else:
        msg = (
            f"model {cheapest!r} may cost up to ${bounds[cheapest]:.6g} for this request, above routing.max_cost_usd"
            f" (${cap_usd:.6g}): raise the cap, lower max_tokens, or use model 'router'"
        )
    raise ApiError(400, msg, code="max_cost_too_low")


def reserve_share(cfg) -> float:
    """The largest share of a zcl key's unreserved headroom one request may reserve: `pacing.reserve_share`."""
    v = getattr(getattr(cfg, "pacing", None), "reserve_share", None)
    return DEFAULT_RESERVE_SHARE if v is None else float(v)


def pacing_bins(cfg) -> int:
    """Time bins per budget period for zcl keys: `pacing.bins` in the config, else DEFAULT_PACING_BINS."""
    n = getattr(getattr(cfg, "pacing", None), "bins", None)
    return DEFAULT_PACING_BINS if n is None else int(n)


# ---------------------------------------------------------------------------------------------------------
# the gate (in each ingress replica)
# ---------------------------------------------------------------------------------------------------------
@dataclass
class Ticket:
    """One admitted request. `settle(cost)` once the cost is known (idempotent: the first call counts);
    `settle(0.0)` when nothing was spent. A ticket never settled is charged at `max_cost_usd` when its
    reservation expires."""

    key_id: str | None
    max_cost_usd: float
    reservation_id: str | None = None
    spent_usd: float | None = None
    """The key's settled spend in the period at admission (None: no budget)."""
    reserved_usd: float | None = None
    budget_usd: float | None = None
    period_end: float | None = None
    allowed_models: tuple[str, ...] | None = None
    """The models the request may be routed to (None: all): a zcl key's affordable models, and/or those within
    the request's routing.max_cost_usd. The reservation (`max_cost_usd`) is the largest bound among them."""
    pacing_z: float | None = None
    """zcl keys, routed requests: the fraction of the current budget bin spent (the ZCL threshold's z)."""
    pacing: dict[str, Any] | None = None
    """zcl: the ledger's pacing figures (n_bins, bin, bin_start, bin_end, spent_at_bin_start, z)."""
    _gate: Gate | None = field(default=None, repr=False)
    settled: bool = False

    async def settle(self, cost_usd: float) -> None:
        if self.settled:
            return
        self.settled = True
        gate = self._gate
        if gate is None:
            return
        if isinstance(cost_usd, (int, float)) and math.isfinite(cost_usd):
            gate.metrics.spend(self.key_id, max(0.0, float(cost_usd)))
        if self.reservation_id is None:
            return
        try:
            await gate._call("settle", self.reservation_id, cost_usd)
        except Exception as e:  # the answer is out already; the reservation expires and is charged at its maximum
            log.warning("ledger: settle of %s failed (%s); it will be charged at its maximum on expiry", self.reservation_id, e)


class Gate:
    """Admission against the ledger. A principal without a key id, or whose key has neither a budget nor a rate
    limit, passes without a remote call. `ledger`: a `Ledger` to use in-process (unit tests); by default the
    named ledger actor for cfg.gateway.state_dir, found on first use."""

    def __init__(self, cfg, *, ledger: Ledger | None = None, metrics=None, timeout_s: float = 10.0):
        self.cfg = cfg
        self.timeout_s = timeout_s
        self._local = ledger
        self._actor = None
        if metrics is None:
            from banditrouter.metrics import GatewayMetrics

            metrics = GatewayMetrics()
        self.metrics = metrics

    async def _call(self, method: str, *args, **kwargs):
        if self._local is not None:
            return await asyncio.to_thread(getattr(self._local, method), *args, **kwargs)
        if self._actor is None:  # found (or created) on first use, off the event loop: it asks the GCS
            self._actor = await asyncio.to_thread(get_or_create_ledger, self.cfg)
        return await asyncio.wait_for(getattr(self._actor, method).remote(*args, **kwargs), self.timeout_s)

    async def _ledger(self, method: str, *args, **kwargs) -> dict[str, Any]:
        try:
            return await self._call(method, *args, **kwargs)
        except Exception as e:  # actor unreachable past timeout_s, or restarting without end
            log.warning("ledger: %s failed: %r", method, e)
            raise ApiError(
                503, "the budget ledger is not reachable; retry shortly", "overloaded", "ledger_unavailable", retry_after_s=1.0
            ) from None

    def _refused(self, key_id: str, out: dict[str, Any]) -> ApiError:
        self.metrics.refused(key_id, out["code"])
        return ApiError(429, out["message"], "rate_limit_error", out["code"], retry_after_s=out["retry_after_s"])

    async def admit_request(
        self, principal, bounds: Mapping[str, float], *, routed: bool, max_cost_usd: float | None = None
    ) -> Ticket:
        """Admit one chat request given each reachable model's cost bound (`routed`: model "router"; else one
        model) and the request's routing.max_cost_usd: ApiError 400 when the cap leaves no model, else a zcl
        key's routed request through `admit_paced`, every other through `admit` with the largest allowed bound.
        The Ticket's `allowed_models` is set when the cap or a zcl budget restricted the choice."""
        allowed = within_cap(bounds, max_cost_usd, routed=routed)
        budget = getattr(principal, "budget", None) if getattr(principal, "key_id", None) is not None else None
        if routed and budget is not None and getattr(budget, "pacing", "hard") == "zcl":
            return await self.admit_paced(principal, allowed)
        ticket = await self.admit(principal, max(allowed.values()))
        if routed and max_cost_usd is not None:
            ticket.allowed_models = tuple(allowed)
        return ticket

    async def admit_paced(self, principal, bounds: Mapping[str, float]) -> Ticket:
        """A zcl key's routed request: a Ticket with the affordable models, z and the reservation of the largest
        affordable bound, or ApiError 429 (`budget_exceeded` only when even the cheapest bound does not fit,
        `rate_limited`) / 503 (ledger unreachable)."""
        bounds = _check_bounds(bounds)
        key_id, budget = principal.key_id, principal.budget
        rid = f"rsv-{uuid.uuid4().hex}"
        rate = getattr(principal, "rate_limit_per_min", None)
        out = await self._ledger(
            "admit_paced",
            rid,
            key_id,
            float(budget.usd),
            budget.period,
            rate,
            bounds,
            pacing_bins(self.cfg),
            None,
            reserve_share(self.cfg),
        )
        if not out["ok"]:
            raise self._refused(key_id, out)
        pacing = {k: out[k] for k in ("n_bins", "bin", "bin_start", "bin_end", "spent_at_bin_start", "z")}
        return Ticket(
            key_id,
            float(out["max_cost"]),
            rid,
            spent_usd=out["spent"],
            reserved_usd=out["reserved"],
            budget_usd=out["budget"],
            period_end=out["period_end"],
            allowed_models=tuple(out["allowed"]),
            pacing_z=float(out["z"]),
            pacing=pacing,
            _gate=self,
        )

    async def admit(self, principal, max_cost_usd: float) -> Ticket:
        """A Ticket, or ApiError 429 (`budget_exceeded` | `rate_limited`, Retry-After) / 503 (ledger unreachable:
        fail closed, a hard budget is not waived because its ledger is restarting)."""
        if not (isinstance(max_cost_usd, (int, float)) and math.isfinite(max_cost_usd) and max_cost_usd >= 0):
            raise ValueError(f"max_cost_usd must be a finite number >= 0, got {max_cost_usd!r}")
        key_id = getattr(principal, "key_id", None) if principal is not None else None
        budget = getattr(principal, "budget", None) if key_id is not None else None
        rate = getattr(principal, "rate_limit_per_min", None) if key_id is not None else None
        if key_id is None or (budget is None and rate is None):
            return Ticket(key_id, float(max_cost_usd), _gate=self)
        rid = f"rsv-{uuid.uuid4().hex}"
        out = await self._ledger(
            "admit",
            rid,
            key_id,
            None if budget is None else float(budget.usd),
            "total" if budget is None else budget.period,
            rate,
            float(max_cost_usd),
        )
        if not out["ok"]:
            raise self._refused(key_id, out)
        return Ticket(
            key_id,
            float(max_cost_usd),
            rid if budget is not None else None,
            spent_usd=out["spent"] if budget is not None else None,
            reserved_usd=out["reserved"] if budget is not None else None,
            budget_usd=out["budget"],
            period_end=out["period_end"] if budget is not None else None,
            _gate=self,
        )

    async def usage(self, principal) -> dict[str, Any] | None:
        """The key's current-period figures (None without a key or budget): spent, reserved, budget, bounds;
        for a zcl key also the pacing figures (bin, z)."""
        key_id = getattr(principal, "key_id", None)
        budget = getattr(principal, "budget", None)
        if key_id is None or budget is None:
            return None
        paced = getattr(budget, "pacing", "hard") == "zcl"
        kwargs = {"n_bins": pacing_bins(self.cfg), "budget_usd": float(budget.usd)} if paced else {}
        out = await self._ledger("usage", key_id, budget.period, **kwargs)
        return {**out, "budget": float(budget.usd), "period": budget.period, "pacing": getattr(budget, "pacing", "hard")}

    async def budget_status(self, principal) -> dict[str, Any]:
        """`GET /v1/budget`: the caller's own budget. A key without a budget (or auth off) answers 200 with
        budget_usd null and every figure null: the ledger keeps no spend for such keys."""
        out = await self.usage(principal)
        if out is None:
            names = ("budget_usd", "period", "pacing", "spent_usd", "reserved_usd", "period_start", "period_end", "z")
            return {"key_id": getattr(principal, "key_id", None), **dict.fromkeys(names), "bin": None}
        paced = out["pacing"] == "zcl"
        return {
            "key_id": principal.key_id,
            "budget_usd": out["budget"],
            "period": out["period"],
            "pacing": out["pacing"],
            "spent_usd": out["spent"],
            "reserved_usd": out["reserved"],
            "period_start": out["period_start"],
            "period_end": out["period_end"],
            "z": out["z"] if paced else None,
            "bin": {k: out[k] for k in ("n_bins", "bin", "bin_start", "bin_end", "spent_at_bin_start")} if paced else None,
        }
