"""Side-by-side speed of the Flax and PyTorch train and eval steps, per merge computation.

    python scripts/benchmark.py                                # seed preset, batch 128, all merges
    python scripts/benchmark.py --presets seed tiny --batch-size 256 --json bench.json
    python scripts/benchmark.py --device cuda --presets seed fast --merges auto   # both on the GPU
    taskset -c 0 python scripts/benchmark.py --merges auto     # both frameworks on one core

Same config, same batch, same precision (float32 unless `--precision bfloat16`), after warm-up;
each figure is the median of repeated timings, taken in several fresh processes (`--processes`)
that alternate between the frameworks, and the median over those processes is reported with its
range: on a shared VM one process can run a third slower than the next for reasons outside it.
The train step is the one training runs: the preset's augmentation (on the device: inside the jitted
step for Flax, in torch for PyTorch), forward, backward and update. JAX compile time is
reported apart. GFLOP/s counts the model's useful multiply-adds (one conv per block, as the
aggregated merge computes it) against this CPU's fp32 peak (on a GPU: a large TF32 matmul's measured
rate), so the distance to the limit is visible; bfloat16 rows are set against the same float32 limits.
"data wait" is the share of the train step spent preparing the batch on the host (indexing, and for
PyTorch drawing the augmentation's random choices in numpy), during which the model computes
nothing. "merges" times the merge computation alone, forward and backward, of every expert block of
the preset at the batch's shapes: what the choice of merge changes, without the stem, BatchNorm,
ReLU, pooling and optimiser that every merge shares.
"""

from __future__ import annotations

import argparse
import itertools
import multiprocessing
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from data.augment import draw_augment_params
from expert_core.config import MERGE_MODES, PRESETS, ModelConfig, block_merge, get_preset
from expert_core.flags import refuse_an_unwritable_json, refuse_counts_below_one
from expert_core.huge_pages import relaunch_with_huge_pages
from expert_core.runfiles import command_line, cpu_name, cpu_vector_isa, cpuinfo_values, git_commit, write_json


def block_shapes(config: ModelConfig, batch: int) -> list[tuple[int, int, int, int, int]]:
    """(batch, height, width, in channels, out channels) of each expert block's merge."""
    size, shapes = 32, []
    for c_in, block in zip(config.block_in_channels(), config.blocks):
        shapes.append((batch, size, size, c_in, block.out_channels))
        size //= 2 if block.pool else 1
    return shapes


def model_flops_per_image(config: ModelConfig) -> float:
    """Multiply-adds x 2 of one forward pass, with each expert block costing one convolution."""
    k2 = config.kernel_size ** 2
    macs = 32 * 32 * k2 * 3 * config.stem_channels
    for _, size, _, c_in, c_out in block_shapes(config, 1):
        hidden = config.expert_hidden(c_in)
        macs += c_in * hidden + hidden * config.num_experts + config.num_experts * k2 * c_in * c_out
        macs += size * size * k2 * c_in * c_out
    features = config.blocks[-1].out_channels
    if config.classifier_hidden:
        macs += features * config.classifier_hidden
        features = config.classifier_hidden
    return 2.0 * (macs + features * config.num_classes)


def physical_cores(cpus, core_of) -> int:
    """How many physical cores the logical CPUs `cpus` span: two hyperthreads of one core share its FMA
    units. core_of(cpu) names a CPU's core (the same name for its hyperthreads), or is None where the
    kernel does not say; then each CPU counts as a core of its own."""
    return len({core_of(cpu) or ("cpu", cpu) for cpu in cpus})


def sysfs_core(cpu: int) -> str | None:
    """The logical CPUs that share `cpu`'s core, as the kernel lists them (core_id alone repeats across
    packages and dies). A VM sees only the topology its hypervisor presents."""
    topology = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
    for name in ("core_cpus_list", "thread_siblings_list"):  # the second is the older kernels' name
        try:
            return (topology / name).read_text().strip()
        except OSError:
            continue
    return None


def cpu_peak_gflops() -> tuple[float, str]:
    """cores x 2 FMA units x fp32 lanes x 2 flops x clock, from /proc/cpuinfo and the CPU topology."""
    mhz = max([float(v) for v in cpuinfo_values("cpu MHz")] or [2000.0])
    lanes = {"AVX-512": 16, "AVX2": 8}.get(cpu_vector_isa(), 4)
    # The CPUs this process may run on (taskset, cgroups), which both frameworks size their thread pools by.
    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)
    cores = physical_cores(cpus, sysfs_core)
    shared = f" ({len(cpus)} logical CPUs)" if len(cpus) != cores else ""
    formula = f"{cores} core{'s' * (cores > 1)}{shared} x 2 FMA x {lanes} lanes x 2 x {mhz / 1000:.2f} GHz"
    return cores * 2 * lanes * 2 * mhz / 1000, formula


def matmul_gflops() -> float:
    """A large float32 matmul's rate: what this CPU really sustains (turbo clocks, 256-bit AVX-512
    datapaths and the like make the formula's peak only an estimate)."""
    a = np.random.default_rng(0).standard_normal((2048, 2048), dtype=np.float32)
    return 2 * 2048 ** 3 / min(call_seconds(lambda: a @ a, 5)) / 1e9


def gpu_limits() -> dict:
    """The GPU's name and an 8192^2 matmul's rate in PyTorch, with TF32 (what both frameworks' float32
    convolutions use on the GPU by default) and in full float32."""
    import torch

    a = torch.randn(8192, 8192, device="cuda")
    rates = {}
    for tf32 in (True, False):
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.cuda.synchronize()
        rates[tf32] = 2 * 8192 ** 3 / median_seconds(lambda: (a @ a).sum().item(), 10) / 1e9
    return {"name": torch.cuda.get_device_name(), "tf32": rates[True], "float32": rates[False]}


def measure_limits(device: str) -> dict:
    """What the achieved GFLOP/s is measured against: the peak (formula on a CPU, a TF32 matmul on a GPU)
    and a large float32 matmul's rate."""
    if device == "cuda":
        gpu = in_fresh_process(gpu_limits)
        return {"device_name": gpu["name"], "peak_gflops": gpu["tf32"], "matmul_gflops": gpu["float32"],
                "peak_formula": "an 8192^2 TF32 matmul in PyTorch", "matmul_formula": "an 8192^2 float32 matmul"}
    peak, formula = cpu_peak_gflops()
    return {"device_name": cpu_name(), "peak_gflops": peak, "matmul_gflops": matmul_gflops(),
            "peak_formula": formula, "matmul_formula": "a 2048^2 float32 matmul in numpy"}


def in_fresh_process(runner, *args) -> dict:
    # One interpreter per measurement: in one process, JAX's thread pool left over from a Flax
    # measurement halved the PyTorch figure that followed it.
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(runner, args)


def call_seconds(fn, repeats: int) -> list[float]:
    """Seconds of each of `repeats` calls."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def median_seconds(fn, repeats: int) -> float:
    return statistics.median(call_seconds(fn, repeats))


def bench_torch(preset, merge, precision, images, labels, repeats, device):
    import torch

    from torch_reference.model import to_model_input
    from torch_reference.train import TorchBackend

    backend = TorchBackend(preset.model, preset.train, steps_per_epoch=1000, seed=0, merge=merge, device=device,
                           precision=precision)
    steps = itertools.count()
    train = lambda: backend.train_step(images, labels, next(steps), 1.0)  # noqa: E731 (.item() waits for the GPU)

    def evaluate():
        backend.model.eval()
        with torch.no_grad():
            backend.model(to_model_input(images).to(backend.torch_device)).cpu()  # the copy back waits for the GPU

    for _ in range(2):  # warm-up: allocator, oneDNN primitive caches
        train()
        evaluate()
    return {"train_seconds": median_seconds(train, repeats), "eval_seconds": median_seconds(evaluate, repeats),
            "merge_seconds": torch_merge_seconds(preset.model, merge, precision, len(images), repeats,
                                                 backend.torch_device),
            "compile_seconds": None}  # eager: nothing compiles


def torch_merge_seconds(config: ModelConfig, merge: str, precision: str, batch: int, repeats: int, device) -> float:
    """Forward and backward of every block's merge alone (x, kernels, attention -> y), random operands
    in the compute precision."""
    import torch

    from torch_reference.model import MERGES, merge_backend

    generator, k = torch.Generator().manual_seed(0), config.kernel_size
    blocks = []
    for n, h, w, c_in, c_out in block_shapes(config, batch):
        shapes = ((n, c_in, h, w), (config.num_experts, c_out, c_in, k, k), (n, config.num_experts), (n, c_out, h, w))
        x, kernels, attention, cotangent = (torch.randn(s, generator=generator).to(device, getattr(torch, precision))
                                            for s in shapes)
        operands = [x.requires_grad_(), kernels.requires_grad_(), torch.softmax(attention, 1).requires_grad_()]
        blocks.append((MERGES[block_merge(merge, h, w, c_out, merge_backend(device))], operands, cotangent))

    def forward_backward():
        for fn, operands, cotangent in blocks:
            torch.autograd.grad(fn(*operands, k // 2), operands, cotangent)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    forward_backward()
    return median_seconds(forward_backward, repeats)


def bench_flax(preset, merge, precision, images, labels, repeats, device):
    import jax

    from flax_expert import train as flax_train

    # One device, as PyTorch's side has: left unset, Flax would train data-parallel on every GPU of the host.
    backend = flax_train.FlaxBackend(preset.model, preset.train, steps_per_epoch=1000, seed=0, merge=merge,
                                     device=device, precision=precision, devices=1)
    steps = itertools.count()

    def train():
        jax.block_until_ready(backend.train_step(images, labels, next(steps), 1.0))

    def evaluate():
        jax.block_until_ready(flax_train.eval_step(backend.state, images, 1.0))

    start = time.perf_counter()
    train()
    evaluate()
    first_calls = time.perf_counter() - start
    train()
    evaluate()
    train_seconds, eval_seconds = median_seconds(train, repeats), median_seconds(evaluate, repeats)
    return {"train_seconds": train_seconds, "eval_seconds": eval_seconds,
            "merge_seconds": flax_merge_seconds(preset.model, merge, precision, len(images), repeats,
                                                backend.replicated),
            # The first calls less what the two calls take once compiled.
            "compile_seconds": max(first_calls - train_seconds - eval_seconds, 0.0)}


def flax_merge_seconds(config: ModelConfig, merge: str, precision: str, batch: int, repeats: int, sharding) -> float:
    """Forward and backward of every block's merge alone (x, kernels, attention -> y), random operands
    in the compute precision."""
    import jax

    from flax_expert.model import MERGES

    key, k = jax.random.PRNGKey(0), config.kernel_size
    merges, blocks = [], []
    for n, h, w, c_in, c_out in block_shapes(config, batch):
        shapes = ((n, h, w, c_in), (config.num_experts, k, k, c_in, c_out), (n, config.num_experts), (n, h, w, c_out))
        key, *parts = jax.random.split(key, 5)
        x, kernels, attention, cotangent = (jax.random.normal(part, s, precision) for part, s in zip(parts, shapes))
        merges.append(MERGES[block_merge(merge, h, w, c_out, "flax")])
        blocks.append(((x, kernels, jax.nn.softmax(attention)), cotangent))
    blocks = jax.device_put(blocks, sharding)

    @jax.jit
    def forward_backward(blocks):
        # y is returned too: the gradients of a bilinear merge do not need it, and XLA would drop it.
        outputs = []
        for fn, (operands, cotangent) in zip(merges, blocks):
            y, pullback = jax.vjp(fn, *operands)
            outputs.append((y, pullback(cotangent)))
        return outputs

    jax.block_until_ready(forward_backward(blocks))
    return median_seconds(lambda: jax.block_until_ready(forward_backward(blocks)), repeats)


def data_wait(preset, images, labels, batch: int, repeats: int) -> dict:
    """Host-side batch preparation time per step, for each framework's input path."""
    order = np.random.default_rng(0).permutation(len(images))
    index = np.sort(order[:batch])
    torch_prep = median_seconds(lambda: (images[index], labels[index], draw_augment_params(
        np.random.default_rng(0), batch, preset.train.augment)), repeats)
    flax_prep = median_seconds(lambda: (images[index], labels[index]), repeats)
    return {"torch": torch_prep, "flax": flax_prep}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["seed"], choices=sorted(PRESETS))
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--merges", nargs="+", default=list(MERGE_MODES), choices=MERGE_MODES)
    parser.add_argument("--frameworks", nargs="+", default=["flax", "torch"], choices=("flax", "torch"))
    # 15 x 5: on the 2-core VM, 7 steps in each of 3 processes put the seed preset's Flax / PyTorch
    # anywhere in 0.84-1.10 for one code (results/benchmark/amd-avx2-head/).
    parser.add_argument("--repeats", type=int, default=15, help="timed repetitions per figure (median)")
    parser.add_argument("--processes", type=int, default=5,
                        help="fresh processes per figure, alternating the frameworks (median, range shown)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="where both frameworks run (cuda: the first GPU; GFLOP/s then against its matmul rates)")
    parser.add_argument("--precision", choices=("float32", "bfloat16"), default="float32",
                        help="bfloat16: the training scripts' mixed precision (convolutions in bf16)")
    parser.add_argument("--json", help="write the table here as JSON")
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    refuse_counts_below_one(parser, args, ("batch_size", "repeats", "processes"))
    refuse_an_unwritable_json(parser, args.json)
    limits = measure_limits(args.device)
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    code = git_commit()
    print(f"code {code}; {args.device.upper()}: {limits['device_name']} (host CPU: {cpu_name()}); "
          f"peak ~{limits['peak_gflops']:.0f} GFLOP/s ({limits['peak_formula']}); "
          f"{limits['matmul_formula']} runs at {limits['matmul_gflops']:.0f} GFLOP/s; "
          f"GLIBC_TUNABLES={tunables!r}; precision {args.precision}")
    rng = np.random.default_rng(0)
    pool = rng.integers(0, 256, (4 * args.batch_size, 32, 32, 3), dtype=np.uint8)
    pool_labels = rng.integers(0, 10, len(pool))
    rows = []
    for name in args.presets:
        rows += bench_preset(name, args, limits, pool, pool_labels)
        print_ratios(rows, name)
    if args.json:
        write_json(Path(args.json), {"git_commit": code, "command": command_line(), "device": args.device,
                                     "cpu": cpu_name(), **limits, "glibc_tunables": tunables,
                                     "precision": args.precision, "repeats": args.repeats,
                                     "processes": args.processes, "rows": rows})
    return 0


def bench_preset(name: str, args: argparse.Namespace, limits: dict, pool: np.ndarray,
                 pool_labels: np.ndarray) -> list[dict]:
    """One row per merge and framework, each timed in `args.processes` fresh processes."""
    preset = get_preset(name)
    images, labels = pool[:args.batch_size], pool_labels[:args.batch_size]
    flops = model_flops_per_image(preset.model)
    waits = data_wait(preset, pool, pool_labels, args.batch_size, args.repeats)
    runners = {"flax": bench_flax, "torch": bench_torch}
    rows = []
    for merge in args.merges:
        per_process = {framework: [] for framework in args.frameworks}
        for _ in range(args.processes):  # alternating, so that a slow spell of the VM hits both
            for framework in args.frameworks:
                per_process[framework].append(in_fresh_process(runners[framework], preset, merge, args.precision,
                                                               images, labels, args.repeats, args.device))
        for framework in args.frameworks:
            rows.append(make_row(name, framework, merge, args.batch_size, per_process[framework], flops, limits,
                                 waits[framework]))
            print_row(rows[-1])
    return rows


def print_ratios(rows: list[dict], preset: str) -> None:
    """Flax / PyTorch per merge, and each merge against K separate convs ("branches") per framework."""
    rows = [r for r in rows if r["preset"] == preset]
    for merge in dict.fromkeys(r["merge"] for r in rows):
        pair = {r["framework"]: r for r in rows if r["merge"] == merge}
        if len(pair) == 2:
            ratio = pair["flax"]["train_images_per_second"] / pair["torch"]["train_images_per_second"]
            print(f"{preset} / {merge}: Flax / PyTorch train-step ratio {ratio:.2f}")
    for framework in dict.fromkeys(r["framework"] for r in rows):
        by_merge = {r["merge"]: r for r in rows if r["framework"] == framework}
        branches = by_merge.get("branches")
        for merge in sorted(by_merge.keys() - {"branches"}) if branches else ():
            row = by_merge[merge]
            print(f"{preset} / {framework}: {merge} / branches train-step ratio "
                  f"{row['train_images_per_second'] / branches['train_images_per_second']:.2f}, "
                  f"merges alone (forward + backward) {branches['merge_ms'] / row['merge_ms']:.2f}")


def make_row(preset: str, framework: str, merge: str, batch: int, timings: list[dict], flops: float,
             limits: dict, data_wait_seconds: float) -> dict:
    """One table row from the timings of several processes: their median, and each one's figure."""
    train_seconds = statistics.median(t["train_seconds"] for t in timings)
    train_ips = batch / train_seconds
    gflops = 3 * flops * train_ips / 1e9
    return {
        "preset": preset, "framework": framework, "merge": merge, "batch_size": batch,
        "train_images_per_second": round(train_ips, 1),
        "train_images_per_second_each_process": [round(batch / t["train_seconds"], 1) for t in timings],
        "eval_images_per_second": round(batch / statistics.median(t["eval_seconds"] for t in timings), 1),
        "compile_seconds": (None if timings[0]["compile_seconds"] is None
                            else round(statistics.median(t["compile_seconds"] for t in timings), 2)),
        "merge_ms": round(1000 * statistics.median(t["merge_seconds"] for t in timings), 2),
        "train_gflops": round(gflops, 1),
        "fraction_of_peak": round(gflops / limits["peak_gflops"], 3),
        "fraction_of_matmul": round(gflops / limits["matmul_gflops"], 3),
        "data_wait_fraction": round(data_wait_seconds / train_seconds, 3),
    }


def print_row(row: dict) -> None:
    each = row["train_images_per_second_each_process"]
    print(f"{row['preset']:>6} {row['framework']:>5} {row['merge']:>10}: train {row['train_images_per_second']:7.1f} "
          f"img/s [{min(each):.0f}-{max(each):.0f}] ({row['train_gflops']:5.1f} GFLOP/s, "
          f"{100 * row['fraction_of_peak']:4.1f}% of peak, "
          f"{100 * row['fraction_of_matmul']:4.1f}% of matmul) | eval "
          f"{row['eval_images_per_second']:7.1f} img/s | merges {row['merge_ms']:6.1f} ms | "
          f"compile {'    -' if row['compile_seconds'] is None else format(row['compile_seconds'], '5.1f')} s | "
          f"data wait {100 * row['data_wait_fraction']:.1f}%", flush=True)


if __name__ == "__main__":
    relaunch_with_huge_pages()  # as training runs; each measurement's process inherits it
    sys.exit(main())
