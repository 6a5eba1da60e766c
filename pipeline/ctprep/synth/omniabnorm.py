"""Write synthetic OmniAbnorm-CT data in one of two layouts (``ctprep demo-data --source omniabnorm``).

``layout="release"`` (default): the layout of OmniAbnorm-CT-14K as released
(``docs/omniabnorm.md`` describes it and how ``ctprep`` reads it)::

    OUT/
      axial/axial_train.json          {datum id: datum}, axial images, train split
      axial/axial_valid.json
      axial/axial_train_grouped.json  the same train datums, abnormalities as ``abnormality_group``
      coronal/coronal_train.json      coronal images
      coronal/coronal_valid.json
      merged_train.json               every train datum of both planes again (paths relative to OUT)
      images/<datum>/0.jpg            key slice; context slices named by offset: -2.jpg ... 2.jpg
      masks/<datum>/<abnormality id>.jpeg   binary mask (0 / 255) on the key slice
      cot.jsonl                       {"id": datum id, "steps", "findings", "impression"}
      faults.json                     {"seed", "grid", "cases", "layout", "faults": [...], "notes": {...}}

  A datum is ``{"image": folder, "mask": folder, "context": [offsets incl. 0],
  "abnormality": [{"id", "group_id", "label", "description",
  "rewritten_findings": [str], "category"}]}``; normal images have no
  ``abnormality``. Plane JSONs hold *absolute* paths of another machine
  (``FOREIGN_ROOT``/images/<datum>), as the release does; the reader re-roots
  them. Per datum index ``i``: coronal when ``i % 3 == 1``; a normal image when
  ``i % 4 == 2``; two mask ids sharing one ``group_id`` (one finding drawn as two
  parts) when ``i % 4 == 0``; an id that is not a safe case id when ``i % 4 == 1``;
  context slice +1 missing when ``i % 5 == 3``; valid split when ``i % 5 == 4``.
  ``faults.json["notes"]`` lists these datums.

``layout="batches"``: the older list-of-records batch folder::

    records.json            list of records (one per case), sorted by id
    cot.jsonl               one CoT record per case: {"id", "steps", "findings", "impression"}
    faults.json             {"seed", "grid", "cases", "faults": [...]}
    <id>/0.jpg              key slice, 8-bit, windowed with the record's ``windows``
    <id>/-2.jpg ... 2.jpg   context slices; offset k lies k * 5 mm superior (+) / inferior (-)
    <id>/mask_<n>.jpeg      binary mask (0 / 255) of abnormality n on the key slice

Images are cut from the same phantoms as the CT-RATE volumes. Axial slices are
shown in the radiological view (rows anterior -> posterior, columns patient
right -> left), coronal ones with rows superior -> inferior and columns patient
right -> left; context offset +k lies k * 5 mm superior (axial) / anterior
(coronal). Ids start ``omni_s{seed}_``, so data made with different seeds never
collide; the same seed writes byte-identical files.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

from ctprep.synth.anatomy import Anatomy, Grid, render_chest, sample_anatomy
from ctprep.synth.finding_kinds import OMNI_KINDS, kind_of
from ctprep.synth.findings import sample_findings
from ctprep.synth.grids import get_grid
from ctprep.synth.nifti import write_bytes
from ctprep.synth.reports import compose_text, finding_sentence, impression_phrase

RECORDS_JSON = "records.json"
COT_JSONL = "cot.jsonl"
FAULTS_JSON = "faults.json"
CONTEXT_OFFSETS = (-2, -1, 1, 2)
SLICE_GAP_MM = 5.0
LUNG_WINDOW = {"center": -600, "width": 1500}
SOFT_WINDOW = {"center": 40, "width": 400}
LOCALIZED_KINDS = OMNI_KINDS  # kinds a datum may show (each defines its category), in the order the RNG picks from
OMNI_FAULT_KINDS = ("missing_image", "truncated_jpeg", "mask_size_mismatch", "path_in_name")


def _jpeg(arr_u8: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr_u8, mode="L").save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def window_u8(hu: np.ndarray, window: dict) -> np.ndarray:
    lo = window["center"] - window["width"] / 2
    return np.clip(np.rint((hu - lo) / window["width"] * 255.0), 0, 255).astype(np.uint8)


def _radiological(slice_yx: np.ndarray) -> np.ndarray:
    """Canonical (y: A, x: R) slice -> image rows anterior->posterior, columns right->left."""
    return np.ascontiguousarray(slice_yx[::-1, ::-1])


def _case(out: Path, case_id: str, rng: np.random.Generator, size: int) -> tuple[dict, dict] | None:
    a = sample_anatomy(rng, z_apex=0.0)
    n = 1 + int(rng.random() < 0.35)
    kinds = [str(k) for k in rng.choice(LOCALIZED_KINDS, size=n, replace=False)]
    a.findings = sample_findings(a, rng, kinds=kinds)
    if not a.findings:
        return None
    key = a.findings[0]
    zc = kind_of(key.kind).focus(a, key.params)[0]  # an axial cut through it
    fov = max(float(rng.uniform(380, 430)), 2 * a.ax + 20)
    d = round(fov / size, 3)
    off = np.array((-2, -1, 0, 1, 2))
    grid = Grid((5, size, size), (SLICE_GAP_MM, d, d), (zc - 2 * SLICE_GAP_MM, -(size - 1) / 2 * d, -(size - 1) / 2 * d))
    hu, _, masks = render_chest(a, grid, finding_masks=True)
    hu += float(rng.uniform(8, 16)) * rng.standard_normal(hu.shape, dtype=np.float32)
    visible = [i for i, f in enumerate(a.findings) if i in masks and masks[i][2].any()]
    if not visible:
        return None
    shown = [a.findings[i] for i in visible]
    window = LUNG_WINDOW if kind_of(shown[0].kind).category in ("lung", "pleura") else SOFT_WINDOW
    u8 = window_u8(hu, window)
    folder = out / case_id
    for k, o in enumerate(off):
        write_bytes(folder / f"{o}.jpg", _jpeg(_radiological(u8[k])))
    abn, mask_paths = [], []
    for j, i in enumerate(visible):
        f = a.findings[i]
        rel = f"{case_id}/mask_{j + 1}.jpeg"
        write_bytes(out / rel, _jpeg(_radiological(masks[i][2]).astype(np.uint8) * 255))
        phrase = impression_phrase(f)
        abn.append({"id": j + 1, "description": phrase[0].upper() + phrase[1:], "rewritten_findings": finding_sentence(f, rng),
                    "label": f.label, "category": kind_of(f.kind).category, "mask": rel})  # fmt: skip
        mask_paths.append(rel)
    a.findings = shown
    text = compose_text(a, rng)
    record = {
        "id": case_id,
        "image": f"{case_id}/0.jpg",
        "context": [f"{case_id}/{o}.jpg" for o in CONTEXT_OFFSETS],
        "mask": mask_paths,
        "abnormality": abn,
        "windows": window,
        "modality": "CT",
    }
    steps = text["steps"]
    cot = {"id": case_id, "findings": text["findings"], "impression": text["impression"],
           "steps": [{"step": i + 1, "text": s} for i, s in enumerate(steps)] if rng.random() < 0.5 else steps}  # fmt: skip
    return record, cot


# ------------------------------------------------------------------------------ release layout
FOREIGN_ROOT = "/mnt/omniabnorm/OmniAbnormCT_14K"  # absolute prefix of the plane JSONs' paths
RELEASE_CONTEXT = (-2, -1, 0, 1, 2)  # offsets listed in ``context`` (0 = the key slice, as released)
CORONAL_KINDS = tuple(name for name in LOCALIZED_KINDS if kind_of(name).coronal)  # also shown on coronal images
NORMAL_WINDOWS = (LUNG_WINDOW, SOFT_WINDOW)


def _render_plane(a: Anatomy, plane: str, key_mm: float, z_mm: float, size: int, d: float, findings: bool):
    """HU and finding masks of 5 slices (offsets ``RELEASE_CONTEXT``) in ``plane``, as images.

    Returns (hu (5, size, size) float32 images, {finding index: bool (5, size, size)}), each
    image in the viewing orientation (see module docstring).
    """
    half = -(size - 1) / 2 * d
    if plane == "axial":
        grid = Grid((5, size, size), (SLICE_GAP_MM, d, d), (key_mm - 2 * SLICE_GAP_MM, half, half))
    else:  # coronal: 5 cuts along A (y) at key_mm, z spans the image height around z_mm
        grid = Grid((size, 5, size), (d, SLICE_GAP_MM, d), (z_mm + half, key_mm - 2 * SLICE_GAP_MM, half))
    hu, _, masks = render_chest(a, grid, finding_masks=findings)
    if plane == "axial":
        def view(v):  # (5, A, R) -> rows A->P, columns R->L
            return np.ascontiguousarray(v[:, ::-1, ::-1])
    else:
        def view(v):  # (S, 5, R) -> (5, rows S->I, columns R->L)
            return np.ascontiguousarray(v.transpose(1, 0, 2)[:, ::-1, ::-1])
    return view(hu), {i: view(m) for i, m in masks.items()}


def _split_mask(m: np.ndarray) -> list[np.ndarray]:
    """Two parts of one finding's mask (left / right half of its columns), or [m] if too small."""
    cols = np.flatnonzero(m.any(axis=0))
    if len(cols) < 4:
        return [m]
    cut = int(cols[len(cols) // 2])
    left, right = m.copy(), m.copy()
    left[:, cut:] = False
    right[:, :cut] = False
    return [left, right] if left.sum() > 4 and right.sum() > 4 else [m]


def _release_datum(out: Path, name: str, plane: str, normal: bool, two_part: bool, rng: np.random.Generator,
                   size: int) -> tuple[dict, dict] | None:
    """Images, masks and the datum dict of one datum (None: the finding missed the key slice).

    ``two_part``: draw the first finding's mask as two abnormality ids sharing one ``group_id``.
    """
    a = sample_anatomy(rng, z_apex=0.0)
    if normal:
        a.findings = []
        zc = float(a.z_base + rng.uniform(0.3, 0.8) * a.lung_h)
        yc = float(rng.uniform(-0.3, 0.3) * a.ay)
    else:
        pool = CORONAL_KINDS if plane == "coronal" else LOCALIZED_KINDS
        n = 1 + int(rng.random() < 0.35)
        a.findings = sample_findings(a, rng, kinds=[str(k) for k in rng.choice(pool, size=n, replace=False)])
        if not a.findings:
            return None
        zc, yc = kind_of(a.findings[0].kind).focus(a, a.findings[0].params)  # axial / coronal cut through it
    fov = max(float(rng.uniform(380, 430)), 2 * a.ax + 20)
    d = round(fov / size, 3)
    hu, masks = _render_plane(a, plane, zc if plane == "axial" else yc, zc, size, d, not normal)
    hu += float(rng.uniform(8, 16)) * rng.standard_normal(hu.shape, dtype=np.float32)
    key = RELEASE_CONTEXT.index(0)
    visible = [j for j, _ in enumerate(a.findings) if j in masks and masks[j][key].any()]
    if not normal and not visible:
        return None
    shown = [a.findings[j] for j in visible]
    if normal:
        window = NORMAL_WINDOWS[int(rng.integers(len(NORMAL_WINDOWS)))]
    else:
        window = LUNG_WINDOW if kind_of(shown[0].kind).category in ("lung", "pleura") else SOFT_WINDOW
    u8 = window_u8(hu, window)
    folder = f"images/{_folder(name)}"
    for k, o in enumerate(RELEASE_CONTEXT):
        write_bytes(out / folder / f"{o}.jpg", _jpeg(u8[k]))
    datum: dict = {"image": folder, "mask": f"masks/{_folder(name)}", "context": list(RELEASE_CONTEXT)}
    abn = []
    for g, j in enumerate(visible):
        f = a.findings[j]
        parts = _split_mask(masks[j][key]) if (two_part and g == 0) else [masks[j][key]]
        phrase = impression_phrase(f)
        rewritten = [finding_sentence(f, rng) for _ in range(2)]
        for part in parts:
            aid = len(abn) + 1
            write_bytes(out / datum["mask"] / f"{aid}.jpeg", _jpeg(part.astype(np.uint8) * 255))
            abn.append({"id": aid, "group_id": g + 1, "label": f.label, "category": kind_of(f.kind).category,
                        "description": phrase[0].upper() + phrase[1:], "rewritten_findings": rewritten})
    if abn:
        datum["abnormality"] = abn
    a.findings = shown
    text = compose_text(a, rng)
    cot = {"id": name, "findings": text["findings"], "impression": text["impression"], "steps": text["steps"]}
    return datum, cot


def _folder(name: str) -> str:
    """Image / mask folder name of a datum (its id with path-unsafe characters replaced)."""
    return "".join(ch if ch.isalnum() or ch in "_-" else "_" for ch in name)


def _datum_name(seed: int, i: int) -> str:
    # Every fourth id (i % 4 == 1) is not a safe case id (a space and a dot), as real ids can be.
    return f"omni s{seed}.{i:04d}" if i % 4 == 1 else f"omni_s{seed}_{i:04d}"


def _dump(obj) -> bytes:
    return (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode()


def _write_release(out: Path, cases: int, grid: str, seed: int, faults: bool) -> dict:
    """The OmniAbnorm-CT-14K release layout (see the module docstring)."""
    size = get_grid(grid).omni_size
    n_total = cases + (len(OMNI_FAULT_KINDS) if faults else 0)
    datums: dict[str, dict] = {}
    plane_of: dict[str, str] = {}
    split_of: dict[str, str] = {}
    cots = []
    notes: dict[str, list] = {"coronal": [], "normal": [], "grouped": [], "unsafe_id": [], "missing_context": [],
                              "valid": []}
    for i in range(n_total):
        name = _datum_name(seed, i)
        fault = i >= cases  # fault datums: axial, abnormal, train
        plane_of[name] = "coronal" if i % 3 == 1 and not fault else "axial"
        split_of[name] = "valid" if i % 5 == 4 and not fault else "train"
        normal = i % 4 == 2 and not fault
        for attempt in range(64):
            rng = np.random.default_rng([seed, 2000 + i, attempt])
            res = _release_datum(out, name, plane_of[name], normal, i % 4 == 0, rng, size)
            if res is not None:
                break
        else:  # pragma: no cover - the phantom always has a visible finding within a few draws
            raise RuntimeError(f"no visible finding for datum {i} after 64 draws")
        datum, cot = res
        if i % 5 == 3 and not fault:
            (out / datum["image"] / "1.jpg").unlink()  # listed in ``context``, file absent: allowed
            notes["missing_context"].append({"datum": name, "offset": 1})
        for key, cond in (("coronal", plane_of[name] == "coronal"), ("normal", "abnormality" not in datum),
                          ("grouped", len({a["group_id"] for a in datum.get("abnormality", [])})
                           < len(datum.get("abnormality", []))),
                          ("unsafe_id", i % 4 == 1), ("valid", split_of[name] == "valid")):
            if cond:
                notes[key].append(name)
        datums[name] = datum
        cots.append(cot)
    fault_records = []
    if faults:
        fault_names = [_datum_name(seed, i) for i in range(cases, n_total)]
        fault_records = _release_faults(out, datums, fault_names, size)
    _write_release_json(out, datums, plane_of, split_of)
    write_bytes(out / COT_JSONL, "".join(json.dumps(c, sort_keys=True) + "\n" for c in cots).encode())
    manifest = {"seed": seed, "grid": grid, "cases": cases, "layout": "release", "faults": fault_records,
                "notes": notes}
    write_bytes(out / FAULTS_JSON, _dump(manifest))
    records = [{"id": n, "plane": plane_of[n], "split": split_of[n], **d} for n, d in datums.items()]
    return {"records": records, "faults": fault_records}


def _release_faults(out: Path, datums: dict[str, dict], fault_names: list[str], size: int) -> list[dict]:
    """Break the fault datums (one per ``OMNI_FAULT_KINDS``) on disk or in their dict; their records."""
    fault_records = []
    for name, kind in zip(fault_names, OMNI_FAULT_KINDS):
        datum = datums[name]
        fr = {"case": name, "kind": kind}
        key = out / datum["image"] / "0.jpg"
        if kind == "missing_image":
            key.unlink()
            fr["detail"] = "key slice 0.jpg absent from the image folder"
        elif kind == "truncated_jpeg":
            write_bytes(key, key.read_bytes()[:200])
            fr["detail"] = "key slice cut to 200 bytes"
        elif kind == "mask_size_mismatch":
            aid = datum["abnormality"][0]["id"]
            write_bytes(out / datum["mask"] / f"{aid}.jpeg", _jpeg(np.zeros((size // 2, size // 2), np.uint8)))
            fr["detail"] = "mask is half the key slice's size"
        elif kind == "path_in_name":
            datum["image"] = "../../" + datum["image"]
            fr["detail"] = "image path leaves the source folder"
        fault_records.append(fr)
    return fault_records


def _absolute(datum: dict) -> dict:
    # Plane JSONs hold absolute paths of the machine that made them (as released).
    out_d = dict(datum)
    for k in ("image", "mask"):
        if not out_d[k].startswith(".."):
            out_d[k] = f"{FOREIGN_ROOT}/{out_d[k]}"
    return out_d


def _grouped(datum: dict) -> dict:
    """The datum as a ``_grouped`` file holds it: ``abnormality_group`` {group id: [abnormality]}."""
    out_d = {k: v for k, v in datum.items() if k != "abnormality"}
    if "abnormality" in datum:
        groups: dict[str, list] = {}
        for a in datum["abnormality"]:
            groups.setdefault(str(a["group_id"]), []).append(a)
        out_d["abnormality_group"] = groups
    return out_d


def _write_release_json(out: Path, datums: dict[str, dict], plane_of: dict[str, str], split_of: dict[str, str]) -> None:
    """The release's datum JSON files: per plane and split, the grouped axial variant, merged_train."""
    for plane in ("axial", "coronal"):
        for split in ("train", "valid"):
            sel = {n: _absolute(d) for n, d in datums.items() if plane_of[n] == plane and split_of[n] == split}
            write_bytes(out / plane / f"{plane}_{split}.json", _dump(sel))
    axial_train = {n: _grouped(_absolute(d)) for n, d in datums.items()
                   if plane_of[n] == "axial" and split_of[n] == "train"}
    write_bytes(out / "axial" / "axial_train_grouped.json", _dump(axial_train))
    # merged_train.json sits at OUT: its paths are relative to OUT (the reader resolves against the JSON's folder)
    write_bytes(out / "merged_train.json", _dump({n: d for n, d in datums.items() if split_of[n] == "train"}))


LAYOUTS = ("release", "batches")


def write_omniabnorm(out: Path, cases: int = 40, grid: str = "demo", seed: int = 0, faults: bool = False,
                     layout: str = "release") -> dict:
    """Write synthetic OmniAbnorm-CT data.

    Args:
        out: the dataset folder (release) or one batch folder (e.g. ``omni/batch_02``); created.
        cases: number of datums / records; fault cases come on top.
        grid: "demo" | "small" | "full": image size 160 / 256 / 512 px.
        seed: also part of every id (``omni_s{seed}_...``).
        faults: add one datum per ``OMNI_FAULT_KINDS``, listed in ``faults.json``.
        layout: "release" (OmniAbnorm-CT-14K's JSON per plane and split) or "batches" (older
            list-of-records batch folder). See the module docstring.

    Returns:
        {"records": [...], "faults": [...]} (release records carry their datum id as ``id``).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"unknown omniabnorm layout {layout!r}; choose one of: {', '.join(LAYOUTS)}")
    out = Path(out)
    if layout == "release":
        return _write_release(out, cases, grid, seed, faults)
    return _write_batches(out, cases, grid, seed, faults)


def _write_batches(out: Path, cases: int, grid: str, seed: int, faults: bool) -> dict:
    """The older layout: one batch folder with a list of records (see the module docstring)."""
    size = get_grid(grid).omni_size
    records, cots = [], []
    i = 0
    attempt = 0
    while len(records) < cases + (len(OMNI_FAULT_KINDS) if faults else 0):
        case_id = f"omni_s{seed}_{i:04d}"
        res = _case(out, case_id, np.random.default_rng([seed, 1000 + i, attempt]), size)
        if res is None:  # finding not on the key slice: resample this id
            attempt += 1
            continue
        records.append(res[0])
        cots.append(res[1])
        i, attempt = i + 1, 0
    fault_records = []
    if faults:
        for rec, kind in zip(records[cases:], OMNI_FAULT_KINDS):
            fr = {"case": rec["id"], "kind": kind}
            if kind == "missing_image":
                (out / rec["image"]).unlink()
                fr["detail"] = "key slice 0.jpg referenced but absent"
            elif kind == "truncated_jpeg":
                p = out / rec["image"]
                write_bytes(p, p.read_bytes()[:200])
                fr["detail"] = "key slice cut to 200 bytes"
            elif kind == "mask_size_mismatch":
                write_bytes(out / rec["mask"][0], _jpeg(np.zeros((size // 2, size // 2), np.uint8)))
                fr["detail"] = "mask is half the key slice's size"
            elif kind == "path_in_name":
                rec["image"] = "../" + rec["image"]
                fr["detail"] = "image path leaves the batch folder"
            fault_records.append(fr)
    write_bytes(out / RECORDS_JSON, (json.dumps(records, indent=1, sort_keys=True) + "\n").encode())
    write_bytes(out / COT_JSONL, "".join(json.dumps(c, sort_keys=True) + "\n" for c in cots).encode())
    manifest = {"seed": seed, "grid": grid, "cases": cases, "faults": fault_records}
    write_bytes(out / FAULTS_JSON, (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode())
    return {"records": records, "faults": fault_records}
