"""Every reader of the project meets damaged files: hypothesis mutates real files byte by byte.

Each case must end in the project's own error (CheckpointError, WeightsError, DataError), or, for
the data cache, in a warning and a rebuild; or load something well formed. Never a crash from inside
a library. Checkpoints, portable files and caches carry checksums, so for them a damaged file never
loads as a different result; images and CIFAR-10 batch files carry none (JPEG, pickle), so a damaged
one may decode to other valid pixels. Derandomized, so every run tries the same cases.
"""

import io
import pickle
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from data import DataError, cifar10, sources
from expert_core import checkpoints, portable
from expert_core.config import get_preset

from model_configs import random_canonical_tensors

FUZZ = settings(max_examples=150, derandomize=True, database=None, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
TINY = get_preset("tiny").model


def damaged(blob: bytes) -> st.SearchStrategy[bytes]:
    """Copies of `blob` cut short, with bytes overwritten, with bytes inserted, or replaced by noise."""
    n = len(blob)

    def overwrite(edits):
        copy = bytearray(blob)
        for at, value in edits:
            copy[at] = value
        return bytes(copy)

    def insert(at_and_extra):
        at, extra = at_and_extra
        return blob[:at] + extra + blob[at:]

    return st.one_of(
        st.integers(0, n - 1).map(lambda end: blob[:end]),
        st.lists(st.tuples(st.integers(0, n - 1), st.integers(0, 255)), min_size=1, max_size=8).map(overwrite),
        st.tuples(st.integers(0, n), st.binary(min_size=1, max_size=64)).map(insert),
        st.binary(max_size=2 * n),
    )


@pytest.fixture(scope="module")
def checkpoint_bytes(tmp_path_factory):
    header = {"framework": "flax", "history": [{"epoch": 1, "test_accuracy": 10.0}], "run": {"seed": 0}}
    path = checkpoints.write_checkpoint(tmp_path_factory.mktemp("checkpoint"), 1, header,
                                        np.random.default_rng(0).bytes(300))
    return path.read_bytes()


@pytest.fixture(scope="module")
def portable_file(tmp_path_factory):
    tensors = random_canonical_tensors(TINY)
    portable_path = tmp_path_factory.mktemp("portable") / "weights.safetensors"
    portable.save_portable(portable_path, tensors, TINY, {"epochs": 1})
    return {"tensors": tensors, "portable": portable_path.read_bytes()}


def image_bytes(fmt: str) -> bytes:
    pixels = np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def batch_bytes() -> bytes:
    rng = np.random.default_rng(2)
    return pickle.dumps({b"data": rng.integers(0, 256, (6, 3072), dtype=np.uint8),
                         b"labels": [0, 1, 2, 3, 4, 9], b"batch_label": b"testing batch 1 of 1"})


def cache_bytes(tmp_path_factory) -> tuple[bytes, dict]:
    rng = np.random.default_rng(3)
    arrays = {"train_images": rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8),
              "train_labels": np.arange(4, dtype=np.int64),
              "test_images": rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8),
              "test_labels": np.arange(2, dtype=np.int64)}
    path = tmp_path_factory.mktemp("cache") / "cifar10.npz"
    cifar10._write_cache(path, arrays, "fingerprint")
    return path.read_bytes(), arrays


def test_damaged_checkpoints_are_always_refused(tmp_path_factory, checkpoint_bytes):
    path = tmp_path_factory.mktemp("fuzz") / "checkpoint-00001.ckpt"

    @FUZZ
    @given(damaged(checkpoint_bytes))
    def case(blob):
        if blob == checkpoint_bytes:
            return
        path.write_bytes(blob)
        with pytest.raises(checkpoints.CheckpointError, match="checkpoint-00001.ckpt"):
            checkpoints.read_checkpoint(path)

    case()


def test_damaged_portable_files_are_refused_or_load_unchanged(tmp_path_factory, portable_file):
    path = tmp_path_factory.mktemp("fuzz") / "weights.safetensors"

    @FUZZ
    @given(damaged(portable_file["portable"]))
    def case(blob):
        path.write_bytes(blob)
        try:
            tensors, config, extra = portable.load_portable(path)
        except portable.WeightsError:
            return
        assert config == TINY and extra == {"epochs": 1}
        assert all(np.array_equal(tensors[k], v) for k, v in portable_file["tensors"].items())

    path.write_bytes(portable_file["portable"])  # so the case above cannot pass by refusing every file
    assert all(np.array_equal(portable.load_portable(path)[0][k], v) for k, v in portable_file["tensors"].items())
    case()


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_damaged_images_give_a_data_error_or_32x32_rgb_pixels(tmp_path_factory, fmt):
    original = image_bytes(fmt)
    path = tmp_path_factory.mktemp("fuzz") / f"image.{fmt.lower()}"

    @FUZZ
    @given(damaged(original))
    def case(blob):
        path.write_bytes(blob)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # PIL warns about truncated or odd files before failing
                pixels = sources._decode_image(path, Image)
        except DataError as error:
            assert str(path) in str(error)
            return
        assert pixels.shape == (32, 32, 3) and pixels.dtype == np.uint8

    case()


def test_damaged_batch_files_give_a_data_error_or_a_valid_batch():
    original = batch_bytes()

    @FUZZ
    @given(damaged(original))
    def case(blob):
        try:
            images, labels = sources._decode_batch(blob, sources.Path("data_batch_1"))
        except DataError as error:
            assert "data_batch_1" in str(error)
            return
        assert images.dtype == np.uint8 and images.shape[1:] == (32, 32, 3)
        assert len(images) == len(labels) and labels.min(initial=0) >= 0 and labels.max(initial=0) <= 9

    case()


def test_a_batch_file_naming_other_code_is_refused_not_run():
    class Payload:
        def __reduce__(self):
            return (print, ("this must never run",))

    with pytest.raises(DataError, match="refused to load builtins.print"):
        sources._decode_batch(pickle.dumps({b"data": Payload(), b"labels": []}), sources.Path("data_batch_1"))


def test_damaged_caches_are_rebuilt_or_load_unchanged(tmp_path_factory):
    original, arrays = cache_bytes(tmp_path_factory)
    path = tmp_path_factory.mktemp("fuzz") / "cifar10.npz"

    @FUZZ
    @given(damaged(original))
    def case(blob):
        path.write_bytes(blob)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loaded = cifar10._read_cache(path, "fingerprint")
        if loaded is not None:
            assert all(np.array_equal(loaded[k], v) for k, v in arrays.items())

    path.write_bytes(original)  # so the case above cannot pass by rebuilding every cache
    assert all(np.array_equal(cifar10._read_cache(path, "fingerprint")[k], v) for k, v in arrays.items())
    case()
