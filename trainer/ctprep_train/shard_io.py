"""Byte ranges of shard files wherever they live: a local path, an ``http(s)://`` URL, an ``s3://`` URL.

The trainer reads a shard by offset (``ctprep_train.data``): tar headers one by one, then each
member with one read of exactly its size, volumes straight into the batch tensor. This module
is that read for each kind of location, behind one small interface (:class:`ShardFile`:
``size``, ``pread``, ``readinto``), so the reader, its checksums (``ctprep.shards``) and its
equal-steps-per-rank schedule are the same code for every kind; only the bytes travel differently.

* Local paths: ``os.pread`` / ``os.preadv`` (no Python buffer, GIL released), as before.
* ``http://`` / ``https://``: HTTP Range requests (``Range: bytes=a-b`` -> ``206``) over
  keep-alive connections from one ``urllib3`` pool per process. Any static web server that
  honours Range serves a shard folder as it is (nginx, Apache, a CDN, S3 or GCS public
  endpoints); a server that answers ``200`` with the whole file is refused, since a 1 GB shard
  would be downloaded for every member.
* ``s3://bucket/prefix``: ``boto3`` ``get_object`` with ``Range``. boto3 rather than
  fsspec/s3fs: the reads are synchronous range GETs from DataLoader worker processes and
  reader threads; boto3 clients are thread-safe, a fresh one per forked process is cheap, and
  credentials, region and endpoint (``AWS_ENDPOINT_URL_S3`` for MinIO, Ceph, ...) come from the
  standard AWS configuration. s3fs adds an asyncio event loop per process (aiobotocore, with
  its own pinned botocore) that has to be rebuilt after every fork and gives nothing a range
  GET needs.

Transient failures (connection reset or refused, timeouts, a body cut short, HTTP 408/429/5xx,
S3 throttling) are retried with exponential backoff (:class:`RetryPolicy`), resuming a partly
read range where it stopped. What cannot be retried raises with the URL in the message:
``FileNotFoundError`` (404 / NoSuchKey), ``PermissionError`` (401/403), ``CorruptMemberError``
for a range beyond the object's end (the shard is shorter than when it was listed, as a short
local read), ``OSError`` otherwise; the loader then skips and counts the sample exactly as it
does for a local read error. Nothing here unpickles: bytes in, bytes out.

``urllib3`` and ``boto3`` are the ``remote`` extra (``pip install 'ctprep[remote]'``) and are
imported only when a URL of their kind is read.
"""

from __future__ import annotations

import os
import random
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable
from urllib.parse import quote, urlsplit

from ctprep import shards
from ctprep.schema import INDEX_FILE
from ctprep.shards import CorruptMemberError

__all__ = [
    "DEFAULT_RETRY", "REMOTE_SCHEMES", "SCAN_READAHEAD", "RetryPolicy", "ShardFile", "TransientReadError",
    "as_location", "is_remote", "join", "open_shard", "read_bytes", "read_index", "read_range", "read_range_into",
    "reset_connections",
]

REMOTE_SCHEMES = ("http", "https", "s3")
# Bytes fetched per request while a remote tar's headers are scanned: the headers of a sample's
# small members (meta, tokens, regions) and their data lie together, so one request covers
# them; the header after a large volume costs one request of its own.
SCAN_READAHEAD = 256 << 10


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently a transient failure of a remote read is retried."""

    attempts: int = 6  # tries of one read in all (the first included)
    backoff_s: float = 0.25  # wait before the second try; doubles after each failure (+-50% jitter)
    max_backoff_s: float = 10.0  # longest single wait
    connect_timeout_s: float = 10.0  # to open a connection
    read_timeout_s: float = 60.0  # without a byte arriving before the read counts as failed

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError(f"RetryPolicy.attempts must be >= 1, got {self.attempts}")


DEFAULT_RETRY = RetryPolicy()


class TransientReadError(ConnectionError):
    """A remote read that failed in a way worth retrying (raised after the last try)."""


def is_remote(location: str | os.PathLike[str]) -> bool:
    """True for ``http://``, ``https://`` and ``s3://`` locations (a local path otherwise)."""
    if not isinstance(location, str):
        return False
    scheme, sep, _ = location.partition("://")
    return bool(sep) and scheme.lower() in REMOTE_SCHEMES


def _check_scheme(location: str) -> None:
    scheme, sep, _ = location.partition("://")
    if sep and scheme.lower() not in REMOTE_SCHEMES:
        raise ValueError(f"{location}: unsupported scheme {scheme!r}; shards are read from a local path, "
                         f"or from {', '.join(s + '://' for s in REMOTE_SCHEMES)}")


def as_location(text: str) -> str | Path:
    """A shard folder given on a command line: a URL stays a string (``Path`` would fold its
    ``//``), anything else is a local ``Path``."""
    if is_remote(text):
        return text
    _check_scheme(text)
    return Path(text)


def join(root: str | os.PathLike[str], relative: str) -> str:
    """``root/relative`` for a shard folder: an absolute local path, or a URL below ``root``."""
    if not is_remote(root):
        _check_scheme(str(root))
        return str((Path(root) / relative).resolve())
    if relative.startswith("/") or ".." in relative.split("/"):
        raise ValueError(f"{relative!r}: a shard path in index.json must stay below {root}")
    return root.rstrip("/") + "/" + quote(relative, safe="/")


# --------------------------------------------------------------------------- the interface


class ShardFile:
    """One shard (or ``index.json``) opened for reads by offset.

    ``pread`` returns exactly ``n`` bytes or raises: a read past the end of the file is a
    ``CorruptMemberError`` (the shard is shorter than its tar headers or the index say).
    """

    location: str

    @property
    def size(self) -> int:
        raise NotImplementedError

    def pread(self, offset: int, n: int) -> bytes:
        buf = bytearray(n)
        self.readinto(offset, memoryview(buf))
        return bytes(buf)

    def readinto(self, offset: int, target: memoryview) -> None:
        """Fill ``target`` with the bytes at ``offset``.. (exactly ``len(target)`` of them)."""
        raise NotImplementedError

    def read_all(self) -> bytes:
        return self.pread(0, self.size)

    def close(self) -> None:
        pass

    def __enter__(self) -> ShardFile:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class LocalFile(ShardFile):
    def __init__(self, path: str | os.PathLike[str]):
        self.location = str(path)
        self._fd = os.open(self.location, os.O_RDONLY)

    @property
    def size(self) -> int:
        return os.fstat(self._fd).st_size

    def pread(self, offset: int, n: int) -> bytes:
        data = os.pread(self._fd, n, offset)
        while len(data) < n:  # pread may return short on some filesystems
            more = os.pread(self._fd, n - len(data), offset + len(data))
            if not more:
                raise CorruptMemberError(f"{self.location}: short read at {offset}")
            data += more
        return data

    def readinto(self, offset: int, target: memoryview) -> None:
        done = 0
        while done < len(target):  # preadv: straight into target, no Python buffer, GIL released
            n = os.preadv(self._fd, [target[done:]], offset + done)
            if n <= 0:
                raise CorruptMemberError(f"{self.location}: short read at {offset + done}")
            done += n

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class _RemoteFile(ShardFile):
    """Shared by the HTTP and S3 readers: retries, the resumable range read, the scan read-ahead."""

    def __init__(self, location: str, retry: RetryPolicy, readahead: int):
        self.location, self.retry, self.readahead = location, retry, readahead
        self._size: int | None = None
        self._block: tuple[int, bytes] = (0, b"")  # read-ahead: (offset, bytes) of the last block

    # Each transport: the object's size, and one attempt at reading a range into target that
    # adds every byte it puts there to progress[0] (so a retry asks only for the rest).
    def _stat(self) -> int:
        raise NotImplementedError

    def _read_once(self, offset: int, target: memoryview, progress: list[int]) -> None:
        raise NotImplementedError

    @property
    def size(self) -> int:
        if self._size is None:
            self._size = _with_retries(self.location, self.retry, self._stat)
        return self._size

    def readinto(self, offset: int, target: memoryview) -> None:
        if len(target) == 0:
            return
        progress = [0]  # bytes already in target: a retry asks only for the rest

        def attempt() -> None:
            done = progress[0]
            self._read_once(offset + done, target[done:], progress)

        _with_retries(self.location, self.retry, attempt)

    def pread(self, offset: int, n: int) -> bytes:
        if not self.readahead or n > self.readahead:
            return super().pread(offset, n)
        start, block = self._block
        if not (start <= offset and offset + n <= start + len(block)):
            length = max(n, min(self.readahead, self.size - offset))
            start, block = offset, super().pread(offset, length)
            self._block = (start, block)
        return block[offset - start : offset - start + n]


def _with_retries(location: str, retry: RetryPolicy, attempt: Callable[[], Any]) -> Any:
    for k in range(retry.attempts):
        try:
            return attempt()
        except TransientReadError as exc:
            last = exc
            if k + 1 < retry.attempts:
                wait = min(retry.max_backoff_s, retry.backoff_s * 2**k) * random.uniform(0.5, 1.5)
                time.sleep(wait)
    raise TransientReadError(f"{location}: read failed {retry.attempts} times; last: {last}") from last


def _short(location: str, offset: int, wanted: int, got: int, size: int | None) -> CorruptMemberError:
    total = "" if size is None else f" of an object of {size} bytes"
    return CorruptMemberError(f"{location}: short read at {offset}: {got} of {wanted} bytes{total} "
                              "(shard truncated or replaced since it was listed?)")


# --------------------------------------------------------------------------- HTTP(S)

_TRANSIENT_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})


class HTTPFile(_RemoteFile):
    """A shard behind a web server that honours Range requests."""

    def _request(self, method: str, headers: dict[str, str]):
        import urllib3

        pool = _http_pool(self.retry)
        try:
            # Redirects are followed (a CDN or presigned URL); everything else is retried here.
            response = pool.request(method, self.location, headers=headers, preload_content=False,
                                    decode_content=False, retries=urllib3.Retry(total=None, connect=0, read=0,
                                    status=0, other=0, redirect=5, raise_on_redirect=True))
        except urllib3.exceptions.MaxRetryError as exc:
            if isinstance(exc.reason, urllib3.exceptions.ResponseError):  # too many redirects
                raise OSError(f"{self.location}: {exc.reason}") from exc
            if isinstance(exc.reason, urllib3.exceptions.SSLError):  # an untrusted certificate stays untrusted
                raise OSError(f"{self.location}: TLS: {exc.reason} (a private CA: point SSL_CERT_FILE at it)") from exc
            raise TransientReadError(f"{self.location}: {type(exc.reason).__name__}: {exc.reason}") from exc
        except urllib3.exceptions.HTTPError as exc:
            raise TransientReadError(f"{self.location}: {type(exc).__name__}: {exc}") from exc
        status = response.status
        if status in (200, 206):
            return response
        body = response.read(2048)
        response.release_conn()
        reason = f"HTTP {status} {response.reason or ''}".strip()
        if status in _TRANSIENT_STATUS or status >= 500:
            raise TransientReadError(f"{self.location}: {reason}")
        if status == 404 or status == 410:
            raise FileNotFoundError(f"{self.location}: not found on the server ({reason})")
        if status in (401, 403):
            raise PermissionError(f"{self.location}: access refused ({reason})")
        if status == 416:
            raise CorruptMemberError(f"{self.location}: range not satisfiable ({reason}, "
                                     f"{response.headers.get('Content-Range', '')}): the shard is shorter than listed")
        raise OSError(f"{self.location}: {reason}: {body[:200]!r}")

    def _stat(self) -> int:
        response = self._request("HEAD", {"Accept-Encoding": "identity"})
        response.release_conn()
        length = response.headers.get("Content-Length")
        if length is not None:
            return int(length)
        response = self._request("GET", {"Range": "bytes=0-0", "Accept-Encoding": "identity"})
        total = response.headers.get("Content-Range", "").rpartition("/")[2]
        response.release_conn()
        if not total.isdigit():
            raise OSError(f"{self.location}: the server reports no size (no Content-Length nor Content-Range)")
        return int(total)

    def _read_once(self, offset: int, target: memoryview, progress: list[int]) -> None:
        import urllib3

        n = len(target)
        response = self._request("GET", {"Range": f"bytes={offset}-{offset + n - 1}", "Accept-Encoding": "identity"})
        try:
            if response.status != 206:
                raise OSError(f"{self.location}: the server answered a Range request with HTTP {response.status} "
                              "(the whole file); serve the shards from a server that honours Range requests "
                              "(nginx, Apache, S3, ...)")
            first, _, rest = response.headers.get("Content-Range", "").removeprefix("bytes ").partition("-")
            end, _, total = rest.partition("/")
            if not first.isdigit() or int(first) != offset or not end.isdigit():
                raise OSError(f"{self.location}: bad Content-Range {response.headers.get('Content-Range')!r} "
                              f"for bytes {offset}-{offset + n - 1}")
            expected = int(end) - offset + 1
            if expected < n:  # the object ends before the range: truncated since it was listed
                raise _short(self.location, offset, n, expected, int(total) if total.isdigit() else None)
            done = 0
            while done < n:
                try:
                    got = response.readinto(target[done:])
                except (urllib3.exceptions.HTTPError, OSError) as exc:
                    raise TransientReadError(f"{self.location}: {type(exc).__name__} after {done} of {n} bytes: "
                                             f"{exc}") from exc
                if not got:
                    raise TransientReadError(f"{self.location}: the response ended after {done} of {n} bytes")
                done += got
                progress[0] += got
        except BaseException:
            response.close()  # never hand a half-read connection back to the pool
            raise
        response.release_conn()


_POOLS: dict[str, Any] = {}  # per process (cleared in forked children): the urllib3 pool, the S3 client
_POOLS_LOCK = threading.Lock()


def _http_pool(retry: RetryPolicy):
    import urllib3

    pool = _POOLS.get("http")
    if pool is None:
        with _POOLS_LOCK:
            pool = _POOLS.get("http")
            if pool is None:
                # maxsize: one keep-alive connection per concurrent reader thread (data.read_threads).
                pool = urllib3.PoolManager(num_pools=16, maxsize=16, block=False, timeout=urllib3.Timeout(
                    connect=retry.connect_timeout_s, read=retry.read_timeout_s))
                _POOLS["http"] = pool
    return pool


def reset_connections() -> None:
    """Forget this process's connections (done in every forked child: a socket must not be
    shared with the parent); the next read opens new ones."""
    _POOLS.clear()


os.register_at_fork(after_in_child=reset_connections)


# --------------------------------------------------------------------------- S3


class S3File(_RemoteFile):
    """An object in S3 or an S3-compatible store (endpoint from the standard AWS configuration)."""

    def __init__(self, location: str, retry: RetryPolicy, readahead: int):
        super().__init__(location, retry, readahead)
        parts = urlsplit(location)
        self.bucket, self.key = parts.netloc, parts.path.lstrip("/")
        if not self.bucket or not self.key:
            raise ValueError(f"{location}: an S3 location is s3://BUCKET/KEY")

    def _call(self, fn: Callable[[], Any]) -> Any:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn()
        except ClientError as exc:
            error = exc.response.get("Error", {})
            code = str(error.get("Code", ""))
            status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
            reason = f"{code or 'error'} (HTTP {status}): {error.get('Message', '')}".strip()
            if code in ("NoSuchKey", "NoSuchBucket", "NotFound", "404") or status == 404:
                raise FileNotFoundError(f"{self.location}: not found ({reason})") from None
            if code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch") or status in (401, 403):
                raise PermissionError(f"{self.location}: access refused ({reason})") from None
            if code == "InvalidRange" or status == 416:
                raise CorruptMemberError(f"{self.location}: range not satisfiable ({reason}): "
                                         "the shard is shorter than listed") from None
            if status in _TRANSIENT_STATUS or status >= 500 or code in ("SlowDown", "Throttling", "RequestTimeout"):
                raise TransientReadError(f"{self.location}: {reason}") from exc
            raise OSError(f"{self.location}: {reason}") from None
        except BotoCoreError as exc:  # connection errors, timeouts, a body cut short
            from botocore.exceptions import NoCredentialsError, ParamValidationError

            if isinstance(exc, (NoCredentialsError, ParamValidationError)):
                raise OSError(f"{self.location}: {exc}") from exc
            raise TransientReadError(f"{self.location}: {type(exc).__name__}: {exc}") from exc

    def _stat(self) -> int:
        client = _s3_client(self.retry)
        head = self._call(lambda: client.head_object(Bucket=self.bucket, Key=self.key))
        return int(head["ContentLength"])

    def _read_once(self, offset: int, target: memoryview, progress: list[int]) -> None:
        client = _s3_client(self.retry)
        n = len(target)
        response = self._call(lambda: client.get_object(Bucket=self.bucket, Key=self.key,
                                                        Range=f"bytes={offset}-{offset + n - 1}"))
        body = response["Body"]
        try:
            length = int(response.get("ContentLength", n))
            if length < n:
                total = str(response.get("ContentRange", "")).rpartition("/")[2]
                raise _short(self.location, offset, n, length, int(total) if total.isdigit() else None)
            done = 0
            while done < n:
                got = self._call(lambda: body.readinto(target[done:]))
                if not got:
                    raise TransientReadError(f"{self.location}: the response ended after {done} of {n} bytes")
                done += got
                progress[0] += got
        finally:
            body.close()

    def read_all(self) -> bytes:
        client = _s3_client(self.retry)

        def attempt() -> bytes:
            response = self._call(lambda: client.get_object(Bucket=self.bucket, Key=self.key))
            with response["Body"] as body:
                return self._call(body.read)

        return _with_retries(self.location, self.retry, attempt)


def _s3_client(retry: RetryPolicy):
    client = _POOLS.get("s3")
    if client is None:
        with _POOLS_LOCK:  # creating a boto3 client is not thread-safe; using one is
            client = _POOLS.get("s3")
            if client is None:
                import boto3
                from botocore.config import Config

                # botocore retries a failed request itself (standard mode); _with_retries adds
                # the resumption of a body cut short, which botocore does not retry.
                config = Config(retries={"max_attempts": 3, "mode": "standard"}, max_pool_connections=16,
                                connect_timeout=retry.connect_timeout_s, read_timeout=retry.read_timeout_s)
                client = boto3.session.Session().client("s3", config=config)
                _POOLS["s3"] = client
    return client


# --------------------------------------------------------------------------- entry points


def open_shard(location: str | os.PathLike[str], retry: RetryPolicy = DEFAULT_RETRY, readahead: int = 0) -> ShardFile:
    """Open a shard for reads by offset (a local file descriptor, or nothing yet for a URL).

    Args:
        readahead: for a remote shard, serve reads of up to this many bytes from blocks of
            this size (a tar header scan: :data:`SCAN_READAHEAD`); 0 = one request per read.
    """
    location = os.fspath(location)
    if not is_remote(location):
        _check_scheme(location)
        return LocalFile(location)
    scheme = location.partition("://")[0].lower()
    try:
        if scheme == "s3":
            import boto3  # noqa: F401
        else:
            import urllib3  # noqa: F401
    except ImportError as exc:
        raise ImportError(f"{location}: reading shards from {scheme}:// needs {exc.name}; "
                          "pip install 'ctprep[remote]'") from exc
    cls = S3File if scheme == "s3" else HTTPFile
    return cls(location, retry, readahead)


def read_range(location: str, offset: int, size: int) -> bytes:
    """Exactly ``size`` bytes of ``location`` from ``offset`` (``CorruptMemberError`` if it ends first)."""
    with open_shard(location) as f:
        return f.pread(offset, size)


def read_range_into(location: str, offset: int, target: memoryview) -> None:
    """Fill ``target`` with ``location``'s bytes from ``offset`` (straight into it, no copy for a local file)."""
    with open_shard(location) as f:
        f.readinto(offset, target)


def read_bytes(location: str | os.PathLike[str]) -> bytes:
    """A whole (small) file: ``index.json``."""
    with open_shard(location) as f:
        if isinstance(f, HTTPFile):  # one plain GET: no HEAD, no Range needed
            return _with_retries(f.location, f.retry, lambda: _http_get_all(f))
        return f.read_all()


def _http_get_all(f: HTTPFile) -> bytes:
    import urllib3

    response = f._request("GET", {"Accept-Encoding": "identity"})
    try:
        return response.read()
    except (urllib3.exceptions.HTTPError, OSError) as exc:
        response.close()
        raise TransientReadError(f"{f.location}: {type(exc).__name__}: {exc}") from exc
    finally:
        response.release_conn()


def read_index(root: str | os.PathLike[str], schema_version: int) -> dict[str, Any]:
    """``root/index.json`` (a local folder or a URL), refused unless it is of ``schema_version``.

    A local folder goes through ``ctprep.shards.read_index``; a URL gets the same checks
    (a JSON object of the expected schema version) on the downloaded bytes.
    """
    if not is_remote(root):
        return shards.read_index(root, schema_version)
    where = join(root, INDEX_FILE)
    try:
        raw = read_bytes(where)
    except FileNotFoundError:
        raise FileNotFoundError(f"{where}: no shard index; is {root} a `ctprep build-shards` output folder "
                                "(uploaded with its index.json)?") from None
    return shards.parse_index(raw, where, schema_version)

