"""Sweeps (ctprep_train.sweep): the YAML is checked before any trial, trials are real training
subprocesses, pruning stops a trial's process, the report is complete, and a sweep killed midway
resumes without redoing finished trials.

Trials train the TinyCLIP stand-in (tests/trainer_helpers) on shards written by
ctprep_train.testing, a few steps each; one test evaluates the real tiny CTCLIP.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

import optuna

from ctprep.typed_config import ConfigError  # noqa: E402
from ctprep_train.checkpoint import complete_checkpoints  # noqa: E402
from ctprep_train.config import load_config  # noqa: E402
from ctprep_train.sweep import (  # noqa: E402
    build_sampler, eval_value, grid_values, load_sweep, main, ParamSpec, pruning_metric, pruning_sign, row_value,
    open_study, reseeds, resume_seed, worker_seed,
)
from ctprep_train.testing import write_test_shards  # noqa: E402
from tests.trainer_helpers import REPO, STAND_IN  # noqa: E402

BASE = str(REPO / "configs" / "train" / "demo.yaml")
# trials import tests.trainer_helpers; PYTHONPATH entries already set (a checkout under test) stay first
ENV = {"PYTHONPATH": os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), str(REPO)])), "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    write_test_shards(root, {"train": [6, 5], "valid": [5]})
    return root


def write_sweep(path: Path, **fields) -> Path:
    spec = {"base": BASE, "overrides": [*STAND_IN, "data.batch_size=4", "train.ckpt_every=0"],
            "env": ENV, **fields}
    path.write_text(yaml.safe_dump(spec))
    return path


def finished(study_db: Path, name: str):
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{study_db}")
    return sorted(study.get_trials(), key=lambda t: t.number)


# --------------------------------------------------------------------------- YAML and metrics (no trials)


def test_a_bad_sweep_yaml_fails_before_any_trial_naming_the_file_and_the_key(tmp_path):
    search = {"optim.lr": {"low": 1e-4, "high": 1e-2, "log": True}}
    bad = {
        "sampler": {"name": "annealing"},  # unknown sampler
        "objective": {"metric": "loss"},  # not eval/, valid/ or train/
        "search": {"optim.learning_rate": {"low": 1e-4, "high": 1e-2}},  # not a trainer key
    }
    for key, value in bad.items():
        path = write_sweep(tmp_path / f"{key}.yaml", **{"search": search, "budget": {"n_trials": 2}, key: value})
        with pytest.raises(ConfigError, match=f"{path.name}.*" + {"sampler": "annealing.*'grid', 'random', 'tpe'",
                                                                  "objective": "eval/<...>",
                                                                  "search": "learning_rate"}[key]):
            load_sweep(path)
    grid = write_sweep(tmp_path / "grid.yaml", search=search, sampler={"name": "grid"})
    with pytest.raises(ConfigError, match="grid sweep needs 'choices' or a range with 'step'"):
        load_sweep(grid)
    with pytest.raises(ConfigError, match="budget.n_trials must be >= 1"):
        load_sweep(write_sweep(tmp_path / "nobudget.yaml", search=search))
    with pytest.raises(ConfigError, match="low > 0"):
        load_sweep(write_sweep(tmp_path / "log.yaml", search={"optim.lr": {"low": 0, "high": 1, "log": True}},
                               budget={"n_trials": 1}))
    with pytest.raises(SystemExit, match="no such sweep file"):
        main([str(tmp_path / "missing.yaml")])


def test_grid_values_and_the_default_pruning_metric(tmp_path):
    assert grid_values("k", ParamSpec(type="int", low=0, high=20, step=5)) == [0, 5, 10, 15, 20]
    assert grid_values("k", ParamSpec(low=0.0, high=0.5, step=0.25)) == [0.0, 0.25, 0.5]
    assert grid_values("k", ParamSpec(type="categorical", choices=[8, 16])) == [8, 16]
    search = {"optim.lr": {"choices": [1e-3], "type": "categorical"}}
    spec = load_sweep(write_sweep(tmp_path / "a.yaml", search=search, budget={"n_trials": 1}))
    assert spec.objective.metric == "eval/mean_R@5" and pruning_metric(spec) == "valid/mean_R@5"
    assert pruning_sign(spec) == 1.0
    spec = load_sweep(write_sweep(tmp_path / "b.yaml", search=search, budget={"n_trials": 1},
                                  objective={"metric": "eval/zero_shot/macro_auc"}))
    assert pruning_metric(spec) == "valid/loss" and pruning_sign(spec) == -1.0  # lower loss = better AUC
    assert spec.storage == f"sqlite:///{Path(spec.output) / 'study.db'}" and spec.study == "b"


def test_metric_readers():
    row = {"loss": 0.5, "image_to_text/R@5": 0.2, "text_to_image/R@5": 0.4}
    assert row_value(row, "mean_R@5") == pytest.approx(0.3)
    assert row_value(row, "loss") == 0.5 and row_value(row, "mean_R@1") is None
    result = {"retrieval": {"image_to_text": {"R@5": 0.1}, "text_to_image": {"R@5": 0.3}}, "zero_shot": {"macro_auc": None}}
    assert eval_value(result, "mean_R@5") == pytest.approx(0.2)
    assert eval_value(result, "retrieval/text_to_image/R@5") == 0.3
    assert eval_value(result, "zero_shot/macro_auc") is None and eval_value(result, "nope/x") is None


def test_the_report_of_tied_trials_draws_no_importance_and_says_why(tmp_path):
    from optuna.distributions import FloatDistribution

    from ctprep_train.sweep_report import write_report

    spec = load_sweep(write_sweep(tmp_path / "tied.yaml", output=str(tmp_path / "out"), budget={"n_trials": 3},
                                  search={"optim.lr": {"low": 1e-4, "high": 1e-2, "log": True}}))
    study = optuna.create_study(direction="maximize")
    for lr in (1e-4, 1e-3, 1e-2):  # three complete trials, one objective value
        study.add_trial(optuna.trial.create_trial(params={"optim.lr": lr}, value=0.5,
                                                  distributions={"optim.lr": FloatDistribution(1e-4, 1e-2, log=True)}))
    report = write_report(study, spec)
    assert not (report / "importance.png").exists() and (report / "history.png").is_file()
    assert "parameter importance" in (report / "report.md").read_text()
    assert "different objective values" in (report / "report.md").read_text()
    assert load_config(report / "best_config.yaml").optim.lr == 1e-4  # the first of the tied best


# --------------------------------------------------------------------------- sweeps that train


@pytest.mark.multiprocess
def test_a_grid_sweep_trains_every_point_prunes_by_validation_and_writes_the_report(shards, tmp_path):
    # Pruning is made deterministic: the pruned metric is the validation pool size, which the
    # searched data.valid_max_samples sets (3 or all 5); a threshold pruner stops pools below 4.
    out = tmp_path / "sweep"
    sweep = write_sweep(
        tmp_path / "grid.yaml", shards=str(shards), output=str(out),
        search={"optim.lr": {"type": "categorical", "choices": [0.0003, 0.003]},
                "data.valid_max_samples": {"type": "categorical", "choices": [3, 0]}},
        sampler={"name": "grid", "seed": 0}, objective={"metric": "valid/loss", "direction": "minimize"},
        pruner={"name": "threshold", "metric": "valid/pool_size", "every": 50, "options": {"lower": 4}},
        budget={"steps": 200})
    main([str(sweep)])
    trials = finished(out / "study.db", "grid")
    assert len(trials) == 4  # the whole grid, once each
    assert {(t.params["optim.lr"], t.params["data.valid_max_samples"]) for t in trials} == {
        (0.0003, 3), (0.0003, 0), (0.003, 3), (0.003, 0)}
    for t in trials:
        rows = [json.loads(line) for line in (Path(t.user_attrs["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
        train = [r for r in rows if r["kind"] == "train"]
        if t.params["data.valid_max_samples"] == 3:
            assert t.state.name == "PRUNED" and t.intermediate_values == {50: 3.0}
            # the process was stopped after the first validation, before the last step and the export
            assert max(r["step"] for r in train) < 200
            assert not (Path(t.user_attrs["run_dir"]) / "encoder").exists()
        else:
            assert t.state.name == "COMPLETE" and t.intermediate_values == {50: 5.0, 100: 5.0, 150: 5.0, 200: 5.0}
            assert [r["step"] for r in train] == list(range(1, 201))
            assert t.value == pytest.approx([r for r in rows if r["kind"] == "valid"][-1]["loss"])
            run = Path(t.user_attrs["run_dir"])
            config = json.loads((run / "config.json").read_text())  # the override reached train.py
            assert config["optim"]["lr"] == t.params["optim.lr"] and config["train"]["steps"] == 200

    report = out / "report"
    with (report / "results.csv").open() as f:
        table = list(csv.DictReader(f))
    assert [r["state"] for r in table] == [t.state.name.lower() for t in trials]
    # a pruned trial's value in Optuna is its last pool size (the pruning metric): not shown as the objective
    assert [r["valid/loss"] == "" for r in table] == [t.state.name == "PRUNED" for t in trials]
    assert {"optim.lr", "data.valid_max_samples", "valid/loss", "pruned_at_step", "run_dir"} <= set(table[0])
    import sklearn  # noqa: F401 (a [dev] dependency)
    best = min((t for t in trials if t.state.name == "COMPLETE"), key=lambda t: t.value)
    best_yaml = report / "best_config.yaml"
    cfg = load_config(best_yaml)
    assert cfg.optim.lr == best.params["optim.lr"] and cfg.data.valid_max_samples == 0
    assert cfg.model.name == "stand-in" and cfg.train.steps == 200 and cfg.data.shards == str(shards)
    for picture in ("history.png", "importance.png", "params.png", "curves.png"):
        assert (report / picture).stat().st_size > 1000, picture
        assert f"]({picture})" in (report / "report.md").read_text()
    assert f"Best: trial {best.number}" in (report / "report.md").read_text()

    # the budget is used up: running the command again trains nothing
    before = (report / "results.csv").read_text()
    main([str(sweep)])
    assert len(finished(out / "study.db", "grid")) == 4 and (report / "results.csv").read_text() == before


def _trial_processes(marker: str) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmdline = (proc / "cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if marker in cmdline and "ctprep_train.train" in cmdline:
                pids.append(int(proc.name))
    return pids


@pytest.mark.multiprocess
def test_a_killed_sweep_resumes_without_redoing_finished_trials(shards, tmp_path):
    out = tmp_path / "sweep"
    sweep = write_sweep(
        tmp_path / "resume.yaml", shards=str(shards), output=str(out),
        overrides=[*STAND_IN, "data.batch_size=4", "train.ckpt_every=100", "train.log_every=10"],
        search={"optim.lr": {"type": "categorical", "choices": [0.0003, 0.001, 0.003]}},
        sampler={"name": "grid"}, objective={"metric": "valid/loss", "direction": "minimize"},
        pruner={"name": "none", "every": 100}, budget={"steps": 300})
    cmd = [sys.executable, "-m", "ctprep_train.sweep", str(sweep)]
    env = {**os.environ, **ENV}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    second = out / "trials" / "trial_0001"
    try:
        # kill the sweep (SIGKILL: no clean-up) while trial 1 trains, after its step-100 checkpoint
        while not (second.is_dir() and complete_checkpoints(second)):
            assert proc.poll() is None, proc.stdout.read()
            time.sleep(0.2)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    first = out / "trials" / "trial_0000"
    first_metrics = (first / "metrics.jsonl").read_text()
    for _ in range(100):  # the trial's training process follows its sweep (PR_SET_PDEATHSIG)
        if not _trial_processes(str(second)):
            break
        time.sleep(0.1)
    assert not _trial_processes(str(second))
    states = {t.number: t.state.name for t in finished(out / "study.db", "resume")}
    assert states == {0: "COMPLETE", 1: "RUNNING"}
    done_at_kill = [s for s, _ in complete_checkpoints(second)]
    assert done_at_kill and max(done_at_kill) < 300

    rerun = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert "trials [1] were cut short" in rerun.stdout
    trials = finished(out / "study.db", "resume")
    assert [t.state.name for t in trials] == ["COMPLETE", "FAIL", "COMPLETE", "COMPLETE"]
    assert (first / "metrics.jsonl").read_text() == first_metrics  # trial 0 was not trained again
    # the cut-short trial was queued again with its parameters and resumed in its own folder
    retry = next(t for t in trials if t.user_attrs.get("retry_of") == 1)
    assert retry.params == trials[1].params and retry.user_attrs["run_of"] == 1
    assert Path(retry.user_attrs["run_dir"]) == second
    rows = [json.loads(line) for line in (second / "metrics.jsonl").read_text().splitlines()]
    resumed = [r for r in rows if r["kind"] == "resume"]
    assert resumed and resumed[0]["step"] == max(done_at_kill)
    assert sorted({t.params["optim.lr"] for t in trials if t.state.name == "COMPLETE"}) == [0.0003, 0.001, 0.003]
    # three grid points, three run folders: the retry trained in trial_0001
    assert sorted(p.name for p in (out / "trials").iterdir()) == sorted(
        Path(t.user_attrs["run_dir"]).name for t in trials if t.state.name == "COMPLETE")
    with (out / "report" / "results.csv").open() as f:
        assert [r["state"] for r in csv.DictReader(f)] == ["complete", "fail", "complete", "complete"]


@pytest.mark.multiprocess
def test_an_eval_objective_runs_the_real_evaluation_of_the_real_tiny_model(shards, tmp_path):
    out = tmp_path / "sweep"
    sweep = tmp_path / "eval.yaml"
    sweep.write_text(yaml.safe_dump({
        "base": BASE, "shards": str(shards), "output": str(out), "env": ENV,
        "overrides": ["data.tokenizer=index", "data.num_workers=0", "train.progress_bar=false",
                      "train.ckpt_every=0", "train.report_to=[]"],
        "search": {"loss.weights.region": {"type": "float", "low": 0.0, "high": 1.0}},
        "sampler": {"name": "random", "seed": 3}, "objective": {"metric": "eval/mean_R@1"},
        "pruner": {"name": "none"}, "budget": {"n_trials": 1, "steps": 2},
        "evaluate": {"split": "valid", "max_cases": 4}}))
    main([str(sweep)])
    (trial,) = finished(out / "study.db", "eval")
    assert trial.state.name == "COMPLETE"
    run = Path(trial.user_attrs["run_dir"])
    result = json.loads((run / "eval" / "eval.json").read_text())
    r = result["retrieval"]
    assert result["retrieval"]["n_images"] == 4
    assert trial.value == pytest.approx((r["image_to_text"]["R@1"] + r["text_to_image"]["R@1"]) / 2)
    assert trial.user_attrs["eval/retrieval/random_baseline/R@5"] == r["random_baseline"]["R@5"]
    assert json.loads((run / "config.json").read_text())["loss"]["weights"]["region"] == trial.params["loss.weights.region"]
    assert not (run / "tensorboard").exists()  # report_to: [] reached the trainer


@pytest.mark.parametrize("preset", sorted(p.name for p in (REPO / "configs" / "sweep").glob("*.yaml")))
def test_the_shipped_sweep_presets_load_against_their_base_config(preset):
    spec = load_sweep(REPO / "configs" / "sweep" / preset)  # also loads the base with the overrides
    assert Path(spec.base).is_file() and spec.search and spec.objective.metric.startswith("eval/")


def test_two_sweep_processes_on_one_study_draw_different_trials_only_with_their_worker_numbers(tmp_path):
    """Each process has its own seeded sampler: with one seed two processes started together ask the
    study for the same start-up trial; --worker offsets the seed."""
    spec = load_sweep(write_sweep(tmp_path / "s.yaml", search={"optim.lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}},
                                  sampler={"name": "tpe", "seed": 0}, budget={"n_trials": 2, "steps": 1}))
    assert worker_seed(0, 1) == 1 and worker_seed(None, 3) is None
    storage = f"sqlite:///{tmp_path / 'study.db'}"

    def two_processes(name, seed_b):
        """Process A (worker 0) and process B (seed_b) each ask the shared study for a trial."""
        spec.sampler.seed = worker_seed(0, 0)
        a = optuna.create_study(study_name=name, storage=storage, sampler=build_sampler(spec))
        spec.sampler.seed = seed_b
        b = optuna.load_study(study_name=name, storage=storage, sampler=build_sampler(spec))
        return [s.ask().suggest_float("optim.lr", 1e-4, 1e-2, log=True) for s in (a, b)]

    lr_a, lr_b = two_processes("no_worker_numbers", worker_seed(0, 0))
    assert lr_a == lr_b  # the same trial twice: what two processes without --worker ran
    lr_a, lr_b = two_processes("workers_0_and_1", worker_seed(0, 1))
    assert lr_a != lr_b
    with pytest.raises(SystemExit):
        main([str(tmp_path / "s.yaml"), "--worker", "-1"])


def test_a_resumed_sweep_draws_new_start_up_trials(tmp_path):
    """A seeded sampler restarts its stream in every process: a sweep resumed after a kill drew the
    start-up trial it had already run. open_study offsets the seed by the study's size, so the
    resumed process draws another point, while a fresh study keeps the seed's own draws."""
    import optuna

    spec = load_sweep(write_sweep(tmp_path / "s.yaml", search={"optim.lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}},
                                  sampler={"name": "tpe", "seed": 0}, budget={"n_trials": 4, "steps": 1},
                                  output=str(tmp_path / "out")))
    assert resume_seed(0, 0) == 0 and resume_seed(None, 5) is None and resume_seed(1, 1) != resume_seed(0, 1)
    assert reseeds(spec)
    grid = load_sweep(write_sweep(tmp_path / "g.yaml", search={"optim.lr": {"type": "categorical", "choices": [1e-4, 1e-3]}},
                                  sampler={"name": "grid", "seed": 0}))
    assert not reseeds(grid)  # the grid's seed fixes its point order, which every process must share

    def first_draw(study):
        trial = study.ask()
        lr = trial.suggest_float("optim.lr", 1e-4, 1e-2, log=True)
        study.tell(trial, 0.5)
        return lr

    plain = optuna.create_study(sampler=build_sampler(spec))  # the seed's first draw, in memory
    first = first_draw(open_study(spec))  # a fresh study on disk: the same draw as before the offset
    assert first == first_draw(plain)
    resumed = first_draw(open_study(spec))  # the same command again on the study holding one trial
    assert resumed != first
    again = first_draw(optuna.load_study(study_name=spec.study, storage=spec.storage, sampler=build_sampler(spec)))
    assert again == first  # what the resume drew without the offset: the trial it already ran
