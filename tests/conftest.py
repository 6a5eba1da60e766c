"""Shared fixtures and the test markers.

Markers (``pytest -m unit`` runs the quick in-process tests, ``-m multiprocess`` the rest):

* ``multiprocess``: the test starts other processes or servers (a Dask cluster, DeepSpeed
  launchers, a TLS scheduler, a killed build, the CLI in a subprocess); slower, and the ones a
  loaded machine makes flaky first.
* ``unit``: everything else, in one process.

A test is ``multiprocess`` when its file is listed in ``MULTIPROCESS_FILES`` or it carries the
marker itself.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

MULTIPROCESS_FILES = {
    "test_cli_errors.py", "test_core_bigvolume.py", "test_core_dask.py", "test_scale_dask.py",
    "test_scale_disk_check.py", "test_scale_docker.py", "test_scale_gpu_check.py", "test_scale_multinode.py",
    "test_scale_tls.py", "test_trainer_train.py",
}  # fmt: skip


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "multiprocess: starts other processes or servers (Dask, DeepSpeed, TLS, subprocess CLI)")
    config.addinivalue_line("markers", "unit: runs in the test process only")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.name in MULTIPROCESS_FILES or item.get_closest_marker("multiprocess"):
            item.add_marker(pytest.mark.multiprocess)
        else:
            item.add_marker(pytest.mark.unit)


@pytest.fixture(scope="session")
def synthetic_ctrate(tmp_path_factory) -> Callable[..., Path]:
    """Factory for synthetic CT-RATE trees, cached per argument set for the whole session.

    ``synthetic_ctrate(cases=4, seed=5, layout="flat", faults=False)`` returns the root of a tree
    written by ``ctprep.synth.ctrate.write_ctrate`` (demo grid). Treat it as read-only: copy it
    (``shutil.copytree``) before changing files.
    """
    from ctprep.synth.ctrate import write_ctrate

    made: dict[tuple, Path] = {}

    def make(cases: int = 4, seed: int = 0, layout: str = "flat", faults: bool = False) -> Path:
        key = (cases, seed, layout, faults)
        if key not in made:
            root = tmp_path_factory.mktemp(f"ctrate_{layout}_{cases}_{seed}") / "dataset"
            write_ctrate(root, cases=cases, grid="demo", seed=seed, faults=faults, layout=layout)
            made[key] = root
        return made[key]

    return make


@pytest.fixture(scope="session")
def synthetic_omniabnorm(tmp_path_factory) -> Callable[..., Path]:
    """Factory for synthetic OmniAbnorm-CT trees, cached per argument set for the whole session.

    ``synthetic_omniabnorm(cases=6, seed=2, layout="release", faults=False)`` returns the root of a
    tree written by ``ctprep.synth.omniabnorm.write_omniabnorm`` (demo grid). Read-only, as above.
    """
    from ctprep.synth.omniabnorm import write_omniabnorm

    made: dict[tuple, Path] = {}

    def make(cases: int = 4, seed: int = 0, layout: str = "release", faults: bool = False) -> Path:
        key = (cases, seed, layout, faults)
        if key not in made:
            root = tmp_path_factory.mktemp(f"omniabnorm_{layout}_{cases}_{seed}") / "OmniAbnormCT_14K"
            write_omniabnorm(root, cases=cases, grid="demo", seed=seed, faults=faults, layout=layout)
            made[key] = root
        return made[key]

    return make


@pytest.fixture(scope="session")
def built_shards(synthetic_ctrate, tmp_path_factory) -> Callable[..., Path]:
    """Factory for shards built by the real pipeline (``demo`` preset, in process) from a
    ``synthetic_ctrate`` tree, cached per argument set for the whole session.

    ``built_shards(cases=4, seed=0, faults=False)`` returns the ``--out`` folder of a finished
    build (``index.json``, shards, manifest). Read-only: copy it before changing files.
    """
    from ctprep.config import load_config
    from ctprep.runner import build

    made: dict[tuple, Path] = {}

    def make(cases: int = 4, seed: int = 0, faults: bool = False) -> Path:
        key = (cases, seed, faults)
        if key not in made:
            out = tmp_path_factory.mktemp(f"shards_{cases}_{seed}") / "shards"
            report = build([synthetic_ctrate(cases=cases, seed=seed, faults=faults)], out, load_config("demo"),
                           workers=0, progress=False)
            assert report.exit_code == 0, f"building the shared test shards failed: {report}"
            made[key] = out
        return made[key]

    return make
