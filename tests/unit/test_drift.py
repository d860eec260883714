"""Drift statistics against scipy on fixed data, and monitors whose memory does not grow.

Given reference proportions and live counts on the same bins,
when PSI, binned KS and Jensen-Shannon are computed,
then they match the textbook formula, scipy's exact KS at the bin edges and scipy's JS distance.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats
from scipy.spatial.distance import jensenshannon

from fleet.core import drift
from fleet.core.errors import InvalidInputError

REF = np.array([0.1, 0.2, 0.4, 0.2, 0.1])
LIVE = np.array([5, 30, 40, 20, 5])


def test_psi_matches_the_formula_on_fixed_data() -> None:
    q = LIVE / LIVE.sum()
    plain = float(np.sum((q - REF) * np.log(q / REF)))
    p_s = (REF + drift.EPSILON) / (1 + 5 * drift.EPSILON)
    q_s = (q + drift.EPSILON) / (1 + 5 * drift.EPSILON)
    assert drift.psi(REF, LIVE) == pytest.approx(float(np.sum((q_s - p_s) * np.log(q_s / p_s))), rel=1e-12)
    # No empty bins: smoothing changes the plain formula's value by well under 1 %.
    assert drift.psi(REF, LIVE) == pytest.approx(plain, rel=1e-2)
    assert drift.psi(REF, REF * 1000) == pytest.approx(0.0, abs=1e-12)


def test_psi_of_an_empty_bin_is_large_but_finite() -> None:
    value = drift.psi([0.5, 0.5, 0.0], [0, 50, 50])
    assert math.isfinite(value) and value > 2.0


def test_js_matches_scipy_distance_base_2() -> None:
    q = LIVE / LIVE.sum()
    assert drift.js(REF, LIVE) == pytest.approx(float(jensenshannon(REF, q, base=2)), rel=1e-3)
    # Disjoint supports: the distance tops out at 1 (smoothing keeps it just under).
    assert drift.js([1, 0, 0, 0], [0, 0, 0, 10]) == pytest.approx(1.0, abs=0.01)
    assert drift.js(REF, REF * 7) == pytest.approx(0.0, abs=1e-9)


def test_binned_ks_equals_scipy_ks_when_the_gap_is_at_an_edge() -> None:
    rng = np.random.default_rng(3)
    ref_raw = rng.normal(0.0, 1.0, 4000)
    # Integer-valued data with edges between the integers: every CDF jump sits at a bin edge,
    # so the binned distance is exactly the two-sample KS statistic of the raw samples.
    ref_int = np.round(ref_raw * 2)
    live_int = np.round(rng.normal(0.6, 1.0, 3000) * 2)
    edges = np.arange(ref_int.min(), ref_int.max()) + 0.5
    ref_counts = drift.bin_numeric(edges, ref_int)
    live_counts = drift.bin_numeric(edges, live_int)
    exact = stats.ks_2samp(ref_int, live_int).statistic
    assert drift.ks_binned(ref_counts / ref_counts.sum(), live_counts) == pytest.approx(exact, abs=1e-12)


def test_binned_ks_never_exceeds_the_exact_statistic() -> None:
    rng = np.random.default_rng(4)
    ref_raw, live_raw = rng.normal(0, 1, 2000), rng.normal(0.3, 1.2, 2000)
    edges = np.quantile(ref_raw, np.linspace(0, 1, 17)[1:-1])
    ref_counts = drift.bin_numeric(edges, ref_raw)
    binned = drift.ks_binned(ref_counts / ref_counts.sum(), drift.bin_numeric(edges, live_raw))
    exact = stats.ks_2samp(ref_raw, live_raw).statistic
    assert binned <= exact + 1e-12
    assert binned > 0.5 * exact  # 16 quantile bins lose little


def test_no_live_samples_score_zero_and_mismatched_bins_are_refused() -> None:
    assert drift.scores(REF, np.zeros(5)) == {"psi": 0.0, "ks": 0.0, "js": 0.0}
    with pytest.raises(InvalidInputError, match="bins"):
        drift.psi(REF, [1, 2, 3])


def test_numeric_bins_are_open_ended_and_skip_non_finite_values() -> None:
    edges = np.array([0.0, 1.0])
    counts = drift.bin_numeric(edges, np.array([-100.0, 0.0, 0.5, 1.0, 1e9, np.nan, np.inf]))
    assert counts.tolist() == [1, 2, 2]


def test_categorical_bins_put_unknown_classes_in_other() -> None:
    counts = drift.bin_categorical(np.array([0, 2, 5]), np.array([0, 0, 2, 5, 3, 99, -1]))
    assert counts.tolist() == [2, 1, 1, 3]


def test_feature_monitor_emits_and_resets_with_fixed_memory() -> None:
    feature = {"name": "input:x:c0", "kind": "input", "type": "numeric", "edges": [-1.0, 0.0, 1.0],
               "proportions": [0.16, 0.34, 0.34, 0.16]}
    monitor = drift.FeatureMonitor(feature)
    before = monitor.memory_bytes()
    assert before == 4 * 8 + 4 * 8 + 3 * 8  # counts, reference, edges: 24 bytes per bin (less one edge)
    rng = np.random.default_rng(0)
    for _ in range(2000):  # 200k values: memory must not move
        monitor.add(rng.normal(2.0, 1.0, 100))
    assert monitor.memory_bytes() == before
    out = monitor.emit()
    assert out["samples"] == 200_000 and sum(out["counts"]) == 200_000
    assert out["psi"] > 1.0 and out["ks"] > 0.5
    assert monitor.samples == 0  # reset for the next window
    again = monitor.emit()
    assert again["samples"] == 0 and again["psi"] == 0.0


def test_merge_adds_counts_and_rescores() -> None:
    feature = {"name": "f", "kind": "input", "type": "numeric", "edges": [0.0], "proportions": [0.5, 0.5]}
    a, b = drift.FeatureMonitor(feature), drift.FeatureMonitor(feature)
    a.add(np.full(100, -1.0))
    b.add(np.full(100, 1.0))
    merged = drift.merge_drift([a.emit(), b.emit()])
    assert merged is not None
    assert merged["counts"] == [100, 100] and merged["samples"] == 200
    assert merged["psi"] == pytest.approx(0.0, abs=1e-9)  # each half alone drifts; together they don't
    assert drift.merge_drift([]) is None


def test_monitor_refuses_proportions_that_do_not_fit_its_bins() -> None:
    with pytest.raises(InvalidInputError, match="proportions"):
        drift.FeatureMonitor({"name": "f", "type": "numeric", "edges": [0.0, 1.0], "proportions": [0.5, 0.5]})
