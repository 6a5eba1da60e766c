"""CoT deliveries: CoT JSONL files for existing cases, found in the source tree or given with --cot,
merged by step number (ctprep.sources.cot; docs/pipeline.md "CoT deliveries")."""

from __future__ import annotations

import json
import shutil
import tarfile
from pathlib import Path

import pytest

from ctprep.config import load_config, with_cot_files
from ctprep.runner import build, status
from ctprep.shards import read_index
from ctprep.sources import get_source
from ctprep.sources.cot import read_cot
from ctprep.sources.ctrate_tables import _cot_case_id
from ctprep.synth.omniabnorm import write_omniabnorm

STEPS_ORDER = ("resample", "regions", "text", "pack")


def _write_jsonl(path: Path, lines: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def _build(srcs, out, cfg=None, logs: list[str] | None = None):
    sink = logs if logs is not None else []
    return build([str(s) for s in srcs], out, cfg or load_config("demo"), workers=0, progress=False,
                 log=sink.append)


def _ran(report) -> dict[str, int]:
    return {name: report.tallies[name].ran for name in STEPS_ORDER}


def _samples(out: Path) -> dict[str, dict]:
    """case id -> meta.json of its current sample (a later generation's sample supersedes an earlier one)."""
    index = read_index(out)
    retired = {r["path"] if isinstance(r, dict) else r for r in index.get("retired", [])}
    entries = sorted((e for es in index["splits"].values() for e in es if e["path"] not in retired),
                     key=lambda e: e.get("generation", 0))
    metas: dict[str, dict] = {}
    for e in entries:
        with tarfile.open(out / e["path"]) as tar:
            for m in tar:
                if m.name.endswith(".meta.json"):
                    meta = json.loads(tar.extractfile(m).read())
                    metas[meta["id"]] = meta
    return metas


def _ctrate_cot(root: Path) -> dict[str, dict]:
    """case id -> the generator's CoT record."""
    out = {}
    for line in (root / "cot" / "ctrate_cot.jsonl").read_text().splitlines():
        rec = json.loads(line)
        out[_cot_case_id(rec)] = rec
    return out


# ----------------------------------------------------------------------------- the merge rule
def test_merge_rule_steps_by_number_later_files_win_bad_lines_reported(tmp_path):
    first = _write_jsonl(tmp_path / "a" / "cot.jsonl", [
        {"id": "c1", "steps": ["look at the lungs", "look at the heart", "conclude"], "findings": "F1"},
        {"id": "c2", "steps": [{"step": 1, "text": "one"}, {"step": 2, "text": "two"}]},
    ])
    second = _write_jsonl(tmp_path / "b" / "cot.jsonl", [
        {"id": "c1", "steps": [{"step": 2, "text": "look at the heart and pericardium"}, {"step": 5, "text": "extra"}]},
        "{not json",
        {"id": "c2", "steps": [{"step": 1, "text": ""}], "impression": "I2"},  # empty text removes step 1
        ["not", "an", "object"],
        {"steps": ["no id"]},
        {"id": "c3", "steps": [{"step": "two", "text": "x"}]},
        {"id": "c3", "steps": [{"step": 1, "text": "x"}, {"step": 1, "text": "y"}]},
        {"id": "c3", "reasoning": "a single step as a string", "findings": "F3"},
    ])
    (tmp_path / "c.jsonl").write_bytes(b'{"id": "c2", "steps": ["\xff"]}\n')
    files = [(first, "a/cot.jsonl", None), (second, "b/cot.jsonl", None), (tmp_path / "c.jsonl", "c.jsonl", None),
             (tmp_path / "fifo", "fifo", "a FIFO")]
    cot = read_cot(files, lambda rec: rec.get("id"))
    c1 = cot.get("c1")
    # step 2 replaced, 3 kept, 5 appended; ordered by number; findings kept from the first record
    assert c1.step_texts() == ["look at the lungs", "look at the heart and pericardium", "conclude", "extra"]
    assert c1.get("findings") == "F1"
    assert c1.provenance() == {"records": ["a/cot.jsonl line 1", "b/cot.jsonl line 1"],
                               "steps": {"1": 0, "2": 1, "3": 0, "5": 1}}
    assert cot.get("c2").step_texts() == ["two"] and cot.get("c2").get("impression") == "I2"
    assert cot.get("c3").step_texts() == ["a single step as a string"] and cot.get("c3").get("findings") == "F3"
    problems = "\n".join(cot.problems)
    for where, what in (("b/cot.jsonl line 2", "not valid JSON"), ("b/cot.jsonl line 4", "not an object"),
                        ("b/cot.jsonl line 5", "names no case"), ("b/cot.jsonl line 6", "not an integer"),
                        ("b/cot.jsonl line 7", "given twice"), ("c.jsonl line 1", "not valid UTF-8"),
                        ("fifo", "a FIFO")):
        assert any(p.startswith(where) and what in p for p in cot.problems), (where, problems)
    assert len(cot.problems) == 7
    assert cot.ids_by_file == {"a/cot.jsonl": {"c1", "c2"}, "b/cot.jsonl": {"c1", "c2", "c3"}, "c.jsonl": set()}


# ----------------------------------------------------------------------------- CT-RATE
def test_ctrate_cot_only_delivery_for_10_cases(synthetic_ctrate, tmp_path):
    """A new folder holding only a CoT JSONL for 10 existing cases: status shows those 10 stale (text),
    the rebuild reruns text + pack for exactly them, their samples carry the new steps, the next run
    does nothing; unknown ids and a malformed line are reported, not fatal."""
    src = tmp_path / "ctrate"
    shutil.copytree(synthetic_ctrate(cases=12, seed=7), src)
    out = tmp_path / "shards"
    cfg = load_config("demo")
    cfg.text.max_steps = 32  # room for the appended step (the generator writes 12-14)
    first = _build([src], out, cfg)
    assert first.exit_code == 0, first.summary
    before = _samples(out)
    assert len(before) == 12
    old = _ctrate_cot(src)
    chosen = sorted(before)[:10]
    delivery = []
    for cid in chosen:
        n = len(old[cid]["steps"])
        delivery.append({"VolumeName": f"{cid}.nii.gz",
                         "steps": [{"step": 2, "text": f"Revised second step for {cid}."},
                                   {"step": n + 1, "text": f"New closing step for {cid}."}]})
    delivery += [{"VolumeName": "train_999_a_1.nii.gz", "steps": ["a case that does not exist"]},
                 {"case_id": "valid_998_a_1", "steps": ["neither does this one"]}, "{broken"]
    _write_jsonl(src / "cot_2026_02" / "cot.jsonl", delivery)

    st = status(out)
    assert sum(st.stages["text"].stale.values()) == 10 and st.stages["text"].stale["changed input"] == 10
    assert not st.stages["resample"].stale and not st.stages["regions"].stale
    assert st.stages["resample"].done == st.stages["regions"].done == 12
    assert st.stages["text"].done == 2

    logs: list[str] = []
    second = _build([src], out, cfg, logs=logs)
    assert second.exit_code == 0, second.summary
    assert second.tallies["resample"].ran == second.tallies["regions"].ran == 0
    assert second.tallies["text"].ran == 10
    log = "\n".join(logs)
    assert "2 case id(s) in the CoT files under this root name no case found: train_999_a_1, valid_998_a_1" in log
    assert "cot_2026_02/cot.jsonl line 13: malformed CoT line, skipped: not valid JSON" in log

    after = _samples(out)
    assert set(after) == set(before)
    for cid in chosen:
        steps = [s.strip() for s in old[cid]["steps"]] if isinstance(old[cid]["steps"][0], str) else \
            [s["text"].strip() for s in sorted(old[cid]["steps"], key=lambda s: s["step"])]
        expected = [steps[0], f"Revised second step for {cid}.", *steps[2:], f"New closing step for {cid}."]
        assert after[cid]["steps_text"] == expected
    for cid in set(before) - set(chosen):
        assert after[cid]["steps_text"] == before[cid]["steps_text"]
    # provenance: which file and line gave each step (the manifest's case record)
    case = next(c for c in get_source("ctrate", load_config("demo")).scan(src)[0] if c.case_id == chosen[0])
    prov = case.provenance["cot"]
    assert prov["records"] == ["cot/ctrate_cot.jsonl line %d" % (1 + list(old).index(chosen[0])),
                               "cot_2026_02/cot.jsonl line 1"]
    assert prov["steps"]["1"] == 0 and prov["steps"]["2"] == 1

    third = _build([src], out, cfg)
    assert third.summary.startswith("ctprep build-shards: nothing to do"), third.summary
    st = status(out)
    assert all(not s.stale for s in st.stages.values())


def test_cot_option_is_merged_after_the_tree_and_reported(synthetic_ctrate, tmp_path):
    """--cot FILE (cot.files): applied after the tree's CoT files, recorded so that status compares
    against it; its unknown ids are named once for the whole build; dropping it reverts the steps."""
    from typer.testing import CliRunner

    from ctprep.cli import app

    src = tmp_path / "ctrate"
    shutil.copytree(synthetic_ctrate(cases=4, seed=0), src)
    out = tmp_path / "shards"
    assert _build([src], out).exit_code == 0
    before = _samples(out)
    cid = sorted(before)[0]
    # the tree gets a delivery that changes step 1; the --cot file changes step 1 again (it wins)
    _write_jsonl(src / "zz_delivery" / "cot.jsonl", [{"VolumeName": cid, "steps": [{"step": 1, "text": "Tree."}]}])
    extra = _write_jsonl(tmp_path / "outside" / "more.jsonl", [
        {"VolumeName": f"{cid}.nii.gz", "steps": [{"step": 1, "text": "From --cot."}]},
        {"VolumeName": "no_such_case.nii.gz", "steps": ["x"]},
        '{"VolumeName": "broken',
    ])
    runner = CliRunner()
    res = runner.invoke(app, ["status", "--out", str(out), "--cot", str(extra)])
    assert res.exit_code == 0, res.output
    assert "stale: 1 changed input" in res.output
    res = runner.invoke(app, ["build-shards", "--src", str(src), "--out", str(out), "--cot", str(extra),
                              "--workers", "0", "--no-progress"])
    assert res.exit_code == 0, res.output
    assert "1 case id(s) in the --cot files name no case found: no_such_case" in res.output
    assert res.output.count(f"{extra} line 3: malformed CoT line, skipped: not valid JSON") == 1  # once, not per root
    assert "text: 1 done now" in res.output and "resample: 0 done now" in res.output
    assert _samples(out)[cid]["steps_text"][0] == "From --cot."
    # the recorded config names the file: a plain status and the same build again find nothing to do
    res = runner.invoke(app, ["status", "--out", str(out)])
    assert res.exit_code == 0 and "stale:" not in res.output, res.output
    again = _build([src], out, with_cot_files(load_config("demo"), [extra]))
    assert again.summary.startswith("ctprep build-shards: nothing to do"), again.summary
    # without the file, the tree's delivery is what remains
    res = runner.invoke(app, ["build-shards", "--src", str(src), "--out", str(out), "--workers", "0", "--no-progress"])
    assert res.exit_code == 0, res.output
    assert _samples(out)[cid]["steps_text"][0] == "Tree."
    res = runner.invoke(app, ["build-shards", "--src", str(src), "--out", str(out),
                              "--cot", str(tmp_path / "nope.jsonl")])
    assert res.exit_code == 1 and "--cot" in res.output and "no such file" in res.output


def test_ctrate_volume_delivered_again_in_another_folder_is_the_same_case(synthetic_ctrate, tmp_path):
    """A volume copied byte for byte into a new delivery folder is one case (nothing reruns; the copy
    that sorts last is read); a *different* volume under the same name is still a conflict."""
    src = tmp_path / "ctrate"
    shutil.copytree(synthetic_ctrate(cases=4, seed=0), src)
    out = tmp_path / "shards"
    assert _build([src], out).exit_code == 0
    vols = sorted(p for p in src.rglob("*.nii.gz") if "masks" not in p.relative_to(src).parts)
    again = src / "zz_delivery_2" / "train" / vols[0].name
    again.parent.mkdir(parents=True)
    shutil.copyfile(vols[0], again)
    second = _build([src], out)
    assert second.summary.startswith("ctprep build-shards: nothing to do"), second.summary
    cid = vols[0].name.removesuffix(".nii.gz")
    case = next(c for c in get_source("ctrate", load_config("demo")).scan(src)[0] if c.case_id == cid)
    assert case.provenance["image"] == again.relative_to(src).as_posix()
    assert len(case.provenance["copies"]) == 2 and "2 identical plain copies" in case.provenance["rule"]
    shutil.copyfile(vols[1], again)  # other bytes under the same name: a real conflict
    third = _build([src], out)
    assert third.scan_quarantined["duplicate_case"] == 1, third.summary


# ----------------------------------------------------------------------------- OmniAbnorm
def test_omniabnorm_redelivered_record_and_cot_only_batch(tmp_path):
    """The same record re-delivered in a new batch folder (same image bytes, no CoT file) reruns
    nothing; a CoT-only batch folder reruns text + pack for exactly the cases it changes."""
    root = tmp_path / "omni"
    write_omniabnorm(root / "batch_01", cases=4, seed=1, layout="batches")
    out = tmp_path / "shards"
    first = _build([root], out)
    assert first.exit_code == 0, first.summary
    before = _samples(out)
    records = json.loads((root / "batch_01" / "records.json").read_text())
    rec = records[0]
    batch2 = root / "batch_02"
    folder = Path(rec["image"]).parent
    shutil.copytree(root / "batch_01" / folder, batch2 / folder)
    (batch2 / "records.json").write_text(json.dumps([rec]))
    second = _build([root], out)
    assert second.summary.startswith("ctprep build-shards: nothing to do"), second.summary
    case = {c.case_id: c for c in get_source("omniabnorm", load_config("demo")).scan(root)[0]}[rec["id"]]
    assert case.provenance["batch"] == "batch_02" and case.provenance["replaces_batches"] == ["batch_01"]
    assert case.provenance["cot"]["records"] == ["batch_01/cot.jsonl line 1"]  # its CoT still applies

    # a CoT-only folder (no records): a new step 1 for two cases, one identical record (no change)
    cot = [json.loads(line) for line in (root / "batch_01" / "cot.jsonl").read_text().splitlines()]
    _write_jsonl(root / "batch_03_cot" / "cot.jsonl", [
        {"id": records[1]["id"], "steps": [{"step": 1, "text": "Start at the key slice."}]},
        {"id": records[2]["id"], "steps": [{"step": 1, "text": "Start at the key slice."}]},
        cot[3],
    ])
    st = status(out)
    assert sum(st.stages["text"].stale.values()) == 2 and not st.stages["resample"].stale
    third = _build([root], out)
    assert _ran(third)["resample"] == _ran(third)["regions"] == 0 and third.tallies["text"].ran == 2
    after = _samples(out)
    for r in records[1:3]:
        assert after[r["id"]]["steps_text"][0] == "Start at the key slice."
        assert after[r["id"]]["steps_text"][1:] == before[r["id"]]["steps_text"][1:]
    assert after[records[3]["id"]]["steps_text"] == before[records[3]["id"]]["steps_text"]
    assert _build([root], out).summary.startswith("ctprep build-shards: nothing to do")


def test_omniabnorm_release_finds_a_cot_only_delivery_folder(tmp_path):
    root = tmp_path / "OmniAbnormCT_14K"
    write_omniabnorm(root, cases=3, seed=2)
    src = get_source("omniabnorm", load_config("demo"))
    cases = {c.provenance["datum_id"]: c for c in src.scan(root)[0]}
    datum = sorted(cases)[0]
    n = len(cases[datum].text["steps"])
    _write_jsonl(root / "deliveries" / "2026_03" / "cot.jsonl", [
        {"id": datum, "steps": [{"step": n + 1, "text": "One more step."}], "findings": "CoT findings."},
        {"id": "not-a-datum", "steps": ["x"]},
    ])
    after = {c.provenance["datum_id"]: c for c in src.scan(root)[0]}
    assert after[datum].text["steps"] == cases[datum].text["steps"] + ["One more step."]
    assert after[datum].text["cot_findings"] == "CoT findings."
    assert after[datum].provenance["cot"]["records"][-1] == "deliveries/2026_03/cot.jsonl line 1"
    assert all(after[d].text == cases[d].text for d in cases if d != datum)
    assert src.problems == ["1 case id(s) in the CoT files under this root name no case found: not-a-datum"]


@pytest.mark.parametrize("name", ["ctrate", "omniabnorm"])
def test_a_missing_cot_file_is_an_error_naming_it(name, tmp_path):
    cfg = with_cot_files(load_config("demo"), [tmp_path / "gone.jsonl"])
    with pytest.raises(FileNotFoundError, match="gone.jsonl"):
        get_source(name, cfg).scan(tmp_path)


def test_one_cot_file_for_two_roots_reports_only_ids_found_under_neither(synthetic_ctrate, tmp_path):
    from ctprep.sources.cot import delivery_warnings

    ct_root = synthetic_ctrate(cases=4, seed=0)
    omni_root = tmp_path / "omni"
    write_omniabnorm(omni_root / "batch_01", cases=2, seed=1, layout="batches")
    cfg = load_config("demo")
    ct_src, omni_src = get_source("ctrate", cfg), get_source("omniabnorm", cfg)
    ct_id = sorted(c.case_id for c in ct_src.scan(ct_root)[0])[0]
    omni_id = sorted(c.case_id for c in omni_src.scan(omni_root)[0])[0]
    extra = _write_jsonl(tmp_path / "steps.jsonl", [{"VolumeName": f"{ct_id}.nii.gz", "steps": ["CT step."]},
                                                   {"id": omni_id, "steps": ["Omni step."]},
                                                   {"id": "ghost_1", "steps": ["x"]}])
    cfg = with_cot_files(cfg, [extra])
    known: set[str] = set()
    for src, root, cid, first in ((get_source("ctrate", cfg), ct_root, ct_id, "CT step."),
                                  (get_source("omniabnorm", cfg), omni_root, omni_id, "Omni step.")):
        cases, quarantined = src.scan(root)
        known |= {c.case_id for c in cases} | {q.case for q in quarantined}
        case = next(c for c in cases if c.case_id == cid)
        assert case.text["steps"][0] == first and case.provenance["cot"]["records"][-1].startswith(str(extra))
        assert not [p for p in src.problems if "ghost" in p or "no case found" in p]  # the build reports those
    assert delivery_warnings(cfg, ["ctrate", "omniabnorm"], known) == [
        "warning: 1 case id(s) in the --cot files name no case found: ghost_1; those records were not used"]
