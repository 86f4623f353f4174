"""How a command scores images: one ``ScoringOptions`` per command instead of loose arguments."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ScoringOptions:
    batch_size: int = 64  # images per forward pass
    device: str = "cpu"  # where the network runs ("auto" is resolved by the command)
    workers: int = 0  # data loader worker processes
    cache: bool = True  # read the preprocessing's image cache (built when missing) instead of decoding files
    cache_dir: str | None = None  # where that cache lives (None: the run's own, else the user cache folder)
    tta: bool = False  # also score the run's test-time-augmentation views

    @classmethod
    def from_args(cls, args: argparse.Namespace, **overrides: Any) -> ScoringOptions:
        """The options a command's parsed arguments give (flags it does not have keep their defaults)."""
        from skinlesion.device import resolve_device

        values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if getattr(args, f.name, None)
                  is not None}  # fmt: skip
        if "device" in values:
            values["device"] = str(resolve_device(values["device"]))
        return cls(**{**values, **overrides})

    def replace(self, **changes: Any) -> ScoringOptions:
        return dataclasses.replace(self, **changes)
