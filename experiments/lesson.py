"""The whole lesson, end to end, on data that is there offline, into one report.

    python experiments/lesson.py --out runs/lesson            # every section with the lesson's settings
    python experiments/lesson.py --quick --out runs/quick     # the same on tiny settings, about a minute
    python experiments/lesson.py --keras-python /tmp/keras-ref/bin/python   # and the lesson's Keras code beside it

Each section runs as its own process (a crash in one cannot take the others down) and writes into
`OUT/<section>/`; `OUT/report.md` and `OUT/report.html` (the same report as one self-contained page, plots
inline) are rewritten after every section, so an interrupted run keeps what finished. Each section's report
shows the lesson's Keras code and the same program in plain JAX, both read from the section's notebook in
`lesson/` (the place to start reading), its model's `summary.summary` table beside Keras's `model.summary()`
total, and its figures. The exit status is non-zero when any section failed.
"""

import dataclasses
import functools
import json
import os
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
    report,
    rnn_sequences,
)
from experiments import streaming as streaming_experiment  # noqa: E402
from flaxlesson import models, summary  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Section:
    """One lesson section: the configs of the script that ports it (full and quick), and what the report says.

    `notebook` is the section's notebook source (lesson/*.py), whose Keras block and plain JAX cells the report
    shows; `note` says what the section runs where the lesson has no code of its own for it. `keras_cited` is the
    figure the lesson's own Keras code gave when measured once (`KERAS_MACHINE`), shown unless Keras runs beside.
    """

    key: str
    title: str
    full: Any
    quick: Any
    figures: tuple[str, ...]
    notebook: str | None = None
    note: str = ""
    keras_cited: str = ""
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
        notebook="lesson/1_1_mlp.py",
        keras_cited="Keras: test accuracy 0.80 to 0.87 over 5 seeds (mean 0.827), 2.1 s per fit (`keras_rest.py mlp`).",
        title="1.1 A dense network on Iris",
        full=mlp_iris.Config(seeds=5, steps_per_execution="epoch"),
        quick=mlp_iris.Config.quick(),
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
        notebook="lesson/2_1_cnn.py",
        keras_cited="Keras, on the full Fashion-MNIST: test accuracy 0.897 after 5 epochs of batch 64, "
        "about 10,700 training samples/s (`keras_cnn.py`).",
        title="2.1 A convolutional network on MNIST-style images",
        full=cnn_mnist.Config(steps_per_execution=64),
        quick=cnn_mnist.Config.quick(),
        figures=("dataset", "dataset_source", "test_accuracy", "train_samples_per_second", "compile_seconds"),
        keras_result="cnn",
        model=lambda config: (
            models.CNN(num_classes=10, dtype=cnn_mnist.DTYPES[config.dtype]),
            np.zeros((1, 28, 28, 1), np.float32),
        ),
        keras_params=225_034,
    ),
    Section(
        key="rnn_lesson",
        notebook="lesson/2_2_rnn.py",
        title="2.2 A SimpleRNN on padded sequences (the lesson's toy)",
        full=rnn_sequences.LessonConfig(steps_per_execution="epoch"),
        quick=rnn_sequences.LessonConfig.quick(),
        figures=("padded_x", "predictions", "train_accuracy", "train_seconds"),
        keras_result="rnn",
        model=lambda config: _rnn(config, num_classes=1, steps=5, features=1),
        keras_params=2_651,
    ),
    Section(
        key="rnn_rows",
        note="The lesson has no such example: a SimpleRNN(128, relu) reads each image as 28 steps of 28 pixels, "
        "with `seq_lengths` (Flax's form of Keras's Masking layer) against padding; see "
        "`experiments/rnn_sequences.py --task rows`, and the 2.2 notebook for `nn.RNN(nn.SimpleCell)` itself.",
        title="2.2 (further) Images read row by row: a real sequence task, and masking",
        full=rnn_sequences.RowsConfig(steps_per_execution=64),
        quick=rnn_sequences.RowsConfig.quick(),
        figures=("dataset", "dataset_source", "test_accuracy", "train_samples_per_second", "masking"),
        model=lambda config: _rnn(config, num_classes=10, steps=28, features=28),
    ),
    Section(
        key="augmentation",
        notebook="lesson/3_1_augmentation.py",
        keras_cited="Keras's ImageDataGenerator, the lesson's options, 28x28x1, batch 256: 15,400 images/s "
        "(`keras_rest.py aug`).",
        title="3.1 Data augmentation",
        full=augmentation.Config(),
        quick=augmentation.Config.quick(),
        figures=("dataset", "images_per_second"),
        keras_result="aug",
    ),
    Section(
        key="distributed",
        note="On a CPU the 8 devices are virtual: they share this machine's cores, so the sharded step is slower "
        "than the one-device step here; the point is that both give the same parameters.",
        notebook="lesson/3_2_distributed.py",
        title="3.2 Distributed training: data parallel over every device",
        full=distributed.Config(steps_per_execution="epoch"),
        quick=distributed.Config.quick(),
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
        note="The lesson's part 3 has no code of its own for data larger than memory. The streamed CNN trains on "
        "augmented copies of the training set (`--copies`), so its test accuracy is below the in-memory CNN's, "
        "which trains on the images as they are.",
        notebook="lesson/3_large_datasets.py",
        title="3 (further) Datasets larger than memory: the CNN streamed from ArrayRecord shards",
        full=streaming_experiment.Config(),
        quick=streaming_experiment.Config.quick(),
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


KERAS_MACHINE = (
    "the lesson's own Keras code, measured once on a 2-core AMD EPYC (AVX-512) with 24 GiB, TensorFlow 2.21 "
    "(the project's Keras `reference` folder)"
)


def _cells(source: str) -> list[tuple[str, str]]:
    """A jupytext percent script's cells as (kind, text): 'markdown' text with its '# ' prefixes removed, or 'code'."""
    cells = []
    for chunk in source.split("\n# %%")[1:]:
        marker, _, body = chunk.partition("\n")
        if marker.strip() == "[markdown]":
            cells.append(
                ("markdown", "\n".join(line[2:] if line.startswith("# ") else "" for line in body.split("\n")))
            )
        else:
            cells.append(("code", body.strip()))
    return cells


def notebook_excerpts(notebook: str) -> tuple[str, str]:
    """The lesson's Keras code ('' where it has none) and the plain JAX program of a notebook source.

    The plain program is the code cells from the first '## ' heading to '## The same in flaxlesson'.
    """
    cells = _cells((ROOT / notebook).read_text())
    keras, plain, after_keras = "", [], False
    for kind, text in cells:
        if kind == "markdown" and text.lstrip().startswith("## The lesson's Keras code"):
            keras, after_keras = text.split("```python\n", 1)[1].split("```", 1)[0].rstrip(), True
        elif kind == "markdown" and text.lstrip().startswith("## The same in flaxlesson"):
            break
        elif kind == "markdown" and text.lstrip().startswith("## "):
            after_keras = True
        elif kind == "code" and after_keras:
            plain.append(text)
    return keras, "\n\n".join(plain)


def _figure(value) -> str:
    if value is None:
        return "—"
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
    """The report as `report` blocks, which render as Markdown and as HTML."""
    blocks: list[tuple] = [
        ("h1", "The lesson, run end to end" + (" (quick settings)" if quick else ""), None),
        (
            "p",
            "Start with the notebooks in `lesson/` (one per section, README's first screen): each shows the lesson's "
            "Keras code, the same program in plain JAX with its output, the same in flaxlesson, and a check that both "
            "give the same parameters. This report runs each section's script: the Keras code, the plain JAX from "
            "the notebook, its model, its figures and plots. Figures come from each section's `metrics.json`; the "
            "command re-runs that section alone.",
        ),
    ]
    if quick:
        blocks.append(("p", "**Quick settings**: tiny data and few epochs, so no figure here compares with Keras's."))
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
        blocks += [("h2", section.title, section.key), ("p", f"`{r['command']}` ({r['seconds']:.1f} s, {_status(r)})")]
        if section.note:
            blocks.append(("p", section.note))
        if section.notebook:
            keras_code, plain = notebook_excerpts(section.notebook)
            notebook = section.notebook.removesuffix(".py") + ".ipynb"
            if keras_code:
                blocks += [("p", "The lesson's Keras code:"), ("code", keras_code, "python")]
            blocks += [("p", f"The same in plain JAX (from `{notebook}`, which runs it):"), ("code", plain, "python")]
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
        elif section.keras_cited:
            said = " These quick settings do not compare with it." if quick else ""
            blocks.append(("p", f"{section.keras_cited} That is {KERAS_MACHINE}.{said}"))
        blocks += [("image", name, f"{section.key}/{name}") for name in r["plots"]]
    if keras is not None and keras.errors:
        blocks += [("h2", "Keras reference errors", None), ("code", keras.errors, "")]
    return blocks


def write_report(out: Path, results: dict[str, dict], keras: keras_reference.KerasRun | None, quick: bool) -> Path:
    """`out/report.md` and `out/report.html`, the same report; returns the Markdown one's path.

    Per section: the Keras code, the plain JAX of its notebook, the model's summary, figures, plots and seconds.
    """
    blocks = report_blocks(results, keras, quick)
    report.write_atomically(out / "report.md", report.render_markdown(blocks))
    report.write_atomically(out / "report.html", report.render_html(blocks, out))
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
        if results[section.key]["interrupted"] or flags.stop_requested():  # e.g. SIGTERM to this process alone
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
