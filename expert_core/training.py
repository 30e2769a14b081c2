"""The training driver both `train_flax.py` and `train_torch.py` run.

Everything that is not a tensor operation lives here once: data loading and batching, the epoch
loop, progress, metrics, checkpoints and resume, plots and the summary. A framework plugs in a
`Backend` that does the numerical work; the driver never imports torch or jax.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

import numpy as np

from data import Cifar10, DataError, load_cifar10
from data.cifar10 import SOURCE_KINDS, pixel_origin
from expert_core import checkpoints, plots, portable, runfiles, schedules
from expert_core.config import (MERGE_MODES, OPTIMIZERS, PRECISIONS, PRESETS, ModelConfig, TrainConfig, get_preset,
                                model_config_from_dict, to_dict, train_config_from_dict, with_overrides)
from expert_core.dirac import dirac_weights
from expert_core.files import remove_abandoned_partials
from expert_core.flags import counts_below_one
from expert_core.whitening import PATCH_IMAGES, whitening_stem_kernel


class TrainingError(Exception):
    """Training cannot go on; the message says why and what to do."""


@dataclass
class Predictions:
    logits: np.ndarray  # (N, classes) float32
    attention: list[np.ndarray]  # per block (N, K)

    @classmethod
    def from_batches(cls, batches: list[tuple[np.ndarray, list[np.ndarray]]]) -> "Predictions":
        """One Predictions from consecutive batches' (logits, per-block attention)."""
        logits, attention = zip(*batches)
        return cls(np.concatenate(logits), [np.concatenate(block) for block in zip(*attention)])


class Backend(Protocol):
    """The numerical half of a training run, implemented once per framework."""

    framework: str
    device: str
    # False in all but one process of a multi-process (data-parallel) run: only the main process writes files.
    is_main_process: bool

    def versions(self) -> dict[str, str]: ...

    def train_step(self, images: np.ndarray, labels: np.ndarray, step: int, temperature: float):
        """One optimiser step on a uint8 NHWC batch; augments it itself (seeded by `step`).
        Every process of a data-parallel run gets the same global batch and trains on its share.
        Returns the global batch's (mean loss, number correct, gradient global norm), each convertible
        with float()."""

    def predict(self, images: np.ndarray, temperature: float, translate: int = 0) -> Predictions:
        """Logits and attention for uint8 NHWC `images`; `translate` > 0 adds the shifted test-time views
        of data.augment.evaluation_views (the recipe's test_time_flip applies to every view)."""

    def state_bytes(self) -> bytes: ...

    def load_state_bytes(self, payload: bytes) -> None: ...

    def canonical_weights(self) -> dict[str, np.ndarray]:
        """The model's weights under the canonical names and layouts (expert_core.portable)."""

    def replace_weights(self, tensors: dict[str, np.ndarray]) -> None:
        """Overwrite the named canonical tensors (same names and shapes as canonical_weights()); the
        others and the optimiser state stay as they are, and lookahead's average starts again from them."""


BackendFactory = Callable[..., Backend]


@dataclass(frozen=True)
class RunSpec:
    """What a run is: resuming with any of these changed is refused."""

    preset: str
    model: ModelConfig
    train: TrainConfig
    seed: int
    max_train_examples: int | None
    precision: str = "float32"
    max_test_examples: int | None = None  # the test subset every epoch's evaluation scores

    def as_dict(self) -> dict:
        return {"preset": self.preset, "model": to_dict(self.model), "train": to_dict(self.train),
                "seed": self.seed, "max_train_examples": self.max_train_examples, "precision": self.precision,
                "max_test_examples": self.max_test_examples}


def build_parser(framework: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=f"Train the expert-block CNN on CIFAR-10 with {framework}.")
    parser.add_argument("--preset", default="seed", choices=sorted(PRESETS))
    parser.add_argument("--epochs", type=int, help="default: the preset's")
    parser.add_argument("--batch-size", type=int, help="default: the preset's")
    parser.add_argument("--lr", type=float, help="peak learning rate; default: the preset's")
    parser.add_argument("--optimizer", choices=OPTIMIZERS, help="default: the preset's")
    parser.add_argument("--weight-decay", type=float, help="default: the preset's (an L2 term for adam_l2 and "
                        "sgd_nesterov, decoupled for adamw, so each optimiser wants its own scale)")
    parser.add_argument("--merge", choices=MERGE_MODES, help="how the K expert convs are merged; "
                        "default: the fastest for the framework (same numbers either way)")
    parser.add_argument("--precision", choices=PRECISIONS, default="float32",
                        help="bfloat16: convolutions in bf16, parameters and BatchNorm statistics in float32; "
                        "for GPUs/TPUs (slow on most CPUs). float64: everything in float64, to check that "
                        "two runs differ by rounding alone")
    parser.add_argument("--data", help="CIFAR-10 archive, batches directory or image folder "
                        "(default: CIFAR10_PATH, then the data root)")
    parser.add_argument("--data-source", choices=SOURCE_KINDS)
    parser.add_argument("--download", action="store_true", help="download the official archive if absent")
    parser.add_argument("--out", help=f"run directory (default: runs/{framework}-<preset>)")
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto")
    parser.add_argument("--devices", type=int, help="Flax: train data-parallel on the first N devices (default: "
                        "all); PyTorch: one device per process, so start N processes with torchrun instead")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-train-examples", type=int, help="train on a fixed random N of the training images")
    parser.add_argument("--max-test-examples", type=int, help="evaluate on a fixed random N of the test images")
    parser.add_argument("--eval-every", type=int, metavar="N", help="evaluate on the test set after every N "
                        "epochs and after the last; default: the preset's")
    parser.add_argument("--resume", action="store_true", help="continue from the run directory's last checkpoint")
    parser.add_argument("--overwrite", action="store_true", help="delete an existing run directory first")
    return parser


def main(factory: BackendFactory, framework: str, argv: list[str] | None = None) -> int:
    args = build_parser(framework).parse_args(argv)
    try:
        run(factory, framework, args)
    except (TrainingError, checkpoints.CheckpointError, DataError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


@dataclass
class RunContext:
    """What the run files need besides the history, fixed once training is set up."""

    spec: RunSpec
    backend: Backend
    run_dir: Path
    steps_per_epoch: int
    class_names: tuple[str, ...]
    data_source: str
    merge: str | None
    git_commit: str
    test_index: np.ndarray
    eval_every_epochs: int
    segments: list[dict]  # one per process that trained this run, oldest first (see `new_segment`)
    final_evaluation_seconds: float = 0.0


def run(factory: BackendFactory, framework: str, args: argparse.Namespace) -> dict | None:
    check_flag_values(args)
    git_commit = runfiles.git_commit()  # now: loading the data can take minutes, and the tree may change meanwhile
    dataset = load_cifar10(args.data, args.data_source, download=args.download)
    spec = run_spec(args, len(dataset.train_labels), len(dataset.test_labels))
    train_x, train_y = subset(dataset.train_images, dataset.train_labels, spec.max_train_examples)
    test_index = subset_index(len(dataset.test_labels), spec.max_test_examples)
    test_x, test_y = dataset.test_images[test_index], dataset.test_labels[test_index]
    steps_per_epoch = count_steps_per_epoch(len(train_x), spec.train.batch_size)
    run_dir = Path(args.out or f"runs/{framework}-{args.preset}")
    # Before the backend joins its process group: a refusal in one process must not leave the others
    # waiting at their first collective for a peer that has gone.
    refuse_a_used_run_dir(run_dir, args.resume, args.overwrite)
    backend = factory(spec.model, spec.train, steps_per_epoch=steps_per_epoch, seed=spec.seed,
                      merge=args.merge, device=args.device, precision=spec.precision, devices=args.devices)
    if backend.is_main_process:  # the only writer; the other processes read the directory on --resume only
        with reporting_write_failures(run_dir, "the run directory"):
            prepare_run_dir(run_dir, args.resume, args.overwrite)
    # --overwrite emptied it: nothing to resume, and no process reads a directory being deleted.
    sizes = data_sizes(steps_per_epoch, len(test_index))
    history, segments = (resume_state(run_dir, spec, backend, dataset, sizes) if args.resume and not args.overwrite
                         else ([], []))
    if not history:
        initialise_from_data(backend, spec.train, spec.model, train_x)
    eval_every = get_preset(args.preset).eval_every_epochs if args.eval_every is None else args.eval_every
    context = RunContext(spec, backend, run_dir, steps_per_epoch, dataset.class_names, dataset.source, args.merge,
                         git_commit, test_index, eval_every,
                         [*segments, new_segment(len(history), git_commit, backend.device)])
    predictions = train_epochs(context, history, (train_x, train_y), (test_x, test_y))
    predictions = final_predictions(context, history, predictions, test_x)
    if not backend.is_main_process:
        return None  # the main process writes the run files and returns the summary
    return finish(context, history, predictions, test_y)


def run_spec(args: argparse.Namespace, train_images: int, test_images: int) -> RunSpec:
    """The preset with the recipe flags applied."""
    preset = get_preset(args.preset)
    train = with_overrides(preset.train, epochs=args.epochs, batch_size=args.batch_size, learning_rate=args.lr,
                           optimizer=args.optimizer, weight_decay=args.weight_decay)
    return RunSpec(args.preset, preset.model, train, args.seed, effective_cap(args.max_train_examples, train_images),
                   args.precision, effective_cap(args.max_test_examples, test_images))


def effective_cap(requested: int | None, available: int) -> int | None:
    """A cap at or above what there is caps nothing: recorded as none, so that --resume without it matches."""
    return None if requested is None or requested >= available else requested


def check_batch_divides(batch_size: int, parts: int, unit: str, other_fix: str = "") -> None:
    """The global batch splits into equal shares, one per device or process."""
    if batch_size % parts:
        raise TrainingError(f"expected a global batch size divisible by the {parts} {unit}, found {batch_size}; "
                            f"pass a --batch-size that is a multiple of {parts}{other_fix}.")


def count_steps_per_epoch(train_images: int, batch_size: int) -> int:
    if train_images < batch_size:
        raise TrainingError(f"expected at least one batch of {batch_size} training images, found "
                            f"{train_images}; lower --batch-size or raise --max-train-examples.")
    return train_images // batch_size


def train_epochs(context: RunContext, history: list[dict], train: tuple, test: tuple) -> Predictions | None:
    """The epochs after those in `history`, appended to it; the last evaluation's predictions, if any."""
    spec, backend, predictions = context.spec, context.backend, None
    for epoch in range(len(history), spec.train.epochs):
        epoch_start = time.perf_counter()
        row = train_epoch(backend, spec, epoch, *train, context.steps_per_epoch)
        if (epoch + 1) % context.eval_every_epochs == 0 or epoch + 1 == spec.train.epochs:
            predictions = backend.predict(test[0], row["temperature"])
            row.update(evaluate(predictions, test[1]))
        history.append(row)
        row["epoch_seconds"] = time.perf_counter() - epoch_start
        if backend.is_main_process:
            save_epoch(context, history)
            print(epoch_line(row, spec.train.epochs), flush=True)
    return predictions


def final_predictions(context: RunContext, history: list[dict], predictions: Predictions | None,
                      test_x: np.ndarray) -> Predictions:
    """The last epoch's predictions, or fresh ones where it has none (a finished run resumed) or the
    recipe adds the translated views."""
    start, translate = time.perf_counter(), context.spec.train.test_time_translate
    if predictions is None or translate:
        predictions = context.backend.predict(test_x, history[-1]["temperature"], translate)
    context.final_evaluation_seconds = time.perf_counter() - start
    return predictions


# Count flags: a value below 1 would crash minutes later (an empty test set, no epoch to summarise)
# or, for the --max-* flags, silently keep n - |value| images.
_AT_LEAST_ONE = ("epochs", "batch_size", "max_train_examples", "max_test_examples", "eval_every")


def check_flag_values(args: argparse.Namespace) -> None:
    """Every out-of-range numeric flag, reported together before the data set is loaded."""
    problems = counts_below_one(args, _AT_LEAST_ONE)
    if args.lr is not None and not args.lr > 0:
        problems.append(f"--lr above 0, found {args.lr}")
    if args.weight_decay is not None and not args.weight_decay >= 0:
        problems.append(f"--weight-decay of at least 0, found {args.weight_decay}")
    if args.seed < 0:  # numpy's generators take no negative seeds, and would refuse only at the first epoch
        problems.append(f"--seed of at least 0, found {args.seed}")
    if problems:
        raise TrainingError(f"expected {'; '.join(problems)}. Change these flags (--help describes them).")


def epoch_line(row: dict, epochs: int) -> str:
    test = (f"test loss {row['test_loss']:.4f} acc {row['test_accuracy']:.2f}%" if "test_accuracy" in row
            else "not evaluated")
    return (f"epoch {row['epoch']}/{epochs}: train loss {row['train_loss']:.4f} acc {row['train_accuracy']:.2f}% "
            f"| {test} | {row['images_per_second']:.0f} img/s")


def subset(images, labels, limit: int | None):
    """A fixed random `limit` of the images (all when None): sources may be sorted by class."""
    if effective_cap(limit, len(images)) is None:
        return images, labels  # no copy of the full training set
    index = subset_index(len(images), limit)
    return images[index], labels[index]


def subset_index(n: int, limit: int | None) -> np.ndarray:
    """The sorted indices `subset` keeps of n images; reports use them to find the evaluated test images."""
    if effective_cap(limit, n) is None:
        return np.arange(n)
    return np.sort(np.random.default_rng(20261124).permutation(n)[:limit])


def refuse_a_used_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> None:
    try:
        used = run_dir.is_dir() and any(run_dir.iterdir())
    except OSError as error:
        raise TrainingError(f"could not list the run directory {run_dir} ({error}); make it readable or pass "
                            "--out another directory.") from error
    if used and not (resume or overwrite):
        raise TrainingError(f"{run_dir} is not empty; pass --resume to continue that run or --overwrite "
                            "to delete it and start again.")
    if used and overwrite and not _looks_like_a_run_dir(run_dir):
        found = sorted(p.name for p in run_dir.iterdir())
        raise TrainingError(f"--overwrite deletes a run directory, and {run_dir} holds no {runfiles.METRICS_FILE}, "
                            f"{runfiles.SUMMARY_FILE} or checkpoint: found {found[:8]}. Pass --out the run's own "
                            "directory, or a new one.")


def _looks_like_a_run_dir(run_dir: Path) -> bool:
    """What a training run writes first: its metrics, its summary, or a checkpoint (a mistyped --out runs
    or --out . holds none of them, and --overwrite must not empty it)."""
    return ((run_dir / runfiles.METRICS_FILE).exists() or (run_dir / runfiles.SUMMARY_FILE).exists()
            or bool(checkpoints.list_checkpoints(run_dir)))


def prepare_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> None:
    if overwrite and run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if resume:
        for path in remove_abandoned_partials(run_dir):
            print(f"--resume: removed {path.name}, left half written by a killed run", flush=True)


def data_sizes(steps_per_epoch: int, test_images: int) -> dict[str, int]:
    """What a checkpoint records of the data it trained on, beyond the run's flags."""
    return {"steps_per_epoch": steps_per_epoch, "test_images": test_images}


def new_segment(start_epoch: int, git_commit: str, device: str) -> dict:
    """This process's share of the run: the epochs done before it, and what ran it. A resumed run's
    summary lists every segment, since its top-level command, commit and device are the last one's."""
    return {"start_epoch": start_epoch, "git_commit": git_commit, "command": runfiles.command_line(),
            "device": device, "cpu": runfiles.cpu_name()}


def resume_state(run_dir: Path, spec: RunSpec, backend: Backend, dataset: Cifar10,
                 sizes: dict) -> tuple[list[dict], list[dict]]:
    """The history and segments of the latest usable checkpoint, whose state the backend takes."""
    checkpoint = checkpoints.latest_checkpoint(run_dir)
    if checkpoint is None:  # killed before the first epoch ended: there is nothing to lose
        print(f"--resume: no usable checkpoint in {run_dir}; starting from the beginning", flush=True)
        return [], []
    recorded = recorded_spec(checkpoint.header["run"])
    recorded.setdefault("max_test_examples", spec.max_test_examples)  # unrecorded before 2026-12-06
    for key, images in (("max_train_examples", dataset.train_labels), ("max_test_examples", dataset.test_labels)):
        recorded[key] = effective_cap(recorded.get(key), len(images))  # recorded as given before 2026-12-06
    differences = _differences(recorded, spec.as_dict())
    if differences:
        raise TrainingError(f"--resume: {checkpoint.path} was written by a different run; differing "
                            f"fields (checkpoint -> now): {'; '.join(differences)}. Resume with the same "
                            "settings, or start a new run directory.")
    recorded_sizes = checkpoint.header.get("data_sizes", sizes)  # unrecorded before 2026-12-07
    if recorded_sizes != sizes:
        raise TrainingError(f"--resume: {checkpoint.path} trained on data of {recorded_sizes}, this data set gives "
                            f"{sizes}: another copy or source of another size. Resume with the data it was "
                            "written with (--data), or start a new run directory.")
    if checkpoint.header["framework"] != backend.framework:
        raise TrainingError(f"--resume: {checkpoint.path} is a {checkpoint.header['framework']} checkpoint, "
                            f"this is {backend.framework}; use the matching train script.")
    _warn_if_the_pixels_changed(checkpoint.header.get("data_source"), dataset.source)
    try:
        backend.load_state_bytes(checkpoint.payload)
    except Exception as error:  # msgpack, flax and torch each raise their own kinds for a state that does not fit
        raise TrainingError(f"--resume: {checkpoint.path} passed its checksum but its state does not load here "
                            f"({type(error).__name__}: {error}); resume with the code and package versions that "
                            "wrote it (its run's summary or log names the commit), or start a new run directory.") \
            from error
    history = checkpoint.header["history"]
    if backend.is_main_process:
        with reporting_write_failures(run_dir, runfiles.METRICS_FILE):
            runfiles.write_metrics(run_dir, history)
        print(f"resumed from {checkpoint.path} after epoch {len(history)}", flush=True)
    # Unrecorded before 2026-12-07: what ran those epochs (one process or several) is unknown.
    return history, checkpoint.header.get("segments", [{"start_epoch": 0, "recorded": False}])


def _warn_if_the_pixels_changed(recorded: str | None, now: str) -> None:
    # A warning, not a refusal: a copy moves with its user, so paths may differ; kinds can tell.
    if recorded and pixel_origin(recorded) != pixel_origin(now):
        warnings.warn(f"--resume: the checkpoint trained on {recorded}, this run reads {now}; the two may hold "
                      "different pixels (an image folder of JPEGs against the official archive), and then the "
                      "epochs from here on train and test on other images. Point --data at the first source, "
                      "or go on if both hold the same pixels.")


def recorded_spec(run: dict) -> dict:
    """A checkpoint's run spec with any recipe or model field added since it was written filled in at
    its default, the value that run trained with: such a checkpoint resumes under the newer code.
    A checkpoint from before the precision was recorded is taken as float32, the default."""
    try:
        return {"precision": "float32", **run, "model": to_dict(model_config_from_dict(run["model"])),
                "train": to_dict(train_config_from_dict(run["train"]))}
    except (KeyError, TypeError, ValueError):  # a field this code does not know, or lacks: _differences names it
        return run


def initialise_from_data(backend: Backend, train: TrainConfig, model: ModelConfig, train_x: np.ndarray) -> None:
    """The recipe's own initialisation of chosen weights, some from the data, before the first step
    (a resumed run has its own)."""
    if train.stem_init == "whitening":
        # A fixed random sample, not the first images: an image folder lists them class by class.
        sample = train_x[subset_index(len(train_x), PATCH_IMAGES)]
        kernel = whitening_stem_kernel(sample, model.kernel_size, model.stem_channels)
        backend.replace_weights({"stem.conv.weight": kernel})
    if train.expert_kernel_init == "dirac":
        backend.replace_weights(dirac_weights(backend.canonical_weights()))


def _differences(old, new, prefix="") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        return [d for key in sorted(set(old) | set(new))
                for d in _differences(old.get(key), new.get(key), f"{prefix}{key}.")]
    return [] if old == new else [f"{prefix.rstrip('.')}: {old!r} -> {new!r}"]


def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    """The shuffle of an epoch depends only on (seed, epoch), so a resumed run sees the same batches."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def augment_rng(seed: int, step: int) -> np.random.Generator:
    """The augmentation randomness of one optimiser step, independent of everything before it."""
    return np.random.default_rng([seed, 1_000_003, step])


def check_driver_step(own: int, asked: int) -> None:
    """The step the driver passes keys the augmentation and dropout draws, the backend's own count the
    learning rate; a RuntimeError if the two disagree."""
    if asked != own:
        raise RuntimeError(f"expected optimiser step {own}, the driver asked for {asked}; pass the backend's "
                           "own step count (a resumed backend restores it).")


def train_epoch(backend: Backend, spec: RunSpec, epoch: int, images, labels, steps_per_epoch: int) -> dict:
    from tqdm import tqdm

    batch = spec.train.batch_size
    order = epoch_order(spec.seed, epoch, len(images))
    temperature = schedules.temperature(epoch, spec.model, spec.train)
    loss_sum = correct = 0.0
    start = time.perf_counter()
    bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{spec.train.epochs}", unit="step",
               leave=False, mininterval=1 if sys.stderr.isatty() else 30, file=sys.stderr,
               disable=not backend.is_main_process)
    for i in bar:
        step = epoch * steps_per_epoch + i
        index = np.sort(order[i * batch:(i + 1) * batch])
        loss, batch_correct, grad_norm = backend.train_step(images[index], labels[index], step, temperature)
        loss, grad_norm = float(loss), float(grad_norm)
        if not (np.isfinite(loss) and np.isfinite(grad_norm)):
            raise TrainingError(f"the loss became {loss} (gradient norm {grad_norm}) at optimiser step {step} "
                                f"(epoch {epoch + 1}); stopped without saving it. The last good checkpoint is "
                                "kept; lower the learning rate and --resume, or start again.")
        loss_sum += loss
        correct += float(batch_correct)
        bar.set_postfix(loss=f"{loss_sum / (i + 1):.3f}",
                        img_s=f"{(i + 1) * batch / (time.perf_counter() - start):.0f}", refresh=False)
    bar.close()
    seconds = time.perf_counter() - start
    return {"epoch": epoch + 1, "train_loss": loss_sum / steps_per_epoch,
            "train_accuracy": 100 * correct / (steps_per_epoch * batch),
            "learning_rate": float(schedules.learning_rate(epoch * steps_per_epoch, spec.train, steps_per_epoch)),
            "temperature": temperature, "train_seconds": seconds,
            "images_per_second": steps_per_epoch * batch / seconds}


def evaluate(predictions: Predictions, labels: np.ndarray) -> dict:
    log_probs = runfiles.log_softmax(predictions.logits)
    return {"test_loss": float(-log_probs[np.arange(len(labels)), labels].mean()),
            "test_accuracy": float(100 * (predictions.logits.argmax(1) == labels).mean()),
            **runfiles.attention_statistics(predictions.attention)}


@contextlib.contextmanager
def reporting_write_failures(run_dir: Path, what: str):
    """A full disk or a read-only directory stops the run with what survived, never a traceback."""
    try:
        yield
    except OSError as error:
        usable = checkpoints.latest_checkpoint(run_dir)
        survivor = (f"the last good checkpoint, {usable.path.name}, is intact" if usable
                    else "no usable checkpoint exists yet")
        raise TrainingError(f"could not write {what} in {run_dir} ({error}); {survivor}. Free disk space "
                            "or make the directory writable, then run again with --resume.") from error


def save_epoch(context: RunContext, history: list[dict]) -> None:
    spec, backend, run_dir = context.spec, context.backend, context.run_dir
    header = {"framework": backend.framework, "run": spec.as_dict(), "history": history,
              "merge": context.merge, "data_source": context.data_source, "segments": context.segments,
              "data_sizes": data_sizes(context.steps_per_epoch, len(context.test_index))}
    with reporting_write_failures(run_dir, f"the files of epoch {len(history)}"):
        checkpoints.write_checkpoint(run_dir, len(history), header, backend.state_bytes())
        runfiles.write_metrics(run_dir, history)
        plots.plot_curves(history, run_dir / runfiles.CURVES_PLOT, run_title(spec, backend))


def run_title(spec: RunSpec, backend: Backend) -> str:
    return f"{backend.framework} · preset {spec.preset}"


def finish(context: RunContext, history: list[dict], predictions: Predictions, test_y) -> dict:
    summary = make_summary(context, history, evaluate(predictions, test_y)["test_accuracy"], len(test_y))
    with reporting_write_failures(context.run_dir, "the final run files"):
        write_final_files(context, history, predictions, test_y)
        runfiles.write_json(context.run_dir / runfiles.SUMMARY_FILE, summary)
    print(f"done: test accuracy {summary['test_accuracy']:.2f}% after {len(history)} epochs, "
          f"{summary['images_per_second']:.0f} img/s; run files in {context.run_dir}", flush=True)
    return summary


def write_final_files(context: RunContext, history: list[dict], predictions: Predictions, test_y) -> None:
    spec, backend, run_dir, class_names = context.spec, context.backend, context.run_dir, context.class_names
    per_class = runfiles.attention_per_class(predictions.attention, test_y, len(class_names))
    matrix = runfiles.confusion_matrix(test_y, predictions.logits.argmax(1), len(class_names))
    title = run_title(spec, backend)
    plots.plot_confusion_matrix(matrix, class_names, run_dir / runfiles.CONFUSION_PLOT, f"confusion matrix · {title}")
    plots.plot_attention_per_class(per_class, class_names, run_dir / runfiles.ATTENTION_PLOT,
                                   f"mean expert attention per class · {title}")
    portable.save_portable(run_dir / runfiles.PORTABLE_WEIGHTS, backend.canonical_weights(), spec.model,
                           {"framework": backend.framework, "preset": spec.preset, "epochs": len(history),
                            "train": to_dict(spec.train), "max_test_examples": spec.max_test_examples})
    runfiles.write_evaluation(run_dir, {"logits": predictions.logits, "labels": test_y,
                                        "test_index": context.test_index,
                                        **{f"attention_{b}": a for b, a in enumerate(predictions.attention)}})


def make_summary(context: RunContext, history: list[dict], test_accuracy: float, test_examples: int) -> dict:
    """`test_accuracy`: the final evaluation's, with every test-time view; the epochs' (`best_test_accuracy`,
    `last_epoch_test_accuracy`) leave out the translated ones."""
    spec, backend = context.spec, context.backend
    best = max(runfiles.evaluated_epochs(history), key=lambda r: r["test_accuracy"])
    return {
        "framework": backend.framework, "preset": spec.preset, "device": backend.device,
        "cpu": runfiles.cpu_name(), "precision": spec.precision, "epochs": len(history),
        "test_accuracy": test_accuracy, "last_epoch_test_accuracy": history[-1]["test_accuracy"],
        "best_test_accuracy": best["test_accuracy"], "best_epoch": best["epoch"],
        "eval_every_epochs": context.eval_every_epochs,
        **speed(history), "final_evaluation_seconds": round(context.final_evaluation_seconds, 2),
        "train_examples": context.steps_per_epoch * spec.train.batch_size,
        "test_examples": test_examples, "data_source": context.data_source,
        "command": runfiles.command_line(), "git_commit": context.git_commit,
        "versions": backend.versions(), "segments": segments_trained(context.segments, history),
        **spec.as_dict(),
    }


def speed(rows: list[dict]) -> dict:
    """Wall time of these epochs (evaluations included) and the images a second of their steps."""
    step_seconds = sum(r["train_seconds"] for r in rows)
    return {"train_wall_seconds": round(sum(r["epoch_seconds"] for r in rows), 2),
            "images_per_second": round(sum(r["train_seconds"] * r["images_per_second"] for r in rows)
                                       / step_seconds, 1)}


def segments_trained(segments: list[dict], history: list[dict]) -> list[dict]:
    """Each segment with the epochs it trained and their speed (a run spanning machines has one
    speed per machine, and its top-level figure is their blend)."""
    ends = [segment["start_epoch"] for segment in segments[1:]] + [len(history)]
    trained = []
    for segment, end in zip(segments, ends):
        rows = history[segment["start_epoch"]:end]
        trained.append({**segment, "epochs_trained": len(rows), **(speed(rows) if rows else {})})
    return trained
