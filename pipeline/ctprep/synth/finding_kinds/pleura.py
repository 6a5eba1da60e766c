"""Pleural effusion: fluid in the dependent part of one or both pleural spaces."""

from __future__ import annotations

import numpy as np

from ctprep.synth.anatomy import LUNG_IDS, effusion_at, fill
from ctprep.synth.finding_kinds.base import SIDE_NAMES, FindingKind, effusion_size, pick


class PleuralEffusion(FindingKind):
    """Sampled before the other kinds (lung lesions are placed clear of it) and drawn last (fluid replaces lung)."""

    name = "effusion"
    label = "Pleural effusion"
    prior = 0.22
    section = "pleura"
    sample_early = True
    category = "pleura"
    ts_seg = {"ts_pleural_pericard_effusion": 1}

    def sample(self, a, rng, ctx):
        side_opt = rng.choice(["right", "left", "bilateral"], p=[0.4, 0.35, 0.25])
        sides = {1: float(rng.uniform(25, 50))} if side_opt == "right" else {}
        if side_opt == "left":
            sides = {-1: float(rng.uniform(25, 50))}
        if side_opt == "bilateral":
            sides = {1: float(rng.uniform(25, 50)), -1: float(rng.uniform(25, 45))}
        ctx.avoid.extend(sides.items())
        return {"sides": sides}  # side (+1 right, -1 left) -> depth mm

    def draw(self, a, grid, hu, lab, f, organ):
        lsl = grid.box((a.z_base - 1, -a.ay, -a.ax), (a.z_apex, a.ay, a.ax))
        z, y, x = grid.coords(lsl)
        tot = np.zeros(lab[lsl].shape, bool)
        for side, depth in f.params["sides"].items():
            fl = effusion_at(a, int(side), depth, z, y, x) & np.isin(lab[lsl], LUNG_IDS)
            fill(hu, lab, lsl, fl, 12.0, 0)
            tot |= fl
        return lsl, tot

    def report_sentence(self, a, f, rng):
        sides = f.params["sides"]
        if len(sides) == 2:
            return (f"Bilateral pleural effusion, {effusion_size(sides[1])} on the right and "
                    f"{effusion_size(sides[-1])} on the left.")  # fmt: skip
        ((side, depth),) = sides.items()
        return pick(rng, [
            f"{effusion_size(depth).capitalize()} pleural effusion on the {SIDE_NAMES[int(side)]} "
            f"(maximum depth {int(round(depth))} mm).",
            f"There is a {effusion_size(depth)} {SIDE_NAMES[int(side)]}-sided pleural effusion.",
        ])  # fmt: skip

    def anatomy_sentence(self, a, f):
        parts = [f"{SIDE_NAMES[int(side)].capitalize()} pleural space, lower zone: {effusion_size(depth)} pleural "
                 f"effusion, maximum depth {int(round(depth))} mm." for side, depth in sorted(f.params["sides"].items(), reverse=True)]
        return " ".join(parts)

    def impression_phrase(self, f):
        sides = f.params["sides"]
        if len(sides) == 2:
            return "bilateral pleural effusion"
        ((side, depth),) = sides.items()
        return f"{effusion_size(depth)} {SIDE_NAMES[int(side)]} pleural effusion"

    def focus(self, a, params):
        return float(a.z_base + 0.22 * a.lung_h), -0.55 * a.ay  # the lung bases
