"""Insight into trained runs: the HTML report, and the framework-free half of predicting on image files.

Report: `build_report(run_dirs, out_dir, dataset)` writes `report.html` and the PNGs it shows into
`out_dir`, for one run or several side by side, from the files training writes (expert_core.runfiles):
curves, per-class accuracy and confusion, mean attention per class and block, expert usage over
training and the worst mistakes. A run still training (no summary.json / evaluation.npz yet) gets
the sections its metrics allow. The page references its PNGs by relative name: the directory is
self-contained.

Predictions: `read_image` applies the input policy (IMAGE_POLICY) to one file, `evaluation_settings`
says how the run's own evaluation ran a checkpoint, and `prediction_record` / `format_record` turn
logits and attention into the result for one file.
"""

from __future__ import annotations

import html
import json
import re
import zipfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from expert_core import checkpoints, plots, runfiles, schedules
from expert_core.config import CLASS_NAMES, PRESETS, ModelConfig, TrainConfig, train_config_from_dict
from expert_core.files import atomic_write_bytes
from expert_core.portable import WeightsError

REPORT_FILE = "report.html"
GRID_SIZE = 40


class ReportError(Exception):
    """A run directory, checkpoint or image the report or prediction cannot use; says what to do."""


# What loading a user's checkpoint can fail with, each error saying what to do: scripts print these.
LOAD_ERRORS = (ReportError, checkpoints.CheckpointError, WeightsError)


@dataclass
class Run:
    label: str
    slug: str  # prefix of this run's PNG names
    path: Path
    history: list[dict]
    summary: dict | None  # None while the run is still training
    evaluation: dict | None  # runfiles.read_evaluation; None while the run is still training


# ---------------------------------------------------------------- runs


def load_runs(run_dirs) -> list[Run]:
    runs = [load_run(Path(d)) for d in run_dirs]
    taken: set[str] = set()
    for run in runs:  # two runs named alike must not overwrite each other's PNGs
        label, slug, copy = run.label, run.slug, 1
        # "a", "a", "a-2": the second "a" is "a-2", so the third becomes "a-2-2". Case-folded: "Seed.png"
        # and "seed.png" are one file on macOS and Windows.
        while slug.casefold() in taken:
            copy += 1
            label, slug = f"{run.label} ({copy})", f"{run.slug}-{copy}"
        run.label, run.slug = label, slug
        taken.add(slug.casefold())
    return runs


def load_run(path: Path) -> Run:
    if not (path / runfiles.METRICS_FILE).is_file():
        found = sorted(p.name for p in path.iterdir())[:8] if path.is_dir() else "no such directory"
        raise ReportError(f"{path}: expected a run directory written by scripts/train_flax.py or "
                          f"train_torch.py (with {runfiles.METRICS_FILE}), found {found}. Pass a run's --out "
                          "directory.")
    try:
        history = runfiles.read_metrics(path)
    except (OSError, ValueError) as error:  # json's and UTF-8's decoding errors are ValueErrors
        raise ReportError(f"{path / runfiles.METRICS_FILE}: expected one JSON object per line, found a damaged file "
                          f"({type(error).__name__}: {error}); run the training again with --resume to rewrite "
                          "it from the last checkpoint.") from error
    if not runfiles.evaluated_epochs(history):
        raise ReportError(f"{path / runfiles.METRICS_FILE}: expected at least one epoch followed by a test "
                          f"evaluation, found {len(history)} epochs and none evaluated; report on the run once "
                          "its first evaluation has run.")
    summary_path, evaluation_path = path / runfiles.SUMMARY_FILE, path / runfiles.EVALUATION_FILE
    try:
        summary = json.loads(summary_path.read_text()) if summary_path.is_file() else None
        evaluation = runfiles.read_evaluation(path) if evaluation_path.is_file() else None
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as error:
        raise ReportError(f"{path}: expected readable {runfiles.SUMMARY_FILE} and {runfiles.EVALUATION_FILE}, "
                          f"found a damaged one ({type(error).__name__}: {error}); run the training again "
                          "with --resume to rewrite them.") from error
    label = path.resolve().name
    return Run(label, re.sub(r"[^A-Za-z0-9_.-]+", "-", label), path, history, summary, evaluation)


def probabilities(logits: np.ndarray) -> np.ndarray:
    return np.exp(runfiles.log_softmax(logits))


def worst_mistakes(logits: np.ndarray, labels: np.ndarray, count: int) -> np.ndarray:
    """Positions of the wrongly classified images, the most confident wrong answer first."""
    probs = probabilities(logits)
    predicted = probs.argmax(1)
    wrong = np.flatnonzero(predicted != labels)
    order = np.argsort(-probs[wrong, predicted[wrong]], kind="stable")  # ties: test-set order
    return wrong[order[:count]]


def evaluated_images(run: Run, dataset) -> tuple[np.ndarray | None, str]:
    """The test images in the order of the run's evaluation, or None and the reason."""
    labels, index = run.evaluation["labels"], run.evaluation.get("test_index")
    total = len(dataset.test_labels)
    if index is None and len(labels) != total:
        return None, (f"its {runfiles.EVALUATION_FILE} covers {len(labels)} of the {total} test images but "
                      "does not record which (it predates `test_index`); train it again to get the grid.")
    index = np.arange(total) if index is None else index
    in_range = index.min(initial=0) >= 0 and index.max(initial=-1) < total  # a negative index would wrap round
    if not in_range or not np.array_equal(dataset.test_labels[index], labels):
        recorded = (run.summary or {}).get("data_source", "unknown")
        return None, (f"the loaded test set ({dataset.source}) has other labels at the run's indices than "
                      f"the run evaluated (its data: {recorded}); pass --data pointing at the run's data set.")
    return dataset.test_images[index], ""


# ---------------------------------------------------------------- report


def build_report(run_dirs, out_dir, dataset=None, data_problem: str = "", grid_size: int = GRID_SIZE) -> Path:
    """Write report.html and its PNGs into out_dir; `dataset` (data.Cifar10) supplies the grid's images."""
    runs = load_runs(run_dirs)
    out_dir = Path(out_dir)
    if any(run.path.resolve() == out_dir.resolve() for run in runs):
        raise ReportError(f"{out_dir}: expected a report directory apart from the runs, found a run directory "
                          "(the report would overwrite its curves.png); use the default RUN_DIR/report or another "
                          "--out.")
    out_dir.mkdir(parents=True, exist_ok=True)
    finished = [run for run in runs if run.evaluation is not None]
    sections = [summary_section(runs), curves_section(runs, out_dir)]
    if finished:
        sections += [accuracy_section(finished, out_dir), attention_section(finished, out_dir)]
    sections.append(usage_section(runs, out_dir))
    if finished:
        sections.append(mistakes_section(finished, out_dir, dataset, data_problem, grid_size))
    title = "Expert-block CNN report: " + " vs ".join(run.label for run in runs)
    path = out_dir / REPORT_FILE
    atomic_write_bytes(path, page(title, runs, sections).encode())
    return path


def summary_section(runs: list[Run]) -> str:
    rows = [("directory", [str(run.path) for run in runs])]
    rows += [(name, [_summary_value(run, key) for run in runs]) for name, key in SUMMARY_ROWS]
    rows.append(("attention entropy / ln K, last evaluated epoch", [_entropy_fraction(run) for run in runs]))
    header = "".join(f"<th>{_e(run.label)}</th>" for run in runs)
    body = "".join(f"<tr><th>{_e(name)}</th>{''.join(f'<td>{_e(v)}</td>' for v in values)}</tr>"
                   for name, values in rows)
    return _section("Runs", "Where each run came from and how it ended. Entropy near 1 means every image "
                    "blends its experts almost evenly; near 0, each image picks one expert.",
                    f"<table><tr><th></th>{header}</tr>{body}</table>")


SUMMARY_ROWS = (("framework", "framework"), ("preset", "preset"), ("epochs finished", "epochs"),
                ("final test accuracy, every test-time view", "final"),
                ("test accuracy, last evaluated epoch", "test_accuracy"), ("best test accuracy (epoch)", "best"),
                ("train / test images", "examples"), ("train images / s", "images_per_second"),
                ("train wall time", "train_wall_seconds"), ("device", "device"), ("precision", "precision"),
                ("data", "data_source"), ("git commit", "git_commit"), ("command", "command"),
                ("trained by (epochs: commit, device)", "segments"))


def _summary_value(run: Run, key: str) -> str:
    tested, summary = runfiles.evaluated_epochs(run.history), run.summary or {}
    if key == "epochs":
        return str(len(run.history)) + ("" if run.summary else " (still training, or stopped early)")
    if key == "test_accuracy":
        return f"{tested[-1]['test_accuracy']:.2f} % ({tested[-1]['epoch']})"
    if key == "best":
        best = max(tested, key=lambda row: row["test_accuracy"])
        return f"{best['test_accuracy']:.2f} % ({best['epoch']})"
    if not run.summary:
        return "n/a (no summary.json yet)"
    if key == "final":  # the run's result, which evaluation.npz and the sections below hold
        return f"{summary['test_accuracy']:.2f} %"
    if key == "examples":
        return f"{summary['train_examples']} / {summary['test_examples']}"
    if key == "train_wall_seconds":
        return f"{summary[key]:.0f} s ({summary[key] / 60:.1f} min)"
    if key == "device":
        return f"{summary['device']}, {summary.get('cpu', '')}"
    if key == "segments":
        return "; ".join(map(_segment_text, summary.get(key, []))) or "n/a (not recorded)"
    return str(summary.get(key, "n/a"))


def _segment_text(segment: dict) -> str:
    """One process's share of a run, e.g. "epochs 11-22: 1a2b3c4d5e, cpu, AMD EPYC (AVX2)"."""
    first, last = segment["start_epoch"] + 1, segment["start_epoch"] + segment["epochs_trained"]
    epochs = f"epochs {first}-{last}" if last >= first else "no epochs (final evaluation)"
    if not segment.get("recorded", True):
        return f"{epochs}: not recorded"
    commit = segment["git_commit"]
    short = commit[:10] + ("-dirty" if commit.endswith("-dirty") else "")
    return f"{epochs}: {short}, {segment['device']}, {segment['cpu']}"


def _entropy_fraction(run: Run) -> str:
    last = runfiles.evaluated_epochs(run.history)[-1]
    experts = len(last["expert_usage"][0])
    if experts < 2:
        return "n/a (one expert)"
    return ", ".join(f"block {b}: {h / np.log(experts):.3f}" for b, h in enumerate(last["attention_entropy"]))


def curves_section(runs: list[Run], out_dir: Path) -> str:
    name = "curves.png"
    plots.plot_curves({run.label: run.history for run in runs}, out_dir / name,
                      "training curves" + (", overlaid" if len(runs) > 1 else ""))
    return _section("Training curves", "Colour: run. Dashed: training batches (augmented, averaged over "
                    "the epoch); solid: the test images after the epoch.", _figure(name, "training curves"))


def _percent(value: float) -> str:
    return "n/a" if np.isnan(value) else f"{value:.1f} %"


def accuracy_section(runs: list[Run], out_dir: Path) -> str:
    accuracies, figures = {}, []
    for run in runs:
        labels, predicted = run.evaluation["labels"], run.evaluation["logits"].argmax(1)
        matrix = runfiles.confusion_matrix(labels, predicted, len(CLASS_NAMES))
        images = matrix.sum(1)  # a class absent from a small test subset has no accuracy, not 0 %
        accuracies[run.label] = np.divide(100 * np.diag(matrix), images, out=np.full(len(images), np.nan),
                                          where=images > 0)
        name = f"{run.slug}-confusion.png"
        plots.plot_confusion_matrix(matrix, CLASS_NAMES, out_dir / name, f"confusion matrix · {run.label}")
        figures.append(_figure(name, f"confusion matrix of {run.label}"))
    plots.plot_per_class_accuracy(accuracies, CLASS_NAMES, out_dir / "per-class-accuracy.png")
    header = "".join(f"<th>{_e(label)}</th>" for label in accuracies)
    body = "".join(f"<tr><th>{_e(c)}</th>{''.join(f'<td>{_percent(a[i])}</td>' for a in accuracies.values())}</tr>"
                   for i, c in enumerate(CLASS_NAMES))
    return _section("Accuracy per class and confusion", "On the test images of the last evaluation. "
                    "Confusion rows are the true class; colour is the fraction of that class, numbers are counts.",
                    _figure("per-class-accuracy.png", "accuracy per class")
                    + f"<table class='small'><tr><th>class</th>{header}</tr>{body}</table>" + _side_by_side(figures))


def attention_section(runs: list[Run], out_dir: Path) -> str:
    per_class = {run.slug: runfiles.attention_per_class(run.evaluation["attention"], run.evaluation["labels"],
                                                       len(CLASS_NAMES)) for run in runs}
    spread = max(plots.attention_spread(p) for p in per_class.values())  # one scale: runs compare by colour
    figures = []
    for run in runs:
        name = f"{run.slug}-attention-per-class.png"
        plots.plot_attention_per_class(per_class[run.slug], CLASS_NAMES, out_dir / name,
                                       f"mean expert attention per class · {run.label}", spread)
        figures.append(_figure(name, f"mean attention per class of {run.label}"))
    return _section("What the experts attend to", "For every block, the mean attention each expert receives "
                    "from the test images of each class. White is uniform (1/K); red, the class weighs the expert "
                    "more; blue, less. One colour scale for all runs. A column that changes colour down the classes "
                    "is an expert that specialises by class; a map of one flat colour per column is usage that "
                    "does not depend on the class. Expert numbers are arbitrary labels: e1 of one run has nothing "
                    "to do with e1 of another.", "".join(figures))


def usage_section(runs: list[Run], out_dir: Path) -> str:
    figures = []
    for run in runs:
        name = f"{run.slug}-expert-usage.png"
        plots.plot_expert_usage(run.history, out_dir / name, f"expert usage over training · {run.label}")
        figures.append(_figure(name, f"expert usage over training of {run.label}"))
    return _section("Expert usage over training", "One point per evaluated epoch, measured on the test images. An "
                    "expert whose mean attention goes to 0 is dying (collapse onto the others); entropy falling "
                    "from ln K towards 0 means each image chooses fewer experts (specialisation), while usage can "
                    "stay balanced across images.", "".join(figures))


def mistakes_section(runs: list[Run], out_dir: Path, dataset, data_problem: str, grid_size: int) -> str:
    parts = [_mistakes_for_run(run, out_dir, dataset, data_problem, grid_size) for run in runs]
    return _section("Worst mistakes", f"Up to {grid_size} wrongly classified test images per run, the most "
                    "confident wrong answer first (read left to right, top to bottom).", "".join(parts))


def _mistakes_for_run(run: Run, out_dir: Path, dataset, data_problem: str, grid_size: int) -> str:
    heading = f"<h3>{_e(run.label)}</h3>"
    if dataset is None:
        return heading + f"<p class='note'>No grid: the test images could not be loaded ({_e(data_problem)}).</p>"
    images, problem = evaluated_images(run, dataset)
    if images is None:
        return heading + f"<p class='note'>No grid: {_e(problem)}</p>"
    logits, labels = run.evaluation["logits"], run.evaluation["labels"]
    positions = worst_mistakes(logits, labels, grid_size)
    if len(positions) == 0:
        return heading + "<p>No mistakes on the evaluated test images.</p>"
    probs = probabilities(logits)
    index = run.evaluation.get("test_index", np.arange(len(labels)))
    rows = [(rank + 1, int(index[p]), CLASS_NAMES[labels[p]], CLASS_NAMES[probs[p].argmax()],
             probs[p].max(), probs[p, labels[p]]) for rank, p in enumerate(positions)]
    name = f"{run.slug}-worst-mistakes.png"
    plots.plot_image_grid(images[positions], [f"#{r[0]} true: {r[2]}\npredicted: {r[3]} {100 * r[4]:.0f}%"
                                              for r in rows], out_dir / name, f"worst mistakes · {run.label}")
    return heading + _figure(name, f"worst mistakes of {run.label}") + _mistakes_table(run.label, rows)


def _mistakes_table(label: str, rows) -> str:
    """The grid as data (test index, classes, probabilities), for readers and for checking the order."""
    body = "".join(f"<tr><td>{r[0]}</td><td>{r[1]}</td><td>{_e(r[2])}</td><td>{_e(r[3])}</td><td>{r[4]:.4f}</td>"
                   f"<td>{r[5]:.4f}</td></tr>" for r in rows)
    return (f"<details><summary>the same images as a table</summary><table class='small mistakes' "
            f"data-run='{_e(label)}'><tr><th>rank</th><th>test index</th><th>true</th><th>predicted</th>"
            f"<th>p(predicted)</th><th>p(true)</th></tr>{body}</table></details>")


def page(title: str, runs: list[Run], sections: list[str]) -> str:
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (f"<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'><title>{_e(title)}</title>"
            f"<style>{STYLE}</style></head><body><h1>{_e(title)}</h1>"
            f"<p class='note'>Written {stamp} by scripts/report.py from "
            f"{_e(', '.join(str(run.path) for run in runs))}.</p>{''.join(sections)}</body></html>\n")


STYLE = ("body{font-family:system-ui,sans-serif;max-width:1500px;margin:1em auto;padding:0 1em;color:#222}"
         "table{border-collapse:collapse;margin:0.5em 0}th,td{border:1px solid #ccc;padding:3px 8px;"
         "text-align:left;vertical-align:top}table.small{font-size:0.85em}img{max-width:100%}"
         "figure{margin:0.5em 0}.row{display:flex;flex-wrap:wrap;gap:1em}.row>figure{flex:1 1 520px}"
         ".note{color:#666;font-size:0.9em}h2{border-bottom:1px solid #ddd;margin-top:1.6em}")


def _section(title: str, explanation: str, content: str) -> str:
    return f"<section><h2>{_e(title)}</h2><p>{_e(explanation)}</p>{content}</section>"


def _figure(name: str, alt: str) -> str:
    return f"<figure><img src='{_e(name)}' alt='{_e(alt)}'></figure>"


def _side_by_side(figures: list[str]) -> str:
    return f"<div class='row'>{''.join(figures)}</div>"


def _e(text) -> str:
    return html.escape(str(text), quote=True)


# ---------------------------------------------------------------- predictions on image files

IMAGE_POLICY = (
    "Inputs: any file Pillow reads (PNG, JPEG, BMP, WebP, a GIF's first frame, ...); EXIF rotation is "
    "applied. Colour only: RGB is used as it is; a palette image, or RGBA whose alpha is fully opaque, "
    "is converted to RGB (nothing is lost). Grayscale, CMYK, translucent RGBA and other modes are "
    "refused with an error for that file: converting them would invent colours the network never saw; "
    "convert them yourself if you mean it. An image that is not 32x32 is centre-cropped to a square "
    "and resized to 32x32 (Lanczos), with a note.")

MODE_NAMES = {"1": "1-bit black and white", "L": "grayscale", "LA": "grayscale with alpha", "I": "32-bit grayscale",
              "I;16": "16-bit grayscale", "F": "floating-point grayscale", "P": "palette with transparency",
              "PA": "palette with alpha", "RGBA": "RGBA with transparent pixels", "CMYK": "CMYK",
              "YCbCr": "YCbCr", "LAB": "Lab", "HSV": "HSV"}


def read_image(path) -> tuple[np.ndarray, list[str]]:
    """One image file as uint8 (32, 32, 3) RGB and notes on what was done to it; ReportError if unusable."""
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as image:
            image.load()  # decode now: a truncated file must fail here, as this file's error
            image = ImageOps.exif_transpose(image)
    except FileNotFoundError:
        raise ReportError(f"{path}: expected an image file, found nothing there; check the path.") from None
    except Exception as error:  # Pillow raises many types for damaged files (OSError, SyntaxError, ...)
        raise ReportError(f"{path}: expected an image Pillow can decode (PNG, JPEG, ...), found a file it cannot "
                          f"read ({type(error).__name__}: {error}); check that it is a complete image.") from None
    image, notes = _as_rgb(image, path)
    return _as_32x32(image, notes)


def _as_rgb(image, path):
    if image.mode == "RGB":
        return image, []
    if image.mode == "P" and "transparency" not in image.info:
        return image.convert("RGB"), ["palette image converted to RGB"]
    if image.mode == "RGBA" and image.getchannel("A").getextrema() == (255, 255):
        return image.convert("RGB"), ["fully opaque alpha channel dropped"]
    kind = MODE_NAMES.get(image.mode, "not RGB")
    found = f"Pillow mode {image.mode!r}" + ("" if kind == image.mode else f" ({kind})")
    raise ReportError(f"{path}: expected an RGB colour image, found {found}; the "
                      "network was trained on colour photographs. Convert it to RGB yourself if you mean it, "
                      "e.g. Image.open(path).convert('RGB').save(new_path).")


def _as_32x32(image, notes: list[str]) -> tuple[np.ndarray, list[str]]:
    from PIL import Image

    width, height = image.size
    if (width, height) != (32, 32):
        side = min(width, height)
        box = ((width - side) // 2, (height - side) // 2, (width + side) // 2, (height + side) // 2)
        image = image.resize((32, 32), Image.Resampling.LANCZOS, box=box)
        crop = f", centre {side}x{side} square" if width != height else ""
        notes = notes + [f"resized from {width}x{height} to 32x32{crop}"]
    return np.asarray(image, np.uint8), notes


def resolve_checkpoint(path) -> Path | checkpoints.Checkpoint:
    """A checkpoint file as given; a run directory means its portable weights, else its newest checkpoint,
    which comes back already read (finding the newest undamaged one reads it)."""
    path = Path(path)
    if not path.is_dir():
        return path
    if (path / runfiles.PORTABLE_WEIGHTS).is_file():
        return path / runfiles.PORTABLE_WEIGHTS
    latest = checkpoints.latest_checkpoint(path)
    if latest is None:
        raise ReportError(f"{path}: expected {runfiles.PORTABLE_WEIGHTS} or a checkpoint-NNNNN.ckpt in this run "
                          "directory, found neither; pass a checkpoint file.")
    return latest


def evaluation_settings(run_record: dict, config: ModelConfig, path: Path) -> tuple[float, TrainConfig]:
    """The temperature and recipe (test-time views) of the run's own final evaluation, so predictions
    match evaluation.npz. `run_record` is what the weights file at `path` records of its run. A portable
    file without its recipe (written before they carried one) is evaluated as its preset now says; one
    from elsewhere with the model's temperature and no views."""
    preset = PRESETS.get(run_record.get("preset"))
    if "train" in run_record:
        train = _recorded_recipe(run_record["train"], path)
    elif preset is not None:
        train = preset.train
    else:
        return config.temperature, TrainConfig()
    epochs = run_record.get("epochs", train.epochs)
    return schedules.temperature(epochs - 1, config, train), train


def _recorded_recipe(recorded: dict, path: Path) -> TrainConfig:
    try:
        return train_config_from_dict(recorded)
    except (TypeError, KeyError, ValueError) as error:  # a field added or renamed by another version
        raise ReportError(f"{path} records a recipe this code cannot read ({error}); expected the fields of "
                          "expert_core.config.TrainConfig. Use the version of this library that wrote it (its "
                          "summary.json names the commit).") from error


def prediction_record(path: str, logits: np.ndarray, attention: list[np.ndarray], notes: list[str]) -> dict:
    """One image's result: probabilities, the top 3, each block's attention vector (JSON-ready)."""
    probs = probabilities(logits)
    top = np.argsort(-probs, kind="stable")[:3]
    return {"file": path, "ok": True, "notes": notes,
            "top3": [{"class": CLASS_NAMES[c], "probability": float(probs[c])} for c in top],
            "probabilities": dict(zip(CLASS_NAMES, probs.tolist())), "logits": np.asarray(logits).tolist(),
            "attention": [np.asarray(a, np.float64).tolist() for a in attention]}


def format_record(record: dict) -> str:
    top = "   ".join(f"{i + 1}. {t['class']} {100 * t['probability']:.1f}%" for i, t in enumerate(record["top3"]))
    lines = [f"{record['file']}: {top}"]
    lines += [f"  note: {note}" for note in record["notes"]]
    lines += [f"  block {b} attention: " + " ".join(f"e{k} {v:.3f}" for k, v in enumerate(a))
              for b, a in enumerate(record["attention"])]
    return "\n".join(lines)
