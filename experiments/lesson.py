"""The whole lesson, end to end, on data that is there offline, into one report.

    python experiments/lesson.py --out runs/lesson            # every section with the lesson's settings
    python experiments/lesson.py --quick --out runs/quick     # the same on tiny settings, about a minute
    python experiments/lesson.py --keras-python /tmp/keras-ref/bin/python   # and the lesson's Keras code beside it

Each section runs as its own process (a crash in one cannot take the others down) and writes into
`OUT/<section>/`; `OUT/report.md` is rewritten after every section, so an interrupted run keeps what finished.
The exit status is non-zero when any section failed.
"""

import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from experiments import (  # noqa: E402
    augmentation,
    cnn_mnist,
    distributed,
    flags,
    keras_reference,
    mlp_iris,
    rnn_sequences,
)


@dataclasses.dataclass(frozen=True)
class Section:
    """One lesson section: the configs of the script that ports it (full and quick), and what the report says."""

    key: str
    title: str
    full: Any
    quick: Any
    keras: str
    jax: str
    figures: tuple[str, ...]
    keras_result: str = ""
    env: tuple[tuple[str, str], ...] = ()


SECTIONS = (
    Section(
        key="mlp_iris",
        title="1.1 A dense network on Iris",
        full=mlp_iris.Config(seeds=5),
        quick=mlp_iris.Config.quick(),
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
        full=cnn_mnist.Config(),
        quick=cnn_mnist.Config.quick(),
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
        full=rnn_sequences.LessonConfig(),
        quick=rnn_sequences.LessonConfig.quick(),
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
        full=rnn_sequences.RowsConfig(),
        quick=rnn_sequences.RowsConfig.quick(),
        keras="SimpleRNN(128, activation='relu') over 28 steps of 28 pixels; Keras's Masking layer skips padded steps",
        jax="x = {'x': padded_rows, 'seq_lengths': lengths}   # nn.RNN(nn.SimpleCell(128), ...)(x, seq_lengths)\n"
        "state, history = training.fit(state, x, y, epochs=10, batch_size=32, validation_split=0.1)",
        figures=("dataset", "test_accuracy", "train_samples_per_second", "masking"),
    ),
    Section(
        key="augmentation",
        title="3.1 Data augmentation",
        full=augmentation.Config(),
        quick=augmentation.Config.quick(),
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
        full=distributed.Config(),
        quick=distributed.Config.quick(),
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


def script(config: Any) -> str:
    """The script whose config `config` is, relative to the repository root."""
    return str(Path(sys.modules[type(config).__module__].__file__).resolve().relative_to(ROOT))


def run_section(section: Section, out: Path, quick: bool) -> dict:
    """Run one section's script in a process of its own into `out/<key>`, echoing and logging its output.

    Returns its status, seconds, command and metrics. Ctrl-C reaches the section's process too: it writes what
    finished and exits 130, which this waits for.
    """
    folder = out / section.key
    folder.mkdir(parents=True, exist_ok=True)
    config = dataclasses.replace(section.quick if quick else section.full, out=str(folder))
    argv = [sys.executable, script(config), *flags.to_argv(config)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)}
    if not _has_accelerator():
        env.update(section.env)
    print(f"\n=== {section.title}\n$ {' '.join(argv[1:])}", flush=True)
    start = time.perf_counter()
    tail, interrupted = [], False
    with open(folder / "log.txt", "w") as log:
        process = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        while True:
            try:
                for line in process.stdout:
                    sys.stdout.write(line)
                    log.write(line)
                    tail = (tail + [line.rstrip()])[-15:]
                break
            except KeyboardInterrupt:
                interrupted = True
        code = process.wait()
    seconds = time.perf_counter() - start
    interrupted = interrupted or code == flags.INTERRUPTED_EXIT_CODE
    metrics_path = folder / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if (code == 0 or interrupted) and metrics_path.exists() else {}
    return {
        "ok": code == 0,
        "interrupted": interrupted,
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


def _status(result: dict, emphasis: str = "") -> str:
    """'ok', or 'FAILED' / 'interrupted' (within `emphasis`, e.g. '**')."""
    if result["ok"]:
        return "ok"
    return f"{emphasis}{'interrupted' if result['interrupted'] else 'FAILED'}{emphasis}"


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
            lines.append(f"| [{section.title}](#{section.key}) | {_status(r, '**')} | {r['seconds']:.1f} |")
    for section in SECTIONS:
        if section.key not in results:
            continue
        r = results[section.key]
        lines += [
            "",
            f'<a id="{section.key}"></a>',
            f"## {section.title}",
            "",
            f"`{r['command']}` ({r['seconds']:.1f} s, {_status(r)})",
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


@dataclasses.dataclass(frozen=True)
class Config(flags.Config):
    """Which sections to run, on which settings, and whether beside the lesson's Keras code."""

    FLAGS = {
        "quick": flags.Flag("tiny settings: every section in about a minute", None),
        "keras_python": flags.Flag("a Python with TensorFlow, to run the lesson's Keras code too"),
        "only": flags.Flag("run just these sections", choices=tuple(s.key for s in SECTIONS), nargs="+"),
        "out": flags.Flag("folder for report.md and a folder per section"),
    }

    out: str = "runs/lesson"
    quick: bool = False
    keras_python: str | None = None
    only: tuple[str, ...] | None = None


def run(config: Config) -> dict:
    """Run the sections one after another, rewriting `out/report.md` after each; their results by key.

    Stops after a section that Ctrl-C interrupted (`"interrupted": true` then), keeping the report of what ran.
    """
    out = Path(config.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    results, keras = {}, None
    for section in SECTIONS:
        if config.only and section.key not in config.only:
            continue
        results[section.key] = run_section(section, out, config.quick)
        write_report(out, results, keras, config.quick)
        if results[section.key]["interrupted"]:
            return {"sections": results, "interrupted": True}
    if config.keras_python:
        keras = keras_reference.run(
            config.keras_python, cnn_epochs=1 if config.quick else 5, seeds=1 if config.quick else 5
        )
        write_report(out, results, keras, config.quick)
    failed = [key for key, r in results.items() if not r["ok"]]
    print(
        f"\nreport: {out / 'report.md'} ({time.perf_counter() - start:.0f} s; "
        f"{len(results) - len(failed)} sections ok" + (f", FAILED: {', '.join(failed)})" if failed else ")")
    )
    return {"sections": results}


def main(argv: list[str] | None = None) -> int:
    """Flags -> Config -> run; the exit status is 1 when a section failed (130 when interrupted)."""
    parser = flags.parser(__doc__, Config())
    results = flags.execute(parser, run, flags.config(parser, Config, parser.parse_args(argv)))
    return 1 if any(not r["ok"] for r in results["sections"].values()) else 0


if __name__ == "__main__":
    flags.setup_logging()
    sys.exit(main())
