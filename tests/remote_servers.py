"""Real servers on 127.0.0.1 for the remote-shard tests: a static web server and an S3 server.

* :func:`serve_http`: uvicorn (a production ASGI server) running Starlette's ``StaticFiles``,
  which answers Range requests with ``206`` / ``Content-Range`` as nginx does, over keep-alive
  connections. :class:`Faults` sits in front of it and, when told to, answers the next
  requests with an error status or cuts a response body short (the connection is closed
  mid-body), so the client's retries are tested against a real socket, not a mock.
* :func:`serve_http_process`: the same server in a process of its own, for the loader
  benchmark (bench/loader.py ``--remote``).
* :func:`serve_nginx`: nginx, when installed, for the same benchmark.
* :func:`serve_plain_http`: the standard library's ``http.server``, which ignores ``Range``
  (answers ``200`` with the whole file): the server the reader must refuse.
* :func:`serve_s3`: moto's S3 server (``ThreadedMotoServer``), an S3-compatible HTTP endpoint;
  a folder is uploaded to a bucket with boto3 and the AWS variables point at the endpoint.

Each runs in a thread of the test process and binds port 0 (a free port); nothing leaves the
machine.
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Faults:
    """Errors the web server injects into the next matching GET requests (thread-safe).

    ``requests`` records (path, Range header) of every request served, faulty or not.
    """

    status: list[int] = field(default_factory=list)  # answer the next GETs with these statuses, in turn
    cut_after: list[int] = field(default_factory=list)  # close the next GETs' connections after this many body bytes
    path_suffix: str = ""  # only requests whose path ends with this
    requests: list[tuple[str, str | None]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def take(self, path: str) -> tuple[int | None, int | None]:
        with self.lock:
            if not path.endswith(self.path_suffix):
                return None, None
            if self.status:
                return self.status.pop(0), None
            if self.cut_after:
                return None, self.cut_after.pop(0)
            return None, None


class _CutConnection(Exception):
    """Raised inside the ASGI app: uvicorn then closes the connection mid-response."""


def _faulty(app, faults: Faults):
    async def wrapped(scope, receive, send):
        if scope["type"] != "http":
            return await app(scope, receive, send)
        headers = dict(scope.get("headers", []))
        rng = headers.get(b"range")
        with faults.lock:
            faults.requests.append((scope["path"], rng.decode() if rng else None))
        status, cut = faults.take(scope["path"]) if scope["method"] == "GET" else (None, None)
        if status is not None:
            await send({"type": "http.response.start", "status": status,
                        "headers": [(b"content-type", b"text/plain"), (b"content-length", b"8")]})
            await send({"type": "http.response.body", "body": b"injected"})
            return
        if cut is None:
            return await app(scope, receive, send)
        sent = 0

        async def cutting_send(message):
            nonlocal sent
            if message["type"] == "http.response.body":
                body = message.get("body", b"")
                if sent + len(body) > cut:
                    await send({"type": "http.response.body", "body": body[: cut - sent], "more_body": True})
                    raise _CutConnection()
                sent += len(body)
            await send(message)

        try:
            await app(scope, receive, cutting_send)
        except _CutConnection:
            raise  # uvicorn logs it and drops the connection: the client sees a short body

    return wrapped


@dataclass
class HTTPServer:
    url: str  # http://127.0.0.1:PORT (the served folder is the root)
    faults: Faults


def static_app(root: Path):
    """The ASGI app serving the files below ``root`` (Range requests answered with 206)."""
    from starlette.applications import Starlette
    from starlette.routing import Mount
    from starlette.staticfiles import StaticFiles

    # Mounted in an app so that a missing file is a 404 (a bare StaticFiles raises it as a 500).
    return Starlette(routes=[Mount("/", app=StaticFiles(directory=str(root)))])


@contextlib.contextmanager
def serve_http(root: Path, tls: tuple[Path, Path] | None = None) -> Iterator[HTTPServer]:
    """Serve ``root`` over HTTP with Range support, in a thread, until the block exits.

    Args:
        tls: (certificate, key) PEM files: serve HTTPS instead.
    """
    import uvicorn

    faults = Faults()
    port = _free_port()
    certfile, keyfile = (str(tls[0]), str(tls[1])) if tls else (None, None)
    config = uvicorn.Config(_faulty(static_app(root), faults), host="127.0.0.1", port=port,
                            log_level="critical", access_log=False, lifespan="off", timeout_keep_alive=30,
                            ssl_certfile=certfile, ssl_keyfile=keyfile)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="test-http-server", daemon=True)
    thread.start()
    try:
        _wait_until_up(port, lambda: server.started)
        yield HTTPServer(f"{'https' if tls else 'http'}://127.0.0.1:{port}", faults)
    finally:
        # force_exit: do not wait for the client's idle keep-alive connections (a TLS one would
        # hold the shutdown for asyncio's 30 s close-notify timeout)
        server.should_exit = server.force_exit = True
        thread.join(timeout=30)


@contextlib.contextmanager
def serve_http_process(root: Path) -> Iterator[str]:
    """Serve ``root`` like :func:`serve_http` from a separate process (no faults); yields the base URL.

    For measurements: the server then does not share the measuring process's interpreter lock.
    """
    port = _free_port()
    repo = Path(__file__).resolve().parents[1]
    code = ("import sys, uvicorn; from tests.remote_servers import static_app; "
            "uvicorn.run(static_app(sys.argv[1]), host='127.0.0.1', port=int(sys.argv[2]), "
            "log_level='warning', access_log=False, lifespan='off')")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(repo), os.environ.get("PYTHONPATH")])))
    proc = subprocess.Popen([sys.executable, "-c", code, str(root), str(port)], cwd=repo, env=env)
    try:
        _wait_until_up(port, lambda: proc.poll() is None)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


NGINX_CONF = """
worker_processes 2;
daemon off;
user {user};
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 256; }}
http {{
    access_log off;
    sendfile on;
    keepalive_requests 100000;
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    server {{
        listen 127.0.0.1:{port};
        root {root};
        location / {{ }}
    }}
}}
"""


@contextlib.contextmanager
def serve_nginx(root: Path) -> Iterator[str]:
    """Serve ``root`` with nginx (Debian's ``nginx-light``: ``apt-get install nginx-light``) from a
    throw-away configuration; yields the base URL. For the loader benchmark: the web server a
    cluster would use, fast enough that the client is what is measured."""
    import getpass
    import shutil
    import tempfile

    binary = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    if binary is None:
        raise FileNotFoundError("nginx is not installed (Debian: apt-get install nginx-light)")
    port = _free_port()
    with tempfile.TemporaryDirectory(prefix="nginx-") as prefix:
        conf = Path(prefix) / "nginx.conf"
        # user: the workers must read the files this user wrote (root would otherwise switch to nobody)
        conf.write_text(NGINX_CONF.format(user=getpass.getuser(), prefix=prefix, port=port, root=Path(root).resolve()))
        proc = subprocess.Popen([binary, "-p", prefix, "-c", str(conf), "-e", f"{prefix}/error.log"])
        try:
            _wait_until_up(port, lambda: proc.poll() is None)
            yield f"http://127.0.0.1:{port}"
        finally:
            proc.terminate()  # SIGTERM: fast shutdown of the master and its workers
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@contextlib.contextmanager
def serve_plain_http(root: Path) -> Iterator[str]:
    """Serve ``root`` with the standard library's server (no Range support); yields the base URL."""
    handler = functools.partial(_QuietHandler, directory=str(root))
    server = _QuietServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, name="test-plain-http", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=30)


class _QuietServer(http.server.ThreadingHTTPServer):
    def handle_error(self, request, client_address):  # the client hangs up on a 200: expected
        pass


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - the base class's name
        pass


def self_signed_certificate(folder: Path) -> tuple[Path, Path]:
    """(certificate, key) for 127.0.0.1, valid one day, made with the ``openssl`` command."""
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                    "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True)
    return cert, key


@dataclass
class S3Server:
    endpoint: str  # http://127.0.0.1:PORT
    env: dict[str, str]  # AWS variables that point boto3 (and the trainer's subprocesses) at it

    def upload(self, folder: Path, bucket: str, prefix: str) -> str:
        """Put every file below ``folder`` at ``s3://bucket/prefix/<relative path>``; returns that URL."""
        import boto3

        client = boto3.client("s3", endpoint_url=self.endpoint, region_name=self.env["AWS_DEFAULT_REGION"],
                              aws_access_key_id=self.env["AWS_ACCESS_KEY_ID"],
                              aws_secret_access_key=self.env["AWS_SECRET_ACCESS_KEY"])
        with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
            client.create_bucket(Bucket=bucket)
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                client.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(folder).as_posix()}")
        return f"s3://{bucket}/{prefix}"


@contextlib.contextmanager
def serve_s3() -> Iterator[S3Server]:
    """moto's S3 server on a free port, with the AWS variables set in ``os.environ`` while it runs."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    env = {"AWS_ENDPOINT_URL_S3": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in (*env, "AWS_ENDPOINT_URL", "AWS_PROFILE", "AWS_SESSION_TOKEN")}
    os.environ.update(env)
    for k in ("AWS_ENDPOINT_URL", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
        os.environ.pop(k, None)
    try:
        _wait_until_up(port, lambda: True)
        yield S3Server(endpoint, env)
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _wait_until_up(port: int, started, tries: int = 600) -> None:
    """Poll until the port accepts connections (bounded: ``tries`` x 50 ms)."""
    for _ in range(tries):
        if started():
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        time.sleep(0.05)
    raise RuntimeError(f"test server on port {port} did not start")
