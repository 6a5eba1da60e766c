"""The case manifest: one SQLite file, written only by the driver.

Tables:

* ``cases``: one row per case id found by ``scan``: source, split, root, the
  JSON of its :class:`~ctprep.sources.base.CaseInput`, the content hash of
  each input file, and ``present`` (0 once the case is gone from its source).
* ``stages``: one row per (case, stage): the stage key and the components
  it was computed from (input fingerprint, upstream keys, config hash, code
  version; kept so ``status`` can say *why* a case is stale), ``status``
  (done | quarantined), the output path, the quarantine kind/reason and an
  ``info`` JSON.
* ``file_hashes``: path -> (size, mtime_ns, content hash): content is hashed
  once; an unchanged size+mtime reuses the hash.
* ``settings``: JSON values of the last run (sources, config) for ``status``.

Every write is one transaction (``with manifest.tx():``) and a stage row is
written only *after* its output has been moved into place, so a crash at
any moment leaves a manifest that is true about what exists; the worst case
is an output on disk that the manifest does not know yet, which a rerun
simply recomputes (outputs are deterministic and replaced atomically).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import sqlite3
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ctprep.sources.base import CaseInput

MANIFEST_FILE = "manifest.sqlite"  # in the work folder


def work_dir_for(out: Path, work: Path | None) -> Path:
    """The work folder of a build: ``--work`` if given, else ``OUT/work``."""
    return Path(work).resolve() if work else Path(out).resolve() / "work"


SCHEMA = """
CREATE TABLE IF NOT EXISTS cases (
    case_id   TEXT PRIMARY KEY,
    source    TEXT NOT NULL,
    split     TEXT NOT NULL,
    root      TEXT NOT NULL,
    input     TEXT NOT NULL,      -- CaseInput JSON
    file_hashes TEXT NOT NULL,    -- role -> content hash JSON
    present   INTEGER NOT NULL DEFAULT 1,
    updated   REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS stages (
    case_id   TEXT NOT NULL,
    stage     TEXT NOT NULL,
    key       TEXT NOT NULL,
    input_fp  TEXT NOT NULL,
    upstream  TEXT NOT NULL,      -- {stage: key} JSON
    config_hash TEXT NOT NULL,
    version   TEXT NOT NULL,
    status    TEXT NOT NULL CHECK (status IN ('done', 'quarantined')),
    output    TEXT,
    kind      TEXT,
    reason    TEXT,
    info      TEXT NOT NULL DEFAULT '{}',
    updated   REAL NOT NULL,
    PRIMARY KEY (case_id, stage)
);
CREATE TABLE IF NOT EXISTS file_hashes (
    path      TEXT PRIMARY KEY,
    size      INTEGER NOT NULL,
    mtime_ns  INTEGER NOT NULL,
    hash      TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS settings (
    name      TEXT PRIMARY KEY,
    value     TEXT NOT NULL
);
"""


def connect_readonly(path: Path) -> tuple[sqlite3.Connection, tempfile.TemporaryDirectory | None]:
    """Open the manifest for reading only, whether or not its folder is writable.

    The manifest is in WAL mode, and SQLite reads a WAL database through a ``-shm`` file that it
    creates beside it: ``mode=ro`` therefore needs a writable folder. In a read-only folder:
    ``immutable=1`` when there is no pending ``-wal`` (a build that ended normally checkpoints and
    removes it), else a private copy of the database and its ``-wal`` in a temporary folder, so
    the rows of a killed build are read too. Returns the connection and that copy (or None).
    """
    path = Path(path).resolve()
    if not path.is_file():
        raise FileNotFoundError(errno.ENOENT, "no manifest here", str(path))
    wal = path.with_name(path.name + "-wal")
    if os.access(path.parent, os.W_OK):
        return sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True, isolation_level=None, timeout=30), None
    if not wal.exists() or wal.stat().st_size == 0:
        return sqlite3.connect(f"{path.as_uri()}?immutable=1", uri=True, isolation_level=None), None
    copy = tempfile.TemporaryDirectory(prefix="ctprep-manifest-")
    try:
        target = Path(copy.name) / path.name
        shutil.copyfile(path, target)
        shutil.copyfile(wal, target.with_name(target.name + "-wal"))
        return sqlite3.connect(str(target), isolation_level=None), copy
    except BaseException:
        copy.cleanup()
        raise


@dataclass
class StageRow:
    """A ``stages`` row."""

    case_id: str
    stage: str
    key: str
    input_fp: str
    upstream: dict[str, str]
    config_hash: str
    version: str
    status: str
    output: str | None
    kind: str | None
    reason: str | None
    info: dict[str, Any]

    def as_previous(self) -> dict[str, Any]:
        return {"key": self.key, "status": self.status, "output": self.output, "info": self.info,
                "kind": self.kind, "reason": self.reason}


@dataclass
class CaseRow:
    """A ``cases`` row."""

    case: CaseInput
    root: str
    file_hashes: dict[str, str]
    present: bool


class Manifest:
    """The SQLite manifest at ``work/manifest.sqlite`` (driver only; not thread-safe).

    ``readonly=True`` (``ctprep status``) never writes, creates or migrates anything, so it works
    on an output folder that is read-only (a finished run on a read-only mount, another user's
    folder); see :func:`connect_readonly`.
    """

    def __init__(self, path: str | Path, readonly: bool = False):
        self.path = Path(path)
        self.readonly = readonly
        self._copy: tempfile.TemporaryDirectory | None = None
        self._depth = 0
        if readonly:
            self.conn, self._copy = connect_readonly(self.path)
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: we issue BEGIN/COMMIT ourselves in tx().
        self.conn = sqlite3.connect(str(self.path), isolation_level=None, timeout=30)
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA synchronous=NORMAL")
        self.conn.executescript(SCHEMA)

    def close(self) -> None:
        self.conn.close()
        if self._copy is not None:
            self._copy.cleanup()
            self._copy = None

    def __enter__(self) -> Manifest:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextlib.contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        """One transaction (nested calls join the outer one)."""
        if self._depth:
            self._depth += 1
            try:
                yield self.conn
            finally:
                self._depth -= 1
            return
        self._depth = 1
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield self.conn
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        else:
            self.conn.execute("COMMIT")
        finally:
            self._depth = 0

    # ------------------------------------------------------------------ settings
    def set_setting(self, name: str, value: Any) -> None:
        with self.tx() as c:
            c.execute("INSERT OR REPLACE INTO settings(name, value) VALUES (?, ?)", (name, json.dumps(value)))

    def get_setting(self, name: str, default: Any = None) -> Any:
        row = self.conn.execute("SELECT value FROM settings WHERE name = ?", (name,)).fetchone()
        return json.loads(row[0]) if row else default

    # ------------------------------------------------------------------ file hashes
    def cached_hash(self, path: str, size: int, mtime_ns: int) -> str | None:
        row = self.conn.execute("SELECT size, mtime_ns, hash FROM file_hashes WHERE path = ?", (path,)).fetchone()
        if row and row[0] == size and row[1] == mtime_ns:
            return row[2]
        return None

    def known_stat(self, path: str) -> tuple[int, int] | None:
        row = self.conn.execute("SELECT size, mtime_ns FROM file_hashes WHERE path = ?", (path,)).fetchone()
        return (row[0], row[1]) if row else None

    def put_hashes(self, rows: Iterable[tuple[str, int, int, str]]) -> None:
        with self.tx() as c:
            c.executemany("INSERT OR REPLACE INTO file_hashes(path, size, mtime_ns, hash) VALUES (?, ?, ?, ?)", rows)

    # ------------------------------------------------------------------ cases
    def put_case(self, case: CaseInput, root: str, file_hashes: dict[str, str]) -> None:
        with self.tx() as c:
            c.execute(
                "INSERT OR REPLACE INTO cases(case_id, source, split, root, input, file_hashes, present, updated)"
                " VALUES (?, ?, ?, ?, ?, ?, 1, ?)",
                (case.case_id, case.source, case.split, root, json.dumps(case.to_json()),
                 json.dumps(file_hashes, sort_keys=True), time.time()),
            )

    def mark_absent(self, root: str, source: str, present_ids: set[str]) -> list[str]:
        """Mark cases of (root, source) not in ``present_ids`` as gone; returns their ids."""
        rows = self.conn.execute("SELECT case_id FROM cases WHERE root = ? AND source = ? AND present = 1",
                                 (root, source)).fetchall()
        gone = [r[0] for r in rows if r[0] not in present_ids]
        if gone:
            with self.tx() as c:
                c.executemany("UPDATE cases SET present = 0, updated = ? WHERE case_id = ?",
                              [(time.time(), g) for g in gone])
        return gone

    def cases(self, present_only: bool = True) -> list[CaseRow]:
        q = "SELECT input, root, file_hashes, present FROM cases"
        if present_only:
            q += " WHERE present = 1"
        q += " ORDER BY source, split, case_id"
        return [CaseRow(CaseInput.from_json(json.loads(r[0])), r[1], json.loads(r[2]), bool(r[3]))
                for r in self.conn.execute(q)]

    # ------------------------------------------------------------------ stages
    def put_stage(self, row: StageRow) -> None:
        with self.tx() as c:
            c.execute(
                "INSERT OR REPLACE INTO stages(case_id, stage, key, input_fp, upstream, config_hash, version,"
                " status, output, kind, reason, info, updated) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (row.case_id, row.stage, row.key, row.input_fp, json.dumps(row.upstream, sort_keys=True),
                 row.config_hash, row.version, row.status, row.output, row.kind, row.reason,
                 json.dumps(row.info, sort_keys=True), time.time()),
            )

    def delete_stage(self, case_id: str, stage: str) -> None:
        with self.tx() as c:
            c.execute("DELETE FROM stages WHERE case_id = ? AND stage = ?", (case_id, stage))

    def stage_rows(self, stage: str | None = None) -> dict[tuple[str, str], StageRow]:
        q = "SELECT case_id, stage, key, input_fp, upstream, config_hash, version, status, output, kind, reason, info FROM stages"
        args: tuple[Any, ...] = ()
        if stage:
            q += " WHERE stage = ?"
            args = (stage,)
        out = {}
        for r in self.conn.execute(q, args):
            row = StageRow(r[0], r[1], r[2], r[3], json.loads(r[4]), r[5], r[6], r[7], r[8], r[9], r[10], json.loads(r[11]))
            out[(row.case_id, row.stage)] = row
        return out
