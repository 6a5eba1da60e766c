"""The report of a sweep (``ctprep_train.sweep``), written from the Optuna storage alone.

``OUT/report/`` holds:

* ``results.csv`` / ``results.md``: one row per trial (state, objective, parameters, the
  headline metrics the trial reached, where it was pruned, its run folder);
* ``best_config.yaml``: ``extends:`` the base config plus the fixed overrides and the best trial's
  values, for ``train.py --config`` (a longer run: raise ``train.steps``);
* ``history.png`` (objective per trial and best so far), ``importance.png`` (Optuna's parameter
  importance on the complete trials: fANOVA, or PED-ANOVA without scikit-learn), ``params.png``
  (objective against each parameter), ``curves.png`` (the pruning metric over steps, pruned trials grey crosses);
* ``report.md`` tying them together.
"""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path
from typing import Any

import yaml

from ctprep.typed_config import set_dotted
from ctprep_train.config import load_config


def trial_rows(study, spec) -> tuple[list[str], list[dict[str, Any]]]:
    """(columns, one dict per trial in number order) for the results table."""
    trials = sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)
    params = list(spec.search)
    extra = sorted({k for t in trials for k in t.user_attrs if "/" in k})
    columns = ["trial", "state", spec.objective.metric, *params, *extra, "pruned_at_step", "train_s", "run_dir"]
    rows = []
    for t in trials:
        # Optuna gives a pruned trial the last pruning-metric value as its value: not the objective
        value = t.value if t.state.name == "COMPLETE" else None
        row: dict[str, Any] = {"trial": t.number, "state": t.state.name.lower(), spec.objective.metric: value}
        row.update({p: t.params.get(p) for p in params})
        row.update({k: t.user_attrs.get(k) for k in extra})
        row["pruned_at_step"] = max(t.intermediate_values) if t.state.name == "PRUNED" and t.intermediate_values else None
        row["train_s"] = t.user_attrs.get("train_s")
        run_dir = t.user_attrs.get("run_dir")
        row["run_dir"] = os.path.relpath(run_dir, spec.output) if run_dir else None
        rows.append(row)
    return columns, rows


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def markdown_table(columns: list[str], rows: list[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def best_trial(study):
    try:
        return study.best_trial
    except ValueError:  # no complete trial yet
        return None


def best_config(spec, trial) -> dict[str, Any]:
    """A training YAML tree: ``extends`` the base (path relative to the report folder) + overrides."""
    from ctprep_train.sweep import trial_overrides

    report = Path(spec.output) / "report"
    tree: dict[str, Any] = {"extends": os.path.relpath(spec.base, report)}
    for item in trial_overrides(spec, dict(trial.params)):
        key, raw = item.split("=", 1)
        set_dotted(tree, key, yaml.safe_load(raw))
    tree.setdefault("train", {})["output"] = str(Path(spec.output) / "best_run")
    return tree


def write_best_config(spec, trial, path: Path) -> None:
    header = (f"# Best trial {trial.number} of sweep {spec.study!r}: {spec.objective.metric} = {trial.value:.6g} "
              f"({spec.objective.direction}).\n# Train it: python trainer/train.py --config {path}\n")
    path.write_text(header + yaml.safe_dump(best_config(spec, trial), sort_keys=False))
    load_config(path)  # the file must load as it is (unknown keys, types)


def write_report(study, spec) -> Path:
    """Write ``OUT/report/`` (table, best config, pictures, report.md); returns the folder."""
    out = Path(spec.output) / "report"
    out.mkdir(parents=True, exist_ok=True)
    columns, rows = trial_rows(study, spec)
    with (out / "results.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows([{c: "" if row.get(c) is None else row[c] for c in columns} for row in rows])
    table = markdown_table(columns, rows)
    (out / "results.md").write_text(table + "\n")
    best = best_trial(study)
    if best is not None:
        write_best_config(spec, best, out / "best_config.yaml")
    pictures, notes = draw_pictures(study, spec, out)
    lines = [f"# Sweep `{spec.study}`", "",
             f"Base config `{spec.base}`; objective `{spec.objective.metric}` ({spec.objective.direction}); "
             f"sampler {spec.sampler.name} (seed {spec.sampler.seed}); pruner {spec.pruner.name}; "
             f"storage `{spec.storage}`.", "", table, ""]
    if best is not None:
        lines += [f"Best: trial {best.number}, {spec.objective.metric} = {best.value:.4g}, "
                  + ", ".join(f"`{k}={_fmt(v)}`" for k, v in best.params.items())
                  + ". Config: [best_config.yaml](best_config.yaml).", ""]
    lines += [f"![{name}]({name})" for name in pictures] + [""] + [f"- {n}" for n in notes]
    (out / "report.md").write_text("\n".join(lines).rstrip() + "\n")
    return out


def draw_pictures(study, spec, out: Path) -> tuple[list[str], list[str]]:
    """The PNGs that the trials allow; (file names, notes on the ones skipped)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    done = [t for t in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)
            if t.state.name == "COMPLETE" and t.value is not None and math.isfinite(t.value)]
    names, notes = [], []
    if not done:
        return names, ["no complete trial yet: no pictures"]
    metric = spec.objective.metric
    maximize = spec.objective.direction == "maximize"

    fig, ax = plt.subplots(figsize=(6, 3.5))
    xs, ys = [t.number for t in done], [t.value for t in done]
    best = [max(ys[: i + 1]) if maximize else min(ys[: i + 1]) for i in range(len(ys))]
    ax.plot(xs, ys, "o", label="trial")
    ax.step(xs, best, where="post", color="C3", label="best so far")
    ax.set(xlabel="trial", ylabel=metric, title=f"optimisation history ({spec.objective.direction})")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend()
    names.append(_save(fig, out / "history.png"))

    evaluator, importance = _importances(study)
    if len(set(ys)) < 2:  # a variance decomposition of a constant: every evaluator returns equal shares
        importance = "needs two or more complete trials with different objective values"
    if isinstance(importance, str):
        notes.append(f"parameter importance ({evaluator}) not drawn: {importance}")
    else:
        fig, ax = plt.subplots(figsize=(6, 0.5 + 0.5 * len(importance)))
        keys = list(importance)[::-1]
        ax.barh(keys, [importance[k] for k in keys])
        ax.set(xlabel=f"importance ({evaluator}, normalised)", title="parameter importance")
        names.append(_save(fig, out / "importance.png"))

    params = list(spec.search)
    fig, axes = plt.subplots(1, len(params), figsize=(3.2 * len(params), 3), squeeze=False)
    for ax, key in zip(axes[0], params):
        p = spec.search[key]
        values = [t.params.get(key) for t in done]
        if p.type == "categorical":
            labels = [str(c) for c in p.choices]
            ax.plot([labels.index(str(v)) for v in values], ys, "o")
            ax.set_xticks(range(len(labels)), labels, rotation=30)
        else:
            ax.plot(values, ys, "o")
            if p.log:
                ax.set_xscale("log")
        ax.set(xlabel=key, ylabel=metric)
    fig.suptitle("objective against each parameter")
    names.append(_save(fig, out / "params.png"))

    curves = [t for t in study.get_trials(deepcopy=False) if t.intermediate_values]
    if curves:
        from ctprep_train.sweep import pruning_metric, pruning_sign

        sign = pruning_sign(spec)
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for t in sorted(curves, key=lambda t: t.number):
            steps = sorted(t.intermediate_values)
            pruned = t.state.name == "PRUNED"
            ax.plot(steps, [sign * t.intermediate_values[s] for s in steps], "x--" if pruned else "-o",
                    color="grey" if pruned else None, label=f"{t.number}{' (pruned)' if pruned else ''}")
        ax.set(xlabel="step", ylabel=pruning_metric(spec), title="validation during training")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize=7, ncol=2)
        names.append(_save(fig, out / "curves.png"))
    return names, notes


def _importances(study) -> tuple[str, dict[str, float] | str]:
    """(evaluator name, importances or why there are none).

    fANOVA (a random forest over the trials; Optuna's default before 4.x, the method of its
    papers) when scikit-learn is installed, as in the [dev] extra; else PED-ANOVA (Optuna's own,
    no dependency), which compares the top 10% of trials with the rest and so needs more trials.
    """
    import warnings

    import optuna

    try:
        import sklearn  # noqa: F401

        name, evaluator = "fANOVA", optuna.importance.FanovaImportanceEvaluator(seed=0)
    except ImportError:
        name, evaluator = "PED-ANOVA", optuna.importance.PedAnovaImportanceEvaluator()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            importance = optuna.importance.get_param_importances(study, evaluator=evaluator)
        except (RuntimeError, ValueError) as err:  # too few complete trials, or no parameter varies
            return name, str(err)
    degenerate = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    if degenerate:  # Optuna returns equal importances with a warning when the trials cannot rank them
        return name, " ".join(degenerate)
    return name, importance


def _save(fig, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path.name
