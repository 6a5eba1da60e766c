"""Stage ``text``: tokenized report, CoT steps and region sentences per case.

Pure function: :func:`tokenize_case_text` (case text dict in, int32 token
arrays + the exact strings that were tokenized out). Inputs are the
``CaseInput.text`` dict of a source: ``findings``, ``impression``, ``report``
and ``steps`` (strings or ``{"step": n, "text": ...}`` objects).

The stage is keyed by the text config *and the tokenizer identity* (hash of
its vocabulary files), so swapping the tokenizer reruns ``text`` and
``pack`` and nothing upstream.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ctprep.config import to_jsonable
from ctprep.quarantine import MISSING_REPORT, QuarantineError
from ctprep.region_text import region_texts, step_regions
from ctprep.schema import TEXT_MEMBERS, TRUNCATION_KEYS
from ctprep.stages.base import NOTES_KEY, CaseTask, atomic_path, case_stage
from ctprep.tokenizer import LoadedTokenizer, encode_padded_counted, load_tokenizer, tokenizer_identity

# CT-RATE writes a missing report section as this string.
NOT_GIVEN = "not given."


def clean_section(value: Any) -> str:
    """A report section as text; missing / NaN / "Not given." -> ""."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    text = " ".join(str(value).split())
    if text.lower() in (NOT_GIVEN, NOT_GIVEN.rstrip("."), "nan", "none"):
        return ""
    return text


def report_text(text: Mapping[str, Any]) -> str:
    """Findings + impression (sections that are "Not given." dropped).

    Falls back to the whole ``report`` when neither section is present.
    """
    parts = [clean_section(text.get("findings")), clean_section(text.get("impression"))]
    joined = " ".join(p for p in parts if p)
    return joined or clean_section(text.get("report"))


def ordered_steps(steps: Sequence[Any] | None, max_steps: int | None = None) -> list[str]:
    """CoT steps in reasoning order, as strings, empty ones dropped, at most ``max_steps``.

    Steps may be strings (kept in list order) or ``{"step": n, "text": str}``
    objects, ordered by ``step`` where every object carries one (stable sort,
    so equal numbers keep list order).
    """
    items: list[tuple[float, int, str]] = []
    all_numbered = True
    for pos, step in enumerate(steps or ()):
        number = None
        if isinstance(step, Mapping):
            body = step.get("text", step.get("content", ""))
            number = step.get("step")
        else:
            body = step
        try:
            key = float(number)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            all_numbered, key = False, float(pos)
        items.append((key, pos, clean_section(body)))
    if all_numbered:
        items.sort(key=lambda t: (t[0], t[1]))
    out = [body for _, _, body in items if body]
    return out[:max_steps] if max_steps is not None else out


def tokenize_case_text(
    text: Mapping[str, Any],
    tok: LoadedTokenizer,
    region_names: Sequence[str],
    region_keywords: Mapping[str, Sequence[str]],
    *,
    max_len_report: int,
    max_len_step: int,
    max_len_region: int,
    max_steps: int,
    no_finding_text: str,
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Tokenize one case's text.

    Returns:
        arrays: ``report_ids`` int32 (max_len_report,), ``report_len`` int32 (),
            ``steps_ids`` int32 (S, max_len_step), ``steps_len`` int32 (S,),
            ``region_text_ids`` int32 (R, max_len_region), ``region_text_len`` int32 (R,),
            ``region_has_text`` uint8 (R,) - padded with the tokenizer's pad id.
        meta: ``report_text``, ``steps_text``, ``step_regions``, ``region_texts``,
            ``tokenizer`` (the strings exactly as tokenized; see ``ctprep.schema.META_KEYS``),
            ``truncated`` (what was cut to fit, ``TRUNCATION_KEYS``: steps beyond ``max_steps``,
            tokens beyond each ``max_len_*``; recorded in the sample's ``meta.json``) and
            ``texts_cut`` (how many reports / steps / region texts lost their tail).
    """
    report = report_text(text)
    all_steps = ordered_steps(text.get("steps"))
    steps = all_steps[:max_steps]
    findings = clean_section(text.get("findings")) or report
    regions, has_text = region_texts(findings, region_names, region_keywords, no_finding_text)

    report_ids, report_len, report_cut = encode_padded_counted(tok, [report], max_len_report)
    steps_ids, steps_len, steps_cut = encode_padded_counted(tok, steps, max_len_step)
    region_ids, region_len, regions_cut = encode_padded_counted(tok, regions, max_len_region)
    truncated = dict(zip(TRUNCATION_KEYS, (len(all_steps) - len(steps), int(report_cut.sum()),
                                           int(steps_cut.sum()), int(regions_cut.sum()))))
    arrays = {
        "report_ids": report_ids[0],
        "report_len": np.asarray(report_len[0], dtype=np.int32),
        "steps_ids": steps_ids,
        "steps_len": steps_len,
        "region_text_ids": region_ids,
        "region_text_len": region_len,
        "region_has_text": np.asarray(has_text, dtype=np.uint8),
    }
    meta = {
        "report_text": report,
        "steps_text": steps,
        "step_regions": step_regions(steps, region_names, region_keywords),
        "region_texts": regions,
        "tokenizer": dict(tok.identity),
        "truncated": truncated,
        "texts_cut": {"report": int(np.count_nonzero(report_cut)), "steps": int(np.count_nonzero(steps_cut)),
                      "regions": int(np.count_nonzero(regions_cut))},
    }
    return arrays, meta


# --------------------------------------------------------------------------- stage wrapper


def text_config_slice(config) -> dict:
    """Text settings, the tokenizer identity (content hash + name, both recorded in every sample)
    and the region list - not the tokenizer path: the same tokenizer copied elsewhere reruns nothing."""
    settings = to_jsonable(config.text)
    settings.pop("tokenizer", None)
    return {"text": settings, "tokenizer": tokenizer_identity(config.text.tokenizer),
            "regions": list(config.regions.names)}


# version 2: text.json records what was cut ("truncated": steps dropped, tokens cut; "texts_cut").
@case_stage("text", upstream=(), version="2", config_slice=text_config_slice,
            output=lambda case_id: f"text/{case_id}", case_fields=("text",))
def run_text(task: CaseTask) -> dict:
    """Writer: folder ``text/<case>/`` with ``text.json`` (strings as tokenized) and one ``.npy`` per array."""
    cfg = task.config.text
    if not report_text(task.case.text) and not ordered_steps(task.case.text.get("steps")):
        # Without any text the case cannot be trained contrastively (and would match every empty report).
        raise QuarantineError(MISSING_REPORT, "no findings, impression, report or CoT steps for this case")
    tok = load_tokenizer(cfg.tokenizer)
    arrays, meta = tokenize_case_text(
        task.case.text, tok, task.config.regions.names, cfg.region_keywords,
        max_len_report=cfg.max_len_report, max_len_step=cfg.max_len_step, max_len_region=cfg.max_len_region,
        max_steps=cfg.max_steps, no_finding_text=cfg.no_finding_text,
    )
    with atomic_path(task.output_path) as tmp:
        tmp.mkdir(parents=True)
        for name, arr in arrays.items():
            np.save(tmp / f"{name}.npy", arr, allow_pickle=False)
        (tmp / TEXT_META_FILE).write_text(json.dumps(meta, ensure_ascii=False, sort_keys=True))
    notes = {TRUNCATION_NOTES[k]: v for k, v in meta["texts_cut"].items() if v}
    if meta["truncated"]["steps_dropped"]:
        notes[STEPS_DROPPED_NOTE] = meta["truncated"]["steps_dropped"]
    return {"steps": len(meta["steps_text"]), "report_tokens": int(arrays["report_len"]),
            "regions_with_text": int(arrays["region_has_text"].sum()), "truncated": dict(meta["truncated"]),
            # counted by the build summary ("notes"): raise text.max_* when these are common
            NOTES_KEY: notes}


TEXT_ARRAYS = TEXT_MEMBERS  # the arrays run_text writes (= tokenize_case_text's), one .npy each
TEXT_META_FILE = "text.json"


def read_case_text(path: str | os.PathLike[str]) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Reader of :func:`run_text`'s output folder: (``TEXT_ARRAYS`` name -> array, ``text.json``).

    Raises FileNotFoundError when an array or ``text.json`` is missing (an incomplete folder is
    never renamed into place, so that means a folder of another stage version).
    """
    folder = Path(path)
    arrays = {name: np.load(folder / f"{name}.npy", allow_pickle=False) for name in TEXT_ARRAYS}
    return arrays, json.loads((folder / TEXT_META_FILE).read_text())


# Build-summary wording of the truncation counts (what to raise is in the text).
TRUNCATION_NOTES = {"report": "reports cut at text.max_len_report", "steps": "CoT steps cut at text.max_len_step",
                    "regions": "region texts cut at text.max_len_region"}
STEPS_DROPPED_NOTE = "CoT steps dropped at text.max_steps"
