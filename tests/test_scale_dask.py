"""`ctprep build-shards --scheduler` on a real Dask cluster that loses a worker mid-run.

A ``dask scheduler`` and two ``dask worker --nthreads 1 --memory-limit ...`` processes run on
127.0.0.1 (the same commands as docker/compose.yaml). While the resample stage is running, the
worker that is processing a case is SIGKILLed whole (nanny + worker), like a node lost. The run
must still finish, exit 0, and leave every case done exactly once: one manifest row per
(case, stage), one zarr store per case and nothing else, one shard sample per case; and a rerun
must find nothing to do.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import time
from collections import Counter
from pathlib import Path

from tests.scale_helpers import local_dask_cluster, quiet_env

BIN = Path(sys.executable).parent
CASES = 12  # CT-RATE demo volumes: ~1 s of resample each on one core, so a kill lands mid-run
PER_CASE_STAGES = ("resample", "regions", "text")


def wait_and_kill_busy_worker(
    cluster, proc: subprocess.Popen, zarr_dir: Path, timeout: float = 240.0,
    task_names: tuple[str, ...] = ("execute_case", "build_sample"),
) -> list[str]:
    """Kill worker ``w1`` the first time it is running a case's task after some case finished.

    Returns the task keys it was processing when killed.
    """
    from distributed import Client

    deadline = time.monotonic() + timeout
    with Client(cluster.address, timeout=30) as client:
        while proc.poll() is None and time.monotonic() < deadline:
            info = client.scheduler_info()["workers"]
            addr = next((a for a, w in info.items() if w.get("name") == "w1"), None)
            finished = list(zarr_dir.glob("*.zarr")) if zarr_dir.is_dir() else []
            if addr is not None and finished:
                busy = [str(k) for k in client.processing(workers=[addr]).get(addr, ())]
                # per-case stage tasks, or pack's per-sample encoding on a fast machine
                if any(name in k for k in busy for name in task_names):
                    cluster.kill_worker(1)
                    return busy
            time.sleep(0.05)
    raise AssertionError(f"never saw worker w1 busy on a case (run exit code {proc.poll()})\n{cluster.log_text()}")


def shard_sample_keys(out: Path) -> list[str]:
    index = json.loads((out / "index.json").read_text())
    keys = []
    for entries in index["splits"].values():
        for entry in entries:
            with tarfile.open(out / entry["path"]) as tar:
                keys.extend({m.name.split("/")[-1].split(".", 1)[0] for m in tar.getmembers() if m.isfile()})
    return keys


def test_build_shards_survives_a_killed_worker_and_does_every_case_once(tmp_path):
    env = quiet_env()
    src, out = tmp_path / "ctrate", tmp_path / "out"
    subprocess.run(
        [str(BIN / "ctprep"), "demo-data", "--out", str(src), "--source", "ctrate", "--cases", str(CASES), "--seed", "0"],
        check=True, env=env, capture_output=True,
    )
    with local_dask_cluster(tmp_path, n_workers=2, memory_limit="1.5GiB") as cluster:
        log = (tmp_path / "build.log").open("w")
        proc = subprocess.Popen(
            [str(BIN / "ctprep"), "build-shards", "--src", str(src), "--out", str(out),
             "--scheduler", cluster.address, "--no-progress"],
            stdout=log, stderr=subprocess.STDOUT, env=env,
        )
        try:
            killed_keys = wait_and_kill_busy_worker(cluster, proc, out / "work" / "zarr")
            rc = proc.wait(timeout=600)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        log.close()
        build_log = (tmp_path / "build.log").read_text()
        assert cluster.workers[1].poll() is not None, "the worker was not killed"
        assert cluster.workers[0].poll() is None, "the surviving worker died too"
        assert rc == 0, f"build-shards failed after a worker was killed\n{build_log}\n{cluster.log_text()}"
    assert killed_keys

    from ctprep.manifest import Manifest

    manifest = Manifest(out / "work" / "manifest.sqlite")
    try:
        case_ids = sorted(row.case.case_id for row in manifest.cases())
        rows = manifest.stage_rows()
    finally:
        manifest.close()
    assert len(case_ids) == CASES
    for stage in PER_CASE_STAGES:
        per_case = Counter(case for case, st in rows if st == stage)
        assert sorted(per_case) == case_ids and set(per_case.values()) == {1}, stage
        bad = {case: rows[(case, stage)].status for case in case_ids if rows[(case, stage)].status != "done"}
        assert not bad, f"{stage}: not done after the kill: {bad}\n{build_log}"

    # One zarr store per case; the temporary store of the task that died mid-write is gone
    # (the stage sweeps *.tmp-* debris once all of its tasks have returned).
    entries = sorted(p.name for p in (out / "work" / "zarr").iterdir())
    final = entries
    assert final == [f"{case}.zarr" for case in case_ids]
    referenced = {Path(str(row.output)).name for (case, st), row in rows.items() if st == "resample"}
    assert referenced == set(final)

    # Every case exactly once in the listed shards.
    keys = shard_sample_keys(out)
    duplicates = [k for k, n in Counter(keys).items() if n > 1]
    assert not duplicates, f"samples written twice: {duplicates}"
    assert sorted(keys) == case_ids
    assert not (out / "quarantine.jsonl").read_text().strip()

    # The manifest the interrupted-by-a-dead-worker run left is consistent: a rerun does nothing.
    rerun = subprocess.run(
        [str(BIN / "ctprep"), "build-shards", "--src", str(src), "--out", str(out), "--workers", "0", "--no-progress"],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert rerun.returncode == 0, rerun.stderr
    assert "nothing to do" in rerun.stderr + rerun.stdout


def _raise_once(marker: str) -> str:
    """Fails the first time (a transient error on a worker), succeeds when re-run."""
    if not os.path.exists(marker):
        Path(marker).touch()
        raise OSError("transient: network filesystem hiccup")
    return "ok"


def test_runner_cluster_retries_raised_tasks_and_limits_local_worker_memory(tmp_path):
    from ctprep.runner import Cluster

    cluster = Cluster(workers=1, retries=1, memory_limit="600MiB")
    try:
        results = dict(cluster.map(_raise_once, [str(tmp_path / "m1"), str(tmp_path / "m2")]))
        assert set(results.values()) == {"ok"}, results
        limits = {w["memory_limit"] for w in cluster.get().scheduler_info()["workers"].values()}
        assert limits == {600 * 2**20}
    finally:
        cluster.close()
    no_retry = Cluster(workers=1, retries=0)
    try:
        (result,) = [r for _, r in no_retry.map(_raise_once, [str(tmp_path / "m3")])]
        assert isinstance(result, OSError)
    finally:
        no_retry.close()


def test_cases_lost_with_their_workers_are_redone_by_the_next_run(tmp_path):
    """allowed-failures=0: one dead worker fails its tasks (KilledWorker) instead of re-running them.

    Those healthy cases fail for this run (exit 4, not quarantined), and the next run must redo them
    (a lost worker is not a bad case), ending with every case done.
    """
    env = quiet_env()
    src, out = tmp_path / "ctrate", tmp_path / "out"
    subprocess.run(
        [str(BIN / "ctprep"), "demo-data", "--out", str(src), "--source", "ctrate", "--cases", "6", "--seed", "1"],
        check=True, env=env, capture_output=True,
    )
    with local_dask_cluster(tmp_path, n_workers=2, memory_limit="1.5GiB",
                            scheduler_env={"DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES": "0"}) as cluster:
        proc = subprocess.Popen(
            [str(BIN / "ctprep"), "build-shards", "--src", str(src), "--out", str(out),
             "--scheduler", cluster.address, "--no-progress"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True,
        )
        try:
            wait_and_kill_busy_worker(cluster, proc, out / "work" / "zarr")
            first, _ = proc.communicate(timeout=600)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    # Not bad cases: reported as failed (exit 4, "will retry"), never written to quarantine.jsonl.
    assert proc.returncode == 4, first
    assert "FAILED, will retry" in first and "KilledWorker" in first, first
    assert "KilledWorker" not in (out / "quarantine.jsonl").read_text(), first

    rerun = subprocess.run(
        [str(BIN / "ctprep"), "build-shards", "--src", str(src), "--out", str(out), "--workers", "0", "--no-progress"],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert rerun.returncode == 0, rerun.stderr
    assert not (out / "quarantine.jsonl").read_text().strip(), rerun.stderr
    assert sorted(shard_sample_keys(out)) == sorted(p.name[: -len(".zarr")] for p in (out / "work" / "zarr").glob("*.zarr") if ".tmp-" not in p.name)
