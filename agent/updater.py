"""The per-model updater: executes `fleet.core.update`'s state machine against disk, network and runtime.

Rules this module keeps:

- **The record first.** Every state is saved (atomically, by `ModelStore.save_record`) before its
  work starts; the work of each state is safe to repeat, so `recover()` can pick up after a crash
  at any point by following `fleet.core.update.recovery_action`.
- **Serving is touched only by one switch** (`host.set_serving`) to a session that is verified,
  loaded and warmed up, in `Committing` or `RollingBack`. Any failure before that leaves the old
  serving model answering, the update `Failed` with a reason, and an event reported.
- **Nothing unsigned is staged.** Before a download, the BundleRef from the controller is checked
  against the release-signed target: length and SHA-256 agree, the signed model and version are
  present and equal, this device's hardware class is in the signed hardware list (when it has
  one), and the signed release counter is at least the model's signed minimum (its policy
  target). The signed values cap and check the download; a refusal is a non-transient
  `SignatureError` naming the check. The bundle's own manifest must then name this model and version.
- **Slots are re-hashed before they are loaded** after a restart, for a rollback, or when a cached
  version is reused; a corrupt slot is dropped and never served.
- **No retry loops.** A failed target is retried only when the desired state changes or after the
  attempt-based backoff of `fleet.core.update.retry_wait`; `next_retry_in()` says when.
- Blocking work (trust refresh, download, hashing, extraction, session load and warm-up) runs in
  worker threads, so the inference endpoint and other models keep going meanwhile.

Testing hook: `fault(point)` is called right after the record of each active state is saved,
with the state's name, and after each switch record with "Committing.switched" or
"RollingBack.switched". An `Exception` raised there fails the update as a real error in that
state would; a `BaseException` escapes like a crash (the record stays in that state).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import time
from collections.abc import Callable
from typing import Any, Protocol
from urllib.parse import urljoin

import httpx

from fleet.agent.atomic import CorruptStateError
from fleet.agent.download import DownloadError, download_bundle, file_sha256
from fleet.agent.hardware import choose_providers
from fleet.agent.runtime import LoadedModel, load_model
from fleet.agent.slots import ModelStore
from fleet.core import update as um
from fleet.core.bundle import extract_bundle
from fleet.core.errors import BundleError, FleetError, IntegrityError, SignatureError, StorageFullError
from fleet.core.manifest import check_name, check_version
from fleet.core.trust import target_path_for
from fleet.core.update import UpdateRecord

log = logging.getLogger(__name__)

FAULT_SWITCHED_COMMIT = "Committing.switched"
FAULT_SWITCHED_ROLLBACK = "RollingBack.switched"
# Progress reports during a download, at most this often (each one triggers a state report).
PROGRESS_INTERVAL_S = 1.0


class Host(Protocol):
    """What the updater needs of `fleet.agent.inference.ModelHost`."""

    def set_serving(self, name: str, loaded: Any) -> None: ...  # None unloads
    def set_shadow(self, name: str, loaded: Any, sample_rate: float) -> None: ...
    def clear_shadow(self, name: str) -> None: ...
    def serving(self, name: str) -> Any: ...
    def shadow(self, name: str) -> Any: ...


class Trust(Protocol):
    """What the updater needs of `fleet.agent.trust.TrustedMetadataClient`."""

    def refresh(self) -> None: ...
    def target_info(self, target_path: str) -> tuple[int, str, dict[str, Any]]: ...
    def min_release(self, model: str) -> int: ...


class _Aborted(FleetError):
    """The state machine itself ended the update (loop guard); the record already says Failed."""

    code = "update_aborted"


def _describe(exc: BaseException) -> str:
    if isinstance(exc, FleetError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


class ModelUpdater:
    """Brings one model on this device to its desired serving/shadow versions, one update at a time."""

    def __init__(  # noqa: PLR0917 - the positional order is the documented contract the daemon uses
        self,
        model: str,
        store: ModelStore,
        host: Host,
        trust: Trust,
        client: httpx.Client,
        base_url: str,
        hardware: dict[str, Any],
        providers: list[str],
        threads: int,
        on_status: Callable[[dict[str, Any]], None],
        *,
        fault: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.time,
        warmup_runs: int = 3,
    ) -> None:
        self.model = check_name(model)
        self.store = store
        self.host = host
        self.trust = trust
        self.client = client
        self.base_url = base_url
        self.hardware = hardware
        self.providers = list(providers)
        self.threads = threads
        self.on_status = on_status
        self.fault = fault
        self.clock = clock
        self.warmup_runs = warmup_runs
        self._record = UpdateRecord(model=self.model)
        self._recovered = False
        self._lock = asyncio.Lock()
        # The loaded session waiting to be installed (from Loading, or the shadow being promoted).
        self._candidate: LoadedModel | None = None
        # A slot staged by this process: just verified by extraction, no need to re-hash it to load.
        self._fresh_slot = ""
        self._bytes_done = 0
        self._bytes_total = 0
        self._last_progress = 0.0
        self._bundle_sha: dict[str, str] = {}

    # -- what the daemon reads ------------------------------------------------------------------

    @property
    def record(self) -> UpdateRecord:
        return self._record

    def status(self) -> dict[str, Any]:
        """The UpdateStatus dict of the wire contract."""
        rec = self._record
        return {
            "target_version": rec.target_version,
            "target_role": rec.target_role,
            "state": rec.state,
            "error": rec.error,
            "failed_version": rec.failed_version,
            "attempt": rec.attempt,
            "updated_at_ms": int(rec.state_entered_at * 1000),
            "bytes_done": self._bytes_done,
            "bytes_total": self._bytes_total,
        }

    def slots(self) -> list[dict[str, Any]]:
        """The ModelSlot dicts of the wire contract: serving, shadow and previous."""
        rec = self._record
        out: list[dict[str, Any]] = []
        for role, version in (("serving", rec.serving_version), ("shadow", rec.shadow_version),
                              ("previous", rec.previous_version)):
            if not version:
                continue
            loaded: Any = None
            if role == "serving":
                loaded = self.host.serving(self.model)
            elif role == "shadow":
                loaded = self.host.shadow(self.model)
            is_loaded = loaded is not None and getattr(loaded, "version", None) == version
            out.append({
                "role": role,
                "version": version,
                "sha256": self._slot_sha(version),
                "loaded": is_loaded,
                "execution_providers": list(loaded.providers) if is_loaded else [],
            })
        return out

    def next_retry_in(self) -> float | None:
        """Seconds until the failed target may be tried again (None: nothing failed)."""
        rec = self._record
        if rec.state != um.FAILED or not rec.target_version:
            return None
        return um.retry_wait(rec, rec.target_version, rec.target_role, self.clock())

    # -- start-up -------------------------------------------------------------------------------

    async def recover(self) -> None:
        """After a (re)start: serve what the record says is serving, then finish or drop the update.

        The serving slot is verified before it is loaded; if it fails, the previous version is
        served instead (and the event reported). Then the in-flight update, if any, continues per
        `recovery_action`.
        """
        async with self._lock:
            await self._recover_locked()

    async def _recover_locked(self) -> None:
        self._recovered = True
        try:
            record = await asyncio.to_thread(self.store.load_record, self.model)
        except CorruptStateError as exc:
            # Without the record we cannot tell which slot served; the desired state will say (slots
            # on disk are re-verified before reuse). The bad file is kept aside for a post-mortem.
            log.error("%s", exc)
            bad = exc.details.get("path")
            if isinstance(bad, str):
                with contextlib.suppress(OSError):
                    os.replace(bad, bad + ".corrupt")
            record = dataclasses.replace(UpdateRecord(model=self.model), error=str(exc),
                                         state_entered_at=self.clock())
            await asyncio.to_thread(self.store.save_record, record)
            self._record = record
            self._emit(str(exc))
            return
        self._record = record
        await self._restore_serving()
        await self._restore_shadow()
        action = um.recovery_action(self._record)
        if action == um.ACT_NONE:
            return
        log.info("%s: resuming update to %s interrupted in %s (%s)", self.model,
                 self._record.target_version, self._record.state, action)
        try:
            self._move(um.EV_CRASH_RECOVERED, f"agent restarted during {self._record.state}; {action}")
        except Exception as exc:
            self._fail(exc)
            return
        await self._drive()
        self._prune()

    async def _restore_serving(self) -> None:
        rec = self._record
        version = rec.serving_version
        if not version:
            return
        try:
            loaded = await self._load(version, verify=True)
        except Exception as exc:
            reason = f"serving version {version} cannot be used after restart ({_describe(exc)})"
            log.error("%s: %s", self.model, reason)
            with contextlib.suppress(OSError):
                if not await asyncio.to_thread(self.store.verify_version, self.model, version):
                    self.store.remove_version(self.model, version)
            fallback = rec.previous_version
            if fallback and fallback != version:
                try:
                    loaded = await self._load(fallback, verify=True)
                except Exception as exc2:
                    reason += f"; previous version {fallback} cannot be used either ({_describe(exc2)})"
                    log.error("%s: %s", self.model, reason)
                    self._save(dataclasses.replace(rec, serving_version="", previous_version=""))
                    self._emit(reason)
                    return
                self.host.set_serving(self.model, loaded)
                self._save(dataclasses.replace(rec, serving_version=fallback, previous_version=""))
                self._emit(reason + f"; serving previous version {fallback}")
                return
            self._save(dataclasses.replace(rec, serving_version=""))
            self._emit(reason)
            return
        self.host.set_serving(self.model, loaded)

    async def _restore_shadow(self) -> None:
        rec = self._record
        version = rec.shadow_version
        if not version or version == rec.serving_version:
            return
        if rec.state == um.COMMITTING and rec.target_version == version:
            return  # being promoted: finishing the commit loads it as serving
        try:
            loaded = await self._load(version, verify=True)
        except Exception as exc:
            log.warning("%s: shadow %s not restored after restart: %s", self.model, version, _describe(exc))
            self._save(dataclasses.replace(rec, shadow_version=""))
            return
        self.host.set_shadow(self.model, loaded, rec.shadow_sample_rate)

    # -- desired state --------------------------------------------------------------------------

    async def apply(self, assignment: dict[str, Any] | None) -> None:
        """Bring the model to a ModelAssignment dict (`model, serving, shadow, shadow_sample_rate`).

        Serving first, then shadow: a candidate is shadowed only next to the serving version the
        controller meant. None (or no serving) means the model is not to run here: both sessions
        are unloaded, and the last serving version stays on disk as `previous`.
        """
        async with self._lock:
            if not self._recovered:
                await self._recover_locked()
            if self._record.in_flight:
                # recover() stopped part-way (a crash-like exit); finish before taking new work.
                await self._drive()
            serving = (assignment or {}).get("serving")
            if not serving:
                self._drop_shadow()
                self._retire()
                return
            shadow = (assignment or {}).get("shadow")
            rate = float((assignment or {}).get("shadow_sample_rate") or 0.0)
            ok = await self._ensure_serving(serving)
            if not shadow:
                self._drop_shadow()
            elif ok:
                await self._ensure_shadow(shadow, rate)
            self._prune()

    async def _ensure_serving(self, ref: dict[str, Any]) -> bool:
        version = check_version(str(ref.get("version", "")))
        current = self.host.serving(self.model)
        if self._record.serving_version == version and _version_of(current) == version:
            return True
        wait = um.retry_wait(self._record, version, um.ROLE_SERVING, self.clock())
        if wait > 0:
            log.info("%s: not retrying %s as serving for %.0f s (it failed: %s)", self.model, version, wait,
                     self._record.error)
            return False
        rec = self._record
        shadow = self.host.shadow(self.model)
        if rec.shadow_version == version and _version_of(shadow) == version:
            self._candidate = shadow  # already loaded and warmed as shadow: switch without reloading
            event = um.EV_PROMOTE
        elif version == rec.previous_version and await self._slot_ok(version):
            event = um.EV_ROLLBACK
        elif await self._slot_ok(version):
            event = um.EV_CACHED
        else:
            event = um.EV_DOWNLOAD
        return await self._run(event, version, um.ROLE_SERVING, ref, None)

    async def _ensure_shadow(self, ref: dict[str, Any], rate: float) -> None:
        version = check_version(str(ref.get("version", "")))
        if version == self._record.serving_version:
            self._drop_shadow()  # the candidate already serves: nothing left to compare with
            return
        current = self.host.shadow(self.model)
        if self._record.shadow_version == version and _version_of(current) == version:
            if rate != self._record.shadow_sample_rate:
                self.host.set_shadow(self.model, current, rate)
                self._save(dataclasses.replace(self._record, shadow_sample_rate=rate))
            return
        if um.retry_wait(self._record, version, um.ROLE_SHADOW, self.clock()) > 0:
            return
        event = um.EV_CACHED if await self._slot_ok(version) else um.EV_DOWNLOAD
        await self._run(event, version, um.ROLE_SHADOW, ref, rate)

    def _drop_shadow(self) -> None:
        if self.host.shadow(self.model) is not None:
            self.host.clear_shadow(self.model)
        if self._record.shadow_version:
            self._save(dataclasses.replace(self._record, shadow_version=""))
            self._emit("shadow removed by the desired state")

    def _retire(self) -> None:
        """The model is not to run here: unload it; its slot stays cached as `previous`."""
        rec = self._record
        if self.host.serving(self.model) is not None:
            self.host.set_serving(self.model, None)
        if rec.serving_version:
            self._save(dataclasses.replace(rec, serving_version="", previous_version=rec.serving_version))
            self._emit("model removed from this device by the desired state")
            self._prune()

    async def _slot_ok(self, version: str) -> bool:
        """Whether `version` is on disk intact; a corrupt slot is deleted so it gets downloaded again."""
        if not self.store.has_version(self.model, version):
            return False
        if await asyncio.to_thread(self.store.verify_version, self.model, version):
            return True
        log.warning("%s: cached slot %s is corrupt; removing it", self.model, version)
        self.store.remove_version(self.model, version)
        return False

    # -- the machine ----------------------------------------------------------------------------

    async def _run(
        self, event: str, version: str, role: str, ref: dict[str, Any], rate: float | None
    ) -> bool:
        """Start an update with a start event and drive it to rest. True when it ended Idle."""
        rec = self._record
        if rec.target_version and rec.target_version != version and rec.target_version not in (
            rec.serving_version, rec.shadow_version, rec.previous_version
        ):
            self.store.remove_downloads(self.model, rec.target_version)  # abandoned target
        bundle = {k: ref.get(k) for k in ("version", "url", "sha256", "length", "target_path")}
        self._bytes_done, self._bytes_total = 0, int(ref.get("length") or 0)
        # Pure, and cannot be refused: the lock and apply() guarantee a resting record here.
        started = um.begin(rec, event, target_version=version, target_role=role, bundle=bundle,
                           now=self.clock())
        if rate is not None:
            started = dataclasses.replace(started, shadow_sample_rate=rate)
        try:
            self._save(started)
        except OSError as exc:
            # Not even the record could be written (disk full, read-only): nothing has started.
            self._fail(exc)
            return False
        self._emit(f"update to {version} as {role} started ({event})")
        try:
            self._hook(started.state)
            if event != um.EV_DOWNLOAD:
                await self._recheck_signed(version)
        except Exception as exc:
            self._fail(exc)
            return False
        return await self._drive()

    async def _drive(self) -> bool:
        """Run the in-flight update to a resting state; each step ends with its table event."""
        while self._record.state in um.ACTIVE:
            try:
                await self._step()
            except Exception as exc:
                self._fail(exc)
        self._candidate = None
        return self._record.state == um.IDLE

    async def _step(self) -> None:
        state = self._record.state
        if state == um.DOWNLOADING:
            await self._download()
            self._move(um.EV_OK)
        elif state == um.VERIFYING:
            await asyncio.to_thread(self._verify)
            self._move(um.EV_OK)
        elif state == um.STAGING:
            await asyncio.to_thread(self._stage)
            self._move(um.EV_OK)
        elif state == um.LOADING:
            version = self._record.target_version
            self._candidate = await self._load(version, verify=version != self._fresh_slot)
            shadow = self._record.target_role == um.ROLE_SHADOW
            self._move(um.EV_TO_SHADOW if shadow else um.EV_TO_SERVING)
        elif state == um.SHADOWING:
            await self._install_shadow()
            self._move(um.EV_OK, f"{self._record.target_version} is in shadow")
        elif state == um.COMMITTING:
            await self._switch(FAULT_SWITCHED_COMMIT)
            self._move(um.EV_OK, f"{self._record.target_version} is serving")
        elif state == um.ROLLING_BACK:
            await self._switch(FAULT_SWITCHED_ROLLBACK)
            self._move(um.EV_OK, f"rolled back to {self._record.target_version}")
        else:  # pragma: no cover - ACTIVE covers exactly the states above
            raise um.InvalidTransitionError(f"no step for state {state}")

    def _move(self, event: str, reason: str = "") -> None:
        """Take `event`, save the record of the state entered, report it, then run the fault hook."""
        new = um.transition(self._record, event, self.clock())
        self._save(new)
        if new.state == um.FAILED:
            self._candidate = None
            self._emit(new.error)
            raise _Aborted(new.error)
        self._emit(reason)
        if new.state in um.ACTIVE:
            self._hook(new.state)

    def _fail(self, exc: BaseException) -> None:
        self._candidate = None
        rec = self._record
        if rec.state == um.FAILED:
            return  # the loop guard already failed it and reported why
        message = _describe(exc)
        if rec.state not in um.ACTIVE:
            # Failed before the first state was recorded: report it; there is nothing to unwind.
            log.warning("%s: update could not start: %s", self.model, message)
            self._record = dataclasses.replace(rec, error=message)
            self._emit(message)
            return
        log.warning("%s: update to %s failed in %s: %s", self.model, rec.target_version, rec.state, message)
        if rec.target_version:
            self.store.clear_staging(self.model, rec.target_version)
            permanent = isinstance(exc, BundleError | IntegrityError) or (
                isinstance(exc, SignatureError) and exc.details.get("transient") is not True
            )
            if permanent:
                # These bytes will never pass: fetch afresh next time rather than resume them.
                self.store.remove_downloads(self.model, rec.target_version)
        failed = um.fail(rec, message, self.clock())
        self._save(failed)
        self._emit(message)

    def _save(self, record: UpdateRecord) -> None:
        self.store.save_record(record)
        self._record = record

    def _hook(self, point: str) -> None:
        if self.fault is not None:
            self.fault(point)

    def _emit(self, reason: str = "") -> None:
        """Report the current state as an UpdateEvent dict (`model, version, role, state, reason, at_ms`)."""
        rec = self._record
        event = {
            "model": self.model,
            "version": rec.target_version,
            "role": rec.target_role,
            "state": rec.state,
            "reason": reason or rec.error,
            "at_ms": int(rec.state_entered_at * 1000) or int(self.clock() * 1000),
        }
        try:
            self.on_status(event)
        except Exception:  # a reporting bug must not break an update half-way
            log.exception("%s: on_status callback failed", self.model)

    # -- the work of each state -----------------------------------------------------------------

    def _bundle(self) -> dict[str, Any]:
        bundle = self._record.bundle
        if not bundle:
            raise BundleError(f"the update record of {self.model} has no bundle reference")
        return bundle

    async def _download(self) -> None:
        rec = self._record
        version = rec.target_version
        ref = self._bundle()
        await asyncio.to_thread(self.trust.refresh)
        signed_length, signed_sha, custom = await asyncio.to_thread(self.trust.target_info,
                                                                    str(ref.get("target_path") or ""))
        min_release = await asyncio.to_thread(self.trust.min_release, self.model)
        self._check_signed(ref, signed_length, signed_sha, custom or {}, min_release)
        if ref.get("length") != signed_length or ref.get("sha256") != signed_sha:
            signed = {**ref, "length": signed_length, "sha256": signed_sha}
            self._save(dataclasses.replace(rec, bundle=signed))
        part = self.store.part_path(self.model, version)
        have = part.stat().st_size if part.exists() else 0
        # Room for the rest of the download plus the extracted slot (about the bundle's size again).
        needed = (signed_length - have) + signed_length
        free = self.store.free_bytes()
        if free < needed:
            raise StorageFullError(
                f"{self.model}:{version} needs about {needed} bytes of disk (download + slot), only {free} "
                "are free; remove unused data or models on this device",
                needed=needed, free=free,
            )
        self._bytes_done, self._bytes_total = have, signed_length
        url = urljoin(self.base_url.rstrip("/") + "/", str(ref.get("url") or ""))
        await asyncio.to_thread(download_bundle, self.client, url, part, length=signed_length,
                                sha256=signed_sha, progress=self._progress)
        self._bytes_done = signed_length

    def _check_signed(self, ref: dict[str, Any], length: int, sha: str, custom: dict[str, Any],
                      min_release: int = 0) -> None:
        """The assignment checks: the controller's pointer against what the release keys signed.

        Every refusal is a non-transient SignatureError naming the check (`details["check"]`).
        """
        version = self._record.target_version
        where = f"{self.model}:{version} ({ref.get('target_path')})"

        def refuse(check: str, message: str) -> SignatureError:
            return SignatureError(f"{where}: {message}", reason="assignment", check=check, transient=False)

        stated_len, stated_sha = ref.get("length"), ref.get("sha256")
        # The controller's BundleRef is only a pointer: the signed metadata decides. Absent values
        # are filled from it; values that disagree mean someone is lying, so refuse.
        if stated_len not in (None, 0) and stated_len != length:
            raise refuse("length", f"the controller says {stated_len} bytes but the release metadata signs "
                                   f"{length}; refusing the bundle")
        if stated_sha and str(stated_sha).lower() != sha.lower():
            raise refuse("sha256", f"the controller's SHA-256 {stated_sha} differs from the signed {sha}; "
                                   "refusing the bundle")
        for key, want in (("model", self.model), ("version", version)):
            got = custom.get(key)
            if got is None:
                raise refuse(key, f"the signed target carries no {key}; refusing a bundle whose identity is "
                                  "not signed")
            if got != want:
                raise refuse(key, f"the signed target is for {key} {got!r}, not {want!r}")
        hardware = custom.get("hardware") or []
        mine = self._hardware_class()
        if not isinstance(hardware, list):
            raise refuse("hardware", f"the signed hardware list is not a list ({hardware!r})")
        if hardware and mine not in hardware and "any" not in hardware:
            raise refuse("hardware", f"the signed target is for hardware {', '.join(map(str, hardware))}, "
                                     f"not this device's {mine!r}")
        release = custom.get("release", 0)
        if isinstance(release, bool) or not isinstance(release, int) or release < 0:
            raise refuse("release", f"the signed release counter {release!r} is not a non-negative integer")
        if release < min_release:
            raise refuse("release", f"release {release} is below the signed minimum release {min_release} for "
                                    f"{self.model} (rollback to an older release refused)")

    async def _recheck_signed(self, version: str) -> None:
        """A slot already on disk is about to be used (cached, rollback, promote): the assignment
        checks run again against the current signed metadata, so a controller cannot send a device
        back to a cached version the release keys have since forbidden (signed minimum release)."""
        ref = self._bundle()
        target_path = str(ref.get("target_path") or target_path_for(self.model, version))
        await asyncio.to_thread(self.trust.refresh)
        length, sha, custom = await asyncio.to_thread(self.trust.target_info, target_path)
        min_release = await asyncio.to_thread(self.trust.min_release, self.model)
        self._check_signed(ref, length, sha, custom or {}, min_release)
        slot_sha = self._slot_sha(version)
        if slot_sha and slot_sha.lower() != sha.lower():
            raise SignatureError(
                f"{self.model}:{version}: the cached slot holds bundle {slot_sha} but the release metadata "
                f"signs {sha}; refusing to use it",
                reason="assignment", check="sha256", transient=False,
            )

    def _progress(self, done: int, total: int) -> None:
        self._bytes_done, self._bytes_total = done, total
        now = time.monotonic()
        if now - self._last_progress >= PROGRESS_INTERVAL_S:
            self._last_progress = now
            self._emit(f"downloaded {done} of {total} bytes")

    def _verify(self) -> None:
        version = self._record.target_version
        ref = self._bundle()
        tar = self.store.download_path(self.model, version)
        if tar.exists():
            digest, size = file_sha256(tar)
            if size != ref.get("length") or digest != ref.get("sha256"):
                tar.unlink(missing_ok=True)
                raise IntegrityError(
                    f"{self.model}:{version}: the downloaded bundle ({size} bytes, SHA-256 {digest}) "
                    f"does not match the signed {ref.get('length')} bytes / {ref.get('sha256')}; "
                    "it was deleted"
                )
            return
        if self.store.has_version(self.model, version) and self.store.verify_version(self.model, version):
            return  # staged before a crash; the slot itself is intact
        raise self._gone(version)

    def _gone(self, version: str) -> DownloadError:
        return DownloadError(
            f"{self.model}:{version}: the downloaded bundle is gone; it will be downloaded again"
        )

    def _stage(self) -> None:
        version = self._record.target_version
        tar = self.store.download_path(self.model, version)
        if not tar.exists():
            if self.store.has_version(self.model, version) and self.store.verify_version(self.model, version):
                return
            raise self._gone(version)
        staging = self.store.staging_dir(self.model, version)
        self.store.clear_staging(self.model, version)
        manifest = extract_bundle(tar, staging)
        if manifest.name != self.model or manifest.version != version:
            self.store.clear_staging(self.model, version)
            raise BundleError(
                f"the bundle signed as {self.model}:{version} contains {manifest.ref}; refusing it"
            )
        try:
            manifest.variant_for(self._hardware_class())
        except BundleError:
            self.store.clear_staging(self.model, version)
            raise
        self.store.install_staged(self.model, version, self._bundle())
        self._fresh_slot = version
        tar.unlink(missing_ok=True)

    def _hardware_class(self) -> str:
        return str(self.hardware.get("hardware_class") or "cpu")

    async def _load(self, version: str, *, verify: bool) -> LoadedModel:
        return await asyncio.to_thread(self._load_sync, version, verify)

    def _load_sync(self, version: str, verify: bool) -> LoadedModel:
        if verify and not self.store.verify_version(self.model, version):
            raise IntegrityError(
                f"slot {self.model}:{version} on disk does not match its manifest (corrupted); not loading it"
            )
        manifest = self.store.manifest_for(self.model, version)
        variant = manifest.variant_for(self._hardware_class())
        providers = (
            choose_providers(self.hardware, variant.providers) if variant.providers else list(self.providers)
        )
        loaded = load_model(self.store.version_dir(self.model, version) / variant.file, manifest, providers,
                            self.threads)
        loaded.warmup(self.warmup_runs)
        return loaded

    async def _install_shadow(self) -> None:
        version = self._record.target_version
        loaded = self._candidate or await self._load(version, verify=True)
        self.host.set_shadow(self.model, loaded, self._record.shadow_sample_rate)
        self._candidate = None
        self._save(dataclasses.replace(self._record, shadow_version=version))

    async def _switch(self, fault_point: str) -> None:
        """The atomic switch of Committing and RollingBack, then the switch record.

        If the record already names the target as serving and the host serves it, the switch
        happened before a crash: keep it (the commit point was passed).
        """
        rec = self._record
        version = rec.target_version
        if rec.serving_version == version and _version_of(self.host.serving(self.model)) == version:
            return
        loaded = self._candidate or await self._load(version, verify=True)
        old = rec.serving_version
        self.host.set_serving(self.model, loaded)
        self._candidate = None
        promoted = rec.shadow_version == version
        if promoted:
            self.host.clear_shadow(self.model)
        self._save(dataclasses.replace(
            self._record,
            serving_version=version,
            previous_version=old if old and old != version else rec.previous_version,
            shadow_version="" if promoted else rec.shadow_version,
        ))
        self._hook(fault_point)

    def _prune(self) -> None:
        rec = self._record
        if rec.in_flight:
            return
        keep = {rec.serving_version, rec.shadow_version, rec.previous_version}
        if rec.state == um.FAILED:
            keep.add(rec.target_version)  # a retry after the backoff can reuse it without a download
        try:
            removed = self.store.prune(self.model, {v for v in keep if v})
        except OSError as exc:
            log.warning("%s: pruning old versions failed: %s", self.model, exc)
            return
        for version in removed:
            self._bundle_sha.pop(version, None)

    def _slot_sha(self, version: str) -> str:
        if version not in self._bundle_sha:
            bundle = self.store.slot_info(self.model, version).get("bundle") or {}
            sha = str(bundle.get("sha256") or "")
            if not sha:
                return ""
            self._bundle_sha[version] = sha
        return self._bundle_sha[version]


def _version_of(loaded: Any) -> str | None:
    return None if loaded is None else getattr(loaded, "version", None)
