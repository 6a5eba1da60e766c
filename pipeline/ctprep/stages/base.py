"""Stage framework: specs, keys, stage lookup, and the atomic output helpers (from ``ctprep.atomic``).

The pipeline is a fixed sequence of named stages (``STAGE_ORDER``):
``scan -> resample -> regions -> text -> pack``. Each stage is a
:class:`StageSpec` declared by the stage's own module (``ctprep.stages.<name>``);
the fixed list of them is ``ctprep.stages.STAGES`` (the package imports its five
modules explicitly), and the runner (``ctprep.runner``) looks stages up with
:func:`get_stage` / :func:`list_stages`.

Two kinds of stages
-------------------
* **per-case** (``kind="case"``: resample, regions, text): one Dask task per
  case. The stage provides ``run(task: CaseTask) -> dict`` that reads its
  inputs, calls the stage's *pure* function (arrays in, arrays out), and
  writes exactly ``task.output_path`` (atomically, see :func:`atomic_path`).
  It returns a small JSON-able ``info`` dict that the manifest records.
  It raises :class:`~ctprep.quarantine.QuarantineError` for a bad case;
  any other exception is also caught on the worker and quarantines the case
  as ``stage_error`` (bad input never stops the run).
* **aggregate** (``kind="aggregate"``: pack): runs once on the driver with
  every case whose upstream stages are done, ``run(task: AggregateTask) ->
  list[CaseResult]``. It may fan out over ``task.client`` itself. It must
  return one :class:`CaseResult` per case it (re)processed; cases it did not
  touch keep their manifest rows.

(``scan`` has ``kind="scan"``: the runner drives it itself on the driver.)

Keys
----
``key = hash(stage name, input fingerprint, upstream keys, config slice, version)``
where the *input fingerprint* hashes only the :class:`CaseInput` fields the
stage declares in ``case_fields`` (``"files"`` means the files' *content*
hashes, not their paths), the *config slice* is
``spec.config_slice(pipeline_config)`` (JSON-able) and ``version`` is the
stage's code version string (bump it when the output for the same input
changes). A stage is up to date for a case when the manifest row has the
same key (and, for done rows, the output still exists). The components are
recorded too, so ``ctprep status`` can say *why* a case is stale.

Declaring a stage (in ``ctprep/stages/<name>.py``; the decorator validates the spec and
attaches it to the function as ``run_regions.spec``, which ``ctprep.stages.STAGES`` lists)::

    from ctprep.stages.base import CaseTask, case_stage

    @case_stage("regions", upstream=("resample",), version="1",
                config_slice=lambda c: {"patch": c.regions.patch_size_zyx,
                                        "regions": c.regions.names},
                output=lambda case_id: f"regions/{case_id}.npy")
    def run_regions(task: CaseTask) -> dict:
        zarr_path = task.upstream["resample"].path     # absolute path of the upstream output
        ... pure function ...
        with atomic_path(task.output_path) as tmp:
            np.save(tmp, arr)   # tmp has the same suffix as the final path
        return {"patches": int(arr.shape[0])}

    @aggregate_stage("pack", upstream=("resample", "regions", "text"), version="1",
                     config_slice=lambda c: to_jsonable(c.pack), case_fields=("labels", "split"))
    def run_pack(task: AggregateTask) -> list[CaseResult]:
        for c in task.cases: ... c.changed, c.key, c.upstream["text"].path, c.previous ...
        return [CaseResult.done(c, output="train/shard-000001.tar", info={...}) ...]
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from ctprep.atomic import atomic_path, remove_temp_debris  # re-exported: stages write through them
from ctprep.config import PipelineConfig, stable_hash
from ctprep.quarantine import Quarantine, QuarantineError
from ctprep.sources.base import CaseInput

if TYPE_CHECKING:
    from distributed import Client

__all__ = [
    "STAGE_ORDER",
    "StageSpec",
    "StageOutput",
    "CaseTask",
    "CaseResult",
    "AggregateCase",
    "AggregateTask",
    "case_stage",
    "aggregate_stage",
    "register_stage",
    "get_stage",
    "list_stages",
    "input_fingerprint",
    "stage_key",
    "atomic_path",
    "remove_temp_debris",
    "QuarantineError",
]

STAGE_ORDER = ("scan", "resample", "regions", "text", "pack")

StageKind = Literal["scan", "case", "aggregate"]
CASE_FIELDS = ("files", "meta", "text", "labels", "split", "source")


@dataclass(frozen=True)
class StageSpec:
    """A stage of the pipeline (listed in ``ctprep.stages.STAGES``).

    Attributes:
        name: stage name (one of ``STAGE_ORDER``).
        kind: "scan" | "case" | "aggregate" (see module docstring).
        upstream: stages whose outputs this stage reads; their keys enter this key.
        version: code version string; bump when outputs change for the same inputs.
        config_slice: ``PipelineConfig -> JSON-able``: the part of the config that
            determines this stage's output (and nothing else, or it reruns needlessly).
        case_fields: CaseInput fields hashed into the input fingerprint
            (subset of ``CASE_FIELDS``; "source" and the case id are always included).
        run: per-case ``CaseTask -> dict`` (worker) or aggregate ``AggregateTask -> list[CaseResult]`` (driver).
        output: per-case only: ``case_id -> path relative to the work dir``.
    """

    name: str
    kind: StageKind
    upstream: tuple[str, ...]
    version: str
    config_slice: Callable[[PipelineConfig], Any]
    case_fields: tuple[str, ...] = ()
    run: Callable[..., Any] | None = None
    output: Callable[[str], str] | None = None

    def config_hash(self, config: PipelineConfig) -> str:
        return stable_hash(self.config_slice(config))


@dataclass
class StageOutput:
    """Where an upstream stage left a case's output (absolute path) and what it recorded."""

    path: str
    key: str
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class CaseTask:
    """Everything one per-case stage run needs; shipped to a Dask worker.

    Attributes:
        stage: stage name.
        case: the case's scan record.
        key: this stage's key for the case (record it in the output's attrs if useful).
        output_path: absolute path to write (atomically) — ``work_dir / spec.output(case_id)``.
        work_dir: absolute work directory.
        config: the full pipeline config (read only your slice: it is all that keys you).
        upstream: upstream stage name -> :class:`StageOutput`.
    """

    stage: str
    case: CaseInput
    key: str
    output_path: str
    work_dir: str
    config: PipelineConfig
    upstream: dict[str, StageOutput] = field(default_factory=dict)


# ``CaseResult.info[NOTES_KEY]``: {note: count} a done case wants counted in the build summary
# (e.g. "reports cut at text.max_len_report": 1); the case itself is fine and trains.
NOTES_KEY = "notes"


@dataclass
class CaseResult:
    """Outcome of one (case, stage); the runner writes it to the manifest.

    ``output`` is an absolute path for per-case stages (filled in by the
    runner) and a path relative to ``OUT`` for aggregate stages.
    """

    case_id: str
    stage: str
    key: str
    status: Literal["done", "quarantined"]
    output: str | None = None
    info: dict[str, Any] = field(default_factory=dict)
    kind: str | None = None
    reason: str | None = None
    seconds: float = 0.0

    @classmethod
    def done(cls, case: AggregateCase, stage: str, output: str | None, info: dict[str, Any] | None = None) -> CaseResult:
        return cls(case.case.case_id, stage, case.key, "done", output, dict(info or {}))

    @classmethod
    def quarantined(cls, case: AggregateCase, stage: str, kind: str, reason: str) -> CaseResult:
        err = QuarantineError(kind, reason)  # validates kind, one-lines the reason
        return cls(case.case.case_id, stage, case.key, "quarantined", None, {}, err.kind, err.reason)

    def to_quarantine(self, case: CaseInput) -> Quarantine:
        return Quarantine(case=self.case_id, stage=self.stage, kind=self.kind or "", reason=self.reason or "",
                          source=case.source, paths=dict(case.files))


@dataclass
class AggregateCase:
    """One case as seen by an aggregate stage.

    Attributes:
        case: the scan record.
        key: this stage's current key for the case.
        upstream: upstream stage -> :class:`StageOutput` (all done with current keys).
        changed: True if the manifest has no up-to-date row for (case, this stage).
        previous: the manifest row for (case, this stage) if any: dict with
            ``key, status, output, info, kind, reason`` (output relative to OUT).
    """

    case: CaseInput
    key: str
    upstream: dict[str, StageOutput]
    changed: bool
    previous: dict[str, Any] | None = None


@dataclass
class AggregateTask:
    """Input of an aggregate stage run (driver side).

    ``cases`` are sorted by (source, split, case_id) — a deterministic order.
    ``dropped`` are case ids that have a previous done row for this stage but
    are no longer eligible (removed from the source, or now quarantined
    upstream); the stage decides what that means for its outputs.
    ``gone`` is the part of ``dropped`` that is really gone: no longer present in its source,
    or quarantined in an earlier stage (the runner reads that from the manifest). The rest of
    ``dropped`` was only not part of this run (a source root not scanned this time, upstream
    stages not run), and its outputs stay. None: every dropped case counts as gone.
    ``client`` is the Dask client (None when running without one).
    """

    stage: str
    cases: list[AggregateCase]
    work_dir: Path
    out_dir: Path
    config: PipelineConfig
    dropped: list[str] = field(default_factory=list)
    client: Client | None = None
    gone: frozenset[str] | None = None


def register_stage(spec: StageSpec) -> StageSpec:
    """Check ``spec`` against the pipeline's fixed shape and return it.

    Nothing is recorded here: the list of stages is ``ctprep.stages.STAGES``. The name is
    kept for the stage modules that declare their spec with it (``scan.SCAN``).
    """
    if spec.name not in STAGE_ORDER:
        raise ValueError(f"unknown stage name {spec.name!r}; stages are {STAGE_ORDER}")
    bad = [u for u in spec.upstream if u not in STAGE_ORDER or STAGE_ORDER.index(u) >= STAGE_ORDER.index(spec.name)]
    if bad:
        raise ValueError(f"stage {spec.name!r}: upstream {bad} must be earlier stages of {STAGE_ORDER}")
    bad = [f for f in spec.case_fields if f not in CASE_FIELDS]
    if bad:
        raise ValueError(f"stage {spec.name!r}: unknown case_fields {bad}; valid: {CASE_FIELDS}")
    if spec.kind == "case" and spec.output is None:
        raise ValueError(f"per-case stage {spec.name!r} needs output=")
    return spec


def case_stage(
    name: str,
    *,
    upstream: tuple[str, ...],
    version: str,
    config_slice: Callable[[PipelineConfig], Any],
    output: Callable[[str], str],
    case_fields: tuple[str, ...] = (),
) -> Callable[[Callable[[CaseTask], dict[str, Any]]], Callable[[CaseTask], dict[str, Any]]]:
    """Decorator declaring a per-case stage: the decorated function is ``run``, the
    :class:`StageSpec` is attached to it as ``fn.spec`` (the function stays callable as is)."""

    def deco(fn: Callable[[CaseTask], dict[str, Any]]) -> Callable[[CaseTask], dict[str, Any]]:
        fn.spec = register_stage(StageSpec(name, "case", tuple(upstream), str(version), config_slice,  # type: ignore[attr-defined]
                                           tuple(case_fields), fn, output))
        return fn

    return deco


def aggregate_stage(
    name: str,
    *,
    upstream: tuple[str, ...],
    version: str,
    config_slice: Callable[[PipelineConfig], Any],
    case_fields: tuple[str, ...] = (),
) -> Callable[[Callable[[AggregateTask], list[CaseResult]]], Callable[[AggregateTask], list[CaseResult]]]:
    """Decorator declaring an aggregate (driver-side) stage; as :func:`case_stage`, the spec is ``fn.spec``."""

    def deco(fn: Callable[[AggregateTask], list[CaseResult]]) -> Callable[[AggregateTask], list[CaseResult]]:
        fn.spec = register_stage(StageSpec(name, "aggregate", tuple(upstream), str(version), config_slice,  # type: ignore[attr-defined]
                                           tuple(case_fields), fn, None))
        return fn

    return deco


def _stages() -> dict[str, StageSpec]:
    # The list lives in the package, which imports the stage modules, which import this module:
    # reading it at call time (never at import) is what keeps that from being a cycle.
    from ctprep.stages import STAGES

    return STAGES


def get_stage(name: str) -> StageSpec:
    """The stage ``name``; unknown names fail with the valid choices."""
    stages = _stages()
    if name not in stages:
        raise ValueError(f"unknown stage {name!r}; available: {', '.join(stages)}")
    return stages[name]


def list_stages() -> list[StageSpec]:
    """All stages in pipeline order (``STAGE_ORDER``)."""
    return list(_stages().values())


def input_fingerprint(case: CaseInput, fields: tuple[str, ...], file_hashes: dict[str, str]) -> str:
    """Hash of the parts of ``case`` a stage reads.

    Args:
        case: the scan record.
        fields: ``StageSpec.case_fields``.
        file_hashes: role -> content hash of ``case.files`` (from the scan stage).
    """
    parts: dict[str, Any] = {"case_id": case.case_id, "source": case.source}
    for f in fields:
        parts[f] = dict(sorted(file_hashes.items())) if f == "files" else getattr(case, f)
    return stable_hash(parts)


def stage_key(spec: StageSpec, input_fp: str, upstream_keys: dict[str, str], config_hash: str) -> str:
    """``hash(stage name, input fingerprint, upstream keys, config slice hash, code version)``."""
    return stable_hash({
        "stage": spec.name,
        "input": input_fp,
        "upstream": {u: upstream_keys[u] for u in spec.upstream},
        "config": config_hash,
        "version": spec.version,
    })
