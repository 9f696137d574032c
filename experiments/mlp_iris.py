"""Lesson section 1.1: the dense net on Iris, as Keras's recipe (30 epochs, batch 10, validation_split 0.2).

python experiments/mlp_iris.py --seeds 5 --out runs/mlp_iris
"""

import dataclasses
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from experiments import flags  # noqa: E402
from flaxlesson import data, models, plots, results, training  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Config(flags.Config):
    """The section's settings; the defaults are the lesson's."""

    FLAGS = {"seeds": flags.Flag("repeat the fit over seeds 0..N-1", flags.positive_int)}

    seeds: int = 1
    epochs: int = 30
    batch_size: int = 10
    steps_per_execution: int | str = 1
    validation_split: float = 0.2
    out: str = "runs/mlp_iris"
    save_model: str | None = None

    @classmethod
    def quick(cls) -> "Config":
        """Tiny settings: one seed, 3 epochs."""
        return cls(seeds=1, epochs=3)


def run(config: Config) -> dict:
    """Fit the MLP once per seed, score each on the test split; write metrics.json, seed 0's curves (and model)."""
    (x_train, y_train), (x_test, y_test) = data.load_iris(test_size=0.3, random_state=42)
    accuracies, fit_seconds, histories, saved = [], [], [], {}
    for seed in range(config.seeds):
        state = training.create_train_state(models.MLP(num_classes=3), x_train[:1], seed=seed)
        start = time.perf_counter()
        state, history = training.fit(
            state,
            x_train,
            y_train,
            epochs=config.epochs,
            batch_size=config.batch_size,
            steps_per_execution=config.steps_per_execution,
            validation_split=config.validation_split,
            seed=seed,
            verbose=2 if seed == 0 else 0,
        )
        fit_seconds.append(time.perf_counter() - start)
        y_pred = training.predict(state, x_test).argmax(axis=1)
        accuracies.append(float(np.mean(y_pred == y_test)))
        histories.append(history)
        if seed == 0:
            saved = flags.save_trained(config, state, x_train[:1])
        print(f"seed {seed}: test accuracy {accuracies[-1]:.4f}, fit {fit_seconds[-1]:.2f}s", flush=True)
        if flags.interrupted(history):
            break

    first = histories[0]
    metrics = {
        "test_accuracy": float(np.mean(accuracies)),
        "test_accuracy_per_seed": accuracies,
        "test_accuracy_min": min(accuracies),
        "test_accuracy_max": max(accuracies),
        "fit_seconds_median": float(np.median(fit_seconds)),
        **first.summary(),
        "settings": dataclasses.asdict(config),
        **flags.interrupted(*histories),
        **saved,
    }
    results.write_metrics(config.out, metrics)
    plots.history_curves(first, f"{config.out}/curves.png", title="MLP on Iris (seed 0)")
    print(
        f"Accuracy: mean {metrics['test_accuracy']:.4f} (min {min(accuracies):.4f}, max {max(accuracies):.4f}) "
        f"over {len(accuracies)} seed(s); median fit {metrics['fit_seconds_median']:.2f}s -> {config.out}/metrics.json"
    )
    return metrics


def main(argv: list[str] | None = None) -> dict:
    """Flags -> Config -> run."""
    parser = flags.parser(__doc__, Config())
    return flags.execute(parser, run, flags.config(parser, Config, parser.parse_args(argv)))


if __name__ == "__main__":
    flags.setup_logging()
    main()
