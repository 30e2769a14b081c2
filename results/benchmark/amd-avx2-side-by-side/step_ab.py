"""The Flax train step with one chunk a loop step (SIDE_BY_SIDE_CHUNKS = 1, the code before), with the
module's side-by-side chunks (images of at most SIDE_BY_SIDE_MAX_ROWS pixels), and with every chunked
convolution side by side, all compiled in one process and timed alternately.

    python step_ab.py seed 120
"""
import itertools
import sys
import time

import jax
import numpy as np

from expert_core.config import get_preset
from expert_core.runfiles import cpu_name
from flax_expert import model as flax_model
from flax_expert import train as flax_train


def main():
    preset, rounds = get_preset(sys.argv[1]), int(sys.argv[2])
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(128, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, size=128)
    side_by_side, max_rows = flax_model.SIDE_BY_SIDE_CHUNKS, flax_model.SIDE_BY_SIDE_MAX_ROWS
    variants = {"1 chunk a loop step": (1, max_rows), f"{side_by_side} side by side up to {max_rows} pixels":
                (side_by_side, max_rows), f"{side_by_side} side by side, every image size": (side_by_side, 32 * 32)}
    steps = {}
    for name, (side, rows) in variants.items():
        # Both are read when the step is traced, at its first call.
        flax_model.SIDE_BY_SIDE_CHUNKS, flax_model.SIDE_BY_SIDE_MAX_ROWS = side, rows
        backend = flax_train.FlaxBackend(preset.model, preset.train, steps_per_epoch=1000, seed=0, merge="auto",
                                         device="cpu", precision="float32", devices=1)
        counter = itertools.count()
        steps[name] = lambda b=backend, c=counter: jax.block_until_ready(b.train_step(images, labels, next(c), 1.0))
        steps[name]()
        steps[name]()
    seconds = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            seconds[name].append(time.perf_counter() - start)
    print(f"{cpu_name()}; {preset.name} train step, batch 128, median [quartiles] of {rounds} alternating:")
    for name, s in seconds.items():
        print(f"  {name}: {1e3 * np.median(s):.0f} ms "
              f"[{1e3 * np.percentile(s, 25):.0f}-{1e3 * np.percentile(s, 75):.0f}]")


if __name__ == "__main__":
    main()
