"""Region-wise report sentences for the local (region <-> text) head, fVLM style.

The findings are split into sentences; each sentence goes to every coarse
region whose keywords it names (a sentence about "the aortic arch and the
heart" serves both). Regions that no sentence names get a configurable
default text ("No significant abnormality ...") and ``region_has_text = 0`` so
the loss can down-weight or skip them.

Keywords (``TextConfig.region_keywords``: region name -> words) match at the
start of a word, case-insensitively: ``"pericard"`` matches pericardial and
pericardium, ``"lung"`` matches lungs, but ``"aort"`` does not match inside
another word. Keywords of a region name that is not in the pipeline's
``region_names`` are ignored, so one keyword table serves every region
configuration.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Mapping, Sequence

DEFAULT_REGION_TEXT = "No significant abnormality."

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")


def split_sentences(text: str) -> list[str]:
    """Sentences of ``text`` (split after . ! ? followed by space, and at newlines)."""
    return [s.strip() for s in _SENTENCE_END.split(text or "") if s and s.strip()]


@lru_cache(maxsize=256)
def _keyword_pattern(words: tuple[str, ...]) -> re.Pattern[str] | None:
    parts = []
    for word in words:
        word = word.strip().lower()
        if word:
            parts.append(r"\b" + re.escape(word))
    return re.compile("|".join(parts), re.IGNORECASE) if parts else None


def _patterns(region_names: Sequence[str], keywords: Mapping[str, Sequence[str]]):
    return [(i, _keyword_pattern(tuple(keywords.get(name, ())))) for i, name in enumerate(region_names)]


def sentences_by_region(
    findings: str, region_names: Sequence[str], keywords: Mapping[str, Sequence[str]]
) -> list[list[str]]:
    """For each region (``region_names`` order), the findings sentences that name it, in text order."""
    out: list[list[str]] = [[] for _ in region_names]
    pats = _patterns(region_names, keywords)
    for sentence in split_sentences(findings):
        for i, pat in pats:
            if pat is not None and pat.search(sentence):
                out[i].append(sentence)
    return out


def region_texts(
    findings: str,
    region_names: Sequence[str],
    keywords: Mapping[str, Sequence[str]],
    default_text: str = DEFAULT_REGION_TEXT,
) -> tuple[list[str], list[int]]:
    """One text per region and ``region_has_text`` (1 = own sentences, 0 = default text).

    ``default_text`` may contain ``{region}`` (replaced by the region name, e.g.
    "No significant abnormality in the {region}.").
    """
    texts, has = [], []
    for name, sentences in zip(region_names, sentences_by_region(findings, region_names, keywords)):
        if sentences:
            texts.append(" ".join(sentences))
            has.append(1)
        else:
            texts.append(default_text.replace("{region}", name))
            has.append(0)
    return texts, has


def step_regions(
    steps: Sequence[str], region_names: Sequence[str], keywords: Mapping[str, Sequence[str]]
) -> list[int]:
    """Per step, the index of the region it names first (earliest keyword in the text), -1 if none."""
    pats = _patterns(region_names, keywords)
    out = []
    for step in steps:
        best, best_pos = -1, None
        for i, pat in pats:
            m = pat.search(step) if pat is not None else None
            if m is not None and (best_pos is None or m.start() < best_pos):
                best, best_pos = i, m.start()
        out.append(best)
    return out
