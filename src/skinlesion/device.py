"""Device choice (``auto`` picks cuda, then mps, then cpu), the mixed precision each device does natively, and how
the CPU's allocator keeps memory between steps."""

from __future__ import annotations

import ctypes
import os

import torch

from skinlesion.errors import SkinLesionError


def resolve_device(name: str | None = "auto") -> torch.device:
    name = name or "auto"
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SkinLesionError("--device cuda asked for, but no CUDA GPU is visible; use --device cpu")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise SkinLesionError("--device mps asked for, but MPS is not available; use --device cpu")
    return torch.device(name)


def amp_dtype(device: torch.device) -> torch.dtype | None:
    """bf16 where the hardware does it natively (fp16 + GradScaler on older GPUs); None = stay fp32."""
    if device.type == "cuda":
        # Native bf16 only (Ampere and later): V100 / T4 "support" it by emulation, slower than fp16 + GradScaler.
        return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
    if device.type == "cpu" and torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return torch.bfloat16
    return None


def autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


# glibc's mallopt parameters (malloc.h) and the defaults a batch job's settings are undone to.
M_TRIM_THRESHOLD, M_MMAP_MAX, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -4, -3, -8
DEFAULT_TRIM_THRESHOLD, DEFAULT_MMAP_MAX = 128 * 1024, 65536


def _glibc() -> ctypes.CDLL | None:
    """This process's C library when it is glibc (mallopt exists and means what malloc.h says), else None."""
    try:
        return ctypes.CDLL(None) if os.confstr("CS_GNU_LIBC_VERSION") else None
    except (ValueError, OSError, AttributeError):  # no confstr name (not glibc), or no dynamic loading
        return None


def retain_freed_memory() -> bool:
    """Make glibc keep freed memory for the next allocation instead of handing it back to the kernel (False where
    it could not be set: not glibc).

    PyTorch's CPU tensors come from malloc; glibc serves the large ones (a training step's activations: tens of MB
    each) with fresh mmap()s and returns them on free, so every step faults in and zeroes its working set again
    (a 2-epoch efficientnet_b0 training at 224 px spent 31 s in the kernel against timm train.py's 17 s).
    With mmap off and no trimming the heap keeps its high-water mark (what CUDA's caching allocator does on a GPU):
    the peak is the same, only never handed back. On that host `evaluate --tta` with PyTorch took 90 s instead of
    162 s at the same peak resident memory (1.69 vs 1.70 GB), and a 2-epoch training 50 s instead of 61 s
    (docs/benchmarks/README.md). Called by the batch jobs on the CPU
    (training, evaluate, the predict command), not by the server, which hands large blocks back on purpose
    (``return_freed_memory``); ONNX Runtime has its own arena and is unaffected."""
    libc = _glibc()
    return libc is not None and bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1))


def return_freed_memory() -> None:
    """The server's policy (glibc only): allocations of 4 MiB or more (decoded uploads, their tensors) get their own
    mmap, so freeing one gives it back to the OS, and at most 2 malloc arenas (inference is serialized anyway).
    glibc's defaults raise that threshold to 32 MiB as large blocks are freed and keep freed memory in an arena per
    threadpool thread: RSS then rose by ~140 MiB over 500 concurrent requests and by ~300-450 MiB per few large or
    hostile uploads. Also undoes ``retain_freed_memory`` where a batch job ran in this process first (the Python
    API, tests)."""
    libc = _glibc()
    if libc is None:
        return
    libc.mallopt(M_MMAP_THRESHOLD, 4 * 1024 * 1024)  # also turns off its dynamic raising
    libc.mallopt(M_ARENA_MAX, 2)
    libc.mallopt(M_MMAP_MAX, DEFAULT_MMAP_MAX)
    libc.mallopt(M_TRIM_THRESHOLD, DEFAULT_TRIM_THRESHOLD)
