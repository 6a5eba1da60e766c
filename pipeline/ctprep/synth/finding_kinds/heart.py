"""Heart findings: cardiomegaly, pericardial effusion, coronary artery calcification."""

from __future__ import annotations

import numpy as np

from ctprep.synth.anatomy import STAGE_HEART, fill, sphere_box
from ctprep.synth.finding_kinds.base import FindingKind, cardiothoracic_ratio, pick


class Cardiomegaly(FindingKind):
    """A bigger heart: it scales the heart's semi-axes (drawn as the heart, no mask of its own)."""

    name = "cardiomegaly"
    label = "Cardiomegaly"
    prior = 0.2
    section = "heart"
    stage = STAGE_HEART

    def sample(self, a, rng, ctx):
        return {"scale": float(rng.uniform(1.25, 1.4))}

    def heart_scale(self, params):
        return params["scale"]

    def report_sentence(self, a, f, rng):
        ctr = cardiothoracic_ratio(a)
        return pick(rng, [
            f"The heart is enlarged, cardiothoracic ratio about {ctr:.2f}, consistent with cardiomegaly.",
            f"Cardiomegaly is present (cardiothoracic ratio {ctr:.2f}).",
            f"Heart size is increased; cardiothoracic ratio is {ctr:.2f}.",
        ])  # fmt: skip

    def impression_phrase(self, f):
        return "cardiomegaly"


class PericardialEffusion(FindingKind):
    """A shell of fluid ``thickness`` mm around the heart (drawn before the heart, which then fills its inside)."""

    name = "pericardial_effusion"
    label = "Pericardial effusion"
    prior = 0.08
    section = "pericardium"
    stage = STAGE_HEART
    category = "heart"
    coronal = True
    ts_seg = {"ts_pleural_pericard_effusion": 2}

    def sample(self, a, rng, ctx):
        return {"thickness": float(rng.uniform(8, 15))}

    def heart_pad(self, params):
        return params["thickness"]

    def draw(self, a, grid, hu, lab, f, organ):
        shell = organ.grown(f.params["thickness"]) & ~organ.mask
        fill(hu, lab, organ.box, shell, 12.0, 0)
        return organ.box, shell

    def report_sentence(self, a, f, rng):
        t = int(round(f.params["thickness"]))
        return pick(rng, [f"Pericardial effusion with a thickness of {t} mm.",
                          f"There is pericardial fluid reaching {t} mm."])  # fmt: skip

    def impression_phrase(self, f):
        return "pericardial effusion"

    def focus(self, a, params):
        return float(a.heart_c[0]), float(a.heart_c[1])


class CoronaryCalcification(FindingKind):
    """2-4 calcified plaques on the heart's surface (upper, anterior side)."""

    name = "coronary_calcification"
    label = "Coronary artery wall calcification"
    prior = 0.2
    section = "coronary"

    def sample(self, a, rng, ctx):
        hz, hy, hx = a.heart_c
        rz, ry, rx = a.heart_radii()
        n = int(rng.integers(2, 5))
        centers = []
        for _ in range(n):
            u = np.array([rng.uniform(0.2, 0.7), rng.uniform(0.4, 0.9), rng.uniform(-0.2, 0.6)])
            u /= np.linalg.norm(u)
            centers.append((hz + 0.92 * rz * u[0], hy + 0.92 * ry * u[1], hx + 0.92 * rx * u[2]))
        return {"centers": centers, "radius": float(rng.uniform(3.5, 5.0)), "vessels": n}

    def draw(self, a, grid, hu, lab, f, organ):
        p = f.params
        tot_sl = sphere_box(grid, a.heart_c, max(a.heart_radii()) + 8)
        tot = np.zeros(lab[tot_sl].shape, bool)
        for c in p["centers"]:
            sl = sphere_box(grid, c, p["radius"])
            z, y, x = grid.coords(sl)
            bl = (z - c[0]) ** 2 + (y - c[1]) ** 2 + (x - c[2]) ** 2 <= p["radius"] ** 2
            fill(hu, lab, sl, bl, 650.0)
        z, y, x = grid.coords(tot_sl)
        for c in p["centers"]:
            tot |= (z - c[0]) ** 2 + (y - c[1]) ** 2 + (x - c[2]) ** 2 <= p["radius"] ** 2
        return tot_sl, tot

    def report_sentence(self, a, f, rng):
        return pick(rng, ["Calcified plaques are present in the coronary arteries.",
                          "Coronary artery calcifications are noted."])  # fmt: skip

    def impression_phrase(self, f):
        return "coronary artery calcification"
