"""The gate simulation benchmark keeps working: a quick run prints its table and a coherent RESULT."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_gate_simulation.py"


def test_quick_run_reports_every_scenario_and_the_timing() -> None:
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick"], capture_output=True, text=True, timeout=120,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert lines[-1].startswith("RESULT ")
    result = json.loads(lines[-1][len("RESULT "):])
    scenarios = {s["scenario"]: s for s in result["scenarios"]}
    assert len(scenarios) == 6 and all(s["trials"] == 20 for s in scenarios.values())
    assert all(s["samples"] >= result["policy"]["min_samples"] for s in scenarios.values())
    # Even 20 trials separate the cases: no A/A failure, the 10% regression and both 5-point agreement
    # drops caught, a good retrain just above the threshold let through.
    assert scenarios["A/A (no difference)"]["fail_rate"] <= 0.05
    assert scenarios["latency +10%"]["fail_rate"] >= 0.8
    drops = [s for n, s in scenarios.items() if n.startswith("agreement") and "5-point drop" in n]
    assert len(drops) == 2 and all(s["fail_rate"] >= 0.8 for s in drops)
    assert scenarios["good retrain agreeing 0.985"]["fail_rate"] <= 0.1
    # Judging 1,000 devices x 60 samples stays well under a second, even on a busy CI machine.
    assert result["timing"]["windows_and_assess_s"] < 1.0
    assert "judging 1000 devices x 60 samples" in proc.stdout
