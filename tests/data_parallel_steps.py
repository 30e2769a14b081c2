"""Twenty optimiser steps of a single-device backend and a two-device one, each from the same state.

    XLA_FLAGS=--xla_force_host_platform_device_count=2 python tests/data_parallel_steps.py flax OUT.json
    torchrun --standalone --nproc_per_node 2 tests/data_parallel_steps.py torch OUT.json

Both backends take the same real CIFAR-10 batches (tiny preset). Before each compared step the
data-parallel backend is given the single-device state (through state_bytes, so checkpoints move
both ways), which keeps float rounding from compounding over the steps. The comparison starts after
Adam's first step, which the single-device backend takes alone: that update is lr * g / (|g| + eps)
per weight, so for a weight whose gradient is within float noise of zero it is decided by the
noise (up to lr apart; the README's parity section shows the same between frameworks). OUT.json
(written by the main process) holds per compared step the absolute difference of the loss and the
number correct, the relative difference of the gradient norm, and the canonical weights' largest
absolute difference.
"""

import json
import os
import sys
from pathlib import Path
from unittest import mock

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data import load_cifar10  # noqa: E402
from expert_core.config import get_preset  # noqa: E402

COMPARED_STEPS = 20
PRESET = get_preset("tiny")


def single_and_data_parallel(framework: str):
    def make(factory, **options):
        return factory(PRESET.model, PRESET.train, steps_per_epoch=COMPARED_STEPS + 1, seed=0, device="cpu",
                       **options)

    if framework == "flax":
        from flax_expert.train import FlaxBackend
        return make(FlaxBackend, devices=1), make(FlaxBackend)
    from torch_reference.train import TorchBackend
    with mock.patch.dict(os.environ, {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}):
        single = make(TorchBackend)  # a plain single-process backend inside this torchrun process
    return single, make(TorchBackend)


def largest_weight_difference(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    assert a.keys() == b.keys(), sorted(a.keys() ^ b.keys())
    return max(float(np.abs(a[name].astype(np.float64) - b[name]).max()) for name in a)


def main(framework: str, out: Path) -> None:
    dataset = load_cifar10()
    single, parallel = single_and_data_parallel(framework)
    batch = PRESET.train.batch_size
    # Shuffled: an image folder lists its classes one after another, and batches of one label could not
    # show the processes pairing labels with the wrong images.
    order = np.random.default_rng(0).permutation(len(dataset.train_labels))

    def step_of(backend, step):
        index = np.sort(order[step * batch:(step + 1) * batch])
        images, labels = dataset.train_images[index], dataset.train_labels[index]
        return [float(value) for value in backend.train_step(images, labels, step, 1.0)]

    step_of(single, 0)
    rows = []
    for step in range(1, COMPARED_STEPS + 1):
        parallel.load_state_bytes(single.state_bytes())
        (loss, correct, grad_norm), (p_loss, p_correct, p_grad_norm) = step_of(single, step), step_of(parallel, step)
        rows.append({"loss": abs(loss - p_loss), "correct": abs(correct - p_correct),
                     "grad_norm": abs(grad_norm - p_grad_norm) / grad_norm,
                     "weights": largest_weight_difference(single.canonical_weights(), parallel.canonical_weights())})
    if parallel.is_main_process:
        out.write_text(json.dumps({"device": parallel.device, "steps": rows}))


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
