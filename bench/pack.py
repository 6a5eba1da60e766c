"""Benchmark the pack stage: member compression (bytes, encode / decode time, the break-even
storage bandwidth) on a chest-like phantom.

Usage::

    python -m bench.pack --shape 240 480 480 --read-samples 3   # ctclip size
    python -m bench.pack --shape 32 128 128 --read-samples 16   # demo size
"""

from __future__ import annotations

import argparse
import io
import json
import os
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


def parse_args(argv: Iterable[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", type=int, nargs=3, default=(240, 480, 480), metavar=("Z", "Y", "X"))
    ap.add_argument("--zstd-level", type=int, default=3)
    ap.add_argument("--read-samples", type=int, default=0, help="also time reading a shard of this many samples")
    return ap.parse_args(list(argv) if argv is not None else None)


def main(argv: Iterable[str] | None = None) -> None:
    args = parse_args(argv)
    for row in measure_compression(tuple(args.shape), zstd_level=args.zstd_level):
        print(json.dumps(row))
    if args.read_samples:
        with tempfile.TemporaryDirectory() as tmp:
            for row in measure_shard_read(tuple(args.shape), args.read_samples, tmp, args.zstd_level):
                print(json.dumps(row))


if __name__ == "__main__":
    main()
