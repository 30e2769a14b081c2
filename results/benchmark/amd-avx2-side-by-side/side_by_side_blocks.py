"""One seed block's aggregated merge, forward + backward, with G chunks of C images side by side in each
step of the chunk loop ("GxC"), all variants interleaved in one process.

    python side_by_side_blocks.py 16,32,64 "1x8 2x4 2x8 1x16 4x4 4x8"   # height,in,out; variants
"""
import functools
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from expert_core.runfiles import cpu_name
from flax_expert import model as flax_model


def merge_side_by_side(x, kernels, attention, side, chunk):
    """flax_expert.model.merge_aggregated itself, with its chunk rules fixed to `side` chunks of `chunk`
    images a loop step while it is traced."""
    rules = flax_model.batch_chunk, flax_model.chunks_side_by_side
    flax_model.batch_chunk, flax_model.chunks_side_by_side = (lambda n, elements: chunk), (lambda n, rows: side)
    try:
        return flax_model.merge_aggregated(x, kernels, attention)
    finally:
        flax_model.batch_chunk, flax_model.chunks_side_by_side = rules


def main():
    size, c_in, c_out = (int(v) for v in sys.argv[1].split(","))
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(128, size, size, c_in)), jnp.float32)
    kernels = jnp.asarray(rng.normal(size=(4, 3, 3, c_in, c_out)) * 0.05, jnp.float32)
    attention = jax.nn.softmax(jnp.asarray(rng.normal(size=(128, 4)), jnp.float32))
    fns = {}
    for spec in sys.argv[2].split():
        side, chunk = map(int, spec.split("x"))
        merge = functools.partial(merge_side_by_side, side=side, chunk=chunk)
        fns[spec] = jax.jit(jax.value_and_grad(lambda x, k, a, merge=merge: jnp.sum(merge(x, k, a) ** 2),
                                               argnums=(0, 1, 2)))
        jax.block_until_ready(fns[spec](x, kernels, attention))
    wall, busy = {s: [] for s in fns}, {s: [] for s in fns}
    for _ in range(20):
        for spec, fn in fns.items():
            start, cpu = time.perf_counter(), time.process_time()
            jax.block_until_ready(fn(x, kernels, attention))
            wall[spec].append(time.perf_counter() - start)
            busy[spec].append(time.process_time() - cpu)
    print(f"{cpu_name()}; {size}x{size}, {c_in} -> {c_out} channels, batch 128, forward + backward, "
          "median of 20 interleaved (cores busy):")
    for spec in fns:
        seconds = np.median(wall[spec])
        print(f"  {spec:>5}: {1e3 * seconds:6.1f} ms ({np.median(busy[spec]) / seconds:.2f})")


if __name__ == "__main__":
    main()
