"""The Grafana dashboard (dashboards/banditrouter.json) against banditrouter/metrics.py, and the PromQL subset
scripts/render_dashboard.py evaluates, on hand-made series with hand-computed answers. No Ray."""

from __future__ import annotations

import importlib.util
import json
import math
import re
import sys
from collections import deque
from pathlib import Path
from types import SimpleNamespace

import pytest
from ray.util.metrics import Gauge, Histogram, Metric

from banditrouter.metrics import GatewayMetrics, LearnerMetrics, RouterMetrics

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = json.loads((ROOT / "dashboards" / "banditrouter.json").read_text())
# Ray labels every exported sample with these (and Prometheus adds job/instance); `le` is a histogram's bucket
RAY_LABELS = {"Component", "NodeAddress", "SessionName", "Version", "WorkerId", "instance", "job"}


def _load_script():
    spec = importlib.util.spec_from_file_location("render_dashboard", ROOT / "scripts" / "render_dashboard.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["render_dashboard"] = mod  # dataclasses resolve their module while the class is built
    spec.loader.exec_module(mod)
    return mod


rd = _load_script()


def _metrics(obj) -> list[Metric]:
    return [v for v in vars(obj).values() if isinstance(v, Metric)]


def exported() -> dict[str, tuple[str, set[str]]]:
    """Every series name Ray exports for banditrouter's metrics (prefix `ray_`; a histogram as _bucket, _sum and
    _count) -> (the metric's name, the labels a query may use)."""
    out = {}
    for m in _metrics(RouterMetrics("r")) + _metrics(GatewayMetrics()) + _metrics(LearnerMetrics()):
        name, labels = m.info["name"], set(m.info["tag_keys"]) | RAY_LABELS
        if isinstance(m, Histogram):
            out[f"ray_{name}_bucket"] = (name, labels | {"le"})
            out[f"ray_{name}_sum"] = (name, labels)
            out[f"ray_{name}_count"] = (name, labels)
        else:
            out[f"ray_{name}"] = (name, labels)
    return out


def _labels_used(node) -> set[str]:
    if isinstance(node, rd.Agg):
        return set(node.by or ()) | _labels_used(node.expr)
    if isinstance(node, rd.Selector):
        return {label for label, _, _ in node.matchers}
    if isinstance(node, rd.RangeFn):
        return _labels_used(node.selector)
    if isinstance(node, rd.Quantile):
        return _labels_used(node.expr)
    if isinstance(node, rd.Binary):
        return _labels_used(node.lhs) | _labels_used(node.rhs)
    return set()


def _labels_kept(node) -> set[str] | None:
    """The labels a query's result keeps (None: all of the series')."""
    if isinstance(node, rd.Agg):
        return set(node.by or ())
    if isinstance(node, rd.Quantile):
        inner = _labels_kept(node.expr)
        return None if inner is None else inner - {"le"}
    if isinstance(node, rd.Binary):
        return _labels_kept(node.lhs) if not isinstance(node.lhs, rd.Num) else _labels_kept(node.rhs)
    return None


# -- the dashboard ------------------------------------------------------------------------------------------------
def test_dashboard_is_an_importable_grafana_dashboard():
    assert isinstance(DASHBOARD["schemaVersion"], int) and DASHBOARD["schemaVersion"] >= 30
    assert DASHBOARD["title"] and DASHBOARD["uid"]
    (ds,) = [v for v in DASHBOARD["templating"]["list"] if v["type"] == "datasource"]
    assert ds["query"] == "prometheus"
    ids = [p["id"] for p in DASHBOARD["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    cells = set()
    for p in DASHBOARD["panels"]:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24 and g["h"] > 0, p["title"]
        own = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not own & cells, f"panel {p['title']!r} overlaps another"
        cells |= own
        if p["type"] == "row":
            continue
        assert p["datasource"]["uid"] == "${" + ds["name"] + "}", p["title"]
        assert p["targets"], p["title"]
        for t in p["targets"]:
            assert t["expr"] and t["refId"] and t["datasource"]["uid"] == "${" + ds["name"] + "}"


def test_every_panel_reads_metrics_banditrouter_defines_with_their_labels():
    """A metric or tag renamed in metrics.py (or a typo in the JSON) fails here, not on a blank Grafana panel."""
    names = exported()
    for panel, target in rd.panel_queries(DASHBOARD):
        node = rd.parse(target["expr"])
        used = rd.metric_names(node)
        assert used, f"{panel['title']!r} reads no metric"
        for series in used:
            assert series in names, f"{panel['title']!r}: {series} is not exported by banditrouter/metrics.py"
            allowed = names[series][1]
            assert _labels_used(node) <= allowed, f"{panel['title']!r}: labels {_labels_used(node) - allowed} not on {series}"
        legend_labels = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", target.get("legendFormat", "")))
        kept = _labels_kept(node)
        assert kept is None or legend_labels <= kept, (
            f"{panel['title']!r}: legend uses {legend_labels - kept}, dropped by the query"
        )


def test_dashboard_covers_the_issue_list():
    """decisions and cost per model, reward, policy version per replica, staleness, learner lag, buffer depth,
    queue length, 4xx/5xx by code, budget spend per key, fallbacks/retries."""
    read = set().union(*(rd.metric_names(rd.parse(t["expr"])) for _, t in rd.panel_queries(DASHBOARD)))
    needed = {
        "decisions_total", "cost_usd_total", "reward", "policy_version", "install_staleness_s_bucket",
        "learner_lag_events", "buffer_depth_events", "queue_length", "http_responses_total",
        "key_spend_usd_total", "fallbacks_total", "retries_total",
    }  # fmt: skip
    assert {f"ray_banditrouter_{n}" for n in needed} <= read
    versions = [t["expr"] for _, t in rd.panel_queries(DASHBOARD) if "policy_version" in t["expr"]]
    assert any("by (replica)" in e for e in versions)
    errors = [t["expr"] for _, t in rd.panel_queries(DASHBOARD) if "http_responses_total" in t["expr"]]
    assert any('code=~"4..|5.."' in e and "code" in rd.parse(e).by for e in errors)


# -- the metrics the dashboard needed -----------------------------------------------------------------------------
class Recorder:
    def __init__(self):
        self.points = []

    def record(self, value, tags=None):
        self.points.append((value, dict(tags or {})))


def test_policy_version_is_labelled_per_router_replica():
    m = RouterMetrics("replica-7")
    m.version._metric = rec = Recorder()
    m.version.set(12)
    assert rec.points == [(12, {"replica": "replica-7"})]


def test_gauges_keep_exporting_their_last_value():
    """Ray 2.60 drops a gauge series ~20 s after its last set (a router's policy version, set only on install,
    vanished from /metrics 25-30 s later in a probe), so every banditrouter gauge re-exports its last value per
    tag set; the refresher thread calls refresh() every GAUGE_REFRESH_S."""
    from banditrouter.metrics import GAUGE_REFRESH_S, LastValueGauge

    gauges = [
        m for obj in (RouterMetrics("r"), GatewayMetrics(), LearnerMetrics()) for m in _metrics(obj) if isinstance(m, Gauge)
    ]
    assert gauges and all(isinstance(g, LastValueGauge) for g in gauges), [g.info["name"] for g in gauges]
    assert GAUGE_REFRESH_S < 20
    m = RouterMetrics("replica-3")
    m.version._metric = rec = Recorder()
    m.version.set(41)
    m.version.set(42)
    m.version.refresh()
    m.version.refresh()
    assert rec.points == [(41, {"replica": "replica-3"}), (42, {"replica": "replica-3"})] + [(42, {"replica": "replica-3"})] * 2
    lm = LearnerMetrics()
    lm.refused._metric = rec = Recorder()
    lm.refused.set(3, tags={"reason": "nan"})
    lm.refused.set(1, tags={"reason": "range"})
    lm.refused.set(None)  # a no-op, as in Ray
    rec.points.clear()
    lm.refused.refresh()
    assert sorted(rec.points, key=lambda p: p[0]) == [(1, {"reason": "range"}), (3, {"reason": "nan"})]


def test_report_install_observes_staleness_per_replica():
    """The learner's report_install feeds banditrouter_install_staleness_s{replica} (installs with no causing
    outcome, like the start version, are not observed)."""
    from learner.actors import LearnerActor

    metrics = LearnerMetrics()
    metrics.staleness._metric = rec = Recorder()
    me = SimpleNamespace(core=SimpleNamespace(version_feedback_time={5: 100.0}), installs=deque(maxlen=10), metrics=metrics)
    report = LearnerActor.__ray_metadata__.modified_class.report_install
    import asyncio

    asyncio.run(report(me, "r1", 5, 101.25))
    asyncio.run(report(me, "r2", 4, 101.5))  # no recorded outcome caused version 4
    assert rec.points == [(1.25, {"replica": "r1"})]
    assert [i["staleness_s"] for i in me.installs] == [1.25, None]


# -- the evaluator ------------------------------------------------------------------------------------------------
def store_of(rows: dict[float, list[tuple[str, dict, float]]]):
    s = rd.SampleStore()
    for t in sorted(rows):
        s.add_scrape(t, rows[t])
    return s


def test_rate_and_sum_by_match_prometheus_on_hand_made_series():
    """Two workers serve model a (one of them restarts: a counter reset), one serves model b; scrapes every 10 s.
    rate(x[1m]) at t=60 reads the samples in (0, 60]: Prometheus extrapolates to the window's start (the first
    sample is within 1.1 intervals of it) but not below the counter's zero point, and adds back resets."""
    a1 = [0, 10, 20, 30, 40, 50, 60]  # 1/s
    a2 = [0, 10, 20, 5, 15, 25, 35]  # reset between t=20 and t=30
    b = [0, 0, 3, 6, 9, 12, 15]  # 0.3/s from t=10
    rows = {
        10.0 * k: [
            ("ray_c_total", {"model": "a", "WorkerId": "w1"}, a1[k]),
            ("ray_c_total", {"model": "a", "WorkerId": "w2"}, a2[k]),
            ("ray_c_total", {"model": "b", "WorkerId": "w3"}, b[k]),
        ]
        for k in range(7)
    }
    s = store_of(rows)
    w1 = rd.evaluate(rd.parse('rate(ray_c_total{WorkerId="w1"}[1m])'), s, 60.0)
    assert w1 == {(("WorkerId", "w1"), ("model", "a")): pytest.approx(1.0)}
    # w2: samples 10, 20, 5, 15, 25, 35 -> increase 35-10 + 20 (reset) = 45 over 50 s, extrapolated 10 s to
    # the start (the zero point is 50*10/45 = 11.1 s back, further than the start): 45 * 60/50 = 54
    inc = rd.evaluate(rd.parse('increase(ray_c_total{WorkerId="w2"}[1m])'), s, 60.0)
    assert list(inc.values()) == [pytest.approx(54.0)]
    # b: samples 0, 3, ..., 15 -> increase 15 over 50 s; its zero point is the first sample, 0 s back: 15 / 60
    got = rd.evaluate(rd.parse("sum by (model) (rate(ray_c_total[1m]))"), s, 60.0)
    assert got == {(("model", "a"),): pytest.approx(1.0 + 0.9), (("model", "b"),): pytest.approx(15 * 50 / 50 / 60)}
    assert rd.evaluate(rd.parse("sum(rate(ray_c_total[1m])) * 60"), s, 60.0) == {(): pytest.approx((1.9 + 0.25) * 60)}
    # a window holding one sample has no rate
    assert rd.evaluate(rd.parse("rate(ray_c_total[5s])"), s, 60.0) == {}


def test_extrapolation_stops_half_an_interval_out_when_samples_end_early():
    # samples at 30..60 in a 60 s window ending at 60: 30 s from the start > 1.1 * 10 s, so only 5 s are added
    pts = [(30.0, 100.0), (40.0, 110.0), (50.0, 120.0), (60.0, 130.0)]
    assert rd.extrapolated_rate(pts, 0.0, 60.0, is_rate=False) == pytest.approx(30 * 35 / 30)


def test_gauges_selectors_matchers_and_staleness():
    rows = {
        0.0: [("ray_q", {"replica": "r1"}, 3.0), ("ray_q", {"replica": "r2"}, 5.0), ("ray_h", {"code": "200"}, 9.0)],
        5.0: [("ray_q", {"replica": "r1"}, 4.0), ("ray_h", {"code": "503"}, 2.0), ("ray_h", {"code": "404"}, 1.0)],
    }
    s = store_of(rows)
    # r2 vanished from the latest scrape: stale, as Prometheus would mark it
    assert rd.evaluate(rd.parse("max by (replica) (ray_q)"), s, 6.0) == {(("replica", "r1"),): 4.0}
    assert rd.evaluate(rd.parse("max by (replica) (ray_q)"), s, 1.0) == {(("replica", "r1"),): 3.0, (("replica", "r2"),): 5.0}
    assert rd.evaluate(rd.parse("sum(ray_q)"), s, 2.0) == {(): 8.0}
    errs = rd.evaluate(rd.parse('sum by (code) (ray_h{code=~"4..|5.."})'), s, 5.0)
    assert errs == {(("code", "404"),): 1.0, (("code", "503"),): 2.0}
    assert rd.evaluate(rd.parse('ray_h{code!~"5.."}'), s, 5.0) == {(("__name__", "ray_h"), ("code", "404")): 1.0}
    assert rd.evaluate(rd.parse("sum(ray_q)"), s, -1.0) == {}  # before the first scrape


def test_histogram_quantile_interpolates_inside_the_bucket():
    buckets = [("1.0", 2.0), ("2.0", 6.0), ("+Inf", 8.0)]
    s = store_of({0.0: [("ray_s_bucket", {"le": le, "replica": r}, c / 2) for le, c in buckets for r in ("x", "y")]})
    med = rd.evaluate(rd.parse("histogram_quantile(0.5, sum by (le) (ray_s_bucket))"), s, 0.0)
    assert med == {(): pytest.approx(1.5)}  # rank 4 of 8: halfway through the (1, 2] bucket's 4 observations
    p95 = rd.evaluate(rd.parse("histogram_quantile(0.95, sum by (le) (ray_s_bucket))"), s, 0.0)
    assert p95 == {(): 2.0}  # in the +Inf bucket: the highest finite bound
    assert math.isnan(rd.bucket_quantile(0.5, [(1.0, 0.0), (math.inf, 0.0)]))
    assert math.isnan(rd.bucket_quantile(0.5, [(1.0, 3.0), (2.0, 4.0)]))  # no +Inf bucket


@pytest.mark.parametrize(
    "query", ["irate(x[1m])", "x + y", "sum without (a) (x)", "rate(x)", "sum by (a) (x) by (b)", "x{a~'b'}"]
)
def test_queries_outside_the_subset_are_refused(query):
    with pytest.raises(rd.QueryError):
        rd.parse(query)


def test_query_range_and_legend():
    s = store_of({float(t): [("ray_g", {"model": "m"}, float(t))] for t in (0, 5, 10)})
    series = rd.query_range("max by (model) (ray_g)", s, s.scrape_times)
    assert series == {(("model", "m"),): [(0.0, 0.0), (5.0, 5.0), (10.0, 10.0)]}
    assert rd.legend("{{model}} (USD/h)", (("model", "m"),)) == "m (USD/h)"


def test_scrape_parses_ray_exposition(monkeypatch):
    """What Ray 2.60's metrics agent serves (copied from a scrape): counters keep their _total name, labels
    include Ray's own; the OpenTelemetry scope labels are dropped and `instance` added."""
    text = (
        "# HELP ray_banditrouter_decisions_total Routed decisions per model.\n"
        "# TYPE ray_banditrouter_decisions_total counter\n"
        'ray_banditrouter_decisions_total{Component="core_worker",WorkerId="c0",model="m1",'
        'otel_scope_name="ray._private.telemetry.open_telemetry_metric_recorder",otel_scope_version=""} 2.0\n'
        "# HELP ray_other x\n# TYPE ray_other gauge\nray_other 1.0\n"
    )

    class Resp:
        def __init__(self, body):
            self.body = body

        def read(self):
            return self.body.encode()

        def __enter__(self):
            return self

        def __exit__(self, *a):
            return False

    monkeypatch.setattr(rd.urllib.request, "urlopen", lambda url, timeout: Resp(text))
    got = rd.scrape(["127.0.0.1:1"])
    assert got == [
        (
            "ray_banditrouter_decisions_total",
            {"Component": "core_worker", "WorkerId": "c0", "model": "m1", "instance": "127.0.0.1:1"},
            2.0,
        )
    ]


def test_prometheus_example_scrapes_the_file_ray_writes():
    import yaml
    from ray._private.ray_constants import PROMETHEUS_SERVICE_DISCOVERY_FILE

    cfg = yaml.safe_load((ROOT / "dashboards" / "prometheus.yml").read_text())
    (job,) = [j for j in cfg["scrape_configs"] if j["job_name"] == "ray"]
    assert job["file_sd_configs"][0]["files"] == [f"/tmp/ray/{PROMETHEUS_SERVICE_DISCOVERY_FILE}"]
    assert rd.SD_FILE == Path("/tmp/ray") / PROMETHEUS_SERVICE_DISCOVERY_FILE
