"""Report and chain-of-thought text that describes exactly what was drawn.

Wording comes from several templates per statement, and measurements (aortic
diameter, lesion sizes, lobes, sides) come from the phantom, so reports are
mostly distinct and image <-> text retrieval is learnable.
"""

from __future__ import annotations

import numpy as np

from ctprep.synth.anatomy import CAGE_WALL, LOBE_NAMES, LUNG_IDS, Anatomy, Finding

NOT_GIVEN = "Not given."
_SIDE = {1: "right", -1: "left"}


def _pick(rng: np.random.Generator, options: list[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _effusion_size(depth: float) -> str:
    return "small" if depth < 32 else "moderate" if depth < 42 else "large"


def _lung_sentences(f: Finding, rng) -> list[tuple[int, str]]:
    """(lobe id, sentence) pairs for a lung finding; lobe 0 = both lungs."""
    p = f.params
    if f.kind == "nodule":
        lobe = LOBE_NAMES[p["lobe"]]
        kind = "solid" if p["solid"] else "part-solid"
        s = _pick(rng, [
            f"A {p['size_mm']} mm {kind} nodule is seen in the {lobe}.",
            f"In the {lobe} there is a {kind} pulmonary nodule measuring {p['size_mm']} mm.",
            f"{lobe.capitalize()}: {kind} nodule, {p['size_mm']} mm in diameter.",
            f"A {kind} nodular lesion of {p['size_mm']} mm is noted in the {lobe}.",
        ])  # fmt: skip
        return [(p["lobe"], s)]
    if f.kind == "consolidation":
        lobe = LOBE_NAMES[p["lobe"]]
        cm = p["size_mm"] / 10
        s = _pick(rng, [
            f"Consolidation with air bronchograms in the {lobe}, about {cm:.1f} cm.",
            f"A dense consolidation area measuring approximately {cm:.1f} cm is present in the {lobe}.",
            f"There is pneumonic consolidation in the {lobe} ({cm:.1f} cm).",
        ])  # fmt: skip
        return [(p["lobe"], s)]
    if f.kind == "opacity":
        lobe = LOBE_NAMES[p["lobe"]]
        s = _pick(rng, [
            f"Ground-glass opacity of about {p['size_mm']} mm in the {lobe}.",
            f"A patchy ground-glass density area ({p['size_mm']} mm) is observed in the {lobe}.",
            f"Increased ground-glass attenuation in the {lobe}, approximately {p['size_mm']} mm.",
        ])  # fmt: skip
        return [(p["lobe"], s)]
    if f.kind == "atelectasis":
        lobe = LOBE_NAMES[p["lobe"]]
        s = _pick(rng, [
            f"Plate-like atelectasis in the posterior basal {lobe}.",
            f"Subsegmental atelectasis is seen in the {lobe}.",
            f"Linear atelectatic band in the {lobe}.",
        ])  # fmt: skip
        return [(p["lobe"], s)]
    if f.kind == "emphysema":
        sev = p["severity"]
        s = _pick(rng, [
            f"{sev.capitalize()} centrilobular emphysema in both upper lobes.",
            f"Emphysematous changes, {sev}, predominantly in the upper lobes of both lungs.",
            f"Both upper lobes show {sev} emphysema with low-attenuation areas.",
        ])  # fmt: skip
        return [(0, s)]
    if f.kind == "mosaic_attenuation":
        return [(0, _pick(rng, ["Mosaic attenuation pattern in both lungs.",
                                "Both lungs show a mosaic attenuation pattern with patchy density differences."]))]  # fmt: skip
    if f.kind == "fibrotic_sequela":
        return [(0, _pick(rng, ["Subpleural fibrotic bands and reticulation in both lower lobes, consistent with "
                                "fibrotic sequelae.", "Fibrotic sequelae with subpleural reticular opacities in the "
                                "lower lobes."]))]  # fmt: skip
    if f.kind == "septal_thickening":
        where = "both lower lobes" if len(p["lobes"]) == 2 else "both lungs"
        return [(0, _pick(rng, [f"Interlobular septal thickening in {where}.",
                                f"Smooth interlobular septal thickening is seen in {where}."]))]  # fmt: skip
    if f.kind == "bronchiectasis":
        lobe = LOBE_NAMES[p["lobe"]]
        return [(p["lobe"], _pick(rng, [f"Cylindrical bronchiectasis in the {lobe}.",
                                         f"Dilated bronchi consistent with bronchiectasis in the {lobe}."]))]  # fmt: skip
    if f.kind == "peribronchial_thickening":
        return [(0, _pick(rng, ["Peribronchial thickening in both lower lobes.",
                                "Bronchial walls in the lower lobes are thickened (peribronchial thickening)."]))]  # fmt: skip
    return []


def _impression_phrase(f: Finding) -> str:
    p = f.params
    k = f.kind
    if k == "nodule":
        return f"{p['size_mm']} mm nodule in the {LOBE_NAMES[p['lobe']]}"
    if k == "consolidation":
        return f"consolidation in the {LOBE_NAMES[p['lobe']]}, consistent with pneumonia"
    if k == "opacity":
        return f"ground-glass opacity in the {LOBE_NAMES[p['lobe']]}"
    if k == "atelectasis":
        return f"atelectasis in the {LOBE_NAMES[p['lobe']]}"
    if k == "emphysema":
        return f"{p['severity']} upper lobe emphysema"
    if k == "effusion":
        sides = p["sides"]
        if len(sides) == 2:
            return "bilateral pleural effusion"
        (side, depth), = sides.items()
        return f"{_effusion_size(depth)} {_SIDE[int(side)]} pleural effusion"
    if k == "cardiomegaly":
        return "cardiomegaly"
    if k == "pericardial_effusion":
        return "pericardial effusion"
    if k == "aortic_calcification":
        return f"{p['extent']} atherosclerotic calcification of the thoracic aorta"
    if k == "coronary_calcification":
        return "coronary artery calcification"
    if k == "lymphadenopathy":
        return "mediastinal lymphadenopathy (" + ", ".join(n["station"] for n in p["nodes"]) + ")"
    if k == "hiatal_hernia":
        return "hiatal hernia"
    if k == "device":
        return "cardiac pacemaker in place"
    if k == "mosaic_attenuation":
        return "mosaic attenuation pattern"
    if k == "fibrotic_sequela":
        return "fibrotic sequelae in both lower lobes"
    if k == "septal_thickening":
        return "interlobular septal thickening"
    if k == "bronchiectasis":
        return f"bronchiectasis in the {LOBE_NAMES[p['lobe']]}"
    if k == "peribronchial_thickening":
        return "peribronchial thickening"
    raise ValueError(k)


def compose_text(a: Anatomy, rng: np.random.Generator) -> dict:
    """Report sections + CoT steps for one scan.

    Returns:
        {"clinical", "technique", "findings", "impression", "steps": [str]}.
    """
    fs = {f.kind: f for f in a.findings}
    aorta_mm = int(round(2 * a.aorta_r))
    hr = a.heart_radii()
    ctr = (2 * hr[2]) / (2 * (a.ax - a.fat - CAGE_WALL))

    airways = _pick(rng, [
        "Trachea and both main bronchi are patent.",
        "The trachea and main bronchi are midline and open; no endobronchial lesion.",
        "Central airways are patent.",
    ])  # fmt: skip
    if "cardiomegaly" in fs:
        heart = _pick(rng, [
            f"The heart is enlarged, cardiothoracic ratio about {ctr:.2f}, consistent with cardiomegaly.",
            f"Cardiomegaly is present (cardiothoracic ratio {ctr:.2f}).",
            f"Heart size is increased; cardiothoracic ratio is {ctr:.2f}.",
        ])  # fmt: skip
    else:
        heart = _pick(rng, [
            "Heart size is normal.",
            "Cardiac dimensions are within normal limits.",
            f"The heart is of normal size (cardiothoracic ratio {ctr:.2f}).",
        ])  # fmt: skip
    if "pericardial_effusion" in fs:
        t = int(round(fs["pericardial_effusion"].params["thickness"]))
        peri = _pick(rng, [f"Pericardial effusion with a thickness of {t} mm.",
                           f"There is pericardial fluid reaching {t} mm."])  # fmt: skip
    else:
        peri = _pick(rng, ["No pericardial effusion.", "Pericardium is normal.", "No pericardial thickening or effusion."])
    aorta = _pick(rng, [
        f"The thoracic aorta measures {aorta_mm} mm in diameter.",
        f"Ascending aorta diameter is {aorta_mm} mm.",
        f"Thoracic aortic diameter is {aorta_mm} mm, within normal limits.",
    ])  # fmt: skip
    if "aortic_calcification" in fs:
        ext = fs["aortic_calcification"].params["extent"]
        aorta += " " + _pick(rng, [
            f"There are {ext} calcified atherosclerotic plaques in the aortic wall.",
            f"{ext.capitalize()} atherosclerotic calcifications are seen along the thoracic aorta.",
        ])  # fmt: skip
    coronary = ""
    if "coronary_calcification" in fs:
        coronary = _pick(rng, ["Calcified plaques are present in the coronary arteries.",
                               "Coronary artery calcifications are noted."])  # fmt: skip
    if "lymphadenopathy" in fs:
        nodes = fs["lymphadenopathy"].params["nodes"]
        parts = [f"{n['station']} ({n['short_axis_mm']} mm short axis)" for n in nodes]
        lymph = "Enlarged mediastinal lymph nodes: " + ", ".join(parts) + "."
    else:
        lymph = _pick(rng, ["No mediastinal or hilar lymphadenopathy.",
                            "No pathologically enlarged lymph nodes in the mediastinum or hila.",
                            "Mediastinal lymph nodes are not enlarged."])  # fmt: skip
    if "hiatal_hernia" in fs:
        esoph = f"A hiatal hernia measuring {fs['hiatal_hernia'].params['size_mm']} mm is seen at the esophageal hiatus."
    else:
        esoph = _pick(rng, ["Esophagus is unremarkable.", "The esophagus has normal calibre.",
                            "No esophageal wall thickening."])  # fmt: skip

    lobe_text: dict[int, list[str]] = {lobe: [] for lobe in LUNG_IDS}
    lung_sents: list[str] = []
    for f in a.findings:
        for lobe, s in _lung_sentences(f, rng):
            lung_sents.append(s)
            for lb in ([lobe] if lobe else f.params["lobes"]):
                lobe_text[lb].append(s)
    if not lung_sents:
        lung_sents = [_pick(rng, [
            "Both lungs are clear; no nodule, mass or infiltrate.",
            "Lung parenchyma is normally aerated without focal lesion.",
            "No pulmonary nodule, consolidation or emphysema is seen.",
        ])]  # fmt: skip
    if "effusion" in fs:
        sides = fs["effusion"].params["sides"]
        if len(sides) == 2:
            pleura = (f"Bilateral pleural effusion, {_effusion_size(sides[1])} on the right and "
                      f"{_effusion_size(sides[-1])} on the left.")  # fmt: skip
        else:
            (side, depth), = sides.items()
            pleura = _pick(rng, [
                f"{_effusion_size(depth).capitalize()} pleural effusion on the {_SIDE[int(side)]} "
                f"(maximum depth {int(round(depth))} mm).",
                f"There is a {_effusion_size(depth)} {_SIDE[int(side)]}-sided pleural effusion.",
            ])  # fmt: skip
    else:
        pleura = _pick(rng, ["No pleural effusion or pneumothorax.", "Pleural spaces are clear.",
                             "No pleural effusion or thickening."])  # fmt: skip
    device = ""
    if "device" in fs:
        device = "A cardiac pacemaker generator is seen in the left pectoral region with its lead in the right heart."
    abdomen = _pick(rng, ["Upper abdominal organs within the sections are unremarkable.",
                          "Visualized upper abdomen is normal.", "Liver and spleen in the sections are normal."])  # fmt: skip
    bones = _pick(rng, ["Thoracic vertebral body heights are preserved; no lytic or sclerotic lesion.",
                        "Bony structures are intact.", "No destructive bone lesion in the thoracic spine or ribs."])  # fmt: skip

    findings_text = " ".join(
        s for s in [airways, heart, peri, aorta, coronary, lymph, esoph, *lung_sents, pleura, device, abdomen, bones] if s
    )
    if a.findings:
        phrases = [_impression_phrase(f) for f in a.findings]
        impression = " ".join(f"{i + 1}. {ph[0].upper() + ph[1:]}." for i, ph in enumerate(phrases))
    else:
        impression = _pick(rng, ["No significant pathology in the thorax.", "Normal chest CT.",
                                 "No acute cardiopulmonary finding."])  # fmt: skip

    look = ["Assess", "Examine", "Check", "Evaluate"]
    steps = [f"{_pick(rng, look)} the airways: {airways}"]
    for lobe in (12, 13, 14, 10, 11):
        name = LOBE_NAMES[lobe]
        body = " ".join(lobe_text[lobe]) or _pick(
            rng, ["no nodule, consolidation or emphysema.", "clear, normally aerated.", "no focal abnormality."]
        )
        steps.append(f"{name.capitalize()}: {body}")
    steps.append(f"{_pick(rng, look)} the pleura: {pleura}")
    steps.append(f"Heart and pericardium: {heart} {peri}" + (f" {coronary}" if coronary else ""))
    steps.append(f"Aorta: {aorta}")
    steps.append(f"Mediastinum and lymph nodes: {lymph}")
    steps.append(f"Esophagus: {esoph}")
    if device:
        steps.append(f"Devices: {device}")
    steps.append(f"Bones and spine: {bones}")
    steps.append(f"Conclusion: {impression}")

    clinical = _pick(rng, ["Cough.", "Shortness of breath.", "Chest pain.", "Follow-up.", "Fever and cough.",
                           "Screening.", NOT_GIVEN])  # fmt: skip
    technique = _pick(rng, ["Non-contrast thin-section chest CT.", "Axial CT images of the thorax without contrast.",
                            NOT_GIVEN])  # fmt: skip
    return {"clinical": clinical, "technique": technique, "findings": findings_text, "impression": impression,
            "steps": steps}  # fmt: skip


def finding_sentence(f: Finding, rng: np.random.Generator) -> str:
    """One findings-style sentence for a single abnormality (OmniAbnorm's rewritten_findings)."""
    lung = _lung_sentences(f, rng)
    if lung:
        return lung[0][1]
    phrase = _impression_phrase(f)
    return _pick(rng, [f"There is {phrase}.", f"{phrase[0].upper() + phrase[1:]} is seen.", f"Findings show {phrase}."])


def impression_phrase(f: Finding) -> str:
    """Short name of one abnormality with its place and size."""
    return _impression_phrase(f)
