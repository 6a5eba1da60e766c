"""Mediastinal findings: aortic wall calcification, lymphadenopathy, hiatal hernia."""

from __future__ import annotations

import numpy as np

from ctprep.synth.anatomy import AORTA, ESOPHAGUS, HEART, STAGE_AORTA, STOMACH, TRACHEA, fill, sphere_box
from ctprep.synth.finding_kinds.base import FindingKind, pick

VERTEBRAE = tuple(range(27, 51))  # TotalSegmentator vertebra ids a hernia must not cover


class AorticCalcification(FindingKind):
    """Patchy plaques in the aortic wall (drawn right after the aorta, inside its box)."""

    name = "aortic_calcification"
    label = "Arterial wall calcification"
    prior = 0.3
    section = "aorta"
    stage = STAGE_AORTA
    category = "vessel"

    def sample(self, a, rng, ctx):
        p = {
            "thickness": float(rng.uniform(3.5, 5.0)),
            "hu": float(rng.uniform(700, 1000)),
            "threshold": float(rng.uniform(-0.2, 0.6)),
            "phase": float(rng.uniform(0, 6.28)),
            "extent": "",
        }
        p["extent"] = "extensive" if p["threshold"] < 0.2 else "scattered"
        return p

    def draw(self, a, grid, hu, lab, f, organ):
        p = f.params
        az, ay, ax = organ.coords
        wall = organ.mask & ~organ.grown(-p["thickness"])
        # Plaques: patchy along the wall, a fixed function of position so every recon agrees.
        patchy = np.sin(0.21 * az + p["phase"]) + np.sin(0.33 * ax + 0.27 * ay) > p["threshold"]
        plaque = wall & patchy
        fill(hu, lab, organ.box, plaque, p["hu"])
        return organ.box, plaque

    def report_sentence(self, a, f, rng):
        ext = f.params["extent"]
        return pick(rng, [
            f"There are {ext} calcified atherosclerotic plaques in the aortic wall.",
            f"{ext.capitalize()} atherosclerotic calcifications are seen along the thoracic aorta.",
        ])  # fmt: skip

    def impression_phrase(self, f):
        return f"{f.params['extent']} atherosclerotic calcification of the thoracic aorta"

    def focus(self, a, params):
        return float(a.z_carina), -0.55 * a.ay


class Lymphadenopathy(FindingKind):
    """1-3 enlarged nodes at named mediastinal stations."""

    name = "lymphadenopathy"
    label = "Lymphadenopathy"
    prior = 0.15
    section = "lymph_nodes"
    category = "mediastinum"
    coronal = True

    def sample(self, a, rng, ctx):
        zc, ty = a.z_carina, a.trachea_y
        stations = {
            "subcarinal": (zc - 24.0, ty - 6.0, 0.0),
            "right paratracheal": (zc + 28.0, ty + 2.0, a.trachea_r + 14.0),
            "prevascular": (zc + 12.0, ty + 38.0, -8.0),
            "right hilar": (zc - 30.0, ty + 4.0, 0.27 * a.ax),
        }
        names = list(stations)
        chosen = sorted(rng.choice(len(names), size=int(rng.integers(1, 4)), replace=False))
        nodes = []
        for i in chosen:
            r = float(rng.uniform(8, 13))
            nodes.append({"station": names[i], "center": stations[names[i]], "radius": r,
                          "short_axis_mm": int(round(2 * r))})  # fmt: skip
        return {"nodes": nodes}

    def draw(self, a, grid, hu, lab, f, organ):
        box = grid.box((a.z_carina - 60, -a.ay, -60), (a.z_carina + 60, a.ay, 60))
        z, y, x = grid.coords(box)
        tot = np.zeros(lab[box].shape, bool)
        for node in f.params["nodes"]:
            c, r = node["center"], node["radius"]
            tot |= ((z - c[0]) / (1.3 * r)) ** 2 + ((y - c[1]) / r) ** 2 + ((x - c[2]) / r) ** 2 <= 1.0
        tot &= ~np.isin(lab[box], (TRACHEA, AORTA, ESOPHAGUS, HEART))
        fill(hu, lab, box, tot, 38.0, 0)
        return box, tot

    def report_sentence(self, a, f, rng):
        parts = [f"{n['station']} ({n['short_axis_mm']} mm short axis)" for n in f.params["nodes"]]
        return "Enlarged mediastinal lymph nodes: " + ", ".join(parts) + "."

    def impression_phrase(self, f):
        return "mediastinal lymphadenopathy (" + ", ".join(n["station"] for n in f.params["nodes"]) + ")"

    def focus(self, a, params):
        c = params["nodes"][0]["center"]
        return float(c[0]), float(c[1])


class HiatalHernia(FindingKind):
    """Stomach above the diaphragm beside the esophagus: air over fluid, labelled stomach."""

    name = "hiatal_hernia"
    label = "Hiatal hernia"
    prior = 0.07
    section = "esophagus"
    category = "esophagus"
    coronal = True

    def sample(self, a, rng, ctx):
        ex, ey = a.esophagus_xy
        r = float(rng.uniform(20, 27))
        return {"center": (a.z_base + 0.3 * r, ey + 12.0, ex - 12.0), "radius": r, "size_mm": int(round(2 * r))}

    def draw(self, a, grid, hu, lab, f, organ):
        c, r = f.params["center"], f.params["radius"]
        sl = sphere_box(grid, c, r)
        z, y, x = grid.coords(sl)
        sph = (z - c[0]) ** 2 + (y - c[1]) ** 2 + (x - c[2]) ** 2 <= r * r
        sph &= ~np.isin(lab[sl], (AORTA, HEART) + VERTEBRAE)
        fill(hu, lab, sl, sph, np.where(z > c[0] + 0.2 * r, -980.0, 20.0).astype(np.float32), STOMACH)  # air over fluid
        return sl, sph

    def report_sentence(self, a, f, rng):
        return f"A hiatal hernia measuring {f.params['size_mm']} mm is seen at the esophageal hiatus."

    def impression_phrase(self, f):
        return "hiatal hernia"

    def focus(self, a, params):
        return float(params["center"][0]), float(params["center"][1])
