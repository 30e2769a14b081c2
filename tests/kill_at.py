"""Run a training script and kill -9 it at a named moment, for the reliability tests.

    python tests/kill_at.py FRAMEWORK POINT N [train arguments ...]

A timer cannot hit "halfway through writing a checkpoint" reliably, so this wraps the real
functions the driver calls and sends the process SIGKILL from inside, at exactly:
  step N              before the N-th optimiser step of this process (1-based)
  checkpoint-write N  with half of this process's N-th checkpoint in its .partial file
  metrics N           at the N-th rewrite of metrics.jsonl by this process (a checkpoint is already in
                      place; a resumed process rewrites it once when it starts)
  final N             while the final run files are written (N is ignored)
"""

import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from expert_core import checkpoints, files, portable, runfiles, training  # noqa: E402


def die(*_):
    os.kill(os.getpid(), signal.SIGKILL)


def on_call(n: int, original, before=None):
    """`original`, except that its n-th call runs `before` (default: die) first."""
    calls = 0

    def wrapper(*args, **kwargs):
        nonlocal calls
        calls += 1
        if calls == n:
            (before or die)(*args, **kwargs)
        return original(*args, **kwargs)

    return wrapper


def half_written(path, payload):
    with open(files.partial_path(path), "wb") as f:
        f.write(payload[:len(payload) // 2])
        f.flush()
        os.fsync(f.fileno())
    die()


def install(backend_class, point: str, n: int) -> None:
    if point == "step":
        backend_class.train_step = on_call(n, backend_class.train_step)
    elif point == "checkpoint-write":
        checkpoints.atomic_write_bytes = on_call(n, checkpoints.atomic_write_bytes, half_written)
    elif point == "metrics":
        runfiles.write_metrics = on_call(n, runfiles.write_metrics)
    elif point == "final":
        portable.save_portable = on_call(1, portable.save_portable)
    else:
        raise SystemExit(f"unknown kill point {point!r}; expected step, checkpoint-write, metrics or final")


def main() -> int:
    framework, point, n, *train_args = sys.argv[1:]
    if framework == "torch":
        from torch_reference.train import TorchBackend as backend_class
    else:
        from flax_expert.train import FlaxBackend as backend_class
    install(backend_class, point, int(n))
    return training.main(backend_class, framework, train_args)


if __name__ == "__main__":
    sys.exit(main())
