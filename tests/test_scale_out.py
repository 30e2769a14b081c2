"""Data-parallel training on two CPU devices equals training on one, and checkpoints move between them.

Two-device Flax runs in a subprocess that sees two XLA host devices (XLA_FLAGS must be set before
jax is imported, and this process has imported it), or as two one-device processes joined by
jax.distributed; two-device PyTorch runs under torchrun with two processes (DDP, gloo). One-device
runs: Flax in this process, PyTorch in a subprocess. 20 steps an epoch, tiny preset, real data.
"""

import dataclasses
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import flax.serialization
import numpy as np
import pytest
import torch

from expert_core import checkpoints, portable, runfiles
from expert_core.config import get_preset
from expert_core.training import TrainingError
from data_parallel_steps import largest_weight_difference
from test_training import FRAMEWORKS, SHORT, backend_factory, train

ROOT = Path(__file__).resolve().parents[1]
TWO_EPOCHS_OF_TWENTY_STEPS = [*SHORT, "--max-train-examples", "640", "--epochs", "2"]
TOLERANCE = 1e-5
# Left to run freely, the two runs drift apart: float rounding differs with the device count (the
# order of the reductions), and Adam's first updates, about lr * sign(g), turn it into lr-sized
# differences for weights whose gradient is within that noise of zero. Measured after 20 steps:
# weights 5e-05 (Flax) and 2e-04 (PyTorch), test loss 8e-06 and 4e-06; after 40, test loss 2e-05.
# BatchNorm statistics taken per device instead of over the global batch give weights 1.4e-02 apart.
FREE_RUNNING_TOLERANCE = 1e-3
# In float64 the same 20 free-running steps end 6e-16 (Flax) and 1e-14 (PyTorch) apart.
FLOAT64_TOLERANCE = 1e-12
# The gradient norm sums every parameter's squared gradient, relative: on batches of every class, one
# of the 20 PyTorch steps put it 3.1e-05 apart (1.4e-05 of 0.445; the others 0 to 1.5e-06), most likely
# a max-pool near-tie that the float32 rounding of the synced batch statistics decides (not located).
GRAD_NORM_TOLERANCE = 1e-4


def on_two_devices(framework: str, script: str, *arguments: str, jax_processes: int = 1) -> None:
    """Runs `script` on two CPU devices, from the repository root. PyTorch: two torchrun processes.
    JAX: one process that sees two devices, or two one-device processes joined by jax.distributed
    (`jax_processes=2`: what several hosts do, here on one)."""
    command = [sys.executable, script, *arguments]
    if framework == "torch":
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
        run_together(([*torchrun, script, *arguments], {"OMP_NUM_THREADS": "1"}))
    elif jax_processes == 2:
        coordinator = {"JAX_COORDINATOR_ADDRESS": f"localhost:{free_port()}", "JAX_NUM_PROCESSES": "2",
                       "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
        run_together(*[(command, {**coordinator, "JAX_PROCESS_ID": str(i)}) for i in range(2)])
    else:
        run_together((command, {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}))


def train_on(devices: int, framework: str, run_dir: Path, *arguments: str, jax_processes: int = 1) -> None:
    script = f"scripts/train_{framework}.py"
    if devices == 2:
        on_two_devices(framework, script, *arguments, "--out", str(run_dir), jax_processes=jax_processes)
    elif framework == "flax":
        train(framework, run_dir, *arguments)  # in this process, whose compiled steps are reused
    else:  # one thread per process, like each torchrun process: a like-for-like run, a CPU not oversubscribed
        run_together(([sys.executable, script, *arguments, "--out", str(run_dir)], {"OMP_NUM_THREADS": "1"}))


def run_together(*jobs: tuple[list[str], dict[str, str]]) -> None:
    """Starts every (command, extra environment) at once, from the repository root; each must succeed."""
    logs = [tempfile.TemporaryFile("w+") for _ in jobs]  # files, not pipes: a full pipe could stall a peer
    processes = [subprocess.Popen(command, cwd=ROOT, env={**os.environ, **environment}, stdout=log,
                                  stderr=subprocess.STDOUT, text=True)
                 for (command, environment), log in zip(jobs, logs)]
    try:
        for (command, _), process, log in zip(jobs, processes, logs):
            process.wait(timeout=300)
            log.seek(0)
            assert process.returncode == 0, f"{' '.join(command)} failed:\n{log.read()[-5000:]}"
    finally:
        for process in processes:
            process.kill()  # only those still running after a failure
        for log in logs:
            log.close()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("localhost", 0))
        return probe.getsockname()[1]


def checkpoint_weights(framework: str, path: Path) -> dict[str, np.ndarray]:
    """The canonical weights of a checkpoint, loaded by a single-device backend."""
    preset = get_preset("tiny")
    backend = backend_factory(framework)(preset.model, preset.train, steps_per_epoch=20, seed=0, device="cpu")
    backend.load_state_bytes(checkpoints.read_checkpoint(path).payload)
    return backend.canonical_weights()


def float64_weights(framework: str, path: Path) -> dict[str, np.ndarray]:
    """The canonical weights of a float64 checkpoint, read straight from its payload: a float64 Flax
    backend would switch the whole test process to 64-bit JAX."""
    payload = checkpoints.read_checkpoint(path).payload
    if framework == "torch":
        return {k: v.numpy() for k, v in torch.load(io.BytesIO(payload), weights_only=True)["model"].items()}
    state = flax.serialization.msgpack_restore(payload)
    return portable.flax_to_canonical({k: state[k] for k in ("params", "batch_stats")}, get_preset("tiny").model)


def losses(run_dir: Path) -> np.ndarray:
    return np.array([[row["train_loss"], row["test_loss"]] for row in runfiles.read_metrics(run_dir)])


@pytest.mark.slow
@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_each_two_device_step_equals_the_single_device_step(framework, cifar10, tmp_path):
    on_two_devices(framework, "tests/data_parallel_steps.py", framework, str(tmp_path / "steps.json"))
    report = json.loads((tmp_path / "steps.json").read_text())
    assert report["device"].startswith("2 x cpu")
    assert len(report["steps"]) == 20
    for key, tolerance in (("loss", TOLERANCE), ("correct", TOLERANCE), ("grad_norm", GRAD_NORM_TOLERANCE),
                           ("weights", TOLERANCE)):
        assert max(step[key] for step in report["steps"]) <= tolerance, key


@pytest.mark.slow
@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_two_device_run_matches_one_device_and_each_resumes_the_other(framework, cifar10, tmp_path):
    two, one = tmp_path / "two-devices", tmp_path / "one-device"
    train_on(2, framework, two, *TWO_EPOCHS_OF_TWENTY_STEPS, jax_processes=2)
    train_on(1, framework, one, *TWO_EPOCHS_OF_TWENTY_STEPS)
    summary = json.loads((two / "summary.json").read_text())
    assert summary["device"].startswith("2 x cpu")
    launch = {"torch": ["OMP_NUM_THREADS=1 ", " torchrun --nnodes=1 --nproc_per_node=2 scripts/train_torch.py "],
              "flax": ["JAX_NUM_PROCESSES=2 ", "JAX_PROCESS_ID=0 "]}[framework]  # the main process writes
    assert all(part in summary["command"] for part in launch), summary["command"]
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())  # one writer
    first_epoch_train_loss = runfiles.read_metrics(two)[0]["train_loss"], runfiles.read_metrics(one)[0]["train_loss"]
    assert abs(np.subtract(*first_epoch_train_loss)) <= TOLERANCE
    np.testing.assert_allclose(losses(two), losses(one), rtol=0, atol=FREE_RUNNING_TOLERANCE)
    after_twenty_steps = largest_weight_difference(checkpoint_weights(framework, two / "checkpoint-00001.ckpt"),
                                            checkpoint_weights(framework, one / "checkpoint-00001.ckpt"))
    assert after_twenty_steps <= FREE_RUNNING_TOLERANCE

    uninterrupted = losses(two)
    for run_dir in (two, one):
        (run_dir / "checkpoint-00002.ckpt").unlink()  # as if killed during epoch 2
    train_on(1, framework, two, *TWO_EPOCHS_OF_TWENTY_STEPS, "--resume")  # a two-device checkpoint on one device
    train_on(2, framework, one, *TWO_EPOCHS_OF_TWENTY_STEPS, "--resume")  # and back
    for run_dir in (two, one):
        assert [row["epoch"] for row in runfiles.read_metrics(run_dir)] == [1, 2]
        np.testing.assert_allclose(losses(run_dir), uninterrupted, rtol=0, atol=FREE_RUNNING_TOLERANCE)


@pytest.mark.slow
@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_float64_runs_on_two_devices_and_on_one_end_the_same(framework, cifar10, tmp_path):
    """20 free-running steps: without float32's rounding for Adam to amplify, the runs are one run."""
    arguments = [*SHORT, "--max-train-examples", "640", "--epochs", "1", "--precision", "float64"]
    two, one = tmp_path / "two-devices", tmp_path / "one-device"
    train_on(2, framework, two, *arguments)
    # Its own process, even for Flax: float64 switches JAX to 64-bit for the whole process.
    run_together(([sys.executable, f"scripts/train_{framework}.py", *arguments, "--out", str(one)],
                  {"OMP_NUM_THREADS": "1"}))
    assert json.loads((two / "summary.json").read_text())["precision"] == "float64"
    np.testing.assert_allclose(losses(two), losses(one), rtol=0, atol=FLOAT64_TOLERANCE)
    weights = [float64_weights(framework, run_dir / "checkpoint-00001.ckpt") for run_dir in (two, one)]
    assert weights[0]["stem.conv.weight"].dtype == np.float64
    assert largest_weight_difference(*weights) <= FLOAT64_TOLERANCE


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_more_devices_than_the_run_has_are_refused_saying_how_to_get_them(framework, cifar10, tmp_path):
    with pytest.raises(TrainingError, match="--devices 64: .*(torchrun --nproc_per_node 64|XLA_FLAGS)"):
        train(framework, tmp_path, "--epochs", "1", "--devices", "64")


def test_a_global_batch_the_processes_cannot_share_equally_is_refused(monkeypatch):
    from torch_reference.train import TorchBackend

    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun --nproc_per_node 2 says; refused before joining a group
    preset = get_preset("tiny")
    with pytest.raises(TrainingError, match="divisible by the 2 processes, found 31; pass a --batch-size"):
        TorchBackend(preset.model, dataclasses.replace(preset.train, batch_size=31), steps_per_epoch=1, seed=0,
                     device="cpu")


def test_the_scaled_batchnorm_biases_are_found_after_the_multi_gpu_conversion():
    from torch_reference.model import ExpertCNN
    from torch_reference.train import parameter_groups

    preset = get_preset("tiny")
    recipe = dataclasses.replace(preset.train, norm_bias_lr_scale=64.0)
    # What data_parallel does to the model on GPUs; the conversion itself runs on the CPU.
    model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(ExpertCNN(preset.model))
    groups = parameter_groups(model, recipe)
    names = {id(p): name for name, p in model.named_parameters()}
    assert sorted(names[id(p)] for p in groups[1]["params"]) == sorted(portable.norm_bias_names(preset.model))
    assert groups[1]["lr"] == 64.0 * recipe.learning_rate
    assert len(groups[0]["params"]) + len(groups[1]["params"]) == len(names)


@pytest.mark.parametrize("processes", [1, 2, 3, 4])
def test_the_processes_parts_tile_the_global_batch_in_rank_order(processes):
    from torch_reference.distributed import World

    batch = np.arange(12)
    parts = [batch[World(rank, processes).part(len(batch))] for rank in range(processes)]
    np.testing.assert_array_equal(np.concatenate(parts), batch)
    assert {len(part) for part in parts} == {len(batch) // processes}
