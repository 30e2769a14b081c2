"""Per-op time of the Flax seed train step, and how each op speeds up from one core to two.

    taskset -c 0 python results/benchmark/intel-thread-scaling/step_profile.py /tmp/one-core.json
    python results/benchmark/intel-thread-scaling/step_profile.py /tmp/two-cores.json
    python results/benchmark/intel-thread-scaling/step_profile.py --compare /tmp/one-core.json /tmp/two-cores.json

The first two profile 4 train steps (batch 128, float32, merge auto) after 3 warm-up steps with
jax.profiler and write each XLA op's own time per step; --compare prints the table of
step-profile-by-op.txt. `while.*` events contain their loop bodies' ops and are left out.
"""

import collections
import gzip
import itertools
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT))

from expert_core.huge_pages import relaunch_with_huge_pages  # noqa: E402

STEPS = 4
NOT_OPS = ("Thunk", "$", "Pjit", "Slinky", "while")


def profile(out: Path) -> None:
    import jax
    import numpy as np

    from expert_core.config import PRESETS
    from flax_expert.train import FlaxBackend

    preset = PRESETS["seed"]
    backend = FlaxBackend(preset.model, preset.train, steps_per_epoch=1000, seed=0)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (128, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, 128).astype(np.int32)
    steps = itertools.count()
    for _ in range(3):
        jax.block_until_ready(backend.train_step(images, labels, next(steps), 1.0))
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir):
            for _ in range(STEPS):
                jax.block_until_ready(backend.train_step(images, labels, next(steps), 1.0))
        trace = json.load(gzip.open(next(Path(trace_dir).rglob("*.trace.json.gz"))))
    per_op = collections.defaultdict(lambda: [0.0, 0])
    for event in trace["traceEvents"]:
        if event.get("ph") == "X" and not event["name"].startswith(NOT_OPS):
            per_op[event["name"]][0] += event["dur"] / 1000 / STEPS
            per_op[event["name"]][1] += 1
    out.write_text(json.dumps({name: {"ms": ms, "calls": calls // STEPS} for name, (ms, calls) in per_op.items()}))


def compare(one_core: Path, two_cores: Path) -> None:
    one, two = json.loads(one_core.read_text()), json.loads(two_cores.read_text())
    rows = sorted(((two[k]["ms"], one.get(k, {"ms": 0.0})["ms"], two[k]["calls"], k) for k in two), reverse=True)
    print(f"{'op (XLA name)':<42} {'calls':>5} {'1 core ms':>9} {'2 cores ms':>10} {'speed-up':>8}")
    for ms2, ms1, calls, name in rows[:16]:
        print(f"{name[:42]:<42} {calls:5d} {ms1:9.1f} {ms2:10.1f} {ms1 / ms2:8.2f}")
    print()
    for group in ("YNNPACK fusions (the merges' batched dots)", "dynamic-update-slice fusions (lax.map output)",
                  "every other op"):
        ms1 = sum(r[1] for r in rows if op_group(r[3]) == group)
        ms2 = sum(r[0] for r in rows if op_group(r[3]) == group)
        print(f"{group:<48} {ms1:9.1f} {ms2:10.1f} {ms1 / ms2:8.2f}")


def op_group(name: str) -> str:
    if name.startswith("ynn_fusion"):
        return "YNNPACK fusions (the merges' batched dots)"
    if "dynamic-update-slice" in name:
        return "dynamic-update-slice fusions (lax.map output)"
    return "every other op"


if __name__ == "__main__":
    if sys.argv[1] == "--compare":
        compare(Path(sys.argv[2]), Path(sys.argv[3]))
    else:
        relaunch_with_huge_pages()
        profile(Path(sys.argv[1]))
