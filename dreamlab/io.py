"""Atomic file writes and safetensors IO. Nothing here ever unpickles."""
from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import sys
import tempfile
import zlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from dreamlab.errors import DreamlabError

if TYPE_CHECKING:
    import torch
# torch is imported inside the tensor functions: the JSON and atomic-write helpers serve processes that never
# touch a tensor (rollout collector workers with env-only policies start ~1.3 s sooner without it)


def _umask_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write to a temp file in the same folder, fsync, then rename: readers see old or new, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.fchmod(fd, _umask_mode())  # mkstemp makes 0600 files; follow the umask like a plain open() would
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def remove_stale_temps(folder: str | os.PathLike) -> int:
    """Delete what killed atomic writes left in `folder`: `.NAME.*.tmp` files (atomic_write_bytes, save_tensors) and
    `NAME.tmp` folders (a model's save_pretrained). Call it only where no other process is writing; returns how many."""
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    stale = [p for p in folder.iterdir() if p.name.endswith(".tmp")
             and ((p.name.startswith(".") and p.is_file()) or (not p.name.startswith(".") and p.is_dir()))]
    for p in stale:
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    return len(stale)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def save_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def load_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    if not path.exists():
        raise DreamlabError(f"{path} does not exist")
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except json.JSONDecodeError as e:
        raise DreamlabError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}); the file is corrupt or "
                            "truncated") from e
    except UnicodeDecodeError as e:  # a binary file (a pickle, an image) where JSON belongs
        raise DreamlabError(f"{path} is not JSON text (byte {e.start} is not UTF-8); the file is corrupt or another "
                            "kind of file") from e
    except IsADirectoryError as e:
        raise DreamlabError(f"{path} is a folder, not a JSON file") from e


def save_tensors(
    path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> Path:
    """Save a flat dict of tensors as safetensors, atomically. Shared storage is cloned (safetensors refuses it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        from safetensors.torch import save_file

        flat = {k: v.detach().contiguous().cpu().clone() for k, v in tensors.items()}
        save_file(flat, tmp, metadata=metadata)
        os.chmod(tmp, _umask_mode())  # mkstemp made it 0600; follow the umask
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def load_tensors(path: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.exists():
        raise DreamlabError(f"{path} does not exist")
    try:
        return load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError) as e:
        raise DreamlabError(
            f"{path} is not a readable safetensors file ({e}); it is corrupt or truncated: re-save it"
        ) from e


def check_finite_weights(model: Any, path: str | os.PathLike) -> None:
    """Loaded weights must be numbers: NaN anywhere, or inf in a parameter (a buffer may hold -inf, e.g. an attention
    mask), is the trace of a training that diverged, and every output would be NaN (black frames) without an error."""
    bad = next((n for n, p in model.named_parameters() if not p.isfinite().all()), None)
    bad = bad or next((n for n, b in model.named_buffers() if b.is_floating_point() and b.isnan().any()), None)
    if bad is not None:
        raise DreamlabError(f"{path} holds NaN/inf in {bad!r}: the training that saved it diverged; train it again "
                            "(e.g. with a lower lr)")


# ----------------------------------------------------------------------------- the cache of decoded data


def cache_dir() -> Path:
    d = Path(os.environ.get("DREAMLAB_CACHE", Path.home() / ".cache" / "dreamlab"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def cached_array(key: str, build: Callable[[], np.ndarray]) -> np.ndarray:
    """Load `key`.npy from the cache, or build it and write it atomically (no pickle: allow_pickle=False).

    Beside it, `key`.npy.json records the array's shape, dtype and CRC-32: an entry that does not match its record
    (truncated, emptied, another array of the wrong shape or dtype, values changed, e.g. NaN written into it, a
    pickle-bearing object array) is rebuilt with a one-line warning naming the file, never trusted; an entry without
    a record (its write was cut off, or an earlier release wrote it) is rebuilt quietly."""
    path = cache_dir() / f"{key}.npy"
    record = path.with_name(path.name + ".json")
    if path.exists():
        arr, why = _cached(path, record)
        if why is None:
            return arr
        if why:
            print(f"warning: cache file {path} {why}; rebuilding it", file=sys.stderr, flush=True)
        path.unlink(missing_ok=True)
        record.unlink(missing_ok=True)
    arr = build()
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    atomic_write_bytes(path, buf.getvalue())
    save_json(record, _record(arr))
    return arr


def _record(arr: np.ndarray) -> dict[str, Any]:
    flat = np.ascontiguousarray(arr).reshape(-1).view(np.uint8)
    return {"shape": list(arr.shape), "dtype": arr.dtype.str, "crc32": zlib.crc32(flat)}


def _cached(path: Path, record: Path) -> tuple[Any, str | None]:
    """(the array, None) for an entry that matches its record; else (None, why: "" to rebuild quietly)."""
    try:
        arr = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        return None, f"is unreadable ({type(e).__name__}: {e})"
    try:
        want = json.loads(record.read_text())
    except (OSError, ValueError):
        return None, ""
    if not isinstance(arr, np.ndarray) or not isinstance(want, dict):
        return None, "is not an array"
    got = _record(arr)
    for k in ("shape", "dtype", "crc32"):
        if got[k] != want.get(k):
            return None, f"does not match its record ({k} {got[k]}, recorded {want.get(k)})"
    return arr, None



def replace_dir(tmp_dir: Path, final_dir: Path) -> None:
    """Swap a fully written temp folder into place; the old one is removed only after the swap."""
    old = final_dir.with_name(final_dir.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if final_dir.exists():
        os.replace(final_dir, old)
    os.replace(tmp_dir, final_dir)
    if old.exists():
        shutil.rmtree(old)


def _json_default(o: Any) -> Any:
    if isinstance(o, Path):
        return str(o)
    torch = sys.modules.get("torch")  # a tensor can only exist if torch was imported
    if torch is not None and isinstance(o, torch.Tensor):
        return o.tolist()
    if hasattr(o, "item"):
        return o.item()
    if hasattr(o, "tolist"):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
