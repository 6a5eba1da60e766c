"""Shards read from a web server (HTTP Range requests) and from S3, against real servers on 127.0.0.1.

The servers (tests/remote_servers.py) are uvicorn + Starlette's static files (Range-capable, as
nginx), the standard library's http.server (no Range: must be refused) and moto's S3 server.
Every read is compared byte for byte with the same file read locally; faults (error statuses,
a body cut short) are injected by the web server itself, on real sockets.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import shutil
from pathlib import Path

import numpy as np
import pytest

from ctprep import schema, shards
from ctprep_train import shard_io
from ctprep_train.shard_io import CorruptMemberError, RetryPolicy, TransientReadError
from ctprep_train.testing import write_test_shards
from tests.remote_servers import serve_http, serve_plain_http, serve_s3

pytestmark = pytest.mark.multiprocess  # starts servers

FAST_RETRY = RetryPolicy(attempts=3, backoff_s=0.01, max_backoff_s=0.05)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("served")
    # uncompressed volumes of > 1 MiB take the reader's large-read path (read straight into the batch)
    write_test_shards(root, {"train": [4, 3, 1], "valid": [3]}, shape_zyx=(16, 64, 64), compress=())
    (root / "blob.bin").write_bytes(np.random.default_rng(0).bytes(3_000_000))
    return root


@pytest.fixture(scope="module")
def http(folder):
    with serve_http(folder) as server:
        yield server


@pytest.fixture(scope="module")
def s3(folder):
    with serve_s3() as server:
        shard_io.reset_connections()  # a client made before the endpoint variables were set
        url = server.upload(folder, "shards-bucket", "builds/demo")
        yield server, url
    shard_io.reset_connections()


@pytest.fixture(autouse=True)
def _no_faults_left(request):
    yield
    if "http" in request.fixturenames:
        faults = request.getfixturevalue("http").faults
        faults.status.clear(), faults.cut_after.clear()
        faults.path_suffix = ""


def _files(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def _compare_reads(folder: Path, base: str) -> None:
    rng = np.random.default_rng(1)
    for rel in _files(folder):
        local = (folder / rel).read_bytes()
        with shard_io.open_shard(shard_io.join(base, rel)) as remote:
            assert remote.size == len(local), rel
            for _ in range(5):
                offset = int(rng.integers(0, len(local)))
                n = int(rng.integers(1, len(local) - offset + 1))
                assert remote.pread(offset, n) == local[offset : offset + n], (rel, offset, n)
            whole = bytearray(len(local))
            remote.readinto(0, memoryview(whole))
            assert whole == local, rel
        # The header scan's read-ahead serves 512-byte reads from larger blocks: same bytes.
        with shard_io.open_shard(shard_io.join(base, rel), readahead=shard_io.SCAN_READAHEAD) as scan:
            for offset in range(0, len(local) - 512, 512 * 37):
                assert scan.pread(offset, 512) == local[offset : offset + 512], (rel, offset)


def test_http_range_reads_equal_the_local_bytes(folder, http):
    _compare_reads(folder, http.url)
    assert all(rng is None or rng.startswith("bytes=") for _, rng in http.faults.requests)


def test_s3_range_reads_equal_the_local_bytes(folder, s3):
    _, url = s3
    _compare_reads(folder, url)


def test_index_json_over_http_and_s3_equals_the_local_one(folder, http, s3):
    local = shards.read_index(folder)
    assert shard_io.read_index(http.url, schema.SCHEMA_VERSION) == local
    assert shard_io.read_index(http.url + "/", schema.SCHEMA_VERSION) == local
    assert shard_io.read_index(s3[1], schema.SCHEMA_VERSION) == local
    assert shard_io.read_index(str(folder), schema.SCHEMA_VERSION) == local
    with pytest.raises(shards.SchemaVersionError, match=rf"{http.url}/index.json.*schema_version {schema.SCHEMA_VERSION}"):
        shard_io.read_index(http.url, schema.SCHEMA_VERSION + 1)
    with pytest.raises(FileNotFoundError, match=rf"{http.url}/train/index.json: no shard index"):
        shard_io.read_index(http.url + "/train", schema.SCHEMA_VERSION)
    with pytest.raises(FileNotFoundError, match=r"s3://shards-bucket/elsewhere/index.json: no shard index"):
        shard_io.read_index("s3://shards-bucket/elsewhere", schema.SCHEMA_VERSION)


def test_transient_http_errors_are_retried_and_a_cut_body_resumes_where_it_stopped(folder, http):
    local = (folder / "blob.bin").read_bytes()
    url = http.url + "/blob.bin"
    http.faults.path_suffix = "/blob.bin"
    http.faults.status[:] = [503, 502]
    http.faults.cut_after[:] = [100_000]
    start = len(http.faults.requests)
    target = bytearray(2_000_000)
    shard_io.read_range_into(url, 777, memoryview(target))
    assert target == local[777:2_000_777]
    ranges = [rng for path, rng in http.faults.requests[start:] if path == "/blob.bin"]
    # two error answers, the cut response, then only the missing rest
    assert ranges == ["bytes=777-2000776"] * 3 + [f"bytes={777 + 100_000}-2000776"]


def test_http_failures_raise_naming_the_url(folder, http):
    with pytest.raises(FileNotFoundError, match=rf"{http.url}/train/missing.tar"):
        shard_io.read_range(http.url + "/train/missing.tar", 0, 10)
    size = (folder / "blob.bin").stat().st_size
    with pytest.raises(CorruptMemberError, match=rf"{http.url}/blob.bin: short read at {size - 10}: 10 of 50"):
        shard_io.read_range(http.url + "/blob.bin", size - 10, 50)  # the object ends inside the range
    with pytest.raises(CorruptMemberError, match=rf"{http.url}/blob.bin: range not satisfiable"):
        shard_io.read_range(http.url + "/blob.bin", size + 10, 50)
    http.faults.path_suffix = "/blob.bin"
    http.faults.status[:] = [503] * FAST_RETRY.attempts
    with pytest.raises(TransientReadError, match=rf"{http.url}/blob.bin: read failed 3 times; last: .*HTTP 503"):
        shard_io.open_shard(http.url + "/blob.bin", FAST_RETRY).pread(0, 10)
    assert not http.faults.status  # every try reached the server
    with pytest.raises(TransientReadError, match=r"http://127.0.0.1:9/x.tar: read failed 3 times; last: .*Connection"):
        shard_io.open_shard("http://127.0.0.1:9/x.tar", FAST_RETRY).pread(0, 10)  # nothing listens on port 9


def test_a_server_without_range_support_is_refused(folder):
    with serve_plain_http(folder) as url:
        with pytest.raises(OSError, match=r"answered a Range request with HTTP 200.*honours Range"):
            shard_io.read_range(url + "/blob.bin", 1000, 10)


def test_s3_failures_raise_naming_the_url(folder, s3):
    _, url = s3
    with pytest.raises(FileNotFoundError, match=rf"{url}/train/missing.tar.*NoSuchKey"):
        shard_io.read_range(url + "/train/missing.tar", 0, 10)
    with pytest.raises(FileNotFoundError, match=r"s3://no-such-bucket/x.tar"):
        shard_io.read_range("s3://no-such-bucket/x.tar", 0, 10)
    size = (folder / "blob.bin").stat().st_size
    with pytest.raises(CorruptMemberError, match=rf"{url}/blob.bin: short read at {size - 10}: 10 of 50"):
        shard_io.read_range(url + "/blob.bin", size - 10, 50)
    with pytest.raises(ValueError, match=r"s3://BUCKET/KEY"):
        shard_io.open_shard("s3://bucket-only")


def test_locations_join_and_unknown_schemes_fail(tmp_path):
    assert shard_io.join("http://h:1/a/b/", "train/x 1.tar") == "http://h:1/a/b/train/x%201.tar"
    assert shard_io.join("s3://bucket/pre", "valid/y.tar") == "s3://bucket/pre/valid/y.tar"
    assert shard_io.join(str(tmp_path), "t/x.tar") == str((tmp_path / "t" / "x.tar").resolve())
    with pytest.raises(ValueError, match=r"must stay below"):
        shard_io.join("http://h/a", "../b.tar")
    with pytest.raises(ValueError, match=r"ftp://h/a: unsupported scheme 'ftp'.*s3://"):
        shard_io.open_shard("ftp://h/a")
    assert shard_io.is_remote("HTTPS://h/x") and shard_io.is_remote("s3://b/k")
    assert not shard_io.is_remote(str(tmp_path)) and not shard_io.is_remote(tmp_path)


def _digest_in_child(url: str, queue) -> None:
    queue.put(hashlib.sha256(shard_io.read_range(url, 0, 2_000_000)).hexdigest())


def test_a_forked_child_reads_on_its_own_connections(folder, http):
    # The parent's pool holds keep-alive sockets; a forked DataLoader worker must not share them.
    url = http.url + "/blob.bin"
    want = hashlib.sha256((folder / "blob.bin").read_bytes()[:2_000_000]).hexdigest()
    assert hashlib.sha256(shard_io.read_range(url, 0, 2_000_000)).hexdigest() == want
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    children = [ctx.Process(target=_digest_in_child, args=(url, queue)) for _ in range(2)]
    for child in children:
        child.start()
    got = [queue.get(timeout=120) for _ in children]
    for child in children:
        child.join(timeout=60)
        assert child.exitcode == 0
    assert got == [want, want]
    assert hashlib.sha256(shard_io.read_range(url, 0, 2_000_000)).hexdigest() == want  # parent's pool intact


def test_local_reads_keep_their_errors(tmp_path):
    path = tmp_path / "x.bin"
    path.write_bytes(b"0123456789")
    assert shard_io.read_range(str(path), 2, 5) == b"23456"
    with pytest.raises(CorruptMemberError, match=rf"{path}: short read at 8"):
        shard_io.read_range(str(path), 8, 5)
    target = bytearray(4)
    shard_io.read_range_into(str(path), 6, memoryview(target))
    assert target == b"6789"
    with pytest.raises(FileNotFoundError):
        shard_io.read_range(str(tmp_path / "missing.bin"), 0, 1)
    shutil.rmtree(tmp_path)
