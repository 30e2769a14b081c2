"""Atomic file writes: a reader sees the old file or the new one, never half of one; and checksums of
what is written."""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import secrets
import socket
from pathlib import Path
from typing import BinaryIO, Iterator

import numpy as np


def partial_path(path: Path) -> Path:
    """A temporary sibling of `path` that no other writer uses.

    A fixed name such as `path.partial` breaks when two processes fill the same file at once (two
    runs building the dataset cache): one renames the other's file away mid-write and the second
    rename fails. With a name per writer, each renames its own complete file and the last one wins.
    """
    path = Path(path)
    return path.with_name(f"{path.name}.{_host_tag()}-{os.getpid()}-{secrets.token_hex(4)}.partial")


def _host_tag() -> str:
    # A process id means something on its own host only, and a cache folder may be shared (NFS).
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def remove_abandoned_partials(directory: Path) -> list[Path]:
    """Delete the temporary files of writers on this host that died mid-write (kill -9 leaves them);
    a live writer's stay, and so do other hosts' files. Returns the files removed."""
    removed, host = [], _host_tag()
    for path in sorted(Path(directory).glob("*.partial")):
        writer = re.fullmatch(r".+\.([0-9a-f]{8})-(\d+)-[0-9a-f]{8}\.partial", path.name)
        if writer and writer.group(1) == host and not _process_alive(int(writer.group(2))):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


@contextlib.contextmanager
def atomic_writer(path: Path) -> Iterator[BinaryIO]:
    """A binary file that replaces `path`, flushed to disk, once the block ends without an error."""
    path = Path(path)
    partial = partial_path(path)
    try:
        with open(partial, "xb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)


def atomic_write_bytes(path: Path, payload: bytes) -> None:
    with atomic_writer(path) as f:
        f.write(payload)


def _fsync_directory(directory: Path) -> None:
    # The rename is durable only once the directory entry itself reaches the disk.
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def arrays_checksum(arrays: dict[str, np.ndarray]) -> str:
    """sha256 over every array's name, dtype, shape and bytes, in name order: the same bytes in
    another layout or under another name do not match. A 0-d array hashes as shape (1,), which
    np.ascontiguousarray makes of it; portable files written that way must keep loading."""
    digest = hashlib.sha256()
    for key in sorted(arrays):
        value = np.ascontiguousarray(arrays[key])
        digest.update(f"{key}|{value.dtype.str}|{value.shape}|".encode())
        digest.update(value.reshape(-1).view(np.uint8).data)
    return digest.hexdigest()
