"""What a training run leaves in its directory, identical for both frameworks.

- `metrics.jsonl`: one JSON object per epoch (losses, accuracies, learning rate, temperature,
  seconds, images/s, and, for the epochs evaluated on the test set, per block the mean attention per
  expert and the attention entropy).
- `summary.json`: the final figures and everything needed to reproduce the run.
- `evaluation.npz`: the last evaluation, for reports: `logits` (N, classes), `labels` (N,), each
  block's attention `attention_<b>` (N, K), and `test_index` (N,), where each image sits in the
  test set (runs written before it existed lack it; they evaluated the whole test set unless
  `--max-test-examples` was given).
- `curves.png`, `confusion_matrix.png`, `attention_per_class.png`.
- `weights.safetensors`: the final weights in the canonical names (expert_core.portable), which
  either framework loads; `checkpoint-NNNNN.ckpt` (expert_core.checkpoints): what --resume reads.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np

from expert_core.files import atomic_write_bytes, atomic_writer

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
EVALUATION_FILE = "evaluation.npz"
CURVES_PLOT = "curves.png"
CONFUSION_PLOT = "confusion_matrix.png"
ATTENTION_PLOT = "attention_per_class.png"
PORTABLE_WEIGHTS = "weights.safetensors"


def write_metrics(run_dir: Path, history: list[dict]) -> None:
    """Rewrite the whole metrics file: on resume it must hold exactly the epochs the checkpoint has."""
    text = "".join(json.dumps(row) + "\n" for row in history)
    atomic_write_bytes(run_dir / METRICS_FILE, text.encode())


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / METRICS_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def evaluated_epochs(history: list[dict]) -> list[dict]:
    """The epochs followed by a test-set evaluation (every epoch unless the run evaluated less often)."""
    return [row for row in history if "test_accuracy" in row]


def write_json(path: Path, payload: dict | list) -> None:
    atomic_write_bytes(path, (json.dumps(payload, indent=2) + "\n").encode())


def write_evaluation(run_dir: Path, evaluation: dict[str, np.ndarray]) -> None:
    with atomic_writer(Path(run_dir) / EVALUATION_FILE) as f:
        np.savez_compressed(f, **evaluation)


def read_evaluation(run_dir: Path) -> dict:
    """evaluation.npz as a dict, with the per-block attention gathered into one list `attention`."""
    with np.load(Path(run_dir) / EVALUATION_FILE, allow_pickle=False) as npz:
        arrays = {key: npz[key] for key in npz.files}
    blocks = sorted(int(key.split("_")[1]) for key in arrays if key.startswith("attention_"))
    arrays["attention"] = [arrays.pop(f"attention_{b}") for b in blocks]
    return arrays


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Per row, in float64: the test loss and the report's confidences are read from it."""
    logits = np.asarray(logits, np.float64)
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def attention_statistics(attention: list[np.ndarray]) -> dict:
    """Per block: mean attention per expert and mean attention entropy (nats), as plain lists."""
    usage, entropy = [], []
    for a in attention:
        a = np.asarray(a, np.float64)
        usage.append(a.mean(0).round(6).tolist())
        entropy.append(float(-(a * np.log(np.clip(a, 1e-12, None))).sum(1).mean()))
    return {"expert_usage": usage, "attention_entropy": entropy}


def attention_per_class(attention: list[np.ndarray], labels: np.ndarray, num_classes: int) -> np.ndarray:
    """(blocks, classes, experts): the mean attention of each class's images in each block; NaN for a
    class with no image among `labels` (a small --max-test-examples subset), which the plots leave blank."""
    def class_mean(a: np.ndarray, c: int) -> np.ndarray:
        members = a[labels == c]
        return members.mean(0) if len(members) else np.full(a.shape[1], np.nan)

    return np.stack([np.stack([class_mean(np.asarray(a), c) for c in range(num_classes)]) for a in attention])


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
    return np.bincount(labels * num_classes + predictions, minlength=num_classes ** 2).reshape(
        num_classes, num_classes)


def git_commit() -> str:
    """HEAD (with "-dirty" for uncommitted changes to tracked files); outside a git checkout (an
    exported copy, a container image) the EXPERT_CNN_GIT_COMMIT variable's value, else "unknown"."""
    fallback = os.environ.get("EXPERT_CNN_GIT_COMMIT", "unknown")
    here = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                                capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):  # no git, or a git that hangs (a stale lock on a network disk)
        return fallback
    if head.returncode != 0:
        return fallback
    # A tree whose state git could not read is not claimed clean.
    dirty = status.returncode != 0 or status.stdout.strip()
    return head.stdout.strip() + ("-dirty" if dirty else "")


def cpuinfo_values(field: str) -> list[str]:
    """Every value of `field` in /proc/cpuinfo (one per logical CPU); [] where there is no such file."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return []
    return [value.strip() for key, _, value in (line.partition(":") for line in lines) if key.strip() == field]


def cpu_vector_isa() -> str:
    """The widest float32 vector extension the CPU reports: "AVX-512", "AVX2" or "" (unknown or neither).
    Two machines both named "AMD EPYC" ran the `fast` step 3x apart, one with AVX-512, one without."""
    flags = next(iter(cpuinfo_values("flags")), "").split()
    return "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else ""


def cpu_name() -> str:
    """The CPU's model name with its vector extension, e.g. "AMD EPYC (AVX2)"."""
    name = next(iter(cpuinfo_values("model name")), None) or platform.processor() or platform.machine()
    isa = cpu_vector_isa()
    return f"{name} ({isa})" if isa else name


# Set, these change what a run computes or how fast: devices, processes, precision, threads, allocator.
RUN_ENVIRONMENT = ("CUDA_VISIBLE_DEVICES", "JAX_PLATFORMS", "XLA_FLAGS", "JAX_ENABLE_X64",
                   "JAX_DEFAULT_MATMUL_PRECISION", "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID",
                   "OMP_NUM_THREADS", "MKL_NUM_THREADS", "GLIBC_TUNABLES")


def command_line() -> str:
    """The command, quoted for a shell, after the RUN_ENVIRONMENT variables set in this process
    (a launcher may have set some: torchrun sets OMP_NUM_THREADS=1; a multi-process JAX run records
    the main process's JAX_PROCESS_ID). Under torchrun, whose own flags this process cannot see, the
    launch is written as torchrun with the node and process counts; on several nodes its rendezvous
    flags must be added back."""
    environment = [f"{name}={shlex.quote(os.environ[name])}" for name in RUN_ENVIRONMENT if name in os.environ]
    launcher = [Path(sys.executable).name]
    if "TORCHELASTIC_RUN_ID" in os.environ:
        per_node = int(os.environ["LOCAL_WORLD_SIZE"])
        launcher = ["torchrun", f"--nnodes={int(os.environ['WORLD_SIZE']) // per_node}", f"--nproc_per_node={per_node}"]
    return " ".join([*environment, shlex.join([*launcher, *sys.argv])])
