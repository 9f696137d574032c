"""Lesson section 2.1: the CNN on MNIST-style images, as Keras's recipe (5 epochs, batch 64, validation_split 0.1).

python experiments/cnn_mnist.py --dataset auto --out runs/cnn_mnist
python experiments/cnn_mnist.py --dataset idx --data-dir /usr/share/datasets/fashion-mnist --out runs/cnn_fmnist
python experiments/cnn_mnist.py --dataset folder --data-dir DIR   # a folder per class (or DIR/train, DIR/test)
python experiments/cnn_mnist.py --labels one-hot      # the lesson as written: to_categorical + categorical_crossentropy
python experiments/cnn_mnist.py --dtype bfloat16      # Keras's mixed_bfloat16: bfloat16 compute, float32 params
python experiments/cnn_mnist.py --save-model runs/cnn_model   # then: experiments/predict.py --model runs/cnn_model
python experiments/cnn_mnist.py --model cnn-bn       # the CNN with BatchNorm and Dropout (models.CNNBatchNorm)
"""

import dataclasses
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import sklearn.metrics

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from experiments import flags  # noqa: E402
from flaxlesson import augment, checkpoint, data, models, plots, results, training  # noqa: E402
from flaxlesson.resume import resume_or_start  # noqa: E402

LABELS = {"sparse": "sparse_categorical_crossentropy", "one-hot": "categorical_crossentropy"}
DTYPES = {"float32": None, "bfloat16": jnp.bfloat16}
MODELS = {"cnn": models.CNN, "cnn-bn": models.CNNBatchNorm}


@dataclasses.dataclass(frozen=True)
class Config(flags.Config):
    """The section's settings; the defaults are the lesson's."""

    FLAGS = {
        "dataset": flags.Flag(
            "image source; auto takes TFDS mnist if prepared, else Debian's Fashion-MNIST, else digits; folder: "
            "--data-dir's images, a subfolder per class, read as Keras's image_dataset_from_directory reads them "
            "(grayscale, 28x28; DIR/train and DIR/test if both are there, else its last 10% is the test set)",
            choices=(*data.IMAGE_DATASETS, "folder"),
        ),
        "augment": flags.Flag("augment every training batch on the device with the lesson's ImageDataGenerator", None),
        "labels": flags.Flag(
            "sparse: class indices + sparse_categorical_crossentropy; one-hot: the lesson's to_categorical + "
            "categorical_crossentropy",
            choices=tuple(LABELS),
        ),
        "model": flags.Flag(
            "cnn: the lesson's CNN; cnn-bn: the same with BatchNorm after each conv stage and Dropout before the "
            "output (trains with train=True, evaluates on BatchNorm's running averages)",
            choices=tuple(MODELS),
        ),
        "dtype": flags.Flag(
            "the layers' computation dtype; bfloat16 is Keras's mixed_bfloat16 (params, optimiser and loss float32)",
            choices=tuple(DTYPES),
        ),
    }

    dataset: str = "auto"
    data_dir: str | None = None
    epochs: int = 5
    batch_size: int = 64
    steps_per_execution: int | str = 1
    validation_split: float = 0.1
    strategy: str = "single"
    cpu_devices: int | None = None
    augment: bool = False
    labels: str = "sparse"
    model: str = "cnn"
    dtype: str = "float32"
    limit: int | None = None
    seed: int = 0
    checkpoint_dir: str | None = None
    save_freq: int | str = "epoch"
    resume: bool = False
    out: str = "runs/cnn_mnist"
    save_model: str | None = None

    @classmethod
    def quick(cls) -> "Config":
        """Tiny settings: one epoch on the first 1,000 images."""
        return cls(epochs=1, limit=1000)


def _plot(
    out: str, title: str, history: training.History, images: data.ImageData, y_pred: np.ndarray, matrix: np.ndarray
) -> None:
    """The run's figures: training curves (if an epoch ran), the first 25 test predictions, the confusion matrix."""
    if history.epoch:
        plots.history_curves(history, f"{out}/curves.png", title=title)
    plots.prediction_grid(
        images.x_test[:25],
        images.y_test[:25],
        y_pred[:25],
        images.class_names,
        f"{out}/predictions.png",
        title=f"{title}: first 25 test images",
    )
    plots.confusion_matrix(matrix, images.class_names, f"{out}/confusion_matrix.png", title=f"{title}: test set")


def run(config: Config) -> dict:
    """Fit the CNN (resuming from a checkpoint if asked), score it on the test images; write metrics and figures."""
    flags.use_cpu_devices(config)
    images = flags.load_images(config)
    print(
        f"{images.name}: {len(images.x_train):,} train and {len(images.x_test):,} test images of "
        f"{images.x_train.shape[1:]} ({images.source})",
        flush=True,
    )

    model = MODELS[config.model](num_classes=images.num_classes, dtype=DTYPES[config.dtype])
    loss = LABELS[config.labels]
    y_train, y_test = images.y_train, images.y_test
    if config.labels == "one-hot":
        y_train = data.to_categorical(images.y_train, images.num_classes)
        y_test = data.to_categorical(images.y_test, images.num_classes)
    state = training.create_train_state(model, images.x_train[:1], seed=config.seed, loss=loss)
    try:
        start = resume_or_start(
            config.checkpoint_dir,
            state,
            resume=config.resume,
            strategy=config.strategy,
            seed=config.seed,
            save_freq=config.save_freq,
            kind="cnn_mnist",
        )
    except checkpoint.CheckpointError as e:
        raise flags.ConfigError("checkpoint_dir", str(e)) from None
    state, history = training.fit(
        start.state,
        images.x_train,
        y_train,
        epochs=config.epochs,
        batch_size=config.batch_size,
        steps_per_execution=config.steps_per_execution,
        validation_split=config.validation_split,
        seed=config.seed,
        strategy=config.strategy,
        initial_epoch=start.initial_epoch,
        initial_step=start.initial_step,
        callbacks=start.callbacks,
        augment=augment.LESSON_GENERATOR if config.augment else None,
    )
    test = training.evaluate(state, images.x_test, y_test, strategy=config.strategy)
    y_pred = training.predict(state, images.x_test, strategy=config.strategy).argmax(axis=1)
    matrix = sklearn.metrics.confusion_matrix(images.y_test, y_pred, labels=np.arange(images.num_classes))

    metrics = {
        "test_accuracy": test["accuracy"],
        "test_loss": test["loss"],
        **history.summary(),
        "dataset": images.name,
        "dataset_source": images.source,
        "class_names": images.class_names,
        "train_test_sizes": [len(images.x_train), len(images.x_test)],
        "confusion_matrix": matrix,
        "params_fingerprint": checkpoint.fingerprint(state.params),
        "settings": dataclasses.asdict(config),
        **flags.interrupted(history),
        **flags.save_trained(config, state, images.x_train[:1]),
    }
    results.write_metrics(config.out, metrics)
    _plot(config.out, f"{type(model).__name__} on {images.name}", history, images, y_pred, matrix)
    speed = metrics["train_samples_per_second"]
    trained = (
        f"{speed:,.0f} train samples/s"
        if speed is not None
        else f"nothing left to train after epoch {start.initial_epoch}"
    )
    print(f"Test Accuracy: {test['accuracy']:.4f} ({images.name}); {trained} -> {config.out}/metrics.json")
    return metrics


def main(argv: list[str] | None = None) -> dict:
    """Flags -> Config -> run."""
    parser = flags.parser(__doc__, Config())
    return flags.execute(parser, run, flags.config(parser, Config, parser.parse_args(argv)))


if __name__ == "__main__":
    flags.setup_logging()
    main()
