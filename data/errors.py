"""The one error type the data layer raises for bad input."""

from __future__ import annotations

from pathlib import Path


class DataError(Exception):
    """Bad or missing CIFAR-10 input. The message names the path, the expectation, the finding and the fix."""

    def __init__(self, path: str | Path, expected: str, found: str, fix: str):
        self.path = str(path)
        self.expected = expected
        self.found = found
        self.fix = fix
        super().__init__(f"{path}: expected {expected}, found {found}. {fix}")
