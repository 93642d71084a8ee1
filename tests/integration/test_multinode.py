"""Two local Ray nodes (ray.cluster_utils.Cluster on 127.0.0.1): Serve places the app's replicas on both
and routed requests succeed. Runs in a subprocess because it needs a Ray of its own."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


@pytest.mark.slow
def test_replicas_spread_over_two_nodes(tmp_path, data_dir):
    proc = subprocess.run(
        [sys.executable, str(HERE / "multinode_app.py"), "8012", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=HERE.parents[1],
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (line,) = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    result = json.loads(line[len("RESULT ") :])
    assert len(result["nodes"]) == 2
    by_deployment = defaultdict(set)
    for r in result["replicas"]:
        by_deployment[r["deployment"]].add(r["node"])
    model_nodes = set().union(*(nodes for d, nodes in by_deployment.items() if d.startswith("model")))
    assert model_nodes == set(result["nodes"]), by_deployment  # model replicas on both nodes
    assert result["codes"] == [200] * 12
