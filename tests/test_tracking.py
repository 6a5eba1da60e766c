"""Experiment tracking (ctprep_train.tracking): report_to selects the sinks; MLflow runs offline.

A short stand-in training with ``train.report_to=[tensorboard, mlflow]`` writes to a local SQLite
MLflow store; the test reads the params, the metric history and the evaluation artifacts back
through MLflow's own client. No server, no network.
"""

from __future__ import annotations

import json

import pytest

from ctprep_train.config import ConfigError, load_config
from ctprep_train.testing import write_test_shards
from ctprep_train.tracking import RUN_FILE, flatten, log_eval_report, mlflow_key, read_run_file
from tests.trainer_helpers import STAND_IN, launch, read_metrics

import mlflow


def test_report_to_defaults_to_tensorboard_and_refuses_unknown_sinks():
    assert load_config(None).train.report_to == ["tensorboard"]
    assert load_config(None, ["train.report_to=[]"]).train.report_to == []
    with pytest.raises(ConfigError, match="wandb.*valid choices: 'tensorboard', 'mlflow'"):
        load_config(None, ["train.report_to=[tensorboard, wandb]"])


def test_mlflow_keys_and_flattening():
    assert mlflow_key("valid/image_to_text/R@5") == "valid/image_to_text/R_at_5"
    assert mlflow_key("loss (clip)+x:y") == "loss _clip__x:y"
    assert flatten({"a": {"b": 1, "c": {}}, "d": 2}, ".") == {"a.b": 1, "a.c": {}, "d": 2}


@pytest.mark.multiprocess
def test_a_training_run_logs_params_metrics_and_eval_to_a_local_mlflow_store(tmp_path):
    shards = tmp_path / "shards"
    write_test_shards(shards, {"train": [6], "valid": [4]})
    out = tmp_path / "runs" / "tracked"
    store = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    (tmp_path / "store").mkdir()
    args = ["--config", "configs/train/demo.yaml", "--shards", str(shards), "--output", str(out), *STAND_IN,
            "train.steps=4", "train.val_every=2", "train.ckpt_every=0", "optim.lr=0.002",
            "train.report_to=[tensorboard, mlflow]", f"train.mlflow_uri={store}", "train.mlflow_experiment=trk"]
    launch(args)
    info = read_run_file(out)
    assert info["tracking_uri"] == store

    client = mlflow.tracking.MlflowClient(tracking_uri=store)
    run = client.get_run(info["run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name == "tracked"
    assert client.get_experiment(run.info.experiment_id).name == "trk"
    params = run.data.params
    assert params["optim.lr"] == "0.002" and params["train.steps"] == "4" and params["model.name"] == "stand-in"
    history = client.get_metric_history(info["run_id"], "train/loss")
    rows = read_metrics(out)
    assert [m.step for m in sorted(history, key=lambda m: m.step)] == [1, 2, 3, 4]
    assert sorted(history, key=lambda m: m.step)[-1].value == pytest.approx(rows[-1]["loss"])
    valid = sorted(client.get_metric_history(info["run_id"], "valid/image_to_text/R_at_5"), key=lambda m: m.step)
    assert [m.step for m in valid] == [2, 4]
    assert valid[-1].value == pytest.approx(read_metrics(out, "valid")[-1]["image_to_text/R@5"])
    assert (out / "tensorboard").is_dir()  # TensorBoard still written beside MLflow

    # the evaluation of the run joins the same MLflow run: numbers as metrics, files as artifacts
    eval_dir = out / "eval"
    eval_dir.mkdir()
    (eval_dir / "eval.json").write_text(json.dumps(
        {"retrieval": {"image_to_text": {"R@5": 0.25}, "n_images": 4, "note": "text is skipped"},
         "zero_shot": {"macro_auc": None}}))
    (eval_dir / "report.md").write_text("# report\n")
    assert log_eval_report(out, eval_dir) == info["run_id"]
    run = client.get_run(info["run_id"])
    assert run.data.metrics["eval/retrieval/image_to_text/R_at_5"] == 0.25
    assert run.data.metrics["eval/retrieval/n_images"] == 4
    assert "eval/zero_shot/macro_auc" not in run.data.metrics  # null in eval.json: not a number
    artifacts = {a.path for a in client.list_artifacts(info["run_id"], "eval")}
    assert artifacts == {"eval/eval.json", "eval/report.md"}
    assert (tmp_path / "store" / "mlartifacts").is_dir()  # beside the SQLite store, not in the cwd

    # a resumed training continues the same MLflow run
    launch([*args[:-3], "train.steps=6", "train.report_to=[mlflow]", f"train.mlflow_uri={store}",
            "train.mlflow_experiment=trk", "--resume", "auto"])
    assert read_run_file(out)["run_id"] == info["run_id"]
    steps = sorted(m.step for m in client.get_metric_history(info["run_id"], "train/loss"))
    assert steps == [1, 2, 3, 4, 5, 6]
    assert len(client.search_runs([run.info.experiment_id])) == 1


def test_log_eval_without_an_mlflow_run_is_a_no_op_and_the_cli_says_why(tmp_path):
    from ctprep_train.tracking import main

    assert log_eval_report(tmp_path, tmp_path) is None
    with pytest.raises(SystemExit, match=RUN_FILE):
        main(["log-eval", "--run", str(tmp_path)])
