"""Classify your own images with a trained expert-block CNN: top-3 classes and each block's attention.

    python scripts/predict.py --checkpoint results/flax-seed-1epoch/checkpoint-00001.ckpt cat.jpg ship.png
    python scripts/predict.py --checkpoint results/torch-seed-1epoch photos/*.jpg --json predictions.json

The checkpoint is a .ckpt from either train script, a portable .safetensors file, or a run directory
(its weights.safetensors, else its newest checkpoint). The model runs in Flax on the CPU, at the
temperature and with the test-time views the run's own evaluation used. A file that cannot be used
gets its own error and the others are still classified; the exit status is 1 if any file failed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from expert_core.flags import refuse_an_unwritable_json
from expert_core.report import IMAGE_POLICY, LOAD_ERRORS, ReportError, format_record, prediction_record, read_image
from expert_core.runfiles import write_json


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=IMAGE_POLICY)
    parser.add_argument("--checkpoint", required=True, help=".ckpt (torch or flax), .safetensors or a run directory")
    parser.add_argument("images", nargs="+", metavar="IMAGE")
    parser.add_argument("--json", help="also write every file's result (or error) here as JSON")
    args = parser.parse_args(argv)
    refuse_an_unwritable_json(parser, args.json)
    try:
        backend, temperature, translate, description = load_model(args.checkpoint)
    except LOAD_ERRORS as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(description)
    records = classify(backend, temperature, translate, args.images)
    for record in records:
        if record["ok"]:
            print(format_record(record))
        else:
            print(f"error: {record['error']}", file=sys.stderr)
    if args.json:
        write_json(Path(args.json), records)
    return 0 if all(record["ok"] for record in records) else 1


def load_model(checkpoint: str):
    from flax_expert.train import FlaxBackend
    from parity.convert import load_for_evaluation

    weights = load_for_evaluation(checkpoint)
    recipe = weights.recipe
    backend = FlaxBackend.from_canonical(weights.tensors, weights.config, recipe)
    return backend, weights.temperature, recipe.test_time_translate, (
        f"{weights.path}: {weights.origin} weights, run in Flax at temperature {weights.temperature:g}, "
        f"test-time flip {'on' if recipe.test_time_flip else 'off'}, translate {recipe.test_time_translate} px")


def classify(backend, temperature: float, translate: int, paths: list[str]) -> list[dict]:
    """One record per path, in order: the prediction, or the error that kept the file out."""
    records, images, positions = [], [], []
    for path in paths:
        try:
            image, notes = read_image(path)
        except ReportError as error:
            records.append({"file": path, "ok": False, "error": str(error)})
            continue
        positions.append(len(records))
        records.append({"file": path, "notes": notes})
        images.append(image)
    if images:
        predictions = backend.predict(np.stack(images), temperature, translate)
        for i, position in enumerate(positions):
            records[position] = prediction_record(paths[position], predictions.logits[i],
                                                  [a[i] for a in predictions.attention], records[position]["notes"])
    return records


if __name__ == "__main__":
    sys.exit(main())
