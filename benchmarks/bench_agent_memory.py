"""How much memory an agent holds with a serving and a shadow model loaded.

A device has little RAM, and during a canary the agent keeps two sessions open (serving and
shadow) beside the previous version on disk. This script measures the agent-side process in a
fresh interpreter, so no test harness or client library inflates the numbers:

1. interpreter start (the baseline of this run);
2. after importing the agent modules (daemon, inference endpoint, runtime);
3. after starting the Open Inference Protocol endpoint (no model yet);
4. after loading and warming up the serving model (`fleet.agent.runtime.load_model`: a real ONNX
   Runtime session, signature checked against its manifest). The parent wrote the model file and
   manifest beforehand, so building the model costs the measured process nothing. This first
   session also pays ONNX Runtime's one-time set-up;
5. after loading and warming up the shadow model (the next version, same size);
6. after N inferences sent by a client in *another* process (this script's parent) over gRPC,
   with every request mirrored to the shadow (sample rate 1.0), once the shadow queue is idle.

At each point it reads VmRSS (resident now) and VmHWM (peak resident) from /proc/self/status and
reports MiB and the increment over the previous point. The model is
`classifier(1, channels=64, num_classes=5000, input 64x64)` by default, about 20 MB of weights
(MobileNet-class size); its file size is reported. RSS is what the kernel sees: allocator caching
and trimming move it by a few MiB either way, so read the increments to +-5 MiB and budget a
device by the peak.

Run: `python benchmarks/bench_agent_memory.py` (about 15 s on 2 cores); `--quick` for a smoke
run. Linux only (/proc). The last line is `RESULT {json}`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

MODEL = "bench"
MIB = 1024 * 1024


def proc_status() -> dict[str, float]:
    """VmRSS and VmHWM of this process, in MiB."""
    out: dict[str, float] = {}
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0]) * 1024 / MIB  # the kernel reports kB
    return out


def _emit(event: str, **fields: Any) -> None:
    print(json.dumps({"event": event, **fields}), flush=True)


# --------------------------------------------------------------------------------------------
# The measured process: an agent's serving side, nothing else
# --------------------------------------------------------------------------------------------


def _child(args: argparse.Namespace) -> None:
    _emit("point", name="interpreter", **proc_status())
    import fleet.agent.daemon  # noqa: F401 - the import is what is measured
    from fleet.agent.inference import ModelHost, bound_port, start_inference_server
    from fleet.agent.runtime import load_model
    from fleet.core.manifest import Manifest

    _emit("point", name="agent imported", **proc_status())

    # The parent built the model files; here they are only read, as an agent reads its slots.
    work = Path(args.child)
    paths = {v: work / f"{v}.onnx" for v in ("v1", "v2")}
    manifests = {v: Manifest.from_dict(json.loads((work / f"{v}.json").read_text())) for v in ("v1", "v2")}

    async def serve() -> None:
        host = ModelHost()
        server = await start_inference_server(host, "127.0.0.1:0")
        _emit("point", name="endpoint started", **proc_status())
        # The first session also pays ONNX Runtime's one-time environment set-up; the shadow's
        # increment is the cleaner per-model figure.
        serving = load_model(paths["v1"], manifests["v1"], ["CPUExecutionProvider"], threads=1)
        serving.warmup(runs=3)
        host.set_serving(MODEL, serving)
        _emit("point", name="serving loaded", **proc_status())

        shadow = load_model(paths["v2"], manifests["v2"], ["CPUExecutionProvider"], threads=1)
        shadow.warmup(runs=3)
        host.set_shadow(MODEL, shadow, 1.0)
        _emit("point", name="shadow loaded", **proc_status())
        _emit("ready", port=bound_port(server))

        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, sys.stdin.readline)  # the client is done
        await loop.run_in_executor(None, host.wait_shadow_idle, 60.0)
        windows = host.drain_windows()
        serving_w: dict[str, Any] = next((w for w in windows if w["role"] == "serving"), {})
        shadow_w: dict[str, Any] = next((w for w in windows if w["role"] == "shadow"), {})
        _emit("point", name=f"after {args.requests} inferences", **proc_status())
        _emit("counts", requests=serving_w.get("requests", 0), mirrored=serving_w.get("mirrored", 0),
              dropped=serving_w.get("shadow_dropped", 0), compared=shadow_w.get("requests", 0))
        await server.stop(grace=1)
        host.close()

    asyncio.run(serve())


# --------------------------------------------------------------------------------------------
# The parent: starts the agent side, plays the application, prints the figures
# --------------------------------------------------------------------------------------------


def _drive(port: int, requests: int, size: int) -> float:
    """Closed-loop client, concurrency 1; returns the seconds it took."""
    import grpc
    import numpy as np

    from fleet.proto.inference import grpc_service_pb2 as pb
    from fleet.proto.inference import grpc_service_pb2_grpc as pb_grpc

    rng = np.random.default_rng(0)
    pool = []
    for i in range(16):
        req = pb.ModelInferRequest(model_name=MODEL, id=str(i))
        req.inputs.add(name="input", datatype="FP32", shape=[1, 3, size, size])
        req.raw_input_contents.append(rng.standard_normal((1, 3, size, size)).astype("<f4").tobytes())
        pool.append(req)
    started = time.perf_counter()
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        for i in range(requests):
            stub.ModelInfer(pool[i % len(pool)], timeout=30)
    return time.perf_counter() - started


def _build_models(work: Path, args: argparse.Namespace) -> float:
    """Write v1 and v2 (model file + manifest JSON) into `work`; return the file size in MiB."""
    from fleet.core import synthetic_models as sm

    shape = (-1, 3, args.size, args.size)
    for version, seed in (("v1", 1), ("v2", 2)):
        blob = sm.classifier(seed, num_classes=args.classes, input_shape=shape, channels=args.channels)
        (work / f"{version}.onnx").write_bytes(blob)
        manifest = sm.manifest_for(blob, name=MODEL, version=version)
        (work / f"{version}.json").write_text(json.dumps(manifest.to_dict()))
    return (work / "v1.onnx").stat().st_size / MIB


def _bench(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-mem-") as work:
        file_mib = _build_models(Path(work), args)
        cmd = [sys.executable, os.path.abspath(__file__), "--child", work, "--requests", str(args.requests),
               "--channels", str(args.channels), "--classes", str(args.classes), "--size", str(args.size)]
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
        points: list[dict[str, Any]] = []
        counts: dict[str, Any] = {}
        client_s = 0.0
        try:
            assert proc.stdout is not None and proc.stdin is not None
            for raw in proc.stdout:
                msg = json.loads(raw)
                if msg["event"] == "point":
                    points.append({"name": msg["name"], "rss_mib": round(msg["VmRSS"], 1),
                                   "peak_mib": round(msg["VmHWM"], 1)})
                elif msg["event"] == "ready":
                    client_s = _drive(int(msg["port"]), args.requests, args.size)
                    proc.stdin.write("done\n")
                    proc.stdin.flush()
                elif msg["event"] == "counts":
                    counts = {k: v for k, v in msg.items() if k != "event"}
            code = proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        if code != 0 or len(points) < 6:
            raise RuntimeError(f"the measured agent process failed (exit {code}) after {len(points)} points")
    previous = None
    for point in points:
        point["delta_mib"] = round(point["rss_mib"] - previous, 1) if previous is not None else 0.0
        previous = point["rss_mib"]
    by_name = {p["name"]: p["rss_mib"] for p in points}
    imported = by_name["agent imported"]
    endpoint = by_name["endpoint started"]
    serving = by_name["serving loaded"]
    shadow = by_name["shadow loaded"]
    final = points[-1]["rss_mib"]
    return {
        "model_file_mib": round(file_mib, 2),
        "model": f"classifier(channels={args.channels}, num_classes={args.classes}, input 3x{args.size}x{args.size})",
        "requests": args.requests,
        "client_rps": round(args.requests / client_s, 1) if client_s else 0.0,
        "points": points,
        "agent_imported_mib": imported,
        "interpreter_mib": by_name["interpreter"],
        "endpoint_mib": round(endpoint - imported, 1),
        "serving_model_mib": round(serving - endpoint, 1),
        "shadow_model_mib": round(shadow - serving, 1),
        "inference_growth_mib": round(final - shadow, 1),
        "final_rss_mib": final,
        "final_peak_mib": points[-1]["peak_mib"],
        "shadow_vs_serving_ratio": round((shadow - serving) / (serving - endpoint), 2) if serving > endpoint else None,
        "per_model_over_file_ratio": round((serving - endpoint) / file_mib, 2) if file_mib else None,
        "counts": counts,
    }


def _print_table(res: dict[str, Any]) -> None:
    print(f"agent memory: {res['model']}, file {res['model_file_mib']:.1f} MiB, "
          f"{res['requests']} inferences with mirroring at {res['client_rps']:.0f} req/s")
    header = f"{'point':<28} {'RSS MiB':>8} {'+MiB':>7} {'peak MiB':>9}"
    print(header)
    print("-" * len(header))
    for p in res["points"]:
        print(f"{p['name']:<28} {p['rss_mib']:>8.1f} {p['delta_mib']:>+7.1f} {p['peak_mib']:>9.1f}")
    print(f"serving model +{res['serving_model_mib']} MiB ({res['per_model_over_file_ratio']}x its file), "
          f"shadow +{res['shadow_model_mib']} MiB, {res['requests']} mirrored inferences "
          f"{res['inference_growth_mib']:+} MiB; mirrored {res['counts'].get('mirrored')}, "
          f"dropped {res['counts'].get('dropped')}, compared {res['counts'].get('compared')}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--requests", type=int, default=2000, help="inferences (all mirrored) before the last point")
    parser.add_argument("--channels", type=int, default=64, help="classifier conv channels")
    parser.add_argument("--classes", type=int, default=5000, help="classifier classes (the Gemm dominates the size)")
    parser.add_argument("--size", type=int, default=64, help="input height and width (multiple of 4)")
    parser.add_argument("--quick", action="store_true", help="tiny run for smoke tests (seconds)")
    parser.add_argument("--child", metavar="WORKDIR", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _child(args)
        return 0
    if not os.path.exists("/proc/self/status"):
        parser.error("this benchmark reads /proc/self/status: run it on Linux")
    if args.size % 4 or args.size <= 0:
        parser.error("--size must be a positive multiple of 4")
    if args.quick:
        args.requests, args.classes, args.size = 50, 1000, 32
    res = _bench(args)
    _print_table(res)
    print("RESULT " + json.dumps(res, sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
