"""scripts/check_disk.sh: the venv install and `make demo` stop early on a full disk, naming the folder."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "check_disk.sh"


def check(folder: Path, need_mb: int, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), str(folder), str(need_mb), "the thing"], capture_output=True,
                          text=True, env={**os.environ, **env})


def test_refuses_when_the_filesystem_lacks_the_space(tmp_path):
    target = tmp_path / "not" / "yet" / "made"  # measured on its nearest existing parent
    proc = check(target, 10**12)
    assert proc.returncode == 1
    assert str(target) in proc.stderr and str(tmp_path) in proc.stderr
    assert "the thing needs about" in proc.stderr and "MB are free" in proc.stderr
    assert not target.exists()  # a check, nothing created


def test_passes_when_space_is_there_or_the_check_is_off(tmp_path):
    assert check(tmp_path, 1).returncode == 0
    assert check(tmp_path, 10**12, CHECK_DISK="0").returncode == 0


def test_make_and_demo_run_the_check_before_writing():
    makefile = (REPO / "Makefile").read_text()
    recipe = makefile.split("$(STAMP): pyproject.toml\n", 1)[1].splitlines()
    assert "check_disk.sh" in recipe[0]  # before the venv and pip
    demo = (REPO / "scripts" / "demo.sh").read_text()
    assert demo.index("check_disk.sh") < demo.index("mkdir -p")
    assert demo.index("check_disk.sh") < demo.index("demo-data")
