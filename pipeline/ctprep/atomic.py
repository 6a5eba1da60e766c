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
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
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


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary sibling of ``final`` to write (a file or a directory);
    on success fsync it, move it into place (replacing any previous output) and fsync the folder.

    The temporary name keeps the final suffix (``x.tmp-ab12.npy``), so writers
    that append suffixes (``np.save``) or detect formats by suffix (zarr) keep
    working. A crash leaves only ``*.tmp-*`` debris, never a half-written
    ``final``; :func:`remove_temp_debris` removes it. Replacing a directory is
    two renames (old aside, new in), so a crash in between leaves ``final``
    missing, which readers must treat as "not written" (the runner sees it as stale).
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
        if tmp.is_dir() and final.exists():
            old = final.with_name(f"{final.stem}{TEMP_MARK}{tag}-old{final.suffix}")
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)  # atomic for files, replaces an existing one
        fsync_path(final.parent)
    finally:
        if tmp.exists() or tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)


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
