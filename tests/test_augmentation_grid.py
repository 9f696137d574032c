"""flaxlesson.plots.augmentation_grid: the experiment's figure of an image and its augmented versions."""

import matplotlib.image
import numpy as np
import pytest

from flaxlesson.plots import augmentation_grid


def test_writes_a_png_of_the_image_and_its_versions(tmp_path):
    rng = np.random.default_rng(0)
    augmentation_grid(rng.random((8, 8, 1)), rng.random((5, 8, 8, 1)), tmp_path / "grid.png")
    picture = matplotlib.image.imread(tmp_path / "grid.png")
    assert picture.shape[:2] == (400, 600)  # 6 images in 2 rows of 3, 2 inches each at 100 dpi


@pytest.mark.parametrize(
    "argument, original, augmented",
    [
        ("original", np.zeros((8, 8)), np.zeros((2, 8, 8, 1))),
        ("augmented", np.zeros((8, 8, 1)), np.zeros((2, 8, 9, 1))),
    ],
)
def test_mismatched_shapes_raise_naming_the_argument(tmp_path, argument, original, augmented):
    with pytest.raises(ValueError, match=argument):
        augmentation_grid(original, augmented, tmp_path / "grid.png")
