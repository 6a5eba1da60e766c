"""Per-volume preprocessing time as a user waits for it, against the read floor and the CT-CLIP way.

Per volume (300 x 512 x 512 int16 ``.nii.gz``, 0.7 x 0.7 x 1.25 mm, chest phantom with CT-like
noise, a TotalSegmentator-style uint8 label map beside it), with the ``ctclip`` preset
(1.5 x 0.75 x 0.75 mm, 240 x 480 x 480), one thread, all in one command, interleaved in rounds
(``--repeats``, medians printed) so that a load change on a shared machine hits every row alike:

* **floor**: ``nibabel.load(path).dataobj`` into an int16 array, image + mask (zlib inflate +
  copy): the least any reader of these files has to do.
* **ISA-L read**: ``ctprep.sources.nifti.read_nifti`` of image + mask (the reader we use).
* **ct-clip way**: CT-CLIP's recipe: ``get_fdata()`` (float64), slope/intercept, HU clip, torch
  trilinear ``interpolate`` in float64 to the target spacing, /1000 to float32, centre crop/pad,
  ``np.savez`` (image only).
* **resample stage in process**: ``ctprep.runner.execute_case`` on one case: ISA-L inflate,
  v1/v2 detection, canonical reorientation, z-slab resample of the image (linear) *and* the mask
  (nearest + region remap), checks, zarr v3 write (Blosc zstd) to a temp name + rename.
* **what the user waits for**: ``ctprep build-shards --src ... --stages scan,resample --config
  ctclip --workers 1`` as a subprocess (one Dask worker process with one thread), on a fresh
  output folder, once with 1 volume and once with ``--cases`` volumes (hard links of the phantom
  under their own case ids, inputs in the page cache): the marginal wall / CPU seconds per volume
  is the difference over ``cases - 1``; CPU counts the command and every process it started.

Then the ratios against issue 20's targets, the output bytes against CT-CLIP's, the worker's
peak RSS, and the Blosc codec table of the output.

``--scaling-cases N`` adds wall time per case with 1 vs 2 Dask worker processes (LocalCluster,
started before timing).

With ``--big``, instead: CT-RATE's largest volumes (1024 x 1024 x 450 int16, 0.34 x 0.34 x 0.8 mm;
0.94 GB as int16), as a v2 file (int16 HU, real header) and a v1 file (raw HU + 1024, blank header,
intercept -1024 from the metadata row), each read + resampled + written by the resample stage for
the ``ctclip`` and ``demo`` presets, against the nibabel read floor of the same file. Every
measurement runs in its own child process, which reports its wall and CPU seconds and its peak RSS
(``VmHWM``): the memory a Dask worker needs for that case. The phantom is rendered once per run
with the generator's anatomy (``ctprep.synth.anatomy``) and streamed to disk (never whole in memory).

Usage:
    OMP_NUM_THREADS=1 python bench/preprocess.py                  # full table (~10 min on 2 cores, ~3 GB RAM)
    python bench/preprocess.py --quick --config demo              # end-to-end smoke run (tests run it)
    python bench/preprocess.py --workdir /tmp/pp                  # keep (and reuse) the phantom files
    python bench/preprocess.py --big                              # 1024^2 table (~10 min, < 2 GB per child)
"""

from __future__ import annotations

import argparse
import gzip
import os
import resource
import subprocess
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

from bench.preprocess_big import BIG_SHAPE, BIG_SPACING, big_table  # noqa: E402
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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", type=int, nargs=3, default=(300, 512, 512), help="input Z Y X voxels")
    ap.add_argument("--spacing", type=float, nargs=3, default=(1.25, 0.7, 0.7), help="input z y x mm")
    ap.add_argument("--config", default="ctclip", help="pipeline preset for the target grid")
    ap.add_argument("--repeats", type=int, default=3, help="rounds of every measurement (medians are printed)")
    ap.add_argument("--cases", type=int, default=4,
                    help="volumes in the long build-shards run (the short one has 1; marginal = difference / (cases - 1))")
    ap.add_argument("--quick", action="store_true",
                    help="small and fast (a test runs it): --shape 40 128 128 --spacing 5 2.8 2.8 --cases 2 "
                         "--repeats 1, no codec table")
    ap.add_argument("--codecs", action=argparse.BooleanOptionalAction, default=True,
                    help="also print the Blosc codec table of the output")
    ap.add_argument("--scaling-cases", type=int, default=0, help="cases per worker-count run (0 = skip)")
    ap.add_argument("--workdir", default=None, help="scratch folder (default: a temp dir, removed after)")
    ap.add_argument("--big", action="store_true", help="only the 1024^2 table: time and peak RSS per worker")
    ap.add_argument("--big-shape", type=int, nargs=3, default=BIG_SHAPE, help="--big input Z Y X voxels")
    ap.add_argument("--big-spacing", type=float, nargs=3, default=BIG_SPACING, help="--big input z y x mm")
    args = ap.parse_args(argv)
    if args.quick:
        args.shape, args.spacing, args.cases, args.repeats, args.codecs = QUICK_SHAPE, QUICK_SPACING, 2, 1, False
    if args.cases < 2:
        ap.error("--cases must be at least 2 (the marginal time is the difference of two runs)")
    return args


# --------------------------------------------------------------------- what a user waits for
QUICK_SHAPE = (40, 128, 128)
QUICK_SPACING = (5.0, 2.8, 2.8)  # the whole chest in a 358 mm field of view, as at full size
REPORTS_CSV = "radiology_text_reports/train_reports.csv"


def case_tree(root: Path, image: Path, mask: Path, n: int) -> Path:
    """A CT-RATE tree of ``n`` cases ``train_{i}_a_1`` whose files are hard links to ``image`` /
    ``mask`` (copies where links fail), plus the reports CSV the source needs. Every case has its
    own id and paths, so each is fingerprinted, resampled and written on its own."""
    shutil.rmtree(root, ignore_errors=True)
    rows = ["VolumeName,ClinicalInformation_EN,Technique_EN,Findings_EN,Impressions_EN"]
    for i in range(1, n + 1):
        rel = Path("train") / f"train_{i}" / f"train_{i}_a" / f"train_{i}_a_1.nii.gz"
        for src, dst in ((image, root / rel), (mask, root / "masks" / rel)):
            dst.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(src, dst)
            except OSError:
                shutil.copyfile(src, dst)
        rows.append(f"train_{i}_a_1.nii.gz,Not given.,Chest CT.,Lungs clear.,Normal.")
    (root / REPORTS_CSV).parent.mkdir(parents=True, exist_ok=True)
    (root / REPORTS_CSV).write_text("\n".join(rows) + "\n")
    return root


def ctprep_command() -> list[str]:
    """``ctprep`` as installed beside this interpreter (what a user types), else the same app via -c."""
    script = Path(sys.executable).with_name("ctprep")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "import sys; from ctprep.cli import app; sys.argv[0] = 'ctprep'; app()"]


def build_shards_run(src: Path, out: Path, config: str, n_cases: int) -> dict:
    """Wall and CPU seconds (this command and every process it started: driver, Dask nanny and
    worker) of ``ctprep build-shards --stages scan,resample --workers 1`` on a fresh ``out``."""
    shutil.rmtree(out, ignore_errors=True)
    cmd = ctprep_command() + ["build-shards", "--src", str(src), "--out", str(out), "--config", config,
                              "--stages", "scan,resample", "--workers", "1", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    wall = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    done = sorted(p.name for p in (out / "work" / "zarr").glob("*.zarr")) if (out / "work" / "zarr").is_dir() else []
    if proc.returncode != 0 or len(done) != n_cases:
        raise RuntimeError(f"build-shards on {src} gave exit code {proc.returncode} and {len(done)} of {n_cases} "
                           f"outputs: {proc.stderr[-2000:]}")
    return {"wall": wall, "cpu": (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime),
            "bytes": sum(f.stat().st_size for f in (out / "work" / "zarr").rglob("*") if f.is_file()) / n_cases,
            "peak_rss_kb": r1.ru_maxrss}


def read_floor_isal(image: Path, mask: Path) -> None:
    from ctprep.sources.nifti import read_nifti

    read_nifti(image)
    read_nifti(mask)


def measure_all(args: argparse.Namespace, cfg, tmp: Path, image: Path, mask: Path) -> dict:
    """Every measurement, ``args.repeats`` rounds, interleaved (a load change on a shared machine
    then hits all of them alike). Returns per-measure lists of (wall, cpu) and the byte counts."""
    short = case_tree(tmp / "src_1", image, mask, 1)
    long = case_tree(tmp / f"src_{args.cases}", image, mask, args.cases)
    runs: dict[str, list[tuple[float, float]]] = {k: [] for k in ("floor", "isal", "ctclip", "stage", "cli")}
    ctclip_bytes = ours_stage = cli_bytes = peak_kb = None
    for r in range(args.repeats):
        def one(name, fn):
            t0, c0 = time.perf_counter(), time.process_time()
            res = fn()
            runs[name].append((time.perf_counter() - t0, time.process_time() - c0))
            return res

        one("floor", lambda: (floor_read(image), floor_read(mask)))
        one("isal", lambda: read_floor_isal(image, mask))
        ctclip_bytes = one("ctclip", lambda: ctclip_way(image, tmp / "ctclip.npz", cfg.resample.spacing_zyx,
                                                        cfg.resample.shape_zyx))
        ours_stage = one("stage", lambda: run_ours(ours_task(image, mask, tmp / "ours" / "train_1_a_1.zarr", cfg)))
        a = build_shards_run(short, tmp / "out_1", args.config, 1)
        b = build_shards_run(long, tmp / f"out_{args.cases}", args.config, args.cases)
        runs["cli"].append(((b["wall"] - a["wall"]) / (args.cases - 1), (b["cpu"] - a["cpu"]) / (args.cases - 1)))
        runs.setdefault("cli_fixed", []).append((a["wall"] - runs["cli"][-1][0], a["cpu"] - runs["cli"][-1][1]))
        cli_bytes, peak_kb = b["bytes"], b["peak_rss_kb"]
        print(f"round {r + 1}/{args.repeats}: build-shards {args.cases} volumes {b['wall']:.1f} s, 1 volume "
              f"{a['wall']:.1f} s (wall)", flush=True)
    return {"runs": runs, "ctclip_bytes": ctclip_bytes, "stage_info": ours_stage, "cli_bytes": cli_bytes,
            "peak_rss_kb": peak_kb, "in_bytes": image.stat().st_size + mask.stat().st_size,
            "stage_zarr": tmp / "ours" / "train_1_a_1.zarr", "cli_zarr": tmp / f"out_{args.cases}" / "work" / "zarr"}


def phantom_files(tmp: Path, shape_zyx, spacing_zyx) -> tuple[Path, Path]:
    """The phantom's (image, mask) files under ``tmp``, written unless a previous run with the same
    ``--workdir``, shape and spacing left them there."""
    root = tmp / ("phantom_" + "x".join(map(str, shape_zyx)) + "_" + "x".join(f"{s:g}" for s in spacing_zyx))
    image = root / "train/train_1/train_1_a/train_1_a_1.nii.gz"
    mask = root / "masks/train/train_1/train_1_a/train_1_a_1.nii.gz"
    if not (image.exists() and mask.exists() and (root / "complete").exists()):
        hu, lab = chest_phantom(shape_zyx, spacing_zyx)
        image, mask = write_case(root, hu, lab, spacing_zyx)
        (root / "complete").write_text("")
    return image, mask


def print_method_table(args: argparse.Namespace, cfg, tmp: Path) -> dict:
    """The floor / ISA-L / CT-CLIP / resample stage / ``build-shards`` table on one phantom and
    the ratios against the targets of issue 20; returns the figures (medians) for callers."""
    print(f"input {tuple(args.shape)} int16 at {tuple(args.spacing)} mm (z, y, x) + uint8 label map -> "
          f"{cfg.name}: {cfg.resample.shape_zyx} at {cfg.resample.spacing_zyx} mm; one thread, one Dask worker; "
          f"median of {args.repeats} rounds; build-shards: marginal per volume between runs of 1 and "
          f"{args.cases} volumes", flush=True)
    image, mask = phantom_files(tmp, tuple(args.shape), tuple(args.spacing))
    m = measure_all(args, cfg, tmp, image, mask)
    med = {k: (statistics.median(w for w, _ in v), statistics.median(c for _, c in v)) for k, v in m["runs"].items()}
    floor_w, floor_c = med["floor"]
    rows = [("floor: nibabel int16 read (`dataobj`), image + mask", "floor"),
            ("ISA-L read (`ctprep.sources.nifti.read_nifti`), image + mask", "isal"),
            ("CT-CLIP way: float64 `get_fdata`, torch trilinear, `np.savez` (image only)", "ctclip"),
            ("resample stage in process (`execute_case`), image + mask", "stage"),
            ("**`ctprep build-shards --stages scan,resample --workers 1`**, marginal per volume", "cli")]
    print()
    print("| per volume | wall s | CPU s | wall / floor | CPU / floor |")
    print("|---|---:|---:|---:|---:|")
    for label, key in rows:
        w, c = med[key]
        print(f"| {label} | {w:.2f} | {c:.2f} | {w / floor_w:.2f} | {c / floor_c:.2f} |")
    fixed_w, fixed_c = med["cli_fixed"]
    cli_w, cli_c = med["cli"]
    ct_w, ct_c = med["ctclip"]
    out_ratio = m["cli_bytes"] / m["ctclip_bytes"]
    print()
    print(f"build-shards fixed cost per run (start-up, Dask cluster, scan listing): {fixed_w:.1f} s wall, "
          f"{fixed_c:.1f} s CPU; output {m['cli_bytes'] / 1e6:.1f} MB per volume (image + mask zarr), CT-CLIP "
          f"{m['ctclip_bytes'] / 1e6:.1f} MB (image npz); input {m['in_bytes'] / 1e6:.1f} MB .nii.gz; largest "
          f"peak RSS among the command's processes {m['peak_rss_kb'] / 1e6:.2f} GB")
    info = m["stage_info"]
    print(f"resample stage split, last in-process run (wall): read {info['seconds_read']} s, resample "
          f"{info['seconds_resample']} s, write {info['seconds_write']} s")
    targets = [("build-shards wall / nibabel floor wall", cli_w / floor_w, "<= 1.5", cli_w <= 1.5 * floor_w),
               ("CT-CLIP way wall / build-shards wall", ct_w / cli_w, ">= 3", ct_w >= 3 * cli_w),
               ("build-shards CPU / nibabel floor CPU", cli_c / floor_c, "(<= 1.5)", cli_c <= 1.5 * floor_c),
               ("CT-CLIP way CPU / build-shards CPU", ct_c / cli_c, "(>= 3)", ct_c >= 3 * cli_c),
               ("output bytes / CT-CLIP bytes", out_ratio, "<= 0.25", out_ratio <= 0.25)]
    print()
    print("| ratio | value | target | |")
    print("|---|---:|---|---|")
    for name, value, target, ok in targets:
        print(f"| {name} | {value:.2f} | {target} | {'met' if ok else 'MISSED'} |")
    sys.stdout.flush()
    return {"median": med, "ratios": {name: value for name, value, _, _ in targets}, **m}


def print_codec_table(out: Path, cfg, repeats: int) -> None:
    """Bytes and encode time of our zarr's arrays under each Blosc codec, then the whole zarr write
    (``write_case_zarr``: image + mask, the configured codec) for a few chunk shapes."""
    from ctprep.stages.resample import ResampledCase, read_case_zarr, write_case_zarr

    img_out, mask_out, _ = read_case_zarr(out)
    print()
    print("| array | Blosc codec | MB | encode CPU s |")
    print("|---|---|---:|---:|")
    for name, codec, n, dt in codec_table(img_out, mask_out):
        print(f"| {name} | {codec} | {n / 1e6:.2f} | {dt:.2f} |")
    case = ResampledCase(img_out, mask_out, np.eye(4), tuple(cfg.resample.spacing_zyx), 1.0)
    r = cfg.resample
    print()
    print(f"| zarr chunks (z, y, x) | files | MB (image + mask) | write CPU s (median of {repeats}) |")
    print("|---|---:|---:|---:|")
    shape = img_out.shape
    for chunks in ((32, shape[1] // 2, shape[2] // 2), (32, shape[1], shape[2]), tuple(r.chunk_zyx)):
        dest = out.parent / "chunks.zarr"
        cpu = []
        for _ in range(repeats):
            shutil.rmtree(dest, ignore_errors=True)
            c0 = time.process_time()
            nbytes = write_case_zarr(dest, case, {}, chunks, r.compressor, r.clevel, r.shuffle)
            cpu.append(time.process_time() - c0)
        files = sum(len(f) for _, _, f in os.walk(dest))
        mark = " (configured)" if tuple(chunks) == tuple(r.chunk_zyx) else ""
        print(f"| {chunks}{mark} | {files} | {nbytes / 1e6:.2f} | {statistics.median(cpu):.2f} |")
        shutil.rmtree(dest, ignore_errors=True)


def print_scaling_table(image: Path, mask: Path, tmp: Path, cfg, cases: int) -> None:
    """Seconds per case with 1 and 2 Dask workers."""
    print()
    print("| Dask workers | s / case (wall) | speed-up |")
    print("|---:|---:|---:|")
    one = scaling(image, mask, tmp, cfg, cases, 1)
    print(f"| 1 | {one:.2f} | 1.00 |", flush=True)
    two = scaling(image, mask, tmp, cfg, cases, 2)
    print(f"| 2 | {two:.2f} | {one / two:.2f} |")


def main(argv: list[str] | None = None) -> dict | None:
    args = parse_args(argv)
    torch.set_num_threads(1)
    cfg = load_config(args.config)
    tmp = Path(args.workdir or tempfile.mkdtemp(prefix="ctprep_bench_"))
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        if args.big:
            big_table(args, tmp)
            return None
        result = print_method_table(args, cfg, tmp)
        if args.codecs:
            print_codec_table(result["stage_zarr"], cfg, args.repeats)
        if args.scaling_cases:
            image, mask = phantom_files(tmp, tuple(args.shape), tuple(args.spacing))
            print_scaling_table(image, mask, tmp, cfg, args.scaling_cases)
        return result
    finally:
        if not args.workdir:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
