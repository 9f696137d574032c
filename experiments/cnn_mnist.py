"""Lesson section 2.1: the CNN on MNIST-style images, as Keras's recipe (5 epochs, batch 64, validation_split 0.1).

python experiments/cnn_mnist.py --dataset auto --out runs/cnn_mnist
python experiments/cnn_mnist.py --dataset idx --data-dir /usr/share/datasets/fashion-mnist --out runs/cnn_fmnist
"""

import argparse

import numpy as np
import sklearn.metrics

from flaxlesson import augment, checkpoint, data, models, plots, results, training


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--dataset",
        default="auto",
        choices=data.IMAGE_DATASETS,
        help="image source; auto takes TFDS mnist if prepared, else Debian's Fashion-MNIST, else digits",
    )
    parser.add_argument("--data-dir", default=None, help="folder of IDX files (idx), or TFDS's data dir (mnist, ...)")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--validation-split", type=float, default=0.1)
    parser.add_argument("--strategy", default="single", help="passed to fit: how the step is placed on devices")
    parser.add_argument(
        "--augment",
        action="store_true",
        help="augment every training batch on the device with the lesson's ImageDataGenerator",
    )
    parser.add_argument(
        "--limit", type=int, default=None, help="use only the first N training and N test images (quick runs)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seeds the initialisation and the shuffling")
    parser.add_argument("--checkpoint-dir", help="save the train state here after every epoch")
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --checkpoint-dir")
    parser.add_argument("--out", default="runs/cnn_mnist")
    args = parser.parse_args(argv)
    if args.resume and not args.checkpoint_dir:
        parser.error("--resume needs --checkpoint-dir")
    try:
        images = data.load_images(args.dataset, args.data_dir).head(args.limit)
    except (ValueError, data.DatasetUnavailableError) as e:
        parser.error(str(e))
    print(
        f"{images.name}: {len(images.x_train):,} train and {len(images.x_test):,} test images of "
        f"{images.x_train.shape[1:]} ({images.source})",
        flush=True,
    )

    model = models.CNN(num_classes=images.num_classes)
    state = training.create_train_state(model, images.x_train[:1], seed=args.seed)
    try:
        state, initial_epoch, callbacks = checkpoint.resume_or_start(
            args.checkpoint_dir, state, resume=args.resume, strategy=args.strategy
        )
    except checkpoint.CheckpointError as e:
        parser.error(f"--checkpoint-dir: {e}")
    state, history = training.fit(
        state,
        images.x_train,
        images.y_train,
        epochs=args.epochs,
        batch_size=args.batch_size,
        validation_split=args.validation_split,
        seed=args.seed,
        strategy=args.strategy,
        initial_epoch=initial_epoch,
        callbacks=callbacks,
        augment=augment.LESSON_GENERATOR if args.augment else None,
    )
    test = training.evaluate(state, images.x_test, images.y_test, strategy=args.strategy)
    y_pred = training.predict(state, images.x_test, strategy=args.strategy).argmax(axis=1)
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
        "settings": vars(args),
    }
    results.write_metrics(args.out, metrics)
    title = f"CNN on {images.name}"
    plots.history_curves(history, f"{args.out}/curves.png", title=title)
    plots.prediction_grid(
        images.x_test[:25],
        images.y_test[:25],
        y_pred[:25],
        images.class_names,
        f"{args.out}/predictions.png",
        title=f"{title}: first 25 test images",
    )
    plots.confusion_matrix(matrix, images.class_names, f"{args.out}/confusion_matrix.png", title=f"{title}: test set")
    print(
        f"Test Accuracy: {test['accuracy']:.4f} ({images.name}); "
        f"{metrics['train_samples_per_second']:,.0f} train samples/s -> {args.out}/metrics.json"
    )
    return metrics


if __name__ == "__main__":
    main()
