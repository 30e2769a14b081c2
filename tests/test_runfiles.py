"""Run-file helpers that do not need a training run."""

import re

from expert_core import runfiles


def test_git_commit_inside_the_checkout_is_head():
    assert re.fullmatch(r"[0-9a-f]{40}(-dirty)?", runfiles.git_commit())


def test_git_commit_outside_a_checkout_comes_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setattr(runfiles, "__file__", str(tmp_path / "runfiles.py"))  # as if exported without .git
    monkeypatch.delenv("EXPERT_CNN_GIT_COMMIT", raising=False)
    assert runfiles.git_commit() == "unknown"
    monkeypatch.setenv("EXPERT_CNN_GIT_COMMIT", "0123abc")
    assert runfiles.git_commit() == "0123abc"
