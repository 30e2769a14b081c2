"""Prove that the Flax model and the PyTorch model compute the same thing.

    python scripts/check_parity.py                          # random init, seed preset
    python scripts/check_parity.py --checkpoint runs/torch-seed/checkpoint-00003.ckpt
    python scripts/check_parity.py --json parity.json       # also write the table as JSON

The gradient and trajectory checks train with the preset's recipe, or the checkpoint's own.
Prints one row per check (quantity, max abs diff, tolerance, pass/fail; "report" for a figure shown
but not judged); exits 1 if any fails.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from data import DataError, load_cifar10
from expert_core.config import PRESETS, ModelConfig, TrainConfig, get_preset
from expert_core.flags import refuse_an_unwritable_json, refuse_counts_below_one
from expert_core.report import LOAD_ERRORS
from expert_core.runfiles import write_json
from expert_core.training import subset_index
from parity.checks import run_all
from parity.convert import load_for_evaluation
from torch_reference.model import canonical_to_torch


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    model_source = parser.add_mutually_exclusive_group()  # a checkpoint carries its own model config
    model_source.add_argument("--preset", default="seed", choices=sorted(PRESETS),
                              help="model config (at random init) and recipe")
    model_source.add_argument("--checkpoint", help="a .ckpt from either train script, a portable .safetensors or a "
                         "run directory")
    parser.add_argument("--images", type=int, default=1000, help="real CIFAR-10 test images to compare on")
    parser.add_argument("--steps", type=int, default=20, help="optimiser steps in the trajectory check")
    parser.add_argument("--batch-size", type=int, default=32, help="batch size of the trajectory and gradients")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", help="CIFAR-10 location (default: CIFAR10_PATH)")
    parser.add_argument("--json", help="write the results here as JSON")
    return parser


def model_to_check(args: argparse.Namespace) -> tuple[ModelConfig, TrainConfig, dict | None, str]:
    """Model config, recipe, PyTorch state dict (None: random init) and a description of the weights."""
    if args.checkpoint:
        weights = load_for_evaluation(args.checkpoint)  # its recipe: the one the run trained with
        return (weights.config, weights.recipe, canonical_to_torch(weights.tensors, weights.config),
                f"{weights.origin} checkpoint {weights.path}")
    preset = get_preset(args.preset)
    return preset.model, preset.train, None, f"random init, preset {args.preset}"


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    refuse_counts_below_one(parser, args, ("images", "steps", "batch_size"))
    refuse_an_unwritable_json(parser, args.json)
    if args.batch_size > args.images:  # the batches are drawn from these images without replacement
        parser.error(f"expected --batch-size of at most the {args.images} test images compared on, found "
                     f"{args.batch_size}; lower --batch-size or raise --images.")
    try:
        config, recipe, state_dict, source = model_to_check(args)
        dataset = load_cifar10(args.data)
    except (*LOAD_ERRORS, DataError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    # Spread over the test set: an image folder lists its classes in turn (the first 1000 are airplanes).
    index = subset_index(len(dataset.test_labels), args.images)
    images, labels = dataset.test_images[index], dataset.test_labels[index]
    print(f"parity on {len(images)} CIFAR-10 test images; weights: {source}", flush=True)
    start = time.perf_counter()
    rows = run_all(config, recipe, images, labels, state_dict, steps=args.steps,
                   batch_size=args.batch_size, seed=args.seed)
    print_table(rows)
    failed = [row for row in rows if not row.passed]
    reported = sum(row.tolerance is None for row in rows)
    print(f"{len(rows) - len(failed) - reported} passed, {len(failed)} failed, {reported} reported "
          f"({time.perf_counter() - start:.0f} s)")
    if args.json:
        write_json(Path(args.json), {"weights": source, "images": len(images), "checks": [r.as_dict() for r in rows]})
    return 1 if failed else 0


def print_table(rows) -> None:
    width = max(len(row.quantity) for row in rows)
    print(f"{'quantity':<{width}}  {'max abs diff':>12}  {'tolerance':>9}  result  note")
    for row in rows:
        tolerance, result = ("-", "report") if row.tolerance is None else (
            f"{row.tolerance:.0e}", "pass" if row.passed else "FAIL")
        print(f"{row.quantity:<{width}}  {row.max_abs_diff:>12.3e}  {tolerance:>9}  {result:<6}  {row.note}")


if __name__ == "__main__":
    sys.exit(main())
