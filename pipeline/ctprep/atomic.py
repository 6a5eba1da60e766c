"""Atomic, durable writes: a reader sees the old content or the new, never half of it.

Every output of the pipeline and the trainer (stage outputs, shards, manifests' side files,
checkpoint markers, exports) is written through this module:

* :func:`atomic_write_bytes` / :func:`atomic_write_text` / :func:`atomic_write_json` for a
  file whose content is in memory;
* :func:`atomic_path` for anything a library writes itself (``np.save``, zarr, safetensors,
  a whole folder).

Each writes a temporary sibling, fsyncs it, renames it over the final name and fsyncs the
folder. The rename alone is atomic but not durable: after a power cut the folder entry can
point at a file whose blocks never reached the disk (an empty ``COMPLETE`` marker of a
checkpoint that then looks valid), so the data is flushed before the rename and the rename
itself is flushed after it.

Temporary names:
* the ``atomic_write_*`` helpers use ``<name>.tmp``: one writer per path is the contract
  (the build's folder lock, rank 0), and a killed writer's leftover is overwritten by the next
  run instead of piling up;
* :func:`atomic_path` uses ``<stem>.tmp-<tag><suffix>``: unique, because a Dask task may run
  twice at once (a retried or stolen task), and keeping the suffix lets writers that pick a
  format by suffix (``np.save`` appends ``.npy``, zarr) work. :func:`remove_temp_debris`
  deletes what killed writers left.

Two writers of one folder: a task abandoned after ``--task-timeout`` can still finish while the
next build writes the same case, so :func:`atomic_path` must survive a concurrent replace of the
same ``final``. On Linux it swaps the new folder in with one ``renameat2(RENAME_EXCHANGE)``
(never a moment without ``final``; the last exchange wins); elsewhere, or where the filesystem
lacks the flag, it moves the old folder aside and the new one in, retrying when another writer
got in between (see :func:`atomic_path`).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import json
import os
import shutil
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = [
    "atomic_write_bytes",
    "atomic_write_text",
    "atomic_write_json",
    "atomic_path",
    "fsync_path",
    "fsync_tree",
    "remove_temp_debris",
]

TEMP_MARK = ".tmp-"  # in the name of every atomic_path temporary (what remove_temp_debris looks for)

_AT_FDCWD = -100  # <fcntl.h>: paths relative to the working directory
_RENAME_EXCHANGE = 2  # <linux/fs.h>: swap the two names atomically; both must exist
# Errors meaning "this kernel / filesystem cannot exchange" (EINVAL: the filesystem does not
# support the flag, e.g. some network and FUSE mounts; ENOSYS: no renameat2 syscall; ENOTSUP is
# taken the same way, as the fallback works wherever a plain rename does): fall back.
_EXCHANGE_UNSUPPORTED = (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP)
# Errors of rename(tmp, final) when a folder is at ``final`` again (another writer put its own in).
_FINAL_TAKEN = (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR)
# How many times the two-rename fallback moves aside what another writer just put in place before
# giving up; each lost round means some other writer finished, so this bounds only a livelock.
_REPLACE_ATTEMPTS = 10


def fsync_path(path: str | os.PathLike[str]) -> None:
    """Flush a file's or a folder's data and metadata to disk.

    Filesystems that cannot fsync a folder (EINVAL / ENOTSUP, e.g. some network mounts)
    are tolerated: there is nothing more a writer can do on them.
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def fsync_tree(path: str | os.PathLike[str]) -> None:
    """fsync a file, or every file and folder under a folder (deepest first)."""
    path = Path(path)
    if not path.is_dir():
        fsync_path(path)
        return
    for dirpath, _dirnames, filenames in os.walk(path, topdown=False):
        for name in filenames:
            file = os.path.join(dirpath, name)
            if not os.path.islink(file):
                fsync_path(file)
        fsync_path(dirpath)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically and durably (parents are created). Returns ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)
    return path


def atomic_write_text(path: str | os.PathLike[str], text: str, encoding: str = "utf-8") -> Path:
    """:func:`atomic_write_bytes` of ``text`` encoded with ``encoding``."""
    return atomic_write_bytes(path, text.encode(encoding))


def atomic_write_json(path: str | os.PathLike[str], obj: Any, *, indent: int | None = None,
                      sort_keys: bool = False) -> Path:
    """:func:`atomic_write_text` of ``json.dumps(obj, indent=indent, sort_keys=sort_keys)`` (no trailing newline)."""
    return atomic_write_text(path, json.dumps(obj, indent=indent, sort_keys=sort_keys))


@functools.cache
def _load_renameat2() -> Any:
    """libc's ``renameat2`` (glibc >= 2.28) as a ctypes function, or None where there is none."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None
    fn = getattr(libc, "renameat2", None)
    if fn is None:
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


def _rename_exchange(a: Path, b: Path) -> bool:
    """Swap the names ``a`` and ``b`` in one atomic step (both must exist).

    Returns False, having changed nothing, where the platform or the filesystem cannot
    (no ``renameat2`` in libc, EINVAL / ENOSYS / ENOTSUP); other failures raise ``OSError``
    (``FileNotFoundError`` when either name is missing).
    """
    renameat2 = _load_renameat2()
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in _EXCHANGE_UNSUPPORTED:
        return False
    raise OSError(err, f"renameat2(RENAME_EXCHANGE): {os.strerror(err)}", str(a), None, str(b))


def _replace_directory(tmp: Path, final: Path, tag: str) -> None:
    """Move the finished folder ``tmp`` to ``final``, replacing whatever another writer put there.

    After an exchange ``tmp`` holds the previous output, for the caller to remove; the folders
    the fallback moved aside are removed here.
    """
    asides: list[Path] = []
    try:
        for attempt in range(_REPLACE_ATTEMPTS):
            try:
                if _rename_exchange(tmp, final):
                    return
            except FileNotFoundError:
                pass  # no ``final`` (first write, or a fallback writer has it aside): plain rename
            else:
                old = final.with_name(f"{final.stem}{TEMP_MARK}{tag}-old{attempt}{final.suffix}")
                try:
                    final.rename(old)
                    asides.append(old)
                except FileNotFoundError:
                    pass  # another writer moved it aside (or it was never there): nothing to keep
            try:
                tmp.rename(final)
                return
            except OSError as e:
                if e.errno not in _FINAL_TAKEN:
                    raise
                # another writer's folder landed in between: it is complete, move it aside too
        raise FileExistsError(errno.EEXIST, f"atomic_path: other writers replaced {final} {_REPLACE_ATTEMPTS} "
                              f"times while {tmp} was being moved into its place; giving up", str(final))
    finally:
        for old in asides:
            shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary sibling of ``final`` to write (a file or a directory);
    on success fsync it, move it into place (replacing any previous output) and fsync the folder.

    The temporary name keeps the final suffix (``x.tmp-ab12.npy``), so writers
    that append suffixes (``np.save``) or detect formats by suffix (zarr) keep
    working. A crash leaves only ``*.tmp-*`` debris, never a half-written
    ``final``; :func:`remove_temp_debris` removes it.

    A file replaces ``final`` with one ``os.replace``. A directory replaces it with
    ``renameat2(RENAME_EXCHANGE)`` on Linux: ``final`` is never missing, and a crash right
    after the swap leaves the previous output as ``*.tmp-*`` debris. Where exchange is not
    available (another OS, or a filesystem without the flag) it is two renames, old aside and
    new in, so a crash in between leaves ``final`` missing, which readers must treat as
    "not written" (the runner sees it as stale).

    Two writers of the same ``final`` at once (a task abandoned by ``--task-timeout`` still
    finishing while the next build writes the same case) both succeed and the last one to move
    its output in wins: once they have returned, ``final`` is one writer's complete output, never
    a mix and never missing (with exchange it is never missing in between either; with the
    fallback a reader can find it missing for the moment between the two renames). The fallback
    retries when another writer's folder lands between its two renames, and raises
    ``FileExistsError`` naming ``final`` after ``_REPLACE_ATTEMPTS`` such rounds in a row.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:8]
    tmp = final.with_name(f"{final.stem}{TEMP_MARK}{tag}{final.suffix}")
    try:
        yield tmp
        if not tmp.exists():
            raise FileNotFoundError(f"atomic_path: nothing was written to {tmp}")
        fsync_tree(tmp)
        if tmp.is_dir():
            _replace_directory(tmp, final, tag)  # an exchange leaves the previous output at tmp
        else:
            os.replace(tmp, final)  # atomic for files, replaces an existing one
        fsync_path(final.parent)
    finally:
        # a failed write's leftover, or the previous output an exchange swapped out
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)


def remove_temp_debris(folder: str | os.PathLike[str]) -> int:
    """Delete ``*.tmp-*`` leftovers of killed :func:`atomic_path` writers in ``folder``; returns how many."""
    folder = Path(folder)
    n = 0
    if folder.is_dir():
        for p in folder.iterdir():
            if TEMP_MARK in p.name:
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)
                n += 1
    return n
