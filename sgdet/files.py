"""Output files, written whole or not at all: every file the suite writes (checkpoints, configs,
tables, JSON, plots) goes to a temporary file beside its target and is renamed into place, so a
crash or kill never leaves half a file. Permissions follow the umask, as a plain ``open`` would."""
from __future__ import annotations

import contextlib
import errno
import json
import os
import tempfile
from typing import IO, Any, Iterator

TMP_PREFIX = ".tmp-"     # what a killed writer may leave behind (see remove_stale_temporaries)


def _umask() -> int:
    """The process's umask, read without changing it where Linux says it (setting it to read it
    would race with threads creating files meanwhile)."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _folder_for(path: str) -> str:
    """The folder ``path`` goes into, created if missing; a file in the way is named."""
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        blocker = folder
        while blocker and not os.path.exists(blocker):
            blocker = os.path.dirname(blocker)
        raise NotADirectoryError(errno.ENOTDIR, f"{blocker} is a file, not a folder", path) from None
    return folder


@contextlib.contextmanager
def _user_path_in_errors(path: str, tmp: str) -> Iterator[None]:
    """An OSError about the temporary file names ``path``, the user's file, instead."""
    try:
        yield
    except OSError as exc:
        if exc.filename != tmp:
            raise
        raise OSError(exc.errno, exc.strerror, path) from None


def _mkstemp(path: str, suffix: str) -> tuple[int, str]:
    folder = _folder_for(path)
    try:
        return tempfile.mkstemp(prefix=TMP_PREFIX, suffix=suffix, dir=folder)
    except OSError as exc:             # mkstemp names its temporary file; the user wants theirs
        raise OSError(exc.errno, exc.strerror, path) from None


def check_writable(path: str | os.PathLike, what: str = "") -> str:
    """Fail now, naming ``path``, if a file could not be written there later (the folder is a
    file, not writable, on a read-only disk): for a command to check its ``--out`` before the
    expensive work. Leaves nothing behind (a missing folder is not created). Returns ``path``."""
    from .errors import ConfigError
    path = os.fspath(path)
    label = f"{what} {path}" if what else path
    if os.path.isdir(path):
        raise ConfigError(f"cannot write {label}: it is a directory; give a file name")
    folder = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(folder):  # the nearest existing folder must take the new ones
        folder = os.path.dirname(folder)
    if not os.path.isdir(folder):
        raise ConfigError(f"cannot write {label}: {folder} is a file, not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=TMP_PREFIX, suffix="-probe", dir=folder)
    except OSError as exc:
        raise ConfigError(f"cannot write {label}: {exc.strerror or exc}") from None
    os.close(fd)
    os.unlink(probe)
    return path


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w") -> Iterator[IO]:
    """``with atomic_open(path) as handle:`` writes ``path`` atomically (``mode`` "w" or "wb");
    on an exception the temporary file is removed and ``path`` is left as it was."""
    path = os.fspath(path)
    fd, tmp = _mkstemp(path, "-" + os.path.basename(path))
    try:
        with _user_path_in_errors(path, tmp):
            os.chmod(tmp, 0o666 & ~_umask())      # mkstemp makes 0600 files
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
    fd, tmp = _mkstemp(path, suffix)
    os.close(fd)
    try:
        with _user_path_in_errors(path, tmp):
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


class Rollback:
    """``folder`` as it was before a run wrote its first files there, so that a run failing before
    it produced anything (a bad dataset, bad weights) leaves no debris: ``undo()`` removes the
    ``names`` the run created, gives those it replaced their old bytes back (cuts a large one,
    a log, back to its old size) and removes the folders it created, if empty. A run that wrote
    anything else is left as it is: its files and its log are the record of what it did."""

    KEEP_BYTES = 1 << 20

    def __init__(self, folder: str | os.PathLike, names: tuple[str, ...] = ("config.yaml", "log.txt")):
        self.folder = os.path.abspath(os.fspath(folder))
        self.names = tuple(names)
        self.top_created = None            # the highest folder this run will have created
        probe = self.folder
        while not os.path.exists(probe) and os.path.dirname(probe) != probe:
            self.top_created, probe = probe, os.path.dirname(probe)
        self.before = set(os.listdir(self.folder)) if os.path.isdir(self.folder) else set()
        self.saved: dict[str, tuple[int, bytes | None]] = {}
        for name in self.names:
            path = os.path.join(self.folder, name)
            if os.path.isfile(path):
                size = os.path.getsize(path)
                with open(path, "rb") as handle:
                    self.saved[name] = (size, handle.read() if size <= self.KEEP_BYTES else None)

    def undo(self) -> bool:
        """Undo the run's writes; False (nothing touched) when it wrote anything else."""
        if not os.path.isdir(self.folder):
            return False
        new = set(os.listdir(self.folder)) - self.before
        if any(name not in self.names and not name.startswith(TMP_PREFIX) for name in new):
            return False
        for name in self.names:
            path = os.path.join(self.folder, name)
            if name not in self.saved:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
                continue
            size, data = self.saved[name]
            if data is not None:
                current = None
                if os.path.isfile(path):
                    with open(path, "rb") as handle:
                        current = handle.read()
                if current != data:
                    with atomic_open(path, "wb") as out:
                        out.write(data)
            elif os.path.isfile(path) and os.path.getsize(path) > size:
                os.truncate(path, size)
        if self.top_created is not None:
            folder = self.folder
            while True:
                try:
                    os.rmdir(folder)
                except OSError:            # not empty: somebody else's files are there
                    break
                if folder == self.top_created:
                    break
                folder = os.path.dirname(folder)
        return True
