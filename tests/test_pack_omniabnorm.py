"""OmniAbnorm source: batches, faults, slab geometry, text and labels."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ctprep.config import load_config
from ctprep.quarantine import QuarantineError
from ctprep.schema import ABNORMALITY_LABELS
from ctprep.sources import detect_source, get_source
from ctprep.sources.omniabnorm import abnormality_region, label_vector, parse_window, window_to_hu

import ctprep.synth.omniabnorm as synth

# The generator's fault kinds -> the quarantine kind we give them.
OMNI_FAULTS = {"missing_image": "unreadable", "truncated_jpeg": "unreadable",
               "mask_size_mismatch": "mask_grid_mismatch", "path_in_name": "unsafe_name"}


@pytest.fixture(scope="module")
def omni_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("omni")
    synth.write_omniabnorm(root / "batch_01", cases=3, seed=1, faults=True, layout="batches")
    synth.write_omniabnorm(root / "batch_02", cases=2, seed=2, layout="batches")
    return root


def test_scan_batches_and_faults(omni_root):
    cfg = load_config("demo")
    assert detect_source(omni_root) == "omniabnorm" and detect_source(omni_root / "batch_02") == "omniabnorm"
    src = get_source("omniabnorm", cfg)
    cases, quarantined = src.scan(omni_root)
    faults = json.loads((omni_root / "batch_01" / "faults.json").read_text())["faults"]
    kinds = {f["case"]: OMNI_FAULTS[f["kind"]] for f in faults}
    got = {q.case: q.kind for q in quarantined}
    for c in cases:
        try:
            src.load(c)
        except QuarantineError as e:
            got[c.case_id] = e.kind
    assert got == kinds
    good = [c for c in cases if c.case_id not in kinds]
    assert len(good) == 5 and {c.provenance["batch"] for c in good} == {"batch_01", "batch_02"}
    assert all(c.source == "omniabnorm" and c.split == "train" for c in good)


def test_load_slab_geometry_mask_text(omni_root):
    cfg = load_config("demo")
    src = get_source("omniabnorm", cfg)
    case = next(c for c in src.scan(omni_root / "batch_02")[0])
    loaded = src.load(case)
    assert loaded.header_style == "jpg" and loaded.label_space == "coarse"
    assert loaded.image.dtype == np.float32 and loaded.image.shape == (160, 160, cfg.omni.slab_depth)
    assert loaded.info["slab_offsets"] == [-2, -1, 0, 1]
    k = loaded.info["key_slice_index"]
    assert loaded.labels[:, :, k].any() and not np.delete(loaded.labels, k, axis=2).any()
    assert set(np.unique(loaded.labels).tolist()) <= {0, *loaded.info["abnormality_regions"]}
    # affine: column -> patient left, row -> posterior, slice -> superior
    assert loaded.affine[0, 0] < 0 and loaded.affine[1, 1] < 0 and loaded.affine[2, 2] > 0
    spacing, shape = src.target_grid(case, cfg)
    assert shape == (cfg.omni.slab_depth, *cfg.omni.shape_yx) and spacing[0] == cfg.omni.slice_spacing_mm
    record = next(r for r in json.loads((omni_root / "batch_02" / "records.json").read_text()) if r["id"] == case.case_id)
    assert case.text["findings"] == " ".join(a["rewritten_findings"] for a in record["abnormality"])
    assert case.text["impression"] == " ".join(a["description"] for a in record["abnormality"])
    assert case.text["steps"]  # the CoT record's steps
    for a in record["abnormality"]:
        assert case.labels[ABNORMALITY_LABELS.index(a["label"])] == 1
    # a slice-level label never claims absence
    assert set(case.labels) <= {-1, 1}


def test_window_and_region_mapping():
    center, width = parse_window({"center": 40, "width": 400})
    assert (center, width) == (40.0, 400.0) and parse_window([-600, 1500]) == (-600.0, 1500.0)
    assert parse_window("lung") == (-600.0, 1500.0) and parse_window([{"wl": 40, "ww": 400}]) == (40.0, 400.0)
    hu = window_to_hu(np.array([0, 255], np.uint8), center, width)
    np.testing.assert_allclose(hu, [-160, 240])
    names = ["lung", "heart", "esophagus", "aorta", "trachea", "spine"]
    assert abnormality_region({"category": "heart"}, names) == 2
    assert abnormality_region({"category": "pleura"}, names) == 1
    assert abnormality_region({"category": "vessel", "description": "Aortic wall calcification"}, names) == 4
    assert abnormality_region({"category": "mediastinum", "description": "Enlarged lymph nodes"}, names) == 0
    assert label_vector([{"label": "pulmonary nodule"}])[ABNORMALITY_LABELS.index("Lung nodule")] == 1
    assert label_vector([{"label": "Liver cyst"}]) == [-1] * 18
