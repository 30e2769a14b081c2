"""One-off: one chunk of each seed block's aggregated merge, forward, taken apart (median of 31 calls,
each its own jitted program): the patches, the per-image kernels, the batched dot; against the whole
merge of the batch.

    PYTHONPATH=. python results/benchmark/amd-avx512-head/chunk_pieces.py
"""
import jax
import jax.numpy as jnp
import numpy as np

from expert_core.config import get_preset
from flax_expert.model import batch_chunk, extract_patches, image_elements, merge_aggregated
from scripts.benchmark import block_shapes
from timing import median_ms

rng = np.random.default_rng(0)


for _, side, _, c_in, c_out in block_shapes(get_preset("seed").model, 128):
    x = jnp.asarray(rng.standard_normal((128, side, side, c_in), np.float32))
    kernels = jnp.asarray(rng.standard_normal((4, 3, 3, c_in, c_out), np.float32))
    attention = jnp.asarray(rng.dirichlet(np.ones(4), 128).astype(np.float32))
    chunk = batch_chunk(128, image_elements(x, 3, c_out, own_kernel=True))
    x_chunk, a_chunk = x[:chunk], attention[:chunk]
    patches = jax.jit(lambda x: extract_patches(x, 3))
    per_image = jax.jit(lambda a: (a @ kernels.reshape(4, -1)).reshape(len(a), 9 * c_in, c_out))
    dot = jax.jit(lambda p, w: jnp.einsum("npq,nqo->npo", p, w))
    merge = jax.jit(merge_aggregated)
    p, w = patches(x_chunk), per_image(a_chunk)
    times = [median_ms(lambda: patches(x_chunk).block_until_ready(), 31),
             median_ms(lambda: per_image(a_chunk).block_until_ready(), 31),
             median_ms(lambda: dot(p, w).block_until_ready(), 31)]
    chunks, whole = 128 // chunk, median_ms(lambda: merge(x, kernels, attention).block_until_ready(), 31)
    print(f"{c_in}->{c_out} {side}x{side}, chunks of {chunk}: patches {times[0]:.2f}, kernels {times[1]:.2f}, "
          f"dot {times[2]:.2f} ms ({2 * chunk * side * side * 9 * c_in * c_out / times[2] / 1e6:.0f} GFLOP/s) a chunk; "
          f"x {chunks} = {chunks * sum(times):.1f} ms; the whole merge {whole:.1f} ms",
          flush=True)
