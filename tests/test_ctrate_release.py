"""CT-RATE as downloaded: train/ + train_fixed/ twins, ts_seg/<task>/ mask trees, explicit mask
trees, the 44-column metadata, v1 geometry from ImagePositionPatient, obliquity, missing masks."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import zstandard
from typer.testing import CliRunner

from ctprep.cli import app
from ctprep.config import load_config, with_mask_options
from ctprep.quarantine import QuarantineError
from ctprep.sources import get_source
from ctprep.sources.ctrate import conform_mask, obliquity_deg, read_ctrate_volume, v1_affine
from ctprep.sources.ctrate_layout import ImageCopy, choose_copy, walk_layout
from ctprep.stages.resample import read_case_zarr
from ctprep.synth import ctrate as synth
from tests.core_helpers import oblique_free_affine, smooth_volume, write_v1, write_v2

CASES = 12
SEED = 0  # with 12 cases this seed gives v1 twins with both intercepts (-1024 and -8192)
LUNG = 1  # coarse region id of "lung" (first region of configs/regions/default.yaml)


@pytest.fixture
def release(synthetic_ctrate) -> Path:
    return synthetic_ctrate(cases=CASES, seed=SEED, layout="release")


@pytest.fixture
def release_fixed(synthetic_ctrate) -> Path:
    return synthetic_ctrate(cases=CASES, seed=SEED, layout="release-fixed")


def _build(src: Path, out: Path, *extra: str) -> tuple[int, str]:
    res = CliRunner().invoke(app, ["build-shards", "--src", str(src), "--out", str(out), "--workers", "0",
                                   "--no-progress", "--strict", *extra])
    return res.exit_code, res.output


def _samples(out: Path) -> dict[str, dict]:
    """case id -> {"meta": meta.json, "mask": mask array} of every sample in the indexed shards."""
    index = json.loads((out / "index.json").read_text())
    found: dict[str, dict] = {}
    for entries in index["splits"].values():
        for entry in entries:
            with tarfile.open(out / entry["path"]) as tar:
                for member in tar.getmembers():
                    key, _, kind = member.name.partition(".")
                    data = tar.extractfile(member).read()
                    if kind == "meta.json":
                        assert key not in found or "meta" not in found[key], f"{key} packed twice"
                        found.setdefault(key, {})["meta"] = json.loads(data)
                    elif kind.startswith("mask.npy"):
                        if kind.endswith(".zst"):
                            data = zstandard.ZstdDecompressor().decompress(data)
                        found.setdefault(key, {})["mask"] = np.load(io.BytesIO(data), allow_pickle=False)
    return found


def _planned_ids() -> set[str]:
    return {v.name.removesuffix(".nii.gz") for s in synth.plan_scans(CASES, "demo", SEED) for v in s.volumes}


# --------------------------------------------------------------------------- the generator's layouts
def test_release_layout_on_disk(release, release_fixed):
    ids = _planned_ids()
    fixed = {p.name.removesuffix(".nii.gz") for p in release.glob("*_fixed/*/*/*.nii.gz")}
    v1 = {p.name.removesuffix(".nii.gz") for p in release.glob("train/*/*/*.nii.gz")} | \
         {p.name.removesuffix(".nii.gz") for p in release.glob("valid/*/*/*.nii.gz")}
    assert fixed == ids and v1 and v1 < ids
    tasks = sorted(p.name for p in (release / "ts_seg").iterdir())
    assert tasks == ["ts_lung_nodules", "ts_pleural_pericard_effusion", "ts_total"]
    for task in tasks:
        assert {p.name.removesuffix(".nii.gz") for p in (release / "ts_seg" / task).rglob("*.nii.gz")} == ids
    header = (release / "metadata" / "train_metadata.csv").read_text().splitlines()[0].split(",")
    assert len(header) == 44
    rows = get_source("ctrate").scan(release)[0]
    intercepts = {c.meta["RescaleIntercept"] for c in rows if c.provenance["kind"] == "fixed" and len(c.provenance["copies"]) > 1}
    assert intercepts == {"-1024", "-8192"}
    assert any(c.meta["RescaleType"] == "" for c in rows)
    assert not any(release_fixed.glob("train/*/*/*.nii.gz"))


def test_full_grid_release_has_a_1024_volume_first():
    preset = synth.get_grid("full")
    scan = synth._scan(0, "train", 1, 0, 2, preset, big=True)
    first, second = scan.volumes
    assert first.grid.shape[1:] == (1024, 1024) and first.meta["Rows"] == 1024 == first.meta["Columns"]
    assert 0.3 < first.grid.spacing[1] < 0.45
    assert second.grid.shape[1] == 512
    assert synth.release_metadata(first)["Rows"] == 1024


# --------------------------------------------------------------------------- build-shards
@pytest.mark.parametrize("layout", ["release", "release_fixed"])
def test_release_builds_every_volume_once_with_anatomy_masks(layout, request, tmp_path):
    src = request.getfixturevalue(layout)
    code, output = _build(src, tmp_path / "out")
    assert code == 0, output
    assert "anatomy masks: ts_total" in output
    assert "ts_lung_nodules" in output and "ts_pleural_pericard_effusion" in output  # noted as not used
    samples = _samples(tmp_path / "out")
    assert set(samples) == _planned_ids()
    for cid, s in samples.items():
        assert s["meta"]["has_mask"] is True
        assert (s["mask"] == LUNG).mean() > 0.02, f"{cid}: no lung (lobes 10-14) in the shard mask"
    assert not (tmp_path / "out" / "quarantine.jsonl").read_text().strip()


def test_explicit_mask_tree_outside_the_source(release, tmp_path):
    src = tmp_path / "dataset"
    shutil.copytree(release, src, ignore=shutil.ignore_patterns("ts_seg"))
    medsam = tmp_path / "medsam2_out"
    shutil.copytree(release / "ts_seg" / "ts_total", medsam)
    code, output = _build(src, tmp_path / "no_masks")
    assert code == 1, output  # every case quarantined (no mask tree): none packed with a silent empty mask
    kinds = {json.loads(line)["kind"] for line in (tmp_path / "no_masks" / "quarantine.jsonl").read_text().splitlines()}
    assert kinds == {"missing_mask"}
    code, output = _build(src, tmp_path / "out", "--masks", f"medsam={medsam}")
    assert code == 0, output
    samples = _samples(tmp_path / "out")
    assert set(samples) == _planned_ids()
    assert all((s["mask"] == LUNG).any() for s in samples.values())


def test_mask_tree_inside_the_source_is_never_an_image(release, tmp_path):
    src = tmp_path / "dataset"
    shutil.copytree(release, src, ignore=shutil.ignore_patterns("ts_seg"))
    shutil.copytree(release / "ts_seg" / "ts_total", src / "anatomy_out")  # a name the walk does not know
    cfg = with_mask_options(load_config("demo"), ["anat=anatomy_out"], None)
    cases, quarantined = get_source("ctrate", cfg).scan(src)
    assert {c.case_id for c in cases} == _planned_ids() and not quarantined
    assert all(c.provenance["mask_tree"] == "anat" and "anatomy_out" in c.files["mask"] for c in cases)
    assert all(not c.files["image"].startswith(str(src / "anatomy_out")) for c in cases)


def test_v1_twin_and_fixed_file_resample_alike(release, tmp_path):
    cfg_original = tmp_path / "original.yaml"
    cfg_original.write_text("extends: demo\nctrate:\n  prefer: original\n")
    assert _build(release, tmp_path / "fixed", "--stages", "scan,resample")[0] == 0
    assert _build(release, tmp_path / "orig", "--stages", "scan,resample", "--config", str(cfg_original))[0] == 0
    twins = [c for c in get_source("ctrate").scan(release)[0] if len(c.provenance["copies"]) == 2]
    assert len(twins) >= 2
    for case in twins:
        a_img, a_mask, a = read_case_zarr(tmp_path / "fixed" / "work" / "zarr" / f"{case.case_id}.zarr")
        b_img, b_mask, b = read_case_zarr(tmp_path / "orig" / "work" / "zarr" / f"{case.case_id}.zarr")
        assert (a["header_style"], b["header_style"]) == ("v2", "v1")
        assert np.abs(a_img.astype(np.int32) - b_img).max() <= 1, case.case_id
        assert np.abs(np.asarray(a["affine"]) - np.asarray(b["affine"])).max() <= 0.01, case.case_id
        assert (a_mask == b_mask).mean() > 0.999


def test_missing_mask_policy(release, tmp_path):
    src = tmp_path / "dataset"
    shutil.copytree(release, src)
    victim = sorted(_planned_ids())[0]
    for p in (src / "ts_seg" / "ts_total").rglob(f"{victim}.nii.gz"):
        p.unlink()
    code, output = _build(src, tmp_path / "q")
    assert code == 2
    q = [json.loads(line) for line in (tmp_path / "q" / "quarantine.jsonl").read_text().splitlines()]
    assert [(r["case"], r["kind"]) for r in q] == [(victim, "missing_mask")]
    allow = tmp_path / "allow.yaml"
    allow.write_text("extends: demo\nctrate:\n  missing_mask: allow\n")
    code, output = _build(src, tmp_path / "a", "--config", str(allow))
    assert code == 0, output
    samples = _samples(tmp_path / "a")
    assert set(samples) == _planned_ids()
    assert samples[victim]["meta"]["has_mask"] is False and not samples[victim]["mask"].any()
    assert all(s["meta"]["has_mask"] for cid, s in samples.items() if cid != victim)


# --------------------------------------------------------------------------- rules, by hand
def _copy(rel: str, kind: str) -> ImageCopy:
    return ImageCopy(Path("/r") / rel, rel, rel.split("/")[0], kind)


def test_choose_copy_rules():
    fixed, orig = _copy("train_fixed/a.nii.gz", "fixed"), _copy("train/a.nii.gz", "original")
    assert choose_copy([orig, fixed], "fixed") == (fixed, "prefer fixed")
    assert choose_copy([orig, fixed], "original") == (orig, "prefer original")
    assert choose_copy([fixed], "original") == (fixed, "only copy")
    chosen, why = choose_copy([fixed, _copy("valid_fixed/a.nii.gz", "fixed")], "fixed")
    assert chosen is None and "2 volumes share this case id" in why
    chosen, why = choose_copy([_copy("x/a.nii.gz", "plain"), _copy("y/a.nii.gz", "plain")], "fixed")
    assert chosen is None


def test_walk_layout_sorts_folders_and_trees(tmp_path):
    for rel in ("train/t_1/t_1_a/t_1_a_1.nii.gz", "train_fixed/t_1/t_1_a/t_1_a_1.nii.gz",
                "ts_seg/ts_total/train_fixed/t_1/t_1_a/t_1_a_1.nii.gz", "ts_seg/ts_other/train/t_1/t_1_a/t_1_a_1.nii.gz",
                "train_mask/t_1_a_1.nii.gz", "valid/v_1/v_1_a/v_1_a_1.nii.gz", "scans/s_1.nii.gz"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    lay = walk_layout(tmp_path)
    assert lay.folders == {"train": "original", "train_fixed": "fixed", "valid": "plain", "scans": "plain"}
    assert sorted(lay.trees) == ["mask", "ts_other", "ts_total"]
    assert sorted(lay.images) == ["s_1", "t_1_a_1", "v_1_a_1"] and len(lay.images["t_1_a_1"]) == 2
    assert lay.anatomy_tree() == "ts_total"
    del lay.trees["ts_total"]
    with pytest.raises(ValueError, match="--anatomy-masks"):
        lay.anatomy_tree()
    with pytest.raises(ValueError, match="not found"):
        lay.anatomy_tree("medsam")


def test_v1_origin_from_image_position_patient():
    meta = {"XYSpacing": "[0.7, 0.8]", "ZSpacing": "1.5", "ImageOrientationPatient": "[1, 0, 0, 0, 1, 0]",
            "ImagePositionPatient": "[-180.5, -170.25, -320]"}
    aff, spacing = v1_affine(meta)
    # DICOM LPS (x, y) negated into RAS; i along +L (row cosine), j along +P, k along +S.
    np.testing.assert_allclose(aff[:3, 3], [180.5, 170.25, -320])
    np.testing.assert_allclose(aff[:3, :3], np.diag([-0.8, -0.7, 1.5]))
    assert spacing == (0.8, 0.7, 1.5)
    no_ipp, _ = v1_affine({k: v for k, v in meta.items() if k != "ImagePositionPatient"})
    np.testing.assert_allclose(no_ipp[:3, 3], 0)


def test_v1_intercept_minus_8192_and_missing_intercept(tmp_path):
    hu = smooth_volume((20, 18, 6), seed=1)
    path = write_v1(tmp_path / "v.nii.gz", (hu.astype(np.int32) + 8192).astype(np.int16))
    meta = {"XYSpacing": "[0.7, 0.7]", "ZSpacing": "1.5", "RescaleIntercept": "-8192", "RescaleSlope": "1",
            "RescaleType": ""}
    image, _, style, info = read_ctrate_volume(str(path), meta)
    assert style == "v1" and image.dtype == np.int16 and info["intercept"] == -8192
    np.testing.assert_array_equal(image, hu)
    with pytest.raises(QuarantineError) as e:
        read_ctrate_volume(str(path), {**meta, "RescaleIntercept": ""})
    assert e.value.kind == "missing_metadata"


def test_oblique_volumes_quarantined_past_the_limit(tmp_path):
    data = smooth_volume((12, 12, 8), seed=2)
    for deg, ok in ((0.5, True), (10.0, False)):
        t = np.radians(deg)
        aff = oblique_free_affine("RAS", (0.8, 0.8, 2.0))
        rot = np.array([[1, 0, 0], [0, np.cos(t), -np.sin(t)], [0, np.sin(t), np.cos(t)]])
        aff[:3, :3] = rot @ aff[:3, :3]
        assert obliquity_deg(aff) == pytest.approx(deg, abs=1e-6)
        path = write_v2(tmp_path / f"o{deg}.nii.gz", data, aff)
        if ok:
            assert read_ctrate_volume(str(path), {})[3]["obliquity_deg"] == pytest.approx(deg, abs=1e-3)
        else:
            with pytest.raises(QuarantineError) as e:
                read_ctrate_volume(str(path), {})
            assert e.value.kind == "oblique" and "10.00 degrees" in e.value.reason


def test_conform_mask_reorders_exactly_or_refuses():
    labels = np.arange(4 * 3 * 2, dtype=np.uint8).reshape(4, 3, 2)
    image_aff = oblique_free_affine("LPS", (0.5, 0.6, 2.0), origin=(1.5, 1.2, -3.0))
    # The same grid stored R->A->S: i and j reversed.
    mask_aff = oblique_free_affine("RAS", (0.5, 0.6, 2.0), origin=(1.5 - 3 * 0.5, 1.2 - 2 * 0.6, -3.0))
    flipped = labels[::-1, ::-1, :]
    np.testing.assert_array_equal(conform_mask(flipped, mask_aff, labels.shape, image_aff), labels)
    shifted = mask_aff.copy()
    shifted[0, 3] += 1.0
    with pytest.raises(QuarantineError, match="max diff 1 mm"):
        conform_mask(flipped, shifted, labels.shape, image_aff)
    with pytest.raises(QuarantineError, match="does not fit"):
        conform_mask(flipped[:2], mask_aff, labels.shape, image_aff)
