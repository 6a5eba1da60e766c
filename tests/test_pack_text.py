"""text: tokenizer identity, token round-trip, CoT step order, region sentences."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from ctprep.config import TextConfig
from ctprep.region_text import region_texts, split_sentences, step_regions
from ctprep.stages.text import ordered_steps, report_text, tokenize_case_text
from ctprep.tokenizer import count_truncated, decode_ids, default_tokenizer_dir, load_tokenizer, tokenizer_identity

REGIONS = ["lung", "heart", "esophagus", "aorta", "trachea", "spine"]
KEYWORDS = TextConfig().region_keywords


def squash(text: str) -> str:
    # The MiniLM tokenizer is uncased and decode() re-spaces punctuation.
    return "".join(text.lower().split())


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(None)


def test_default_identity_is_stable_and_content_based(tmp_path):
    ident = tokenizer_identity(None)
    assert ident == tokenizer_identity("default") == tokenizer_identity(default_tokenizer_dir())
    assert len(ident["hash"]) == 64
    copy = tmp_path / "copy"
    shutil.copytree(default_tokenizer_dir(), copy, ignore=shutil.ignore_patterns("*.safetensors"))
    assert tokenizer_identity(copy)["hash"] == ident["hash"]  # same files -> same identity
    with open(copy / "vocab.txt", "a") as f:
        f.write("newtoken\n")
    assert tokenizer_identity(copy)["hash"] != ident["hash"]
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        tokenizer_identity(tmp_path / "missing")


def test_report_drops_not_given_sections():
    assert report_text({"findings": "Lungs clear.", "impression": "Not given."}) == "Lungs clear."
    assert report_text({"findings": "Not given.", "impression": "Normal."}) == "Normal."
    assert report_text({"findings": "A.", "impression": "B."}) == "A. B."
    assert report_text({"findings": "", "impression": "", "report": "Whole report."}) == "Whole report."


def test_step_order_strings_and_objects():
    assert ordered_steps(["first", "second", "Not given.", "third"]) == ["first", "second", "third"]
    objs = [{"step": 3, "text": "c"}, {"step": 1, "text": "a"}, {"step": 2, "text": "b"}]
    assert ordered_steps(objs) == ["a", "b", "c"]
    assert ordered_steps(objs, max_steps=2) == ["a", "b"]
    # objects without numbers keep list order
    assert ordered_steps([{"text": "x"}, {"text": "y"}]) == ["x", "y"]


def test_region_sentences_and_step_regions():
    findings = (
        "There is a 6 mm nodule in the right upper lobe. The heart size is enlarged. "
        "Mild pericardial effusion. The aortic arch is calcified. Degenerative changes of the spine."
    )
    assert len(split_sentences(findings)) == 5
    texts, has = region_texts(findings, REGIONS, KEYWORDS, "No significant abnormality in the {region}.")
    assert has == [1, 1, 0, 1, 0, 1]
    assert texts[0] == "There is a 6 mm nodule in the right upper lobe."
    assert texts[1] == "The heart size is enlarged. Mild pericardial effusion."
    assert texts[2] == "No significant abnormality in the esophagus."
    steps = ["Check the lungs first.", "Then the aortic wall.", "Conclude.", "Heart and lungs: heart first."]
    assert step_regions(steps, REGIONS, KEYWORDS) == [0, 3, -1, 1]


def test_tokens_decode_back_to_text(tok):
    text = {
        "findings": "Trachea and both main bronchi are open. A 5 mm nodule in the left lower lobe.",
        "impression": "Pulmonary nodule.",
        "steps": [{"step": 2, "text": "Measure its size: 5 mm."}, {"step": 1, "text": "Inspect the lungs."}],
    }
    arrays, meta = tokenize_case_text(
        text, tok, REGIONS, KEYWORDS, max_len_report=64, max_len_step=16, max_len_region=32,
        max_steps=8, no_finding_text="No significant abnormality.",
    )
    assert arrays["report_ids"].dtype == np.int32 and arrays["report_ids"].shape == (64,)
    assert arrays["steps_ids"].shape == (2, 16) and arrays["region_text_ids"].shape == (6, 32)
    assert arrays["region_has_text"].tolist() == [1, 0, 0, 0, 1, 0]
    assert meta["steps_text"] == ["Inspect the lungs.", "Measure its size: 5 mm."]
    assert meta["step_regions"] == [0, -1]
    assert meta["tokenizer"] == tokenizer_identity(None)
    assert squash(decode_ids(tok, arrays["report_ids"], arrays["report_len"])) == squash(meta["report_text"])
    for ids, n, s in zip(arrays["steps_ids"], arrays["steps_len"], meta["steps_text"]):
        assert squash(decode_ids(tok, ids, n)) == squash(s)
    for ids, n, s in zip(arrays["region_text_ids"], arrays["region_text_len"], meta["region_texts"]):
        assert squash(decode_ids(tok, ids, n)) == squash(s)
    # padding is the pad id, and [CLS]/[SEP] frame the real tokens
    n = int(arrays["report_len"])
    assert (arrays["report_ids"][n:] == tok.pad_id).all()
    assert arrays["report_ids"][0] == tok.tokenizer.cls_token_id and arrays["report_ids"][n - 1] == tok.tokenizer.sep_token_id


def test_truncation_and_no_steps(tok):
    long = "The lungs are clear. " * 50
    arrays, meta = tokenize_case_text(
        {"findings": long, "impression": "", "steps": []}, tok, REGIONS, KEYWORDS, max_len_report=20,
        max_len_step=16, max_len_region=8, max_steps=4, no_finding_text="No significant abnormality.",
    )
    assert int(arrays["report_len"]) == 20
    assert meta["texts_cut"] == {"report": 1, "steps": 0, "regions": 1}  # the lung region text is long too
    body = len(tok.tokenizer(long, add_special_tokens=False)["input_ids"])  # 5 tokens a sentence
    assert body == 250
    # [CLS] + 18 + [SEP] kept of the report; the lung region sentence group is the same 50 sentences
    assert meta["truncated"] == {"steps_dropped": 0, "report_tokens": body - 18, "step_tokens": 0,
                                 "region_tokens": body - 6}
    assert squash(long).startswith(squash(decode_ids(tok, arrays["report_ids"], 20)))
    assert arrays["steps_ids"].shape == (0, 16) and arrays["steps_len"].shape == (0,)


def test_steps_beyond_max_steps_are_counted_not_silently_dropped(tok):
    steps = [{"step": i, "text": f"Step {i}: look at region {i}."} for i in range(6, 0, -1)]
    arrays, meta = tokenize_case_text(
        {"findings": "No nodule.", "impression": "", "steps": steps}, tok, REGIONS, KEYWORDS, max_len_report=32,
        max_len_step=6, max_len_region=16, max_steps=4, no_finding_text="No significant abnormality.",
    )
    assert meta["steps_text"] == [f"Step {i}: look at region {i}." for i in (1, 2, 3, 4)]  # the first 4 by number
    per_step = [len(tok.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in meta["steps_text"]]
    assert arrays["steps_ids"].shape == (4, 6) and (arrays["steps_len"] == 6).all()
    assert meta["truncated"] == {"steps_dropped": 2, "report_tokens": 0, "step_tokens": sum(n - 4 for n in per_step),
                                 "region_tokens": 0}
    assert meta["texts_cut"] == {"report": 0, "steps": 4, "regions": 0}


def test_truncation_counts_only_texts_over_the_limit(tok):
    short, long = "No nodule.", "The lungs are clear. " * 30
    n_short = len(tok.tokenizer(short)["input_ids"])
    assert count_truncated(tok, [short, long, long], 64) == 2
    assert count_truncated(tok, [short], n_short) == 0 and count_truncated(tok, [short], n_short - 1) == 1
    assert count_truncated(tok, [], 8) == 0


@pytest.mark.parametrize("side", ["right", "left"])
def test_one_pass_encoding_matches_the_tokenizers_own_truncation(tok, side):
    """encode_padded tokenizes once and cuts by hand; ids and lengths must equal the tokenizer's own
    truncation=True call (both truncation sides), and the cut count the untruncated lengths."""
    from ctprep.tokenizer import encode_padded

    texts = ["", "No nodule.", "The lungs are clear. " * 30, "Mild cardiomegaly; small right effusion.",
             "Ground-glass opacity in the left lower lobe. " * 6]
    old_side = tok.tokenizer.truncation_side
    tok.tokenizer.truncation_side = side
    try:
        for max_len in (2, 3, 8, 16, 64, 512):
            ids, lens, cut = encode_padded(tok, texts, max_len)
            ref = tok.tokenizer(texts, truncation=True, max_length=max_len, add_special_tokens=True)["input_ids"]
            full = tok.tokenizer(texts, add_special_tokens=True, verbose=False)["input_ids"]
            for i, row in enumerate(ref):
                assert lens[i] == len(row)
                assert ids[i, : len(row)].tolist() == row, (side, max_len, i)
                assert (ids[i, len(row):] == tok.pad_id).all()
            assert cut == sum(len(r) > max_len for r in full)
    finally:
        tok.tokenizer.truncation_side = old_side
