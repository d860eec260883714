"""Protobuf <-> dict conversion keeps every field the rest of the system reads."""

from __future__ import annotations

from fleet.proto import convert
from fleet.proto.fleet.v1 import fleet_pb2 as pb


def test_telemetry_round_trip_keeps_everything() -> None:
    window = {
        "model": "detector", "version": "v2", "role": "shadow", "compared_to": "v1", "requests": 10, "errors": 1,
        "mirrored": 0, "shadow_dropped": 0,
        "latency_ms": {"relative_accuracy": 0.01, "buckets": {"-5": 2, "40": 8}, "zero_count": 0, "count": 10,
                       "sum": 12.5, "min": 0.9, "max": 1.6},
        "paired_serving_latency_ms": None,
        "cpu_ms": {"relative_accuracy": 0.01, "buckets": {"10": 3}, "zero_count": 0, "count": 3, "sum": 3.3,
                   "min": 1.0, "max": 1.2},
        "paired_serving_cpu_ms": None,
        "agreement": [{"output": "scores", "samples": 10, "cosine_sum": 9.5, "cosine_min": 0.9,
                       "mean_abs_diff_sum": 0.1, "max_abs_diff": 0.2, "top1_agree": 9, "top1_samples": 10,
                       "sums": {"top5_agree": 10.0, "det_iou_sum": 3.5}, "confusion": {"1->2": 1}}],
        "drift": [{"feature": "input:c0", "kind": "input", "type": "numeric", "counts": [1, 2, 3],
                   "reference": [0.2, 0.3, 0.5], "samples": 6, "psi": 0.1, "ks": 0.05, "js": 0.0}],
        "profile_source": "reference",
    }
    batch = {"seq": 3, "window_start_ms": 1, "window_end_ms": 2, "windows": [window],
             "events": [{"model": "detector", "version": "v2", "role": "shadow", "state": "Failed",
                         "reason": "sha256 mismatch", "at_ms": 5}]}
    actual = {"desired_generation": 4, "models": [{"model": "detector", "slots": [
        {"role": "serving", "version": "v1", "sha256": "ab", "loaded": True, "execution_providers": ["CPU"]}],
        "update": {"target_version": "v2", "target_role": "shadow", "state": "Downloading", "error": "",
                   "failed_version": "", "attempt": 1, "updated_at_ms": 9, "bytes_done": 5, "bytes_total": 10}}]}
    msg = pb.TelemetryReport.FromString(convert.report_to_pb("cam-1", [batch], actual).SerializeToString())
    back = convert.batch_from_pb(msg.batches[0])
    assert back == batch
    assert convert.actual_from_pb(msg.state) == actual


def test_desired_round_trip() -> None:
    ref = {"version": "v2", "url": "http://c/b", "sha256": "ab" * 32, "length": 10, "target_path": "d/v2/bundle.tar"}
    desired = {"generation": 7, "telemetry_interval_ms": 2000, "models": [
        {"model": "d", "serving": ref, "shadow": None, "shadow_sample_rate": 0.0, "rollout": ""}]}
    assert convert.desired_from_pb(convert.desired_to_pb(desired)) == desired
