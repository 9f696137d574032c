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

import flax.linen as nn
import numpy as np

from flaxlesson import data, models, plots, results, training

DEFAULTS = {
    "lesson": {"epochs": 10, "batch_size": 1, "validation_split": 0.0},
    "rows": {"epochs": 10, "batch_size": 32, "validation_split": 0.1},
}
ACTIVATIONS = {"relu": nn.relu, "tanh": nn.tanh}


Curves = dict[str, tuple[training.History, str]]


def lesson(args: argparse.Namespace) -> tuple[dict, Curves]:
    """The lesson's toy: pad, fit, predict, print as the Keras code does."""
    x = np.array([[1, 2, 3], [4, 5, 6], [7, 8, 9]])
    y = np.array([1, 0, 1])
    x = data.pad_sequences(x, padding="post", maxlen=5)
    print(f"Padded X:\n{x}", flush=True)
    model = models.SimpleRNNClassifier(units=args.units, num_classes=1, activation=ACTIVATIONS[args.activation])
    state = training.create_train_state(model, x[:1], seed=args.seed, loss="binary_crossentropy")
    state, history = training.fit(
        state,
        x,
        y,
        epochs=args.epochs,
        batch_size=args.batch_size,
        validation_split=args.validation_split,
        seed=args.seed,
        verbose=2,
    )
    y_pred = training.predict(state, x)
    print(f"Predictions: {y_pred.tolist()}", flush=True)
    metrics = {
        "padded_x": x,
        "y": y,
        "predictions": y_pred,
        "train_accuracy": history.history["accuracy"][-1],
        **history.summary(),
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
    args: argparse.Namespace, rows: dict[str, np.ndarray], labels: dict[str, np.ndarray], num_classes: int
) -> tuple[dict, dict[str, training.History]]:
    """Train on randomly cut, 'post'-padded images with and without seq_lengths; score both at two paddings."""
    steps = rows["train"].shape[1]
    rng = np.random.default_rng(args.seed)
    lengths = {
        split: rng.integers(args.min_rows, steps + 1, size=len(rows[split])).astype(np.int32)
        for split in ("train", "test")
    }
    train = cut_rows(rows["train"], lengths["train"], steps)
    tests = {
        steps: cut_rows(rows["test"], lengths["test"], steps),
        steps + args.extra_padding: cut_rows(rows["test"], lengths["test"], steps + args.extra_padding),
    }
    out, histories = (
        {
            "min_rows": args.min_rows,
            "extra_padding": args.extra_padding,
            "mean_test_rows": float(lengths["test"].mean()),
        },
        {},
    )
    for name, masked in (("without_seq_lengths", False), ("with_seq_lengths", True)):
        model = models.SimpleRNNClassifier(
            units=args.units, num_classes=num_classes, activation=ACTIVATIONS[args.activation]
        )
        sample = _inputs(train[:1], lengths["train"][:1], masked)
        state = training.create_train_state(model, sample, seed=args.seed)
        print(f"cut images, {name}:", flush=True)
        state, histories[name] = training.fit(
            state,
            _inputs(train, lengths["train"], masked),
            labels["train"],
            epochs=args.masking_epochs,
            batch_size=args.batch_size,
            validation_split=args.validation_split,
            seed=args.seed,
            verbose=2,
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
    return out, histories


def rows_task(args: argparse.Namespace, parser: argparse.ArgumentParser) -> tuple[dict, Curves]:
    """Classify images read row by row, then show masking on cut images of random height."""
    try:
        images = data.load_images(args.dataset, args.data_dir).head(args.limit)
    except (ValueError, data.DatasetUnavailableError) as e:
        parser.error(str(e))
    rows = {"train": image_rows(images.x_train), "test": image_rows(images.x_test)}
    labels = {"train": images.y_train, "test": images.y_test}
    if not 1 <= args.min_rows <= rows["train"].shape[1]:
        parser.error(f"--min-rows must lie in [1, {rows['train'].shape[1]}], got {args.min_rows}")
    print(
        f"{images.name}: {len(rows['train']):,} train and {len(rows['test']):,} test images as sequences of "
        f"{rows['train'].shape[1]} steps x {rows['train'].shape[2]} features ({images.source})",
        flush=True,
    )

    model = models.SimpleRNNClassifier(
        units=args.units, num_classes=images.num_classes, activation=ACTIVATIONS[args.activation]
    )
    state = training.create_train_state(model, rows["train"][:1], seed=args.seed)
    state, history = training.fit(
        state,
        rows["train"],
        labels["train"],
        epochs=args.epochs,
        batch_size=args.batch_size,
        validation_split=args.validation_split,
        seed=args.seed,
        verbose=2,
    )
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
    }
    curves = {"curves.png": (history, f"SimpleRNN on {images.name}, row by row")}
    if args.masking_epochs:
        metrics["masking"], cut_histories = _masking(args, rows, labels, images.num_classes)
        for name, cut_history in cut_histories.items():
            curves[f"curves_cut_{name}.png"] = (
                cut_history,
                f"SimpleRNN on cut {images.name} rows, {name.replace('_', ' ')}",
            )
    return metrics, curves


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=("lesson", "rows"), default="lesson")
    parser.add_argument(
        "--dataset",
        default="auto",
        choices=data.IMAGE_DATASETS,
        help="rows: image source; auto takes TFDS mnist if prepared, else Debian's Fashion-MNIST, else digits",
    )
    parser.add_argument("--data-dir", default=None, help="rows: folder of IDX files (idx), or TFDS's data dir")
    parser.add_argument("--units", type=int, default=None, help="SimpleRNN units (lesson 50, rows 128)")
    parser.add_argument("--activation", choices=sorted(ACTIVATIONS), default="relu")
    parser.add_argument("--epochs", type=int, default=None, help="at most 10 (the lesson's count)")
    parser.add_argument("--batch-size", type=int, default=None, help="lesson 1, rows 32 (Keras's default)")
    parser.add_argument("--validation-split", type=float, default=None, help="lesson 0, rows 0.1")
    parser.add_argument(
        "--masking-epochs",
        type=int,
        default=5,
        help="rows: epochs of each cut-image run, with and without seq_lengths (0 skips them)",
    )
    parser.add_argument("--min-rows", type=int, default=7, help="rows: cut images keep 7..28 rows, uniformly")
    parser.add_argument("--extra-padding", type=int, default=28, help="rows: empty rows added to score padding")
    parser.add_argument(
        "--limit", type=int, default=None, help="use only the first N training and N test images (quick runs)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seeds the initialisation, shuffling and cuts")
    parser.add_argument("--out", default=None, help="default runs/rnn_<task>")
    args = parser.parse_args(argv)
    for key, value in DEFAULTS[args.task].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.units is None:
        args.units = 50 if args.task == "lesson" else 128
    args.out = args.out or f"runs/rnn_{args.task}"
    if not 1 <= args.epochs <= 10 or not 0 <= args.masking_epochs <= 10:
        parser.error("--epochs must lie in [1, 10] and --masking-epochs in [0, 10]")
    if args.units < 1 or args.batch_size < 1 or args.extra_padding < 0:
        parser.error("--units and --batch-size must be positive, --extra-padding not negative")

    metrics, curves = lesson(args) if args.task == "lesson" else rows_task(args, parser)
    metrics["settings"] = vars(args)
    results.write_metrics(args.out, metrics)
    for filename, (history, title) in curves.items():
        plots.history_curves(history, f"{args.out}/{filename}", title=title)
    print(f"-> {args.out}/metrics.json", flush=True)
    return metrics


if __name__ == "__main__":
    main()
