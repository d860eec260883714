"""What shadow mirroring costs the requests an application makes: serving latency, shadow off vs on.

The claim under test (fleet.agent.inference): answers come from the serving model only and the
shadow runs off the request path, so turning a shadow on must not move the client's latency by
much. This script measures it end to end, in one run:

- an agent-side `ModelHost` with a real ONNX Runtime session of `classifier(1, slow_factor=1)`
  (about 0.5 ms per request) served over the real Open Inference Protocol endpoint
  (`start_inference_server`, port 0);
- the candidate `classifier(2, slow_factor=1)` as shadow at sample rate 1.0 (and 0.25), or none;
- a client in a separate process (an application is one) using the generated gRPC stub with
  `raw_input_contents`, closed loop, at concurrency 1 and 4;
- phases interleaved block by block in a mirrored order (off, on, on, off, ...) so that drift on a
  shared machine lands on every mode alike. Between blocks the shadow queue is drained, so one
  mode's backlog never burdens the next block.

Figures: client-observed p50/p95/p99 latency and throughput per mode and concurrency, the ratio
p99(on)/p99(off), the runtime's own serving latency from the host's histograms, and the mirrored
and dropped counts from `ModelHost.drain_windows()`.

Run: `python benchmarks/bench_shadow_overhead.py` (about 40 s on 2 cores); `--quick` for a smoke run.
The last line is `RESULT {json}`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

MODEL = "bench"
SCRIPT = os.path.abspath(__file__)


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100) of raw samples; nan when there are none."""
    return float(np.percentile(np.asarray(values, dtype=np.float64), q)) if values else float("nan")


# --------------------------------------------------------------------------------------------
# The client process: an application calling the agent, driven by JSON lines on stdin
# --------------------------------------------------------------------------------------------


async def _closed_loop(stub: Any, pool: list[Any], concurrency: int, total: int) -> tuple[list[float], int, float]:
    """`total` requests from `concurrency` callers, each sending its next as soon as one returns."""
    import grpc

    latencies: list[float] = []
    errors = 0
    issued = 0

    async def caller(offset: int) -> None:
        nonlocal issued, errors
        k = offset
        while issued < total:
            issued += 1
            start = time.perf_counter()
            try:
                await stub.ModelInfer(pool[k % len(pool)], timeout=10)
            except grpc.aio.AioRpcError:
                errors += 1
                continue
            latencies.append((time.perf_counter() - start) * 1000.0)
            k += 1

    started = time.perf_counter()
    await asyncio.gather(*(caller(i) for i in range(concurrency)))
    return latencies, errors, time.perf_counter() - started


async def _client_main(port: int, seed: int) -> None:
    import grpc

    from fleet.proto.inference import grpc_service_pb2 as pb
    from fleet.proto.inference import grpc_service_pb2_grpc as pb_grpc

    rng = np.random.default_rng(seed)
    # A small pool of distinct images: the shadow compares real, varied answers.
    requests = []
    for i in range(16):
        image = rng.standard_normal((1, 3, 32, 32)).astype("<f4")
        req = pb.ModelInferRequest(model_name=MODEL, id=str(i))
        req.inputs.add(name="input", datatype="FP32", shape=[1, 3, 32, 32])
        req.raw_input_contents.append(image.tobytes())
        requests.append(req)

    loop = asyncio.get_running_loop()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        await stub.ServerLive(pb.ServerLiveRequest(), timeout=10)
        print(json.dumps({"ready": True}), flush=True)
        while True:
            line = await loop.run_in_executor(None, sys.stdin.readline)
            if not line.strip():
                return  # parent closed stdin: done
            command = json.loads(line)
            latencies, errors, wall = await _closed_loop(stub, requests, int(command["concurrency"]),
                                                         int(command["requests"]))
            print(json.dumps({"latencies_ms": latencies, "wall_s": wall, "errors": errors}), flush=True)


# --------------------------------------------------------------------------------------------
# The agent side and the orchestration
# --------------------------------------------------------------------------------------------


class _Client:
    """The client subprocess, one JSON line per phase."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    async def _line(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        raw = await self.proc.stdout.readline()
        if not raw:
            raise RuntimeError(f"the client process exited (code {await self.proc.wait()}); see its stderr above")
        return dict(json.loads(raw))

    async def run(self, concurrency: int, requests: int) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps({"concurrency": concurrency, "requests": requests}) + "\n").encode())
        await self.proc.stdin.drain()
        return await self._line()


def _mode_name(rate: float) -> str:
    return "off" if rate == 0 else f"on@{rate:g}"


def _block_order(modes: list[float], rounds: int) -> list[float]:
    """Modes in a mirrored order per round pair (A B C C B A ...), so linear drift cancels."""
    order: list[float] = []
    for r in range(rounds):
        order.extend(modes if r % 2 == 0 else list(reversed(modes)))
    return order


def _load_models(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """v1 (serving) and v2 (shadow) as real, warmed-up ONNX Runtime sessions."""
    from fleet.agent.runtime import load_model
    from fleet.core import synthetic_models as sm

    loaded = {}
    for version, seed in (("v1", 1), ("v2", 2)):
        blob = sm.classifier(seed, slow_factor=args.slow_factor)
        path = work / f"{version}.onnx"
        path.write_bytes(blob)
        loaded[version] = load_model(path, sm.manifest_for(blob, name=MODEL, version=version),
                                     ["CPUExecutionProvider"], threads=1)
        loaded[version].warmup(runs=5)
    return loaded


async def _bench(args: argparse.Namespace, loaded: dict[str, Any]) -> dict[str, Any]:
    from fleet.agent.inference import ModelHost, bound_port, start_inference_server
    from fleet.core.histogram import LatencyHistogram

    host = ModelHost(workers=args.workers)
    host.set_serving(MODEL, loaded["v1"])
    server = await start_inference_server(host, "127.0.0.1:0")
    port = bound_port(server)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, SCRIPT, "--client-worker", str(port),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    client = _Client(proc)
    modes = [0.0, *args.sample_rates]
    results: dict[str, Any] = {"config": {
        "model": f"classifier(slow_factor={args.slow_factor})", "requests_per_mode": args.requests,
        "rounds": args.rounds, "warmup": args.warmup, "concurrency": args.concurrency,
        "sample_rates": args.sample_rates, "host_workers": args.workers, "cpus": os.cpu_count(),
        "load_avg_at_start": os.getloadavg()[0],
    }, "runs": []}
    try:
        await client._line()  # ready
        loop = asyncio.get_running_loop()
        for concurrency in args.concurrency:
            # Warm-up with the shadow on: both sessions, the channel and the server are hot.
            host.set_shadow(MODEL, loaded["v2"], 1.0)
            await client.run(concurrency, args.warmup)
            await loop.run_in_executor(None, host.wait_shadow_idle, 30.0)
            host.drain_windows()

            per_mode: dict[float, dict[str, Any]] = {
                m: {"latencies": [], "wall": 0.0, "errors": 0, "mirrored": 0, "dropped": 0, "compared": 0,
                    "runtime": LatencyHistogram(), "shadow_runtime": LatencyHistogram()}
                for m in modes
            }
            block = max(1, args.requests // args.rounds)
            for mode in _block_order(modes, args.rounds):
                if mode == 0:
                    host.clear_shadow(MODEL)
                else:
                    host.set_shadow(MODEL, loaded["v2"], mode)
                out = await client.run(concurrency, block)
                # Let the shadow finish what this block queued, off the clock, so no block pays
                # for its predecessor's backlog.
                await loop.run_in_executor(None, host.wait_shadow_idle, 30.0)
                acc = per_mode[mode]
                acc["latencies"].extend(out["latencies_ms"])
                acc["wall"] += out["wall_s"]
                acc["errors"] += out["errors"]
                for window in host.drain_windows():
                    hist = LatencyHistogram.from_dict(window["latency_ms"])
                    if window["role"] == "serving":
                        acc["mirrored"] += window["mirrored"]
                        acc["dropped"] += window["shadow_dropped"]
                        acc["runtime"].merge(hist)
                    else:
                        acc["compared"] += window["requests"]
                        acc["shadow_runtime"].merge(hist)
            run: dict[str, Any] = {"concurrency": concurrency, "modes": {}}
            for mode, acc in per_mode.items():
                lat = acc["latencies"]
                runtime: LatencyHistogram = acc["runtime"]
                run["modes"][_mode_name(mode)] = {
                    "requests": len(lat), "errors": acc["errors"],
                    "p50_ms": round(percentile(lat, 50), 3), "p95_ms": round(percentile(lat, 95), 3),
                    "p99_ms": round(percentile(lat, 99), 3),
                    "throughput_rps": round(len(lat) / acc["wall"], 1) if acc["wall"] else 0.0,
                    "runtime_p50_ms": round(runtime.quantile(0.5), 3) if runtime.count else None,
                    "runtime_p99_ms": round(runtime.quantile(0.99), 3) if runtime.count else None,
                    "mirrored": acc["mirrored"], "shadow_dropped": acc["dropped"], "shadow_compared": acc["compared"],
                }
            off = run["modes"]["off"]
            for mode in args.sample_rates:
                on = run["modes"][_mode_name(mode)]
                on["p50_ratio"] = round(on["p50_ms"] / off["p50_ms"], 3)
                on["p99_ratio"] = round(on["p99_ms"] / off["p99_ms"], 3)
                on["throughput_ratio"] = round(on["throughput_rps"] / off["throughput_rps"], 3)
            results["runs"].append(run)
    finally:
        if proc.stdin is not None:
            proc.stdin.close()
        try:
            await asyncio.wait_for(proc.wait(), 10)
        except TimeoutError:
            proc.kill()
            await proc.wait()
        await server.stop(grace=1)
        host.close()
    return results


def _print_table(results: dict[str, Any]) -> None:
    cfg = results["config"]
    print(f"shadow overhead: {cfg['requests_per_mode']} requests per mode in {cfg['rounds']} interleaved blocks, "
          f"{cfg['cpus']} CPUs, load average at start {cfg['load_avg_at_start']:.2f}")
    header = (f"{'conc':>4} {'mode':>8} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'req/s':>8} "
              f"{'p99 x':>6} {'rt p50':>7} {'mirrored':>8} {'dropped':>7} {'errors':>6}")
    print(header)
    print("-" * len(header))
    for run in results["runs"]:
        for name, m in run["modes"].items():
            ratio = f"{m['p99_ratio']:.2f}" if "p99_ratio" in m else "1.00"
            rt = f"{m['runtime_p50_ms']:.3f}" if m["runtime_p50_ms"] is not None else "-"
            print(f"{run['concurrency']:>4} {name:>8} {m['p50_ms']:>8.3f} {m['p95_ms']:>8.3f} {m['p99_ms']:>8.3f} "
                  f"{m['throughput_rps']:>8.1f} {ratio:>6} {rt:>7} {m['mirrored']:>8} {m['shadow_dropped']:>7} "
                  f"{m['errors']:>6}")
    print("p99 x = p99(mode) / p99(off) in the same run; rt p50 = the runtime's own serving time (host histogram).")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--requests", type=int, default=2000, help="client requests per mode and concurrency")
    parser.add_argument("--rounds", type=int, default=4, help="interleaved blocks per mode")
    parser.add_argument("--warmup", type=int, default=200, help="warm-up requests per concurrency (shadow on)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4], help="closed-loop client concurrencies")
    parser.add_argument("--sample-rates", type=float, nargs="+", default=[1.0, 0.25],
                        help="shadow sample rates to compare with shadow off")
    parser.add_argument("--slow-factor", type=int, default=1, help="model compute (1 = about 0.5 ms per request)")
    parser.add_argument("--workers", type=int, default=2, help="ModelHost inference threads (the agent's default)")
    parser.add_argument("--quick", action="store_true", help="tiny run for smoke tests (seconds, figures are noise)")
    parser.add_argument("--client-worker", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.client_worker is not None:
        asyncio.run(_client_main(args.client_worker, seed=0))
        return 0
    if args.quick:
        args.requests, args.rounds, args.warmup, args.concurrency = 40, 2, 10, [1, 2]
    if any(not 0 < r <= 1 for r in args.sample_rates):
        parser.error("--sample-rates must be within (0, 1]")
    if args.requests < args.rounds or args.rounds < 1:
        parser.error("--requests must be at least --rounds, and --rounds at least 1")
    with tempfile.TemporaryDirectory(prefix="bench-shadow-") as work:
        loaded = _load_models(args, Path(work))
        results = asyncio.run(_bench(args, loaded))
    _print_table(results)
    print("RESULT " + json.dumps(results, sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
