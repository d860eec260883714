"""The CLI's client of the controller's REST API, and its output helpers.

Errors from the controller arrive as `{"error": code, "message": ...}`; they become one
`CliError` line for the user, never a traceback. Connection failures say which URL was tried
and how to point the CLI elsewhere.
"""

from __future__ import annotations

import json
import os
import stat
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import tomllib
from rich.console import Console
from rich.table import Table

from fleet.core.atomic import write_bytes_atomic

DEFAULT_URL = "http://127.0.0.1:8080"
DEFAULT_CONFIG = "~/.config/fleet/config.toml"
CONFIG_KEYS = ("url", "token", "ca_cert")
TOKEN_HELP = ("give the CLI an API token with --token, FLEET_TOKEN or `fleet login --token TOKEN` "
              "(a new controller writes its first admin token to <data_dir>/admin.token)")
console = Console()
err_console = Console(stderr=True, soft_wrap=True)


class CliError(Exception):
    """A failure to report to the user in one line, with exit code `code`."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


@dataclass
class GlobalOptions:
    """What the top-level `fleet --token T --ca-cert F` options said, for every Client made after."""

    token: str | None = None
    ca_cert: str | None = None


GLOBAL = GlobalOptions()


def config_path() -> Path:
    return Path(os.environ.get("FLEET_CONFIG") or DEFAULT_CONFIG).expanduser()


def load_config(path: Path | None = None) -> dict[str, str]:
    """The CLI config file (url, token, ca_cert), refused if group or others may read it."""
    path = path or config_path()
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise CliError(f"cannot read the CLI config {path}: {exc}") from exc
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise CliError(
            f"the CLI config {path} holds a token but is readable by others (mode {stat.S_IMODE(mode):04o}); "
            f"run `chmod 600 {path}`"
        )
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise CliError(f"cannot read the CLI config {path}: {exc}") from exc
    out: dict[str, str] = {}
    for key in CONFIG_KEYS:
        value = data.get(key)
        if value is None:
            continue
        if not isinstance(value, str):
            raise CliError(f"{path}: {key} must be a string")
        out[key] = value
    return out


def write_config(values: dict[str, str], path: Path | None = None) -> Path:
    """Write the CLI config atomically, mode 0600 from its first byte (folder 0700)."""
    path = path or config_path()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    # JSON string escapes are valid TOML basic-string escapes.
    text = "".join(f"{key} = {json.dumps(values[key])}\n" for key in CONFIG_KEYS if values.get(key))
    write_bytes_atomic(path, text.encode(), 0o600)  # mkstemp makes the temporary file 0600
    return path


class _LazyConfig:
    """Reads the config file only if some setting is not given by an option or the environment."""

    def __init__(self) -> None:
        self._data: dict[str, str] | None = None

    def get(self, key: str) -> str | None:
        if self._data is None:
            self._data = load_config()
        return self._data.get(key)


def controller_url(explicit: str | None, config: _LazyConfig | None = None) -> str:
    url = explicit or os.environ.get("FLEET_URL") or (config or _LazyConfig()).get("url") or DEFAULT_URL
    return url.rstrip("/")


class Client:
    def __init__(self, base_url: str | None = None, timeout: float = 30.0, *, token: str | None = None,
                 ca_cert: str | None = None) -> None:
        config = _LazyConfig()
        self.base_url = controller_url(base_url, config)
        self.token, self.token_source = self._pick(
            ("the token argument", token), ("--token", GLOBAL.token), ("FLEET_TOKEN", os.environ.get("FLEET_TOKEN")),
            (str(config_path()), None), config=config, key="token")
        ca, _ = self._pick(("the ca_cert argument", ca_cert), ("--ca-cert", GLOBAL.ca_cert),
                           ("FLEET_CA_CERT", os.environ.get("FLEET_CA_CERT")), ("config", None),
                           config=config, key="ca_cert")
        verify: str | bool = True
        if ca:
            ca_path = Path(ca).expanduser()
            if not ca_path.is_file():
                raise CliError(f"CA certificate {ca_path} not found (from --ca-cert, FLEET_CA_CERT or the config)")
            verify = str(ca_path)
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        self.http = httpx.Client(base_url=self.base_url, timeout=timeout, headers=headers, verify=verify)

    @staticmethod
    def _pick(*sources: tuple[str, str | None], config: _LazyConfig, key: str) -> tuple[str | None, str | None]:
        for name, value in sources[:-1]:
            if value:
                return value, name
        value = config.get(key)
        return (value, sources[-1][0]) if value else (None, None)

    def _refused(self, response: httpx.Response) -> CliError:
        try:
            body = response.json()
            message = body.get("message") or body.get("detail") or response.text
            if isinstance(message, list):  # FastAPI validation errors
                message = "; ".join(f"{'.'.join(map(str, e.get('loc', [])))}: {e.get('msg')}" for e in message)
        except (ValueError, AttributeError):
            message = response.text or response.reason_phrase
        if response.status_code == 401:
            hint = (f"the token from {self.token_source} was refused; " if self.token else "no token given; ")
            return CliError(f"controller refused (401): {message}\n  {hint}{TOKEN_HELP}")
        if response.status_code == 403:
            return CliError(f"controller refused (403): {message}\n  (token from {self.token_source})")
        return CliError(f"controller refused ({response.status_code}): {message}")

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.ConnectError as exc:
            raise CliError(
                f"cannot reach the controller at {self.base_url} ({exc}); start it with `fleet controller serve` "
                "or point the CLI at it with --controller URL / FLEET_URL"
            ) from exc
        except httpx.HTTPError as exc:
            raise CliError(f"request to {self.base_url}{path} failed: {exc}") from exc
        if response.status_code >= 400:
            raise self._refused(response)
        if response.status_code == 204 or not response.content:
            return None
        if response.headers.get("content-type", "").startswith("application/json"):
            return response.json()
        return response.content

    def get(self, path: str, **kwargs: Any) -> Any:
        return self.request("GET", path, **kwargs)

    def post(self, path: str, **kwargs: Any) -> Any:
        return self.request("POST", path, **kwargs)

    def get_optional(self, path: str) -> Any:
        """GET that answers None on 404 instead of failing."""
        try:
            response = self.http.get(path)
        except httpx.HTTPError as exc:
            raise CliError(f"cannot reach the controller at {self.base_url}: {exc}") from exc
        if response.status_code == 404:
            return None
        if response.status_code >= 400:
            raise self._refused(response)
        return response.content


def emit_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def table(title: str | None, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    out = Table(title=title, header_style="bold", title_justify="left")
    for column in columns:
        out.add_column(column)
    for row in rows:
        out.add_row(*("" if v is None else str(v) for v in row))
    console.print(out)


def gate_table(rows: Iterable[dict[str, Any]], title: str | None = None, detail: bool = True) -> None:
    """A gate's metric rows: value against threshold, verdict, sample count and (optionally) the detail."""

    def fmt(value: Any) -> str:
        return f"{value:.4g}" if isinstance(value, float) else ("" if value is None else str(value))

    def ok(value: Any) -> str:
        return "-" if value is None else ("ok" if value else "FAIL")

    columns = ["metric", "value", "threshold", "ok", "samples", *(["detail"] if detail else [])]
    table(title, columns, [
        [str(r.get("metric", "")) + (f" @{r['group']}" if r.get("group") else ""), fmt(r.get("value")),
         f"{r.get('comparison', '')} {fmt(r.get('threshold'))}", ok(r.get("ok")), r.get("samples"),
         *([r.get("detail")] if detail else [])] for r in rows])


def when(value: Any) -> str:
    """An ISO timestamp shortened for a table cell (UTC, to the second)."""
    text = "" if value is None else str(value)
    return text[:19].replace("T", " ") if len(text) >= 19 else text


def labels_text(labels: dict[str, str] | None) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted((labels or {}).items()))


def parse_labels(items: Sequence[str] | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items or ():
        for part in item.split(","):
            key, sep, value = part.partition("=")
            if not sep or not key.strip():
                raise CliError(f"expected KEY=VALUE, got {part!r}")
            out[key.strip()] = value.strip()
    return out
