"""`fleet`: the operator's command line.

Every listing and status command takes `-o json` for scripts; tables are for people. Bad input
is one clear line on stderr and exit code 2; a controller refusal is one line and exit code 1.
"""

from __future__ import annotations

import logging
import math
import re
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from typer.core import TyperGroup

from fleet.cli.client import (
    GLOBAL,
    Client,
    CliError,
    console,
    emit_json,
    err_console,
    gate_table,
    labels_text,
    parse_labels,
    table,
    when,
)
from fleet.cli.drift import drift_app
from fleet.cli.keys import KEYS_DIR, KeysOpt, ensure_root, keys_app, publish_policy, targets_signers
from fleet.core.errors import FleetError

app = typer.Typer(
    name="fleet",
    help="Fleet deployment and over-the-air manager for ML models on edge devices.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

ControllerOpt = Annotated[
    str | None,
    typer.Option("--controller", "-c", envvar="FLEET_URL", help="Controller REST URL.", show_default="http://127.0.0.1:8080"),
]
OutputOpt = Annotated[str, typer.Option("--output", "-o", help="Output format: table or json.")]
KeyNamesOpt = Annotated[list[str] | None, typer.Option(
    "--key", help="Local key NAME to sign targets with (repeatable; default: every local key the root trusts for "
                  "targets, i.e. `release` in the default setup).")]


def _json(output: str) -> bool:
    if output not in ("table", "json"):
        raise CliError("--output must be 'table' or 'json'", code=2)
    return output == "json"


def parse_duration(text: str) -> float:
    """'90', '90s', '10m', '1h', '30d' -> seconds."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text)
    if not match:
        raise CliError(f"invalid duration {text!r}: use e.g. 90s, 10m, 1h or 30d", code=2)
    return float(match.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2)]


def _floats(text: str | None, option: str) -> list[float] | None:
    """`0.5,0.25,...` as numbers; None when not given."""
    if not text:
        return None
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise CliError(f"{option} expects comma-separated numbers, got {text!r}", code=2) from None
    if not values or not all(math.isfinite(v) for v in values):
        raise CliError(f"{option} expects comma-separated finite numbers, got {text!r}", code=2)
    return values


@app.callback()
def _global_options(
    token: Annotated[str | None, typer.Option(
        "--token", help="API token for the controller (else FLEET_TOKEN, else the config file).")] = None,
    ca_cert: Annotated[str | None, typer.Option(
        "--ca-cert", help="CA certificate to verify an https controller (else FLEET_CA_CERT, else the config).")] = None,
) -> None:
    """Fleet deployment and over-the-air manager for ML models on edge devices."""
    GLOBAL.token = token
    GLOBAL.ca_cert = ca_cert


# ---------------------------------------------------------------------------------------------
# controller and agent processes
# ---------------------------------------------------------------------------------------------

controller_app = typer.Typer(help="Run the controller.", no_args_is_help=True)
app.add_typer(controller_app, name="controller")


def _log_setup(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Per-request lines from the HTTP client would drown the agent's own story.
    for noisy in ("httpx", "alembic"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))


@controller_app.command("serve")
def controller_serve(
    data_dir: Annotated[Path | None, typer.Option(envvar="FLEET_DATA_DIR", help="State directory (SQLite, artifacts, keys).")] = None,
    db_url: Annotated[str | None, typer.Option(envvar="FLEET_DB_URL", help="SQLAlchemy URL; default SQLite in the data dir.")] = None,
    artifact_dir: Annotated[Path | None, typer.Option(envvar="FLEET_ARTIFACT_DIR", help="Local artifact store directory.")] = None,
    http_host: Annotated[str, typer.Option(envvar="FLEET_HTTP_HOST")] = "127.0.0.1",
    http_port: Annotated[int, typer.Option(envvar="FLEET_HTTP_PORT")] = 8080,
    grpc_host: Annotated[str, typer.Option(envvar="FLEET_GRPC_HOST")] = "127.0.0.1",
    grpc_port: Annotated[int, typer.Option(envvar="FLEET_GRPC_PORT", help="Device port (mutual TLS).")] = 50051,
    grpc_enroll_port: Annotated[int, typer.Option(envvar="FLEET_GRPC_ENROLL_PORT", help="Enrolment port (TLS).")] = 50052,
    tls_server_names: Annotated[str | None, typer.Option(envvar="FLEET_TLS_SERVER_NAMES", help="Comma-separated names and IPs for the server certificate.")] = None,
    public_url: Annotated[str | None, typer.Option(envvar="FLEET_PUBLIC_URL", help="URL agents use to download bundles.")] = None,
    reconcile_interval: Annotated[float, typer.Option(envvar="FLEET_RECONCILE_INTERVAL_S", help="Seconds between reconciler passes.")] = 1.0,
    log_level: Annotated[str, typer.Option(envvar="FLEET_LOG_LEVEL")] = "info",
) -> None:
    """Serve REST and gRPC and run the rollout reconciler (SQLite + local artifacts by default)."""
    from fleet.controller.server import run
    from fleet.controller.settings import ControllerSettings

    _log_setup(log_level)
    overrides: dict[str, Any] = {
        "http_host": http_host, "http_port": http_port, "grpc_host": grpc_host, "grpc_port": grpc_port,
        "grpc_enroll_port": grpc_enroll_port, "reconcile_interval_s": reconcile_interval,
    }
    for key, value in (("data_dir", data_dir), ("db_url", db_url), ("artifact_dir", artifact_dir),
                       ("public_url", public_url), ("tls_server_names", tls_server_names)):
        if value is not None:
            overrides[key] = value
    run(ControllerSettings(**overrides))


@controller_app.command("ca")
def controller_ca(
    out: Annotated[Path | None, typer.Option("--out", help="Write the PEM here (default: print it).")] = None,
    controller: ControllerOpt = None,
) -> None:
    """Fetch the controller's device CA certificate, to provision agents with (`fleet agent run --ca-cert`)."""
    pem = Client(controller).get("/api/v1/trust/ca")
    data = pem if isinstance(pem, bytes) else str(pem).encode()
    if out is None:
        sys.stdout.write(data.decode())
        return
    out.write_bytes(data)
    console.print(f"device CA certificate written to {out}")


controller_token_app = typer.Typer(help="API tokens, straight on the controller's database (recovery).",
                                   no_args_is_help=True)
controller_app.add_typer(controller_token_app, name="token")


@controller_token_app.command("create")
def controller_token_create(
    role: Annotated[str, typer.Option(help="viewer, operator or admin.")],
    name: Annotated[str, typer.Option(help="Who or what the token is for.")],
    ttl: Annotated[str | None, typer.Option(help="Lifetime, e.g. 12h or 30d (default: until revoked).")] = None,
    data_dir: Annotated[Path | None, typer.Option(envvar="FLEET_DATA_DIR", help="The controller's state directory.")] = None,
    db_url: Annotated[str | None, typer.Option(envvar="FLEET_DB_URL", help="SQLAlchemy URL of its database.")] = None,
) -> None:
    """Make an API token without the REST API (e.g. when no admin token is at hand); prints it once."""
    from fleet.controller import access
    from fleet.controller.settings import ControllerSettings

    overrides: dict[str, Any] = {k: v for k, v in (("data_dir", data_dir), ("db_url", db_url)) if v is not None}
    settings = ControllerSettings(**overrides)
    plaintext, token_id = access.create_token_in_database(
        settings.db_url, name=name, role=role, ttl_s=parse_duration(ttl) if ttl else None)
    err_console.print(f"API token {token_id} ({name!r}, role {role}) created; it is shown only now:")
    sys.stdout.write(plaintext + "\n")


agent_app = typer.Typer(help="Run the device agent.", no_args_is_help=True)
app.add_typer(agent_app, name="agent")


@agent_app.command("run")
def agent_run(
    data_dir: Annotated[Path, typer.Option(envvar="FLEET_AGENT_DATA_DIR", help="Agent state: identity, slots, spool.")] = Path("/var/lib/fleet-agent"),
    controller_grpc: Annotated[str, typer.Option(envvar="FLEET_CONTROLLER_GRPC", help="Controller gRPC address.")] = "127.0.0.1:50051",
    controller_url: Annotated[str, typer.Option(envvar="FLEET_URL", help="Controller HTTP URL (bundles, metadata).")] = "http://127.0.0.1:8080",
    trust_root: Annotated[Path | None, typer.Option(envvar="FLEET_TRUST_ROOT", help="Provisioned release root metadata (root.json).")] = None,
    ca_cert: Annotated[Path | None, typer.Option(envvar="FLEET_CA_CERT", help="The controller's CA certificate (PEM).")] = None,
    controller_enroll: Annotated[str | None, typer.Option(envvar="FLEET_CONTROLLER_ENROLL", help="Enrolment address (default: gRPC host, port 50052).")] = None,
    tls_server_name: Annotated[str | None, typer.Option(envvar="FLEET_TLS_SERVER_NAME", help="Controller certificate name to expect, if not the address's host.")] = None,
    token: Annotated[str | None, typer.Option(envvar="FLEET_ENROLL_TOKEN", help="Enrolment token for the first start.")] = None,
    device_id: Annotated[str | None, typer.Option(envvar="FLEET_DEVICE_ID", help="Requested device id (default: hostname).")] = None,
    label: Annotated[list[str] | None, typer.Option("--label", "-l", help="KEY=VALUE, repeatable.")] = None,
    hardware_class: Annotated[str | None, typer.Option(envvar="FLEET_HARDWARE_CLASS", help="e.g. cpu, jetson-orin, coral.")] = None,
    inference_addr: Annotated[str, typer.Option(envvar="FLEET_INFERENCE_ADDR", help="Open Inference Protocol gRPC address.")] = "127.0.0.1:8001",
    metrics_addr: Annotated[str, typer.Option(envvar="FLEET_AGENT_METRICS_ADDR", help="Prometheus /metrics address; '' turns it off.")] = "127.0.0.1:9101",
    threads: Annotated[int, typer.Option(envvar="FLEET_THREADS", help="ONNX Runtime intra-op threads per session.")] = 1,
    traffic: Annotated[str | None, typer.Option(help="Built-in traffic: 'synthetic' or a folder of .npy files.")] = None,
    traffic_rate: Annotated[float, typer.Option(help="Requests per second of the built-in traffic.")] = 20.0,
    traffic_model: Annotated[str | None, typer.Option(help="Model the built-in traffic calls (default: every served model).")] = None,
    log_level: Annotated[str, typer.Option(envvar="FLEET_LOG_LEVEL")] = "info",
) -> None:
    """Enrol (first start), sync desired state, update models safely, serve inference, report."""
    import asyncio
    import signal

    from fleet.agent.daemon import Agent, AgentConfig

    _log_setup(log_level)
    config = AgentConfig(
        data_dir=data_dir, controller_grpc=controller_grpc, controller_url=controller_url, trust_root=trust_root,
        ca_cert=ca_cert, controller_enroll=controller_enroll, tls_server_name=tls_server_name,
        enroll_token=token, device_id=device_id, labels=parse_labels(label), hardware_class=hardware_class,
        inference_addr=inference_addr, metrics_addr=metrics_addr, threads=threads, traffic=traffic, traffic_rate=traffic_rate,
        traffic_model=traffic_model,
    )

    async def main() -> None:
        agent = Agent(config)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, agent.stop)
        await agent.run()

    asyncio.run(main())


# ---------------------------------------------------------------------------------------------
# keys
# ---------------------------------------------------------------------------------------------

app.add_typer(keys_app, name="keys")


# ---------------------------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------------------------

models_app = typer.Typer(help="The model registry: signed bundles and aliases.", no_args_is_help=True)
app.add_typer(models_app, name="models")


@models_app.command("push")
def models_push(
    ref: Annotated[str, typer.Argument(help="NAME:VERSION")],
    model_file: Annotated[Path, typer.Argument(help="The ONNX model (the portable variant).", exists=True, dir_okay=False)],
    task: Annotated[str, typer.Option(help="classification, detection, segmentation or generic.")] = "generic",
    variant: Annotated[list[str] | None, typer.Option(help="HARDWARE=model.onnx, an extra variant (repeatable).")] = None,
    release: Annotated[int, typer.Option(help="Release counter (signed; agents can refuse older).")] = 0,
    class_names: Annotated[str | None, typer.Option(help="Comma-separated class names (classification).")] = None,
    description: Annotated[str, typer.Option(help="Free text shown in `fleet models show`.")] = "",
    layout: Annotated[str | None, typer.Option(
        help="How to read the outputs: key=value,... (e.g. boxes=boxes,scores=scores,classes=classes,"
        "score_threshold=0.5) or a JSON file.")] = None,
    reference: Annotated[Path | None, typer.Option(
        help="Folder of reference inputs (.npy in the --traffic layout, or images for an image input): records "
        "their input/output profile for drift. Without it the devices learn one from their first requests.",
        exists=True, file_okay=False)] = None,
    reference_mean: Annotated[str | None, typer.Option(
        help="Reference images for a float input: per-channel mean subtracted after scaling pixels to [0, 1] "
        "(e.g. 0.485,0.456,0.406).")] = None,
    reference_std: Annotated[str | None, typer.Option(
        help="Reference images for a float input: per-channel std divided by after the mean (e.g. 0.229,0.224,0.225).",
    )] = None,
    key: KeyNamesOpt = None,
    keys_dir: KeysOpt = KEYS_DIR,
    controller: ControllerOpt = None,
    output: OutputOpt = "table",
) -> None:
    """Build a bundle, sign it with the targets key(s) on this machine, and upload it."""
    import tempfile

    from fleet.core.bundle import build_bundle, sha256_file
    from fleet.core.errors import FleetError
    from fleet.core.manifest import parse_ref
    from fleet.core.trust import add_target, target_custom, target_path_for

    try:
        name, version = parse_ref(ref)
    except FleetError as exc:
        raise CliError(str(exc), code=2) from exc
    if not key and not (keys_dir / "release.key").exists() and not (keys_dir / "root.json").exists():
        raise CliError(f"no release key in {keys_dir}: run `fleet keys init` first")
    from fleet.core.agreement import parse_layout_text

    try:
        outputs_layout = parse_layout_text(task, Path(layout).read_text() if layout and Path(layout).is_file()
                                           else layout or "")
    except (FleetError, OSError) as exc:
        raise CliError(f"--layout: {exc}", code=2) from exc
    files = {"any": model_file}
    for item in variant or ():
        hw, sep, path = item.partition("=")
        if not sep or not Path(path).is_file():
            raise CliError(f"--variant expects HARDWARE=path/to/model.onnx, got {item!r}", code=2)
        files[hw] = Path(path)
    client = Client(controller)
    with tempfile.TemporaryDirectory() as tmp:
        bundle_path = Path(tmp) / "bundle.tar"
        try:
            manifest = build_bundle(
                bundle_path, name=name, version=version, task=task, model_files=files, inputs=None, outputs=None,
                release=release, class_names=tuple(c.strip() for c in (class_names or "").split(",") if c.strip()),
                description=description, outputs_layout=outputs_layout,
            )
        except FleetError as exc:
            raise CliError(f"cannot build the bundle: {exc}", code=2) from exc
        if reference is not None:
            from fleet.cli.drift import add_reference_profile

            manifest = add_reference_profile(bundle_path, manifest, files, reference,
                                             mean=_floats(reference_mean, "--reference-mean"),
                                             std=_floats(reference_std, "--reference-std"))
        root = ensure_root(client, keys_dir)
        current = client.get_optional("/api/v1/trust/targets")
        signers = targets_signers(keys_dir, root, key)
        targets = add_target(
            current, root, signers, target_path=target_path_for(name, version), length=bundle_path.stat().st_size,
            sha256=sha256_file(bundle_path),
            custom=target_custom(manifest),
        )
        with bundle_path.open("rb") as fh:
            result = client.post(
                f"/api/v1/models/{name}/versions",
                files={"bundle": ("bundle.tar", fh, "application/x-tar"),
                       "targets": ("targets.json", targets, "application/json")},
                timeout=600,
            )
    if _json(output):
        emit_json(result)
    else:
        console.print(f"pushed [bold]{name}:{version}[/] ({result.get('size', 0):,} bytes, sha256 "
                      f"{str(result.get('sha256', ''))[:12]}...), signed by {len(signers)} targets key(s)")


@models_app.command("ls")
def models_ls(controller: ControllerOpt = None, output: OutputOpt = "table") -> None:
    """List models with their versions and aliases."""
    data = Client(controller).get("/api/v1/models")
    if _json(output):
        emit_json(data)
        return
    rows = []
    for model in data:
        versions = [v["version"] if isinstance(v, dict) else v for v in model.get("versions", [])]
        aliases = ",".join(f"{k}={v}" for k, v in sorted((model.get("aliases") or {}).items()))
        rows.append([model["name"], ", ".join(versions), aliases])
    table("models", ["name", "versions", "aliases"], rows)


@models_app.command("show")
def models_show(ref: Annotated[str, typer.Argument(help="NAME or NAME:VERSION")], controller: ControllerOpt = None,
                output: OutputOpt = "table") -> None:
    """Show a model, or one version with its manifest."""
    name, _, version = ref.partition(":")
    client = Client(controller)
    data = client.get(f"/api/v1/models/{name}/versions/{version}" if version else f"/api/v1/models/{name}")
    if _json(output):
        emit_json(data)
        return
    if version:
        manifest = data.get("manifest", {})
        table(f"{name}:{version}", ["field", "value"], [
            ["task", manifest.get("task")], ["release", manifest.get("release")],
            ["size", f"{data.get('size', 0):,}"], ["sha256", data.get("sha256")],
            ["inputs", "; ".join(f"{t['name']} {t['dtype']}{t['shape']}" for t in manifest.get("inputs", []))],
            ["outputs", "; ".join(f"{t['name']} {t['dtype']}{t['shape']}" for t in manifest.get("outputs", []))],
            ["variants", ", ".join(v["hardware"] for v in manifest.get("variants", []))],
            ["created", data.get("created_at")],
        ])
    else:
        table(name, ["version", "task", "size", "created"], [
            [v.get("version"), v.get("task"), f"{v.get('size', 0):,}", v.get("created_at")]
            for v in data.get("versions", [])
        ])
        if data.get("aliases"):
            console.print("aliases: " + ", ".join(f"{k} -> {v}" for k, v in sorted(data["aliases"].items())))


@models_app.command("rm")
def models_rm(ref: Annotated[str, typer.Argument(help="NAME:VERSION")], controller: ControllerOpt = None) -> None:
    """Delete a version that no device, rollout or assignment uses."""
    name, _, version = ref.partition(":")
    if not version:
        raise CliError("expected NAME:VERSION", code=2)
    Client(controller).request("DELETE", f"/api/v1/models/{name}/versions/{version}")
    console.print(f"deleted {name}:{version}")


@models_app.command("policy")
def models_policy(
    name: Annotated[str, typer.Argument(help="Model NAME.")],
    min_release: Annotated[int, typer.Option(help="Lowest release counter devices may install (signed).")],
    key: KeyNamesOpt = None,
    keys_dir: KeysOpt = KEYS_DIR,
    controller: ControllerOpt = None,
    output: OutputOpt = "table",
) -> None:
    """Sign NAME's minimum release into targets: devices refuse older releases, the controller older rollouts."""
    from fleet.core.manifest import check_name

    as_json = _json(output)
    try:
        check_name(name)
    except FleetError as exc:
        raise CliError(str(exc), code=2) from exc
    if min_release < 0:
        raise CliError("--min-release must be a non-negative integer", code=2)
    version = publish_policy(Client(controller), keys_dir, name, min_release, key)
    if as_json:
        emit_json({"model": name, "min_release": min_release, "targets_version": version})
    else:
        console.print(f"{name}: minimum release {min_release} signed (targets v{version})")


# ---------------------------------------------------------------------------------------------
# devices and enrolment tokens
# ---------------------------------------------------------------------------------------------

devices_app = typer.Typer(help="Devices in the fleet.", no_args_is_help=True)
app.add_typer(devices_app, name="devices")


def _serving(device: dict[str, Any]) -> str:
    parts = []
    for model in (device.get("actual") or {}).get("models", []):
        serving = next((s for s in model.get("slots", []) if s.get("role") == "serving"), None)
        shadow = next((s for s in model.get("slots", []) if s.get("role") == "shadow"), None)
        text = f"{model['model']}:{serving['version'] if serving else '-'}"
        if shadow:
            text += f" (+shadow {shadow['version']})"
        update = model.get("update") or {}
        if update.get("state") and update["state"] != "Idle":
            text += f" [{update['state']}]"
        parts.append(text)
    return ", ".join(parts)


@devices_app.command("ls")
def devices_ls(
    selector: Annotated[str | None, typer.Option("--selector", "-l", help="Label selector k=v,k2=v2.")] = None,
    controller: ControllerOpt = None,
    output: OutputOpt = "table",
) -> None:
    """List devices (optionally by label selector) with what they serve."""
    params = {"selector": selector} if selector else {}
    data = Client(controller).get("/api/v1/devices", params=params)
    if _json(output):
        emit_json(data)
        return
    table("devices", ["id", "labels", "hardware", "connected", "models", "last seen"], [
        [d["id"], labels_text(d.get("labels")), (d.get("hardware") or {}).get("hardware_class"),
         "yes" if d.get("connected") else "no", _serving(d), when(d.get("last_seen_at"))]
        for d in data
    ])


@devices_app.command("show")
def devices_show(device_id: str, controller: ControllerOpt = None, output: OutputOpt = "table") -> None:
    """Show one device: labels, hardware, model slots, update state, recent events."""
    data = Client(controller).get(f"/api/v1/devices/{device_id}")
    if _json(output):
        emit_json(data)
        return
    hw = data.get("hardware") or {}
    table(device_id, ["field", "value"], [
        ["labels", labels_text(data.get("labels"))],
        ["hardware", f"{hw.get('hardware_class')} {hw.get('arch')} providers={','.join(hw.get('execution_providers', []))}"],
        ["connected", data.get("connected")], ["last seen", when(data.get("last_seen_at"))],
        ["desired generation", (data.get("desired") or {}).get("generation")],
        ["applied generation", (data.get("actual") or {}).get("desired_generation")],
    ])
    rows = []
    for model in (data.get("actual") or {}).get("models", []):
        update = model.get("update") or {}
        for slot in model.get("slots", []):
            rows.append([model["model"], slot.get("role"), slot.get("version"), "yes" if slot.get("loaded") else "no",
                         ",".join(slot.get("execution_providers", [])), update.get("state"), update.get("error")])
    table("model slots", ["model", "role", "version", "loaded", "providers", "update", "last error"], rows)
    events = data.get("events") or data.get("recent_events") or []
    if events:
        table("recent update events", ["at", "model", "version", "state", "reason"],
              [[when(e.get("at")), e.get("model"), e.get("version"), e.get("state"), e.get("reason")]
               for e in events[:10]])


@devices_app.command("decommission")
def devices_decommission(device_id: str, controller: ControllerOpt = None, output: OutputOpt = "table") -> None:
    """Revoke a device's identity: its certificate is refused from now on and its stream ends."""
    data = Client(controller).post(f"/api/v1/devices/{device_id}/decommission")
    if _json(output):
        emit_json(data)
    else:
        console.print(f"device {device_id} decommissioned; enrol it again with a new token to bring it back")


tokens_app = typer.Typer(help="Enrolment tokens for new devices.", no_args_is_help=True)
app.add_typer(tokens_app, name="tokens")


@tokens_app.command("create")
def tokens_create(
    uses: Annotated[int, typer.Option(help="How many devices may enrol with it.")] = 1,
    ttl: Annotated[str, typer.Option(help="Lifetime, e.g. 1h or 30m.")] = "1h",
    label: Annotated[list[str] | None, typer.Option("--label", "-l", help="KEY=VALUE given to devices enrolling with it.")] = None,
    device_id: Annotated[str | None, typer.Option("--device-id", help="Only this device id may enrol with it (also re-enrols it).")] = None,
    controller: ControllerOpt = None,
    output: OutputOpt = "table",
) -> None:
    """Create an enrolment token (its plain text is shown only now)."""
    body: dict[str, Any] = {"max_uses": uses, "ttl_seconds": int(parse_duration(ttl)), "labels": parse_labels(label)}
    if device_id:
        body["device_id"] = device_id
    data = Client(controller).post("/api/v1/enrollment-tokens", json=body)
    if _json(output):
        emit_json(data)
    else:
        console.print(f"token [bold]{data['token']}[/] (id {data.get('id')}, {uses} use(s), expires {data.get('expires_at')})")


@tokens_app.command("ls")
def tokens_ls(controller: ControllerOpt = None, output: OutputOpt = "table") -> None:
    """List enrolment tokens (never their plain text)."""
    data = Client(controller).get("/api/v1/enrollment-tokens")
    if _json(output):
        emit_json(data)
    else:
        table("enrolment tokens", ["id", "uses", "max uses", "expires", "labels", "revoked"], [
            [t.get("id"), t.get("uses"), t.get("max_uses"), t.get("expires_at"), labels_text(t.get("labels")),
             t.get("revoked")] for t in data])


# ---------------------------------------------------------------------------------------------
# operator access: API tokens, login, whoami
# ---------------------------------------------------------------------------------------------

access_app = typer.Typer(help="API tokens for operators and scripts (admin role).", no_args_is_help=True)
app.add_typer(access_app, name="access")


def _access_rows(data: list[dict[str, Any]]) -> list[list[Any]]:
    def state(t: dict[str, Any]) -> str:
        if t.get("revoked_at"):
            return "revoked"
        return "active" if t.get("active") else "expired"

    return [[t.get("id"), t.get("name"), t.get("role"), state(t), when(t.get("created_at")),
             when(t.get("expires_at")) or "never", when(t.get("last_used_at"))] for t in data]


_ACCESS_COLUMNS = ["id", "name", "role", "state", "created", "expires", "last used"]


@access_app.command("create")
def access_create(
    name: Annotated[str, typer.Argument(help="Who or what the token is for.")],
    role: Annotated[str, typer.Option(help="viewer, operator or admin.")] = "viewer",
    ttl: Annotated[str | None, typer.Option(help="Lifetime, e.g. 12h or 30d (default: until revoked).")] = None,
    controller: ControllerOpt = None,
    output: OutputOpt = "table",
) -> None:
    """Create an API token (its plain text is shown only now)."""
    body: dict[str, Any] = {"name": name, "role": role}
    if ttl:
        body["ttl_seconds"] = int(parse_duration(ttl))
    data = Client(controller).post("/api/v1/access-tokens", json=body)
    if _json(output):
        emit_json(data)
    else:
        console.print(f"token [bold]{data['token']}[/] (id {data['id']}, role {data['role']}, expires "
                      f"{when(data.get('expires_at')) or 'never'}); it is shown only now", markup=True, highlight=False)


@access_app.command("ls")
def access_ls(controller: ControllerOpt = None, output: OutputOpt = "table") -> None:
    """List API tokens (never their secrets)."""
    data = Client(controller).get("/api/v1/access-tokens")
    if _json(output):
        emit_json(data)
    else:
        table("API tokens", _ACCESS_COLUMNS, _access_rows(data))


@access_app.command("revoke")
def access_revoke(token_id: Annotated[str, typer.Argument(help="The token's id (`fleet access ls`).")],
                  controller: ControllerOpt = None, output: OutputOpt = "table") -> None:
    """Revoke an API token: the controller refuses it from now on."""
    data = Client(controller).post(f"/api/v1/access-tokens/{token_id}/revoke")
    if _json(output):
        emit_json(data)
    else:
        console.print(f"revoked {data['id']} ({data['name']})")


@app.command("whoami")
def whoami(controller: ControllerOpt = None, output: OutputOpt = "table") -> None:
    """Show who the CLI's token is: id, name, role."""
    data = Client(controller).get("/api/v1/whoami")
    if _json(output):
        emit_json(data)
    else:
        console.print(f"{data.get('name')} ({data.get('kind')} {data.get('id')}), role {data.get('role')}")


@app.command("login")
def login(
    token: Annotated[str | None, typer.Option("--token", help="The API token to store (else the global --token).")] = None,
    url: Annotated[str | None, typer.Option("--url", help="The controller's REST URL to store.")] = None,
    ca_cert: Annotated[Path | None, typer.Option("--ca-cert", help="CA certificate for an https controller.")] = None,
    verify: Annotated[bool, typer.Option(help="Check the token against the controller first.")] = True,
) -> None:
    """Store the controller URL and token in the CLI config (mode 0600; FLEET_CONFIG picks the file)."""
    from fleet.cli.client import config_path, load_config, write_config

    token = token or GLOBAL.token
    if not token:
        raise CliError("give the token to store: `fleet login --token TOKEN`", code=2)
    path = config_path()
    try:
        values = load_config(path)
    except CliError:
        values = {}  # an unsafe old file is replaced by a safe one
    values["token"] = token
    if url:
        values["url"] = url.rstrip("/")
    if ca_cert:
        values["ca_cert"] = str(ca_cert.expanduser().resolve())
    if verify:
        who = Client(values.get("url"), token=token, ca_cert=values.get("ca_cert")).get("/api/v1/whoami")
        console.print(f"token accepted: {who.get('name')} ({who.get('id')}), role {who.get('role')}")
    write_config(values, path)
    console.print(f"saved to {path} (mode 0600)")


# ---------------------------------------------------------------------------------------------
# rollouts
# ---------------------------------------------------------------------------------------------

class RolloutGroup(TyperGroup):
    """`fleet rollout NAME:VERSION ...` starts a rollout; `fleet rollout status ...` etc. manage them."""

    def resolve_command(self, ctx: Any, args: list[str]) -> Any:
        if args and args[0] not in self.commands and not args[0].startswith("-"):
            args.insert(0, "start")
        return super().resolve_command(ctx, args)

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and not args[0].startswith("-"):
            args.insert(0, "start")
        return super().parse_args(ctx, args)


rollout_app = typer.Typer(
    cls=RolloutGroup,
    help="Roll a model version out: `fleet rollout detector:v3 --canary 10%`; then status, explain, promote, pause, "
         "resume, abort.",
    no_args_is_help=True,
)
app.add_typer(rollout_app, name="rollout")
app.add_typer(drift_app, name="drift")


def _gate_from_options(policy: Path | None, overrides: dict[str, Any]) -> dict[str, Any] | None:
    import json

    gate: dict[str, Any] = {}
    if policy is not None:
        try:
            gate.update(json.loads(policy.read_text()))
        except (OSError, ValueError) as exc:
            raise CliError(f"cannot read gate policy {policy}: {exc}", code=2) from exc
    gate.update({k: v for k, v in overrides.items() if v is not None})
    return gate or None


@rollout_app.command("start", hidden=True)
def rollout_start(
    ref: Annotated[str, typer.Argument(help="NAME:VERSION to roll out.")],
    canary: Annotated[str | None, typer.Option(help="First cohort, e.g. 10% or 0.1; then 100%.")] = None,
    steps: Annotated[str | None, typer.Option(help="Cohort steps, e.g. 5,25,100 (percent).")] = None,
    selector: Annotated[str | None, typer.Option("--selector", "-l", help="Only devices with these labels: k=v,k2=v2.")] = None,
    name: Annotated[str | None, typer.Option(help="Rollout name (default NAME-VERSION).")] = None,
    sample_rate: Annotated[float | None, typer.Option(help="Share of requests mirrored to the shadow (0-1].")] = None,
    min_samples: Annotated[int | None, typer.Option(help="Mirrored requests needed per step before judging.")] = None,
    max_latency_regression: Annotated[float | None, typer.Option(help="Tolerated latency regression on paired requests, e.g. 0.05 = +5%.")] = None,
    min_agreement: Annotated[float | None, typer.Option(help="Minimum agreement with the serving model (0-1).")] = None,
    max_install_failures: Annotated[float | None, typer.Option(help="Maximum share of cohort install failures.")] = None,
    max_error_rate: Annotated[float | None, typer.Option(help="Maximum candidate inference error rate.")] = None,
    deadline: Annotated[str | None, typer.Option(help="Pause if still inconclusive after this long, e.g. 10m.")] = None,
    confidence: Annotated[float | None, typer.Option(help="Confidence of the gate's statistical tests, e.g. 0.98.")] = None,
    group_by: Annotated[str | None, typer.Option(help="Also judge per device label group (a label key; '-' for none).")] = None,
    policy: Annotated[Path | None, typer.Option(help="JSON gate policy file; flags override it.")] = None,
    min_release: Annotated[int | None, typer.Option(
        help="First sign this model's minimum release (devices refuse older releases); needs the targets key(s).")
    ] = None,
    key: KeyNamesOpt = None,
    keys_dir: KeysOpt = KEYS_DIR,
    controller: ControllerOpt = None,
    output: OutputOpt = "table",
) -> None:
    """Start a rollout of NAME:VERSION."""
    from fleet.core.errors import FleetError
    from fleet.core.manifest import parse_ref
    from fleet.core.rollout import plan_steps

    try:
        model, version = parse_ref(ref)
        planned = plan_steps(canary, steps)
    except FleetError as exc:
        raise CliError(str(exc), code=2) from exc
    gate = _gate_from_options(policy, {
        "min_samples": min_samples, "max_latency_regression": max_latency_regression, "min_agreement": min_agreement,
        "max_install_failure_share": max_install_failures, "max_error_rate": max_error_rate,
        "analysis_deadline_s": parse_duration(deadline) if deadline else None,
        "confidence": confidence, "group_by": group_by,
    })
    if min_release is not None:
        if min_release < 0:
            raise CliError("--min-release must be a non-negative integer", code=2)
        publish_policy(Client(controller), keys_dir, model, min_release, key)
    body = {"model": model, "version": version, "steps": planned, "selector": parse_labels([selector] if selector else []),
            "gate": gate, "shadow_sample_rate": sample_rate, "name": name}
    data = Client(controller).post("/api/v1/rollouts", json=body)
    if _json(output):
        emit_json(data)
    else:
        pct = ", ".join(f"{s * 100:g}%" for s in planned)
        console.print(f"rollout [bold]{data.get('name') or data.get('id')}[/] of {model}:{version} created: steps {pct}; "
                      f"watch it with `fleet rollout status {data.get('name') or data.get('id')} --watch`")


def _render_status(data: dict[str, Any]) -> None:
    name = data.get("name") or data.get("id")
    steps = data.get("steps", [])
    idx = data.get("step_index", 0)
    step_txt = f"{idx + 1}/{len(steps)} ({steps[idx] * 100:g}%)" if steps and idx < len(steps) else "-"
    console.print(f"[bold]{name}[/]  {data.get('model')}:{data.get('version')}  phase [bold]{data.get('phase')}[/]  "
                  f"step {step_txt} {data.get('step_phase', '')}")
    if data.get("message"):
        console.print(f"  {data['message']}")
    progress = data.get("progress") or data.get("cohorts") or []
    if progress:
        cols = ["assigned", "shadowing", "serving", "confirmed", "failed", "rolled_back"]
        table("cohorts", ["step", "share", *cols], [
            [row.get("step"), f"{float(row.get('fraction') or 0) * 100:g}%", *(row.get(c, 0) for c in cols)]
            for row in progress])
    analysis = data.get("analysis") or {}
    rows = analysis.get("metrics") if isinstance(analysis, dict) else None
    if rows:
        gate_table(rows, title=f"gate: {analysis.get('verdict', '')}")


@rollout_app.command("status")
def rollout_status(
    name: Annotated[str, typer.Argument(help="Rollout name.")],
    watch: Annotated[bool, typer.Option("--watch", "-w", help="Refresh until the rollout finishes.")] = False,
    interval: Annotated[float, typer.Option(help="Seconds between refreshes with --watch.")] = 1.0,
    controller: ControllerOpt = None,
    output: OutputOpt = "table",
) -> None:
    """Show phase, step, cohort progress and the gate's numbers against thresholds."""
    client = Client(controller)
    as_json = _json(output)
    if not watch:
        data = client.get(f"/api/v1/rollouts/{name}")
        emit_json(data) if as_json else _render_status(data)
        return
    from rich.live import Live

    finished = {"Completed", "RolledBack", "Aborted"}
    if as_json:
        while True:
            data = client.get(f"/api/v1/rollouts/{name}")
            emit_json(data)
            if data.get("phase") in finished:
                return
            time.sleep(interval)
    with Live(console=console, refresh_per_second=4, transient=False) as live:
        while True:
            data = client.get(f"/api/v1/rollouts/{name}")
            with console.capture() as cap:
                _render_status(data)
            from rich.text import Text

            live.update(Text.from_ansi(cap.get()))
            if data.get("phase") in finished:
                return
            time.sleep(interval)


@rollout_app.command("ls")
def rollout_ls(
    model: Annotated[str | None, typer.Option(help="Only rollouts of this model.")] = None,
    phase: Annotated[str | None, typer.Option(help="Only rollouts in this phase.")] = None,
    controller: ControllerOpt = None,
    output: OutputOpt = "table",
) -> None:
    """List rollouts."""
    params = {k: v for k, v in (("model", model), ("phase", phase)) if v}
    data = Client(controller).get("/api/v1/rollouts", params=params)
    if _json(output):
        emit_json(data)
        return
    table("rollouts", ["name", "model", "version", "phase", "step", "created"], [
        [r.get("name") or r.get("id"), r.get("model"), r.get("version"), r.get("phase"),
         f"{r.get('step_index', 0) + 1}/{len(r.get('steps', []))}", when(r.get("created_at"))] for r in data])


@rollout_app.command("explain")
def rollout_explain(name: str, controller: ControllerOpt = None, output: OutputOpt = "table") -> None:
    """Every decision taken for the rollout, with the numbers behind it."""
    data = Client(controller).get(f"/api/v1/rollouts/{name}")
    decisions = data.get("decisions", [])
    if _json(output):
        emit_json(decisions)
        return
    for d in decisions:
        console.print(f"[bold]{when(d.get('at'))}[/] step {d.get('step_index', 0) + 1} {d.get('kind')} "
                      f"{d.get('verdict') or ''} by {d.get('actor')}: {d.get('reason')}")
        metrics = d.get("metrics") or {}
        rows = metrics.get("metrics") if isinstance(metrics, dict) else metrics
        if rows:
            _explain_rows(rows, metrics if isinstance(metrics, dict) else {})


def _explain_rows(rows: list[dict[str, Any]], metrics: dict[str, Any]) -> None:
    """Per gate: every metric with value, threshold, test, p-value or interval, samples, verdict and pull."""

    def fmt(value: Any) -> str:
        return f"{value:.4g}" if isinstance(value, float) else ("" if value is None else str(value))

    def stat(r: dict[str, Any]) -> str:
        parts = [f"p={fmt(r['p_value'])}" + (f" (alpha {fmt(r['alpha'])})" if r.get("alpha") is not None else "")
                 ] if r.get("p_value") is not None else []
        if r.get("interval") and None not in r["interval"]:
            parts.append(f"[{fmt(r['interval'][0])}, {fmt(r['interval'][1])}]")
        return " ".join(parts)

    def verdict(r: dict[str, Any]) -> str:
        return str(r.get("verdict") or ("-" if r.get("ok") is None else ("Pass" if r.get("ok") else "Fail")))

    # One block per metric rather than a wide table: the test names and device lists stay readable
    # in an 80-column terminal and in CI logs.
    for r in rows:
        group = f" on group {r['group']}" if r.get("group") else ""
        console.print(f"  {verdict(r):<12} {r.get('metric')}{group}: {fmt(r.get('value'))} "
                      f"(threshold {r.get('comparison', '')} {fmt(r.get('threshold'))}), samples {r.get('samples')}",
                      markup=False, highlight=False)
        if r.get("test") and r.get("test") != "threshold":
            console.print(f"{'':15}test: {r['test']}; {stat(r)}", markup=False, highlight=False)
        worst = ", ".join(f"{w.get('device')} ({fmt(w.get('value'))})" for w in r.get("worst_devices") or [])
        if worst:
            console.print(f"{'':15}pulled most: {worst}", markup=False, highlight=False)
    if metrics.get("tests"):
        groups = ", ".join(metrics.get("groups") or []) or "none"
        console.print(f"  {metrics['tests']} tests at {fmt(metrics.get('confidence'))} family-wise confidence "
                      f"(Bonferroni, alpha {fmt(metrics.get('alpha_per_test'))} each); groups: {groups}")


@rollout_app.command("report")
def rollout_report(
    name: str,
    out: Annotated[Path, typer.Option("--out", help="Where to write the HTML report.")] = Path("report.html"),
    group_by: Annotated[str | None, typer.Option(help="Device label key to show drift by.")] = None,
    controller: ControllerOpt = None,
) -> None:
    """Write a self-contained HTML report: latency distributions, agreement over time, drift per group."""
    params = {"group_by": group_by} if group_by else {}
    body = Client(controller).get(f"/api/v1/rollouts/{name}/report", params=params)
    data = body if isinstance(body, bytes) else str(body).encode()
    try:
        out.write_bytes(data)
    except OSError as exc:
        raise CliError(f"cannot write {out}: {exc}", code=2) from exc
    console.print(f"report of rollout {name} written to {out} ({len(data)} bytes)")


def _action(action: str, name: str, reason: str | None, controller: str | None, output: str) -> None:
    data = Client(controller).post(f"/api/v1/rollouts/{name}/{action}", json={"reason": reason or ""})
    if _json(output):
        emit_json(data)
    else:
        console.print(f"{name}: phase {data.get('phase')}")


ReasonOpt = Annotated[str | None, typer.Option(help="Why; stored with the decision.")]


@rollout_app.command("promote")
def rollout_promote(name: str, reason: ReasonOpt = None, controller: ControllerOpt = None, output: OutputOpt = "table") -> None:
    """Pass the current step's gate now (operator override)."""
    _action("promote", name, reason, controller, output)


@rollout_app.command("pause")
def rollout_pause(name: str, reason: ReasonOpt = None, controller: ControllerOpt = None, output: OutputOpt = "table") -> None:
    """Hold the rollout where it is."""
    _action("pause", name, reason, controller, output)


@rollout_app.command("resume")
def rollout_resume(name: str, reason: ReasonOpt = None, controller: ControllerOpt = None, output: OutputOpt = "table") -> None:
    """Continue a paused rollout."""
    _action("resume", name, reason, controller, output)


@rollout_app.command("abort")
def rollout_abort(name: str, reason: ReasonOpt = None, controller: ControllerOpt = None, output: OutputOpt = "table") -> None:
    """Stop the rollout and send every device back to its previous version."""
    _action("abort", name, reason, controller, output)


# ---------------------------------------------------------------------------------------------
# demo
# ---------------------------------------------------------------------------------------------

@app.command("demo")
def demo(
    devices: Annotated[int, typer.Option(help="How many agent processes to start.")] = 8,
    workdir: Annotated[Path | None, typer.Option(help="Keep all state here (default: a temporary directory).")] = None,
    timeout: Annotated[float, typer.Option(help="Give up after this many seconds.")] = 300.0,
) -> None:
    """The whole loop on this machine: controller, agents, signed bundles, a promotion and an automatic rollback."""
    from fleet.cli.demo import run_demo

    raise typer.Exit(run_demo(devices=devices, workdir=workdir, timeout=timeout))


def main() -> None:
    try:
        app()
    except CliError as exc:
        err_console.print(f"[red]error:[/] {exc.message}")
        sys.exit(exc.code)
    except FleetError as exc:  # a rule of the core refused local input (key, bundle, metadata)
        err_console.print(f"[red]error:[/] {exc.message}")
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
