"""The Dask side of a build: a lazily started client (local cluster or an existing scheduler),
who may talk to that scheduler (TLS with mutual certificates), and the per-process thread pinning
of its workers. ``ctprep.runner`` maps stage tasks over it.

A Dask scheduler runs whatever code a connected client sends, so a scheduler reachable on a network
must be a ``tls://`` one: every endpoint then presents a certificate signed by the cluster's CA and
refuses peers that do not (docs/cluster-security.md; ``scripts/make_tls_certs.sh`` makes the files).
"""

from __future__ import annotations

import asyncio
import os
import ssl
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ctprep.errors import UserError

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


# How long the driver's first check tries to reach a scheduler (Dask retries a refused connection
# until then): an unreachable address fails in seconds, before any scanning. The client made after
# that check keeps Dask's usual 30 s.
CONNECT_TIMEOUT_S = 5.0
CLIENT_TIMEOUT_S = 30.0

# Environment variables the CLI reads for --tls-ca-file / --tls-cert / --tls-key (recipes set them).
TLS_ENV = {"ca_file": "CTPREP_TLS_CA_FILE", "cert": "CTPREP_TLS_CERT", "key": "CTPREP_TLS_KEY"}


@dataclass(frozen=True)
class TlsFiles:
    """The driver's TLS credentials for a ``tls://`` scheduler, PEM files.

    Args:
        ca_file: the cluster CA's certificate: the scheduler's and workers' certificates must chain to it.
        cert: this client's certificate, signed by the same CA (the scheduler refuses any other).
        key: its private key; None when it is concatenated into ``cert``.
    """

    ca_file: Path
    cert: Path
    key: Path | None = None

    def security(self):
        """A ``distributed.security.Security`` that requires encryption and presents ``cert``."""
        from distributed.security import Security

        return Security(tls_ca_file=str(self.ca_file), tls_client_cert=str(self.cert),
                        tls_client_key=str(self.key) if self.key else None, require_encryption=True)

    def dask_config(self) -> dict[str, Any]:
        """The same settings as Dask configuration keys (what ``Client`` reads when given no ``security``)."""
        return {"distributed.comm.tls.ca-file": str(self.ca_file),
                "distributed.comm.tls.client.cert": str(self.cert),
                "distributed.comm.tls.client.key": str(self.key) if self.key else None,
                "distributed.comm.require-encryption": True}


def scheduler_protocol(address: str) -> str:
    """``"tls"`` for ``tls://host:port``; Dask's default ``"tcp"`` for an address without a scheme."""
    scheme, sep, _ = address.partition("://")
    return scheme.lower() if sep else "tcp"


def tls_files(scheduler: str | None, ca_file: str | Path | None = None, cert: str | Path | None = None,
              key: str | Path | None = None) -> TlsFiles | None:
    """Check the scheduler address against the TLS options; the :class:`TlsFiles` to use, or None (no TLS).

    Raises:
        UserError: a ``tls://`` scheduler without a CA file and a certificate, certificates for a
            local cluster or a ``tcp://`` scheduler, a file that is missing or is not a PEM
            certificate / key.
    """
    given = {name: value for name, value in (("--tls-ca-file", ca_file), ("--tls-cert", cert), ("--tls-key", key))
             if value}
    if not scheduler:
        if given:
            raise UserError(f"{', '.join(given)} given without --scheduler: TLS is for a remote scheduler "
                            "(--scheduler tls://HOST:PORT); the local cluster listens on this machine only")
        return None
    protocol = scheduler_protocol(scheduler)
    if protocol != "tls":
        if given:
            raise UserError(f"{', '.join(given)} given but --scheduler {scheduler} is not a tls:// address; "
                            f"use tls://{scheduler.partition('://')[2] or scheduler}")
        return None
    missing = [name for name in ("--tls-ca-file", "--tls-cert") if name not in given]
    if missing:
        raise UserError(f"--scheduler {scheduler} needs {' and '.join(missing)} (and --tls-key): the scheduler "
                        "only accepts clients with a certificate from its CA; scripts/make_tls_certs.sh makes them")
    files = TlsFiles(Path(ca_file), Path(cert), Path(key) if key else None)
    for name, path in zip(("--tls-ca-file", "--tls-cert", "--tls-key"), (files.ca_file, files.cert, files.key)):
        if path is not None and not path.is_file():
            raise UserError(f"{name} {path}: " + ("not a file" if path.exists() else "no such file"))
    try:  # load them now: a wrong or unreadable file is named here, not deep inside Dask
        ctx = ssl.create_default_context(cafile=str(files.ca_file))
        ctx.load_cert_chain(str(files.cert), str(files.key) if files.key else None)
    except ssl.SSLError as e:
        named = f"--tls-ca-file {files.ca_file}, --tls-cert {files.cert}" + (f", --tls-key {files.key}" if files.key else "")
        raise UserError(f"{named}: not a PEM CA certificate, certificate and matching private key "
                        f"({e.reason or e})") from e
    except OSError as e:
        raise UserError(f"{e.filename or files.cert}: {e.strerror or e}") from e
    return files


@contextmanager
def tls_config(files: TlsFiles | None) -> Iterator[None]:
    """Within the block every Dask client made without ``security`` uses ``files`` (nothing if None).

    This is how a :class:`Cluster` made elsewhere (``ctprep.runner.build``) gets the CLI's TLS
    options: Dask's own configuration, the same keys a ``distributed.yaml`` would set.
    """
    if files is None:
        yield
        return
    import dask

    with dask.config.set(files.dask_config()):
        yield


def _root_cause(exc: BaseException) -> BaseException:
    seen = 0
    while (exc.__cause__ or exc.__context__) is not None and seen < 8:
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return exc


def describe_connect_error(address: str, exc: BaseException, timeout: float) -> str:
    """One line for a failed connection to ``address``: unreachable, refused TLS, or closed."""
    root = _root_cause(exc)
    if isinstance(root, ssl.SSLError) or "TLS" in str(exc) or "SSL" in str(exc):
        reason = getattr(root, "reason", None) or getattr(root, "verify_message", None) or str(root)
        if reason == "WRONG_VERSION_NUMBER":  # the peer answered the TLS hello in plain text
            return f"Dask scheduler {address} does not speak TLS (a tcp:// scheduler? its answer was not TLS)"
        return (f"Dask scheduler {address} refused the TLS connection ({reason}): --tls-ca-file, --tls-cert "
                "and --tls-key must come from the same CA as the scheduler's certificate")
    if isinstance(root, ConnectionResetError) or type(exc).__name__.endswith("CommClosedError"):
        hint = ("; it may require TLS: use tls:// with certificates" if scheduler_protocol(address) != "tls"
                else "")
        return f"Dask scheduler {address} closed the connection ({type(root).__name__}: {root}){hint}"
    cause = (root.strerror if isinstance(root, OSError) and root.strerror else str(root)) or type(root).__name__
    if isinstance(root, (asyncio.TimeoutError, TimeoutError)) and not str(root):
        cause = "no answer"
    return f"cannot reach the Dask scheduler {address} within {timeout:g} s ({cause}): is it running, is the address right?"


def check_scheduler(address: str, files: TlsFiles | None = None, timeout: float | None = None) -> None:
    """Open one connection to the scheduler (TLS handshake included) and close it.

    Fails within ``timeout`` seconds (default :data:`CONNECT_TIMEOUT_S`) with a one-line
    :class:`UserError` naming the address: called before anything is scanned or written.
    """
    from distributed.comm import connect
    from distributed.security import Security

    timeout = CONNECT_TIMEOUT_S if timeout is None else timeout
    security = files.security() if files else Security()
    try:
        args = security.get_connection_args("client")
    except (TypeError, ValueError) as e:  # pragma: no cover - tls_files() checked the files already
        raise UserError(f"--scheduler {address}: {e}") from e

    async def probe() -> None:
        comm = await connect(address, timeout=timeout, **args)
        await comm.close()

    try:
        asyncio.run(probe())
    except ValueError as e:  # malformed address
        raise UserError(f"--scheduler {address}: not a Dask address ({e}); expected tls://HOST:PORT") from e
    except (OSError, asyncio.TimeoutError, TimeoutError) as e:
        raise UserError(describe_connect_error(address, e, timeout)) from e


def dashboard_line(client) -> str:
    """One line with the Dask dashboard link (tasks, workers, memory while a build runs), and what it
    needs if that is missing (the dashboard's pages are drawn with bokeh)."""
    link = getattr(client, "dashboard_link", None) or "(no dashboard)"
    import importlib.util

    hint = "" if importlib.util.find_spec("bokeh") else (
        " (install bokeh>=3.1 in the scheduler's environment to see it: pip install 'bokeh>=3.1')")
    return f"Dask dashboard: {link}{hint}"


class Cluster:
    """Lazily started Dask client: nothing starts when there is no work.

    ``scheduler`` = address of an existing ``dask scheduler`` (its workers must
    have ``ctprep`` installed); otherwise a LocalCluster of ``workers``
    processes with one thread each. ``workers == 0`` runs tasks in process
    (no Dask; for debugging and small tests). ``security``: a
    ``distributed.security.Security`` (or :class:`TlsFiles`) for a ``tls://``
    scheduler; None = Dask's configuration (see :func:`tls_config`).
    """

    def __init__(self, scheduler: str | None = None, workers: int | None = None,
                 retries: int = 0, memory_limit: str | None = None, security: Any = None):
        self.scheduler = scheduler
        self.log: Callable[[str], None] | None = None  # where the dashboard link is reported once started
        self.security = security.security() if isinstance(security, TlsFiles) else security
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
                self.client = self._connect(Client)
            else:
                os.environ.update({k: os.environ.get(k, v) for k, v in THREAD_ENV.items()})
                self._cluster = LocalCluster(n_workers=self.workers, threads_per_worker=1, processes=True,
                                             memory_limit=self.memory_limit or "auto",
                                             dashboard_address=":0", env=dict(THREAD_ENV))
                self.client = Client(self._cluster)
            self.client.run(pin_threads)
            if self.log is not None:
                self.log(dashboard_line(self.client))
        return self.client

    def _connect(self, client_cls):
        from distributed.security import Security

        security = self.security or Security()  # Security() reads Dask's configuration
        if scheduler_protocol(self.scheduler) == "tls" and not (security.tls_ca_file and security.tls_client_cert):
            raise UserError(f"--scheduler {self.scheduler} needs --tls-ca-file and --tls-cert (and --tls-key): "
                            "the scheduler only accepts clients with a certificate from its CA")
        try:
            return client_cls(self.scheduler, timeout=f"{CLIENT_TIMEOUT_S}s", security=security)
        except (OSError, asyncio.TimeoutError, TimeoutError) as e:
            raise UserError(describe_connect_error(self.scheduler, e, CLIENT_TIMEOUT_S)) from e

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
