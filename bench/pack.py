"""Benchmark the pack stage on one machine.

* member compression (default): bytes, encode / decode time and the break-even storage
  bandwidth of each member compression, on a chest-like phantom;
* ``--delta-cases N --edits K ...``: a synthetic CT-RATE build of N cases, then a CoT delivery
  (``--cot``) that rewrites step 1 of K cases: stages rerun, new shard bytes, listed bytes, time,
  against the full build;
* ``--parallel-cases N``: the pack stage alone with 1 and 2 Dask workers (external local
  clusters, so their start-up is not timed), alternated, median of ``--repeats``; the shards of
  every run are compared with the first, byte for byte.

Usage::

    python -m bench.pack --shape 240 480 480 --read-samples 3   # ctclip size
    python -m bench.pack --shape 32 128 128 --read-samples 16   # demo size
    python -m bench.pack --delta-cases 100 --edits 1 10 50
    python -m bench.pack --parallel-cases 24 --grid 64 256 256 --repeats 3
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import io
import json
import os
import shutil
import statistics
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from ctprep.schema import strip_compression
from ctprep.shard_writer import ShardWriter
from ctprep.shards import compress, decompress, encode_sample, npy_bytes

def phantom_case(shape_zyx: tuple[int, int, int], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Noisy chest-like phantom (body, two lungs, N(0, 15) HU noise) and its lung mask.

    Noise sets the entropy of real CT too, so this is the honest case for the image.
    """
    rng = np.random.default_rng(seed)
    z, y, x = np.ogrid[-1 : 1 : shape_zyx[0] * 1j, -1 : 1 : shape_zyx[1] * 1j, -1 : 1 : shape_zyx[2] * 1j]
    body = np.broadcast_to((y / 0.7) ** 2 + (x / 0.9) ** 2 < 1, shape_zyx)
    lung = np.broadcast_to(((((x - 0.4) / 0.3) ** 2 + (y / 0.5) ** 2 < 1)
                            | (((x + 0.4) / 0.3) ** 2 + (y / 0.5) ** 2 < 1)) & (abs(z) < 0.9), shape_zyx)
    image = np.full(shape_zyx, -1024, np.float32)
    image[body] = 40
    image[lung] = -850
    image += rng.normal(0, 15, shape_zyx).astype(np.float32)
    image = np.clip(image, -1024, 3071).astype(np.int16)
    mask = lung.astype(np.uint8)
    return image, mask


def measure_compression(shape_zyx: tuple[int, int, int], seed: int = 0, zstd_level: int = 3) -> list[dict[str, Any]]:
    """Bytes and encode / decode seconds of image and mask members, per compression.

    Uses :func:`phantom_case`.
    """
    image, mask = phantom_case(shape_zyx, seed)
    rows = []
    for name, arr in (("image", image), ("mask", mask)):
        raw = npy_bytes(arr)
        for method in ("none", "zst", "gz"):
            t0 = time.perf_counter()
            data, suffix = compress(raw, method, zstd_level)
            t1 = time.perf_counter()
            back = decompress(data, suffix)
            np.lib.format.read_array(io.BytesIO(back), allow_pickle=False)
            t2 = time.perf_counter()
            rows.append({"member": name, "shape": list(shape_zyx), "compression": method or "none",
                         "bytes": len(data), "ratio": round(len(raw) / len(data), 2),
                         "encode_s": round(t1 - t0, 3), "decode_load_s": round(t2 - t1, 3)})
    return rows


def measure_shard_read(shape_zyx: tuple[int, int, int], samples: int, work_dir: str | os.PathLike,
                       zstd_level: int = 3) -> list[dict[str, Any]]:
    """Write ``samples`` phantom samples per compression into a shard and time a full read.

    The read is tar streaming (``tarfile``, as webdataset does) + decompression + ``np.load``
    of image and mask, from the page cache, so it is the CPU cost; add bytes / storage
    bandwidth for the I/O. The break-even bandwidth is where both choices cost the same.
    """
    image, mask = phantom_case(shape_zyx, 1)
    rows = []
    for method in ("none", "zst", "gz"):
        out = Path(work_dir) / f"measure-{method}"
        writer = ShardWriter(out, "m", max_bytes=1 << 40, max_samples=samples)
        for i in range(samples):
            writer.write(f"case{i:04d}", encode_sample({"image": image, "mask": mask}, {"id": i}, method, zstd_level))
        shard = writer.close()[0]
        t0 = time.perf_counter()
        with tarfile.open(out / shard.path, "r|") as tar:
            for m in tar:
                data = tar.extractfile(m).read()  # type: ignore[union-attr]
                member, suffix = strip_compression(m.name.split(".", 1)[1])
                if member.endswith(".npy"):
                    np.lib.format.read_array(io.BytesIO(decompress(data, suffix)), allow_pickle=False)
        seconds = time.perf_counter() - t0
        rows.append({"compression": method, "shape": list(shape_zyx), "samples": samples,
                     "shard_bytes": shard.bytes, "bytes_per_sample": shard.bytes // samples,
                     "read_decode_s_per_sample": round(seconds / samples, 3)})
    base = rows[0]
    for r in rows[1:]:
        saved = base["bytes_per_sample"] - r["bytes_per_sample"]
        extra = r["read_decode_s_per_sample"] - base["read_decode_s_per_sample"]
        r["break_even_MBps"] = round(saved / extra / 1e6, 1) if extra > 0 else None
    return rows


# --------------------------------------------------------------------------- growing data


def synthetic_source(root: Path, cases: int, seed: int = 0) -> Path:
    from ctprep.synth.ctrate import write_ctrate

    src = root / "ctrate"
    if not src.is_dir():
        write_ctrate(src, cases=cases, grid="demo", seed=seed)
    return src


def shard_digests(out: Path) -> dict[str, str]:
    """Listed shard path -> sha256 of its file (the index's ``splits``)."""
    from ctprep.shards import read_index

    index = read_index(out)
    return {e["path"]: hashlib.sha256((out / e["path"]).read_bytes()).hexdigest()
            for entries in index["splits"].values() for e in entries}


def measure_delta(root: Path, cases: int, edits: list[int]) -> list[dict[str, Any]]:
    """Bytes and time of CoT deliveries that rewrite step 1 of k cases, after a full build."""
    from ctprep.config import load_config, with_cot_files
    from ctprep.runner import build
    from ctprep.shards import read_index

    src, cfg = synthetic_source(root, cases), load_config("demo")
    base = root / "base"
    shutil.rmtree(base, ignore_errors=True)
    t0 = time.perf_counter()
    full = build([src], base, cfg, workers=0, progress=False, log=lambda m: None)
    full_s = time.perf_counter() - t0
    ids = sorted(cid for entries in read_index(base)["splits"].values() for e in entries for cid in e["cases"])
    rows = []
    for k in edits:
        out = root / f"edit-{k}"
        shutil.rmtree(out, ignore_errors=True)
        shutil.copytree(base, out)
        cot = root / f"cot-{k}.jsonl"
        cot.write_text("".join(json.dumps({"case_id": cid, "steps": [{"step": 1, "text": f"Edited step one of {cid}."}]})
                               + "\n" for cid in ids[:k]))
        t0 = time.perf_counter()
        report = build([src], out, with_cot_files(cfg, [cot]), workers=0, progress=False, log=lambda m: None)
        seconds = time.perf_counter() - t0
        index = read_index(out)
        listed = [e for entries in index["splits"].values() for e in entries]
        last = index["generations"][-1]["generation"]
        rows.append({"k": k, "cases": len(ids), "ran": {n: t.ran for n, t in report.tallies.items()},
                     "bytes_written": sum(e["bytes"] for e in listed if e["generation"] == last),
                     "bytes_listed": sum(e["bytes"] for e in listed), "seconds": round(seconds, 1),
                     "full_build_s": round(full_s, 1), "full_build_ran": {n: t.ran for n, t in full.tallies.items()}})
        shutil.rmtree(out)
    return rows


def measure_parallel(root: Path, cases: int, grid: tuple[int, int, int], repeats: int) -> list[dict[str, Any]]:
    """The pack stage alone with 1 and 2 workers, alternated; seconds, output identical to the first run."""
    from distributed import Client, LocalCluster

    from ctprep.config import load_config
    from ctprep.runner import build

    src, cfg = synthetic_source(root, cases), load_config("demo")
    cfg.resample.shape_zyx = tuple(grid)
    work = root / "work"
    build([src], root / "prep", cfg, work=work, stages="scan,resample,regions,text", workers=2, progress=False,
          log=lambda m: None)
    seconds: dict[int, list[float]] = {1: [], 2: []}
    reference, identical, nbytes = None, True, 0
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None) as one, \
            LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as two:
        for r in range(repeats):
            for workers, lc in ((1, one), (2, two)) if r % 2 == 0 else ((2, two), (1, one)):
                with Client(lc) as client:  # the workers import the pack code before the timed run
                    client.run(importlib.import_module, "ctprep.stages.pack")
                out = root / f"pack-{workers}-{r}"
                report = build([src], out, cfg, work=work, scheduler=lc.scheduler_address, progress=False,
                               log=lambda m: None)
                seconds[workers].append(report.tallies["pack"].seconds)
                digests = shard_digests(out)
                reference = reference or digests
                identical &= digests == reference
                nbytes = sum((out / p).stat().st_size for p in digests)
                shutil.rmtree(out)
    one_s = statistics.median(seconds[1])
    return [{"workers": w, "cases": cases, "grid": list(grid), "pack_s": round(statistics.median(seconds[w]), 2),
             "runs_s": [round(x, 2) for x in seconds[w]], "MB_s": round(nbytes / statistics.median(seconds[w]) / 1e6, 1),
             "speedup_vs_1": round(one_s / statistics.median(seconds[w]), 2), "identical_to_first": identical}
            for w in (1, 2)]


def parse_args(argv: Iterable[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", type=int, nargs=3, default=(240, 480, 480), metavar=("Z", "Y", "X"))
    ap.add_argument("--zstd-level", type=int, default=3)
    ap.add_argument("--read-samples", type=int, default=0, help="also time reading a shard of this many samples")
    ap.add_argument("--delta-cases", type=int, default=0, help="measure CoT edits after a build of this many cases")
    ap.add_argument("--edits", type=int, nargs="+", default=[1, 10, 50], help="with --delta-cases: cases edited")
    ap.add_argument("--parallel-cases", type=int, default=0, help="measure pack with 1 vs 2 workers on this many cases")
    ap.add_argument("--grid", type=int, nargs=3, default=(64, 256, 256), metavar=("Z", "Y", "X"),
                    help="with --parallel-cases: the resample grid")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--work", help="folder for the generated data (default: a temporary folder)")
    return ap.parse_args(list(argv) if argv is not None else None)


def main(argv: Iterable[str] | None = None) -> None:
    args = parse_args(argv)
    if args.delta_cases or args.parallel_cases:
        with tempfile.TemporaryDirectory(prefix="bench-pack-") as tmp:
            root = Path(args.work or tmp)
            if args.delta_cases:
                for row in measure_delta(root / f"delta-{args.delta_cases}", args.delta_cases, args.edits):
                    print(json.dumps(row))
            if args.parallel_cases:
                for row in measure_parallel(root / f"parallel-{args.parallel_cases}", args.parallel_cases,
                                            tuple(args.grid), args.repeats):
                    print(json.dumps(row))
        return
    for row in measure_compression(tuple(args.shape), zstd_level=args.zstd_level):
        print(json.dumps(row))
    if args.read_samples:
        with tempfile.TemporaryDirectory() as tmp:
            for row in measure_shard_read(tuple(args.shape), args.read_samples, tmp, args.zstd_level):
                print(json.dumps(row))


if __name__ == "__main__":
    main()
