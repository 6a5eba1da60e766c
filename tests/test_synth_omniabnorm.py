"""Synthetic OmniAbnorm-CT batches and the ``demo-data`` command line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import typer
from PIL import Image
from typer.testing import CliRunner

from ctprep.schema import ABNORMALITY_LABELS, is_safe_case_id
from ctprep.synth import OMNI_FAULT_KINDS, write_omniabnorm
from ctprep.synth.cli import demo_data
from ctprep.synth.omniabnorm import COT_JSONL, RECORDS_JSON


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    out = tmp_path_factory.mktemp("omni") / "batch_02"
    write_omniabnorm(out, cases=6, seed=2, faults=True, layout="batches")
    return out


def _records(batch):
    return json.loads((batch / RECORDS_JSON).read_text())


def test_records_parse_and_files_exist(batch):
    faults = {f["case"]: f["kind"] for f in json.loads((batch / "faults.json").read_text())["faults"]}
    assert sorted(faults.values()) == sorted(OMNI_FAULT_KINDS)
    recs = _records(batch)
    assert len(recs) == 6 + len(OMNI_FAULT_KINDS)
    for r in recs:
        assert set(r) >= {"id", "image", "context", "mask", "abnormality", "windows", "modality"}
        assert r["id"].startswith("omni_s2_") and is_safe_case_id(r["id"])
        assert r["modality"] == "CT" and set(r["windows"]) == {"center", "width"}
        assert [p.rsplit("/", 1)[1] for p in r["context"]] == ["-2.jpg", "-1.jpg", "1.jpg", "2.jpg"]
        assert len(r["mask"]) == len(r["abnormality"]) >= 1
        for a in r["abnormality"]:
            assert set(a) >= {"id", "description", "rewritten_findings", "label", "category"}
            assert a["label"] in ABNORMALITY_LABELS and a["description"] and a["rewritten_findings"]
        if r["id"] in faults:
            continue
        key = np.asarray(Image.open(batch / r["image"]))
        assert key.dtype == np.uint8 and key.ndim == 2 and key.std() > 10
        for p in r["context"]:
            assert np.asarray(Image.open(batch / p)).shape == key.shape
        for p in r["mask"]:
            m = np.asarray(Image.open(batch / p))
            assert m.shape == key.shape and (m > 127).sum() > 4  # the abnormality is on the key slice


def test_cot_one_record_per_case(batch):
    cot = [json.loads(line) for line in (batch / COT_JSONL).read_text().splitlines()]
    assert [c["id"] for c in cot] == [r["id"] for r in _records(batch)]
    assert all(c["steps"] and c["findings"] and c["impression"] for c in cot)


def test_seeds_do_not_collide_and_are_deterministic(tmp_path, batch):
    write_omniabnorm(tmp_path / "b3", cases=3, seed=3, layout="batches")
    write_omniabnorm(tmp_path / "b2", cases=6, seed=2, faults=True, layout="batches")
    ids3 = {r["id"] for r in _records(tmp_path / "b3")}
    assert not ids3 & {r["id"] for r in _records(batch)}
    for p in batch.rglob("*"):
        if p.is_file():
            assert p.read_bytes() == (tmp_path / "b2" / p.relative_to(batch)).read_bytes(), p


def _app():
    app = typer.Typer()
    app.command()(demo_data)
    return app


@pytest.mark.parametrize(("opt", "bad", "choices"), [("--source", "dicom", "ctrate, omniabnorm"),
                                                     ("--grid", "huge", "demo, small, full")])  # fmt: skip
def test_cli_rejects_unknown_choices(tmp_path, opt, bad, choices):
    res = CliRunner().invoke(_app(), ["--out", str(tmp_path / "x"), opt, bad])
    assert res.exit_code != 0
    assert bad in res.output and all(c in res.output for c in choices.split(", "))  # rich may wrap the line


def test_cli_writes_ctrate(tmp_path):
    res = CliRunner().invoke(_app(), ["--out", str(tmp_path / "ct"), "--cases", "2", "--seed", "1"])
    assert res.exit_code == 0, res.output
    assert "wrote 2 volumes" in res.output
    assert (tmp_path / "ct" / "metadata" / "train_metadata.csv").exists()


# ----------------------------------------------------------------------------- release layout
@pytest.fixture(scope="module")
def release(tmp_path_factory):
    out = tmp_path_factory.mktemp("omni_rel") / "OmniAbnormCT_14K"
    write_omniabnorm(out, cases=6, seed=2, faults=True)  # "release" is the default layout
    return out


def test_release_layout_as_published(release):
    from ctprep.synth.omniabnorm import FOREIGN_ROOT

    notes = json.loads((release / "faults.json").read_text())
    assert sorted(f["kind"] for f in notes["faults"]) == sorted(OMNI_FAULT_KINDS)
    n = notes["notes"]
    assert n["coronal"] and n["normal"] and n["grouped"] and n["unsafe_id"] and n["missing_context"] and n["valid"]
    planes = {}
    for plane in ("axial", "coronal"):
        for split in ("train", "valid"):
            data = json.loads((release / plane / f"{plane}_{split}.json").read_text())
            assert isinstance(data, dict)
            planes.update({k: plane for k in data})
    assert set(n["coronal"]) == {k for k, p in planes.items() if p == "coronal"}
    merged = json.loads((release / "merged_train.json").read_text())
    grouped = json.loads((release / "axial" / "axial_train_grouped.json").read_text())
    assert set(grouped) == set(json.loads((release / "axial" / "axial_train.json").read_text()))
    assert set(merged) == {k for k in planes if k not in n["valid"]}
    missing = {m["datum"]: m["offset"] for m in n["missing_context"]}
    faulty = {f["case"] for f in notes["faults"]}
    for name, datum in merged.items():
        assert datum["context"] == [-2, -1, 0, 1, 2]
        if name not in faulty:
            for off in datum["context"]:
                assert (release / datum["image"] / f"{off}.jpg").exists() == (missing.get(name) != off)
        if name in n["normal"]:
            assert "abnormality" not in datum
            continue
        for a in datum["abnormality"]:
            assert set(a) == {"id", "group_id", "label", "description", "rewritten_findings", "category"}
            assert isinstance(a["rewritten_findings"], list) and a["rewritten_findings"]
            if name not in faulty:
                m = np.asarray(Image.open(release / datum["mask"] / f"{a['id']}.jpeg"))
                assert (m > 127).sum() > 4  # the abnormality is on the key slice
        if name in n["grouped"]:
            gids = [a["group_id"] for a in datum["abnormality"]]
            assert len(gids) > len(set(gids))
            assert sum(len(v) for v in grouped[name]["abnormality_group"].values()) == len(gids)
    some_plane_datum = json.loads((release / "coronal" / "coronal_train.json").read_text())
    assert all(d["image"].startswith(FOREIGN_ROOT + "/images/") for d in some_plane_datum.values())
    assert any(not is_safe_case_id(k) for k in merged)


def test_release_same_seed_same_bytes(release, tmp_path):
    write_omniabnorm(tmp_path / "again", cases=6, seed=2, faults=True, layout="release")
    files = sorted(p.relative_to(release) for p in release.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(tmp_path / "again") for p in (tmp_path / "again").rglob("*") if p.is_file())
    for rel in files:
        assert (release / rel).read_bytes() == (tmp_path / "again" / rel).read_bytes(), rel


def test_cli_writes_omniabnorm_release_by_default(tmp_path):
    res = CliRunner().invoke(_app(), ["--out", str(tmp_path / "om"), "--source", "omniabnorm", "--cases", "2"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "om" / "axial" / "axial_train.json").exists() and "wrote 2 records" in res.output
    with pytest.raises(ValueError, match="release, batches"):
        write_omniabnorm(tmp_path / "x", cases=1, layout="nested")
