"""Training checkpoints as self-checking files, the same container for both frameworks.

A file is a magic line, one JSON header line (framework, epoch, run metadata, payload size and
sha256) and the framework's payload bytes. A truncated or altered file fails its checksum and is
reported, and the previous checkpoint is used instead; the newest two are kept.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

from expert_core.files import atomic_write_bytes

MAGIC = b"EXPERT-CNN-CHECKPOINT 1\n"
KEEP = 2


class CheckpointError(Exception):
    """A checkpoint that cannot be used; the message says which file and why."""


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    header: dict
    payload: bytes


def checkpoint_path(run_dir: Path, epoch: int) -> Path:
    return Path(run_dir) / f"checkpoint-{epoch:05d}.ckpt"


def write_checkpoint(run_dir: Path, epoch: int, header: dict, payload: bytes) -> Path:
    header = {**header, "epoch": epoch, "payload_bytes": len(payload),
              "payload_sha256": hashlib.sha256(payload).hexdigest()}
    path = checkpoint_path(run_dir, epoch)
    atomic_write_bytes(path, MAGIC + json.dumps(header).encode() + b"\n" + payload)
    for old in list_checkpoints(run_dir)[:-KEEP]:
        old.unlink()
    return path


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoint files, oldest first."""
    return sorted(Path(run_dir).glob("checkpoint-*.ckpt"))


def read_checkpoint(path: Path) -> Checkpoint:
    path = Path(path)
    try:
        blob = path.read_bytes()
    except OSError as error:
        raise CheckpointError(f"{path}: cannot read it ({error}).") from error
    if not blob.startswith(MAGIC):
        raise CheckpointError(f"{path}: expected a file starting with {MAGIC!r}, found {blob[:24]!r}. "
                              "It is not an expert-cnn checkpoint, or its start is damaged.")
    header_end = blob.find(b"\n", len(MAGIC))
    try:
        header = json.loads(blob[len(MAGIC):header_end]) if header_end > 0 else None
    except (json.JSONDecodeError, UnicodeDecodeError):
        header = None
    if not isinstance(header, dict) or "payload_sha256" not in header:
        raise CheckpointError(f"{path}: expected a JSON header line after the magic line, found damaged "
                              "bytes. Use the previous checkpoint or start again.")
    payload = blob[header_end + 1:]
    if len(payload) != header.get("payload_bytes") or \
            hashlib.sha256(payload).hexdigest() != header["payload_sha256"]:
        raise CheckpointError(f"{path}: expected {header.get('payload_bytes')} payload bytes with sha256 "
                              f"{header['payload_sha256'][:12]}..., found {len(payload)} bytes that do not "
                              "match: the file is truncated or corrupt. The previous checkpoint is used instead.")
    return Checkpoint(path, header, payload)


def latest_checkpoint(run_dir: Path) -> Checkpoint | None:
    """The newest checkpoint that passes its checks; damaged newer ones are reported and skipped."""
    for path in reversed(list_checkpoints(run_dir)):
        try:
            return read_checkpoint(path)
        except CheckpointError as error:
            warnings.warn(str(error), stacklevel=2)
    return None
