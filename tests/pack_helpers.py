"""Fixtures for the pack tests: work-dir outputs of resample/regions/text made without the runner."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from ctprep.config import load_config, stable_hash
from ctprep.sources.base import CaseInput
from ctprep.stages.base import AggregateCase, AggregateTask, CaseTask, StageOutput
from ctprep.stages.regions import run_regions
from ctprep.stages.text import run_text, text_config_slice

SHAPE = (8, 32, 32)


def small_config(**pack):
    cfg = load_config("demo")
    cfg.resample.shape_zyx = SHAPE
    cfg.text.max_len_report, cfg.text.max_len_step, cfg.text.max_len_region = 32, 16, 16
    for k, v in pack.items():
        setattr(cfg.pack, k, v)
    return cfg


def make_case(case_id: str, seed: int, source: str = "ctrate", split: str = "train") -> CaseInput:
    text = {
        "findings": f"Case {seed}: a {seed % 9 + 2} mm nodule in the right upper lobe. The heart is normal in size.",
        "impression": "Not given." if seed % 2 else "Pulmonary nodule.",
        "report": "",
        "steps": [{"step": 2, "text": f"Measure it: {seed % 9 + 2} mm."}, {"step": 1, "text": "Look at the lungs."}],
    }
    labels = [-1] * 18
    labels[9] = 1
    return CaseInput(case_id=case_id, source=source, split=split, text=text, labels=labels)


def write_resampled(work: Path, case: CaseInput, seed: int, num_regions: int = 6) -> str:
    """A zarr group like the resample stage writes (image int16, mask uint8, attrs)."""
    import zarr

    rng = np.random.default_rng(seed)
    image = rng.integers(-1024, 400, size=SHAPE).astype(np.int16)
    mask = rng.integers(0, num_regions + 1, size=SHAPE).astype(np.uint8)
    path = work / "zarr" / f"{case.case_id}.zarr"
    group = zarr.open_group(str(path), mode="w")
    group.create_array("image", data=image)
    group.create_array("mask", data=mask)
    affine = np.eye(4)
    affine[:3, :3] = np.diag([10.0, 3.0, 3.0])[::-1][:, ::-1]  # (z,y,x) voxel -> RAS: x->R, y->A, z->S
    group.attrs.update({"spacing": [10.0, 3.0, 3.0], "affine": affine.tolist(), "header_style": "v2",
                        "source": case.source, "split": case.split})
    return str(path)


def run_case_stages(work: Path, case: CaseInput, seed: int, cfg) -> dict[str, StageOutput]:
    """resample (fake) -> regions -> text for one case; keys depend on the seed and the text config."""
    ups = {"resample": StageOutput(write_resampled(work, case, seed), key=f"r{seed}")}
    r_task = CaseTask("regions", case, f"g{seed}", str(work / "regions" / f"{case.case_id}.npy"), str(work), cfg, ups)
    run_regions(r_task)
    ups["regions"] = StageOutput(r_task.output_path, key=r_task.key)
    t_key = f"t{seed}-{stable_hash([text_config_slice(cfg), case.text])}"
    t_task = CaseTask("text", case, t_key, str(work / "text" / case.case_id), str(work), cfg, {})
    run_text(t_task)
    ups["text"] = StageOutput(t_task.output_path, key=t_key)
    return ups


def with_cot_edit(case: CaseInput, note: str = "edited") -> CaseInput:
    """The case with its first CoT step rewritten (a CoT delivery that replaces step 1)."""
    steps = [dict(s) for s in case.text["steps"]]
    for s in steps:
        if s["step"] == 1:
            s["text"] = f"{s['text']} ({note})"
    return dataclasses.replace(case, text={**case.text, "steps": steps})


def aggregate_task(work: Path, out: Path, cfg, entries, manifest: dict | None = None) -> AggregateTask:
    """entries: list of (CaseInput, upstream outputs); pack key = hash of upstream keys + labels.

    ``manifest`` (case id -> pack key recorded so far) plays the runner's manifest: it sets
    ``changed`` and is updated by :func:`record`.
    """
    manifest = manifest if manifest is not None else {}
    cases = []
    for case, ups in sorted(entries, key=lambda e: (e[0].source, e[0].split, e[0].case_id)):
        key = stable_hash({u: o.key for u, o in ups.items()} | {"labels": case.labels, "pack": str(cfg.pack)})
        cases.append(AggregateCase(case, key, ups, changed=manifest.get(case.case_id) != key))
    return AggregateTask("pack", cases, work, out, cfg)


def record(manifest: dict, results) -> dict:
    """Apply pack results to the fake manifest (what the runner does)."""
    for r in results:
        if r.status == "done":
            manifest[r.case_id] = r.key
    return manifest
