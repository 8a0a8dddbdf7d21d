"""
The deployment manifests in C{contrib/} and the README that documents the
image.  The Kubernetes manifests pass C{kubernetes-validate} (strict,
offline, against the oldest and the newest Kubernetes it knows) and agree
with the image (user, ports, health paths, drain time); every
C{SMTPRELAY_*} variable the manifests set is one the image reads, and the
README documents each of those.  The Compose file's HAProxy passes
C{haproxy -c} and speaks the PROXY protocol to relays that trust it.
"""

from __future__ import annotations

import glob
import os
import re
import subprocess
from typing import Any

import kubernetes_validate
import yaml
from twisted.trial.unittest import SynchronousTestCase

from smtprelay.config.values import parseDuration

from .procs import need

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONTRIB = os.path.join(ROOT, "contrib")
KUBERNETES = os.path.join(CONTRIB, "kubernetes")
VERSIONS = (kubernetes_validate.utils.all_versions()[0], kubernetes_validate.utils.latest_version())


def read(*path: str) -> str:
    with open(os.path.join(CONTRIB, *path), encoding="utf-8") as f:
        return f.read()


def imageVariables() -> set[str]:
    """
    The C{SMTPRELAY_*} variables the image reads or sets, but not the
    entrypoint's own C{SMTPRELAY_PART_*}.
    """
    texts = [read("container", name) for name in ("Containerfile", "relay.conf", "entrypoint.sh", "healthcheck.py")]
    texts += [read("container", "parts", name) for name in os.listdir(os.path.join(CONTRIB, "container", "parts"))]
    names = set(re.findall(r"SMTPRELAY_[A-Z_]*[A-Z]", "\n".join(texts)))
    return {name for name in names if not name.startswith("SMTPRELAY_PART_")}


def resources() -> dict[str, dict[str, Any]]:
    """
    The Kubernetes resources in C{contrib/kubernetes}, by kind.
    """
    found: dict[str, dict[str, Any]] = {}
    for path in sorted(glob.glob(os.path.join(KUBERNETES, "*.yaml"))):
        with open(path, encoding="utf-8") as f:
            for resource in yaml.safe_load_all(f):
                found[resource["kind"]] = resource
    return found


class KubernetesTests(SynchronousTestCase):
    def test_valid(self) -> None:
        found = resources()
        self.assertEqual(sorted(found), ["ConfigMap", "Deployment", "PodDisruptionBudget", "Secret", "Service"])
        for kind, resource in found.items():
            for version in VERSIONS:
                with self.subTest(kind=kind, version=version):
                    kubernetes_validate.validate(resource, version, strict=True)

    def test_invalidFails(self) -> None:
        """
        The validation sees a misspelt field: the check can fail.
        """
        deployment = resources()["Deployment"]
        container = deployment["spec"]["template"]["spec"]["containers"][0]
        container["readinesProbe"] = container.pop("readinessProbe")
        with self.assertRaises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(deployment, VERSIONS[-1], strict=True)

    def test_agreesWithTheImage(self) -> None:
        """
        The pod runs as the image's user, probes C{/healthz} (liveness) and
        C{/readyz} (readiness) on the image's metrics port, gives the drain
        time to finish, and the Service reaches the image's SMTP port.
        """
        found = resources()
        pod = found["Deployment"]["spec"]["template"]["spec"]
        [container] = pod["containers"]
        containerfile = read("container", "Containerfile")
        [user] = re.findall(r"^USER (\d+):(\d+)$", containerfile, re.M)
        self.assertEqual((str(pod["securityContext"]["runAsUser"]), str(pod["securityContext"]["runAsGroup"])), user)
        ports = {port["name"]: port["containerPort"] for port in container["ports"]}
        self.assertIn(f"SMTPRELAY_METRICS=tcp://0.0.0.0:{ports['metrics']} ", containerfile)
        self.assertIn(f"SMTPRELAY_LISTEN=tcp://0.0.0.0:{ports['smtp']} ", containerfile)
        self.assertEqual(re.findall(r"^EXPOSE (.*)$", containerfile, re.M), [f"{ports['smtp']} {ports['metrics']}"])
        self.assertEqual((container["livenessProbe"]["httpGet"], container["readinessProbe"]["httpGet"]),
                         ({"path": "/healthz", "port": "metrics"}, {"path": "/readyz", "port": "metrics"}))
        [service] = found["Service"]["spec"]["ports"]
        self.assertEqual((service["port"], service["targetPort"]), (25, "smtp"))
        pause = container["lifecycle"]["preStop"]["exec"]["command"]
        self.assertEqual(pause[0], "sleep")
        drain = parseDuration(found["ConfigMap"]["data"]["SMTPRELAY_SHUTDOWN_TIMEOUT"])
        self.assertGreater(pod["terminationGracePeriodSeconds"], int(pause[1]) + drain)
        self.assertEqual(found["PodDisruptionBudget"]["spec"]["selector"], found["Deployment"]["spec"]["selector"])

    def test_variablesAreTheImages(self) -> None:
        found = resources()
        names = set(found["ConfigMap"]["data"]) | set(found["Secret"]["stringData"])
        self.assertEqual(names - imageVariables(), set())


class ComposeTests(SynchronousTestCase):
    def test_haproxyChecks(self) -> None:
        need("haproxy")
        done = subprocess.run(["haproxy", "-c", "-f", os.path.join(CONTRIB, "haproxy-compose.cfg")],
                              capture_output=True, text=True, timeout=60)
        self.assertEqual(done.returncode, 0, done.stdout + done.stderr)

    def test_relaysBehindHAProxy(self) -> None:
        """
        HAProxy sends PROXY v2 to every relay service and checks its
        C{/healthz} on the image's metrics port; the relays trust PROXY
        headers from the compose network only and set only variables the
        image reads.
        """
        compose = yaml.safe_load(read("compose.yaml"))
        services = compose["services"]
        relays = sorted(name for name in services if name != "haproxy")
        self.assertEqual(relays, ["relay1", "relay2"])
        haproxy = read("haproxy-compose.cfg")
        [metrics] = re.findall(r"SMTPRELAY_METRICS=tcp://0\.0\.0\.0:(\d+) ", read("container", "Containerfile"))
        self.assertIn(f"default-server check port {metrics} send-proxy-v2 ", haproxy)
        self.assertIn("option httpchk GET /healthz\n", haproxy)
        self.assertEqual(re.findall(r"^\s*server (\S+) (\S+)$", haproxy, re.M),
                         [(name, f"{name}:2525") for name in relays])
        self.assertIn("./haproxy-compose.cfg:/usr/local/etc/haproxy/haproxy.cfg:ro",
                      services["haproxy"]["volumes"])
        [subnet] = compose["networks"]["relays"]["ipam"]["config"]
        for name in relays:
            environment = services[name]["environment"]
            self.assertEqual(environment["SMTPRELAY_PROXY_PROTOCOL"], subnet["subnet"])
            self.assertEqual(set(environment) - imageVariables(), set())


class ReadmeTests(SynchronousTestCase):
    def test_everyVariableDocumented(self) -> None:
        """
        The operations page's table names every variable the image reads.
        """
        with open(os.path.join(ROOT, "docs", "operations.md"), encoding="utf-8") as f:
            readme = f.read()
        section = readme[readme.index("## Container and Kubernetes"):]
        documented = set(re.findall(r"^\| `(SMTPRELAY_\w+)`(?:, `(SMTPRELAY_\w+)`)? \|", section, re.M))
        names = {name for pair in documented for name in pair if name}
        self.assertEqual(imageVariables() - names, set())
        self.assertEqual(names - imageVariables(), set())
