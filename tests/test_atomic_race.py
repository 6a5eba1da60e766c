"""ctprep.atomic.atomic_path with two or more writers replacing the same output folder.

A task abandoned after ``--task-timeout`` can still finish while the next build writes the same
case, so two ``atomic_path`` writers of one ``final`` do meet. Each test checks the contract:
no writer raises, ``final`` is exactly one writer's complete folder, no ``*.tmp-*`` is left.
The interleavings are forced by running writer B's whole write inside one step of writer A's.
"""

from __future__ import annotations

import ctypes
import errno
import pathlib
import threading
from pathlib import Path

import pytest

from ctprep import atomic
from ctprep.atomic import atomic_path

pytestmark = pytest.mark.unit


def _write_folder(final: Path, label: str, n_files: int = 3) -> dict[str, str]:
    """Write ``final`` as a folder of files named and filled after ``label``; returns its content."""
    content = {f"{label}-{i}": f"{label} part {i}" for i in range(n_files)}
    content["sub/" + label] = label  # a nested folder too, as zarr stores have
    with atomic_path(final) as tmp:
        tmp.mkdir()
        (tmp / "sub").mkdir()
        for rel, text in content.items():
            (tmp / rel).write_text(text)
    return content


def _folder_content(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): p.read_text() for p in folder.rglob("*") if p.is_file()}


def _run_inside(monkeypatch, owner, name: str, call_number: int, writer_b) -> list[tuple]:
    """Wrap ``owner.name`` so that ``writer_b()`` runs completely just before its
    ``call_number``-th call (1-based, counting B's own calls after it); returns the calls seen."""
    real = getattr(owner, name)
    calls: list[tuple] = []

    def wrapper(*args):
        calls.append(args)
        if len(calls) == call_number:
            writer_b()
        return real(*args)

    monkeypatch.setattr(owner, name, wrapper)
    return calls


@pytest.fixture(params=["exchange", "two renames"])
def replace_mode(request, monkeypatch):
    """Run a test with the Linux exchange and again with the fallback forced."""
    if request.param == "two renames":
        monkeypatch.setattr(atomic, "_rename_exchange", lambda a, b: False)
    return request.param


def test_exchange_is_available_and_used_here(tmp_path, monkeypatch):
    """On this Linux machine the swap must really be the exchange, not a silent fallback."""
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "from_a").write_text("a")
    (b / "from_b").write_text("b")
    assert atomic._rename_exchange(a, b) is True
    assert _folder_content(a) == {"from_b": "b"} and _folder_content(b) == {"from_a": "a"}
    with pytest.raises(FileNotFoundError):
        atomic._rename_exchange(a, tmp_path / "missing")

    results = []
    real = atomic._rename_exchange

    def recording_exchange(x, y):
        results.append(real(x, y))
        return results[-1]

    monkeypatch.setattr(atomic, "_rename_exchange", recording_exchange)
    final = tmp_path / "case.zarr"
    _write_folder(final, "first")
    second = _write_folder(final, "second")
    assert results == [True]  # the first write had nothing to exchange with (ENOENT, plain rename)
    assert _folder_content(final) == second
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "case.zarr"]


def test_unsupported_exchange_falls_back_and_other_errors_raise(tmp_path, monkeypatch):
    def fake_renameat2(errno_value):
        def call(*args):
            ctypes.set_errno(errno_value)
            return -1
        return call

    a, b = tmp_path / "a", tmp_path / "b"
    for unsupported in (errno.EINVAL, errno.ENOSYS):
        monkeypatch.setattr(atomic, "_load_renameat2", lambda e=unsupported: fake_renameat2(e))
        assert atomic._rename_exchange(a, b) is False
    monkeypatch.setattr(atomic, "_load_renameat2", lambda: fake_renameat2(errno.EXDEV))
    with pytest.raises(OSError, match="renameat2") as raised:
        atomic._rename_exchange(a, b)
    assert raised.value.errno == errno.EXDEV
    monkeypatch.setattr(atomic, "_load_renameat2", lambda: None)  # libc without renameat2
    assert atomic._rename_exchange(a, b) is False

    # atomic_path then replaces by the two renames, and the result is the same
    monkeypatch.setattr(atomic, "_load_renameat2", lambda: fake_renameat2(errno.EINVAL))
    final = tmp_path / "case.zarr"
    _write_folder(final, "first")
    second = _write_folder(final, "second")
    assert _folder_content(final) == second and [p.name for p in tmp_path.iterdir()] == ["case.zarr"]


# (replace mode, is there a previous output, the step of writer A that B's whole write runs before)
INTERLEAVINGS = [
    ("exchange", True, "_rename_exchange", 1),  # B swaps first; A's exchange then swaps B's out
    ("exchange", False, "_rename_exchange", 1),  # B creates final; A's exchange finds it
    ("exchange", False, "rename", 1),  # A's exchange saw no final (ENOENT); B's lands before A's plain rename
    ("two renames", True, "rename", 1),  # B moves the previous aside and its own in before A's aside
    ("two renames", True, "rename", 2),  # A moved the previous aside: B finds none, A's rename then hits B's
    ("two renames", False, "rename", 1),
    ("two renames", False, "rename", 2),
]


@pytest.mark.parametrize("mode, final_exists, step, call_number", INTERLEAVINGS,
                         ids=[f"{m}-{'replace' if e else 'new'}-before-{s}{n}" for m, e, s, n in INTERLEAVINGS])
def test_writer_b_replaces_in_the_middle_of_writer_a(tmp_path, monkeypatch, mode, final_exists, step, call_number):
    """Writer B's whole replace runs inside one step of writer A's; the cases with ``rename``
    are the two errors this module used to raise (B's aside: FileNotFoundError; A's rename:
    ENOTEMPTY). Neither raises now and A, which moves its folder in last, wins."""
    if mode == "two renames":
        monkeypatch.setattr(atomic, "_rename_exchange", lambda a, b: False)
    final = tmp_path / "case.zarr"
    if final_exists:
        _write_folder(final, "previous")
    written_b = {}

    def writer_b():
        written_b.update(_write_folder(final, "b"))

    owner = atomic if step == "_rename_exchange" else pathlib.Path
    calls = _run_inside(monkeypatch, owner, step, call_number, writer_b)
    content_a = _write_folder(final, "a")

    assert len(calls) > call_number and written_b  # B ran inside A (its own steps counted after) and did not raise
    assert _folder_content(final) == content_a
    assert [p.name for p in tmp_path.iterdir()] == ["case.zarr"]


def test_fallback_gives_up_with_a_clear_error_when_never_left_alone(tmp_path, monkeypatch):
    """If another writer lands between A's two renames every single time, A raises an error that
    names ``final`` after a bounded number of rounds, and ``final`` still holds a complete folder."""
    monkeypatch.setattr(atomic, "_rename_exchange", lambda a, b: False)
    final = tmp_path / "case.zarr"
    real = pathlib.Path.rename
    others: list[dict[str, str]] = []
    others_running: list[bool] = []

    def rename(self, target):
        if Path(target) == final and atomic.TEMP_MARK in self.name and not others_running:
            others_running.append(True)
            others.append(_write_folder(final, f"other{len(others)}"))
            others_running.clear()
        return real(self, target)

    monkeypatch.setattr(pathlib.Path, "rename", rename)
    with pytest.raises(FileExistsError, match="case.zarr"):
        _write_folder(final, "a")
    assert len(others) == atomic._REPLACE_ATTEMPTS
    assert _folder_content(final) == others[-1]
    assert [p.name for p in tmp_path.iterdir()] == ["case.zarr"]


def test_files_are_still_replaced_by_os_replace(tmp_path, monkeypatch):
    called = []
    monkeypatch.setattr(atomic, "_rename_exchange", lambda a, b: called.append((a, b)) or False)
    final = tmp_path / "x.npy"
    for text in ("one", "two"):
        with atomic_path(final) as tmp:
            tmp.write_text(text)
    assert final.read_text() == "two" and called == []


def test_many_writers_of_one_folder_leave_one_complete_output(tmp_path, replace_mode):
    n_threads, rounds = 8, 25
    final = tmp_path / "case.zarr"
    written: dict[str, dict[str, str]] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(n_threads)

    def writer(w: int) -> None:
        try:
            start.wait()
            for r in range(rounds):
                label = f"w{w}r{r}"
                written[label] = _write_folder(final, label, n_files=4)
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(written) == n_threads * rounds
    got = _folder_content(final)
    winners = [label for label, content in written.items() if content == got]
    assert len(winners) == 1, sorted(got)  # every file of one writer, none of another's
    assert [p.name for p in tmp_path.iterdir()] == ["case.zarr"]
