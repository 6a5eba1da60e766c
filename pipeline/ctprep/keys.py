"""Stage keys of a case and whether its manifest rows are up to date with them.

Pure functions of the scan records, the config and the manifest rows: the driver
(``ctprep.runner``) and ``ctprep status`` decide with the same code what is stale and why.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ctprep.config import PipelineConfig
from ctprep.manifest import StageRow
from ctprep.sources.base import CaseInput
from ctprep.stages.base import StageSpec, get_stage, input_fingerprint, stage_key
from ctprep.worker import CLUSTER_FAILURE, ENVIRONMENT_FAILURE, is_retryable

@dataclass
class KeyParts:
    """A stage key and the components it was hashed from (stored for ``status``)."""

    key: str
    input_fp: str
    upstream: dict[str, str]
    config_hash: str
    version: str


def current_keys(case: CaseInput, file_hashes: dict[str, str], config: PipelineConfig,
                 specs: list[StageSpec]) -> dict[str, KeyParts]:
    """Current key of every registered stage for ``case`` (stages missing an upstream are skipped)."""
    keys: dict[str, KeyParts] = {}
    for spec in specs:
        if any(u not in keys for u in spec.upstream):
            continue
        fp = input_fingerprint(case, spec.case_fields, file_hashes)
        ups = {u: keys[u].key for u in spec.upstream}
        ch = spec.config_hash(config)
        keys[spec.name] = KeyParts(stage_key(spec, fp, ups, ch), fp, ups, ch, spec.version)
    return keys


def stale_reason(row: StageRow | None, parts: KeyParts, output_ok: bool) -> str | None:
    """None if up to date, else why: new input / changed input / changed config / ..."""
    if row is None:
        return "new input"
    if row.key == parts.key:
        if row.status == "done" and not output_ok:
            return "output missing"
        if row.status == "quarantined" and (row.info or {}).get(CLUSTER_FAILURE):
            return "failed on the cluster last run"  # a lost worker, not a bad case: try again
        if row.status == "quarantined" and (row.info or {}).get(ENVIRONMENT_FAILURE):
            return f"failed, will retry ({row.kind})"  # a full disk, EIO, ...: not a bad case
        return None
    if row.input_fp != parts.input_fp:
        return "changed input"
    if row.config_hash != parts.config_hash:
        return "changed config"
    if row.version != parts.version:
        return "code version changed"
    if row.upstream != parts.upstream:
        return "upstream changed"
    return "changed key"


def output_ok(spec: StageSpec, row: StageRow | None, work: Path, out: Path) -> bool:
    """False only for a done row whose recorded output no longer exists (relative paths are under
    ``out`` for aggregate stages, under ``work`` for per-case ones)."""
    if row is None or row.status != "done":
        return True
    if not row.output:
        return True
    path = Path(row.output)
    if not path.is_absolute():
        path = (out if spec.kind == "aggregate" else work) / path
    return path.exists()


def eligibility(spec: StageSpec, case: CaseInput, keys: dict[str, KeyParts], rows, work: Path, out: Path) -> str:
    """'ok' | 'blocked' (quarantined upstream) | 'waiting' (upstream not done with current key)."""
    for u in spec.upstream:
        row = rows.get((case.case_id, u))
        parts = keys.get(u)
        if row is None or parts is None or row.key != parts.key:
            return "waiting"
        if row.status == "quarantined":
            return "waiting" if is_retryable(row) else "blocked"
        if not output_ok(get_stage(u), row, work, out):
            return "waiting"
    return "ok"


def output_abspath(path: str | None, spec: StageSpec, work: Path, out: Path) -> str:
    """A recorded output path made absolute ("" when none was recorded)."""
    if not path:
        return ""
    p = Path(path)
    return str(p if p.is_absolute() else (out if spec.kind == "aggregate" else work) / p)


def relpath_or_abs(path: str, base: Path) -> str:
    """``path`` relative to ``base`` when inside it (as the manifest records outputs), else as given."""
    try:
        return str(Path(path).resolve().relative_to(base))
    except ValueError:
        return str(path)
