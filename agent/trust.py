"""The agent's view of the release-signed metadata: python-tuf's ngclient over httpx.

Rules this module enforces:

- The agent trusts only the root it was provisioned with and the chain of roots that root signed
  after it; every other metadata file is checked by `tuf.ngclient` (signatures, thresholds,
  expiry, version rollback, lengths and hashes between timestamp, snapshot and targets).
- Every failure surfaces as `fleet.core.errors.SignatureError` with a message saying what failed.
  Its `details` carry `reason` (`unsigned`, `expired`, `rollback`, `mismatch`, `invalid`,
  `unknown_target`, `too_large`, `unavailable`, `local_io`) and `transient`: True only when
  retrying later may help (network, HTTP 5xx/404, local disk), so the update state machine can
  tell "try again" from "this bundle must not be installed".
- `min_release(model)` reads the model's signed policy target (`NAME/policy.json`): the lowest
  release counter the release keys allow on devices (0 when none is signed).
- Bundles themselves are not downloaded here: `target_info` returns the signed length, SHA-256
  and custom fields, and the agent's resumable downloader checks the bytes against them.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
from tuf.api import exceptions as tuf_errors
from tuf.api.metadata import Metadata, Root
from tuf.ngclient import Updater
from tuf.ngclient.fetcher import FetcherInterface

from fleet.core.errors import SignatureError
from fleet.core.trust import min_release_from_custom, policy_path_for

DEFAULT_CONNECT_TIMEOUT_S = 5.0
DEFAULT_READ_TIMEOUT_S = 30.0
# A whole metadata file must arrive within this, however slowly a server drips bytes.
DEFAULT_TOTAL_TIMEOUT_S = 120.0
# Reuse one verified view of the metadata for this long before asking the controller again.
DEFAULT_MAX_AGE_S = 60.0


class HttpxFetcher(FetcherInterface):
    """ngclient's network interface over httpx: streamed chunks, connect/read/total timeouts."""

    def __init__(
        self,
        client: httpx.Client | None = None,
        *,
        connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
        read_timeout_s: float = DEFAULT_READ_TIMEOUT_S,
        total_timeout_s: float = DEFAULT_TOTAL_TIMEOUT_S,
        chunk_size: int = 64 * 1024,
    ) -> None:
        self._owns_client = client is None
        self._client = client or httpx.Client(
            timeout=httpx.Timeout(read_timeout_s, connect=connect_timeout_s),
            follow_redirects=False,  # metadata lives at one place; a redirect is a misconfiguration
        )
        self._total_timeout_s = total_timeout_s
        self._chunk_size = chunk_size

    def close(self) -> None:
        if self._owns_client:
            self._client.close()

    def _fetch(self, url: str) -> Iterator[bytes]:
        deadline = time.monotonic() + self._total_timeout_s
        try:
            response = self._client.send(self._client.build_request("GET", url), stream=True)
        except httpx.TimeoutException as exc:
            raise tuf_errors.SlowRetrievalError(f"timed out connecting to {url}") from exc
        except httpx.HTTPError as exc:
            raise tuf_errors.DownloadError(f"cannot fetch {url}: {exc}") from exc
        if response.status_code >= 400:
            response.close()
            raise tuf_errors.DownloadHTTPError(
                f"{url} answered HTTP {response.status_code}", response.status_code
            )
        return self._chunks(response, url, deadline)

    def _chunks(self, response: httpx.Response, url: str, deadline: float) -> Iterator[bytes]:
        # fetch() wraps only errors raised before the first chunk; errors while streaming must be
        # turned into DownloadErrors here, or they would escape ngclient's error handling.
        try:
            for chunk in response.iter_bytes(self._chunk_size):
                if time.monotonic() > deadline:
                    raise tuf_errors.SlowRetrievalError(
                        f"{url} took longer than {self._total_timeout_s:.0f}s to download"
                    )
                yield chunk
        except httpx.TimeoutException as exc:
            raise tuf_errors.SlowRetrievalError(f"timed out reading {url}") from exc
        except httpx.HTTPError as exc:
            raise tuf_errors.DownloadError(f"connection broke while reading {url}: {exc}") from exc
        finally:
            response.close()


class TrustedMetadataClient:
    """Refreshes and reads the release-signed metadata the controller publishes under `metadata_url`.

    `trusted_root` is the provisioned root.json; it is copied into `metadata_dir` on first use,
    where later verified metadata is cached (and used for rollback protection across restarts).
    Thread-safe: calls are serialized.
    """

    def __init__(
        self,
        metadata_dir: Path,
        metadata_url: str,
        trusted_root: bytes,
        *,
        fetcher: FetcherInterface | None = None,
        client: httpx.Client | None = None,
        max_age_s: float = DEFAULT_MAX_AGE_S,
    ) -> None:
        try:
            root = Metadata[Root].from_bytes(trusted_root)
        except Exception as exc:
            raise SignatureError(
                f"the provisioned root metadata is not valid TUF root JSON: {exc}", reason="invalid"
            ) from exc
        if not isinstance(root.signed, Root):
            raise SignatureError(
                f"the provisioned root metadata is {root.signed.type} metadata, not root", reason="invalid"
            )
        self._dir = Path(metadata_dir)
        self._url = metadata_url if metadata_url.endswith("/") else metadata_url + "/"
        self._trusted_root = bytes(trusted_root)
        self._fetcher = fetcher if fetcher is not None else HttpxFetcher(client)
        self._owns_fetcher = fetcher is None
        self._max_age_s = max_age_s
        self._lock = threading.Lock()
        self._updater: Updater | None = None
        self._refreshed_at = 0.0

    def close(self) -> None:
        if self._owns_fetcher and isinstance(self._fetcher, HttpxFetcher):
            self._fetcher.close()

    def __enter__(self) -> TrustedMetadataClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def refresh(self) -> None:
        """Fetch and verify root (rotations), timestamp, snapshot and targets, in the TUF order."""
        with self._lock:
            self._refresh_locked()

    def target_info(self, target_path: str) -> tuple[int, str, dict[str, Any]]:
        """Signed (length, sha256, custom) of a bundle; SignatureError if no release key signed it."""
        with self._lock:
            fresh = False
            if self._updater is None or time.monotonic() - self._refreshed_at > self._max_age_s:
                self._refresh_locked()
                fresh = True
            info = self._lookup(target_path)
            if info is None and not fresh:
                # Pushed after our last refresh? Look once more before calling it unsigned.
                self._refresh_locked()
                info = self._lookup(target_path)
            if info is None:
                raise SignatureError(
                    f"no release-signed target {target_path!r} in the targets metadata: the controller "
                    "offers a bundle the release key did not sign",
                    reason="unknown_target",
                    transient=False,
                )
            sha256 = info.hashes.get("sha256")
            if not isinstance(sha256, str):
                raise SignatureError(
                    f"target {target_path!r} is signed without a sha256 hash; cannot verify its bytes",
                    reason="invalid",
                    transient=False,
                )
            custom = info.custom
            return info.length, sha256, dict(custom) if isinstance(custom, dict) else {}

    def min_release(self, model: str) -> int:
        """The lowest release of `model` the release-signed policy allows; 0 when none is signed.

        Reads the view the last `target_info`/`refresh` verified (refreshing first if there is none).
        """
        with self._lock:
            if self._updater is None:
                self._refresh_locked()
            info = self._lookup(policy_path_for(model))
            custom = None if info is None else info.custom
            if info is not None and not isinstance(custom, dict):
                custom = {}
            return min_release_from_custom(custom, model)

    def _lookup(self, target_path: str) -> Any:
        if self._updater is None:  # pragma: no cover - _refresh_locked sets it or raises
            raise SignatureError("metadata was not refreshed", reason="invalid", transient=True)
        try:
            return self._updater.get_targetinfo(target_path)
        except Exception as exc:
            raise _to_signature_error(exc, f"looking up {target_path}") from exc

    def _refresh_locked(self) -> None:
        # A failed refresh must not leave an older view in place: it could be expired or frozen.
        self._updater = None
        try:
            self._dir.mkdir(parents=True, exist_ok=True)
            # ngclient refreshes once per Updater; the local cache (metadata_dir) carries trust over.
            updater = Updater(
                metadata_dir=str(self._dir),
                metadata_base_url=self._url,
                fetcher=self._fetcher,
                bootstrap=self._trusted_root,
            )
            updater.refresh()
        except Exception as exc:
            raise _to_signature_error(exc, f"refreshing metadata from {self._url}") from exc
        self._updater = updater
        self._refreshed_at = time.monotonic()


def _to_signature_error(exc: Exception, doing: str) -> SignatureError:
    """One place that says, in words an operator can act on, why TUF refused."""
    if isinstance(exc, SignatureError):
        return exc
    if isinstance(exc, tuf_errors.ExpiredMetadataError):
        return SignatureError(
            f"{doing}: metadata has expired ({exc}); the controller re-signs timestamp and snapshot "
            "on its own, so check that it runs and that this device's clock is right",
            reason="expired",
            transient=True,
        )
    if isinstance(exc, tuf_errors.UnsignedMetadataError):
        return SignatureError(
            f"{doing}: metadata is not signed by the trusted keys (wrong key or tampered content): {exc}",
            reason="unsigned",
            transient=False,
        )
    if isinstance(exc, tuf_errors.BadVersionNumberError):
        return SignatureError(
            f"{doing}: rollback refused, the server offers older metadata than this device has seen: {exc}",
            reason="rollback",
            transient=False,
        )
    if isinstance(exc, tuf_errors.LengthOrHashMismatchError):
        return SignatureError(
            f"{doing}: metadata does not match the length or hash its parent signed: {exc}",
            reason="mismatch",
            # Without consistent snapshots a refresh can interleave with the controller's re-signing
            # (old timestamp, new snapshot); a later retry sees a matching pair.
            transient=True,
        )
    if isinstance(exc, tuf_errors.RepositoryError):
        return SignatureError(f"{doing}: metadata is invalid: {exc}", reason="invalid", transient=False)
    if isinstance(exc, tuf_errors.DownloadLengthMismatchError):
        return SignatureError(
            f"{doing}: a metadata file is larger than allowed: {exc}", reason="too_large", transient=False
        )
    if isinstance(exc, tuf_errors.DownloadHTTPError):
        return SignatureError(
            f"{doing}: the controller answered HTTP {exc.status_code} ({exc}); "
            "it may have no signed bundles yet, or be misconfigured",
            reason="unavailable",
            transient=True,
            status_code=exc.status_code,
        )
    if isinstance(exc, tuf_errors.DownloadError):
        cause = exc.__cause__ or exc
        return SignatureError(
            f"{doing}: cannot download metadata: {cause}", reason="unavailable", transient=True
        )
    if isinstance(exc, OSError):
        return SignatureError(
            f"{doing}: cannot write the metadata cache: {exc}", reason="local_io", transient=True
        )
    return SignatureError(f"{doing}: unexpected failure: {exc!r}", reason="invalid", transient=False)
