"""The device datasheet table: matching real reported names, dense peaks, MIG scaling, and its users (MFU, planner)."""

from __future__ import annotations

import json

import pytest

from launch import planner
from launch.__main__ import main as launch_main
from train import devices, metrics
from train.config import RunConfig

pytestmark = pytest.mark.timeout(60)

# Names exactly as torch.cuda.get_device_name() / nvidia-smi / rocm-smi print them on those machines.
REPORTED_NAMES = {
    "NVIDIA A100-SXM4-40GB": "a100-sxm-40gb",
    "NVIDIA A100-SXM4-80GB": "a100-sxm-80gb",
    "NVIDIA A100-PCIE-40GB": "a100-pcie-40gb",
    "NVIDIA A100 80GB PCIe": "a100-pcie-80gb",
    "NVIDIA A100-SXM4-40GB MIG 3g.20gb": "a100-sxm-40gb",
    "NVIDIA A100-SXM4-80GB MIG 1g.10gb": "a100-sxm-80gb",
    "NVIDIA H100 80GB HBM3": "h100-sxm",
    "NVIDIA H100 80GB HBM3 MIG 1g.10gb": "h100-sxm",
    "NVIDIA H100 PCIe": "h100-pcie",
    "NVIDIA H100 NVL": "h100-nvl",
    "NVIDIA H200": "h200",
    "NVIDIA H200 NVL": "h200-nvl",
    "NVIDIA GH200 480GB": "gh200",
    "NVIDIA B200": "b200",
    "NVIDIA GB200": "gb200",
    "NVIDIA L40S": "l40s",
    "NVIDIA L40": "l40",
    "NVIDIA L4": "l4",
    "NVIDIA A10G": "a10g",
    "NVIDIA A10": "a10",
    "NVIDIA GeForce RTX 4090": "rtx-4090",
    "AMD Instinct MI300X": "mi300x",
    "AMD Instinct MI325X": "mi325x",
}
UNKNOWN_NAMES = ["Tesla V100-SXM2-16GB", "Tesla T4", "NVIDIA A40", "NVIDIA A30", "NVIDIA GeForce RTX 3090",
                 "NVIDIA RTX A6000", "NVIDIA H800", "AMD Instinct MI250X", "cpu"]


@pytest.mark.parametrize("name,key", sorted(REPORTED_NAMES.items()))
def test_reported_names_match_their_row(name: str, key: str) -> None:
    spec = devices.match_device(name)
    assert spec is not None and spec.key == key, (name, spec)


@pytest.mark.parametrize("name", UNKNOWN_NAMES)
def test_unknown_names_match_nothing(name: str) -> None:
    assert devices.match_device(name) is None


def test_every_row_is_reachable_by_its_own_label_or_a_reported_name() -> None:
    """No pattern is shadowed by an earlier, broader one."""
    reached = {devices.match_device(name).key for name in REPORTED_NAMES}  # type: ignore[union-attr]
    assert reached == set(devices.DEVICES)


def test_dense_peaks_are_the_datasheet_figures() -> None:
    d = devices.DEVICES
    assert d["a100-sxm-40gb"].peak_flops("bf16") == 312e12 and d["a100-sxm-40gb"].fp8_tflops is None
    assert d["h100-sxm"].peak_flops("bf16") == pytest.approx(989.4e12)
    assert d["h100-sxm"].peak_flops("fp8") == pytest.approx(2 * 989.4e12, rel=1e-3)
    assert d["h100-pcie"].peak_flops("bf16") == 756e12
    assert d["h200"].bf16_tflops == d["h100-sxm"].bf16_tflops and d["h200"].hbm_gbps == 4800
    assert d["l40s"].peak_flops("bf16") == pytest.approx(362.05e12)
    assert d["mi300x"].peak_flops("bf16") == pytest.approx(1307.4e12)
    # Dense tensor-core figures: bf16 = 2 x tf32, fp8 = 2 x bf16, never below fp32 (within the datasheets' own
    # rounding: the L40S sheet prints 362.05 dense next to 733 sparse bf16).
    for spec in d.values():
        assert spec.bf16_tflops == pytest.approx(2 * spec.tf32_tflops, rel=0.02), spec.key
        assert spec.fp8_tflops is None or spec.fp8_tflops == pytest.approx(2 * spec.bf16_tflops, rel=0.02)
        assert spec.tf32_tflops >= spec.fp32_tflops * 0.99, spec.key
    with pytest.raises(ValueError, match="no fp8"):
        d["a100-sxm-80gb"].peak_flops("fp8")
    with pytest.raises(ValueError, match="precision"):
        d["h100-sxm"].peak_flops("fp16")


def test_mig_slice_is_scaled_by_its_sm_count() -> None:
    peak, source = metrics.datasheet_peak("NVIDIA A100-SXM4-40GB MIG 3g.20gb", precision="bf16", sm_count=42)
    assert peak == pytest.approx(312e12 * 42 / 108) and "42 of 108 SMs" in source
    full, source = metrics.datasheet_peak("NVIDIA H100 80GB HBM3", precision="bf16", sm_count=132)
    assert full == pytest.approx(989.4e12) and "SMs" not in source and "H100 SXM" in source


def test_mfu_peak_order_override_env_table(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setenv("LLAMA_PEAK_FLOPS", "5e11")
    assert metrics.peak_flops_per_device(tmp_path, override_tflops=312.0) == (312e12, "logging.peak_tflops")
    assert metrics.peak_flops_per_device(tmp_path) == (5e11, "LLAMA_PEAK_FLOPS")
    # a device key picks the row whatever the name says (a renamed cloud part)
    peak, _ = metrics.datasheet_peak("Some Cloud GPU", precision="tf32", device_key="a100-sxm-80gb")
    assert peak == 156e12
    assert metrics.datasheet_peak("Tesla T4", precision="bf16") is None


def test_matmul_precision_follows_dtype_and_torch_setting() -> None:
    import torch

    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert metrics.matmul_precision("fp32") == "fp32" and metrics.matmul_precision("bf16") == "bf16"
        torch.set_float32_matmul_precision("high")
        assert metrics.matmul_precision("fp32") == "tf32"
    finally:
        torch.set_float32_matmul_precision(before)


def test_run_config_device_fields_are_validated() -> None:
    base = ["--data.synthetic=true"]
    RunConfig.from_toml(None, base + ["--logging.gpu=h100-pcie", "--logging.peak_tflops=700"]).validate()
    with pytest.raises(ValueError, match="logging.gpu='h101'.*h100-sxm"):
        RunConfig.from_toml(None, base + ["--logging.gpu=h101"]).validate()
    with pytest.raises(ValueError, match="logging.peak_tflops=-1"):
        RunConfig.from_toml(None, base + ["--logging.peak_tflops=-1"]).validate()


def test_planner_hardware_comes_from_the_table() -> None:
    assert planner.Hardware().peak_tflops == devices.DEVICES["h100-sxm"].bf16_tflops
    a100 = planner.hardware_for("NVIDIA A100-SXM4-40GB")
    assert (a100.peak_tflops, a100.memory_bytes, a100.hbm_gbps) == (312.0, 40 * planner.GiB, 1555)
    assert planner.hardware_for("a100-sxm-80gb", peak_tflops=250.0).peak_tflops == 250.0


def test_plan_cli_gpu_flag_changes_mfu_and_memory(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["plan", "--model", "llama2_7b", "--gpus", "8", "--seq-len", "4096", "--global-batch-tokens",
            str(8 * 4096), "--tp", "1", "--pp", "1", "--zero-stage", "3", "--micro-batch", "1", "--json"]
    results = {}
    for gpu in ("h100-sxm", "a100-sxm-40gb"):
        assert launch_main(args + ["--gpu", gpu]) in (0, 1)
        results[gpu] = json.loads(capsys.readouterr().out)
    h100, a100 = results["h100-sxm"], results["a100-sxm-40gb"]
    assert h100["hardware"]["peak_tflops"] == 989.4 and a100["hardware"]["peak_tflops"] == 312.0
    assert a100["hardware"]["memory_bytes"] == 40 * planner.GiB
    assert a100["plan"]["step"]["step_s"] > 2.5 * h100["plan"]["step"]["step_s"]
    assert launch_main(args + ["--gpu", "h100-sxm", "--peak-tflops", "500"]) in (0, 1)
    assert json.loads(capsys.readouterr().out)["hardware"]["peak_tflops"] == 500
    assert launch_main(["devices", "--match", "NVIDIA H100 PCIe", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["key"] == "h100-pcie"
