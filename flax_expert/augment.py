"""The seed's augmentations on the device, inside jit: JAX draws, the shared pixel maths of `data.augment`."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from data.augment import AugmentParams, apply_augmentation
from expert_core.config import AugmentConfig


def draw_augment_params(key: jax.Array, n: int, config: AugmentConfig) -> AugmentParams:
    """The same distributions as data.augment.draw_augment_params, from a JAX key."""
    flip, crop, jitter, angle = jax.random.split(key, 4)
    strengths = jnp.array([config.brightness, config.contrast, config.saturation], jnp.float32)
    factors = 1 + strengths[:, None] * jax.random.uniform(jitter, (3, n), jnp.float32, -1.0, 1.0)
    max_angle = math.radians(config.rotation_degrees)
    return AugmentParams(
        flip=jax.random.bernoulli(flip, 0.5, (n,)) if config.flip else jnp.zeros(n, bool),
        crop_offset=jax.random.randint(crop, (n, 2), 0, 2 * config.crop_padding + 1, jnp.int32),
        brightness=factors[0], contrast=factors[1], saturation=factors[2],
        angle=jax.random.uniform(angle, (n,), jnp.float32, -max_angle, max_angle),
    )


def augment_batch(images: jax.Array, key: jax.Array, config: AugmentConfig) -> jax.Array:
    params = draw_augment_params(key, images.shape[0], config)
    return apply_augmentation(images, params, config.crop_padding, jnp)
