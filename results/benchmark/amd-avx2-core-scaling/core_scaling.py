"""One-off: how each framework's seed-preset train step, and the batched matmuls of Flax's aggregated
merge (with torch.bmm and numpy's OpenBLAS on the same shapes), speed up from one core to two. Each figure comes from a fresh process pinned with `taskset`
(one core: `-c 0`, two: `-c 0,1`); the rounds alternate the settings. XLA_FLAGS reach every process. Run from the repository root:
    GLIBC_TUNABLES=glibc.malloc.hugetlb=1 .venv/bin/python results/benchmark/amd-avx2-core-scaling/core_scaling.py
"""
import json
import statistics
import subprocess
import sys
import time

import numpy as np

from expert_core.runfiles import cpu_name

STEPS, WARM_UP = 23, 3
# Flax's per-chunk batched matmul, patches @ per-image kernel, in each seed block: (images, pixels, 9 C_in, C_out).
CHUNK_MATMULS = ((4, 1024, 288, 32), (8, 256, 288, 64), (8, 64, 576, 128))


def train_step_ms(framework: str) -> dict:
    from expert_core.config import get_preset
    if framework == "flax":
        from flax_expert.train import FlaxBackend as Backend
    else:
        from torch_reference.train import TorchBackend as Backend
    preset = get_preset("seed")
    backend = Backend(preset.model, preset.train, steps_per_epoch=390, seed=0, device="cpu")
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (128, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, 128).astype(np.int32)
    seconds, cpu_start = [], None
    for step in range(STEPS):
        if step == WARM_UP:
            cpu_start, wall_start = time.process_time(), time.perf_counter()
        start = time.perf_counter()
        float(backend.train_step(images, labels, step, 1.0)[0])
        seconds.append(time.perf_counter() - start)
    busy = (time.process_time() - cpu_start) / (time.perf_counter() - wall_start)
    return {"ms": 1e3 * statistics.median(seconds[WARM_UP:]), "cores_busy": busy}


def matmul_gflops(library: str) -> dict:
    rng = np.random.default_rng(0)
    rates = {}
    for n, p, q, o in CHUNK_MATMULS:
        patches, kernels = rng.standard_normal((n, p, q), np.float32), rng.standard_normal((n, q, o), np.float32)
        if library == "xla":
            import jax
            import jax.numpy as jnp
            product = jax.jit(lambda a, b: jnp.einsum("npq,nqo->npo", a, b))
            a, b = jnp.asarray(patches), jnp.asarray(kernels)
            run = lambda: product(a, b).block_until_ready()  # noqa: E731
        elif library == "torch-bmm":
            import torch
            a, b = torch.from_numpy(patches), torch.from_numpy(kernels)
            run = lambda: torch.bmm(a, b)  # noqa: E731
        else:
            run = lambda: np.matmul(patches, kernels)  # noqa: E731
        for _ in range(20):
            run()
        seconds = []
        for _ in range(200):
            start = time.perf_counter()
            run()
            seconds.append(time.perf_counter() - start)
        rates[f"{p}x{q}@{q}x{o}"] = 2 * n * p * q * o / statistics.median(seconds) / 1e9
    return rates


def child(kind: str) -> None:
    print(json.dumps(train_step_ms(kind) if kind in ("flax", "torch") else matmul_gflops(kind)))


def main(rounds: int = 3) -> None:
    print(f"CPU: {cpu_name()}; {rounds} rounds, one process per figure", flush=True)
    results = {}
    for round_ in range(rounds):
        for kind in ("flax", "torch", "xla", "torch-bmm", "numpy"):
            for cores in ("0", "0,1"):
                out = subprocess.run(["taskset", "-c", cores, sys.executable, __file__, kind],
                                     capture_output=True, text=True, check=True).stdout
                figure = json.loads(out.strip().splitlines()[-1])
                results.setdefault((kind, cores), []).append(figure)
                print(f"round {round_ + 1} {kind:6s} cores {cores}: {figure}", flush=True)
    print("\nmedians over the rounds")
    for (kind, cores), figures in results.items():
        keys = figures[0].keys()
        print(f"{kind:6s} cores {cores:4s} " + "  ".join(
            f"{k} {statistics.median(f[k] for f in figures):.2f}" for k in keys))


if __name__ == "__main__":
    child(sys.argv[1]) if len(sys.argv) > 1 else main()
