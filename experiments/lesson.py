"""The whole lesson, end to end, on data that is there offline, into one report.

    python experiments/lesson.py --out runs/lesson            # every section with the lesson's settings
    python experiments/lesson.py --quick --out runs/quick     # the same on tiny settings, about a minute
    python experiments/lesson.py --keras-python /tmp/keras-ref/bin/python   # and the lesson's Keras code beside it

Each section runs as its own process (a crash in one cannot take the others down) and writes into
`OUT/<section>/`; `OUT/report.md` is rewritten after every section, so an interrupted run keeps what finished.
The exit status is non-zero when any section failed.
"""

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from experiments import keras_reference  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Section:
    """One lesson section: the script that ports it, and what the report says about it."""

    key: str
    title: str
    script: str
    args: tuple[str, ...]
    quick: tuple[str, ...]
    keras: str
    jax: str
    figures: tuple[str, ...]
    keras_result: str = ""
    env: tuple[tuple[str, str], ...] = ()


SECTIONS = (
    Section(
        key="mlp_iris",
        title="1.1 A dense network on Iris",
        script="mlp_iris.py",
        args=("--seeds", "5"),
        quick=("--seeds", "1", "--epochs", "3"),
        keras="model = Sequential([Dense(10, activation='relu'), Dense(10, activation='relu'),\n"
        "                    Dense(3, activation='softmax')])\n"
        "model.compile(optimizer='adam', loss='sparse_categorical_crossentropy', metrics=['accuracy'])\n"
        "model.fit(X_train, y_train, epochs=30, batch_size=10, validation_split=0.2)",
        jax="state = training.create_train_state(models.MLP(num_classes=3), x_train[:1], seed=seed)\n"
        "state, history = training.fit(state, x_train, y_train, epochs=30, batch_size=10,\n"
        "                              validation_split=0.2, seed=seed)\n"
        "y_pred = training.predict(state, x_test).argmax(axis=1)",
        figures=(
            "test_accuracy",
            "test_accuracy_min",
            "test_accuracy_max",
            "fit_seconds_median",
            "train_samples_per_second",
        ),
        keras_result="mlp",
    ),
    Section(
        key="cnn_mnist",
        title="2.1 A convolutional network on MNIST-style images",
        script="cnn_mnist.py",
        args=(),
        quick=("--epochs", "1", "--limit", "2000"),
        keras="model = Sequential([Conv2D(32, (3, 3), activation='relu'), MaxPooling2D((2, 2)),\n"
        "                    Conv2D(64, (3, 3), activation='relu'), MaxPooling2D((2, 2)),\n"
        "                    Flatten(), Dense(128, activation='relu'), Dense(10, activation='softmax')])\n"
        "model.fit(X_train, y_train, epochs=5, batch_size=64, validation_split=0.1)\n"
        "loss, accuracy = model.evaluate(X_test, y_test)",
        jax="images = data.load_images('auto')\n"
        "state = training.create_train_state(models.CNN(), images.x_train[:1])\n"
        "state, history = training.fit(state, images.x_train, images.y_train, epochs=5, batch_size=64,\n"
        "                              validation_split=0.1)\n"
        "result = training.evaluate(state, images.x_test, images.y_test)",
        figures=("dataset", "test_accuracy", "train_samples_per_second", "compile_seconds"),
        keras_result="cnn",
    ),
    Section(
        key="rnn_lesson",
        title="2.2 A SimpleRNN on padded sequences (the lesson's toy)",
        script="rnn_sequences.py",
        args=("--task", "lesson"),
        quick=("--task", "lesson"),
        keras="X = pad_sequences(X, padding='post', maxlen=5)\n"
        "model = Sequential([SimpleRNN(50, activation='relu'), Dense(1, activation='sigmoid')])\n"
        "model.compile(optimizer='adam', loss='binary_crossentropy', metrics=['accuracy'])\n"
        "model.fit(X, y, epochs=10, batch_size=1)",
        jax="x = data.pad_sequences(X, padding='post', maxlen=5)\n"
        "state = training.create_train_state(models.SimpleRNNClassifier(50, num_classes=1), x[:1],\n"
        "                                    loss='binary_crossentropy')\n"
        "state, history = training.fit(state, x, y, epochs=10, batch_size=1)",
        figures=("padded_x", "predictions", "train_accuracy", "train_seconds"),
        keras_result="rnn",
    ),
    Section(
        key="rnn_rows",
        title="2.2 (further) Images read row by row: a real sequence task, and masking",
        script="rnn_sequences.py",
        args=("--task", "rows"),
        quick=("--task", "rows", "--epochs", "1", "--masking-epochs", "1", "--limit", "2000"),
        keras="SimpleRNN(128, activation='relu') over 28 steps of 28 pixels; Keras's Masking layer skips padded steps",
        jax="x = {'x': padded_rows, 'seq_lengths': lengths}   # nn.RNN(nn.SimpleCell(128), ...)(x, seq_lengths)\n"
        "state, history = training.fit(state, x, y, epochs=10, batch_size=32, validation_split=0.1)",
        figures=("dataset", "test_accuracy", "train_samples_per_second", "masking"),
    ),
    Section(
        key="augmentation",
        title="3.1 Data augmentation",
        script="augmentation.py",
        args=(),
        quick=(),
        keras="datagen = ImageDataGenerator(rotation_range=20, width_shift_range=0.2, height_shift_range=0.2,\n"
        "                             shear_range=0.2, zoom_range=0.2, horizontal_flip=True,\n"
        "                             fill_mode='nearest')\n"
        "batch = next(datagen.flow(x, batch_size=1))",
        jax="config = augment.ImageDataGenerator(rotation_range=20, width_shift_range=0.2, height_shift_range=0.2,\n"
        "                                    shear_range=0.2, zoom_range=0.2, horizontal_flip=True,\n"
        "                                    fill_mode='nearest')\n"
        "batch = jax.jit(augment.augment, static_argnums=2)(key, images, config)   # on the device",
        figures=("dataset", "images_per_second"),
        keras_result="aug",
    ),
    Section(
        key="distributed",
        title="3.2 Distributed training: data parallel over every device",
        script="distributed.py",
        args=("--strategy", "sharded"),
        quick=("--strategy", "sharded", "--epochs", "1"),
        keras="strategy = tf.distribute.MirroredStrategy()\nwith strategy.scope():\n"
        "    model = Sequential([Dense(64, activation='relu'), Dense(64, activation='relu'),\n"
        "                        Dense(10, activation='softmax')])\n"
        "model.fit(X, y, epochs=5, batch_size=32)",
        jax="state, history = training.fit(state, x, y, epochs=5, batch_size=32, strategy='sharded')\n"
        "# a 1-D Mesh over every device: params replicated, each batch split on its leading axis",
        figures=(
            "strategy",
            "num_devices",
            "num_processes",
            "step_seconds",
            "single_device_step_seconds",
            "max_abs_param_diff",
        ),
        keras_result="dist",
        env=(("XLA_FLAGS", "--xla_force_host_platform_device_count=8"),),
    ),
)


def run_section(section: Section, out: Path, quick: bool) -> dict:
    """Run one section's script into `out/<key>`, echoing and logging its output; its status and seconds."""
    folder = out / section.key
    folder.mkdir(parents=True, exist_ok=True)
    argv = [
        sys.executable,
        f"experiments/{section.script}",
        *(section.quick if quick else section.args),
        "--out",
        str(folder),
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)}
    if not _has_accelerator():
        env.update(section.env)
    print(f"\n=== {section.title}\n$ {' '.join(argv[1:])}", flush=True)
    start = time.perf_counter()
    with open(folder / "log.txt", "w") as log:
        process = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        tail = []
        for line in process.stdout:
            sys.stdout.write(line)
            log.write(line)
            tail = (tail + [line.rstrip()])[-15:]
        code = process.wait()
    seconds = time.perf_counter() - start
    metrics_path = folder / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if code == 0 and metrics_path.exists() else {}
    return {
        "ok": code == 0,
        "seconds": seconds,
        "command": " ".join(argv[1:]),
        "metrics": metrics,
        "error": "" if code == 0 else "\n".join(tail),
        "plots": sorted(p.name for p in folder.glob("*.png")),
    }


def _has_accelerator() -> bool:
    """Whether JAX sees a GPU/TPU; on a CPU-only machine the distributed section gets 8 virtual devices."""
    probe = subprocess.run(
        [sys.executable, "-c", "import jax; print(jax.default_backend())"], capture_output=True, text=True
    )
    return probe.stdout.strip() not in ("cpu", "")


def _figure(value) -> str:
    if isinstance(value, float):
        return f"{value:,.4g}" if abs(value) < 1000 else f"{value:,.0f}"
    return json.dumps(value)


def _figure_rows(metrics: dict, keys: tuple[str, ...]) -> list[str]:
    """Table rows for the chosen figures; a dict becomes one row per entry (`masking.with...`), curves left out."""
    rows = []
    for key in keys:
        if key not in metrics:
            continue
        value = metrics[key]
        if isinstance(value, dict):
            inner = {f"{key}.{k}": v for k, v in value.items() if k != "history"}
            rows += _figure_rows(inner, tuple(inner))
        else:
            rows.append(f"| {key} | {_figure(value)} |")
    return rows


def write_report(out: Path, results: dict[str, dict], keras: keras_reference.KerasRun | None, quick: bool) -> Path:
    """`out/report.md`: per section the Keras call, its JAX/Flax replacement, figures, plots and seconds."""
    lines = [
        "# The lesson, run end to end" + (" (quick settings)" if quick else ""),
        "",
        "Each section: the Keras code it replaces, the JAX/Flax code that replaced it, its figures and plots.",
        "Figures come from each section's `metrics.json`; the command re-runs that section alone.",
        "",
    ]
    lines += ["| section | status | seconds |", "| --- | --- | --- |"]
    for section in SECTIONS:
        if section.key in results:
            r = results[section.key]
            lines.append(
                f"| [{section.title}](#{section.key}) | {'ok' if r['ok'] else '**FAILED**'} | {r['seconds']:.1f} |"
            )
    for section in SECTIONS:
        if section.key not in results:
            continue
        r = results[section.key]
        lines += [
            "",
            f'<a id="{section.key}"></a>',
            f"## {section.title}",
            "",
            f"`{r['command']}` ({r['seconds']:.1f} s, {'ok' if r['ok'] else 'FAILED'})",
            "",
            "Keras:",
            "```python",
            section.keras,
            "```",
            "JAX/Flax:",
            "```python",
            section.jax,
            "```",
        ]
        if not r["ok"]:
            lines += ["**This section failed.** The end of its output:", "```", r["error"], "```"]
        figures = _figure_rows(r["metrics"], section.figures)
        if figures:
            lines += ["", "| figure | value |", "| --- | --- |"] + figures
        if keras is not None and section.keras_result in keras.lines:
            lines += [
                "",
                "Keras reference, same machine, same sitting:",
                "```",
                keras.lines[section.keras_result],
                "```",
            ]
        lines += [f"\n![{name}]({section.key}/{name})" for name in r["plots"]]
    if keras is not None and keras.errors:
        lines += ["", "## Keras reference errors", "```", keras.errors, "```"]
    path = out / "report.md"
    tmp = path.with_suffix(".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(path)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/lesson")
    parser.add_argument("--quick", action="store_true", help="tiny settings: every section in about a minute")
    parser.add_argument("--keras-python", help="a Python with TensorFlow, to run the lesson's Keras code too")
    parser.add_argument("--only", nargs="+", choices=[s.key for s in SECTIONS], help="run just these sections")
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    results, keras = {}, None
    for section in SECTIONS:
        if args.only and section.key not in args.only:
            continue
        results[section.key] = run_section(section, out, args.quick)
        write_report(out, results, keras, args.quick)
    if args.keras_python:
        keras = keras_reference.run(args.keras_python, cnn_epochs=1 if args.quick else 5, seeds=1 if args.quick else 5)
        write_report(out, results, keras, args.quick)
    failed = [key for key, r in results.items() if not r["ok"]]
    print(
        f"\nreport: {out / 'report.md'} ({time.perf_counter() - start:.0f} s; "
        f"{len(results) - len(failed)} sections ok" + (f", FAILED: {', '.join(failed)})" if failed else ")")
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
