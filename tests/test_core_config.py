"""Typed config loading, registries and stage keys."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from typer.testing import CliRunner

from ctprep.config import config_from_dict, list_presets, load_config, stable_hash
from ctprep.runner import current_keys
from ctprep.sources import available_sources, get_source
from ctprep.sources.base import CaseInput
from ctprep.stages import STAGE_ORDER, get_stage, list_stages
from ctprep.typed_config import ConfigError, from_dict


@pytest.mark.parametrize("name,shape", [("demo", (32, 128, 128)), ("demo64", (32, 64, 64)), ("ctclip", (240, 480, 480)), ("seed", (64, 512, 512))])
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


# --------------------------------------------------------------------------- the shared loader


@dataclass
class Inner:
    size_zyx: tuple[int, int, int] = (1, 1, 1)  # voxels
    scale: float = 1.0
    tag: str | None = None


@dataclass
class Outer:
    inner: Inner = field(default_factory=Inner)
    weights: dict[str, float] = field(default_factory=dict)
    on: bool = False


def test_typed_loader_converts_and_names_the_bad_key():
    cfg = from_dict(Outer, {"inner": {"size_zyx": [2, 3, 4], "scale": 2, "tag": None}, "weights": {"a": 1}, "on": True})
    assert cfg.inner == Inner((2, 3, 4), 2.0, None) and cfg.weights == {"a": 1.0} and isinstance(cfg.inner.scale, float)
    assert from_dict(Outer, {"inner": None}).inner == Inner()  # an empty YAML section = the defaults
    assert from_dict(Inner, {"scale": "1e-4"}).scale == 1e-4  # PyYAML reads 1e-4 as a string
    for bad, match in [({"inner": {"sise_zyx": [1, 1, 1]}}, r"unknown key.*'inner'.*valid choices: size_zyx, scale, tag"),
                       ({"inner": {"size_zyx": [1, 2]}}, r"inner.size_zyx: expected a list of 3"),
                       ({"inner": {"size_zyx": [1, 2.5, 3]}}, r"inner.size_zyx\[1\]: expected an integer"),
                       ({"on": "yes"}, "on: expected true/false"),
                       ({"inner": {"scale": "big"}}, "inner.scale: expected a number")]:
        with pytest.raises(ConfigError, match=match):
            from_dict(Outer, bad)


def test_pipeline_extends_merges_key_by_key_but_regions_whole(tmp_path):
    parent = tmp_path / "parent.yaml"
    parent.write_text("extends: demo\nregions:\n  patch_size_zyx: [8, 16, 16]\n  regions: {lung: [10], heart: [51]}\n")
    child = tmp_path / "child.yaml"
    child.write_text(f"extends: {parent}\nregions:\n  regions: {{aorta: [52]}}\n")
    cfg = load_config(child)
    assert cfg.regions.patch_size_zyx == (8, 16, 16) and cfg.regions.names == ["aorta"]
    loop = tmp_path / "loop.yaml"
    loop.write_text(f"extends: {loop}\n")
    with pytest.raises(ValueError, match="cycle"):
        load_config(loop)
    with pytest.raises(ValueError, match="resample.shape_zyx: expected a list of 3"):
        config_from_dict({"resample": {"shape_zyx": [32, 128]}})


def test_trainer_config_extends_and_overrides(tmp_path):
    from ctprep_train.config import ConfigError
    from ctprep_train.config import load_config as load_train_config

    (tmp_path / "base.yaml").write_text("optim: {lr: 0.001, warmup_steps: 5}\ndata: {sources: {ctrate: 1.0}}\n")
    (tmp_path / "run.yaml").write_text("extends: base.yaml\noptim: {warmup_steps: 7}\n")
    cfg = load_train_config(tmp_path / "run.yaml", ["optim.lr=1e-4", "data.sources.omniabnorm=0.5"])
    assert cfg.optim.lr == 1e-4 and cfg.optim.warmup_steps == 7
    assert cfg.data.sources == {"ctrate": 1.0, "omniabnorm": 0.5}
    with pytest.raises(ConfigError, match=r"unknown key.*'optim'.*valid choices: lr"):
        load_train_config(tmp_path / "run.yaml", ["optim.lrr=1"])
    with pytest.raises(ConfigError, match="key.sub=value"):
        load_train_config(tmp_path / "run.yaml", ["optim.lr"])


def test_model_config_unknown_key_and_type():
    from ctprep_train.model.factory import get_model_config

    with pytest.raises(ValueError, match=r"unknown key.*'vision.attention'.*valid choices: slice_bias"):
        get_model_config("tiny", **{"vision.attention.slise_bias": False})
    with pytest.raises(ValueError, match="vision.depth: expected an integer"):
        get_model_config("tiny", **{"vision.depth": 2.5})
    assert get_model_config("tiny", **{"vision.depth": 2, "vision.out_indices": [0, 1]}).vision.out_indices == (0, 1)


def test_registries_are_fixed_lists():
    from ctprep.sources import SOURCES, CtRateSource, OmniAbnormSource
    from ctprep.stages import STAGES

    assert SOURCES == {"ctrate": CtRateSource, "omniabnorm": OmniAbnormSource}
    assert tuple(STAGES) == STAGE_ORDER and get_stage("pack") is STAGES["pack"]
    assert isinstance(get_source("ctrate"), CtRateSource)
    with pytest.raises(ValueError, match="available: ctrate, omniabnorm"):
        get_source("dicom")
    with pytest.raises(ValueError, match="available: scan, resample, regions, text, pack"):
        get_stage("segment")
