"""What both stages need from the filesystem: one writer at a time, and a full disk told apart."""

import errno
import fcntl
import os
from contextlib import contextmanager
from pathlib import Path

DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def is_disk_full(exc: BaseException) -> bool:
    """An OSError for a full disk or quota, or safetensors' own error for one (not an OSError)."""
    if isinstance(exc, OSError):
        return exc.errno in DISK_FULL
    return type(exc).__name__ == "SafetensorError" and os.strerror(errno.ENOSPC) in str(exc)


@contextmanager
def exclusive_lock(lock_file: Path, busy: Exception):
    """Held for the life of one process (the OS releases it when the process dies); `busy` is raised
    at once if another process holds it."""
    fd = os.open(lock_file, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise busy from None
    try:
        yield
    finally:
        os.close(fd)
