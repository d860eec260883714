"""Device probing and execution-provider choice."""

from __future__ import annotations

import onnxruntime as ort
import pytest

from fleet.agent import hardware
from fleet.agent.hardware import CPU, choose_providers, detect_hardware

ALL = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "OpenVINOExecutionProvider",
       "CoreMLExecutionProvider", CPU]


@pytest.fixture
def runtime_has_everything(monkeypatch: pytest.MonkeyPatch) -> None:
    # Pretend this ONNX Runtime build carries every provider; the rule under test is the filter.
    monkeypatch.setattr(hardware.ort, "get_available_providers", lambda: list(ALL))


def test_detect_hardware_reports_the_profile_fields() -> None:
    profile = detect_hardware()
    assert set(profile) == {"hardware_class", "arch", "accelerators", "execution_providers", "cpu_count",
                            "memory_bytes", "os"}
    assert profile["execution_providers"] == ort.get_available_providers()
    assert profile["cpu_count"] >= 1 and profile["memory_bytes"] > 0
    assert detect_hardware("jetson-orin")["hardware_class"] == "jetson-orin"


@pytest.mark.usefixtures("runtime_has_everything")
def test_order_and_accelerator_consistency() -> None:
    profile = {"accelerators": ["cuda", "tensorrt", "openvino"], "execution_providers": ALL}
    assert choose_providers(profile) == ["TensorrtExecutionProvider", "CUDAExecutionProvider",
                                         "OpenVINOExecutionProvider", CPU]
    # A GPU build of the runtime on a machine without the GPU: CUDA is present but unusable.
    assert choose_providers({"accelerators": [], "execution_providers": ALL}) == [CPU]


@pytest.mark.usefixtures("runtime_has_everything")
def test_profile_listing_limits_the_choice() -> None:
    profile = {"accelerators": ["cuda", "tensorrt"], "execution_providers": ["CUDAExecutionProvider", CPU]}
    assert choose_providers(profile) == ["CUDAExecutionProvider", CPU]


@pytest.mark.usefixtures("runtime_has_everything")
def test_preferred_restricts_and_orders() -> None:
    profile = {"accelerators": ["cuda", "tensorrt"], "execution_providers": ALL}
    assert choose_providers(profile, ["cuda", "TensorrtExecutionProvider"]) == [
        "CUDAExecutionProvider", "TensorrtExecutionProvider", CPU]
    assert choose_providers(profile, ["openvino"]) == [CPU]
    assert choose_providers(profile, ["cpu"]) == [CPU]


def test_provider_missing_from_the_runtime_is_never_chosen(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hardware.ort, "get_available_providers", lambda: [CPU])
    assert choose_providers({"accelerators": ["cuda"], "execution_providers": ALL}) == [CPU]
