"""Diffuse lung findings over whole lobes: emphysema, mosaic attenuation, fibrotic sequelae, septal thickening."""

from __future__ import annotations

import numpy as np

from ctprep.synth.anatomy import (
    LUNG_IDS,
    LUNG_LOWER_LEFT,
    LUNG_LOWER_RIGHT,
    LUNG_UPPER_LEFT,
    LUNG_UPPER_RIGHT,
    Anatomy,
    Grid,
    fill,
    lung_rho,
    sphere_box,
)
from ctprep.synth.finding_kinds.base import FindingKind, pick
from ctprep.synth.finding_kinds.placement import place_in_lobe

EMPHYSEMA_BULLAE = {"mild": 8, "moderate": 16, "severe": 26}  # bullae tried per severity
EMPHYSEMA_SHIFT = {"mild": 45.0, "moderate": 65.0, "severe": 85.0}  # HU the upper lobes lose


def _lung_box(a: Anatomy, grid: Grid) -> tuple[slice, ...]:
    return grid.box((a.z_base, -a.ay, -a.ax), (a.z_apex, a.ay, a.ax))


def _pleural_rho(a: Anatomy, z, y, x):
    """Normalised radius in each lung's footprint (1 at the costal pleura), right lung for x > 0."""
    return np.maximum(np.where(x > 0, lung_rho(a, 1, z, y, x), 0), np.where(x <= 0, lung_rho(a, -1, z, y, x), 0))


class DiffuseLungKind(FindingKind):
    """Written in the lungs statement and in the reasoning step of every lobe it covers (``params["lobes"]``)."""

    section = "lungs"

    def report_sentence(self, a, f, rng):
        return self.finding_sentence(f, rng)

    def cot_lobes(self, f):
        return f.params["lobes"]


class Emphysema(DiffuseLungKind):
    """Darker upper lobes with air-filled bullae."""

    name = "emphysema"
    label = "Emphysema"
    prior = 0.2

    def sample(self, a, rng, ctx):
        sev = str(rng.choice(["mild", "moderate", "severe"]))
        lobes = [LUNG_UPPER_LEFT, LUNG_UPPER_RIGHT]
        centers, radii = [], []
        for i in range(EMPHYSEMA_BULLAE[sev]):
            r = float(rng.uniform(6, 12))
            c = place_in_lobe(a, rng, lobes[i % 2], 0.3 * r)
            if c:
                centers.append(c)
                radii.append(r)
        return {"severity": sev, "lobes": lobes, "shift": EMPHYSEMA_SHIFT[sev], "centers": centers, "radii": radii}

    def draw(self, a, grid, hu, lab, f, organ):
        p = f.params
        lsl = _lung_box(a, grid)
        upper = np.isin(lab[lsl], p["lobes"])
        hu[lsl][upper] = hu[lsl][upper] - p["shift"]
        tot = upper.copy()
        for c, r in zip(p["centers"], p["radii"]):
            sl = sphere_box(grid, c, r)
            z, y, x = grid.coords(sl)
            bl = ((z - c[0]) ** 2 + (y - c[1]) ** 2 + (x - c[2]) ** 2 <= r * r) & np.isin(lab[sl], p["lobes"])
            fill(hu, lab, sl, bl, -975.0)
        return lsl, tot

    def finding_sentence(self, f, rng):
        sev = f.params["severity"]
        return pick(rng, [
            f"{sev.capitalize()} centrilobular emphysema in both upper lobes.",
            f"Emphysematous changes, {sev}, predominantly in the upper lobes of both lungs.",
            f"Both upper lobes show {sev} emphysema with low-attenuation areas.",
        ])  # fmt: skip

    def impression_phrase(self, f):
        return f"{f.params['severity']} upper lobe emphysema"


class MosaicAttenuation(DiffuseLungKind):
    """Lobular patches of higher and lower attenuation (air trapping vs perfused lung)."""

    name = "mosaic_attenuation"
    label = "Mosaic attenuation pattern"
    prior = 0.07

    def sample(self, a, rng, ctx):
        return {"lobes": list(LUNG_IDS), "period": float(rng.uniform(7, 10)),
                "phase": [float(v) for v in rng.uniform(0, 6.28, 3)]}  # fmt: skip

    def draw(self, a, grid, hu, lab, f, organ):
        p = f.params
        lsl = _lung_box(a, grid)
        z, y, x = grid.coords(lsl)
        inl = np.isin(lab[lsl], p["lobes"])
        w = p["period"]
        pat = np.sin(z / w + p["phase"][0]) * np.sin(y / w + p["phase"][1]) * np.sin(x / w + p["phase"][2]) > 0
        h = hu[lsl]
        h[inl & pat] += 90.0
        h[inl & ~pat] -= 45.0
        return lsl, inl & pat

    def finding_sentence(self, f, rng):
        return pick(rng, ["Mosaic attenuation pattern in both lungs.",
                          "Both lungs show a mosaic attenuation pattern with patchy density differences."])  # fmt: skip

    def impression_phrase(self, f):
        return "mosaic attenuation pattern"


class FibroticSequela(DiffuseLungKind):
    """Subpleural reticular bands in the lower lobes."""

    name = "fibrotic_sequela"
    label = "Pulmonary fibrotic sequela"
    prior = 0.08

    def sample(self, a, rng, ctx):
        return {"lobes": [LUNG_LOWER_LEFT, LUNG_LOWER_RIGHT]}

    def draw(self, a, grid, hu, lab, f, organ):
        lsl = _lung_box(a, grid)
        z, y, x = grid.coords(lsl)
        inl = np.isin(lab[lsl], f.params["lobes"])
        band = inl & (_pleural_rho(a, z, y, x) > 0.78) & (np.sin(0.45 * (x + 0.7 * y) + 0.3 * z) > 0.1)
        fill(hu, lab, lsl, band, -200.0)
        return lsl, band

    def finding_sentence(self, f, rng):
        return pick(rng, ["Subpleural fibrotic bands and reticulation in both lower lobes, consistent with "
                          "fibrotic sequelae.", "Fibrotic sequelae with subpleural reticular opacities in the "
                          "lower lobes."])  # fmt: skip

    def impression_phrase(self, f):
        return "fibrotic sequelae in both lower lobes"


class SeptalThickening(DiffuseLungKind):
    """A grid of thickened interlobular septa in the outer lung."""

    name = "septal_thickening"
    label = "Interlobular septal thickening"
    prior = 0.07

    def sample(self, a, rng, ctx):
        lobes = [LUNG_LOWER_LEFT, LUNG_LOWER_RIGHT] if rng.random() < 0.6 else list(LUNG_IDS)
        return {"lobes": lobes, "spacing_mm": float(rng.uniform(10, 14))}

    def draw(self, a, grid, hu, lab, f, organ):
        lsl = _lung_box(a, grid)
        z, y, x = grid.coords(lsl)
        inl = np.isin(lab[lsl], f.params["lobes"])
        period = f.params["spacing_mm"]
        lines = (np.abs(np.sin(np.pi * z / period)) < 0.25) | (np.abs(np.sin(np.pi * y / period)) < 0.25)
        lines = lines | (np.abs(np.sin(np.pi * x / period)) < 0.25)
        sept = inl & (_pleural_rho(a, z, y, x) > 0.55) & lines
        fill(hu, lab, lsl, sept, -420.0)
        return lsl, sept

    def finding_sentence(self, f, rng):
        where = "both lower lobes" if len(f.params["lobes"]) == 2 else "both lungs"
        return pick(rng, [f"Interlobular septal thickening in {where}.",
                          f"Smooth interlobular septal thickening is seen in {where}."])  # fmt: skip

    def impression_phrase(self, f):
        return "interlobular septal thickening"
