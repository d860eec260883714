"""The benchmark scripts keep working: each runs with `--quick` and prints coherent figures.

Benchmarks are not timed tests (their numbers depend on the machine); this only guards against
rot. Each script runs as a subprocess, as a user runs it, must exit 0, and must end with a
`RESULT {json}` line whose counts agree with what the run was asked to do. About 15 s in all.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
SCRIPTS = ["bench_shadow_overhead.py", "bench_agent_memory.py", "bench_rollout_fanout.py"]


def run_script(name: str, *args: str, timeout: float = 90) -> tuple[str, dict[str, Any]]:
    proc = subprocess.run([sys.executable, str(BENCHMARKS / name), *args], capture_output=True, text=True,
                          timeout=timeout, check=False)
    assert proc.returncode == 0, f"{name} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    lines = proc.stdout.strip().splitlines()
    assert lines and lines[-1].startswith("RESULT "), f"{name} did not end with a RESULT line:\n{proc.stdout[-2000:]}"
    return proc.stdout, json.loads(lines[-1][len("RESULT "):])


@pytest.mark.parametrize("name", SCRIPTS)
def test_help_describes_the_options(name: str) -> None:
    proc = subprocess.run([sys.executable, str(BENCHMARKS / name), "--help"], capture_output=True, text=True,
                          timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "--quick" in proc.stdout and "usage:" in proc.stdout


def test_shadow_overhead_measures_every_mode_on_the_same_run() -> None:
    out, res = run_script("bench_shadow_overhead.py", "--quick")
    assert "p99 x" in out  # the human table is printed before the RESULT line
    assert [run["concurrency"] for run in res["runs"]] == [1, 2]
    for run in res["runs"]:
        modes = run["modes"]
        assert set(modes) == {"off", "on@1", "on@0.25"}
        for mode in modes.values():
            assert mode["requests"] == 40 and mode["errors"] == 0
            assert 0 < mode["p50_ms"] <= mode["p95_ms"] <= mode["p99_ms"]
            assert mode["throughput_rps"] > 0
        # Shadow off mirrors nothing; at rate 1.0 every request is mirrored or counted as dropped.
        assert modes["off"]["mirrored"] == 0 and modes["off"]["shadow_compared"] == 0
        full = modes["on@1"]
        assert full["mirrored"] + full["shadow_dropped"] == 40
        assert full["shadow_compared"] == full["mirrored"]
        assert modes["on@0.25"]["mirrored"] + modes["on@0.25"]["shadow_dropped"] < 40
        assert full["p99_ratio"] == pytest.approx(full["p99_ms"] / modes["off"]["p99_ms"], rel=0.01)


def test_agent_memory_reports_each_point_in_a_fresh_process() -> None:
    out, res = run_script("bench_agent_memory.py", "--quick")
    assert "RSS MiB" in out
    names = [p["name"] for p in res["points"]]
    assert names == ["interpreter", "agent imported", "endpoint started", "serving loaded", "shadow loaded",
                     "after 50 inferences"]
    rss = [p["rss_mib"] for p in res["points"]]
    # A fresh interpreter is small, and importing the agent (onnxruntime, grpc, numpy) is not.
    assert 5 < rss[0] < rss[1]
    assert res["serving_model_mib"] > 0
    assert all(p["peak_mib"] >= p["rss_mib"] for p in res["points"])
    assert res["model_file_mib"] > 1
    assert res["counts"] == {"requests": 50, "mirrored": 50, "dropped": 0, "compared": 50}


def test_rollout_fanout_reaches_every_device_and_only_the_canary_cohort() -> None:
    out, res = run_script("bench_rollout_fanout.py", "--quick", timeout=120)
    assert "deploy v1" in out
    assert res["devices"] == 5 and res["sync_errors"] == 0
    assert res["enrolment"]["devices_per_s"] > 0
    deploy = res["deploy_v1"]
    assert deploy["from_post_return"]["n"] == 5
    assert 0 < deploy["last_device_s"] <= deploy["completed_s"]
    canary = res["canary_v2"]
    assert canary["cohort_expected"] == canary["cohort_received"] == 1
    assert canary["serving_v2_devices"] == 0
