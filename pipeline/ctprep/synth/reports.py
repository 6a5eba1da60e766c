"""Report and chain-of-thought text that describes exactly what was drawn.

Wording comes from several templates per statement, and measurements (aortic
diameter, lesion sizes, lobes, sides) come from the phantom, so reports are
mostly distinct and image <-> text retrieval is learnable. A report's findings
section is a fixed list of statements (``SECTIONS``); each finding kind
(``ctprep.synth.finding_kinds``) writes its sentence into one of them, and a
statement no finding speaks in gets its normal wording.

Two wordings (``WORDINGS``). ``default`` (``make demo``'s data, pinned byte for byte by
``tests/test_synth_identity.py``) draws one of several templates per statement. ``anatomy``
(opt-in, ``ctprep demo-data --wording anatomy``) is built so that each part of the encoder has
something only it can read: every statement takes its first template (no template noise), and a
localized finding (focal lung lesions, atelectasis, pleural effusion) is described by side, lobe,
cranio-caudal zone, extent and height above the lung base (``FindingKind.anatomy_sentence``), so
two reports of the same finding kinds differ only in where; the lobe steps of the CoT name side
and lobe ("Right lung, right upper lobe: ...").
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ctprep.synth.anatomy import LOBE_NAMES, LUNG_IDS, Anatomy, Finding
from ctprep.synth.finding_kinds import KINDS, kind_of
from ctprep.synth.finding_kinds.base import capitalized, cardiothoracic_ratio, pick

NOT_GIVEN = "Not given."
WORDINGS = ("default", "anatomy")
COT_LOBE_ORDER = (12, 13, 14, 10, 11)  # right upper, middle, lower, left upper, lower: one reasoning step each
LOOK = ["Assess", "Examine", "Check", "Evaluate"]

Wording = Callable[[Anatomy, np.random.Generator], str]


class FirstTemplate:
    """Stands in for the RNG of the wording choices: ``pick`` then always takes the first template."""

    def integers(self, n: int) -> int:
        return 0


@dataclass(frozen=True)
class Section:
    """One statement of the findings section, in report order.

    It says ``lead`` (if any), then the sentences of the findings whose kind's ``section`` is
    ``name``; without such findings ``normal`` (if any) instead.
    """

    name: str
    normal: Wording | None = None
    lead: Wording | None = None


def _options(*options: str) -> Wording:
    return lambda a, rng: pick(rng, list(options))


def _normal_heart(a: Anatomy, rng: np.random.Generator) -> str:
    ctr = cardiothoracic_ratio(a)
    return pick(rng, [
        "Heart size is normal.",
        "Cardiac dimensions are within normal limits.",
        f"The heart is of normal size (cardiothoracic ratio {ctr:.2f}).",
    ])  # fmt: skip


def _aortic_diameter(a: Anatomy, rng: np.random.Generator) -> str:
    aorta_mm = int(round(2 * a.aorta_r))
    return pick(rng, [
        f"The thoracic aorta measures {aorta_mm} mm in diameter.",
        f"Ascending aorta diameter is {aorta_mm} mm.",
        f"Thoracic aortic diameter is {aorta_mm} mm, within normal limits.",
    ])  # fmt: skip


SECTIONS = (
    Section("airways", _options("Trachea and both main bronchi are patent.",
                                "The trachea and main bronchi are midline and open; no endobronchial lesion.",
                                "Central airways are patent.")),
    Section("heart", _normal_heart),
    Section("pericardium", _options("No pericardial effusion.", "Pericardium is normal.",
                                    "No pericardial thickening or effusion.")),
    Section("aorta", lead=_aortic_diameter),
    Section("coronary"),
    Section("lymph_nodes", _options("No mediastinal or hilar lymphadenopathy.",
                                    "No pathologically enlarged lymph nodes in the mediastinum or hila.",
                                    "Mediastinal lymph nodes are not enlarged.")),
    Section("esophagus", _options("Esophagus is unremarkable.", "The esophagus has normal calibre.",
                                  "No esophageal wall thickening.")),
    Section("lungs", _options("Both lungs are clear; no nodule, mass or infiltrate.",
                              "Lung parenchyma is normally aerated without focal lesion.",
                              "No pulmonary nodule, consolidation or emphysema is seen.")),
    Section("pleura", _options("No pleural effusion or pneumothorax.", "Pleural spaces are clear.",
                               "No pleural effusion or thickening.")),
    Section("devices"),
    Section("abdomen", _options("Upper abdominal organs within the sections are unremarkable.",
                                "Visualized upper abdomen is normal.", "Liver and spleen in the sections are normal.")),
    Section("bones", _options("Thoracic vertebral body heights are preserved; no lytic or sclerotic lesion.",
                              "Bony structures are intact.",
                              "No destructive bone lesion in the thoracic spine or ribs.")),
)  # fmt: skip

_unknown = sorted({k.section for k in KINDS} - {s.name for s in SECTIONS})
if _unknown:
    raise ValueError(f"finding kinds name report sections that do not exist: {_unknown}")


def _statement(sec: Section, a: Anatomy, rng: np.random.Generator, lobe_text: dict[int, list[str]],
               anatomy: bool = False) -> str:  # fmt: skip
    """The text of one statement; lung findings also go into the reasoning step of their lobes."""
    parts = [sec.lead(a, rng)] if sec.lead else []
    found = [f for f in a.findings if kind_of(f.kind).section == sec.name]
    for f in found:
        kind = kind_of(f.kind)
        s = (anatomy and kind.anatomy_sentence(a, f)) or kind.report_sentence(a, f, rng)
        parts.append(s)
        for lobe in kind.cot_lobes(f):
            lobe_text[lobe].append(s)
    if not found and sec.normal:
        parts.append(sec.normal(a, rng))
    return " ".join(parts)


def _impression(a: Anatomy, rng: np.random.Generator) -> str:
    if not a.findings:
        return pick(rng, ["No significant pathology in the thorax.", "Normal chest CT.",
                          "No acute cardiopulmonary finding."])  # fmt: skip
    phrases = [impression_phrase(f) for f in a.findings]
    return " ".join(f"{i + 1}. {capitalized(ph)}." for i, ph in enumerate(phrases))


def _cot_steps(said: dict[str, str], lobe_text: dict[int, list[str]], impression: str,
               rng: np.random.Generator, anatomy: bool = False) -> list[str]:  # fmt: skip
    """The reasoning steps: airways, each lobe, pleura, heart, aorta, mediastinum, ..., conclusion."""
    steps = [f"{pick(rng, LOOK)} the airways: {said['airways']}"]
    for lobe in COT_LOBE_ORDER:
        body = " ".join(lobe_text[lobe]) or pick(
            rng, ["no nodule, consolidation or emphysema.", "clear, normally aerated.", "no focal abnormality."]
        )
        name = LOBE_NAMES[lobe]
        head = f"{name.split()[0].capitalize()} lung, {name}" if anatomy else name.capitalize()
        steps.append(f"{head}: {body}")
    steps.append(f"{pick(rng, LOOK)} the pleura: {said['pleura']}")
    coronary = said["coronary"]
    steps.append(f"Heart and pericardium: {said['heart']} {said['pericardium']}" + (f" {coronary}" if coronary else ""))
    steps.append(f"Aorta: {said['aorta']}")
    steps.append(f"Mediastinum and lymph nodes: {said['lymph_nodes']}")
    steps.append(f"Esophagus: {said['esophagus']}")
    if said["devices"]:
        steps.append(f"Devices: {said['devices']}")
    steps.append(f"Bones and spine: {said['bones']}")
    steps.append(f"Conclusion: {impression}")
    return steps


def compose_text(a: Anatomy, rng: np.random.Generator, wording: str = "default") -> dict:
    """Report sections + CoT steps for one scan.

    Args:
        wording: one of ``WORDINGS`` (module docstring). ``anatomy`` draws nothing from ``rng``.

    Returns:
        {"clinical", "technique", "findings", "impression", "steps": [str]}.
    """
    if wording not in WORDINGS:
        raise ValueError(f"unknown report wording {wording!r}; choose one of: {', '.join(WORDINGS)}")
    anatomy = wording == "anatomy"
    if anatomy:
        rng = FirstTemplate()  # type: ignore[assignment]
    lobe_text: dict[int, list[str]] = {lobe: [] for lobe in LUNG_IDS}
    said = {sec.name: _statement(sec, a, rng, lobe_text, anatomy) for sec in SECTIONS}
    findings_text = " ".join(s for s in said.values() if s)
    impression = _impression(a, rng)
    steps = _cot_steps(said, lobe_text, impression, rng, anatomy)
    clinical = pick(rng, ["Cough.", "Shortness of breath.", "Chest pain.", "Follow-up.", "Fever and cough.",
                          "Screening.", NOT_GIVEN])  # fmt: skip
    technique = pick(rng, ["Non-contrast thin-section chest CT.", "Axial CT images of the thorax without contrast.",
                           NOT_GIVEN])  # fmt: skip
    return {"clinical": clinical, "technique": technique, "findings": findings_text, "impression": impression,
            "steps": steps}  # fmt: skip


def finding_sentence(f: Finding, rng: np.random.Generator) -> str:
    """One findings-style sentence for a single abnormality (OmniAbnorm's rewritten_findings)."""
    return kind_of(f.kind).finding_sentence(f, rng)


def impression_phrase(f: Finding) -> str:
    """Short name of one abnormality with its place and size."""
    return kind_of(f.kind).impression_phrase(f)
