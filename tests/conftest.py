"""Shared fixtures: the real CIFAR-10 copy (CIFAR10_PATH), a private cache when none is set, no network.

- `EXPERT_CNN_CACHE`: when it is set (CI sets it to the checkout's .cache) it is kept, so the decoded
  real data set is cached once and reused by every test and every run; when it is unset (or empty) it
  is pointed at a directory under pytest's tmp, so tests never write the user's ~/.cache.
- `cifar10`: the real data set, loaded once per session through `data.load_cifar10()` (which reads
  CIFAR10_PATH); the tests that need it are skipped, with the reason, when CIFAR10_PATH is unset.
- Tests never touch the network: the archive download is replaced by a function that fails the test.
- `record_merges`: swaps a model module's MERGES for wrappers that note which merge each block ran.
- JAX's persistent compilation cache: one fresh directory per session (unless JAX_COMPILATION_CACHE_DIR
  is set), shared by pytest's two worker processes (pyproject's addopts) and every training
  subprocess they start.
"""

import functools
import os
import shutil
import tempfile

import pytest


def pytest_configure(config):
    """The kill-and-resume, scale-out and benchmark tests start some forty Flax processes that compile
    the same few programs; from a shared compilation cache each compiles them once (a tiny run took
    42 s from cold and 10 s warm on a 2-core Intel Xeon). Set here, before any test module imports
    JAX, which reads these variables when it is imported; subprocesses inherit them."""
    if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        config.jax_cache_dir = tempfile.mkdtemp(prefix="expert_cnn_jax_cache_")
        os.environ["JAX_COMPILATION_CACHE_DIR"] = config.jax_cache_dir
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")


def pytest_unconfigure(config):
    if getattr(config, "jax_cache_dir", None):
        shutil.rmtree(config.jax_cache_dir, ignore_errors=True)


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory):
    """Never write the user's ~/.cache from tests; keep EXPERT_CNN_CACHE when it is set (CI reuses it)."""
    if not os.environ.get("EXPERT_CNN_CACHE"):
        os.environ["EXPERT_CNN_CACHE"] = str(tmp_path_factory.mktemp("expert_cnn_cache"))
    return os.environ["EXPERT_CNN_CACHE"]


@pytest.fixture(scope="session", autouse=True)
def _no_download():
    """A test that would download the official archive fails instead of touching the network; a file://
    URL, which a test serves its own archive from, goes through the real download code."""
    from data import sources

    download = sources.download_tarball

    def download_from_local_files_only(destination):
        if sources.TARBALL_URL.startswith("file:"):
            return download(destination)
        raise RuntimeError(f"tests must not touch the network (download of {sources.TARBALL_URL} "
                           f"to {destination} was requested)")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sources, "download_tarball", download_from_local_files_only)
        yield


@pytest.fixture(scope="session")
def cifar10(_private_cache):
    """The real CIFAR-10 copy named by CIFAR10_PATH, decoded once (and cached in EXPERT_CNN_CACHE)."""
    if not os.environ.get("CIFAR10_PATH"):
        pytest.skip("CIFAR10_PATH is not set: point it at a CIFAR-10 copy (CI uses "
                    "../shared/datasets/cifar10-jpeg) to run the tests on the real data set")
    from data import load_cifar10

    return load_cifar10()


def _recorded(seen: list, name: str, merge, *args, **kwargs):
    seen.append(name)
    return merge(*args, **kwargs)


@pytest.fixture
def record_merges(monkeypatch):
    """record_merges(module) -> the list that fills, in call order, with the merge each block runs."""
    def record(module) -> list[str]:
        seen = []
        monkeypatch.setattr(module, "MERGES", {name: functools.partial(_recorded, seen, name, merge)
                                               for name, merge in module.MERGES.items()})
        return seen
    return record
