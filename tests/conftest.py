"""Shared fixtures: the real CIFAR-10 copy (CIFAR10_PATH) and a private cache when none is set."""

import os

import pytest


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory):
    """Never write the user's ~/.cache from tests; CI sets EXPERT_CNN_CACHE to reuse one cache."""
    if "EXPERT_CNN_CACHE" not in os.environ:
        os.environ["EXPERT_CNN_CACHE"] = str(tmp_path_factory.mktemp("expert_cnn_cache"))


@pytest.fixture(scope="session")
def cifar10(_private_cache):
    if not os.environ.get("CIFAR10_PATH"):
        pytest.skip("CIFAR10_PATH is not set: point it at a CIFAR-10 copy to run the tests on real data")
    from data import load_cifar10

    return load_cifar10()
