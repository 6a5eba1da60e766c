"""Reading the files of an OmniAbnorm-CT tree, for both layouts: which kind a JSON file is (from its
first bytes), the id a CoT record names, JPEG slices and their size (rules: :mod:`ctprep.sources.omniabnorm`)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from ctprep.quarantine import UNREADABLE, QuarantineError

SKIP_JSON = ("faults.json",)  # the generator's fault list, not records


def slice_offset(path: str) -> int | None:
    """Offset of a slice from its file name (``-2.jpg`` -> -2), None if not a number."""
    stem = Path(path).name.split(".")[0]
    try:
        return int(stem)
    except ValueError:
        return None


def _image_size(path: Path) -> list[int] | None:
    """(height, width) from the JPEG header without decoding; None if unreadable."""
    try:
        from PIL import Image

        with Image.open(path) as im:
            return [int(im.size[1]), int(im.size[0])]
    except Exception:  # noqa: BLE001 - load() quarantines it with the real error
        return None


def _cot_id(record: dict[str, Any]) -> str | None:
    """The datum (or case) id a CoT record names, as written."""
    for k in ("id", "case_id", "case", "VolumeName", "name"):
        if record.get(k):
            return str(record[k])
    return None


def _read_jpeg(path: str) -> np.ndarray:
    from PIL import Image

    if os.path.lexists(path) and not os.path.isfile(path):  # a FIFO or device would block or never end
        raise QuarantineError(UNREADABLE, f"{path} is not a regular file; only regular files (or links to them) are read")
    try:
        with Image.open(path) as im:
            im.load()
            return np.asarray(im.convert("L"), dtype=np.uint8)
    except FileNotFoundError as e:
        raise QuarantineError(UNREADABLE, f"missing image {path}") from e
    except Exception as e:  # noqa: BLE001 - PIL raises many kinds for a bad JPEG
        raise QuarantineError(UNREADABLE, f"cannot decode {Path(path).name}: {type(e).__name__}: {e}") from e
_PEEK_BYTES = 1 << 16


def _peek(path: Path) -> str:
    """"release" ({id: datum}), "records" ([record]) or "" from the first bytes (no full parse)."""
    try:
        with open(path, "rb") as f:
            head = f.read(_PEEK_BYTES).lstrip()
    except OSError:
        return ""
    if head.startswith(b"{") and (b'"image"' in head or head.rstrip() == b"{}" or head[1:].lstrip() == b"}"):
        return "release"
    if head.startswith(b"[") and b'"image"' in head:
        return "records"
    return ""


def _first_file(folder: Path, names: tuple[str, ...]) -> Path | None:
    for n in names:
        p = folder / n
        if p.is_file():
            return p
    return None
