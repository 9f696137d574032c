"""The experiments' command line: every flag declared once, checked as it is parsed, and turned into a config.

Each script holds a frozen config dataclass (a subclass of `Config`) whose fields are its flags, with the lesson's
settings as defaults; `run(config)` does the work and `main(argv)` is `parser` + `config` + `execute`. A config
checks its fields with the very functions that parse the flags, so `run(Config(epochs=0))` fails as
`--epochs 0` does, and every valid config can be written back as flags (`to_argv`), which is how the lesson runs
each section in a process of its own.
"""

import argparse
import dataclasses
import logging
import math
import os
import signal
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import jax

from flaxlesson import checkpoint, data, folders, interrupts, parallel, results, saving

INTERRUPTED_EXIT_CODE = 130  # what a shell reports for a process stopped by Ctrl-C (128 + SIGINT)
TERMINATED_EXIT_CODE = 143  # 128 + SIGTERM: a run stopped by SIGTERM (a preemption), its checkpoint saved


def _number(text: str, kind: type, wanted: str, ok: Callable[[Any], bool]) -> Any:
    try:
        value = kind(text)
    except ValueError:
        value = None
    if value is None or not ok(value):
        raise argparse.ArgumentTypeError(f"must be {wanted}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """An integer >= 1 (epochs, batch sizes, counts)."""
    return _number(text, int, "a positive integer", lambda v: v >= 1)


def non_negative_int(text: str) -> int:
    """An integer >= 0 (seeds, padding)."""
    return _number(text, int, "a non-negative integer", lambda v: v >= 0)


def int_in(low: int, high: int) -> Callable[[str], int]:
    """A parser of integers in [low, high]."""

    def parse(text: str) -> int:
        return _number(text, int, f"an integer in [{low}, {high}]", lambda v: low <= v <= high)

    return parse


def count_or_epoch(text: str) -> int | str:
    """A positive number of train steps, or 'epoch': Keras's steps_per_execution and save_freq."""
    return "epoch" if text == "epoch" else _number(text, int, "a positive integer or 'epoch'", lambda v: v >= 1)


def fraction(text: str) -> float:
    """A number in [0, 1): a share of the data held out."""
    return _number(text, float, "a number in [0, 1)", lambda v: 0 <= v < 1)


def positive_float(text: str) -> float:
    """A finite number > 0 (seconds)."""
    return _number(text, float, "a positive number", lambda v: math.isfinite(v) and v > 0)


@dataclasses.dataclass(frozen=True)
class Flag:
    """One flag: `type` turns its text into the value or raises ArgumentTypeError; None makes it a switch."""

    help: str
    type: Callable[[str], Any] | None = str
    choices: Sequence[str] | None = None
    nargs: str | None = None

    def add_to(self, parser: argparse.ArgumentParser, name: str, default: Any) -> None:
        """Declare `--name` on `parser` with `default`."""
        flag = "--" + name.replace("_", "-")
        if self.type is None:
            parser.add_argument(flag, action="store_true", default=default, help=self.help)
        else:
            parser.add_argument(
                flag, type=self.type, choices=self.choices, nargs=self.nargs, default=default, help=self.help
            )

    def check(self, value: Any) -> None:
        """Raise ArgumentTypeError unless `value` is what parsing this flag could give."""
        if self.type is None:
            if not isinstance(value, bool):
                raise argparse.ArgumentTypeError(f"must be True or False, got {value!r}")
            return
        for item in value if self.nargs else (value,):
            parsed = self.type(str(item))
            if parsed != item:
                raise argparse.ArgumentTypeError(f"must be {type(parsed).__name__}, got {item!r}")
            if self.choices is not None and item not in self.choices:
                raise argparse.ArgumentTypeError(f"must be one of {list(self.choices)}, got {item!r}")

    def argv(self, name: str, value: Any) -> list[str]:
        """The command-line words that give `value`."""
        flag = "--" + name.replace("_", "-")
        if self.type is None:
            return [flag] if value else []
        return [flag, *map(str, value if self.nargs else (value,))]


SHARED: dict[str, Flag] = {
    "dataset": Flag(
        "image source; auto takes TFDS mnist if prepared, else Debian's Fashion-MNIST, else digits",
        choices=data.IMAGE_DATASETS,
    ),
    "data_dir": Flag("folder of IDX files (idx), or TFDS's data dir (mnist, ...)"),
    "epochs": Flag("epochs to train, as Keras's fit(epochs=...)", positive_int),
    "batch_size": Flag("samples per training step", positive_int),
    "validation_split": Flag("fraction of the training data held out (the last, before shuffling)", fraction),
    "strategy": Flag("how the training step is placed on devices", choices=tuple(sorted(parallel.STRATEGIES))),
    "cpu_devices": Flag(
        "virtual CPU devices per process, to try a --strategy over several devices on a CPU", positive_int
    ),
    "limit": Flag("use only the first N training and N test images (quick runs)", positive_int),
    "seed": Flag("seeds the initialisation and the shuffling", non_negative_int),
    "checkpoint_dir": Flag("save the train state and data position here (every --save-freq steps), for --resume"),
    "resume": Flag("continue from the newest good checkpoint in --checkpoint-dir, mid-epoch included", None),
    "save_freq": Flag("train steps between checkpoints in --checkpoint-dir, or 'epoch'", count_or_epoch),
    "out": Flag("folder for metrics.json and the plots"),
    "save_model": Flag("save the trained model in this folder (saving.save_model; experiments/predict.py reads it)"),
    "steps_per_execution": Flag(
        "training steps per compiled call (lax.scan), or 'epoch'; the update is the same for every value",
        count_or_epoch,
    ),
}


class ConfigError(ValueError):
    """A setting that cannot work, named by its config field; the command line reports it as that flag's error."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field, self.message = field, message


class RunFailed(Exception):
    """A run that failed for a reason no flag names (its processes died): one `error:` line, exit status 1."""


class Config:
    """Base of the experiments' frozen config dataclasses: each field is the flag of that name.

    `FLAGS` holds the script's own flags and any shared flag it narrows; the rest come from `SHARED`. A field may
    be None only where its default is.
    """

    FLAGS: ClassVar[Mapping[str, Flag]] = {}

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if value is None and field.default is None:
                continue
            try:
                flag_of(type(self), field.name).check(value)
            except (argparse.ArgumentTypeError, TypeError, ValueError) as error:
                raise ConfigError(field.name, str(error)) from None
        if getattr(self, "resume", False) and getattr(self, "checkpoint_dir", None) is None:
            raise ConfigError("resume", "needs --checkpoint-dir")
        if getattr(self, "save_freq", "epoch") != "epoch" and getattr(self, "checkpoint_dir", None) is None:
            raise ConfigError("save_freq", "needs --checkpoint-dir")


def flag_of(config_type: type, name: str) -> Flag:
    """The flag behind a config field: the config's own, else the shared one."""
    return config_type.FLAGS.get(name) or SHARED[name]


def parser(doc: str, defaults: Config) -> argparse.ArgumentParser:
    """A parser of every field of `defaults` as a flag, with its value as the default; `doc`'s first line heads it."""
    result = argparse.ArgumentParser(
        description=doc.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    for field in dataclasses.fields(defaults):
        flag_of(type(defaults), field.name).add_to(result, field.name, getattr(defaults, field.name))
    return result


def error(parser: argparse.ArgumentParser, problem: ConfigError) -> None:
    """Exit with the usage and one `error:` line naming the flag (status 2), as argparse does for a bad value."""
    parser.error(f"argument --{problem.field.replace('_', '-')}: {problem.message}")


def config(parser: argparse.ArgumentParser, config_type: type, args: argparse.Namespace) -> Any:
    """`config_type` from parsed flags; a setting that cannot work (checked across flags) is a usage error."""
    try:
        return config_type(**{f.name: getattr(args, f.name) for f in dataclasses.fields(config_type) if f.init})
    except ConfigError as problem:
        error(parser, problem)


def to_argv(config: Config) -> list[str]:
    """The flags that give `config` to its script: each field off its default, and the fields a config fixes."""
    words = []
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if not field.init or value != field.default:
            words += flag_of(type(config), field.name).argv(field.name, value)
    return words


def setup_logging() -> None:
    """For a script run as a program: the library's log lines (flaxlesson's INFO and up, others' warnings) on stdout.

    `force` replaces the handler orbax puts on the root logger when imported. Not called by `main`, so tests that
    call it keep pytest's own logging.
    """
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stdout, force=True)
    logging.getLogger("flaxlesson").setLevel(logging.INFO)


def check_before_training(config: Config) -> None:
    """Raise ConfigError for what would fail only after training: unwritable folders, a resume past the epochs.

    A --resume whose --checkpoint-dir does not exist is refused before the folder is made: nothing to resume.
    """
    if getattr(config, "resume", False) and not Path(config.checkpoint_dir).is_dir():
        raise ConfigError(
            "resume", f"{config.checkpoint_dir!r} does not exist, so there is nothing to resume; drop --resume to start"
        )
    for name in ("out", "checkpoint_dir"):
        folder = getattr(config, name, None)
        if folder is not None:
            try:
                results.check_writable(folder)
            except ValueError as problem:
                raise ConfigError(name, str(problem).removeprefix("path: ")) from None
    target = getattr(config, "save_model", None)
    if target is not None:
        try:
            saving.check_path(target)
            results.check_writable(Path(target).resolve().parent)
        except ValueError as problem:
            raise ConfigError("save_model", str(problem).removeprefix("path: ")) from None
    if getattr(config, "resume", False):
        trained = checkpoint.latest_position(config.checkpoint_dir)
        if trained is not None and (trained.epoch, trained.step) > (config.epochs, 0):
            raise ConfigError(
                "resume",
                f"the newest checkpoint in {config.checkpoint_dir!r} has trained {trained.describe()}, past "
                f"--epochs {config.epochs}; ask for at least {trained.epoch + (trained.step > 0)}",
            )


def use_cpu_devices(config: Config) -> None:
    """Give this process `config.cpu_devices` virtual CPU devices (`jax_num_cpu_devices`), before JAX starts.

    A ConfigError of --cpu-devices when JAX already runs here with another count.
    """
    count = getattr(config, "cpu_devices", None)
    if not count:
        return
    try:
        jax.config.update("jax_num_cpu_devices", count)
    except RuntimeError:
        if jax.local_device_count() != count:
            raise ConfigError(
                "cpu_devices",
                f"JAX already runs in this process with {jax.local_device_count()} devices; pass it to a fresh process",
            ) from None


def load_images(config: Config) -> data.ImageData:
    """The images `--dataset` (and `--data-dir`) name, the first `--limit` of each split.

    A source that is not there, or does not read, is a ConfigError of --dataset.
    """
    try:
        if config.dataset == "folder":  # a class-per-subfolder image folder, read as Keras reads one
            if config.data_dir is None:
                raise ValueError("--dataset folder needs --data-dir, the folder of images (a subfolder per class)")
            images = folders.load_image_folder(config.data_dir, seed=getattr(config, "seed", 0))
        else:
            images = data.load_images(config.dataset, config.data_dir)
        return images.head(getattr(config, "limit", None))
    except (ValueError, data.DatasetUnavailableError) as e:
        raise ConfigError("dataset", str(e)) from None


def save_trained(config: Config, state: Any, sample_input: Any) -> dict[str, str]:
    """Save `state`'s model where `--save-model` says (saving logs where); for metrics.json `{"saved_model": path}`."""
    if config.save_model is None:
        return {}
    saving.save_model(config.save_model, state, sample_input=sample_input)
    return {"saved_model": config.save_model}


def interrupted(*histories: Any) -> dict[str, Any]:
    """For metrics.json when a fit was stopped early: `{"interrupted": True, "interrupted_by": what}`, else {}.

    `what` is History.interrupted: 'SIGINT' (Ctrl-C) or 'SIGTERM' (a preemption). A callback's stop (EarlyStopping)
    is a normal end, not an interruption.
    """
    reasons = [h.interrupted for h in histories if getattr(h, "interrupted", None)]
    reasons += [stop_requested()]  # a stop that came outside the fits
    return {"interrupted": True, "interrupted_by": reasons[0]} if reasons[0] else {}


def stop_requested() -> str | None:
    """The stop signal ('SIGINT', 'SIGTERM') this run has received so far (`execute` records them), else None."""
    return (interrupts.shared() or {}).get("signal")


def _exit_at_once(received: signal.Signals) -> None:
    """A second stop signal: one line, and the process ends now (no clean-up, no traceback), as 128 + the signal."""
    print(f"Stopped at once by a second {received.name}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(128 + received)


def exit_code(metrics: dict) -> int:
    """A script's exit status: 0 when it ran to the end, 143 when SIGTERM stopped it, 130 when otherwise stopped."""
    if not metrics.get("interrupted"):
        return 0
    return TERMINATED_EXIT_CODE if metrics.get("interrupted_by") == "SIGTERM" else INTERRUPTED_EXIT_CODE


def execute(parser: argparse.ArgumentParser, run: Callable[[Any], dict], config: Config) -> dict:
    """A script's main after parsing: check what can be checked before training, run, exit as `exit_code` says.

    A ConfigError, before or during the run (data that is not there, a checkpoint of another model), exits as
    a usage error; a checkpoint that cannot be written (a full disk) exits 1 with its one-line error. After
    Ctrl-C (exit 130) or SIGTERM (exit 143) the run has written metrics.json and its plots for what finished,
    and its checkpoint when it has a --checkpoint-dir. The signals are recorded for the whole run
    (`interrupts.whole_run`): one that comes after the fit lets the run finish (its test scores, its plots) and
    exits 130 or 143 likewise; a second one exits at once with one line.
    """
    with interrupts.whole_run(on_second=_exit_at_once) as stop:
        try:
            check_before_training(config)
            metrics = run(config)
        except ConfigError as problem:
            error(parser, problem)
        except (checkpoint.CheckpointWriteError, RunFailed) as problem:
            print(f"{parser.prog}: error: {problem}", file=sys.stderr, flush=True)
            sys.exit(1)
        except checkpoint.CheckpointError as problem:  # found as the fit begins: a resume with other data settings
            error(parser, ConfigError("checkpoint_dir", str(problem)))
        if not metrics.get("interrupted") and "signal" in stop:  # it came after metrics.json was written
            metrics = {**metrics, "interrupted": True, "interrupted_by": stop["signal"]}
        if metrics.get("interrupted"):
            print(f"Interrupted ({metrics.get('interrupted_by')}): {config.out} holds what finished", flush=True)
            sys.exit(exit_code(metrics))
    return metrics
