"""Typed config loading, registries and stage keys."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from ctprep.config import config_from_dict, list_presets, load_config, stable_hash
from ctprep.runner import current_keys
from ctprep.sources import available_sources, get_source
from ctprep.sources.base import CaseInput
from ctprep.stages import STAGE_ORDER, get_stage, list_stages


@pytest.mark.parametrize("name,shape", [("demo", (32, 128, 128)), ("ctclip", (240, 480, 480)), ("seed", (64, 512, 512))])
def test_presets(name, shape):
    cfg = load_config(name)
    assert cfg.resample.shape_zyx == shape
    assert cfg.regions.names[0] == "lung" and cfg.regions.regions["lung"] == [10, 11, 12, 13, 14]
    assert all(s % p == 0 for s, p in zip(shape, cfg.regions.patch_size_zyx))  # whole patch grid
    assert name in list_presets()


def test_seed_preset_has_16384_patches():
    cfg = load_config("seed")
    n = 1
    for s, p in zip(cfg.resample.shape_zyx, cfg.regions.patch_size_zyx):
        n *= s // p
    assert n == 16_384


def test_unknown_keys_fail_loudly(tmp_path):
    with pytest.raises(ValueError, match="unknown key"):
        config_from_dict({"resample": {"spacing": [1, 1, 1]}})
    with pytest.raises(ValueError, match="unknown config section"):
        config_from_dict({"resampel": {}})
    with pytest.raises(ValueError, match="unknown pipeline preset"):
        load_config("nope")
    with pytest.raises(ValueError, match="unknown source"):
        get_source("dicom")
    with pytest.raises(ValueError, match="unknown stage"):
        get_stage("segment")


def test_extends_and_inline_regions(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("extends: ctclip\nresample:\n  hu_clip: [-1000, 1000]\nregions:\n  regions: {lung: [10, 11], heart: [51]}\n")
    cfg = load_config(path)
    assert cfg.resample.shape_zyx == (240, 480, 480) and cfg.resample.hu_clip == (-1000, 1000)
    assert cfg.regions.names == ["lung", "heart"]
    lut = cfg.regions.lookup_table()
    assert lut[10] == lut[11] == 1 and lut[51] == 2 and lut[52] == 0


def test_registries_in_pipeline_order():
    assert [s.name for s in list_stages()] == list(STAGE_ORDER)
    assert {"ctrate", "omniabnorm"} <= set(available_sources())


def test_stage_keys_follow_their_config_slice():
    case = CaseInput("train_1_a_1", "ctrate", "train", {"image": "/x.nii.gz"}, {"ZSpacing": "1"},
                     {"findings": "a", "impression": "b", "report": "a b", "steps": []}, [0] * 18)
    fh = {"image": "abc"}
    base = load_config("demo")
    k0 = current_keys(case, fh, base, list_stages())
    cfg = load_config("demo")
    cfg.resample.hu_clip = (-1000, 1000)
    k1 = current_keys(case, fh, cfg, list_stages())
    assert k1["resample"].key != k0["resample"].key and k1["text"].key == k0["text"].key
    assert k1["pack"].key != k0["pack"].key  # downstream of resample
    cfg = load_config("demo")
    cfg.text.max_steps = 3
    k2 = current_keys(case, fh, cfg, list_stages())
    assert k2["resample"].key == k0["resample"].key and k2["regions"].key == k0["regions"].key
    assert k2["text"].key != k0["text"].key and k2["pack"].key != k0["pack"].key
    # a changed report only touches text (+ pack); a changed file only resample and what follows
    case2 = CaseInput(**{**case.to_json(), "text": {**case.text, "findings": "c"}})
    k3 = current_keys(case2, fh, base, list_stages())
    assert k3["resample"].key == k0["resample"].key and k3["text"].key != k0["text"].key
    k4 = current_keys(case, {"image": "def"}, base, list_stages())
    assert k4["resample"].key != k0["resample"].key and k4["text"].key == k0["text"].key
    assert stable_hash({"a": 1}) == stable_hash({"a": 1})


def test_cli_status_without_manifest(tmp_path):
    from ctprep.cli import app

    res = CliRunner().invoke(app, ["status", "--out", str(tmp_path)])
    assert res.exit_code == 1
    assert "no manifest" in res.output
