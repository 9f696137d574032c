"""Lesson section 2.2: the SimpleRNN on padded sequences, and images read row by row as a real sequence task.

    python experiments/rnn_sequences.py --task lesson --out runs/rnn_lesson
    python experiments/rnn_sequences.py --task rows --dataset idx --data-dir /usr/share/datasets/fashion-mnist \
        --out runs/rnn_rows

`--task lesson` is the lesson's toy exactly: three sequences padded 'post' to 5 steps, SimpleRNN(50, relu) ->
Dense(1, sigmoid), binary crossentropy, 10 epochs, batch 1. `--task rows` reads each 28x28 image as 28 steps of
28 pixels. Then, because the toy's sequences all have one length and cannot show what masking is for, it cuts
every image to a random number of rows, pads them 'post' with `pad_sequences`, and trains the same network twice,
without `seq_lengths` (Keras's SimpleRNN, which runs over the padding) and with them (each image ends at its last
real row); both are scored on the cut test images padded as in training and padded with extra empty rows.
"""

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any

import flax.linen as nn
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from experiments import flags  # noqa: E402
from flaxlesson import data, models, plots, results, training  # noqa: E402

ACTIVATIONS = {"relu": nn.relu, "tanh": nn.tanh}


@dataclasses.dataclass(frozen=True)
class LessonConfig(flags.Config):
    """`--task lesson`: the lesson's toy, with its settings as defaults. Holds every flag, as metrics.json shows."""

    FLAGS = {
        "task": flags.Flag("which sequence task", choices=("lesson", "rows")),
        "dataset": dataclasses.replace(flags.SHARED["dataset"], help="rows: " + flags.SHARED["dataset"].help),
        "data_dir": dataclasses.replace(flags.SHARED["data_dir"], help="rows: " + flags.SHARED["data_dir"].help),
        "units": flags.Flag("SimpleRNN units", flags.positive_int),
        "activation": flags.Flag("SimpleRNN activation", choices=tuple(sorted(ACTIVATIONS))),
        "epochs": flags.Flag("epochs to train, at most 10 (the lesson's count)", flags.int_in(1, 10)),
        "masking_epochs": flags.Flag(
            "rows: epochs of each cut-image run, with and without seq_lengths (0 skips them)", flags.int_in(0, 10)
        ),
        "min_rows": flags.Flag("rows: cut images keep MIN_ROWS..28 rows, uniformly", flags.positive_int),
        "extra_padding": flags.Flag("rows: empty rows added to score padding", flags.non_negative_int),
        "seed": flags.Flag("seeds the initialisation, shuffling and cuts", flags.non_negative_int),
    }

    task: str = dataclasses.field(default="lesson", init=False)
    dataset: str = "auto"
    data_dir: str | None = None
    units: int = 50
    activation: str = "relu"
    epochs: int = 10
    batch_size: int = 1
    steps_per_execution: int | str = 1
    validation_split: float = 0.0
    masking_epochs: int = 5
    min_rows: int = 7
    extra_padding: int = 28
    limit: int | None = None
    seed: int = 0
    out: str = "runs/rnn_lesson"
    save_model: str | None = None

    @classmethod
    def quick(cls) -> "LessonConfig":
        """The toy is tiny already: the lesson's settings."""
        return cls()


@dataclasses.dataclass(frozen=True)
class RowsConfig(LessonConfig):
    """`--task rows`: images read row by row, then masking on cut images; the rows task's defaults."""

    task: str = dataclasses.field(default="rows", init=False)
    units: int = 128
    batch_size: int = 32
    validation_split: float = 0.1
    out: str = "runs/rnn_rows"

    @classmethod
    def quick(cls) -> "RowsConfig":
        """Tiny settings: one epoch of each fit on the first 1,000 images."""
        return cls(epochs=1, masking_epochs=1, limit=1000)


CONFIGS = {"lesson": LessonConfig, "rows": RowsConfig}


Curves = dict[str, tuple[training.History, str]]


def _fit(config: LessonConfig, state: training.TrainState, x: Any, y: np.ndarray, epochs: int) -> tuple:
    """`training.fit` with the config's batch size, steps per call, validation split and seed, a line per epoch."""
    return training.fit(
        state,
        x,
        y,
        epochs=epochs,
        batch_size=config.batch_size,
        steps_per_execution=config.steps_per_execution,
        validation_split=config.validation_split,
        seed=config.seed,
        verbose=2,
    )


def lesson(config: LessonConfig) -> tuple[dict, Curves]:
    """The lesson's toy: pad, fit, predict, print as the Keras code does."""
    x = np.array([[1, 2, 3], [4, 5, 6], [7, 8, 9]])
    y = np.array([1, 0, 1])
    x = data.pad_sequences(x, padding="post", maxlen=5)
    print(f"Padded X:\n{x}", flush=True)
    model = models.SimpleRNNClassifier(units=config.units, num_classes=1, activation=ACTIVATIONS[config.activation])
    state = training.create_train_state(model, x[:1], seed=config.seed, loss="binary_crossentropy")
    state, history = _fit(config, state, x, y, config.epochs)
    y_pred = training.predict(state, x)
    print(f"Predictions: {y_pred.tolist()}", flush=True)
    metrics = {
        "padded_x": x,
        "y": y,
        "predictions": y_pred,
        "train_accuracy": history.history.get("accuracy", [None])[-1],
        **history.summary(),
        **flags.save_trained(config, state, x[:1]),
    }
    return metrics, {"curves.png": (history, "SimpleRNN on the lesson's toy")}


def image_rows(images: np.ndarray) -> np.ndarray:
    """NHWC images as (N, H, W * C) sequences: one step per row, its pixels as the step's features."""
    return images.reshape(images.shape[0], images.shape[1], -1)


def cut_rows(sequences: np.ndarray, lengths: np.ndarray, maxlen: int) -> np.ndarray:
    """Keep each sequence's first `lengths[i]` steps and pad them 'post' with zeros to `maxlen` steps."""
    return data.pad_sequences(
        [s[:n] for s, n in zip(sequences, lengths)], maxlen=maxlen, dtype="float32", padding="post"
    )


def _inputs(x: np.ndarray, lengths: np.ndarray, masked: bool) -> np.ndarray | dict:
    """The model input: padded steps alone (Keras's SimpleRNN), or with their lengths for masking."""
    return {"x": x, "seq_lengths": lengths} if masked else x


def _masking(
    config: LessonConfig, rows: dict[str, np.ndarray], labels: dict[str, np.ndarray], num_classes: int
) -> tuple[dict, dict[str, training.History]]:
    """Train on randomly cut, 'post'-padded images with and without seq_lengths; score both at two paddings."""
    steps = rows["train"].shape[1]
    rng = np.random.default_rng(config.seed)
    lengths = {
        split: rng.integers(config.min_rows, steps + 1, size=len(rows[split])).astype(np.int32)
        for split in ("train", "test")
    }
    train = cut_rows(rows["train"], lengths["train"], steps)
    tests = {
        steps: cut_rows(rows["test"], lengths["test"], steps),
        steps + config.extra_padding: cut_rows(rows["test"], lengths["test"], steps + config.extra_padding),
    }
    out, histories = (
        {
            "min_rows": config.min_rows,
            "extra_padding": config.extra_padding,
            "mean_test_rows": float(lengths["test"].mean()),
        },
        {},
    )
    for name, masked in (("without_seq_lengths", False), ("with_seq_lengths", True)):
        model = models.SimpleRNNClassifier(
            units=config.units, num_classes=num_classes, activation=ACTIVATIONS[config.activation]
        )
        sample = _inputs(train[:1], lengths["train"][:1], masked)
        state = training.create_train_state(model, sample, seed=config.seed)
        print(f"cut images, {name}:", flush=True)
        state, histories[name] = _fit(
            config, state, _inputs(train, lengths["train"], masked), labels["train"], config.masking_epochs
        )
        scores, probabilities = {}, []
        for maxlen, x in tests.items():
            x = _inputs(x, lengths["test"], masked)
            scores[f"test_accuracy_padded_to_{maxlen}"] = training.evaluate(state, x, labels["test"], batch_size=256)[
                "accuracy"
            ]
            probabilities.append(training.predict(state, x, batch_size=256))
        scores["max_probability_change_from_extra_padding"] = float(np.abs(probabilities[1] - probabilities[0]).max())
        out[name] = {**scores, **histories[name].summary()}
        print(f"  {name}: " + ", ".join(f"{k} {v:.4f}" for k, v in scores.items()), flush=True)
        if flags.interrupted(histories[name]):
            break
    return out, histories


def rows_task(config: LessonConfig) -> tuple[dict, Curves]:
    """Classify images read row by row, then show masking on cut images of random height."""
    images = flags.load_images(config)
    rows = {"train": image_rows(images.x_train), "test": image_rows(images.x_test)}
    labels = {"train": images.y_train, "test": images.y_test}
    if not 1 <= config.min_rows <= rows["train"].shape[1]:
        raise flags.ConfigError("min_rows", f"must lie in [1, {rows['train'].shape[1]}], got {config.min_rows}")
    print(
        f"{images.name}: {len(rows['train']):,} train and {len(rows['test']):,} test images as sequences of "
        f"{rows['train'].shape[1]} steps x {rows['train'].shape[2]} features ({images.source})",
        flush=True,
    )

    model = models.SimpleRNNClassifier(
        units=config.units, num_classes=images.num_classes, activation=ACTIVATIONS[config.activation]
    )
    state = training.create_train_state(model, rows["train"][:1], seed=config.seed)
    state, history = _fit(config, state, rows["train"], labels["train"], config.epochs)
    test = training.evaluate(state, rows["test"], labels["test"], batch_size=256)
    print(f"Test accuracy (whole images, row by row): {test['accuracy']:.4f}", flush=True)
    metrics = {
        "test_accuracy": test["accuracy"],
        "test_loss": test["loss"],
        **history.summary(),
        "dataset": images.name,
        "dataset_source": images.source,
        "class_names": images.class_names,
        "train_test_sizes": [len(rows["train"]), len(rows["test"])],
        **flags.save_trained(config, state, rows["train"][:1]),
    }
    curves = {"curves.png": (history, f"SimpleRNN on {images.name}, row by row")}
    if config.masking_epochs and not flags.interrupted(history):
        metrics["masking"], cut_histories = _masking(config, rows, labels, images.num_classes)
        for name, cut_history in cut_histories.items():
            curves[f"curves_cut_{name}.png"] = (
                cut_history,
                f"SimpleRNN on cut {images.name} rows, {name.replace('_', ' ')}",
            )
    return metrics, curves


def run(config: LessonConfig) -> dict:
    """Run the config's task; write metrics.json and the curves of every fit into config.out."""
    metrics, curves = lesson(config) if config.task == "lesson" else rows_task(config)
    metrics["settings"] = dataclasses.asdict(config)
    metrics.update(flags.interrupted(*(history for history, _ in curves.values())))
    results.write_metrics(config.out, metrics)
    for filename, (history, title) in curves.items():
        plots.history_curves(history, f"{config.out}/{filename}", title=title)
    print(f"-> {config.out}/metrics.json", flush=True)
    return metrics


def main(argv: list[str] | None = None) -> dict:
    """Flags -> the task's config (its defaults are the task's) -> run."""
    task = argparse.ArgumentParser(add_help=False)
    task.add_argument("--task", default="lesson")
    defaults = CONFIGS.get(task.parse_known_args(argv)[0].task, LessonConfig)()
    parser = flags.parser(__doc__, defaults)
    parser.set_defaults(task="lesson")
    args = parser.parse_args(argv)
    return flags.execute(parser, run, flags.config(parser, CONFIGS[args.task], args))


if __name__ == "__main__":
    flags.setup_logging()
    main()
