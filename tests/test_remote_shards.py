"""Shards read from a web server (HTTP Range requests) and from S3, against real servers on 127.0.0.1.

The servers (tests/remote_servers.py) are uvicorn + Starlette's static files (Range-capable, as
nginx), the standard library's http.server (no Range: must be refused) and moto's S3 server.
Every read is compared byte for byte with the same file read locally; faults (error statuses,
a body cut short) are injected by the web server itself, on real sockets.
"""

from __future__ import annotations

import hashlib
import itertools
import multiprocessing
import shutil
from pathlib import Path

import numpy as np
import pytest

from ctprep import schema, shards
from ctprep_train import data as D
from ctprep_train import shard_io
from ctprep_train.config import DataConfig
from ctprep_train.shard_io import CorruptMemberError, RetryPolicy, TransientReadError
from ctprep_train.testing import TEST_TOKENIZER, write_test_shards
from tests.remote_servers import self_signed_certificate, serve_http, serve_plain_http, serve_s3
from tests.trainer_helpers import STAND_IN, launch, read_metrics

pytestmark = pytest.mark.multiprocess  # starts servers

FAST_RETRY = RetryPolicy(attempts=3, backoff_s=0.01, max_backoff_s=0.05)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("served")
    # Both volume paths of the reader: uncompressed images of >= 1 MiB are read straight into the
    # batch tensor (ctrate), zstd members are fetched whole and decompressed into it (omniabnorm).
    index = write_test_shards(root, {"train": [4, 3, 1], "valid": [4]}, shape_zyx=(32, 128, 128), compress=())
    write_test_shards(root, {"train": [3, 2], "valid": [3]}, source="omniabnorm", seed=1, shape_zyx=(16, 64, 64),
                      index=index)
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


# --------------------------------------------------------------------------- the loader on remote shards

EXPECT = D.ShardExpectation(tokenizer=TEST_TOKENIZER, patch_size=(4, 16, 16))
SOURCES = {"ctrate": 1.0, "omniabnorm": 1.0}


def _cfg(root: str, **kw) -> DataConfig:
    base = dict(shards=root, batch_size=2, buffer_size=4, num_workers=0, tokenizer=dict(TEST_TOKENIZER),
                sources=dict(SOURCES), valid_max_samples=0)
    base.update(kw)
    return DataConfig(**base)


def _digest(batch: dict) -> str:
    h = hashlib.sha256()
    for key in ("image", "mask", "regions", "report_ids", "steps_ids", "labels"):
        h.update(np.ascontiguousarray(np.asarray(batch[key])).tobytes())
    return h.hexdigest()


def _row(batch: dict) -> tuple:
    stats = batch[D.BATCH_STATS_KEY]
    return tuple(batch["ids"]), stats["source"], stats["corrupt"], tuple(stats.get("positions", ())), _digest(batch)


def _train_rows(root: str, n: int, **kw) -> list[tuple]:
    cfg = _cfg(root, **kw)
    index = D.load_shard_index(root, EXPECT)
    return [_row(b) for b in itertools.islice(D.build_train_loader(cfg, index, EXPECT, rank=0, world_size=1), n)]


def _valid_rows(root: str, rank: int = 0, world_size: int = 1) -> list[tuple]:
    cfg = _cfg(root)
    index = D.load_shard_index(root, EXPECT)
    return [_row(b) for b in D.build_valid_loader(cfg, index, EXPECT, rank=rank, world_size=world_size)]


@pytest.mark.parametrize("where", ["http", "s3"])
def test_training_and_validation_batches_streamed_remotely_equal_the_local_ones(folder, where, request):
    server = request.getfixturevalue(where)
    remote = server.url if where == "http" else server[1]
    # one DataLoader worker: the remote reads also run in a forked process, with 2 reader threads
    local = _train_rows(str(folder), 10, num_workers=1, read_threads=2)
    assert _train_rows(remote, 10, num_workers=1, read_threads=2) == local
    assert {row[1] for row in local} == set(SOURCES) and all(row[2] == 0 for row in local)
    for rank in range(2):  # equal batch counts per rank, every sample once
        local_valid = _valid_rows(str(folder), rank, 2)
        assert _valid_rows(remote, rank, 2) == local_valid and local_valid


def _flip(path: Path, offset: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0xFF
    path.write_bytes(bytes(raw))


def test_corrupt_bytes_served_remotely_are_skipped_and_counted_as_locally(folder, tmp_path):
    bad = shutil.copytree(folder, tmp_path / "bad")
    index = shards.read_index(bad)
    damaged = []
    # one damaged sample per validation batch (batches of 2): a volume read straight into the
    # batch, a meta.json, a zstd volume; each batch keeps a readable sample
    for source, member, k in (("ctrate", "image.npy", 0), ("ctrate", "meta.json", 2), ("omniabnorm", "image.npy.zst", 0)):
        (entry,) = [e for e in index["splits"]["valid"] if e["source"] == source]
        refs, error = D.scan_tar(str(bad / entry["path"]))
        assert error is None
        ref = refs[k]
        _, offset, size = next(m for m in ref.members if m[0] == member)
        _flip(bad / entry["path"], offset + size // 2)
        damaged.append(ref.key)
    local = _valid_rows(str(bad))
    with serve_http(bad) as server:
        remote = _valid_rows(server.url)
        remote_train = _train_rows(server.url, 8)
    assert remote == local
    assert sum(row[2] for row in local) == 3  # each damaged sample counted once
    seen = {key for row in local for key in row[0]}
    assert not seen & set(damaged) and len(seen) == 7 - 3  # every intact valid sample, no damaged one
    assert remote_train == _train_rows(str(bad), 8)


def test_train_py_streams_its_shards_over_http_with_the_same_samples_as_from_disk(folder, http, tmp_path):
    def run(shards: str, out: Path) -> tuple[list[dict], list[dict]]:
        launch(["--config", "configs/train/demo.yaml", "--shards", shards, "--output", str(out), *STAND_IN,
                "train.val_every=0", "train.log_every=1", "train.steps=4", "train.ckpt_every=0",
                "data.num_workers=1", "data.batch_size=2", "data.sources={ctrate: 1.0, omniabnorm: 1.0}"])
        return read_metrics(out), read_metrics(out, "valid")

    local_train, local_valid = run(str(folder), tmp_path / "local")
    remote_train, remote_valid = run(http.url, tmp_path / "http")
    # same weights from the same seed + the same batches in the same order => the same losses
    assert [r["step"] for r in remote_train] == [1, 2, 3, 4]
    for a, b in zip(local_train, remote_train):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-6, abs=1e-7), (a, b)
    assert local_valid and len(remote_valid) == len(local_valid)
    for a, b in zip(local_valid, remote_valid):
        assert b["pool_size"] == a["pool_size"] and b["image_to_text/R@1"] == pytest.approx(a["image_to_text/R@1"])


# --------------------------------------------------------------------------- evaluation on remote shards


def test_evaluation_reads_a_split_over_http_and_s3_as_from_disk(folder, http, s3):
    from ctprep_train.eval.data import iter_split

    def samples(root: str) -> list[tuple[str, str]]:
        return [(s["__key__"], hashlib.sha256(np.ascontiguousarray(s["image"]).tobytes()
                                              + np.ascontiguousarray(s["mask"]).tobytes()).hexdigest())
                for s in iter_split(root, "valid", skipped=[])]

    local = samples(str(folder))
    assert len(local) == 7
    assert samples(http.url) == local
    assert samples(s3[1]) == local


def test_evaluate_command_on_shards_served_over_http_equals_the_local_run(tmp_path):
    import json

    import torch

    from ctprep_train.eval.run import main, parse_args
    from ctprep_train.model import create_model, save_pretrained

    shards_dir = tmp_path / "shards"
    write_test_shards(shards_dir, {"train": [1], "valid": [3, 2]}, seed=1)
    torch.manual_seed(0)
    save_pretrained(create_model("tiny", **{"vision.depth": 2, "vision.out_indices": [0, 1]}), tmp_path / "encoder")
    with serve_http(shards_dir) as server:
        assert parse_args(["--encoder", "e", "--shards", server.url + "/", "--out", "o"]).shards == server.url + "/"
        results = {}
        for name, where in (("local", str(shards_dir)), ("http", server.url)):
            main(["--encoder", str(tmp_path / "encoder"), "--shards", where, "--split", "valid",
                  "--out", str(tmp_path / name), "--picture-cases", "0", "--ks", "1,5"])
            results[name] = json.loads((tmp_path / name / "eval.json").read_text())
    local, remote = results["local"], results["http"]
    assert remote["n_cases"] == local["n_cases"] == 5
    assert remote["retrieval"] == local["retrieval"] and remote["zero_shot"] == local["zero_shot"]
    assert remote["shards"] == server.url


def test_loader_bench_remote_row_pairs_http_with_the_local_file(tmp_path):
    from tests.bench_helpers import load_bench

    bench = load_bench("loader")
    result = bench.main(["--cases", "4", "--src", "8", "32", "32", "--grid", "8", "32", "32", "--batch-size", "2",
                         "--workers", "1", "--repeats", "1", "--passes", "2", "--skip-ctclip", "--remote", "uvicorn",
                         "--work", str(tmp_path / "w")])
    rows = {r["method"]: r for r in result["rows"]}
    local, http = rows["stream shards, local file"], rows["stream shards, HTTP from uvicorn on 127.0.0.1"]
    assert local["samples_s"] > 0 and http["samples_s"] > 0 and 0 < http["vs_raw"]
    assert http["vs_local"] == pytest.approx(http["samples_s"] / local["samples_s"])  # one pair: the ratio itself


def test_https_reads_trust_the_system_store_and_refuse_an_unknown_certificate(folder, tmp_path, monkeypatch):
    certificate = self_signed_certificate(tmp_path)
    local = (folder / "blob.bin").read_bytes()
    with serve_http(folder, tls=certificate) as server:
        assert server.url.startswith("https://")
        with pytest.raises(OSError, match=rf"{server.url}/blob.bin: TLS: .*CERTIFICATE_VERIFY_FAILED"):
            shard_io.read_range(server.url + "/blob.bin", 0, 10)  # refused at once: not retried
        assert not any(path == "/blob.bin" for path, _ in server.faults.requests)
        shard_io.reset_connections()  # the next pool's TLS context reads SSL_CERT_FILE
        monkeypatch.setenv("SSL_CERT_FILE", str(certificate[0]))
        assert shard_io.read_range(server.url + "/blob.bin", 1234, 100_000) == local[1234:101_234]
        assert shard_io.read_index(server.url, schema.SCHEMA_VERSION) == shards.read_index(folder)
    shard_io.reset_connections()


def test_a_shard_the_server_fails_to_list_is_tried_again_next_pass(folder, http):
    # Every try of the first tar scan of one shard gets a 503: that pass goes on without the shard
    # (counted, as an unreadable local file), the next pass reads it.
    index = shards.read_index(folder)
    rel = next(e["path"] for e in index["splits"]["train"] if e["source"] == "ctrate" and e["samples"] == 4)
    failed_keys = {ref.key for ref in D.scan_tar(str(folder / rel))[0]}
    all_keys = {ref.key for e in index["splits"]["train"] if e["source"] == "ctrate"
                for ref in D.scan_tar(str(folder / e["path"]))[0]}
    http.faults.path_suffix = "/" + rel
    http.faults.status[:] = [503] * shard_io.DEFAULT_RETRY.attempts
    cfg = _cfg(http.url, sources={"ctrate": 1.0}, buffer_size=1)
    loader = D.build_train_loader(cfg, D.load_shard_index(http.url, EXPECT), EXPECT, rank=0, world_size=1)
    rows = [_row(b) for b in itertools.islice(loader, 6)]  # batches of 2: 4 samples in pass 1, 8 in pass 2
    first, second = [k for r in rows[:2] for k in r[0]], [k for r in rows[2:] for k in r[0]]
    assert not http.faults.status  # every try reached the server
    assert len(set(first)) == 4 and not set(first) & failed_keys
    assert sorted(second) == sorted(all_keys) and len(all_keys) == 8
    assert sum(r[2] for r in rows) == 1  # the failed scan, counted once
