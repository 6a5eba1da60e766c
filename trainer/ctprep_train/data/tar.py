"""WebDataset tars read by offset: headers only to list samples, then one ``pread`` per read.

``scan_tar`` walks a tar file's 512-byte headers (seek + small read per member, the data is not
touched) and returns ``SampleRef``s: the sample key plus (offset, size) of each member. Member
data is later read with one ``pread`` of exactly its size (``read_member``) or one ``preadv``
straight into a batch buffer (``pread_into``). Stock WebDataset streams through ``tarfile``
with small reads and reached ~11% of ``cat`` speed on 100 MB members; reading by offset keeps
the WebDataset tar format and runs at raw-read speed.

``path`` is a local path or an ``http(s)://`` / ``s3://`` URL: the reads go through
``ctprep_train.shard_io`` (Range requests for a URL), so the same bytes reach the same checks.
"""

from __future__ import annotations

from dataclasses import dataclass

from ctprep_train import shard_io

TAR_BLOCK = 512


@dataclass(frozen=True)
class SampleRef:
    shard: str
    key: str
    members: tuple[tuple[str, int, int], ...]  # (member name without key, data offset, size)


def _tar_int(field_bytes: bytes) -> int:
    if field_bytes and field_bytes[0] & 0x80:  # GNU base-256 for sizes >= 8 GiB
        value = int.from_bytes(field_bytes[1:], "big")
        return value
    text = field_bytes.split(b"\0", 1)[0].strip()
    return int(text, 8) if text else 0


def _tar_checksum_ok(header: bytes) -> bool:
    stored = _tar_int(header[148:156])
    unsigned = sum(header[:148]) + 8 * 32 + sum(header[156:])
    return stored == unsigned


def _pax_path(data: bytes) -> str | None:
    # records: "<len> key=value\n"
    pos = 0
    path = None
    while pos < len(data):
        space = data.index(b" ", pos)
        length = int(data[pos:space])
        record = data[space + 1 : pos + length - 1]
        key, _, value = record.partition(b"=")
        if key == b"path":
            path = value.decode("utf-8")
        pos += length
    return path


def scan_tar(path: str) -> tuple[list[SampleRef], str | None]:
    """List the samples of a WebDataset tar by reading headers only.

    Returns the samples found and, if the tar is damaged (bad header checksum, truncated
    member), a reason string; the samples before the damage are still returned.
    """
    refs: list[SampleRef] = []
    current_key: str | None = None
    members: list[tuple[str, int, int]] = []
    error: str | None = None
    long_name: str | None = None

    def flush() -> None:
        if current_key is not None and members:
            refs.append(SampleRef(path, current_key, tuple(members)))

    # A remote shard (http(s)://, s3://) serves the header reads from read-ahead blocks.
    shard = shard_io.open_shard(path, readahead=shard_io.SCAN_READAHEAD)
    try:
        file_size = shard.size
        pos = 0
        while pos + TAR_BLOCK <= file_size:
            header = shard.pread(pos, TAR_BLOCK)
            if header.count(0) == TAR_BLOCK:
                break  # end-of-archive marker
            if not _tar_checksum_ok(header):
                error = f"bad tar header checksum at byte {pos}"
                break
            size = _tar_int(header[124:136])
            kind = header[156:157]
            data_at = pos + TAR_BLOCK
            if data_at + size > file_size:
                error = f"truncated member at byte {pos} ({size} bytes declared, {file_size - data_at} left)"
                break
            pos = data_at + -(-size // TAR_BLOCK) * TAR_BLOCK
            if kind in (b"L", b"x"):  # GNU long name / pax extended header for the next member
                data = shard.pread(data_at, size)
                long_name = data.rstrip(b"\0").decode("utf-8") if kind == b"L" else _pax_path(data)
                continue
            if kind not in (b"0", b"\0", b"7"):
                long_name = None
                continue  # directories, global pax headers, links: not sample members
            name = long_name
            long_name = None
            if name is None:
                name = header[0:100].split(b"\0", 1)[0].decode("utf-8")
                prefix = header[345:500].split(b"\0", 1)[0].decode("utf-8") if header[257:262] == b"ustar" else ""
                if prefix:
                    name = f"{prefix}/{name}"
            directory, _, base = name.rpartition("/")
            if "." not in base:
                continue
            stem, member = base.split(".", 1)
            key = f"{directory}/{stem}" if directory else stem
            if key != current_key:
                flush()
                current_key, members = key, []
            members.append((member, data_at, size))
        flush()
    finally:
        shard.close()
    return refs, error


def read_member(path: str, offset: int, size: int) -> bytes:
    """One read of exactly ``size`` bytes at ``offset`` (the large-read path; one Range request remotely)."""
    return shard_io.read_range(path, offset, size)


def pread_into(path: str, offset: int, target: memoryview) -> None:
    """Fill ``target`` with the shard's bytes from ``offset`` (a local file: preadv, no Python buffer,
    GIL released)."""
    shard_io.read_range_into(path, offset, target)
