"""Training checkpoints as self-checking files, the same container for both frameworks.

A file is a magic line, a line `sha256 <hex>` of everything after it, one JSON header line
(framework, epoch, run metadata) and the framework's payload bytes. The checksum covers the header
too, so no altered byte anywhere can load silently: a truncated or damaged file is reported and the
previous checkpoint is used instead; the newest two are kept.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

from expert_core.files import atomic_write_bytes

MAGIC = b"EXPERT-CNN-CHECKPOINT 2\n"
_CHECKSUM_LINE = len(b"sha256 ") + 64 + 1
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
    body = json.dumps({**header, "epoch": epoch}).encode() + b"\n" + payload
    path = checkpoint_path(run_dir, epoch)
    atomic_write_bytes(path, MAGIC + b"sha256 " + hashlib.sha256(body).hexdigest().encode() + b"\n" + body)
    # Only those before it: a run that found no usable checkpoint starts again beside its damaged later
    # ones, and pruning by name alone would delete each new checkpoint as soon as it was written.
    older = [p for p in list_checkpoints(run_dir) if p.name < path.name]
    for old in older[:len(older) - (KEEP - 1)]:
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
        raise CheckpointError(f"{path}: expected a readable checkpoint, found {error}; fix its permissions, "
                              "or move it away to resume from the checkpoint before it.") from error
    if not blob.startswith(MAGIC):
        raise CheckpointError(f"{path}: expected a file starting with {MAGIC!r}, found {blob[:24]!r}. "
                              "It is not an expert-cnn checkpoint of this format, or its start is damaged: move it "
                              "away to resume from the checkpoint before it.")
    checksum_line, body = blob[len(MAGIC):len(MAGIC) + _CHECKSUM_LINE], blob[len(MAGIC) + _CHECKSUM_LINE:]
    found = hashlib.sha256(body).hexdigest().encode()
    if checksum_line != b"sha256 " + found + b"\n":
        raise CheckpointError(f"{path}: expected its contents to match the recorded checksum "
                              f"{checksum_line[7:19]!r}..., found sha256 {found[:12].decode()}... over "
                              f"{len(body)} bytes: the file is truncated or corrupt. Use the previous "
                              "checkpoint (resume does so) or start again.")
    header_line, _, payload = body.partition(b"\n")
    try:
        header = json.loads(header_line)
    except (json.JSONDecodeError, UnicodeDecodeError):
        header = None
    if not isinstance(header, dict) or not isinstance(header.get("epoch"), int):
        raise CheckpointError(f"{path}: expected a JSON header with an epoch, found {header_line[:60]!r}; "
                              "the file was not written by this project's checkpoint writer. Move it away to resume "
                              "from the checkpoint before it.")
    return Checkpoint(path, header, payload)


def latest_checkpoint(run_dir: Path) -> Checkpoint | None:
    """The newest checkpoint that passes its checks; damaged newer ones are reported and skipped."""
    for path in reversed(list_checkpoints(run_dir)):
        try:
            return read_checkpoint(path)
        except CheckpointError as error:
            warnings.warn(str(error), stacklevel=2)
    return None
