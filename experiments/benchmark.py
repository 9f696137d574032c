"""Speed of the lesson's models on this machine, optionally side by side with the lesson's own Keras code.

    python experiments/benchmark.py --out runs/benchmark
    python experiments/benchmark.py --keras-python /tmp/keras-ref/bin/python --out runs/benchmark
    python experiments/benchmark.py --steps-only --steps 20 --repeats 3 --out runs/benchmark_steps

Two kinds of figure. Steps: compile seconds, train and eval samples/s of the bare jitted step at the lesson's
batch size (MLP 10, CNN 64, RNN 1), one batch resident on the device; the CNN also in its plain
nn.Conv + nn.max_pool form, to show what the fast conv + pool layer gains, and with BatchNorm and Dropout
(`models.CNNBatchNorm`, the cost of the batch statistics and the dropout masks). Lesson fits: each section's own recipe
timed end to end as Keras's `fit` is (compile, host batching and validation included): the MLP's 30 epochs on
Iris, the RNN's 10 epochs on the toy, the CNN's 5 epochs on the image data; and the CNN's last epoch alone
(training samples/s once compiled; Keras's from the ms/step it prints). Also augmentation images/s and peak
memory. With --keras-python the reference scripts run in the same sitting and each ratio is printed.
"""

import dataclasses
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from experiments import augmentation, flags, keras_reference  # noqa: E402
from flaxlesson import augment, callbacks, checkpoint, data, models, results, training  # noqa: E402


def _median_rate(run: Callable[[], None], items: int, repeats: int) -> float:
    """Items per second of `run` (which blocks until its work is done), median over repeats."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return items / float(np.median(times))


def bench_steps(model, x: np.ndarray, y: np.ndarray, loss: str, steps: int, repeats: int) -> dict:
    """Compile seconds and samples/s of the core's train and eval steps on one resident batch (x, y)."""
    state = training.create_train_state(model, x[:1], loss=loss)
    batch = jax.device_put({"x": x, "y": y, "mask": np.ones(len(y), np.float32)})
    key = jax.random.key(0)
    start = time.perf_counter()
    train_step = (
        jax.jit(training.make_train_step(loss), donate_argnums=(0, 1))
        .lower(state, training.zero_totals(), batch, key)
        .compile()
    )
    compile_seconds = time.perf_counter() - start
    carry = [state, training.zero_totals()]

    def train():
        for _ in range(steps):
            carry[0], carry[1] = train_step(carry[0], carry[1], batch, key)
        jax.block_until_ready(carry)

    eval_step = jax.jit(training.make_eval_step(loss))

    def evaluate():
        totals = training.zero_totals()
        for _ in range(steps):
            totals = eval_step(carry[0], totals, batch)
        jax.block_until_ready(totals)

    train(), evaluate()
    return {
        "batch_size": len(y),
        "compile_seconds": compile_seconds,
        "train_samples_per_second": _median_rate(train, steps * len(y), repeats),
        "eval_samples_per_second": _median_rate(evaluate, steps * len(y), repeats),
    }


def bench_lesson_steps(steps: int, repeats: int) -> dict:
    """`bench_steps` of each lesson model at the lesson's batch size, on random data of the lesson's shapes."""
    rng = np.random.default_rng(0)
    images, classes = rng.random((64, 28, 28, 1), np.float32), rng.integers(0, 10, 64).astype(np.int32)
    sparse = "sparse_categorical_crossentropy"
    return {
        "mlp": bench_steps(
            models.MLP(num_classes=3),
            rng.normal(size=(10, 4)).astype(np.float32),
            rng.integers(0, 3, 10).astype(np.int32),
            sparse,
            steps,
            repeats,
        ),
        "cnn": bench_steps(models.CNN(), images, classes, sparse, steps, repeats),
        "cnn_plain": bench_steps(models.CNN(fast=False), images, classes, sparse, steps, repeats),
        "cnn_bn": bench_steps(models.CNNBatchNorm(), images, classes, sparse, steps, repeats),
        "rnn": bench_steps(
            models.SimpleRNNClassifier(50, num_classes=1),
            rng.integers(0, 10, (1, 5)),
            np.ones(1, np.float32),
            "binary_crossentropy",
            steps,
            repeats,
        ),
    }


def _timed_fit(model, x, y, loss: str = "sparse_categorical_crossentropy", **fit_args) -> tuple[float, Any]:
    """Seconds of one whole `fit` from a fresh state (compile included, as Keras's fit is timed), and its History.

    A fit stopped by Ctrl-C has no time worth keeping: the interruption goes on as KeyboardInterrupt.
    """
    state = training.create_train_state(model, jax.tree.map(lambda a: a[:1], x), loss=loss)
    start = time.perf_counter()
    _, history = training.fit(state, x, y, verbose=0, **fit_args)
    if flags.interrupted(history):
        raise KeyboardInterrupt
    return time.perf_counter() - start, history


def bench_lesson_fits(cnn_epochs: int, seeds: int) -> dict:
    """Each section's own recipe, fitted end to end."""
    (x_iris, y_iris), _ = data.load_iris()
    mlp = [
        _timed_fit(models.MLP(num_classes=3), x_iris, y_iris, epochs=30, batch_size=10, validation_split=0.2, seed=seed)
        for seed in range(seeds)
    ]
    toy = data.pad_sequences(np.array([[1, 2, 3], [4, 5, 6], [7, 8, 9]]), padding="post", maxlen=5)
    rnn = _timed_fit(
        models.SimpleRNNClassifier(50, num_classes=1),
        toy,
        np.array([1, 0, 1]),
        loss="binary_crossentropy",
        epochs=10,
        batch_size=1,
    )
    images = data.load_images("auto")
    train = int(np.floor(len(images.x_train) * 0.9))
    cnn, history = _timed_fit(
        models.CNN(num_classes=images.num_classes),
        images.x_train,
        images.y_train,
        epochs=cnn_epochs,
        batch_size=64,
        validation_split=0.1,
    )
    return {
        "mlp_fit_seconds_median": float(np.median([seconds for seconds, _ in mlp])),
        "rnn_fit_seconds": rnn[0],
        "cnn_dataset": images.name,
        "cnn_epochs": cnn_epochs,
        "cnn_fit_samples_per_second": train * cnn_epochs / cnn,
        "cnn_last_epoch_samples_per_second": history.samples_per_second[-1],
    }


SWEEP = (1, 8, 64, "epoch")
"""The steps_per_execution values the benchmark compares (Keras's name; 'epoch' is a whole epoch per call)."""


def _sweep_one(model, x, y, loss: str = "sparse_categorical_crossentropy", **fit_args) -> dict:
    """Train samples/s (median epoch) and compile seconds of one fit per steps_per_execution value."""
    figures = {}
    for k in SWEEP:
        _, history = _timed_fit(model, x, y, loss=loss, steps_per_execution=k, **fit_args)
        figures[str(k)] = {
            "train_samples_per_second": history.summary()["train_samples_per_second"],
            "compile_seconds": history.compile_seconds,
        }
        print(f"  steps_per_execution={k}: {figures[str(k)]}", flush=True)
    return figures


def _distributed_sweep() -> dict:
    """distributed.py (the lesson's MLP, sharded over 8 virtual CPU devices) once per value, each in its process."""
    figures = {}
    for k in SWEEP:
        with tempfile.TemporaryDirectory() as out:
            env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "PYTHONPATH": str(ROOT)}
            argv = ["--strategy", "sharded", "--steps-per-execution", str(k), "--out", out]
            subprocess.run(
                [sys.executable, str(ROOT / "experiments" / "distributed.py"), *argv],
                env=env,
                check=True,
                capture_output=True,
            )
            record = json.loads((Path(out) / "metrics.json").read_text())
        figures[str(k)] = {
            "train_samples_per_second": record["train_samples_per_second"],
            "compile_seconds": record["compile_seconds"],
            "num_devices": record["num_devices"],
        }
        print(f"  steps_per_execution={k}: {figures[str(k)]}", flush=True)
    return figures


def bench_steps_per_execution() -> dict:
    """Each model's lesson fit at steps_per_execution 1, 8, 64 and 'epoch'; the CNN's start-up cost too."""
    (x_iris, y_iris), _ = data.load_iris()
    toy = data.pad_sequences(np.array([[1, 2, 3], [4, 5, 6], [7, 8, 9]]), padding="post", maxlen=5)
    images = data.load_images("auto")
    rows = images.x_train[:6000].reshape(6000, images.x_train.shape[1], -1)
    start = time.perf_counter()
    training.create_train_state(models.CNN(num_classes=images.num_classes), images.x_train[:1])
    sweep = {"cnn_create_train_state_seconds": time.perf_counter() - start}
    runs = {
        "mlp_iris": lambda: _sweep_one(
            models.MLP(num_classes=3), x_iris, y_iris, epochs=30, batch_size=10, validation_split=0.2
        ),
        "rnn_lesson": lambda: _sweep_one(
            models.SimpleRNNClassifier(50, num_classes=1),
            toy,
            np.array([1, 0, 1]),
            "binary_crossentropy",
            epochs=10,
            batch_size=1,
        ),
        "rnn_rows": lambda: _sweep_one(
            models.SimpleRNNClassifier(128, num_classes=images.num_classes),
            rows,
            images.y_train[:6000],
            epochs=2,
            batch_size=32,
            validation_split=0.1,
        ),
        "cnn": lambda: _sweep_one(
            models.CNN(num_classes=images.num_classes),
            images.x_train,
            images.y_train,
            epochs=2,
            batch_size=64,
            validation_split=0.1,
        ),
        "distributed_mlp_8_devices": _distributed_sweep,
    }
    for name, sweep_run in runs.items():
        print(f"{name}:", flush=True)
        sweep[name] = sweep_run()
    return sweep


def bench_callbacks(limit: int = 20000, rounds: int = 2) -> dict:
    """What a checkpoint every 100 steps and TensorBoard every step cost the CNN: epoch seconds, alternating runs.

    Each setting is fitted `rounds` times for 2 epochs on the first `limit` training images; the medians of
    the epochs' seconds are compared with those of a fit without callbacks.
    """
    images = data.load_images("auto").head(limit)
    state = training.create_train_state(models.CNN(num_classes=images.num_classes), images.x_train[:1])
    settings = {
        "none": lambda folder: [],
        "checkpoint_every_100_steps": lambda folder: [checkpoint.BackupAndRestore(folder, state, save_freq=100)],
        "tensorboard_every_step": lambda folder: [callbacks.TensorBoard(folder, update_freq=1)],
    }
    seconds = {name: [] for name in settings}
    for _ in range(rounds):
        for name, make in settings.items():
            with tempfile.TemporaryDirectory() as folder:
                _, history = training.fit(
                    state, images.x_train, images.y_train, epochs=2, batch_size=64, verbose=0, callbacks=make(folder)
                )
            seconds[name] += history.seconds
    base = float(np.median(seconds["none"]))
    figures = {
        name: {"epoch_seconds": values, "median_over_none": float(np.median(values)) / base}
        for name, values in seconds.items()
    }
    for name, value in figures.items():
        print(f"  {name}: median epoch {value['median_over_none']:.3f}x the fit without callbacks", flush=True)
    return figures


def keras_figures(python: str, cnn_epochs: int, seeds: int) -> dict:
    """The lesson's Keras code run in `python` (experiments/keras_reference.py), in this sitting: its figures."""
    keras = keras_reference.run(python, cnn_epochs=cnn_epochs, seeds=seeds, examples=("mlp", "rnn", "aug"))
    if keras.errors or keras.cnn_ms_per_step is None:
        raise RuntimeError(f"the Keras reference failed:\n{keras.errors}")
    return {
        "mlp_fit_seconds_median": float(keras.figures("mlp")["fit_s_median"]),
        "rnn_fit_seconds": float(keras.figures("rnn")["fit_s"]),
        "augmentation_images_per_second": float(keras.figures("aug")["images_per_s"]),
        "cnn_fit_samples_per_second": 54000 * cnn_epochs / float(keras.figures("cnn")["fit_s"]),
        "cnn_last_epoch_samples_per_second": 64 / (keras.cnn_ms_per_step / 1000),
        "cnn_test_accuracy": float(keras.figures("cnn")["test_acc"]),
    }


@dataclasses.dataclass(frozen=True)
class Config(flags.Config):
    """What the benchmark times, and how often; the defaults time the lesson's own recipes."""

    FLAGS = {
        "steps": flags.Flag("steps per timed repeat", flags.positive_int),
        "repeats": flags.Flag("timed repeats (the median is kept)", flags.positive_int),
        "cnn_epochs": flags.Flag("epochs of the timed CNN fits, ours and Keras's (the lesson's 5)", flags.positive_int),
        "seeds": flags.Flag("MLP fits timed (median)", flags.positive_int),
        "keras_python": flags.Flag("a Python with TensorFlow/Keras, to run the reference alongside"),
        "sweep": flags.Flag("also time every model's fit at steps_per_execution 1, 8, 64 and 'epoch'", None),
        "callbacks": flags.Flag("also time the CNN's fit with checkpoints every 100 steps and TensorBoard", None),
        "steps_only": flags.Flag("time only the bare steps of each model (no augmentation, no lesson fits)", None),
    }

    steps: int = 50
    repeats: int = 5
    cnn_epochs: int = 5
    seeds: int = 5
    keras_python: str | None = None
    sweep: bool = False
    callbacks: bool = False
    steps_only: bool = False
    out: str = "runs/benchmark"

    @classmethod
    def quick(cls) -> "Config":
        """Tiny settings, to see that it runs (its figures then mean little)."""
        return cls(steps=2, repeats=1, cnn_epochs=1, seeds=1)


def run(config: Config) -> dict:
    """Time the steps, augmentation and lesson fits (and Keras's, with keras_python); write metrics.json.

    Ctrl-C stops the measuring; metrics.json then holds the figures measured so far and `"interrupted": true`.
    """
    metrics = {}
    try:
        metrics["steps"] = bench_lesson_steps(config.steps, config.repeats)
        for name, figures in metrics["steps"].items():
            print(f"{name} step: " + ", ".join(f"{k} {v:,.2f}" for k, v in figures.items()), flush=True)
        if not config.steps_only:
            _bench_the_rest(config, metrics)
    except KeyboardInterrupt:
        metrics["interrupted"] = True
    results.write_metrics(config.out, metrics)
    print(f"-> {config.out}/metrics.json")
    return metrics


def _bench_the_rest(config: Config, metrics: dict) -> None:
    """Augmentation, the lesson fits and what the config asks besides, added to `metrics` as each is measured."""
    images = np.random.default_rng(0).random((256, 28, 28, 1), np.float32)
    rate = augmentation.images_per_second(images, augment.LESSON_GENERATOR, repeats=config.repeats)
    metrics["augmentation"] = {"batch_size": 256, "images_per_second": rate}
    print(f"augmentation: {rate:,.0f} images/s", flush=True)
    metrics["lesson_fits"] = bench_lesson_fits(config.cnn_epochs, config.seeds)
    print("lesson fits: " + ", ".join(f"{k} {v}" for k, v in metrics["lesson_fits"].items()), flush=True)
    if config.callbacks:
        print("callbacks:", flush=True)
        metrics["callbacks"] = bench_callbacks()
    if config.sweep:
        metrics["steps_per_execution"] = bench_steps_per_execution()
    metrics["peak_memory_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if config.keras_python:
        metrics.update(compare_with_keras(config, metrics))


def compare_with_keras(config: Config, metrics: dict) -> dict:
    """The Keras reference's figures (`keras`) and each of ours over Keras's (`speedup_over_keras`), printed."""
    keras = keras_figures(config.keras_python, config.cnn_epochs, config.seeds)
    ours = {**metrics["lesson_fits"], "augmentation_images_per_second": metrics["augmentation"]["images_per_second"]}
    # Seconds: Keras's over ours; rates: ours over Keras's. Above 1 means the port is faster.
    speedup = {
        "mlp_fit": keras["mlp_fit_seconds_median"] / ours["mlp_fit_seconds_median"],
        "rnn_fit": keras["rnn_fit_seconds"] / ours["rnn_fit_seconds"],
        "cnn_fit": ours["cnn_fit_samples_per_second"] / keras["cnn_fit_samples_per_second"],
        "cnn_last_epoch": ours["cnn_last_epoch_samples_per_second"] / keras["cnn_last_epoch_samples_per_second"],
        "augmentation": ours["augmentation_images_per_second"] / keras["augmentation_images_per_second"],
    }
    for name, ratio in speedup.items():
        print(f"{name}: {ratio:.2f}x Keras's speed", flush=True)
    return {"keras": keras, "speedup_over_keras": speedup}


def main(argv: list[str] | None = None) -> dict:
    """Flags -> Config -> run."""
    parser = flags.parser(__doc__, Config())
    return flags.execute(parser, run, flags.config(parser, Config, parser.parse_args(argv)))


if __name__ == "__main__":
    flags.setup_logging()
    main()
