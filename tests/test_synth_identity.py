"""The generator's output is byte-identical to the recorded reference for the same seed.

``tests/data/synth_digests.json`` holds the sha256 of every file ``write_ctrate`` /
``write_omniabnorm`` write (a few seeds, each layout), of ``plan_scans``' ground truth, and of
every finding kind sampled, drawn and described on its own. It was recorded before the finding
kinds moved into ``ctprep.synth.finding_kinds``; a refactor of the generator must reproduce it.
Written files are compared byte for byte. The in-memory parameters (finding centres, sizes, ...)
are compared at ``PARAM_DIGITS`` significant digits: their last bit depends on the BLAS kernel
OpenBLAS picks for the CPU (a finding centre differs by one ulp between its Haswell and SkylakeX
kernels) while every file written from them stays the same.
A change that is meant to alter the data regenerates it on purpose::

    python -m tests.test_synth_identity --write
"""

from __future__ import annotations

import hashlib
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

from ctprep.schema import ABNORMALITY_LABELS
from ctprep.synth.anatomy import Grid, render_chest, sample_anatomy
from ctprep.synth.ctrate import plan_scans, write_ctrate
from ctprep.synth.findings import FINDING_KINDS, labels_vector, sample_findings
from ctprep.synth.omniabnorm import write_omniabnorm
from ctprep.synth.reports import compose_text, finding_sentence, impression_phrase

DIGESTS_JSON = Path(__file__).parent / "data" / "synth_digests.json"
SEEDS = (0, 5)
CTRATE_LAYOUTS = ("flat", "release")
OMNI_LAYOUTS = ("release", "batches")
ALL_KINDS_SEEDS = (1, 2, 3)
PARAM_DIGITS = 10  # significant digits of a float parameter in the digests (a float64 has ~16)


def _sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def _tree_digests(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): _sha(p.read_bytes()) for p in sorted(root.rglob("*")) if p.is_file()}


def _rounded(obj):
    """``obj`` with every float (numpy's too) at ``PARAM_DIGITS`` significant digits."""
    if isinstance(obj, (float, np.floating)):
        return float(f"{float(obj):.{PARAM_DIGITS}g}")
    if isinstance(obj, np.ndarray) and obj.dtype.kind == "f":
        return [_rounded(x) for x in obj.ravel().tolist()] + [list(obj.shape)]
    if isinstance(obj, dict):
        return {k: _rounded(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_rounded(x) for x in obj]
    return obj


def _json_sha(obj) -> str:
    # default=repr: a numpy scalar or other non-JSON value still hashes (and shows up as a change).
    return _sha(json.dumps(obj, sort_keys=True, default=repr).encode())


def ctrate_digests(seed: int, layout: str, tmp: Path) -> dict[str, str]:
    out = tmp / f"ctrate_{layout}_{seed}"
    write_ctrate(out, cases=12, grid="demo", seed=seed, faults=True, layout=layout)
    return _tree_digests(out)


def omni_digests(seed: int, layout: str, tmp: Path) -> dict[str, str]:
    out = tmp / f"omni_{layout}_{seed}"
    write_omniabnorm(out, cases=8, seed=seed, faults=True, layout=layout)
    return _tree_digests(out)


def plan_digest(seed: int) -> str:
    """Anatomy, findings, text, labels and volume geometry of ``plan_scans``."""
    scans = plan_scans(12, grid="demo", seed=seed)
    rows = [{"split": s.split, "pid": s.pid, "sid": s.sid, "text": s.text, "labels": s.labels,
             "findings": [(f.kind, f.label, f.params) for f in s.anatomy.findings],
             "volumes": [(v.name, v.relpath, v.style, v.orient, v.grid, v.kernel, v.sigma, v.meta) for v in s.volumes]}
            for s in scans]  # fmt: skip
    return _json_sha(_rounded(rows))


def all_kinds_digest(seed: int) -> dict[str, str]:
    """Every finding kind at once: params, the rendered HU / labels / masks, text and labels."""
    rng = np.random.default_rng(seed)
    a = sample_anatomy(rng, z_apex=0.0)
    a.findings = sample_findings(a, rng, kinds=list(FINDING_KINDS))
    grid = Grid((40, 96, 96), (7.0, 4.2, 4.2), (a.z_base - 40, -47.5 * 4.2, -47.5 * 4.2))
    hu, lab, masks = render_chest(a, grid, finding_masks=True)
    words = [(impression_phrase(f), finding_sentence(f, rng)) for f in a.findings]
    text = compose_text(a, rng)
    return {
        "findings": _json_sha(_rounded([(f.kind, f.label, f.params) for f in a.findings])),
        "hu": _sha(hu.tobytes()),
        "labels": _sha(lab.tobytes()),
        "masks": _json_sha({str(i): _sha(np.packbits(m).tobytes()) for i, m in sorted(masks.items())}),
        "text": _json_sha([text, words, labels_vector(a.findings, ABNORMALITY_LABELS)]),
        "rng_after": _json_sha(int(rng.integers(2**62))),
    }


def compute_digests(tmp: Path) -> dict:
    out: dict = {"ctrate": {}, "omniabnorm": {}, "plan_scans": {}, "all_kinds": {}}
    for seed in SEEDS:
        for layout in CTRATE_LAYOUTS:
            out["ctrate"][f"{layout}/{seed}"] = ctrate_digests(seed, layout, tmp)
        for layout in OMNI_LAYOUTS:
            out["omniabnorm"][f"{layout}/{seed}"] = omni_digests(seed, layout, tmp)
        out["plan_scans"][str(seed)] = plan_digest(seed)
    for seed in ALL_KINDS_SEEDS:
        out["all_kinds"][str(seed)] = all_kinds_digest(seed)
    return out


@pytest.fixture(scope="module")
def reference() -> dict:
    return json.loads(DIGESTS_JSON.read_text(encoding="utf-8"))


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("layout", CTRATE_LAYOUTS)
def test_ctrate_files_identical(reference, tmp_path, seed, layout):
    assert ctrate_digests(seed, layout, tmp_path) == reference["ctrate"][f"{layout}/{seed}"]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("layout", OMNI_LAYOUTS)
def test_omniabnorm_files_identical(reference, tmp_path, seed, layout):
    assert omni_digests(seed, layout, tmp_path) == reference["omniabnorm"][f"{layout}/{seed}"]


@pytest.mark.parametrize("seed", SEEDS)
def test_plan_scans_identical(reference, seed):
    assert plan_digest(seed) == reference["plan_scans"][str(seed)]


@pytest.mark.parametrize("seed", ALL_KINDS_SEEDS)
def test_every_kind_identical(reference, seed):
    assert all_kinds_digest(seed) == reference["all_kinds"][str(seed)]


if __name__ == "__main__":
    if sys.argv[1:] != ["--write"]:
        sys.exit("usage: python -m tests.test_synth_identity --write   (records the reference digests)")
    with tempfile.TemporaryDirectory() as d:
        digests = compute_digests(Path(d))
    DIGESTS_JSON.parent.mkdir(parents=True, exist_ok=True)
    DIGESTS_JSON.write_text(json.dumps(digests, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    print(f"wrote {DIGESTS_JSON}")
