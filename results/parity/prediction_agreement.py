"""Do two runs of different frameworks disagree more than two runs of one framework? Each run's final
test predictions and test loss (`evaluation.npz`), compared pairwise and class by class, and its
training loss epoch by epoch (`metrics.jsonl`). Reads committed runs only.

    python results/parity/prediction_agreement.py results/flax-fast-22-balanced results/torch-fast-22-balanced ...
"""
import itertools
import json
import sys
from pathlib import Path

import numpy as np

from expert_core.config import CLASS_NAMES
from expert_core.runfiles import log_softmax, read_metrics


def load(run: Path):
    evaluation = np.load(run / "evaluation.npz")
    order = np.argsort(evaluation["test_index"])
    framework = json.loads((run / "summary.json").read_text())["framework"]
    logits, labels = evaluation["logits"][order].astype(np.float64), evaluation["labels"][order]
    test_loss = -log_softmax(logits)[np.arange(len(labels)), labels].mean()
    return framework, logits.argmax(1), labels, test_loss, read_metrics(run)


def main():
    runs = {Path(path).name: load(Path(path)) for path in sys.argv[1:]}
    labels = next(iter(runs.values()))[2]
    width = max(map(len, runs))
    print("test accuracy and loss, from each run's evaluation.npz:")
    for name, (framework, predicted, _, test_loss, _) in runs.items():
        print(f"  {name:{width}}  {framework:7}  {100 * (predicted == labels).mean():.2f} %  {test_loss:.4f}")
    print("\npairs: images the two predict differently; of those, right in the first only / the second only")
    by_kind = {"same framework": [], "across frameworks": []}
    for (a, (fa, pa, *_)), (b, (fb, pb, *_)) in itertools.combinations(runs.items(), 2):
        differ = 100 * (pa != pb).mean()
        by_kind["same framework" if fa == fb else "across frameworks"].append(differ)
        print(f"  {a:{width}}  {b:{width}}  {differ:.2f} %  {((pa == labels) & (pb != labels)).sum():4d} / "
              f"{((pb == labels) & (pa != labels)).sum():4d}")
    for kind, values in by_kind.items():
        if values:
            print(f"{kind}: mean {np.mean(values):.2f} % over {len(values)} pairs, range {min(values):.2f}-{max(values):.2f} %")
    print("\nper-class test accuracy, %:")
    print(f"  {'':{width}}  " + " ".join(f"{c[:5]:>6}" for c in CLASS_NAMES))
    for name, (_, predicted, *_) in runs.items():
        print(f"  {name:{width}}  " + " ".join(f"{100 * (predicted[labels == c] == c).mean():6.1f}"
                                                for c in range(len(CLASS_NAMES))))
    print_train_losses({name: (framework, history) for name, (framework, *_, history) in runs.items()})


def print_train_losses(histories: dict) -> None:
    """Each epoch's training loss: the spread over all runs, and the mean of one framework's runs minus
    the other's."""
    print("\ntraining loss by epoch (metrics.jsonl): spread over the runs; Flax runs' mean - PyTorch runs' mean")
    epochs = min(len(history) for _, history in histories.values())
    for epoch in range(epochs):
        losses = {name: history[epoch]["train_loss"] for name, (_, history) in histories.items()}
        by_framework = {f: [losses[n] for n, (g, _) in histories.items() if g == f] for f in ("flax", "torch")}
        gap = np.mean(by_framework["flax"]) - np.mean(by_framework["torch"]) if all(by_framework.values()) else np.nan
        print(f"  epoch {epoch + 1:3d}  spread {max(losses.values()) - min(losses.values()):.4f}  "
              f"Flax - PyTorch {gap:+.4f}")


if __name__ == "__main__":
    main()
