"""Sample a scan's findings and place them inside the anatomy (mm), so they can be drawn.

Each finding carries the CT-RATE label it makes true; placement checks that a
lesion sits wholly inside its named lobe and clear of the heart, aorta and spine,
so the text ("18 mm nodule in the right upper lobe") matches the pixels.
Sizes are large enough to survive resampling to 10 x 3 x 3 mm.
"""

from __future__ import annotations

import numpy as np

from ctprep.synth.anatomy import (
    LEFT_LOBES,
    LUNG_IDS,
    LUNG_LOWER_LEFT,
    LUNG_LOWER_RIGHT,
    LUNG_UPPER_LEFT,
    LUNG_UPPER_RIGHT,
    RIGHT_LOBES,
    Anatomy,
    Finding,
    aorta_at,
    effusion_at,
    heart_at,
    lobe_at,
)

# kind -> (CT-RATE label, prior probability in an abnormal case)
FINDING_KINDS = {
    "nodule": ("Lung nodule", 0.35),
    "effusion": ("Pleural effusion", 0.22),
    "cardiomegaly": ("Cardiomegaly", 0.2),
    "emphysema": ("Emphysema", 0.2),
    "consolidation": ("Consolidation", 0.16),
    "opacity": ("Lung opacity", 0.16),
    "atelectasis": ("Atelectasis", 0.15),
    "aortic_calcification": ("Arterial wall calcification", 0.3),
    "coronary_calcification": ("Coronary artery wall calcification", 0.2),
    "pericardial_effusion": ("Pericardial effusion", 0.08),
    "lymphadenopathy": ("Lymphadenopathy", 0.15),
    "hiatal_hernia": ("Hiatal hernia", 0.07),
    "device": ("Medical material", 0.07),
    "mosaic_attenuation": ("Mosaic attenuation pattern", 0.07),
    "fibrotic_sequela": ("Pulmonary fibrotic sequela", 0.08),
    "septal_thickening": ("Interlobular septal thickening", 0.07),
    "bronchiectasis": ("Bronchiectasis", 0.07),
    "peribronchial_thickening": ("Peribronchial thickening", 0.07),
}
# Drawn last: fluid replaces lung, so earlier lung lesions are placed outside it.
DRAW_ORDER = (
    "cardiomegaly", "pericardial_effusion", "aortic_calcification", "coronary_calcification", "emphysema",
    "mosaic_attenuation", "septal_thickening", "fibrotic_sequela", "bronchiectasis", "peribronchial_thickening", "opacity", "consolidation", "atelectasis", "nodule", "lymphadenopathy", "hiatal_hernia", "device", "effusion",
)  # fmt: skip
NORMAL_FRACTION = 0.25


def _unit_offsets() -> np.ndarray:
    v = [(1, 0, 0), (-1, 0, 0), (0, 1, 0), (0, -1, 0), (0, 0, 1), (0, 0, -1)]
    d = 0.577
    v += [(sz * d, sy * d, sx * d) for sz in (-1, 1) for sy in (-1, 1) for sx in (-1, 1)]
    return np.array([(0, 0, 0)] + v, np.float32)


_OFFSETS = _unit_offsets()


def place_in_lobe(a: Anatomy, rng: np.random.Generator, lobe: int, r: float, avoid=()) -> tuple[float, float, float] | None:
    """A centre (z, y, x mm) whose ball of radius ``r`` lies in ``lobe`` and clear of organs."""
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
    peri = a.finding("pericardial_effusion")
    ok &= ~heart_at(a, z, y, x, pad=4.0 + (peri.params["thickness"] if peri else 0.0)).any(1)
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


def _hilum(a: Anatomy, lobe: int) -> tuple[float, float, float]:
    side = 1 if lobe in RIGHT_LOBES else -1
    return (a.z_carina - 30.0, a.trachea_y - 4.0, side * 0.27 * a.ax)


def _lobe_choice(rng, lobes, weights=None) -> int:
    w = np.asarray(weights if weights is not None else np.ones(len(lobes)), float)
    return int(lobes[rng.choice(len(lobes), p=w / w.sum())])


def sample_findings(
    a: Anatomy, rng: np.random.Generator, normal: bool | None = None, kinds: list[str] | None = None
) -> list[Finding]:
    """Choose and place findings (none when the case is normal; exactly ``kinds`` when given)."""
    if kinds is None:
        if normal is None:
            normal = rng.random() < NORMAL_FRACTION
        if normal:
            return []
        kinds = [k for k, (_, p) in FINDING_KINDS.items() if rng.random() < p]
    else:
        kinds = list(kinds)
    if not kinds:
        kinds = [list(FINDING_KINDS)[rng.integers(len(FINDING_KINDS))]]
    kinds.sort(key=DRAW_ORDER.index)
    out: list[Finding] = []
    a.findings = out  # placement below must see an enlarged heart / pericardial fluid drawn first
    avoid: list[tuple[int, float]] = []
    if "effusion" in kinds:  # decide the fluid first so lung lesions avoid it
        side_opt = rng.choice(["right", "left", "bilateral"], p=[0.4, 0.35, 0.25])
        sides = {1: float(rng.uniform(25, 50))} if side_opt == "right" else {}
        if side_opt == "left":
            sides = {-1: float(rng.uniform(25, 50))}
        if side_opt == "bilateral":
            sides = {1: float(rng.uniform(25, 50)), -1: float(rng.uniform(25, 45))}
        avoid = list(sides.items())
        eff = Finding("effusion", "Pleural effusion", {"sides": sides})
    for k in kinds:
        label = FINDING_KINDS[k][0]
        p: dict = {}
        if k == "effusion":
            out.append(eff)
            continue
        if k == "cardiomegaly":
            p = {"scale": float(rng.uniform(1.25, 1.4))}
        elif k == "pericardial_effusion":
            p = {"thickness": float(rng.uniform(8, 15))}
        elif k == "aortic_calcification":
            p = {
                "thickness": float(rng.uniform(3.5, 5.0)),
                "hu": float(rng.uniform(700, 1000)),
                "threshold": float(rng.uniform(-0.2, 0.6)),
                "phase": float(rng.uniform(0, 6.28)),
                "extent": "",
            }
            p["extent"] = "extensive" if p["threshold"] < 0.2 else "scattered"
        elif k == "coronary_calcification":
            hz, hy, hx = a.heart_c
            rz, ry, rx = a.heart_radii()
            n = int(rng.integers(2, 5))
            centers = []
            for _ in range(n):
                u = np.array([rng.uniform(0.2, 0.7), rng.uniform(0.4, 0.9), rng.uniform(-0.2, 0.6)])
                u /= np.linalg.norm(u)
                centers.append((hz + 0.92 * rz * u[0], hy + 0.92 * ry * u[1], hx + 0.92 * rx * u[2]))
            p = {"centers": centers, "radius": float(rng.uniform(3.5, 5.0)), "vessels": n}
        elif k == "emphysema":
            sev = str(rng.choice(["mild", "moderate", "severe"]))
            nb = {"mild": 8, "moderate": 16, "severe": 26}[sev]
            lobes = [LUNG_UPPER_LEFT, LUNG_UPPER_RIGHT]
            centers, radii = [], []
            for i in range(nb):
                r = float(rng.uniform(6, 12))
                c = place_in_lobe(a, rng, lobes[i % 2], 0.3 * r)
                if c:
                    centers.append(c)
                    radii.append(r)
            p = {"severity": sev, "lobes": lobes, "shift": {"mild": 45.0, "moderate": 65.0, "severe": 85.0}[sev],
                 "centers": centers, "radii": radii}  # fmt: skip
        elif k in ("nodule", "consolidation", "opacity"):
            if k == "nodule":
                diam = float(rng.integers(14, 31))
                r, margin, hu = diam / 2, 1.0, float(rng.uniform(25, 60))
                weights = None
            elif k == "consolidation":
                r, margin, hu = float(rng.uniform(28, 42)), 0.35, float(rng.uniform(25, 45))
                weights = [1, 3, 1, 1, 3]
            else:
                r, margin, hu = float(rng.uniform(20, 32)), 0.45, float(rng.uniform(-520, -420))
                weights = None
            c, lobe = None, 0
            for _ in range(6):
                lobe = _lobe_choice(rng, LUNG_IDS, weights)
                c = place_in_lobe(a, rng, lobe, r * margin, avoid)
                if c:
                    break
            if c is None:
                continue
            p = {"lobe": lobe, "center": c, "radius": r, "hu": hu, "size_mm": int(round(2 * r))}
            if k == "nodule":
                p["solid"] = bool(rng.random() < 0.8)
                if not p["solid"]:
                    p["hu"] = float(rng.uniform(-150, -50))
        elif k == "atelectasis":
            lobe = _lobe_choice(rng, (LUNG_LOWER_LEFT, LUNG_LOWER_RIGHT))
            side = 1 if lobe in RIGHT_LOBES else -1
            cy, ry = a.lung(side)[1], a.lung(side)[3]
            eff_depth = dict(avoid).get(side, 0.0)
            p = {"lobe": lobe, "y": cy - ry + eff_depth + float(rng.uniform(14, 24)),
                 "half_thickness": float(rng.uniform(5, 7)), "z_top": a.z_base + 0.38 * a.lung_h}  # fmt: skip
        elif k == "lymphadenopathy":
            zc, ty = a.z_carina, a.trachea_y
            stations = {
                "subcarinal": (zc - 24.0, ty - 6.0, 0.0),
                "right paratracheal": (zc + 28.0, ty + 2.0, a.trachea_r + 14.0),
                "prevascular": (zc + 12.0, ty + 38.0, -8.0),
                "right hilar": (zc - 30.0, ty + 4.0, 0.27 * a.ax),
            }
            names = list(stations)
            pick = sorted(rng.choice(len(names), size=int(rng.integers(1, 4)), replace=False))
            nodes = []
            for i in pick:
                r = float(rng.uniform(8, 13))
                nodes.append({"station": names[i], "center": stations[names[i]], "radius": r,
                              "short_axis_mm": int(round(2 * r))})  # fmt: skip
            p = {"nodes": nodes}
        elif k == "hiatal_hernia":
            ex, ey = a.esophagus_xy
            r = float(rng.uniform(20, 27))
            p = {"center": (a.z_base + 0.3 * r, ey + 12.0, ex - 12.0), "radius": r, "size_mm": int(round(2 * r))}
        elif k == "mosaic_attenuation":
            p = {"lobes": list(LUNG_IDS), "period": float(rng.uniform(7, 10)),
                 "phase": [float(v) for v in rng.uniform(0, 6.28, 3)]}  # fmt: skip
        elif k == "fibrotic_sequela":
            p = {"lobes": [LUNG_LOWER_LEFT, LUNG_LOWER_RIGHT]}
        elif k == "septal_thickening":
            lobes = [LUNG_LOWER_LEFT, LUNG_LOWER_RIGHT] if rng.random() < 0.6 else list(LUNG_IDS)
            p = {"lobes": lobes, "spacing_mm": float(rng.uniform(10, 14))}
        elif k in ("bronchiectasis", "peribronchial_thickening"):
            if k == "bronchiectasis":
                lobes = [_lobe_choice(rng, (LUNG_LOWER_LEFT, LUNG_LOWER_RIGHT))]
                lumen, wall, per_lobe = float(rng.uniform(4.5, 6.0)), 2.0, 3
            else:
                lobes = [LUNG_LOWER_LEFT, LUNG_LOWER_RIGHT]
                lumen, wall, per_lobe = 2.5, float(rng.uniform(3.0, 4.0)), 2
            airways = [(_hilum(a, lb), end) for lb in lobes for end in points_in_lobe(a, rng, lb, per_lobe)]
            p = {"lobes": lobes, "lobe": lobes[0], "airways": airways, "lumen": lumen, "wall": wall}
        elif k == "device":
            x = -0.55 * a.ax
            y = a.ay * np.sqrt(1 - 0.55**2) - 0.5 * a.fat - 3.0
            p = {"center": (a.z_apex - 25.0, float(y), x), "half_size": (20.0, 5.0, 22.0), "what": "pacemaker"}
        out.append(Finding(k, label, p))
    return out


def labels_vector(findings: list[Finding], names: tuple[str, ...]) -> list[int]:
    """0/1 per CT-RATE label name: 1 when a drawn finding makes it true."""
    present = {f.label for f in findings}
    return [int(n in present) for n in names]


def lobe_side(lobe: int) -> str:
    return "left" if lobe in LEFT_LOBES else "right"
