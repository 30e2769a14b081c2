"""The run's PNG plots, drawn from the run files alone so either framework's run looks the same.

Training writes `curves.png`, `confusion_matrix.png` and `attention_per_class.png` with these; the
report (expert_core.report) draws the same figures, several runs overlaid or side by side, and
adds per-class accuracy, expert usage over training and the grid of worst mistakes.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: training machines and CI have no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import TwoSlopeNorm  # noqa: E402
from matplotlib.ticker import FormatStrFormatter, MaxNLocator  # noqa: E402

from expert_core.files import atomic_writer  # noqa: E402
from expert_core.runfiles import evaluated_epochs  # noqa: E402

RUN_COLOURS = plt.rcParams["axes.prop_cycle"].by_key()["color"]


def plot_curves(runs: list[dict] | dict[str, list[dict]], path: Path, title: str = "") -> None:
    """Loss, accuracy and learning rate per epoch (test points at the evaluated epochs only); `runs` is one
    run's history or {label: history}."""
    runs = runs if isinstance(runs, dict) else {"": runs}
    fig, (loss_ax, acc_ax, lr_ax) = plt.subplots(1, 3, figsize=(15, 4.4), layout="constrained")
    for colour, (label, history) in zip(itertools.cycle(RUN_COLOURS), runs.items()):
        epochs = [row["epoch"] for row in history]
        prefix = f"{label} · " if label else ""
        split_colours = (colour, colour) if len(runs) > 1 else RUN_COLOURS[:2]  # colour means run when overlaid
        tested = evaluated_epochs(history)
        for ax, key in ((loss_ax, "loss"), (acc_ax, "accuracy")):
            # Markers: a one-epoch run is a single point, which a bare line would not draw at all.
            ax.plot(epochs, [r[f"train_{key}"] for r in history], "--o", color=split_colours[0], markersize=4,
                    label=f"{prefix}train (augmented, during the epoch)")
            ax.plot([r["epoch"] for r in tested], [r[f"test_{key}"] for r in tested], "-s", color=split_colours[1],
                    markersize=4, label=f"{prefix}test (after the epoch)")
        lr_ax.plot(epochs, [r["learning_rate"] for r in history], "-o", color=colour, markersize=4)
    loss_ax.set(xlabel="epoch", ylabel="cross-entropy (label-smoothed for train)", title="loss")
    acc_ax.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy")
    peak_lr = max(row["learning_rate"] for history in runs.values() for row in history)
    lr_ax.set(xlabel="epoch", ylabel="learning rate", title="learning rate at the start of the epoch",
              ylim=(0, 1.15 * peak_lr or 1))  # from 0: a constant rate otherwise gets ticks 1.0e-03 three times
    lr_ax.yaxis.set_major_formatter(FormatStrFormatter("%.1e"))
    for ax in (loss_ax, acc_ax, lr_ax):
        _epoch_axis(ax, max(history[-1]["epoch"] for history in runs.values()))
    fig.legend(*loss_ax.get_legend_handles_labels(), loc="outside lower center", ncols=min(4, 2 * len(runs)))
    fig.suptitle(title)
    _save(fig, path)


def plot_confusion_matrix(matrix: np.ndarray, class_names, path: Path, title: str = "") -> None:
    rates = matrix / np.maximum(matrix.sum(1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(7.5, 6.5))
    image = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    _annotate(ax, image, rates, [str(count) for count in matrix.ravel()])
    ticks = np.arange(len(class_names))
    ax.set_xticks(ticks, class_names, rotation=45, ha="right")
    ax.set_yticks(ticks, class_names)
    ax.set(xlabel="predicted class", ylabel="true class", title=title or "confusion matrix (test set)")
    fig.colorbar(image, ax=ax, label="fraction of the true class (cells show counts)")
    _save(fig, path)


def plot_per_class_accuracy(runs: dict[str, np.ndarray], class_names, path: Path, title: str = "") -> None:
    """Grouped bars: for each class, each run's accuracy (%) on that class's test images."""
    fig, ax = plt.subplots(figsize=(max(8.0, 1.0 + 0.45 * len(class_names) * len(runs)), 4.2))
    width = 0.8 / len(runs)
    positions = np.arange(len(class_names))
    for i, (colour, (label, accuracy)) in enumerate(zip(itertools.cycle(RUN_COLOURS), runs.items())):
        ax.bar(positions - 0.4 + width * (i + 0.5), accuracy, width, color=colour, label=label)
    ax.set_xticks(positions, class_names, rotation=30, ha="right")
    ax.set(ylim=(0, 100), ylabel="accuracy on the class's test images (%)",
           title=title or "accuracy per class (test set)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)


def attention_spread(per_class: np.ndarray) -> float:
    """The largest distance of a mean attention from uniform 1/K: half the width of the colour scale."""
    deviation = np.abs(per_class - 1 / per_class.shape[-1])
    return float(max(np.nanmax(deviation), 1e-3)) if np.isfinite(deviation).any() else 1e-3


def plot_attention_per_class(per_class: np.ndarray, class_names, path: Path, title: str = "",
                             spread: float | None = None) -> None:
    """per_class: (blocks, classes, experts) mean attention; one heatmap per block.

    The colour scale is white at uniform attention 1/K: after little training every mean is near
    it, and a 0..1 scale would paint the whole map one colour. `spread` (default: this figure's own)
    sets its half-width, so several runs can share one scale.
    """
    blocks, _, experts = per_class.shape
    spread = spread or attention_spread(per_class)
    # An attention is never below 0: the scale stops there rather than showing impossible values.
    norm = TwoSlopeNorm(1 / experts, max(0.0, 1 / experts - spread), 1 / experts + spread)
    fig, axes = plt.subplots(1, blocks, figsize=(2.4 + 1.1 * experts * blocks, 4.8), squeeze=False)
    for b, ax in enumerate(axes[0]):
        image = ax.imshow(per_class[b], cmap="RdBu_r", norm=norm, aspect="auto")
        _annotate(ax, image, per_class[b], [f"{v:.{3 if spread < 0.05 else 2}f}" for v in per_class[b].ravel()])
        ax.set_xticks(np.arange(experts), [f"e{k}" for k in range(experts)])
        ax.set_yticks(np.arange(len(class_names)), class_names if b == 0 else [""] * len(class_names))
        ax.set(xlabel="expert", ylabel="true class" if b == 0 else "", title=f"block {b}")
    fig.colorbar(image, ax=axes[0].tolist(),
                 label=f"mean attention (white = uniform 1/K = {1 / experts:.3g}; red = more)")
    fig.suptitle(title or "mean expert attention per class (test set)")
    _save(fig, path)


def plot_expert_usage(history: list[dict], path: Path, title: str = "") -> None:
    """Per block, the mean attention of each expert per evaluated epoch; and each block's attention entropy."""
    history = evaluated_epochs(history)
    usage = np.array([row["expert_usage"] for row in history])  # (epochs, blocks, experts)
    entropy = np.array([row["attention_entropy"] for row in history])  # (epochs, blocks)
    epochs = [row["epoch"] for row in history]
    _, blocks, experts = usage.shape
    fig, axes = plt.subplots(1, blocks + 1, figsize=(3.3 * (blocks + 1), 3.6), layout="constrained")
    for b, ax in enumerate(axes[:-1]):
        for k in range(experts):
            ax.plot(epochs, usage[:, b, k], "-o", markersize=3, label=f"e{k}")
        ax.axhline(1 / experts, color="grey", linestyle=":", label="uniform 1/K")
        ax.set(title=f"block {b}: expert usage", xlabel="epoch", ylabel="mean attention (test set)",
               ylim=(0, min(1.0, max(2 / experts, usage[:, b].max() * 1.15))))
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside lower center", ncols=experts + 1, fontsize=8)
    entropy_ax = axes[-1]
    for b in range(blocks):
        entropy_ax.plot(epochs, entropy[:, b], "-o", markersize=3, label=f"block {b}")
    entropy_ax.axhline(np.log(experts), color="grey", linestyle=":", label=f"uniform (ln K = {np.log(experts):.2f})")
    entropy_ax.set(title="attention entropy per image", xlabel="epoch", ylabel="mean entropy (nats)",
                   ylim=(0, np.log(experts) * 1.1))
    entropy_ax.legend(fontsize=7, loc="best")
    for ax in axes:
        _epoch_axis(ax, epochs[-1])
    fig.suptitle(title or "expert usage over training")
    _save(fig, path)


def plot_image_grid(images: np.ndarray, captions: list[str], path: Path, title: str = "",
                    columns: int = 8) -> None:
    """uint8 (N, H, W, 3) images in rows of `columns`, each with its caption above it."""
    rows = max(1, -(-len(images) // columns))
    fig, axes = plt.subplots(rows, columns, figsize=(1.5 * columns, 1.85 * rows + 0.4), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, image, caption in zip(axes.ravel(), images, captions):
        ax.imshow(image, interpolation="nearest")  # 32 px: blur would hide what the network saw
        ax.set_title(caption, fontsize=7.5, linespacing=1.25)
    fig.suptitle(title)
    fig.tight_layout()
    _save(fig, path)


def _epoch_axis(ax, epochs: int) -> None:
    """Whole epochs only, with room either side: one epoch would otherwise get ticks like 0.96 ... 1.04."""
    ax.set_xlim(0.5, epochs + 0.5)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    ax.grid(alpha=0.3)


def _annotate(ax, image, values: np.ndarray, texts: list[str]) -> None:
    """Write each cell's text in black or white, whichever reads on that cell's colour."""
    for ((i, j), value), text in zip(np.ndenumerate(values), texts):
        red, green, blue, _ = image.cmap(image.norm(value))
        dark = 0.299 * red + 0.587 * green + 0.114 * blue < 0.5
        ax.text(j, i, text, ha="center", va="center", fontsize=7, color="white" if dark else "black")


def _save(fig, path: Path) -> None:
    """Atomically: the curves are redrawn after every epoch, and a run killed mid-write keeps the last ones."""
    try:
        with atomic_writer(path) as f:
            fig.savefig(f, format=Path(path).suffix[1:], dpi=110, bbox_inches="tight")
    finally:
        plt.close(fig)
