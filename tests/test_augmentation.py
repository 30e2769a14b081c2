"""The seed's augmentations in numpy (data.augment), and the same pixel maths under jax.numpy and torch."""

import dataclasses
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from data.augment import (AugmentParams, apply_augmentation, augment_batch, draw_augment_params, evaluation_views,
                          translate_images)
from expert_core.config import AugmentConfig

OFF = AugmentConfig(flip=False, crop_padding=0, brightness=0, contrast=0, saturation=0, rotation_degrees=0)


def images(n=16, seed=0, size=32):
    return np.random.default_rng(seed).integers(1, 256, (n, size, size, 3), dtype=np.uint8)


def params(n, **changes):
    base = dict(flip=np.zeros(n, bool), crop_offset=np.zeros((n, 2), np.int32), brightness=np.ones(n, np.float32),
                contrast=np.ones(n, np.float32), saturation=np.ones(n, np.float32), angle=np.zeros(n, np.float32))
    return AugmentParams(**{**base, **changes})


def test_shape_dtype_and_determinism():
    x = images()
    a = augment_batch(x, np.random.default_rng(1), AugmentConfig())
    b = augment_batch(x, np.random.default_rng(1), AugmentConfig())
    c = augment_batch(x, np.random.default_rng(2), AugmentConfig())
    assert a.shape == x.shape and a.dtype == np.uint8
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_everything_off_is_the_identity():
    x = images()
    assert np.array_equal(augment_batch(x, np.random.default_rng(0), OFF), x)


def test_flip_is_an_exact_mirror_and_both_outcomes_occur():
    x = images(32)
    out = augment_batch(x, np.random.default_rng(0), dataclasses.replace(OFF, flip=True))
    mirrored = [np.array_equal(o, i[:, ::-1]) for o, i in zip(out, x)]
    kept = [np.array_equal(o, i) for o, i in zip(out, x)]
    assert all(m or k for m, k in zip(mirrored, kept)) and any(mirrored) and any(kept)


def test_crop_is_an_exact_shift_with_zeros_entering():
    x = images(32)
    out = augment_batch(x, np.random.default_rng(0), dataclasses.replace(OFF, crop_padding=4))
    shifts = set()
    for o, i in zip(out, x):
        padded = np.pad(i, ((4, 4), (4, 4), (0, 0)))
        matches = [(dy, dx) for dy in range(9) for dx in range(9)
                   if np.array_equal(o, padded[dy:dy + 32, dx:dx + 32])]
        assert matches, "every output is a window of the zero-padded input"
        shifts.add(matches[0])
    assert len(shifts) > 5


def test_rotation_by_a_quarter_turn_is_rot90_clockwise():
    x = images(2)
    out = apply_augmentation(x, params(2, angle=np.full(2, math.pi / 2, np.float32)), 0, np)
    # out[y, x] = in[-x, y] about the centre: with rows drawn downwards a positive angle turns the
    # picture clockwise, np.rot90 with k=-1. (Angles are drawn symmetrically, so either sense serves.)
    np.testing.assert_array_equal(out, np.rot90(x, k=-1, axes=(1, 2)))


def test_colour_jitter_moves_values_as_named():
    """Against torchvision's definitions in float64: brightness scales, saturation 0 is the ITU-R 601
    luma in every channel, contrast 0 is each image's mean luma everywhere."""
    x = images(4)
    luma = x.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    expected = {"brightness": np.clip(np.round(x * 1.2), 0, 255),  # x * 6/5 never ends in .5: no rounding tie
                "saturation": np.repeat(np.round(luma)[..., None], 3, axis=-1),
                "contrast": np.broadcast_to(np.round(luma.mean((1, 2)))[:, None, None, None], x.shape)}
    got = {factor: apply_augmentation(x, params(4, **{factor: np.full(4, value, np.float32)}), 0, np)
           for factor, value in (("brightness", 1.2), ("saturation", 0.0), ("contrast", 0.0))}
    np.testing.assert_array_equal(got["brightness"], expected["brightness"])
    for factor in ("saturation", "contrast"):  # float32 against float64: a value near .5 may round either way
        off_by = np.abs(got[factor].astype(int) - expected[factor])
        assert off_by.max() <= 1 and (off_by != 0).mean() < 1e-3, factor


def test_jax_runs_the_same_pixel_maths():
    jnp = pytest.importorskip("jax.numpy")
    x = images(16)
    p = draw_augment_params(np.random.default_rng(3), 16, AugmentConfig())
    expected = apply_augmentation(x, p, 4, np)
    got = np.asarray(apply_augmentation(jnp.asarray(x), AugmentParams(*map(jnp.asarray, p)), 4, jnp))
    differs = got.astype(int) - expected.astype(int)
    assert np.abs(differs).max() <= 1 and (differs != 0).mean() < 1e-3  # float rounding at .5 only


def test_torch_runs_the_same_pixel_maths_bit_for_bit_on_the_cpu():
    torch = pytest.importorskip("torch")
    from torch_reference.train import augment_on_device

    x = images(64)
    p = draw_augment_params(np.random.default_rng(3), 64, AugmentConfig())
    got = augment_on_device(x, p, 4, torch.device("cpu"))
    assert got.dtype == torch.uint8
    np.testing.assert_array_equal(got.numpy(), apply_augmentation(x, p, 4, np))


def is_flipped_and_shifted(out, x, padding: int) -> bool:
    """Whether `out` is `x`, mirrored or not, shifted by at most `padding` pixels with zeros entering."""
    shifts = range(-padding, padding + 1)
    return any(np.array_equal(translate_images(view[None], dy, dx, np)[0], out)
               for view in (x, x[:, ::-1]) for dy in shifts for dx in shifts)


@settings(max_examples=25, deadline=None, derandomize=True)
@given(n=st.integers(1, 5), size=st.sampled_from([8, 16, 32]), seed=st.integers(0, 2**32 - 1),
       rotation=st.floats(0, 180), padding=st.integers(0, 6), jitter=st.floats(0, 0.9),
       geometric_only=st.booleans())
def test_any_batch_keeps_its_shape_and_flip_and_crop_only_move_pixels(n, size, seed, rotation, padding, jitter,
                                                                      geometric_only):
    if geometric_only:
        rotation = jitter = 0.0
    config = AugmentConfig(crop_padding=padding, brightness=jitter, contrast=jitter, saturation=jitter,
                           rotation_degrees=rotation)
    x = images(n, seed % 1000, size)
    out = augment_batch(x, np.random.default_rng(seed), config)
    assert out.shape == x.shape and out.dtype == np.uint8
    if geometric_only:  # every pixel is one of the input's, or a zero let in by the crop
        assert all(is_flipped_and_shifted(o, i, padding) for o, i in zip(out, x))


@pytest.mark.parametrize("dy, dx", [(1, 1), (-1, -1), (2, -3)])
def test_translation_shifts_content_with_zero_fill_like_a_fixed_crop(dy, dx):
    x = images(4)
    shifted = translate_images(x, dy, dx, np)
    padding = max(abs(dy), abs(dx))
    crop = np.broadcast_to(np.array([padding - dy, padding - dx], np.int32), (4, 2))
    np.testing.assert_array_equal(shifted, apply_augmentation(x, params(4, crop_offset=crop), padding, np))
    assert shifted[:, 5 + dy, 7 + dx].tolist() == x[:, 5, 7].tolist()


def test_translation_is_the_same_under_jax_and_zero_is_the_identity():
    import jax.numpy as jnp

    x = images(4)
    np.testing.assert_array_equal(np.asarray(translate_images(jnp.asarray(x), -1, -1, jnp)),
                                  translate_images(x, -1, -1, np))
    assert translate_images(x, 0, 0, np) is x


@pytest.mark.parametrize("translate", [0, 1, 2])
def test_evaluation_views_weigh_to_one_with_the_unshifted_image_first(translate):
    views = evaluation_views(translate)
    assert views[0][:2] == (0, 0) and math.isclose(sum(w for _, _, w in views), 1.0)
    assert {(dy, dx) for dy, dx, _ in views[1:]} == ({(translate, translate), (-translate, -translate)}
                                                      if translate else set())
