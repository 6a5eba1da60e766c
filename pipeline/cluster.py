"""The Dask side of a build: a lazily started client (local cluster or an existing scheduler)
and the per-process thread pinning of its workers. ``ctprep.runner`` maps stage tasks over it."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import Any

# Native thread pools: one thread per Dask worker process (parallelism = processes).
THREAD_ENV = {
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "NUMEXPR_NUM_THREADS": "1",
    "BLOSC_NTHREADS": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


def default_workers() -> int:
    """Small default: min(2, CPUs) worker processes."""
    return max(1, min(2, os.cpu_count() or 1))


def pin_threads() -> None:
    """Pin native thread pools of this process to one thread (idempotent)."""
    for k, v in THREAD_ENV.items():
        os.environ.setdefault(k, v)
    try:
        import torch

        if torch.get_num_threads() != 1:
            torch.set_num_threads(1)
    except ImportError:  # pragma: no cover
        pass
    try:
        import numcodecs.blosc

        numcodecs.blosc.set_nthreads(1)
    except Exception:  # pragma: no cover
        pass


class Cluster:
    """Lazily started Dask client: nothing starts when there is no work.

    ``scheduler`` = address of an existing ``dask scheduler`` (its workers must
    have ``ctprep`` installed); otherwise a LocalCluster of ``workers``
    processes with one thread each. ``workers == 0`` runs tasks in process
    (no Dask; for debugging and small tests).
    """

    def __init__(self, scheduler: str | None = None, workers: int | None = None,
                 retries: int = 0, memory_limit: str | None = None):
        self.scheduler = scheduler
        self.workers = default_workers() if workers is None else workers
        # Dask re-runs a task that *raised* up to ``retries`` times; a task whose worker *died* is
        # re-run by the scheduler (``distributed.scheduler.allowed-failures``) whatever this says.
        self.retries = retries
        # Per local worker process (the nanny restarts a worker past it); with ``scheduler`` the
        # workers' own ``dask worker --memory-limit`` applies.
        self.memory_limit = memory_limit
        self.client = None
        self._cluster = None

    @property
    def in_process(self) -> bool:
        return not self.scheduler and self.workers == 0

    def get(self):
        if self.in_process:
            return None
        if self.client is None:
            from distributed import Client, LocalCluster

            if self.scheduler:
                self.client = Client(self.scheduler, timeout="30s")
            else:
                os.environ.update({k: os.environ.get(k, v) for k, v in THREAD_ENV.items()})
                self._cluster = LocalCluster(n_workers=self.workers, threads_per_worker=1, processes=True,
                                             memory_limit=self.memory_limit or "auto",
                                             dashboard_address=":0", env=dict(THREAD_ENV))
                self.client = Client(self._cluster)
            self.client.run(pin_threads)
        return self.client

    def map(self, fn: Callable[[Any], Any], items: list[Any]) -> Iterable[tuple[Any, Any]]:
        """Yield ``(item, fn(item))`` as tasks complete (any order). A task that
        failed outside ``fn``'s own handling (e.g. ``KilledWorker`` after its
        worker died repeatedly) yields its exception as the result."""
        client = self.get()
        if client is None:
            for item in items:
                yield item, fn(item)
            return
        from distributed import as_completed

        futures = client.map(fn, items, pure=False, retries=self.retries)
        item_of = {f.key: item for f, item in zip(futures, items)}
        for fut in as_completed(futures):
            try:
                result = fut.result()
            except Exception as e:  # noqa: BLE001
                result = e
            yield item_of[fut.key], result
            fut.release()

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None
        if self._cluster is not None:
            self._cluster.close()
            self._cluster = None
