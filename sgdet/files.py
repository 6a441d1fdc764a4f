"""Output files, written whole or not at all: every file the suite writes (checkpoints, configs,
tables, JSON, plots) goes to a temporary file beside its target and is renamed into place, so a
crash or kill never leaves half a file. Permissions follow the umask, as a plain ``open`` would."""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from typing import IO, Any, Iterator

TMP_PREFIX = ".tmp-"     # what a killed writer may leave behind (see remove_stale_temporaries)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w") -> Iterator[IO]:
    """``with atomic_open(path) as handle:`` writes ``path`` atomically (``mode`` "w" or "wb");
    on an exception the temporary file is removed and ``path`` is left as it was."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, suffix="-" + os.path.basename(path), dir=folder)
    try:
        os.chmod(tmp, 0o666 & ~_umask())          # mkstemp makes 0600 files
        with os.fdopen(fd, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[str]:
    """``with atomic_path(path, ".onnx") as tmp:`` for writers that want a file name (ONNX,
    TorchScript): ``tmp`` is renamed to ``path`` when the block ends cleanly, removed otherwise."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, suffix=suffix, dir=folder)
    os.close(fd)
    try:
        os.chmod(tmp, 0o666 & ~_umask())
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_text(path: str | os.PathLike, text: str) -> str:
    with atomic_open(path) as handle:
        handle.write(text)
    return os.fspath(path)


def write_json(path: str | os.PathLike, data: Any, indent: int | None = 1) -> str:
    """``data`` as JSON (non-JSON values such as paths or numpy scalars written as strings)."""
    return write_text(path, json.dumps(data, indent=indent, default=str) + "\n")


def torch_save(obj: Any, path: str | os.PathLike) -> str:
    import torch
    with atomic_open(path, "wb") as handle:
        torch.save(obj, handle)
    return os.fspath(path)


def copy_stream(source: IO, path: str | os.PathLike) -> str:
    """Copy a readable binary stream into ``path``."""
    import shutil
    with atomic_open(path, "wb") as handle:
        shutil.copyfileobj(source, handle)
    return os.fspath(path)


def remove_stale_temporaries(folder: str) -> int:
    """Delete the temporary files a killed writer left in ``folder``; returns how many."""
    removed = 0
    if os.path.isdir(folder):
        for name in os.listdir(folder):
            if name.startswith(TMP_PREFIX):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(folder, name))
                    removed += 1
    return removed
