"""Per-key hard budgets (USD per calendar period) and rate limits (requests per minute), durable.

How a request is admitted (the ingress, per request):

    ticket = await gate.admit(principal, max_cost_usd)   # 429 budget_exceeded | rate_limited, or a reservation
    ... call the model ...
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

Periods are UTC calendar periods: `hour`, `day` (from 00:00), `week` (from Monday 00:00), `month` (from the
1st, 00:00), or `total` (never resets). A cost counts in the period its request was *admitted* in (that is
where it was reserved). Spend is kept per (key, period kind, period start) for all five kinds at once, so a
key whose budget period is changed in the key store keeps its true spend.

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

For budget pacing (issue 12) `usage(key, period)` returns the period's spend, reservations and bounds (z =
spent / budget), and `Ticket` carries the figures of its admission.
"""

from __future__ import annotations

import asyncio
import logging
import math
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import ray

from deployments.gateway.errors import ApiError

log = logging.getLogger(__name__)

PERIODS = ("hour", "day", "week", "month", "total")
RATE_WINDOW_S = 60.0
"""Rate limits are requests per minute over a sliding 60 s window."""
LEDGER_PREFIX = "banditrouter-ledger"
_EPS = 1e-12  # float slack on the budget comparison (sums of many small costs)


# ---------------------------------------------------------------------------------------------------------
# calendar periods (UTC)
# ---------------------------------------------------------------------------------------------------------
def period_bounds(period: str, now: float) -> tuple[float, float | None]:
    """(start, end) in epoch seconds of the UTC calendar period holding `now`; end None for `total`."""
    if period == "total":
        return 0.0, None
    t = datetime.fromtimestamp(now, tz=timezone.utc)
    if period == "hour":
        start = t.replace(minute=0, second=0, microsecond=0)
        end = start + timedelta(hours=1)
    elif period == "day":
        start = t.replace(hour=0, minute=0, second=0, microsecond=0)
        end = start + timedelta(days=1)
    elif period == "week":  # ISO weeks: Monday 00:00 UTC
        start = t.replace(hour=0, minute=0, second=0, microsecond=0) - timedelta(days=t.weekday())
        end = start + timedelta(days=7)
    elif period == "month":
        start = t.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        end = start.replace(year=start.year + 1, month=1) if start.month == 12 else start.replace(month=start.month + 1)
    else:
        raise ValueError(f"unknown budget period {period!r}; expected one of {PERIODS}")
    return start.timestamp(), end.timestamp()


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
    expires REAL NOT NULL, state TEXT NOT NULL  -- open | expired (charged at max_usd, kept for a late settle)
);
CREATE INDEX IF NOT EXISTS reservations_key ON reservations (key_id, state, t);
CREATE INDEX IF NOT EXISTS reservations_expiry ON reservations (state, expires);
CREATE TABLE IF NOT EXISTS hits (id TEXT PRIMARY KEY, key_id TEXT NOT NULL, t REAL NOT NULL);
CREATE INDEX IF NOT EXISTS hits_key ON hits (key_id, t);
"""


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
        self.db.executescript(_SCHEMA)
        self._last_prune = -math.inf

    # -- helpers (called inside a transaction) ------------------------------------------------------------
    def _charge(self, key_id: str, t: float, usd: float) -> None:
        """Add `usd` (may be negative: a late settle below the charged maximum) to every period holding t."""
        for p in PERIODS:
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
            "SELECT id, key_id, t, max_usd FROM reservations WHERE state = 'open' AND expires <= ?", (now,)
        ).fetchall()
        for rid, key_id, t, max_usd in rows:
            self._charge(key_id, t, max_usd)
            self.db.execute("UPDATE reservations SET state = 'expired', expires = ? WHERE id = ?", (now + self.ttl, rid))
        if rows:
            log.warning("ledger: %d reservation(s) never settled; charged at their maximum", len(rows))
        self.db.execute("DELETE FROM reservations WHERE state = 'expired' AND expires <= ?", (now,))
        if now - self._last_prune > RATE_WINDOW_S:  # bounded by construction: old windows and periods go
            self._last_prune = now
            self.db.execute("DELETE FROM hits WHERE t <= ?", (now - RATE_WINDOW_S,))
            self.db.execute("DELETE FROM totals WHERE period != 'total' AND start < ?", (now - 70 * 86400.0,))
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
        """Admit one request of maximum cost `max_cost` for `key_id`, or refuse it.

        {"ok": True, "spent", "reserved", "budget", "period_start", "period_end"} after recording the
        admission (a rate-window slot, and with a budget a reservation of max_cost), or {"ok": False, "code":
        "rate_limited" | "budget_exceeded", "retry_after_s": float | None, "message"}. Idempotent by
        `reservation_id`: a repeated call answers ok without reserving again."""
        if not (isinstance(max_cost, (int, float)) and math.isfinite(max_cost) and max_cost >= 0):
            raise ValueError(f"max_cost must be a finite number >= 0, got {max_cost!r}")
        if budget_usd is not None and not (math.isfinite(budget_usd) and budget_usd >= 0):
            raise ValueError(f"budget_usd must be a finite number >= 0, got {budget_usd!r}")
        if rate_per_min is not None and rate_per_min < 1:
            raise ValueError(f"rate_per_min must be >= 1, got {rate_per_min!r}")
        if period not in PERIODS:
            raise ValueError(f"unknown budget period {period!r}; expected one of {PERIODS}")
        return self._tx(self._admit, reservation_id, key_id, budget_usd, period, rate_per_min, float(max_cost), now)

    def _admit(self, rid, key_id, budget_usd, period, rate_per_min, max_cost, now) -> dict[str, Any]:
        now = self.clock() if now is None else float(now)
        self._expire(now)
        start, end = period_bounds(period, now)
        figures = {"budget": budget_usd, "period_start": start, "period_end": end}
        if (
            self.db.execute("SELECT 1 FROM hits WHERE id = ?", (rid,)).fetchone()
            or self.db.execute("SELECT 1 FROM reservations WHERE id = ?", (rid,)).fetchone()
        ):  # a retried call: it was admitted already
            return {"ok": True, "spent": self._spent(key_id, period, start), "reserved": self._reserved(key_id, start), **figures}
        if rate_per_min is not None:
            since = now - RATE_WINDOW_S
            (n,) = self.db.execute("SELECT COUNT(*) FROM hits WHERE key_id = ? AND t > ?", (key_id, since)).fetchone()
            if n >= rate_per_min:
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
        spent = reserved = 0.0
        if budget_usd is not None:
            spent, reserved = self._spent(key_id, period, start), self._reserved(key_id, start)
            if spent + reserved + max_cost > budget_usd + _EPS:
                return self._refusal(budget_usd, period, spent, reserved, max_cost, now, end)
        self.db.execute("INSERT INTO hits (id, key_id, t) VALUES (?, ?, ?)", (rid, key_id, now))
        if budget_usd is not None:
            self.db.execute(
                "INSERT INTO reservations (id, key_id, t, max_usd, expires, state) VALUES (?, ?, ?, ?, ?, 'open')",
                (rid, key_id, now, max_cost, now + self.ttl),
            )
            reserved += max_cost
        return {"ok": True, "spent": spent, "reserved": reserved, **figures}

    @staticmethod
    def _refusal(budget, period, spent, reserved, max_cost, now, end) -> dict[str, Any]:
        where = "in total" if period == "total" else f"this {period} (UTC)"
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
        row = self.db.execute("SELECT key_id, t, max_usd, state FROM reservations WHERE id = ?", (rid,)).fetchone()
        if row is None:
            return {"status": "unknown", "charged": 0.0}
        key_id, t, max_usd, state = row
        usd = max_usd if cost is None else cost
        if usd > max_usd + _EPS:
            log.warning("ledger: key %s charged $%.6g over a reserved maximum of $%.6g", key_id, usd, max_usd)
        self._charge(key_id, t, usd if state == "open" else usd - max_usd)
        self.db.execute("DELETE FROM reservations WHERE id = ?", (rid,))
        self._expire(now)
        return {"status": "settled" if state == "open" else "settled_late", "charged": usd}

    def usage(self, key_id: str, period: str, now: float | None = None) -> dict[str, Any]:
        """{"spent", "reserved", "period_start", "period_end"} of the key's current period (for pacing)."""
        if period not in PERIODS:
            raise ValueError(f"unknown budget period {period!r}; expected one of {PERIODS}")

        def read():
            t = self.clock() if now is None else float(now)
            self._expire(t)
            start, end = period_bounds(period, t)
            return {
                "spent": self._spent(key_id, period, start),
                "reserved": self._reserved(key_id, start),
                "period_start": start,
                "period_end": end,
            }

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

    async def _call(self, method: str, *args):
        if self._local is not None:
            return await asyncio.to_thread(getattr(self._local, method), *args)
        if self._actor is None:  # found (or created) on first use, off the event loop: it asks the GCS
            self._actor = await asyncio.to_thread(get_or_create_ledger, self.cfg)
        return await asyncio.wait_for(getattr(self._actor, method).remote(*args), self.timeout_s)

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
        try:
            out = await self._call(
                "admit",
                rid,
                key_id,
                None if budget is None else float(budget.usd),
                "total" if budget is None else budget.period,
                rate,
                float(max_cost_usd),
            )
        except Exception as e:  # actor unreachable past timeout_s, or restarting without end
            log.warning("ledger: admit failed: %r", e)
            raise ApiError(
                503, "the budget ledger is not reachable; retry shortly", "overloaded", "ledger_unavailable", retry_after_s=1.0
            ) from None
        if not out["ok"]:
            self.metrics.refused(key_id, out["code"])
            raise ApiError(429, out["message"], "rate_limit_error", out["code"], retry_after_s=out["retry_after_s"])
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
        """The key's current-period figures (None without a key or budget): spent, reserved, budget, bounds."""
        key_id = getattr(principal, "key_id", None)
        budget = getattr(principal, "budget", None)
        if key_id is None or budget is None:
            return None
        out = await self._call("usage", key_id, budget.period)
        return {**out, "budget": float(budget.usd), "period": budget.period}
