"""One-off: the Flax train step with one chunking constant changed, median of 15 steps after 3.

    PYTHONPATH=. python results/benchmark/amd-avx512-head/step_variants.py VARIANT [PRESET]
"""
import itertools
import sys

import numpy as np

import expert_core.config as config
import flax_expert.model as model

variant = sys.argv[1]
preset = config.get_preset(sys.argv[2] if len(sys.argv) > 2 else "seed")
# Patched before the step is traced, so each variant compiles its own program (one per process).
PATCHES = {"default": lambda: None,
           "side1024": lambda: setattr(model, "SIDE_BY_SIDE_MAX_ROWS", 1024),  # 32x32 chunks side by side too
           "side4": lambda: setattr(model, "SIDE_BY_SIDE_CHUNKS", 4),
           "chunk3m": lambda: setattr(config, "CPU_CHUNK_ELEMENTS", 3_000_000),
           "chunk750k": lambda: setattr(config, "CPU_CHUNK_ELEMENTS", 750_000)}
PATCHES[variant]()

import jax  # noqa: E402

from flax_expert import train as flax_train  # noqa: E402
from timing import median_ms  # noqa: E402

backend = flax_train.FlaxBackend(preset.model, preset.train, steps_per_epoch=1000, seed=0, devices=1)
rng = np.random.default_rng(0)
images = rng.integers(0, 256, (128, 32, 32, 3), np.uint8)
labels = rng.integers(0, 10, 128).astype(np.int32)
steps = itertools.count()


def train():
    jax.block_until_ready(backend.train_step(images, labels, next(steps), 1.0))


median = median_ms(train, 15) / 1e3
print(f"{variant:10s} {preset.name} train step {median * 1e3:7.1f} ms  ({128 / median:6.1f} img/s)", flush=True)
