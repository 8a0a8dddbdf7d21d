"""
The observability kit against the real thing: Debian's Prometheus scrapes a
real C{twistd -n smtprelay} while messages flow and evaluates the rules of
C{contrib/prometheus/alerts.yml}; C{promtool} checks and unit-tests the rules;
every metric name in the rules and the Grafana dashboard is one the relay
really emits; the Kubernetes scrape job matches the manifests' annotations.
"""

from __future__ import annotations

import json
import os
import re
import smtplib
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

import yaml
from prometheus_client.parser import text_string_to_metric_families
from twisted.trial.unittest import SynchronousTestCase

from .procs import HOST, TESTS, Processes, freePort, need, sinkMessages, waitFor, waitForPort

CONTRIB = os.path.join(os.path.dirname(TESTS), "contrib")
PROMETHEUS = os.path.join(CONTRIB, "prometheus")
RULES = os.path.join(PROMETHEUS, "alerts.yml")
DASHBOARD = os.path.join(CONTRIB, "grafana", "smtprelay.json")
DEPLOYMENT = os.path.join(CONTRIB, "kubernetes", "deployment.yaml")

_NOT_NAMES = frozenset({
    "and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring", "group_left",
    "group_right", "inf", "nan",
})


def metricNames(expr: str) -> set[str]:
    """
    The metric names a PromQL expression reads: identifiers that are not
    functions, keywords, label names or Grafana variables.
    """
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    expr = re.sub(r"\{[^}]*\}|\[[^\]]*\]|\$\w+", " ", expr)
    expr = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)
    return {
        m.group()
        for m in re.finditer(r"(?<![\w.])[A-Za-z_:][\w:]*", expr)
        if m.group() not in _NOT_NAMES and not expr[m.end():].lstrip().startswith("(")
    }


def rules() -> list[dict[str, Any]]:
    with open(RULES) as f:
        return [rule for group in yaml.safe_load(f)["groups"] for rule in group["rules"]]


def dashboardExpressions() -> list[str]:
    """
    The PromQL of every panel, and the series selector of every variable's
    C{label_values(SELECTOR, LABEL)}.
    """
    with open(DASHBOARD) as f:
        dashboard = json.load(f)
    return [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])] + [
        re.fullmatch(r"label_values\((.*), *\w+\)", v["definition"]).group(1)  # type: ignore[union-attr]  # every variable's definition has this form; None fails the test
        for v in dashboard["templating"]["list"] if "definition" in v
    ]


def ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return response.status == 200
    except urllib.error.HTTPError:
        return False


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    need("promtool")
    return subprocess.run(["promtool", *args], cwd=PROMETHEUS, capture_output=True, text=True, timeout=120)


class MetricNamesTests(SynchronousTestCase):
    """
    The name extraction the real-scrape check relies on.
    """

    def test_names(self) -> None:
        self.assertEqual(
            metricNames(
                'histogram_quantile(0.95, sum by (target, le) (rate(a_bucket{job=~"$job", x="y(z)"}[$__rate_interval])))'
                ' / ignoring (status) b:c:rate5m{status="deferred"} and on (job) up offset 5m > bool 0.5'
            ),
            {"a_bucket", "b:c:rate5m", "up"},
        )


class PromtoolTests(SynchronousTestCase):
    def test_checkRules(self) -> None:
        result = promtool("check", "rules", "alerts.yml")
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        self.assertIn(f"SUCCESS: {len(rules())} rules found", result.stdout)

    def test_testRules(self) -> None:
        """
        The alerts' unit tests (C{alerts_test.yml}): each alert fires on its
        synthetic series, and not before its C{for} or below its threshold.
        """
        result = promtool("test", "rules", "alerts_test.yml")
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        with open(os.path.join(PROMETHEUS, "alerts_test.yml")) as f:
            tested = {t["alertname"] for test in yaml.safe_load(f)["tests"] for t in test["alert_rule_test"]}
        self.assertEqual(tested, {rule["alert"] for rule in rules() if "alert" in rule}, "an alert without a test")

    def test_checkConfig(self) -> None:
        """
        The example scrape configuration, without its Kubernetes job:
        Debian's Prometheus is built without Kubernetes service discovery
        (the job is checked against the manifests instead).
        """
        with open(os.path.join(PROMETHEUS, "prometheus.yml")) as f:
            config = yaml.safe_load(f)
        config["scrape_configs"] = [j for j in config["scrape_configs"] if "kubernetes_sd_configs" not in j]
        self.assertEqual(config["rule_files"], ["alerts.yml"])
        config["rule_files"] = [RULES]
        path = self.mktemp()
        with open(path, "w") as f:
            yaml.safe_dump(config, f)
        result = promtool("check", "config", os.path.abspath(path))
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)

    def test_kubernetesAnnotations(self) -> None:
        """
        The Kubernetes job keeps the pods of C{contrib/kubernetes}: by their
        name label and C{prometheus.io/scrape}, on the port their
        C{prometheus.io/port} names, which is the container's metrics port.
        """
        with open(os.path.join(PROMETHEUS, "prometheus.yml")) as f:
            (job,) = [j for j in yaml.safe_load(f)["scrape_configs"] if "kubernetes_sd_configs" in j]
        with open(DEPLOYMENT) as f:
            pod = yaml.safe_load(f)["spec"]["template"]
        annotations, labels = pod["metadata"]["annotations"], pod["metadata"]["labels"]
        (container,) = pod["spec"]["containers"]
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        self.assertEqual(annotations["prometheus.io/port"], str(ports["metrics"]))

        def meta(kind: str, key: str) -> str:
            return f"__meta_kubernetes_pod_{kind}_" + re.sub(r"[^A-Za-z0-9_]", "_", key)

        relabel = {tuple(r["source_labels"]): r for r in job["relabel_configs"]}
        for kind, key, values in (("label", "app.kubernetes.io/name", labels), ("annotation", "prometheus.io/scrape", annotations)):
            rule = relabel[(meta(kind, key),)]
            self.assertEqual(rule["action"], "keep")
            self.assertRegex(values[key], f"^(?:{rule['regex']})$")
        address = relabel[("__address__", meta("annotation", "prometheus.io/port"))]
        self.assertEqual(
            re.sub(f"^(?:{address['regex']})$", address["replacement"].replace("$", "\\"),
                   f"10.1.2.3:2525;{annotations['prometheus.io/port']}"),
            f"10.1.2.3:{ports['metrics']}",
        )


class PrometheusTests(SynchronousTestCase):
    def test_scrapesRelay(self) -> None:
        """
        A real Prometheus scrapes a real relay every second while messages
        flow (the first of two endpoints dead, so that failovers happen; a
        bad command, so that a rejection is counted): the target is up, the
        relay's series are queryable, every rule evaluates without error, the
        recording rules see the traffic, and every name in the rules and the
        dashboard is one the relay emits and Prometheus holds.
        """
        need("prometheus", "promtool")
        procs = Processes(self)
        sinkPort, dumps = procs.smtpSink()
        listen, limited, metrics, prometheus = freePort(), freePort(), freePort(), freePort()
        config = os.path.join(procs.dir, "relay.conf")
        with open(config, "w") as f:
            f.write(f"""
hostname relay.test
probe_interval 1s
metrics tcp://{HOST}:{metrics}
smtp tcp://{HOST}:{listen} {{
    deliver_to smtp tcp://{HOST}:{freePort()} tcp://{HOST}:{sinkPort} {{
        backoff 0
    }}
}}
smtp tcp://{HOST}:{limited} {{
    limit_exceptions none
    max_connection_rate 1
    deliver_to smtp tcp://{HOST}:{sinkPort}
}}
""")
        procs.relay("--config", config, port=listen)
        waitForPort(metrics)

        with open(os.path.join(PROMETHEUS, "prometheus.yml")) as f:
            scrape = yaml.safe_load(f)
        (static,) = [j for j in scrape["scrape_configs"] if "static_configs" in j]
        static["static_configs"] = [{"targets": [f"{HOST}:{metrics}"]}]
        scrape.update(global_={}, rule_files=[RULES], scrape_configs=[static])
        scrape["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
        del scrape["global_"]
        promConfig = os.path.join(procs.dir, "prometheus.yml")
        with open(promConfig, "w") as f:
            yaml.safe_dump(scrape, f)
        procs.start("prometheus", [
            "prometheus", f"--config.file={promConfig}", f"--storage.tsdb.path={procs.dir}/tsdb",
            f"--web.listen-address={HOST}:{prometheus}",
        ])
        waitForPort(prometheus)
        # It listens before its storage is open, answering 503 until then.
        waitFor("Prometheus to be ready", lambda: ready(f"http://{HOST}:{prometheus}/-/ready"))

        def api(path: str, **params: str) -> Any:
            url = f"http://{HOST}:{prometheus}/api/v1/{path}?{urllib.parse.urlencode(params)}"
            with urllib.request.urlopen(url, timeout=30) as response:
                answer = json.load(response)
            self.assertEqual(answer["status"], "success")
            return answer["data"]

        def query(expr: str) -> dict[str, float]:
            return {
                json.dumps(r["metric"], sort_keys=True): float(r["value"][1])
                for r in api("query", query=expr)["result"]
            }

        waitFor("the first scrape", lambda: list(query('up{job="smtprelay"}').values()) == [1.0])
        messages = 6
        for _ in range(messages):
            with smtplib.SMTP(HOST, listen, timeout=60) as client:
                client.sendmail("a@example.org", ["r@example.net"], b"Subject: m\r\n\r\nbody\r\n")
                self.assertEqual(client.docmd("MAIL", "FROM:<bad")[0], 501)
        self.assertEqual(len(sinkMessages(dumps, messages)), messages)
        for expected in (220, 421):  # the second connection is over max_connection_rate
            with smtplib.SMTP(timeout=60) as client:
                self.assertEqual(client.connect(HOST, limited)[0], expected)

        waitFor(
            "Prometheus to scrape every message",
            lambda: list(query('smtprelay_transactions_total{job="smtprelay", status="sent"}').values()) == [messages],
        )
        (target,) = api("targets")["activeTargets"]
        self.assertEqual((target["health"], target["labels"]["job"], target["scrapeUrl"]),
                         ("up", "smtprelay", f"http://{HOST}:{metrics}/metrics"))
        waitFor("the relay to be ready in Prometheus", lambda: list(query("smtprelay_ready").values()) == [1.0])
        waitFor(
            "the recording rules to see the traffic",
            lambda: (r := query('instance_status:smtprelay_transactions:rate5m{status="sent"}')) and list(r.values())[0] > 0,
        )
        # The rate-limit alert's selector matches the relay's real reason.
        waitFor(
            "the rate limit's refusal in the recorded rejections",
            lambda: [json.loads(k)["reason"] for k, v in query(
                'instance_reason:smtprelay_rejections:rate5m{reason=~"rate_.*|too_many_connections"}').items() if v > 0]
            == ["rate_connections"],
        )

        def evaluated() -> list[dict[str, Any]] | None:
            found = [r for g in api("rules")["groups"] for r in g["rules"]]
            return found if all(r["lastEvaluation"] > "2000" for r in found) else None

        loaded = waitFor("every rule evaluated", evaluated)
        self.assertEqual(len(loaded), len(rules()))
        self.assertEqual([(r["name"], r["health"], r["lastError"]) for r in loaded if r["health"] != "ok"], [])

        emitted = {
            sample.name
            for family in text_string_to_metric_families(
                urllib.request.urlopen(f"http://{HOST}:{metrics}/metrics", timeout=30).read().decode()
            )
            for sample in family.samples
        }
        stored = set(query('group by (__name__) ({job="smtprelay"})'))
        stored = {json.loads(key)["__name__"] for key in stored}
        recorded = {rule["record"] for rule in rules() if "record" in rule}
        used = {name for rule in rules() for name in metricNames(rule["expr"])}
        shown = {name for expr in dashboardExpressions() for name in metricNames(expr)}
        self.assertTrue({"smtprelay_transactions_total", "smtprelay_end_of_data_seconds_bucket",
                         "smtprelay_downstream_attempts_total", "smtprelay_sessions_open",
                         "smtprelay_tls_handshakes_total", "smtprelay_rejections_total"} <= shown)
        # up is Prometheus' own series of each scrape (SmtprelayDown reads it).
        self.assertEqual(sorted(used - recorded - emitted - {"up"}), [], "rules read names the relay does not emit")
        self.assertEqual(sorted(used - recorded - stored - {"up"}), [], "rules read names Prometheus does not hold")
        self.assertEqual(sorted(shown - emitted), [], "the dashboard reads names the relay does not emit")
        self.assertEqual(sorted(shown - stored), [], "the dashboard reads names Prometheus does not hold")
