"""The device update state machine: every state x event, recovery per state, loop guard, retry policy.

The expected table is written out here independently of `fleet.core.update.TRANSITIONS`, so a
change to the machine has to be made twice, on purpose.
"""

from __future__ import annotations

import itertools

import pytest

from fleet.core import update as um
from fleet.core.update import UpdateRecord

ID, D, V, S, L, SH, C, R, F = (
    "Idle", "Downloading", "Verifying", "Staging", "Loading", "Shadowing", "Committing", "RollingBack",
    "Failed",
)
ALL_STATES = [ID, D, V, S, L, SH, C, R, F]
ALL_EVENTS = ["download", "cached", "promote", "rollback", "ok", "to_shadow", "to_serving", "error",
              "crash_recovered"]

EXPECTED: dict[tuple[str, str], str] = {
    (ID, "download"): D, (ID, "cached"): L, (ID, "promote"): C, (ID, "rollback"): R,
    (ID, "crash_recovered"): ID,
    (F, "download"): D, (F, "cached"): L, (F, "promote"): C, (F, "rollback"): R, (F, "crash_recovered"): F,
    (D, "ok"): V, (D, "error"): F, (D, "crash_recovered"): D,
    (V, "ok"): S, (V, "error"): F, (V, "crash_recovered"): V,
    (S, "ok"): L, (S, "error"): F, (S, "crash_recovered"): V,
    (L, "to_shadow"): SH, (L, "to_serving"): C, (L, "error"): F, (L, "crash_recovered"): L,
    (SH, "ok"): ID, (SH, "error"): F, (SH, "crash_recovered"): L,
    (C, "ok"): ID, (C, "error"): F, (C, "crash_recovered"): C,
    (R, "ok"): ID, (R, "error"): F, (R, "crash_recovered"): R,
}


def test_the_names_are_the_wire_contract():
    assert list(um.STATES) == ALL_STATES
    assert sorted(um.EVENTS) == sorted(ALL_EVENTS)


@pytest.mark.parametrize(("state", "event"), list(itertools.product(ALL_STATES, ALL_EVENTS)))
def test_every_state_and_event(state, event):
    want = EXPECTED.get((state, event))
    if want is None:
        with pytest.raises(um.InvalidTransitionError, match=event):
            um.next_state(state, event)
    else:
        assert um.next_state(state, event) == want


def test_table_has_no_rows_beyond_the_expected_ones():
    assert um.TRANSITIONS == EXPECTED


def test_unknown_names_are_refused_clearly():
    with pytest.raises(um.InvalidTransitionError, match="unknown update state"):
        um.next_state("Sleeping", "ok")
    with pytest.raises(um.InvalidTransitionError, match="unknown update event"):
        um.next_state(ID, "reboot")


@pytest.mark.parametrize(
    ("start", "events", "states"),
    [
        ("download", ["ok", "ok", "ok", "to_serving", "ok"], [ID, D, V, S, L, C, ID]),
        ("download", ["ok", "ok", "ok", "to_shadow", "ok"], [ID, D, V, S, L, SH, ID]),
        ("cached", ["to_serving", "ok"], [ID, L, C, ID]),
        ("promote", ["ok"], [ID, C, ID]),
        ("rollback", ["ok"], [ID, R, ID]),
    ],
    ids=["download-serve", "download-shadow", "cached-serve", "promote-shadow", "rollback"],
)
def test_happy_paths(start, events, states):
    assert um.chain(ID, [start, *events]) == states


def _record(state: str, **kw) -> UpdateRecord:
    return UpdateRecord(model="det", state=state, target_version="v2", target_role="serving", **kw)


@pytest.mark.parametrize(
    ("state", "extra", "action"),
    [
        (ID, {}, "none"),
        (F, {}, "none"),
        (D, {}, "resume_download"),
        (V, {}, "reverify"),
        (S, {}, "reverify"),
        (L, {}, "reload"),
        (SH, {}, "reload_shadow"),
        (C, {"serving_version": "v1"}, "finish_commit"),
        (C, {"serving_version": "v2"}, "keep_commit"),
        (R, {"serving_version": "v3"}, "finish_rollback"),
    ],
)
def test_recovery_action_per_state(state, extra, action):
    assert um.recovery_action(_record(state, **extra)) == action


def test_every_active_state_has_a_recovery_and_a_crash_row():
    for state in um.ACTIVE:
        assert um.recovery_action(_record(state)) != "none"
        assert (state, "crash_recovered") in um.TRANSITIONS


def test_enter_counts_state_entries_and_stamps_time():
    rec = um.begin(UpdateRecord(model="det"), "download", target_version="v2", target_role="serving",
                   bundle={"version": "v2"}, now=10.0)
    assert (rec.state, rec.loop_guard, rec.state_entered_at, rec.attempt) == (D, 1, 10.0, 1)
    rec = um.transition(rec, "ok", 11.0)
    assert (rec.state, rec.loop_guard, rec.state_entered_at) == (V, 2, 11.0)


def test_loop_guard_fails_an_update_that_keeps_crashing():
    rec = um.begin(UpdateRecord(model="det"), "cached", target_version="v2", target_role="serving",
                   bundle=None, now=0.0)
    entries = 1
    while rec.state == L:
        rec = um.transition(rec, "crash_recovered", float(entries))
        entries += 1
    assert rec.state == F
    assert entries == um.MAX_STATE_ENTRIES + 1
    assert "update loop detected" in rec.error and rec.failed_version == "v2"


def test_loop_guard_never_blocks_reaching_a_resting_state():
    rec = _record(C, loop_guard=um.MAX_STATE_ENTRIES)
    assert um.transition(rec, "ok", 1.0).state == ID
    assert um.fail(rec, "boom", 1.0).state == F


def test_a_normal_full_update_is_well_inside_the_guard():
    rec = um.begin(UpdateRecord(model="det"), "download", target_version="v2", target_role="serving",
                   bundle=None, now=0.0)
    for event in ["ok", "ok", "ok", "to_serving", "crash_recovered", "ok"]:
        rec = um.transition(rec, event, 0.0)
    assert rec.state == ID


def test_begin_refuses_while_an_update_is_in_flight():
    with pytest.raises(um.InvalidTransitionError, match="while one to v2 is in state Loading"):
        um.begin(_record(L), "download", target_version="v3", target_role="serving", bundle=None, now=0.0)
    with pytest.raises(um.InvalidTransitionError, match="not an event that starts"):
        um.begin(_record(ID), "ok", target_version="v3", target_role="serving", bundle=None, now=0.0)
    with pytest.raises(um.InvalidTransitionError, match="role"):
        um.begin(_record(ID), "download", target_version="v3", target_role="canary", bundle=None, now=0.0)


def test_fail_records_the_reason_and_the_version():
    rec = um.fail(_record(V), "bad hash", 5.0)
    assert (rec.state, rec.error, rec.failed_version, rec.state_entered_at) == (F, "bad hash", "v2", 5.0)


def test_retry_policy_backs_off_by_attempt_and_resets_on_a_new_target():
    failed = um.fail(_record(D, attempt=1), "network", 100.0)
    # Same target: wait the backoff of attempt 1.
    assert um.retry_wait(failed, "v2", "serving", 100.0) == um.RETRY_BASE_S
    assert um.retry_wait(failed, "v2", "serving", 100.0 + um.RETRY_BASE_S) == 0.0
    # A different desired target, or the same version in another role, may go at once.
    assert um.retry_wait(failed, "v3", "serving", 100.0) == 0.0
    assert um.retry_wait(failed, "v2", "shadow", 100.0) == 0.0
    # Retrying the same target counts attempts, and the backoff doubles.
    again = um.begin(failed, "download", target_version="v2", target_role="serving", bundle=None, now=200.0)
    assert again.attempt == 2 and again.error == "" and again.failed_version == ""
    failed2 = um.fail(again, "network", 200.0)
    assert um.retry_wait(failed2, "v2", "serving", 200.0) == 2 * um.RETRY_BASE_S
    # A new target restarts the count.
    other = um.begin(failed2, "download", target_version="v3", target_role="serving", bundle=None, now=300.0)
    assert other.attempt == 1


def test_retry_delay_is_capped():
    assert um.retry_delay_s(0) == 0.0
    assert um.retry_delay_s(1) == um.RETRY_BASE_S
    assert um.retry_delay_s(100) == um.RETRY_MAX_S


def test_record_round_trips_and_rejects_bad_fields():
    rec = UpdateRecord(model="det", target_version="v2", target_role="shadow", state=SH, attempt=2,
                       serving_version="v1", shadow_version="v2", shadow_sample_rate=0.25,
                       bundle={"version": "v2", "url": "/b", "sha256": "a" * 64, "length": 10,
                               "target_path": "det/v2/bundle.tar"},
                       state_entered_at=12.5, loop_guard=4)
    assert UpdateRecord.from_dict(rec.to_dict()) == rec
    raw = rec.to_dict()
    for field, bad in [("schema_version", 99), ("state", "Sleeping"), ("attempt", "3"), ("bundle", [1]),
                       ("target_role", "canary"), ("model", "")]:
        with pytest.raises(ValueError, match=field.split("_")[0]):
            UpdateRecord.from_dict({**raw, field: bad})
    with pytest.raises(ValueError):
        UpdateRecord.from_dict([])
