"""The seed's four augmentations: flip, zero-pad random crop, colour jitter, rotation.

The pixel maths (`apply_augmentation`) is written once against an array-API namespace `xp`, so
numpy (parity batches), jax.numpy (Flax, inside jit) and `array_api_compat.torch`
(PyTorch training, on its device) run the very same operations. Only the random draws differ per
framework: `draw_augment_params` draws them from a numpy Generator (PyTorch moves them to its
device); `flax_expert` draws the same distributions from a JAX key.

Order: crop -> flip -> colour jitter (brightness, contrast, saturation) -> rotation (nearest
neighbour, zero fill). Images are uint8 NHWC in and out.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from expert_core.config import AugmentConfig

# ITU-R 601 luma weights, as PIL's convert("L") uses (torchvision's rgb_to_grayscale rounds the first to 0.2989).
_LUMA = (0.299, 0.587, 0.114)


class AugmentParams(NamedTuple):
    """Per-image random choices for one batch of N images."""

    flip: object  # (N,) bool
    crop_offset: object  # (N, 2) int32: top-left corner (y, x) in the padded image, 0..2*padding
    brightness: object  # (N,) float32 factors
    contrast: object  # (N,) float32 factors
    saturation: object  # (N,) float32 factors
    angle: object  # (N,) float32 radians


def draw_augment_params(rng: np.random.Generator, n: int, config: AugmentConfig) -> AugmentParams:
    def factor(strength):
        return rng.uniform(1 - strength, 1 + strength, n).astype(np.float32)

    max_angle = math.radians(config.rotation_degrees)
    return AugmentParams(
        flip=(rng.random(n) < 0.5) if config.flip else np.zeros(n, bool),
        crop_offset=rng.integers(0, 2 * config.crop_padding + 1, (n, 2)).astype(np.int32),
        brightness=factor(config.brightness),
        contrast=factor(config.contrast),
        saturation=factor(config.saturation),
        angle=rng.uniform(-max_angle, max_angle, n).astype(np.float32),
    )


def augment_batch(images: np.ndarray, rng: np.random.Generator, config: AugmentConfig) -> np.ndarray:
    """Augment a uint8 NHWC batch with choices drawn from `rng` (numpy end to end)."""
    params = draw_augment_params(rng, images.shape[0], config)
    return apply_augmentation(images, params, config.crop_padding, np)


def apply_augmentation(images, params: AugmentParams, padding: int, xp):
    x = _crop_and_flip(images, params, padding, xp)
    x = _colour_jitter(xp.astype(x, xp.float32), params, xp)
    x = xp.astype(xp.clip(xp.round(x), 0, 255), xp.uint8)
    return _rotate(x, params.angle, xp)


def _gather(images, rows, cols, valid, xp):
    """out[n, i, j] = images[n, rows[n, i, j], cols[n, i, j]] where valid, else 0."""
    n, h, w, c = images.shape
    flat = images.reshape(n, h * w, c)
    index = xp.clip(rows, 0, h - 1) * w + xp.clip(cols, 0, w - 1)
    picked = xp.take_along_axis(flat, index.reshape(n, h * w, 1), axis=1).reshape(n, h, w, c)
    return xp.where(valid[..., None], picked, xp.zeros_like(picked))


def _crop_and_flip(images, params: AugmentParams, padding: int, xp):
    n, h, w, _ = images.shape
    i = xp.arange(h).reshape(1, h, 1)
    j = xp.arange(w).reshape(1, 1, w)
    j = xp.where(params.flip.reshape(n, 1, 1), w - 1 - j, j)
    # A crop of the zero-padded image is a shifted read of the original; outside it reads zero.
    rows = i + params.crop_offset[:, 0].reshape(n, 1, 1) - padding
    cols = j + params.crop_offset[:, 1].reshape(n, 1, 1) - padding
    valid = (rows >= 0) & (rows < h) & (cols >= 0) & (cols < w)
    return _gather(images, rows, cols, valid, xp)


def _grayscale(x):
    return (_LUMA[0] * x[..., 0] + _LUMA[1] * x[..., 1] + _LUMA[2] * x[..., 2])[..., None]


def _blend(x, other, factor, xp):
    return xp.clip(factor.reshape(-1, 1, 1, 1) * x + (1 - factor.reshape(-1, 1, 1, 1)) * other, 0, 255)


def _colour_jitter(x, params: AugmentParams, xp):
    x = xp.clip(x * params.brightness.reshape(-1, 1, 1, 1), 0, 255)
    x = _blend(x, xp.mean(_grayscale(x), axis=(1, 2, 3), keepdims=True), params.contrast, xp)
    return _blend(x, _grayscale(x), params.saturation, xp)


def _rotate(images, angle, xp):
    """Rotate each image about its centre by its angle, nearest neighbour, zero fill."""
    n, h, w, _ = images.shape
    cy, cx = (h - 1) / 2, (w - 1) / 2
    y = xp.arange(h, dtype=xp.float32).reshape(1, h, 1) - cy
    x = xp.arange(w, dtype=xp.float32).reshape(1, 1, w) - cx
    cos = xp.cos(angle).reshape(n, 1, 1)
    sin = xp.sin(angle).reshape(n, 1, 1)
    # Inverse map: the output pixel (y, x) reads the input at the point rotated back by -angle.
    # The namespace's default integer, which its gathers take (torch's take_along_dim wants int64).
    index_dtype = xp.arange(1).dtype
    rows = xp.astype(xp.round(cos * y - sin * x + cy), index_dtype)
    cols = xp.astype(xp.round(sin * y + cos * x + cx), index_dtype)
    valid = (rows >= 0) & (rows < h) & (cols >= 0) & (cols < w)
    return _gather(images, rows, cols, valid, xp)


def evaluation_views(translate: int) -> tuple[tuple[int, int, float], ...]:
    """The (dy, dx, weight) views whose weighted logits make a prediction: the image itself and, for
    `translate` > 0, the image shifted diagonally by +-translate pixels. The unshifted view keeps half
    the weight, as in airbench's test-time translation; the weights were not tuned here."""
    if translate == 0:
        return ((0, 0, 1.0),)
    return ((0, 0, 0.5), (translate, translate, 0.25), (-translate, -translate, 0.25))


def predict_over_views(forward, images, translate: int, flip: bool, xp):
    """The weighted logits of `forward` (uint8 NHWC views -> logits, per-block attention) over the test-time
    views, each averaged with its mirror image when `flip`; the attention of the unshifted image."""
    logits, attention = 0.0, None
    for dy, dx, weight in evaluation_views(translate):
        view = translate_images(images, dy, dx, xp)
        view_logits, view_attention = forward(view)
        if flip:
            view_logits = (view_logits + forward(xp.flip(view, axis=2))[0]) / 2
        logits, attention = logits + weight * view_logits, attention or view_attention
    return logits, attention


def translate_images(images, dy: int, dx: int, xp):
    """Shift a uint8 NHWC batch by (dy, dx) pixels with zero fill: a pad-crop at a fixed offset."""
    p = max(abs(dy), abs(dx))
    if p == 0:
        return images
    _, h, w, _ = images.shape
    padded = xp.pad(images, ((0, 0), (p, p), (p, p), (0, 0)))
    return padded[:, p - dy:p - dy + h, p - dx:p - dx + w]
