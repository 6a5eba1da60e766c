"""Ablation configs: each loads, builds a valid model config, and differs from the reference in one switch."""

from __future__ import annotations

import json
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
    from ctprep_train.config import load_config
    from ctprep_train.model import get_model_config

    ablate = _ablate()
    cfg = load_config(REPO / "configs" / "train" / f"ablation_{name}.yaml")
    get_model_config(cfg.model.name, **cfg.model.overrides)  # validates option combinations
    diff = ablate.config_diff(name)
    assert EXPECTED[name] in diff
    if name == "full":
        assert diff == ""
    else:
        assert diff.count("=") <= 2, diff  # no_anatomy also turns region attention off (it depends on it)


def _fake_eval(i2t_r5: float, t2i_r5: float, base_r5: float) -> dict:
    return {
        "retrieval": {
            "n_images": 200,
            "image_to_text": {"R@1": i2t_r5 / 4, "R@5": i2t_r5, "mean_rank": 40.0},
            "text_to_image": {"R@1": t2i_r5 / 4, "R@5": t2i_r5},
            "random_baseline": {"R@5": base_r5},
        },
        "zero_shot": {"macro_auc": 0.6},
        "cot_alignment": {"overall": {"mean_ratio": 1.5}},
    }


def test_sweep_reuses_finished_runs_and_tables_ratios(tmp_path):
    """A finished run (eval.json present) is not retrained; its recorded training time and the R@5 /
    random ratios appear in the table and in ablation.json."""
    ablate = _ablate()
    for name, (i2t, t2i, secs) in {"full": (0.08, 0.09, 1200.0), "no_step_loss": (0.02, 0.05, None)}.items():
        ev = tmp_path / name / "eval"
        ev.mkdir(parents=True)
        (ev / "eval.json").write_text(json.dumps(_fake_eval(i2t, t2i, 0.02)))
        if secs is not None:
            (tmp_path / name / "train_seconds.json").write_text(json.dumps({"train_s": secs}))
    rows = ablate.main(["--shards", str(tmp_path / "no-shards-needed"), "--out", str(tmp_path),
                        "--only", "full,no_step_loss"])
    assert [r["name"] for r in rows] == ["full", "no_step_loss"]
    md = (tmp_path / "ablation.md").read_text()
    full_line = next(line for line in md.splitlines() if line.startswith("| full |"))
    cells = [c.strip() for c in full_line.strip("|").split("|")]
    assert cells[8:10] == ["4.0x", "4.5x"]  # 0.08 / 0.02, 0.09 / 0.02
    assert cells[-1] == "1200"
    other = next(line for line in md.splitlines() if line.startswith("| no_step_loss |"))
    assert other.split("|")[-2].strip() == "n/a"  # no recorded time
    assert "loss.weights.step=0" in other
    saved = json.loads((tmp_path / "ablation.json").read_text())
    assert [s["train_s"] for s in saved] == [1200.0, None]
