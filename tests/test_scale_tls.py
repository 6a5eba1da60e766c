"""Who may submit work to the Dask cluster: TLS with mutual certificates, end to end on 127.0.0.1.

Certificates come from ``scripts/make_tls_certs.sh`` (the documented way); a real ``dask
scheduler`` and ``dask worker`` are started with them as the recipes in ``docker/`` start them;
``ctprep build-shards --scheduler tls://...`` with the client certificate builds shards on that
cluster. A client with no certificate, or with one from another CA, is refused by the scheduler
and the worker themselves (checked at the TLS level, not only by ctprep's own argument checks).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.scale_helpers import BIN, _spawn, free_port, quiet_env

REPO = Path(__file__).resolve().parents[1]
MAKE_CERTS = REPO / "scripts" / "make_tls_certs.sh"

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="scripts/make_tls_certs.sh needs openssl")



def make_certs(folder: Path) -> Path:
    res = subprocess.run(["bash", str(MAKE_CERTS), str(folder), "2"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    return folder


@dataclass
class TlsCluster:
    address: str
    certs: Path
    scheduler: subprocess.Popen
    worker: subprocess.Popen
    logs: Path
    dashboard: str  # http://127.0.0.1:PORT

    def client_security(self):
        from distributed.security import Security

        c = self.certs
        return Security(tls_ca_file=str(c / "ca.pem"), tls_client_cert=str(c / "client.pem"),
                        tls_client_key=str(c / "client-key.pem"), require_encryption=True)

    def log_text(self) -> str:
        return "\n".join(f"==> {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in sorted(self.logs.glob("*.log")))


@contextlib.contextmanager
def tls_dask_cluster(tmp: Path, certs: Path, timeout: float = 90.0):
    """``dask scheduler`` + one ``dask worker``, both with ``--tls-ca-file/--tls-cert/--tls-key`` (the
    cluster certificate), on 127.0.0.1; every process started here is stopped by its own id on exit."""
    from distributed import Client

    logs = tmp / "dask-logs"
    logs.mkdir(parents=True, exist_ok=True)
    tls = ["--tls-ca-file", str(certs / "ca.pem"), "--tls-cert", str(certs / "cluster.pem"),
           "--tls-key", str(certs / "cluster-key.pem")]
    port, dashboard_port = free_port(), free_port()
    address = f"tls://127.0.0.1:{port}"
    env = quiet_env()
    scheduler = _spawn([str(BIN / "dask"), "scheduler", "--host", "127.0.0.1", "--port", str(port), "--protocol", "tls",
                        "--dashboard-address", f"127.0.0.1:{dashboard_port}", *tls], logs / "scheduler.log", env)
    procs = [scheduler]
    try:
        worker = _spawn([str(BIN / "dask"), "worker", address, "--nthreads", "1", "--memory-limit", "1.5GiB",
                         "--no-dashboard", "--name", "w0", "--local-directory", str(tmp / "dask-w0"),
                         "--death-timeout", "60", *tls], logs / "worker0.log", env)
        procs.append(worker)
        cluster = TlsCluster(address, certs, scheduler, worker, logs, f"http://127.0.0.1:{dashboard_port}")
        deadline = time.monotonic() + timeout
        while True:
            try:
                with Client(address, security=cluster.client_security(), timeout=5) as client:
                    client.wait_for_workers(1, timeout=max(1.0, deadline - time.monotonic()))
                break
            except (OSError, TimeoutError) as exc:
                if time.monotonic() > deadline or scheduler.poll() is not None:
                    raise RuntimeError(f"TLS cluster did not start: {exc}\n{cluster.log_text()}") from exc
                time.sleep(0.5)
        yield cluster
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        for proc in reversed(procs):
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=15)


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("tls")
    return {"cluster": make_certs(base / "certs"), "other": make_certs(base / "other-ca")}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, certs):
    with tls_dask_cluster(tmp_path_factory.mktemp("tls_cluster"), certs["cluster"]) as c:
        yield c
    assert c.scheduler.poll() is not None and c.worker.poll() is not None


def ctprep(*args: str, env: dict[str, str] | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "ctprep"), *args], capture_output=True, text=True, timeout=timeout,
                          env=quiet_env(**(env or {})))


def tls_peer_answers(address: str, ca: Path, cert: Path | None = None, key: Path | None = None) -> str:
    """Open a raw TLS connection (trusting ``ca``, presenting ``cert`` if given) to a Dask endpoint.

    Returns "accepted" when the endpoint speaks to us (Dask sends its handshake frame), else the
    reason the connection ended. With TLS 1.3 a server that rejects the client certificate sends
    its alert after the client's side of the handshake completes, so the verdict comes on recv().
    """
    host, port = address.removeprefix("tls://").rsplit(":", 1)
    ctx = ssl.create_default_context(cafile=str(ca))
    ctx.check_hostname = False  # as Dask: the CA is the trust, addresses are often bare IPs
    if cert is not None:
        ctx.load_cert_chain(str(cert), str(key) if key else None)
    try:
        with socket.create_connection((host, int(port)), timeout=10) as raw, ctx.wrap_socket(raw) as tls:
            data = tls.recv(1)
            return "accepted" if data else "closed by the server"
    except (ssl.SSLError, ConnectionError) as e:
        return f"refused: {e}"


# --------------------------------------------------------------------------- the certificates


def test_make_tls_certs_writes_a_ca_and_certificates_signed_by_it(certs):
    c = certs["cluster"]
    for name in ("ca.pem", "ca-key.pem", "cluster.pem", "cluster-key.pem", "client.pem", "client-key.pem"):
        assert (c / name).is_file(), name
    for key in ("ca-key.pem", "cluster-key.pem", "client-key.pem"):
        assert (c / key).stat().st_mode & 0o077 == 0, f"{key} must be private to its owner"
    res = subprocess.run(["openssl", "verify", "-CAfile", str(c / "ca.pem"), str(c / "cluster.pem"), str(c / "client.pem")],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    res = subprocess.run(["openssl", "verify", "-CAfile", str(c / "ca.pem"), str(certs["other"] / "client.pem")],
                         capture_output=True, text=True)
    assert res.returncode != 0, "another CA's certificate must not verify against this CA"
    again = subprocess.run(["bash", str(MAKE_CERTS), str(c)], capture_output=True, text=True)
    assert again.returncode != 0 and "not overwriting" in again.stderr


def test_tls_options_are_checked_against_the_address_and_the_files(certs):
    from ctprep.cluster import tls_files
    from ctprep.errors import UserError

    c = certs["cluster"]
    files = tls_files("tls://h:8786", c / "ca.pem", c / "client.pem", c / "client-key.pem")
    assert files is not None and files.security().require_encryption
    assert tls_files("tcp://h:8786") is None and tls_files(None) is None
    cases = {
        "needs --tls-ca-file and --tls-cert": ("tls://h:8786", None, None, None),
        "is not a tls:// address": ("tcp://h:8786", c / "ca.pem", c / "client.pem", c / "client-key.pem"),
        "without --scheduler": (None, c / "ca.pem", None, None),
        "no such file": ("tls://h:8786", c / "ca.pem", c / "missing.pem", None),
        "not a PEM": ("tls://h:8786", c / "ca.pem", c / "client-key.pem", None),  # a key where the cert goes
    }
    for message, args in cases.items():
        with pytest.raises(UserError, match=message) as err:
            tls_files(*args)
        assert "\n" not in str(err.value)


# --------------------------------------------------------------------------- the cluster


def test_build_shards_runs_on_a_tls_cluster_with_the_client_certificate(cluster, certs, synthetic_ctrate, tmp_path):
    from distributed import Client

    src = synthetic_ctrate(cases=3)
    out = tmp_path / "out"
    c = certs["cluster"]
    res = ctprep("build-shards", "--src", str(src), "--out", str(out), "--scheduler", cluster.address,
                 "--tls-ca-file", str(c / "ca.pem"), "--tls-cert", str(c / "client.pem"),
                 "--tls-key", str(c / "client-key.pem"), "--no-progress")
    assert res.returncode == 0, res.stderr + cluster.log_text()
    assert "3 cases found" in res.stderr and "pack: 3 done now" in res.stderr, res.stderr
    assert (out / "index.json").is_file()
    # The per-case tasks ran on the TLS cluster's worker, not in a local one.
    with Client(cluster.address, security=cluster.client_security(), timeout=10) as client:
        prefixes = client.run_on_scheduler(lambda dask_scheduler: sorted(dask_scheduler.task_prefixes))
    assert any(p.startswith("execute_case") for p in prefixes), prefixes  # execute_case_within: the timed wrapper


def test_ctprep_refuses_tls_without_certificates_in_one_line(cluster, tmp_path):
    t0 = time.monotonic()
    res = ctprep("build-shards", "--src", str(tmp_path), "--out", str(tmp_path / "out"), "--scheduler", cluster.address)
    assert res.returncode == 1
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and cluster.address in lines[0], res.stderr
    assert "--tls-ca-file" in lines[0] and "Traceback" not in res.stderr
    assert not (tmp_path / "out").exists() and time.monotonic() - t0 < 30


def test_a_client_certificate_from_another_ca_is_refused(cluster, certs, tmp_path):
    """Via the environment variables the recipes use: the scheduler refuses, the driver says so in
    one line, before scanning (nothing is written)."""
    other = certs["other"]
    env = {"CTPREP_TLS_CA_FILE": str(other / "ca.pem"), "CTPREP_TLS_CERT": str(other / "client.pem"),
           "CTPREP_TLS_KEY": str(other / "client-key.pem")}
    res = ctprep("build-shards", "--src", str(tmp_path), "--out", str(tmp_path / "out"),
                 "--scheduler", cluster.address, env=env)
    assert res.returncode == 1
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "refused the TLS connection" in lines[0] and cluster.address in lines[0], res.stderr
    assert not (tmp_path / "out").exists()

    # Trusting the right CA does not help: the scheduler checks the client's certificate itself.
    env["CTPREP_TLS_CA_FILE"] = str(certs["cluster"] / "ca.pem")
    res = ctprep("build-shards", "--src", str(tmp_path), "--out", str(tmp_path / "out"),
                 "--scheduler", cluster.address, env=env)
    assert res.returncode == 1 and "refused" in res.stderr and "Traceback" not in res.stderr, res.stderr


def test_scheduler_and_worker_refuse_connections_without_a_cluster_certificate(cluster, certs):
    from distributed import Client

    c, other = certs["cluster"], certs["other"]
    with Client(cluster.address, security=cluster.client_security(), timeout=10) as client:
        workers = client.scheduler_info()["workers"]
    # Every listening endpoint: the scheduler, each worker and each worker's nanny.
    worker_addresses = [*workers, *(w["nanny"] for w in workers.values() if w.get("nanny"))]
    assert len(worker_addresses) == 2 and all(a.startswith("tls://") for a in worker_addresses), workers
    for address in [cluster.address, *worker_addresses]:
        # Control: the real client certificate is spoken to, so "refused" below means refused.
        assert tls_peer_answers(address, c / "ca.pem", c / "client.pem", c / "client-key.pem") == "accepted"
        no_cert = tls_peer_answers(address, c / "ca.pem")
        # TLS 1.3 alert "certificate required" (TLS 1.2: "handshake failure")
        assert no_cert.startswith("refused") and ("CERTIFICATE_REQUIRED" in no_cert or "HANDSHAKE_FAILURE" in no_cert), \
            f"{address}: {no_cert}"
        rogue = tls_peer_answers(address, c / "ca.pem", other / "client.pem", other / "client-key.pem")
        assert rogue.startswith("refused") and "UNKNOWN_CA" in rogue, f"{address}: {rogue}"
    assert "TLS handshake failed" in (cluster.logs / "scheduler.log").read_text()
    # What the compose healthcheck probes instead of the TLS port: the dashboard's /health.
    import urllib.request

    with urllib.request.urlopen(f"{cluster.dashboard}/health", timeout=10) as answer:
        assert answer.read() == b"ok"

    # Dask clients: one with another CA's certificate, one speaking plain TCP to the TLS port.
    # Neither gets a connection, so neither can submit anything.
    from distributed.security import Security

    rogue_security = Security(tls_ca_file=str(c / "ca.pem"), tls_client_cert=str(other / "client.pem"),
                              tls_client_key=str(other / "client-key.pem"), require_encryption=True)
    with pytest.raises(OSError):
        Client(cluster.address, security=rogue_security, timeout=5)
    with pytest.raises(OSError):
        Client(cluster.address.replace("tls://", "tcp://"), timeout=5)


# --------------------------------------------------------------------------- the SLURM recipe


def test_slurm_recipe_runs_a_tls_cluster_with_per_job_certificates(synthetic_ctrate, tmp_path):
    """docker/cluster/slurm_dask.sbatch as SLURM would run it on one node (``srun`` = run the command):
    fresh certificates for the job, a TLS scheduler and worker on the loopback interface, the
    build through them, and nothing left behind (processes, scheduler file, certificates)."""
    src = synthetic_ctrate(cases=2)
    out = tmp_path / "out"
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "srun").write_text('#!/usr/bin/env bash\nwhile [[ $# -gt 0 && $1 == --* ]]; do shift; done\nexec "$@"\n')
    (fake / "srun").chmod(0o755)
    env = quiet_env(PATH=f"{fake}:{os.environ['PATH']}", SLURM_JOB_ID="4242", SLURM_MEM_PER_CPU="1500",
                    CTPREP_DASK_INTERFACE="lo", PY=str(BIN / "python"), CTPREP_REPO=str(REPO), TMPDIR=str(tmp_path))
    env.pop("CTPREP_TLS_DIR", None)
    proc = subprocess.Popen(["bash", str(REPO / "docker/cluster/slurm_dask.sbatch"), str(src), str(out)], cwd=REPO,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        log, _ = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:  # stop the job's whole process group (scheduler, worker) on a timeout
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    assert proc.returncode == 0, log[-6000:]
    assert "Scheduler at:     tls://127.0.0.1:" in log and "Registered to:      tls://127.0.0.1:" in log, log[-6000:]
    assert "2 cases found" in log and (out / "index.json").is_file()
    leftovers = sorted(p.name for p in out.iterdir() if p.name.startswith((".dask-tls", "dask-scheduler")))
    assert not leftovers, f"the job left {leftovers} in --out"
    # The job stopped its scheduler and worker: its process group empties (a nanny's worker process
    # may take a moment to exit after the nanny).
    deadline = time.monotonic() + 30
    while True:
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
        if time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail("processes of the SLURM recipe still ran 30 s after it ended")
        time.sleep(0.5)
