"""Lesson section 1.1: the dense net on Iris, as Keras's recipe (30 epochs, batch 10, validation_split 0.2).

python experiments/mlp_iris.py --seeds 5 --out runs/mlp_iris
"""

import argparse
import time

import numpy as np

from flaxlesson import data, models, plots, results, training


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=1, help="repeat the fit over seeds 0..N-1")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=10)
    parser.add_argument("--validation-split", type=float, default=0.2)
    parser.add_argument("--out", default="runs/mlp_iris")
    args = parser.parse_args(argv)
    if args.seeds < 1:
        parser.error("--seeds must be at least 1")

    (x_train, y_train), (x_test, y_test) = data.load_iris(test_size=0.3, random_state=42)
    accuracies, fit_seconds, histories = [], [], []
    for seed in range(args.seeds):
        state = training.create_train_state(models.MLP(num_classes=3), x_train[:1], seed=seed)
        start = time.perf_counter()
        state, history = training.fit(
            state,
            x_train,
            y_train,
            epochs=args.epochs,
            batch_size=args.batch_size,
            validation_split=args.validation_split,
            seed=seed,
            verbose=2 if seed == 0 else 0,
        )
        fit_seconds.append(time.perf_counter() - start)
        y_pred = training.predict(state, x_test).argmax(axis=1)
        accuracies.append(float(np.mean(y_pred == y_test)))
        histories.append(history)
        print(f"seed {seed}: test accuracy {accuracies[-1]:.4f}, fit {fit_seconds[-1]:.2f}s", flush=True)

    first = histories[0]
    metrics = {
        "test_accuracy": float(np.mean(accuracies)),
        "test_accuracy_per_seed": accuracies,
        "test_accuracy_min": min(accuracies),
        "test_accuracy_max": max(accuracies),
        "fit_seconds_median": float(np.median(fit_seconds)),
        **first.summary(),
        "settings": vars(args),
    }
    results.write_metrics(args.out, metrics)
    plots.history_curves(first, f"{args.out}/curves.png", title="MLP on Iris (seed 0)")
    print(
        f"Accuracy: mean {metrics['test_accuracy']:.4f} (min {min(accuracies):.4f}, max {max(accuracies):.4f}) "
        f"over {args.seeds} seed(s); median fit {metrics['fit_seconds_median']:.2f}s -> {args.out}/metrics.json"
    )
    return metrics


if __name__ == "__main__":
    main()
