"""Device and precision names (``auto``, ``cuda``, ``fp16`` …) → torch objects, with clear errors."""

from __future__ import annotations

import torch

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_device(name: str) -> torch.device:
    """``auto`` (CUDA when available, else CPU) or a torch device name."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"--device {name!r}: not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "meta":
        raise ValueError("--device meta: a meta tensor holds no data, nothing can be computed there")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device.type not in ("cpu", "cuda", "mps", "xpu"):
        raise ValueError(f"--device {name}: unsupported device type {device.type!r}")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto`` or one of :data:`DTYPES`.

    ``auto``: bf16 on CUDA where the GPU has it, else fp16; on CPU bf16 where the CPU computes it
    natively (:func:`cpu_has_native_bf16`; ``rcod bench --dtypes fp32,auto`` measured it 2.3-2.8x
    faster than fp32 on a 2-core AVX-512 BF16 EPYC), else fp32; fp32 on other devices."""
    device = torch.device(device)
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if device.type == "cpu" and cpu_has_native_bf16():
            return torch.bfloat16
        return torch.float32
    if name not in DTYPES:
        raise ValueError(f"--dtype must be one of auto, {', '.join(DTYPES)}; got {name!r}")
    return DTYPES[name]


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from ``/proc/cpuinfo`` (empty where that file does not exist)."""
    try:
        with open("/proc/cpuinfo", "r", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware (AVX-512 BF16 or AMX), so bf16 is faster than fp32.

    Without it oneDNN emulates bf16 and fp32 is as fast or faster."""
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


#: CPU precisions in which channels_last was measured faster end to end: ``rcod bench --family sd21_base
#: --device cpu --dtypes fp32,auto --channels-last both --size 512 --threads 2`` on a 2-core AVX-512 BF16
#: EPYC: fp32 30.3 -> 27.9 s, bf16 13.5 -> 12.6 s (oneDNN's NHWC convolutions; fp32 peaks 1 GiB higher).
CPU_CHANNELS_LAST: frozenset = frozenset({torch.float32, torch.bfloat16})


def prefer_channels_last(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the UNet and VAE run faster in channels_last memory on ``device`` in ``dtype``.

    CUDA: yes (NHWC tensor-core kernels). CPU: measured with ``rcod bench --channels-last both``
    (oneDNN's NHWC convolutions); see ``CPU_CHANNELS_LAST``."""
    device = torch.device(device)
    if device.type == "cuda":
        return True
    if device.type == "cpu":
        return dtype in CPU_CHANNELS_LAST
    return False
