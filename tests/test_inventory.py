"""ctprep inventory: counts on generator trees (flat with faults, release, OmniAbnorm), header-only
reads, v1 spacing from the metadata row, JSON/PNG output, exit codes, nothing written into a source."""

from __future__ import annotations

import csv
import gzip
import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from ctprep.cli import app
from ctprep.config import load_config
from ctprep.inventory import (
    HuAccumulator,
    NiftiHeaderInfo,
    build_inventory,
    mask_grid_problem,
    obliquity_deg,
    read_nifti_header,
    render_table,
    sample_indices,
    volume_geometry,
)
from ctprep.quarantine import QuarantineError
from ctprep.sources import detect_source
from ctprep.synth.ctrate import write_ctrate

runner = CliRunner()


def _faults(root: Path) -> dict[str, dict]:
    return {f["kind"]: f for f in json.loads((root / "faults.json").read_text())["faults"]}


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``root``: (size, mtime_ns); folders too, so a new empty folder shows."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            st = os.stat(os.path.join(dirpath, name))
            out[os.path.relpath(os.path.join(dirpath, name), root)] = (st.st_size, st.st_mtime_ns)
    return out


def _invoke(*args: str):
    return runner.invoke(app, ["inventory", "--quiet", *args])


@pytest.fixture(scope="module")
def flat(synthetic_ctrate) -> Path:
    return synthetic_ctrate(cases=4, seed=5, faults=True)


@pytest.fixture(scope="module")
def flat_run(flat, tmp_path_factory):
    """The CLI on the flat tree with every volume in the HU sample; (result, out, snapshot before)."""
    out = tmp_path_factory.mktemp("inv_flat_out") / "inv"
    before = _snapshot(flat)
    result = _invoke("--src", str(flat), "--out", str(out), "--hu-sample", "100")
    return result, out, before


# ----------------------------------------------------------------------------- pure parts
def test_volume_geometry_names_the_slice_axis_by_patient_direction():
    # Coronal acquisition: voxel axis j runs superior (3 mm), i right->left 0.7 mm, k anterior 0.8 mm.
    aff = np.array([[-0.7, 0, 0, 0], [0, 0, 0.8, 0], [0, 3.0, 0, 0], [0, 0, 0, 1]])
    spacing, shape = volume_geometry(aff, [100, 40, 120])
    assert spacing == [3.0, 0.8, 0.7]
    assert shape == [40, 120, 100]
    # A 0 mm z spacing (bad metadata) keeps its axis: the normal of the other two.
    aff0 = np.diag([0.7, 0.7, 0.0, 1.0])
    assert volume_geometry(aff0, [512, 512, 300]) == ([0.0, 0.7, 0.7], [300, 512, 512])
    # obliquity: 5 degrees of in-plane rotation; spacing is the column length, not the diagonal
    t = np.radians(5)
    rot = np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1]]) @ np.diag([0.7, 0.7, 2.0])
    assert obliquity_deg(rot) == pytest.approx(5.0, abs=1e-3) and obliquity_deg(aff) == 0.0
    assert volume_geometry(rot, [10, 10, 4])[0] == [2.0, 0.7, 0.7]


def test_mask_grid_check_accepts_reordered_axes_only():
    img_aff = np.array([[0.7, 0, 0, 0], [0, 0.7, 0, 0], [0, 0, 2.5, 0], [0, 0, 0, 1.0]])
    img = NiftiHeaderInfo([100, 120, 40], "int16", "v2", img_aff.tolist(), 0)
    # the same grid stored with i and j swapped and x flipped (e.g. a mask made on the other twin)
    swapped = np.array([[0, -0.7, 0, 69.3], [0.7, 0, 0, 0], [0, 0, 2.5, 0], [0, 0, 0, 1.0]])
    ok = NiftiHeaderInfo([120, 100, 40], "uint8", "v2", swapped.tolist(), 0)
    assert mask_grid_problem(ok, img, img_aff, [2.5, 0.7, 0.7]) is None
    half = NiftiHeaderInfo([50, 60, 40], "uint8", "v2", np.diag([1.4, 1.4, 2.5, 1.0]).tolist(), 0)
    assert "mask shape [40, 60, 50]" in mask_grid_problem(half, img, img_aff, [2.5, 0.7, 0.7])
    coarse = NiftiHeaderInfo([100, 120, 40], "uint8", "v2", np.diag([0.8, 0.8, 2.5, 1.0]).tolist(), 0)
    assert "mask spacing" in mask_grid_problem(coarse, img, img_aff, [2.5, 0.7, 0.7])
    blank = NiftiHeaderInfo([100, 120, 40], "uint8", "v1", np.eye(4).tolist(), 0)  # read in the volume's order
    assert mask_grid_problem(blank, img, img_aff, [2.5, 0.7, 0.7]) is None


def test_sample_indices_spread_and_deterministic():
    assert sample_indices(100, 5) == [0, 25, 50, 74, 99]
    assert sample_indices(3, 16) == [0, 1, 2]
    assert sample_indices(0, 4) == [] and sample_indices(10, 0) == []


def test_hu_accumulator_histogram_and_percentiles():
    acc = HuAccumulator()
    vol = np.full((40, 40, 40), -1000, dtype=np.int16)
    vol[20:] = 40  # half air, half soft tissue
    acc.add("a", vol)
    acc.fail("b", "nonfinite", "3 NaN/inf voxels")
    js = acc.to_json()
    assert js["volumes"] == 1 and js["voxels"] == 40 ** 3
    assert js["percentiles"]["p5"] == pytest.approx(-1000, abs=16)
    assert js["percentiles"]["p95"] == pytest.approx(40, abs=16)
    assert sum(js["counts"]) == js["voxels"]
    assert js["failed"] == [{"case": "b", "kind": "nonfinite", "reason": "3 NaN/inf voxels"}]


def test_header_read_inflates_only_the_header(tmp_path):
    """Corrupt the deflate stream past the header: a whole-file inflate fails, the header read does not."""
    data = np.arange(64 * 64 * 64, dtype=np.int16).reshape(64, 64, 64) % 977  # compresses poorly enough
    aff = np.diag([0.8, 0.8, 2.5, 1.0])
    path = tmp_path / "v.nii.gz"
    nib.save(nib.Nifti1Image(data, aff), path)
    blob = bytearray(path.read_bytes())
    mid = len(blob) // 2
    blob[mid:mid + 64] = bytes(64)  # damage the middle; gzip trailer (CRC, size) untouched
    path.write_bytes(bytes(blob))
    with pytest.raises(Exception):
        gzip.decompress(bytes(blob))
    h = read_nifti_header(path)
    assert h.shape_ijk == [64, 64, 64] and h.dtype == "int16" and h.style == "v2"
    assert volume_geometry(h.affine, h.shape_ijk)[0] == [2.5, 0.8, 0.8]


def test_header_read_flags_truncated_and_non_nifti(tmp_path):
    data = np.zeros((32, 32, 16), dtype=np.int16)
    path = tmp_path / "t.nii.gz"
    nib.save(nib.Nifti1Image(data, np.eye(4)), path)
    assert read_nifti_header(path).style == "v1"  # identity affine = blank header
    blob = path.read_bytes()
    path.write_bytes(blob[: len(blob) * 3 // 5])
    with pytest.raises(QuarantineError, match="truncated"):
        read_nifti_header(path)
    plain = tmp_path / "p.nii"
    nib.save(nib.Nifti1Image(data, np.diag([0.7, 0.7, 1.5, 1.0])), plain)
    assert read_nifti_header(plain).shape_ijk == [32, 32, 16]
    plain.write_bytes(plain.read_bytes()[:-100])
    with pytest.raises(QuarantineError, match="truncated"):
        read_nifti_header(plain)
    junk = tmp_path / "junk.nii.gz"
    junk.write_bytes(gzip.compress(b"not a nifti" * 10))
    with pytest.raises(QuarantineError, match="shorter than a NIfTI header"):
        read_nifti_header(junk)


# ----------------------------------------------------------------------------- flat tree with faults
def test_flat_faults_counts_and_reasons(flat, flat_run):
    result, out, _ = flat_run
    assert result.exit_code == 0, result.output
    report = json.loads((out / "inventory.json").read_text())  # written and re-loadable
    (entry,) = report["sources"]
    assert entry["source"] == "ctrate"
    c = entry["ctrate"]
    faults = _faults(flat)
    assert entry["cases"] + entry["quarantined_at_scan"] == entry["scanned"]
    assert c["quarantine"]["total"] == entry["quarantined_at_scan"]
    # scan-time reasons, by kind
    assert c["quarantine"]["by_kind"].get("missing_report", 0) >= 1
    assert c["quarantine"]["by_kind"].get("unsafe_name", 0) >= 2  # odd file name + path in a CSV row
    # the truncated volume: counted unreadable by name, not a crash
    v = c["volumes"]
    unreadable = {u["case"]: u for u in v["unreadable"]}
    assert set(unreadable) == {faults["truncated_gzip"]["case"]}
    assert unreadable[faults["truncated_gzip"]["case"]]["file"] == faults["truncated_gzip"]["path"]
    assert v["read"] == entry["cases"]
    assert sum(v["header_style"].values()) + len(v["unreadable"]) == v["read"]
    # the mask on another grid, the v1 volume without a metadata row, the 0 mm z spacing
    assert [p["case"] for p in v["mask_problems"]] == [faults["mask_grid_mismatch"]["case"]]
    bad_spacing = {p["case"]: p["reason"] for p in v["spacing_problems"]}
    assert "without a metadata row" in bad_spacing[faults["missing_metadata"]["case"]]
    assert "outside" in bad_spacing[faults["implausible_spacing"]["case"]]
    assert c["coverage"]["metadata"]["without"] == 1  # only the missing_metadata case
    assert all(c["coverage"][k]["with"] + c["coverage"][k]["without"] == entry["cases"] for k in c["coverage"])
    assert c["coverage"]["mask"]["without"] == 0
    # every readable volume with a usable spacing is in the histograms
    assert sum(v["z_spacing_mm"]["histogram"]["counts"]) == v["read"] - len(v["unreadable"]) - len(bad_spacing)
    # HU: the NaN volume is reported as not read, the all-zero one is read
    hu = entry["hu"]
    failed = {f["case"]: f["kind"] for f in hu["failed"]}
    assert failed == {faults["nan_inf"]["case"]: "nonfinite"}
    assert hu["volumes"] == v["read"] - len(v["unreadable"]) - len(bad_spacing) - 1
    assert hu["percentiles"]["p1"] < -900 < hu["percentiles"]["p99"]
    # the table names what matters
    for text in ("image folders", "quarantined at scan", "missing_report", faults["truncated_gzip"]["path"], "HU sample"):
        assert text in result.stdout


def test_flat_writes_json_png_and_nothing_in_the_source(flat, flat_run):
    result, out, before = flat_run
    assert result.exit_code == 0, result.output
    assert _snapshot(flat) == before
    png = (out / "inventory.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert sorted(p.name for p in out.iterdir()) == ["inventory.json", "inventory.png"]  # no temporaries left
    report = json.loads((out / "inventory.json").read_text())
    assert render_table(report).splitlines()[0] == result.stdout.splitlines()[0]


def test_v1_spacing_comes_from_the_metadata_row(tmp_path):
    root = tmp_path / "ctrate"
    write_ctrate(root, cases=4, grid="demo", seed=1)
    v1 = sorted(p for p in root.rglob("*.nii.gz") if "masks" not in p.parts and np.allclose(nib.load(p).affine, np.eye(4)))
    assert v1, "the generator wrote no v1 volume"
    target = v1[0].name
    meta_csv = root / "metadata" / ("train_metadata.csv" if target.startswith("train") else "validation_metadata.csv")
    with open(meta_csv, newline="") as f:
        reader = csv.DictReader(f)
        cols, rows = reader.fieldnames, list(reader)
    for r in rows:
        if r["VolumeName"] == target:
            r["ZSpacing"], r["XYSpacing"] = "4.25", "[0.625, 0.625]"
    with open(meta_csv, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)
    report = build_inventory([root], load_config("demo"), hu_sample=0)
    recs = {r["case"]: r for r in report["sources"][0]["per_volume"]}
    rec = recs[target.removesuffix(".nii.gz")]
    assert rec["style"] == "v1" and rec["spacing_from"] == "metadata"
    assert rec["spacing_zyx"] == [4.25, 0.625, 0.625]  # the header says 1 x 1 x 1
    assert nib.load(v1[0]).header.get_zooms()[:3] == (1.0, 1.0, 1.0)
    v2 = [r for r in recs.values() if r.get("style") == "v2"]
    assert v2 and all(r["spacing_from"] == "header" for r in v2)


def test_image_only_download_still_listed(tmp_path):
    """No mask tree under the root: the volumes are still inventoried and the table says build-shards
    would quarantine them under the default missing-mask policy; --masks NAME=DIR supplies them."""
    import shutil

    root = tmp_path / "ctrate"
    write_ctrate(root, cases=3, grid="demo", seed=4)
    shutil.move(str(root / "masks"), str(tmp_path / "medsam2"))  # masks kept outside the source
    n = sum(1 for _ in root.rglob("*.nii.gz"))
    out = tmp_path / "inv"
    r = _invoke("--src", str(root), "--out", str(out), "--hu-sample", "1")
    assert r.exit_code == 0, r.output
    (entry,) = json.loads((out / "inventory.json").read_text())["sources"]
    c = entry["ctrate"]
    assert entry["cases"] == n and c["coverage"]["mask"] == {"with": 0, "without": n}
    assert c["volumes"]["read"] == n and sum(c["volumes"]["header_style"].values()) == n
    assert "build-shards quarantines these" in r.stdout
    assert entry["hu"]["volumes"] == 1
    # the same masks given with --masks NAME=DIR: every volume has its anatomy mask
    r = _invoke("--src", str(root), "--out", str(out), "--hu-sample", "0", "--masks", f"medsam2={tmp_path / 'medsam2'}")
    assert r.exit_code == 0, r.output
    c = json.loads((out / "inventory.json").read_text())["sources"][0]["ctrate"]
    assert c["layout"]["anatomy_tree"] == "medsam2" and c["coverage"]["mask"] == {"with": n, "without": 0}
    assert c["volumes"]["mask_problems"] == []


# ----------------------------------------------------------------------------- CLI
def test_cli_exit_codes(tmp_path, flat, monkeypatch):
    r = _invoke("--src", str(tmp_path / "nope"), "--out", str(tmp_path / "o"))
    assert r.exit_code == 1 and r.stderr.strip().startswith("error:") and len(r.stderr.strip().splitlines()) == 1
    empty = tmp_path / "empty"
    empty.mkdir()
    r = _invoke("--src", str(empty), "--out", str(tmp_path / "o"))
    assert r.exit_code == 1 and "no known layout" in r.stderr
    r = _invoke("--src", str(flat), "--source", "dicom", "--out", str(tmp_path / "o"))
    assert r.exit_code == 1 and "unknown source" in r.stderr
    r = _invoke("--src", str(flat), "--config", "no_such_preset", "--out", str(tmp_path / "o"))
    assert r.exit_code == 1 and "preset" in r.stderr
    before = _snapshot(flat)
    r = _invoke("--src", str(flat), "--out", str(flat / "inventory"))
    assert r.exit_code == 1 and "inside --src" in r.stderr
    monkeypatch.chdir(flat)  # the default ./inventory/ would land inside the source
    r = _invoke("--src", ".")
    assert r.exit_code == 1 and "inside --src" in r.stderr
    assert _snapshot(flat) == before
    assert not (tmp_path / "o").exists()
    (tmp_path / "afile").write_text("x")  # --out that cannot be a folder
    r = _invoke("--src", str(flat), "--out", str(tmp_path / "afile"), "--hu-sample", "0")
    assert r.exit_code == 1 and r.stderr.startswith("error: cannot write the inventory") and not r.stdout


def test_cli_default_out_is_cwd_inventory(tmp_path, flat, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = _invoke("--src", str(flat), "--hu-sample", "0")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "inventory" / "inventory.json").is_file()
    assert json.loads((tmp_path / "inventory" / "inventory.json").read_text())["sources"][0]["hu"]["volumes"] == 0


# ----------------------------------------------------------------------------- release layout
def test_release_tree_duplicates_resolved_to_fixed(synthetic_ctrate, tmp_path):
    root = synthetic_ctrate(cases=4, seed=2, layout="release")
    out = tmp_path / "inv"
    r = _invoke("--src", str(root), "--out", str(out), "--hu-sample", "2")
    assert r.exit_code == 0, r.output
    c = json.loads((out / "inventory.json").read_text())["sources"][0]["ctrate"]
    kinds = {f["folder"]: f["kind"] for f in c["layout"]["image_folders"]}
    assert kinds.get("train_fixed") == "fixed" and kinds.get("train") == "original"
    trees = {m["name"]: m for m in c["layout"]["mask_trees"]}
    assert trees["ts_total"]["anatomy"] and c["layout"]["anatomy_tree"] == "ts_total"
    assert not any(m["anatomy"] for name, m in trees.items() if name != "ts_total")
    d = c["duplicates"]
    n_original = sum(f["volumes"] for f in c["layout"]["image_folders"] if f["kind"] == "original")
    assert d["cases"] == n_original > 0  # every v1 file has a fixed twin
    assert d["chosen_kind"] == {"fixed": d["cases"]} and d["by_rule"] == {"prefer fixed": d["cases"]}
    assert all(ex["chosen"].split("/")[0].endswith("_fixed") for ex in d["examples"])
    # the header, not the folder, decides v1/v2: the chosen fixed copies are v2
    assert set(c["style_by_folder_kind"]["fixed"]) == {"v2"}
    assert "prefer fixed" in r.stdout
    # --anatomy-masks picks another tree; a name that is not there is a one-line error
    r = _invoke("--src", str(root), "--out", str(out), "--hu-sample", "0", "--anatomy-masks", "ts_lung_nodules")
    assert r.exit_code == 0, r.output
    lay = json.loads((out / "inventory.json").read_text())["sources"][0]["ctrate"]["layout"]
    assert lay["anatomy_tree"] == "ts_lung_nodules"
    assert [m["name"] for m in lay["mask_trees"] if m["anatomy"]] == ["ts_lung_nodules"]
    r = _invoke("--src", str(root), "--out", str(out), "--anatomy-masks", "medsam2")
    assert r.exit_code == 1 and r.stderr.startswith("error:") and "ts_total" in r.stderr


# ----------------------------------------------------------------------------- OmniAbnorm-CT
@pytest.mark.parametrize("layout", ["release", "batches"])
def test_omniabnorm_counts(synthetic_omniabnorm, tmp_path, layout):
    root = synthetic_omniabnorm(cases=5, seed=0, faults=True, layout=layout)
    assert detect_source(root) == "omniabnorm"
    out = tmp_path / "inv"
    before = _snapshot(root)
    r = _invoke("--src", str(root), "--out", str(out), "--hu-sample", "50")
    assert r.exit_code == 0, r.output
    assert _snapshot(root) == before
    (entry,) = json.loads((out / "inventory.json").read_text())["sources"]
    assert entry["source"] == "omniabnorm"
    o = entry["omniabnorm"]
    n = entry["cases"]
    assert n >= 5 and entry["cases"] + entry["quarantined_at_scan"] == entry["scanned"]
    assert sum(o["by_plane"].values()) == sum(o["by_split"].values()) == sum(o["by_json"].values()) == n
    assert o["normal"] + o["abnormal"] == n
    # the image sizes: every key slice that is there and readable has one
    sizes = sum(o["image_size_hw"].values())
    assert sizes + len(o["unreadable_images"]) + o["absent_files"]["by_role"].get("image", 0) == n
    # the deleted and the truncated key slice never crash the run: they are named somewhere
    faults = {f["kind"]: f["case"] for f in json.loads((root / "faults.json").read_text())["faults"]}
    named = (json.dumps(o["absent_files"]) + json.dumps(o["unreadable_images"]) + json.dumps(o["quarantine"])
             + json.dumps(entry["hu"]["failed"]))
    assert faults["missing_image"] in named and faults["truncated_jpeg"] in named
    assert entry["hu"]["volumes"] + len(entry["hu"]["failed"]) == n
    assert "normal / abnormal" in r.stdout
