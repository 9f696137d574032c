"""Issue 22: the lesson's CNN trained from a folder of PNG files, from shards written from it, and from memory.

    python experiments/folder_benchmark.py --images 60000 --out runs/folder_benchmark
    python experiments/folder_benchmark.py --images 6000 --steps 256 --rounds 2 --out runs/folder_benchmark_small

Writes the first --images training images (Fashion-MNIST's IDX files by default) as PNG files in one subfolder
per class, reads that folder as Keras's `image_dataset_from_directory` does (`data.image_dataset_from_directory`,
each file decoded by PIL as it is read), decodes it once into ArrayRecord shards (`folders.write_directory`),
then trains the lesson's CNN for --steps steps from each of the three through `training.fit`, in --rounds
alternating rounds (folder, shards, memory), since a shared machine's speed drifts. The folder's images are
Keras's float32 in [0, 255], the others in [0, 1]: the same computation at other values, so only speeds compare.
metrics.json: each source's median samples/s and peak RSS, the ratios to in-memory speed, and where a folder
batch's time goes (reading the file, PNG decoding, grayscale conversion, resizing) per image.
"""

import contextlib
import dataclasses
import io
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from experiments import flags  # noqa: E402
from experiments import streaming as streaming_experiment  # noqa: E402
from flaxlesson import data, folders, models, results, streaming, training  # noqa: E402

SOURCES = ("folder", "shards", "in_memory")
PROFILE_FILES = 512  # files timed one stage at a time for the folder's time profile


@dataclasses.dataclass(frozen=True)
class Config(flags.Config):
    """One run's settings; the defaults train the lesson's CNN, batch 64, 64 steps a call, on 60,000 PNG files."""

    FLAGS = {
        "images": flags.Flag("training images written as PNG files (the first N)", flags.positive_int),
        "steps": flags.Flag("train steps of each run (per source)", flags.int_in(2, 10**9)),
        "workers": flags.Flag("grain processes decoding batches for the folder and the shards", flags.non_negative_int),
        "prefetch": flags.Flag(
            "batches read ahead (per worker); 0 reads each batch when fit asks", flags.non_negative_int
        ),
        "rounds": flags.Flag("alternating rounds of --steps/--rounds steps from each source", flags.positive_int),
    }

    images: int = 60_000
    steps: int = 1280
    batch_size: int = 64
    steps_per_execution: int | str = 64
    dataset: str = "idx"
    data_dir: str | None = None  # with --dataset idx: Debian's Fashion-MNIST IDX files unless given
    workers: int = 0
    prefetch: int = 0
    rounds: int = 4
    seed: int = 0
    out: str = "runs/folder_benchmark"

    @classmethod
    def quick(cls) -> "Config":
        """Tiny settings: 600 images, 2 rounds of 8 steps."""
        return cls(images=600, steps=16, rounds=2, steps_per_execution=4)


def write_png_folder(images: data.ImageData, out_dir: Path) -> list[str]:
    """The training images as PNG files, one subfolder per class named so that sorting keeps the label order."""
    names = [f"{label:02d}_{re.sub(r'[^A-Za-z0-9]+', '_', name)}" for label, name in enumerate(images.class_names)]
    pixels = streaming_experiment.to_uint8(images.x_train)
    for name in names:
        (out_dir / name).mkdir(parents=True)
    for i, (image, label) in enumerate(zip(pixels, images.y_train)):
        Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(out_dir / names[label] / f"{i:05d}.png")
    return names


def profile_decoding(dataset: folders.FolderDataset, count: int = PROFILE_FILES) -> dict[str, float]:
    """Microseconds per image of each stage of `folders.Decoder`, timed apart on the first `count` files."""
    paths, decoder = dataset.file_paths[:count], dataset.decoder
    times = dict.fromkeys(("read_file", "decode_png", "convert_mode", "resize", "to_float32"), 0.0)
    for path in paths:
        start = time.perf_counter()
        raw = Path(path).read_bytes()
        read = time.perf_counter()
        image = Image.open(io.BytesIO(raw))
        image.load()
        decoded = time.perf_counter()
        image = image.convert(decoder.mode)
        converted = time.perf_counter()
        size = (decoder.image_size[1], decoder.image_size[0])
        if image.size != size:
            image = image.resize(size, folders.INTERPOLATIONS[decoder.interpolation])
        resized = time.perf_counter()
        np.asarray(image, np.uint8).astype(np.float32)
        done = time.perf_counter()
        stages = (read - start, decoded - read, converted - decoded, resized - converted, done - resized)
        for key, seconds in zip(times, stages):
            times[key] += seconds
    return {f"{key}_us_per_image": 1e6 * seconds / len(paths) for key, seconds in times.items()}


def _sources(config: Config, images: data.ImageData, out: Path) -> tuple[dict[str, Any], dict[str, float]]:
    """The three training inputs (x, y) by source name, and the seconds writing the folder and the shards took."""
    folder, shard_dir = out / "folder", out / "shards"
    shutil.rmtree(folder, ignore_errors=True)
    shutil.rmtree(shard_dir, ignore_errors=True)
    height, width, channels = images.x_train.shape[1:]
    options = {"image_size": (height, width), "color_mode": "grayscale" if channels == 1 else "rgb"}
    start = time.perf_counter()
    write_png_folder(images, folder)
    written = time.perf_counter()
    folders.write_directory(folder, shard_dir, seed=config.seed, **options)
    seconds = {"write_png_seconds": written - start, "write_shards_seconds": time.perf_counter() - written}
    reading = {"worker_count": config.workers, "prefetch": config.prefetch}
    inputs = {
        "folder": (
            data.image_dataset_from_directory(
                folder, seed=config.seed, batch_size=config.batch_size, **options, **reading
            ),
            None,
        ),
        "shards": (streaming.StreamingDataset(shard_dir, **reading), None),
        "in_memory": (images.x_train, images.y_train),
    }
    return inputs, seconds


def _median(values: list[float]) -> float | None:
    return float(np.median(values)) if values else None


def run(config: Config) -> dict[str, Any]:
    """Write the folder and its shards, train from each source and from memory in alternating rounds; metrics."""
    try:
        data_dir = config.data_dir or (data.DEBIAN_FASHION_MNIST if config.dataset == "idx" else None)
        images = data.load_images(config.dataset, data_dir)
    except (ValueError, data.DatasetUnavailableError) as e:
        raise flags.ConfigError("dataset", str(e)) from None
    images = images.head(config.images)
    out = Path(config.out)
    inputs, seconds = _sources(config, images, out)
    first = training.create_train_state(
        models.CNN(num_classes=images.num_classes), images.x_train[:1], seed=config.seed
    )
    states = dict.fromkeys(SOURCES, first)
    rates: dict[str, list[float]] = {name: [] for name in SOURCES}
    peaks = {name: streaming_experiment.PeakRss() for name in SOURCES}
    stopped: dict[str, Any] = {}
    with contextlib.ExitStack() as watching:
        for peak in peaks.values():
            watching.enter_context(peak)
        for round_ in range(config.rounds):
            for name in SOURCES:
                x, y = inputs[name]
                with peaks[name].measuring():
                    states[name], history = streaming_experiment.train(states[name], x, y, config, round_)
                stopped = flags.interrupted(history)
                if stopped:
                    break
                rates[name].append(history.summary()["train_samples_per_second"])
            if stopped:
                break
            print(f"round {round_ + 1}/{config.rounds}: " + ", ".join(f"{n} {rates[n][-1]:,.0f}" for n in SOURCES))
    speed = {name: _median(values) for name, values in rates.items()}
    metrics = {
        **{f"{name}_samples_per_second": value for name, value in speed.items()},
        **{f"{name}_samples_per_second_per_round": values for name, values in rates.items()},
        **{f"{name}_peak_rss_bytes": peak.summary()["peak_rss_bytes"] for name, peak in peaks.items()},
        "shards_relative_speed": _median(list(np.divide(rates["shards"], rates["in_memory"]))),
        "folder_relative_speed": _median(list(np.divide(rates["folder"], rates["in_memory"]))),
        "folder_profile": profile_decoding(inputs["folder"][0]),
        "folder_bytes": sum(f.stat().st_size for f in (out / "folder").rglob("*.png")),
        "shards_bytes": sum(f.stat().st_size for f in (out / "shards").iterdir()),
        "in_memory_bytes": images.x_train.nbytes + images.y_train.nbytes,
        **seconds,
        "num_images": len(images.x_train),
        "dataset": images.name,
        "dataset_source": images.source,
        "config": config,
        **stopped,
    }
    results.write_metrics(config.out, metrics)
    print(
        f"{metrics['num_images']:,} images: "
        + ", ".join(f"{n} {speed[n] or 0:,.0f} samples/s" for n in SOURCES)
        + f" -> {config.out}/metrics.json",
        flush=True,
    )
    return metrics


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Flags -> Config -> run."""
    parser = flags.parser(__doc__, Config())
    return flags.execute(parser, run, flags.config(parser, Config, parser.parse_args(argv)))


if __name__ == "__main__":
    flags.setup_logging()
    main()
