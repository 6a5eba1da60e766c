"""Experiment tracking beside metrics.jsonl: TensorBoard and (optionally) MLflow, chosen by config.

``train.report_to`` lists the sinks a run writes to (``metrics.jsonl`` is always written)::

    train:
      report_to: [tensorboard, mlflow]   # default [tensorboard]; [] = metrics.jsonl only
      mlflow_uri: ""                     # "" = sqlite:///<folder above train.output>/mlflow.db
      mlflow_experiment: ctprep

MLflow runs offline: the default store is a SQLite file beside the run folders (no server),
artifacts go to ``mlartifacts/`` beside it. A run logs its whole config as params (dotted keys),
every train/valid row as metrics, and ``python -m ctprep_train.tracking log-eval`` adds the
evaluation (``eval.json`` numbers as ``eval/...`` metrics, the report and its pictures as
artifacts) to the same MLflow run. The MLflow run id is kept in ``RUN/mlflow_run.json``, so a
resumed training continues the same MLflow run. Browse with ``mlflow ui --backend-store-uri URI``
(needs the full ``mlflow`` package; ``mlflow-skinny``, in the ``[train]`` extra, only writes/reads).

MLflow metric names allow letters, digits, ``_ - . / :`` and spaces: ``R@5`` is logged as ``R_at_5``.
"""

from __future__ import annotations

import argparse
import json
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

REPORT_TO = ("tensorboard", "mlflow")  # the sinks train.report_to may name
RUN_FILE = "mlflow_run.json"  # in the run folder: tracking URI, experiment and run id
_PARAM_BATCH = 100  # MLflow's limit of params per log_batch call
_METRIC_BATCH = 1000  # ... and of metrics
_PARAM_MAX_CHARS = 6000  # MLflow's limit on a param value


class Sink(Protocol):
    def log_scalars(self, kind: str, step: int, values: dict[str, float]) -> None: ...

    def close(self) -> None: ...


def scalar(value: Any) -> float | None:
    """A finite float, or None (strings, NaN, inf, lists are not scalars)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def flatten(values: dict[str, Any], sep: str = "/", prefix: str = "") -> dict[str, Any]:
    """Nested dicts -> one level, keys joined with ``sep``."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, sep, f"{name}{sep}"))
        else:
            out[name] = value
    return out


def mlflow_key(name: str) -> str:
    """A metric/param name MLflow accepts: ``@`` -> ``_at_``, other unsupported characters -> ``_``."""
    return re.sub(r"[^\w\-. :/]", "_", name.replace("@", "_at_"))


def default_mlflow_uri(output: Path) -> str:
    """``sqlite:///<folder above the run>/mlflow.db``: runs under one folder share one store."""
    return f"sqlite:///{output.resolve().parent / 'mlflow.db'}"


def _artifact_root(uri: str) -> str | None:
    """Artifacts beside a SQLite store (MLflow's own default is ./mlruns of the working directory)."""
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///"):]).parent / "mlartifacts").resolve().as_uri()
    return None


class TensorBoardSink:
    def __init__(self, output: Path, start_step: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self._writer = SummaryWriter(log_dir=str(output / "tensorboard"), purge_step=start_step + 1)

    def log_scalars(self, kind: str, step: int, values: dict[str, float]) -> None:
        for key, value in values.items():
            self._writer.add_scalar(f"{kind}/{key}", value, step)

    def close(self) -> None:
        self._writer.flush()
        self._writer.close()


class MlflowSink:
    """One MLflow run per training run folder; a resumed training reopens the run it started."""

    def __init__(self, output: Path, *, uri: str, experiment: str, params: dict[str, Any]) -> None:
        from mlflow.tracking import MlflowClient

        self.uri = uri or default_mlflow_uri(output)
        self._client = MlflowClient(tracking_uri=self.uri)
        previous = read_run_file(output)
        if previous is not None and previous["tracking_uri"] == self.uri:
            self.run_id = previous["run_id"]
            self._client.update_run(self.run_id, status="RUNNING")
        else:
            found = self._client.get_experiment_by_name(experiment)
            experiment_id = (found.experiment_id if found is not None else
                             self._client.create_experiment(experiment, artifact_location=_artifact_root(self.uri)))
            run = self._client.create_run(experiment_id, run_name=output.name, tags={"ctprep.run_dir": str(output.resolve())})
            self.run_id = run.info.run_id
            (output / RUN_FILE).write_text(json.dumps(
                {"tracking_uri": self.uri, "experiment": experiment, "run_id": self.run_id}, indent=1))
            log_params(self._client, self.run_id, params)

    def log_scalars(self, kind: str, step: int, values: dict[str, float]) -> None:
        if values:
            log_metrics(self._client, self.run_id, {f"{kind}/{k}": v for k, v in values.items()}, step)

    def close(self, status: str = "FINISHED") -> None:
        self._client.set_terminated(self.run_id, status=status)


def log_params(client, run_id: str, params: dict[str, Any]) -> None:
    from mlflow.entities import Param

    items = [Param(mlflow_key(k), str(v)[:_PARAM_MAX_CHARS]) for k, v in sorted(flatten(params, ".").items())]
    for i in range(0, len(items), _PARAM_BATCH):
        client.log_batch(run_id, params=items[i:i + _PARAM_BATCH])


def log_metrics(client, run_id: str, values: dict[str, float], step: int) -> None:
    import time

    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    items = [Metric(mlflow_key(k), v, now, step) for k, v in values.items()]
    for i in range(0, len(items), _METRIC_BATCH):
        client.log_batch(run_id, metrics=items[i:i + _METRIC_BATCH])


def open_sinks(report_to: Sequence[str], output: Path, *, start_step: int, params: dict[str, Any],
               mlflow_uri: str = "", mlflow_experiment: str = "ctprep") -> list[Sink]:
    """The sinks ``train.report_to`` names, opened for the run folder ``output`` (rank 0 only)."""
    sinks: list[Sink] = []
    for name in report_to:
        if name not in REPORT_TO:
            raise ValueError(f"unknown report_to entry {name!r}; valid choices: {', '.join(REPORT_TO)}")
        if name == "tensorboard":
            sinks.append(TensorBoardSink(output, start_step))
        elif name == "mlflow":
            try:
                sinks.append(MlflowSink(output, uri=mlflow_uri, experiment=mlflow_experiment, params=params))
            except ImportError as err:
                raise RuntimeError("train.report_to names mlflow but it is not installed: "
                                   "pip install 'ctprep[train]' (brings mlflow-skinny)") from err
    return sinks


def read_run_file(run_dir: Path) -> dict[str, str] | None:
    path = Path(run_dir) / RUN_FILE
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    missing = {"tracking_uri", "run_id"} - set(data)
    if missing:
        raise ValueError(f"{path}: missing {sorted(missing)}")
    return data


def log_eval_report(run_dir: Path, eval_dir: Path) -> str | None:
    """Add an evaluation folder (eval.json, report.md, PNGs) to the run's MLflow run.

    Numbers of eval.json become metrics ``eval/<path>`` at the run's last step; the files become
    artifacts under ``eval/``. Returns the MLflow run id, or None when the run has no MLflow run
    (``train.report_to`` without mlflow).
    """
    info = read_run_file(run_dir)
    if info is None:
        return None
    eval_json = Path(eval_dir) / "eval.json"
    if not eval_json.is_file():
        raise FileNotFoundError(f"{eval_json}: no evaluation result (run ctprep_train.evaluate first)")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=info["tracking_uri"])
    result = json.loads(eval_json.read_text())
    step = _last_step(Path(run_dir))
    numbers = {f"eval/{k}": v for k, v in ((k, scalar(v)) for k, v in flatten(result).items()
                                             if not isinstance(v, bool)) if v is not None}
    log_metrics(client, info["run_id"], numbers, step)
    for path in sorted(Path(eval_dir).iterdir()):
        if path.is_file() and path.suffix in (".json", ".md", ".png"):
            client.log_artifact(info["run_id"], str(path), artifact_path="eval")
    return info["run_id"]


def _last_step(run_dir: Path) -> int:
    metrics = run_dir / "metrics.jsonl"
    step = 0
    if metrics.is_file():
        for line in metrics.read_text().splitlines():
            if line.strip():
                step = max(step, int(json.loads(line).get("step", 0)))
    return step


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Experiment tracking helpers (MLflow)")
    sub = parser.add_subparsers(dest="command", required=True)
    log_eval = sub.add_parser("log-eval", help="add an evaluation folder to the training run's MLflow run")
    log_eval.add_argument("--run", type=Path, required=True, help="training run folder (has mlflow_run.json)")
    log_eval.add_argument("--eval", type=Path, default=None, help="evaluation folder (default RUN/eval)")
    args = parser.parse_args(argv)
    run_id = log_eval_report(args.run, args.eval or args.run / "eval")
    if run_id is None:
        raise SystemExit(f"{args.run}: no {RUN_FILE} (the run was trained without report_to: [mlflow])")
    print(f"logged {args.eval or args.run / 'eval'} to MLflow run {run_id}")


if __name__ == "__main__":
    main()
