"""Render docs/dashboard.png: the Grafana dashboard in dashboards/banditrouter.json, drawn from samples scraped
off a real run of the app on a local Ray.

No Grafana or Prometheus runs here, so this script does the part of each that the picture needs:
- like Prometheus, it reads the targets Ray writes to its service-discovery file
  (/tmp/ray/prom_metrics_service_discovery.json, one metrics agent per node), scrapes each `/metrics` every
  `--scrape-interval` seconds and keeps the `ray_banditrouter_*` samples (gzipped JSONL, `--samples`);
- like Grafana, it evaluates every panel's PromQL target over those samples at each scrape time and draws the
  panels at their `gridPos` in the dashboard's 24-column grid (matplotlib).

The PromQL it evaluates is the subset the dashboard uses, with Prometheus's semantics: instant selectors with
label matchers (= != =~ !~), `rate` / `increase` over a range (Prometheus's extrapolation and counter-reset
handling), `sum|max|min|avg|count [by (...)]`, `histogram_quantile` (linear interpolation inside the bucket),
and a vector times or divided by a number. Anything else is a clear error naming the query, so a panel
added to the JSON with a construct this evaluator lacks fails here rather than drawing something wrong.

    # start the app (configs/online.yaml: learning on), drive traffic, scrape, stop, draw
    flock /tmp/ray.lock timeout 600 .venv/bin/python scripts/render_dashboard.py --config configs/online.yaml
    # attach to a running app instead (it keeps running)
    .venv/bin/python scripts/render_dashboard.py --attach --url http://127.0.0.1:8000
    # redraw from samples scraped earlier (no Ray)
    .venv/bin/python scripts/render_dashboard.py --from-samples reports/dashboard/samples.jsonl.gz
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from bisect import bisect_right
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "dashboards" / "banditrouter.json"
SD_FILE = Path("/tmp/ray/prom_metrics_service_discovery.json")
PREFIX = "ray_banditrouter_"

Labels = tuple[tuple[str, str], ...]  # sorted (name, value) pairs: one series' identity
Vector = dict[Labels, float]


class QueryError(ValueError):
    """A query outside the supported PromQL subset, or malformed."""


# -- samples ----------------------------------------------------------------------------------------------------
class SampleStore:
    """Scraped samples: per series (metric name + labels) its (time, value) points, plus the scrape times, so an
    instant selector sees only series present in the latest scrape (Prometheus marks vanished series stale)."""

    def __init__(self) -> None:
        self.series: dict[tuple[str, Labels], list[tuple[float, float]]] = {}
        self.scrape_times: list[float] = []
        self.meta: dict[str, Any] = {}  # how the run was driven (the samples file's first line)

    def add_scrape(self, t: float, samples: list[tuple[str, dict[str, str], float]]) -> None:
        if self.scrape_times and t <= self.scrape_times[-1]:
            raise ValueError(f"scrapes must come in time order: {t} after {self.scrape_times[-1]}")
        self.scrape_times.append(t)
        for name, labels, value in samples:
            self.series.setdefault((name, tuple(sorted(labels.items()))), []).append((t, float(value)))

    def names(self) -> set[str]:
        return {name for name, _ in self.series}


# -- PromQL subset: parser --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Num:
    value: float


@dataclass(frozen=True)
class Selector:
    name: str
    matchers: tuple[tuple[str, str, str], ...] = ()


@dataclass(frozen=True)
class RangeFn:
    fn: str  # rate | increase
    selector: Selector
    range_s: float


@dataclass(frozen=True)
class Quantile:
    q: float
    expr: Node


@dataclass(frozen=True)
class Agg:
    op: str
    by: tuple[str, ...] | None
    expr: Node


@dataclass(frozen=True)
class Binary:
    op: str
    lhs: Node
    rhs: Node


Node = Num | Selector | RangeFn | Quantile | Agg | Binary

AGG_OPS = {"sum", "max", "min", "avg", "count"}
UNITS_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_TOKEN = re.compile(
    r"\s*(?:(?P<num>\d+(?:\.\d*)?(?:[eE][+-]?\d+)?)(?P<unit>ms|s|m|h|d)?(?![A-Za-z0-9_])"
    r'|(?P<str>"(?:[^"\\]|\\.)*")|(?P<id>[A-Za-z_:][A-Za-z0-9_:]*)|(?P<op>=~|!~|!=|[=(){}\[\],*/]))'
)


def _tokens(query: str) -> list[tuple[str, Any]]:
    out, pos, end = [], 0, len(query.rstrip())
    while pos < end:
        m = _TOKEN.match(query, pos)
        if not m or m.end() == pos:
            raise QueryError(f"cannot read {query[pos:]!r} in {query!r}")
        pos = m.end()
        if m["num"] is not None:
            value = float(m["num"])
            out.append(("dur", value * UNITS_S[m["unit"]]) if m["unit"] else ("num", value))
        elif m["str"] is not None:
            out.append(("str", json.loads(m["str"])))
        elif m["id"] is not None:
            out.append(("id", m["id"]))
        else:
            out.append(("op", m["op"]))
    return out


class _Parser:
    def __init__(self, query: str):
        self.query, self.toks, self.i = query, _tokens(query), 0

    def peek(self) -> tuple[str, Any] | None:
        return self.toks[self.i] if self.i < len(self.toks) else None

    def take(self, kind: str, value: Any = None) -> Any:
        tok = self.peek()
        if tok is None or tok[0] != kind or (value is not None and tok[1] != value):
            want = value if value is not None else kind
            raise QueryError(f"expected {want!r} at token {self.i} ({tok!r}) in {self.query!r}")
        self.i += 1
        return tok[1]

    def at(self, kind: str, value: Any = None) -> bool:
        tok = self.peek()
        return tok is not None and tok[0] == kind and (value is None or tok[1] == value)

    def parse(self) -> Node:
        node = self.expr()
        if self.peek() is not None:
            raise QueryError(f"unexpected {self.peek()!r} in {self.query!r}")
        return node

    def expr(self) -> Node:
        node = self.term()
        while self.at("op", "*") or self.at("op", "/"):
            op = self.take("op")
            node = Binary(op, node, self.term())
        return node

    def by(self) -> tuple[str, ...]:
        self.take("op", "(")
        labels = [self.take("id")]
        while self.at("op", ","):
            self.take("op", ",")
            labels.append(self.take("id"))
        self.take("op", ")")
        return tuple(labels)

    def term(self) -> Node:
        if self.at("num"):
            return Num(self.take("num"))
        if self.at("op", "("):
            self.take("op", "(")
            node = self.expr()
            self.take("op", ")")
            return node
        name = self.take("id")
        if name in AGG_OPS and (self.at("op", "(") or self.at("id", "by")):
            by = None
            if self.at("id", "by"):
                self.take("id", "by")
                by = self.by()
            self.take("op", "(")
            inner = self.expr()
            self.take("op", ")")
            if self.at("id", "by"):
                if by is not None:
                    raise QueryError(f"two `by` clauses in {self.query!r}")
                self.take("id", "by")
                by = self.by()
            if self.at("id", "without"):
                raise QueryError(f"`without` is not supported: {self.query!r}")
            return Agg(name, by, inner)
        if name in ("rate", "increase"):
            self.take("op", "(")
            sel = self.selector(self.take("id"))
            self.take("op", "[")
            range_s = self.take("dur")
            self.take("op", "]")
            self.take("op", ")")
            return RangeFn(name, sel, range_s)
        if name == "histogram_quantile":
            self.take("op", "(")
            q = self.take("num")
            self.take("op", ",")
            inner = self.expr()
            self.take("op", ")")
            return Quantile(q, inner)
        if self.at("op", "("):
            raise QueryError(f"function {name!r} is not supported: {self.query!r}")
        return self.selector(name)

    def selector(self, name: str) -> Selector:
        matchers = []
        if self.at("op", "{"):
            self.take("op", "{")
            while not self.at("op", "}"):
                label = self.take("id")
                op = self.take("op")
                if op not in ("=", "!=", "=~", "!~"):
                    raise QueryError(f"bad matcher {label}{op} in {self.query!r}")
                matchers.append((label, op, self.take("str")))
                if self.at("op", ","):
                    self.take("op", ",")
            self.take("op", "}")
        return Selector(name, tuple(matchers))


def parse(query: str) -> Node:
    return _Parser(query).parse()


def metric_names(node: Node) -> set[str]:
    """The metric names a query reads (for the test that every panel reads a metric banditrouter defines)."""
    if isinstance(node, Selector):
        return {node.name}
    if isinstance(node, RangeFn):
        return {node.selector.name}
    if isinstance(node, (Quantile, Agg)):
        return metric_names(node.expr)
    if isinstance(node, Binary):
        return metric_names(node.lhs) | metric_names(node.rhs)
    return set()


# -- PromQL subset: evaluator -----------------------------------------------------------------------------------
def _matches(labels: dict[str, str], matchers: tuple[tuple[str, str, str], ...]) -> bool:
    for label, op, value in matchers:
        have = labels.get(label, "")
        if op == "=" and have != value or op == "!=" and have == value:
            return False
        if op in ("=~", "!~") and (re.fullmatch(value, have) is not None) != (op == "=~"):
            return False
    return True


def _series(store: SampleStore, sel: Selector):
    for (name, labels), points in store.series.items():
        if name == sel.name and _matches(dict(labels), sel.matchers):
            yield labels, points


def _drop_name(labels: Labels) -> Labels:
    return tuple(kv for kv in labels if kv[0] != "__name__")


def extrapolated_rate(points: list[tuple[float, float]], start: float, end: float, is_rate: bool) -> float | None:
    """Prometheus's `extrapolatedRate` (promql/functions.go) for a counter over the range (start, end]: the
    increase between the first and last sample (adding back counter resets), extrapolated to the range's edges
    when the samples reach to within 1.1 average intervals of them (else by half an interval), never below
    the counter's zero point; divided by the range for `rate`. None with fewer than two samples."""
    if len(points) < 2:
        return None
    (t0, v0), (t1, v1) = points[0], points[-1]
    result, last = v1 - v0, 0.0
    for _, v in points:
        if v < last:  # a counter reset: the counter restarted from 0
            result += last
        last = v
    sampled = t1 - t0
    avg = sampled / (len(points) - 1)
    to_start, to_end = t0 - start, end - t1
    threshold = avg * 1.1
    if to_start >= threshold:
        to_start = avg / 2
    if result > 0 and v0 >= 0:
        to_start = min(to_start, sampled * (v0 / result))  # counters are never negative
    if to_end >= threshold:
        to_end = avg / 2
    factor = (sampled + to_start + to_end) / sampled
    if is_rate:
        factor /= end - start
    return result * factor


def bucket_quantile(q: float, buckets: list[tuple[float, float]]) -> float:
    """Prometheus's `bucketQuantile`: the q-quantile from cumulative (upper bound, count) buckets, linear inside
    the bucket that holds the rank; NaN without a +Inf bucket or observations."""
    if q < 0:
        return -math.inf
    if q > 1:
        return math.inf
    merged: dict[float, float] = {}
    for le, count in buckets:
        merged[le] = merged.get(le, 0.0) + count
    bs = sorted(merged.items())
    if len(bs) < 2 or not math.isinf(bs[-1][0]):
        return math.nan
    counts = [c for _, c in bs]
    for k in range(1, len(counts)):  # rates of cumulative buckets can dip by float error: keep them monotonic
        counts[k] = max(counts[k], counts[k - 1])
    total = counts[-1]
    if total == 0:
        return math.nan
    rank = q * total
    b = next(k for k, c in enumerate(counts) if c >= rank)
    if b == len(bs) - 1:
        return bs[-2][0]
    if b == 0 and bs[0][0] <= 0:
        return bs[0][0]
    start, end, count = 0.0, bs[b][0], counts[b]
    if b > 0:
        start, count, rank = bs[b - 1][0], count - counts[b - 1], rank - counts[b - 1]
    return start + (end - start) * (rank / count)


def evaluate(node: Node, store: SampleStore, t: float) -> Vector | float:
    """The query's value at time `t`: an instant vector (labels -> value) or a number."""
    if isinstance(node, Num):
        return node.value
    if isinstance(node, Selector):
        k = bisect_right(store.scrape_times, t)
        if k == 0:
            return {}
        last_scrape = store.scrape_times[k - 1]
        out: Vector = {}
        for labels, points in _series(store, node):
            j = bisect_right(points, (last_scrape, math.inf))
            if j and points[j - 1][0] == last_scrape:  # present in the latest scrape: not stale
                out[(("__name__", node.name),) + labels] = points[j - 1][1]
        return out
    if isinstance(node, RangeFn):
        start = t - node.range_s
        out = {}
        for labels, points in _series(store, node.selector):
            window = [p for p in points if start < p[0] <= t]
            v = extrapolated_rate(window, start, t, is_rate=node.fn == "rate")
            if v is not None:
                out[_drop_name(labels)] = v
        return out
    if isinstance(node, Agg):
        vec = evaluate(node.expr, store, t)
        if not isinstance(vec, dict):
            raise QueryError(f"{node.op} needs a vector")
        groups: dict[Labels, list[float]] = {}
        for labels, v in vec.items():
            d = dict(labels)
            key = tuple(sorted((k, d[k]) for k in (node.by or ()) if k in d))
            groups.setdefault(key, []).append(v)
        fn = {"sum": sum, "max": max, "min": min, "avg": lambda vs: sum(vs) / len(vs), "count": len}[node.op]
        return {key: float(fn(vs)) for key, vs in groups.items()}
    if isinstance(node, Quantile):
        vec = evaluate(node.expr, store, t)
        if not isinstance(vec, dict):
            raise QueryError("histogram_quantile needs a vector")
        hists: dict[Labels, list[tuple[float, float]]] = {}
        for labels, v in vec.items():
            d = dict(_drop_name(labels))
            if "le" not in d:
                continue
            le = d.pop("le")
            hists.setdefault(tuple(sorted(d.items())), []).append((float(le), v))
        return {key: bucket_quantile(node.q, bs) for key, bs in hists.items()}
    if isinstance(node, Binary):
        lhs, rhs = evaluate(node.lhs, store, t), evaluate(node.rhs, store, t)

        def apply(a: float, b: float) -> float:
            if node.op == "*":
                return a * b
            return a / b if b else (math.nan if a == 0 else math.copysign(math.inf, a))

        if isinstance(lhs, dict) and isinstance(rhs, dict):
            raise QueryError("vector-to-vector arithmetic is not supported")
        if isinstance(lhs, dict):
            return {_drop_name(k): apply(v, rhs) for k, v in lhs.items()}
        if isinstance(rhs, dict):
            return {_drop_name(k): apply(lhs, v) for k, v in rhs.items()}
        return apply(lhs, rhs)
    raise QueryError(f"unknown node {node!r}")


def query_range(query: str, store: SampleStore, times: list[float]) -> dict[Labels, list[tuple[float, float]]]:
    """Like Prometheus's /api/v1/query_range at the given times: per output series its (time, value) points."""
    node = parse(query)
    out: dict[Labels, list[tuple[float, float]]] = {}
    for t in times:
        vec = evaluate(node, store, t)
        if not isinstance(vec, dict):
            vec = {(): vec}
        for labels, v in vec.items():
            if not math.isnan(v):
                out.setdefault(_drop_name(labels), []).append((t, v))
    return out


def legend(fmt: str, labels: Labels) -> str:
    d = dict(labels)
    if not fmt:
        return "{" + ", ".join(f'{k}="{v}"' for k, v in labels) + "}"
    return re.sub(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}", lambda m: d.get(m[1], ""), fmt)


def panel_queries(dashboard: dict) -> list[tuple[dict, dict]]:
    """(panel, target) for every PromQL target of every panel (rows' nested panels included)."""
    out = []
    for panel in dashboard["panels"]:
        for p in [panel, *panel.get("panels", [])]:
            for target in p.get("targets", []):
                out.append((p, target))
    return out


# -- scraping ---------------------------------------------------------------------------------------------------
def read_targets(sd_file: Path) -> list[str]:
    """host:port of every metrics agent in Ray's Prometheus file_sd document."""
    return [t for group in json.loads(sd_file.read_text()) for t in group["targets"]]


def scrape(targets: list[str], prefix: str = PREFIX, timeout_s: float = 5.0) -> list[tuple[str, dict[str, str], float]]:
    """One scrape of every target: the samples whose name starts with `prefix`, each labelled with its
    `instance` as Prometheus would (Ray's OpenTelemetry scope labels are dropped: constant noise)."""
    from prometheus_client.parser import text_string_to_metric_families

    out = []
    for target in targets:
        try:
            with urllib.request.urlopen(f"http://{target}/metrics", timeout=timeout_s) as r:
                text = r.read().decode()
        except (OSError, urllib.error.URLError):
            continue  # a target that is not up yet (or any more) is a missed scrape, as in Prometheus
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.name.startswith(prefix):
                    labels = {k: v for k, v in s.labels.items() if not k.startswith("otel_scope_")}
                    out.append((s.name, {**labels, "instance": target}, s.value))
    return out


def load_samples(path: Path) -> SampleStore:
    store = SampleStore()
    with gzip.open(path, "rt") as f:
        for line in f:
            row = json.loads(line)
            if "meta" in row:
                store.meta = row["meta"]
                continue
            store.add_scrape(row["t"], [(n, lab, v) for n, lab, v in row["samples"]])
    return store


# -- a live run ---------------------------------------------------------------------------------------------------
def _http(url: str, method: str = "GET", body: bytes | None = None, headers: dict | None = None) -> int:
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            r.read()
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return 0


def _wait_healthy(url: str, server: subprocess.Popen | None, timeout_s: float) -> None:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if server is not None and server.poll() is not None:
            raise SystemExit(f"the server exited with {server.returncode} before it was healthy")
        if _http(url + "/health") == 200:
            return
        time.sleep(2.0)
    raise SystemExit(f"{url}/health not ok within {timeout_s:.0f} s")


def _bad_client(url: str, stop: threading.Event, every_s: float, headers: dict, counts: dict) -> None:
    """Client mistakes at a low rate, so the 4xx panels show real answers: truncated JSON, an unknown model,
    an unknown path, a wrong method."""
    chat = url + "/v1/chat/completions"
    json_h = {"content-type": "application/json", **headers}
    unknown_model = json.dumps({"model": "no-such-model", "messages": [{"role": "user", "content": "hi"}]}).encode()
    calls = [
        lambda: _http(chat, "POST", b'{"model": "router", "messages": [', json_h),
        lambda: _http(chat, "POST", unknown_model, json_h),
        lambda: _http(url + "/v1/no-such-path", "GET", None, headers),
        lambda: _http(chat, "GET", None, headers),
    ]
    k = 0
    while not stop.wait(every_s):
        code = calls[k % len(calls)]()
        counts[code] = counts.get(code, 0) + 1
        k += 1


def _console_script(name: str) -> str:
    here = Path(sys.executable).parent / name
    return str(here) if here.exists() else (shutil.which(name) or name)


def derive_config(config: Path, work: Path, flaky: tuple[str, str] | None) -> Path:
    """The config, validated and written out with absolute paths, its state (learner, gateway ledger) under
    `work`; with `flaky=(model, base_url)` that model is served by an OpenAI-compatible upstream at base_url."""
    import yaml

    from banditrouter.config import load_config

    d = load_config(config).model_dump(mode="json")
    d["learning"]["state_dir"] = str(work / "state")
    d["gateway"]["state_dir"] = str(work / "gateway")
    if flaky is not None:
        model, base_url = flaky
        (m,) = [m for m in d["models"] if m["name"] == model] or [None]
        if m is None:
            raise SystemExit(f"--flaky-model {model!r} is not in {config}")
        m.update(backend="openai", replay=None, openai={"base_url": base_url, "timeout_s": 10.0, "max_retries": 1})
        m["input_price_per_mtok"] = m.get("input_price_per_mtok") or 8.0  # claude-v1's list price, USD per M tokens
        m["output_price_per_mtok"] = m.get("output_price_per_mtok") or 24.0
    out = work / "config.yaml"
    out.write_text(yaml.safe_dump(d, sort_keys=False))
    return out


def _start_upstream(work: Path) -> tuple[subprocess.Popen, str]:
    """tests/chaos/fake_upstream.py in its own process: (process, control URL)."""
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "chaos" / "fake_upstream.py"), "--port", "0"],
        stdout=subprocess.PIPE, stderr=open(work / "upstream.log", "w"), text=True, start_new_session=True,
    )  # fmt: skip
    line = proc.stdout.readline()
    if not line.startswith("PORT "):
        proc.kill()
        raise SystemExit(f"fake upstream did not start: {line!r}")
    return proc, f"http://127.0.0.1:{int(line.split()[1])}"


def run_live(args: argparse.Namespace) -> Path:
    """Start (or attach to) the app, drive traffic, scrape every metrics agent; returns the samples file."""
    samples_path = args.samples
    samples_path.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="render-dashboard-"))
    url = args.url.rstrip("/")
    server = upstream = None
    t_start = time.time()
    if args.flaky_model and not args.attach:
        upstream, upstream_url = _start_upstream(work)
    if not args.attach:
        flaky = (args.flaky_model, upstream_url + "/v1") if upstream else None
        config = derive_config(args.config, work, flaky)
        cmd = [_console_script("banditrouter"), "serve", "--config", str(config)]
        print("starting:", " ".join(cmd), flush=True)
        server = subprocess.Popen(cmd, start_new_session=True, stdout=open(work / "serve.log", "w"), stderr=subprocess.STDOUT)
    headers = {"authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    try:
        _wait_healthy(url, server, args.startup_timeout)
        print(f"healthy after {time.time() - t_start:.0f} s", flush=True)
        for _ in range(60):  # the head rewrites the file every few seconds; a stale one is from an older session
            if args.sd_file.exists() and (args.attach or args.sd_file.stat().st_mtime >= t_start):
                break
            time.sleep(1.0)
        else:
            raise SystemExit(f"no fresh {args.sd_file}: is the Ray dashboard (which writes it) running?")
        if args.cold_start:  # an untrained policy, so reward and versions move (JSON: reset refuses other types)
            code = _http(url + "/v1/learner/reset", "POST", b"{}", {"content-type": "application/json", **headers})
            print(f"learner reset: {code}", flush=True)
            time.sleep(1.0)  # routers install it
        sim = subprocess.Popen(
            [_console_script("banditrouter"), "simulate", "--url", url, "--requests", str(args.requests),
             "--concurrency", str(args.concurrency), "--seed", str(args.seed), "--out", str(work / "simulate")],
            start_new_session=True, stdout=open(work / "simulate.log", "w"), stderr=subprocess.STDOUT,
        )  # fmt: skip
        stop, bad_counts = threading.Event(), {}
        bad = threading.Thread(target=_bad_client, args=(url, stop, args.bad_every, headers, bad_counts), daemon=True)
        if args.bad_every > 0:
            bad.start()
        t_traffic = time.time()
        end = t_traffic + args.duration
        n, sim_ended = 0, False
        # the flaky model's upstream answers 500 in the middle third of the run: failures, retries, fallbacks
        faults = [(t_traffic + args.duration / 3, "500"), (t_traffic + 2 * args.duration / 3, "ok")] if upstream else []
        traffic = f"banditrouter simulate (closed loop, concurrency {args.concurrency}, explicit feedback)"
        if args.bad_every > 0:
            traffic += (
                f", a client mistake every {args.bad_every:g} s (truncated JSON, unknown model, unknown path, wrong method)"
            )
        if upstream:
            traffic += (
                f"; {args.flaky_model} served by tests/chaos/fake_upstream.py, answering 500 from "
                f"{args.duration / 3:.0f} s to {2 * args.duration / 3:.0f} s"
            )
        meta = {"config": str(args.config), "traffic": traffic, "cold_start": args.cold_start}
        with gzip.open(samples_path, "wt") as f:
            f.write(json.dumps({"meta": meta}) + "\n")
            while True:
                t = time.time()
                samples = scrape(read_targets(args.sd_file))
                f.write(json.dumps({"t": t, "samples": samples}) + "\n")
                n += 1
                if n % 6 == 0:
                    state = "running" if sim.poll() is None else "done"
                    print(f"scrape {n}: {len(samples)} samples, simulate {state}", flush=True)
                while faults and t >= faults[0][0]:
                    mode = faults.pop(0)[1]
                    body = json.dumps({args.flaky_model: {"mode": mode}}).encode()
                    code = _http(upstream_url + "/_control/mode", "POST", body, {"content-type": "application/json"})
                    print(f"{time.time() - t_traffic:.0f} s: upstream of {args.flaky_model} -> {mode} ({code})", flush=True)
                if t >= end:
                    break
                if sim.poll() is not None and not sim_ended:  # traffic over (or simulate failed): a short tail
                    sim_ended, end = True, min(end, t + args.tail)
                time.sleep(max(0.0, args.scrape_interval - (time.time() - t)))
        stop.set()
        if sim.poll() is None:
            os.killpg(sim.pid, signal.SIGINT)
            try:
                sim.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(sim.pid, signal.SIGKILL)
        print(f"{n} scrapes in {time.time() - t_start:.0f} s; bad-client answers {bad_counts}", flush=True)
        print("simulate log tail:", (work / "simulate.log").read_text()[-600:], flush=True)
    finally:
        if server is not None and server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(90)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait()
        if upstream is not None:
            upstream.terminate()
            upstream.wait(10)
        print(f"logs in {work}", flush=True)
    return samples_path


# -- drawing ------------------------------------------------------------------------------------------------------
UNITS = {"reqps": "req/s", "ops": "/s", "currencyUSD": "USD", "s": "s", "none": ""}
BG, PANEL, GRID, TEXT, DIM = "#111217", "#181b1f", "#2c3235", "#d8d9da", "#8e8e8e"
COLORS = ["#73bf69", "#f2cc0c", "#8ab8ff", "#ff780a", "#f2495c", "#5794f2", "#b877d9", "#705da0", "#37872d", "#fade2a",
          "#ff9830", "#c4162a", "#1f60c4", "#8f3bb8"]  # fmt: skip


def render(dashboard: dict, store: SampleStore, out: Path, note: str) -> dict[str, Any]:
    """Draw every panel at its gridPos; returns per panel the last value of each series (for the README)."""
    import matplotlib

    matplotlib.use("Agg")
    from datetime import datetime, timezone

    import matplotlib.dates as mdates
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    panels = dashboard["panels"]
    grid_h = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in panels)
    unit_in = 0.34
    fig = plt.figure(figsize=(22, grid_h * unit_in + 0.9), facecolor=BG)
    top_in = 0.9  # header band
    fig_h = grid_h * unit_in + top_in

    def rect(g: dict) -> tuple[float, float, float, float]:
        x0, w = g["x"] / 24, g["w"] / 24
        y_top = 1 - (top_in + g["y"] * unit_in) / fig_h
        h = g["h"] * unit_in / fig_h
        return x0, y_top - h, w, h

    fig.text(0.005, 1 - 0.3 / fig_h, dashboard["title"], color=TEXT, fontsize=15, weight="bold", va="center")
    fig.text(0.005, 1 - 0.65 / fig_h, note, color=DIM, fontsize=9, va="center")
    times = store.scrape_times
    summary: dict[str, Any] = {}
    for p in panels:
        x0, y0, w, h = rect(p["gridPos"])
        if p["type"] == "row":
            fig.text(x0 + 0.003, y0 + h / 2, p["title"], color=TEXT, fontsize=11, weight="bold", va="center")
            continue
        pad_x, pad_y = 0.004, 0.004
        box = fig.add_axes((x0 + pad_x / 2, y0 + pad_y / 2, w - pad_x, h - pad_y))
        box.set_facecolor(PANEL)
        box.set_xticks([])
        box.set_yticks([])
        for s in box.spines.values():
            s.set_color(GRID)
        unit = UNITS.get(p.get("fieldConfig", {}).get("defaults", {}).get("unit", "none"), "")
        box.text(0.01, 0.985, p["title"], transform=box.transAxes, color=TEXT, fontsize=9, weight="bold", va="top")
        # inner plot area: below the title, above the legend
        ax = fig.add_axes((x0 + w * 0.07, y0 + h * 0.30, w * 0.90, h * 0.58))
        ax.set_facecolor(PANEL)
        lines, last = [], {}
        k = 0
        for target in p.get("targets", []):
            for labels, pts in sorted(query_range(target["expr"], store, times).items()):
                name = legend(target.get("legendFormat", ""), labels)
                xs = [datetime.fromtimestamp(t, timezone.utc) for t, _ in pts]
                (ln,) = ax.plot(xs, [v for _, v in pts], color=COLORS[k % len(COLORS)], lw=1.3, label=name)
                lines.append(ln)
                last[name] = pts[-1][1]
                k += 1
        summary[p["title"]] = last
        ax.tick_params(colors=DIM, labelsize=7)
        for s in ax.spines.values():
            s.set_visible(False)
        ax.grid(color=GRID, lw=0.6)
        ax.xaxis.set_major_locator(mdates.AutoDateLocator(minticks=3, maxticks=8, tz=timezone.utc))
        ax.xaxis.set_major_formatter(mdates.DateFormatter("%H:%M:%S", tz=timezone.utc))
        ax.set_ylabel(unit, color=DIM, fontsize=7, labelpad=2)
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}"))
        if times:
            ax.set_xlim(datetime.fromtimestamp(times[0], timezone.utc), datetime.fromtimestamp(times[-1], timezone.utc))
        if not lines:
            ax.set_yticks([])
            ax.text(0.5, 0.5, "No data", transform=ax.transAxes, color=DIM, fontsize=11, ha="center", va="center")
            continue
        ncol = max(1, min(len(lines), int(p["gridPos"]["w"] / 3)))
        box.legend(handles=lines, loc="lower left", bbox_to_anchor=(0.0, 0.0), ncol=ncol, fontsize=6, frameon=False,
                   labelcolor=TEXT, handlelength=1.2, columnspacing=0.8, borderaxespad=0.3)  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110, facecolor=BG)
    plt.close(fig)
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dashboard", type=Path, default=DASHBOARD)
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "dashboard.png")
    ap.add_argument("--samples", type=Path, default=ROOT / "reports" / "dashboard" / "samples.jsonl.gz")
    ap.add_argument("--from-samples", type=Path, help="Draw from a samples file of an earlier run (no Ray).")
    ap.add_argument("--config", type=Path, default=ROOT / "configs" / "online.yaml", help="Config to serve (learning on).")
    ap.add_argument("--attach", action="store_true", help="Use the app already running at --url; do not start one.")
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--sd-file", type=Path, default=SD_FILE, help="Ray's Prometheus service-discovery file.")
    ap.add_argument("--api-key", default=os.environ.get("BANDITROUTER_API_KEY"), help="Key for the bad-client requests.")
    ap.add_argument("--duration", type=float, default=150.0, help="Seconds of traffic and scraping.")
    ap.add_argument("--scrape-interval", type=float, default=5.0)
    ap.add_argument("--requests", type=int, default=100000, help="simulate --requests (it is stopped at --duration).")
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cold-start", action=argparse.BooleanOptionalAction, default=True, help="Reset the learner first.")
    ap.add_argument(
        "--flaky-model",
        help="Serve this pool model from tests/chaos/fake_upstream.py, answering 500 in the middle third of the run "
        "(so the failure, retry and fallback panels have data).",
    )
    ap.add_argument("--bad-every", type=float, default=2.0, help="Seconds between client-mistake requests (0: none).")
    ap.add_argument("--tail", type=float, default=20.0, help="Seconds to scrape on after simulate ends early.")
    ap.add_argument("--startup-timeout", type=float, default=300.0)
    args = ap.parse_args()

    dashboard = json.loads(args.dashboard.read_text())
    for panel, target in panel_queries(dashboard):  # refuse an unsupported query before any Ray starts
        try:
            parse(target["expr"])
        except QueryError as e:
            raise SystemExit(f"panel {panel['title']!r}: {e}") from None
    path = args.from_samples or run_live(args)
    store = load_samples(path)
    if len(store.scrape_times) < 2:
        raise SystemExit(f"{path}: fewer than two scrapes")
    span = store.scrape_times[-1] - store.scrape_times[0]
    from datetime import datetime, timezone

    day = datetime.fromtimestamp(store.scrape_times[0], timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    note = (
        f"Rendered by scripts/render_dashboard.py from {len(store.scrape_times)} scrapes ({span:.0f} s, every "
        f"{span / (len(store.scrape_times) - 1):.0f} s) of Ray's metrics agents during a real local run on {day}; "
        "each panel's PromQL evaluated over those samples. Not a Grafana screenshot."
    )
    if store.meta:
        note += f"\nRun: {Path(store.meta['config']).name}; traffic: {store.meta['traffic']}."
    summary = render(dashboard, store, args.out, note)
    print(json.dumps({"out": str(args.out), "scrapes": len(store.scrape_times), "span_s": round(span, 1),
                      "metrics_seen": sorted(store.names()), "last_values": summary}, indent=1, default=str))  # fmt: skip


if __name__ == "__main__":
    main()
