"""Pure summaries the per-source inventory parts share: histograms, quantiles, quarantine counts."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

if TYPE_CHECKING:
    from ctprep.quarantine import Quarantine

EXAMPLES = 5  # examples kept per reason / rule in the JSON and the table


def histogram(values: list[float], max_bins: int = 40) -> dict[str, list]:
    """{"edges", "counts"} of ``values`` with data-driven bins (numpy 'auto', at most ``max_bins``)."""
    import numpy as np

    v = np.asarray([x for x in values if x is not None], dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return {"edges": [], "counts": []}
    if v.min() == v.max():
        edges = np.array([v.min() - 0.5, v.max() + 0.5])
    else:
        edges = np.histogram_bin_edges(v, bins="auto")
        if len(edges) - 1 > max_bins:
            edges = np.linspace(v.min(), v.max(), max_bins + 1)
    counts, edges = np.histogram(v, bins=edges)
    return {"edges": [round(float(e), 4) for e in edges], "counts": [int(c) for c in counts]}


def quantiles(values: list[float]) -> dict[str, float]:
    """min / p5 / median / p95 / max (empty dict for no values)."""
    import numpy as np

    v = np.asarray([x for x in values if x is not None], dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return {}
    q = np.percentile(v, [0, 5, 50, 95, 100])
    return {k: round(float(x), 4) for k, x in zip(("min", "p5", "median", "p95", "max"), q)}


def _with_without(flags: Iterable[bool]) -> dict[str, int]:
    flags = list(flags)
    return {"with": sum(flags), "without": len(flags) - sum(flags)}


def _rel(path: Any, root: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(root))
    except (ValueError, OSError):
        return str(path)


def summarize_quarantine(quarantined: list[Quarantine]) -> dict[str, Any]:
    """Scan-time quarantines by kind, with a few example cases and reasons each."""
    by_kind: dict[str, list[dict[str, str]]] = {}
    for q in quarantined:
        by_kind.setdefault(q.kind, []).append({"case": q.case, "reason": q.reason})
    return {"total": len(quarantined),
            "by_kind": {k: len(v) for k, v in sorted(by_kind.items())},
            "examples": {k: v[:EXAMPLES] for k, v in sorted(by_kind.items())}}
