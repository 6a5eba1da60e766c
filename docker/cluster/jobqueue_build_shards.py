"""`ctprep build-shards` on a Dask cluster of SLURM jobs made by dask-jobqueue (pip install dask-jobqueue).

    python docker/cluster/jobqueue_build_shards.py --src /shared/ct/ctrate --out /shared/shards \
        --jobs 16 --workers-per-job 32 --queue cpu --account myproj

Each SLURM job runs ``--workers-per-job`` single-threaded Dask workers; the cluster adapts between
1 and ``--jobs`` jobs with the queue of cases. The driver (this process, on a login or head node)
keeps the SQLite manifest, so run it where ``--out`` is on local or reliable shared storage.

Who may submit work: the scheduler (in this process) listens on the cluster network and runs any
code a connected client sends, so it and the workers speak TLS only and refuse any peer without a
certificate from the run's CA. ``--tls-dir`` (default ``$CTPREP_TLS_DIR``) is a folder made by
``scripts/make_tls_certs.sh`` on a filesystem the compute nodes see; without it this script makes a
fresh one for this run under ``--out`` (private to you, deleted at the end). docs/cluster-security.md.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def run_certificates(out: str) -> tuple[Path, Path]:
    """A fresh CA + certificates for this run only, in a private folder under ``out`` (shared with
    the nodes); the CA key is deleted at once. Returns (the folder to delete afterwards, the certs)."""
    Path(out).mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=".dask-tls-", dir=out))  # mode 0700
    certs = folder / "certs"
    subprocess.run(["bash", str(REPO / "scripts" / "make_tls_certs.sh"), str(certs), "7"], check=True)
    (certs / "ca-key.pem").unlink()
    return folder, certs


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
    p.add_argument("--tls-dir", default=os.environ.get("CTPREP_TLS_DIR"),
                   help="folder from scripts/make_tls_certs.sh (default: $CTPREP_TLS_DIR, else fresh ones for this run)")
    args, extra = p.parse_known_args()

    from dask_jobqueue import SLURMCluster
    from distributed.security import Security

    made = None
    if args.tls_dir:
        certs = Path(args.tls_dir).resolve()
    else:
        made, certs = run_certificates(args.out)
    # Scheduler (here) and workers (in the jobs; dask-jobqueue passes them --tls-* with these paths)
    # present cluster.pem; the driver below presents client.pem.
    security = Security(
        tls_ca_file=str(certs / "ca.pem"),
        tls_scheduler_cert=str(certs / "cluster.pem"), tls_scheduler_key=str(certs / "cluster-key.pem"),
        tls_worker_cert=str(certs / "cluster.pem"), tls_worker_key=str(certs / "cluster-key.pem"),
        tls_client_cert=str(certs / "client.pem"), tls_client_key=str(certs / "client-key.pem"),
        require_encryption=True,
    )
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
        protocol="tls://",
        security=security,
    )
    try:
        cluster.adapt(minimum_jobs=1, maximum_jobs=args.jobs)
        print(cluster.job_script(), file=sys.stderr)
        cmd = ["ctprep", "build-shards", "--src", args.src, "--out", args.out, "--scheduler", cluster.scheduler_address,
               "--tls-ca-file", str(certs / "ca.pem"), "--tls-cert", str(certs / "client.pem"),
               "--tls-key", str(certs / "client-key.pem"), *extra]
        return subprocess.run(cmd).returncode
    finally:
        cluster.close()
        if made is not None:
            shutil.rmtree(made, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
