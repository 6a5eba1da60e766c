"""Errors for people: every expected failure of ``ctprep build-shards`` / ``ctprep status`` is one
line, ``error: <path or address>: <cause>``, with a non-zero exit and no traceback (``--debug``
shows it).

How the failures are made here, as realistically as a root test process allows without mounting:

* unreachable scheduler: a free loopback port nobody listens on (a real refused connection);
* read-only ``--out`` and ``status`` on a read-only output: the folders are made read-only with
  chmod, and when the tests run as root (whom chmod does not stop) the command runs without the
  capabilities that override file modes (CAP_DAC_OVERRIDE, ...), so the modes bind it as they
  bind any user; skipped where that cannot be arranged;
* ``--out`` that is not a folder: a path below a regular file (ENOTDIR);
* a full disk: the file the driver writes is a symlink to ``/dev/full``, so the kernel itself
  answers ENOSPC to the write (skipped where ``/dev/full`` is missing).
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ctprep.cli import app
from ctprep.config import load_config
from ctprep.errors import OutputLocked, UserError
from ctprep.runner import MANIFEST_FILE, build
from tests.scale_helpers import free_port, quiet_env

import ctprep.synth.ctrate as synth  # noqa: E402

BIN = Path(sys.executable).parent


def assert_one_error_line(text: str, *needles: str) -> str:
    """``text`` (stderr) ends with exactly one ``error: ...`` line containing every needle, and has
    no traceback (progress lines of the work done before the failure may precede it)."""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error")]
    assert len(errors) == 1 and lines[-1] == errors[0], f"expected one closing error line, got:\n{text}"
    assert errors[0].startswith("error: ") and "Traceback" not in text, text
    for needle in needles:
        assert needle in errors[0], f"{needle!r} not in {errors[0]!r}"
    return errors[0]


def invoke(*args: str):
    return CliRunner().invoke(app, list(args))


@pytest.fixture(scope="module")
def ctrate(synthetic_ctrate) -> Path:
    return synthetic_ctrate(cases=3)


# --------------------------------------------------------------------------- file modes that apply


# Linux capabilities that let root ignore file modes: CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER.
DAC_CAPABILITIES = (1, 2, 3)
PR_CAPBSET_DROP = 24


def _drop_dac_capabilities() -> None:
    """In the child before exec: remove the mode-overriding capabilities from the bounding set, so
    the root-owned command obeys file modes like any user (it stays uid 0 and can read the venv)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    for cap in DAC_CAPABILITIES:
        if libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def _mode_bound_kwargs() -> dict:
    return {"preexec_fn": _drop_dac_capabilities} if os.geteuid() == 0 else {}


def run_mode_bound(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run the ``ctprep`` CLI so that a read-only folder is read-only to it (even when we are root)."""
    return subprocess.run([str(BIN / "ctprep"), *args], capture_output=True, text=True, timeout=timeout,
                          env=quiet_env(PYTHONDONTWRITEBYTECODE="1"), **_mode_bound_kwargs())


@pytest.fixture
def read_only_works(tmp_path):
    """Skip unless a read-only folder stops a write of :func:`run_mode_bound`'s commands; give the
    folders back their write bits afterwards so that tmp_path can be removed."""
    probe = tmp_path / "probe"
    probe.mkdir()
    probe.chmod(0o555)
    try:
        res = subprocess.run([sys.executable, "-c", f"open({str(probe / 'x')!r}, 'w')"], capture_output=True,
                             **_mode_bound_kwargs())
    except (OSError, subprocess.SubprocessError) as e:
        pytest.skip(f"cannot drop the capabilities that override file modes: {e}")
    if res.returncode == 0:
        pytest.skip("file modes do not stop writes here (root with CAP_DAC_OVERRIDE we cannot drop)")
    yield
    for path in [tmp_path, *tmp_path.rglob("*")]:
        if path.is_dir() and not path.is_symlink():
            path.chmod(path.stat().st_mode | stat.S_IWUSR)


def make_read_only(folder: Path) -> None:
    for path in [folder, *folder.rglob("*")]:
        if not path.is_symlink():
            path.chmod(path.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))


# --------------------------------------------------------------------------- scheduler


def test_unreachable_scheduler_fails_in_seconds_before_scanning(ctrate, tmp_path):
    address = f"tcp://127.0.0.1:{free_port()}"  # nobody listens there
    out = tmp_path / "out"
    t0 = time.monotonic()
    res = subprocess.run([str(BIN / "ctprep"), "build-shards", "--src", str(ctrate), "--out", str(out),
                          "--scheduler", address], capture_output=True, text=True, timeout=120, env=quiet_env())
    elapsed = time.monotonic() - t0
    assert res.returncode == 1
    assert_one_error_line(res.stderr, address, "cannot reach")
    assert elapsed < 25, f"took {elapsed:.0f} s"  # 5 s of connection attempts + interpreter start
    assert not out.exists(), "nothing may be written before the scheduler answers"


def test_malformed_scheduler_address_is_one_line(ctrate, tmp_path):
    res = invoke("build-shards", "--src", str(ctrate), "--out", str(tmp_path / "out"), "--scheduler", "udp://x:1")
    assert res.exit_code == 1
    assert_one_error_line(res.stderr, "udp://x:1")


# --------------------------------------------------------------------------- --src


def test_missing_src_is_one_line(tmp_path):
    missing = tmp_path / "no-such-folder"
    res = invoke("build-shards", "--src", str(missing), "--out", str(tmp_path / "out"))
    assert res.exit_code == 1
    assert_one_error_line(res.stderr, str(missing), "no such folder")
    assert not (tmp_path / "out").exists()


def test_src_that_is_a_file_is_one_line(tmp_path):
    a_file = tmp_path / "metadata.csv"
    a_file.write_text("VolumeName\n")
    res = invoke("build-shards", "--src", str(a_file), "--out", str(tmp_path / "out"))
    assert res.exit_code == 1
    assert_one_error_line(res.stderr, str(a_file), "not a folder")


def test_debug_shows_the_traceback(tmp_path):
    missing = tmp_path / "no-such-folder"
    res = invoke("build-shards", "--src", str(missing), "--out", str(tmp_path / "out"), "--debug")
    assert res.exit_code == 1
    assert isinstance(res.exception, UserError) and str(missing) in str(res.exception)
    res = subprocess.run([str(BIN / "ctprep"), "build-shards", "--src", str(missing), "--out", str(tmp_path / "o"),
                          "--debug"], capture_output=True, text=True, timeout=120, env=quiet_env())
    assert res.returncode != 0 and "Traceback" in res.stderr and "UserError" in res.stderr


# --------------------------------------------------------------------------- --out


def test_out_below_a_file_is_one_line(ctrate, tmp_path):
    a_file = tmp_path / "shards.tar"
    a_file.write_bytes(b"")
    out = a_file / "out"
    res = invoke("build-shards", "--src", str(ctrate), "--out", str(out), "--workers", "0", "--no-progress")
    assert res.exit_code == 1
    assert_one_error_line(res.stderr, str(out), "Not a directory")


def test_read_only_out_is_one_line(ctrate, tmp_path, read_only_works):
    ro = tmp_path / "readonly"
    ro.mkdir()
    make_read_only(ro)
    for out in (ro, ro / "new-out"):  # an existing read-only folder; a folder that cannot be made
        res = run_mode_bound("build-shards", "--src", str(ctrate), "--out", str(out), "--workers", "0",
                               "--no-progress", "--stages", "scan")
        assert res.returncode == 1, res.stderr
        assert_one_error_line(res.stderr, str(out), "Permission denied")


def test_locked_out_exits_with_the_lock_code(ctrate, tmp_path):
    from ctprep.lock import folder_lock

    out = tmp_path / "out"
    with folder_lock(out):
        res = invoke("build-shards", "--src", str(ctrate), "--out", str(out), "--workers", "0", "--no-progress")
    assert res.exit_code == OutputLocked.exit_code != 1
    assert_one_error_line(res.stderr, str(out))


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_full_disk_while_writing_is_one_line(tmp_path):
    src = tmp_path / "ctrate"
    synth.write_ctrate(src, cases=2, grid="demo", faults=True)  # broken inputs: quarantine.jsonl has rows
    out = tmp_path / "out"
    out.mkdir()
    # The driver writes quarantine.jsonl through this temporary name; /dev/full answers ENOSPC.
    (out / "quarantine.jsonl.tmp").symlink_to("/dev/full")
    res = invoke("build-shards", "--src", str(src), "--out", str(out), "--workers", "0", "--no-progress",
                 "--stages", "scan")
    assert res.exit_code == 1
    assert_one_error_line(res.stderr, str(out), "No space left on device")


# --------------------------------------------------------------------------- status


@pytest.fixture
def built(ctrate, tmp_path, read_only_works) -> Path:
    out = tmp_path / "out"
    report = build([ctrate], out, load_config("demo"), stages="scan", workers=0, progress=False)
    assert report.exit_code == 0
    return out


def test_status_works_on_a_read_only_output(built):
    make_read_only(built)
    res = run_mode_bound("status", "--out", str(built))
    assert res.returncode == 0, res.stderr
    assert "cases: 3 present" in res.stdout and "scan" in res.stdout
    assert not list((built / "work").glob("*-shm")), "status must not create files in a read-only folder"


def test_status_on_a_read_only_output_reads_a_pending_wal(built):
    """A build killed before SQLite checkpointed leaves rows only in ``manifest.sqlite-wal``:
    ``status`` on the read-only copy still sees them (it must not open the database immutable)."""
    mpath = built / "work" / MANIFEST_FILE
    writer = sqlite3.connect(str(mpath), isolation_level=None)
    try:
        writer.execute("PRAGMA wal_autocheckpoint=0")
        writer.execute("UPDATE settings SET value = json_set(value, '$.name', 'only-in-the-wal') WHERE name = 'config'")
        assert (mpath.parent / (mpath.name + "-wal")).stat().st_size > 0
        make_read_only(built)
        res = run_mode_bound("status", "--out", str(built))
    finally:
        with contextlib.suppress(sqlite3.Error):
            writer.close()
    assert res.returncode == 0, res.stderr
    assert "config: only-in-the-wal" in res.stdout, res.stdout


def test_status_without_a_manifest_is_one_line(tmp_path):
    res = invoke("status", "--out", str(tmp_path))
    assert res.exit_code == 1
    assert_one_error_line(res.stderr, str(tmp_path), "no manifest")
