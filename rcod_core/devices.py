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


def computes_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bf16 natively: a CUDA GPU that supports it (Ampere and newer), a
    CPU with AVX-512 BF16 or AMX."""
    if device.type == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False))
    if device.type == "cpu":
        return cpu_has_native_bf16()
    return False


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


def memory_format_of(t: torch.Tensor) -> torch.memory_format:
    """``channels_last`` for a 4-D tensor stored in NHWC order (and not also plainly contiguous),
    else the contiguous format: the layout a new tensor should take to match ``t``."""
    nhwc = t.ndim == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()
    return torch.channels_last if nhwc else torch.contiguous_format


#: glibc's ``mallopt`` parameter number of the mmap threshold (malloc.h)
_M_MMAP_THRESHOLD = -3
#: allocations from this size on get their own mapping, returned to the system when freed
CPU_HEAP_MMAP_THRESHOLD = 4 * 2**20


def bound_cpu_heap(threshold: int = CPU_HEAP_MMAP_THRESHOLD) -> bool:
    """Make freed CPU activations go back to the system at once, so the process's memory follows
    what is alive (for a memory budget on CPU: ``--max-memory``). Returns False where it cannot.

    glibc raises its mmap threshold each time a large block is freed (up to 32 MB), after which
    tile-sized activations come from the heap, whose freed middle stays resident: on the tiny model
    at 1024² with a 200 MB plan the peak RSS grew 446 MB by default, 186 MB with the threshold
    fixed at 4 MB by this call (``mallopt(M_MMAP_THRESHOLD)``, which also stops the raising). The
    cost is a page fault per fresh page of those blocks: that run took 5.3 s instead of 4.2 s.
    Smaller blocks still come from the heap; from this call on, tiled stages also hand its free
    pages back after every batch of tiles (:func:`trim_cpu_heap`): on the tiny model at 1024² with
    a 100 MB budget the peak RSS above the start was 79–106 MB without that and 69–82 MB with it
    (six runs each; the live tensors peak at 62–66 MB).
    Process-wide and glibc only (a no-op returning False elsewhere)."""
    global _TRIM
    import ctypes
    import ctypes.util
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        bounded = bool(libc.mallopt(_M_MMAP_THRESHOLD, int(threshold)))
    except (OSError, AttributeError):
        return False
    if bounded and hasattr(libc, "malloc_trim"):
        _TRIM = libc.malloc_trim
    return bounded


#: glibc's ``malloc_trim`` once :func:`bound_cpu_heap` has bounded the heap, else None
_TRIM = None


def trim_cpu_heap() -> None:
    """Return the CPU heap's free pages to the system (``malloc_trim``), where :func:`bound_cpu_heap`
    was called: between tiles, so the holes earlier tiles left do not add up to resident memory."""
    if _TRIM is not None:
        _TRIM(0)
