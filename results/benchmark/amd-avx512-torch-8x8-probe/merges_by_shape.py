"""One-off: PyTorch's three merges, forward + backward, at expert-block shapes (batch 128, K=4), medians of 11."""
import statistics
import sys
import time

import torch

from torch_reference.model import merge_aggregated, merge_branches, merge_stacked

SHAPES = {"first run": [(128, 256, 256, 8), (128, 64, 256, 16), (128, 256, 256, 4)],
          "second run": [(128, 64, 128, 8), (128, 256, 256, 8)]}

torch.manual_seed(0)
for n, c_in, c_out, h in SHAPES[sys.argv[1] if len(sys.argv) > 1 else "first run"]:
    x = torch.randn(n, c_in, h, h, requires_grad=True)
    kernels = torch.randn(4, c_out, c_in, 3, 3, requires_grad=True)
    attention = torch.softmax(torch.randn(n, 4), 1).requires_grad_()
    row = []
    for merge in (merge_branches, merge_stacked, merge_aggregated):
        def run():
            y = merge(x, kernels, attention, 1)
            y.backward(torch.ones_like(y))
        for _ in range(3):
            run()
        times = []
        for _ in range(11):
            start = time.perf_counter()
            run()
            times.append(time.perf_counter() - start)
        row.append(f"{merge.__name__} {statistics.median(times) * 1e3:6.1f} ms")
    print(f"({n},{c_in},{h},{h}) -> {c_out}: " + " | ".join(row), flush=True)
