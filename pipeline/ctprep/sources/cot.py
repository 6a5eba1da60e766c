"""CoT deliveries: reading CoT JSONL files and merging them into the cases they name.

A CoT file is an input of its own, not a part of the case that happens to sit beside it. A
source finds the CoT files of its tree (CT-RATE: every ``*.jsonl``; OmniAbnorm: the ``*.jsonl``
files at the root, in its batch / delivery folders and beside the release JSON files), the
config adds ``cot.files`` (the CLI's ``--cot FILE``), and :func:`read_cot` folds them into one
:class:`MergedCot` per case id. The rule (docs/pipeline.md, "CoT deliveries"):

* **Order**: the tree's files sorted by their path relative to the source root (``/``
  separators, compared as strings), then ``cot.files`` in the order given; within a file, top
  to bottom. A later record wins.
* **Steps are keyed by their number**: a ``{"step": n, "text": ...}`` object has number ``n``
  (an integer), a plain string (or an object without ``step``) its 1-based place in the list.
  A later record's step ``n`` replaces an earlier step ``n``; a number not seen before is
  added; the case's steps are then ordered by number. A step with empty text removes that
  number. A record without a ``steps`` field leaves the steps alone.
* **findings / impression**: a later non-empty value replaces the earlier one.
* A line that is not a JSON object, names no case, or has steps that are not a list of
  strings / objects with integer ``step`` numbers (or one number twice) is **malformed**: it
  is skipped and reported as ``FILE line N: what``; every other line still counts.

Which file and line gave each step is kept in the case's ``provenance["cot"]``; no stage key
reads provenance, so moving a delivery or re-delivering the same record reruns nothing.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ctprep.config import PipelineConfig

__all__ = ["STEP_FIELDS", "CotRecord", "MergedCot", "CotSet", "parse_cot_record", "read_cot", "configured_cot_files",
           "unknown_ids_note", "delivery_warnings"]

STEP_FIELDS = ("steps", "cot", "reasoning")  # where a record keeps its steps (first present wins)
STEP_TEXT_FIELDS = ("text", "content", "description")  # the text of a step object
TEXT_FIELDS = ("findings", "impression")  # record fields merged as "later non-empty wins"
SHOWN_IDS = 5  # ids named in a "no such case" note


@dataclass(frozen=True)
class CotRecord:
    """One parsed CoT line.

    Attributes:
        case_id: the case it names (as the source maps the record's id field).
        steps: ``(number, text)`` per step, None when the record has no steps field.
        fields: the non-empty ``findings`` / ``impression`` values.
        where: ``"FILE line N"``.
    """

    case_id: str
    steps: tuple[tuple[int, str], ...] | None
    fields: tuple[tuple[str, str], ...]
    where: str


def _step_number(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError(f"step number {value!r} is not an integer")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value.strip())
    raise ValueError(f"step number {value!r} is not an integer")


def _numbered_steps(raw: Any) -> tuple[tuple[int, str], ...]:
    if isinstance(raw, str):
        raw = [raw]
    if not isinstance(raw, list):
        raise ValueError(f"steps is a {type(raw).__name__}, not a list")
    out: dict[int, str] = {}
    for pos, step in enumerate(raw):
        if isinstance(step, dict):
            body = next((step[k] for k in STEP_TEXT_FIELDS if step.get(k) is not None), "")
            number = _step_number(step["step"]) if step.get("step") is not None else pos + 1
        elif isinstance(step, str):
            body, number = step, pos + 1
        else:
            raise ValueError(f"step {pos + 1} is a {type(step).__name__}, not a string or a {{step, text}} object")
        if number in out:
            raise ValueError(f"step number {number} is given twice")
        out[number] = str(body).strip()
    return tuple(out.items())


def parse_cot_record(obj: Any, id_of: Callable[[dict[str, Any]], str | None], where: str) -> CotRecord:
    """One CoT line's JSON value as a :class:`CotRecord`; ValueError says what is wrong with it."""
    if not isinstance(obj, dict):
        raise ValueError(f"a JSON {type(obj).__name__}, not an object")
    case_id = id_of(obj)
    if not case_id:
        raise ValueError("names no case (no id, case_id or VolumeName field)")
    raw = next((obj[k] for k in STEP_FIELDS if k in obj), None)
    steps = None if raw is None else _numbered_steps(raw)
    fields = tuple((k, str(obj[k]).strip()) for k in TEXT_FIELDS
                   if obj.get(k) is not None and str(obj[k]).strip())
    return CotRecord(case_id, steps, fields, where)


@dataclass
class MergedCot:
    """A case's CoT after every record naming it was applied (the rule: module docstring).

    ``steps``: number -> (text, index into ``records`` of the line that gave it).
    """

    steps: dict[int, tuple[str, int]] = field(default_factory=dict)
    fields: dict[str, str] = field(default_factory=dict)
    records: list[str] = field(default_factory=list)  # "FILE line N" of each record applied, in order

    def add(self, rec: CotRecord) -> None:
        self.records.append(rec.where)
        index = len(self.records) - 1
        for number, text in rec.steps or ():
            if text:
                self.steps[number] = (text, index)
            else:
                self.steps.pop(number, None)
        self.fields.update(rec.fields)

    def step_texts(self) -> list[str]:
        """The steps' texts ordered by step number."""
        return [self.steps[n][0] for n in sorted(self.steps)]

    def get(self, name: str, default: str = "") -> str:
        return self.fields.get(name, default)

    def provenance(self) -> dict[str, Any]:
        """``{"records": [FILE line N, ...], "steps": {number: index into records}}`` (JSON-able)."""
        return {"records": list(self.records), "steps": {str(n): self.steps[n][1] for n in sorted(self.steps)}}


@dataclass
class CotSet:
    """The CoT files of one scan, merged per case id.

    Attributes:
        cases: case id -> its merged CoT.
        ids_by_file: file label -> the case ids its valid lines name (to report ids that match no case).
        tables: ``{"file", "kind": "cot", "rows"}`` per file read (valid lines).
        problems_by_file: file label -> its malformed lines (``"FILE line N: what"``) or why it was not read.
    """

    cases: dict[str, MergedCot] = field(default_factory=dict)
    ids_by_file: dict[str, set[str]] = field(default_factory=dict)
    tables: list[dict[str, Any]] = field(default_factory=list)
    problems_by_file: dict[str, list[str]] = field(default_factory=dict)

    def get(self, case_id: str) -> MergedCot | None:
        return self.cases.get(case_id)

    @property
    def problems(self) -> list[str]:
        """Every file's problems, in reading order."""
        return [p for probs in self.problems_by_file.values() for p in probs]

    def problems_of(self, labels: Iterable[str]) -> list[str]:
        return [p for label in labels for p in self.problems_by_file.get(label, [])]

    def ids_of(self, labels: Iterable[str]) -> set[str]:
        out: set[str] = set()
        for label in labels:
            out |= self.ids_by_file.get(label, set())
        return out


def _lines(path: Path) -> Iterable[tuple[int, str | None]]:
    """(line number, text or None when the line is not UTF-8) of a file, blank lines skipped."""
    with open(path, "rb") as f:
        for n, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8-sig" if n == 1 else "utf-8")
            except UnicodeDecodeError:
                yield n, None
                continue
            if line.strip():
                yield n, line


def read_cot(files: Iterable[tuple[Path, str, str | None]], id_of: Callable[[dict[str, Any]], str | None]) -> CotSet:
    """Read and merge CoT files in the order given (the caller puts them in the documented order).

    Args:
        files: ``(path, label, problem)``: label names the file in provenance and messages (the
            path relative to the source root, or the ``--cot`` path); problem is None for a
            regular file, else what the entry is (it is reported, not read).
        id_of: record -> case id (the source's mapping of ``VolumeName`` / ``id`` fields).
    """
    out = CotSet()
    for path, label, problem in files:
        problems = out.problems_by_file.setdefault(label, [])
        if problem is not None:
            problems.append(f"{label} is {problem}: not read")
            continue
        ids: set[str] = set()
        rows = 0
        try:
            for n, line in _lines(Path(path)):
                where = f"{label} line {n}"
                try:
                    if line is None:
                        raise ValueError("not valid UTF-8")
                    try:
                        obj = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise ValueError(f"not valid JSON ({e.msg} at column {e.colno})") from None
                    rec = parse_cot_record(obj, id_of, where)
                except ValueError as e:
                    problems.append(f"{where}: malformed CoT line, skipped: {e}")
                    continue
                out.cases.setdefault(rec.case_id, MergedCot()).add(rec)
                ids.add(rec.case_id)
                rows += 1
        except OSError as e:  # e.g. no permission: the lines read before it still count
            problems.append(f"{label}: cannot be read ({e.strerror or e}); the rest of it is not used")
        out.ids_by_file[label] = ids
        out.tables.append({"file": label, "kind": "cot", "rows": rows})
    return out


def configured_cot_files(config: PipelineConfig | None) -> list[tuple[Path, str, str | None]]:
    """``cot.files`` (the CLI's ``--cot``) as ``read_cot`` input, in the order given.

    Raises FileNotFoundError naming a file that does not exist (a delivery given by name that is
    gone must not silently take its steps away).
    """
    from ctprep.sources.base import _not_regular

    out = []
    for name in (config.cot.files if config is not None else []):
        path = Path(name).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"CoT file {name} (cot.files / --cot): no such file")
        out.append((path, str(name), _not_regular(str(path))))
    return out


def unknown_ids_note(unknown: set[str], what: str) -> str | None:
    """``"N case id(s) in WHAT name no case found: a, b, c, d, e (and N-5 more)"``, None when ``unknown`` is empty."""
    if not unknown:
        return None
    shown = sorted(unknown)[:SHOWN_IDS]
    more = f" (and {len(unknown) - len(shown)} more)" if len(unknown) > len(shown) else ""
    return f"{len(unknown)} case id(s) in {what} name no case found: {', '.join(shown)}{more}"


def delivery_warnings(config: PipelineConfig, source_names: Iterable[str], known: set[str]) -> list[str]:
    """Warnings about ``cot.files`` after every source root was scanned (driver, once per build).

    The sources merge ``cot.files`` into their cases themselves; what only the whole build can
    tell is which records name a case under *no* root (each source maps a record's id its own
    way; a record is used when any source's mapping names a case in ``known``, every case id
    found, done or quarantined at scan). Malformed lines are reported here once, not per root.
    """
    from ctprep.sources.base import get_source

    files = configured_cot_files(config)
    if not files:
        return []
    sources = [type(get_source(name, config)) for name in sorted(set(source_names))]
    lines: list[str] = []
    used: set[str] = set()  # "FILE line N" of records that name a known case
    named: dict[str, str] = {}  # "FILE line N" -> the case id it names (first source's mapping)
    for i, src in enumerate(sources):
        cot = read_cot(files, src.cot_case_id)
        if i == 0:
            lines += [f"warning: {p}" for p in cot.problems]
        for case_id, merged in cot.cases.items():
            for where in merged.records:
                named.setdefault(where, case_id)
                if case_id in known:
                    used.add(where)
    note = unknown_ids_note({cid for where, cid in named.items() if where not in used}, "the --cot files")
    if note:
        lines.append(f"warning: {note}; those records were not used")
    return lines
