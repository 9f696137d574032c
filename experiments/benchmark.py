"""Speed of the lesson's models on this machine, optionally side by side with the lesson's own Keras code.

    python experiments/benchmark.py --out runs/benchmark
    python experiments/benchmark.py --keras-python /tmp/keras-ref/bin/python --out runs/benchmark

Two kinds of figure. Steps: compile seconds, train and eval samples/s of the bare jitted step at the lesson's
batch size (MLP 10, CNN 64, RNN 1), one batch resident on the device; the CNN also in its plain
nn.Conv + nn.max_pool form, to show what the fast conv + pool layer gains. Lesson fits: each section's own recipe
timed end to end as Keras's `fit` is (compile, host batching and validation included): the MLP's 30 epochs on
Iris, the RNN's 10 epochs on the toy, the CNN's 5 epochs on the image data; and the CNN's last epoch alone
(training samples/s once compiled; Keras's from the ms/step it prints). Also augmentation images/s and peak
memory. With --keras-python the reference scripts run in the same sitting and each ratio is printed.
"""

import argparse
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from experiments import augmentation, keras_reference  # noqa: E402
from flaxlesson import augment, data, models, results, training  # noqa: E402


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


def _timed_fit(model, x, y, loss: str = "sparse_categorical_crossentropy", **fit_args) -> tuple[float, Any]:
    """Seconds of one whole `fit` from a fresh state (compile included, as Keras's fit is timed), and its History."""
    state = training.create_train_state(model, jax.tree.map(lambda a: a[:1], x), loss=loss)
    start = time.perf_counter()
    _, history = training.fit(state, x, y, verbose=0, **fit_args)
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


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50, help="steps per timed repeat")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--cnn-epochs", type=int, default=5, help="epochs of the timed CNN fits, ours and Keras's (the lesson's 5)"
    )
    parser.add_argument("--seeds", type=int, default=5, help="MLP fits timed (median)")
    parser.add_argument("--keras-python", help="a Python with TensorFlow/Keras, to run the reference alongside")
    parser.add_argument("--out", default="runs/benchmark")
    args = parser.parse_args(argv)

    rng = np.random.default_rng(0)
    metrics = {
        "steps": {
            "mlp": bench_steps(
                models.MLP(num_classes=3),
                rng.normal(size=(10, 4)).astype(np.float32),
                rng.integers(0, 3, 10).astype(np.int32),
                "sparse_categorical_crossentropy",
                args.steps,
                args.repeats,
            ),
            "cnn": bench_steps(
                models.CNN(),
                rng.random((64, 28, 28, 1), np.float32),
                rng.integers(0, 10, 64).astype(np.int32),
                "sparse_categorical_crossentropy",
                args.steps,
                args.repeats,
            ),
            "cnn_plain": bench_steps(
                models.CNN(fast=False),
                rng.random((64, 28, 28, 1), np.float32),
                rng.integers(0, 10, 64).astype(np.int32),
                "sparse_categorical_crossentropy",
                args.steps,
                args.repeats,
            ),
            "rnn": bench_steps(
                models.SimpleRNNClassifier(50, num_classes=1),
                rng.integers(0, 10, (1, 5)),
                np.ones(1, np.float32),
                "binary_crossentropy",
                args.steps,
                args.repeats,
            ),
        }
    }
    for name, figures in metrics["steps"].items():
        print(f"{name} step: " + ", ".join(f"{k} {v:,.2f}" for k, v in figures.items()), flush=True)
    images = np.random.default_rng(0).random((256, 28, 28, 1), np.float32)
    metrics["augmentation"] = {
        "batch_size": 256,
        "images_per_second": augmentation.images_per_second(images, augment.LESSON_GENERATOR, repeats=args.repeats),
    }
    print(f"augmentation: {metrics['augmentation']['images_per_second']:,.0f} images/s", flush=True)
    metrics["lesson_fits"] = bench_lesson_fits(args.cnn_epochs, args.seeds)
    print("lesson fits: " + ", ".join(f"{k} {v}" for k, v in metrics["lesson_fits"].items()), flush=True)
    metrics["peak_memory_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if args.keras_python:
        keras = metrics["keras"] = keras_figures(args.keras_python, args.cnn_epochs, args.seeds)
        ours = {
            **metrics["lesson_fits"],
            "augmentation_images_per_second": metrics["augmentation"]["images_per_second"],
        }
        # Seconds: Keras's over ours; rates: ours over Keras's. Above 1 means the port is faster.
        metrics["speedup_over_keras"] = {
            "mlp_fit": keras["mlp_fit_seconds_median"] / ours["mlp_fit_seconds_median"],
            "rnn_fit": keras["rnn_fit_seconds"] / ours["rnn_fit_seconds"],
            "cnn_fit": ours["cnn_fit_samples_per_second"] / keras["cnn_fit_samples_per_second"],
            "cnn_last_epoch": ours["cnn_last_epoch_samples_per_second"] / keras["cnn_last_epoch_samples_per_second"],
            "augmentation": ours["augmentation_images_per_second"] / keras["augmentation_images_per_second"],
        }
        for name, ratio in metrics["speedup_over_keras"].items():
            print(f"{name}: {ratio:.2f}x Keras's speed", flush=True)
    results.write_metrics(args.out, metrics)
    print(f"-> {args.out}/metrics.json")
    return metrics


if __name__ == "__main__":
    main()
