"""Compiles seed block 2's merge, forward + backward, with 1 or 2 chunks of 8 images a loop step, and
two independent half-matmuls alone; XLA:CPU logs each thunk graph it builds (thunk count, and whether
it runs them one after another).

    TF_CPP_MIN_LOG_LEVEL=0 TF_CPP_VMODULE=thunk_executor=2 JAX_ENABLE_COMPILATION_CACHE=false \
        python thunk_graphs.py 2>&1 | grep -o "^== .*\|Constructed ThunkExecutor with .*" | uniq -c
"""
import functools
import sys

import jax
import jax.numpy as jnp
import numpy as np

from side_by_side_blocks import merge_side_by_side


def main():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(128, 16, 16, 32)), jnp.float32)
    kernels = jnp.asarray(rng.normal(size=(4, 3, 3, 32, 64)), jnp.float32)
    attention = jax.nn.softmax(jnp.asarray(rng.normal(size=(128, 4)), jnp.float32))
    for side in (1, 2):
        print(f"== {side} chunk(s) of 8 a loop step", file=sys.stderr, flush=True)
        merge = functools.partial(merge_side_by_side, side=side, chunk=8)
        step = jax.jit(jax.value_and_grad(lambda x, k, a: jnp.sum(merge(x, k, a) ** 2), argnums=(0, 1, 2)))
        jax.block_until_ready(step(x, kernels, attention))
    print("== two independent half-matmuls (8 x 256x288 @ 288x64, split in two)", file=sys.stderr, flush=True)
    patches = jnp.asarray(rng.normal(size=(8, 256, 288)), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(8, 288, 64)), jnp.float32)
    halves = jax.jit(lambda p, w: (jnp.einsum("npq,nqo->npo", p[:4], w[:4]), jnp.einsum("npq,nqo->npo", p[4:], w[4:])))
    jax.block_until_ready(halves(patches, kernel))


if __name__ == "__main__":
    main()
