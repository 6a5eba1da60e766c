"""ctprep_train.eval end to end on tiny shards and a tiny random model: eval.json keys, report, pictures."""

from __future__ import annotations

import json
import re

import pytest
import torch

from ctprep_train.testing import write_test_shards


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from ctprep_train.model import create_model, save_pretrained

    root = tmp_path_factory.mktemp("eval")
    write_test_shards(root / "shards", {"train": [2], "valid": [5, 4]}, seed=1)
    torch.manual_seed(0)
    model = create_model("tiny", **{"vision.depth": 2, "vision.out_indices": [0, 1]})
    save_pretrained(model, root / "encoder")
    return root


def test_evaluate_writes_eval_json_and_report(tiny_run):
    from ctprep_train.eval.run import main

    out = tiny_run / "eval"
    main(["--encoder", str(tiny_run / "encoder"), "--shards", str(tiny_run / "shards"), "--split", "valid",
          "--out", str(out), "--picture-cases", "1", "--ks", "1,5"])
    result = json.loads((out / "eval.json").read_text())  # strict JSON: NaN would fail here
    r = result["retrieval"]
    assert r["pool_size"] == 9 and result["n_cases"] == 9
    for direction in ("image_to_text", "text_to_image", "random_baseline"):
        assert set(r[direction]) >= {"R@1", "R@5"}
    assert r["text_to_image"]["pool_size"] == 9 and r["image_to_text"]["pool_size"] == r["n_unique_texts"]
    assert "pessimistic" in r["protocol"] and "merged" in r["protocol"]
    assert 0.0 <= result["zero_shot"]["macro_auc"] <= 1.0
    assert "overall" in result["cot_alignment"]
    report = (out / "report.md").read_text()
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report)
    assert "slice_bias.png" in images and any(i.startswith("attention_") for i in images)
    for name in images:
        assert (out / name).stat().st_size > 1000
    assert "Recall" in report or "R@5" in report


def test_tokenizer_mismatch_is_refused(tiny_run):
    from ctprep_train.data import ShardMismatchError
    from ctprep_train.eval.run import check_tokenizer, main

    enc = tiny_run / "encoder_wrong_tok"
    enc.mkdir(exist_ok=True)
    (enc / "tokenizer.json").write_text(json.dumps({"name": "other", "hash": "f" * 64}))
    index = json.loads((tiny_run / "shards" / "index.json").read_text())
    with pytest.raises(ShardMismatchError) as err:
        check_tokenizer(enc, tiny_run / "shards", index)
    message = str(err.value)  # both identities named: the shards' and the encoder's
    assert "index.json" in message and "'other'" in message and "f" * 64 in message
    assert repr(index["tokenizer"]["name"]) in message and index["tokenizer"]["hash"] in message
    with pytest.raises(SystemExit, match="^error: .*tokenizer"):  # the command: one line, no traceback
        main(["--encoder", str(enc), "--shards", str(tiny_run / "shards"), "--out", str(tiny_run / "wrong")])


def test_tokenizer_of_another_name_with_the_same_hash_is_accepted(tiny_run):
    from ctprep_train.eval.run import check_tokenizer

    index = json.loads((tiny_run / "shards" / "index.json").read_text())
    enc = tiny_run / "encoder_renamed_tok"  # an export's copy of the tokenizer files: another name
    enc.mkdir(exist_ok=True)
    (enc / "tokenizer_identity.json").write_text(json.dumps({"name": "/export/tok", "hash": index["tokenizer"]["hash"]}))
    check_tokenizer(enc, tiny_run / "shards", index)


def test_split_reader_sees_every_case_once(tiny_run):
    from ctprep_train.eval.data import batches_by_shape, iter_split

    ids = [s["__key__"] for s in iter_split(tiny_run / "shards", "valid")]
    assert len(ids) == len(set(ids)) == 9
    batches = list(batches_by_shape(iter_split(tiny_run / "shards", "valid"), 4))
    assert [len(b["ids"]) for b in batches] == [4, 4, 1]
    assert batches[0]["report_ids"].dtype == torch.int64 and batches[0]["image"].dtype == torch.int16


def test_retrieval_pool_bench_subpools_keep_whole_reports_and_full_row_matches_the_evaluator(tiny_run, capsys):
    import numpy as np

    from tests.bench_helpers import load_bench
    from ctprep_train.eval.run import main as evaluate

    bench = load_bench("retrieval_pool")
    group = np.array([0, 0, 1, 2, 2, 2, 3, 4])  # reports 0 and 2 have several reconstructions
    rng = np.random.default_rng(0)
    for _ in range(20):
        sel = bench.subpool(group, 2, rng)
        assert len(set(group[sel])) == 2
        assert set(sel) == set(np.flatnonzero(np.isin(group, group[sel])))  # every volume of a picked report

    args = ["--encoder", str(tiny_run / "encoder"), "--shards", str(tiny_run / "shards")]
    ev = evaluate(args + ["--split", "valid", "--out", str(tiny_run / "eval_pool"), "--picture-cases", "0",
                          "--ks", "1,5"])["retrieval"]
    rows = bench.main(args + ["--texts", "2", "--draws", "3", "--k", "1"])
    n_txt = ev["n_unique_texts"]
    assert rows[0]["i2t"][0] == pytest.approx(ev["image_to_text"]["R@1"] / ev["random_baseline"]["R@1"])
    assert rows[0]["t2i"][0] == pytest.approx(ev["text_to_image"]["R@1"] / ev["random_baseline"]["R@1"])
    assert len(rows) == 2 and len(rows[1]["i2t"]) == len(rows[1]["t2i"]) == 3
    assert f"| full 9 / {n_txt} |" in capsys.readouterr().out
    with pytest.raises(SystemExit, match=f"split has {n_txt} distinct reports"):
        bench.main(args + ["--texts", str(n_txt)])
