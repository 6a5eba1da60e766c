"""Benchmark the streaming shard loader against a raw read and against on-the-fly .nii.gz loading.

Three ways to get the same cases into training batches, each with 0, 1 and 2 DataLoader
workers (samples/s and MB/s, median of --repeats runs, warm page cache):

* raw    : read every shard tar with 16 MB reads into one reused buffer (the floor: no
           parsing, no decoding; what ``cat`` does).
* stream : ctprep_train.data.build_train_loader on those shards (tar by offset, npy decode,
           collate into the Batch contract; volumes copied by ``--read-threads`` threads).
* ctclip : what CT-CLIP does per sample: nibabel load .nii.gz, get_fdata (float64), apply
           slope/intercept, torch trilinear resample to the same grid, clip, per case.
* webdataset : stock ``webdataset.WebDataset(tar paths)`` over the same shards: ``decode`` with
           explicit handlers (.npy via numpy's reader, .npy.zst via zstandard, .json; never
           pickle), ``batched`` with image/mask/regions/labels stacked into tensors, in the same
           DataLoader setup (no checksums, no token padding: less work than the stream rows).

MB/s is always counted in shard-tar bytes per sample so the three are comparable. Loader
figures are the steady state: each measurement takes its first batch (reported for the stream
rows as "first batch s", from building the loader) and ``--warmup-passes`` more untimed, then
times ``--passes`` passes over the shards; a training run streams for hours, so the first pass,
while the buffer pool, the read threads and the workers fill (tens of ms), is start-up, not
throughput.

``--remote nginx|uvicorn`` adds the loader (1 worker) streaming the same shards from that web
server on 127.0.0.1 (HTTP Range requests, ``ctprep_train.shard_io``), alternated with the local
folder; nginx is what a cluster would serve them with, uvicorn + Starlette needs only the [dev] extra.

``--verify-cost`` adds the price of verified reads (docs/verified-reads.md): the streaming
loader with one DataLoader worker, checksums verified (the default) and not
(``ShardExpectation.verify_checksums=False``), measured in alternation, each paired with a raw
read; wall-clock samples/s and CPU seconds (this process + its worker, whole run), and where a
sample's time goes in the steady state: CPU ms per sample of the volume read threads, the batch
reader thread, the other threads and the DataLoader worker, next to the wall ms per sample (Linux).

Usage::

    python bench/loader.py                      # defaults: 12 cases, src 120x320x320 -> 64x256x256
    python bench/loader.py --cases 8 --grid 32 128 128 --src 60 160 160 --compress zst
    python bench/loader.py --skip-ctclip --workers 1 --verify-cost
    python bench/loader.py --skip-ctclip --workers 1 --remote nginx
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import resource
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from ctprep import shards
from ctprep_train import data as D
from ctprep_train.config import DataConfig
from ctprep_train.testing import TEST_TOKENIZER, make_sample, shard_entry


# --------------------------------------------------------------------------- inputs


def phantom(shape: tuple[int, int, int], rng: np.random.Generator) -> np.ndarray:
    """A chest-like int16 HU volume (body, two lungs, spine, noise): compresses like CT."""
    z, y, x = np.ogrid[: shape[0], : shape[1], : shape[2]]
    zc, yc, xc = (s / 2 for s in shape)
    hu = np.full(shape, -1000, dtype=np.float32)
    body = ((y - yc) / (0.42 * shape[1])) ** 2 + ((x - xc) / (0.47 * shape[2])) ** 2 < 1
    hu[np.broadcast_to(body, shape)] = 40
    for side in (-1, 1):
        lung = ((y - yc) / (0.3 * shape[1])) ** 2 + ((x - xc - side * 0.2 * shape[2]) / (0.16 * shape[2])) ** 2 + (
            (z - zc) / (0.55 * shape[0])
        ) ** 2 < 1
        hu[lung] = -850
    spine = ((y - yc - 0.3 * shape[1]) / (0.06 * shape[1])) ** 2 + ((x - xc) / (0.06 * shape[2])) ** 2 < 1
    hu[np.broadcast_to(spine, shape)] = 700
    hu += rng.normal(0, 25, size=shape).astype(np.float32)
    return hu.astype(np.int16)


SLOPE, INTERCEPT = 1.0, -1024.0  # CT-RATE v1: raw stored values, slope/intercept from the CSV


def ctclip_load(path: str, grid: tuple[int, int, int]) -> torch.Tensor:
    """CT-CLIP's per-sample path: float64 NIfTI read, rescale, trilinear resample, clip."""
    import nibabel as nib

    data = nib.load(path).get_fdata()  # float64 (X, Y, Z)
    data = SLOPE * data + INTERCEPT
    volume = torch.from_numpy(data.transpose(2, 1, 0).astype(np.float32))[None, None]
    volume = F.interpolate(volume, size=grid, mode="trilinear", align_corners=False)[0, 0]
    return volume.clamp_(-1000, 1000)


def prepare(root: Path, cases: int, src: tuple[int, int, int], grid: tuple[int, int, int], compress: str) -> dict:
    """Write ``cases`` .nii.gz files and the same cases, pre-resampled, as two shard tars."""
    import nibabel as nib

    rng = np.random.default_rng(0)
    nii_dir, shard_dir = root / "nii", root / "shards"
    nii_dir.mkdir(parents=True, exist_ok=True)
    samples, paths = [], []
    for i in range(cases):
        raw = phantom(src, rng) - np.int16(INTERCEPT)  # stored raw = HU - intercept
        path = nii_dir / f"case_{i:04d}.nii.gz"
        nib.save(nib.Nifti1Image(raw.transpose(2, 1, 0), np.diag([0.75, 0.75, 1.5, 1.0])), path)
        paths.append(str(path))
        sample = make_sample(f"case_{i:04d}", rng=rng, shape_zyx=grid)
        sample["image"] = ctclip_load(str(path), grid).round().to(torch.int16).numpy()
        samples.append(sample)
    members = ("image", "mask") if compress == "zst" else ()
    half = cases // 2
    entries = []
    for n, chunk in enumerate((samples[:half], samples[half:])):
        entries.append(shard_entry(shard_dir, f"train/bench-{n:06d}.tar", chunk, compress=members))
    index = {"schema_version": shards.SCHEMA_VERSION, "pipeline_version": "bench", "tokenizer": TEST_TOKENIZER,
             "patch_size": [4, 16, 16], "region_names": ["lung", "heart", "aorta"],
             "generations": [], "splits": {"train": entries}}
    shards.write_index(shard_dir, index)
    return {"nii": paths, "shards": shard_dir, "tars": [str(shard_dir / e["path"]) for e in entries],
            "tar_bytes": sum(e["bytes"] for e in entries)}


# --------------------------------------------------------------------------- measurements


def measure_raw(tars: list[str], block: int = 16 << 20) -> float:
    buf = bytearray(block)
    view = memoryview(buf)
    total = 0
    start = time.perf_counter()
    for path in tars:
        with open(path, "rb", buffering=0) as f:
            while n := f.readinto(view):
                total += n
    return time.perf_counter() - start


def _cpu_seconds() -> float:
    """User + system CPU of this process and of its reaped children (DataLoader workers, once joined)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _stat_cpu(path: str) -> tuple[int, float] | None:
    """(parent pid, user + system CPU seconds) from a Linux ``/proc/.../stat`` file; None if gone."""
    try:
        with open(path) as f:
            fields = f.read().rsplit(")", 1)[1].split()  # the name in (...) may hold spaces
    except OSError:
        return None
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


def _thread_role(name: str) -> str:
    if name.startswith("volume-read"):
        return "volume reads"  # BatchLoader's read threads: preadv + CRC32 of the volumes
    return "batch reader" if name == "batch-reader" else "other threads"


def steady_cpu() -> dict[str, float]:
    """CPU seconds so far of this process's threads by role, and of its child processes (the
    DataLoader workers) as ``"worker"``. Linux only ({} elsewhere); 10 ms resolution."""
    if not os.path.isdir("/proc/self/task"):
        return {}
    names = {t.native_id: t.name for t in threading.enumerate()}
    out: dict[str, float] = {}
    for tid in os.listdir("/proc/self/task"):
        stat = _stat_cpu(f"/proc/self/task/{tid}/stat")
        if stat is not None:
            role = _thread_role(names.get(int(tid), ""))
            out[role] = out.get(role, 0.0) + stat[1]
    me = os.getpid()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        stat = _stat_cpu(f"/proc/{pid}/stat")
        if stat is not None and stat[0] == me:
            out["worker"] = out.get("worker", 0.0) + stat[1]
    return out


def measure_stream(shards: Path, workers: int, batch_size: int, n_batches: int, read_threads: int = 2,
                   verify: bool = True, cpu: list[float] | None = None,
                   per_sample: list[dict[str, float]] | None = None, warmup: int = 0,
                   first_batch: list[float] | None = None) -> tuple[float, int]:
    """Seconds for ``n_batches`` after the first one and ``warmup`` more (steady state), samples counted.

    Args:
        warmup: batches taken and not timed after the first one: the buffer pool, the read
            threads and the workers' caches fill during the first pass (tens of ms once per run).
        first_batch: gets the seconds from building the loader to its first batch appended.
        verify: check the per-member checksums (the trainer's default).
        cpu: gets the CPU seconds of the whole measurement appended (start-up and worker
            shutdown included, so that the workers' CPU is counted).
        per_sample: gets the steady-state CPU milliseconds per sample appended, by thread role
            and worker (``steady_cpu``), with ``"wall"``: where the time of a sample goes.
    """
    cpu0, t0 = _cpu_seconds(), time.perf_counter()
    cfg = DataConfig(shards=str(shards), batch_size=batch_size, num_workers=workers, buffer_size=4,
                     read_threads=read_threads, tokenizer=dict(TEST_TOKENIZER))
    expect = dataclasses.replace(D.expectation_from_config(cfg), verify_checksums=verify)
    loader = D.build_train_loader(cfg, D.load_shard_index(shards, expect), expect, rank=0, world_size=1)
    it = iter(loader)
    next(it)  # worker start-up is a one-time cost
    if first_batch is not None:
        first_batch.append(time.perf_counter() - t0)
    for _ in range(warmup):
        next(it)
    threads0 = steady_cpu() if per_sample is not None else {}
    start = time.perf_counter()
    samples = 0
    for _ in range(n_batches):
        samples += len(next(it)["ids"])
    elapsed = time.perf_counter() - start
    if per_sample is not None:
        threads1 = steady_cpu()
        ms = {role: 1000 * (t - threads0.get(role, 0.0)) / samples for role, t in threads1.items()}
        per_sample.append({**ms, "total": sum(ms.values()), "wall": 1000 * elapsed / samples})
    it.close()  # joins the workers, so their CPU time is reaped and counted
    del it
    if cpu is not None:
        cpu.append(_cpu_seconds() - cpu0)
    return elapsed, samples


def _wds_decode(key: str, data: bytes):
    """The handler given to ``WebDataset.decode``: the shard's member types only (no pickle)."""
    if key.endswith(".npy.zst"):
        import zstandard

        data, key = zstandard.ZstdDecompressor().decompress(data), key[: -len(".zst")]
    if key.endswith(".npy"):
        return np.lib.format.read_array(io.BytesIO(data), allow_pickle=False)
    if key.endswith(".json"):
        return json.loads(data)
    return None


def _wds_fields(sample: dict) -> dict:
    return {shards.member_field(k): v for k, v in sample.items() if not k.startswith("__")}


def _wds_collate(samples: list[dict]) -> dict:
    batch = {k: torch.from_numpy(np.stack([s[k] for s in samples])) for k in ("image", "mask", "regions", "labels")}
    batch["ids"] = [s["meta"]["id"] for s in samples]
    batch["other"] = [{k: v for k, v in s.items() if k not in batch} for s in samples]
    return batch


def measure_webdataset(tars: list[str], cases: int, workers: int, batch_size: int, n_batches: int,
                       warmup: int = 0) -> tuple[float, int]:
    """Stock webdataset over the same tars; seconds for ``n_batches`` after the first one and
    ``warmup`` more, samples counted."""
    import webdataset as wds

    passes = -(-(n_batches + warmup + 1) * batch_size // cases) + 1
    dataset = (wds.WebDataset(tars * passes, shardshuffle=False, empty_check=False)
               .decode(_wds_decode).map(_wds_fields).batched(batch_size, collation_fn=_wds_collate, partial=False))
    loader = DataLoader(dataset, batch_size=None, num_workers=workers)
    it = iter(loader)
    for _ in range(1 + warmup):
        next(it)
    start = time.perf_counter()
    samples = 0
    for _ in range(n_batches):
        samples += len(next(it)["ids"])
    elapsed = time.perf_counter() - start
    del it
    return elapsed, samples


class NiftiCases(Dataset):
    def __init__(self, paths: list[str], grid: tuple[int, int, int]):
        self.paths, self.grid = paths, grid

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        return ctclip_load(self.paths[i], self.grid)


def measure_ctclip(paths: list[str], grid, workers: int, batch_size: int) -> tuple[float, int]:
    loader = DataLoader(NiftiCases(paths, grid), batch_size=batch_size, num_workers=workers)
    it = iter(loader)
    next(it)
    start = time.perf_counter()
    samples = sum(len(b) for b in it)
    return time.perf_counter() - start, samples


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=12)
    parser.add_argument("--src", type=int, nargs=3, default=[120, 320, 320], help="nii grid (z y x)")
    parser.add_argument("--grid", type=int, nargs=3, default=[64, 256, 256], help="training grid (z y x)")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--passes", type=int, default=30,
                        help="passes over the shards per measurement (steady state, not start-up)")
    parser.add_argument("--warmup-passes", type=float, default=1.0,
                        help="passes over the shards taken and not timed before each loader measurement "
                             "(after its first batch; start-up is reported as the time to the first batch)")
    parser.add_argument("--read-threads", type=int, default=DataConfig.read_threads,
                        help="data.read_threads of the streaming loader (volume copy threads per rank)")
    parser.add_argument("--compress", choices=("none", "zst"), default="none", help="image/mask members")
    parser.add_argument("--work", help="folder for the generated inputs (default: a temp folder)")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--skip-ctclip", action="store_true", help="no ctclip nii.gz rows")
    parser.add_argument("--skip-webdataset", action="store_true", help="no plain webdataset rows")
    parser.add_argument("--verify-cost", action="store_true",
                        help="also measure the loader (1 worker) with checksum verification on and off")
    parser.add_argument("--remote", choices=("nginx", "uvicorn"),
                        help="also measure the loader (1 worker) reading the shards from this web server on 127.0.0.1 "
                             "(HTTP Range requests): nginx (apt-get install nginx-light) or uvicorn + Starlette ([dev])")
    return parser.parse_args(argv)


def prepared_inputs(args: argparse.Namespace) -> dict:
    """The inputs of :func:`prepare`, reused from ``--work`` when an earlier run made the same ones."""
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-loader-"))
    t0 = time.perf_counter()
    key = {"cases": args.cases, "src": args.src, "grid": args.grid, "compress": args.compress, "checksums": True}
    stamp = work / "prepared.json"
    if stamp.is_file() and json.loads(stamp.read_text())["key"] == key:  # reuse inputs of an earlier run
        inputs = json.loads(stamp.read_text())["inputs"]
        inputs["shards"] = Path(inputs["shards"])
    else:
        inputs = prepare(work, args.cases, tuple(args.src), tuple(args.grid), args.compress)
        stamp.write_text(json.dumps({"key": key, "inputs": {**inputs, "shards": str(inputs["shards"])}}))
    print(f"inputs: {args.cases} cases, nii {tuple(args.src)} -> grid {tuple(args.grid)}, "
          f"{inputs['tar_bytes'] / args.cases / 1e6:.1f} MB/sample in tars, members {args.compress}, "
          f"batch {args.batch_size}, read_threads {args.read_threads}, {args.passes} passes per measurement; "
          f"prepared in {time.perf_counter() - t0:.0f} s under {work}", file=sys.stderr)
    return inputs


class Bench:
    """The measurements of one run. The machine is shared: every loader measurement is paired
    with a raw read taken right before it, and a ratio is the median of the per-pair ratios."""

    def __init__(self, args: argparse.Namespace, inputs: dict):
        self.args, self.inputs = args, inputs
        self.per_sample = inputs["tar_bytes"] / args.cases
        self.n_batches = max(2, args.passes * args.cases // args.batch_size)
        self.warmup = max(0, round(args.warmup_passes * args.cases / args.batch_size))
        self.first_batch: dict[int, list[float]] = {}  # stream shards: workers -> seconds to the first batch
        self.raw_all: list[float] = []
        measure_raw(inputs["tars"])  # warm the page cache

    def raw_rate(self) -> float:
        """MB/s of a raw read of as many bytes as one loader measurement reads."""
        passes = self.args.passes
        rate = passes * self.inputs["tar_bytes"] / measure_raw(self.inputs["tars"] * passes) / 1e6
        self.raw_all.append(rate)
        return rate

    def paired(self, measure) -> list[tuple[float, float]]:
        """(raw MB/s, samples/s of ``measure()``) for each repeat."""
        pairs = []
        for _ in range(self.args.repeats):
            raw = self.raw_rate()
            elapsed, samples = measure()
            pairs.append((raw, samples / elapsed))
        return pairs

    def row(self, method: str, workers, pairs: list[tuple[float, float]]) -> dict:
        rate = statistics.median(r for _, r in pairs)
        ratios = [r * self.per_sample / 1e6 / raw for raw, r in pairs]
        return {"method": method, "workers": workers, "samples_s": rate, "mb_s": rate * self.per_sample / 1e6,
                "vs_raw": statistics.median(ratios), "vs_raw_pairs": ratios}

    def ctclip_rows(self) -> list[dict]:
        a = self.args
        return [self.row("ctclip nii.gz", w, self.paired(
            lambda: measure_ctclip(self.inputs["nii"], tuple(a.grid), w, a.batch_size))) for w in a.workers]

    def stream_rows(self, ctclip: dict[int, float]) -> list[dict]:
        a, rows = self.args, []
        for w in a.workers:
            first = self.first_batch.setdefault(w, [])
            row = self.row("stream shards", w, self.paired(
                lambda: measure_stream(self.inputs["shards"], w, a.batch_size, self.n_batches, a.read_threads,
                                       warmup=self.warmup, first_batch=first)))
            row["first_batch_s"] = statistics.median(first)
            if w in ctclip:
                row["vs_ctclip"] = row["samples_s"] / ctclip[w]
            rows.append(row)
        return rows

    def webdataset_rows(self) -> list[dict]:
        a = self.args
        return [self.row("webdataset", w, self.paired(
            lambda: measure_webdataset(self.inputs["tars"], a.cases, w, a.batch_size, self.n_batches, self.warmup)))
            for w in a.workers]

    def verify_rows(self) -> list[dict]:
        """The loader with 1 worker, checksums verified and off, measured in alternation (drifting
        load on a shared machine hits both)."""
        a = self.args
        runs: dict[bool, list[tuple[float, float, int, float]]] = {True: [], False: []}  # (raw, s, samples, cpu)
        breakdown: dict[bool, list[dict[str, float]]] = {True: [], False: []}
        for _ in range(a.repeats):
            for verify in (True, False):
                raw, cpu = self.raw_rate(), []
                elapsed, samples = measure_stream(self.inputs["shards"], 1, a.batch_size, self.n_batches,
                                                  a.read_threads, verify=verify, cpu=cpu, per_sample=breakdown[verify],
                                                  warmup=self.warmup)
                runs[verify].append((raw, elapsed, samples, cpu[0]))
        rows = []
        for verify in (True, False):
            rs = runs[verify]
            roles = sorted({role for ms in breakdown[verify] for role in ms})
            rate = statistics.median(n / s for _, s, n, _ in rs)
            rows.append({
                "method": f"stream shards, checksums {'verified' if verify else 'off'}", "workers": 1,
                "samples_s": rate, "mb_s": rate * self.per_sample / 1e6,
                "vs_raw": statistics.median(n / s * self.per_sample / 1e6 / raw for raw, s, n, _ in rs),
                "vs_raw_pairs": [n / s * self.per_sample / 1e6 / raw for raw, s, n, _ in rs],
                "wall_s": statistics.median(s for _, s, _, _ in rs),
                "cpu_s": statistics.median(c for *_, c in rs),
                "samples": rs[0][2],
                # steady state, median over the repeats of each role's CPU ms per sample
                "ms_per_sample": {role: statistics.median(ms.get(role, 0.0) for ms in breakdown[verify])
                                  for role in roles},
            })
        on, off = rows
        on["vs_off_samples_s"] = on["samples_s"] / off["samples_s"]
        on["vs_off_cpu_s"] = on["cpu_s"] / off["cpu_s"]
        return rows

    def remote_rows(self) -> list[dict]:
        """The loader with 1 worker reading the same shards from the local folder and from a web
        server in another process on 127.0.0.1 (ctprep_train.shard_io: HTTP Range requests),
        measured in alternation; ``vs_local`` is the median of the per-pair ratios."""
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from tests.remote_servers import serve_http_process, serve_nginx

        a = self.args
        http_name = f"HTTP from {a.remote} on 127.0.0.1"
        pairs: dict[str, list[tuple[float, float]]] = {"local file": [], http_name: []}
        serve = serve_nginx if a.remote == "nginx" else serve_http_process
        with serve(self.inputs["shards"]) as url:
            for _ in range(a.repeats):
                raw = self.raw_rate()
                for name, where in (("local file", self.inputs["shards"]), (http_name, url)):
                    elapsed, samples = measure_stream(where, 1, a.batch_size, self.n_batches, a.read_threads,
                                                      warmup=self.warmup)
                    pairs[name].append((raw, samples / elapsed))
        rows = [self.row(f"stream shards, {name}", 1, p) for name, p in pairs.items()]
        local, http = ([r for _, r in p] for p in pairs.values())
        rows[1]["vs_local"] = statistics.median(h / loc for loc, h in zip(local, http))
        return rows


def print_tables(rows: list[dict], verify_rows: list[dict], raw_ms: float = 0.0) -> None:
    print("| method | workers | samples/s | MB/s | vs raw read (bytes/s, paired) | vs ctclip (samples/s, same workers) "
          "| first batch s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        vs = f"{r['vs_ctclip']:.1f}x" if "vs_ctclip" in r else ""
        first = f"{r['first_batch_s']:.2f}" if "first_batch_s" in r else ""
        print(f"| {r['method']} | {r['workers']} | {r['samples_s']:.2f} | {r['mb_s']:.0f} | {r['vs_raw']:.0%} | {vs} "
              f"| {first} |")
    if verify_rows:
        print()
        print("| loader, 1 worker | samples/s | vs raw read | wall s (steady) | CPU s (process + worker, whole run) "
              "| verified / off |")
        print("|---|---|---|---|---|---|")
        for r in verify_rows:
            ratio = (f"samples/s {r['vs_off_samples_s']:.2f}x, CPU {r['vs_off_cpu_s']:.2f}x"
                     if "vs_off_cpu_s" in r else "")
            print(f"| {r['method']} | {r['samples_s']:.2f} | {r['vs_raw']:.0%} | {r['wall_s']:.2f} | {r['cpu_s']:.2f} "
                  f"| {ratio} |")
        print_breakdown(verify_rows, raw_ms)


BREAKDOWN_ROLES = ("volume reads", "batch reader", "other threads", "worker")


def print_breakdown(verify_rows: list[dict], raw_ms: float) -> None:
    """Where a sample's time goes (steady state): CPU per thread role next to the wall time; CPU
    over wall is how many cores the loader kept busy (the raw read keeps one)."""
    if not any(r.get("ms_per_sample") for r in verify_rows):
        return
    print()
    print(f"steady state, ms per sample (raw read: {raw_ms:.2f} ms wall per sample):")
    print("| loader, 1 worker | wall | CPU total | " + " | ".join(BREAKDOWN_ROLES) + " | CPU / wall (cores busy) |")
    print("|---|---|---|" + "---|" * len(BREAKDOWN_ROLES) + "---|")
    for r in verify_rows:
        ms = r.get("ms_per_sample") or {}
        if ms:
            roles = " | ".join(f"{ms.get(role, 0.0):.2f}" for role in BREAKDOWN_ROLES)
            print(f"| {r['method']} | {ms['wall']:.2f} | {ms['total']:.2f} | {roles} | {ms['total'] / ms['wall']:.2f} |")


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(1)
    bench = Bench(args, prepared_inputs(args))
    ctclip = [] if args.skip_ctclip else bench.ctclip_rows()
    rows = ctclip + bench.stream_rows({r["workers"]: r["samples_s"] for r in ctclip})
    rows += [] if args.skip_webdataset else bench.webdataset_rows()
    verify_rows = bench.verify_rows() if args.verify_cost else []
    remote_rows = bench.remote_rows() if args.remote else []
    raw_mbs = statistics.median(bench.raw_all)
    rows.insert(0, {"method": "raw read", "workers": "-", "samples_s": raw_mbs * 1e6 / bench.per_sample,
                    "mb_s": raw_mbs, "vs_raw": 1.0})
    rows += verify_rows + remote_rows
    print_tables(rows, verify_rows, 1000 * bench.per_sample / (raw_mbs * 1e6))
    for r in remote_rows:
        vs = f", {r['vs_local']:.0%} of the local file's samples/s (paired)" if "vs_local" in r else ""
        print(f"loader, 1 worker, {r['method']}: {r['samples_s']:.2f} samples/s, {r['mb_s']:.0f} MB/s{vs}")
    result = {"args": vars(args), "bytes_per_sample": bench.per_sample, "rows": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
