"""PyTorch backend: best.pt's network -> raw logits per TTA view of a uint8 batch (``Preprocessing.batch``).

It returns logits before any post-hoc step; the decision chain (decision/chain.py) does the rest. On a GPU
the network runs channels_last, under autocast (bf16 where native, else fp16) if it trained with mixed precision;
on the CPU in fp32, so CPU results match the ONNX export's parity check.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from skinlesion.device import amp_dtype, autocast
from skinlesion.inference.views import views
from skinlesion.model import checkpoint
from skinlesion.model.ensemble import pooled_features


class TorchBackend:
    name = "torch"

    def __init__(self, source: str | Path | checkpoint.Loaded, device: str = "cpu"):
        self.loaded = source if isinstance(source, checkpoint.Loaded) else checkpoint.load(source, device)
        self.device = torch.device(device)
        accelerated = self.device.type == "cuda"
        self.memory_format = torch.channels_last if accelerated else torch.contiguous_format
        self.model = self.loaded.model.to(self.device, memory_format=self.memory_format).eval()
        trained_amp = (self.loaded.meta.get("config") or {}).get("amp", True)
        self.dtype = amp_dtype(self.device) if accelerated and trained_amp else None
        self.meta = self.loaded.meta
        self.classes: list[str] = list(self.meta["classes"])
        self.preprocessing = self.loaded.preprocessing
        self.normalize = self.preprocessing.normalizer(self.device)

    @torch.inference_mode()
    def features(self, batch: torch.Tensor) -> np.ndarray:
        """Pooled features (N, D), float32, of a uint8 batch of centre crops (one view): the out-of-distribution
        detector's input."""
        x = self.normalize(batch).contiguous(memory_format=self.memory_format)
        with autocast(self.device, self.dtype):
            return pooled_features(self.model, x).float().cpu().numpy()

    @torch.inference_mode()
    def view_logits(self, batch: torch.Tensor, n_views: int = 1) -> np.ndarray:
        """Raw logits (n_views, N, C), float32, of a uint8 batch of centre crops under each TTA view."""
        batch = self.normalize(batch)
        outputs = []
        for view in views(batch, n_views):
            with autocast(self.device, self.dtype):
                outputs.append(self.model(view.contiguous(memory_format=self.memory_format)).float().cpu().numpy())
        return np.stack(outputs)
