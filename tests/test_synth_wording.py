"""The opt-in ``anatomy`` report wording: findings named by side, lobe, cranio-caudal zone and
extent, CoT lobe steps that name side and lobe, deterministic per seed, the same volumes as the
default wording (whose bytes ``tests/test_synth_identity.py`` pins)."""

from __future__ import annotations

import re

import pytest
from typer.testing import CliRunner

from ctprep.cli import app
from ctprep.config import TextConfig
from ctprep.region_text import step_regions
from ctprep.synth import write_ctrate
from ctprep.synth.anatomy import LOBE_NAMES, RIGHT_LOBES
from ctprep.synth.ctrate import COT_JSONL, REPORTS_CSV, plan_scans
from ctprep.synth.finding_kinds.base import lung_zone
from ctprep.synth.reports import compose_text
from tests.synth_helpers import read_csv

CASES, SEED = 60, 4
FOCAL = ("nodule", "consolidation", "opacity")


@pytest.fixture(scope="module")
def scans():
    return plan_scans(CASES, seed=SEED), plan_scans(CASES, seed=SEED, wording="anatomy")


def test_focal_findings_named_by_side_lobe_zone_and_extent(scans):
    _, anatomy = scans
    checked = 0
    for scan in anatomy:
        for f in scan.anatomy.findings:
            if f.kind not in FOCAL:
                continue
            p = f.params
            side = "Right" if p["lobe"] in RIGHT_LOBES else "Left"
            zone = lung_zone(scan.anatomy, float(p["center"][0]))
            height = round((float(p["center"][0]) - scan.anatomy.z_base) / 10.0)
            want = f"{side} lung, {LOBE_NAMES[p['lobe']]}, {zone} zone: "
            noun = {"nodule": f"{'solid' if p.get('solid') else 'part-solid'} nodule", "consolidation": "consolidation",
                    "opacity": "ground-glass opacity"}[f.kind]
            sentence = (f"{want}{noun}, cranio-caudal extent {p['size_mm']} mm, centred {max(height, 0)} cm "
                        f"above the lung base.")
            assert sentence in scan.text["findings"], (sentence, scan.text["findings"])
            # the lobe's reasoning step names side and lobe and carries the sentence
            lobe_step = next(s for s in scan.text["steps"] if s.startswith(f"{side} lung, {LOBE_NAMES[p['lobe']]}:"))
            assert want in lobe_step
            checked += 1
    assert checked >= 5, "too few focal findings at this seed to test the wording"


def test_zones_cover_the_lung_thirds(scans):
    zones = {m for s in scans[1] for m in re.findall(r"(upper|middle|lower) zone", s.text["findings"])}
    assert zones == {"upper", "middle", "lower"}


def test_effusion_named_by_side(scans):
    found = 0
    for scan in scans[1]:
        for f in scan.anatomy.findings:
            if f.kind == "effusion":
                for side in f.params["sides"]:
                    assert f"{'Right' if side > 0 else 'Left'} pleural space, lower zone:" in scan.text["findings"]
                found += 1
    assert found >= 1


def test_lobe_steps_name_side_and_lobe_and_map_to_the_lung_region(scans):
    names = ["lung", "heart", "esophagus", "aorta", "trachea", "spine"]
    keywords = TextConfig().region_keywords
    for scan in scans[1]:
        steps = scan.text["steps"]
        lobe_steps = steps[1:6]
        assert [s.split(":")[0] for s in lobe_steps] == [
            "Right lung, right upper lobe", "Right lung, right middle lobe", "Right lung, right lower lobe",
            "Left lung, left upper lobe", "Left lung, left lower lobe"]
        assert step_regions(lobe_steps, names, keywords) == [0] * 5


def test_one_template_per_statement(scans):
    """Normal scans differ only in what the phantom measures (the aortic diameter): no template noise."""
    normal = [s.text["findings"] for s in scans[1] if not s.anatomy.findings]
    assert len(normal) >= 3
    masked = {re.sub(r"\d+ mm", "N mm", t) for t in normal}
    assert len(masked) == 1, masked
    default_normal = {re.sub(r"\d+ mm", "N mm", s.text["findings"]) for s in scans[0] if not s.anatomy.findings}
    assert len(default_normal) > 1  # the default wording does draw templates


def test_same_findings_and_labels_as_default_and_deterministic(scans):
    default, anatomy = scans
    again = plan_scans(CASES, seed=SEED, wording="anatomy")
    assert [s.text for s in again] == [s.text for s in anatomy]
    for d, a in zip(default, anatomy):
        assert a.labels == d.labels
        assert [f.kind for f in a.anatomy.findings] == [f.kind for f in d.anatomy.findings]
        assert [v.grid for v in a.volumes] == [v.grid for v in d.volumes]
    assert sum(d.text["findings"] != a.text["findings"] for d, a in zip(default, anatomy)) == len(default)
    other = plan_scans(CASES, seed=SEED + 1, wording="anatomy")
    assert [s.text for s in other] != [s.text for s in anatomy]


def test_written_volumes_identical_text_differs(tmp_path):
    """The files of a seed: volumes and masks byte-identical in both wordings; reports and CoT differ."""
    write_ctrate(tmp_path / "d", cases=3, seed=SEED)
    write_ctrate(tmp_path / "a", cases=3, seed=SEED, wording="anatomy")
    vols = sorted(p.relative_to(tmp_path / "d") for p in (tmp_path / "d").rglob("*.nii.gz"))
    assert vols and vols == sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.nii.gz"))
    for rel in vols:
        assert (tmp_path / "d" / rel).read_bytes() == (tmp_path / "a" / rel).read_bytes(), rel
    assert read_csv(tmp_path / "d" / REPORTS_CSV["train"]) != read_csv(tmp_path / "a" / REPORTS_CSV["train"])
    assert "Right lung, right upper lobe:" in (tmp_path / "a" / COT_JSONL).read_text()
    assert "Right lung," not in (tmp_path / "d" / COT_JSONL).read_text()


def test_unknown_wording_is_refused(tmp_path):
    with pytest.raises(ValueError, match="anatomy"):
        plan_scans(2, wording="lobes")
    with pytest.raises(ValueError, match="anatomy"):
        compose_text(plan_scans(1)[0].anatomy, None, "lobes")
    res = CliRunner().invoke(app, ["demo-data", "--out", str(tmp_path / "x"), "--wording", "lobes"])
    assert res.exit_code != 0 and "default, anatomy" in res.output
    res = CliRunner().invoke(app, ["demo-data", "--out", str(tmp_path / "y"), "--source", "omniabnorm",
                                   "--wording", "anatomy"])
    assert res.exit_code != 0 and "ctrate" in res.output
