"""Write a synthetic OmniAbnorm-CT batch (see /work/notes/readme-synth.md for the record format).

Layout of one batch folder ``out``::

    records.json            list of records (one per case), sorted by id
    cot.jsonl               one CoT record per case: {"id", "steps", "findings", "impression"}
    faults.json             {"seed", "grid", "cases", "faults": [...]}
    <id>/0.jpg              key slice, 8-bit, windowed with the record's ``windows``
    <id>/-2.jpg ... 2.jpg   context slices; offset k lies k * 5 mm superior (+) / inferior (-)
    <id>/mask_<n>.jpeg      binary mask (0 / 255) of abnormality n on the key slice

Images are axial slices of the same phantoms as the CT-RATE volumes, shown in the
radiological view: rows run anterior -> posterior, columns patient right -> left.
Case ids are ``omni_s{seed}_{i:04d}``, so batches made with different seeds never collide.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

from ctprep.synth.anatomy import Anatomy, Grid, render_chest, sample_anatomy
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
LOCALIZED_KINDS = (
    "nodule", "consolidation", "opacity", "effusion", "lymphadenopathy", "pericardial_effusion", "atelectasis",
    "hiatal_hernia", "aortic_calcification",
)  # fmt: skip
CATEGORY = {
    "nodule": "lung", "consolidation": "lung", "opacity": "lung", "atelectasis": "lung", "effusion": "pleura",
    "lymphadenopathy": "mediastinum", "pericardial_effusion": "heart", "hiatal_hernia": "esophagus",
    "aortic_calcification": "vessel",
}  # fmt: skip
OMNI_FAULT_KINDS = ("missing_image", "truncated_jpeg", "mask_size_mismatch", "path_in_name")


def _focus_z(a: Anatomy, kind: str, p: dict) -> float:
    """Height (mm) of an axial slice that cuts through the finding."""
    if "center" in p:
        return float(p["center"][0])
    if kind == "lymphadenopathy":
        return float(p["nodes"][0]["center"][0])
    if kind == "pericardial_effusion":
        return float(a.heart_c[0])
    if kind == "aortic_calcification":
        return float(a.z_carina)
    return float(a.z_base + 0.22 * a.lung_h)  # effusion, atelectasis: lung bases


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
    zc = _focus_z(a, key.kind, key.params)
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
    window = LUNG_WINDOW if CATEGORY[shown[0].kind] in ("lung", "pleura") else SOFT_WINDOW
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
                    "label": f.label, "category": CATEGORY[f.kind], "mask": rel})  # fmt: skip
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


def write_omniabnorm(out: Path, cases: int = 40, grid: str = "demo", seed: int = 0, faults: bool = False,
                     layout: str = "batches") -> dict:
    """Write one synthetic OmniAbnorm-CT batch folder.

    Args:
        out: the batch folder (e.g. ``omni/batch_02``), created.
        cases: number of cases (records); fault cases come on top.
        grid: "demo" | "small" | "full": image size 160 / 256 / 512 px.
        seed: also part of every case id (``omni_s{seed}_{i:04d}``).
        faults: add one case per ``OMNI_FAULT_KINDS``, listed in ``faults.json``.

    Returns:
        {"records": [...], "faults": [...]}.
    """
    out = Path(out)
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
