"""Evaluate any checkpoint with either framework: train with one, test with the other.

    python scripts/evaluate.py --checkpoint results/torch-seed-1epoch/checkpoint-00001.ckpt --framework flax
    python scripts/evaluate.py --checkpoint results/flax-fast-22 --framework both

Loads a training checkpoint of either framework, a portable .safetensors file or a run directory
(its weights.safetensors, else its newest checkpoint), ports the
weights, and prints test accuracy and the number of correct images for each framework asked for,
evaluating as the run did (its final attention temperature, test-time views and test images), in
float32 whatever precision the run trained in.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from data import DataError, load_cifar10
from expert_core.flags import refuse_an_unwritable_json, refuse_counts_below_one
from expert_core.report import LOAD_ERRORS
from expert_core.runfiles import write_json
from expert_core.training import subset_index
from flax_expert.train import FlaxBackend
from parity.convert import EvaluationWeights, load_for_evaluation
from torch_reference.train import TorchBackend


BACKENDS = {"torch": TorchBackend, "flax": FlaxBackend}


def predict(framework: str, weights: EvaluationWeights, images) -> np.ndarray:
    backend = BACKENDS[framework].from_canonical(weights.tensors, weights.config, weights.recipe)
    return backend.predict(images, weights.temperature, weights.recipe.test_time_translate).logits


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help=".ckpt (torch or flax), .safetensors or a run directory")
    parser.add_argument("--framework", choices=("torch", "flax", "both"), default="both")
    parser.add_argument("--data", help="CIFAR-10 location (default: CIFAR10_PATH)")
    parser.add_argument("--max-test-examples", type=int, help="the fixed random N test images a training run's "
                        "--max-test-examples N evaluates (default: the run's own, all for a run without one)")
    parser.add_argument("--json", help="write the results here as JSON")
    args = parser.parse_args(argv)
    refuse_counts_below_one(parser, args, ("max_test_examples",))
    refuse_an_unwritable_json(parser, args.json)
    try:
        weights = load_for_evaluation(args.checkpoint)  # evaluated as the run's own final evaluation was
        dataset = load_cifar10(args.data)
    except (*LOAD_ERRORS, DataError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    cap = weights.max_test_examples if args.max_test_examples is None else args.max_test_examples
    index = subset_index(len(dataset.test_labels), cap)
    images, labels = dataset.test_images[index], dataset.test_labels[index]
    frameworks = ("torch", "flax") if args.framework == "both" else (args.framework,)
    results, predictions = {"checkpoint": args.checkpoint, "written_by": weights.origin}, {}
    for framework in frameworks:
        predictions[framework] = predict(framework, weights, images).argmax(1)
        correct = int((predictions[framework] == labels).sum())
        results[framework] = {"correct": correct, "test_accuracy": 100 * correct / len(labels)}
        print(f"{weights.origin} checkpoint evaluated by {framework}: {correct} / {len(labels)} "
              f"correct = {results[framework]['test_accuracy']:.2f} %")
    if len(predictions) == 2:
        results["predictions_differing"] = int((predictions["torch"] != predictions["flax"]).sum())
        print(f"images whose predicted class differs between the frameworks: {results['predictions_differing']}")
    if args.json:
        write_json(Path(args.json), results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
