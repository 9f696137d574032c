"""Lesson section 3.1: the lesson's ImageDataGenerator on a real test image, and how fast it augments.

    python experiments/augmentation.py --dataset auto --n 8 --out runs/augmentation

Writes augmentation.png (the image and --n augmented versions) and metrics.json (images/s of the jitted,
batched `augment` on 256 test images, the dataset used, the generator's options) into --out.
"""

import dataclasses
import sys
import time
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from experiments import flags  # noqa: E402
from flaxlesson import augment, plots, results  # noqa: E402

LESSON = augment.LESSON_GENERATOR
BATCH_SIZE = 256


def images_per_second(
    images: np.ndarray, config: augment.ImageDataGenerator, calls: int = 20, repeats: int = 10
) -> float:
    """Median images/s of `jax.jit(augment, static_argnums=2)` on `images`, after compiling, every call finished."""
    run = jax.jit(augment.augment, static_argnums=2)
    images = jax.device_put(images)
    keys = list(jax.random.split(jax.random.key(0), calls))
    jax.block_until_ready(run(keys[0], images, config))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready([run(key, images, config) for key in keys])
        times.append(time.perf_counter() - start)
    return calls * len(images) / float(np.median(times))


@dataclasses.dataclass(frozen=True)
class Config(flags.Config):
    """The section's settings."""

    FLAGS = {
        "n": flags.Flag("number of augmented versions to draw", flags.positive_int),
        "seed": flags.Flag("seeds the augmentations drawn", flags.non_negative_int),
    }

    dataset: str = "auto"
    data_dir: str | None = None
    n: int = 8
    seed: int = 0
    out: str = "runs/augmentation"

    @classmethod
    def quick(cls) -> "Config":
        """The section is quick as it is: its own settings."""
        return cls()


def run(config: Config) -> dict:
    """Augment test image 0 `n` times into augmentation.png, time `augment` on 256 images; write metrics.json."""
    dataset = flags.load_images(config)
    image = dataset.x_test[0]
    augmented = augment.augment(jax.random.key(config.seed), np.broadcast_to(image, (config.n, *image.shape)), LESSON)
    Path(config.out).mkdir(parents=True, exist_ok=True)
    plots.augmentation_grid(image, np.asarray(augmented), Path(config.out) / "augmentation.png")

    rate = images_per_second(np.resize(dataset.x_test, (BATCH_SIZE, *image.shape)), LESSON)
    metrics = {"images_per_second": rate, "dataset": dataset.name, "config": dataclasses.asdict(LESSON), "n": config.n}
    results.write_metrics(config.out, metrics)
    print(
        f"{dataset.name} test image 0 ({dataset.class_names[int(dataset.y_test[0])]}) and {config.n} augmented "
        f"versions -> {config.out}/augmentation.png; augment: {rate:,.0f} images/s (batch {BATCH_SIZE}) "
        f"-> {config.out}/metrics.json"
    )
    return metrics


def main(argv: list[str] | None = None) -> dict:
    """Flags -> Config -> run."""
    parser = flags.parser(__doc__, Config())
    return flags.execute(parser, run, flags.config(parser, Config, parser.parse_args(argv)))


if __name__ == "__main__":
    flags.setup_logging()
    main()
