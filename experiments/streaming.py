"""Issue 13: the lesson's CNN trained streaming from an on-disk set N times the training images, and in memory.

    python experiments/streaming.py --copies 20 --out runs/streaming
    python experiments/streaming.py --copies 2 --steps 50 --dataset digits --out runs/streaming_smoke

Writes --copies augmented draws of the training images (the lesson's ImageDataGenerator, a different draw per
copy) as ArrayRecord shards into --out/train_shards, a chunk at a time, so the set is never in memory; that
folder is marked as this experiment's, and a train_shards it did not write is refused, never deleted. Then
trains the lesson's CNN for --steps steps streaming from it, and for --steps steps from the 1x training images
in memory, both through `training.fit`, in --rounds alternating rounds, since a shared machine's speed drifts:
relative_speed is the median over rounds of the two speeds' ratio within a round. metrics.json: dataset_bytes,
peak_rss_bytes (while streaming), samples_per_second and in_memory_samples_per_second (the median rounds'),
relative_speed, test_accuracy (the streamed model's).
"""

import contextlib
import dataclasses
import json
import math
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from experiments import flags  # noqa: E402
from flaxlesson import augment, data, models, results, shards, streaming, training  # noqa: E402

CHUNK = 4096  # images augmented and written at a time
MARKER = "written-by-experiments-streaming.json"  # in OUT/train_shards: this experiment wrote the set there


@dataclasses.dataclass(frozen=True)
class Config(flags.Config):
    """One run's settings; the defaults train the lesson's CNN, batch 64, 64 steps a call, from a 2-copy set."""

    FLAGS = {
        "copies": flags.Flag("augmented copies of the training images written to disk", flags.positive_int),
        "steps": flags.Flag("train steps of each run (streamed and in memory)", flags.int_in(2, 10**9)),
        "workers": flags.Flag(
            "grain processes reading and decoding batches; 0 reads them on a thread of this process, which was "
            "faster on a 2-core CPU, where worker processes take the cores the training step needs",
            flags.non_negative_int,
        ),
        "prefetch": flags.Flag(
            "batches read ahead per worker; 0 with no workers reads each batch when fit asks for it, while the "
            "device runs the last step (the fastest setting on a CPU)",
            flags.non_negative_int,
        ),
        "records_per_shard": flags.Flag("images per ArrayRecord shard", flags.positive_int),
        "rounds": flags.Flag(
            "rounds of --steps/--rounds steps streamed, then as many in memory; samples/s are the median round's",
            flags.positive_int,
        ),
    }

    copies: int = 2
    steps: int = 1280
    batch_size: int = 64
    steps_per_execution: int | str = 64  # the CNN's setting in the lesson runner: both runs at their fastest
    dataset: str = "auto"
    data_dir: str | None = None
    limit: int | None = None
    workers: int = 0
    prefetch: int = 0
    records_per_shard: int = shards.DEFAULT_RECORDS_PER_SHARD
    rounds: int = 4
    seed: int = 0
    out: str = "runs/streaming"

    @classmethod
    def quick(cls) -> "Config":
        """Tiny settings: 2 copies of 1,000 images, 2 rounds of 10 steps."""
        return cls(copies=2, steps=20, limit=1000, rounds=2)


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


def fresh_shard_dir(out: str | Path) -> Path:
    """OUT/train_shards, empty but for this experiment's marker: a set it wrote before is removed, file by file.

    A folder it did not write (no marker), a symlink, or one holding anything a ShardWriter and this experiment do
    not write, is a ConfigError of --out, and nothing in it is touched.
    """
    shard_dir = Path(out) / "train_shards"
    ours = {MARKER, streaming.METADATA_FILE, shards.LOCK_FILE}
    if shard_dir.is_symlink() or shard_dir.exists() and not shard_dir.is_dir():
        raise flags.ConfigError("out", f"{shard_dir} is not a folder this experiment wrote; move it or choose another")
    if shard_dir.is_dir():
        entries = list(shard_dir.iterdir())
        foreign = sorted(e.name for e in entries if e.name not in ours and not e.name.startswith("shard-"))
        if entries and (foreign or not (shard_dir / MARKER).is_file() or any(e.is_dir() for e in entries)):
            raise flags.ConfigError(
                "out",
                f"{shard_dir} holds files this experiment did not write ({foreign[:3] or 'no ' + MARKER}); "
                "it replaces only its own set: move that folder or choose another --out",
            )
        for entry in entries:
            entry.unlink()
    shard_dir.mkdir(parents=True, exist_ok=True)
    (shard_dir / MARKER).write_text(json.dumps({"written_by": "experiments/streaming.py"}) + "\n")
    return shard_dir


def round_settings(num_examples: int, config: Config, round_: int) -> dict[str, int]:
    """`fit`'s epoch settings of round `round_`: about `config.steps / config.rounds` steps where the last ended.

    Where every round's steps lie inside one epoch (a large set: 40 copies are 37,500 steps an epoch), round r
    trains steps r * s .. (r + 1) * s - 1 of epoch 0 (`initial_step`), so the epoch's order, a permutation of
    every row, is drawn once per run as in a real epoch of that set, not once per round. Otherwise each round
    trains whole epochs, each cut to its share of the steps by Keras's `steps_per_epoch`.
    """
    steps = math.ceil(config.steps / config.rounds)
    per_epoch = data.num_batches(num_examples, config.batch_size)
    if per_epoch >= steps * config.rounds:
        return {
            "initial_epoch": 0,
            "epochs": 1,
            "initial_step": round_ * steps,
            "steps_per_epoch": (round_ + 1) * steps,
        }
    epochs = math.ceil(steps / per_epoch)
    return {
        "initial_epoch": round_ * epochs,
        "epochs": (round_ + 1) * epochs,
        "steps_per_epoch": math.ceil(steps / epochs),
    }


def train(
    state: training.TrainState, x: Any, y: np.ndarray | None, config: Config, round_: int
) -> tuple[training.TrainState, training.History]:
    """Round `round_` of `config.rounds` of `training.fit` (`round_settings`), from arrays or a streaming dataset.

    The same call trains from a 1x set in memory and from an N-copy set on disk; each round goes on where the
    last one ended.
    """
    n = x.num_examples if y is None else len(y)
    return training.fit(
        state,
        x,
        y,
        **round_settings(n, config, round_),
        batch_size=config.batch_size,
        steps_per_execution=config.steps_per_execution,
        seed=config.seed,
        verbose=2,
    )


class PeakRss:
    """Peak resident memory of this process and of its child processes (grain's workers) inside `measuring()`.

    This process's resident memory (VmRSS in /proc/self/status) is read every `interval` seconds, and as each
    measured block begins and ends; children are found with psutil and their own peak (VmHWM, the kernel's
    high-water mark) read while they live, since a process's VmHWM goes with it. Outside the blocks (the
    in-memory runs) nothing is recorded.
    """

    def __init__(self, interval: float = 0.25):
        self.interval, self.main, self.children = interval, 0, {}
        self._active = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    @staticmethod
    def status_bytes(key: str, pid: int | str = "self") -> int:
        """The `key` line ('VmRSS', 'VmHWM') of process `pid`'s /proc status, in bytes (0 if it has gone)."""
        try:
            lines = Path(f"/proc/{pid}/status").read_text().splitlines()
        except (FileNotFoundError, ProcessLookupError):
            return 0
        kib = next((line.split()[1] for line in lines if line.startswith(f"{key}:")), "0")
        return int(kib) * 1024

    def _sample(self) -> None:
        self.main = max(self.main, self.status_bytes("VmRSS"))
        for child in psutil.Process().children(recursive=True):
            self.children[child.pid] = max(self.children.get(child.pid, 0), self.status_bytes("VmHWM", child.pid))

    def _watch(self) -> None:
        while not self._stop.wait(self.interval):
            if self._active.is_set():
                self._sample()

    @contextlib.contextmanager
    def measuring(self) -> Iterator[None]:
        """Record the peaks while the block runs."""
        self._sample()
        self._active.set()
        try:
            yield
        finally:
            self._active.clear()
            self._sample()

    def __enter__(self) -> "PeakRss":
        self._thread.start()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self._stop.set()
        self._thread.join()

    def summary(self) -> dict[str, Any]:
        """This process's peak, each child's, and their sum (an upper bound of the simultaneous peak)."""
        workers = sorted(self.children.values(), reverse=True)
        return {
            "peak_rss_bytes": self.main + sum(workers),
            "peak_rss_main_bytes": self.main,
            "peak_rss_workers_bytes": workers,
            "peak_rss_method": f"while streaming: the largest VmRSS of this process (read every {self.interval}s) "
            "plus each worker's VmHWM, from /proc/PID/status (psutil lists the workers)",
        }


def _median(values: Any) -> float | None:
    """The median of the rounds' values; None when no round finished."""
    return float(np.median(values)) if len(values) else None


def run(config: Config, images: data.ImageData | None = None) -> dict[str, Any]:
    """Write the N-copy set, train from it and from memory, evaluate; returns (and writes) the metrics.

    The shards go to OUT/train_shards, rewritten on every run if this experiment wrote them (`fresh_shard_dir`).
    `images` defaults to `flags.load_images(config)`.
    """
    images = flags.load_images(config) if images is None else images
    shard_dir = fresh_shard_dir(config.out)
    model = models.CNN(num_classes=images.num_classes)
    state = in_memory_state = training.create_train_state(model, images.x_train[:1], seed=config.seed)

    start = time.perf_counter()
    write_augmented_copies(
        images, config.copies, shard_dir, seed=config.seed, records_per_shard=config.records_per_shard
    )
    write_seconds = time.perf_counter() - start
    dataset = streaming.StreamingDataset(shard_dir, worker_count=config.workers, prefetch=config.prefetch)
    rates: dict[str, list[float]] = {"streamed": [], "in_memory": []}
    stopped: dict[str, Any] = {}
    with PeakRss() as rss:
        for round_ in range(config.rounds):
            with rss.measuring():
                state, streamed = train(state, dataset, None, config, round_)
            in_memory = None
            if not flags.interrupted(streamed):
                in_memory_state, in_memory = train(in_memory_state, images.x_train, images.y_train, config, round_)
            stopped = flags.interrupted(streamed, in_memory)
            if stopped:
                break  # an unfinished round is not compared
            rates["streamed"].append(streamed.summary()["train_samples_per_second"])
            rates["in_memory"].append(in_memory.summary()["train_samples_per_second"])
            print(
                f"round {round_ + 1}/{config.rounds}: streamed {rates['streamed'][-1]:,.0f} samples/s, "
                f"in memory {rates['in_memory'][-1]:,.0f}",
                flush=True,
            )
    test = training.evaluate(state, images.x_test, images.y_test)
    in_memory_test = training.evaluate(in_memory_state, images.x_test, images.y_test)
    ratios = np.divide(rates["streamed"], rates["in_memory"])
    metrics = {
        "dataset_bytes": sum(f.stat().st_size for f in shard_dir.iterdir() if f.name != MARKER),
        **rss.summary(),
        "samples_per_second": _median(rates["streamed"]),
        "in_memory_samples_per_second": _median(rates["in_memory"]),
        "relative_speed": _median(ratios),
        "samples_per_second_per_round": rates["streamed"],
        "in_memory_samples_per_second_per_round": rates["in_memory"],
        "test_accuracy": test["accuracy"],
        "in_memory_test_accuracy": in_memory_test["accuracy"],
        "num_examples": len(dataset),
        "in_memory_bytes": images.x_train.nbytes + images.y_train.nbytes,
        "write_seconds": write_seconds,
        "dataset": images.name,
        "dataset_source": images.source,
        "shard_dir": str(shard_dir),
        "config": config,
        **stopped,
    }
    results.write_metrics(config.out, metrics)
    speed = (
        f"streaming {metrics['samples_per_second']:,.0f} samples/s, in memory "
        f"{metrics['in_memory_samples_per_second']:,.0f} ({metrics['relative_speed']:.0%})"
        if rates["streamed"]
        else "no round finished"
    )
    print(
        f"{config.copies} copies of {metrics['dataset']}: {metrics['num_examples']:,} images, "
        f"{metrics['dataset_bytes'] / 2**20:,.1f} MiB on disk; peak RSS {metrics['peak_rss_bytes'] / 2**20:,.0f} MiB "
        f"(process and {len(metrics['peak_rss_workers_bytes'])} workers); {speed}; "
        f"test accuracy {metrics['test_accuracy']:.4f} -> {config.out}/metrics.json",
        flush=True,
    )
    return metrics


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Flags -> Config -> run."""
    parser = flags.parser(__doc__, Config())
    config = flags.config(parser, Config, parser.parse_args(argv))
    try:
        return flags.execute(parser, run, config)
    except shards.ShardWriteError as problem:  # a full disk: its shards removed, one line
        print(f"{parser.prog}: error: {problem}", file=sys.stderr, flush=True)
        sys.exit(1)


if __name__ == "__main__":
    flags.setup_logging()
    main()
