"""Focal lung findings: nodule, consolidation, ground-glass opacity (balls in one lobe) and atelectasis."""

from __future__ import annotations

import numpy as np

from ctprep.synth.anatomy import (
    LOBE_NAMES,
    LUNG_IDS,
    LUNG_LOWER_LEFT,
    LUNG_LOWER_RIGHT,
    RIGHT_LOBES,
    Anatomy,
    Finding,
    Grid,
    fill,
    sphere_box,
)
from ctprep.synth.finding_kinds.base import Drawn, FindingKind, SamplingContext, cm_above_base, lung_zone, pick
from ctprep.synth.finding_kinds.placement import lobe_choice, place_in_lobe


class FocalLungLesion(FindingKind):
    """A ball of one density inside one lobe, placed clear of the organs and the pleural fluid."""

    section = "lungs"
    category = "lung"
    coronal = True
    margin: float  # share of the radius that must lie inside the lobe (1: all of it)
    lobe_weights: list[float] | None = None  # how often each of LUNG_IDS is chosen (None: equally)

    def size(self, rng: np.random.Generator) -> tuple[float, float]:
        """(radius mm, HU)."""
        raise NotImplementedError

    def sample(self, a: Anatomy, rng: np.random.Generator, ctx: SamplingContext) -> dict | None:
        r, hu = self.size(rng)
        c, lobe = None, 0
        for _ in range(6):
            lobe = lobe_choice(rng, LUNG_IDS, self.lobe_weights)
            c = place_in_lobe(a, rng, lobe, r * self.margin, ctx.avoid)
            if c:
                break
        if c is None:
            return None
        return {"lobe": lobe, "center": c, "radius": r, "hu": hu, "size_mm": int(round(2 * r))}

    def inside(self, lab_box: np.ndarray, p: dict) -> np.ndarray:
        """Voxels of the box the lesion may fill: its lobe."""
        return lab_box == p["lobe"]

    def draw(self, a: Anatomy, grid: Grid, hu, lab, f: Finding, organ) -> Drawn:
        p = f.params
        c, r = p["center"], p["radius"]
        sl = sphere_box(grid, c, r)
        z, y, x = grid.coords(sl)
        sph = (z - c[0]) ** 2 + (y - c[1]) ** 2 + (x - c[2]) ** 2 <= r * r
        where = sph & self.inside(lab[sl], p)
        fill(hu, lab, sl, where, p["hu"])
        return sl, where

    def report_sentence(self, a: Anatomy, f: Finding, rng: np.random.Generator) -> str:
        return self.finding_sentence(f, rng)

    def cot_lobes(self, f: Finding) -> list[int]:
        return [f.params["lobe"]]

    def anatomy_noun(self, p: dict) -> str:
        """What it is, without place (the anatomy wording puts the place first)."""
        raise NotImplementedError

    def anatomy_sentence(self, a: Anatomy, f: Finding) -> str:
        p = f.params
        lobe, z = p["lobe"], float(p["center"][0])
        side = "right" if lobe in RIGHT_LOBES else "left"
        return (f"{side.capitalize()} lung, {LOBE_NAMES[lobe]}, {lung_zone(a, z)} zone: {self.anatomy_noun(p)}, "
                f"cranio-caudal extent {p['size_mm']} mm, centred {cm_above_base(a, z)} cm above the lung base.")

    def focus(self, a: Anatomy, params: dict) -> tuple[float, float]:
        return float(params["center"][0]), float(params["center"][1])


class Nodule(FocalLungLesion):
    name = "nodule"
    label = "Lung nodule"
    prior = 0.35
    margin = 1.0
    ts_seg = {"ts_lung_nodules": 1}

    def size(self, rng):
        diam = float(rng.integers(14, 31))
        return diam / 2, float(rng.uniform(25, 60))

    def sample(self, a, rng, ctx):
        p = super().sample(a, rng, ctx)
        if p is not None:
            p["solid"] = bool(rng.random() < 0.8)
            if not p["solid"]:
                p["hu"] = float(rng.uniform(-150, -50))
        return p

    def inside(self, lab_box, p):
        return np.isin(lab_box, LUNG_IDS)  # any lobe: a nodule may cross a fissure

    def finding_sentence(self, f, rng):
        p = f.params
        lobe = LOBE_NAMES[p["lobe"]]
        kind = "solid" if p["solid"] else "part-solid"
        return pick(rng, [
            f"A {p['size_mm']} mm {kind} nodule is seen in the {lobe}.",
            f"In the {lobe} there is a {kind} pulmonary nodule measuring {p['size_mm']} mm.",
            f"{lobe.capitalize()}: {kind} nodule, {p['size_mm']} mm in diameter.",
            f"A {kind} nodular lesion of {p['size_mm']} mm is noted in the {lobe}.",
        ])  # fmt: skip

    def impression_phrase(self, f):
        return f"{f.params['size_mm']} mm nodule in the {LOBE_NAMES[f.params['lobe']]}"

    def anatomy_noun(self, p):
        return f"{'solid' if p['solid'] else 'part-solid'} nodule"


class Consolidation(FocalLungLesion):
    name = "consolidation"
    label = "Consolidation"
    prior = 0.16
    margin = 0.35
    lobe_weights = [1, 3, 1, 1, 3]  # mostly the lower lobes

    def size(self, rng):
        return float(rng.uniform(28, 42)), float(rng.uniform(25, 45))

    def finding_sentence(self, f, rng):
        lobe = LOBE_NAMES[f.params["lobe"]]
        cm = f.params["size_mm"] / 10
        return pick(rng, [
            f"Consolidation with air bronchograms in the {lobe}, about {cm:.1f} cm.",
            f"A dense consolidation area measuring approximately {cm:.1f} cm is present in the {lobe}.",
            f"There is pneumonic consolidation in the {lobe} ({cm:.1f} cm).",
        ])  # fmt: skip

    def impression_phrase(self, f):
        return f"consolidation in the {LOBE_NAMES[f.params['lobe']]}, consistent with pneumonia"

    def anatomy_noun(self, p):
        return "consolidation"


class Opacity(FocalLungLesion):
    name = "opacity"
    label = "Lung opacity"
    prior = 0.16
    margin = 0.45

    def size(self, rng):
        return float(rng.uniform(20, 32)), float(rng.uniform(-520, -420))

    def finding_sentence(self, f, rng):
        p = f.params
        lobe = LOBE_NAMES[p["lobe"]]
        return pick(rng, [
            f"Ground-glass opacity of about {p['size_mm']} mm in the {lobe}.",
            f"A patchy ground-glass density area ({p['size_mm']} mm) is observed in the {lobe}.",
            f"Increased ground-glass attenuation in the {lobe}, approximately {p['size_mm']} mm.",
        ])  # fmt: skip

    def impression_phrase(self, f):
        return f"ground-glass opacity in the {LOBE_NAMES[f.params['lobe']]}"

    def anatomy_noun(self, p):
        return "ground-glass opacity"


class Atelectasis(FindingKind):
    """A plate of collapsed lung (soft tissue) across a lower lobe, above any pleural fluid."""

    name = "atelectasis"
    label = "Atelectasis"
    prior = 0.15
    section = "lungs"
    category = "lung"

    def sample(self, a, rng, ctx):
        lobe = lobe_choice(rng, (LUNG_LOWER_LEFT, LUNG_LOWER_RIGHT))
        side = 1 if lobe in RIGHT_LOBES else -1
        cy, ry = a.lung(side)[1], a.lung(side)[3]
        eff_depth = dict(ctx.avoid).get(side, 0.0)
        return {"lobe": lobe, "y": cy - ry + eff_depth + float(rng.uniform(14, 24)),
                "half_thickness": float(rng.uniform(5, 7)), "z_top": a.z_base + 0.38 * a.lung_h}  # fmt: skip

    def draw(self, a, grid, hu, lab, f, organ):
        p = f.params
        lsl = grid.box((a.z_base, -a.ay, -a.ax), (a.z_base + 0.5 * a.lung_h, a.ay, a.ax))
        z, y, x = grid.coords(lsl)
        band = (np.abs(y - p["y"]) < p["half_thickness"]) & (z < p["z_top"]) & (lab[lsl] == p["lobe"])
        fill(hu, lab, lsl, band, 25.0)
        return lsl, band

    def report_sentence(self, a, f, rng):
        return self.finding_sentence(f, rng)

    def finding_sentence(self, f, rng):
        lobe = LOBE_NAMES[f.params["lobe"]]
        return pick(rng, [
            f"Plate-like atelectasis in the posterior basal {lobe}.",
            f"Subsegmental atelectasis is seen in the {lobe}.",
            f"Linear atelectatic band in the {lobe}.",
        ])  # fmt: skip

    def cot_lobes(self, f):
        return [f.params["lobe"]]

    def anatomy_sentence(self, a, f):
        lobe = f.params["lobe"]
        side = "right" if lobe in RIGHT_LOBES else "left"
        top = cm_above_base(a, f.params["z_top"])
        return (f"{side.capitalize()} lung, {LOBE_NAMES[lobe]}, lower zone: plate-like atelectasis, "
                f"from the lung base up to {top} cm above it.")

    def impression_phrase(self, f):
        return f"atelectasis in the {LOBE_NAMES[f.params['lobe']]}"

    def focus(self, a, params):
        return float(a.z_base + 0.22 * a.lung_h), -0.55 * a.ay  # the lung bases
