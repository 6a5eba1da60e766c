"""Faults the generator does not make: a full disk, a second build on the same output, broken CSV
rows, FIFOs and links to devices, --out inside --src. After each fault and a rerun, every good
case is in the shards."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from ctprep import runner
from ctprep.config import load_config
from ctprep.errors import OutputLocked
from ctprep.lock import folder_lock
from ctprep.runner import build, environment_cause, status

CASES = 4


@pytest.fixture
def src(synthetic_ctrate, tmp_path) -> Path:
    copy = tmp_path / "ctrate"
    shutil.copytree(synthetic_ctrate(cases=CASES, seed=5), copy)
    return copy


def _ids(root: Path) -> list[str]:
    return sorted(p.name.removesuffix(".nii.gz") for p in root.glob("*/*/*/*.nii.gz") if "masks" not in p.parts)


def _packed(out: Path) -> list[str]:
    index = json.loads((out / "index.json").read_text())
    keys = []
    for entries in index["splits"].values():
        for entry in entries:
            with tarfile.open(out / entry["path"]) as tar:
                keys += [m.name.split(".")[0] for m in tar.getmembers() if m.name.endswith(".meta.json")]
    return sorted(keys)


def _quarantined(out: Path) -> dict[str, dict]:
    text = (out / "quarantine.jsonl").read_text()
    return {r["case"]: r for r in map(json.loads, text.splitlines())}


def _build(src: Path, out: Path, **kw):
    return build([src], out, load_config("demo"), workers=0, progress=False, log=lambda m: None, **kw)


def test_environment_cause_sees_through_wrapping():
    from ctprep.quarantine import QuarantineError

    assert environment_cause(OSError(errno.ENOSPC, "No space left on device")) == "ENOSPC"
    assert environment_cause(MemoryError()) == "MemoryError"
    assert environment_cause(FileNotFoundError(errno.ENOENT, "gone")) is None  # input changed: not retried
    try:
        try:
            raise OSError(errno.EIO, "Input/output error")
        except OSError as e:
            raise QuarantineError("unreadable", "cannot read x.nii.gz") from e
    except QuarantineError as wrapped:
        assert environment_cause(wrapped) == "EIO"


def test_disk_full_during_resample_then_freed(src, tmp_path, monkeypatch):
    from ctprep.stages import resample

    victim = _ids(src)[1]
    real_write = resample.write_case_zarr

    def full_disk(path, case, *args, **kwargs):
        if Path(path).name.startswith(victim):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_write(path, case, *args, **kwargs)

    monkeypatch.setattr(resample, "write_case_zarr", full_disk)
    monkeypatch.setattr(runner, "RETRY_PAUSE_S", 0.0)
    out = tmp_path / "out"
    report = _build(src, out)
    assert report.exit_code == 4 and "FAILED, will retry" in report.summary and "ENOSPC" in report.summary
    assert _packed(out) == [c for c in _ids(src) if c != victim]
    assert victim not in _quarantined(out)  # not a bad case
    st = status(out)
    assert st.stages["resample"].stale == {"failed, will retry (ENOSPC)": 1}
    monkeypatch.setattr(resample, "write_case_zarr", real_write)  # space freed
    report = _build(src, out)
    assert report.exit_code == 0
    assert _packed(out) == _ids(src)
    assert _build(src, out).summary.startswith("ctprep build-shards: nothing to do")


def test_second_build_on_a_locked_output_stops_at_once(src, tmp_path):
    out = tmp_path / "out"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom ctprep.lock import folder_lock\n"
         f"with folder_lock({str(out)!r}):\n    print('held', flush=True)\n    time.sleep(120)\n"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(OutputLocked, match=rf"in use by another ctprep build \(pid {holder.pid} on "):
            _build(src, out)
        assert not (out / "work").exists()  # nothing touched: no start-up cleanup of the other's files
    finally:
        holder.kill()
        holder.wait()
    report = _build(src, out)  # the dead holder's lock file is left behind and simply taken
    assert report.exit_code == 0 and _packed(out) == _ids(src)
    with folder_lock(out):  # released at the end of a build
        pass


def test_second_build_through_the_cli_gets_one_line(src, tmp_path):
    from typer.testing import CliRunner

    from ctprep.cli import app

    out = tmp_path / "out"
    with folder_lock(out):
        res = CliRunner().invoke(app, ["build-shards", "--src", str(src), "--out", str(out), "--workers", "0",
                                       "--no-progress"])
    assert res.exit_code == OutputLocked.exit_code
    assert "in use by another ctprep build" in res.output and "Traceback" not in res.output


def _edit_report_csv(src: Path, edit) -> None:
    path = src / "radiology_text_reports" / "train_reports.csv"
    lines = path.read_bytes().split(b"\n")
    edit(lines)
    path.write_bytes(b"\n".join(lines))


def _train_ids(src: Path) -> list[str]:
    return [c for c in _ids(src) if c.startswith("train_")]


@pytest.mark.parametrize("fault", ["not_utf8", "huge_cell", "unbalanced_quote", "conflicting_duplicate"])
def test_broken_report_row_quarantines_only_its_case(fault, src, tmp_path):
    victim = _train_ids(src)[0]
    needle = f"{victim}.nii.gz,".encode()

    def edit(lines):
        i = next(k for k, line in enumerate(lines) if line.startswith(needle))
        if fault == "not_utf8":
            lines[i] = lines[i].replace(b"Findings", b"Find\xffings", 1) if b"Findings" in lines[i] else lines[i] + b"\xff"
        elif fault == "huge_cell":
            lines[i] = needle + b'"' + b"x" * 200_000 + b'",a,b,c'
        elif fault == "unbalanced_quote":
            lines[i] = needle + b'"no closing quote,a,b,c'
        else:
            lines.append(needle + b"Not given.,Not given.,A different finding.,Not given.")

    _edit_report_csv(src, edit)
    out = tmp_path / "out"
    report = _build(src, out)
    assert report.exit_code == 0, report.summary
    q = _quarantined(out)
    assert list(q) == [victim] and q[victim]["kind"] == "bad_row"
    assert "radiology_text_reports/train_reports.csv line" in q[victim]["reason"]
    assert _packed(out) == [c for c in _ids(src) if c != victim]  # every other row used, nothing shifted


def test_fifo_and_link_to_a_device_are_never_opened(src, tmp_path):
    folder = src / "train" / "train_90" / "train_90_a"
    folder.mkdir(parents=True)
    os.mkfifo(folder / "train_90_a_1.nii.gz")
    os.symlink("/dev/zero", folder / "train_90_a_2.nii.gz")
    os.mkfifo(src / "metadata" / "extra.csv")
    out = tmp_path / "out"
    report = _build(src, out)  # would hang for ever if a FIFO were opened
    assert report.exit_code == 0
    q = _quarantined(out)
    assert q["train_90_a_1"]["kind"] == "unreadable" and "is a FIFO" in q["train_90_a_1"]["reason"]
    assert "a character device" in q["train_90_a_2"]["reason"]
    assert set(_packed(out)) == set(_ids(src)) - {"train_90_a_1", "train_90_a_2"}


def test_out_inside_src_is_never_read_as_input(src):
    out = src / "shards"
    first = _build(src, out)
    assert first.exit_code == 0
    (out / "extra_cot.jsonl").write_text('{"VolumeName": "%s.nii.gz", "steps": []}\n' % _ids(src)[0])
    second = _build(src, out)
    assert second.summary.startswith("ctprep build-shards: nothing to do"), second.summary
    assert _packed(out) == _ids(src)


def _nifti_gz(data, affine, trailing: bytes = b"") -> bytes:
    import gzip

    import nibabel as nib

    img = nib.Nifti1Image(data, affine)
    img.set_sform(affine, code="scanner")
    img.set_qform(affine, code="scanner")
    return gzip.compress(img.to_bytes() + trailing, compresslevel=1, mtime=0)


def test_volume_followed_by_trailing_data_is_refused(tmp_path):
    import numpy as np

    from ctprep.quarantine import QuarantineError
    from ctprep.sources.ctrate import read_ctrate_volume

    data = np.zeros((16, 16, 8), np.int16)
    data[4:12, 4:12, 2:6] = 40
    affine = np.diag([0.8, 0.8, 2.0, 1.0])
    ok = tmp_path / "ok.nii.gz"
    ok.write_bytes(_nifti_gz(data, affine, trailing=b"\0" * 1000))  # a little padding: fine
    assert read_ctrate_volume(str(ok), {})[0].shape == (16, 16, 8)
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(_nifti_gz(data, affine, trailing=b"\0" * (3 << 20)))  # 3 MiB of zeros after the voxels
    with pytest.raises(QuarantineError, match="follow the voxels the header declares") as e:
        read_ctrate_volume(str(bad), {})
    assert e.value.kind == "unreadable"


def test_declared_size_over_the_limit_is_quarantined_unread(src, tmp_path):
    cfg = tmp_path / "small.yaml"
    cfg.write_text("extends: demo\nctrate:\n  max_volume_mb: 1\n")  # the demo volumes are 1-4 MiB
    out = tmp_path / "out"
    report = build([src], out, load_config(cfg), workers=0, progress=False, log=lambda m: None)
    q = _quarantined(out)
    assert report.exit_code == 1 and q  # every case too big for a 1 MiB limit: none packed
    assert all(r["kind"] == "unreadable" and "over the 1 MiB limit (ctrate.max_volume_mb)" in r["reason"]
               for r in q.values())


def test_a_stuck_read_does_not_hang_the_run(src, tmp_path, monkeypatch):
    import threading

    from ctprep.stages import resample

    victim = _ids(src)[0]
    real_load = resample.resample_loaded
    release = threading.Event()
    finished = threading.Event()

    def stuck(case, *args, **kwargs):
        if case.case_id != victim:
            return real_load(case, *args, **kwargs)
        release.wait(60)  # a read that never returns (a hung network mount), bounded for the test
        try:
            return real_load(case, *args, **kwargs)
        finally:
            finished.set()

    monkeypatch.setattr(resample, "resample_loaded", stuck)
    from ctprep.tokenizer import load_tokenizer

    load_tokenizer(None)  # cached per process: the text stage's first case must not count its import
    out = tmp_path / "out"
    try:
        report = _build(src, out, task_timeout=5.0)
    finally:
        release.set()
    assert report.exit_code == 4 and "resample: 3 done now, 1 FAILED, will retry on the next run (timeout 1)" in report.summary
    assert victim not in _packed(out) and victim not in _quarantined(out)
    # The abandoned thread, released, finishes its write before the rerun: a left-behind task that
    # comes back while another build writes the same case is not what this test is about.
    assert finished.wait(60)
    monkeypatch.setattr(resample, "resample_loaded", real_load)
    assert _build(src, out).exit_code == 0 and _packed(out) == _ids(src)
