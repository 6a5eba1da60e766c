"""The driver: scan sources, decide what is stale, run stages on Dask, record results.

Only this module and ``ctprep.cluster`` (the client and local cluster) touch Dask. Flow of :func:`build`:

1. **scan** every ``--src`` root (driver; file hashing may fan out), write the
   ``cases`` rows and a ``scan`` row per case (done, or quarantined with a reason).
2. compute every case's current key for every registered stage
   (:func:`current_keys`) — pure hashing, no I/O.
3. for each requested stage in pipeline order: a case is *eligible* when its
   scan and all upstream stages are done with their current keys; it is *up
   to date* when its row has the current key (and a done row's output still
   exists). Eligible, not-up-to-date cases run: per-case stages as one Dask
   task each (:func:`execute_case` on a worker), aggregate stages once on the
   driver. Each result is written to the manifest as it arrives, after the
   worker has moved the output into place.
4. rewrite ``OUT/quarantine.jsonl`` from the manifest, print a summary line.

Killing the driver or a worker at any point is safe: outputs are written to
temporary names and renamed, and the manifest only learns about an output
after it exists; a rerun redoes exactly the cases whose rows are missing or stale.

Beside it: ``ctprep.worker`` (what a task runs on a worker and how its failures are classed),
``ctprep.keys`` (stage keys and staleness, shared with ``ctprep.status``), ``ctprep.cluster``
(the Dask client).
"""

from __future__ import annotations

import contextlib
import functools
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ctprep.cluster import Cluster
from ctprep.config import PipelineConfig, stable_hash, to_jsonable
from ctprep.errors import UserError
from ctprep.keys import (  # noqa: F401 (current_keys, stale_reason re-exported)
    KeyParts,
    current_keys,
    eligibility,
    output_abspath,
    output_ok,
    relpath_or_abs,
    stale_reason,
)
from ctprep.lock import folder_lock
from ctprep.manifest import MANIFEST_FILE, Manifest, StageRow, work_dir_for
from ctprep.quarantine import STAGE_ERROR, Quarantine, one_line, write_quarantine_jsonl
from ctprep.sources.base import CaseInput, detect_source, is_inside
from ctprep.sources.cot import delivery_warnings
from ctprep.stages.base import (
    NOTES_KEY,
    STAGE_ORDER,
    AggregateCase,
    AggregateTask,
    CaseResult,
    CaseTask,
    StageOutput,
    StageSpec,
    get_stage,
    list_stages,
    remove_temp_debris,
    stage_key,
)
from ctprep.status import status  # noqa: F401 (re-exported)
from ctprep.worker import (  # noqa: F401 (re-exported)
    CLUSTER_FAILURE,
    ENVIRONMENT_FAILURE,
    TASK_TIMEOUT_S,
    TIMEOUT,
    environment_cause,
    execute_case,
    execute_case_within,
    is_retryable,
)

__all__ = ["MANIFEST_FILE", "QUARANTINE_FILE", "BuildReport", "StageTally", "build", "resolve_stages", "status",
           "work_dir_for", "current_keys", "execute_case", "environment_cause", "Cluster"]

QUARANTINE_FILE = "quarantine.jsonl"


# --------------------------------------------------------------------- build
@dataclass
class StageTally:
    """What one stage did in one run."""

    ran: int = 0
    done: int = 0
    quarantined: Counter = field(default_factory=Counter)
    up_to_date: int = 0
    waiting: int = 0  # upstream not done yet (e.g. not requested)
    blocked: int = 0  # quarantined upstream
    failed: Counter = field(default_factory=Counter)  # environment/cluster cause -> count (retried next run)
    seconds: float = 0.0
    notes: Counter = field(default_factory=Counter)  # done cases' NOTES_KEY counts (e.g. truncated text)


@dataclass
class BuildReport:
    """Result of :func:`build`."""

    cases: int
    scan_quarantined: Counter
    tallies: dict[str, StageTally]
    stages: list[str]
    quarantined_total: int
    done_final: int  # cases done in the last requested stage (up to date after the run)
    exit_code: int
    summary: str



def resolve_stages(stages: str | Iterable[str] | None) -> list[str]:
    """``"scan,resample"`` -> ordered list of registered stages (scan always included)."""
    registered = [s.name for s in list_stages()]
    if stages is None or stages == "" or stages == "all":
        wanted = registered
    else:
        names = [s.strip() for s in (stages.split(",") if isinstance(stages, str) else stages) if s.strip()]
        unknown = [n for n in names if n not in STAGE_ORDER]
        if unknown:
            raise ValueError(f"unknown stage(s) {unknown}; stages are {', '.join(STAGE_ORDER)}")
        missing = [n for n in names if n not in registered]
        if missing:
            raise ValueError(f"stage(s) {missing} are not available in this install (registered: {registered})")
        wanted = names
    return [n for n in STAGE_ORDER if n in wanted or n == "scan"]


def build(
    srcs: list[str | Path],
    out: str | Path,
    config: PipelineConfig,
    *,
    work: str | Path | None = None,
    stages: str | Iterable[str] | None = None,
    source: str | None = None,
    scheduler: str | None = None,
    workers: int | None = None,
    retries: int = 2,
    memory_limit: str | None = None,
    strict: bool = False,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    task_timeout: float | None = TASK_TIMEOUT_S,
) -> BuildReport:
    """Run the pipeline (see module docstring). Returns a :class:`BuildReport`; never raises for bad cases."""
    log = log or (lambda msg: print(msg, file=sys.stderr))
    out = Path(out).resolve()
    work_dir = work_dir_for(out, Path(work) if work else None)
    wanted = resolve_stages(stages)
    with contextlib.ExitStack() as locks:
        # One writer per output: a second build on the same --out (or --work) stops here at once.
        locks.enter_context(folder_lock(out))
        if not is_inside(work_dir, out):
            locks.enter_context(folder_lock(work_dir))
        return _build_locked(srcs, out, work_dir, config, wanted, source, scheduler, workers, retries,
                             memory_limit, strict, progress, log, task_timeout)


def _build_locked(srcs, out: Path, work_dir: Path, config: PipelineConfig, wanted: list[str], source, scheduler,
                  workers, retries, memory_limit, strict, progress, log, task_timeout=TASK_TIMEOUT_S) -> BuildReport:
    specs = list_stages()
    try:
        work_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the work folder {work_dir}: {e.strerror or e}") from e
    cluster = Cluster(scheduler, workers, retries=retries, memory_limit=memory_limit)
    cluster.log = log
    manifest = Manifest(work_dir / MANIFEST_FILE)
    try:
        manifest.set_setting("config", to_jsonable(config))
        cases, file_hashes, scan_q = _run_scan(srcs, source, config, manifest, cluster, log, progress)
        manifest.set_setting("sources", [{"root": str(Path(s).resolve()), "source": n} for s, n in _source_names(srcs, source)])
        keys = {c.case_id: current_keys(c, file_hashes[c.case_id], config, specs) for c in cases}
        tallies: dict[str, StageTally] = {}
        for name in wanted[1:]:
            spec = get_stage(name)
            t0 = time.perf_counter()
            if spec.kind == "case":
                tallies[name] = _run_case_stage(spec, cases, keys, config, manifest, cluster, work_dir, out, progress,
                                                task_timeout)
            else:
                tallies[name] = _run_aggregate_stage(spec, cases, keys, config, manifest, cluster, work_dir, out)
            tallies[name].seconds = time.perf_counter() - t0
        quarantined = _write_quarantine_file(manifest, out)
        report = _report(cases, scan_q, tallies, wanted, quarantined, manifest, keys, work_dir, out, strict)
        log(report.summary)
        return report
    finally:
        manifest.close()
        cluster.close()


def _source_names(srcs: list[str | Path], source: str | None) -> list[tuple[Path, str]]:
    return [(Path(s), source or detect_source(s)) for s in srcs]


def _run_scan(srcs, source, config, manifest: Manifest, cluster: Cluster, log, progress: bool = False):
    scan_spec = get_stage("scan")
    cases: list[CaseInput] = []
    file_hashes: dict[str, dict[str, str]] = {}
    scan_q: list[Quarantine] = []
    seen: dict[str, str] = {}

    def hash_map(batches):
        from ctprep.stages.scan import hash_files

        total = sum(len(b) for b in batches)
        bar = _progress_bar(total, "hash", progress and total >= 64)
        if total < 64 and cluster.client is None:  # not worth starting a cluster
            return [hash_files(b) for b in batches]
        out = []
        for batch, r in cluster.map(hash_files, batches):
            if not isinstance(r, BaseException):
                out.append(r)
            if bar is not None:
                bar.update(len(batch))
        if bar is not None:
            bar.close()
        return out

    from ctprep.stages.scan import scan_root

    for root, name in _source_names(srcs, source):
        res = scan_root(root, name, config, manifest, hash_map=hash_map)
        present = set()
        with manifest.tx():
            for case in res.cases:
                if case.case_id in seen:  # same id under two roots: keep the first, quarantine the other
                    scan_q.append(Quarantine(case.case_id, "scan", "duplicate_case",
                                             f"case id also found under {seen[case.case_id]}", name, dict(case.files)))
                    continue
                seen[case.case_id] = res.root
                present.add(case.case_id)
                fh = res.file_hashes[case.case_id]
                parts = current_keys(case, fh, config, [scan_spec])["scan"]
                manifest.put_case(case, res.root, fh)
                manifest.put_stage(StageRow(case.case_id, "scan", parts.key, parts.input_fp, {}, parts.config_hash,
                                            parts.version, "done", None, None, None, {}))
                cases.append(case)
                file_hashes[case.case_id] = fh
            for q in res.quarantined:
                scan_q.append(q)
                if q.case in seen:
                    continue
                present.add(q.case)
                stub = CaseInput(case_id=q.case, source=name, split="", files=dict(q.paths))
                fp = stable_hash({"kind": q.kind, "reason": q.reason, "files": q.paths})
                manifest.put_case(stub, res.root, {})
                ch = scan_spec.config_hash(config)
                manifest.put_stage(StageRow(q.case, "scan", stage_key(scan_spec, fp, {}, ch), fp, {}, ch,
                                            scan_spec.version, "quarantined", None, q.kind, q.reason, {}))
            gone = manifest.mark_absent(res.root, name, present)
        msg = f"scan {res.root} ({name}): {len(res.cases)} cases, {len(res.quarantined)} quarantined"
        if res.hashed:
            msg += f", {res.hashed} files hashed"
        if gone:
            msg += f", {len(gone)} no longer present"
        msg += mask_tree_note(res.cases)
        log(msg)
        for problem in res.problems[:20]:
            log(f"  input problem (no case named, nothing quarantined): {problem}")
        if len(res.problems) > 20:
            log(f"  ... {len(res.problems) - 20} more input problems")
    # --cot files are merged by each source; only the whole build knows which records name no case
    known = set(seen) | {q.case for q in scan_q}
    for line in delivery_warnings(config, {n for _, n in _source_names(srcs, source)}, known):
        log(line)
    cases.sort(key=lambda c: (c.source, c.split, c.case_id))
    return cases, file_hashes, scan_q


def mask_tree_note(cases: list[CaseInput]) -> str:
    """"; anatomy masks: ts_total; other mask trees not used: ..." from the cases' provenance ("" if none)."""
    used = sorted({c.provenance["mask_tree"] for c in cases if c.provenance.get("mask_tree")})
    other = sorted({t for c in cases for t in c.provenance.get("other_masks", {})} - set(used))
    note = f"; anatomy masks: {', '.join(used)}" if used else ""
    if other:
        note += f"; other mask trees not used (not anatomy maps): {', '.join(other)}"
    return note



def _run_case_stage(spec: StageSpec, cases, keys, config, manifest: Manifest, cluster: Cluster,
                    work: Path, out: Path, progress: bool, task_timeout: float | None = TASK_TIMEOUT_S) -> StageTally:
    tally = StageTally()
    rows = manifest.stage_rows()
    todo: list[CaseTask] = []
    parts_of: dict[str, KeyParts] = {}
    by_id = {c.case_id: c for c in cases}
    for case in cases:
        parts = keys[case.case_id].get(spec.name)
        if parts is None:
            tally.waiting += 1
            continue
        state = eligibility(spec, case, keys[case.case_id], rows, work, out)
        if state != "ok":
            setattr(tally, state, getattr(tally, state) + 1)
            continue
        row = rows.get((case.case_id, spec.name))
        if stale_reason(row, parts, output_ok(spec, row, work, out)) is None:
            tally.up_to_date += 1
            continue
        upstream = {u: StageOutput(output_abspath(rows[(case.case_id, u)].output, get_stage(u), work, out),
                                   rows[(case.case_id, u)].key, rows[(case.case_id, u)].info) for u in spec.upstream}
        output_path = str(work / spec.output(case.case_id))
        todo.append(CaseTask(spec.name, case, parts.key, output_path, str(work), config, upstream))
        parts_of[case.case_id] = parts
    if not todo:
        return tally
    folders = {Path(t.output_path).parent for t in todo}
    for folder in folders:
        remove_temp_debris(folder)
    bar = _progress_bar(len(todo), spec.name, progress)
    for task, result in _map_with_retry(cluster, todo, task_timeout):
        if isinstance(result, BaseException):  # e.g. the worker died on this case again and again (memory?)
            result = CaseResult(task.case.case_id, spec.name, task.key, "quarantined", kind=type(result).__name__,
                                reason=one_line(f"task failed on the cluster: {type(result).__name__}: {result}"),
                                info={CLUSTER_FAILURE: True})
        tally.ran += 1
        parts = parts_of[result.case_id]
        case = by_id[result.case_id]
        if result.status == "done":
            tally.done += 1
            tally.notes.update(result.info.get(NOTES_KEY) or {})
            output = relpath_or_abs(result.output or task.output_path, work)
        elif is_retryable(result):
            tally.failed[result.kind or STAGE_ERROR] += 1
            output = None
        else:
            tally.quarantined[result.kind or STAGE_ERROR] += 1
            output = None
        info = dict(result.info)
        info["seconds"] = round(result.seconds, 3)
        manifest.put_stage(StageRow(case.case_id, spec.name, parts.key, parts.input_fp, parts.upstream,
                                    parts.config_hash, parts.version, result.status, output, result.kind,
                                    result.reason, info))
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    # Every task of this stage has returned: what is still named *.tmp-* belongs to a writer
    # whose worker died mid-task (its retry wrote and renamed its own temp), so it goes now.
    for folder in folders:
        remove_temp_debris(folder)
    return tally


RETRY_PAUSE_S = 2.0  # before the in-run retry of environment failures (a transient I/O error may pass)


def _map_with_retry(cluster: Cluster, todo: list[CaseTask], timeout_s: float | None = TASK_TIMEOUT_S
                    ) -> Iterable[tuple[CaseTask, Any]]:
    """``cluster.map(execute_case_within, todo)``, then once more for the tasks that failed for an
    environment reason (not for a timeout: that would double the wait); yields each task's final
    result once."""
    run = functools.partial(execute_case_within, timeout_s=timeout_s)
    again = []
    for task, result in cluster.map(run, todo):
        if (isinstance(result, CaseResult) and (result.info or {}).get(ENVIRONMENT_FAILURE)
                and result.kind != TIMEOUT):
            again.append(task)
            continue
        yield task, result
    if again:
        time.sleep(RETRY_PAUSE_S)
        yield from cluster.map(run, again)



def _run_aggregate_stage(spec: StageSpec, cases, keys, config, manifest: Manifest, cluster: Cluster,
                         work: Path, out: Path) -> StageTally:
    tally = StageTally()
    rows = manifest.stage_rows()
    agg: list[AggregateCase] = []
    eligible_ids = set()
    for case in cases:
        parts = keys[case.case_id].get(spec.name)
        state = "waiting" if parts is None else eligibility(spec, case, keys[case.case_id], rows, work, out)
        if state != "ok":
            setattr(tally, state, getattr(tally, state) + 1)
            continue
        row = rows.get((case.case_id, spec.name))
        changed = stale_reason(row, parts, output_ok(spec, row, work, out)) is not None
        if not changed:
            tally.up_to_date += 1
        upstream = {u: StageOutput(output_abspath(rows[(case.case_id, u)].output, get_stage(u), work, out),
                                   rows[(case.case_id, u)].key, rows[(case.case_id, u)].info) for u in spec.upstream}
        agg.append(AggregateCase(case, parts.key, upstream, changed, row.as_previous() if row else None))
        eligible_ids.add(case.case_id)
    dropped = sorted(cid for (cid, st), row in rows.items()
                     if st == spec.name and row.status == "done" and cid not in eligible_ids)
    if not any(c.changed for c in agg) and not dropped:
        return tally
    gone: frozenset[str] = frozenset()
    if dropped:  # which dropped cases are gone, and which only were not part of this run
        present = {row.case.case_id for row in manifest.cases(present_only=True)}
        earlier = STAGE_ORDER[: STAGE_ORDER.index(spec.name)]
        failed = {cid for (cid, st), row in rows.items() if st in earlier and row.status == "quarantined"}
        gone = frozenset(cid for cid in dropped if cid not in present or cid in failed)
    task = AggregateTask(spec.name, agg, work, out, config, dropped, cluster.get(), gone)
    try:
        results = spec.run(task) or []
    except OSError as e:  # nothing was committed (index.json is written last): a rerun redoes it
        cause = environment_cause(e) or type(e).__name__
        raise UserError(f"{spec.name} stopped ({cause}): {e}; nothing of this stage was committed, "
                        "rerun build-shards once the cause is fixed") from e
    parts_by_id = {c.case.case_id: keys[c.case.case_id][spec.name] for c in agg}
    with manifest.tx():
        for r in results:
            parts = parts_by_id.get(r.case_id)
            if parts is None:
                continue
            tally.ran += 1
            if r.status == "done":
                tally.done += 1
            else:
                tally.quarantined[r.kind or STAGE_ERROR] += 1
            manifest.put_stage(StageRow(r.case_id, spec.name, parts.key, parts.input_fp, parts.upstream,
                                        parts.config_hash, parts.version, r.status, r.output, r.kind, r.reason,
                                        dict(r.info)))
        for cid in dropped:
            manifest.delete_stage(cid, spec.name)
    return tally


def _progress_bar(total: int, name: str, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        return None
    return tqdm(total=total, desc=name, unit="case", file=sys.stderr, dynamic_ncols=True)


def _write_quarantine_file(manifest: Manifest, out: Path) -> list[Quarantine]:
    present = {c.case.case_id: c.case for c in manifest.cases()}
    records = []
    for (cid, stage), row in manifest.stage_rows().items():
        if row.status == "quarantined" and cid in present and not is_retryable(row):
            case = present[cid]
            records.append(Quarantine(cid, stage, row.kind or "", row.reason or "", case.source, dict(case.files)))
    write_quarantine_jsonl(out / QUARANTINE_FILE, records)
    return records


def _report(cases, scan_q, tallies, wanted, quarantined, manifest: Manifest, keys, work, out, strict) -> BuildReport:
    ran = sum(t.ran for t in tallies.values())
    last = wanted[-1]
    rows = manifest.stage_rows()
    if last == "scan":
        done_final = len(cases)
    else:
        spec = get_stage(last)
        done_final = sum(1 for c in cases
                         if (row := rows.get((c.case_id, last))) is not None and row.status == "done"
                         and keys[c.case_id].get(last) is not None and row.key == keys[c.case_id][last].key
                         and output_ok(spec, row, work, out))
    parts = [f"{len(cases) + len(scan_q)} cases found ({len(scan_q)} quarantined at scan)"]
    for name, t in tallies.items():
        bits = [f"{t.done} done now"]
        if t.quarantined:
            bits.append(f"{sum(t.quarantined.values())} quarantined now (" +
                        ", ".join(f"{k} {v}" for k, v in sorted(t.quarantined.items())) + ")")
        if t.failed:
            bits.append(f"{sum(t.failed.values())} FAILED, will retry on the next run (" +
                        ", ".join(f"{k} {v}" for k, v in sorted(t.failed.items())) + ")")
        bits.append(f"{t.up_to_date} up to date")
        if t.waiting:
            bits.append(f"{t.waiting} waiting for upstream")
        if t.blocked:
            bits.append(f"{t.blocked} blocked upstream")
        bits += [f"{v} {k}" for k, v in sorted(t.notes.items())]
        parts.append(f"{name}: " + ", ".join(bits) + (f" [{t.seconds:.1f}s]" if t.ran else ""))
    head = "nothing to do: everything up to date" if ran == 0 else f"processed {ran} case-stage(s)"
    summary = (f"ctprep build-shards: {head}; " + "; ".join(parts)
               + f"; {len(quarantined)} quarantined in total -> {out / QUARANTINE_FILE}")
    if quarantined:
        summary += f" (why, per case: ctprep status --out {out})"
    failed = sum(sum(t.failed.values()) for t in tallies.values())
    if done_final == 0:
        code = 1
        summary += f"; ERROR: no case completed stage {last!r}"
    elif failed:
        code = 4
        summary += (f"; ERROR: {failed} case-stage(s) failed for a reason outside the data (see above); "
                    "rerun build-shards to retry them")
    elif strict and quarantined:
        code = 2
        summary += " (--strict: quarantined cases make this a failure)"
    else:
        code = 0
    return BuildReport(len(cases), Counter(q.kind for q in scan_q), tallies, wanted, len(quarantined), done_final,
                       code, summary)
