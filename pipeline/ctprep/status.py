"""``ctprep status``: per stage, what is done, stale (and why) and quarantined (and why).

Reads the manifest read-only and rescans the recorded sources without hashing, then asks the
same key functions as the build (``ctprep.keys``) whether each row is up to date.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from ctprep.config import PipelineConfig, config_from_dict
from ctprep.keys import current_keys, eligibility, output_ok, stale_reason
from ctprep.manifest import MANIFEST_FILE, Manifest, work_dir_for
from ctprep.sources.base import CaseInput, detect_source, get_source
from ctprep.stages.base import StageSpec, list_stages


@dataclass
class StageStatus:
    """Per-stage counts for ``ctprep status``."""

    done: int = 0
    stale: Counter = field(default_factory=Counter)  # reason -> count
    quarantined: Counter = field(default_factory=Counter)  # kind -> count
    waiting: int = 0
    blocked: int = 0


@dataclass
class StatusReport:
    stages: dict[str, StageStatus]
    cases: int
    removed: int
    quarantined: list[tuple[str, str, str, str]]  # (case, stage, kind, reason)
    sources: list[dict[str, str]]
    config_name: str

    def render(self, max_cases: int = 50) -> str:
        lines = [f"config: {self.config_name}; sources: "
                 + ", ".join(f"{s['root']} ({s['source']})" for s in self.sources),
                 f"cases: {self.cases} present" + (f", {self.removed} removed from their source" if self.removed else "")]
        lines.append(f"{'stage':<10} {'done':>6} {'stale':>6} {'quarant.':>9} {'waiting':>8} {'blocked':>8}")
        for name, s in self.stages.items():
            lines.append(f"{name:<10} {s.done:>6} {sum(s.stale.values()):>6} {sum(s.quarantined.values()):>9} "
                         f"{s.waiting:>8} {s.blocked:>8}")
            if s.stale:
                lines.append("    stale: " + ", ".join(f"{n} {why}" for why, n in sorted(s.stale.items())))
            if s.quarantined:
                lines.append("    quarantined: " + ", ".join(f"{n} {k}" for k, n in sorted(s.quarantined.items())))
        if self.quarantined:
            lines.append("quarantined cases:")
            for cid, stage, kind, reason in self.quarantined[:max_cases]:
                lines.append(f"  {cid!s:<24} {stage:<9} {kind}: {reason}")
            if len(self.quarantined) > max_cases:
                lines.append(f"  ... {len(self.quarantined) - max_cases} more in quarantine.jsonl")
        return "\n".join(lines)



def status(out: str | Path, work: str | Path | None = None, config: PipelineConfig | None = None,
           srcs: list[str | Path] | None = None, source: str | None = None) -> StatusReport:
    """What is done, stale (and why), quarantined (and why), per stage.

    Rescans the recorded sources (or ``srcs``) without hashing: a file whose
    size/mtime changed since its hash was taken counts as changed input.
    ``config`` defaults to the config of the last run; pass another to see
    what it would make stale.
    """
    out = Path(out).resolve()
    work_dir = work_dir_for(out, Path(work) if work else None)
    mpath = work_dir / MANIFEST_FILE
    if not mpath.exists():
        raise FileNotFoundError(f"no manifest at {mpath}: run `ctprep build-shards --out {out}` first")
    # Read only: status must work on a finished run in a read-only folder (and never lock it).
    with Manifest(mpath, readonly=True) as manifest:
        if config is None:
            recorded = manifest.get_setting("config")
            config = config_from_dict(recorded, name=recorded.get("name", "recorded")) if recorded else PipelineConfig()
        sources = manifest.get_setting("sources", [])
        if srcs:
            sources = [{"root": str(Path(s).resolve()), "source": source or detect_source(s)} for s in srcs]
        specs = list_stages()
        found, scan_quarantine = _rescan(manifest, sources, config)
        rows = manifest.stage_rows()
        report = StatusReport({s.name: StageStatus() for s in specs}, len(found) + len(scan_quarantine), 0, [],
                              sources, config.name)
        report.removed = sum(1 for c in manifest.cases(present_only=False) if not c.present)
        for cid, (kind, reason) in sorted(scan_quarantine.items()):
            report.stages["scan"].quarantined[kind] += 1
            report.quarantined.append((cid, "scan", kind, reason))
        for case, fh in sorted(found, key=lambda x: (x[0].source, x[0].split, x[0].case_id)):
            keys = current_keys(case, fh, config, specs)
            for spec in specs:
                _count_case(report, spec, case, keys, rows, work_dir, out)
        return report


def _rescan(manifest: Manifest, sources: list[dict[str, str]], config: PipelineConfig
            ) -> tuple[list[tuple[CaseInput, dict[str, str]]], dict[str, tuple[str, str]]]:
    """The cases of ``sources`` now, each with its file hashes as far as the manifest knows them
    (``modified:...`` / ``missing`` otherwise), and the scan quarantine (case -> (kind, reason))."""
    found: list[tuple[CaseInput, dict[str, str]]] = []
    scan_quarantine: dict[str, tuple[str, str]] = {}
    for s in sources:
        if not Path(s["root"]).is_dir():
            continue
        cases, quars = get_source(s["source"], config).scan(Path(s["root"]))
        for q in quars:
            scan_quarantine[q.case] = (q.kind, q.reason)
        for case in cases:
            fh = {}
            for role, path in case.files.items():
                try:
                    st = os.stat(path)
                    fh[role] = manifest.cached_hash(path, st.st_size, st.st_mtime_ns) or f"modified:{st.st_size}:{st.st_mtime_ns}"
                except OSError:
                    fh[role] = "missing"
            found.append((case, fh))
    return found, scan_quarantine


def _count_case(report: StatusReport, spec: StageSpec, case: CaseInput, keys, rows, work_dir: Path, out: Path) -> None:
    """Add one (case, stage) to the report's counts."""
    st = report.stages[spec.name]
    parts = keys.get(spec.name)
    row = rows.get((case.case_id, spec.name))
    if parts is None:
        st.waiting += 1
        return
    state = "ok" if spec.name == "scan" else eligibility(spec, case, keys, rows, work_dir, out)
    if state == "blocked":
        st.blocked += 1
        return
    if state == "waiting":
        if row is None:
            st.waiting += 1
        else:
            st.stale["upstream not up to date"] += 1
        return
    why = stale_reason(row, parts, output_ok(spec, row, work_dir, out))
    if why is not None:
        st.stale[why] += 1
    elif row.status == "quarantined":
        st.quarantined[row.kind or "?"] += 1
        report.quarantined.append((case.case_id, spec.name, row.kind or "?", row.reason or ""))
    else:
        st.done += 1
