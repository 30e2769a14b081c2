"""The Flax model: shapes, canonical variable names, attention, the merges, BatchNorm, training."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import expert_core.config as core_config
from expert_core.config import CIFAR10_MEAN, CIFAR10_STD, MERGE_MODES, BlockConfig, ModelConfig
from expert_core.portable import canonical_shapes, flax_to_canonical
from flax_expert import model as flax_model
from flax_expert.model import (BatchNorm, ExpertCNN, batch_chunk, chunks_side_by_side, init_variables,
                               to_model_input)

from model_configs import SHAPE_CONFIGS

MIXED = ModelConfig(stem_channels=6, blocks=(BlockConfig(6, pool=False, residual=True), BlockConfig(10)),
                    num_experts=3, reduction=2, classifier_hidden=12, temperature=1.5)
CONFIGS = {**SHAPE_CONFIGS, "mixed": MIXED}


def inputs(n=6, size=16, seed=1):
    return jax.random.normal(jax.random.PRNGKey(seed), (n, size, size, 3))


def init(config, merge="aggregated"):
    return init_variables(ExpertCNN(config, merge), jax.random.PRNGKey(0))


@pytest.mark.parametrize("name", CONFIGS)
def test_shapes_and_canonical_variable_names(name):
    config = CONFIGS[name]
    variables = init(config)
    logits, attention = ExpertCNN(config).apply(variables, inputs(5), train=False, return_attention=True)
    assert logits.shape == (5, config.num_classes)
    assert [a.shape for a in attention] == [(5, config.num_experts)] * len(config.blocks)
    canonical = flax_to_canonical(variables, config)  # raises on any missing, extra or misshapen variable
    assert {k: v.shape for k, v in canonical.items()} == canonical_shapes(config)
    assert set(variables) == {"params", "batch_stats"}


@pytest.mark.parametrize("train", [True, False])
def test_attention_rows_are_distributions(train):
    variables = init(MIXED)
    (_, attention), _ = ExpertCNN(MIXED).apply(variables, inputs(), train=train, return_attention=True,
                                               mutable=["batch_stats"], rngs={"dropout": jax.random.PRNGKey(2)})
    for a in attention:
        assert (a >= 0).all()
        np.testing.assert_allclose(a.sum(1), 1.0, atol=1e-6)


def loss_and_updates(merge, variables, train):
    def loss(params):
        out, updates = ExpertCNN(MIXED, merge).apply(
            {**variables, "params": params}, inputs(), train=train, return_attention=True,
            mutable=["batch_stats"], rngs={"dropout": jax.random.PRNGKey(5)})
        logits, attention = out
        return jnp.sum(logits ** 2) + sum(jnp.sum(a * jnp.arange(a.shape[1])) for a in attention), \
            (logits, attention, updates)

    (_, aux), grads = jax.value_and_grad(loss, has_aux=True)(variables["params"])
    return aux, grads


@pytest.mark.parametrize("train", [True, False])
def test_the_merges_agree_with_gradients(train):
    variables = init(MIXED)
    reference, reference_grads = loss_and_updates("branches", variables, train)
    for merge in MERGE_MODES[1:]:
        (logits, attention, updates), grads = loss_and_updates(merge, variables, train)
        np.testing.assert_allclose(logits, reference[0], atol=1e-5)
        for a, b in zip(attention, reference[1]):
            np.testing.assert_allclose(a, b, atol=1e-6)
        for a, b in zip(jax.tree.leaves(updates), jax.tree.leaves(reference[2])):
            np.testing.assert_allclose(a, b, atol=1e-5)
        for path, g in jax.tree_util.tree_leaves_with_path(grads):
            ref = _get(reference_grads, path)
            assert float(jnp.abs(g - ref).max() / jnp.abs(ref).max()) <= 1e-5, (merge, path)


def test_auto_merge_aggregates_8x8_images_and_stacks_4x4_ones(record_merges):
    config = ModelConfig(stem_channels=4, blocks=(BlockConfig(6), BlockConfig(8)), num_experts=2)
    x = inputs(size=8)  # block 0 sees 8x8 images, block 1 4x4 ones
    variables = init(config, "branches")
    reference = ExpertCNN(config, "branches").apply(variables, x, train=False)
    seen = record_merges(flax_model)
    np.testing.assert_allclose(ExpertCNN(config, "auto").apply(variables, x, train=False), reference, atol=1e-5)
    assert seen == ["aggregated", "stacked"]


def _get(tree, path):
    for key in path:
        tree = tree[key.key]
    return tree


# MIXED on 16x16 images brings 8,448 elements an image to the stem's chunks (patches and output), 15,684
# to block 0's and 16,924 to block 1's (their own kernels too): 84,480 fits 10, 5 and 4 images, and 10's
# largest divisor up to 4 is 2, below the minimum of 4, so block 1 takes three chunks of 4, the last
# padded with two zero images. 14,000 fits fewer than the minimum, so 4: 6 images go in two even chunks
# of 3, 7 (prime) in two of 4. Every image has 256 rows, so an even number of chunks runs side by side.
@pytest.mark.parametrize("n, budget, chunks, sides", [(10, 84_480, [10, 5, 4], [2, 1]),
                                                      (6, 14_000, [3, 3, 3], [2, 2, 2]),
                                                      (7, 14_000, [4, 4, 4], [2, 2, 2]),
                                                      (6, 10**9, [6, 6, 6], [])])
def test_merges_computed_in_batch_chunks_equal_the_whole_batch(monkeypatch, n, budget, chunks, sides):
    variables = init(MIXED)
    x = inputs(n)

    def loss(params):
        logits, attention = ExpertCNN(MIXED).apply({**variables, "params": params}, x, train=False,
                                                   return_attention=True)
        return jnp.sum(logits ** 2), (logits, attention)

    whole = jax.value_and_grad(loss, has_aux=True)(variables["params"])
    monkeypatch.setattr(core_config, "CPU_CHUNK_ELEMENTS", budget)
    seen, seen_sides = [], []

    def recorded_batch_chunk(n, elements_per_image):
        seen.append(batch_chunk(n, elements_per_image))
        return seen[-1]

    def recorded_sides(n_chunks, rows_per_image):
        seen_sides.append(chunks_side_by_side(n_chunks, rows_per_image))
        return seen_sides[-1]

    monkeypatch.setattr(flax_model, "batch_chunk", recorded_batch_chunk)
    monkeypatch.setattr(flax_model, "chunks_side_by_side", recorded_sides)
    chunked = jax.value_and_grad(loss, has_aux=True)(variables["params"])
    assert seen == chunks
    assert seen_sides == sides
    for a, b in zip(jax.tree.leaves(chunked), jax.tree.leaves(whole)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_chunks_divide_the_batch_unless_that_takes_too_many(monkeypatch):
    monkeypatch.setattr(core_config, "CPU_CHUNK_ELEMENTS", 20 * 1000)  # 20 images of 1000 elements
    assert batch_chunk(128, 1000) == 16  # 8 even chunks against the budget's 7
    assert batch_chunk(148, 1000) == 19  # 8 chunks, the last padded, not 37 even chunks of 4
    assert batch_chunk(3, 10**6) == 3  # fewer images than the minimum: one chunk


def test_only_an_even_number_of_chunks_of_small_images_runs_side_by_side():
    assert chunks_side_by_side(16, 256) == 2
    assert chunks_side_by_side(15, 256) == 1  # an odd chunk would have no partner
    assert chunks_side_by_side(32, 1024) == 1  # XLA splits these images' dots across threads itself


def test_unknown_merge_is_refused():
    with pytest.raises(ValueError, match="merge must be one of"):
        init(MIXED, merge="fused")


def test_batchnorm_running_variance_is_the_unbiased_one():
    x = np.random.default_rng(0).normal(2.0, 3.0, (4, 5, 5, 3)).astype(np.float32)
    bn = BatchNorm(momentum=0.1, epsilon=1e-5)
    variables = bn.init(jax.random.PRNGKey(0), x, train=False)
    y, updates = bn.apply(variables, x, train=True, mutable=["batch_stats"])
    n = 4 * 5 * 5
    flat = x.reshape(n, 3).astype(np.float64)
    np.testing.assert_allclose(updates["batch_stats"]["mean"], 0.1 * flat.mean(0), rtol=1e-5)
    np.testing.assert_allclose(updates["batch_stats"]["var"], 0.9 + 0.1 * flat.var(0, ddof=1), rtol=1e-5)
    normalised = (flat - flat.mean(0)) / np.sqrt(flat.var(0) + 1e-5)  # biased variance in the forward pass
    np.testing.assert_allclose(np.asarray(y).reshape(n, 3), normalised, atol=1e-4)


def test_batchnorm_in_training_refuses_one_value_per_channel_as_pytorch_does():
    x = np.ones((1, 1, 1, 3), np.float32)
    bn = BatchNorm(momentum=0.1, epsilon=1e-5)
    variables = bn.init(jax.random.PRNGKey(0), x, train=False)
    with pytest.raises(ValueError, match=r"more than one value per channel, found input of shape \(1, 1, 1, 3\)"):
        bn.apply(variables, x, train=True, mutable=["batch_stats"])


def test_batchnorm_hand_written_gradient_equals_autodiff_of_the_formula():
    def formula(x, scale, bias):
        mean = x.mean(axis=(0, 1, 2))
        var = jnp.square(x - mean).mean(axis=(0, 1, 2))
        return (x - mean) / jnp.sqrt(var + 1e-5) * scale + bias

    rng = np.random.default_rng(1)
    with jax.enable_x64(True):
        x, dy = rng.normal(2.0, 3.0, (2, 4, 5, 5, 3))
        scale, bias = rng.normal(1.0, 0.5, (2, 3))
        _, by_hand = jax.vjp(lambda *a: flax_model.normalise_by_batch(*a, 1e-5), x, scale, bias)
        _, by_autodiff = jax.vjp(formula, x, scale, bias)
        for a, b in zip(by_hand(dy), by_autodiff(dy)):
            np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("k", [1, 3, 5])
def test_patch_hand_written_gradient_equals_autodiff_of_the_patches(k):
    rng = np.random.default_rng(2)
    with jax.enable_x64(True):
        x = rng.normal(size=(2, 7, 6, 3))
        d_patches = rng.normal(size=(2, 7 * 6, k * k * 3))
        _, by_hand = jax.vjp(lambda x: flax_model.extract_patches(x, k), x)
        _, by_autodiff = jax.vjp(lambda x: flax_model.extract_patches.fun(x, k), x)
        np.testing.assert_allclose(by_hand(d_patches)[0], by_autodiff(d_patches)[0], rtol=1e-12, atol=1e-12)


def test_a_few_adam_steps_reduce_the_loss_on_a_fixed_batch():
    model = ExpertCNN(MIXED)
    variables = init(MIXED)
    x, labels = inputs(8, 16, seed=3), jnp.arange(8) % 10
    tx = optax.adam(1e-2)

    def loss_fn(params, batch_stats):
        logits, updates = model.apply({"params": params, "batch_stats": batch_stats}, x, train=True,
                                      mutable=["batch_stats"], rngs={"dropout": jax.random.PRNGKey(0)})
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), updates["batch_stats"]

    @jax.jit
    def step(params, batch_stats, opt_state):
        (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch_stats)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), batch_stats, opt_state, loss

    params, batch_stats, opt_state = variables["params"], variables["batch_stats"], tx.init(variables["params"])
    losses = []
    for _ in range(40):
        params, batch_stats, opt_state, loss = step(params, batch_stats, opt_state)
        losses.append(float(loss))
    assert losses[-1] < 0.5 * losses[0]


def test_temperature_flattens_attention_and_one_is_the_plain_softmax():
    variables = init(MIXED)

    def attention(temperature):
        return ExpertCNN(MIXED).apply(variables, inputs(), train=False, temperature=temperature,
                                      return_attention=True)[1][0]

    def entropy(a):
        return float(-(a * jnp.log(a)).sum(1).mean())

    assert entropy(attention(8.0)) > entropy(attention(1.0)) > entropy(attention(0.25))
    z = jnp.log(attention(1.0))
    np.testing.assert_allclose(attention(2.0), jax.nn.softmax(z / 2.0), atol=1e-6)


def test_model_input_is_normalised_uint8():
    images = np.random.default_rng(0).integers(0, 256, (2, 5, 4, 3), dtype=np.uint8)
    # The float64 formula rounded once: the closest float32 to the exact value.
    expected = ((images / 255 - np.asarray(CIFAR10_MEAN)) / np.asarray(CIFAR10_STD)).astype(np.float32)
    x = to_model_input(images)
    assert x.dtype == jnp.float32
    np.testing.assert_array_equal(x, expected)
