"""An attacker-controlled HTTP proxy between an agent and the controller's REST URL.

GET requests are forwarded to the controller; a test installs `rules` (path regex -> function of
the upstream response) to replace or rewrite what the agent receives: TUF metadata under
`/tuf/`, bundle downloads under `/api/v1/models/.../bundle`. Everything it served is logged.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx


@dataclass
class Upstream:
    status: int
    body: bytes
    content_type: str


# A rule gets the path and the controller's answer (None: not fetched) and returns the answer to send.
Rule = Callable[[str, "Upstream | None"], "Upstream"]


FORWARDED = ("Range", "Authorization", "x-fleet-device-id")


class AttackProxy:
    def __init__(self, upstream_url: str) -> None:
        self.upstream = upstream_url.rstrip("/")
        self.rules: list[tuple[re.Pattern[str], Rule, bool]] = []
        self.log: list[tuple[str, int]] = []
        self._lock = threading.Lock()
        self._http = httpx.Client(timeout=30.0)
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                # The device's own request headers travel on: its Range, and its credentials (the
                # controller serves bundles only to enrolled devices and operators).
                forwarded = {name: value for name in FORWARDED if (value := self.headers.get(name))}
                answer = proxy.answer(self.path, forwarded)
                self.send_response(answer.status)
                self.send_header("Content-Type", answer.content_type)
                self.send_header("Content-Length", str(len(answer.body)))
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                self.wfile.write(answer.body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def answer(self, path: str, headers: dict[str, str]) -> Upstream:
        with self._lock:
            rules = list(self.rules)
        for pattern, rule, needs_upstream in rules:
            if pattern.search(path):
                # A rewritten body is always sent whole: ranges refer to the original bytes.
                whole = {k: v for k, v in headers.items() if k != "Range"}
                result = rule(path, self.fetch(path, whole) if needs_upstream else None)
                break
        else:
            result = self.fetch(path, headers)
        with self._lock:
            self.log.append((path, result.status))
        return result

    def fetch(self, path: str, headers: dict[str, str] | None = None) -> Upstream:
        response = self._http.get(self.upstream + path, headers=headers or {})
        return Upstream(response.status_code, response.content,
                        response.headers.get("content-type", "application/octet-stream"))

    def on(self, pattern: str, rule: Rule, *, needs_upstream: bool = True) -> None:
        with self._lock:
            self.rules.append((re.compile(pattern), rule, needs_upstream))

    def serve(self, pattern: str, body: bytes, status: int = 200) -> None:
        self.on(pattern, lambda _p, _u: Upstream(status, body, "application/json"), needs_upstream=False)

    def clear(self) -> None:
        with self._lock:
            self.rules.clear()

    def served(self, pattern: str) -> list[tuple[str, int]]:
        with self._lock:
            return [entry for entry in self.log if re.search(pattern, entry[0])]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._http.close()
