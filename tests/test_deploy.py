"""deploy/ (Dockerfile, Kubernetes manifests, nginx config) against the server's real command line:
every flag they pass exists and parses, ports and probes point where the server listens, the
termination grace covers the SIGTERM drain, the autoscaler's metric is one the server exports."""
from __future__ import annotations

import json
import re

import pytest

from serve.cli import build_parser
from serve.metrics import Metrics
from serve.server import SERVICE_NAME
from support.serving import ROOT

yaml = pytest.importorskip("yaml", reason="PyYAML is in the dev extra: pip install -e '.[dev]'")

DEPLOY = ROOT / "deploy"
DEFAULTS = build_parser().parse_args(["--model", "m"])


def manifests() -> dict[str, dict]:
    docs = {}
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            assert doc["kind"] not in docs, f"two {doc['kind']} objects"
            docs[doc["kind"]] = doc
    return docs


@pytest.fixture(scope="module")
def k8s():
    docs = manifests()
    assert {"Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler"} <= set(docs)
    return docs


def serve_args(container: dict):
    return build_parser().parse_args(container["args"])  # exits (SystemExit) on an unknown flag


def test_deployment_ports_probes_and_grace_match_the_server(k8s):
    pod = k8s["Deployment"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    args = serve_args(container)
    assert args.host in ("0.0.0.0", "::"), "a pod must listen beyond loopback"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": args.port, "metrics": args.metrics_port}
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        grpc_probe = container[probe]["grpc"]  # the standard health service, not a TCP or exec check
        assert grpc_probe["port"] == args.port
        # the server sets these two names (serve/server.py); any other name would answer NOT_FOUND
        assert grpc_probe.get("service", "") in ("", SERVICE_NAME)
    # readiness must see the drain: the service name turns NOT_SERVING on SIGTERM
    assert container["readinessProbe"]["grpc"].get("service", "") in ("", SERVICE_NAME)
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    grace = pod["terminationGracePeriodSeconds"]
    needed = float(pre_stop[1]) + args.drain_grace
    assert needed + 1 <= grace <= needed + 15, (grace, needed)
    requests = container["resources"]["requests"]
    assert requests["cpu"] and requests["memory"]
    assert args.max_streams >= 1


def test_service_pdb_and_hpa_select_the_deployment(k8s):
    labels = k8s["Deployment"]["spec"]["template"]["metadata"]["labels"]
    (container,) = k8s["Deployment"]["spec"]["template"]["spec"]["containers"]
    args = serve_args(container)
    service = k8s["Service"]["spec"]
    assert service["selector"] == labels
    names = {p["name"] for p in container["ports"]}
    for port in service["ports"]:
        assert port["targetPort"] in names
    assert {p["name"]: p["port"] for p in service["ports"]}["grpc"] == args.port
    assert k8s["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"] == labels
    hpa = k8s["HorizontalPodAutoscaler"]["spec"]
    assert hpa["scaleTargetRef"]["name"] == k8s["Deployment"]["metadata"]["name"]
    (metric,) = hpa["metrics"]
    name = metric["pods"]["metric"]["name"]
    exported = {m.name for m in Metrics().registry.collect()}
    assert name in exported, f"the HPA scales on {name}, which the server does not export"
    assert float(metric["pods"]["target"]["averageValue"]) < args.max_streams  # room while scaling up
    assert hpa["minReplicas"] >= 2


def test_dockerfile_runs_the_server_cli_on_the_manifest_ports(k8s):
    text = (DEPLOY / "Dockerfile").read_text()
    entry = json.loads(re.search(r"^ENTRYPOINT (\[.*\])$", text, re.M).group(1))
    assert entry == ["python", "-m", "serve"]
    cmd = build_parser().parse_args(json.loads(re.search(r"^CMD (\[.*\])$", text, re.M).group(1)))
    exposed = {int(p) for p in re.search(r"^EXPOSE (.*)$", text, re.M).group(1).split()}
    assert exposed == {cmd.port, cmd.metrics_port}
    (container,) = k8s["Deployment"]["spec"]["template"]["spec"]["containers"]
    pod = serve_args(container)
    assert (cmd.port, cmd.metrics_port, cmd.drain_grace, cmd.model) == \
        (pod.port, pod.metrics_port, pod.drain_grace, pod.model)
    assert cmd.port == DEFAULTS.port
    assert not re.search(r"^\s*(RUN|COPY)\b.*\b(torch|train/|export/)", text, re.M), "the server image needs no torch"


def test_nginx_config_matches_the_server(k8s):
    text = (DEPLOY / "nginx" / "nginx.conf").read_text()
    body = "\n".join(line.split("#", 1)[0] for line in text.splitlines())  # without comments
    upstreams = re.findall(r"^\s*server (\S+):(\d+)\b", body, re.M)
    assert len(upstreams) >= 2
    assert {int(port) for _, port in upstreams} == {DEFAULTS.port}
    assert re.search(r"^\s*listen \d+ http2;", body, re.M)
    assert re.search(r"^\s*grpc_pass grpc://sim_serve;", body, re.M)
    assert re.search(r"^\s*client_max_body_size 0;", body, re.M), "a stream's audio is one request body"
    for directive in ("grpc_read_timeout", "grpc_send_timeout", "client_body_timeout"):
        seconds = int(re.search(rf"^\s*{directive} (\d+)s;", body, re.M).group(1))
        assert seconds > DEFAULTS.idle_timeout, f"{directive} would cut streams the server still keeps"
    (container,) = k8s["Deployment"]["spec"]["template"]["spec"]["containers"]
    assert {int(port) for _, port in upstreams} == {serve_args(container).port}
