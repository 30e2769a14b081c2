"""The CIFAR-10 data layer: every source, the cache, and a clear DataError for every bad input.

Each bad input is built here, in tmp_path; the real shared copy is only read.
"""

import hashlib
import os
import pickle
import shutil
import tarfile
import warnings

import numpy as np
import PIL
import pytest
from PIL import Image

from data import DataError, cifar10 as cifar10_module, load_cifar10, sources
from expert_core.config import CIFAR10_MEAN, CIFAR10_STD, CLASS_NAMES

PER_CLASS = sources.IMAGES_PER_CLASS


def assert_clear(error: DataError, path):
    """The message names the path, what was expected, what was found and what to do."""
    message = str(error)
    assert str(path) in message and "expected" in message and "found" in message
    assert error.fix and error.fix in message


def official_batches(seed=0):
    """Arrays in the official layout: rows of 3072 bytes (CHW), 5,000 / 1,000 images per class."""
    rng = np.random.default_rng(seed)
    splits = {}
    for split, per_class in PER_CLASS.items():
        labels = rng.permutation(np.repeat(np.arange(10), per_class))
        splits[split] = (rng.integers(0, 256, (len(labels), 3072), dtype=np.uint8), labels)
    return splits


def write_batches(directory, splits):
    directory.mkdir(parents=True, exist_ok=True)
    for split, names in sources.BATCH_FILES.items():
        data, labels = splits[split]
        for name, rows in zip(names, np.array_split(np.arange(len(labels)), len(names))):
            with open(directory / name, "wb") as f:
                pickle.dump({b"data": data[rows], b"labels": labels[rows].tolist()}, f)
    return directory


@pytest.fixture(scope="module")
def batches(tmp_path_factory):
    splits = official_batches()
    return write_batches(tmp_path_factory.mktemp("src") / "cifar-10-batches-py", splits), splits


@pytest.fixture
def cache(tmp_path):
    return tmp_path / "cache"


def test_batches_directory_round_trip_and_nhwc_layout(batches, cache):
    directory, splits = batches
    loaded = load_cifar10(directory, cache_dir=cache)
    data, labels = splits["train"]
    assert loaded.train_images.shape == (50000, 32, 32, 3) and loaded.train_images.dtype == np.uint8
    np.testing.assert_array_equal(loaded.train_labels, labels)
    # Official rows are R plane, G plane, B plane of 1024 bytes each.
    np.testing.assert_array_equal(loaded.train_images[7, :, :, 1].ravel(), data[7, 1024:2048])
    assert loaded.class_names == CLASS_NAMES and loaded.source.startswith("batches:")


def test_second_load_comes_from_the_cache(batches, cache, monkeypatch):
    directory, _ = batches
    first = load_cifar10(directory, cache_dir=cache)
    calls = []
    monkeypatch.setattr(sources, "read_batches_dir", lambda path: calls.append(path))
    second = load_cifar10(directory, cache_dir=cache)
    monkeypatch.chdir(directory.parent)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # named relatively, the same folder is the same source: no rebuild
        load_cifar10(directory.name, cache_dir=cache)
    assert calls == [] and len(list(cache.glob("*.npz"))) == 1
    np.testing.assert_array_equal(first.test_images, second.test_images)


def test_a_cache_that_cannot_be_written_warns_and_the_data_still_loads(batches, tmp_path):
    directory, splits = batches
    (tmp_path / "a-file").write_text("not a directory")
    with pytest.warns(UserWarning, match="could not write the cache"):
        loaded = load_cifar10(directory, cache_dir=tmp_path / "a-file" / "cache")
    np.testing.assert_array_equal(loaded.test_labels, splits["test"][1])


@pytest.mark.parametrize("damage", [b"garbage", b""])
def test_corrupt_cache_is_rebuilt_from_the_source(batches, cache, damage):
    directory, splits = batches
    load_cifar10(directory, cache_dir=cache)
    cache_file = next(cache.glob("*.npz"))
    cache_file.write_bytes(damage if damage else cache_file.read_bytes()[:1000])
    with pytest.warns(UserWarning, match="cache is unreadable"):
        loaded = load_cifar10(directory, cache_dir=cache)
    np.testing.assert_array_equal(loaded.test_labels, splits["test"][1])


def test_cache_whose_arrays_were_altered_is_rebuilt(batches, cache):
    directory, splits = batches
    load_cifar10(directory, cache_dir=cache)
    cache_file = next(cache.glob("*.npz"))
    with np.load(cache_file) as npz:
        arrays = dict(npz)
    for alter in (lambda a: (a + 1) % 10, lambda a: a.reshape(100, 100)):  # other values; same bytes, other shape
        with open(cache_file, "wb") as f:
            np.savez(f, **{**arrays, "test_labels": alter(arrays["test_labels"])})
        with pytest.warns(UserWarning, match="corrupt"):
            loaded = load_cifar10(directory, cache_dir=cache)
        np.testing.assert_array_equal(loaded.test_labels, splits["test"][1])


def test_stale_cache_is_rebuilt_and_the_source_left_alone(tmp_path, cache):
    splits = official_batches(seed=1)
    directory = write_batches(tmp_path / "cifar-10-batches-py", splits)
    load_cifar10(directory, cache_dir=cache)
    data, labels = splits["test"]
    data[0] = 255 - data[0]
    write_batches(directory, splits)  # the user edits the source after caching
    os.utime(directory / "test_batch", ns=(1, 1))
    before = {p.name: p.read_bytes() for p in directory.iterdir()}
    with pytest.warns(UserWarning, match="stale"):
        loaded = load_cifar10(directory, cache_dir=cache)
    assert loaded.test_images[0, 0, 0, 0] == data[0, 0]
    assert {p.name: p.read_bytes() for p in directory.iterdir()} == before


def write_tarball(path, batches_dir):
    with tarfile.open(path, "w:gz") as tar:
        tar.add(batches_dir, arcname="cifar-10-batches-py")
    return path


def test_tarball_with_verified_md5_loads(batches, tmp_path, cache, monkeypatch):
    directory, splits = batches
    tarball = write_tarball(tmp_path / sources.TARBALL_NAME, directory)
    monkeypatch.setattr(sources, "TARBALL_MD5", hashlib.md5(tarball.read_bytes()).hexdigest())
    loaded = load_cifar10(tarball, cache_dir=cache)
    np.testing.assert_array_equal(loaded.train_labels, splits["train"][1])
    assert loaded.source.startswith("tarball:")


def test_tarball_with_wrong_md5_is_refused(tmp_path, cache):
    tarball = write_tarball(tmp_path / sources.TARBALL_NAME, write_batches(tmp_path / "b", {
        split: (np.zeros((10, 3072), np.uint8), np.zeros(10, np.int64)) for split in PER_CLASS}))
    with pytest.raises(DataError, match=sources.TARBALL_MD5) as error:
        load_cifar10(tarball, cache_dir=cache)
    assert_clear(error.value, tarball)


def small_batches_dir(tmp_path):
    return write_batches(tmp_path / "cifar-10-batches-py", {
        split: (np.zeros((20, 3072), np.uint8), np.arange(20) % 10) for split in PER_CLASS})


@pytest.mark.parametrize("damage", ["truncated", "not_pickle", "wrong_keys", "wrong_shape", "missing"])
def test_damaged_batch_file_is_named(tmp_path, cache, damage):
    directory = small_batches_dir(tmp_path)
    target = directory / "data_batch_3"
    if damage == "truncated":
        target.write_bytes(target.read_bytes()[:100])
    elif damage == "not_pickle":
        target.write_text("this is not a pickle")
    elif damage == "wrong_keys":
        target.write_bytes(pickle.dumps({b"pixels": 1}))
    elif damage == "wrong_shape":
        target.write_bytes(pickle.dumps({b"data": np.zeros((4, 100), np.uint8), b"labels": [0] * 4}))
    else:
        target.unlink()
    with pytest.raises(DataError) as error:
        load_cifar10(directory, cache_dir=cache)
    assert_clear(error.value, target)


def image_folder(root, per_class=1, size=(32, 32), mode="RGB"):
    for split in PER_CLASS:
        for name in CLASS_NAMES:
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                Image.new(mode, size, 128).save(root / split / name / f"{i:04d}.png")
    return root


def test_an_image_folder_pairs_each_image_with_its_class_folder_in_file_order(tmp_path):
    # Each image's red channel is its class, its green channel its file's place in the folder.
    for split in PER_CLASS:
        for label, name in enumerate(CLASS_NAMES):
            (tmp_path / split / name).mkdir(parents=True)
            for i in (2, 0, 1):  # written out of order: the reader sorts by name
                Image.new("RGB", (32, 32), (label, i, 7)).save(tmp_path / split / name / f"{i:04d}.png")
    splits = sources.read_image_folder(tmp_path)
    for images, labels in splits.values():
        assert labels.tolist() == [label for label in range(10) for _ in range(3)]
        assert images[:, 0, 0, 0].tolist() == labels.tolist()
        assert images[:, 0, 0, 1].tolist() == [0, 1, 2] * 10 and (images[..., 2] == 7).all()


def test_tfds_records_are_put_back_in_the_official_order():
    ids = np.array([b"train_00002", b"train_00000", b"train_00010", b"train_00001"], dtype=object)
    places = np.array([2, 0, 10, 1])
    arrays = {"id": ids, "image": np.broadcast_to(places[:, None, None, None], (4, 32, 32, 3)),
              "label": places % 10}
    images, labels = sources.in_official_order(arrays)
    assert images[:, 0, 0, 0].tolist() == [0, 1, 2, 10] and labels.tolist() == [0, 1, 2, 0]
    assert images.dtype == np.uint8 and labels.dtype == np.int64


def test_a_new_jpeg_decoder_makes_an_image_folder_cache_stale_and_leaves_the_pickles_alone(tmp_path, monkeypatch):
    folder, batches = image_folder(tmp_path / "folder"), tmp_path / "batches"
    write_batches(batches, official_batches())
    sources_now = (("imagefolder", folder), ("batches", batches))
    before = [cifar10_module._fingerprint(kind, path) for kind, path in sources_now]
    monkeypatch.setattr(PIL, "__version__", "0.0-another-decoder")
    after = [cifar10_module._fingerprint(kind, path) for kind, path in sources_now]
    assert after[0] != before[0] and after[1] == before[1]


@pytest.mark.parametrize("size, mode", [((31, 32), "RGB"), ((32, 32), "L"), ((32, 32), "RGBA")])
def test_image_that_is_not_32x32_rgb_is_named(tmp_path, cache, size, mode):
    root = image_folder(tmp_path / "folder")
    bad = root / "test" / "dog" / "0000.png"
    Image.new(mode, size, 7).save(bad)
    with pytest.raises(DataError, match="32x32 RGB") as error:
        load_cifar10(root, cache_dir=cache)
    assert_clear(error.value, bad)


def test_missing_and_extra_class_folders_are_listed(tmp_path, cache):
    root = image_folder(tmp_path / "folder")
    (root / "train" / "cat").rename(root / "train" / "kitten")
    with pytest.raises(DataError, match=r"missing \['cat'\], extra \['kitten'\]") as error:
        load_cifar10(root, cache_dir=cache)
    assert_clear(error.value, root / "train")


def test_wrong_counts_are_reported_per_class(tmp_path, cache):
    root = image_folder(tmp_path / "folder", per_class=2)
    with pytest.raises(DataError, match=r"5000 images .* per class") as error:
        load_cifar10(root, cache_dir=cache)
    assert "[2, 2, 2, 2, 2, 2, 2, 2, 2, 2]" in str(error.value)
    assert not list(cache.glob("*.npz"))  # nothing bad is cached


def only_the_data_root(monkeypatch, root):
    """The loader sees no CIFAR10_PATH or CIFAR10_SOURCE, only `root` as CIFAR10_ROOT."""
    monkeypatch.delenv("CIFAR10_PATH", raising=False)
    monkeypatch.delenv("CIFAR10_SOURCE", raising=False)
    monkeypatch.setenv("CIFAR10_ROOT", str(root))


def test_missing_directory(tmp_path, cache):
    with pytest.raises(DataError) as error:
        load_cifar10(tmp_path / "nowhere", cache_dir=cache)
    assert_clear(error.value, tmp_path / "nowhere")


def test_argument_wins_over_environment(batches, tmp_path, cache, monkeypatch):
    directory, _ = batches
    monkeypatch.setenv("CIFAR10_PATH", str(tmp_path / "nowhere"))
    assert load_cifar10(directory, cache_dir=cache).source == f"batches:{directory}"


def test_no_source_and_no_download_says_what_to_do(tmp_path, cache, monkeypatch):
    only_the_data_root(monkeypatch, tmp_path / "empty")
    with pytest.raises(DataError, match="CIFAR10_PATH.*--download"):
        load_cifar10(cache_dir=cache)


def test_a_copy_in_cifar10_root_is_found_without_any_path(batches, cache, monkeypatch):
    directory, splits = batches
    only_the_data_root(monkeypatch, directory.parent)
    loaded = load_cifar10(cache_dir=cache)
    assert loaded.source == f"batches:{directory}"
    np.testing.assert_array_equal(loaded.test_labels, splits["test"][1])


def test_download_fetches_the_archive_into_cifar10_root_and_checks_its_md5(batches, tmp_path, cache, monkeypatch):
    """The real download code, served from a file:// URL instead of the network."""
    directory, splits = batches
    served = write_tarball(tmp_path / "served.tar.gz", directory)
    monkeypatch.setattr(sources, "TARBALL_URL", served.as_uri())
    monkeypatch.setattr(sources, "TARBALL_MD5", hashlib.md5(served.read_bytes()).hexdigest())
    only_the_data_root(monkeypatch, tmp_path / "root")
    loaded = load_cifar10(cache_dir=cache, download=True)
    fetched = tmp_path / "root" / sources.TARBALL_NAME
    assert loaded.source == f"tarball:{fetched}" and fetched.read_bytes() == served.read_bytes()
    np.testing.assert_array_equal(loaded.train_labels, splits["train"][1])


def test_a_download_that_is_not_the_official_archive_never_takes_its_place(batches, tmp_path, cache, monkeypatch):
    directory, _ = batches
    only_the_data_root(monkeypatch, tmp_path / "root")
    monkeypatch.setattr(sources, "TARBALL_URL", write_tarball(tmp_path / "served.tar.gz", directory).as_uri())
    with pytest.raises(DataError, match=f"expected the official archive with md5 {sources.TARBALL_MD5}, found "):
        load_cifar10(cache_dir=cache, download=True)
    monkeypatch.setattr(sources, "TARBALL_URL", (tmp_path / "nothing-served.tar.gz").as_uri())
    with pytest.raises(DataError, match="found a failed download or write .*Check the network"):
        load_cifar10(cache_dir=cache, download=True)
    assert list((tmp_path / "root").iterdir()) == []  # no archive, no partial file


def test_a_download_into_a_root_that_cannot_be_a_folder_is_a_data_error(batches, tmp_path, cache, monkeypatch):
    directory, _ = batches
    (tmp_path / "root").write_text("a file where the data folder should be")
    only_the_data_root(monkeypatch, tmp_path / "root")
    monkeypatch.setattr(sources, "TARBALL_URL", write_tarball(tmp_path / "served.tar.gz", directory).as_uri())
    with pytest.raises(DataError, match=f"write .*that {tmp_path / 'root'} is writable"):
        load_cifar10(cache_dir=cache, download=True)


def test_download_with_another_source_asked_for_refuses_instead_of_fetching_the_archive(tmp_path, cache, monkeypatch):
    only_the_data_root(monkeypatch, tmp_path / "empty")
    with pytest.raises(DataError, match="'batches' source asked for, found no copy of it"):
        load_cifar10(source="batches", cache_dir=cache, download=True)


def test_tfds_without_tensorflow_says_how_to_install_it(cache, monkeypatch):
    pytest.importorskip("tensorflow_datasets")
    try:
        import tensorflow  # noqa: F401
        pytest.skip("TensorFlow is installed")
    except ImportError:
        pass
    monkeypatch.setenv("CIFAR10_SOURCE", "tfds")
    with pytest.raises(DataError, match="pip install tensorflow-cpu"):
        load_cifar10(cache_dir=cache)


def test_unknown_source_kind_is_refused(cache):
    with pytest.raises(DataError, match="one of"):
        load_cifar10(source="lmdb", cache_dir=cache)


def test_a_source_asked_for_that_the_path_does_not_hold_is_named_with_what_it_holds(batches, tmp_path, cache):
    directory = shutil.copytree(batches[0], tmp_path / "copy")
    for asked in ("tarball", "imagefolder"):
        with pytest.raises(DataError, match=rf"expected a '{asked}' copy, the source asked for .*, found a "
                                            r"'batches' copy\. Leave the source unset"):
            load_cifar10(directory, source=asked, cache_dir=cache)
    (directory / "train").mkdir()  # now it holds both layouts: the one asked for is read
    with pytest.raises(DataError, match="train: expected exactly the class folders"):
        load_cifar10(directory, source="imagefolder", cache_dir=cache)
    assert load_cifar10(directory, source="batches", cache_dir=cache).source.startswith("batches:")


def test_the_real_shared_copy(cifar10):
    assert cifar10.train_images.shape == (50000, 32, 32, 3) and cifar10.test_images.shape == (10000, 32, 32, 3)
    assert cifar10.train_images.dtype == np.uint8 and cifar10.train_labels.dtype == np.int64
    assert np.bincount(cifar10.train_labels).tolist() == [5000] * 10
    assert np.bincount(cifar10.test_labels).tolist() == [1000] * 10
    assert cifar10.class_names == CLASS_NAMES
    # The normalisation constants both frameworks use are this copy's own pixel statistics (JPEG moves
    # them by less than 2e-3).
    counts = [np.bincount(cifar10.train_images[..., c].ravel(), minlength=256) for c in range(3)]
    values = np.arange(256) / 255
    means = np.array([values @ n / n.sum() for n in counts])
    stds = np.array([np.sqrt(np.square(values - m) @ n / n.sum()) for m, n in zip(means, counts)])
    np.testing.assert_allclose(means, CIFAR10_MEAN, atol=2e-3)
    np.testing.assert_allclose(stds, CIFAR10_STD, atol=2e-3)
