"""Exclusive folder locks: one writer per feature store, one trainer per run folder.

A lock is ``fcntl.flock`` on a file inside the folder, taken without waiting, so a
second process fails at once with a message that names the holder's pid (written into
the file). The file is removed on release; a killed holder leaves it behind, unlocked,
which is harmless (the kernel drops the lock with the process). Removing the file opens
a race: a process may lock a file that the releasing holder has just unlinked, so after
locking, the path must still name the locked file, or the lock is taken again.

POSIX only (``fcntl`` is imported where a lock is taken, so that reading stores and runs
works everywhere).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

#: Builds the exception to raise from its message (e.g. ``StoreError``).
ErrorType = Callable[[str], Exception]


def acquire_lock(path: Path, error: ErrorType, held: Callable[[str], str]) -> int:
    """Lock ``path`` (created if absent) and write this process's pid into it; return the
    open descriptor, for :func:`release_lock`.

    ``held(who)`` is the message when another process holds the lock (``who`` is
    ``" (pid N)"``, or empty when the holder wrote none); ``error(message)`` builds the
    exception raised, for that and for a lock that cannot be taken at all.
    """
    import fcntl

    for _ in range(20):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise error(f"{path}: cannot create the lock file: {e.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode("ascii", "replace").strip()
            os.close(fd)
            raise error(held(f" (pid {holder})" if holder else "")) from None
        except OSError as e:
            os.close(fd)
            raise error(f"{path}: cannot lock: {e.strerror}") from None
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode("ascii"))
            return fd
        os.close(fd)  # the holder removed it between our open and our lock: again
    raise error(f"{path}: could not lock (the lock file keeps being replaced)")


def release_lock(path: Path, fd: int) -> None:
    """Remove the lock file and release the lock taken by :func:`acquire_lock`."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    finally:
        os.close(fd)


def check_unlocked(path: Path, error: ErrorType, held: Callable[[str], str]) -> None:
    """Raise ``error(held(who))`` when another process holds the lock at ``path``; take
    nothing (for a check before expensive work: the real lock is taken later)."""
    import fcntl

    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return  # no holder: a holder keeps the file while it holds the lock
    except OSError as e:
        raise error(f"{path}: cannot open the lock file: {e.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 64).decode("ascii", "replace").strip()
        raise error(held(f" (pid {holder})" if holder else "")) from None
    finally:
        os.close(fd)
