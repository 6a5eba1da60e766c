"""Benchmark the resample stage on real-size volumes against the read floor and the CT-CLIP way.

Per volume (300 x 512 x 512 int16 ``.nii.gz``, 0.7 x 0.7 x 1.25 mm, chest phantom with CT-like
noise, a TotalSegmentator-style label map beside it), with the ``ctclip`` preset
(1.5 x 0.75 x 0.75 mm, 240 x 480 x 480), one thread:

* **floor**: ``nibabel.load(path).dataobj`` into an int16 array (zlib inflate + copy): the least
  any reader of this file has to do.
* **ct-clip way**: CT-CLIP's recipe: ``get_fdata()`` (float64), slope/intercept, HU clip, torch
  trilinear ``interpolate`` in float64 to the target spacing, /1000 to float32, centre crop/pad,
  ``np.savez`` (image only).
* **ours**: the resample stage as a worker runs it (``ctprep.runner.execute_case``): ISA-L
  inflate, zero-copy int16 view, v1/v2 detection, canonical reorientation, z-slab resample of the
  image (linear) *and* the mask (nearest + region remap), checks, zarr v3 write (Blosc zstd +
  bitshuffle) to a temp name + rename.

Then output bytes per case, codec measurements behind the zarr compressor choice, and
wall time per case with 1 vs 2 Dask worker processes (LocalCluster, started before timing).

Usage:
    OMP_NUM_THREADS=1 python bench/preprocess.py                  # full table (a few minutes, ~3 GB RAM)
    python bench/preprocess.py --shape 120 256 256 --repeats 2    # quicker
"""

from __future__ import annotations

import argparse
import gzip
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ctprep.config import load_config  # noqa: E402
from ctprep.runner import Cluster, execute_case  # noqa: E402
from ctprep.sources.base import CaseInput  # noqa: E402
from ctprep.stages.base import CaseTask  # noqa: E402


# --------------------------------------------------------------------- data
def chest_phantom(shape_zyx: tuple[int, int, int], spacing_zyx: tuple[float, float, float], seed: int = 0):
    """(HU int16, labels uint8) in canonical (z, y, x): body, lungs, heart, aorta, spine, ribs + noise."""
    rng = np.random.default_rng(seed)
    nz, ny, nx = shape_zyx
    dz, dy, dx = spacing_zyx
    y = (np.arange(ny) - ny / 2) * dy
    x = (np.arange(nx) - nx / 2) * dx
    yy, xx = np.meshgrid(y, x, indexing="ij")
    hu = np.empty(shape_zyx, np.int16)
    lab = np.zeros(shape_zyx, np.uint8)
    for k in range(nz):
        z = k * dz
        t = k / max(nz - 1, 1)
        body = (xx / 165) ** 2 + (yy / 120) ** 2 < 1
        sl = np.where(body, 40.0, -1000.0).astype(np.float32)
        ls = 1.0 - abs(t - 0.55) * 1.4
        lab_sl = np.zeros((ny, nx), np.uint8)
        if ls > 0:
            for side, lid in ((-1, 10), (1, 12)):
                lung = ((xx - side * 70) / (55 * ls + 5)) ** 2 + ((yy + 5) / (85 * ls + 5)) ** 2 < 1
                sl[lung] = -850
                lab_sl[lung] = lid
        heart = ((xx - 15) / 50) ** 2 + ((yy + 35) / 45) ** 2 < (1 if 0.3 < t < 0.65 else 0)
        sl[heart] = 45
        lab_sl[heart] = 51
        aorta = ((xx + 20) ** 2 + (yy - 40) ** 2) < 14**2
        sl[aorta] = 50
        lab_sl[aorta] = 52
        spine = ((xx) ** 2 + (yy - 85) ** 2) < 18**2
        sl[spine] = 700
        lab_sl[spine] = 32 + (k * 12) // nz
        ring = np.abs((xx / 160) ** 2 + (yy / 115) ** 2 - 1) < 0.04
        ribs = ring & (np.sin(np.arctan2(yy, xx) * 8 + z / 20) > 0.3)
        sl[ribs] = 600
        sl += rng.normal(0, 12, sl.shape).astype(np.float32)
        hu[k] = np.clip(np.rint(sl), -1024, 3071).astype(np.int16)
        lab[k] = lab_sl
    return hu, lab


def write_case(root: Path, hu_zyx: np.ndarray, lab_zyx: np.ndarray, spacing_zyx) -> tuple[Path, Path]:
    """Write CT-RATE-style v2 files (RAS voxel order, real header), gzip level 6 like typical exports."""
    dz, dy, dx = spacing_zyx
    aff = np.diag([dx, dy, dz, 1.0])
    paths = []
    for sub, arr in (("train/train_1/train_1_a", hu_zyx), ("masks/train/train_1/train_1_a", lab_zyx)):
        img = nib.Nifti1Image(np.ascontiguousarray(arr.transpose(2, 1, 0)), aff)
        img.set_sform(aff, code="scanner")
        img.set_qform(aff, code="scanner")
        p = root / sub / "train_1_a_1.nii.gz"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(gzip.compress(img.to_bytes(), compresslevel=6, mtime=0))
        paths.append(p)
    return paths[0], paths[1]


# --------------------------------------------------------------------- methods
def floor_read(path: Path) -> np.ndarray:
    return np.asanyarray(nib.load(str(path)).dataobj)  # int16: no scaling in the header


def ctclip_way(path: Path, out_npz: Path, target_spacing_zyx, target_shape_zyx, hu=(-1000, 1000)) -> int:
    """CT-CLIP's per-volume recipe (``nii_img_to_tensor`` / ``resize_array`` in its data scripts):
    ``get_fdata()`` float64, slope/intercept, clip, ``torch.tensor`` (float64) trilinear
    ``interpolate`` to ``int(n * spacing / target)``, /1000 to float32, crop/pad, ``np.savez``
    (image only)."""
    img = nib.load(str(path))
    data = img.get_fdata()  # float64
    slope, inter = 1.0, 0.0  # from the metadata CSV
    data = slope * data + inter
    data = np.clip(data, *hu)
    zooms = img.header.get_zooms()  # (x, y, z)
    data = data.transpose(2, 1, 0)  # (z, y, x)
    cur = (zooms[2], zooms[1], zooms[0])
    size = [int(n * c / t) for n, c, t in zip(data.shape, cur, target_spacing_zyx)]
    t = torch.tensor(data)[None, None]  # float64, as in the original
    t = F.interpolate(t, size=size, mode="trilinear", align_corners=False).cpu().numpy()[0, 0]
    t = (t / 1000).astype(np.float32)
    out = np.full(target_shape_zyx, -1.0, np.float32)
    src, dst = [], []
    for n, m in zip(t.shape, target_shape_zyx):
        if n >= m:
            s = (n - m) // 2
            src.append(slice(s, s + m))
            dst.append(slice(0, m))
        else:
            s = (m - n) // 2
            src.append(slice(0, n))
            dst.append(slice(s, s + n))
    out[tuple(dst)] = t[tuple(src)]
    np.savez(out_npz, out)
    return out_npz.stat().st_size


def ours_task(image: Path, mask: Path, out: Path, cfg, key: str = "bench") -> CaseTask:
    case = CaseInput(case_id="train_1_a_1", source="ctrate", split="train",
                     files={"image": str(image), "mask": str(mask)})
    return CaseTask("resample", case, key, str(out), str(out.parent), cfg, {})


def run_ours(task: CaseTask) -> dict:
    res = execute_case(task)
    if res.status != "done":
        raise RuntimeError(f"resample failed: {res.kind}: {res.reason}")
    return res.info


def timed(fn, repeats: int) -> tuple[float, float, object]:
    """(median wall s, median CPU s of this process incl. its threads, last result)."""
    walls, cpus, last = [], [], None
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        last = fn()
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    return statistics.median(walls), statistics.median(cpus), last


def codec_table(image: np.ndarray, mask: np.ndarray) -> list[tuple[str, str, int, float]]:
    """(array, codec, bytes, encode seconds) for candidate Blosc settings on the resampled output."""
    from numcodecs import Blosc

    rows = []
    import numcodecs.blosc

    numcodecs.blosc.set_nthreads(1)
    for cname, level, shuffle in (("zstd", 1, Blosc.SHUFFLE), ("zstd", 1, Blosc.BITSHUFFLE),
                                  ("zstd", 3, Blosc.SHUFFLE), ("zstd", 3, Blosc.BITSHUFFLE),
                                  ("zstd", 5, Blosc.BITSHUFFLE), ("lz4", 5, Blosc.BITSHUFFLE)):
        codec = Blosc(cname=cname, clevel=level, shuffle=shuffle, blocksize=0)
        sh = {Blosc.BITSHUFFLE: "bitshuffle", Blosc.SHUFFLE: "shuffle"}[shuffle]
        for name, arr in (("image", image), ("mask", mask)):
            t0 = time.process_time()
            n = sum(len(codec.encode(np.ascontiguousarray(arr[z:z + 32]))) for z in range(0, arr.shape[0], 32))
            rows.append((name, f"{cname}-{level} {sh}", n, time.process_time() - t0))
    return rows


def scaling(image: Path, mask: Path, work: Path, cfg, n_cases: int, workers: int) -> float:
    """Wall seconds per case for ``n_cases`` resample tasks on ``workers`` local Dask processes."""
    cluster = Cluster(None, workers)
    cluster.get()  # start (and import on) the workers before timing
    cluster.get().run(lambda: __import__("ctprep.stages.resample"))
    tasks = [ours_task(image, mask, work / f"w{workers}" / f"c{i}.zarr", cfg, key=f"s{i}") for i in range(n_cases)]
    t0 = time.perf_counter()
    for _, res in cluster.map(execute_case, tasks):
        if isinstance(res, BaseException) or res.status != "done":
            raise RuntimeError(f"scaling task failed: {res}")
    dt = time.perf_counter() - t0
    cluster.close()
    return dt / n_cases


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", type=int, nargs=3, default=(300, 512, 512), help="input Z Y X voxels")
    ap.add_argument("--spacing", type=float, nargs=3, default=(1.25, 0.7, 0.7), help="input z y x mm")
    ap.add_argument("--config", default="ctclip", help="pipeline preset for the target grid")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--scaling-cases", type=int, default=4, help="cases per worker-count run (0 = skip)")
    ap.add_argument("--workdir", default=None, help="scratch folder (default: a temp dir, removed after)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    cfg = load_config(args.config)
    tmp = Path(args.workdir or tempfile.mkdtemp(prefix="ctprep_bench_"))
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        print(f"input {tuple(args.shape)} int16 at {tuple(args.spacing)} mm (z, y, x) -> {cfg.name}: "
              f"{cfg.resample.shape_zyx} at {cfg.resample.spacing_zyx} mm; 1 thread; median of {args.repeats}",
              flush=True)
        hu, lab = chest_phantom(tuple(args.shape), tuple(args.spacing))
        image, mask = write_case(tmp / "ctrate", hu, lab, tuple(args.spacing))
        del hu, lab
        in_bytes = image.stat().st_size
        floor_w, floor_t, _ = timed(lambda: floor_read(image), args.repeats)
        ctclip_w, ctclip_t, ctclip_bytes = timed(lambda: ctclip_way(image, tmp / "ctclip.npz", cfg.resample.spacing_zyx,
                                                                    cfg.resample.shape_zyx), args.repeats)
        out = tmp / "ours" / "train_1_a_1.zarr"
        ours_w, ours_t, info = timed(lambda: run_ours(ours_task(image, mask, out, cfg)), args.repeats)
        ours_bytes = info["bytes"]

        # Ratios use CPU seconds: everything here is single-threaded, and on a shared machine wall
        # time also counts other people's work; wall medians are printed beside them.
        print()
        print("| method | CPU s / volume | wall s | x floor (CPU) | output bytes | output vs CT-CLIP |")
        print("|---|---:|---:|---:|---:|---:|")
        print(f"| floor: nibabel int16 read | {floor_t:.2f} | {floor_w:.2f} | 1.00 | - | - |")
        print(f"| CT-CLIP way (float64, interpolate, np.savez) | {ctclip_t:.2f} | {ctclip_w:.2f} | "
              f"{ctclip_t / floor_t:.2f} | {ctclip_bytes / 1e6:.1f} MB (image) | 1.00 |")
        print(f"| ours (resample stage: image + mask -> zarr) | {ours_t:.2f} | {ours_w:.2f} | {ours_t / floor_t:.2f} | "
              f"{ours_bytes / 1e6:.1f} MB (image + mask) | {ours_bytes / ctclip_bytes:.3f} |")
        print()
        print(f"ours vs CT-CLIP way: {ctclip_t / ours_t:.2f}x less CPU ({ctclip_w / ours_w:.2f}x wall); input .nii.gz "
              f"{in_bytes / 1e6:.1f} MB; last run split (wall): read {info['seconds_read']}s, resample "
              f"{info['seconds_resample']}s, write {info['seconds_write']}s")
        targets = [("ours <= 2.5x floor", ours_t <= 2.5 * floor_t),
                   ("ours >= 2x faster than CT-CLIP", ctclip_t >= 2 * ours_t),
                   ("output <= 1/4 of CT-CLIP bytes", ours_bytes <= ctclip_bytes / 4)]
        print("targets: " + "; ".join(f"{n}: {'met' if ok else 'MISSED'}" for n, ok in targets), flush=True)

        from ctprep.stages.resample import read_case_zarr

        img_out, mask_out, _ = read_case_zarr(out)
        print()
        print("| array | Blosc codec | MB | encode CPU s |")
        print("|---|---|---:|---:|")
        for name, codec, n, dt in codec_table(img_out, mask_out):
            print(f"| {name} | {codec} | {n / 1e6:.2f} | {dt:.2f} |")

        if args.scaling_cases:
            print()
            print("| Dask workers | s / case (wall) | speed-up |")
            print("|---:|---:|---:|")
            one = scaling(image, mask, tmp, cfg, args.scaling_cases, 1)
            print(f"| 1 | {one:.2f} | 1.00 |", flush=True)
            two = scaling(image, mask, tmp, cfg, args.scaling_cases, 2)
            print(f"| 2 | {two:.2f} | {one / two:.2f} |")
    finally:
        if not args.workdir:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
