"""The run's PNG plots, drawn from the run files alone so either framework's run looks the same."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: training machines and CI have no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def plot_curves(history: list[dict], path: Path, title: str = "") -> None:
    epochs = [row["epoch"] for row in history]
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(11, 4))
    loss_ax.plot(epochs, [r["train_loss"] for r in history], label="train (augmented)")
    loss_ax.plot(epochs, [r["test_loss"] for r in history], label="test")
    loss_ax.set(xlabel="epoch", ylabel="cross-entropy (label-smoothed for train)", title="loss")
    acc_ax.plot(epochs, [r["train_accuracy"] for r in history], label="train (augmented)")
    acc_ax.plot(epochs, [r["test_accuracy"] for r in history], label="test")
    acc_ax.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy")
    for ax in (loss_ax, acc_ax):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    _save(fig, path)


def plot_confusion_matrix(matrix: np.ndarray, class_names, path: Path, title: str = "") -> None:
    rates = matrix / np.maximum(matrix.sum(1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(7.5, 6.5))
    image = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    for (i, j), count in np.ndenumerate(matrix):
        ax.text(j, i, str(count), ha="center", va="center", fontsize=7,
                color="white" if rates[i, j] > 0.5 else "black")
    ticks = np.arange(len(class_names))
    ax.set_xticks(ticks, class_names, rotation=45, ha="right")
    ax.set_yticks(ticks, class_names)
    ax.set(xlabel="predicted class", ylabel="true class", title=title or "confusion matrix (test set)")
    fig.colorbar(image, ax=ax, label="fraction of the true class")
    _save(fig, path)


def plot_attention_per_class(per_class: np.ndarray, class_names, path: Path, title: str = "") -> None:
    """per_class: (blocks, classes, experts) mean attention; one heatmap per block."""
    blocks, _, experts = per_class.shape
    fig, axes = plt.subplots(1, blocks, figsize=(2.2 + 1.1 * experts * blocks, 4.8), squeeze=False)
    for b, ax in enumerate(axes[0]):
        image = ax.imshow(per_class[b], cmap="viridis", vmin=0, vmax=1, aspect="auto")
        ax.set_xticks(np.arange(experts), [f"e{k}" for k in range(experts)])
        ax.set_yticks(np.arange(len(class_names)), class_names if b == 0 else [""] * len(class_names))
        ax.set(xlabel="expert", title=f"block {b}")
        for (i, k), value in np.ndenumerate(per_class[b]):
            ax.text(k, i, f"{value:.2f}", ha="center", va="center", fontsize=7,
                    color="black" if value > 0.6 else "white")
    fig.colorbar(image, ax=axes[0].tolist(), label="mean attention")
    fig.suptitle(title or "mean expert attention per class (test set)")
    _save(fig, path)


def _save(fig, path: Path) -> None:
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
