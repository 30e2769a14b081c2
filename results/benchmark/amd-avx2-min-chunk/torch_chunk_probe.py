"""One-off: PyTorch's aggregated merge at the `fast` preset's 256 -> 256 block shapes (batch 128, K=4),
forward + backward, in chunks of 1-16 images, interleaved, medians (min) of 10 after one warm-up.
Run from the repository root:
    GLIBC_TUNABLES=glibc.malloc.hugetlb=1 .venv/bin/python results/benchmark/amd-avx2-min-chunk/torch_chunk_probe.py
"""
import statistics
import time

import torch

import torch_reference.model as torch_model
from expert_core import config

torch.manual_seed(0)
config.MIN_CHUNK_IMAGES = 1  # the budget alone sets the chunk, as before c25803f
for h in (8, 4):
    x = torch.randn(128, 256, h, h, requires_grad=True)
    kernels = torch.randn(4, 256, 256, 3, 3, requires_grad=True)
    attention = torch.softmax(torch.randn(128, 4), 1).requires_grad_()
    per_image = kernels[0].numel() + x[0].numel() + 256 * x[0, 0].numel()
    times = {chunk: [] for chunk in (1, 2, 4, 8, 16)}
    for _ in range(11):
        for chunk, seen in times.items():
            config.CPU_CHUNK_ELEMENTS = chunk * per_image
            start = time.perf_counter()
            y = torch_model.merge_aggregated(x, kernels, attention, 1)
            y.backward(torch.ones_like(y))
            seen.append(time.perf_counter() - start)
    print(f"(128,256,{h},{h}) -> 256: " + " | ".join(
        f"chunk {chunk}: {1e3 * statistics.median(t[1:]):.0f} [{1e3 * min(t[1:]):.0f}] ms" for chunk, t in times.items()),
        flush=True)
