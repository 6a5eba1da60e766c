"""One writer per output: an exclusive lock on ``--out`` (and on ``--work`` when it lies elsewhere).

The lock is ``fcntl.flock`` on ``<folder>/.ctprep.lock``, held for the whole build. The kernel
drops it when the holder exits in any way (Ctrl-C, kill -9, a crash), so a lock is never
stale: a leftover file whose lock nobody holds is simply taken. The file records the holder
(host, pid, start time) for the message a second build gets. The file also marks the folder as
a pipeline output, so a source walk never reads it as input (``ctprep.sources.base``).

flock works on local file systems and on NFSv4 (as a byte-range lock); on a file system
without locking the lock is held by nobody else and two builds are not prevented.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from ctprep.errors import OutputLocked, UserError
from ctprep.sources.base import OUTPUT_MARKER

LOCK_FILE = OUTPUT_MARKER


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike[str]) -> Iterator[Path]:
    """Hold the exclusive lock of ``folder`` (created if needed) for the ``with`` block.

    Raises:
        OutputLocked: another live process holds it (the message names it).
        UserError: the folder cannot be created or written (read-only, not a folder, ...).
    """
    folder = Path(folder)
    path = folder / LOCK_FILE
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise UserError(f"cannot write the output folder {folder}: {e.strerror or e}") from e
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise OutputLocked(f"{folder} is in use by another ctprep build ({_holder(fd)}; lock {path}); "
                               "wait for it to finish or stop it") from None
        holder = {"host": socket.gethostname(), "pid": os.getpid(),
                  "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
        yield path
    finally:
        os.close(fd)  # releases the flock


def _holder(fd: int) -> str:
    try:
        data = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        return f"pid {data['pid']} on {data['host']} since {data['started']}"
    except (OSError, ValueError, KeyError):
        return "holder unknown"
