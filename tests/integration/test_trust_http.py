"""The device's metadata client against a real HTTP server publishing an OnlineRepository.

Given a controller repository served over HTTP (http.server on a free port) and a client
provisioned with root.json, when the client refreshes it gets the release-signed target info;
when the server is compromised, stale, or rolled back, the client refuses with SignatureError.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from securesystemslib.signer import CryptoSigner

from fleet.agent.trust import HttpxFetcher, TrustedMetadataClient
from fleet.controller.tuf_store import FileMetadataStore
from fleet.core.errors import NotFoundError, SignatureError
from fleet.core.trust import (
    MetadataStore,
    OnlineRepository,
    add_target,
    new_root,
    rotate_root,
    target_path_for,
)

SHA_V1 = "1" * 64
SHA_V2 = "2" * 64


class Controller:
    """Release key, online key, a repository on disk, and an HTTP server publishing it under /tuf/."""

    def __init__(self, data_dir: Path) -> None:
        self.release = CryptoSigner.generate_ed25519()
        self.online = CryptoSigner.generate_ed25519()
        self.root = new_root(self.release, self.release.public_key, self.online.public_key)
        self.store: MetadataStore = FileMetadataStore(data_dir)
        self.repo = OnlineRepository(self.online, self.store)
        self.repo.install_root(self.root)
        self.requests: list[str] = []
        controller = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                controller.requests.append(self.path)
                prefix = "/tuf/"
                try:
                    if not self.path.startswith(prefix):
                        raise NotFoundError(self.path)
                    body = controller.repo.get(self.path[len(prefix) :])
                except NotFoundError:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:  # keep test output quiet
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/tuf/"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05})
        self.thread.daemon = True
        self.thread.start()

    def push(self, name: str, version: str, sha: str, length: int, now: datetime | None = None) -> None:
        targets = add_target(
            self.store.get("targets.json"),
            self.root,
            self.release,
            target_path=target_path_for(name, version),
            length=length,
            sha256=sha,
            custom={"model": name, "version": version, "release": 1},
        )
        self.repo.accept_targets(targets, now=now)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


@pytest.fixture
def controller(tmp_path: Path) -> Iterator[Controller]:
    ctl = Controller(tmp_path / "controller-tuf")
    yield ctl
    ctl.close()


def client_for(controller: Controller, device_dir: Path, max_age_s: float = 60.0) -> TrustedMetadataClient:
    return TrustedMetadataClient(
        metadata_dir=device_dir,
        metadata_url=controller.url,
        trusted_root=controller.root,
        max_age_s=max_age_s,
    )


def test_refresh_and_read_signed_target_info(controller: Controller, tmp_path: Path) -> None:
    controller.push("detector", "v1", SHA_V1, 4096)
    with client_for(controller, tmp_path / "device") as client:
        client.refresh()
        length, sha, custom = client.target_info("detector/v1/bundle.tar")
    assert (length, sha, custom) == (4096, SHA_V1, {"model": "detector", "version": "v1", "release": 1})
    # The provisioned root and the verified metadata are cached for rollback protection.
    cached = {p.name for p in (tmp_path / "device").iterdir()}
    assert {"root.json", "timestamp.json", "snapshot.json", "targets.json"} <= cached
    assert "/tuf/2.root.json" in controller.requests  # asked for a newer root, got 404


def test_new_push_is_seen_and_unsigned_target_is_refused(controller: Controller, tmp_path: Path) -> None:
    controller.push("detector", "v1", SHA_V1, 10)
    client = client_for(controller, tmp_path / "device", max_age_s=3600)
    client.refresh()
    controller.push("detector", "v2", SHA_V2, 20)
    # Not in the cached view: the client refreshes once more before calling it unsigned.
    assert client.target_info("detector/v2/bundle.tar")[:2] == (20, SHA_V2)
    with pytest.raises(SignatureError, match="no release-signed target") as exc:
        client.target_info("detector/v9/bundle.tar")
    assert exc.value.details["reason"] == "unknown_target"
    client.close()


def test_targets_signed_by_another_key_are_refused(controller: Controller, tmp_path: Path) -> None:
    controller.push("detector", "v1", SHA_V1, 10)
    # A compromised controller: it holds the online key but not the release key. It publishes a
    # targets signed by a key of its own and re-signs snapshot and timestamp over it.
    intruder = CryptoSigner.generate_ed25519()
    fake_root = new_root(intruder, intruder.public_key, controller.online.public_key)
    forged = add_target(
        None, fake_root, intruder, target_path="detector/v1/bundle.tar", length=10, sha256=SHA_V2, custom={}
    )
    controller.store.put("targets.json", forged)
    assert controller.repo.refresh() is True

    client = client_for(controller, tmp_path / "device")
    with pytest.raises(SignatureError, match="not signed by the trusted keys") as exc:
        client.refresh()
    assert exc.value.details["reason"] == "unsigned"
    assert exc.value.details["transient"] is False
    # A failed refresh leaves nothing usable behind.
    with pytest.raises(SignatureError):
        client.target_info("detector/v1/bundle.tar")


def test_expired_timestamp_is_refused(controller: Controller, tmp_path: Path) -> None:
    # The controller stopped re-signing three days ago: its 24 h timestamp has expired.
    controller.push("detector", "v1", SHA_V1, 10, now=datetime.now(timezone.utc) - timedelta(days=3))
    client = client_for(controller, tmp_path / "device")
    with pytest.raises(SignatureError, match="expired") as exc:
        client.refresh()
    assert exc.value.details["reason"] == "expired"
    # Once the controller re-signs, the same client recovers.
    assert controller.repo.refresh() is True
    client.refresh()
    assert client.target_info("detector/v1/bundle.tar")[1] == SHA_V1


def test_rollback_to_older_timestamp_is_refused(controller: Controller, tmp_path: Path) -> None:
    controller.push("detector", "v1", SHA_V1, 10)
    old_timestamp = controller.store.get("timestamp.json")
    assert old_timestamp is not None
    controller.push("detector", "v2", SHA_V2, 10)
    client = client_for(controller, tmp_path / "device")
    client.refresh()  # the device has now seen timestamp v2
    controller.store.put("timestamp.json", old_timestamp)
    with pytest.raises(SignatureError, match="rollback") as exc:
        client.refresh()
    assert exc.value.details["reason"] == "rollback"


def test_client_follows_a_root_rotation(controller: Controller, tmp_path: Path) -> None:
    controller.push("detector", "v1", SHA_V1, 10)
    client = client_for(controller, tmp_path / "device")
    client.refresh()
    new_online = CryptoSigner.generate_ed25519()
    rotated = rotate_root(controller.root, [controller.release], online_public=new_online.public_key)
    controller.repo = OnlineRepository(new_online, controller.store)
    controller.repo.install_root(rotated)
    controller.repo.refresh()
    client.refresh()  # still provisioned with root v1; walks to v2 through 2.root.json
    assert (tmp_path / "device" / "root_history" / "2.root.json").read_bytes() == rotated
    assert client.target_info("detector/v1/bundle.tar")[0] == 10


def test_unreachable_controller_is_a_transient_failure(tmp_path: Path) -> None:
    release, online = CryptoSigner.generate_ed25519(), CryptoSigner.generate_ed25519()
    root = new_root(release, release.public_key, online.public_key)
    with socket.socket() as sock:  # a port that was free a moment ago: nothing listens there
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    client = TrustedMetadataClient(
        metadata_dir=tmp_path / "device", metadata_url=f"http://127.0.0.1:{port}/tuf", trusted_root=root
    )
    with pytest.raises(SignatureError, match="cannot download metadata") as exc:
        client.refresh()
    assert exc.value.details == {"reason": "unavailable", "transient": True}
    with pytest.raises(SignatureError, match="not valid TUF root"):
        TrustedMetadataClient(metadata_dir=tmp_path / "d2", metadata_url="http://x/", trusted_root=b"{}")


def test_a_server_that_drips_bytes_hits_the_total_timeout(tmp_path: Path) -> None:
    class Drip(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", "40")
            self.end_headers()
            try:
                for _ in range(40):  # 1 byte every 50 ms: never idle long enough for the read timeout
                    self.wfile.write(b" ")
                    self.wfile.flush()
                    time.sleep(0.05)
            except OSError:
                pass  # the client gave up, as it should

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Drip)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        release, online = CryptoSigner.generate_ed25519(), CryptoSigner.generate_ed25519()
        client = TrustedMetadataClient(
            metadata_dir=tmp_path / "device",
            metadata_url=f"http://127.0.0.1:{server.server_address[1]}/tuf/",
            trusted_root=new_root(release, release.public_key, online.public_key),
            fetcher=HttpxFetcher(read_timeout_s=1.0, total_timeout_s=0.4, chunk_size=1),
        )
        started = time.monotonic()
        with pytest.raises(SignatureError, match="took longer than") as exc:
            client.refresh()
        assert time.monotonic() - started < 1.5
        assert exc.value.details["transient"] is True
    finally:
        server.shutdown()
        server.server_close()
