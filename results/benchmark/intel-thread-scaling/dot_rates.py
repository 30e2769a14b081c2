"""GFLOP/s of the aggregated merge's per-image matmuls: XLA:CPU's batched dot against torch.bmm.

Every aggregated block of the seed and fast presets computes, per chunk of images (the chunk
flax_expert.model.merge_aggregated picks), three batched matmuls with one kernel per image:
forward P @ W, kernel gradient P^T @ dO and patch gradient dO @ W^T. This times each shape alone,
jitted `jnp.einsum` against `torch.bmm` on the same operands, each framework in its own process
(their thread pools disturb each other), median of 40 calls after warm-up.

    python results/benchmark/intel-thread-scaling/dot_rates.py               # every CPU
    taskset -c 0 python results/benchmark/intel-thread-scaling/dot_rates.py  # one core
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[3]
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]

from benchmark import block_shapes, median_seconds  # noqa: E402
from expert_core.config import PRESETS, block_merge  # noqa: E402
from expert_core.runfiles import cpu_name  # noqa: E402

# Indices: n images, p pixels, q = 9 C patch entries, o = C' outputs.
MATMULS = {"forward": "npq,nqo->npo", "kernel gradient": "npq,npo->nqo", "patch gradient": "npo,nqo->npq"}


def chunk_shapes() -> list[tuple[str, tuple[int, int, int, int]]]:
    """(label, (chunk images, pixels, k k C, C')) of every aggregated block of the seed and fast presets."""
    from flax_expert.model import batch_chunk, image_elements

    shapes, seen = [], set()
    for name in ("seed", "fast"):
        config = PRESETS[name].model
        k = config.kernel_size
        for i, (n, h, w, c_in, c_out) in enumerate(block_shapes(config, 128)):
            if block_merge("auto", h, w, c_out, "flax") == "aggregated":
                chunk = batch_chunk(n, image_elements(np.empty((1, h, w, c_in)), k, c_out, own_kernel=True))
                shape = (chunk, h * w, k * k * c_in, c_out)
                if shape not in seen:
                    seen.add(shape)
                    shapes.append((f"{name} block {i + 1}", shape))
    return shapes


def operands(shape, einsum: str):
    n, p, q, o = shape
    sizes = {"n": n, "p": p, "q": q, "o": o}
    inputs = einsum.split("->")[0].split(",")
    return [[sizes[c] for c in term] for term in inputs]


def median_ms(fn, repeats: int = 40) -> float:
    for _ in range(3):  # warm-up: compilation, allocator, MKL's buffers
        fn()
    return 1000 * median_seconds(fn, repeats)


def measure(framework: str) -> dict:
    rng, rates = np.random.default_rng(0), {}
    if framework == "xla":
        import jax
        import jax.numpy as jnp
    else:
        import torch
    for label, shape in chunk_shapes():
        for matmul, einsum in MATMULS.items():
            a, b = (rng.standard_normal(s, dtype=np.float32) for s in operands(shape, einsum))
            if framework == "xla":
                f = jax.jit(lambda a, b, e=einsum: jnp.einsum(e, a, b))
                a, b = jnp.asarray(a), jnp.asarray(b)
                ms = median_ms(lambda: f(a, b).block_until_ready())
            else:
                # bmm takes (n, i, k) @ (n, k, j): transpose views, as autograd hands them to bmm.
                ta, tb = torch.from_numpy(a), torch.from_numpy(b)
                ta = ta.transpose(1, 2) if einsum.startswith("npq,npo") else ta
                tb = tb.transpose(1, 2) if einsum.endswith("nqo->npq") else tb
                ms = median_ms(lambda: torch.bmm(ta, tb))
            n, p, q, o = shape
            rates[f"{label}|{matmul}"] = 2 * n * p * q * o / ms / 1e6
    return rates


def main() -> None:
    if len(sys.argv) == 2:
        print(json.dumps(measure(sys.argv[1])))
        return
    rates = {fw: json.loads(subprocess.run([sys.executable, __file__, fw], capture_output=True, text=True,
                                           check=True).stdout.splitlines()[-1]) for fw in ("xla", "torch")}
    print(f"CPU: {cpu_name()}, {len(os.sched_getaffinity(0))} usable; GFLOP/s, median of 40 calls")
    print(f"{'block':<13} {'chunk (n, HW, 9C, C_out)':<26} {'matmul':<16} {'XLA':>5} {'torch.bmm':>9}")
    for label, shape in chunk_shapes():
        for matmul in MATMULS:
            key = f"{label}|{matmul}"
            print(f"{label:<13} {str(shape):<26} {matmul:<16} {rates['xla'][key]:5.0f} {rates['torch'][key]:9.0f}")


if __name__ == "__main__":
    main()
