"""The expert-block CNN as Flax Linen modules, the same network as ../shared/spec/ARCHITECTURE.md.

NHWC throughout. Variable names are the Flax side of the canonical rule table in
expert_core.portable: the K expert kernels of a block are one param `blocks_{i}/kernels` of shape
(K, k, k, C, C'), shared by all three merge computations.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from expert_core.config import (DEFAULT_MERGE, MIN_CHUNK_IMAGES, BlockConfig, ModelConfig, block_merge, check_merge,
                                check_raw_images, cpu_chunk_images, normalisation_table)

_NORMALISED = normalisation_table()

# PyTorch's initialisation, so both frameworks start from the same distributions.
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
expert_kernels_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal", batch_axis=(0,))
dense_kernel_init = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")


def dense_bias_init(fan_in: int):
    bound = 1 / np.sqrt(fan_in)
    return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


def to_model_input(images) -> jax.Array:
    """uint8 NHWC images -> float32 NHWC, ((x / 255) - mean) / std looked up per value."""
    images = jnp.asarray(images)
    check_raw_images(images.dtype, images.shape)  # a float index would fail obscurely, an int one clamp silently
    return jnp.asarray(_NORMALISED)[images, jnp.arange(3)]


def batch_statistics(x):
    """Per-channel mean and biased variance over N, H and W."""
    mean = x.mean(axis=(0, 1, 2))
    return mean, jnp.square(x - mean).mean(axis=(0, 1, 2))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def normalise_by_batch(x, scale, bias, epsilon: float):
    """Train-mode BatchNorm: x normalised by its own batch statistics, then scaled and shifted.

    The gradient is written by hand (`_normalise_by_batch_backward`): autodiff of the forward pass
    walks the batch-sized tensors once per term. Train step on a 2-core Intel Xeon, both versions
    alternating in one process: seed 370 -> 341 ms, fast 1956 -> 1856 ms (medians;
    results/benchmark/README.md).
    """
    return _normalise_by_batch_forward(x, scale, bias, epsilon)[0]


def _normalise_by_batch_forward(x, scale, bias, epsilon: float):
    mean, var = batch_statistics(x)
    inv_std = jax.lax.rsqrt(var + epsilon)
    return (x - mean) * inv_std * scale + bias, (x, mean, inv_std, scale)


def _normalise_by_batch_backward(epsilon: float, residuals, dy):
    # The textbook gradient, the batch statistics' dependence on x included: two channel sums of one
    # pass over (dy, x), then one element-wise pass.
    x, mean, inv_std, scale = residuals
    normalised = (x - mean) * inv_std
    dbias = dy.sum(axis=(0, 1, 2))
    dscale = (dy * normalised).sum(axis=(0, 1, 2))
    n = x.size // x.shape[-1]
    dx = (scale * inv_std) * (dy - (dbias + normalised * dscale) / n)
    return dx, dscale, dbias


normalise_by_batch.defvjp(_normalise_by_batch_forward, _normalise_by_batch_backward)


class BatchNorm(nn.Module):
    """BatchNorm with PyTorch's conventions, the project's one choice for both frameworks.

    Train mode normalises with the biased batch variance and updates the running statistics as
    `new = (1 - m) * old + m * batch` with PyTorch's momentum m, storing the UNBIASED variance
    (n / (n - 1)) as torch.nn.BatchNorm2d does; Flax's own BatchNorm stores the biased one.
    """

    momentum: float
    epsilon: float

    @nn.compact
    def __call__(self, x, train: bool):
        channels = x.shape[-1]
        running_mean = self.variable("batch_stats", "mean", jnp.zeros, (channels,), jnp.float32)
        running_var = self.variable("batch_stats", "var", jnp.ones, (channels,), jnp.float32)
        scale = self.param("scale", nn.initializers.ones, (channels,))
        bias = self.param("bias", nn.initializers.zeros, (channels,))
        if not train:
            return (x - running_mean.value) * jax.lax.rsqrt(running_var.value + self.epsilon) * scale + bias
        n = x.size // channels
        if n < 2:
            raise ValueError(f"BatchNorm in training needs more than one value per channel, found input of shape "
                             f"{x.shape}; train on a larger batch or a model with fewer pooling blocks.")
        if not self.is_initializing():
            mean, var = jax.lax.stop_gradient(batch_statistics(x))
            running_mean.value = (1 - self.momentum) * running_mean.value + self.momentum * mean
            running_var.value = (1 - self.momentum) * running_var.value + self.momentum * var * (n / (n - 1))
        return normalise_by_batch(x, scale, bias, self.epsilon)


def conv2d(x, kernel):
    """Stride 1, symmetric zero padding k // 2 (PyTorch's, never 'SAME'), NHWC x HWIO."""
    p = kernel.shape[0] // 2
    return jax.lax.conv_general_dilated(x, kernel, (1, 1), ((p, p), (p, p)),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def extract_patches(x, k: int):
    """(N, H, W, C) -> (N, H*W, k*k*C), ordered (dy, dx, c) like a flattened HWIO kernel.

    Built from k*k shifted slices of the padded input: its gradient (`_patches_backward`) is slices
    and adds, which XLA:CPU runs far faster than a convolution's weight gradient.
    """
    n, h, w, c = x.shape
    p = k // 2
    padded = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
    shifted = [padded[:, dy:dy + h, dx:dx + w, :] for dy in range(k) for dx in range(k)]
    return jnp.concatenate(shifted, axis=-1).reshape(n, h * w, k * k * c)


def _patches_forward(x, k: int):
    return extract_patches(x, k), x.shape


def _patches_backward(k: int, x_shape, d_patches):
    # Pixel (i, j) went into output pixel (i - dy + p, j - dx + p) as tap (dy, dx): the sum of k*k
    # windows of the gradient padded once. Autodiff pads each tap's slice instead, and XLA:CPU fuses
    # those pads into one loop it cannot vectorise: seed-preset train step on a 2-core AMD EPYC (AVX2),
    # alternating in one process, 309 -> 300 ms (medians of 60).
    n, h, w, c = x_shape
    p, q = k // 2, k - 1 - k // 2
    padded = jnp.pad(d_patches.reshape(n, h, w, k * k, c), ((0, 0), (q, p), (q, p), (0, 0), (0, 0)))
    windows = [padded[:, k - 1 - dy:k - 1 - dy + h, k - 1 - dx:k - 1 - dx + w, dy * k + dx]
               for dy in range(k) for dx in range(k)]
    return (sum(windows),)


extract_patches.defvjp(_patches_forward, _patches_backward)


def batch_chunk(n: int, elements_per_image: int) -> int:
    """Images per chunk within the element budget (or MIN_CHUNK_IMAGES, when more): the largest divisor
    of n, so that no chunk needs padding; unless that divisor is below MIN_CHUNK_IMAGES (n = 7, 10) or
    needs over twice the chunks the budget does (n = 4 x 37 under a budget of 20 images: 37 chunks of
    4). Then as few chunks as the budget allows, as even as can be, the last one padded by
    `in_batch_chunks`. All n off the CPU."""
    if jax.default_backend() != "cpu":
        return n
    limit = min(n, cpu_chunk_images(elements_per_image))
    divisor = max(d for d in range(1, limit + 1) if n % d == 0)
    fewest_chunks = -(-n // limit)
    if divisor >= min(MIN_CHUNK_IMAGES, n) and n // divisor <= 2 * fewest_chunks:
        return divisor
    return -(-n // fewest_chunks)


# XLA:CPU runs a small dot (one image's, up to about 256 rows) on one thread, and one chunk's thunks in a
# step of the loop form a chain, each waiting for the last; two chunks side by side are two independent
# chains, which its thunk executor runs on both cores at once. Seed preset, forward + backward on the
# 2-core AMD EPYC (AVX2), chunks of 8: blocks_1 (16x16) 49.1 -> 42.0 ms, blocks_2 (8x8) 50.1 -> 36.1 ms;
# sixteen images a step in one chain took 49.8 / 47.8 ms, so the gain is the second chain. Train step,
# in-process A/B: 238 -> 224 ms, and 255 ms with the 32x32 convolutions (stem, blocks_0), whose dots
# XLA already threads, side by side too (results/benchmark/amd-avx2-side-by-side/).
SIDE_BY_SIDE_MAX_ROWS = 256
SIDE_BY_SIDE_CHUNKS = 2


def chunks_side_by_side(n_chunks: int, rows_per_image: int) -> int:
    """How many chunks each step of the chunk loop computes as independent chains: SIDE_BY_SIDE_CHUNKS
    for images of at most SIDE_BY_SIDE_MAX_ROWS pixels when it divides n_chunks, else 1."""
    if rows_per_image <= SIDE_BY_SIDE_MAX_ROWS and n_chunks % SIDE_BY_SIDE_CHUNKS == 0:
        return SIDE_BY_SIDE_CHUNKS
    return 1


def in_batch_chunks(compute, elements_per_image: int, *batched):
    """compute(*batched) for a per-image computation on NHWC images (batched[0]), run chunk by chunk
    over the batch (lax.map), `chunks_side_by_side` chunks a step.

    A whole batch's patches (151 MB for 128 images at 32x32x32) stream through memory at XLA:CPU's
    copy speed, which made them most of the train step; a chunk's (or two side by side) stay in cache.
    Each chunk is rematerialised in the backward pass (jax.checkpoint): storing every chunk's patches
    for the gradient would bring back the whole-batch tensor this avoids.
    """
    n, height, width = batched[0].shape[:3]
    chunk = batch_chunk(n, elements_per_image)
    if chunk == n:
        return compute(*batched)
    padded = -(-n // chunk) * chunk
    if padded > n:  # zero images fill the last chunk: each image's result depends on that image alone
        batched = [jnp.pad(b, [(0, padded - n)] + [(0, 0)] * (b.ndim - 1)) for b in batched]
    side = chunks_side_by_side(padded // chunk, height * width)
    steps = [b.reshape(padded // (side * chunk), side, chunk, *b.shape[1:]) for b in batched]

    def step(args):
        return jnp.stack([jax.checkpoint(compute)(*(a[i] for a in args)) for i in range(side)])

    y = jax.lax.map(step, steps)
    return y.reshape(padded, *y.shape[3:])[:n]


def image_elements(x, k: int, c_out: int, own_kernel: bool) -> int:
    """What one image brings to a chunk: its patches and output, and its kernel if it has its own
    (the aggregated merge; seed preset, block 2: 74 K kernel elements against 37 K of patches)."""
    h, w, c = x.shape[1:]
    return h * w * (k * k * c + c_out) + (k * k * c * c_out if own_kernel else 0)


def conv2d_as_matmul(x, kernel):
    """`conv2d` computed as patches @ kernel: XLA:CPU runs the dot's gradients far faster."""
    k, c_out = kernel.shape[0], kernel.shape[-1]

    def compute(x):
        n, h, w, _ = x.shape
        return (extract_patches(x, k) @ kernel.reshape(-1, c_out)).reshape(n, h, w, c_out)

    return in_batch_chunks(compute, image_elements(x, k, c_out, own_kernel=False), x)


def pool_windows(x):
    """(N, H, W, C) -> (N, H // 2, 2, W // 2, 2, C), a free reshape; an odd last row or column is
    dropped, as in PyTorch. Takes numpy arrays too."""
    n, h, w, c = x.shape
    return x[:, :h - h % 2, :w - w % 2].reshape(n, h // 2, 2, w // 2, 2, c)


@jax.custom_vjp
def max_pool_2x2(x):
    """2x2 max-pool, stride 2, whose gradient goes to the first maximum of each window in row-major
    order, as PyTorch's does (a plain max would split ties); a NaN in a window is its maximum and takes
    the gradient (the last NaN, when several), as in PyTorch.

    Windows are a reshape, so the gradient is one select over the input's own layout: seed-preset train
    step on a 2-core AMD EPYC (AVX2), alternating in one process, 368 -> 339 ms (median) against four
    strided slices, whose gradient XLA:CPU fused into pads it could not vectorise.
    """
    return pool_windows(x).max(axis=(2, 4))


def _max_pool_forward(x):
    y = max_pool_2x2(x)
    return y, (x, y)


def _max_pool_backward(residuals, dy):
    x, y = residuals
    windows = pool_windows(x)
    rank = jnp.arange(4).reshape(2, 1, 2, 1)  # row-major position within the window
    # PyTorch's scan keeps the first maximum and then any later NaN: the last NaN wins, else the first max.
    score = jnp.where(jnp.isnan(windows), -1 - rank, jnp.where(windows == y[:, :, None, :, None], rank, 4))
    winner = score == score.min(axis=(2, 4), keepdims=True)
    dx = jnp.where(winner, dy[:, :, None, :, None], 0).astype(x.dtype).reshape(
        x.shape[0], 2 * y.shape[1], 2 * y.shape[2], x.shape[3])
    return (jnp.pad(dx, ((0, 0), (0, x.shape[1] % 2), (0, x.shape[2] % 2), (0, 0))),)


max_pool_2x2.defvjp(_max_pool_forward, _max_pool_backward)


def in_dtype(compute, dtype, *operands):
    """Run `compute` on the operands cast to `dtype` and hand back at least float32 (BatchNorm's input):
    bfloat16 convolutions feed a float32 BatchNorm, parity's float64 ones a float64 BatchNorm."""
    return compute(*(o.astype(dtype) for o in operands)).astype(jnp.promote_types(dtype, jnp.float32))


def merge_branches(x, kernels, attention):
    return sum(attention[:, k, None, None, None] * conv2d(x, kernels[k]) for k in range(kernels.shape[0]))


def merge_stacked(x, kernels, attention):
    experts, k, _, c_in, c_out = kernels.shape
    stacked = jnp.moveaxis(kernels, 0, 3).reshape(k, k, c_in, experts * c_out)
    y = conv2d(x, stacked).reshape(*x.shape[:3], experts, c_out)
    return jnp.einsum("nk,nhwko->nhwo", attention, y)


def merge_aggregated(x, kernels, attention):
    # One kernel per sample, W_n = sum_k a_nk W_k: a batched matmul over patches, 1x the conv FLOPs.
    experts, k, _, c_in, c_out = kernels.shape

    def compute(x, attention):
        n, h, w, _ = x.shape
        per_sample = (attention @ kernels.reshape(experts, -1)).reshape(n, k * k * c_in, c_out)
        return jnp.einsum("npq,nqo->npo", extract_patches(x, k), per_sample).reshape(n, h, w, c_out)

    return in_batch_chunks(compute, image_elements(x, k, c_out, own_kernel=True), x, attention)


def relu(module: nn.Module, x):
    """ReLU that keeps its input in the "intermediates" collection when that is mutable (a no-op
    otherwise): parity.checks.gradient_checks reads there which signs the compiled pass decided."""
    module.sow("intermediates", "relu_input", x)
    return nn.relu(x)


MERGES = {"branches": merge_branches, "stacked": merge_stacked, "aggregated": merge_aggregated}


class PatchConvKernel(nn.Module):
    """Holds an HWIO conv kernel at `<name>/kernel`, where nn.Conv keeps it, for the rule table."""

    shape: tuple[int, int, int, int]

    @nn.compact
    def __call__(self):
        return self.param("kernel", conv_init, self.shape)


class Stem(nn.Module):
    """Conv k x k (no bias, symmetric padding) -> BatchNorm -> ReLU."""

    config: ModelConfig
    compute_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        k = self.config.kernel_size
        kernel = PatchConvKernel((k, k, x.shape[-1], self.config.stem_channels), name="conv")()
        bn = BatchNorm(self.config.bn_momentum, self.config.bn_eps, name="bn")
        return relu(self, bn(in_dtype(conv2d_as_matmul, self.compute_dtype, x, kernel), train))


def _dense(features: int, fan_in: int, name: str) -> nn.Dense:
    return nn.Dense(features, kernel_init=dense_kernel_init, bias_init=dense_bias_init(fan_in), name=name)


class ExpertBranch(nn.Module):
    """GAP -> FC(C -> max(C // r, 4)) -> ReLU -> FC(-> K) -> softmax(z / T)."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x, temperature):
        c = x.shape[-1]
        hidden = self.config.expert_hidden(c)
        h = relu(self, _dense(hidden, c, "fc1")(x.mean(axis=(1, 2))))
        z = _dense(self.config.num_experts, hidden, "fc2")(h)
        return jax.nn.softmax(z / temperature, axis=-1)


class ExpertBlock(nn.Module):
    config: ModelConfig
    block: BlockConfig
    merge: str
    compute_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool, temperature):
        k = self.config.kernel_size
        attention = ExpertBranch(self.config, name="expert")(x, temperature)
        kernels = self.param("kernels", expert_kernels_init,
                             (self.config.num_experts, k, k, x.shape[-1], self.block.out_channels))
        merge = MERGES[block_merge(self.merge, *x.shape[1:3], self.block.out_channels, "flax")]
        y = in_dtype(merge, self.compute_dtype, x, kernels, attention)
        y = BatchNorm(self.config.bn_momentum, self.config.bn_eps, name="bn")(y, train)
        if self.block.residual:
            y = y + x
        y = relu(self, y)
        if self.block.pool:
            y = max_pool_2x2(y)
        return y, attention


class Classifier(nn.Module):
    """GAP -> [Dense -> ReLU -> Dropout] -> Dense(num_classes)."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x, train: bool):
        x = x.mean(axis=(1, 2))
        if self.config.classifier_hidden:
            x = relu(self, _dense(self.config.classifier_hidden, x.shape[-1], "hidden")(x))
            x = nn.Dropout(self.config.dropout, deterministic=not train)(x)
        return _dense(self.config.num_classes, x.shape[-1], "out")(x)


class ExpertCNN(nn.Module):
    config: ModelConfig
    merge: str = DEFAULT_MERGE
    compute_dtype: Any = jnp.float32  # bfloat16: the convolutions only (see expert_core.config.PRECISIONS)

    @nn.compact
    def __call__(self, x, train: bool, temperature=None, return_attention: bool = False):
        temperature = self.config.temperature if temperature is None else temperature
        check_merge(self.merge)
        x = Stem(self.config, self.compute_dtype, name="stem")(x, train)
        attention = []
        for i, block in enumerate(self.config.blocks):
            x, a = ExpertBlock(self.config, block, self.merge, self.compute_dtype, name=f"blocks_{i}")(
                x, train, temperature)
            attention.append(a)
        logits = Classifier(self.config, name="classifier")(x, train)
        return (logits, attention) if return_attention else logits


def init_variables(model: ExpertCNN, key: jax.Array) -> dict:
    """The model's initial variables, drawn by one jitted program with the non-partitionable threefry.

    XLA:CPU compiles JAX's default, partitionable threefry slowly here: the `fast` preset's init took
    12.9 s to compile with it and 4.6 s without (21.5 s eagerly, op by op; 2-core AMD EPYC, AVX2),
    paid by every process that builds a model. The weights are drawn once, on one device, and placed
    afterwards, so partitioning the draws buys nothing.
    """
    with jax.threefry_partitionable(False):
        return jax.jit(model.init, static_argnames="train")(key, jnp.zeros((1, 32, 32, 3), jnp.float32), train=False)
