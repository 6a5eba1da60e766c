"""The sweep YAML: its typed spec, loading and checking, the grid and the per-trial overrides.

Reference of the fields: docs/sweeps.md. ``ctprep_train.sweep`` runs a study from a loaded spec.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ctprep.typed_config import ConfigError, from_dict, look_up_option, read_yaml
from ctprep_train.config import load_config

SAMPLERS = ("grid", "random", "tpe")
PRUNERS = ("none", "median", "percentile", "hyperband", "threshold")
DIRECTIONS = ("maximize", "minimize")
PARAM_TYPES = ("float", "int", "categorical")


@dataclass
class ParamSpec:
    """One dimension of the search space, keyed by a trainer override key (``optim.lr``)."""

    type: str = "float"  # float | int | categorical
    low: float | None = None  # range bounds (float, int), inclusive
    high: float | None = None
    log: bool = False  # sample on a log scale (float, int)
    step: float | None = None  # range resolution; a grid sweep enumerates low, low + step, ..., high
    choices: list[Any] | None = None  # categorical values (any YAML scalar or mapping)


@dataclass
class SamplerSpec:
    name: str = "tpe"  # grid | random | tpe
    seed: int = 0  # sampler seed: the same YAML proposes the same trials
    options: dict[str, Any] = field(default_factory=dict)  # extra keyword arguments of the Optuna sampler


@dataclass
class ObjectiveSpec:
    # eval/mean_R@K (mean of held-out R@K both ways), eval/<path in eval.json> (eval/zero_shot/macro_auc),
    # valid/<key of the last valid row> (valid/loss, valid/mean_R@5), train/<key of the last train row>.
    metric: str = "eval/mean_R@5"
    direction: str = "maximize"  # maximize | minimize


@dataclass
class PrunerSpec:
    name: str = "median"  # none | median | percentile | hyperband | threshold (Optuna's pruners)
    # valid/<key> reported at each validation ("" = the objective if it is valid/..., valid/mean_R@K
    # for an eval/mean_R@K objective, else valid/loss).
    metric: str = ""
    direction: str = ""  # how the pruning metric improves ("" = as the objective); flipped to match
    every: int = 0  # train.val_every of the trials, steps (0 = the base config's)
    options: dict[str, Any] = field(default_factory=dict)  # keyword arguments of the Optuna pruner


@dataclass
class BudgetSpec:
    n_trials: int = 0  # trials finished (complete, pruned or failed) across all runs and machines; 0 = grid size
    steps: int = 0  # train.steps of every trial (0 = the base config's)


@dataclass
class EvaluateSpec:
    split: str = "valid"
    source: str | None = None  # evaluate only this source (ctrate | omniabnorm); None = all
    max_cases: int | None = None  # cap on evaluated cases (None = the whole split)
    batch_size: int = 4
    picture_cases: int = 0  # attention pictures per trial (0: none; the sweep needs numbers)


@dataclass
class SweepSpec:
    base: str = ""  # training YAML; as given, else relative to the sweep file
    shards: str = ""  # data.shards of every trial ("" = the base config's)
    output: str = "runs/sweep"  # study folder: trials/, report/, study.db
    study: str = ""  # study name in the storage ("" = the sweep file's stem)
    storage: str = ""  # Optuna storage URL ("" = sqlite:///<output>/study.db); shared by all machines
    overrides: list[str] = field(default_factory=list)  # fixed key=value of every trial
    search: dict[str, ParamSpec] = field(default_factory=dict)
    sampler: SamplerSpec = field(default_factory=SamplerSpec)
    objective: ObjectiveSpec = field(default_factory=ObjectiveSpec)
    pruner: PrunerSpec = field(default_factory=PrunerSpec)
    budget: BudgetSpec = field(default_factory=BudgetSpec)
    evaluate: EvaluateSpec = field(default_factory=EvaluateSpec)
    launcher: list[str] = field(default_factory=list)  # [] = this python; e.g. [torchrun, --nproc_per_node, "2"]
    env: dict[str, str] = field(default_factory=dict)  # extra environment of the trial processes
    heartbeat_s: int = 60  # trial heartbeat in the storage (a trial of a dead machine is retried after grace_s)
    grace_s: int = 180
    max_retries: int = 2  # times a trial cut short (killed sweep, dead machine) is queued again


def load_sweep(path: str | Path, overrides: dict[str, Any] | None = None) -> SweepSpec:
    """Read and check a sweep YAML; paths are resolved, the base config is loaded once as a test."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such sweep file")
    try:
        spec = from_dict(SweepSpec, {**read_yaml(path), **(overrides or {})})
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
    if not spec.base:
        raise ConfigError(f"{path}: 'base' (the training YAML) is required")
    base = Path(spec.base)
    if not base.is_file() and (path.parent / base).is_file():
        base = path.parent / base
    if not base.is_file():
        raise ConfigError(f"{path}: base {spec.base!r}: no such file (as given or beside {path.name})")
    spec.base = str(base.resolve())
    spec.output = str(Path(spec.output).resolve())
    if spec.shards:
        spec.shards = str(Path(spec.shards).resolve())
    spec.study = spec.study or path.stem
    spec.storage = spec.storage or f"sqlite:///{Path(spec.output) / 'study.db'}"
    _check(spec, path)
    return spec


def _check(spec: SweepSpec, path: Path) -> None:
    look_up_option(spec.sampler.name, SAMPLERS, f"{path}: sampler.name")
    look_up_option(spec.pruner.name, PRUNERS, f"{path}: pruner.name")
    look_up_option(spec.objective.direction, DIRECTIONS, f"{path}: objective.direction")
    if spec.pruner.direction:
        look_up_option(spec.pruner.direction, DIRECTIONS, f"{path}: pruner.direction")
    metric_kind(spec.objective.metric, f"{path}: objective.metric")
    if metric_kind(pruning_metric(spec), f"{path}: pruner.metric") != "valid":
        raise ConfigError(f"{path}: pruner.metric must be a valid/<key> metric (the trainer's validation rows)")
    if not spec.search:
        raise ConfigError(f"{path}: 'search' is empty: name at least one key to tune")
    for key, param in spec.search.items():
        _check_param(key, param, path)
        if spec.sampler.name == "grid":
            grid_values(key, param, path)
    if spec.sampler.name != "grid" and spec.budget.n_trials < 1:
        raise ConfigError(f"{path}: budget.n_trials must be >= 1 ({spec.sampler.name} sampler)")
    if spec.heartbeat_s < 1 or spec.grace_s <= spec.heartbeat_s:
        raise ConfigError(f"{path}: need heartbeat_s >= 1 and grace_s > heartbeat_s")
    # Every key must be one train.py knows: try the lowest point of the space before any trial.
    try:
        load_config(spec.base, trial_overrides(spec, {k: first_value(p) for k, p in spec.search.items()}))
    except ConfigError as err:
        raise ConfigError(f"{path}: the base config with these overrides is refused: {err}") from None


def _check_param(key: str, p: ParamSpec, path: Path) -> None:
    where = f"{path}: search.{key}"
    look_up_option(p.type, PARAM_TYPES, f"{where}.type")
    if p.type == "categorical":
        if not p.choices:
            raise ConfigError(f"{where}: categorical needs a non-empty 'choices' list")
        return
    if p.low is None or p.high is None or not p.low <= p.high:
        raise ConfigError(f"{where}: a {p.type} range needs low <= high, got low={p.low} high={p.high}")
    if p.log and p.low <= 0:
        raise ConfigError(f"{where}: log: true needs low > 0")
    if p.log and p.step is not None:
        raise ConfigError(f"{where}: step and log: true cannot be combined (Optuna)")
    if p.type == "int" and (p.low != int(p.low) or p.high != int(p.high)):
        raise ConfigError(f"{where}: int range bounds must be integers")


def grid_values(key: str, p: ParamSpec, path: Path | str = "sweep") -> list[Any]:
    """The values a grid sweep tries for one key: the choices, or low..high in steps."""
    if p.type == "categorical":
        return list(p.choices)
    if p.step is None:
        raise ConfigError(f"{path}: search.{key}: a grid sweep needs 'choices' or a range with 'step'")
    count = int(math.floor((p.high - p.low) / p.step + 1e-9)) + 1
    values = [p.low + i * p.step for i in range(count)]
    return [int(round(v)) for v in values] if p.type == "int" else [round(v, 12) for v in values]


def first_value(p: ParamSpec) -> Any:
    if p.type == "categorical":
        return p.choices[0]
    return int(p.low) if p.type == "int" else float(p.low)


def trial_overrides(spec: SweepSpec, params: dict[str, Any]) -> list[str]:
    """The trainer overrides of one trial: fixed ones, budget, shards, then the sampled values."""
    out = list(spec.overrides)
    if spec.budget.steps:
        out.append(f"train.steps={spec.budget.steps}")
    if spec.pruner.every:
        out.append(f"train.val_every={spec.pruner.every}")
    if spec.shards:
        out.append(f"data.shards={spec.shards}")
    # JSON is a YAML flow scalar/mapping, which is how train.py parses override values.
    out += [f"{key}={json.dumps(value)}" for key, value in params.items()]
    return out


# --------------------------------------------------------------------------- metrics of a spec


def metric_kind(name: str, where: str = "metric") -> str:
    kind, _, rest = name.partition("/")
    if kind not in ("eval", "valid", "train") or not rest:
        raise ConfigError(f"{where} {name!r}: must be eval/<...>, valid/<key> or train/<key>")
    return kind


def pruning_metric(spec: SweepSpec) -> str:
    if spec.pruner.metric:
        return spec.pruner.metric
    objective = spec.objective.metric
    if objective.startswith("valid/"):
        return objective
    if objective.startswith("eval/mean_R@"):
        return "valid/" + objective[len("eval/"):]
    return "valid/loss"


def pruning_sign(spec: SweepSpec) -> float:
    """+1 if the pruning metric improves in the objective's direction, else -1 (the value is negated)."""
    if spec.pruner.direction:
        return 1.0 if spec.pruner.direction == spec.objective.direction else -1.0
    if spec.pruner.metric or spec.objective.metric.startswith(("valid/", "eval/mean_R@")):
        return 1.0
    return 1.0 if spec.objective.direction == "minimize" else -1.0  # default valid/loss: lower is better
