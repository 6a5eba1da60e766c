"""ctprep.atomic: whole-or-nothing writes of files and folders."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from ctprep import atomic
from ctprep.atomic import atomic_path, atomic_write_bytes, atomic_write_json, atomic_write_text, remove_temp_debris

pytestmark = pytest.mark.unit


def test_write_bytes_text_json_replace_and_leave_no_temporary(tmp_path):
    path = tmp_path / "a" / "b.bin"
    atomic_write_bytes(path, b"one")
    atomic_write_bytes(path, b"two")  # replaces
    assert path.read_bytes() == b"two"
    atomic_write_text(tmp_path / "t.txt", "h\u00e9\n")
    assert (tmp_path / "t.txt").read_bytes() == "h\u00e9\n".encode()
    atomic_write_json(tmp_path / "j.json", {"b": 1, "a": [1, 2]}, indent=1)
    assert (tmp_path / "j.json").read_text() == json.dumps({"b": 1, "a": [1, 2]}, indent=1)
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["b.bin", "j.json", "t.txt"]


def test_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "x.json"
    atomic_write_json(path, {"v": 1})

    def broken_fsync(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(atomic.os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="No space"):
        atomic_write_json(path, {"v": 2})
    assert json.loads(path.read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]


def test_data_and_folder_are_fsynced_before_and_after_the_rename(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(atomic.os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd)))
    monkeypatch.setattr(atomic.os, "replace", lambda a, b: (events.append("replace"), real_replace(a, b)))
    atomic_write_bytes(tmp_path / "f", b"x")
    assert events == ["fsync", "replace", "fsync"]  # the file's data, the rename, the folder entry


def test_atomic_path_file_keeps_suffix(tmp_path):
    final = tmp_path / "out" / "arr.npy"
    with atomic_path(final) as tmp:
        assert tmp.suffix == ".npy" and ".tmp-" in tmp.name and tmp.parent == final.parent
        np.save(tmp, np.arange(3))
    assert np.load(final).tolist() == [0, 1, 2]
    assert [p.name for p in final.parent.iterdir()] == ["arr.npy"]


def test_atomic_path_replaces_a_folder_whole(tmp_path):
    final = tmp_path / "vol.zarr"
    with atomic_path(final) as tmp:
        tmp.mkdir()
        (tmp / "old").write_text("old")
    with atomic_path(final) as tmp:
        (tmp / "sub").mkdir(parents=True)
        (tmp / "sub" / "new").write_text("new")
    assert sorted(str(p.relative_to(final)) for p in final.rglob("*")) == ["sub", "sub/new"]
    assert [p.name for p in tmp_path.iterdir()] == ["vol.zarr"]


def test_atomic_path_error_leaves_the_previous_output(tmp_path):
    final = tmp_path / "x.txt"
    final.write_text("before")
    with pytest.raises(RuntimeError):
        with atomic_path(final) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert final.read_text() == "before" and [p.name for p in tmp_path.iterdir()] == ["x.txt"]
    with pytest.raises(FileNotFoundError, match="nothing was written"):
        with atomic_path(tmp_path / "y.txt"):
            pass


def test_remove_temp_debris(tmp_path):
    (tmp_path / "a.tmp-deadbeef.zarr").mkdir()
    (tmp_path / "b.tmp-deadbeef.npy").write_bytes(b"")
    (tmp_path / "keep.npy").write_bytes(b"")
    assert remove_temp_debris(tmp_path) == 2
    assert [p.name for p in tmp_path.iterdir()] == ["keep.npy"]


def test_stage_framework_reexports_the_helpers():
    from ctprep.stages import base

    assert base.atomic_path is atomic_path and base.remove_temp_debris is remove_temp_debris
