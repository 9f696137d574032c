"""Figures for the experiments, drawn off-screen (Agg) straight into files."""

import math
import os
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
import numpy as np  # noqa: E402

from flaxlesson.training import History  # noqa: E402


def history_curves(history: History, path: str | os.PathLike, title: str = "") -> None:
    """Loss and accuracy per epoch, training and validation side by side, as Keras's History holds them.

    A fit of one epoch has no curve: each panel then shows that epoch's values as labelled bars from zero.
    """
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    epochs = [e + 1 for e in history.epoch]
    for ax, metric in zip(axes, ("loss", "accuracy")):
        keys = [key for key in (metric, f"val_{metric}") if key in history.history]
        if len(epochs) == 1:
            values = [history.history[key][0] for key in keys]
            bars = ax.bar(keys, values, color=["C0", "C1"][: len(keys)])
            ax.bar_label(bars, fmt="%.4f")
            ax.set_ylim(0, max(values, default=1.0) * 1.2 or 1.0)
            ax.set_title(f"{metric} after the one epoch")
        else:
            for key, style in zip(keys, ("o-", "s--")):
                ax.plot(epochs, history.history[key], style, label=key)
            ax.set_xlabel("epoch")
            ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
            ax.set_title(metric)
            ax.legend()
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def prediction_grid(
    images: np.ndarray,
    y_true: np.ndarray,
    y_pred: np.ndarray,
    class_names: Sequence[str],
    path: str | os.PathLike,
    columns: int = 5,
    title: str = "",
) -> None:
    """Images with their predicted and true labels (wrong ones in red), to see what the model gets wrong."""
    images, y_true, y_pred = np.asarray(images), np.asarray(y_true), np.asarray(y_pred)
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"images: expected NHWC with 1 or 3 channels, got shape {images.shape}")
    if not len(images) == len(y_true) == len(y_pred) > 0:
        raise ValueError(
            f"images, y_true, y_pred: expected the same non-zero length, "
            f"got {len(images)}, {len(y_true)}, {len(y_pred)}"
        )
    _check_labels(class_names, y_true=y_true, y_pred=y_pred)
    if columns < 1:
        raise ValueError(f"columns must be a positive integer, got {columns}")
    rows = -(-len(images) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(1.8 * columns, 2.0 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, true, pred in zip(axes.flat, images, y_true, y_pred):
        ax.imshow(image[..., 0] if image.shape[-1] == 1 else image, cmap="gray", vmin=0.0, vmax=1.0)
        ax.set_title(
            f"{class_names[pred]}\n(true: {class_names[true]})", fontsize=8, color="black" if pred == true else "red"
        )
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def confusion_matrix(matrix: np.ndarray, class_names: Sequence[str], path: str | os.PathLike, title: str = "") -> None:
    """A confusion matrix (rows true class, columns predicted) as a heat map with counts in its cells."""
    matrix = np.asarray(matrix)
    if matrix.shape != (len(class_names), len(class_names)):
        raise ValueError(
            f"matrix: expected shape ({len(class_names)}, {len(class_names)}) for "
            f"{len(class_names)} class_names, got {matrix.shape}"
        )
    size = 1.0 + 0.6 * len(class_names)
    fig, ax = plt.subplots(figsize=(size + 1.5, size))
    shown = ax.imshow(matrix, cmap="Blues")
    fig.colorbar(shown, ax=ax)
    ticks = np.arange(len(class_names))
    ax.set_xticks(ticks, class_names, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(ticks, class_names, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for (row, col), count in np.ndenumerate(matrix):
        ax.text(
            col,
            row,
            f"{count:g}",
            ha="center",
            va="center",
            fontsize=7,
            color="white" if count > matrix.max() / 2 else "black",
        )
    if title:
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _check_labels(class_names: Sequence[str], **labels: np.ndarray) -> None:
    for name, y in labels.items():
        if not np.issubdtype(y.dtype, np.integer) or y.min() < 0 or y.max() >= len(class_names):
            raise ValueError(
                f"{name}: labels must be integers in [0, {len(class_names)}) to index class_names, "
                f"got {y.dtype} from {y.min()} to {y.max()}"
            )


def augmentation_grid(original: np.ndarray, augmented: np.ndarray, path: str | os.PathLike) -> None:
    """The original (height, width, channels) image, then each of `augmented` (n, height, width, channels).

    One channel is drawn in grey, three as RGB; values are taken to lie in [0, 1], as the loaders give them.
    """
    original, augmented = np.asarray(original), np.asarray(augmented)
    if original.ndim != 3 or original.shape[-1] not in (1, 3):
        raise ValueError(f"original must be one (height, width, 1 or 3) image, got shape {original.shape}.")
    if augmented.ndim != 4 or augmented.shape[1:] != original.shape:
        raise ValueError(
            f"augmented must be (n, {', '.join(map(str, original.shape))}) images like original, "
            f"got shape {augmented.shape}."
        )
    images = [original, *augmented]
    cols = math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2 * cols, 2 * rows), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < len(images):
            image = np.clip(images[i], 0.0, 1.0)
            ax.imshow(image[..., 0] if image.shape[-1] == 1 else image, cmap="gray", vmin=0.0, vmax=1.0)
            ax.set_title("original" if i == 0 else f"augmented {i}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
