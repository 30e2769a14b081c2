"""Run-file helpers that do not need a training run."""

import re
import subprocess
from pathlib import Path

import numpy as np

from expert_core import runfiles


def test_git_commit_inside_the_checkout_is_head():
    root = Path(runfiles.__file__).resolve().parents[1]
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True)
    assert re.fullmatch(f"{head.stdout.strip()}(-dirty)?", runfiles.git_commit())


def test_git_commit_outside_a_checkout_comes_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setattr(runfiles, "__file__", str(tmp_path / "runfiles.py"))  # as if exported without .git
    monkeypatch.delenv("EXPERT_CNN_GIT_COMMIT", raising=False)
    assert runfiles.git_commit() == "unknown"
    monkeypatch.setenv("EXPERT_CNN_GIT_COMMIT", "0123abc")
    assert runfiles.git_commit() == "0123abc"


def test_confusion_matrix_rows_are_the_true_class_and_columns_the_prediction():
    matrix = runfiles.confusion_matrix(np.array([0, 0, 1, 2]), np.array([1, 0, 1, 1]), 3)
    np.testing.assert_array_equal(matrix, [[1, 1, 0], [0, 1, 0], [0, 1, 0]])


def test_attention_per_class_averages_each_class_images_in_each_block():
    first = np.array([[1.0, 0.0], [0.5, 0.5], [0.0, 1.0]])
    per_class = runfiles.attention_per_class([first, first[::-1]], np.array([0, 0, 1]), 2)
    np.testing.assert_allclose(per_class, [[[0.75, 0.25], [0.0, 1.0]], [[0.25, 0.75], [1.0, 0.0]]])
