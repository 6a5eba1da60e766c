"""Quarantine: how a bad case leaves the run without stopping it.

A stage that finds a case unusable raises :class:`QuarantineError` (from a
reader, a pure function or a writer). The runner catches it on the worker,
turns it into a :class:`Quarantine` record, stores it in the manifest and
appends it to ``OUT/quarantine.jsonl``; every other case goes on.

``kind`` is a short machine code (one of :data:`QUARANTINE_KINDS`); ``reason``
is the one-line human explanation shown by ``ctprep status``. The kinds line
up with the fault kinds that ``ctprep demo-data --faults`` writes into
``faults.json`` (see :data:`FAULT_KIND_TO_QUARANTINE`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ctprep.atomic import atomic_write_text

# Machine codes for quarantine reasons. Keep them stable: tests and
# faults.json refer to them.
UNSAFE_NAME = "unsafe_name"  # case id would escape the output dir / is not a valid key
UNREADABLE = "unreadable"  # truncated gzip, corrupt NIfTI/JPEG, missing file
MISSING_METADATA = "missing_metadata"  # v1 volume without its metadata CSV row
MISSING_REPORT = "missing_report"  # no report row (quarantined by the text stage)
CONSTANT_VOLUME = "constant_volume"  # all voxels equal (e.g. all zeros)
NONFINITE = "nonfinite"  # NaN or +-inf voxels
MASK_GRID_MISMATCH = "mask_grid_mismatch"  # label map shape/affine differs from the volume
IMPLAUSIBLE_SPACING = "implausible_spacing"  # spacing <= 0, NaN, or outside a CT range
NOT_CHEST = "not_chest"  # volume does not look like a chest CT
DUPLICATE_CASE = "duplicate_case"  # two inputs claim the same case id
STAGE_ERROR = "stage_error"  # unexpected exception inside a stage (a bug or an unforeseen input)
MISSING_MASK = "missing_mask"  # no file for the volume in the anatomy mask tree (ctrate.missing_mask: quarantine)
OBLIQUE = "oblique"  # voxel axes tilted past ctrate.max_oblique_deg from the patient axes
BAD_ROW = "bad_row"  # the case's CSV row is broken (not UTF-8, wrong field count, oversized cell, conflicting duplicate)

QUARANTINE_KINDS = (
    UNSAFE_NAME,
    UNREADABLE,
    MISSING_METADATA,
    MISSING_REPORT,
    CONSTANT_VOLUME,
    NONFINITE,
    MASK_GRID_MISMATCH,
    IMPLAUSIBLE_SPACING,
    NOT_CHEST,
    DUPLICATE_CASE,
    STAGE_ERROR,
    MISSING_MASK,
    OBLIQUE,
    BAD_ROW,
)

# Fault names the synthetic generator may use in faults.json -> our kind.
# Several spellings are accepted so the two sides need not agree on one word.
FAULT_KIND_TO_QUARANTINE = {
    "truncated_gzip": UNREADABLE,
    "truncated": UNREADABLE,
    "corrupt": UNREADABLE,
    "all_zero": CONSTANT_VOLUME,
    "all_zero_volume": CONSTANT_VOLUME,
    "zero_volume": CONSTANT_VOLUME,
    "constant": CONSTANT_VOLUME,
    "nan": NONFINITE,
    "nan_inf": NONFINITE,
    "nonfinite": NONFINITE,
    "mask_grid": MASK_GRID_MISMATCH,
    "mask_grid_mismatch": MASK_GRID_MISMATCH,
    "mask_different_grid": MASK_GRID_MISMATCH,
    "mask_mismatch": MASK_GRID_MISMATCH,
    "missing_report": MISSING_REPORT,
    "missing_metadata": MISSING_METADATA,
    "missing_metadata_row": MISSING_METADATA,
    "non_chest": NOT_CHEST,
    "not_chest": NOT_CHEST,
    "non_chest_volume": NOT_CHEST,
    "unsafe_name": UNSAFE_NAME,
    "path_in_name": UNSAFE_NAME,
    "implausible_spacing": IMPLAUSIBLE_SPACING,
}


class QuarantineError(Exception):
    """Raised inside a stage to quarantine the current case.

    Args:
        kind: one of :data:`QUARANTINE_KINDS`.
        reason: one line a person can act on ("gzip stream ends early at byte 812").
    """

    def __init__(self, kind: str, reason: str):
        if kind not in QUARANTINE_KINDS:
            raise ValueError(f"unknown quarantine kind {kind!r}; valid: {', '.join(QUARANTINE_KINDS)}")
        super().__init__(f"{kind}: {reason}")
        self.kind = kind
        self.reason = one_line(reason)


def one_line(text: str, limit: int = 300) -> str:
    """Collapse whitespace so a reason always fits one line of status/jsonl."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass
class Quarantine:
    """One quarantined (case, stage). JSON line in ``OUT/quarantine.jsonl``.

    ``case`` is the case id as found (possibly unsafe: it is only ever used as
    data, never as a path).
    """

    case: str
    stage: str
    kind: str
    reason: str
    source: str = ""
    paths: dict[str, str] = field(default_factory=dict)  # role -> input path, for the person fixing it

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> Quarantine:
        return cls(**{k: obj[k] for k in ("case", "stage", "kind", "reason") if k in obj},
                   source=obj.get("source", ""), paths=dict(obj.get("paths", {})))


def write_quarantine_jsonl(path: Path, records: list[Quarantine]) -> None:
    """Rewrite ``path`` with ``records`` (sorted, atomically): the file always
    mirrors the manifest's current quarantines, so a fixed case disappears."""
    rows = sorted(records, key=lambda q: (q.stage, q.case))
    atomic_write_text(Path(path), "".join(json.dumps(q.to_json(), sort_keys=True) + "\n" for q in rows))
