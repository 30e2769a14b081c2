"""One-off: the seed preset's three aggregated merges, each alone, forward + backward (the output
and the three gradients, as benchmark.py times them), median of 21.

    PYTHONPATH=. python results/benchmark/amd-avx512-head/merges_by_block.py flax|torch
"""
import sys

import numpy as np

from expert_core.config import get_preset
from scripts.benchmark import block_shapes
from timing import median_ms

FRAMEWORK = sys.argv[1]


def flax_run(x, kernels, attention):
    import jax
    import jax.numpy as jnp

    from flax_expert.model import merge_aggregated

    @jax.jit
    def forward_backward(x, kernels, attention):
        # y is returned too: the gradients of a bilinear merge do not need it, and XLA would drop it.
        y, pullback = jax.vjp(merge_aggregated, x, kernels, attention)
        return y, pullback(jnp.ones_like(y))

    operands = [jnp.asarray(a) for a in (x, kernels, attention)]
    return lambda: jax.block_until_ready(forward_backward(*operands))


def torch_run(x, kernels, attention):
    import torch

    from torch_reference.model import merge_aggregated

    x = torch.tensor(x).permute(0, 3, 1, 2).contiguous().requires_grad_()
    kernels = torch.tensor(kernels).permute(0, 4, 3, 1, 2).contiguous().requires_grad_()
    attention = torch.tensor(attention).requires_grad_()

    def run():
        y = merge_aggregated(x, kernels, attention, 1)
        return y, torch.autograd.grad(y, (x, kernels, attention), torch.ones_like(y))
    return run


rng = np.random.default_rng(0)
for n, side, _, c_in, c_out in block_shapes(get_preset("seed").model, 128):
    x = rng.standard_normal((n, side, side, c_in), np.float32)
    kernels = rng.standard_normal((4, 3, 3, c_in, c_out), np.float32) * 0.1
    attention = rng.dirichlet(np.ones(4), n).astype(np.float32)
    run = (flax_run if FRAMEWORK == "flax" else torch_run)(x, kernels, attention)
    milliseconds = median_ms(run, 21)
    print(f"{FRAMEWORK} ({n},{c_in}->{c_out},{side}x{side}) aggregated fwd+bwd {milliseconds:7.1f} ms", flush=True)
