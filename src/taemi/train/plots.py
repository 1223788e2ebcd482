"""PNG plots written into run folders (matplotlib, headless Agg backend)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path


def pyplot():
    """matplotlib's pyplot on the headless Agg backend (for every module that draws)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def plot_history(history: Sequence[Mapping[str, float]], path: str | Path) -> Path:
    """Learning curves: train/valid loss and valid mean Pearson per epoch."""
    plt = pyplot()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    epochs = [r["epoch"] for r in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(epochs, [r["train_loss"] for r in history], "o-", label="train")
    ax1.plot(epochs, [r["valid_loss"] for r in history], "s-", label="valid")
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("MSE loss")
    ax1.set_title("loss")
    ax1.legend()
    ax2.plot(epochs, [r["valid_mean_pearson"] for r in history], "o-", color="C2")
    best = max(history, key=lambda r: r["valid_mean_pearson"])
    ax2.axvline(best["epoch"], color="grey", ls="--", lw=1, label=f"best epoch {best['epoch']}")
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("mean Pearson r")
    ax2.set_title("validation mean Pearson")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_per_emotion(
    pearson: Mapping[str, float], path: str | Path, title: str = "Pearson per emotion"
) -> Path:
    """Bar chart of Pearson r per emotion, with the mean as a line."""
    plt = pyplot()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    names, values = list(pearson), list(pearson.values())
    fig, ax = plt.subplots(figsize=(max(5, 1.1 * len(names)), 4))
    ax.bar(range(len(names)), values, color="C0")
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    mean = sum(values) / len(values)
    ax.axhline(mean, color="C3", ls="--", label=f"mean {mean:.3f}")
    ax.set_ylabel("Pearson r")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
