"""Lesson section 3.1: the lesson's ImageDataGenerator on a real test image, and how fast it augments.

    python experiments/augmentation.py --dataset auto --n 8 --out runs/augmentation

Writes augmentation.png (the image and --n augmented versions) and metrics.json (images/s of the jitted,
batched `augment` on 256 test images, the dataset used, the generator's options) into --out.
"""

import argparse
import dataclasses
import time
from pathlib import Path

import jax
import numpy as np

from flaxlesson import augment, data, plots, results

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


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="auto", help="image dataset for flaxlesson.data.load_images")
    parser.add_argument("--data-dir", default=None, help="where the dataset's files are, if it needs any")
    parser.add_argument("--n", type=int, default=8, help="number of augmented versions to draw")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/augmentation")
    args = parser.parse_args(argv)
    if args.n < 1:
        parser.error("--n must be at least 1")

    dataset = data.load_images(args.dataset, args.data_dir)
    image = dataset.x_test[0]
    augmented = augment.augment(jax.random.key(args.seed), np.broadcast_to(image, (args.n, *image.shape)), LESSON)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    plots.augmentation_grid(image, np.asarray(augmented), Path(args.out) / "augmentation.png")

    rate = images_per_second(np.resize(dataset.x_test, (BATCH_SIZE, *image.shape)), LESSON)
    metrics = {"images_per_second": rate, "dataset": dataset.name, "config": dataclasses.asdict(LESSON), "n": args.n}
    results.write_metrics(args.out, metrics)
    print(
        f"{dataset.name} test image 0 ({dataset.class_names[int(dataset.y_test[0])]}) and {args.n} augmented "
        f"versions -> {args.out}/augmentation.png; augment: {rate:,.0f} images/s (batch {BATCH_SIZE}) "
        f"-> {args.out}/metrics.json"
    )
    return metrics


if __name__ == "__main__":
    main()
