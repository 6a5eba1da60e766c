"""`ctprep build-shards` on a Dask cluster of SLURM jobs made by dask-jobqueue (pip install dask-jobqueue).

    python docker/cluster/jobqueue_build_shards.py --src /shared/ct/ctrate --out /shared/shards \
        --jobs 16 --workers-per-job 32 --queue cpu --account myproj

Each SLURM job runs ``--workers-per-job`` single-threaded Dask workers; the cluster adapts between
1 and ``--jobs`` jobs with the queue of cases. The driver (this process, on a login or head node)
keeps the SQLite manifest, so run it where ``--out`` is on local or reliable shared storage.
"""

from __future__ import annotations

import argparse
import subprocess
import sys


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--src", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--jobs", type=int, default=8, help="most SLURM jobs at once")
    p.add_argument("--workers-per-job", type=int, default=16, help="Dask worker processes per job (1 thread each)")
    p.add_argument("--memory-per-worker-gb", type=float, default=6.0)
    p.add_argument("--queue", default=None)
    p.add_argument("--account", default=None)
    p.add_argument("--walltime", default="04:00:00")
    args, extra = p.parse_known_args()

    from dask_jobqueue import SLURMCluster

    n = args.workers_per_job
    cluster = SLURMCluster(
        cores=n,  # one thread per worker process: processes == cores
        processes=n,
        memory=f"{args.memory_per_worker_gb * n:.0f}GB",
        walltime=args.walltime,
        queue=args.queue,
        account=args.account,
        job_script_prologue=["export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 BLOSC_NTHREADS=1"],
        worker_extra_args=["--death-timeout", "120"],
    )
    cluster.adapt(minimum_jobs=1, maximum_jobs=args.jobs)
    print(cluster.job_script(), file=sys.stderr)
    try:
        cmd = ["ctprep", "build-shards", "--src", args.src, "--out", args.out, "--scheduler", cluster.scheduler_address, *extra]
        return subprocess.run(cmd).returncode
    finally:
        cluster.close()


if __name__ == "__main__":
    sys.exit(main())
