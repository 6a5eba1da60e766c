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
    "no_step_grounding": "loss.weights.step_grounding=0.0, model.overrides.vision.evidence_query_std=0.02",
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


def _fake_eval(i2t_r5: float, t2i_r5: float, base_r5: float, cot: float = 1.5) -> dict:
    return {
        "retrieval": {
            "n_images": 200,
            "image_to_text": {"R@1": i2t_r5 / 4, "R@5": i2t_r5, "mean_rank": 40.0},
            "text_to_image": {"R@1": t2i_r5 / 4, "R@5": t2i_r5},
            "random_baseline": {"R@5": base_r5},
        },
        "zero_shot": {"macro_auc": 0.6},
        "cot_alignment": {"overall": {"mean_ratio": cot, "steps": 10}},
    }


class FakeRunner:
    """Stands in for ``ablate.run``: training writes nothing but a marker, evaluation writes an
    eval.json whose R@5 depends on the variant and seed; ``kill_at`` raises on that training call."""

    def __init__(self, kill_at: int | None = None):
        self.trained: list[tuple[str, int]] = []
        self.kill_at = kill_at

    def __call__(self, cmd, log):
        out = Path(cmd[cmd.index("--output") + 1]) if "--output" in cmd else Path(cmd[cmd.index("--out") + 1])
        log.write_text("fake\n")
        if "trainer/train.py" in cmd:
            cell = (out.parent.name, int(out.name.removeprefix("seed_")))
            if self.kill_at is not None and len(self.trained) == self.kill_at:
                raise KeyboardInterrupt  # the bench killed mid-training
            self.trained.append(cell)
            return 100.0 + cell[1]
        variant, seed = out.parent.parent.name, int(out.parent.name.removeprefix("seed_"))
        i2t = {"full": 0.08, "no_step_loss": 0.04}[variant] + 0.01 * seed
        out.mkdir(parents=True, exist_ok=True)
        (out / "eval.json").write_text(json.dumps(_fake_eval(i2t, 0.06, 0.02, cot=1.0 + seed)))
        return 1.0


def test_a_killed_sweep_resumes_cell_by_cell_and_tables_mean_and_sd(tmp_path, monkeypatch):
    """2 variants x 2 seeds: a kill during the third training leaves two cells recorded; the rerun
    trains only the other two; a cell whose eval.json exists but whose line is missing is recorded
    without retraining; the table gives mean ± sd over the seeds, and the plot is written."""
    ablate = _ablate()
    args = ["--shards", str(tmp_path / "shards"), "--out", str(tmp_path / "out"), "--steps", "3",
            "--only", "full,no_step_loss", "--seeds", "0,1"]
    first = FakeRunner(kill_at=2)
    monkeypatch.setattr(ablate, "run", first)
    with pytest.raises(KeyboardInterrupt):
        ablate.main(args)
    assert first.trained == [("full", 0), ("full", 1)]
    lines = (tmp_path / "out" / "results.jsonl").read_text().splitlines()
    assert [(json.loads(x)["variant"], json.loads(x)["seed"]) for x in lines] == first.trained
    # the cell (no_step_loss, 1) finished its evaluation in an earlier invocation that died before the append
    done = tmp_path / "out" / "no_step_loss" / "seed_1"
    (done / "eval").mkdir(parents=True)
    (done / "eval" / "eval.json").write_text(json.dumps(_fake_eval(0.05, 0.06, 0.02, cot=2.0)))
    (done / "cell.json").write_text(json.dumps({"steps": 3, "shards": str(tmp_path / "shards"), "train_s": 7.0}))
    second = FakeRunner()
    monkeypatch.setattr(ablate, "run", second)
    rows = ablate.main(args)
    assert second.trained == [("no_step_loss", 0)]
    assert len(rows) == 4 and len((tmp_path / "out" / "results.jsonl").read_text().splitlines()) == 4
    third = FakeRunner()
    monkeypatch.setattr(ablate, "run", third)
    ablate.main(args)
    assert third.trained == []  # everything recorded: nothing reruns
    ablate.main([*args[:5], "4", *args[6:]])  # another budget: every cell trains again, in its own table
    assert len(third.trained) == 4
    ablate.main(args)  # the 3-step table is still there (its lines are kept): nothing trains
    assert len(third.trained) == 4
    md = (tmp_path / "out" / "ablation.md").read_text()
    full = next(line for line in md.splitlines() if line.startswith("| full |"))
    cells = [c.strip() for c in full.strip("|").split("|")]
    # R@5 i->t x random: seeds 0.08 / 0.02 = 4, 0.09 / 0.02 = 4.5 -> 4.25 ± 0.35; t->i 3 ± 0; CoT 1, 2
    assert cells[2] == "0,1" and cells[5] == "4.25 ± 0.35" and cells[6] == "3.00 ± 0.00"
    assert cells[8] == "1.50 ± 0.71"
    other = next(line for line in md.splitlines() if line.startswith("| no_step_loss |"))
    assert "loss.weights.step=0" in other
    assert (tmp_path / "out" / "ablation.png").stat().st_size > 1000
    saved = json.loads((tmp_path / "out" / "ablation.json").read_text())
    assert {(c["variant"], c["seed"]) for c in saved["cells"]} == {("full", 0), ("full", 1), ("no_step_loss", 0),
                                                                  ("no_step_loss", 1)}


def test_cell_config_applies_the_step_head_settings_to_every_variant_that_does_not_switch_them():
    ablate = _ablate()
    yaml_args = ablate.argparse.Namespace(step_grounding=None, evidence_query_std=None, data_cases=0)
    full = ablate.cell_config("full", yaml_args)  # demo64.yaml's own step-head settings
    assert full["loss"]["weights"]["step_grounding"] == 0.25
    assert full["model"]["overrides"]["vision.evidence_query_std"] == 1.0
    args = ablate.argparse.Namespace(step_grounding=0.3, evidence_query_std=0.5, data_cases=0)
    full = ablate.cell_config("full", args)
    assert full["loss"]["weights"]["step_grounding"] == 0.3
    assert full["model"]["overrides"]["vision.evidence_query_std"] == 0.5
    assert ablate.cell_config("no_slice_bias", args)["loss"]["weights"]["step_grounding"] == 0.3
    off = ablate.cell_config("no_step_loss", args)
    assert off["loss"]["weights"]["step"] == 0 and off["loss"]["weights"]["step_grounding"] == 0.0
    for a in (args, yaml_args):  # the variant that switches the grounding keeps its own values
        ungrounded = ablate.cell_config("no_step_grounding", a)
        assert ungrounded["loss"]["weights"]["step_grounding"] == 0.0 and ungrounded["loss"]["weights"]["step"] == 0.25
        assert ungrounded["model"]["overrides"]["vision.evidence_query_std"] == 0.02
    built = ablate.cell_config("full", ablate.argparse.Namespace(step_grounding=0.3, evidence_query_std=1.0,
                                                                 data_cases=10))
    assert built["data"]["sources"] == {"ctrate": 1.0}


def test_one_real_tiny_cell_trains_evaluates_and_is_skipped_on_rerun(tmp_path):
    """The real subprocesses (trainer/train.py, ctprep_train.eval) at 2 steps on test shards; the
    rerun of the same command finds the cell in results.jsonl and starts nothing."""
    from ctprep_train.testing import write_test_shards

    ablate = _ablate()
    write_test_shards(tmp_path / "shards", {"train": [6, 5], "valid": [5]})
    args = ["--shards", str(tmp_path / "shards"), "--out", str(tmp_path / "out"), "--steps", "2", "--seeds", "0",
            "--only", "full", "--max-cases", "4", "--override", "data.tokenizer=index",
            "--override", "data.num_workers=0", "--override", "data.batch_size=4",
            "--override", "train.report_to=[]", "--override", "data.sources={ctrate: 1.0}"]
    (row,) = ablate.main(args)
    assert "Every run also with: data.tokenizer=index data.num_workers=0" in (tmp_path / "out" / "ablation.md").read_text()
    assert row["pool"] == 4 and 0.0 <= row["auc"] <= 1.0 and row["cot_steps"] >= 0
    log = tmp_path / "out" / "full" / "seed_0" / "train.log"
    metrics = (tmp_path / "out" / "full" / "seed_0" / "metrics.jsonl").read_text()
    assert '"loss_step_grounding"' in metrics  # the bench's step-head settings reached the trainer
    stamp = log.stat().st_mtime_ns
    (again,) = ablate.main(args)
    assert log.stat().st_mtime_ns == stamp and again == row


def test_cot_grounding_bench_runs_every_setting_end_to_end(tmp_path):
    """bench/cot_grounding.py at 2 steps on test shards: every setting trains and is scored before
    and after with the evaluation's metric; the grounding term is in the loss only where it is on."""
    from ctprep_train.testing import write_test_shards

    bench = load_bench("cot_grounding")
    write_test_shards(tmp_path / "shards", {"train": [4], "valid": [4]}, max_steps=3)
    rows = bench.main(["--shards", str(tmp_path / "shards"), "--steps", "2", "--train-cases", "4",
                       "--valid-cases", "4", "--batch-size", "4", "--width", "32", "--out", str(tmp_path / "rows.json")])
    assert [(r["evidence_query_std"], r["step_grounding"]) for r in rows] == list(bench.SETTINGS)
    for r in rows:
        assert ("step_grounding" in r["last_terms"]) == bool(r["step_grounding"])
        assert r["before"]["steps"] == r["after"]["steps"] > 0
    assert json.loads((tmp_path / "rows.json").read_text()) == rows


def test_demo_ablations_and_sweep_share_the_demo64_training_settings():
    """make demo, the ablations and the demo sweep train with configs/train/demo64.yaml: the
    reference ablation differs from it only in where and how often it writes, and a sweep trial
    only in threads, checkpoints, steps, validation and the sampled values."""
    from ctprep_train.config import load_config
    from ctprep_train.sweep_spec import load_sweep, trial_overrides

    def flat(cfg) -> dict:
        tree = cfg.to_dict()
        return {f"{s}.{k}": v for s, sec in tree.items() for k, v in sec.items()}

    demo = flat(load_config(REPO / "configs" / "train" / "demo64.yaml"))
    full = flat(load_config(REPO / "configs" / "train" / "ablation_full.yaml"))
    assert {k for k in demo if demo[k] != full[k]} == {"train.output", "train.val_every", "train.ckpt_every",
                                                        "train.progress_bar"}
    spec = load_sweep(REPO / "configs" / "sweep" / "demo_lr_loss.yaml")
    assert Path(spec.base).resolve() == (REPO / "configs" / "train" / "demo64.yaml").resolve()
    params = {"optim.lr": 2e-3, "loss.weights.labels": 0.5, "loss.weights.region": 0.1}
    trial = flat(load_config(spec.base, trial_overrides(spec, params)))
    changed = {k for k in demo if demo[k] != trial[k]}
    assert changed == {"train.cpu_threads", "train.ckpt_every", "train.steps", "train.val_every",
                       "train.progress_bar", "data.shards", "optim.lr", "loss.weights"}
    assert trial["loss.weights"] == {**demo["loss.weights"], "labels": 0.5, "region": 0.1}
    script = (REPO / "scripts" / "demo.sh").read_text()
    assert "--config configs/train/demo64.yaml" in script and "model.overrides" not in script
