"""Synthetic CT-RATE: layout, CSVs, v1/v2 headers, masks, findings <-> text <-> labels, determinism."""

from __future__ import annotations

import ast
import gzip
import json
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from ctprep.schema import ABNORMALITY_LABELS
from ctprep.synth import FAULT_KINDS, write_ctrate
from ctprep.synth.anatomy import LUNG_IDS, Grid, effusion_at, lobe_at, render_chest, render_head, sample_anatomy
from ctprep.synth.findings import sample_findings
from ctprep.synth.ctrate import (
    COT_JSONL,
    LABELS_CSV,
    METADATA_CSV,
    REPORTS_CSV,
    plan_scans,
)
from tests.synth_helpers import is_v1, load_canonical_hu, load_canonical_mask, read_csv

CASES, SEED = 14, 3
NAME_RE = re.compile(r"^(train|valid)/(\1_\d+)/(\2_[a-h])/(\3_\d+)\.nii\.gz$")


@pytest.fixture(scope="module")
def ds(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ctrate")
    write_ctrate(out, cases=CASES, grid="demo", seed=SEED, faults=True)
    return out


@pytest.fixture(scope="module")
def meta(ds) -> dict[str, dict]:
    rows = {}
    for sp in METADATA_CSV:
        rows.update({r["VolumeName"]: r for r in read_csv(ds / METADATA_CSV[sp])[1]})
    return rows


def _normal_volumes(ds: Path) -> list[Path]:
    faults = {f["path"] for f in json.loads((ds / "faults.json").read_text())["faults"]}
    vols = sorted(p.relative_to(ds).as_posix() for sp in ("train", "valid") for p in (ds / sp).rglob("*.nii.gz"))
    return [ds / v for v in vols if v not in faults]


def test_layout_nested_names_and_masks_load(ds):
    vols = _normal_volumes(ds)
    assert len(vols) == CASES
    splits = {v.relative_to(ds).parts[0] for v in vols}
    assert splits == {"train", "valid"}
    for v in vols:
        rel = v.relative_to(ds).as_posix()
        assert NAME_RE.match(rel), rel
        img = nib.load(str(v))
        m = nib.load(str(ds / "masks" / rel))
        assert img.shape == m.shape and np.allclose(img.affine, m.affine)
        assert np.asarray(m.dataobj).dtype == np.uint8
        assert img.get_fdata(dtype=np.float32).std() > 50


def test_several_reconstructions_share_one_report(ds):
    _, reports = read_csv(ds / REPORTS_CSV["train"])
    by_scan: dict[str, set] = {}
    for r in reports:
        by_scan.setdefault(r["VolumeName"].rsplit("_", 1)[0], set()).add((r["Findings_EN"], r["Impressions_EN"]))
    assert any(len([r for r in reports if r["VolumeName"].startswith(s + "_")]) > 1 for s in by_scan)
    assert all(len(texts) == 1 for texts in by_scan.values())
    # Reports differ between scans (retrieval must be learnable).
    assert len({next(iter(t)) for t in by_scan.values()}) >= 0.9 * len(by_scan)


def test_csv_columns_exact(ds):
    required = {"VolumeName", "XYSpacing", "ZSpacing", "RescaleSlope", "RescaleIntercept", "ImageOrientationPatient",
                "ImagePositionPatient", "Rows", "Columns", "NumberofSlices"}  # fmt: skip
    for sp in ("train", "valid"):
        cols, rows = read_csv(ds / METADATA_CSV[sp])
        assert required <= set(cols) and cols[0] == "VolumeName" and rows
        assert all(isinstance(ast.literal_eval(r["XYSpacing"]), list) for r in rows)
        cols, rows = read_csv(ds / REPORTS_CSV[sp])
        assert cols == ["VolumeName", "ClinicalInformation_EN", "Technique_EN", "Findings_EN", "Impressions_EN"]
        assert all(all(r[c].strip() for c in cols) for r in rows)  # missing sections say "Not given."
        cols, rows = read_csv(ds / LABELS_CSV[sp])
        assert cols == ["VolumeName", *ABNORMALITY_LABELS]
        assert all(r[c] in ("0", "1") for r in rows for c in ABNORMALITY_LABELS)
    assert (ds / "metadata/validation_metadata.csv").exists()
    assert (ds / "multi_abnormality_labels/valid_predicted_labels.csv").exists()


def test_v1_needs_csv_slope_intercept(ds, meta):
    seen = 0
    for v in _normal_volumes(ds):
        img = nib.load(str(v))
        if not is_v1(img):
            continue
        seen += 1
        assert img.header.get_zooms() == (1.0, 1.0, 1.0)
        assert np.isnan(img.header["scl_slope"]) or img.header["scl_slope"] in (0, 1)
        raw = np.asarray(img.dataobj).astype(np.float32)
        row = meta[v.name]
        slope, icpt = float(row["RescaleSlope"]), float(row["RescaleIntercept"])
        hu = raw * slope + icpt
        assert raw.min() >= 0 and np.percentile(raw, 1) < 100  # raw air is ~0, not -1000
        assert -1100 < np.percentile(hu, 1) < -900  # one application reaches HU air
        assert np.percentile(hu, 99.9) < 3100
        assert np.percentile(hu * slope + icpt, 1) < -1900  # applying twice is detectably wrong
    assert seen >= 2


def test_v2_affine_matches_metadata_and_orientations_mix(ds, meta):
    codes = set()
    for v in _normal_volumes(ds):
        img = nib.load(str(v))
        if is_v1(img):
            continue
        row = meta[v.name]
        dy, dx = ast.literal_eval(row["XYSpacing"])
        assert np.allclose(img.header.get_zooms(), (dx, dy, float(row["ZSpacing"])), atol=1e-3)
        assert img.shape == (int(row["Columns"]), int(row["Rows"]), int(row["NumberofSlices"]))
        assert np.asarray(img.dataobj).dtype == np.int16
        assert np.percentile(np.asarray(img.dataobj), 1) < -900  # already HU
        codes.add(nib.aff2axcodes(img.affine))
    assert codes == {("L", "P", "S"), ("R", "A", "S")}


def test_v1_and_v2_give_same_anatomy_in_canonical_space(ds, meta):
    """Both header styles, read correctly, put the lungs at the same RAS+ place as the phantom."""
    scans = plan_scans(CASES, "demo", SEED)
    for scan in scans[:6]:
        for vol in scan.volumes:
            hu, grid, _ = load_canonical_hu(ds / vol.relpath, meta[vol.name])
            assert grid.shape == vol.grid.shape
            assert np.allclose(grid.origin, vol.grid.origin, atol=0.01)
            z, y, x = grid.coords()
            lobes = lobe_at(scan.anatomy, z, y, x)
            # Right upper lobe (id 12) in the image is air-like where the phantom says so.
            assert np.median(hu[lobes == 12]) < -700


def test_mask_contains_lobes_heart_aorta(ds):
    for v in _normal_volumes(ds)[:5]:
        ids = set(np.unique(np.asarray(nib.load(str(ds / "masks" / v.relative_to(ds))).dataobj)).tolist())
        assert {10, 11, 12, 13, 14, 15, 16, 51, 52} <= ids
        assert len(ids & set(range(32, 44))) >= 6  # thoracic vertebrae T1-T12 by level


def test_findings_drawn_match_labels_and_text(ds, meta):
    scans = plan_scans(CASES, "demo", SEED)
    labels = {}
    for sp in ("train", "valid"):
        labels.update({r["VolumeName"]: r for r in read_csv(ds / LABELS_CSV[sp])[1]})
    keyword = {"Lung nodule": "nodule", "Pleural effusion": "pleural effusion", "Cardiomegaly": "cardiomegaly",
               "Emphysema": "emphysema", "Consolidation": "consolidation", "Lung opacity": "ground-glass",
               "Atelectasis": "atelectasis", "Arterial wall calcification": "aorta", "Coronary artery wall calcification":
               "coronary", "Pericardial effusion": "pericardial effusion", "Lymphadenopathy": "lymphadenopathy",
               "Hiatal hernia": "hiatal hernia", "Medical material": "pacemaker", "Mosaic attenuation pattern": "mosaic",
               "Pulmonary fibrotic sequela": "fibrotic", "Interlobular septal thickening": "septal",
               "Bronchiectasis": "bronchiectasis", "Peribronchial thickening": "peribronchial"}  # fmt: skip
    assert set(keyword) == set(ABNORMALITY_LABELS)
    checked = {"nodule": 0, "effusion": 0}
    for scan in scans:
        vol = scan.volumes[0]
        row = labels[vol.name]
        for lab, word in keyword.items():
            assert (row[lab] == "1") == (word in scan.text["impression"].lower()), (vol.name, lab)
        assert [int(row[n]) for n in ABNORMALITY_LABELS] == scan.labels
        fs = {f.kind: f for f in scan.anatomy.findings}
        if not ({"nodule", "effusion"} & set(fs)):
            continue
        hu, grid, img = load_canonical_hu(ds / vol.relpath, meta[vol.name])
        mask = load_canonical_mask(ds / "masks" / vol.relpath, img)
        z, y, x = grid.coords()
        if "nodule" in fs:
            p = fs["nodule"].params
            c, r = p["center"], p["radius"]
            ball = (z - c[0]) ** 2 + (y - c[1]) ** 2 + (x - c[2]) ** 2 <= (0.6 * r) ** 2
            assert ball.sum() > 0
            assert np.median(hu[ball]) > -250, "nodule not dense"  # lung is ~ -850
            assert set(np.unique(mask[ball]).tolist()) == {p["lobe"]}, "nodule not in its named lobe"
            checked["nodule"] += 1
        if "effusion" in fs:
            for side, depth in fs["effusion"].params["sides"].items():
                zone = effusion_at(scan.anatomy, int(side), depth, z, y, x)
                fluid = zone & (mask == 0)
                assert fluid.sum() > 50
                assert -20 < np.median(hu[fluid]) < 40, "effusion is not fluid HU"
                assert not np.isin(mask[fluid], LUNG_IDS).any()
                side_word = "right" if int(side) > 0 else "left"
                assert side_word in scan.text["findings"] or "bilateral" in scan.text["findings"].lower()
            checked["effusion"] += 1
    assert sum(checked.values()) > 0, checked


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_forced_effusion_and_nodule_drawn_where_named(seed):
    """Every kind of finding lands where its text says, on a demo-like grid."""
    rng = np.random.default_rng(seed)
    a = sample_anatomy(rng, z_apex=0.0)
    a.findings = sample_findings(a, rng, kinds=["nodule", "effusion", "cardiomegaly", "emphysema"])
    kinds = {f.kind: f for f in a.findings}
    assert set(kinds) == {"nodule", "effusion", "cardiomegaly", "emphysema"}
    grid = Grid((60, 160, 160), (5.0, 2.6, 2.6), (a.z_base - 40, -79.5 * 2.6, -79.5 * 2.6))
    hu, lab, masks = render_chest(a, grid, finding_masks=True)
    z, y, x = grid.coords()
    p = kinds["nodule"].params
    c, r = p["center"], p["radius"]
    ball = (z - c[0]) ** 2 + (y - c[1]) ** 2 + (x - c[2]) ** 2 <= (0.6 * r) ** 2
    assert ball.any() and np.median(hu[ball]) > -250 and set(np.unique(lab[ball]).tolist()) == {p["lobe"]}
    for side, depth in kinds["effusion"].params["sides"].items():
        fluid = effusion_at(a, int(side), depth, z, y, x) & (lab == 0)
        assert fluid.sum() > 50 and -20 < np.median(hu[fluid]) < 40
    upper = np.isin(lab, (10, 12)) & ~ball
    lower = np.isin(lab, (11, 14)) & ~ball
    assert np.median(hu[upper]) < np.median(hu[lower]) - 30  # emphysema darkens the upper lobes
    assert all(m.any() for m in masks.values())


def test_cot_records(ds):
    recs = [json.loads(line) for line in (ds / COT_JSONL).read_text().splitlines()]
    names = {r["VolumeName"] for r in recs}
    assert {v.name for v in _normal_volumes(ds)} <= names
    kinds = {type(r["steps"][0]).__name__ for r in recs}
    assert kinds == {"str", "dict"}
    for r in recs:
        steps = [s if isinstance(s, str) else s["text"] for s in r["steps"]]
        if isinstance(r["steps"][0], dict):
            assert [s["step"] for s in r["steps"]] == list(range(1, len(steps) + 1))
        joined = " ".join(steps).lower()
        for word in ("airways", "right upper lobe", "left lower lobe", "pleura", "heart", "aorta", "esophagus", "bones"):
            assert word in joined
        assert r["findings"] and r["impression"] and steps[-1].startswith("Conclusion")


def test_faults_manifest_and_files(ds, meta):
    manifest = json.loads((ds / "faults.json").read_text())
    f = {r["kind"]: r for r in manifest["faults"]}
    assert set(f) == set(FAULT_KINDS)
    _, reports = read_csv(ds / REPORTS_CSV["train"])
    report_names = {r["VolumeName"] for r in reports}
    with pytest.raises(Exception):
        nib.load(str(ds / f["truncated_gzip"]["path"])).get_fdata()
    assert not np.asarray(nib.load(str(ds / f["all_zero"]["path"])).dataobj).any()
    assert not np.isfinite(np.asarray(nib.load(str(ds / f["nan_inf"]["path"])).dataobj)).all()
    mm = f["mask_grid_mismatch"]
    assert nib.load(str(ds / mm["path"])).shape != nib.load(str(ds / mm["mask"])).shape
    assert f["missing_report"]["volume_name"] not in report_names
    assert f["missing_metadata"]["volume_name"] not in meta
    assert is_v1(nib.load(str(ds / f["missing_metadata"]["path"])))
    assert float(meta[f["implausible_spacing"]["volume_name"]]["ZSpacing"]) == 0
    nc = np.asarray(nib.load(str(ds / f["non_chest"]["mask"])).dataobj)
    assert not np.isin(nc, LUNG_IDS).any()
    un = f["unsafe_name"]
    assert (ds / un["path"]).exists() and re.search(r"[ #()]", un["volume_name"])
    assert un["volume_name"] in meta
    pn = f["path_in_name"]
    assert "/" in pn["volume_name"] and pn["path"] is None and pn["volume_name"] in meta
    # Fault cases other than the two name faults keep the normal naming scheme.
    for kind, r in f.items():
        if kind not in ("unsafe_name", "path_in_name"):
            assert NAME_RE.match(r["path"]), r


def test_same_seed_byte_identical(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    write_ctrate(a, cases=3, seed=11, faults=True)
    write_ctrate(b, cases=3, seed=11, faults=True)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    for rel in files:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    vol = next(p for p in a.rglob("*.nii.gz") if "masks" not in p.parts)
    assert vol.read_bytes()[4:8] == b"\0\0\0\0"  # gzip mtime field is 0
    with gzip.open(vol) as fh:
        assert fh.read(4)  # valid gzip
    w = tmp_path / "w"  # two worker processes write the same bytes
    write_ctrate(w, cases=3, seed=11, faults=True, workers=2)
    assert files == sorted(p.relative_to(w) for p in w.rglob("*") if p.is_file())
    for rel in files:
        assert (a / rel).read_bytes() == (w / rel).read_bytes(), rel
    with pytest.raises(ValueError, match="workers"):
        write_ctrate(tmp_path / "bad", cases=3, workers=0)
    c = tmp_path / "c"
    write_ctrate(c, cases=3, seed=12)
    assert (a / "metadata/train_metadata.csv").read_bytes() != (c / "metadata/train_metadata.csv").read_bytes()


def test_every_finding_kind_draws_something():
    from ctprep.synth.findings import FINDING_KINDS

    rng = np.random.default_rng(5)
    a = sample_anatomy(rng, z_apex=0.0)
    a.findings = sample_findings(a, rng, kinds=list(FINDING_KINDS))
    assert {f.kind for f in a.findings} == set(FINDING_KINDS)
    assert {f.label for f in a.findings} == set(ABNORMALITY_LABELS)  # every CT-RATE label can be drawn
    grid = Grid((60, 160, 160), (5.0, 2.6, 2.6), (a.z_base - 40, -79.5 * 2.6, -79.5 * 2.6))
    hu, lab, masks = render_chest(a, grid, finding_masks=True)
    drawn_alone = {"cardiomegaly"}  # drawn by scaling the heart, no separate mask
    for i, f in enumerate(a.findings):
        if f.kind not in drawn_alone:
            assert i in masks and masks[i].any(), f.kind


def test_chest_check_keeps_severe_emphysema_and_rejects_a_head():
    """resample's not_chest check: dark (emphysematous) lungs still count as lungs; a head does not."""
    from ctprep.stages.resample import lung_fraction

    rng = np.random.default_rng(5)
    a = sample_anatomy(rng, z_apex=0.0)
    grid = Grid((32, 128, 128), (10.0, 3.0, 3.0), (a.z_base - 20, -63.5 * 3.0, -63.5 * 3.0))
    normal, lab = render_chest(a, grid)[:2]
    dark = normal.copy()
    dark[np.isin(lab, LUNG_IDS)] = -990.0  # every lung voxel at severe-emphysema density
    head = render_head(grid, center_z=grid.origin[0] + 160.0)[0]
    f_normal, f_dark, f_head = lung_fraction(normal), lung_fraction(dark), lung_fraction(head)
    assert f_normal > 0.15 and abs(f_dark - f_normal) < 0.02  # the lungs are found whatever their HU
    assert f_head < 0.03  # outside air around the skull is not inside the body
    assert f_normal > 2 * 0.08 > 0.08 > 2 * f_head  # the default min_lung_fraction (0.08) lies well between
