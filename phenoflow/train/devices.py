"""Dense bf16 tensor-core peaks per accelerator, for MFU (model FLOP utilisation) in the run log.

MFU = achieved training FLOP/s per device / the device's dense (no sparsity) bf16 peak. The peak is looked up
from `torch.cuda.get_device_name()` (first matching pattern, most specific first); train.peak_tflops overrides
it (a device not in the table, a clock-capped part, or another precision). On the CPU or an unknown device
MFU is omitted from the log rather than reported against a wrong peak.

Figures are the vendors' datasheet values (TFLOP/s, dense, bf16 inputs with fp32 accumulation).
"""
from __future__ import annotations

import torch

# (substring of the lower-cased device name, label, dense bf16 TFLOP/s). Order matters: first match wins.
PEAK_TABLE: list[tuple[str, str, float]] = [
    ("gb200", "GB200", 2500.0),
    ("b200", "B200", 2250.0),
    ("gh200", "GH200", 989.4),
    ("h200", "H200", 989.4),
    ("h100 nvl", "H100 NVL", 835.0),
    ("h100 pcie", "H100 PCIe", 756.5),
    ("h100", "H100 SXM", 989.4),  # "NVIDIA H100 80GB HBM3" is the SXM part
    ("h800", "H800 SXM", 989.4),
    ("a100", "A100", 312.0),
    ("a800", "A800", 312.0),
    ("l40s", "L40S", 362.05),
    ("l40", "L40", 181.05),
    ("l4", "L4", 121.0),
    ("a10g", "A10G", 70.0),
    ("a10", "A10", 125.0),
    ("rtx 4090", "RTX 4090", 165.2),
    ("rtx 6000 ada", "RTX 6000 Ada", 364.2),
    ("mi300x", "MI300X", 1307.4),
    ("mi250x", "MI250X", 383.0),
]


def lookup_peak(name: str) -> tuple[str, float] | None:
    """(label, peak FLOP/s) for a device name from the table, or None if it is not listed."""
    low = name.lower()
    for pattern, label, tflops in PEAK_TABLE:
        if pattern in low:
            return label, tflops * 1e12
    return None


def device_peak(device: torch.device, override_tflops: float = 0.0) -> tuple[str, float | None]:
    """(device description, peak FLOP/s or None). The override (train.peak_tflops) wins; CPU: None."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = device.type
    if override_tflops > 0:
        return name, override_tflops * 1e12
    if device.type != "cuda":
        return name, None
    hit = lookup_peak(name)
    return name, hit[1] if hit else None
