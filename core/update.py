"""The device update state machine: one transition table, a persisted record, crash recovery.

Rules this module enforces (it does no IO; the agent's updater persists and executes it):

- **One table.** Every legal move is a row of `TRANSITIONS`, keyed by (state, event). Anything
  else raises `InvalidTransitionError`: the updater cannot invent a path the table does not name.
- **Record before work.** The updater saves an `UpdateRecord` *before* doing the work of the state
  it enters, so after a crash the record names the step that may be half done, and
  `recovery_action` says how to finish or redo it. Each step is written to be safe to repeat.
- **The serving model is touched in exactly two states**, `Committing` and `RollingBack`, and only
  by one atomic switch to a verified, loaded session. Every state before them can fail (or crash)
  without any effect on what serves.
- **The commit point** is `Committing`. Before it, an update that fails or crashes is dropped and
  the old serving version simply stays. Once the record says `Committing`, recovery finishes the
  switch (rolls forward): after this state it is no longer possible to roll back without a new
  desired state. A rollback is then a new update (`RollingBack` to the cached previous version),
  ordered by the controller.
- **Loop detection.** `loop_guard` counts state entries within one update. A crash loop (a model
  that kills the process while loading, a power cut at each boot) re-enters states over and over;
  past `MAX_STATE_ENTRIES` the update goes to `Failed` instead of looping (as Mender's client does).
- **No retry storms.** A version that failed is not tried again for the same role until the
  desired state changes or an attempt-based exponential backoff has passed (`retry_wait`).

Version fields use "" for "none", as the wire contract does.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from fleet.core.errors import FleetError

SCHEMA_VERSION = 1

# States (the strings the wire contract, REST API and CLI show).
IDLE = "Idle"
DOWNLOADING = "Downloading"
VERIFYING = "Verifying"
STAGING = "Staging"
LOADING = "Loading"
SHADOWING = "Shadowing"
COMMITTING = "Committing"
ROLLING_BACK = "RollingBack"
FAILED = "Failed"

STATES = (IDLE, DOWNLOADING, VERIFYING, STAGING, LOADING, SHADOWING, COMMITTING, ROLLING_BACK, FAILED)
# Resting states: no update is in flight; a new one may start from here.
RESTING = frozenset({IDLE, FAILED})
# States in which work is under way and a crash leaves something to recover.
ACTIVE = frozenset(STATES) - RESTING

# Target roles.
ROLE_SERVING = "serving"
ROLE_SHADOW = "shadow"
ROLES = (ROLE_SERVING, ROLE_SHADOW)

# Events.
EV_DOWNLOAD = "download"  # start: the target is not on disk
EV_CACHED = "cached"  # start: the target sits, verified, in its slot already
EV_PROMOTE = "promote"  # start: the target is loaded as shadow; serve it without reloading
EV_ROLLBACK = "rollback"  # start: the target is the cached previous version
EV_OK = "ok"  # the state's work is done
EV_TO_SHADOW = "to_shadow"  # loaded; the target's role is shadow
EV_TO_SERVING = "to_serving"  # loaded; the target's role is serving
EV_ERROR = "error"  # the state's work failed
EV_CRASH_RECOVERED = "crash_recovered"  # the agent restarted with the record in this state

EVENTS = (
    EV_DOWNLOAD,
    EV_CACHED,
    EV_PROMOTE,
    EV_ROLLBACK,
    EV_OK,
    EV_TO_SHADOW,
    EV_TO_SERVING,
    EV_ERROR,
    EV_CRASH_RECOVERED,
)

_START = {EV_DOWNLOAD: DOWNLOADING, EV_CACHED: LOADING, EV_PROMOTE: COMMITTING, EV_ROLLBACK: ROLLING_BACK}

# The one transition table. Read a row as: in STATE, on EVENT, go to NEXT.
TRANSITIONS: dict[tuple[str, str], str] = {
    # A new update starts from either resting state.
    **{(rest, ev): nxt for rest in (IDLE, FAILED) for ev, nxt in _START.items()},
    # The happy path.
    (DOWNLOADING, EV_OK): VERIFYING,
    (VERIFYING, EV_OK): STAGING,
    (STAGING, EV_OK): LOADING,
    (LOADING, EV_TO_SHADOW): SHADOWING,
    (LOADING, EV_TO_SERVING): COMMITTING,
    (SHADOWING, EV_OK): IDLE,
    (COMMITTING, EV_OK): IDLE,
    (ROLLING_BACK, EV_OK): IDLE,
    # Any failure in flight ends the update; what serves is untouched (see the module docstring).
    **{(state, EV_ERROR): FAILED for state in sorted(ACTIVE)},
    # After a crash: where to pick up.
    (IDLE, EV_CRASH_RECOVERED): IDLE,
    (FAILED, EV_CRASH_RECOVERED): FAILED,
    (DOWNLOADING, EV_CRASH_RECOVERED): DOWNLOADING,  # resume from the part file
    (VERIFYING, EV_CRASH_RECOVERED): VERIFYING,  # re-hash the kept download
    (STAGING, EV_CRASH_RECOVERED): VERIFYING,  # a half-extracted slot is thrown away: verify again
    (LOADING, EV_CRASH_RECOVERED): LOADING,  # the session died with the process: load again
    (SHADOWING, EV_CRASH_RECOVERED): LOADING,  # same: reload, then install as shadow
    (COMMITTING, EV_CRASH_RECOVERED): COMMITTING,  # past the commit point: finish the switch
    (ROLLING_BACK, EV_CRASH_RECOVERED): ROLLING_BACK,  # finish switching back to the previous version
}

# Recovery actions, one per state (see `recovery_action`).
ACT_NONE = "none"
ACT_RESUME_DOWNLOAD = "resume_download"
ACT_REVERIFY = "reverify"
ACT_RELOAD = "reload"
ACT_RELOAD_SHADOW = "reload_shadow"
ACT_KEEP_COMMIT = "keep_commit"
ACT_FINISH_COMMIT = "finish_commit"
ACT_FINISH_ROLLBACK = "finish_rollback"

# A full update enters at most 6 states (Downloading..Committing, Idle); the rest is headroom for
# a few crash recoveries. Beyond this the update is looping.
MAX_STATE_ENTRIES = 12

# Backoff before the same failed target is tried again: base * 2^(attempt-1), capped.
RETRY_BASE_S = 30.0
RETRY_MAX_S = 3600.0


class InvalidTransitionError(FleetError):
    """A (state, event) pair the transition table does not allow: a bug in the caller."""

    code = "invalid_transition"


def next_state(state: str, event: str) -> str:
    """The state the table moves to from `state` on `event`."""
    if state not in STATES:
        raise InvalidTransitionError(f"unknown update state {state!r}; states are {', '.join(STATES)}")
    if event not in EVENTS:
        raise InvalidTransitionError(f"unknown update event {event!r}; events are {', '.join(EVENTS)}")
    try:
        return TRANSITIONS[(state, event)]
    except KeyError:
        raise InvalidTransitionError(f"event {event!r} is not allowed in update state {state}") from None


@dataclass(frozen=True)
class UpdateRecord:
    """Everything the agent must know about one model after a crash. Persisted before each state.

    `serving_version`, `shadow_version` and `previous_version` describe the slots; the `target_*`,
    `bundle`, `attempt`, `loop_guard` fields describe the update in flight (or the last one).
    `bundle` is the BundleRef dict (`version, url, sha256, length, target_path`); once trust has
    been checked its length and sha256 are the signed ones.
    """

    model: str
    schema_version: int = SCHEMA_VERSION
    target_version: str = ""
    target_role: str = ""
    state: str = IDLE
    attempt: int = 0
    error: str = ""
    failed_version: str = ""
    serving_version: str = ""
    shadow_version: str = ""
    shadow_sample_rate: float = 0.0
    previous_version: str = ""
    bundle: dict[str, Any] | None = None
    state_entered_at: float = 0.0
    loop_guard: int = 0

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["bundle"] = dict(self.bundle) if self.bundle is not None else None
        return out

    @classmethod
    def from_dict(cls, raw: Any) -> UpdateRecord:
        """Parse a persisted record; raise `ValueError` naming the bad field when it is malformed."""
        if not isinstance(raw, dict):
            raise ValueError("update record must be a JSON object")
        schema = raw.get("schema_version")
        if schema != SCHEMA_VERSION:
            raise ValueError(f"update record schema_version {schema!r} is not {SCHEMA_VERSION}")
        kwargs: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if f.name not in raw:
                continue
            kwargs[f.name] = raw[f.name]
        model = kwargs.get("model")
        if not isinstance(model, str) or not model:
            raise ValueError("update record has no 'model'")
        for name in ("target_version", "target_role", "state", "error", "failed_version", "serving_version",
                     "shadow_version", "previous_version"):
            if name in kwargs and not isinstance(kwargs[name], str):
                raise ValueError(f"update record field {name!r} must be a string")
        for name in ("attempt", "loop_guard"):
            if name in kwargs and (isinstance(kwargs[name], bool) or not isinstance(kwargs[name], int)):
                raise ValueError(f"update record field {name!r} must be an integer")
        for name in ("state_entered_at", "shadow_sample_rate"):
            if name in kwargs:
                if isinstance(kwargs[name], bool) or not isinstance(kwargs[name], int | float):
                    raise ValueError(f"update record field {name!r} must be a number")
                kwargs[name] = float(kwargs[name])
        if kwargs.get("state", IDLE) not in STATES:
            raise ValueError(f"update record state {kwargs['state']!r} is not a known state")
        if kwargs.get("target_role", "") not in ("", *ROLES):
            raise ValueError(f"update record target_role {kwargs['target_role']!r} is not shadow/serving")
        bundle = kwargs.get("bundle")
        if bundle is not None and not isinstance(bundle, dict):
            raise ValueError("update record field 'bundle' must be an object or null")
        return cls(**kwargs)

    @property
    def in_flight(self) -> bool:
        return self.state in ACTIVE


def enter(record: UpdateRecord, state: str, now: float) -> UpdateRecord:
    """`record` moved into `state`, counting the entry against the loop guard.

    Entering a resting state never trips the guard (that is how a loop ends). Entering an active
    state past `MAX_STATE_ENTRIES` yields a Failed record instead.
    """
    guard = record.loop_guard + 1
    if state in ACTIVE and guard > MAX_STATE_ENTRIES:
        return dataclasses.replace(
            record,
            state=FAILED,
            state_entered_at=now,
            loop_guard=guard,
            failed_version=record.target_version,
            error=(
                f"update loop detected: {guard - 1} state entries while updating to "
                f"{record.target_version or '?'} (last entering {state}); giving up on this attempt"
            ),
        )
    return dataclasses.replace(record, state=state, state_entered_at=now, loop_guard=guard)


def transition(record: UpdateRecord, event: str, now: float) -> UpdateRecord:
    """Apply `event` to the record: the table's next state, entered under the loop guard."""
    return enter(record, next_state(record.state, event), now)


def begin(
    record: UpdateRecord,
    event: str,
    *,
    target_version: str,
    target_role: str,
    bundle: dict[str, Any] | None,
    now: float,
) -> UpdateRecord:
    """Start a new update from a resting state with one of the start events.

    The attempt counter grows only when the same target failed last time; a new desired target
    starts again at attempt 1 (the desired state changed, so the backoff resets).
    """
    if record.state not in RESTING:
        raise InvalidTransitionError(
            f"cannot start an update to {target_version} while one to {record.target_version} is in "
            f"state {record.state}"
        )
    if event not in _START:
        raise InvalidTransitionError(f"{event!r} is not an event that starts an update")
    if target_role not in ROLES:
        raise InvalidTransitionError(f"target role must be shadow or serving, got {target_role!r}")
    same = (
        record.state == FAILED
        and record.target_version == target_version
        and record.target_role == target_role
    )
    fresh = dataclasses.replace(
        record,
        target_version=target_version,
        target_role=target_role,
        bundle=dict(bundle) if bundle is not None else None,
        attempt=record.attempt + 1 if same else 1,
        error="",
        failed_version="",
        loop_guard=0,
    )
    return transition(fresh, event, now)


def fail(record: UpdateRecord, error: str, now: float) -> UpdateRecord:
    """The in-flight update failed: Failed, with the reason and the version that failed."""
    if record.state == FAILED:
        return record
    failed = transition(record, EV_ERROR, now)
    return dataclasses.replace(failed, error=error, failed_version=record.target_version)


def recovery_action(record: UpdateRecord) -> str:
    """What to do with the update in flight after the agent restarts.

    Downloading -> resume the download from the part file. Verifying/Staging -> redo from verify
    (the download is kept; a half-extracted staging dir is discarded). Loading -> load the staged
    version again; serving is untouched. Shadowing -> reload the shadow. Committing -> the commit
    point: if the record already names the target as serving (the switch happened and was
    recorded) keep it, else finish the switch from the staged slot. RollingBack -> finish the
    switch to the previous version. Idle/Failed -> nothing.
    """
    state = record.state
    if state in RESTING:
        return ACT_NONE
    if state == DOWNLOADING:
        return ACT_RESUME_DOWNLOAD
    if state in (VERIFYING, STAGING):
        return ACT_REVERIFY
    if state == LOADING:
        return ACT_RELOAD
    if state == SHADOWING:
        return ACT_RELOAD_SHADOW
    if state == COMMITTING:
        if record.target_version and record.serving_version == record.target_version:
            return ACT_KEEP_COMMIT
        return ACT_FINISH_COMMIT
    if state == ROLLING_BACK:
        return ACT_FINISH_ROLLBACK
    raise InvalidTransitionError(f"no recovery defined for update state {state!r}")


def retry_delay_s(attempt: int) -> float:
    """Backoff after `attempt` failed attempts at the same target."""
    if attempt <= 0:
        return 0.0
    return min(RETRY_BASE_S * 2 ** min(attempt - 1, 30), RETRY_MAX_S)


def retry_wait(record: UpdateRecord, target_version: str, target_role: str, now: float) -> float:
    """Seconds to wait before trying `target_version` in `target_role` again (0: go now).

    Only a Failed record for the very same target holds a retry back; any other desired target
    is a changed desired state and may start at once.
    """
    if record.state != FAILED or record.target_version != target_version or record.target_role != target_role:
        return 0.0
    due = record.state_entered_at + retry_delay_s(record.attempt)
    return max(0.0, due - now)


def chain(start: str, events: list[str]) -> list[str]:
    """The states visited from `start` through `events` (for tests and docs)."""
    states = [start]
    for event in events:
        states.append(next_state(states[-1], event))
    return states
