"""The whole lesson, end to end, on data that is there offline, into one report.

    python experiments/lesson.py --out runs/lesson            # every section with the lesson's settings
    python experiments/lesson.py --quick --out runs/quick     # the same on tiny settings, about a minute
    python experiments/lesson.py --keras-python /tmp/keras-ref/bin/python   # and the lesson's Keras code beside it

Each section runs as its own process (a crash in one cannot take the others down) and writes into
`OUT/<section>/`; `OUT/report.md` and `OUT/report.html` (the same report as one self-contained page, plots
inline) are rewritten after every section, so an interrupted run keeps what finished. Each section's report
shows its model's `summary.summary` table beside Keras's `model.summary()` total. The exit status is non-zero
when any section failed.
"""

import base64
import dataclasses
import functools
import html
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

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
from experiments import streaming as streaming_experiment  # noqa: E402
from flaxlesson import models, summary  # noqa: E402


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
    model: Callable[[Any], tuple[Any, Any]] | None = None
    keras_params: int | None = None


def _rnn(config: Any, num_classes: int, steps: int, features: int) -> tuple[models.SimpleRNNClassifier, np.ndarray]:
    """The section's SimpleRNN classifier and a sample of its input shape (batch, steps[, features])."""
    model = models.SimpleRNNClassifier(
        units=config.units, num_classes=num_classes, activation=rnn_sequences.ACTIVATIONS[config.activation]
    )
    return model, np.zeros((1, steps, features) if features > 1 else (1, steps), np.float32)


SECTIONS = (
    Section(
        key="mlp_iris",
        title="1.1 A dense network on Iris",
        full=mlp_iris.Config(seeds=5, steps_per_execution="epoch"),
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
        model=lambda config: (models.MLP(num_classes=3), np.zeros((1, 4), np.float32)),
        keras_params=193,
    ),
    Section(
        key="cnn_mnist",
        title="2.1 A convolutional network on MNIST-style images",
        full=cnn_mnist.Config(steps_per_execution=64),
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
        model=lambda config: (
            models.CNN(num_classes=10, dtype=cnn_mnist.DTYPES[config.dtype]),
            np.zeros((1, 28, 28, 1), np.float32),
        ),
        keras_params=225_034,
    ),
    Section(
        key="rnn_lesson",
        title="2.2 A SimpleRNN on padded sequences (the lesson's toy)",
        full=rnn_sequences.LessonConfig(steps_per_execution="epoch"),
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
        model=lambda config: _rnn(config, num_classes=1, steps=5, features=1),
        keras_params=2_651,
    ),
    Section(
        key="rnn_rows",
        title="2.2 (further) Images read row by row: a real sequence task, and masking",
        full=rnn_sequences.RowsConfig(steps_per_execution=64),
        quick=rnn_sequences.RowsConfig.quick(),
        keras="SimpleRNN(128, activation='relu') over 28 steps of 28 pixels; Keras's Masking layer skips padded steps",
        jax="x = {'x': padded_rows, 'seq_lengths': lengths}   # nn.RNN(nn.SimpleCell(128), ...)(x, seq_lengths)\n"
        "state, history = training.fit(state, x, y, epochs=10, batch_size=32, validation_split=0.1)",
        figures=("dataset", "test_accuracy", "train_samples_per_second", "masking"),
        model=lambda config: _rnn(config, num_classes=10, steps=28, features=28),
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
        full=distributed.Config(steps_per_execution="epoch"),
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
        model=lambda config: (
            distributed.lesson_model(config.classes),
            np.zeros((1, config.features), np.float32),
        ),
        keras_params=55_050,
    ),
    Section(
        key="streaming",
        title="3 (further) Datasets larger than memory: the CNN streamed from ArrayRecord shards",
        full=streaming_experiment.Config(),
        quick=streaming_experiment.Config.quick(),
        keras="# Keras streams what does not fit in memory through tf.data:\n"
        "dataset = tf.data.TFRecordDataset(files).map(parse).shuffle(10_000).batch(64).prefetch(AUTOTUNE)\n"
        "model.fit(dataset, epochs=5)",
        jax="shards.write_arrays(folder, images_uint8, labels)          # ArrayRecord shards + metadata.json\n"
        "dataset = streaming.StreamingDataset(folder)                # read by grain as it trains\n"
        "state, history = training.fit(state, dataset, epochs=5, batch_size=64)",
        figures=(
            "num_examples",
            "dataset_bytes",
            "peak_rss_bytes",
            "samples_per_second",
            "in_memory_samples_per_second",
            "relative_speed",
            "test_accuracy",
            "in_memory_test_accuracy",
        ),
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
    if section.env and not _has_accelerator():
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
    interrupted = interrupted or code in (flags.INTERRUPTED_EXIT_CODE, flags.TERMINATED_EXIT_CODE)
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
        "summary": model_summary(section, config),
    }


def model_summary(section: Section, config: Any) -> dict | None:
    """The section's model as `summary.summary` tabulates it (JSON-ready), or None for a section without one."""
    if section.model is None:
        return None
    return summary.summary(*section.model(config)).as_dict()


@functools.cache
def _has_accelerator() -> bool:
    """Whether JAX sees a GPU/TPU (asked once, of a fresh process); on a CPU the distributed section gets 8 devices."""
    probe = subprocess.run(
        [sys.executable, "-c", "import jax; print(jax.default_backend())"], capture_output=True, text=True
    )
    return probe.stdout.strip() not in ("cpu", "")


def _figure(value) -> str:
    if isinstance(value, float):
        return f"{value:,.4g}" if abs(value) < 1000 else f"{value:,.0f}"
    return json.dumps(value)


def _figure_rows(metrics: dict, keys: tuple[str, ...]) -> list[tuple[str, str]]:
    """(figure, value) rows of the chosen figures; a dict gives a row per entry (`masking.with...`), curves left out."""
    rows = []
    for key in keys:
        if key not in metrics:
            continue
        value = metrics[key]
        if isinstance(value, dict):
            inner = {f"{key}.{k}": v for k, v in value.items() if k != "history"}
            rows += _figure_rows(inner, tuple(inner))
        else:
            rows.append((key, _figure(value)))
    return rows


def _status(result: dict, emphasis: str = "") -> str:
    """'ok', or 'FAILED' / 'interrupted' (within `emphasis`, e.g. '**')."""
    if result["ok"]:
        return "ok"
    return f"{emphasis}{'interrupted' if result['interrupted'] else 'FAILED'}{emphasis}"


def _summary_blocks(section: Section, model: dict | None) -> list[tuple]:
    """The model's summary table, and its total beside Keras's `model.summary()` total for the lesson's model."""
    if model is None:
        return []
    total = model["total_params"]
    if section.keras_params is None:
        said = f"{total:,} params (the lesson has no Keras model for this section)."
    else:
        same = "the same" if total == section.keras_params else "another count: these settings differ from the lesson's"
        said = f"{total:,} params; Keras's `model.summary()` of the lesson's model: {section.keras_params:,} ({same})."
    rows = [(f"{r['name']} ({r['type']})", r["output_shape"], f"{r['params']:,}") for r in model["rows"]]
    return [
        ("p", f"Model `{model['model']}` as `summary.summary` tabulates it: {said}"),
        ("table", ("layer (type)", "output shape", "params"), rows + [("**total**", "", f"**{total:,}**")]),
    ]


def report_blocks(results: dict[str, dict], keras: keras_reference.KerasRun | None, quick: bool) -> list[tuple]:
    """The report as blocks, which render as Markdown and as HTML.

    Blocks: ('h1'|'h2', text, anchor), ('p', text), ('code', text, language), ('table', header, rows), ('image',
    name, path relative to the report). Texts use Markdown's inline forms (`code`, **bold**, [link](#anchor)).
    """
    blocks: list[tuple] = [
        ("h1", "The lesson, run end to end" + (" (quick settings)" if quick else ""), None),
        (
            "p",
            "Each section: the Keras code it replaces, the JAX/Flax code that replaced it, its model, its figures "
            "and plots. Figures come from each section's `metrics.json`; the command re-runs that section alone.",
        ),
    ]
    ran = [section for section in SECTIONS if section.key in results]
    blocks.append(
        (
            "table",
            ("section", "status", "seconds"),
            [
                (f"[{s.title}](#{s.key})", _status(results[s.key], "**"), f"{results[s.key]['seconds']:.1f}")
                for s in ran
            ],
        )
    )
    for section in ran:
        r = results[section.key]
        blocks += [
            ("h2", section.title, section.key),
            ("p", f"`{r['command']}` ({r['seconds']:.1f} s, {_status(r)})"),
            ("p", "Keras:"),
            ("code", section.keras, "python"),
            ("p", "JAX/Flax:"),
            ("code", section.jax, "python"),
        ]
        if not r["ok"]:
            blocks += [("p", "**This section failed.** The end of its output:"), ("code", r["error"], "")]
        blocks += _summary_blocks(section, r.get("summary"))
        figures = _figure_rows(r["metrics"], section.figures)
        if figures:
            blocks.append(("table", ("figure", "value"), figures))
        if keras is not None and section.keras_result in keras.lines:
            blocks += [
                ("p", "Keras reference, same machine, same sitting:"),
                ("code", keras.lines[section.keras_result], ""),
            ]
        blocks += [("image", name, f"{section.key}/{name}") for name in r["plots"]]
    if keras is not None and keras.errors:
        blocks += [("h2", "Keras reference errors", None), ("code", keras.errors, "")]
    return blocks


def _markdown_table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def render_markdown(blocks: list[tuple]) -> str:
    """The report's blocks as Markdown."""
    parts = []
    for kind, *rest in blocks:
        if kind in ("h1", "h2"):
            text, anchor = rest
            heading = ("# " if kind == "h1" else "## ") + text
            parts.append(f'<a id="{anchor}"></a>\n{heading}' if anchor else heading)
        elif kind == "p":
            parts.append(rest[0])
        elif kind == "code":
            text, language = rest
            parts.append(f"```{language}\n{text}\n```")
        elif kind == "table":
            parts.append(_markdown_table(*rest))
        elif kind == "image":
            parts.append(f"![{rest[0]}]({rest[1]})")
    return "\n\n".join(parts) + "\n"


_LINK = re.compile(r"\[([^\]]+)\]\(([^)\s]+)\)")
_BOLD = re.compile(r"\*\*(.+?)\*\*")

_STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222; }
pre { background: #f5f5f5; padding: 0.8em; overflow-x: auto; border-radius: 4px; }
code { font-family: ui-monospace, monospace; font-size: 0.9em; }
table { border-collapse: collapse; margin: 0.8em 0; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.7em; text-align: left; }
th { background: #eee; }
img { max-width: 100%; border: 1px solid #ddd; }
figure { margin: 1em 0; }
figcaption { color: #666; font-size: 0.85em; }
"""


def _inline_html(text: str) -> str:
    """Markdown's inline forms used in the report (`code`, **bold**, [text](#anchor)) as HTML, the rest escaped."""
    parts = text.split("`")
    for i, part in enumerate(parts):
        part = html.escape(part)
        if i % 2:
            parts[i] = f"<code>{part}</code>"
        else:
            parts[i] = _LINK.sub(r'<a href="\2">\1</a>', _BOLD.sub(r"<strong>\1</strong>", part))
    return "".join(parts)


def render_html(blocks: list[tuple], folder: Path) -> str:
    """The report's blocks as one self-contained HTML page: the plots (read from `folder`) inline as base64 PNGs."""
    title = next(rest[0] for kind, *rest in blocks if kind == "h1")
    body = []
    for kind, *rest in blocks:
        if kind in ("h1", "h2"):
            text, anchor = rest
            attribute = f' id="{anchor}"' if anchor else ""
            body.append(f"<{kind}{attribute}>{html.escape(text)}</{kind}>")
        elif kind == "p":
            body.append(f"<p>{_inline_html(rest[0])}</p>")
        elif kind == "code":
            body.append(f"<pre><code>{html.escape(rest[0])}</code></pre>")
        elif kind == "table":
            header, rows = rest
            head = "".join(f"<th>{_inline_html(cell)}</th>" for cell in header)
            cells = ["".join(f"<td>{_inline_html(cell)}</td>" for cell in row) for row in rows]
            body.append(f"<table><tr>{head}</tr>" + "".join(f"<tr>{row}</tr>" for row in cells) + "</table>")
        elif kind == "image":
            name, relative = rest
            path = folder / relative
            if path.exists():
                data = base64.b64encode(path.read_bytes()).decode("ascii")
                body.append(
                    f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(name)}">'
                    f"<figcaption>{html.escape(relative)}</figcaption></figure>"
                )
    return (
        f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{html.escape(title)}</title>\n'
        f"<style>{_STYLE}</style>\n</head>\n<body>\n" + "\n".join(body) + "\n</body>\n</html>\n"
    )


def _write(path: Path, text: str) -> None:
    """Replace `path` with `text` at once, so a reader never sees half a report."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def write_report(out: Path, results: dict[str, dict], keras: keras_reference.KerasRun | None, quick: bool) -> Path:
    """`out/report.md` and `out/report.html`, the same report; returns the Markdown one's path.

    Per section: the Keras call, its JAX/Flax replacement, the model's summary, figures, plots and seconds.
    """
    blocks = report_blocks(results, keras, quick)
    _write(out / "report.md", render_markdown(blocks))
    _write(out / "report.html", render_html(blocks, out))
    return out / "report.md"


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
