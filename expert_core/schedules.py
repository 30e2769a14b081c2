"""Learning-rate and temperature schedules, written once for both frameworks.

`learning_rate` takes an array namespace `xp` so that PyTorch (through LambdaLR, with numpy) and
Optax (as a schedule, with jax.numpy inside jit) evaluate the very same formula per optimiser step.
"""

from __future__ import annotations

import numpy as np

from expert_core.config import ModelConfig, TrainConfig


def learning_rate(step, config: TrainConfig, steps_per_epoch: int, xp=np):
    """Learning rate for optimiser step `step` (0-based: the rate used by the step-th update)."""
    if config.lr_schedule == "step":
        # StepLR(step_size=S epochs, gamma) counted in optimiser steps: a staircase exponential decay.
        decays = xp.floor(step / (config.step_size_epochs * steps_per_epoch))
        return config.learning_rate * config.step_gamma ** decays
    total = config.epochs * steps_per_epoch
    warmup = max(int(config.warmup_fraction * total), 1)
    rising = step / warmup
    falling = (total - step) / max(total - warmup, 1)
    return config.learning_rate * xp.clip(xp.minimum(rising, falling), 0.0, 1.0)


def lookahead_sync(step, config: TrainConfig, steps_per_epoch: int):
    """Whether optimiser step `step` (0-based) ends with a lookahead sync: every lookahead_period-th
    step and the last one (so training ends on the average); works on ints and traced arrays."""
    done = step + 1
    return (done % config.lookahead_period == 0) | (done == config.epochs * steps_per_epoch)


def lookahead_decay(step, config: TrainConfig, steps_per_epoch: int):
    """The average's decay at the sync after optimiser step `step`: it rises as the cube of progress
    to lookahead_decay ** lookahead_period, so the average forgets the early weights at once and
    smooths the late ones over a few syncs (airbench: 0.95 ** 5 x progress ** 3)."""
    progress = (step + 1) / (config.epochs * steps_per_epoch)
    return config.lookahead_decay ** config.lookahead_period * progress ** 3


def temperature(epoch: int, model: ModelConfig, train: TrainConfig) -> float:
    """Attention temperature for an epoch: annealed linearly from train.temperature_start, if set."""
    if train.temperature_start <= 0 or train.temperature_anneal_epochs <= 0:
        return model.temperature
    progress = min(epoch / train.temperature_anneal_epochs, 1.0)
    return train.temperature_start + progress * (model.temperature - train.temperature_start)
