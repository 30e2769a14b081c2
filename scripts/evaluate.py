"""Evaluate any checkpoint with either framework: train with one, test with the other.

    python scripts/evaluate.py --checkpoint results/torch-seed-1epoch/checkpoint-00001.ckpt --framework flax
    python scripts/evaluate.py --checkpoint weights.safetensors --framework both

Loads a training checkpoint of either framework or a portable .safetensors file, ports the
weights, and prints test accuracy and the number of correct images for each framework asked for,
evaluating as the run did (its final attention temperature and test-time views).
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from data import load_cifar10
from expert_core.config import TrainConfig
from expert_core.report import evaluation_settings
from flax_expert.train import FlaxBackend
from parity.convert import canonical_to_torch, load_any_checkpoint
from torch_reference.train import TorchBackend


def predict_torch(tensors, config, images, temperature: float, recipe: TrainConfig) -> np.ndarray:
    backend = TorchBackend(config, recipe, steps_per_epoch=1, seed=0, device="cpu")
    backend.model.load_state_dict(canonical_to_torch(tensors, config))
    return backend.predict(images, temperature, recipe.test_time_translate).logits


def predict_flax(tensors, config, images, temperature: float, recipe: TrainConfig) -> np.ndarray:
    return FlaxBackend.from_canonical(tensors, config, recipe).predict(
        images, temperature, recipe.test_time_translate).logits


PREDICTORS = {"torch": predict_torch, "flax": predict_flax}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--framework", choices=("torch", "flax", "both"), default="both")
    parser.add_argument("--data", help="CIFAR-10 location (default: CIFAR10_PATH)")
    parser.add_argument("--json", help="write the results here as JSON")
    args = parser.parse_args(argv)

    tensors, config, origin = load_any_checkpoint(args.checkpoint)
    temperature, recipe = evaluation_settings(args.checkpoint, config)  # as the run's own evaluation did
    dataset = load_cifar10(args.data)
    frameworks = ("torch", "flax") if args.framework == "both" else (args.framework,)
    results, predictions = {"checkpoint": args.checkpoint, "written_by": origin}, {}
    for framework in frameworks:
        logits = PREDICTORS[framework](tensors, config, dataset.test_images, temperature, recipe)
        predictions[framework] = logits.argmax(1)
        correct = int((predictions[framework] == dataset.test_labels).sum())
        results[framework] = {"correct": correct, "test_accuracy": 100 * correct / len(dataset.test_labels)}
        print(f"{origin} checkpoint evaluated by {framework}: {correct} / {len(dataset.test_labels)} correct "
              f"= {results[framework]['test_accuracy']:.2f} %")
    if len(predictions) == 2:
        results["predictions_differing"] = int((predictions["torch"] != predictions["flax"]).sum())
        print(f"images whose predicted class differs between the frameworks: {results['predictions_differing']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
