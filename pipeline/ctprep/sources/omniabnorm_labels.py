"""What an OmniAbnorm-CT abnormality says: its CT-RATE labels, its coarse region, its group, and the
window that maps the 8-bit JPEG back to HU (rules: :mod:`ctprep.sources.omniabnorm`)."""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from ctprep.schema import ABNORMALITY_LABELS

# Standard CT windows for records that name their window instead of giving numbers.
NAMED_WINDOWS = {
    "lung": (-600.0, 1500.0),
    "mediastinum": (40.0, 400.0),
    "mediastinal": (40.0, 400.0),
    "soft": (40.0, 400.0),
    "soft_tissue": (40.0, 400.0),
    "abdomen": (40.0, 400.0),
    "bone": (400.0, 1800.0),
    "brain": (40.0, 80.0),
}
DEFAULT_WINDOW = (40.0, 400.0)

# Abnormality category -> coarse region name, for categories that are not region names
# themselves. Categories with no coarse region (e.g. mediastinum: lymph nodes) fall back
# to keyword matching of the description, then to no region (mask pixels stay 0).
CATEGORY_REGION = {
    "pleura": "lung",
    "pleural": "lung",
    "pulmonary": "lung",
    "airway": "trachea",
    "cardiac": "heart",
    "pericardium": "heart",
    "vessel": "aorta",
    "vascular": "aorta",
    "bone": "spine",
    "gastrointestinal": "esophagus",
}

# Extra spellings of the 18 CT-RATE labels seen in abnormality labels.
LABEL_SYNONYMS = {
    "pulmonary nodule": "Lung nodule",
    "nodule": "Lung nodule",
    "lung mass": "Lung nodule",
    "aortic calcification": "Arterial wall calcification",
    "coronary calcification": "Coronary artery wall calcification",
    "coronary artery calcification": "Coronary artery wall calcification",
    "ground glass opacity": "Lung opacity",
    "ground-glass opacity": "Lung opacity",
    "mediastinal lymphadenopathy": "Lymphadenopathy",
    "enlarged lymph node": "Lymphadenopathy",
    "pulmonary fibrosis": "Pulmonary fibrotic sequela",
    "hiatus hernia": "Hiatal hernia",
}
_LABEL_INDEX = {name.lower(): i for i, name in enumerate(ABNORMALITY_LABELS)}


def _norm(text: Any) -> str:
    return " ".join(str(text or "").lower().replace("_", " ").split())


def label_vector(abnormalities: list[dict[str, Any]]) -> list[int]:
    """18 CT-RATE labels: 1 where an abnormality's ``label`` names one, else -1 (unknown)."""
    out = [-1] * len(ABNORMALITY_LABELS)
    for abn in abnormalities:
        name = _norm(abn.get("label"))
        target = _LABEL_INDEX.get(name)
        if target is None and name in LABEL_SYNONYMS:
            target = _LABEL_INDEX[LABEL_SYNONYMS[name].lower()]
        if target is not None:
            out[target] = 1
    return out


def abnormality_region(abn: dict[str, Any], region_names: list[str],
                       keywords: dict[str, list[str]] | None = None) -> int:
    """Coarse region id (1-based index into ``region_names``, 0 = none) of one abnormality.

    Order: the category is a region name; the category has an alias in
    ``CATEGORY_REGION``; the description / label names a region by ``keywords``
    (default: the *code default* of ``TextConfig.region_keywords``, not the run's
    config: the mask is a resample output, and the resample key does not cover the
    text config; first region in ``region_names`` order that matches).
    """
    if keywords is None:
        from ctprep.config import TextConfig

        keywords = TextConfig().region_keywords
    category = _norm(abn.get("category"))
    names = [n.lower() for n in region_names]
    if category in names:
        return names.index(category) + 1
    alias = CATEGORY_REGION.get(category)
    if alias in names:
        return names.index(alias) + 1
    text = f"{abn.get('description', '')} {abn.get('label', '')}"
    for i, name in enumerate(region_names):
        for word in keywords.get(name, ()):
            if re.search(r"\b" + re.escape(word.lower()), text, re.IGNORECASE):
                return i + 1
    return 0


def parse_window(windows: Any) -> tuple[float, float]:
    """(center, width) from a record's ``windows``: a dict ({center|level|wl, width|ww}),
    a [center, width] pair, a window name, or a list of those (the first one is used)."""
    w = windows
    if isinstance(w, list) and w and not isinstance(w[0], (int, float)):
        w = w[0]
    if isinstance(w, dict):
        center = next((w[k] for k in ("center", "level", "wl", "window_center", "c") if k in w), None)
        width = next((w[k] for k in ("width", "ww", "window_width", "w") if k in w), None)
        if center is not None and width is not None and float(width) > 0:
            return float(center), float(width)
        if "name" in w:
            w = w["name"]
    if isinstance(w, (list, tuple)) and len(w) == 2 and all(isinstance(v, (int, float)) for v in w) and w[1] > 0:
        return float(w[0]), float(w[1])
    if isinstance(w, str) and _norm(w).replace(" ", "_") in NAMED_WINDOWS:
        return NAMED_WINDOWS[_norm(w).replace(" ", "_")]
    raise ValueError(f"cannot read a window from {windows!r}")


def window_to_hu(u8: np.ndarray, center: float, width: float) -> np.ndarray:
    """Invert 8-bit windowing: gray value -> approximate HU (float32)."""
    return (u8.astype(np.float32) * np.float32(width / 255.0) + np.float32(center - width / 2.0)).astype(np.float32)


def datum_abnormalities(datum: dict[str, Any]) -> list[dict[str, Any]]:
    """The datum's abnormalities, each with a ``group_id`` (``abnormality`` or ``abnormality_group``)."""
    if isinstance(datum.get("abnormality"), list):
        out = [dict(a) for a in datum["abnormality"] if isinstance(a, dict)]
    elif isinstance(datum.get("abnormality_group"), dict):
        out = []
        for gid, members in datum["abnormality_group"].items():
            for a in members if isinstance(members, list) else []:
                if isinstance(a, dict):
                    out.append({**a, "group_id": a.get("group_id", gid)})
    else:
        return []
    for j, a in enumerate(out):
        if a.get("group_id") in (None, ""):
            a["group_id"] = f"_{a.get('id', j)}"  # no group: a group of its own
    return out


def abnormality_groups(abnormalities: list[dict[str, Any]]) -> list[list[int]]:
    """Indices into ``abnormalities`` per group, groups in order of first appearance."""
    groups: dict[str, list[int]] = {}
    for j, a in enumerate(abnormalities):
        groups.setdefault(str(a.get("group_id", f"_{j}")), []).append(j)
    return list(groups.values())
