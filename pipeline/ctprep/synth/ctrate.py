"""Write a synthetic dataset in CT-RATE's on-disk layouts.

``layout="flat"`` (the default, ``make demo``'s) under ``out``::

    train/train_{p}/train_{p}_{s}/train_{p}_{s}_{r}.nii.gz      volumes (valid/ likewise)
    masks/train/train_{p}/train_{p}_{s}/train_{p}_{s}_{r}.nii.gz label maps, same grid + affine
    metadata/train_metadata.csv, metadata/validation_metadata.csv
    radiology_text_reports/train_reports.csv, radiology_text_reports/validation_reports.csv
    multi_abnormality_labels/train_predicted_labels.csv, multi_abnormality_labels/valid_predicted_labels.csv
    cot/ctrate_cot.jsonl
    faults.json                                                   (always; empty list without --faults)

``layout="release"``: CT-RATE as downloaded (``out`` plays ``dataset/``)::

    train_fixed/train_{p}/train_{p}_{s}/train_{p}_{s}_{r}.nii.gz  every volume, v2: int16 HU, real header
    train/train_{p}/train_{p}_{s}/train_{p}_{s}_{r}.nii.gz        v1 twins of ~40% of them: raw values
                                                                   (HU - RescaleIntercept, the intercept
                                                                   -1024 or -8192), blank header
    ts_seg/ts_total/train_fixed/.../train_{p}_{s}_{r}.nii.gz       117-label anatomy map (on the v2 grid)
    ts_seg/ts_lung_nodules/train_fixed/...                         1 = lung nodule
    ts_seg/ts_pleural_pericard_effusion/train_fixed/...            1 = pleural, 2 = pericardial effusion
    metadata/..., radiology_text_reports/..., multi_abnormality_labels/..., cot/...  as in flat, but
                                                                   the metadata CSV has 44 columns,
                                                                   mostly an empty RescaleType
    (valid likewise)

``layout="release-fixed"``: the same without the v1 folders. With ``grid="full"`` the first
volume of a release layout is a 1024 x 1024 matrix (about 0.4 mm pixels), as some CT-RATE
series are. The voxels of a v1 twin and of its ``_fixed`` file are the same rendering, so
both must resample to the same image.

Every scan gets its own RNG from (seed, patient, scan), so a case looks the same
whatever ``cases`` is, and the same seed gives byte-identical files.
"""

from __future__ import annotations

import csv
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ctprep.schema import ABNORMALITY_LABELS
from ctprep.synth.anatomy import Anatomy, Grid, render_chest, render_head, sample_anatomy
from ctprep.synth.finding_kinds import KINDS
from ctprep.synth.findings import labels_vector, sample_findings
from ctprep.synth.grids import GridPreset, get_grid, sample_recon_geometry
from ctprep.synth.nifti import RAW_INTERCEPT, canonical_to_nifti, nifti_gz, write_bytes
from ctprep.synth.reports import NOT_GIVEN, WORDINGS, compose_text

SPLITS = ("train", "valid")
METADATA_CSV = {"train": "metadata/train_metadata.csv", "valid": "metadata/validation_metadata.csv"}
REPORTS_CSV = {
    "train": "radiology_text_reports/train_reports.csv",
    "valid": "radiology_text_reports/validation_reports.csv",
}
LABELS_CSV = {
    "train": "multi_abnormality_labels/train_predicted_labels.csv",
    "valid": "multi_abnormality_labels/valid_predicted_labels.csv",
}
COT_JSONL = "cot/ctrate_cot.jsonl"
FAULTS_JSON = "faults.json"
METADATA_COLUMNS = (
    "VolumeName", "Manufacturer", "SeriesDescription", "PatientSex", "PatientAge", "ReconstructionDiameter",
    "ConvolutionKernel", "PatientPosition", "ImageOrientationPatient", "ImagePositionPatient", "XYSpacing",
    "Rows", "Columns", "RescaleIntercept", "RescaleSlope", "RescaleType", "NumberofSlices", "ZSpacing",
)  # fmt: skip
REPORT_COLUMNS = ("VolumeName", "ClinicalInformation_EN", "Technique_EN", "Findings_EN", "Impressions_EN")
LABEL_COLUMNS = ("VolumeName",) + ABNORMALITY_LABELS
# The 44 columns of CT-RATE's metadata CSVs (DICOM attributes of the source series).
RELEASE_METADATA_COLUMNS = (
    "VolumeName", "Manufacturer", "SeriesDescription", "ManufacturerModelName", "PatientSex", "PatientAge",
    "ReconstructionDiameter", "DistanceSourceToDetector", "DistanceSourceToPatient", "GantryDetectorTilt",
    "TableHeight", "RotationDirection", "XRayTubeCurrent", "Exposure", "FilterType", "GeneratorPower",
    "FocalSpots", "ConvolutionKernel", "PatientPosition", "RevolutionTime", "SingleCollimationWidth",
    "TotalCollimationWidth", "TableSpeed", "TableFeedPerRotation", "SpiralPitchFactor",
    "DataCollectionCenterPatient", "ReconstructionTargetCenterPatient", "ExposureModulationType",
    "CTDIvol", "ImagePositionPatient", "ImageOrientationPatient", "SliceThickness", "SpacingBetweenSlices",
    "Rows", "Columns", "XYSpacing", "PhotometricInterpretation", "BitsAllocated", "BitsStored",
    "RescaleIntercept", "RescaleSlope", "RescaleType", "NumberofSlices", "ZSpacing",
)  # fmt: skip
LAYOUTS = ("flat", "release", "release-fixed")
TS_TASKS = ("ts_total", "ts_lung_nodules", "ts_pleural_pericard_effusion")
BIG_MATRIX = 1024  # in-plane voxels of the first release volume with grid="full"
FAULT_KINDS = (
    "truncated_gzip",  # volume file cut short: gzip stream ends early
    "all_zero",  # v2 volume of zeros (constant image)
    "nan_inf",  # float32 v2 volume containing NaN and +/-inf voxels
    "mask_grid_mismatch",  # mask shape and affine differ from the volume's
    "missing_report",  # no row in the reports CSV (and no CoT record)
    "missing_metadata",  # v1 volume without a metadata row: spacing/slope unknown
    "implausible_spacing",  # v1 volume whose metadata ZSpacing is 0
    "non_chest",  # head-like volume: skull + brain, no lungs in image or mask
    "unsafe_name",  # file name with spaces/odd characters (not a safe case id)
    "path_in_name",  # CSV rows whose VolumeName has path components; no such file
)
V1_FRACTION = 0.4  # share of volumes written in the v1 (raw + blank header) style
VALID_EVERY = 5  # every 5th patient goes to valid: ~80/20 split


@dataclass
class Volume:
    """One reconstruction to write: where, how, and the rows that describe it."""

    split: str
    name: str  # VolumeName, e.g. train_3_a_2.nii.gz
    relpath: str  # under out/ (also under out/masks/)
    style: str  # v1 | v2
    orient: str  # lps | ras (v1 is always DICOM/LPS voxel order)
    grid: Grid
    kernel: str
    sigma: float
    seed: tuple[int, ...]
    meta: dict = field(default_factory=dict)


@dataclass
class Scan:
    split: str
    pid: int
    sid: str
    anatomy: Anatomy
    text: dict
    labels: list[int]
    volumes: list[Volume] = field(default_factory=list)


def _fmt_list(v) -> str:
    return "[" + ", ".join(f"{float(x):g}" if not float(x).is_integer() else str(int(x)) for x in v) + "]"


def _scan(seed: int, split: str, pid: int, sidx: int, n_recons: int, preset: GridPreset, normal=None,
          big: bool = False, wording: str = "default") -> Scan:
    """Sample anatomy, findings, text and reconstruction geometries of one scan.

    ``big``: the first reconstruction gets a ``BIG_MATRIX``-square matrix over the same field of view.
    ``wording``: ``ctprep.synth.reports.WORDINGS``; the default text is composed (and its RNG draws
    made) either way, so the volumes of a seed are the same in every wording.
    """
    rng = np.random.default_rng([seed, SPLITS.index(split), pid, sidx])
    t = float(rng.uniform(-80, 40))  # table position of the lung apex, mm
    a = sample_anatomy(rng, z_apex=t)
    a.findings = sample_findings(a, rng, normal=normal)
    text = compose_text(a, rng)
    if wording != "default":
        text = compose_text(a, rng, wording)  # draws nothing from rng
    labels = labels_vector(a.findings, ABNORMALITY_LABELS)
    z_hi = a.z_apex + float(rng.uniform(15, 30))
    z_lo = a.z_base - float(rng.uniform(30, 55))
    fov = max(float(rng.uniform(*preset.fov_mm)), 2 * a.ax + 20)
    sid = "abcdefgh"[sidx]
    sex, age = str(rng.choice(["M", "F"])), int(rng.integers(30, 86))
    manufacturer = str(rng.choice(["SIEMENS", "PHILIPS", "GE MEDICAL SYSTEMS", "TOSHIBA"]))
    scan = Scan(split, pid, sid, a, text, labels)
    for r in range(n_recons):
        shape, spacing = sample_recon_geometry(preset, rng, z_hi - z_lo, fov, r)
        if big and r == 0:
            d = round(fov / BIG_MATRIX, 3)
            shape, spacing = (shape[0], BIG_MATRIX, BIG_MATRIX), (spacing[0], d, d)
        nz, ny, nx = shape
        dz, dy, dx = spacing
        origin = (z_lo, -(ny - 1) / 2 * dy + float(rng.uniform(-8, 8)), -(nx - 1) / 2 * dx + float(rng.uniform(-8, 8)))
        style = "v1" if rng.random() < V1_FRACTION else "v2"
        orient = "lps" if style == "v1" or rng.random() < 0.5 else "ras"
        kernel = "sharp" if r == 0 else "soft"
        sigma = float(rng.uniform(14, 20) if kernel == "sharp" else rng.uniform(7, 11))
        name = f"{split}_{pid}_{sid}_{r + 1}.nii.gz"
        rel = f"{split}/{split}_{pid}/{split}_{pid}_{sid}/{name}"
        grid = Grid(shape, spacing, origin)
        # DICOM geometry of the LPS-ordered series: first voxel in LPS mm.
        ipp = (-(origin[2] + (nx - 1) * dx), -(origin[1] + (ny - 1) * dy), origin[0])
        meta = {
            "VolumeName": name,
            "Manufacturer": manufacturer,
            "SeriesDescription": "THORAX 1.0 B70f" if kernel == "sharp" else "THORAX 3.0 B31f",
            "PatientSex": sex,
            "PatientAge": f"{age:03d}Y",
            "ReconstructionDiameter": f"{fov:.1f}",
            "ConvolutionKernel": "B70f" if kernel == "sharp" else "B31f",
            "PatientPosition": "HFS",
            "ImageOrientationPatient": "[1, 0, 0, 0, 1, 0]",
            "ImagePositionPatient": _fmt_list([round(v, 3) for v in ipp]),
            "XYSpacing": _fmt_list([dy, dx]),
            "Rows": ny,
            "Columns": nx,
            "RescaleIntercept": int(RAW_INTERCEPT),
            "RescaleSlope": 1,
            "RescaleType": "HU",
            "NumberofSlices": nz,
            "ZSpacing": f"{dz:g}",
        }
        vseed = (seed, SPLITS.index(split), pid, sidx, r)
        scan.volumes.append(Volume(split, name, rel, style, orient, grid, kernel, sigma, vseed, meta))
    return scan


def _render(a: Anatomy, grid: Grid, max_voxels: int = 16_000_000):
    """Render in z-chunks so real-size grids stay within a few hundred MB."""
    hu, lab, _ = _render_maps(a, grid, False, max_voxels)
    return hu, lab


# Label value of each finding kind in the non-anatomy TotalSegmentator tasks of the release layout
# (each kind's ``ts_seg``).
TASK_FINDINGS = {task: {k.name: k.ts_seg[task] for k in KINDS if task in k.ts_seg} for task in TS_TASKS[1:]}


def _render_maps(a: Anatomy, grid: Grid, tasks: bool, max_voxels: int = 16_000_000):
    """(hu, anatomy labels, {task: uint8 map} if ``tasks``), rendered in z-chunks."""
    nz, ny, nx = grid.shape
    step = max(1, max_voxels // (ny * nx))
    hu = np.empty(grid.shape, np.float32)
    lab = np.empty(grid.shape, np.uint8)
    maps = {t: np.zeros(grid.shape, np.uint8) for t in TASK_FINDINGS} if tasks else {}
    for k in range(0, nz, step):
        n = min(step, nz - k)
        sub = grid if n == nz else Grid((n, ny, nx), grid.spacing, (grid.origin[0] + k * grid.spacing[0],) + grid.origin[1:])
        hu[k : k + n], lab[k : k + n], masks = render_chest(a, sub, finding_masks=tasks)
        for task, values in TASK_FINDINGS.items() if tasks else ():
            for i, m in masks.items():
                v = values.get(a.findings[i].kind)
                if v:
                    maps[task][k : k + n][m] = v
    return hu, lab, maps


def _add_noise(hu: np.ndarray, sigma: float, seed) -> None:
    rng = np.random.default_rng(list(seed) + [7])
    for k in range(hu.shape[0]):  # per slice keeps the temporary small on 512^2 grids
        hu[k] += sigma * rng.standard_normal(hu.shape[1:], dtype=np.float32)


def stored_values(hu: np.ndarray, style: str, seed, intercept: float = RAW_INTERCEPT) -> np.ndarray:
    """HU -> what the file stores: v2 int16 HU; v1 raw = HU - intercept (int16 or uint16)."""
    if style == "v2":
        return np.clip(np.rint(hu), -1024, 3071).astype(np.int16)
    raw = np.clip(np.rint(hu - intercept), -1024 - intercept, 3071 - intercept)
    return raw.astype(np.uint16 if seed[-1] % 2 else np.int16)


def fixed_relpath(relpath: str) -> str:
    """``train/train_1/...`` -> ``train_fixed/train_1/...`` (the corrected release's folder)."""
    head, _, rest = relpath.partition("/")
    return f"{head}_fixed/{rest}"


def image_relpath(vol: Volume, layout: str) -> str:
    """Where ``vol``'s image file goes: a v1-style volume of a release layout stays in the v1 folder
    (only release-fixed puts everything under *_fixed)."""
    if layout == "flat" or (layout == "release" and vol.style == "v1"):
        return vol.relpath
    return fixed_relpath(vol.relpath)


def mask_relpath(vol: Volume, layout: str, task: str = "ts_total") -> str:
    """Where ``vol``'s label map of ``task`` goes (flat: ``masks/`` mirror)."""
    if layout == "flat":
        return f"masks/{vol.relpath}"
    return f"ts_seg/{task}/{image_relpath(vol, layout)}"


def _write_volume(out: Path, vol: Volume, hu: np.ndarray, lab: np.ndarray, layout: str = "flat") -> None:
    stored = stored_values(hu, vol.style, vol.seed, RAW_INTERCEPT if layout == "flat" else twin_intercept(vol))
    data, aff = canonical_to_nifti(stored, vol.grid.origin, vol.grid.spacing, vol.orient)
    mdata, _ = canonical_to_nifti(lab, vol.grid.origin, vol.grid.spacing, vol.orient)
    affine = None if vol.style == "v1" else aff
    write_bytes(out / image_relpath(vol, layout), nifti_gz(data, affine))
    write_bytes(out / mask_relpath(vol, layout), nifti_gz(mdata, affine))


def twin_intercept(vol: Volume) -> int:
    """RescaleIntercept of a release volume's DICOM series: -8192 for every third v1 twin (some
    scanners store raw values offset by 8192), else -1024."""
    return -8192 if vol.style == "v1" and vol.seed[2] % 3 == 0 else -1024


def fixed_orient(vol: Volume) -> str:
    """Voxel order of a release volume's _fixed file: its own for v2-drawn volumes; for v1 twins
    alternately RAS and LPS, so twins also differ in voxel order from their v1 file."""
    return vol.orient if vol.style == "v2" else ("ras" if vol.seed[2] % 2 else "lps")


def _write_release_volume(out: Path, vol: Volume, hu: np.ndarray, lab: np.ndarray, maps: dict, layout: str) -> None:
    """The _fixed file, the v1 twin (``release`` only, for v1-drawn volumes) and the ts_seg maps."""
    orient = fixed_orient(vol)
    fixed = dataclasses.replace(vol, style="v2", orient=orient)
    data, aff = canonical_to_nifti(stored_values(hu, "v2", vol.seed), vol.grid.origin, vol.grid.spacing, orient)
    rel = fixed_relpath(vol.relpath)
    write_bytes(out / rel, nifti_gz(data, aff))
    for task, labels in (("ts_total", lab), *maps.items()):
        mdata, _ = canonical_to_nifti(labels, vol.grid.origin, vol.grid.spacing, orient)
        write_bytes(out / mask_relpath(fixed, layout, task), nifti_gz(mdata, aff))
    if layout == "release" and vol.style == "v1":
        raw = stored_values(hu, "v1", vol.seed, float(twin_intercept(vol)))
        data, _ = canonical_to_nifti(raw, vol.grid.origin, vol.grid.spacing, "lps")
        write_bytes(out / vol.relpath, nifti_gz(data, None))


def release_metadata(vol: Volume) -> dict:
    """The 44-column metadata row of a release volume (the flat row plus the other DICOM columns)."""
    m = dict(vol.meta)
    r = vol.seed[-1]
    dz = float(vol.meta["ZSpacing"])
    m.update({
        "ManufacturerModelName": {"SIEMENS": "SOMATOM Definition", "PHILIPS": "Ingenuity CT",
                                  "GE MEDICAL SYSTEMS": "Revolution", "TOSHIBA": "Aquilion"}[m["Manufacturer"]],
        "DistanceSourceToDetector": "1085.6", "DistanceSourceToPatient": "595", "GantryDetectorTilt": "0",
        "TableHeight": str(150 + vol.seed[2] % 40), "RotationDirection": "CW", "XRayTubeCurrent": str(90 + 10 * r),
        "Exposure": str(40 + 5 * r), "FilterType": "FLAT", "GeneratorPower": "24000", "FocalSpots": "[0.7, 1.2]",
        "RevolutionTime": "0.5", "SingleCollimationWidth": "0.6", "TotalCollimationWidth": "38.4",
        "TableSpeed": "76.8", "TableFeedPerRotation": "38.4", "SpiralPitchFactor": "1",
        "DataCollectionCenterPatient": "[0, 0, 0]", "ReconstructionTargetCenterPatient": "[0, 0, 0]",
        "ExposureModulationType": "", "CTDIvol": f"{5.5 + r:.1f}", "SliceThickness": f"{dz:g}",
        "SpacingBetweenSlices": f"{dz:g}", "PhotometricInterpretation": "MONOCHROME2", "BitsAllocated": "16",
        "BitsStored": "12" if twin_intercept(vol) == -1024 else "16",
        "RescaleIntercept": twin_intercept(vol),
        "RescaleType": "HU" if vol.seed[2] % 4 == 0 else "",  # mostly empty, as released
    })
    return {c: m.get(c, "") for c in RELEASE_METADATA_COLUMNS}


def _plan(cases: int, seed: int) -> list[tuple[str, int, int, int]]:
    """(split, patient number, scan index, n_recons) until ``cases`` volumes are planned."""
    rng = np.random.default_rng([seed, 99])
    plan, total, counters, patient = [], 0, {"train": 0, "valid": 0}, 0
    while total < cases:
        split = "valid" if patient % VALID_EVERY == VALID_EVERY - 1 else "train"
        counters[split] += 1
        n_scans = 2 if rng.random() < 0.2 else 1
        for s in range(n_scans):
            n = min(int(rng.choice([1, 2, 3], p=[0.4, 0.45, 0.15])), cases - total)
            if n <= 0:
                break
            plan.append((split, counters[split], s, n))
            total += n
        patient += 1
    return plan


def _write_csv(path: Path, columns, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=list(columns), lineterminator="\n")
        w.writeheader()
        for row in rows:
            w.writerow(row)


def _report_row(name: str, text: dict) -> dict:
    return {
        "VolumeName": name,
        "ClinicalInformation_EN": text["clinical"] or NOT_GIVEN,
        "Technique_EN": text["technique"] or NOT_GIVEN,
        "Findings_EN": text["findings"] or NOT_GIVEN,
        "Impressions_EN": text["impression"] or NOT_GIVEN,
    }


def _cot_record(name: str, text: dict, as_objects: bool) -> dict:
    steps = [{"step": i + 1, "text": s} for i, s in enumerate(text["steps"])] if as_objects else list(text["steps"])
    return {"VolumeName": name, "steps": steps, "findings": text["findings"], "impression": text["impression"]}


def _check_wording(wording: str) -> None:
    if wording not in WORDINGS:
        raise ValueError(f"unknown report wording {wording!r}; choose one of: {', '.join(WORDINGS)}")


def plan_scans(cases: int, grid: str = "demo", seed: int = 0, wording: str = "default") -> list[Scan]:
    """The normal scans ``write_ctrate`` writes (anatomy, findings, text, volumes): the ground truth."""
    if cases < 0:
        raise ValueError("cases must be >= 0")
    _check_wording(wording)
    preset = get_grid(grid)
    return [_scan(seed, sp, pid, s, n, preset, wording=wording) for sp, pid, s, n in _plan(cases, seed)]


def _write_scan_volumes(out: Path, seed: int, grid: str, plan_row: tuple[str, int, int, int], layout: str = "flat",
                        big: bool = False) -> None:
    """Render and write every volume of one planned scan (a worker rebuilds the scan from its plan row)."""
    scan = _scan(seed, *plan_row, get_grid(grid), big=big)
    for vol in scan.volumes:
        hu, lab, maps = _render_maps(scan.anatomy, vol.grid, tasks=layout != "flat")
        _add_noise(hu, vol.sigma, vol.seed)
        if layout == "flat":
            _write_volume(out, vol, hu, lab, layout)
        else:
            _write_release_volume(out, vol, hu, lab, maps, layout)


def write_ctrate(out: Path, cases: int = 40, grid: str = "demo", seed: int = 0, faults: bool = False,
                 workers: int = 1, layout: str = "flat", wording: str = "default") -> dict:
    """Write a synthetic CT-RATE dataset.

    Args:
        out: dataset root (created; plays ``dataset/`` in the release layouts).
        cases: number of normal volumes (reconstructions); fault cases come on top.
        grid: "demo" | "small" | "full" (``ctprep.synth.grids.GRIDS``).
        seed: same seed -> byte-identical files.
        faults: also write the cases listed in ``faults.json`` (kinds: ``FAULT_KINDS``).
        workers: processes rendering the volumes (each volume has its own seed, so the files are
            byte-identical for any number of workers).
        layout: "flat" | "release" | "release-fixed" (see the module docstring).
        wording: report and CoT wording, ``ctprep.synth.reports.WORDINGS``: "default" (``make demo``'s)
            or "anatomy" (findings named by side, lobe, cranio-caudal zone and extent; the same
            volumes, masks and labels as "default" for the same seed).

    Returns:
        {"volumes": [relpath, ...], "faults": [fault records]}: relpaths of the image files
        (release: the _fixed files, then the v1 twins).
    """
    out = Path(out)
    preset = get_grid(grid)
    if cases < 0 or workers < 1:
        raise ValueError(f"cases must be >= 0 and workers >= 1, got cases={cases}, workers={workers}")
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose one of: {', '.join(LAYOUTS)}")
    _check_wording(wording)
    plan = _plan(cases, seed)
    bigs = [layout != "flat" and grid == "full" and i == 0 for i in range(len(plan))]
    scans = [_scan(seed, *row, preset, big=b, wording=wording) for row, b in zip(plan, bigs)]
    if workers == 1:
        for row, b in zip(plan, bigs):
            _write_scan_volumes(out, seed, grid, row, layout, b)
    else:
        import concurrent.futures as cf
        import multiprocessing as mp

        with cf.ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
            n = len(plan)  # list(): a worker's exception is raised here
            list(pool.map(_write_scan_volumes, [out] * n, [seed] * n, [grid] * n, plan, [layout] * n, bigs,
                          chunksize=max(1, n // (8 * workers))))
    rows: dict[str, dict[str, list]] = {sp: {"meta": [], "report": [], "labels": []} for sp in SPLITS}
    cot: list[dict] = []
    written: list[str] = []
    twins: list[str] = []
    for scan in scans:
        for vol in scan.volumes:
            written.append(image_relpath(vol, "release-fixed" if layout != "flat" else layout))
            if layout == "release" and vol.style == "v1":
                twins.append(vol.relpath)
            rows[vol.split]["meta"].append(vol.meta if layout == "flat" else release_metadata(vol))
            rows[vol.split]["report"].append(_report_row(vol.name, scan.text))
            rows[vol.split]["labels"].append({"VolumeName": vol.name, **dict(zip(ABNORMALITY_LABELS, scan.labels))})
            cot.append(_cot_record(vol.name, scan.text, as_objects=scan.pid % 2 == 0))
    written += twins
    fault_records = _write_faults(out, seed, preset, scans, rows, cot, written, layout, wording) if faults else []
    columns = METADATA_COLUMNS if layout == "flat" else RELEASE_METADATA_COLUMNS
    for sp in SPLITS:
        _write_csv(out / METADATA_CSV[sp], columns, [{c: m.get(c, "") for c in columns} for m in rows[sp]["meta"]])
        _write_csv(out / REPORTS_CSV[sp], REPORT_COLUMNS, rows[sp]["report"])
        _write_csv(out / LABELS_CSV[sp], LABEL_COLUMNS, rows[sp]["labels"])
    (out / COT_JSONL).parent.mkdir(parents=True, exist_ok=True)
    (out / COT_JSONL).write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in cot), encoding="utf-8")
    manifest = {"seed": seed, "grid": grid, "cases": cases, "layout": layout, "faults": fault_records}
    if layout == "flat":  # keep the flat layout's faults.json byte-identical to earlier versions
        del manifest["layout"]
    if wording != "default":  # likewise: only a non-default wording is recorded
        manifest["wording"] = wording
    (out / FAULTS_JSON).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    return {"volumes": written, "faults": fault_records}


def _write_faults(out, seed, preset, scans, rows, cot, written, layout: str = "flat",
                  wording: str = "default") -> list[dict]:
    """Append one case per fault kind to the train split (deterministic for ``seed``)."""
    base = max([s.pid for s in scans if s.split == "train"], default=0)
    records = []
    for i, kind in enumerate(FAULT_KINDS):
        pid = base + 1 + i
        scan = _scan(seed, "train", pid, 0, 1, preset, normal=False, wording=wording)
        vol = scan.volumes[0]
        if kind in ("missing_metadata", "implausible_spacing"):
            vol = dataclasses.replace(vol, style="v1", orient="lps")
        elif vol.style == "v1":
            vol = dataclasses.replace(vol, style="v2")
        rec = {"case": vol.name.removesuffix(".nii.gz"), "kind": kind, "split": "train", "volume_name": vol.name,
               "path": image_relpath(vol, layout), "mask": mask_relpath(vol, layout), "has_file": True}  # fmt: skip
        fr = _FaultRows(dict(vol.meta), _report_row(vol.name, scan.text),
                        {"VolumeName": vol.name, **dict(zip(ABNORMALITY_LABELS, scan.labels))})
        hu, lab = _render(scan.anatomy, vol.grid)
        _add_noise(hu, vol.sigma, vol.seed)
        fr.cot = _cot_record(vol.name, scan.text, as_objects=False)
        vol = _write_fault_case(out, kind, pid, scan, vol, hu, lab, rec, fr, layout)
        if rec["has_file"]:
            written.append(rec["path"])
        if fr.meta is not None:
            rows["train"]["meta"].append(fr.meta if layout == "flat"
                                         else release_metadata(dataclasses.replace(vol, meta=fr.meta)))
        if fr.report is not None:
            rows["train"]["report"].append(fr.report)
        rows["train"]["labels"].append(fr.label_row)
        if fr.cot is not None:
            cot.append(fr.cot)
        records.append(rec)
    return records


@dataclass
class _FaultRows:
    """Side-table rows of one fault case; a fault may drop (None) or rename them."""

    meta: dict | None
    report: dict | None
    label_row: dict
    cot: dict | None = None


def _write_fault_case(out, kind: str, pid: int, scan, vol, hu: np.ndarray, lab: np.ndarray, rec: dict,
                      fr: _FaultRows, layout: str):
    """Write the files of one fault case (``rec`` gets its detail; ``fr`` its row edits); returns the volume."""
    if kind == "truncated_gzip":
        _write_volume(out, vol, hu, lab, layout)
        p = out / image_relpath(vol, layout)
        blob = p.read_bytes()
        write_bytes(p, blob[: len(blob) * 3 // 5])
        rec["detail"] = "volume .nii.gz truncated to 60% of its bytes"
    elif kind == "all_zero":
        _write_volume(out, vol, np.zeros_like(hu), lab, layout)
        rec["detail"] = "every voxel is 0"
    elif kind == "nan_inf":
        hu[hu.shape[0] // 2] = np.nan
        hu[::7, ::11, ::13] = np.inf
        hu[1::9, ::7, ::5] = -np.inf
        data, aff = canonical_to_nifti(hu.astype(np.float32), vol.grid.origin, vol.grid.spacing, vol.orient)
        mdata, _ = canonical_to_nifti(lab, vol.grid.origin, vol.grid.spacing, vol.orient)
        write_bytes(out / image_relpath(vol, layout), nifti_gz(data, aff))
        write_bytes(out / mask_relpath(vol, layout), nifti_gz(mdata, aff))
        rec["detail"] = "float32 volume with a NaN slice and +/-inf voxels"
    elif kind == "mask_grid_mismatch":
        _write_volume(out, vol, hu, lab, layout)
        nz, ny, nx = vol.grid.shape
        g2 = Grid((nz - 3, ny // 2, nx // 2), (vol.grid.spacing[0], 2 * vol.grid.spacing[1], 2 * vol.grid.spacing[2]),
                  vol.grid.origin)  # fmt: skip
        _, lab2 = _render(scan.anatomy, g2)
        mdata, maff = canonical_to_nifti(lab2, g2.origin, g2.spacing, vol.orient)
        write_bytes(out / mask_relpath(vol, layout), nifti_gz(mdata, maff))
        rec["detail"] = f"mask shape {list(mdata.shape)} vs volume {[nx, ny, nz]} (i, j, k)"
    elif kind == "missing_report":
        _write_volume(out, vol, hu, lab, layout)
        fr.report, fr.cot = None, None
        rec["detail"] = "no reports CSV row and no CoT record"
    elif kind == "missing_metadata":
        _write_volume(out, vol, hu, lab, layout)
        fr.meta = None
        rec["detail"] = "v1 (raw, blank header) volume with no metadata row"
    elif kind == "implausible_spacing":
        _write_volume(out, vol, hu, lab, layout)
        fr.meta["ZSpacing"] = "0"
        rec["detail"] = "v1 volume whose metadata ZSpacing is 0"
    elif kind == "non_chest":
        hhu, hlab = render_head(vol.grid, center_z=vol.grid.origin[0] + vol.grid.shape[0] * vol.grid.spacing[0] / 2)
        _add_noise(hhu, vol.sigma, vol.seed)
        _write_volume(out, vol, hhu, hlab, layout)
        rec["detail"] = "head-like phantom (skull + brain), no lung voxels"
    elif kind == "unsafe_name":
        name = f"train_{pid}_a_1 copy(1)#.nii.gz"
        rel = f"train/train_{pid}/train_{pid}_a/{name}"
        vol = dataclasses.replace(vol, name=name, relpath=rel)
        _write_volume(out, vol, hu, lab, layout)
        fr.meta["VolumeName"] = fr.report["VolumeName"] = fr.label_row["VolumeName"] = name
        fr.cot["VolumeName"] = name
        rec.update(case=name.removesuffix(".nii.gz"), volume_name=name, path=image_relpath(vol, layout),
                   mask=mask_relpath(vol, layout))
        rec["detail"] = "file name with a space, parentheses and '#': not a safe case id"
    elif kind == "path_in_name":
        name = f"../../outside_{pid}_a_1.nii.gz"
        fr.meta["VolumeName"] = fr.report["VolumeName"] = fr.label_row["VolumeName"] = name
        fr.cot["VolumeName"] = name
        rec.update(case=name.removesuffix(".nii.gz"), volume_name=name, path=None, mask=None, has_file=False)
        rec["detail"] = "CSV rows name a path outside the dataset; no file is written"
    return vol
