"""Figures for the experiments, drawn off-screen (Agg) straight into files."""

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from flaxlesson.training import History  # noqa: E402


def history_curves(history: History, path: str | os.PathLike, title: str = "") -> None:
    """Loss and accuracy per epoch, training and validation side by side, as Keras's History holds them."""
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    epochs = [e + 1 for e in history.epoch]
    for ax, metric in zip(axes, ("loss", "accuracy")):
        for key, style in ((metric, "o-"), (f"val_{metric}", "s--")):
            if key in history.history:
                ax.plot(epochs, history.history[key], style, label=key)
        ax.set_xlabel("epoch")
        ax.set_title(metric)
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
