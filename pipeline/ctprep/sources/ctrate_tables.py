"""CT-RATE side tables: the CSV (metadata, reports, labels) and JSONL (CoT) files of a root, keyed by case id.

One home for how a side file is read and joined to a volume (``VolumeName`` -> case id), and
for what makes a row broken (see :class:`CtRateTables`). The source (:mod:`ctprep.sources.ctrate`)
reads them once per scan.
"""

from __future__ import annotations

import csv
import io
import math
import os
from pathlib import Path
from typing import Any

from ctprep.schema import ABNORMALITY_LABELS, is_safe_case_id
from ctprep.sources.base import input_files
from ctprep.sources.cot import CotSet, read_cot
from ctprep.sources.ctrate_layout import strip_nii

NOT_GIVEN = "Not given."  # the reports' placeholder for an empty section


def _volume_key(value: str) -> str:
    """CSV ``VolumeName`` -> case id (file stem)."""
    value = os.path.basename(str(value).strip())
    return strip_nii(value) or value


def classify_csv(columns: list[str]) -> str | None:
    """'metadata' | 'reports' | 'labels' | None, from a CSV's columns."""
    cols = set(columns)
    if "VolumeName" not in cols:
        return None
    if {"Findings_EN", "Impressions_EN"} & cols:
        return "reports"
    if sum(label in cols for label in ABNORMALITY_LABELS) >= len(ABNORMALITY_LABELS) // 2:
        return "labels"
    if {"XYSpacing", "ZSpacing", "RescaleSlope", "RescaleIntercept"} & cols:
        return "metadata"
    return None


def _clean_text(value: Any) -> str:
    text = "" if value is None else str(value).strip()
    return "" if text in (NOT_GIVEN, "nan", "None") else text


def _cot_case_id(record: dict[str, Any]) -> str | None:
    """The case a CoT record names: its ``case_id`` / ``VolumeName`` / ... field as a file stem."""
    for k in ("case_id", "case", "id", "VolumeName", "volume", "volume_name", "name"):
        if record.get(k):
            return _volume_key(record[k])
    return None


class CtRateTables:
    """The CSV and JSONL side tables of a CT-RATE root, keyed by case id.

    CoT JSONL files are deliveries merged per case (:mod:`ctprep.sources.cot`); a malformed line is
    reported in ``problems`` with its file and line and loses only itself.

    A broken row never stops the read and never reaches a case silently: a row that is not
    valid UTF-8, has another number of fields than the header (an unbalanced quote shifts
    fields), holds a cell over ``MAX_CELL_CHARS``, or disagrees with another row for the same
    volume is kept out of the tables and its case is listed in ``bad_rows`` (file, line, what),
    so the scan quarantines exactly that case. Rows whose volume cannot be named go to
    ``problems``. Identical duplicate rows are harmless and kept once.
    """

    def __init__(self) -> None:
        self.metadata: dict[str, dict[str, str]] = {}
        self.reports: dict[str, dict[str, str]] = {}
        self.labels: dict[str, list[int]] = {}
        self.cot = CotSet()  # merged CoT per case id (ctprep.sources.cot)
        self.tree_cot: list[str] = []  # the tree's CoT files read (relative paths)
        self.files: list[str] = []  # which side files were read (for the manifest)
        self.tables: list[dict[str, Any]] = []  # {"file", "kind", "rows"} per side file read
        # VolumeName values that are not plain safe file names (e.g. "../../x.nii.gz"): name -> CSV file
        self.unsafe_names: dict[str, str] = {}
        self.bad_rows: dict[str, str] = {}  # case id -> "FILE line N: what is wrong"
        self.problems: list[str] = []  # broken rows or files that name no case
        self._where: dict[tuple[str, str], str] = {}  # (kind, case id) -> "FILE line N" of the row kept

    @classmethod
    def read(cls, root: Path, files: list[tuple[str, str | None]] | None = None,
             extra_cot: list[tuple[Path, str, str | None]] = ()) -> CtRateTables:
        """Read the side tables under ``root``; ``files`` = ``(path, problem)`` already listed by the
        caller's walk (``ctprep.sources.ctrate_layout.Layout.side_files``), else ``root`` is walked;
        ``extra_cot``: CoT files given by name (``ctprep.sources.cot.configured_cot_files``), applied
        after the tree's."""
        t = cls()
        listed = list(input_files(root, (".csv", ".jsonl"))) if files is None else files
        for name, problem in (f for f in listed if f[0].endswith(".csv")):
            path = Path(name)
            rel = path.relative_to(root).as_posix()
            if problem is not None:
                t.problems.append(f"{rel} is {problem}: not read")
                continue
            columns, rows = read_csv_rows(path)
            kind = classify_csv(columns)
            if kind is None:
                continue
            t.files.append(rel)
            t.tables.append({"file": rel, "kind": kind, "rows": len(rows)})
            vol = columns.index("VolumeName")
            for line, fields, bad in rows:
                raw_name = fields[vol].strip() if vol < len(fields) else ""
                key = "" if _has_surrogate(raw_name) else _volume_key(raw_name)
                if bad is not None:
                    if key and is_safe_case_id(key):
                        t.bad_rows.setdefault(key, f"{rel} line {line}: {bad}")
                    else:
                        t.problems.append(f"{rel} line {line}: {bad}")
                    continue
                if not key:
                    continue
                if raw_name != os.path.basename(raw_name) or not is_safe_case_id(key):
                    # Never join a row by a name with path parts: it could alias another case.
                    t.unsafe_names.setdefault(raw_name, rel)
                    continue
                t._add(kind, key, dict(zip(columns, fields)), f"{rel} line {line}")
        # CoT deliveries: the tree's JSONL files in path order, then cot.files; merged per case
        # by the rule of ctprep.sources.cot (steps keyed by number, later files win).
        tree = sorted(((Path(name), Path(name).relative_to(root).as_posix(), problem)
                       for name, problem in listed if name.endswith(".jsonl")), key=lambda f: f[1])
        t.cot = read_cot(tree + list(extra_cot), _cot_case_id)
        t.tree_cot = [label for _, label, problem in tree if problem is None]
        t.problems += t.cot.problems_of(label for _, label, _ in tree)  # cot.files: reported once per build
        for table in t.cot.tables:
            t.files.append(table["file"])
            t.tables.append(table)
        return t

    def _add(self, kind: str, key: str, row: dict[str, str], where: str) -> None:
        store = {"metadata": self.metadata, "reports": self.reports, "labels": self.labels}[kind]
        value: Any = row if kind != "labels" else [_label_value(row.get(n)) for n in ABNORMALITY_LABELS]
        if key in store and store[key] != value:
            first = self._where[(kind, key)]
            self.bad_rows.setdefault(key, f"{where}: a second {kind} row for this volume differs from {first}")
            return
        store[key] = value
        self._where.setdefault((kind, key), where)


# The csv module refuses fields over 128 KiB by default with an error that names no row. Cells
# are read whole and checked here instead, so the row (and only its case) can be refused.
MAX_CELL_CHARS = 128 * 1024


def _has_surrogate(text: str) -> bool:
    return any("\udc80" <= ch <= "\udcff" for ch in text)


def read_csv_rows(path: Path) -> tuple[list[str], list[tuple[int, list[str], str | None]]]:
    """(header, [(line number, fields, None or what is wrong with the row)]) of a CSV file.

    Bytes that are not UTF-8 are kept as surrogates so that only their rows are refused.
    """
    text = path.read_bytes().decode("utf-8-sig", errors="surrogateescape")
    lines = text.splitlines(keepends=True)
    limit = csv.field_size_limit()
    csv.field_size_limit(max(limit, 1 << 30))
    try:
        reader = csv.reader(io.StringIO(text, newline=""))
        header = next(reader, [])
        rows = []
        start = reader.line_num
        for fields in reader:
            first, start = start + 1, reader.line_num
            if not fields:
                continue
            problem = _row_problem(fields, header)
            if problem is not None and start > first and len(fields) != len(header):
                # An unbalanced quote swallowed the lines after it: refuse its own line only and
                # read the swallowed lines on their own, so their cases keep their rows.
                rows.append((first, next(csv.reader([lines[first - 1]])), problem))
                for n in range(first + 1, start + 1):
                    for sub in csv.reader([lines[n - 1]]):
                        if sub:
                            rows.append((n, sub, _row_problem(sub, header)))
                continue
            rows.append((start, fields, problem))
    finally:
        csv.field_size_limit(limit)
    return [h.strip() for h in header], rows


def _row_problem(fields: list[str], header: list[str]) -> str | None:
    if len(fields) != len(header):
        return f"{len(fields)} fields where the header has {len(header)} (an unbalanced quote?)"
    for name, cell in zip(header, fields):
        if _has_surrogate(cell):
            pos = next(i for i, ch in enumerate(cell) if "\udc80" <= ch <= "\udcff")
            return f"column {name!r} is not valid UTF-8 (byte 0x{ord(cell[pos]) - 0xDC00:02x} at character {pos})"
        if len(cell) > MAX_CELL_CHARS:
            return f"column {name!r} holds {len(cell)} characters, over the {MAX_CELL_CHARS} limit"
    return None


def _label_value(v: Any) -> int:
    try:
        x = float(v)
    except (TypeError, ValueError):
        return -1
    return -1 if math.isnan(x) else int(x > 0.5)
