"""Where lung findings may go: random points inside a lobe, clear of the organs (mm, RAS+ z, y, x)."""

from __future__ import annotations

import numpy as np

from ctprep.synth.anatomy import RIGHT_LOBES, Anatomy, aorta_at, effusion_at, heart_at, lobe_at


def _unit_offsets() -> np.ndarray:
    v = [(1, 0, 0), (-1, 0, 0), (0, 1, 0), (0, -1, 0), (0, 0, 1), (0, 0, -1)]
    d = 0.577
    v += [(sz * d, sy * d, sx * d) for sz in (-1, 1) for sy in (-1, 1) for sx in (-1, 1)]
    return np.array([(0, 0, 0)] + v, np.float32)


_OFFSETS = _unit_offsets()


def place_in_lobe(a: Anatomy, rng: np.random.Generator, lobe: int, r: float, avoid=()) -> tuple[float, float, float] | None:
    """A centre (z, y, x mm) whose ball of radius ``r`` lies in ``lobe`` and clear of organs.

    ``avoid``: (side, depth mm) of pleural fluid to stay 4 mm clear of.
    """
    n = 3000
    cand = np.stack(
        [rng.uniform(a.z_base, a.z_apex, n), rng.uniform(-a.ay, a.ay, n), rng.uniform(-a.ax, a.ax, n)], 1
    ).astype(np.float32)
    cand = cand[lobe_at(a, cand[:, 0], cand[:, 1], cand[:, 2]) == lobe]
    if len(cand) == 0:
        return None
    pts = cand[:, None, :] + r * _OFFSETS[None]  # (n, 15, 3)
    z, y, x = pts[..., 0], pts[..., 1], pts[..., 2]
    ok = (lobe_at(a, z, y, x) == lobe).all(1)
    ok &= ~heart_at(a, z, y, x, pad=4.0 + a.heart_pad()).any(1)
    ok &= ~aorta_at(a, z, y, x, a.z_base - 50, r=a.aorta_r + 4).any(1)
    ok &= ((x**2 + (y - a.spine_y) ** 2) > (a.spine_r + 30) ** 2).all(1)
    ok &= (x**2 + (y - a.trachea_y) ** 2 > 40**2).all(1)  # clear of trachea and main bronchi
    for side, depth in avoid:
        ok &= ~effusion_at(a, side, depth + 4, z, y, x).any(1)
    idx = np.flatnonzero(ok)
    return tuple(float(v) for v in cand[idx[0]]) if len(idx) else None


def points_in_lobe(a: Anatomy, rng: np.random.Generator, lobe: int, n: int) -> list[tuple[float, float, float]]:
    """Up to ``n`` random points (z, y, x mm) inside ``lobe``."""
    cand = np.stack(
        [rng.uniform(a.z_base, a.z_apex, 1500), rng.uniform(-a.ay, a.ay, 1500), rng.uniform(-a.ax, a.ax, 1500)], 1
    ).astype(np.float32)
    cand = cand[lobe_at(a, cand[:, 0], cand[:, 1], cand[:, 2]) == lobe][:n]
    return [tuple(float(v) for v in c) for c in cand]


def hilum(a: Anatomy, lobe: int) -> tuple[float, float, float]:
    """Where the airways of ``lobe``'s lung enter it (z, y, x mm)."""
    side = 1 if lobe in RIGHT_LOBES else -1
    return (a.z_carina - 30.0, a.trachea_y - 4.0, side * 0.27 * a.ax)


def lobe_choice(rng: np.random.Generator, lobes, weights=None) -> int:
    """One of ``lobes`` (weighted; one RNG draw)."""
    w = np.asarray(weights if weights is not None else np.ones(len(lobes)), float)
    return int(lobes[rng.choice(len(lobes), p=w / w.sum())])
