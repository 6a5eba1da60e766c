"""Input fingerprints of the scan stage: a gzip volume is fingerprinted by size + head + tail (its
trailer carries the CRC-32 of the whole content), everything else by a full content hash; a rebuild
reruns exactly the cases whose content changed (not the touched or copied ones)."""

from __future__ import annotations

import gzip
import os
import shutil
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from ctprep.config import load_config
from ctprep.quarantine import UNREADABLE, QuarantineError
from ctprep.runner import build
from ctprep.sources.nifti import read_nifti
from ctprep.stages.scan import GZIP_EDGE_BYTES, fingerprint_file, hash_file

SHAPE_XYZ = (192, 192, 64)  # noisy int16: ~2.8 MB as .nii.gz, over the 2 MiB of head + tail


def noisy_chest(seed: int) -> np.ndarray:
    """int16 (x, y, z): air, an elliptic body with two lungs, CT-like noise (passes the chest check)."""
    rng = np.random.default_rng(seed)
    x, y = np.meshgrid(np.linspace(-1, 1, SHAPE_XYZ[0]), np.linspace(-1, 1, SHAPE_XYZ[1]), indexing="ij")
    sl = np.where(x**2 / 0.8 + y**2 / 0.5 < 1, 40.0, -1000.0)
    sl[((np.abs(x) - 0.4) / 0.25) ** 2 + (y / 0.45) ** 2 < 1] = -850.0
    vol = sl[..., None] + rng.normal(0, 25, SHAPE_XYZ)
    return np.clip(np.rint(vol), -1024, 3071).astype(np.int16)


def write_nii_gz(path: Path, data: np.ndarray) -> Path:
    aff = np.diag([1.5, 1.5, 2.5, 1.0])
    img = nib.Nifti1Image(data, aff)
    img.set_sform(aff, code="scanner")
    img.set_qform(aff, code="scanner")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(img.to_bytes(), compresslevel=1, mtime=0))
    return path


def test_gzip_fingerprint_follows_content_not_mtime_or_path(tmp_path):
    vol = noisy_chest(0)
    a = write_nii_gz(tmp_path / "a.nii.gz", vol)
    assert a.stat().st_size > 2 * GZIP_EDGE_BYTES
    fp = fingerprint_file(str(a))
    assert fp.startswith("gz1:") and fp != "gz1:" + hash_file(str(a))
    os.utime(a, ns=(time.time_ns(), time.time_ns() + 10**9))  # touched: same content
    assert fingerprint_file(str(a)) == fp
    b = tmp_path / "elsewhere" / "b.nii.gz"
    b.parent.mkdir()
    shutil.copyfile(a, b)  # copied: same content, new path and mtime
    assert fingerprint_file(str(b)) == fp
    edited = vol.copy()
    edited[96, 96, 32] += 1  # one voxel in the middle of the volume, far from head and tail bytes
    write_nii_gz(a, edited)
    assert fingerprint_file(str(a)) != fp


def test_other_files_are_hashed_in_full(tmp_path):
    vol = noisy_chest(1)
    # Uncompressed .nii of the same size, one byte changed in the middle: a full hash sees it.
    raw = tmp_path / "v.nii"
    nib.save(nib.Nifti1Image(vol, np.eye(4)), raw)
    before = fingerprint_file(str(raw))
    assert before == hash_file(str(raw))
    data = bytearray(raw.read_bytes())
    data[len(data) // 2] ^= 1
    raw.write_bytes(bytes(data))
    assert fingerprint_file(str(raw)) != before
    # gzip with FEXTRA (what BGZF and other multi-member writers set): full hash.
    payload = nib.Nifti1Image(vol, np.eye(4)).to_bytes()
    body = gzip.compress(payload, compresslevel=1, mtime=0)
    extra = b"BC\x02\x00\x00\x00"
    fextra = body[:3] + bytes([body[3] | 0x04]) + body[4:10] + len(extra).to_bytes(2, "little") + extra + body[10:]
    bg = tmp_path / "bgzf_like.nii.gz"
    bg.write_bytes(fextra)
    assert bg.stat().st_size > 2 * GZIP_EDGE_BYTES
    assert fingerprint_file(str(bg)) == hash_file(str(bg))
    assert np.array_equal(read_nifti(bg)[0], vol)  # still a valid gzip file
    # small gzip files (a label map): full hash.
    small = write_nii_gz(tmp_path / "m.nii.gz", np.zeros((8, 8, 8), np.uint8))
    assert fingerprint_file(str(small)) == hash_file(str(small))


def test_damaged_middle_keeps_fingerprint_and_is_refused_on_read(tmp_path):
    # The documented limit: bytes changed inside the compressed body with head, tail and size intact
    # give the same fingerprint; gzip's CRC then no longer matches, so reading the file quarantines it.
    a = write_nii_gz(tmp_path / "a.nii.gz", noisy_chest(2))
    fp = fingerprint_file(str(a))
    data = bytearray(a.read_bytes())
    mid = len(data) // 2
    data[mid : mid + 64] = bytes(64)
    a.write_bytes(bytes(data))
    assert fingerprint_file(str(a)) == fp
    with pytest.raises(QuarantineError) as err:
        read_nifti(a)
    assert err.value.kind == UNREADABLE


def _ctrate_tree(root: Path, volumes: dict[str, np.ndarray]) -> None:
    rows = ["VolumeName,ClinicalInformation_EN,Technique_EN,Findings_EN,Impressions_EN"]
    for name, vol in volumes.items():
        split, pid, scan, _ = name.split("_")
        rel = Path(split) / f"{split}_{pid}" / f"{split}_{pid}_{scan}" / f"{name}.nii.gz"
        write_nii_gz(root / rel, vol)
        lab = np.where(vol < -500, 10, 0).astype(np.uint8)
        write_nii_gz(root / "masks" / rel, lab)
        rows.append(f"{name}.nii.gz,Not given.,Chest CT.,Lungs clear.,Normal.")
    (root / "radiology_text_reports").mkdir(parents=True)
    (root / "radiology_text_reports" / "train_reports.csv").write_text("\n".join(rows) + "\n")


def test_rebuild_reruns_exactly_the_changed_gzip_volume(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    vols = {f"train_{i}_a_1": noisy_chest(10 + i) for i in range(1, 4)}
    _ctrate_tree(src, vols)
    cfg = load_config("demo")
    report = build([src], out, cfg, stages="scan,resample", workers=0, progress=False)
    assert report.tallies["resample"].done == 3
    paths = {n: src / "train" / f"train_{n.split('_')[1]}" / n.rsplit("_", 1)[0] / f"{n}.nii.gz" for n in vols}
    assert all(fingerprint_file(str(p)).startswith("gz1:") for p in paths.values())
    # touch one volume, change one voxel of another, copy the whole tree elsewhere
    os.utime(paths["train_1_a_1"], ns=(time.time_ns(), time.time_ns() + 10**9))
    edited = vols["train_2_a_1"].copy()
    edited[96, 96, 32] = 900
    write_nii_gz(paths["train_2_a_1"], edited)
    report = build([src], out, cfg, stages="scan,resample", workers=0, progress=False)
    assert report.tallies["resample"].ran == 1 and report.tallies["resample"].done == 1
    moved = tmp_path / "moved"
    shutil.copytree(src, moved)  # new paths and mtimes, same content
    shutil.rmtree(src)
    report = build([moved], out, cfg, stages="scan,resample", workers=0, progress=False)
    assert report.tallies["resample"].ran == 0
    assert report.tallies["resample"].up_to_date == 3
