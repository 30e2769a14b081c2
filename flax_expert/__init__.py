"""The expert-block CNN in JAX/Flax: Linen modules, jitted Optax training, on-device augmentation."""
