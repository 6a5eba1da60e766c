"""Hyperparameter sweeps on Optuna: each trial is an ordinary training run plus evaluation.

    python -m ctprep_train.sweep configs/sweep/demo_lr_loss.yaml [--n-trials N] [--report-only]

The sweep YAML (reference: docs/sweeps.md) names the base training config, the search space
(any trainer ``key=value`` override key: ``optim.lr``, ``data.batch_size``, ``loss.weights.region``,
``optim.warmup_steps``, ...), the sampler (grid / random / TPE), the objective (a number of the
trial's evaluation or of its last validation row) and the budget (trials, steps per trial).

A trial runs ``python -m ctprep_train.train --config BASE ... --output OUT/trials/trial_NNNN`` (the
same entry point as ``trainer/train.py``, optionally under ``torchrun``) and then
``python -m ctprep_train.eval`` on its ``encoder/`` export, each in a subprocess: the code paths of
``make demo``. While a trial trains, the sweep reads the ``valid`` rows of its ``metrics.jsonl``
and reports them to Optuna's pruner; a pruned trial's process is stopped.

The study lives in an Optuna storage, SQLite by default (``OUT/study.db``): a sweep killed midway
resumes when the same command is run again (finished trials are kept; the trial that was cut short
is queued again with the same parameters and resumes from its last checkpoint), and several
machines running the same command against one storage URL share the study. The report
(``OUT/report/``: results table as CSV and markdown, ``best_config.yaml`` for ``train.py --config``,
pictures) is rewritten after every trial; ``--report-only`` rewrites it from the storage alone.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

from ctprep.typed_config import ConfigError
from ctprep_train.config import load_config
# The sweep YAML's spec lives in sweep_spec; its public names stay importable from here.
from ctprep_train.sweep_spec import (  # noqa: F401
    DIRECTIONS, PARAM_TYPES, PRUNERS, SAMPLERS, BudgetSpec, EvaluateSpec, ObjectiveSpec, ParamSpec,
    PrunerSpec, SamplerSpec, SweepSpec, first_value, grid_values, load_sweep, metric_kind,
    pruning_metric, pruning_sign, trial_overrides,
)

TRAIN_MODULE = "ctprep_train.train"
EVAL_MODULE = "ctprep_train.eval"
POLL_S = 1.0  # seconds between reads of a running trial's metrics.jsonl


# --------------------------------------------------------------------------- metrics


def row_value(row: dict[str, Any], key: str) -> float | None:
    """A number of a metrics.jsonl row; ``mean_R@K`` = mean of image->text and text->image R@K."""
    if key.startswith("mean_R@"):
        k = key[len("mean_"):]
        parts = [row.get(f"image_to_text/{k}"), row.get(f"text_to_image/{k}")]
        return None if None in parts else (float(parts[0]) + float(parts[1])) / 2
    value = row.get(key)
    return None if value is None else float(value)


def eval_value(result: dict[str, Any], path: str) -> float | None:
    """A number of eval.json by '/'-path; ``mean_R@K`` = mean of held-out R@K both ways."""
    if path.startswith("mean_R@"):
        k = path[len("mean_"):]
        retrieval = result.get("retrieval", {})
        parts = [retrieval.get("image_to_text", {}).get(k), retrieval.get("text_to_image", {}).get(k)]
        return None if None in parts else (float(parts[0]) + float(parts[1])) / 2
    node: Any = result
    for part in path.split("/"):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return None if node is None or isinstance(node, (dict, list, str)) else float(node)


def read_rows(run_dir: Path, kind: str) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line being written right now
            continue
        if row.get("kind") == kind:
            rows.append(row)
    return rows


def objective_value(metric: str, run_dir: Path) -> float | None:
    kind, _, key = metric.partition("/")
    if kind == "eval":
        path = run_dir / "eval" / "eval.json"
        return eval_value(json.loads(path.read_text()), key) if path.is_file() else None
    rows = read_rows(run_dir, kind)
    return row_value(rows[-1], key) if rows else None


# --------------------------------------------------------------------------- Optuna objects


def worker_seed(seed: int | None, worker: int) -> int | None:
    """The sampler seed of sweep process ``worker``: processes that share a study and start with one
    seed would draw the same random / TPE start-up trials (each has its own sampler), so each adds
    its number. None (no seed) stays None."""
    return None if seed is None else seed + worker


def reseeds(spec: SweepSpec) -> bool:
    """Whether worker and resume offsets apply to the spec's sampler. Not to ``grid``: its seed
    shuffles the grid, and a trial's grid point is an index into that order, so every process of a
    study must keep the seed as given (Optuna's GridSampler already spreads processes over the
    points not yet started)."""
    return spec.sampler.name != "grid" and spec.sampler.seed is not None


RESUME_SEED_STRIDE = 10007  # > any worker number: resumed and fresh processes never share a seed


def resume_seed(seed: int | None, trials_in_study: int) -> int | None:
    """The sampler seed of a process that joins a study already holding ``trials_in_study`` trials.

    A seeded sampler starts its random stream afresh in every process, so a sweep resumed after a
    kill would draw the start-up trials it already ran (a resumed demo sweep ran lr 1.06e-3 a third
    time). Offsetting the seed by the study's size keeps a fresh study's draws as they were
    (``trials_in_study`` 0) and gives a resumed one new points, still the same for the same study."""
    return None if seed is None else seed + RESUME_SEED_STRIDE * trials_in_study


def build_sampler(spec: SweepSpec, seed: int | None = None):
    """The spec's sampler; ``seed`` (when given) replaces ``sampler.seed``."""
    import optuna

    s = spec.sampler
    seed = s.seed if seed is None else seed
    try:
        if s.name == "grid":
            grid = {key: grid_values(key, p) for key, p in spec.search.items()}
            return optuna.samplers.GridSampler(grid, seed=seed, **s.options)
        if s.name == "random":
            return optuna.samplers.RandomSampler(seed=seed, **s.options)
        return optuna.samplers.TPESampler(seed=seed, **s.options)
    except TypeError as err:
        raise ConfigError(f"sampler.options for {s.name}: {err}") from None


def build_pruner(spec: SweepSpec):
    import optuna

    p = spec.pruner
    classes = {"none": optuna.pruners.NopPruner, "median": optuna.pruners.MedianPruner,
               "percentile": optuna.pruners.PercentilePruner, "hyperband": optuna.pruners.HyperbandPruner,
               "threshold": optuna.pruners.ThresholdPruner}
    try:
        return classes[p.name](**p.options)
    except TypeError as err:
        raise ConfigError(f"pruner.options for {p.name}: {err}") from None


def grid_size(spec: SweepSpec) -> int:
    return math.prod(len(grid_values(key, p)) for key, p in spec.search.items())


def n_trials(spec: SweepSpec) -> int:
    return spec.budget.n_trials or grid_size(spec)


def open_study(spec: SweepSpec, *, create: bool = True):
    import optuna

    storage: Any = spec.storage
    if spec.storage.startswith("sqlite:///"):
        Path(spec.storage[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    if create:
        storage = optuna.storages.RDBStorage(
            spec.storage, heartbeat_interval=spec.heartbeat_s, grace_period=spec.grace_s,
            heartbeat_stale_trial_callback=lambda study, trial: requeue(study, trial, spec.max_retries))
        study = optuna.create_study(study_name=spec.study, storage=storage, sampler=build_sampler(spec),
                                    pruner=build_pruner(spec), direction=spec.objective.direction,
                                    load_if_exists=True)
        existing = len(study.get_trials(deepcopy=False))
        if existing and reseeds(spec):  # a resume: see resume_seed
            study.sampler = build_sampler(spec, resume_seed(spec.sampler.seed, existing))
        return study
    return optuna.load_study(study_name=spec.study, storage=storage, sampler=build_sampler(spec))


def requeue(study, trial, max_retries: int) -> None:
    """Queue a trial that was cut short again with its parameters; the new trial reuses its run
    folder (``run_of``) and so resumes from its last checkpoint.

    As Optuna's ``RetryFailedTrialCallback``: a WAITING copy with the same params, distributions
    and system attributes (a grid sweep's ``grid_id`` stays that of the grid point).
    """
    import optuna

    retries = int(trial.user_attrs.get("retries", 0))
    if retries >= max_retries or not trial.params:
        return
    user_attrs = {"run_of": int(trial.user_attrs.get("run_of", trial.number)), "retry_of": trial.number,
                  "retries": retries + 1}
    study.add_trial(optuna.trial.create_trial(
        state=optuna.trial.TrialState.WAITING, params=trial.params, distributions=trial.distributions,
        user_attrs=user_attrs, system_attrs=dict(trial.system_attrs)))


def _process_identity(pid: int) -> str | None:
    """host:pid:start-time of a live process (Linux /proc), or None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    start = stat.rsplit(")", 1)[1].split()[19]  # field 22 of proc(5): starttime, after "pid (comm)"
    return f"{socket.gethostname()}:{pid}:{start}"


def reclaim_dead_trials(study, max_retries: int) -> list[int]:
    """Queue again the trials that a stopped sweep on this host cut short: RUNNING ones whose sweep
    process is gone (killed; they are failed first) and failed ones marked ``interrupted`` (Ctrl-C,
    SIGTERM). Trials of other machines are left to the storage heartbeat (``grace_s``).
    """
    from optuna.trial import TrialState

    reclaimed = []
    trials = study.get_trials(deepcopy=False)
    retried = {t.user_attrs.get("retry_of") for t in trials}
    for trial in trials:
        if trial.state == TrialState.FAIL and trial.user_attrs.get("interrupted") and trial.number not in retried:
            requeue(study, trial, max_retries)
            reclaimed.append(trial.number)
    host = socket.gethostname()
    for trial in (t for t in trials if t.state == TrialState.RUNNING):
        owner = str(trial.user_attrs.get("owner", ""))
        if not owner.startswith(f"{host}:"):
            continue
        pid = int(owner.split(":")[1])
        if _process_identity(pid) == owner:
            continue  # still running (another sweep process on this machine)
        # Optuna has no public call to fail another process's trial; this is what its own
        # heartbeat check does (optuna.storages.fail_stale_trials).
        if study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL):
            requeue(study, trial, max_retries)
            reclaimed.append(trial.number)
    return reclaimed


def counted_trials(study) -> int:
    """Finished trials that use up the budget: complete, pruned, and failed ones not queued again."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    retried = {t.user_attrs.get("retry_of") for t in trials}
    return sum(1 for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)
               or (t.state == TrialState.FAIL and t.number not in retried))


# --------------------------------------------------------------------------- one trial


class TrialFailed(RuntimeError):
    """A trial's training or evaluation exited with an error (the sweep goes on)."""


def _load_prctl():
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # not Linux: a killed sweep leaves its trial process running
        return None


_PRCTL = _load_prctl()  # looked up before any fork: the child may only make the call


def _die_with_parent() -> None:
    """In the child, between fork and exec: SIGTERM when the sweep process dies, even by SIGKILL."""
    if _PRCTL is not None:
        _PRCTL(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _tail(path: Path, chars: int = 3000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.is_file() else ""


class TrialRunner:
    """The Optuna objective: sample, train (watching validation for pruning), evaluate, score."""

    def __init__(self, spec: SweepSpec) -> None:
        self.spec = spec
        self.env = {**os.environ, **spec.env}
        self.pruning_key = pruning_metric(spec).partition("/")[2]
        self.sign = pruning_sign(spec)

    def suggest(self, trial) -> dict[str, Any]:
        params = {}
        for key, p in self.spec.search.items():
            if p.type == "categorical":
                params[key] = trial.suggest_categorical(key, p.choices)
            elif p.type == "int":
                params[key] = trial.suggest_int(key, int(p.low), int(p.high), step=int(p.step or 1), log=p.log)
            else:
                params[key] = trial.suggest_float(key, p.low, p.high, step=p.step, log=p.log)
        return params

    def __call__(self, trial) -> float:
        params = self.suggest(trial)
        run_dir = Path(self.spec.output) / "trials" / f"trial_{int(trial.user_attrs.get('run_of', trial.number)):04d}"
        run_dir.mkdir(parents=True, exist_ok=True)
        trial.set_user_attr("run_dir", str(run_dir))
        trial.set_user_attr("owner", _process_identity(os.getpid()) or "")
        overrides = trial_overrides(self.spec, params)
        train_cmd = [*(self.spec.launcher or [sys.executable]), "-m", TRAIN_MODULE, "--config", self.spec.base,
                     "--output", str(run_dir), "--resume", "auto", *overrides]
        (run_dir / "trial.json").write_text(json.dumps(
            {"study": self.spec.study, "trial": trial.number, "params": params, "overrides": overrides,
             "train_command": train_cmd}, indent=1))
        print(f"[sweep] trial {trial.number}: {json.dumps(params)}", flush=True)
        try:
            t0 = time.time()
            self.train(trial, train_cmd, run_dir)
            trial.set_user_attr("train_s", round(time.time() - t0, 1))
            if metric_kind(self.spec.objective.metric) == "eval":
                self.evaluate(run_dir)
        except KeyboardInterrupt:  # Optuna records it as failed; the next run queues it again
            trial.set_user_attr("interrupted", True)
            raise
        for name, value in headline_metrics(run_dir).items():
            trial.set_user_attr(name, value)
        value = objective_value(self.spec.objective.metric, run_dir)
        if value is None or not math.isfinite(value):
            raise TrialFailed(f"trial {trial.number}: objective {self.spec.objective.metric} missing or not finite "
                              f"in {run_dir}")
        return value

    def train(self, trial, cmd: list[str], run_dir: Path) -> None:
        import optuna

        reported: set[int] = set()
        log = run_dir / "train.log"
        with log.open("a") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=self.env,
                                    preexec_fn=_die_with_parent)
            try:
                while True:
                    done = proc.poll() is not None
                    for row in read_rows(run_dir, "valid"):
                        step, value = int(row["step"]), row_value(row, self.pruning_key)
                        if step in reported or value is None:
                            continue
                        reported.add(step)
                        trial.report(self.sign * value, step)
                        if not done and trial.should_prune():
                            _stop(proc)
                            print(f"[sweep] trial {trial.number}: pruned at step {step} "
                                  f"({pruning_metric(self.spec)} = {value:.4g})", flush=True)
                            raise optuna.TrialPruned(f"step {step}")
                    if done:
                        break
                    time.sleep(POLL_S)
            finally:
                _stop(proc)
        if proc.returncode != 0:
            raise TrialFailed(f"training exited {proc.returncode}: {' '.join(cmd)}\n--- {log} (tail)\n{_tail(log)}")

    def evaluate(self, run_dir: Path) -> None:
        e = self.spec.evaluate
        shards = self.spec.shards or load_config(self.spec.base, list(self.spec.overrides)).data.shards
        cmd = [sys.executable, "-m", EVAL_MODULE, "--encoder", str(run_dir / "encoder"), "--shards", str(shards),
               "--split", e.split, "--out", str(run_dir / "eval"), "--batch-size", str(e.batch_size),
               "--picture-cases", str(e.picture_cases)]
        if e.source:
            cmd += ["--source", e.source]
        if e.max_cases:
            cmd += ["--max-cases", str(e.max_cases)]
        log = run_dir / "eval.log"
        with log.open("w") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=self.env,
                                    preexec_fn=_die_with_parent)
            try:
                proc.wait()
            finally:
                _stop(proc)
        if proc.returncode != 0:
            raise TrialFailed(f"evaluation exited {proc.returncode}: {' '.join(cmd)}\n--- {log} (tail)\n{_tail(log)}")
        from ctprep_train.tracking import log_eval_report

        log_eval_report(run_dir, run_dir / "eval")  # no-op unless the run logs to MLflow


def headline_metrics(run_dir: Path) -> dict[str, float]:
    """The numbers the results table shows beside the objective (those the trial has)."""
    out: dict[str, float] = {}
    valid = read_rows(run_dir, "valid")
    if valid:
        for key in ("loss", "mean_R@5"):
            value = row_value(valid[-1], key)
            if value is not None:
                out[f"valid/{key}"] = value
    path = run_dir / "eval" / "eval.json"
    if path.is_file():
        result = json.loads(path.read_text())
        for key in ("retrieval/image_to_text/R@5", "retrieval/text_to_image/R@5", "retrieval/random_baseline/R@5",
                    "zero_shot/macro_auc", "cot_alignment/overall/mean_ratio"):
            value = eval_value(result, key)
            if value is not None:
                out[f"eval/{key}"] = value
    return out


# --------------------------------------------------------------------------- the sweep


def run_sweep(spec: SweepSpec) -> Any:
    """Run trials until the budget is used up (across resumes and machines); write the report."""
    import optuna

    from ctprep_train.sweep_report import write_report

    study = open_study(spec)
    study.set_user_attr("sweep", {"base": spec.base, "objective": spec.objective.metric, "output": spec.output})
    reclaimed = reclaim_dead_trials(study, spec.max_retries)
    if reclaimed:
        print(f"[sweep] trials {reclaimed} were cut short by a stopped sweep: queued again", flush=True)
    runner = TrialRunner(spec)
    budget = n_trials(spec)
    while True:
        optuna.storages.fail_stale_trials(study)  # trials of machines that stopped sending heartbeats
        done = counted_trials(study)
        if done >= budget:
            break
        study.optimize(runner, n_trials=1, catch=(TrialFailed,))
        write_report(study, spec)
    write_report(study, spec)
    print(f"[sweep] {spec.study}: {done} trials done; report in {Path(spec.output) / 'report'}", flush=True)
    return study


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep", help="sweep YAML (configs/sweep/*.yaml; reference in docs/sweeps.md)")
    parser.add_argument("--n-trials", type=int, default=None, help="override budget.n_trials")
    parser.add_argument("--storage", default=None, help="override storage (an Optuna storage URL shared by machines)")
    parser.add_argument("--output", default=None, help="override output (study folder)")
    parser.add_argument("--shards", default=None, help="override shards (data.shards of every trial)")
    parser.add_argument("--report-only", action="store_true", help="rewrite the report from the storage; run nothing")
    parser.add_argument("--worker", type=int, default=0,
                        help="this process's number among those sharing the study (0, 1, ...): added to "
                             "sampler.seed (random / tpe), so processes started together do not draw the same trials")
    args = parser.parse_args(argv)
    if args.worker < 0:
        parser.error(f"--worker must be >= 0, got {args.worker}")
    extra: dict[str, Any] = {k: v for k, v in (("storage", args.storage), ("output", args.output),
                                               ("shards", args.shards)) if v}
    try:
        spec = load_sweep(args.sweep, extra)
        if args.n_trials is not None:
            spec.budget.n_trials = args.n_trials
        if reseeds(spec):
            spec.sampler.seed = worker_seed(spec.sampler.seed, args.worker)
    except ConfigError as err:
        raise SystemExit(f"error: {err}") from None
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # heartbeats and fail_stale_trials are marked experimental; they are what lets machines share a study
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    # SIGTERM (a scheduler stopping the job) behaves like Ctrl-C: the running trial is queued again.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    if args.report_only:
        from ctprep_train.sweep_report import write_report

        write_report(open_study(spec, create=False), spec)
        return
    try:
        run_sweep(spec)
    except KeyboardInterrupt:
        raise SystemExit("[sweep] interrupted: run the same command again to resume") from None


if __name__ == "__main__":
    main()
