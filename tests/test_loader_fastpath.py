"""The loader's fast paths give exactly what the generic paths give, and refuse what they refuse.

``ctprep.shards.npy_header`` parses the ``.npy`` header as ``np.save`` writes it with a regex, cached
by the header's bytes, instead of numpy's ``ast.literal_eval`` reader; ``split_member`` caches the
member-name split the decoder asks for on every sample.
"""

from __future__ import annotations

import io

import numpy as np
import pytest

from ctprep import shards
from ctprep.shards import CorruptMemberError

# (dtype, shape) of every .npy member the pipeline writes (ctprep.schema's table), with the
# edge cases of the shape repr: 0-d (report_len), empty (a case without steps), one-element tuples.
PIPELINE_ARRAYS = [
    ("<i2", (4, 8, 8)),  # image
    ("|u1", (4, 8, 8)),  # mask
    ("<f2", (4096, 4)),  # regions
    ("<i4", (12,)),  # report_ids
    ("<i4", ()),  # report_len
    ("<i4", (3, 6)),  # steps_ids
    ("<i4", (0, 6)),  # steps_ids of a case without steps
    ("<i4", (0,)),  # steps_len of a case without steps
    ("<i4", (3,)),  # region_text_len
    ("|u1", (3,)),  # region_has_text
    ("|i1", (18,)),  # labels
    ("|b1", (2, 3)),  # not written today; bool headers parse the same way
    (">i2", (2, 3)),  # big-endian: the descr is kept as written
]


def _npy(array: np.ndarray, version: tuple[int, int] | None = None) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, array, version=version, allow_pickle=False)
    return buf.getvalue()


def _numpy_read(raw: bytes) -> tuple[np.ndarray, tuple, int]:
    """numpy's own reader: (array, (shape, fortran, dtype), data offset)."""
    stream = io.BytesIO(raw)
    version = np.lib.format.read_magic(stream)
    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    header = read_header(stream)
    offset = stream.tell()
    return np.lib.format.read_array(io.BytesIO(raw), allow_pickle=False), header, offset


def _header_bytes(raw: bytes) -> bytes:
    if raw[6] == 1:
        return raw[10 : 10 + int.from_bytes(raw[8:10], "little")]
    return raw[12 : 12 + int.from_bytes(raw[8:12], "little")]


@pytest.mark.parametrize("fortran", [False, True], ids=["C", "F"])
@pytest.mark.parametrize("version", [None, (2, 0)], ids=["v1", "v2"])
@pytest.mark.parametrize("descr, shape", PIPELINE_ARRAYS, ids=[f"{d}{s}" for d, s in PIPELINE_ARRAYS])
def test_fast_npy_header_matches_numpys_reader(descr, shape, version, fortran):
    rng = np.random.default_rng(len(shape))
    array = (rng.integers(-100, 100, size=shape) if descr != "|b1" else rng.random(shape) > 0.5).astype(descr)
    if fortran:
        array = np.asfortranarray(array)
    raw = _npy(array, version)
    # the fast path must be the one taken (a silent fallback to numpy's parser would pass below)
    assert shards._simple_npy_header(_header_bytes(raw)) is not None
    want, (want_shape, want_fortran, want_dtype), want_offset = _numpy_read(raw)
    assert shards.npy_header(raw) == (want_shape, want_fortran, want_dtype, want_offset)
    for buf in (raw, memoryview(raw)):
        got = shards.decode_npy(buf)
        assert got.dtype == want.dtype and got.shape == want.shape
        assert got.flags.c_contiguous == want.flags.c_contiguous and got.flags.f_contiguous == want.flags.f_contiguous
        np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(shards.decode_member("x.npy", buf), want)


def test_headers_of_equal_length_are_not_confused_by_the_cache():
    # (3, 6) and (3, 7) give headers of the same length that differ in one byte
    for cols in (6, 7, 6):
        array = np.arange(3 * cols, dtype=np.int32).reshape(3, cols)
        np.testing.assert_array_equal(shards.decode_npy(_npy(array)), array)


def _with_header(raw: bytes, old: bytes, new: bytes) -> bytes:
    """``raw`` with ``old`` replaced inside the header, the header length kept (padding adjusted)."""
    header = _header_bytes(raw)
    assert old in header and len(new) <= len(old) + header.count(b" ")
    changed = header.replace(old, new)
    changed = changed[:-1].rstrip(b" ").ljust(len(header) - 1) + b"\n"
    assert len(changed) == len(header)
    return raw[:10] + changed + raw[10 + len(header) :]


CORRUPT_HEADERS = [
    pytest.param(b"'|i1'", b"'|O'", "object arrays are refused", id="object-dtype"),
    pytest.param(b"(18,)", b"(1,,8)", "ValueError", id="bad-shape"),
    pytest.param(b"(18,)", b"(018,)", "ValueError", id="leading-zero"),
    pytest.param(b"'shape'", b"'shapf'", "ValueError", id="bad-key"),
    pytest.param(b"(18,)", b"(90,)", "npy data truncated", id="longer-than-data"),
    pytest.param(b"'|i1'", b"'|z9'", "TypeError", id="unknown-dtype"),
]


@pytest.mark.parametrize("old, new, reason", CORRUPT_HEADERS)
def test_a_corrupt_npy_header_is_refused_naming_the_member(old, new, reason):
    raw = _with_header(_npy(np.arange(18, dtype=np.int8)), old, new)
    with pytest.raises(CorruptMemberError, match=rf"^labels\.npy: .*{reason}"):
        shards.decode_member("labels.npy", raw)


def test_a_broken_magic_is_refused_naming_the_member():
    raw = bytearray(_npy(np.arange(18, dtype=np.int8)))
    raw[1:6] = b"NUMPX"
    with pytest.raises(CorruptMemberError, match=r"^labels\.npy: "):
        shards.decode_member("labels.npy", bytes(raw))


@pytest.mark.parametrize("name, split", [
    ("image.npy.zst", ("image", "image.npy", ".zst")),
    ("mask.npy.gz", ("mask", "mask.npy", ".gz")),
    ("report_len.npy", ("report_len", "report_len.npy", "")),
    ("meta.json", ("meta", "meta.json", "")),
])
def test_split_member_agrees_with_the_schema(name, split):
    assert shards.split_member(name) == split
    assert shards.member_field(name) == split[0]


# --------------------------------------------------------------------------- bench/loader.py breakdown


def _spin(cpu_seconds: float) -> None:
    """Burn ``cpu_seconds`` of this thread's CPU (however long that takes on a shared machine)."""
    import time

    end = time.thread_time() + cpu_seconds
    while time.thread_time() < end:
        pass


def _spin_then_wait(started, release) -> None:
    _spin(0.2)
    started.set()
    release.wait()


@pytest.mark.skipif(not __import__("os").path.isdir("/proc/self/task"), reason="reads Linux /proc")
def test_bench_breakdown_counts_each_threads_cpu_under_its_role():
    import multiprocessing
    import threading

    from tests.bench_helpers import load_bench

    bench = load_bench("loader")
    before = bench.steady_cpu()
    release = threading.Event()
    threads = []
    for name in ("volume-read_0", "batch-reader"):  # the names BatchLoader gives its threads
        started = threading.Event()
        threads.append(threading.Thread(target=_spin_then_wait, args=(started, release), name=name))
        threads[-1].start()
        assert started.wait(120)
    ctx = multiprocessing.get_context("fork")
    child_started, child_release = ctx.Event(), ctx.Event()
    child = ctx.Process(target=_spin_then_wait, args=(child_started, child_release))
    child.start()
    try:
        assert child_started.wait(120)
        after = bench.steady_cpu()  # threads and child alive (an ended thread's CPU leaves /proc)
    finally:
        release.set()
        child_release.set()
        child.join()
        for thread in threads:
            thread.join()
    grew = {role: after.get(role, 0.0) - before.get(role, 0.0) for role in after}
    # 10 ms clock ticks: 0.2 s of spinning reads as at least 0.18 s, and under its own role only
    assert grew["volume reads"] >= 0.18 and grew["batch reader"] >= 0.18 and grew["worker"] >= 0.18
    assert grew.get("other threads", 0.0) < 0.18


def test_a_compressed_volume_of_objects_is_refused_naming_the_member():
    from ctprep_train.data.decode import CompressedNpy

    header = _npy(np.arange(4, dtype=np.int16))
    raw = _with_header(header, b"'<i2'", b"'|O'")
    data, suffix = shards.compress(raw, "zst")
    with pytest.raises(CorruptMemberError, match=r"^image\.npy\.zst: object arrays are refused"):
        CompressedNpy(data, suffix, None, "image.npy.zst")
