"""The finding kinds of the phantom generator: one class per kind, listed here.

Adding a finding: write its :class:`FindingKind` subclass (in the module of its region) and
add it to ``KINDS``, ``DRAW_ORDER`` and, if OmniAbnorm images may show it, ``OMNI_KINDS``.
The three orders are separate because each decides the order of RNG draws (see
``tests/test_synth_identity.py``); a new kind goes at the end of ``KINDS`` and ``OMNI_KINDS``
so that the data of the existing kinds stays the same.
"""

from __future__ import annotations

from ctprep.synth.finding_kinds.airways import Bronchiectasis, PeribronchialThickening
from ctprep.synth.anatomy import STAGES
from ctprep.synth.finding_kinds.base import FindingKind, SamplingContext
from ctprep.synth.finding_kinds.devices import Pacemaker
from ctprep.synth.finding_kinds.heart import Cardiomegaly, CoronaryCalcification, PericardialEffusion
from ctprep.synth.finding_kinds.lung_diffuse import Emphysema, FibroticSequela, MosaicAttenuation, SeptalThickening
from ctprep.synth.finding_kinds.lung_focal import Atelectasis, Consolidation, Nodule, Opacity
from ctprep.synth.finding_kinds.mediastinum import AorticCalcification, HiatalHernia, Lymphadenopathy
from ctprep.synth.finding_kinds.pleura import PleuralEffusion

# Every kind, in the order an abnormal CT-RATE scan rolls each one's prior.
KINDS: tuple[FindingKind, ...] = (
    Nodule(), PleuralEffusion(), Cardiomegaly(), Emphysema(), Consolidation(), Opacity(), Atelectasis(),
    AorticCalcification(), CoronaryCalcification(), PericardialEffusion(), Lymphadenopathy(), HiatalHernia(),
    Pacemaker(), MosaicAttenuation(), FibroticSequela(), SeptalThickening(), Bronchiectasis(),
    PeribronchialThickening(),
)  # fmt: skip
# The order a scan's findings are sampled, drawn and described in. The heart's findings come first
# (later placement keeps clear of a bigger heart and its fluid); the pleural fluid is drawn last,
# because it replaces lung, and lung lesions are placed outside it.
DRAW_ORDER = (
    "cardiomegaly", "pericardial_effusion", "aortic_calcification", "coronary_calcification", "emphysema",
    "mosaic_attenuation", "septal_thickening", "fibrotic_sequela", "bronchiectasis", "peribronchial_thickening",
    "opacity", "consolidation", "atelectasis", "nodule", "lymphadenopathy", "hiatal_hernia", "device", "effusion",
)  # fmt: skip
# The kinds an OmniAbnorm datum may show (those with a ``category``), in the order its RNG picks from.
OMNI_KINDS = (
    "nodule", "consolidation", "opacity", "effusion", "lymphadenopathy", "pericardial_effusion", "atelectasis",
    "hiatal_hernia", "aortic_calcification",
)  # fmt: skip

_BY_NAME = {k.name: k for k in KINDS}


def kind_of(name: str) -> FindingKind:
    """The kind called ``name`` (``Finding.kind``)."""
    kind = _BY_NAME.get(name)
    if kind is None:
        raise ValueError(f"unknown finding kind {name!r}; choose one of: {', '.join(_BY_NAME)}")
    return kind


def _check_registry() -> None:
    """Fail at import when a kind is missing from an order, listed twice or set up inconsistently."""
    names = [k.name for k in KINDS]
    if len(set(names)) != len(names) or sorted(DRAW_ORDER) != sorted(names):
        raise ValueError(f"DRAW_ORDER must list every kind of KINDS once: {DRAW_ORDER} vs {names}")
    if sorted(OMNI_KINDS) != sorted(k.name for k in KINDS if k.category):
        raise ValueError(f"OMNI_KINDS must list exactly the kinds with an OmniAbnorm category: {OMNI_KINDS}")
    for k in KINDS:
        if k.stage not in STAGES:
            raise ValueError(f"finding kind {k.name!r}: stage {k.stage!r} is not one of {STAGES}")


_check_registry()

__all__ = ["DRAW_ORDER", "KINDS", "OMNI_KINDS", "FindingKind", "SamplingContext", "kind_of"]
