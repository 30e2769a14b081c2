"""Training survives kill -9, full disks and damaged files without losing work or loading wrong.

The kill and disk tests run the real training scripts in subprocesses (tests/kill_at.py kills at
exact moments); the fuzz tests feed hypothesis-mutated files to every reader of the project.
"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from expert_core import checkpoints, portable, runfiles
from test_training import FRAMEWORKS, SHORT, train

ROOT = Path(__file__).resolve().parents[1]
EPOCHS = ["--epochs", "3"]
# One run, killed five times in a row and resumed each time (the counts are per process):
# mid-epoch before any checkpoint; halfway through writing the first checkpoint; after checkpoint 2
# but before its metrics; mid-epoch 3; while the final files are written.
KILLS = [("step", 5), ("checkpoint-write", 1), ("metrics", 2), ("step", 3), ("final", 1)]
TIMING_KEYS = ("train_seconds", "images_per_second", "epoch_seconds")


# The subprocesses train on the real data set (CIFAR10_PATH): skipped without it.
pytestmark = pytest.mark.usefixtures("cifar10")


def launch(framework, run_dir, *args, kill=None, file_size_limit=None):
    script = [str(ROOT / "tests" / "kill_at.py"), framework, *kill] if kill else \
        [str(ROOT / "scripts" / f"train_{framework}.py")]
    limit = [sys.executable, str(ROOT / "tests" / "file_size_limit.py"), str(file_size_limit)] \
        if file_size_limit else []
    return subprocess.run([*limit, sys.executable, *script, *SHORT, "--out", str(run_dir), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)


def comparable(rows):
    return [{k: v for k, v in row.items() if k not in TIMING_KEYS} for row in rows]


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_kill_minus_nine_at_five_points_then_resume_equals_an_uninterrupted_run(framework, tmp_path):
    straight = train(framework, tmp_path / "straight", *EPOCHS)
    run_dir = tmp_path / "killed"
    for point, n in KILLS:
        result = launch(framework, run_dir, *EPOCHS, "--resume", kill=(point, str(n)))
        assert result.returncode == -9, f"{point} {n}: expected SIGKILL, got {result.returncode}\n{result.stderr}"
    finished = launch(framework, run_dir, *EPOCHS, "--resume")
    assert finished.returncode == 0, finished.stderr
    assert comparable(runfiles.read_metrics(run_dir)) == comparable(runfiles.read_metrics(tmp_path / "straight"))
    resumed = json.loads((run_dir / runfiles.SUMMARY_FILE).read_text())
    assert resumed["test_accuracy"] == straight["test_accuracy"]
    weights = [portable.load_portable(d / "weights.safetensors")[0] for d in (run_dir, tmp_path / "straight")]
    assert all(np.array_equal(weights[0][k], weights[1][k]) for k in weights[1])
    assert [p.name for p in checkpoints.list_checkpoints(run_dir)] == ["checkpoint-00002.ckpt",
                                                                       "checkpoint-00003.ckpt"]
    assert not list(run_dir.glob("*.partial"))  # the half-written first checkpoint, removed on --resume


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_write_failure_keeps_the_previous_checkpoint_and_says_so(framework, tmp_path):
    train(framework, tmp_path, "--epochs", "2")
    checkpoints.checkpoint_path(tmp_path, 2).unlink()  # as if killed during epoch 2
    first = checkpoints.checkpoint_path(tmp_path, 1)
    # A file-size limit below one checkpoint: the kernel refuses the write as a full disk would.
    result = launch(framework, tmp_path, "--epochs", "2", "--resume", file_size_limit=first.stat().st_size // 2)
    assert result.returncode == 1, result.stderr
    assert "could not write the files of epoch 2" in result.stderr
    assert "checkpoint-00001.ckpt, is intact" in result.stderr
    assert checkpoints.read_checkpoint(first).header["epoch"] == 1
    assert sorted(p.name for p in tmp_path.glob("*.ckpt*")) == ["checkpoint-00001.ckpt"]
    assert launch(framework, tmp_path, "--epochs", "2", "--resume").returncode == 0
