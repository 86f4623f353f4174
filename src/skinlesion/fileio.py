"""Atomic file writes (temp name + rename) so a crash never leaves a torn file, plus hashing.

Files are created through ``mkstemp`` (mode 0600) and then given the mode a plain ``open()`` would give
(``0o666 & ~umask``) before the rename. Torch files are written as tensors and plain data only (``plain``), so
they load with ``torch.load(..., weights_only=True)``; ``torch_load`` reads them that way and nothing else.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from skinlesion.errors import SkinLesionError

_PROCESS_START = time.time()
# The temp names atomic_write makes: ".<target name>.<mkstemp's 8 random characters>.tmp".
TEMP_NAME = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp$")


def _read_umask_once() -> int:
    old = os.umask(0)
    os.umask(old)
    return old


_UMASK_AT_IMPORT = _read_umask_once()


def current_umask() -> int:
    """The process umask, read without changing it (Linux: /proc/self/status); else the value at import."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return _UMASK_AT_IMPORT


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_path)`` then rename tmp over ``path`` (same folder, so rename is atomic)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        write(tmp_path)
        os.chmod(tmp_path, 0o666 & ~current_umask())
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)
    return path


def remove_stale_temps(folder: str | Path, grace_s: float = 30.0) -> list[Path]:
    """Delete temp files ``atomic_write`` left in ``folder`` when a process died mid-write (``.best.pt.*.tmp``).

    Only files matching the temp pattern and last modified ``grace_s`` seconds before this process started
    are removed, so a temp file that this process or another live one is writing right now is kept."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    cutoff = _PROCESS_START - grace_s
    removed = []
    for entry in folder.iterdir():
        if not TEMP_NAME.match(entry.name):
            continue
        try:
            if entry.is_file() and not entry.is_symlink() and entry.stat().st_mtime < cutoff:
                entry.unlink()
                removed.append(entry)
        except OSError:  # gone already, or not ours to delete: leave it
            continue
    return removed


def write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))


def write_bytes(path: str | Path, data: bytes) -> Path:
    return atomic_write(path, lambda p: p.write_bytes(data))


def write_json(path: str | Path, obj: Any) -> Path:
    return write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def write_csv(path: str | Path, frame: Any) -> Path:
    """Write a pandas DataFrame atomically (no index)."""
    return atomic_write(path, lambda p: frame.to_csv(p, index=False))


def plain(obj: Any, where: str = "") -> Any:
    """``obj`` as tensors and plain data only (dict, list, tuple, str, int, float, bool, None, torch dtypes).

    NumPy scalars become Python numbers, NumPy arrays lists, Paths and str subclasses (torch's version string)
    str, sets sorted lists, OrderedDicts and other mappings dicts; anything else raises TypeError naming where.
    """
    import numpy as np
    import torch

    if obj is None or type(obj) in (bool, int, float, str):
        return obj
    if isinstance(obj, torch.Tensor):
        return obj.detach() if type(obj) is not torch.Tensor else obj
    if isinstance(obj, np.generic):
        return plain(obj.item(), where)
    if isinstance(obj, np.ndarray):
        return plain(obj.tolist(), where)
    if isinstance(obj, bool):
        return bool(obj)
    if isinstance(obj, int):  # IntEnum and other int subclasses
        return int(obj)
    if isinstance(obj, float):
        return float(obj)
    if isinstance(obj, (str, Path)):
        return str(obj)
    if isinstance(obj, torch.dtype):
        return obj
    if isinstance(obj, torch.device):
        return str(obj)
    if isinstance(obj, dict):
        return {plain(k, where): plain(v, f"{where}.{k}" if where else str(k)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [plain(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, tuple):  # namedtuples and torch.Size too
        return tuple(plain(v, f"{where}[{i}]") for i, v in enumerate(obj))
    if isinstance(obj, (set, frozenset)):
        return sorted((plain(v, where) for v in obj), key=repr)
    raise TypeError(f"{where or 'value'} is a {type(obj).__module__}.{type(obj).__qualname__}, not plain data")


def torch_save(path: str | Path, obj: Any) -> Path:
    """Atomically ``torch.save`` ``plain(obj)``: the file loads with ``weights_only=True``."""
    import torch

    data = plain(obj)
    return atomic_write(path, lambda p: torch.save(data, p))


# Globals an old skinlesion checkpoint (before files were plain data) may reference: NumPy values and torch's
# version string. A file that needs anything else was never written by skinlesion.
_OLD_CHECKPOINT_GLOBALS = re.compile(
    r"^(numpy\.(_core|core)\.multiarray\.(_reconstruct|scalar)|numpy\.(ndarray|dtype)|numpy\.dtypes\.\w+DType"
    r"|torch\.torch_version\.TorchVersion|collections\.OrderedDict)$"
)


def is_old_checkpoint_global(name: str) -> bool:
    """Whether ``name`` (``module.qualname``) is one an old skinlesion checkpoint's pickle may import."""
    return bool(_OLD_CHECKPOINT_GLOBALS.match(name))


def unsafe_globals(path: str | Path) -> list[str] | None:
    """The Python objects ``path``'s pickle would import beyond what ``weights_only`` allows, read without
    unpickling; None if they cannot be listed."""
    import torch

    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # noqa: BLE001 - legacy (non-zip) or damaged file: we only wanted a better message
        return None


def torch_load(path: str | Path, what: str = "checkpoint") -> Any:
    """``torch.load(path, map_location="cpu", weights_only=True)``: tensors and plain data, never code.

    A file whose pickle needs more than that is refused with one line (``SkinLesionError``); an old skinlesion
    file (NumPy values) gets the command that converts it, anything else a warning not to load it."""
    import pickle

    import torch

    path = Path(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights only" not in str(e).lower() and "weights_only" not in str(e).lower():
            raise SkinLesionError(f"could not read {what} {path} ({first_line(e)}); the file is damaged") from e
        names = unsafe_globals(path)
        if names is None:  # not a zip-format torch file: skinlesion (torch >= 2) never wrote one
            raise SkinLesionError(
                f"could not read {what} {path} (not a zip-format PyTorch file); the file is damaged or not a "
                f"PyTorch {what}"
            ) from None
        refused = f"{path} is not a plain-data {what} and cannot be loaded safely"
        hostile = [n for n in names if not is_old_checkpoint_global(n)]
        if hostile:
            raise SkinLesionError(
                f"{refused}: its pickle would import {', '.join(hostile[:3])}, which no skinlesion file does; "
                "do not load it, use a file you made yourself"
            ) from None
        needs = f" (it holds {', '.join(names[:3])})" if names else ""
        raise SkinLesionError(
            f"{refused}{needs}; if it is an old skinlesion {what} you trust, convert it once with: "
            f"skinlesion convert-checkpoint {path} --i-trust-this-file"
        ) from None
    except Exception as e:  # noqa: BLE001 - truncated zip, not a torch file, ...
        raise SkinLesionError(
            f"could not read {what} {path} ({type(e).__name__}: {first_line(e)}); the file is damaged or not a "
            "PyTorch file"
        ) from e


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _json_default(o: Any) -> Any:
    if hasattr(o, "item"):  # numpy / torch scalars
        return o.item()
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
