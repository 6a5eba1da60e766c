"""Medical material: a cardiac pacemaker (generator in the left pectoral region, lead into the heart)."""

from __future__ import annotations

import numpy as np

from ctprep.synth.anatomy import capsule_at, fill
from ctprep.synth.finding_kinds.base import FindingKind


class Pacemaker(FindingKind):
    name = "device"
    label = "Medical material"
    prior = 0.07
    section = "devices"

    def sample(self, a, rng, ctx):
        x = -0.55 * a.ax
        y = a.ay * np.sqrt(1 - 0.55**2) - 0.5 * a.fat - 3.0
        return {"center": (a.z_apex - 25.0, float(y), x), "half_size": (20.0, 5.0, 22.0), "what": "pacemaker"}

    def draw(self, a, grid, hu, lab, f, organ):
        c, hs = f.params["center"], f.params["half_size"]
        sl = grid.box(tuple(ci - h for ci, h in zip(c, hs)), tuple(ci + h for ci, h in zip(c, hs)))
        z, y, x = grid.coords(sl)
        box = (np.abs(z - c[0]) <= hs[0]) & (np.abs(y - c[1]) <= hs[1]) & (np.abs(x - c[2]) <= hs[2])
        fill(hu, lab, sl, box, 2800.0)
        lead_end = a.heart_c
        lsl = grid.box(
            tuple(min(u, v) - 3 for u, v in zip(c, lead_end)), tuple(max(u, v) + 3 for u, v in zip(c, lead_end))
        )
        z, y, x = grid.coords(lsl)
        fill(hu, lab, lsl, capsule_at(z, y, x, c, lead_end, 2.0), 2500.0)
        return sl, box

    def report_sentence(self, a, f, rng):
        return "A cardiac pacemaker generator is seen in the left pectoral region with its lead in the right heart."

    def impression_phrase(self, f):
        return "cardiac pacemaker in place"
