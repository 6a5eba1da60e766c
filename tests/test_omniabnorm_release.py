"""OmniAbnorm-CT-14K as released: JSON per plane and split, image / mask folders, planes, build-shards."""

from __future__ import annotations

import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ctprep.config import load_config
from ctprep.runner import build
from ctprep.schema import is_safe_case_id
from ctprep.sources import detect_source, get_source
from ctprep.sources.base import CaseInput
from ctprep.sources.omniabnorm import NORMAL_IMPRESSION, PATIENT_FROM_SLAB, case_id_for, file_rank, window_to_hu
from ctprep.stages.pack import read_index
from ctprep.stages.resample import read_case_zarr, resample_case
from ctprep.synth.omniabnorm import write_omniabnorm

# The generator's fault kinds -> the quarantine kind we give them (release layout).
OMNI_FAULTS = {"missing_image": "unreadable", "truncated_jpeg": "unreadable",
               "mask_size_mismatch": "mask_grid_mismatch", "path_in_name": "unsafe_name"}


@pytest.fixture(scope="module")
def tree(synthetic_omniabnorm) -> Path:
    return synthetic_omniabnorm(cases=6, seed=2, faults=True)


def _notes(root: Path) -> dict:
    return json.loads((root / "faults.json").read_text())


def _scan(root: Path, cfg=None):
    src = get_source("omniabnorm", cfg or load_config("demo"))
    cases, quarantined = src.scan(root)
    return src, {c.case_id: c for c in cases}, {q.case: q for q in quarantined}


def _run(srcs, out, cfg=None):
    return build([str(s) for s in srcs], out, cfg or load_config("demo"), workers=0, progress=False,
                 log=lambda msg: None)


def _samples(out: Path) -> dict[str, dict]:
    """case id -> meta.json of every sample in the listed shards (a case listed twice fails)."""
    metas: dict[str, dict] = {}
    for entries in read_index(out)["splits"].values():
        for e in entries:
            with tarfile.open(out / e["path"]) as tar:
                for m in tar:
                    if m.name.endswith(".meta.json"):
                        meta = json.loads(tar.extractfile(m).read())
                        assert meta["id"] not in metas, f"{meta['id']} packed twice"
                        metas[meta["id"]] = meta
    return metas


# ----------------------------------------------------------------------------- scan rules
def test_scan_reads_release_json_once_per_datum(tree):
    assert detect_source(tree) == "omniabnorm"
    notes = _notes(tree)
    _, cases, quarantined = _scan(tree)
    faults = {case_id_for(f["case"]): OMNI_FAULTS[f["kind"]] for f in notes["faults"]}
    datums = _all_datums(tree)
    assert len(datums) == 6 + len(faults)
    # every datum is one case (or one scan quarantine), under its safe id, never quarantined as a duplicate
    assert set(cases) | set(quarantined) == {case_id_for(d) for d in datums}
    assert all(q.kind != "duplicate_case" for q in quarantined.values())
    for q in quarantined.values():
        assert q.kind == faults[q.case]
    assert "0.jpg" in quarantined[case_id_for(next(f["case"] for f in notes["faults"]
                                                   if f["kind"] == "missing_image"))].reason
    for cid, c in cases.items():
        datum_id = c.provenance["datum_id"]
        assert cid == case_id_for(datum_id) and is_safe_case_id(cid)
        plane = notes["notes"]["coronal"]
        assert c.meta["plane"] == ("coronal" if datum_id in plane else "axial")
        assert c.split == ("valid" if datum_id in notes["notes"]["valid"] else "train")
        # the plane file wins over its _grouped variant and merged_train.json; the others are recorded
        assert file_rank(Path(c.provenance["json"])) == 0
        if c.split == "train":
            assert "merged_train.json" in c.provenance["also_in"]
        assert "json" not in json.dumps(c.meta)  # file names stay out of the keyed fields
    unsafe = notes["notes"]["unsafe_id"][0]
    assert unsafe not in cases and case_id_for(unsafe) in cases | quarantined
    assert case_id_for(unsafe) == case_id_for(unsafe) != unsafe  # deterministic mapping


def test_text_groups_normal_images_and_missing_context(tree):
    notes = _notes(tree)["notes"]
    src, cases, _ = _scan(tree)
    normal = cases[case_id_for(notes["normal"][0])]
    assert normal.text["findings"] == "" and normal.text["impression"] == NORMAL_IMPRESSION.format(plane="axial")
    assert set(normal.labels) == {-1} and normal.text["steps"]
    grouped = cases[case_id_for(notes["grouped"][0])]
    ids = [a["group_id"] for a in grouped.meta["abnormality"]]
    assert len(ids) > len(set(ids))  # two mask ids share one group ...
    assert len(grouped.text["finding_variants"]) == len(set(ids))  # ... and one finding per group
    assert grouped.text["findings"].startswith(grouped.meta["abnormality"][0]["description"])
    loaded = src.load(grouped)
    key = loaded.labels[:, :, loaded.info["key_slice_index"]]
    masks = [np.asarray(Image.open(grouped.files[f"mask_{j}"])).T >= 128 for j in (0, 1)]
    region = loaded.info["abnormality_regions"][0]
    assert all(m.any() and (key[m] == region).all() for m in masks)  # the group's masks share its region
    miss = notes["missing_context"][0]
    case = cases[case_id_for(miss["datum"])]
    assert f"{miss['offset']}.jpg" in case.provenance["missing"]
    loaded = src.load(case)
    assert loaded.info["missing_context"] == [miss["offset"]]
    assert str(miss["offset"]) in loaded.info["filled_offsets"] and loaded.image.shape[2] == 4


def test_missing_masks_and_context_are_not_fatal(tree, tmp_path):
    root = tmp_path / "t"
    shutil.copytree(tree, root)
    notes = _notes(root)["notes"]
    name = notes["grouped"][0]
    folder = next((root / "masks").glob(f"*{name[-4:]}"))
    (folder / "1.jpeg").unlink()  # one of the group's two masks
    img = next((root / "images").glob(f"*{notes['coronal'][0][-4:]}"))
    (img / "-1.jpg").unlink()
    src, cases, _ = _scan(root)
    case = cases[case_id_for(name)]
    assert "mask 1.jpeg" in case.provenance["missing"]
    loaded = src.load(case)
    assert loaded.info["missing_masks"] == [1] and loaded.labels is not None
    for f in folder.iterdir():  # every mask gone: no mask at all, not an empty one
        f.unlink()
    loaded = src.load(_scan(root)[1][case_id_for(name)])
    assert loaded.labels is None and len(loaded.info["missing_masks"]) >= 2
    cor = src.load(cases[case_id_for(notes["coronal"][0])])
    assert cor.info["missing_context"] == [-1] and cor.info["plane"] == "coronal"


def test_foreign_absolute_paths_and_image_root(tree, tmp_path):
    # The JSON says /mnt/omniabnorm/OmniAbnormCT_14K/images/<id>: re-rooted under the source root.
    _, cases, _ = _scan(tree)
    c = next(iter(cases.values()))
    assert c.provenance["image_from"].startswith("/mnt/omniabnorm/") and Path(c.files["image"]).is_relative_to(tree)
    # Images kept elsewhere: not read unless omni.image_root names the folder.
    root = tmp_path / "json_only"
    shutil.copytree(tree, root, ignore=shutil.ignore_patterns("images", "masks"))
    elsewhere = tmp_path / "store"
    shutil.copytree(tree / "images", elsewhere / "images")
    shutil.copytree(tree / "masks", elsewhere / "masks")
    _, cases, quarantined = _scan(root)
    assert not cases and {q.kind for q in quarantined.values()} <= {"unreadable", "unsafe_name"}
    cfg = load_config("demo")
    cfg.omni.image_root = str(elsewhere)
    _, cases, _ = _scan(root, cfg)
    assert len(cases) == 6 + 2  # two fault datums fail at load, two at scan
    assert all(Path(c.files["image"]).is_relative_to(elsewhere) for c in cases.values())
    # An absolute path that exists but lies outside the source root is not read without image_root.
    jf = root / "axial" / "axial_valid.json"
    jf.write_text(json.dumps({"outside": {"image": str(elsewhere / "images" / "omni_s2_0000"), "context": [0]}}))
    _, _, quarantined = _scan(root)
    assert quarantined["outside"].kind == "unreadable" and "not found here" in quarantined["outside"].reason


# ----------------------------------------------------------------------------- planes and axes
def _write_jpeg(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr.astype(np.uint8), mode="L").save(path, format="JPEG", quality=100)


@pytest.mark.parametrize(("plane", "up", "left", "thin"), [
    ("axial", "A", "R", "S"),       # rows anterior -> posterior, columns patient right -> left
    ("coronal", "S", "R", "A"),     # rows superior -> inferior, columns patient right -> left
    ("sagittal", "S", "A", "R"),    # rows superior -> inferior, columns anterior -> posterior
])  # fmt: skip
def test_slab_pixels_land_on_the_right_patient_axis(tmp_path, plane, up, left, thin):
    """A bright block in the image's top-left corner and context slices of known gray values:
    after resampling, the stored slab is (slab_depth, H, W) and patient_from_slab @ affine sends
    the block up / towards the image's left side and the +offset slices along the plane's thin axis."""
    n = 32
    key = np.full((n, n), 60, np.uint8)
    key[:8, :8] = 250
    gray = {-2: 20, -1: 100, 1: 140, 2: 180}
    root = tmp_path / "src"
    for off, v in gray.items():
        _write_jpeg(root / "img" / f"{off}.jpg", np.full((n, n), v))
    _write_jpeg(root / "img" / "0.jpg", key)
    mask = np.zeros((n, n), np.uint8)
    mask[:8, :8] = 255
    _write_jpeg(root / "msk" / "7.jpeg", mask)
    datum = {"image": "../img", "mask": "../msk", "context": [-2, -1, 0, 1, 2],
             "abnormality": [{"id": 7, "group_id": 1, "label": "Lung nodule", "category": "lung",
                              "description": "Nodule.", "rewritten_findings": ["A nodule."]}]}
    (root / plane).mkdir()
    (root / plane / f"{plane}_train.json").write_text(json.dumps({"d1": datum}))
    cfg = load_config("demo")
    cfg.omni.shape_yx, cfg.omni.pixel_spacing_mm = (n, n), 1.0
    src, cases, _ = _scan(root, cfg)
    case = cases["d1"]
    loaded = src.load(case)
    assert loaded.info["plane"] == plane
    spacing, shape = src.target_grid(case, cfg)
    res = resample_case(loaded.image, loaded.labels, loaded.affine, spacing, shape, cfg.resample.hu_clip,
                        cfg.resample.pad_hu, None)
    assert res.image.shape == (4, n, n) == shape  # thin axis first, for every plane
    hu = lambda v: float(window_to_hu(np.uint8(v), *case.meta["window"]))  # noqa: E731
    for z, off in enumerate((-2, -1, 0, 1)):  # stored z runs along increasing offset
        ref = hu(60) if off == 0 else hu(gray[off])
        assert abs(float(np.median(res.image[z])) - ref) < 3, (z, off)
    true = np.asarray(loaded.info["patient_from_slab"]) @ res.affine
    axis = {"R": 0, "A": 1, "S": 2}
    # stored z points along +thin, and nowhere else
    assert true[axis[thin], 0] > 0 and np.count_nonzero(np.round(true[:3, 0], 6)) == 1
    ys, xs = np.nonzero(res.image[2] > hu(200))
    block = true @ np.array([2.0, ys.mean(), xs.mean(), 1.0])
    centre = true @ np.array([2.0, (n - 1) / 2, (n - 1) / 2, 1.0])
    assert block[axis[up]] - centre[axis[up]] > 5 and block[axis[left]] - centre[axis[left]] > 5
    assert (res.mask[2][res.image[2] > hu(200)] == 1).all() and not res.mask[[0, 1, 3]].any()
    np.testing.assert_array_equal(np.asarray(loaded.info["patient_from_slab"]), PATIENT_FROM_SLAB[plane])


# ----------------------------------------------------------------------------- build-shards
def test_build_release_tree_then_a_new_json_file(tree, tmp_path):
    src = tmp_path / "omni"
    shutil.copytree(tree, src)
    out = tmp_path / "shards"
    notes = _notes(src)
    first = _run([src], out)
    assert first.exit_code == 0, first.summary
    bad = {case_id_for(f["case"]) for f in notes["faults"]}
    good = {case_id_for(d) for d in _all_datums(src)} - bad
    metas = _samples(out)
    assert set(metas) == good  # each datum packed exactly once
    for cid, meta in metas.items():
        assert meta["plane"] == ("coronal" if cid in {case_id_for(d) for d in notes["notes"]["coronal"]} else "axial")
        assert meta["shape"] == [4, 128, 128] and meta["header_style"] == "jpg"
    miss = case_id_for(notes["notes"]["missing_context"][0]["datum"])
    _, _, attrs = read_case_zarr(out / "work" / "zarr" / f"{miss}.zarr")
    assert attrs["input"]["missing_context"] == [1] and attrs["plane"] == "axial"
    cor = case_id_for(notes["notes"]["coronal"][0])
    _, _, attrs = read_case_zarr(out / "work" / "zarr" / f"{cor}.zarr")
    assert attrs["input"]["patient_from_slab"] == PATIENT_FROM_SLAB["coronal"].tolist()
    # meta.json's affine maps the stored (z, y, x) grid to the patient: for a coronal slab the thin
    # stored axis (z index, the context offsets) runs along A, not along S.
    thin = np.asarray(metas[cor]["affine"])[:3, 0]
    assert np.argmax(np.abs(thin)) == 1 and metas[cor]["affine"] == attrs["affine"]
    axial_case = next(c for c in metas if metas[c]["plane"] == "axial")
    assert np.argmax(np.abs(np.asarray(metas[axial_case]["affine"])[:3, 0])) == 2

    # A new delivery: a new JSON file beside the old ones, listing 2 new datums and one old one again.
    new = tmp_path / "batch2"
    write_omniabnorm(new, cases=2, seed=3)
    for sub in ("images", "masks"):
        for d in (new / sub).iterdir():
            shutil.copytree(d, src / sub / d.name)
    axial = json.loads((new / "axial" / "axial_train.json").read_text())
    coronal = json.loads((new / "coronal" / "coronal_train.json").read_text())
    assert len(axial) == len(coronal) == 1  # seed 3: datum 0 axial, datum 1 coronal
    old_id, old_datum = next(iter(json.loads((src / "axial" / "axial_train.json").read_text()).items()))
    (src / "axial" / "axial_train_2.json").write_text(json.dumps(axial | {old_id: old_datum}))
    (src / "coronal" / "coronal_train_2.json").write_text(json.dumps(coronal))
    second = _run([src], out)
    assert second.exit_code == 0, second.summary
    ran = {name: t.ran for name, t in second.tallies.items()}
    assert ran == {"resample": 2, "regions": 2, "text": 2, "pack": 2}
    r1 = first.tallies["resample"]
    assert second.tallies["resample"].up_to_date == r1.done + sum(r1.quarantined.values()) == len(good) + 2
    metas = _samples(out)
    assert set(metas) == good | {case_id_for(d) for d in axial | coronal}
    assert metas[case_id_for(next(iter(coronal)))]["plane"] == "coronal"
    # the re-listed datum now comes from the new file (sorts last among plane files), nothing reran for it
    manifest_case = _manifest_case(out, case_id_for(old_id))
    assert manifest_case.provenance["json"] == "axial/axial_train_2.json"


def _all_datums(root: Path) -> dict:
    out: dict = {}
    for p in sorted(root.glob("*/*.json")) + [root / "merged_train.json"]:
        out |= json.loads(p.read_text())
    return out


def _manifest_case(out: Path, case_id: str) -> CaseInput:
    from ctprep.manifest import Manifest

    m = Manifest(out / "work" / "manifest.sqlite")
    try:
        return next(r.case for r in m.cases() if r.case.case_id == case_id)
    finally:
        m.close()


def test_released_loader_facts_jpeg_key_and_string_offsets(tmp_path):
    """``0.jpeg`` key slices, context given as strings, a datum without ``mask`` and without
    ``abnormality`` (normal), a sagittal plane named only by the folder."""
    n = 16
    root = tmp_path / "src"
    img = root / "sagittal" / "x"
    _write_jpeg(img / "0.jpeg", np.full((n, n), 90))
    _write_jpeg(img / "1.jpeg", np.full((n, n), 120))
    (root / "sagittal" / "valid.json").write_text(json.dumps({"a/b 1": {"image": "x", "context": ["0", "1", "2"]}}))
    src, cases, quarantined = _scan(root)
    assert not quarantined
    (case,) = cases.values()
    assert case.meta["plane"] == "sagittal" and case.split == "valid" and case.provenance["datum_id"] == "a/b 1"
    assert case.provenance["missing"] == ["2.jpeg"] and case.text["impression"].endswith("sagittal CT image.")
    loaded = src.load(case)
    assert loaded.labels is not None and not loaded.labels.any() and loaded.info["slab_offsets"] == [0, 1, 2]
