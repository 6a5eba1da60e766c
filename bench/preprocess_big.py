"""``bench/preprocess.py --big``: CT-RATE's largest volumes (1024 x 1024 x 450 int16), peak memory per worker.

The phantom files (v2, v1, label map) are streamed to disk chunk by chunk; every measurement runs in
a fresh child process (this file run as a script with ``--big-child JSON``), which reports its wall
and CPU seconds and its peak RSS (``VmHWM``). What is measured and why: the ``--big`` part of
``bench/preprocess.py``'s docstring and docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

if not __package__:  # run as a file (the child): Python put bench/, not the repository, on the path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

BIG_SHAPE = (450, 1024, 1024)  # (z, y, x) voxels: CT-RATE's largest matrices
BIG_SPACING = (0.8, 0.34, 0.34)  # (z, y, x) mm
V1_INTERCEPT = -1024  # v1 files store HU + 1024; the metadata row says RescaleIntercept -1024


def nifti_header_bytes(shape_xyz: tuple[int, int, int], dtype, affine: np.ndarray | None) -> bytes:
    """The 352 bytes before the voxels of a single-file NIfTI-1, as ``ctprep.synth.nifti.nifti_gz``
    writes them (``affine=None``: the v1 blank header), for data streamed after it."""
    img = nib.Nifti1Image(np.zeros((1, 1, 1), dtype), np.eye(4) if affine is None else affine)
    if affine is not None:
        img.header.set_xyzt_units("mm")
        img.set_sform(affine, code="scanner")
        img.set_qform(affine, code="scanner")
    img.update_header()
    hdr = img.header.copy()
    hdr.set_data_shape(shape_xyz)
    hdr["vox_offset"] = 352
    return hdr.binaryblock + b"\0" * 4  # no extensions


def write_big_phantom(root: Path, shape_zyx, spacing_zyx, seed: int = 0) -> dict[str, Path]:
    """Render a chest with the generator's anatomy z-chunk by z-chunk and stream it into two files.

    ``v2``: int16 HU, RAS voxel order, real sform/qform. ``v1``: int16 raw = HU + 1024, DICOM LPS
    voxel order, blank header (geometry and intercept come from the metadata row). ``mask``: the
    uint8 TotalSegmentator-style label map on the v2 grid. Gzip (zlib) level 1, as nibabel writes
    ``.nii.gz``. Noise sigma 15 HU like the generator's sharp kernel.
    Memory: one chunk of 16 M voxels (and render_chest's temporaries), never the volume.
    """
    from ctprep.synth.anatomy import Grid, render_chest, sample_anatomy

    nz, ny, nx = shape_zyx
    dz, dy, dx = spacing_zyx
    rng = np.random.default_rng([seed, 1024])
    anatomy = sample_anatomy(rng, z_apex=0.0)
    origin = (anatomy.z_base - 0.5 * (nz * dz - anatomy.lung_h), -(ny - 1) / 2 * dy, -(nx - 1) / 2 * dx)
    aff = np.array([[dx, 0, 0, origin[2]], [0, dy, 0, origin[1]], [0, 0, dz, origin[0]], [0, 0, 0, 1]], float)
    paths = {"v2": root / "train_fixed/train_1/train_1_a/train_1_a_1.nii.gz",
             "v1": root / "train/train_1/train_1_a/train_1_a_2.nii.gz",
             "mask": root / "masks/train_fixed/train_1/train_1_a/train_1_a_1.nii.gz"}
    files = {}
    for style, p in paths.items():
        p.parent.mkdir(parents=True, exist_ok=True)
        files[style] = gzip.GzipFile(filename="", mode="wb", compresslevel=1, fileobj=open(p, "wb"), mtime=0)
    files["v2"].write(nifti_header_bytes((nx, ny, nz), np.int16, aff))
    files["v1"].write(nifti_header_bytes((nx, ny, nz), np.int16, None))
    files["mask"].write(nifti_header_bytes((nx, ny, nz), np.uint8, aff))
    noise = np.random.default_rng([seed, 7])
    step = max(1, 16_000_000 // (ny * nx))
    for k in range(0, nz, step):
        n = min(step, nz - k)
        sub = Grid((n, ny, nx), spacing_zyx, (origin[0] + k * dz, origin[1], origin[2]))
        hu, lab, _ = render_chest(anatomy, sub)
        files["mask"].write(lab.tobytes())
        del lab
        for i in range(n):
            hu[i] += 15.0 * noise.standard_normal((ny, nx), dtype=np.float32)
        hu16 = np.clip(np.rint(hu), -1024, 3071).astype(np.int16)
        del hu
        files["v2"].write(hu16.tobytes())  # canonical (z, y, x) C order == RAS (i, j, k) F order
        raw = hu16 - np.int16(V1_INTERCEPT)
        files["v1"].write(np.ascontiguousarray(raw[:, ::-1, ::-1]).tobytes())  # i -> L, j -> P
        del hu16, raw
    for f in files.values():
        fileobj = f.fileobj
        f.close()
        fileobj.close()
    return paths


def big_meta(shape_zyx, spacing_zyx) -> dict[str, str]:
    """The v1 file's metadata-CSV row (CT-RATE columns)."""
    nz, ny, nx = shape_zyx
    dz, dy, dx = spacing_zyx
    return {"VolumeName": "train_1_a_2.nii.gz", "XYSpacing": f"[{dy}, {dx}]", "ZSpacing": f"{dz}",
            "RescaleSlope": "1", "RescaleIntercept": str(V1_INTERCEPT), "RescaleType": "HU",
            "ImageOrientationPatient": "[1, 0, 0, 0, 1, 0]", "Rows": str(ny), "Columns": str(nx),
            "NumberofSlices": str(nz)}


def _proc_kb(field_name: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{field_name}:\s+(\d+) kB", f.read(), re.M).group(1))


def big_child(spec: dict) -> dict:
    """One measurement in this (fresh) process: wall/CPU seconds and peak RSS (VmHWM).

    ``spec``: kind ("floor" | "ours"), image, mask (path or None), meta, config, out, inplace (bool:
    call ``apply_rescale(..., inplace=True)`` from the CT-RATE reader, see docs/benchmarks.md).
    """
    import zarr  # noqa: F401 - import what a worker has imported before its first case

    from bench.preprocess import floor_read, run_ours  # here: bench.preprocess imports this module
    from ctprep.config import load_config
    from ctprep.sources.base import CaseInput
    from ctprep.stages.base import CaseTask

    import ctprep.sources.ctrate as ctrate_source
    import ctprep.stages.resample  # noqa: F401
    from ctprep.sources import nifti

    torch.set_num_threads(1)
    if spec.get("inplace"):
        def rescale_in_place(raw, slope, inter, **kw):
            return nifti.apply_rescale(raw, slope, inter, **{**kw, "inplace": True})

        ctrate_source.apply_rescale = rescale_in_place
    base_kb = _proc_kb("VmRSS")
    t0, c0 = time.perf_counter(), time.process_time()
    info = {}
    if spec["kind"] == "floor":
        arr = floor_read(Path(spec["image"]))
        info["dtype"] = str(arr.dtype)
        del arr
    else:
        cfg = load_config(spec["config"])
        case = CaseInput(case_id=Path(spec["image"]).name.removesuffix(".nii.gz"), source="ctrate", split="train",
                         files={"image": spec["image"], **({"mask": spec["mask"]} if spec.get("mask") else {})},
                         meta=spec.get("meta") or {})
        info = run_ours(CaseTask("resample", case, "bench", spec["out"], str(Path(spec["out"]).parent), cfg, {}))
    return {"wall": time.perf_counter() - t0, "cpu": time.process_time() - c0, "base_kb": base_kb,
            "peak_kb": _proc_kb("VmHWM"), "info": info}


def run_big_child(spec: dict) -> dict:
    """Run :func:`big_child` in a fresh interpreter so that no other allocation counts in its peak.

    The child gets the environment Dask's nanny gives a worker process (``MALLOC_TRIM_THRESHOLD_``,
    one OpenMP thread): glibc then returns freed slabs to the OS as it does on a worker.
    """
    import dask
    import distributed  # noqa: F401 - registers the distributed.* config defaults

    env = dict(os.environ)
    env.update({k: str(v) for k, v in (dask.config.get("distributed.nanny.pre-spawn-environ") or {}).items()})
    # This file as a script (its __main__ below), not bench/preprocess.py: the child imports what it measures.
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--big-child", json.dumps(spec)],
                          capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"child failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def big_table(args, tmp: Path) -> None:
    shape, spacing = tuple(args.big_shape), tuple(args.big_spacing)
    raw_bytes = int(np.prod(shape)) * 2
    print(f"input {shape} int16 at {spacing} mm (z, y, x) = {raw_bytes / 1e9:.2f} GB as int16; one thread per "
          f"process; each cell a fresh child process; median of {args.repeats} (peak: max)", flush=True)
    t0 = time.perf_counter()
    root = tmp / ("ctrate_big_" + "x".join(map(str, shape)) + "_" + "x".join(f"{s:g}" for s in spacing))
    if (root / "complete").exists():  # a previous run with this --workdir, shape and spacing
        paths = {"v2": root / "train_fixed/train_1/train_1_a/train_1_a_1.nii.gz",
                 "v1": root / "train/train_1/train_1_a/train_1_a_2.nii.gz",
                 "mask": root / "masks/train_fixed/train_1/train_1_a/train_1_a_1.nii.gz"}
    else:
        paths = write_big_phantom(root, shape, spacing)
        (root / "complete").write_text("")
    print(f"phantom ready in {time.perf_counter() - t0:.0f} s (wall): " + ", ".join(
        f"{k} {p.stat().st_size / 1e6:.0f} MB" for k, p in paths.items()), flush=True)
    meta = {"v2": {}, "v1": big_meta(shape, spacing)}
    rows = []

    def measure(label: str, spec: dict) -> dict:
        runs = [run_big_child(spec) for _ in range(args.repeats)]
        r = {"label": label, "wall": statistics.median(x["wall"] for x in runs),
             "cpu": statistics.median(x["cpu"] for x in runs), "peak_kb": max(x["peak_kb"] for x in runs),
             "base_kb": min(x["base_kb"] for x in runs), "info": runs[-1]["info"]}
        rows.append(r)
        return r

    # (file, kind, preset, rescale in place, with the label map)
    cells = [("v2", "floor", None, False, False), ("v2", "ours", "ctclip", False, False),
             ("v2", "ours", "demo", False, False), ("v2", "ours", "ctclip", False, True),
             ("v2", "ours", "demo", False, True),
             ("v1", "floor", None, False, False), ("v1", "ours", "ctclip", False, False),
             ("v1", "ours", "demo", False, False), ("v1", "ours", "ctclip", True, False),
             ("v1", "ours", "demo", True, False)]
    floors = {}
    print()
    print("| file | what | preset | wall s | CPU s | x floor (CPU) | peak RSS GB | above imports GB | "
          "peak / int16 volume |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|")
    for style, kind, preset, inplace, with_mask in cells:
        out = tmp / "big_out" / f"{style}_{preset}_{int(inplace)}_{int(with_mask)}.zarr"
        what = "nibabel read (floor)" if kind == "floor" else "resample stage" + (
            ", rescale in place" if inplace else "") + (" + uint8 label map" if with_mask else "")
        r = measure(what, {"kind": kind, "image": str(paths[style]), "mask": str(paths["mask"]) if with_mask else None,
                           "meta": meta[style], "config": preset, "out": str(out), "inplace": inplace})
        if kind == "floor":
            floors[style] = r["cpu"]
        shutil.rmtree(out, ignore_errors=True)
        peak, base = r["peak_kb"] * 1024, r["base_kb"] * 1024
        print(f"| {style} | {what} | {preset or '-'} | {r['wall']:.2f} | {r['cpu']:.2f} | "
              f"{r['cpu'] / floors[style]:.2f} | {peak / 1e9:.2f} | {(peak - base) / 1e9:.2f} | "
              f"{peak / raw_bytes:.2f} |", flush=True)
    print()
    print(f"imports alone (torch, nibabel, zarr, ctprep): {min(r['base_kb'] for r in rows) / 1e6:.2f} GB RSS; "
          f"int16 volume {raw_bytes / 1e9:.2f} GB")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="One --big measurement in this process (run by bench/preprocess.py --big).")
    ap.add_argument("--big-child", required=True, help="the measurement's JSON spec (see big_child)")
    print(json.dumps(big_child(json.loads(ap.parse_args(argv).big_child))))


if __name__ == "__main__":
    main()
