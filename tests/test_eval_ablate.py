"""Ablation configs: each loads, builds a valid model config, and differs from the reference in one switch."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.bench_helpers import load_bench

REPO = Path(__file__).resolve().parents[1]


def _ablate():
    return load_bench("ablate")


EXPECTED = {
    "full": "",
    "no_slice_bias": "vision.attention.slice_bias=False",
    "no_region_attention": "vision.attention.region_attention=False",
    "no_anatomy": "vision.anatomy.enabled=False",
    "no_step_loss": "loss.weights.step=0",
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_ablation_config_switches_one_thing(name):
    from trainer.config import load_config
    from trainer.model import get_model_config

    ablate = _ablate()
    cfg = load_config(REPO / "configs" / "train" / f"ablation_{name}.yaml")
    get_model_config(cfg.model.name, **cfg.model.overrides)  # validates option combinations
    diff = ablate.config_diff(name)
    assert EXPECTED[name] in diff
    if name == "full":
        assert diff == ""
    else:
        assert diff.count("=") <= 2, diff  # no_anatomy also turns region attention off (it depends on it)
