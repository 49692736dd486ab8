"""File-system helpers shared by the caches and writers: permissions and inter-process locks.

Caches under ``paths.cache_dir`` may be shared by several users (a group cache on a cluster) and
filled by several processes at once (two runs started together, the jobs of a SLURM array). So a
published file gets the permissions the user's umask gives an ordinary new file (``tempfile``
would leave 0600 / 0700), and whoever fills a cache entry holds an exclusive lock on it while the
others wait and then reuse the entry.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from basis_sharing.errors import UserError

log = logging.getLogger(__name__)


def _umask() -> int:
    # os.umask can only be read by setting it; set it straight back.
    mask = os.umask(0)
    os.umask(mask)
    return mask


def new_file_mode() -> int:
    """Permissions of a newly created file under the current umask (0644 for umask 022)."""
    return 0o666 & ~_umask()


def new_dir_mode() -> int:
    """Permissions of a newly created directory under the current umask (0755 for umask 022)."""
    return 0o777 & ~_umask()


def publish_modes(path: Path) -> None:
    """Give ``path`` (a file, or a directory and everything in it) the umask's usual modes."""
    if path.is_dir():
        os.chmod(path, new_dir_mode())
        for child in path.rglob("*"):
            os.chmod(child, new_dir_mode() if child.is_dir() else new_file_mode())
    else:
        os.chmod(path, new_file_mode())


@contextmanager
def exclusive_lock(lock_path: Path, what: str) -> Iterator[None]:
    """Hold an exclusive advisory lock on ``lock_path`` (created if needed), waiting for it.

    The lock dies with its process, so a crashed writer never blocks the next one. On a file
    system without ``flock`` support the block runs unlocked (the writers' atomic renames still
    keep readers safe) and says so once.
    """
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, new_file_mode())
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("Waiting for another process that is writing %s", what)
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as exc:
            if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            log.warning("No file locks on %s (%s); writing %s unlocked", lock_path, exc, what)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


class DirectoryInUseError(UserError):
    """Another live process holds the lock of a run directory."""


@contextmanager
def directory_lock(directory: Path, lock_name: str = ".run.lock") -> Iterator[None]:
    """Refuse (instead of waiting) when another process holds ``directory``'s lock.

    Two runs writing one run directory would overwrite each other's record, so the second one
    must stop at once. The holder's pid is written into the lock file for the message.
    """
    directory.mkdir(parents=True, exist_ok=True)
    lock_path = directory / lock_name
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, new_file_mode())
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise DirectoryInUseError(
                f"{directory} is being written by another run (pid {holder}). Wait for it to "
                "finish, or give this run its own directory (hydra.run.dir=... or "
                "hydra.sweep.dir=...)."
            ) from None
        except OSError as exc:
            if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            log.warning("No file locks on %s (%s); not guarding the run directory", lock_path, exc)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)
