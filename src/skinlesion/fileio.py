"""Atomic file writes (temp name + rename) so a crash never leaves a torn file, plus hashing.

Files are created through ``mkstemp`` (mode 0600) and then given the mode a plain ``open()`` would give
(``0o666 & ~umask``) before the rename. Torch files are written as tensors and plain data only (``plain``), so
they load with ``torch.load(..., weights_only=True)``; ``torch_load`` reads them that way and nothing else.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import stat
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


DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def size_text(n: float) -> str:
    """Bytes for a message: 812 bytes, 3.4 KiB, 15.5 MiB, 2.1 GiB."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:,.1f} {unit}"
    return f"{int(n)} bytes"


def free_bytes(folder: str | Path) -> int | None:
    """Free bytes on the file system of ``folder`` (its nearest existing ancestor), or None if unknown."""
    folder = Path(folder)
    for candidate in (folder, *folder.parents):
        try:
            return shutil.disk_usage(candidate).free
        except OSError:
            continue
    return None


def disk_full_error(path: str | Path, needed: int | None, written: int = 0) -> SkinLesionError:
    """One line for a write that ran out of space: the file, what it needs (``needed``; when not known, more than
    the ``written`` bytes it got), what is free, what to do."""
    free = free_bytes(Path(path).parent)
    need = f"about {size_text(needed)}" if needed else f"more than {size_text(written)}" if written else ""
    have = [f"{size_text(free)} free"] if free is not None else []
    told = "; ".join(have + ([f"this file alone needs {need}"] if need else []))
    return SkinLesionError(f"no space left on the disk of {path}" + (f" ({told})" if told else "") + "; free some "
                           "space or write to another folder, then run the command again (nothing was left "
                           "half-written)")  # fmt: skip


def os_error(e: OSError, path: str | Path, needed: int | None = None, written: int = 0) -> SkinLesionError:
    """An OSError of writing ``path`` as one line that says what to do."""
    if e.errno in DISK_FULL:
        return disk_full_error(path, needed, written)
    where = f" ({e.filename})" if e.filename and str(e.filename) != str(path) else ""
    if isinstance(e, PermissionError) or e.errno == errno.EROFS:
        return SkinLesionError(f"cannot write {path}: {e.strerror}{where}; pass a path in a folder you can write to")
    if isinstance(e, IsADirectoryError):
        return SkinLesionError(f"cannot write {path}: it is a folder; pass a file path")
    return SkinLesionError(f"cannot write {path} ({e.strerror or e}{where}); check the path and its folder")


def _label(what: str, path: str | Path) -> str:
    return f"{what} {path}" if what else str(path)


def output_parent(path: str | Path, what: str = "") -> None:
    """Refuse, before any work, a path whose folder cannot be made: an ancestor that is a file or a link loop."""
    for ancestor in Path(path).parents:
        try:
            st = os.stat(ancestor)
        except FileNotFoundError:
            continue
        except OSError as e:
            raise SkinLesionError(f"cannot write {_label(what, path)}: its folder {ancestor} cannot be used "
                                  f"({e.strerror}); pass another path") from e  # fmt: skip
        if not stat.S_ISDIR(st.st_mode):
            raise SkinLesionError(f"cannot write {_label(what, path)}: {ancestor} is a file, not a folder; pass "
                                  "another path")  # fmt: skip
        return


def output_file(path: str | Path, what: str = "") -> None:
    """A file to write: not an existing folder, its folder creatable."""
    if os.path.isdir(path):
        raise SkinLesionError(f"cannot write {_label(what, path)}: it is a folder; pass a file path")
    output_parent(path, what)


def output_folder(path: str | Path, what: str = "") -> None:
    """A folder to write into: not an existing file, creatable."""
    if os.path.lexists(path) and not os.path.isdir(path):
        raise SkinLesionError(f"cannot write into {_label(what, path)}: it is a file, not a folder; pass a folder "
                              "path")  # fmt: skip
    output_parent(Path(path) / "x", what)


def input_path(path: str | Path, what: str, folder: bool | None) -> None:
    """A file (``folder`` False), folder (True) or either (None) to read: if it exists, it is of that kind and
    readable (a link loop or a folder without read permission is one line here, not a traceback deep inside).
    A missing one is left to the caller, which knows what to suggest."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return
    except OSError as e:  # ELOOP, EACCES on a parent, ENAMETOOLONG ...
        wanted = "file or folder" if folder is None else _kind(folder)
        raise SkinLesionError(f"{what} {path} cannot be used ({e.strerror}); pass a real {wanted}") from e
    is_folder = stat.S_ISDIR(st.st_mode)
    if folder is not None and folder != is_folder:
        raise SkinLesionError(f"{what} {path} is a {_kind(is_folder)}; pass a {_kind(folder)}")
    try:
        if is_folder:
            with os.scandir(path) as entries:
                next(entries, None)
        elif stat.S_ISREG(st.st_mode):  # opened, not read: a pipe given as a file keeps its bytes
            open(path, "rb").close()  # noqa: SIM115 - only whether it opens
    except OSError as e:
        raise SkinLesionError(f"{what} {path} cannot be read ({e.strerror}); check its permissions") from e


def _kind(folder: bool) -> str:
    return "folder" if folder else "file"


def atomic_write(path: str | Path, write: Callable[[Path], None], needed: int | Callable[[], int] | None = None
                 ) -> Path:  # fmt: skip
    """Call ``write(tmp_path)`` then rename tmp over ``path`` (same folder, so rename is atomic).

    Failures are one line (SkinLesionError): ``path`` a folder, its folder not creatable or writable, the disk
    full (naming the free space and ``needed``, the bytes the file takes, or a callable that estimates them); the
    temp file is removed whatever happened, and a file already at ``path`` is left as it was."""
    path = Path(path)
    output_file(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise os_error(e, path) from e
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        write(tmp_path)
        os.chmod(tmp_path, 0o666 & ~current_umask())
        os.replace(tmp_path, path)
    except OSError as e:
        partial = tmp_path.stat().st_size if tmp_path.exists() else 0
        tmp_path.unlink(missing_ok=True)  # first: the free space reported is what the write had
        size = needed() if callable(needed) else needed
        raise os_error(e, path, size, partial) from e
    finally:
        tmp_path.unlink(missing_ok=True)
    return path


MAX_SETTINGS_BYTES = 1 << 20  # a run folder's config.json or a --config file is a page of values, never megabytes


def read_json(path: str | Path, hint: str, max_bytes: int = MAX_SETTINGS_BYTES) -> dict[str, Any]:
    """A small JSON object file (a run folder's config.json), read with a size limit: a missing, huge, truncated
    or non-object file is one line ending in ``hint`` (what to do), before a byte more than the limit is read."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise SkinLesionError(f"{path} is {size:,} bytes, over the {max_bytes:,} a settings file can be; {hint}")
        with open(path, "rb") as f:
            data = f.read(max_bytes + 1)  # the file may grow after the stat
        if len(data) > max_bytes:
            raise SkinLesionError(f"{path} is over the {max_bytes:,} bytes a settings file can be; {hint}")
        value = json.loads(data.decode("utf-8"))
    except FileNotFoundError as e:
        raise SkinLesionError(f"{path} not found; {hint}") from e
    except OSError as e:
        raise SkinLesionError(f"cannot read {path} ({e.strerror or e}); {hint}") from e
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise SkinLesionError(f"{path} is not valid JSON ({first_line(e)}); {hint}") from e
    if not isinstance(value, dict):
        raise SkinLesionError(f"{path} holds a JSON {type(value).__name__}, not an object of settings; {hint}")
    return value


def remove_stale_temps(folder: str | Path, grace_s: float = 30.0, nobody_writes: bool = False) -> list[Path]:
    """Delete temp files ``atomic_write`` left in ``folder`` when a process died mid-write (``.best.pt.*.tmp``).

    Only files matching the temp pattern and last modified ``grace_s`` seconds before this process started
    are removed, so a temp file that this process or another live one is writing right now is kept; with
    ``nobody_writes`` (the caller holds the folder's lock, so no live writer exists) every one of them."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    cutoff = time.time() + 1 if nobody_writes else _PROCESS_START - grace_s
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
    data = text.encode("utf-8")
    return atomic_write(path, lambda p: p.write_bytes(data), len(data))


def write_bytes(path: str | Path, data: bytes) -> Path:
    return atomic_write(path, lambda p: p.write_bytes(data), len(data))


def write_json(path: str | Path, obj: Any) -> Path:
    return write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def write_csv(path: str | Path, frame: Any) -> Path:
    """Write a pandas DataFrame atomically (no index)."""
    return write_text(path, frame.to_csv(index=False))  # in memory first: its size is known if the disk is full


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

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a Python file: a full disk is OSError(ENOSPC), not an opaque RuntimeError
            try:
                torch.save(data, f)
            except RuntimeError as e:  # torch's zip writer fails again while closing: the OSError is the cause
                if isinstance(e.__context__, OSError):
                    raise e.__context__ from None
                raise

    return atomic_write(path, write, lambda: tensor_bytes(data) + (1 << 16))


def tensor_bytes(obj: Any) -> int:
    """Bytes of the tensors in plain data (what a checkpoint file mostly is)."""
    import torch

    if isinstance(obj, torch.Tensor):
        return obj.untyped_storage().nbytes()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, list | tuple):
        return sum(tensor_bytes(v) for v in obj)
    return 0


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
