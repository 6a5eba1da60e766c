"""build-shards scan + resample on synthetic CT-RATE: quarantine, incremental reruns, crash safety, status."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from ctprep.config import load_config
from ctprep.quarantine import FAULT_KIND_TO_QUARANTINE
from ctprep.runner import build, status
from ctprep.stages.resample import read_case_zarr

import ctprep.synth.ctrate as synth

STAGES = "scan,resample"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("core_synth") / "ctrate"
    synth.write_ctrate(root, cases=4, grid="demo", seed=3, faults=True)
    return root


@pytest.fixture(scope="module")
def first_build(dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("core_out") / "shards"
    report = build([dataset], out, load_config("demo"), stages=STAGES, workers=0, progress=False)
    return out, report


def _faults(root: Path) -> list[dict]:
    return json.loads((root / "faults.json").read_text())["faults"]


def _zarr_cases(out: Path) -> set[str]:
    return {p.name.removesuffix(".zarr") for p in (out / "work" / "zarr").glob("*.zarr")}


def test_every_fault_quarantined_others_complete(dataset, first_build):
    out, report = first_build
    assert report.exit_code == 0
    faults = _faults(dataset)
    assert len(faults) >= 9
    quarantined = {}
    for line in (out / "quarantine.jsonl").read_text().splitlines():
        q = json.loads(line)
        assert {"case", "stage", "reason", "kind"} <= set(q)
        quarantined[q["case"]] = q
    for f in faults:
        assert f["case"] in quarantined, f"fault {f['kind']} ({f['case']}) not quarantined"
        assert quarantined[f["case"]]["kind"] == FAULT_KIND_TO_QUARANTINE[f["kind"]], f
    assert set(quarantined) == {f["case"] for f in faults}  # nothing else quarantined

    fault_ids = {f["case"] for f in faults}
    done = _zarr_cases(out)
    assert done and not (done & fault_ids)
    cfg = load_config("demo")
    styles = set()
    for cid in sorted(done):
        image, mask, attrs = read_case_zarr(out / "work" / "zarr" / f"{cid}.zarr")
        assert image.dtype == np.int16 and mask.dtype == np.uint8
        assert image.shape == mask.shape == cfg.resample.shape_zyx
        assert attrs["spacing"] == list(cfg.resample.spacing_zyx)
        assert np.asarray(attrs["affine"]).shape == (4, 4)
        assert attrs["split"] in ("train", "valid") and attrs["source"] == "ctrate"
        assert image.min() >= cfg.resample.hu_clip[0] and image.max() <= cfg.resample.hu_clip[1]
        assert 1 in np.unique(mask)  # lungs present as coarse region 1
        assert mask.max() <= len(cfg.regions.names)
        styles.add(attrs["header_style"])
    assert styles <= {"v1", "v2"}


def test_rerun_does_nothing(dataset, first_build):
    out, _ = first_build
    before = {p: p.stat().st_mtime_ns for p in (out / "work" / "zarr").rglob("*")}
    report = build([dataset], out, load_config("demo"), stages=STAGES, workers=0, progress=False)
    assert report.exit_code == 0
    assert sum(t.ran for t in report.tallies.values()) == 0
    assert report.summary.startswith("ctprep build-shards: nothing to do")
    after = {p: p.stat().st_mtime_ns for p in (out / "work" / "zarr").rglob("*")}
    assert before == after


def _copy_build(dataset: Path, first_build, tmp_path: Path) -> tuple[Path, Path]:
    """A private copy of the dataset and of the finished output (tests that modify things)."""
    src = tmp_path / "ctrate"
    shutil.copytree(dataset, src, copy_function=shutil.copy2)
    out = tmp_path / "shards"
    build([src], out, load_config("demo"), stages=STAGES, workers=0, progress=False)
    return src, out


def test_changed_input_and_config_rerun_exactly_affected(dataset, first_build, tmp_path):
    src, out = _copy_build(dataset, first_build, tmp_path)
    done = sorted(_zarr_cases(out))
    # 1) change one volume's content, only touch another one's mtime
    changed, touched = done[0], done[1]
    vol = next(src.rglob(f"{changed}.nii.gz"))
    other = next(p for p in src.rglob(f"{done[2]}.nii.gz") if "masks" not in p.parts)
    if "masks" in vol.parts:
        vol = next(p for p in src.rglob(f"{changed}.nii.gz") if "masks" not in p.parts)
    shutil.copy(other, vol)  # a different (valid) volume under this name
    t = next(p for p in src.rglob(f"{touched}.nii.gz") if "masks" not in p.parts)
    os.utime(t, ns=(time.time_ns(), time.time_ns() + 10**9))
    st = status(out)
    assert st.stages["resample"].stale["changed input"] == 2  # status does not hash: both look changed
    report = build([src], out, load_config("demo"), stages=STAGES, workers=0, progress=False)
    assert report.tallies["resample"].ran == 1  # content hash: the touched file is unchanged
    # 2) change the resample config: every done case reruns, quarantined ones with their faults too
    cfg = load_config("demo")
    cfg.resample.hu_clip = (-1000, 2000)
    st = status(out, config=cfg)
    assert st.stages["resample"].stale["changed config"] >= len(done)
    report = build([src], out, cfg, stages=STAGES, workers=0, progress=False)
    n_scan_ok = report.cases
    assert report.tallies["resample"].ran == n_scan_ok
    image, _, _ = read_case_zarr(out / "work" / "zarr" / f"{done[3]}.zarr")
    assert image.min() >= -1000 and image.max() <= 2000
    # 3) a changed report does not resample again (resample is keyed by files + metadata only)
    reports = next(src.rglob("train_reports.csv"))
    reports.write_text(reports.read_text().replace("Not given.", "Not given at all."))
    report = build([src], out, cfg, stages=STAGES, workers=0, progress=False)
    assert report.tallies["resample"].ran == 0


def test_layout_detected_as_ctrate(dataset):
    from ctprep.sources import detect_source

    assert detect_source(dataset) == "ctrate"


def test_status_render(first_build):
    out, _ = first_build
    text = status(out).render()
    assert "resample" in text and "quarantined cases:" in text
    assert "unreadable" in text and "not_chest" in text


def test_crash_debris_and_lost_manifest_row_give_identical_result(dataset, first_build, tmp_path):
    src, out = _copy_build(dataset, first_build, tmp_path)
    zarr_dir = out / "work" / "zarr"
    victim = sorted(_zarr_cases(out))[0]
    reference = read_case_zarr(zarr_dir / f"{victim}.zarr")
    # A killed writer leaves a temp dir; a kill between rename and manifest update leaves a row missing.
    (zarr_dir / f"{victim}.tmp-deadbeef.zarr").mkdir()
    (zarr_dir / f"{victim}.tmp-deadbeef.zarr" / "junk").write_bytes(b"half")
    from ctprep.manifest import Manifest

    with Manifest(out / "work" / "manifest.sqlite") as m:
        m.delete_stage(victim, "resample")
    shutil.rmtree(zarr_dir / f"{victim}.zarr")
    report = build([src], out, load_config("demo"), stages=STAGES, workers=0, progress=False)
    assert report.tallies["resample"].ran == 1
    assert not list(zarr_dir.glob("*.tmp-*"))
    again = read_case_zarr(zarr_dir / f"{victim}.zarr")
    np.testing.assert_array_equal(reference[0], again[0])
    np.testing.assert_array_equal(reference[1], again[1])
    assert reference[2] == again[2]


def test_kill_midway_then_rerun_matches_uninterrupted(dataset, first_build, tmp_path):
    ref_out, _ = first_build
    out = tmp_path / "killed"
    args = ["build-shards", "--src", str(dataset), "--out", str(out), "--stages", STAGES, "--workers", "0",
            "--no-progress"]
    cmd = [sys.executable, "-m", "ctprep.cli", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # Killed at a fixed point, not by racing a timer: SIGKILL right after the second case's zarr is
    # renamed into place and before the manifest hears of it (the worst moment for the manifest).
    killer = (
        "import os, signal, sys\n"
        "from ctprep.stages import resample\n"
        "real, done = resample.write_case_zarr, []\n"
        "def write(*a, **k):\n"
        "    result = real(*a, **k)\n"
        "    done.append(1)\n"
        "    if len(done) == 2:\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return result\n"
        "resample.write_case_zarr = write\n"
        "from ctprep.cli import app\n"
        f"sys.argv = ['ctprep'] + {args!r}\n"
        "app()\n"
    )
    proc = subprocess.run([sys.executable, "-c", killer], env=env, capture_output=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert len(list((out / "work" / "zarr").glob("*.zarr"))) == 2 < len(_zarr_cases(ref_out))  # really midway
    rc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert rc.returncode == 0, rc.stderr
    assert _zarr_cases(out) == _zarr_cases(ref_out)
    for cid in sorted(_zarr_cases(out)):
        a = read_case_zarr(out / "work" / "zarr" / f"{cid}.zarr")
        b = read_case_zarr(ref_out / "work" / "zarr" / f"{cid}.zarr")
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_array_equal(a[1], b[1])
        assert a[2]["affine"] == b[2]["affine"]
    q1 = (out / "quarantine.jsonl").read_text().replace(str(out), "")
    q2 = (ref_out / "quarantine.jsonl").read_text().replace(str(ref_out), "")
    assert q1 == q2


def test_exit_codes(dataset, first_build, tmp_path):
    # --strict: quarantined cases turn the run into a failure (2)
    out, _ = first_build
    report = build([dataset], out, load_config("demo"), stages=STAGES, workers=0, progress=False, strict=True)
    assert report.exit_code == 2
    # nothing processable: a dataset made only of faults -> 1
    only_bad = tmp_path / "bad"
    for f in _faults(dataset):
        if f.get("has_file") and f["kind"] in ("truncated_gzip", "all_zero"):
            for rel in (f["path"], f["mask"]):
                (only_bad / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(dataset / rel, only_bad / rel)
    for csv_dir in ("metadata", "radiology_text_reports", "multi_abnormality_labels"):
        shutil.copytree(dataset / csv_dir, only_bad / csv_dir)
    report = build([only_bad], tmp_path / "bad_out", load_config("demo"), stages=STAGES, workers=0, progress=False)
    assert report.exit_code == 1
    assert "no case completed" in report.summary
