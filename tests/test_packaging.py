"""A non-editable install works outside the clone: the wheel carries the config presets
(``ctprep.configs``), builds shards with the ``demo`` preset and loads an encoder export."""

from __future__ import annotations

import json
import os
import site
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.multiprocess


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": ""}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, **kw)


@pytest.fixture(scope="module")
def wheel_venv(tmp_path_factory) -> Path:
    """A fresh venv with the project's wheel (not editable); its dependencies come from this venv's
    site-packages through a .pth path (added as a plain path: the editable install's own .pth
    finder there is not run, so ``import ctprep`` can only find the wheel)."""
    tmp = tmp_path_factory.mktemp("wheel")
    res = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp / "dist"), str(REPO)])
    assert res.returncode == 0, res.stderr[-3000:]
    wheel = next((tmp / "dist").glob("ctprep-*.whl"))
    venv = tmp / "venv"
    assert _run([sys.executable, "-m", "venv", "--without-pip", str(venv)]).returncode == 0
    purelib = Path(sysconfig.get_path("purelib", vars={"base": str(venv), "platbase": str(venv)}))
    purelib.mkdir(parents=True, exist_ok=True)
    (purelib / "deps_from_test_venv.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    res = _run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "--no-deps",
                "--no-index", "-q", str(wheel)])
    assert res.returncode == 0, res.stderr[-3000:]
    return venv


def test_wheel_install_finds_presets_and_builds_shards(wheel_venv, tmp_path):
    py = str(wheel_venv / "bin" / "python")
    where = _run([py, "-c", "import ctprep, ctprep_train, ctprep.config as c; print(ctprep.__file__); "
                            "print(ctprep_train.__file__); print(c.list_presets())"], cwd=tmp_path)
    assert where.returncode == 0, where.stderr
    lines = where.stdout.splitlines()
    assert all(str(wheel_venv) in line for line in lines[:2]), lines  # the wheel, not the clone
    assert "demo" in lines[2] and "ctclip" in lines[2]
    ctprep = str(wheel_venv / "bin" / "ctprep")
    assert _run([ctprep, "demo-data", "--out", str(tmp_path / "src"), "--cases", "3", "--workers", "1"],
                cwd=tmp_path).returncode == 0
    res = _run([ctprep, "build-shards", "--src", str(tmp_path / "src"), "--out", str(tmp_path / "out"),
                "--config", "demo", "--workers", "0", "--no-progress"], cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads((tmp_path / "out" / "index.json").read_text())["schema_version"] >= 2


def test_wheel_install_loads_an_encoder_export(wheel_venv, tmp_path):
    py = str(wheel_venv / "bin" / "python")
    code = f"""
import json, torch
from ctprep.config import load_config
from ctprep_train.export import PREPROCESSING_FILE, preprocessing_spec
from ctprep_train.inference import load_encoder
from ctprep_train.model import create_model, list_models, save_pretrained
assert "tiny" in list_models(), list_models()
d = {str(tmp_path / "export")!r}
save_pretrained(create_model("tiny"), d)
json.dump(preprocessing_spec(load_config("demo").to_json(), recorded_from="demo"), open(d + "/" + PREPROCESSING_FILE, "w"))
model, preprocess, tokenizer = load_encoder(d)
emb = model.encode_text(["Pleural effusion is present."])
assert torch.isfinite(emb).all()
print("ok", tuple(emb.shape))
"""
    res = _run([py, "-c", code], cwd=tmp_path)
    assert res.returncode == 0 and res.stdout.startswith("ok"), res.stderr[-3000:]


def test_every_package_folder_is_listed_for_the_wheel():
    """pyproject lists packages explicitly (folder = import path under pipeline/ and trainer/): a new
    subpackage missing from that list would be left out of every non-editable install."""
    import tomllib

    tool = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(tool["packages"])
    on_disk = set()
    for name, folder in tool["package-dir"].items():
        root = REPO / folder
        on_disk.add(name)  # a mapped folder is a package even without __init__.py (configs/: data only)
        if not (root / "__init__.py").is_file():  # data only: each subfolder is importable too (setuptools
            for sub in root.rglob("*"):          # warns about every one not listed)
                if sub.is_dir() and "__pycache__" not in sub.parts:
                    on_disk.add(".".join((name, *sub.relative_to(root).parts)))
        for init in root.rglob("__init__.py"):
            rel = init.parent.relative_to(root).parts
            on_disk.add(".".join((name, *rel)))
    assert on_disk <= listed, f"package folders missing from pyproject's packages: {sorted(on_disk - listed)}"
    assert listed <= on_disk, f"pyproject lists packages with no folder: {sorted(listed - on_disk)}"
