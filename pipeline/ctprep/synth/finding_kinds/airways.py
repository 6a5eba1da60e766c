"""Airway findings: bronchiectasis and peribronchial thickening (walled air tubes from the hilum into a lobe)."""

from __future__ import annotations

import numpy as np

from ctprep.synth.anatomy import LOBE_NAMES, LUNG_LOWER_LEFT, LUNG_LOWER_RIGHT, capsule_at, fill
from ctprep.synth.finding_kinds.base import FindingKind, pick
from ctprep.synth.finding_kinds.placement import hilum, lobe_choice, points_in_lobe


class AirwayKind(FindingKind):
    """Bronchi from the hilum to random points of ``lobes``: a soft-tissue wall around an air lumen."""

    section = "lungs"
    per_lobe: int  # bronchi drawn in each lobe

    def calibre(self, rng: np.random.Generator) -> tuple[list[int], float, float]:
        """(lobes, lumen radius mm, wall thickness mm)."""
        raise NotImplementedError

    def sample(self, a, rng, ctx):
        lobes, lumen, wall = self.calibre(rng)
        airways = [(hilum(a, lb), end) for lb in lobes for end in points_in_lobe(a, rng, lb, self.per_lobe)]
        return {"lobes": lobes, "lobe": lobes[0], "airways": airways, "lumen": lumen, "wall": wall}

    def draw(self, a, grid, hu, lab, f, organ):
        p = f.params
        tot = np.zeros(grid.shape, bool)
        for p0, p1 in p["airways"]:
            box = grid.box(tuple(min(u, v) - 12 for u, v in zip(p0, p1)), tuple(max(u, v) + 12 for u, v in zip(p0, p1)))
            z, y, x = grid.coords(box)
            inl = np.isin(lab[box], p["lobes"])
            wall = capsule_at(z, y, x, p0, p1, p["lumen"] + p["wall"]) & inl
            lumen = capsule_at(z, y, x, p0, p1, p["lumen"]) & inl
            fill(hu, lab, box, wall & ~lumen, 30.0)
            fill(hu, lab, box, lumen, -990.0)
            tot[box] |= wall
        return (slice(None),) * 3, tot

    def report_sentence(self, a, f, rng):
        return self.finding_sentence(f, rng)


class Bronchiectasis(AirwayKind):
    """Wide bronchi in one lower lobe."""

    name = "bronchiectasis"
    label = "Bronchiectasis"
    prior = 0.07
    per_lobe = 3

    def calibre(self, rng):
        lobes = [lobe_choice(rng, (LUNG_LOWER_LEFT, LUNG_LOWER_RIGHT))]
        return lobes, float(rng.uniform(4.5, 6.0)), 2.0

    def cot_lobes(self, f):
        return [f.params["lobe"]]

    def finding_sentence(self, f, rng):
        lobe = LOBE_NAMES[f.params["lobe"]]
        return pick(rng, [f"Cylindrical bronchiectasis in the {lobe}.",
                          f"Dilated bronchi consistent with bronchiectasis in the {lobe}."])  # fmt: skip

    def impression_phrase(self, f):
        return f"bronchiectasis in the {LOBE_NAMES[f.params['lobe']]}"


class PeribronchialThickening(AirwayKind):
    """Narrow bronchi with thick walls in both lower lobes."""

    name = "peribronchial_thickening"
    label = "Peribronchial thickening"
    prior = 0.07
    per_lobe = 2

    def calibre(self, rng):
        return [LUNG_LOWER_LEFT, LUNG_LOWER_RIGHT], 2.5, float(rng.uniform(3.0, 4.0))

    def cot_lobes(self, f):
        return f.params["lobes"]

    def finding_sentence(self, f, rng):
        return pick(rng, ["Peribronchial thickening in both lower lobes.",
                          "Bronchial walls in the lower lobes are thickened (peribronchial thickening)."])  # fmt: skip

    def impression_phrase(self, f):
        return "peribronchial thickening"
