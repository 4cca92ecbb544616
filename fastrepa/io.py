"""Atomic file writes: the one way fastrepa publishes a file.

A file is written to a temporary name in its own folder (`<name>.tmp-<pid>-<token>`, created
exclusively, so writers of the same file never share or remove each other's temporaries), flushed and
fsynced, renamed over the target with os.replace, and the folder is fsynced so the rename survives a
crash. Readers therefore see the old file or the new one, never a part; on an error the temporary is
removed and the target is left as it was. Listings skip names containing TEMP_MARK.

Standard library only, so bench/gpu_check.py can use it before the package is installed.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import secrets

TEMP_MARK = ".tmp-"


def fsync_dir(path) -> None:
    """fsync a folder so renames inside it are durable (a no-op where the OS cannot open folders)."""
    try:
        fd = os.open(os.fspath(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def temp_name(path) -> str:
    path = os.fspath(path)
    return f"{path}{TEMP_MARK}{os.getpid()}-{secrets.token_hex(6)}"


def _fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path, makedirs: bool = True, _synced: bool = False):
    """Yield a temporary path beside `path` for a writer that takes a file name (torch.save,
    safetensors, tarfile); when the block ends without an error the file is fsynced and published at
    `path`. The writer must not change the name (np.savez appends .npz: give it a file object)."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    if makedirs:
        os.makedirs(folder, exist_ok=True)
    tmp = temp_name(path)
    try:
        yield tmp
        if not os.path.exists(tmp):
            raise FileNotFoundError(f"{path}: the writer did not create its temporary file {tmp}")
        if not _synced:  # atomic_open fsyncs through its own file object
            _fsync_file(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    fsync_dir(folder)


@contextlib.contextmanager
def atomic_open(path, mode: str = "w", encoding: str | None = "utf-8", makedirs: bool = True):
    """open() for writing ("w" text or "wb" binary) that publishes `path` atomically on success."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open({path!r}): mode must be 'w' or 'wb', got {mode!r}")
    with atomic_path(path, makedirs=makedirs, _synced=True) as tmp:
        xmode = "x" if mode == "w" else "xb"
        with open(tmp, xmode, encoding=encoding if mode == "w" else None) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())


def write_text(path, text: str) -> None:
    with atomic_open(path, "w") as f:
        f.write(text)


def write_json(path, obj, indent: int = 1, sort_keys: bool = False) -> None:
    """obj as JSON (one trailing newline), published atomically."""
    write_text(path, json.dumps(obj, indent=indent, sort_keys=sort_keys) + "\n")


def json_safe(obj):
    """obj with every NaN/Inf float replaced by its string ("nan", "inf"), which strict JSON cannot hold
    (a benchmark row whose kernel returned NaN, say); dicts, lists and tuples are walked."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj
