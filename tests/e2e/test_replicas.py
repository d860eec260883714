"""Two controller replicas on PostgreSQL: one reconciler at a time, changes fan out, failover.

Given two controller processes sharing one PostgreSQL database and one data directory, with
replica A the leader and every agent connected to replica B,
when an operator drives rollouts through B's REST API, A's reconciler decides, and B's streams
deliver; then A is SIGKILLed in the middle of a rollout,
then B takes the lead within seconds and the rollout finishes exactly once: one completion, one
passed gate per step, no step recorded twice, every device serving the candidate.
"""

from __future__ import annotations

import os
import signal
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from fleet.cli.demo import fleet_cmd, free_port
from fleet.core import synthetic_models as sm

from .conftest import FleetWorld

psycopg = pytest.importorskip("psycopg")
pytestmark = [pytest.mark.e2e, pytest.mark.slow]
ADMIN_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"
LOCK_QUERY = (
    "SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
    "WHERE l.locktype = 'advisory' AND l.granted AND a.datname = %s"
)


@pytest.fixture
def database() -> Iterator[str]:
    try:
        admin = psycopg.connect(ADMIN_DSN, autocommit=True, connect_timeout=3)
    except psycopg.OperationalError as exc:
        pytest.skip(f"PostgreSQL is not reachable at 127.0.0.1:5432: {exc}")
    name = f"fleet_{uuid.uuid4().hex[:10]}"
    admin.execute(f"CREATE DATABASE {name}")
    try:
        yield name
    finally:
        admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        admin.close()


def leader_of(database: str) -> str | None:
    with psycopg.connect(f"postgresql://postgres@127.0.0.1:5432/{database}") as conn:
        rows = conn.execute(LOCK_QUERY, (database,)).fetchall()
    return str(rows[0][0]) if rows else None


def test_two_replicas_failover_mid_rollout(tmp_path: Path, database: str) -> None:
    world = FleetWorld(tmp_path)
    cluster = world.cluster
    db_url = f"postgresql+psycopg://postgres@127.0.0.1:5432/{database}"
    data_dir = tmp_path / "controller"
    replica_a = {"http": free_port(), "grpc": free_port(), "enroll": free_port()}
    # Replicas sit behind one address in production (a Service); bundle URLs name it, whichever
    # replica leads, and agents send their credentials only to that address.
    cluster.env = {**cluster.env, "FLEET_DB_URL": db_url, "FLEET_PUBLIC_URL": cluster.url}

    def start_replica(name: str, ports: dict[str, int]) -> None:
        (tmp_path / "logs").mkdir(exist_ok=True)
        cluster._spawn(name, fleet_cmd("controller", "serve", "--data-dir", str(data_dir),
                                       "--http-port", str(ports["http"]), "--grpc-port", str(ports["grpc"]),
                                       "--grpc-enroll-port", str(ports["enroll"]),
                                       "--reconcile-interval", "0.5"),
                       env={**cluster.env, "FLEET_ADMIN_TOKEN": cluster.admin_token})

    try:
        # Given replica A (leader) and replica B (where the agents and the operator are)
        world.fleet("keys", "init", "--keys-dir", str(world.keys))
        start_replica("controller-a", replica_a)
        world.wait("A leads", lambda: (leader_of(database) or "").endswith(":leader"), 60)
        a_leader = leader_of(database)
        start_replica("controller", {"http": cluster.http_port, "grpc": cluster.grpc_port,
                                     "enroll": cluster.grpc_enroll_port})
        world.wait("B ready", lambda: world.fleet_ok("models", "ls", "-o", "json"), 60)
        assert leader_of(database) == a_leader, "B must not take the lead while A is alive"
        world.push("detector:v1", sm.classifier(1), task="classification")
        world.push("detector:v2", sm.classifier(2), task="classification")
        devices = world.add_agents(4)

        # When v1 is deployed through B: A's reconciler decides, B's streams deliver
        world.fleet("rollout", "detector:v1", "--canary", "100%")
        assert world.wait_rollout("detector-v1", timeout=120)["phase"] == "Completed"
        world.wait("v1 everywhere", lambda: all(world.serving(d, "detector") == "v1" for d in devices), 60)

        # And v2 goes out; A is killed while the canary is in shadow
        world.fleet("rollout", "detector:v2", "--canary", "50%", "--min-samples", "400", "--sample-rate", "1.0",
                    "--deadline", "180s")
        world.wait("canary in shadow", lambda: (r := world.rollout("detector-v2"))["phase"] == "Progressing"
                   and r["step_phase"] == "Shadow" and any(d["state"] == "Shadowing" for d in r["devices"]), 60,
                   every=0.2)
        killed_at = time.monotonic()
        os.kill(cluster.procs.pop("controller-a").pid, signal.SIGKILL)

        # Then B takes the lead within seconds
        world.wait("B leads", lambda: (leader_of(database) or "") not in ("", a_leader), 15, every=0.2)
        takeover_s = time.monotonic() - killed_at
        assert takeover_s < 10, takeover_s

        # And the rollout finishes exactly once
        done = world.wait_rollout("detector-v2", timeout=180)
        assert done["phase"] == "Completed", done.get("message")
        world.wait("v2 everywhere", lambda: all(world.serving(d, "detector") == "v2" for d in devices), 60)
        decisions = done["decisions"]
        kinds = Counter(d["kind"] for d in decisions)
        assert kinds["complete"] == 1, decisions
        passes = Counter(d["step_index"] for d in decisions if d["kind"] == "gate" and d["verdict"] == "Pass")
        assert passes == {0: 1, 1: 1}, decisions
        step_entries = Counter(d["reason"] for d in decisions if d["kind"] == "step")
        assert all(n == 1 for n in step_entries.values()), step_entries
        assert sorted(d["state"] for d in done["devices"]) == ["Serving"] * len(devices)
        print(f"leader takeover after SIGKILL: {takeover_s:.2f}s")
    finally:
        world.stop()
