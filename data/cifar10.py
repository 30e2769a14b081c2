"""`load_cifar10`: CIFAR-10 from any supported source, decoded once and cached in one file.

Choosing the source, first match wins:
1. the `path` / `source` arguments;
2. the environment variables CIFAR10_PATH (a tarball, a batches directory or an image folder)
   and CIFAR10_SOURCE (`tarball`, `batches`, `imagefolder` or `tfds`);
3. the first of `cifar-10-python.tar.gz`, `cifar-10-batches-py/`, `cifar10-jpeg/` that exists in
   the data root (CIFAR10_ROOT, default ~/.cache/expert_cnn/data);
4. with `download=True`, the official archive fetched into the data root (unless another source was
   asked for).

The cache (EXPERT_CNN_CACHE, default ~/.cache/expert_cnn) is keyed by the source and stamped with
a fingerprint of it and a checksum of its own arrays: a stale or damaged cache is rebuilt, never trusted.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from expert_core.config import CLASS_NAMES
from expert_core.files import arrays_checksum, atomic_writer, remove_abandoned_partials
from data import sources
from data.errors import DataError

SOURCE_KINDS = ("tarball", "batches", "imagefolder", "tfds")
# Sources that hold the official pixels; an image folder holds whatever it was written as (JPEG here).
OFFICIAL_PIXELS = ("tarball", "batches", "tfds")
CACHE_FORMAT = 2  # 2: the checksum covers names, dtypes and shapes; the fingerprint, paths within the source
_ARRAYS = ("train_images", "train_labels", "test_images", "test_labels")


@dataclass(frozen=True)
class Cifar10:
    train_images: np.ndarray  # (50000, 32, 32, 3) uint8
    train_labels: np.ndarray  # (50000,) int64
    test_images: np.ndarray  # (10000, 32, 32, 3) uint8
    test_labels: np.ndarray  # (10000,) int64
    class_names: tuple[str, ...]
    source: str  # "<kind>:<path>", for logs and summaries


def default_data_root() -> Path:
    return Path(os.environ.get("CIFAR10_ROOT") or Path.home() / ".cache" / "expert_cnn" / "data")


def default_cache_dir() -> Path:
    return Path(os.environ.get("EXPERT_CNN_CACHE") or Path.home() / ".cache" / "expert_cnn")


def load_cifar10(path: str | Path | None = None, source: str | None = None,
                 cache_dir: str | Path | None = None, download: bool = False) -> Cifar10:
    kind, location = resolve_source(path, source, download)
    cache_file = Path(cache_dir or default_cache_dir()) / _cache_name(kind, location)
    fingerprint = _fingerprint(kind, location)
    arrays = _read_cache(cache_file, fingerprint)
    described = f"{kind}:{location or 'cifar10'}"  # tfds has no location
    if arrays is None:
        splits = _read_source(kind, location, download)
        sources.check_counts(splits, described)
        arrays = {"train_images": splits["train"][0], "train_labels": splits["train"][1],
                  "test_images": splits["test"][0], "test_labels": splits["test"][1]}
        _write_cache(cache_file, arrays, fingerprint)
    return Cifar10(**arrays, class_names=CLASS_NAMES, source=described)


def pixel_origin(source: str) -> str:
    """What a `Cifar10.source` ("kind:location") says of its pixels: "official", or its kind, whose
    pixels may differ from the official ones."""
    kind = source.split(":", 1)[0]
    return "official" if kind in OFFICIAL_PIXELS else kind


def resolve_source(path, source, download) -> tuple[str, Path | None]:
    # An explicit path argument outranks both environment variables; an empty variable counts as unset.
    source = source or (None if path else os.environ.get("CIFAR10_SOURCE")) or None
    if source is not None and source not in SOURCE_KINDS:
        raise DataError(f"source={source!r}", f"one of {SOURCE_KINDS}", repr(source), "Pick a supported source.")
    if source == "tfds":
        return "tfds", None
    path = path or os.environ.get("CIFAR10_PATH") or None
    if path is not None:
        path = Path(path).expanduser()
        if not path.exists():
            raise DataError(path, "a CIFAR-10 archive, batches directory or image folder", "nothing there",
                            "Fix the path (--data or CIFAR10_PATH), or unset both and pass --download to fetch the "
                            "official archive.")
        return _detect_kind(path, source), path
    root = default_data_root()
    for name, kind in ((sources.TARBALL_NAME, "tarball"), (sources.BATCHES_DIR_NAME, "batches"),
                       (sources.IMAGE_FOLDER_NAME, "imagefolder")):
        if (root / name).exists() and source in (None, kind):
            return kind, root / name
    if download and source in (None, "tarball"):
        sources.download_tarball(root / sources.TARBALL_NAME)
        return "tarball", root / sources.TARBALL_NAME
    if source is not None:
        raise DataError(root, f"the {source!r} source asked for", "no copy of it",
                        "Set CIFAR10_PATH to that copy; --download fetches the official archive, source 'tarball'.")
    raise DataError(root, f"{sources.TARBALL_NAME}, {sources.BATCHES_DIR_NAME}/ or {sources.IMAGE_FOLDER_NAME}/",
                    "none of them", "Set CIFAR10_PATH to your copy, or allow the download (--download).")


def _detect_kind(path: Path, asked: str | None) -> str:
    """The kind of copy at `path`: the kind asked for, where the path holds one, else the first that fits."""
    fitting = ["tarball"] if path.is_file() else [
        kind for kind, fits in (("batches", (path / "data_batch_1").exists()),
                                ("imagefolder", (path / "train").is_dir() or (path / "test").is_dir())) if fits]
    if asked in fitting or (asked is None and fitting):
        return asked or fitting[0]
    if fitting:
        raise DataError(path, f"a {asked!r} copy, the source asked for (--data-source or CIFAR10_SOURCE)",
                        f"a {' or '.join(map(repr, fitting))} copy",
                        f"Leave the source unset (the path's layout decides), or point the path at a {asked!r} copy.")
    found = sorted(p.name for p in path.iterdir())[:10]
    kinds = "a tarball, a directory with data_batch_1..5 and test_batch, or train/ and test/ class folders"
    raise DataError(path, f"a {asked!r} copy" if asked else kinds, f"the entries {found}",
                    f"Point the loader at {'one' if asked else 'one of those'}.")


def _read_source(kind: str, location: Path | None, download: bool) -> sources.Splits:
    readers = {"tarball": sources.read_tarball, "batches": sources.read_batches_dir,
               "imagefolder": sources.read_image_folder}
    return sources.read_tfds(download) if kind == "tfds" else readers[kind](location)


def _cache_name(kind: str, location: Path | None) -> str:
    key = hashlib.sha256(f"{kind}:{location.resolve() if location else ''}".encode()).hexdigest()[:16]
    return f"cifar10-{kind}-{key}.npz"


def _fingerprint(kind: str, location: Path | None) -> str:
    """Names, sizes and modification times of every source file: any edit to the source changes it.
    An image folder's also names the JPEG decoder, whose version can change the decoded bytes; tfds's
    names the order its records are put in (official since the ids sort them)."""
    if location is None:
        return f"{kind}:official-order"
    digest = hashlib.sha256()
    if location.is_file():
        stat = location.stat()
        digest.update(f"{location.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
        return digest.hexdigest()
    if kind == "imagefolder":
        digest.update(f"{sources.image_decoder()}\n".encode())
    directories = [str(location)]
    while directories:  # os.scandir: a quarter of the time of Path.rglob on 60,000 files
        with os.scandir(directories.pop()) as listing:
            for entry in sorted(listing, key=lambda e: e.name):
                if entry.is_dir():
                    directories.append(entry.path)
                else:
                    stat = entry.stat()
                    # Relative: the same folder named relatively or absolutely is the same source.
                    name = os.path.relpath(entry.path, location)
                    digest.update(f"{name}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _write_cache(cache_file: Path, arrays: dict[str, np.ndarray], fingerprint: str) -> None:
    """Best effort: the arrays are already in memory, so a full or read-only cache only costs the next load."""
    meta = {"format": CACHE_FORMAT, "fingerprint": fingerprint, "checksum": arrays_checksum(arrays)}
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        remove_abandoned_partials(cache_file.parent)  # a killed build leaves a data set's worth behind
        with atomic_writer(cache_file) as f:
            np.savez(f, meta=np.frombuffer(json.dumps(meta).encode(), np.uint8), **arrays)
    except OSError as error:
        warnings.warn(f"{cache_file}: could not write the cache ({error}); the data set loaded, and the next "
                      "load will decode the source again. Free space there or set EXPERT_CNN_CACHE.", stacklevel=3)


def _read_cache(cache_file: Path, fingerprint: str) -> dict[str, np.ndarray] | None:
    """The cached arrays if the cache is intact and matches the source; None means rebuild."""
    if not cache_file.exists():
        return None
    try:
        with np.load(cache_file, allow_pickle=False) as npz:
            meta = json.loads(npz["meta"].tobytes())
            arrays = {name: npz[name] for name in _ARRAYS}
    except Exception as error:  # a damaged file can raise almost anything (zipfile, numpy's header parser)
        problem = f"unreadable ({type(error).__name__}: {error})"
    else:
        if (not isinstance(meta, dict) or meta.get("format") != CACHE_FORMAT
                or meta.get("fingerprint") != fingerprint):
            problem = "stale (the source changed since it was written)"
        elif meta.get("checksum") != arrays_checksum(arrays):
            problem = "corrupt (its arrays do not match their checksum)"
        else:
            return arrays
    warnings.warn(f"{cache_file}: cache is {problem}; rebuilding it from the source.", stacklevel=3)
    return None
