"""Readers for the four CIFAR-10 sources. Each returns {split: (images uint8 NHWC, labels int64)}.

Every reader validates what it reads and raises `DataError` naming the path, what was expected,
what was found and what to do; none of them writes to the user's source files.
"""

from __future__ import annotations

import hashlib
import http.client
import io
import pickle
import tarfile
import urllib.request
from pathlib import Path

import numpy as np

from expert_core.config import CLASS_NAMES
from expert_core.files import atomic_writer
from data.errors import DataError

TARBALL_NAME = "cifar-10-python.tar.gz"
TARBALL_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
TARBALL_MD5 = "c58f30108f718f92721af3b95e74349a"
BATCHES_DIR_NAME = "cifar-10-batches-py"
IMAGE_FOLDER_NAME = "cifar10-jpeg"  # the JPEG copy in the ImageFolder layout, as its README names it
BATCH_FILES = {
    "train": [f"data_batch_{i}" for i in range(1, 6)],
    "test": ["test_batch"],
}
IMAGES_PER_CLASS = {"train": 5000, "test": 1000}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")

Splits = dict[str, tuple[np.ndarray, np.ndarray]]


def md5_of(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def download_tarball(destination: Path) -> None:
    """Fetch the official archive with a progress bar into a temporary name, which becomes `destination`
    only once its md5 is the official one: a cut or altered download never takes the archive's place."""
    from tqdm import tqdm

    digest = hashlib.md5()
    try:
        destination.parent.mkdir(parents=True, exist_ok=True)
        with urllib.request.urlopen(TARBALL_URL, timeout=60) as response, atomic_writer(destination) as out:
            total = int(response.headers.get("Content-Length", 0)) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"downloading {TARBALL_NAME}") as bar:
                for chunk in iter(lambda: response.read(1 << 20), b""):
                    out.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
            if digest.hexdigest() != TARBALL_MD5:
                raise DataError(TARBALL_URL, f"the official archive with md5 {TARBALL_MD5}",
                                f"{out.tell()} bytes with md5 {digest.hexdigest()}",
                                "Run the download again; if it repeats, download it yourself and set CIFAR10_PATH.")
    # OSError: urllib's URLError, socket timeouts and a full or read-only disk; HTTPException: a cut response.
    except (OSError, http.client.HTTPException) as error:
        raise DataError(TARBALL_URL, "the official archive", f"a failed download or write ({error!r})",
                        f"Check the network and that {destination.parent} is writable with space to spare, then run "
                        "again, or download it yourself and set CIFAR10_PATH.") from error


def read_tarball(path: Path) -> Splits:
    try:
        found_md5 = md5_of(path)
    except OSError as error:  # a directory given as source 'tarball', an unreadable file
        raise DataError(path, "a readable gzip tar archive", f"{type(error).__name__}: {error}",
                        "Point CIFAR10_PATH (or --data) at the archive file itself.") from error
    if found_md5 != TARBALL_MD5:
        raise DataError(path, f"the official archive with md5 {TARBALL_MD5}", f"md5 {found_md5}",
                        "Delete the file and download it again (load_cifar10(download=True)).")
    try:
        with tarfile.open(path, "r:gz") as tar:
            members = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}
            return _read_batches(lambda name: tar.extractfile(members[name]).read()
                                 if name in members else None, path)
    except (tarfile.TarError, OSError, EOFError) as error:
        raise DataError(path, "a readable gzip tar archive", f"{type(error).__name__}: {error}",
                        "Delete the file and download it again.") from error


def read_batches_dir(directory: Path) -> Splits:
    def read(name):
        file = directory / name
        return file.read_bytes() if file.is_file() else None

    return _read_batches(read, directory)


def _read_batches(read_bytes, where: Path) -> Splits:
    splits = {}
    for split, names in BATCH_FILES.items():
        images, labels = [], []
        for name in names:
            raw = read_bytes(name)
            if raw is None:
                raise DataError(Path(where) / name, "an official CIFAR-10 batch file", "no such file",
                                "Re-extract cifar-10-python.tar.gz or point the loader at the archive.")
            x, y = _decode_batch(raw, Path(where) / name)
            images.append(x)
            labels.append(y)
        splits[split] = (np.concatenate(images), np.concatenate(labels))
    return splits


class _BatchUnpickler(pickle.Unpickler):
    """Unpickles only what the official batches hold: plain containers and numpy arrays.

    A pickle can name any importable callable; a damaged or hostile file must not get to run one.
    """

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refused to load {module}.{name}: a CIFAR-10 batch holds only "
                                         "dicts, lists, bytes, numbers and numpy arrays")
        return super().find_class(module, name)


def _decode_batch(raw: bytes, path: Path) -> tuple[np.ndarray, np.ndarray]:
    fix = "Re-extract the file from the official archive; it is damaged or not a CIFAR-10 batch."
    try:
        batch = _BatchUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except Exception as error:  # a damaged pickle can raise almost anything
        raise DataError(path, "a Python pickle", f"unreadable data ({type(error).__name__}: {error})",
                        fix) from error
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        found = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
        raise DataError(path, "a dict with b'data' and b'labels'", f"{found}", fix)
    try:  # ragged lists, non-numbers or huge ints make numpy raise; they are bad input like any other
        data = np.asarray(batch[b"data"])
        labels = np.asarray(batch[b"labels"], dtype=np.int64)
    except (TypeError, ValueError, OverflowError) as error:
        raise DataError(path, "uint8 data of shape (n, 3072) with n integer labels",
                        f"values numpy cannot convert ({type(error).__name__}: {error})", fix) from error
    if (data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072 or labels.ndim != 1
            or len(labels) != len(data)):
        raise DataError(path, "uint8 data of shape (n, 3072) with n labels",
                        f"{data.dtype} data of shape {data.shape} with labels of shape {labels.shape}", fix)
    if labels.size and (labels.min() < 0 or labels.max() >= len(CLASS_NAMES)):
        raise DataError(path, "labels in 0..9", f"labels in {labels.min()}..{labels.max()}", fix)
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).copy(), labels


def read_image_folder(root: Path) -> Splits:
    from PIL import Image

    splits = {}
    for split in IMAGES_PER_CLASS:
        split_dir = root / split
        if not split_dir.is_dir():
            raise DataError(split_dir, f"a '{split}' folder with one sub-folder per class",
                            "no such directory", "Point the loader at the root that holds train/ and test/.")
        _check_class_folders(split_dir)
        images, labels = [], []
        for label, name in enumerate(CLASS_NAMES):
            for file in sorted(p for p in (split_dir / name).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
                images.append(_decode_image(file, Image))
                labels.append(label)
        splits[split] = (np.stack(images) if images else np.zeros((0, 32, 32, 3), np.uint8),
                         np.asarray(labels, np.int64))
    return splits


def _check_class_folders(split_dir: Path) -> None:
    present = {p.name for p in split_dir.iterdir() if p.is_dir()}
    missing = [c for c in CLASS_NAMES if c not in present]
    extra = sorted(present - set(CLASS_NAMES))
    if missing or extra:
        raise DataError(split_dir, f"exactly the class folders {list(CLASS_NAMES)}",
                        f"missing {missing}, extra {extra}",
                        "Rename or remove folders so that the ten CIFAR-10 classes are there, and only they.")


def image_decoder() -> str:
    """The library that decodes an image folder's files, by version: another can decode other bytes."""
    import PIL
    from PIL import features

    return (f"Pillow {PIL.__version__}, libjpeg {features.version('jpg')} "
            f"(turbo {features.version('libjpeg_turbo')})")


def _decode_image(file: Path, Image) -> np.ndarray:
    try:
        with Image.open(file) as image:
            # Checked before decoding: a damaged header may claim a size too large to decode at all.
            if image.mode != "RGB" or image.size != (32, 32):
                raise DataError(file, "a 32x32 RGB image", f"a {image.size[0]}x{image.size[1]} {image.mode} image",
                                "Replace the file with the original CIFAR-10 image (do not resize or convert).")
            pixels = np.asarray(image)
    except DataError:
        raise
    except Exception as error:  # PIL raises many kinds for damaged files
        raise DataError(file, "a readable PNG or JPEG image", f"{type(error).__name__}: {error}",
                        "Replace the file with the original image.") from error
    if pixels.shape != (32, 32, 3) or pixels.dtype != np.uint8:
        raise DataError(file, "32x32x3 uint8 pixels", f"{pixels.dtype} pixels of shape {pixels.shape}",
                        "Replace the file with the original image.")
    return pixels


def read_tfds(download: bool = False) -> Splits:
    """tensorflow-datasets' copy, fetched only with `download`, in the official order."""
    try:
        import tensorflow  # noqa: F401  (tfds needs it to build the data set)
        import tensorflow_datasets as tfds
    except ImportError as error:
        raise DataError("tensorflow-datasets:cifar10", "TensorFlow and tensorflow-datasets installed",
                        f"ImportError: {error}",
                        "Run `pip install tensorflow-cpu tensorflow-datasets`, or use another source (archive, "
                        "pickles, image folder).") from error
    splits = {}
    for split in IMAGES_PER_CLASS:
        try:
            arrays = tfds.as_numpy(tfds.load("cifar10", split=split, batch_size=-1, download=download))
        except Exception as error:  # tfds and TensorFlow raise their own kinds for a missing or cut copy
            raise DataError("tensorflow-datasets:cifar10", f"a prepared {split} split",
                            f"{type(error).__name__}: {error}",
                            "Pass --download to let tfds fetch and prepare it, or use another source.") from error
        splits[split] = in_official_order(arrays)
    return splits


def in_official_order(arrays: dict) -> tuple[np.ndarray, np.ndarray]:
    """tfds stores its records shuffled; their ids ("train_00042": the 43rd image of the official
    batches) put them back, so that positions (subsets, epoch orders, test indices) mean the images
    they mean for the archive."""
    order = np.argsort(np.asarray(arrays["id"]), kind="stable")
    return np.asarray(arrays["image"], np.uint8)[order], np.asarray(arrays["label"], np.int64)[order]


def check_counts(splits: Splits, where: str) -> None:
    for split, per_class in IMAGES_PER_CLASS.items():
        images, labels = splits[split]
        counts = np.bincount(labels, minlength=len(CLASS_NAMES))
        if images.shape[1:] != (32, 32, 3) or not (counts == per_class).all():
            raise DataError(where, f"{split}: {per_class} images of shape (32, 32, 3) per class",
                            f"{split}: images of shape {images.shape[1:]}, per-class counts {counts.tolist()}",
                            "The source is incomplete or has extra files; restore the full CIFAR-10 set.")
