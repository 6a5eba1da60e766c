"""What a finding kind of the phantom generator defines, and the pieces kinds share.

A kind (one subclass of :class:`FindingKind`, registered in ``ctprep.synth.finding_kinds``)
says everything about one abnormality: the CT-RATE label it makes true and how often an
abnormal scan has it, what it samples from the scan's RNG, how it is drawn into the HU and
label volumes (and its mask), how a report, an impression and an OmniAbnorm datum describe it,
and where an OmniAbnorm slice cuts through it. ``sample_findings`` (findings.py),
``render_chest`` (anatomy.py) and ``compose_text`` (reports.py) only loop over the kinds.

The generator's output is pinned byte for byte (``tests/test_synth_identity.py``): a kind's
methods make their RNG draws in a fixed order and the arithmetic of its drawing is part of
the data, so change either only on purpose (and then regenerate the reference digests).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ctprep.synth.anatomy import CAGE_WALL, STAGE_LESION, Anatomy, Finding, Grid, OrganView

SIDE_NAMES = {1: "right", -1: "left"}

Drawn = tuple[tuple[slice, ...], np.ndarray]  # (sub-box of the grid, bool mask of the finding inside it)


@dataclass
class SamplingContext:
    """What kinds sampled earlier in a scan tell the later ones."""

    # (side: +1 right / -1 left, depth mm) of the pleural fluid; lung lesions are placed clear of it
    avoid: list[tuple[int, float]] = field(default_factory=list)


def pick(rng: np.random.Generator, options: list[str]) -> str:
    """One of ``options`` (one RNG draw)."""
    return options[int(rng.integers(len(options)))]


def effusion_size(depth: float) -> str:
    """Size word of a pleural effusion of ``depth`` mm."""
    return "small" if depth < 32 else "moderate" if depth < 42 else "large"


def cardiothoracic_ratio(a: Anatomy) -> float:
    """Heart width over the inner chest width, as a report states it."""
    hr = a.heart_radii()
    return (2 * hr[2]) / (2 * (a.ax - a.fat - CAGE_WALL))


def capitalized(phrase: str) -> str:
    return phrase[0].upper() + phrase[1:]


def lung_zone(a: Anatomy, z: float) -> str:
    """Cranio-caudal third of the lungs at height ``z`` mm: upper, middle or lower."""
    h = (z - a.z_base) / a.lung_h
    return "upper" if h >= 2 / 3 else "middle" if h >= 1 / 3 else "lower"


def cm_above_base(a: Anatomy, z: float) -> int:
    """Height ``z`` as whole centimetres above the lung base (the slice position a report states)."""
    return max(int(round((z - a.z_base) / 10.0)), 0)


class FindingKind:
    """One kind of finding. Subclasses set the class attributes and override the hooks they use."""

    name: str  # Finding.kind, e.g. "nodule"
    label: str  # the CT-RATE label it makes true (one of ctprep.schema.ABNORMALITY_LABELS)
    prior: float  # probability that an abnormal CT-RATE scan has it
    section: str  # report statement it is written in (ctprep.synth.reports.SECTIONS)
    stage: str = STAGE_LESION  # when render_chest draws it (STAGES)
    sample_early: bool = False  # sampled before the other kinds of the scan (it shapes their placement)
    category: str | None = None  # OmniAbnorm category; None: never the finding of an OmniAbnorm datum
    coronal: bool = False  # OmniAbnorm also shows it on coronal images
    ts_seg: dict[str, int] = {}  # value in the non-anatomy TotalSegmentator task maps of CT-RATE's release

    def sample(self, a: Anatomy, rng: np.random.Generator, ctx: SamplingContext) -> dict | None:
        """Finding params (mm geometry, wording choices) drawn from ``rng``; None: it could not be placed.

        ``a.findings`` holds the findings sampled so far (earlier in ``DRAW_ORDER``).
        """
        raise NotImplementedError

    def draw(self, a: Anatomy, grid: Grid, hu: np.ndarray, lab: np.ndarray, f: Finding,
             organ: OrganView | None) -> Drawn | None:  # fmt: skip
        """Draw ``f`` into ``hu`` / ``lab`` (Z, Y, X canonical) in place; what it changed, or None.

        ``organ``: the heart / aorta for kinds drawn at ``STAGE_HEART`` / ``STAGE_AORTA``, else None.
        """
        return None

    def heart_scale(self, params: dict) -> float:
        """Factor on the heart's semi-axes (cardiomegaly)."""
        return 1.0

    def heart_pad(self, params: dict) -> float:
        """mm around the heart that belong to this finding (pericardial fluid)."""
        return 0.0

    def report_sentence(self, a: Anatomy, f: Finding, rng: np.random.Generator) -> str:
        """Its sentence in the findings section of a report (statement ``section``)."""
        raise NotImplementedError

    def anatomy_sentence(self, a: Anatomy, f: Finding) -> str | None:
        """Its sentence in the ``anatomy`` wording (``ctprep.synth.reports.WORDINGS``): side, lobe,
        cranio-caudal zone and extent, no template choice. None: the kind is not localized to a
        side or lobe; the report then uses the first of its ``report_sentence`` templates."""
        return None

    def cot_lobes(self, f: Finding) -> tuple[int, ...] | list[int]:
        """Lobes whose reasoning step repeats its report sentence (lung kinds)."""
        return ()

    def impression_phrase(self, f: Finding) -> str:
        """Short name with its place and size, as the impression lists it."""
        raise NotImplementedError

    def finding_sentence(self, f: Finding, rng: np.random.Generator) -> str:
        """One findings-style sentence on its own (OmniAbnorm's rewritten_findings)."""
        phrase = self.impression_phrase(f)
        return pick(rng, [f"There is {phrase}.", f"{capitalized(phrase)} is seen.", f"Findings show {phrase}."])

    def focus(self, a: Anatomy, params: dict) -> tuple[float, float]:
        """(height z, depth y) mm of a point inside it, where an OmniAbnorm axial / coronal cut goes."""
        raise ValueError(f"finding kind {self.name!r} is not localized (no OmniAbnorm focus)")
