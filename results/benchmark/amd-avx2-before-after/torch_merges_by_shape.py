"""One-off: PyTorch's three merges, forward + backward, at the `fast` preset's expert-block shapes
(batch 128, K=4), interleaved, medians of 6 after one warm-up. Run from the repository root:
    GLIBC_TUNABLES=glibc.malloc.hugetlb=1 .venv/bin/python results/benchmark/amd-avx2-before-after/torch_merges_by_shape.py
"""
import statistics
import time

import torch

from torch_reference.model import merge_aggregated, merge_branches, merge_stacked

torch.manual_seed(0)
for n, c_in, c_out, h in [(128, 32, 64, 32), (128, 64, 64, 16), (128, 64, 256, 16), (128, 256, 256, 8),
                          (128, 256, 256, 4)]:
    x = torch.randn(n, c_in, h, h, requires_grad=True)
    kernels = torch.randn(4, c_out, c_in, 3, 3, requires_grad=True)
    attention = torch.softmax(torch.randn(n, 4), 1).requires_grad_()
    merges = {"branches": merge_branches, "stacked": merge_stacked, "aggregated": merge_aggregated}
    times = {name: [] for name in merges}
    for _ in range(7):
        for name, merge in merges.items():
            start = time.perf_counter()
            y = merge(x, kernels, attention, 1)
            y.backward(torch.ones_like(y))
            times[name].append(time.perf_counter() - start)
    print(f"({n},{c_in},{h},{h}) -> {c_out}: "
          + " | ".join(f"{name} {1e3 * statistics.median(t[1:]):6.1f} ms" for name, t in times.items()), flush=True)
