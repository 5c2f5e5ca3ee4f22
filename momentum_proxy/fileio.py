"""Files: atomic writes (a temporary file in the same folder, renamed over the target), JSON, hashing."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from momentum_proxy.errors import UserError


def _file_mode() -> int:
    """The mode a plain `open(..., "w")` would give a new file: 0o666 less the process umask."""
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is renamed onto `path`, on error removed.

    The file gets the user's normal permissions (umask), not mkstemp's private 0600.
    """
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path} is a folder; a file is expected there")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except FileExistsError:
        raise UserError(f"cannot write {path}: a file stands where a folder is expected") from None
    except NotADirectoryError:
        raise UserError(f"cannot write {path}: a file stands where a folder is expected") from None
    except PermissionError:
        raise UserError(f"cannot write {path}: permission denied") from None
    os.fchmod(fd, _file_mode())
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def check_writable_folder(path: Path, what: str) -> None:
    """UserError unless `path` is (or can become) a folder we can write: probed with a real temporary file in
    its nearest existing ancestor, which is the only reliable test (root ignores permission bits)."""
    for parent in [path, *Path(path).absolute().parents]:
        if parent.exists():
            if not parent.is_dir():
                raise UserError(f"{parent} is a file; {what} {path} must be a folder")
            try:
                fd, probe = tempfile.mkstemp(dir=parent, prefix=".mproxy-probe-")
            except OSError as e:
                raise UserError(f"cannot write {what} {path}: {parent}: {e.strerror}") from None
            os.close(fd)
            os.unlink(probe)
            return


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text())


def file_sha256(path: str | os.PathLike) -> str:
    """The sha256 hex digest of a file, read in 16 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            digest.update(block)
    return digest.hexdigest()


def check_unlocked(folder: str | os.PathLike, name: str, what: str) -> None:
    """`folder_lock`'s refusal without holding anything: a command that has seconds of imports and loading ahead
    says at once that another process holds `folder/name` (its own `folder_lock` still decides)."""
    try:
        f = open(Path(folder) / name)
    except OSError:  # no lock file: nobody has held it (an unreadable one is folder_lock's to report)
        return
    with f:  # closing it drops the shared lock taken to look
        _lock_or_refuse(f, fcntl.LOCK_SH, Path(folder), what)


def _lock_or_refuse(f, mode: int, folder: Path, what: str) -> None:
    try:
        fcntl.flock(f, mode | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        raise UserError(f"{folder} is {what} by {holder}; stop it first") from None


@contextmanager
def folder_lock(folder: str | os.PathLike, name: str, what: str, job: str) -> Iterator[None]:
    """Hold `folder/name` locked (flock) for the block, on behalf of `job` (e.g. "mproxy serve"): a second
    holder is refused with a one-line UserError saying that `folder` is `what` by which pid and job. The kernel
    drops the lock when its process dies, so a killed process never leaves it stuck."""
    folder = Path(folder)
    with open(folder / name, "a+") as f:
        _lock_or_refuse(f, fcntl.LOCK_EX, folder, what)
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} ({job})")
        f.flush()
        try:
            yield
        finally:
            f.seek(0)
            f.truncate()
