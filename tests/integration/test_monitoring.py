"""What operators get for Prometheus and Grafana, checked with the real tools.

- ``promtool check rules`` and ``promtool test rules`` on the shipped alerts,
  with synthetic series that make every alert fire (tests/monitoring/).
- A real Prometheus server (Debian's package, on loopback) scrapes a running
  node fed through Mosquitto, loads the shipped alert rules, and answers
  every query of the shipped Grafana dashboard with data.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import (
    ROOT,
    free_port,
    start_mosquitto,
    start_node,
    wait_port,
    write_node_config,
)
from tests.peer import Peer, ResultListener, submission_id

ALERTS = ROOT / "config" / "prometheus" / "alerts.yml"
ALERT_TESTS = ROOT / "tests" / "monitoring" / "alerts.test.yml"
DASHBOARD = ROOT / "config" / "grafana" / "poc-node.json"
EXAMPLE = ROOT / "config" / "prometheus" / "prometheus.example.yml"


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is missing: install Debian's prometheus package (make test does)")
    return path


def test_the_alert_rules_are_valid_and_every_alert_fires_on_its_synthetic_series():
    check = subprocess.run(
        [_tool("promtool"), "check", "rules", str(ALERTS)], capture_output=True, text=True
    )
    assert check.returncode == 0, check.stdout + check.stderr
    names = [
        rule["alert"]
        for group in yaml.safe_load(ALERTS.read_text())["groups"]
        for rule in group["rules"]
    ]
    tests = yaml.safe_load(ALERT_TESTS.read_text())["tests"]
    firing = {
        case["alertname"]
        for test in tests
        for case in test["alert_rule_test"]
        if case.get("exp_alerts")
    }
    assert firing == set(names), f"alerts never shown firing: {set(names) - firing}"
    unit = subprocess.run(
        [_tool("promtool"), "test", "rules", str(ALERT_TESTS)], capture_output=True, text=True
    )
    assert unit.returncode == 0, unit.stdout + unit.stderr
    operating = (ROOT / "docs" / "OPERATING.md").read_text()
    for name in names:
        assert f"### {name}" in operating, f"{name} has no runbook in docs/OPERATING.md"


def _dashboard_queries() -> list[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    queries = []
    ids = set()
    for panel in dashboard["panels"]:
        assert panel["id"] not in ids
        ids.add(panel["id"])
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        for target in panel["targets"]:
            queries.append((panel["title"], target["expr"]))
    return queries


def _as_prometheus_query(expr: str) -> str:
    """Grafana's variables, as a dashboard with every instance and a 5-minute view sends them."""
    return expr.replace('instance=~"$instance"', 'instance=~".*"').replace("$__rate_interval", "5m")


def _query(port: int, expr: str) -> list[dict[str, Any]]:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=10) as response:
        body = json.load(response)
    assert body["status"] == "success", body
    return list(body["data"]["result"])


def test_a_real_prometheus_scrapes_a_node_and_every_dashboard_query_has_data(tmp_path: Path):
    queries = _dashboard_queries()
    assert len(queries) >= 20
    broker = start_mosquitto(tmp_path)
    bus = f"mqtt://127.0.0.1:{broker.port}"
    # The node under watch scores with the torch history index: the GPU's path
    # (scoring.device: cuda), run here on the CPU.
    node_config = write_node_config(
        tmp_path / "node.yaml", rounds={"round_seconds": 1}, scoring={"index": "torch"}
    )
    node = start_node(tmp_path / "node", bus, node_config)
    prometheus: subprocess.Popen[bytes] | None = None
    try:
        config = yaml.safe_load(EXAMPLE.read_text())
        config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
        config["rule_files"] = [str(ALERTS)]
        config["scrape_configs"][0]["static_configs"] = [
            {"targets": [f"127.0.0.1:{node.metrics_port}"]}
        ]
        (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
        port = free_port()
        prometheus = subprocess.Popen(
            [
                _tool("prometheus"),
                f"--config.file={tmp_path / 'prometheus.yml'}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=(tmp_path / "prometheus.log").open("wb"),
            stderr=subprocess.STDOUT,
        )
        wait_port(port, timeout=30)

        peer = Peer()
        raws = [
            peer.submission([("text", "text/plain", f"watched by prometheus {i}".encode())])
            for i in range(4)
        ]
        again = Peer().submission([("text", "text/plain", b"watched by prometheus 0")])

        async def feed() -> None:
            async with ResultListener(broker.port) as listener:
                for raw in raws:
                    await listener.publish(raw)
                for raw in raws:
                    await listener.final(submission_id(raw))
                await listener.publish(again)  # a duplicate: rejections by reason have data
                await listener.final(submission_id(again))

        asyncio.run(feed())

        empty: list[str] = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            empty = [
                f"{title}: {expr}"
                for title, expr in queries
                if not _query(port, _as_prometheus_query(expr))
            ]
            if not empty:
                break
            time.sleep(1)
        assert not empty, "dashboard queries without data:\n" + "\n".join(empty)
        assert _query(port, 'up{job="poc-node"}')[0]["value"][1] == "1"
        finals: list[dict[str, Any]] = []
        while time.monotonic() < deadline and not finals:  # the scrape after the last round
            finals = _query(port, 'poc_rounds_total{outcome="final"} > 0')
            time.sleep(0.5)
        assert finals, "Prometheus never saw the finalized rounds"
        # Results signed at intake count as their own stage, off the loop's "bus" share.
        assert _query(port, 'poc_stage_cpu_seconds_total{stage="sign"} > 0')
        assert "history_index=TorchHistoryIndex/cpu" in node.log_text()

        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/rules", timeout=10) as r:
            groups = json.load(r)["data"]["groups"]
        rules = [rule for group in groups for rule in group["rules"]]
        shipped = yaml.safe_load(ALERTS.read_text())
        count = sum(len(group["rules"]) for group in shipped["groups"])
        assert len(rules) == count and all(rule["health"] == "ok" for rule in rules), rules
        assert not [rule["name"] for rule in rules if rule["state"] == "firing"]
    finally:
        if prometheus is not None:
            prometheus.terminate()
            prometheus.wait(30)
        node.stop()
        broker.stop()
