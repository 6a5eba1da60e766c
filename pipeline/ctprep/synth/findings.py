"""Sample a scan's findings and place them inside the anatomy (mm), so they can be drawn.

Each finding carries the CT-RATE label it makes true; placement checks that a
lesion sits wholly inside its named lobe and clear of the heart, aorta and spine,
so the text ("18 mm nodule in the right upper lobe") matches the pixels.
Sizes are large enough to survive resampling to 10 x 3 x 3 mm. What each kind
samples, and where, is written in its class in ``ctprep.synth.finding_kinds``
(placement helpers: ``ctprep.synth.finding_kinds.placement``).
"""

from __future__ import annotations

import numpy as np

from ctprep.synth.anatomy import LEFT_LOBES, Anatomy, Finding
from ctprep.synth.finding_kinds import DRAW_ORDER, KINDS, SamplingContext, kind_of

# kind -> (CT-RATE label, prior probability in an abnormal case); the kinds live in ctprep.synth.finding_kinds
FINDING_KINDS = {k.name: (k.label, k.prior) for k in KINDS}
NORMAL_FRACTION = 0.25


def sample_findings(
    a: Anatomy, rng: np.random.Generator, normal: bool | None = None, kinds: list[str] | None = None
) -> list[Finding]:
    """Choose and place findings (none when the case is normal; exactly ``kinds`` when given)."""
    if kinds is None:
        if normal is None:
            normal = rng.random() < NORMAL_FRACTION
        if normal:
            return []
        kinds = [k.name for k in KINDS if rng.random() < k.prior]
    else:
        kinds = [kind_of(k).name for k in kinds]
    if not kinds:
        kinds = [KINDS[rng.integers(len(KINDS))].name]
    kinds.sort(key=DRAW_ORDER.index)
    out: list[Finding] = []
    a.findings = out  # placement below must see an enlarged heart / pericardial fluid sampled first
    ctx = SamplingContext()
    # Kinds that shape the placement of others (pleural fluid) are sampled before them.
    early = {name: kind_of(name).sample(a, rng, ctx) for name in kinds if kind_of(name).sample_early}
    for name in kinds:
        kind = kind_of(name)
        p = early[name] if name in early else kind.sample(a, rng, ctx)
        if p is not None:  # None: a lesion that found no place
            out.append(Finding(name, kind.label, p))
    return out


def labels_vector(findings: list[Finding], names: tuple[str, ...]) -> list[int]:
    """0/1 per CT-RATE label name: 1 when a drawn finding makes it true."""
    present = {f.label for f in findings}
    return [int(n in present) for n in names]


def lobe_side(lobe: int) -> str:
    return "left" if lobe in LEFT_LOBES else "right"
