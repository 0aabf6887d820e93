"""Accelerator datasheet table: peak dense FLOP/s per precision, memory and bandwidth, matched by device name.

    python -m launch devices                          # the table
    python -m launch devices --match "NVIDIA H100 PCIe"

    from train.devices import DEVICES, match_device, device_spec
    spec = match_device(torch.cuda.get_device_name())  # None for a device the table does not know
    spec.peak_flops("bf16")                            # FLOP/s, dense (no 2:4 sparsity)

MFU is model FLOP/s over the *dense* peak of the precision the matmuls run in: the datasheets print the
2:4-sparsity figure with an asterisk, which is twice the dense one; training never uses structured sparsity,
so every figure below is the dense one (the sparse datasheet figure halved where only that is printed).
Peaks are per device as ``torch.cuda.get_device_name()`` sees it (one GPU; on AMD one GCD/OAM module).
A MIG slice or a cut-down part reports fewer SMs than the full chip: ``peak_flops(sm_count=...)`` scales the
peak by the SMs present (``torch.cuda.get_device_properties(i).multi_processor_count``).

Sources (the datasheet or architecture whitepaper the row's numbers come from):
  A100:      nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf (SXM4/PCIe, 40/80 GB)
  H100:      NVIDIA H100 Tensor Core GPU Architecture whitepaper v1.04, table 3 (SXM5 / PCIe dense figures);
             nvidia-tensor-core-gpu-datasheet (H100 NVL: sparse figures halved)
  H200:      hpc-datasheet-sc23-h200-datasheet-3002446 (H200 SXM and H200 NVL: sparse figures halved)
  GH200:     grace-hopper-superchip datasheet (the Hopper GPU's figures equal H100 SXM; 96 GB HBM3, 4 TB/s)
  B200/GB200: blackwell-datasheet-3384703 (HGX B200 and GB200 NVL72 totals divided by 8 / 72, then halved)
  L40S:      l40s-datasheet-28413; L40: vgpu-L40-datasheet; L4: l4-gpu-datasheet
  A10:       nvidia-a10-datasheet.pdf. The A10G (AWS g5) has no NVIDIA datasheet: it carries the A10's
             figures, as AWS quotes them; set ``logging.peak_tflops`` if you measure otherwise.
  RTX 4090:  NVIDIA Ada GPU Architecture whitepaper v2.1, appendix A (tensor figures with FP32 accumulate,
             which is what bf16 training uses; GeForce parts run FP32-accumulate at half the FP16-accumulate rate)
  MI300X / MI325X: AMD Instinct MI300X data sheet / MI325X product brief (matrix figures, dense)
"""

from __future__ import annotations

import re
from dataclasses import dataclass

PRECISIONS = ("bf16", "fp8", "tf32", "fp32")


@dataclass(frozen=True)
class DeviceSpec:
    """One accelerator's published figures (dense, per device)."""

    key: str
    """Short name used by ``--gpu`` and ``logging.gpu`` (e.g. ``h100-sxm``)."""
    label: str
    """Marketing name, for tables and logs."""
    pattern: str
    """Regular expression matched (case-insensitively, ``re.search``) against the name CUDA/ROCm reports."""
    bf16_tflops: float
    """Dense BF16 tensor-core (matrix-core) peak, TFLOP/s."""
    fp8_tflops: float | None
    """Dense FP8 tensor-core peak, TFLOP/s; None where the part has no FP8 (Ampere)."""
    tf32_tflops: float
    """Dense TF32 tensor-core peak, TFLOP/s (fp32 matmuls with ``torch.set_float32_matmul_precision("high")``)."""
    fp32_tflops: float
    """Non-tensor FP32 peak, TFLOP/s (fp32 matmuls at the default ``"highest"`` precision); AMD: FP32 matrix."""
    memory_gb: float
    """Device memory as the datasheet states it ("80 GB"). DRAM capacities are binary, so this is GiB: an H100
    80GB reports 79.6 GiB to CUDA (the driver keeps the rest), an H200 140.4 GiB of its "141 GB"."""
    hbm_gbps: float
    """Device memory bandwidth, GB/s."""
    link_gbps: float
    """Per-direction bandwidth from one device to the others in its node: NVLink / Infinity Fabric on SXM/OAM
    boards, PCIe otherwise (Gen4 x16 ~32 GB/s, Gen5 x16 ~64 GB/s)."""
    sms: int | None
    """Streaming multiprocessors (compute units on AMD) of the full part: the basis of the MIG scaling."""

    def peak_flops(self, precision: str = "bf16", *, sm_count: int | None = None) -> float:
        """Dense peak FLOP/s in ``precision``; scaled by ``sm_count / sms`` when fewer SMs are present (MIG)."""
        if precision not in PRECISIONS:
            raise ValueError(f"precision {precision!r}: use one of {PRECISIONS}")
        tflops = getattr(self, f"{precision}_tflops")
        if tflops is None:
            raise ValueError(f"{self.label} has no {precision} tensor cores; measure against bf16 instead")
        scale = 1.0
        if sm_count is not None and self.sms and 0 < sm_count < self.sms:
            scale = sm_count / self.sms
        return tflops * 1e12 * scale

    @property
    def memory_bytes(self) -> int:
        return int(self.memory_gb * 2**30)


# Order matters: the first matching pattern wins, so variants come before the family default
# (H100 NVL / PCIe before H100 = SXM; GH200 and H200 NVL before H200; A10G before A10; L40S before L40 before L4).
_TABLE: tuple[DeviceSpec, ...] = (
    # ---- NVIDIA Blackwell
    DeviceSpec("gb200", "GB200 (per GPU)", r"\bgb200\b", 2500.0, 5000.0, 1250.0, 80.0, 186, 8000, 900, None),
    DeviceSpec("b200", "B200 (HGX)", r"\bb200\b", 2250.0, 4500.0, 1125.0, 75.0, 180, 8000, 900, 148),
    # ---- NVIDIA Hopper
    DeviceSpec("gh200", "GH200 (Hopper GPU, 96 GB HBM3)", r"\bgh200\b", 989.4, 1978.9, 494.7, 66.9, 96, 4000, 450,
               132),
    DeviceSpec("h200-nvl", "H200 NVL", r"\bh200\b.*\bnvl\b", 835.5, 1670.5, 417.5, 60.0, 141, 4800, 450, 132),
    DeviceSpec("h200", "H200 SXM", r"\bh200\b", 989.4, 1978.9, 494.7, 66.9, 141, 4800, 450, 132),
    DeviceSpec("h100-nvl", "H100 NVL", r"\bh100\b.*\bnvl\b", 835.5, 1670.5, 417.5, 60.0, 94, 3900, 300, 132),
    DeviceSpec("h100-pcie", "H100 PCIe", r"\bh100\b.*\bpcie\b", 756.0, 1513.0, 378.0, 51.2, 80, 2039, 64, 114),
    DeviceSpec("h100-sxm", "H100 SXM", r"\bh100\b", 989.4, 1978.9, 494.7, 66.9, 80, 3350, 450, 132),
    # ---- NVIDIA Ampere
    DeviceSpec("a100-pcie-80gb", "A100 80GB PCIe", r"\ba100\b(.*80gb.*pcie|.*pcie.*80gb)", 312.0, None, 156.0,
               19.5, 80, 1935, 32, 108),
    DeviceSpec("a100-pcie-40gb", "A100 40GB PCIe", r"\ba100\b.*\bpcie\b", 312.0, None, 156.0, 19.5, 40, 1555, 32,
               108),
    DeviceSpec("a100-sxm-80gb", "A100 80GB SXM", r"\ba100\b.*80gb", 312.0, None, 156.0, 19.5, 80, 2039, 300, 108),
    DeviceSpec("a100-sxm-40gb", "A100 40GB SXM", r"\ba100\b", 312.0, None, 156.0, 19.5, 40, 1555, 300, 108),
    DeviceSpec("a10g", "A10G (A10 figures)", r"\ba10g\b", 125.0, None, 62.5, 31.2, 24, 600, 32, 72),
    DeviceSpec("a10", "A10", r"\ba10\b", 125.0, None, 62.5, 31.2, 24, 600, 32, 72),
    # ---- NVIDIA Ada
    DeviceSpec("l40s", "L40S", r"\bl40[- ]?s\b", 362.05, 733.0, 183.0, 91.6, 48, 864, 32, 142),
    DeviceSpec("l40", "L40", r"\bl40\b", 181.05, 362.0, 90.5, 90.5, 48, 864, 32, 142),
    DeviceSpec("l4", "L4", r"\bl4\b", 121.0, 242.5, 60.0, 30.3, 24, 300, 32, 58),
    DeviceSpec("rtx-4090", "GeForce RTX 4090", r"\brtx 4090\b", 165.2, 330.3, 82.6, 82.6, 24, 1008, 32, 128),
    # ---- AMD CDNA 3
    DeviceSpec("mi325x", "Instinct MI325X", r"\bmi325x\b", 1307.4, 2614.9, 653.7, 163.4, 256, 6000, 448, 304),
    DeviceSpec("mi300x", "Instinct MI300X", r"\bmi300x\b", 1307.4, 2614.9, 653.7, 163.4, 192, 5300, 448, 304),
)

DEVICES: dict[str, DeviceSpec] = {spec.key: spec for spec in _TABLE}
_COMPILED = tuple((re.compile(spec.pattern, re.IGNORECASE), spec) for spec in _TABLE)


def match_device(name: str) -> DeviceSpec | None:
    """The table row for a reported device name (``torch.cuda.get_device_name()``), or None if unknown."""
    for regex, spec in _COMPILED:
        if regex.search(name):
            return spec
    return None


def device_spec(key: str) -> DeviceSpec:
    """The row with this ``key`` (``--gpu`` / ``logging.gpu``); also accepts a reported name. ValueError lists keys."""
    spec = DEVICES.get(key.lower()) or match_device(key)
    if spec is None:
        raise ValueError(f"unknown device {key!r}; known: {', '.join(DEVICES)} (or give the peak directly: "
                         "--peak-tflops / logging.peak_tflops)")
    return spec

