"""Figures for the experiments, drawn off-screen (Agg) straight into files."""

import math
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def augmentation_grid(original: np.ndarray, augmented: np.ndarray, path: str | os.PathLike) -> None:
    """The original (height, width, channels) image, then each of `augmented` (n, height, width, channels).

    One channel is drawn in grey, three as RGB; values are taken to lie in [0, 1], as the loaders give them.
    """
    original, augmented = np.asarray(original), np.asarray(augmented)
    if original.ndim != 3 or original.shape[-1] not in (1, 3):
        raise ValueError(f"original must be one (height, width, 1 or 3) image, got shape {original.shape}.")
    if augmented.ndim != 4 or augmented.shape[1:] != original.shape:
        raise ValueError(f"augmented must be (n, {', '.join(map(str, original.shape))}) images like original, "
                         f"got shape {augmented.shape}.")
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
