"""Issue 13: the lesson's CNN trained streaming from an on-disk set N times the training images, and in memory.

    python experiments/streaming.py --copies 20 --steps 500 --out runs/streaming
    python experiments/streaming.py --copies 2 --steps 50 --dataset digits --out runs/streaming_smoke

Writes --copies augmented draws of the training images (the lesson's ImageDataGenerator, a different draw per
copy) as ArrayRecord shards into --out/train_shards, a chunk at a time, so the set is never in memory. Then
trains the lesson's CNN for --steps steps streaming from it (grain, --workers processes), and for --steps
steps from the 1x training images in memory, both through `training.fit`. metrics.json: dataset_bytes,
peak_rss_bytes, samples_per_second, in_memory_samples_per_second, test_accuracy (of the streamed model).
"""

import dataclasses
import math
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from experiments import flags  # noqa: E402
from flaxlesson import augment, data, models, results, shards, streaming, training  # noqa: E402

CHUNK = 4096  # images augmented and written at a time


@dataclasses.dataclass(frozen=True)
class Config(flags.Config):
    """One run's settings; the defaults train the lesson's CNN, batch 64, from a 2-copy set."""

    FLAGS = {
        "copies": flags.Flag("augmented copies of the training images written to disk", flags.positive_int),
        "steps": flags.Flag("train steps of each run (streamed and in memory)", flags.int_in(2, 10**9)),
        "workers": flags.Flag(
            "grain processes reading and decoding batches; 0 reads them on a thread of this process, which was "
            "faster on a 2-core CPU, where worker processes take the cores the training step needs",
            flags.non_negative_int,
        ),
        "prefetch": flags.Flag("batches read ahead per worker", flags.non_negative_int),
        "records_per_shard": flags.Flag("images per ArrayRecord shard", flags.positive_int),
    }

    copies: int = 2
    steps: int = 200
    batch_size: int = 64
    steps_per_execution: int | str = 1
    dataset: str = "auto"
    data_dir: str | None = None
    limit: int | None = None
    workers: int = 0
    prefetch: int = 4
    records_per_shard: int = shards.DEFAULT_RECORDS_PER_SHARD
    seed: int = 0
    out: str = "runs/streaming"

    @classmethod
    def quick(cls) -> "Config":
        """Tiny settings: 2 copies of 1,000 images, 20 steps."""
        return cls(copies=2, steps=20, limit=1000)


def to_uint8(images: Any) -> np.ndarray:
    """[0, 1] float images as uint8, rounded (the inverse of the reader's / 255 up to that rounding)."""
    return np.clip(np.round(np.asarray(images) * 255.0), 0, 255).astype(np.uint8)


def write_augmented_copies(
    images: data.ImageData, copies: int, out_dir: str | Path, *, seed: int, records_per_shard: int
) -> Path:
    """`copies` draws of the lesson's augmentation of every training image, as shards, CHUNK images at a time."""
    fields = shards.image_fields(images.x_train.shape[1:])
    source = f"{copies} augmented copies (augment.LESSON_GENERATOR, seed {seed}) of {images.name} train"
    with shards.ShardWriter(
        out_dir, fields, records_per_shard=records_per_shard, class_names=images.class_names, source=source
    ) as writer:
        for copy in range(copies):
            key = jax.random.fold_in(jax.random.key(seed), copy)
            for start in range(0, len(images.x_train), CHUNK):
                chunk = slice(start, start + CHUNK)
                drawn = augment.augment(jax.random.fold_in(key, start), images.x_train[chunk], augment.LESSON_GENERATOR)
                writer.write({streaming.IMAGE: to_uint8(drawn), streaming.LABEL: images.y_train[chunk]})
    return Path(out_dir)


def train(state: training.TrainState, x: Any, y: np.ndarray | None, config: Config) -> tuple[Any, float]:
    """`training.fit` for about `config.steps` steps on arrays or a streaming dataset: the state and samples/s.

    The steps are spread over whole epochs' worth of the data (Keras's `steps_per_epoch` cuts each epoch), so the
    same call trains from a 1x set in memory and from an N-copy set on disk; samples/s is the median epoch's.
    """
    n = x.num_examples if y is None else len(y)
    epochs = math.ceil(config.steps / data.num_batches(n, config.batch_size))
    state, history = training.fit(
        state,
        x,
        y,
        epochs=epochs,
        steps_per_epoch=math.ceil(config.steps / epochs),
        batch_size=config.batch_size,
        steps_per_execution=config.steps_per_execution,
        seed=config.seed,
        verbose=2,
    )
    return state, history.summary()["train_samples_per_second"]


class PeakRss:
    """Peak resident memory of this process and of its child processes (grain's workers), while it is open.

    Each process's peak is its VmHWM in /proc/PID/status (the kernel's high-water mark). Children are found
    with psutil and read every `interval` seconds while they live, since a process's VmHWM goes with it.
    """

    def __init__(self, interval: float = 0.05):
        self.interval, self.children = interval, {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    @staticmethod
    def vm_hwm(pid: int | str = "self") -> int:
        """VmHWM of process `pid` in bytes (0 if it has gone)."""
        try:
            lines = Path(f"/proc/{pid}/status").read_text().splitlines()
        except (FileNotFoundError, ProcessLookupError):
            return 0
        kib = next((line.split()[1] for line in lines if line.startswith("VmHWM:")), "0")
        return int(kib) * 1024

    def _watch(self) -> None:
        while not self._stop.wait(self.interval):
            for child in psutil.Process().children(recursive=True):
                self.children[child.pid] = max(self.children.get(child.pid, 0), self.vm_hwm(child.pid))

    def __enter__(self) -> "PeakRss":
        self._thread.start()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self._stop.set()
        self._thread.join()

    def summary(self) -> dict[str, Any]:
        """This process's peak, each child's, and their sum (an upper bound of the simultaneous peak)."""
        main, workers = self.vm_hwm(), sorted(self.children.values(), reverse=True)
        return {
            "peak_rss_bytes": main + sum(workers),
            "peak_rss_main_bytes": main,
            "peak_rss_workers_bytes": workers,
            "peak_rss_method": "sum of VmHWM from /proc/PID/status of this process and each worker (psutil lists "
            f"the workers, read every {self.interval}s while they live)",
        }


def load_images(config: Config) -> data.ImageData:
    """The run's training and test images; a source that is not there is a ConfigError of --dataset."""
    try:
        return data.load_images(config.dataset, config.data_dir).head(config.limit)
    except (ValueError, data.DatasetUnavailableError) as e:
        raise flags.ConfigError("dataset", str(e)) from None


def run(config: Config, images: data.ImageData | None = None) -> dict[str, Any]:
    """Write the N-copy set, train from it and from memory, evaluate; returns (and writes) the metrics.

    The shards go to OUT/train_shards, rewritten on every run. `images` defaults to `load_images(config)`.
    """
    images = load_images(config) if images is None else images
    shard_dir = Path(config.out) / "train_shards"
    shutil.rmtree(shard_dir, ignore_errors=True)
    model = models.CNN(num_classes=images.num_classes)
    start_state = training.create_train_state(model, images.x_train[:1], seed=config.seed)

    with PeakRss() as rss:
        start = time.perf_counter()
        write_augmented_copies(
            images, config.copies, shard_dir, seed=config.seed, records_per_shard=config.records_per_shard
        )
        write_seconds = time.perf_counter() - start
        dataset = streaming.StreamingDataset(shard_dir, worker_count=config.workers, prefetch=config.prefetch)
        state, rate = train(start_state, dataset, None, config)
    memory = rss.summary()

    in_memory_state, in_memory_rate = train(start_state, images.x_train, images.y_train, config)
    test = training.evaluate(state, images.x_test, images.y_test)
    in_memory_test = training.evaluate(in_memory_state, images.x_test, images.y_test)
    metrics = {
        "dataset_bytes": sum(f.stat().st_size for f in shard_dir.iterdir()),
        **memory,
        "samples_per_second": rate,
        "in_memory_samples_per_second": in_memory_rate,
        "test_accuracy": test["accuracy"],
        "in_memory_test_accuracy": in_memory_test["accuracy"],
        "num_examples": len(dataset),
        "in_memory_bytes": images.x_train.nbytes + images.y_train.nbytes,
        "write_seconds": write_seconds,
        "dataset": images.name,
        "dataset_source": images.source,
        "shard_dir": str(shard_dir),
        "config": config,
    }
    results.write_metrics(config.out, metrics)
    print(
        f"{config.copies} copies of {metrics['dataset']}: {metrics['num_examples']:,} images, "
        f"{metrics['dataset_bytes'] / 2**20:,.1f} MiB on disk; peak RSS {metrics['peak_rss_bytes'] / 2**20:,.0f} MiB "
        f"(process and {len(metrics['peak_rss_workers_bytes'])} workers); streaming "
        f"{metrics['samples_per_second']:,.0f} samples/s, in memory {metrics['in_memory_samples_per_second']:,.0f}; "
        f"test accuracy {metrics['test_accuracy']:.4f} -> {config.out}/metrics.json",
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
