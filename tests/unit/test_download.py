"""Resumable, capped, hash-checked downloads against a real HTTP server on localhost.

The server is a `http.server` subclass in a thread that honours `Range` and can misbehave on
request (ignore ranges, send more than the signed length, drop the connection mid-body).
"""

from __future__ import annotations

import hashlib
import http.server
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from fleet.agent.download import DownloadError, download_bundle, file_sha256
from fleet.core.errors import IntegrityError

DATA = os.urandom(300_000) + b"end-of-bundle"
SHA = hashlib.sha256(DATA).hexdigest()


@dataclass
class Behaviour:
    body: bytes = DATA
    ignore_range: bool = False
    extra: bytes = b""  # appended to the body
    announce_length: bool = True
    drop_after: int | None = None  # close the connection after this many body bytes
    status: int | None = None
    requests: list[dict[str, str | None]] = field(default_factory=list)


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:  # quiet test output
        pass

    def do_GET(self) -> None:
        assert isinstance(self.server, _Server)
        b = self.server.behaviour
        b.requests.append({"path": self.path, "range": self.headers.get("Range")})
        if b.status is not None:
            self.send_response(b.status)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body = b.body + b.extra
        start = 0
        header = self.headers.get("Range")
        if header and not b.ignore_range:
            start = int(header.split("=")[1].split("-")[0])
            if start >= len(body):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        payload = body[start:]
        if b.announce_length:
            self.send_header("Content-Length", str(len(payload)))
        else:
            self.close_connection = True
            self.send_header("Connection", "close")
        self.end_headers()
        if b.drop_after is not None:
            self.wfile.write(payload[: b.drop_after])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(payload)


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    behaviour: Behaviour

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # the client hanging up on an oversized body is part of the test


@pytest.fixture
def server() -> Iterator[tuple[str, Behaviour]]:
    httpd = _Server(("127.0.0.1", 0), _Handler)
    behaviour = httpd.behaviour = Behaviour()
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/m/1/bundle.tar", behaviour
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=5.0) as c:
        yield c


def _part(tmp_path: Path) -> Path:
    return tmp_path / "downloads" / "m-1.part"


def test_full_download_returns_checked_tar_and_reports_progress(server, client, tmp_path):
    url, behaviour = server
    seen: list[tuple[int, int]] = []
    out = download_bundle(client, url, _part(tmp_path), length=len(DATA), sha256=SHA,
                          progress=lambda done, total: seen.append((done, total)), chunk_size=64 * 1024)
    assert out == tmp_path / "downloads" / "m-1.tar"
    assert out.read_bytes() == DATA
    assert not _part(tmp_path).exists()
    assert seen[-1] == (len(DATA), len(DATA))
    assert [done for done, _ in seen] == sorted(done for done, _ in seen)
    assert behaviour.requests[0]["range"] is None


def test_resumes_from_a_partial_part_file_with_a_range_request(server, client, tmp_path):
    url, behaviour = server
    part = _part(tmp_path)
    part.parent.mkdir(parents=True)
    part.write_bytes(DATA[:100_000])
    out = download_bundle(client, url, part, length=len(DATA), sha256=SHA)
    assert out.read_bytes() == DATA
    assert behaviour.requests == [{"path": "/m/1/bundle.tar", "range": "bytes=100000-"}]


def test_server_ignoring_range_restarts_from_zero(server, client, tmp_path):
    url, behaviour = server
    behaviour.ignore_range = True
    part = _part(tmp_path)
    part.parent.mkdir(parents=True)
    # A stale prefix that the 200 answer must overwrite, not extend.
    part.write_bytes(b"x" * 50_000)
    out = download_bundle(client, url, part, length=len(DATA), sha256=SHA)
    assert out.read_bytes() == DATA
    assert behaviour.requests[0]["range"] == "bytes=50000-"


@pytest.mark.parametrize("announce", [True, False], ids=["content-length-too-big", "streams-too-much"])
def test_more_than_the_signed_length_is_refused_and_nothing_kept(server, client, tmp_path, announce):
    url, behaviour = server
    behaviour.extra = b"A" * 70_000
    behaviour.announce_length = announce
    with pytest.raises(IntegrityError, match="larger than its signed length"):
        download_bundle(client, url, _part(tmp_path), length=len(DATA), sha256=SHA)
    assert list((tmp_path / "downloads").iterdir()) == []


def test_wrong_hash_is_refused_and_the_part_deleted(server, client, tmp_path):
    url, behaviour = server
    tampered = bytearray(DATA)
    tampered[1234] ^= 0xFF
    behaviour.body = bytes(tampered)
    with pytest.raises(IntegrityError, match="SHA-256"):
        download_bundle(client, url, _part(tmp_path), length=len(DATA), sha256=SHA)
    assert list((tmp_path / "downloads").iterdir()) == []


def test_dropped_connection_is_retryable_keeps_the_part_and_resumes(server, client, tmp_path):
    url, behaviour = server
    behaviour.drop_after = 120_000
    part = _part(tmp_path)
    with pytest.raises(DownloadError) as info:
        download_bundle(client, url, part, length=len(DATA), sha256=SHA, chunk_size=16 * 1024)
    assert info.value.code == "download" and info.value.retryable
    kept = part.stat().st_size
    assert 0 < kept <= 120_000
    assert part.read_bytes() == DATA[:kept]

    behaviour.drop_after = None
    out = download_bundle(client, url, part, length=len(DATA), sha256=SHA)
    assert out.read_bytes() == DATA
    assert behaviour.requests[-1]["range"] == f"bytes={kept}-"


def test_part_longer_than_the_signed_length_is_discarded(server, client, tmp_path):
    url, behaviour = server
    part = _part(tmp_path)
    part.parent.mkdir(parents=True)
    part.write_bytes(DATA + b"junk")
    out = download_bundle(client, url, part, length=len(DATA), sha256=SHA)
    assert out.read_bytes() == DATA
    assert behaviour.requests[0]["range"] is None


def test_complete_part_file_is_finished_without_a_request(server, client, tmp_path):
    url, behaviour = server
    part = _part(tmp_path)
    part.parent.mkdir(parents=True)
    part.write_bytes(DATA)
    out = download_bundle(client, url, part, length=len(DATA), sha256=SHA)
    assert out.read_bytes() == DATA
    assert behaviour.requests == []


def test_server_error_status_is_a_download_error(server, client, tmp_path):
    url, behaviour = server
    behaviour.status = 404
    with pytest.raises(DownloadError, match="HTTP 404") as info:
        download_bundle(client, url, _part(tmp_path), length=len(DATA), sha256=SHA)
    assert not info.value.retryable


def test_unreachable_server_is_a_retryable_download_error(client, tmp_path):
    with pytest.raises(DownloadError) as info:
        download_bundle(client, "http://127.0.0.1:9/nothing", _part(tmp_path), length=10, sha256="0" * 64)
    assert info.value.retryable


def test_file_sha256_of_a_prefix(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(DATA)
    assert file_sha256(path) == (SHA, len(DATA))
    assert file_sha256(path, 1000) == (hashlib.sha256(DATA[:1000]).hexdigest(), 1000)
