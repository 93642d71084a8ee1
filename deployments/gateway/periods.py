"""Budget periods: UTC calendar periods, `total`, and short fixed periods written "<N>s".

- `hour`, `day` (from 00:00), `week` (from Monday 00:00), `month` (from the 1st, 00:00): UTC calendar periods;
- `total`: never resets;
- `"<N>s"` (N an integer >= 10): epoch-aligned N-second periods, start = floor(t / N) * N. For demos and tests
  of pacing (a "300s" budget runs a whole period in five minutes); any N works, so "3600s" is an hour that
  starts on the hour just like `hour`, but it is kept apart from it in the ledger.

No Ray and no I/O here: the key store (auth.py) validates periods with it and the ledger (budgets.py) computes
period bounds with it.
"""

from __future__ import annotations

import math
import re
from datetime import datetime, timedelta, timezone

CALENDAR_PERIODS = ("hour", "day", "week", "month", "total")
"""The periods the ledger charges every cost to, whatever the key's period (spend survives a period change)."""
MIN_CUSTOM_PERIOD_S = 10
_CUSTOM = re.compile(r"^([0-9]{1,12})s$")
PERIOD_HELP = "hour, day, week, month, total, or '<N>s' (N >= 10 whole seconds, epoch-aligned)"


def custom_period_seconds(period: str) -> int | None:
    """N for a period written "<N>s", None for a calendar period; ValueError for anything else."""
    if period in CALENDAR_PERIODS:
        return None
    m = _CUSTOM.match(period) if isinstance(period, str) else None
    if m is None:
        raise ValueError(f"unknown budget period {period!r}; expected {PERIOD_HELP}")
    n = int(m.group(1))
    if n < MIN_CUSTOM_PERIOD_S:
        raise ValueError(f"budget period {period!r} is too short; a '<N>s' period needs N >= {MIN_CUSTOM_PERIOD_S}")
    return n


def check_period(period: str) -> str:
    """`period` itself when valid, else ValueError with the accepted forms."""
    custom_period_seconds(period)
    return period


def period_bounds(period: str, now: float) -> tuple[float, float | None]:
    """(start, end) in epoch seconds of the period holding `now`; end None for `total`."""
    n = custom_period_seconds(period)
    if n is not None:
        start = math.floor(now / n) * n
        return float(start), float(start + n)
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
    else:  # month
        start = t.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        end = start.replace(year=start.year + 1, month=1) if start.month == 12 else start.replace(month=start.month + 1)
    return start.timestamp(), end.timestamp()


def describe(period: str) -> str:
    """For messages: 'in total', 'this day (UTC)', 'this 300 s period'."""
    if period == "total":
        return "in total"
    n = custom_period_seconds(period)
    return f"this {n} s period" if n is not None else f"this {period} (UTC)"
