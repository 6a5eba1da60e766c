"""The inventory's HU sample: a fixed-bin histogram over a few whole volumes, spread evenly over the cases."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

if TYPE_CHECKING:
    import numpy as np

    from ctprep.sources.base import CaseInput

# HU histogram: fixed bins so sources and runs compare; values outside go to under/overflow.
HU_RANGE = (-2048.0, 4096.0)
HU_BIN = 16.0
HU_VOXELS_PER_VOLUME = 1 << 18  # ~262k voxels per sampled volume (a 64^3 lattice)


def sample_indices(n: int, k: int) -> list[int]:
    """``k`` indices spread evenly over ``range(n)`` (deterministic: same inputs, same sample)."""
    if n <= 0 or k <= 0:
        return []
    if k >= n:
        return list(range(n))
    return sorted({round(i * (n - 1) / (k - 1)) for i in range(k)}) if k > 1 else [n // 2]


def subsample_voxels(image: np.ndarray, target: int = HU_VOXELS_PER_VOLUME) -> np.ndarray:
    """A regular lattice of about ``target`` voxels (same stride on every axis), flattened float32."""
    import numpy as np

    step = max(1, int(round((image.size / max(1, target)) ** (1.0 / image.ndim))))
    return np.asarray(image[(slice(None, None, step),) * image.ndim], dtype=np.float32).ravel()


class HuAccumulator:
    """Fixed-bin HU histogram over sampled volumes, plus per-volume percentiles."""

    def __init__(self) -> None:
        import numpy as np

        self.edges = np.arange(HU_RANGE[0], HU_RANGE[1] + HU_BIN, HU_BIN)
        self.counts = np.zeros(len(self.edges) - 1, dtype=np.int64)
        self.under = self.over = self.nonfinite = 0
        self.per_volume: list[dict[str, Any]] = []
        self.failed: list[dict[str, str]] = []

    def add(self, case_id: str, hu: np.ndarray, info: Optional[dict[str, Any]] = None) -> None:
        import numpy as np

        v = subsample_voxels(hu)
        fin = np.isfinite(v)
        self.nonfinite += int(v.size - fin.sum())
        v = v[fin]
        self.under += int((v < self.edges[0]).sum())
        self.over += int((v >= self.edges[-1]).sum())
        self.counts += np.histogram(v, bins=self.edges)[0]
        rec: dict[str, Any] = {"case": case_id, "voxels": int(v.size)}
        if v.size:
            p = np.percentile(v, [0, 1, 50, 99, 100])
            rec.update({k: round(float(x), 1) for k, x in zip(("min", "p1", "median", "p99", "max"), p)})
        for k in ("rescale_source", "slope", "intercept"):
            if info and k in info:
                rec[k] = info[k]
        self.per_volume.append(rec)

    def fail(self, case_id: str, kind: str, reason: str) -> None:
        self.failed.append({"case": case_id, "kind": kind, "reason": reason})

    def to_json(self) -> dict[str, Any]:
        import numpy as np

        total = int(self.counts.sum())
        pct: dict[str, float] = {}
        if total:  # percentiles from the histogram (bin centres): exact enough at 16 HU bins
            cdf = np.cumsum(self.counts) / total
            centres = (self.edges[:-1] + self.edges[1:]) / 2
            for name, q in (("p1", 0.01), ("p5", 0.05), ("median", 0.5), ("p95", 0.95), ("p99", 0.99)):
                pct[name] = float(centres[min(int(np.searchsorted(cdf, q)), len(centres) - 1)])
        return {"volumes": len(self.per_volume), "voxels": total, "bin_hu": HU_BIN,
                "edges": [float(self.edges[0]), float(self.edges[-1])], "counts": self.counts.tolist(),
                "underflow": self.under, "overflow": self.over, "nonfinite": self.nonfinite,
                "percentiles": pct, "per_volume": self.per_volume, "failed": self.failed}


def sample_loaded_hu(source: Any, cases: list[CaseInput], n: int) -> dict[str, Any]:
    """HU (for JPEG sources: the window inverted) of ``n`` evenly spread cases via ``source.load``."""
    from ctprep.quarantine import QuarantineError

    acc = HuAccumulator()
    for i in sample_indices(len(cases), n):
        c = cases[i]
        try:
            loaded = source.load(c)
        except QuarantineError as e:
            acc.fail(c.case_id, e.kind, e.reason)
            continue
        except Exception as e:  # noqa: BLE001 - the inventory reports, it never stops
            acc.fail(c.case_id, "error", f"{type(e).__name__}: {e}")
            continue
        acc.add(c.case_id, loaded.image, loaded.info)
    return acc.to_json()
