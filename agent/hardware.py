"""What this device is, and which ONNX Runtime execution providers a model should run on.

The rule: a provider is used only when the runtime has it *and* the device has the hardware it
drives. An onnxruntime-gpu wheel lists CUDAExecutionProvider on a machine without a GPU, and a
session created on it would fail or silently run on CPU; so `detect_hardware` reports an
accelerator only from evidence of the device itself (device nodes, Jetson release file), and
`choose_providers` keeps a provider only when the profile names its accelerator. The CPU
provider always ends the list, so there is always somewhere to fall back to.

The profile dict has the fields of the `HardwareProfile` proto message.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import onnxruntime as ort

CPU = "CPUExecutionProvider"
# Preference order, best first, with the accelerator each provider needs on the device.
PROVIDER_ORDER: tuple[tuple[str, str], ...] = (
    ("TensorrtExecutionProvider", "tensorrt"),
    ("CUDAExecutionProvider", "cuda"),
    ("OpenVINOExecutionProvider", "openvino"),
    ("CoreMLExecutionProvider", "coreml"),
)
_ACCELERATOR_OF = dict(PROVIDER_ORDER)
# Short names an operator may write in a config or a bundle variant.
_ALIASES = {
    "tensorrt": "TensorrtExecutionProvider",
    "trt": "TensorrtExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
    "cpu": CPU,
}


def _memory_bytes() -> int:
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):  # not POSIX, or the value is unknown
        return 0


def _cpu_count() -> int:
    try:
        # The CPUs this process may run on (a container's cpuset), not the host's total.
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _has_nvidia_gpu() -> bool:
    # Desktop/server drivers create /dev/nvidia0; Jetson (Tegra) boards expose nvhost nodes.
    return any(Path(p).exists() for p in ("/dev/nvidia0", "/dev/nvhost-ctrl", "/dev/nvhost-gpu"))


def _is_jetson() -> bool:
    return Path("/etc/nv_tegra_release").exists()


def _has_edgetpu() -> bool:
    # PCIe/M.2 Coral shows up as /dev/apex_N; USB Coral has no device node we can check cheaply.
    return any(Path("/dev").glob("apex_*")) if Path("/dev").is_dir() else False


def detect_hardware(hardware_class: str | None = None) -> dict[str, Any]:
    """Probe this device. `hardware_class` (from config) wins over the guessed class."""
    providers = list(ort.get_available_providers())
    accelerators: list[str] = []
    if _has_nvidia_gpu():
        if "CUDAExecutionProvider" in providers:
            accelerators.append("cuda")
        if "TensorrtExecutionProvider" in providers:
            accelerators.append("tensorrt")
    if "OpenVINOExecutionProvider" in providers:
        # OpenVINO drives Intel CPUs/iGPUs/NPUs; it needs no device node to be useful.
        accelerators.append("openvino")
    if "CoreMLExecutionProvider" in providers and platform.system() == "Darwin":
        accelerators.append("coreml")
    if _has_edgetpu():
        accelerators.append("edgetpu")

    if hardware_class:
        klass = hardware_class
    elif _is_jetson():
        klass = "jetson"
    elif "edgetpu" in accelerators:
        klass = "coral"
    elif "cuda" in accelerators:
        klass = "nvidia-gpu"
    elif "openvino" in accelerators:
        klass = "intel-openvino"
    else:
        klass = "cpu"
    return {
        "hardware_class": klass,
        "arch": platform.machine() or "unknown",
        "accelerators": accelerators,
        "execution_providers": providers,
        "cpu_count": _cpu_count(),
        "memory_bytes": _memory_bytes(),
        "os": platform.system() or "unknown",
    }


def normalize_provider(name: str) -> str:
    """`cuda` -> `CUDAExecutionProvider`; full provider names pass through."""
    return _ALIASES.get(name.strip().lower(), name.strip())


def choose_providers(profile: dict[str, Any], preferred: Sequence[str] = ()) -> list[str]:
    """Execution providers to open a session with, best first, always ending with the CPU one.

    A provider is kept when ONNX Runtime here has it, the profile lists it as present (if the
    profile lists any), and the profile's accelerators include the hardware it drives.
    `preferred` (e.g. a bundle variant's `providers`) restricts and orders the choice; without it
    the order is TensorRT > CUDA > OpenVINO > CoreML.
    """
    runtime = set(ort.get_available_providers())
    listed = {normalize_provider(p) for p in profile.get("execution_providers", []) or []}
    accelerators = {str(a).lower() for a in profile.get("accelerators", []) or []}

    def usable(provider: str) -> bool:
        if provider == CPU:
            return False  # appended last, once
        needs = _ACCELERATOR_OF.get(provider)
        if needs is None or needs not in accelerators:
            return False
        return provider in runtime and (not listed or provider in listed)

    candidates = [normalize_provider(p) for p in preferred] or [p for p, _ in PROVIDER_ORDER]
    chosen: list[str] = []
    for provider in candidates:
        if usable(provider) and provider not in chosen:
            chosen.append(provider)
    chosen.append(CPU)
    return chosen
