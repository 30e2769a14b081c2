"""One-off: forward-only pieces of the seed preset's step at batch 128, median of 31: the stem's conv,
each block's aggregated merge, and each block's BatchNorm (eval) -> ReLU -> 2x2 max-pool.

    PYTHONPATH=. python results/benchmark/amd-avx512-head/forward_pieces.py flax|torch
"""
import sys

import numpy as np

from expert_core.config import get_preset
from scripts.benchmark import block_shapes
from timing import median_ms

FRAMEWORK = sys.argv[1]
BLOCKS = [(c_in, c_out, side) for _, side, _, c_in, c_out in block_shapes(get_preset("seed").model, 128)]
rng = np.random.default_rng(0)


def flax_pieces():
    import jax
    import jax.numpy as jnp

    from flax_expert.model import conv2d_as_matmul, max_pool_2x2, merge_aggregated

    stem, merge = jax.jit(conv2d_as_matmul), jax.jit(merge_aggregated)
    bn_relu_pool = jax.jit(lambda y, scale, bias: max_pool_2x2(jax.nn.relu(y * scale + bias)))
    x, kernel = jnp.asarray(rng.standard_normal((128, 32, 32, 3), np.float32)), jnp.ones((3, 3, 3, 32))
    yield "stem conv", lambda: stem(x, kernel).block_until_ready()
    for c_in, c_out, side in BLOCKS:
        x = jnp.asarray(rng.standard_normal((128, side, side, c_in), np.float32))
        kernels = jnp.asarray(rng.standard_normal((4, 3, 3, c_in, c_out), np.float32))
        attention = jnp.asarray(rng.dirichlet(np.ones(4), 128).astype(np.float32))
        y = jnp.asarray(rng.standard_normal((128, side, side, c_out), np.float32))
        yield f"merge {c_in}->{c_out} {side}x{side}", lambda: merge(x, kernels, attention).block_until_ready()
        yield f"bn-relu-pool {c_out} {side}x{side}", lambda: bn_relu_pool(y, jnp.ones(c_out), jnp.zeros(c_out)
                                                                           ).block_until_ready()


def torch_pieces():
    import torch
    import torch.nn.functional as F

    from torch_reference.model import merge_aggregated

    torch.set_grad_enabled(False)
    x, kernel = torch.randn(128, 3, 32, 32), torch.ones(32, 3, 3, 3)
    yield "stem conv", lambda: F.conv2d(x, kernel, padding=1)
    for c_in, c_out, side in BLOCKS:
        x, kernels = torch.randn(128, c_in, side, side), torch.randn(4, c_out, c_in, 3, 3)
        attention = torch.softmax(torch.randn(128, 4), 1)
        y, bn = torch.randn(128, c_out, side, side), torch.nn.BatchNorm2d(c_out).eval()
        yield f"merge {c_in}->{c_out} {side}x{side}", lambda: merge_aggregated(x, kernels, attention, 1)
        yield f"bn-relu-pool {c_out} {side}x{side}", lambda: F.max_pool2d(F.relu(bn(y)), 2)


for name, run in (flax_pieces if FRAMEWORK == "flax" else torch_pieces)():
    print(f"{FRAMEWORK} {name} fwd {median_ms(run, 31):.1f} ms", flush=True)
