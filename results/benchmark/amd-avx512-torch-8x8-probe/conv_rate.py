"""One-off: how fast PyTorch's dense 3x3 conv runs against a matmul of the same multiply-adds, at the
fast preset's 8x8 256 -> 256 expert-block shape (batch 128), forward + backward, medians of 15."""
import statistics
import time

import torch
import torch.nn.functional as F

from torch_reference.model import merge_aggregated, merge_branches

torch.manual_seed(0)
n, c, h, k_experts = 128, 256, 8, 4
x = torch.randn(n, c, h, h, requires_grad=True)
kernels = torch.randn(k_experts, c, c, 3, 3, requires_grad=True)
attention = torch.softmax(torch.randn(n, k_experts), 1).requires_grad_()
patches = torch.randn(n * h * h, 9 * c, requires_grad=True)
weight = torch.randn(9 * c, c, requires_grad=True)
macs_one_conv = n * h * h * 9 * c * c

def timed(fn, repeats=15):
    for _ in range(3): fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter(); fn(); times.append(time.perf_counter() - t)
    return statistics.median(times)

def fwd_bwd(out_fn):
    def run():
        y = out_fn(); y.backward(torch.ones_like(y))
    return run

cases = {
    "one dense conv (1x MACs)": (fwd_bwd(lambda: F.conv2d(x, kernels[0], padding=1)), 1),
    "branches: 4 dense convs (4x MACs)": (fwd_bwd(lambda: merge_branches(x, kernels, attention, 1)), 4),
    "aggregated: per-image kernels (1x MACs)": (fwd_bwd(lambda: merge_aggregated(x, kernels, attention, 1)), 1),
    "matmul of the conv's im2col shape (1x MACs)": (fwd_bwd(lambda: patches @ weight), 1),
}
cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
print(f"CPU: {cpu}; torch {torch.__version__}; threads {torch.get_num_threads()}")
for name, (fn, mac_multiple) in cases.items():
    seconds = timed(fn)
    gflops = 3 * 2 * macs_one_conv * mac_multiple / seconds / 1e9
    print(f"{name:46s} {seconds * 1e3:7.1f} ms   {gflops:6.1f} GFLOP/s of multiply-adds done")
with torch.backends.mkldnn.flags(enabled=False):
    seconds = timed(fwd_bwd(lambda: F.conv2d(x, kernels[0], padding=1)))
    print(f"{'one dense conv, oneDNN off':46s} {seconds * 1e3:7.1f} ms   {3 * 2 * macs_one_conv / seconds / 1e9:6.1f} GFLOP/s")
