"""The jitted Flax training pieces: one compile per shape, external batches, optimiser transforms."""

import dataclasses

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from data import augment as numpy_augment
from expert_core.config import AugmentConfig, BlockConfig, ModelConfig, TrainConfig
from expert_core.training import TrainingError
from flax_expert import train as flax_train
from flax_expert.augment import augment_batch, draw_augment_params
from flax_expert.model import init_variables

CONFIG = ModelConfig(stem_channels=6, blocks=(BlockConfig(6), BlockConfig(10)), num_experts=2)
RECIPE = TrainConfig(batch_size=16, epochs=2, step_size_epochs=1)


def batch(n, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, n)


def test_no_recompilation_across_steps_temperatures_and_a_partial_eval_batch():
    backend = flax_train.FlaxBackend(CONFIG, RECIPE, steps_per_epoch=4, seed=0)
    # The first step and prediction compile, unless an earlier test in this process did; none after may.
    float(backend.train_step(*batch(16), 0, 5.0)[0])
    backend.predict(batch(7)[0], 5.0)
    train_before = flax_train.augmented_train_step._cache_size()
    eval_before = flax_train.eval_step._cache_size()
    for step, temperature in enumerate([3.0, 1.0, 1.0, 1.0], start=1):
        float(backend.train_step(*batch(16, step), step, temperature)[0])
    predictions = backend.predict(batch(flax_train.EVAL_BATCH + 37)[0], 1.0)
    assert predictions.logits.shape == (flax_train.EVAL_BATCH + 37, 10)
    assert flax_train.augmented_train_step._cache_size() == train_before
    assert flax_train.eval_step._cache_size() == eval_before


@pytest.mark.parametrize("config", [CONFIG, dataclasses.replace(CONFIG, classifier_hidden=8, dropout=0.5)],
                         ids=["no-dropout", "dropout"])
def test_external_numpy_batches_train_and_match_the_augmenting_step_without_augmentation(config):
    """The parity entry point: an already augmented batch, as numpy, gives the same step, dropout masks
    included."""
    quiet = dataclasses.replace(RECIPE, augment=dataclasses.replace(
        RECIPE.augment, flip=False, crop_padding=0, brightness=0, contrast=0, saturation=0, rotation_degrees=0))
    model = flax_train.ExpertCNN(config)
    images, labels = batch(16)
    first = flax_train.create_train_state(model, quiet, 4, jax.random.PRNGKey(0))
    second = flax_train.create_train_state(model, quiet, 4, jax.random.PRNGKey(0))
    first, a = flax_train.train_step(first, images, labels, 1.0, quiet.label_smoothing)
    second, b = flax_train.augmented_train_step(second, images, labels, 1.0, quiet.augment, quiet.label_smoothing)
    assert float(a["loss"]) == float(b["loss"])
    for x, y in zip(jax.tree.leaves(first.params), jax.tree.leaves(second.params)):
        np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-9)  # two compiled graphs, fused differently


def test_adam_l2_is_weight_decay_added_to_the_gradient_before_adam():
    params = {"w": jnp.array([1.0, -2.0, 3.0])}
    grads = {"w": jnp.array([0.1, 0.2, -0.3])}
    recipe = TrainConfig(weight_decay=0.1, learning_rate=0.01)
    ours = flax_train.create_optimizer(recipe, steps_per_epoch=10)
    reference = optax.adam(0.01)  # Adam on the L2-augmented gradient g + w * p
    l2_grads = jax.tree.map(lambda g, p: g + 0.1 * p, grads, params)
    ours_update, _ = ours.update(grads, ours.init(params), params)
    ref_update, _ = reference.update(l2_grads, reference.init(params), params)
    np.testing.assert_allclose(ours_update["w"], ref_update["w"], rtol=1e-6)
    adamw = flax_train.create_optimizer(dataclasses.replace(recipe, optimizer="adamw"), steps_per_epoch=10)
    decoupled, _ = adamw.update(grads, adamw.init(params), params)
    assert not np.allclose(decoupled["w"], ours_update["w"])


def test_a_lookahead_step_keeps_float32_weights_float32_where_x64_is_on():
    recipe = dataclasses.replace(RECIPE, lookahead_period=1)
    with jax.enable_x64(True):
        state = flax_train.create_train_state(flax_train.ExpertCNN(CONFIG), recipe, 4, jax.random.PRNGKey(0))
        state, _ = flax_train.train_step(state, *batch(16), 1.0, recipe.label_smoothing,
                                         flax_train.lookahead_of(recipe, 4))
    assert {leaf.dtype for leaf in jax.tree.leaves((state.params, state.slow))} == {jnp.dtype(jnp.float32)}


def test_scaled_batchnorm_biases_without_their_paths_are_refused():
    with pytest.raises(ValueError, match="norm_bias_paths"):
        flax_train.create_optimizer(dataclasses.replace(RECIPE, norm_bias_lr_scale=8.0), 10)


def test_a_process_count_that_is_not_a_number_is_named(monkeypatch):
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "localhost:1234")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "two")
    with pytest.raises(TrainingError, match="JAX_NUM_PROCESSES='two': expected a whole number"):
        flax_train.initialize_multihost()


def test_only_batchnorm_biases_take_the_scaled_learning_rate():
    params = init_variables(flax_train.ExpertCNN(CONFIG), jax.random.PRNGKey(0))["params"]
    grads = jax.tree.map(jnp.ones_like, params)
    recipe = TrainConfig(optimizer="sgd_nesterov", lr_schedule="step", learning_rate=0.1, weight_decay=0.0)
    paths = flax_train.norm_bias_paths(CONFIG)

    def first_update(scale):
        tx = flax_train.create_optimizer(dataclasses.replace(recipe, norm_bias_lr_scale=scale), 10, paths)
        return flax.traverse_util.flatten_dict(tx.update(grads, tx.init(params), params)[0])

    plain, scaled = first_update(1.0), first_update(8.0)
    assert set(paths) <= set(plain) and len(paths) == 1 + len(CONFIG.blocks)
    for path, update in plain.items():
        np.testing.assert_allclose(scaled[path], update * (8.0 if path in paths else 1.0), rtol=1e-6, err_msg=path)


def test_on_device_augmentation_is_deterministic_per_key_and_keeps_dtype():
    images, _ = batch(8)
    key = jax.random.PRNGKey(3)
    a = jax.jit(augment_batch, static_argnums=2)(images, key, RECIPE.augment)
    b = jax.jit(augment_batch, static_argnums=2)(images, key, RECIPE.augment)
    c = jax.jit(augment_batch, static_argnums=2)(images, jax.random.PRNGKey(4), RECIPE.augment)
    assert a.dtype == jnp.uint8 and a.shape == images.shape
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_on_device_draws_follow_the_distributions_of_the_numpy_draws_pytorch_uses():
    """Flax trains on JAX draws, PyTorch on numpy's: the same support and the same quantiles."""
    config = AugmentConfig(crop_padding=3, brightness=0.2, contrast=0.3, saturation=0.4, rotation_degrees=15)
    n = 20_000
    on_device = jax.jit(draw_augment_params, static_argnums=(1, 2))(jax.random.PRNGKey(0), n, config)
    on_host = numpy_augment.draw_augment_params(np.random.default_rng(0), n, config)
    for name in ("flip", "crop_offset"):
        drawn, expected = np.asarray(getattr(on_device, name)).ravel(), getattr(on_host, name).ravel()
        values = np.unique(expected)
        assert np.array_equal(np.unique(drawn), values), name
        frequencies = [np.mean(d[:, None] == values, axis=0) for d in (drawn, expected)]
        np.testing.assert_allclose(*frequencies, atol=0.015, err_msg=name)
    bounds = {"brightness": (0.8, 1.2), "contrast": (0.7, 1.3), "saturation": (0.6, 1.4),
              "angle": (-np.radians(15), np.radians(15))}
    for name, (low, high) in bounds.items():
        drawn, expected = np.asarray(getattr(on_device, name)), getattr(on_host, name)
        assert drawn.dtype == expected.dtype == np.float32, name
        span = high - low
        assert low - 1e-6 <= drawn.min() < low + 0.01 * span and high - 0.01 * span < drawn.max() <= high + 1e-6, name
        quantiles = np.linspace(0, 1, 21)
        np.testing.assert_allclose(np.quantile(drawn, quantiles), np.quantile(expected, quantiles),
                                   atol=0.02 * span, err_msg=name)
    flip_off = draw_augment_params(jax.random.PRNGKey(0), 64, dataclasses.replace(config, flip=False))
    assert not np.asarray(flip_off.flip).any()


def test_device_flag_rejects_a_missing_gpu():
    if any(d.platform == "gpu" for d in jax.devices()):
        pytest.skip("a GPU is present")
    with pytest.raises(TrainingError, match="--device cuda"):
        flax_train.resolve_devices("cuda")


def test_device_flag_refuses_a_gpu_index_and_says_how_to_pick_gpus():
    with pytest.raises(TrainingError, match="--device cuda:1: expected cpu, cuda or auto.*CUDA_VISIBLE_DEVICES"):
        flax_train.resolve_devices("cuda:1")
