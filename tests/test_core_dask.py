"""build-shards through a real `dask scheduler` + two `dask worker` processes on localhost (--scheduler)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from ctprep.config import load_config
from ctprep.runner import build
from ctprep.stages.resample import read_case_zarr
from tests.core_helpers import oblique_free_affine, smooth_volume, write_v2

DASK = Path(sys.executable).with_name("dask")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _chest_like(shape, seed):
    """Body + two air-filled lungs so the chest check passes."""
    vol = smooth_volume(shape, seed=seed, amplitude=60).astype(np.int16)
    i, j, k = np.ogrid[: shape[0], : shape[1], : shape[2]]
    body = ((i - shape[0] / 2) / (shape[0] / 2.2)) ** 2 + ((j - shape[1] / 2) / (shape[1] / 2.4)) ** 2 < 1
    vol = np.where(body, vol + 40, -1000).astype(np.int16)
    for c in (shape[0] * 0.32, shape[0] * 0.68):
        lung = ((i - c) / (shape[0] * 0.14)) ** 2 + ((j - shape[1] / 2) / (shape[1] * 0.25)) ** 2 < 1
        vol[np.broadcast_to(lung, shape)] = -820
    lab = np.where(np.broadcast_to(vol == -820, shape), 10, 0).astype(np.int16)
    return vol, lab


@pytest.fixture
def small_ctrate(tmp_path) -> Path:
    """Four tiny v2 volumes + masks + a reports CSV in the CT-RATE layout."""
    root = tmp_path / "ctrate"
    rows = ["VolumeName,ClinicalInformation_EN,Technique_EN,Findings_EN,Impressions_EN"]
    for n in range(4):
        name = f"train_{n + 1}_a_1"
        vol, lab = _chest_like((48, 40, 20), seed=n)
        aff = oblique_free_affine("LPS", (6.0, 6.0, 12.0))
        rel = Path("train") / f"train_{n + 1}" / f"train_{n + 1}_a" / f"{name}.nii.gz"
        write_v2(root / rel, vol, aff)
        write_v2(root / "masks" / rel, lab, aff)
        rows.append(f"{name}.nii.gz,Not given.,Not given.,Lungs are clear.,Normal.")
    (root / "radiology_text_reports").mkdir()
    (root / "radiology_text_reports" / "train_reports.csv").write_text("\n".join(rows) + "\n")
    return root


@pytest.fixture
def dask_cluster(tmp_path):
    """`dask scheduler` + 2 `dask worker` subprocesses; yields the scheduler address."""
    if not DASK.exists():
        pytest.skip("dask CLI not installed")
    port = _free_port()
    addr = f"tcp://127.0.0.1:{port}"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    logs = tmp_path / "dask_logs"
    logs.mkdir()
    procs = [subprocess.Popen([str(DASK), "scheduler", "--host", "127.0.0.1", "--port", str(port),
                               "--no-dashboard"], env=env, stdout=subprocess.DEVNULL,
                              stderr=open(logs / "scheduler.log", "w"), start_new_session=True)]
    try:
        from distributed import Client

        for w in range(2):
            procs.append(subprocess.Popen([str(DASK), "worker", addr, "--nthreads", "1", "--nworkers", "1",
                                           "--no-dashboard", "--local-directory", str(tmp_path / f"w{w}")],
                                          env=env, stdout=subprocess.DEVNULL,
                                          stderr=open(logs / f"worker{w}.log", "w"), start_new_session=True))
        deadline = time.time() + 90
        client = None
        while time.time() < deadline:
            try:
                client = client or Client(addr, timeout="5s")
                client.wait_for_workers(2, timeout=5)
                break
            except Exception:  # noqa: BLE001 - still starting
                time.sleep(0.5)
        else:
            pytest.fail("dask cluster did not start: " + (logs / "scheduler.log").read_text()[-2000:])
        client.close()
        yield addr
    finally:
        for p in reversed(procs):  # only the processes this fixture started, by pid/session
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()


def test_build_through_external_scheduler(small_ctrate, dask_cluster, tmp_path):
    cfg = load_config("demo")
    out_dask = tmp_path / "out_dask"
    report = build([small_ctrate], out_dask, cfg, stages="scan,resample", scheduler=dask_cluster, progress=False)
    assert report.exit_code == 0, report.summary
    assert report.tallies["resample"].done == 4
    # the same as an in-process run, bit for bit
    out_local = tmp_path / "out_local"
    build([small_ctrate], out_local, cfg, stages="scan,resample", workers=0, progress=False)
    for n in range(4):
        a = read_case_zarr(out_dask / "work" / "zarr" / f"train_{n + 1}_a_1.zarr")
        b = read_case_zarr(out_local / "work" / "zarr" / f"train_{n + 1}_a_1.zarr")
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_array_equal(a[1], b[1])
    # nothing changed -> no work, not even on the cluster
    again = build([small_ctrate], out_dask, cfg, stages="scan,resample", scheduler=dask_cluster, progress=False)
    assert sum(t.ran for t in again.tallies.values()) == 0
    shutil.rmtree(out_local)
