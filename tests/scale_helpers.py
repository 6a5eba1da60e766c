"""Test fixtures for the scale tests: a real Dask cluster on localhost.

A scheduler and workers are started as the same ``dask scheduler`` /
``dask worker`` commands a cluster runs (not a ``LocalCluster``), on free
loopback ports, each in its own process group so that one worker can be
killed whole (nanny and worker process) the way a node dies.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def quiet_env(**extra: str) -> dict[str, str]:
    """Environment for cluster processes: one native thread each, no dashboards phoning home."""
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        OPENBLAS_NUM_THREADS="1",
        BLOSC_NTHREADS="1",
        DASK_DISTRIBUTED__WORKER__DAEMON="False",
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


@dataclass
class LocalDaskCluster:
    address: str
    scheduler: subprocess.Popen
    workers: list[subprocess.Popen] = field(default_factory=list)
    logs: Path | None = None

    def kill_worker(self, index: int) -> None:
        """SIGKILL a worker's whole process group (nanny + worker): a node lost mid-task."""
        proc = self.workers[index]
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)

    def log_text(self) -> str:
        if self.logs is None:
            return ""
        return "\n".join(f"==> {p.name}\n{p.read_text(errors='replace')[-4000:]}" for p in sorted(self.logs.glob("*.log")))


def _spawn(cmd: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
    handle = log.open("wb")
    return subprocess.Popen(cmd, stdout=handle, stderr=subprocess.STDOUT, env=env, start_new_session=True)


@contextlib.contextmanager
def local_dask_cluster(tmp: Path, n_workers: int = 2, memory_limit: str = "1GiB", timeout: float = 120.0,
                       scheduler_env: dict[str, str] | None = None):
    """Start ``dask scheduler`` + ``n_workers`` x ``dask worker --nthreads 1`` on 127.0.0.1.

    ``scheduler_env`` adds Dask config for the scheduler only (e.g. ``DASK_DISTRIBUTED__SCHEDULER__
    ALLOWED_FAILURES``). Yields a ``LocalDaskCluster``; every process started here is killed by its
    own id on exit.
    """
    from distributed import Client

    logs = tmp / "dask-logs"
    logs.mkdir(parents=True, exist_ok=True)
    env = quiet_env()
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    scheduler = _spawn(
        [str(BIN / "dask"), "scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"],
        logs / "scheduler.log",
        {**env, **(scheduler_env or {})},
    )
    cluster = LocalDaskCluster(address=address, scheduler=scheduler, logs=logs)
    try:
        for i in range(n_workers):
            cluster.workers.append(
                _spawn(
                    [
                        str(BIN / "dask"), "worker", address,
                        "--nthreads", "1",
                        "--memory-limit", memory_limit,
                        "--no-dashboard",
                        "--name", f"w{i}",
                        "--local-directory", str(tmp / f"dask-w{i}"),
                        "--death-timeout", "60",
                    ],
                    logs / f"worker{i}.log",
                    env,
                )
            )
        deadline = time.monotonic() + timeout
        while True:
            try:
                with Client(address, timeout=5) as client:
                    client.wait_for_workers(n_workers, timeout=max(1.0, deadline - time.monotonic()))
                break
            except (OSError, TimeoutError) as exc:
                if time.monotonic() > deadline or scheduler.poll() is not None:
                    raise RuntimeError(f"cluster did not start: {exc}\n{cluster.log_text()}") from exc
                time.sleep(0.5)
        yield cluster
    finally:
        for proc in [*cluster.workers, scheduler]:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        for proc in [*cluster.workers, scheduler]:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=15)


# --------------------------------------------------------------------------- multi-rank data


def epoch_ids_on_rank(rank: int, world_size: int, init_file: str, scenarios: list[dict]) -> None:
    """One rank of a gloo job: per scenario, stream ``steps`` training batches as the trainer does.

    Runs under ``torch.multiprocessing.spawn``; rank and world size come from the initialized
    process group (as in trainer/train.py), not from the caller. Each scenario is a dict with
    ``shards`` (folder with index.json), ``data`` (DataConfig fields), ``steps`` and ``out``
    (folder for ``rank<r>.json``: the list of batches, each a list of case ids).
    """
    import json

    import torch.distributed as dist

    from ctprep_train.config import DataConfig
    from ctprep_train.data import build_train_loader, expectation_from_config, load_shard_index

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        for scenario in scenarios:
            cfg = DataConfig(shards=scenario["shards"], **scenario["data"])
            expect = expectation_from_config(cfg)
            index = load_shard_index(cfg.shards, expect)
            loader = build_train_loader(cfg, index, expect, rank=dist.get_rank(), world_size=dist.get_world_size())
            batches = []
            for i, batch in enumerate(loader):
                if i == scenario["steps"]:
                    break
                batches.append([str(case) for case in batch["ids"]])
            close = getattr(loader, "close", None)
            if close is not None:  # stop its reader thread / DataLoader workers before the next scenario
                close()
            del loader
            Path(scenario["out"], f"rank{dist.get_rank()}.json").write_text(json.dumps(batches))
            dist.barrier()  # every rank reached the end of the epoch: nobody hung on uneven shards
    finally:
        dist.destroy_process_group()
