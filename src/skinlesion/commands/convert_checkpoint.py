"""``skinlesion convert-checkpoint``: rewrite an old checkpoint (NumPy values pickled inside) as tensors and plain
data, so it loads with ``weights_only=True``. Reading the old file unpickles it, which can run code: only behind
``--i-trust-this-file``."""

from __future__ import annotations

import argparse
from pathlib import Path

from skinlesion.errors import SkinLesionError
from skinlesion.model import checkpoint


def main(args: argparse.Namespace) -> None:
    path = Path(args.path)
    if path.is_dir():  # a run folder: its best.pt and last.pt
        files = [path / name for name in ("best.pt", "last.pt") if (path / name).is_file()]
        if not files:
            raise SkinLesionError(f"no best.pt or last.pt in {path}; pass a checkpoint file or a run folder")
    else:
        files = [path]
    for file in files:
        done, what = checkpoint.convert(file, trust=args.trust)
        print(f"{done}: {what}")
