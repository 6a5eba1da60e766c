"""The OmniAbnorm-CT release layout (OmniAbnorm-CT-14K as published): finding the datum JSON files,
choosing among duplicate listings, resolving image / mask folders of another machine, and turning a
datum into a case (rules: :mod:`ctprep.sources.omniabnorm`; reasons: docs/omniabnorm.md).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ctprep.quarantine import DUPLICATE_CASE, UNREADABLE, UNSAFE_NAME, Quarantine
from ctprep.schema import is_safe_case_id
from ctprep.sources.base import CaseInput, is_pipeline_output
from ctprep.sources.omniabnorm_files import SKIP_JSON, _first_file, _image_size, _peek, slice_offset
from ctprep.sources.omniabnorm_labels import (
    DEFAULT_WINDOW,
    abnormality_groups,
    datum_abnormalities,
    label_vector,
    parse_window,
)
from ctprep.sources.omniabnorm_slab import PLANES

NORMAL_IMPRESSION = "No abnormality is marked on this {plane} CT image."
KEY_SLICE_NAMES = ("0.jpeg", "0.jpg")  # the released loader looks for 0.jpeg first
SLICE_SUFFIXES = (".jpeg", ".jpg")
MASK_SUFFIXES = (".jpeg", ".jpg")
SPLIT_WORDS = {"train": "train", "training": "train", "valid": "valid", "val": "valid", "validation": "valid",
               "test": "test"}


def case_id_for(datum_id: str) -> str:
    """Deterministic safe case id of a datum id: itself when safe, else a readable slug + hash."""
    if is_safe_case_id(datum_id):
        return datum_id
    slug = re.sub(r"[^A-Za-z0-9_-]+", "_", datum_id).strip("_-")[:80] or "datum"
    return f"{slug}-{hashlib.sha1(datum_id.encode('utf-8')).hexdigest()[:10]}"


def _words(text: str) -> list[str]:
    return [w for w in re.split(r"[^a-z]+", text.lower()) if w]


def plane_from_name(text: str) -> str | None:
    """The plane a file or folder name names ("axial_train" -> axial), None if none or several."""
    found = {w for w in _words(text) if w in PLANES}
    return found.pop() if len(found) == 1 else None


def split_from_name(stem: str) -> str | None:
    found = {SPLIT_WORDS[w] for w in _words(stem) if w in SPLIT_WORDS}
    return found.pop() if len(found) == 1 else None


def file_rank(path: Path) -> int:
    """Lower wins a duplicated datum: 0 plane file, 1 ``_grouped`` variant (or other), 2 ``merged``."""
    words = _words(path.stem)
    if "merged" in words:
        return 2
    if "grouped" in words or plane_from_name(path.stem) is None:
        return 1
    return 0


MAX_JSON_DEPTH = 2  # folders below ROOT searched for JSON files: ROOT/<delivery>/<plane>/x.json
DATA_FOLDER_SUBDIRS = 256  # a folder with more subfolders holds image folders (or volumes): not searched


def release_files(root: Path) -> list[Path]:
    """Datum JSON files of the release layout, sorted by relative path.

    Searched: ROOT/*.json, ROOT/*/*.json (one release tree) and ROOT/*/*/*.json (deliveries
    side by side, a release tree each). A folder with more than ``DATA_FOLDER_SUBDIRS``
    subfolders (``images/`` with 14K datum folders, a CT-RATE ``train/``) is not descended
    into: detection runs on every source root and must stay a few directory listings.
    """
    root = Path(root)
    found: list[Path] = []

    def visit(folder: Path, depth: int) -> None:
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError:
            return
        subdirs = []
        for e in entries:
            if e.is_dir():
                if not is_pipeline_output(e.path):  # an --out inside the source is never input
                    subdirs.append(Path(e.path))
            elif (e.name.endswith(".json") and e.name not in SKIP_JSON and e.is_file()
                  and _peek(Path(e.path)) == "release"):
                found.append(Path(e.path))
        if depth < MAX_JSON_DEPTH and len(subdirs) <= DATA_FOLDER_SUBDIRS:
            for sub in subdirs:
                visit(sub, depth + 1)

    visit(root, 0)
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def _lexical(path: str | Path) -> Path:
    """``path`` with ``.``/``..`` folded away, symlinks kept: a link the user put inside the
    source root is followed, a ``..`` in a JSON path cannot leave it."""
    return Path(os.path.normpath(path))


def _within(path: Path, bases: list[Path]) -> bool:
    for b in bases:
        try:
            path.relative_to(b)
            return True
        except ValueError:
            pass
    return False


@dataclass
class FolderResolver:
    """Finds a datum's image / mask folder on this machine (see the module docstring).

    :meth:`bases` are tried in order for relative paths and re-rooted tails; a
    found folder must lie inside one of ``allowed`` (the source root and
    ``image_root``). A foreign prefix that once re-rooted onto a base is
    remembered per JSON folder, so 14K datums sharing one prefix cost one lookup each.
    """

    allowed: list[Path]  # [source root, image_root?]
    image_root: Path | None = None
    _reroot: dict[tuple[str, Path], Path] = field(default_factory=dict)

    def bases(self, json_dir: Path) -> list[Path]:
        """``image_root``, then the JSON's folder and each folder above it up to the source root."""
        out = [self.image_root] if self.image_root else []
        root = self.allowed[0]
        d = json_dir
        while True:
            out.append(d)
            if d == root or d.parent == d or not _within(d, [root]):
                break
            d = d.parent
        if root not in out:
            out.append(root)
        return list(dict.fromkeys(out))

    def resolve(self, value: Any, json_dir: Path) -> tuple[Path | None, str]:
        """(folder, how): how is "relative" | "absolute" | "rerooted" when found, else (None, one of
        ``"escapes"`` (a ``..`` path leaving the source root), ``"missing"``, ``"empty"``)."""
        if not isinstance(value, str) or not value.strip():
            return None, "empty"
        raw = value.strip()
        bases = self.bases(json_dir)
        if not os.path.isabs(raw):
            escaped = False
            for base in bases:
                cand = _lexical(base / raw)
                if not _within(cand, self.allowed):
                    escaped = True
                    continue
                if cand.is_dir():
                    return cand, "relative"
            return None, ("escapes" if escaped else "missing")
        cand = _lexical(raw)
        if cand.is_dir() and _within(cand, self.allowed):
            return cand, "absolute"
        parts = Path(raw).parts[1:]
        if ".." in parts:
            return None, "escapes"
        for (prefix, where), base in self._reroot.items():
            if where == json_dir and raw.startswith(prefix + "/"):
                cand = _lexical(base / raw[len(prefix) + 1:])
                if cand.is_dir() and _within(cand, self.allowed):
                    return cand, "rerooted"
        for i in range(len(parts)):
            for base in bases:
                cand = _lexical(base.joinpath(*parts[i:]))
                if cand.is_dir() and _within(cand, self.allowed):
                    self._reroot[("/" + "/".join(parts[:i]), json_dir)] = base
                    return cand, "rerooted"
        return None, "missing"


FOLDER_PROBLEMS = {
    "escapes": "leaves the source root",
    "missing": "is not found here, nor its tail under omni.image_root or the JSON's folder and those above it",
    "empty": "is not given",
}


def _plain_name(value: Any) -> str | None:
    """``value`` as a file-name stem that cannot leave its folder, else None."""
    s = str(value).strip()
    if not s or s in (".", "..") or "/" in s or "\\" in s or "\x00" in s:
        return None
    return s


def _offset(value: Any) -> int | None:
    """A context entry (an int offset, "-1", or a file name "-1.jpg") -> int, None if none."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return slice_offset(str(value))


def _first_text(value: Any) -> str:
    if isinstance(value, list):
        return next((" ".join(str(v).split()) for v in value if str(v or "").strip()), "")
    return " ".join(str(value or "").split())


def release_text(abnormalities: list[dict[str, Any]], plane: str) -> dict[str, Any]:
    """findings / impression / report of one datum (rules in the module docstring)."""
    findings, labels, variants = [], [], []
    for members in abnormality_groups(abnormalities):
        group = [abnormalities[j] for j in members]
        sentence = next((_first_text(a.get("description")) for a in group if _first_text(a.get("description"))), "")
        sentence = sentence or next((_first_text(a.get("rewritten_findings")) for a in group
                                     if _first_text(a.get("rewritten_findings"))), "")
        if sentence:
            findings.append(sentence if sentence.endswith(".") else sentence + ".")
        label = next((_first_text(a.get("label")) for a in group if _first_text(a.get("label"))), "")
        if label and label not in labels:
            labels.append(label)
        rw = next((a.get("rewritten_findings") for a in group if a.get("rewritten_findings")), [])
        variants.append([str(v) for v in rw] if isinstance(rw, list) else [str(rw)])
    if not abnormalities:
        impression = NORMAL_IMPRESSION.format(plane=plane)
    else:
        impression = "; ".join(labels) + "." if labels else ""
    text_findings = " ".join(findings)
    return {"findings": text_findings, "impression": impression,
            "report": " ".join(t for t in (text_findings, impression) if t), "finding_variants": variants}


# ------------------------------------------------------------------------------ scan (driver side)
def scan_release(root: Path, source_name: str, image_root: Path | None) -> tuple[list[CaseInput], list[Quarantine]]:
    """Cases and quarantines of every release JSON file under ``root``, one case per datum id.

    Args:
        root: the source root (resolved).
        source_name: the source's registered name, recorded in each case and quarantine.
        image_root: ``omni.image_root`` resolved, or None.
    """
    files = release_files(root)
    if not files:
        return [], []
    quarantined: list[Quarantine] = []
    # datum id -> [(rank, relative path, json path, datum)]
    listings: dict[str, list[tuple[int, str, Path, dict[str, Any]]]] = {}
    for jf in files:
        rel = jf.relative_to(root).as_posix()
        try:
            data = json.loads(jf.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            quarantined.append(Quarantine(f"json:{rel}", "scan", UNREADABLE, f"cannot parse {rel}: {e}",
                                          source_name, {"json": str(jf)}))
            continue
        if not isinstance(data, dict):
            continue
        for datum_id, datum in data.items():
            listings.setdefault(str(datum_id), []).append((file_rank(jf), rel, jf, datum))
    resolver = FolderResolver([root] + ([image_root] if image_root else []), image_root)
    cases: dict[str, CaseInput] = {}
    ids_of_case: dict[str, str] = {}
    for datum_id in sorted(listings):
        # lowest rank wins; among equal ranks the path that sorts last (a re-delivery)
        entries = sorted(listings[datum_id], key=lambda e: (-e[0], e[1]))
        rank, rel, jf, datum = entries[-1]
        case_id = case_id_for(datum_id)
        prov: dict[str, Any] = {"json": rel, "datum_id": datum_id}
        others = [e[1] for e in entries[:-1]]
        if others:
            prov["also_in"] = others
        plane, plane_from = datum_plane(datum, entries)
        prov["plane_from"] = plane_from
        if case_id in ids_of_case:  # two ids map to one case id: keep the first, name both
            quarantined.append(Quarantine(datum_id, "scan", DUPLICATE_CASE,
                                          f"datum ids {ids_of_case[case_id]!r} and {datum_id!r} map to one case id",
                                          source_name, {"json": str(jf)}))
            continue
        ids_of_case[case_id] = datum_id
        if not isinstance(datum, dict):
            quarantined.append(Quarantine(case_id, "scan", UNREADABLE, f"datum {datum_id!r} in {rel} is not an "
                                          "object", source_name, {"json": str(jf)}))
            continue
        split = split_from_name(jf.stem) or "train"
        case, bad = read_datum(datum_id, case_id, datum, jf, plane, split, prov, resolver, source_name)
        if bad is not None:
            quarantined.append(bad)
        else:
            cases[case_id] = case  # type: ignore[assignment]
    return list(cases.values()), quarantined


def datum_plane(datum: Any, entries: list[tuple[int, str, Path, Any]]) -> tuple[str, str]:
    """(plane, where it came from): datum field, the winning (then any) file, the image path, default."""
    if isinstance(datum, dict):
        own = str(datum.get("plane") or "").lower()
        if own in PLANES:
            return own, "datum"
    for _, rel, _, _ in reversed(entries):  # the winner first
        plane = plane_from_name(Path(rel).stem) or plane_from_name(Path(rel).parent.name)
        if plane:
            return plane, "file"
    if isinstance(datum, dict):
        plane = plane_from_name(str(datum.get("image") or ""))
        if plane:
            return plane, "image path"
    return "axial", "default"


def tree_cot_files(root: Path, folders: list[Path]) -> list[Path]:
    """The CoT JSONL files of an OmniAbnorm tree, sorted by path relative to ``root``.

    Searched: ``root`` and the folders up to ``MAX_JSON_DEPTH`` below it (as for the release JSON
    files: a folder with more than ``DATA_FOLDER_SUBDIRS`` subfolders is listed but not descended,
    ctprep outputs are skipped), which finds a CoT-only delivery folder (``ROOT/cot_2026_01/``),
    plus ``folders`` (batch folders, the release JSON files' folders, wherever they are).
    """
    root = Path(root)
    seen: set[Path] = set()

    def visit(folder: Path, depth: int) -> None:
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError:
            return
        subdirs = [Path(e.path) for e in entries if e.is_dir() and not is_pipeline_output(e.path)]
        seen.update(Path(e.path) for e in entries if e.name.endswith(".jsonl") and not e.is_dir())
        if depth < MAX_JSON_DEPTH and len(subdirs) <= DATA_FOLDER_SUBDIRS:
            for sub in subdirs:
                visit(sub, depth + 1)

    visit(root, 0)
    for folder in folders:
        seen.update(p for p in folder.glob("*.jsonl") if not p.is_dir())
    return sorted(seen, key=lambda p: p.relative_to(root).as_posix())


def _context_files(context: Any, image_dir: Path, key: Path
                   ) -> tuple[dict[str, str], dict[str, int], list[int], list[str]]:
    """(files, offsets by role, listed offsets, missing notes) of a datum's ``context`` entries."""
    files: dict[str, str] = {}
    offsets: dict[str, int] = {}
    listed: list[int] = []
    missing: list[str] = []
    for entry in context or []:
        off = _offset(entry)
        if off is None:
            missing.append(f"context entry {entry!r} is not an offset")
            continue
        if off in listed:
            continue
        listed.append(off)
        if off == 0:
            continue
        path = _first_file(image_dir, tuple(f"{off}{s}" for s in (key.suffix, *SLICE_SUFFIXES)))
        if path is None:
            missing.append(f"{off}{key.suffix}")
            continue
        files[f"context_{off}"] = str(path)
        offsets[f"context_{off}"] = off
    return files, offsets, listed, missing


def _mask_files(datum: dict[str, Any], abnormalities: list[dict[str, Any]], resolver: FolderResolver,
                json_dir: Path, missing: list[str]) -> tuple[dict[str, str], tuple[str, str] | None]:
    """(mask file by role, None) or (partial, (quarantine kind, reason)); a missing mask only joins ``missing``."""
    files: dict[str, str] = {}
    mask_dir, mhow = resolver.resolve(datum.get("mask"), json_dir)
    if mask_dir is None:
        if mhow == "escapes":
            return files, (UNSAFE_NAME, f"mask folder {datum.get('mask')!r} {FOLDER_PROBLEMS[mhow]}")
        missing.append(f"mask folder {datum.get('mask')!r} ({FOLDER_PROBLEMS[mhow]})")
    for j, abn in enumerate(abnormalities):
        stem = _plain_name(abn.get("id", j))
        if stem is None:
            return files, (UNSAFE_NAME, f"abnormality id {abn.get('id')!r} is not a plain file name")
        if mask_dir is None:
            continue
        path = _first_file(mask_dir, tuple(f"{stem}{s}" for s in MASK_SUFFIXES))
        if path is None:
            missing.append(f"mask {stem}.jpeg")
            continue
        files[f"mask_{j}"] = str(path)
    return files, None


def read_datum(datum_id: str, case_id: str, datum: dict[str, Any], jf: Path, plane: str, split: str,
               prov: dict[str, Any], resolver: FolderResolver, source_name: str
               ) -> tuple[CaseInput | None, Quarantine | None]:
    """One datum (the winning listing, from JSON file ``jf``) as a case, or the quarantine that says why not.

    The CoT fields of ``text`` are left empty: the source fills them from every CoT file of the tree.
    """
    where = {"json": str(jf), "image": str(datum.get("image", ""))}

    def bad(kind: str, reason: str) -> tuple[None, Quarantine]:
        return None, Quarantine(case_id, "scan", kind, f"datum {datum_id!r} ({prov['json']}): {reason}",
                                source_name, where)

    image_dir, how = resolver.resolve(datum.get("image"), jf.parent)
    if image_dir is None:
        return bad(UNSAFE_NAME if how == "escapes" else UNREADABLE,
                   f"image folder {datum.get('image')!r} {FOLDER_PROBLEMS[how]}")
    if how == "rerooted":
        prov["image_from"] = str(datum.get("image"))
    prov["image_dir"] = str(image_dir)
    key = _first_file(image_dir, KEY_SLICE_NAMES)
    if key is None:
        return bad(UNREADABLE, f"key slice {image_dir / '0.jpg'} (or 0.jpeg) is missing")
    context, context_offsets, listed, missing = _context_files(datum.get("context"), image_dir, key)
    files = {"image": str(key), **context}
    offsets = {"image": 0, **context_offsets}
    abnormalities = datum_abnormalities(datum)
    if abnormalities:
        masks, problem = _mask_files(datum, abnormalities, resolver, jf.parent, missing)
        if problem is not None:
            return bad(*problem)
        files.update(masks)
    if missing:
        prov["missing"] = missing
    try:
        window = list(parse_window(datum.get("windows")))
        window_source = "datum"
    except ValueError:
        window, window_source = list(DEFAULT_WINDOW), "default"
    text = release_text(abnormalities, plane)
    text.update({"steps": [], "cot_findings": "", "cot_impression": ""})  # filled by the source (in this order)
    meta = {
        "layout": "release",
        "plane": plane,
        "window": window,
        "window_source": window_source,
        "offsets": offsets,
        "context_listed": sorted(listed),
        "image_size_hw": _image_size(key),
        "abnormality": [{k: a.get(k) for k in ("id", "group_id", "label", "category", "description")}
                        for a in abnormalities],
    }
    case = CaseInput(case_id=case_id, source=source_name, split=split, files=files, meta=meta, text=text,
                     labels=label_vector(abnormalities), provenance=prov)
    return case, None
