"""Check every Helm chart under `charts/` the way a cluster would: lint, render, validate, refuse.

Rule: a chart change lands only if, for each values file in `charts/*/ci/*.yaml`,
  1. `helm lint --strict` passes,
  2. `helm template` renders, and every rendered object validates against the Kubernetes
     OpenAPI schemas of a pinned version (kubernetes-validate, strict: unknown fields fail),
     CRD kinds we render (ServiceMonitor, Traefik's IngressRouteTCP) against small schemas kept here,
  3. every workload keeps the house security rules: non-root, read-only root filesystem, no
     privilege escalation, resource requests, and the controller probes its real endpoints;
and each file in `charts/*/ci/invalid/*.yaml` is refused by `values.schema.json`, with the text
its `# expect: TEXT` header names in helm's error (so each schema rule is shown to fire).

Prints one line per check and a summary; exits 0 only if everything passed, 2 if helm cannot
be obtained (see scripts/helm_tool.py).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from helm_tool import HelmUnavailableError, find_helm

REPO_ROOT = Path(__file__).resolve().parent.parent
CHARTS_DIR = REPO_ROOT / "charts"
# K3s stable channel at the time of writing; the chart's kubeVersion floor is 1.26.
KUBERNETES_VERSION = "1.30.0"
NAMESPACE = "fleet"
RELEASE = "fleet"
HELM_TIMEOUT_S = 120

# The fields of monitoring.coreos.com/v1 ServiceMonitor that the chart renders, strict like the
# Kubernetes schemas: a misspelt field fails here instead of being dropped by the operator.
_STR = {"type": "string"}
_LABELS = {"type": "object", "additionalProperties": _STR}
SERVICE_MONITOR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": {
            "type": "object",
            "required": ["name"],
            "properties": {"name": _STR, "namespace": _STR, "labels": _LABELS, "annotations": _LABELS},
            "additionalProperties": False,
        },
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["selector", "endpoints"],
            "properties": {
                "jobLabel": _STR,
                "selector": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {"matchLabels": _LABELS, "matchExpressions": {"type": "array"}},
                },
                "namespaceSelector": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {"any": {"type": "boolean"}, "matchNames": {"type": "array", "items": _STR}},
                },
                "endpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {
                            "port": _STR,
                            "path": {"type": "string", "pattern": "^/"},
                            "scheme": {"enum": ["http", "https"]},
                            "interval": {"type": "string", "pattern": "^[0-9]+(ms|s|m|h)$"},
                            "scrapeTimeout": {"type": "string", "pattern": "^[0-9]+(ms|s|m|h)$"},
                            "honorLabels": {"type": "boolean"},
                            "bearerTokenSecret": {
                                "type": "object",
                                "additionalProperties": False,
                                "required": ["name", "key"],
                                "properties": {"name": _STR, "key": _STR, "optional": {"type": "boolean"}},
                            },
                        },
                    },
                },
            },
        },
    },
}
# traefik.io/v1alpha1 IngressRouteTCP as the chart renders it (gRPC by TLS passthrough): the fields
# of Traefik's CRD the chart uses, strict. A HostSNI match with one backquoted host; a service port
# by number or by name.
_PORT = {"anyOf": [{"type": "integer", "minimum": 1, "maximum": 65535}, {"type": "string", "minLength": 1}]}
INGRESS_ROUTE_TCP_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "traefik.io/v1alpha1"},
        "kind": {"const": "IngressRouteTCP"},
        "metadata": SERVICE_MONITOR_SCHEMA["properties"]["metadata"],
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["entryPoints", "routes"],
            "properties": {
                "entryPoints": {"type": "array", "minItems": 1, "items": {"type": "string", "minLength": 1}},
                "routes": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["match", "services"],
                        "properties": {
                            "match": {"type": "string", "pattern": r"^HostSNI\(`[^`\s]+`\)$"},
                            "services": {
                                "type": "array",
                                "minItems": 1,
                                "items": {
                                    "type": "object",
                                    "additionalProperties": False,
                                    "required": ["name", "port"],
                                    "properties": {"name": _STR, "namespace": _STR, "port": _PORT},
                                },
                            },
                        },
                    },
                },
                "tls": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {"passthrough": {"type": "boolean"}, "secretName": _STR},
                },
            },
        },
    },
}
CRD_SCHEMAS: dict[tuple[str, str], dict[str, Any]] = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): SERVICE_MONITOR_SCHEMA,
    ("traefik.io/v1alpha1", "IngressRouteTCP"): INGRESS_ROUTE_TCP_SCHEMA,
}
WORKLOAD_KINDS = ("Deployment", "DaemonSet", "StatefulSet", "Job", "Pod")


@dataclass
class Report:
    passed: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)

    def ok(self, what: str) -> None:
        self.passed.append(what)
        print(f"ok    {what}")

    def fail(self, what: str, why: str) -> None:
        self.failed.append(f"{what}: {why}")
        print(f"FAIL  {what}\n      {why.strip().replace(chr(10), chr(10) + '      ')}")


def run_helm(helm: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(helm), *args], capture_output=True, text=True, timeout=HELM_TIMEOUT_S, check=False)


def render(helm: Path, chart: Path, values: Path) -> list[dict[str, Any]]:
    """`helm template` -> the list of rendered objects (empty documents dropped)."""
    result = run_helm(helm, "template", RELEASE, str(chart), "-f", str(values), "--namespace", NAMESPACE)
    if result.returncode != 0:
        raise RuntimeError(result.stderr.strip() or result.stdout.strip())
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def name_of(obj: dict[str, Any]) -> str:
    return f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"


def validate_object(obj: dict[str, Any]) -> str | None:
    """None when the object is valid, else why not."""
    import kubernetes_validate

    schema = CRD_SCHEMAS.get((obj.get("apiVersion", ""), obj.get("kind", "")))
    try:
        if schema is not None:
            jsonschema.validate(obj, schema)
        else:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.SchemaNotFoundError as exc:
        return f"no schema for {exc.api_version} {exc.kind} in Kubernetes {exc.version}"
    except jsonschema.ValidationError as exc:
        where = "/".join(str(part) for part in exc.absolute_path) or "(root)"
        return f"at {where}: {exc.message}"
    return None


def _pod_spec(obj: dict[str, Any]) -> dict[str, Any] | None:
    if obj.get("kind") == "Pod":
        spec: dict[str, Any] = obj.get("spec", {})
        return spec
    if obj.get("kind") in WORKLOAD_KINDS:
        template_spec: dict[str, Any] = obj.get("spec", {}).get("template", {}).get("spec", {})
        return template_spec
    return None


def policy_problems(obj: dict[str, Any]) -> list[str]:
    """House security rules the Kubernetes schemas cannot express."""
    spec = _pod_spec(obj)
    if spec is None:
        return []
    problems = []
    pod_ctx = spec.get("securityContext", {})
    for container in [*spec.get("initContainers", []), *spec.get("containers", [])]:
        label = f"container {container['name']}"
        ctx = container.get("securityContext", {})
        if ctx.get("readOnlyRootFilesystem") is not True:
            problems.append(f"{label}: readOnlyRootFilesystem must be true")
        if ctx.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{label}: allowPrivilegeEscalation must be false")
        caps = ctx.get("capabilities", {})
        if "ALL" not in caps.get("drop", []):
            problems.append(f"{label}: capabilities must drop ALL")
        runs_as_root = ctx.get("runAsUser", pod_ctx.get("runAsUser")) == 0
        non_root = ctx.get("runAsNonRoot", pod_ctx.get("runAsNonRoot")) is True
        # The one allowed exception: a short init container that only chowns a hostPath.
        if runs_as_root and set(caps.get("add", [])) - {"CHOWN"}:
            problems.append(f"{label}: runs as root with capabilities beyond CHOWN")
        if not runs_as_root and not non_root:
            problems.append(f"{label}: runAsNonRoot must be true")
        if runs_as_root and container not in spec.get("initContainers", []):
            problems.append(f"{label}: only init containers may run as root")
        if not container.get("resources", {}).get("requests"):
            problems.append(f"{label}: resources.requests must be set")
    component = obj.get("metadata", {}).get("labels", {}).get("app.kubernetes.io/component")
    if obj.get("kind") == "Deployment" and component == "controller":
        main = spec["containers"][0]
        if main.get("livenessProbe", {}).get("httpGet", {}).get("path") != "/healthz":
            problems.append("controller livenessProbe must GET /healthz")
        if main.get("readinessProbe", {}).get("httpGet", {}).get("path") != "/readyz":
            problems.append("controller readinessProbe must GET /readyz")
    return problems


def check_values_file(helm: Path, chart: Path, values: Path, report: Report) -> None:
    label = f"{chart.name} {values.relative_to(chart)}"
    lint = run_helm(helm, "lint", str(chart), "-f", str(values), "--strict", "--namespace", NAMESPACE)
    if lint.returncode != 0:
        report.fail(f"{label}: helm lint", lint.stdout + lint.stderr)
    else:
        report.ok(f"{label}: helm lint --strict")
    try:
        objects = render(helm, chart, values)
    except RuntimeError as exc:
        report.fail(f"{label}: helm template", str(exc))
        return
    problems = []
    for obj in objects:
        why = validate_object(obj)
        if why:
            problems.append(f"{name_of(obj)}: {why}")
        problems.extend(f"{name_of(obj)}: {p}" for p in policy_problems(obj))
    kinds = sorted({name_of(o).split("/")[0] for o in objects})
    if problems:
        report.fail(f"{label}: {len(objects)} objects vs Kubernetes {KUBERNETES_VERSION}", "\n".join(problems))
    else:
        report.ok(f"{label}: {len(objects)} objects valid for Kubernetes {KUBERNETES_VERSION} ({', '.join(kinds)})")


def expected_error(values: Path) -> str | None:
    for line in values.read_text().splitlines():
        if line.startswith("# expect:"):
            return line.removeprefix("# expect:").strip()
    return None


def check_invalid_file(helm: Path, chart: Path, values: Path, report: Report) -> None:
    label = f"{chart.name} {values.relative_to(chart)}"
    expect = expected_error(values)
    if not expect:
        report.fail(label, "an invalid values file needs a '# expect: TEXT' header line")
        return
    result = run_helm(helm, "template", RELEASE, str(chart), "-f", str(values), "--namespace", NAMESPACE)
    output = result.stderr + result.stdout
    if result.returncode == 0:
        report.fail(f"{label}: refused", "helm template accepted values the schema must refuse")
    elif "schema" not in output:
        report.fail(f"{label}: refused by the schema", f"refused, but not by values.schema.json:\n{output[-800:]}")
    elif expect not in output:
        report.fail(f"{label}: refused for '{expect}'", f"helm's error does not mention it:\n{output[-800:]}")
    else:
        report.ok(f"{label}: refused by values.schema.json ({expect})")


def charts(selected: list[str]) -> list[Path]:
    found = sorted(path.parent for path in CHARTS_DIR.glob("*/Chart.yaml"))
    if selected:
        found = [chart for chart in found if chart.name in selected]
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("charts", nargs="*", help="chart folder names under charts/ (default: all)")
    args = parser.parse_args(argv)
    try:
        helm = find_helm()
    except HelmUnavailableError as exc:
        print(f"helm unavailable: {exc}", file=sys.stderr)
        return 2
    version = run_helm(helm, "version", "--short").stdout.strip()
    print(f"helm {version} ({helm}); Kubernetes schemas {KUBERNETES_VERSION}, strict")
    report = Report()
    chart_dirs = charts(args.charts)
    if not chart_dirs:
        report.fail("charts", f"no chart found under {CHARTS_DIR}")
    for chart in chart_dirs:
        values_files = sorted((chart / "ci").glob("*.yaml"))
        invalid_files = sorted((chart / "ci" / "invalid").glob("*.yaml"))
        if not values_files:
            report.fail(chart.name, "no ci/*.yaml values files to test with")
        if not invalid_files:
            report.fail(chart.name, "no ci/invalid/*.yaml values files: the schema is never shown to refuse")
        for values in values_files:
            check_values_file(helm, chart, values, report)
        for values in invalid_files:
            check_invalid_file(helm, chart, values, report)
    print(f"\ncharts: {len(report.passed)} passed, {len(report.failed)} failed")
    for failure in report.failed:
        print(f"  - {failure.splitlines()[0]}")
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
