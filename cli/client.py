"""The CLI's client of the controller's REST API, and its output helpers.

Errors from the controller arrive as `{"error": code, "message": ...}`; they become one
`CliError` line for the user, never a traceback. Connection failures say which URL was tried
and how to point the CLI elsewhere.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterable, Sequence
from typing import Any

import httpx
from rich.console import Console
from rich.table import Table

DEFAULT_URL = "http://127.0.0.1:8080"
console = Console()
err_console = Console(stderr=True, soft_wrap=True)


class CliError(Exception):
    """A failure to report to the user in one line, with exit code `code`."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


def controller_url(explicit: str | None) -> str:
    return (explicit or os.environ.get("FLEET_URL") or DEFAULT_URL).rstrip("/")


class Client:
    def __init__(self, base_url: str | None = None, timeout: float = 30.0) -> None:
        self.base_url = controller_url(base_url)
        self.http = httpx.Client(base_url=self.base_url, timeout=timeout)

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
            try:
                body = response.json()
                message = body.get("message") or body.get("detail") or response.text
                if isinstance(message, list):  # FastAPI validation errors
                    message = "; ".join(f"{'.'.join(map(str, e.get('loc', [])))}: {e.get('msg')}" for e in message)
            except ValueError:
                message = response.text or response.reason_phrase
            raise CliError(f"controller refused ({response.status_code}): {message}")
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
            raise CliError(f"controller refused ({response.status_code}): {response.text}")
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
