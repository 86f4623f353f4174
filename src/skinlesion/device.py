"""Device choice (``auto`` picks cuda, then mps, then cpu), the mixed precision each device does natively, and how
the CPU's allocator keeps memory between steps."""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

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


M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's mallopt parameters (malloc.h)


def retain_freed_memory() -> bool:
    """Make glibc keep freed memory for the next allocation instead of handing it back to the kernel (Linux only;
    False where it could not be set).

    PyTorch's CPU tensors come from malloc; glibc serves the large ones (a training step's activations: tens of MB
    each) with fresh mmap()s and returns them on free, so every step faults in and zeroes its working set again
    (a 2-epoch efficientnet_b0 training at 224 px spent 31 s in the kernel against timm train.py's 17 s).
    With mmap off and no trimming the heap keeps its high-water mark (what CUDA's caching allocator does on a GPU):
    the peak is the same, only never handed back. On that host `evaluate --tta` with PyTorch took 90 s instead of
    162 s at the same peak resident memory (1.69 vs 1.70 GB), and a 2-epoch training 50 s instead of 61 s
    (docs/benchmarks/README.md). Called by the batch jobs on the CPU
    (training, evaluate, the predict command), not by the server, which hands large blocks back on purpose
    (serve/app.py); ONNX Runtime has its own arena and is unaffected."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
    except (OSError, AttributeError):  # not glibc (musl, ...): nothing to tune
        return False
