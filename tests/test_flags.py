"""The experiments' command line: a bad flag is one usage error before anything loads; folders are checked first;
Ctrl-C still writes metrics.json and exits 130."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from experiments import (
    augmentation,
    benchmark,
    cnn_mnist,
    distributed,
    flags,
    lesson,
    mlp_iris,
    rnn_sequences,
    streaming,
)
from flaxlesson import checkpoint, data, results, training

ROOT = Path(__file__).resolve().parent.parent

BAD_VALUES = [
    (mlp_iris, "--seeds", "0"),
    (mlp_iris, "--epochs", "0"),
    (mlp_iris, "--batch-size", "0"),
    (mlp_iris, "--validation-split", "1"),
    (mlp_iris, "--epochs", "two"),
    (cnn_mnist, "--dataset", "bogus"),
    (cnn_mnist, "--epochs", "-1"),
    (cnn_mnist, "--batch-size", "0"),
    (cnn_mnist, "--validation-split", "1.5"),
    (cnn_mnist, "--strategy", "bogus"),
    (cnn_mnist, "--limit", "0"),
    (cnn_mnist, "--seed", "-1"),
    (rnn_sequences, "--task", "bogus"),
    (rnn_sequences, "--units", "0"),
    (rnn_sequences, "--activation", "bogus"),
    (rnn_sequences, "--epochs", "11"),
    (rnn_sequences, "--batch-size", "0"),
    (rnn_sequences, "--validation-split", "-0.1"),
    (rnn_sequences, "--masking-epochs", "11"),
    (rnn_sequences, "--min-rows", "0"),
    (rnn_sequences, "--extra-padding", "-1"),
    (rnn_sequences, "--limit", "0"),
    (rnn_sequences, "--seed", "-1"),
    (augmentation, "--n", "0"),
    (augmentation, "--seed", "-1"),
    (distributed, "--strategy", "mirrored"),
    (distributed, "--epochs", "0"),
    (distributed, "--batch-size", "0"),
    (distributed, "--samples", "0"),
    (distributed, "--features", "0"),
    (distributed, "--classes", "0"),
    (distributed, "--seed", "-1"),
    (distributed, "--cpu-devices", "0"),
    (distributed, "--processes", "0"),
    (distributed, "--process-id", "-1"),
    (distributed, "--timeout", "0"),
    (benchmark, "--steps", "0"),
    (benchmark, "--repeats", "0"),
    (benchmark, "--cnn-epochs", "0"),
    (benchmark, "--seeds", "0"),
    (lesson, "--only", "bogus"),
]


@pytest.fixture
def nothing_may_load(monkeypatch):
    """Data loading and training fail the test if a script reaches them."""

    def reached(*args, **kwargs):
        raise AssertionError("the script went on to load data or train")

    for module, name in ((training, "fit"), (data, "load_iris"), (data, "load_images")):
        monkeypatch.setattr(module, name, reached)


def _usage_error(script, argv, capsys) -> str:
    """Run the script's main, expecting argparse's exit 2; its one `error:` line."""
    with pytest.raises(SystemExit) as exit_:
        script.main(argv)
    assert exit_.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1
    return errors[0]


@pytest.mark.parametrize(
    "script, flag, value", BAD_VALUES, ids=[f"{s.__name__.split('.')[-1]}{f}={v}" for s, f, v in BAD_VALUES]
)
def test_a_bad_value_is_one_usage_error_naming_the_flag(script, flag, value, tmp_path, capsys, nothing_may_load):
    error = _usage_error(script, [flag, value, "--out", str(tmp_path / "out")], capsys)
    assert f"argument {flag}:" in error
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "script, argv, flag",
    [
        (cnn_mnist, ["--resume"], "--resume"),
        (distributed, ["--resume"], "--resume"),
        (distributed, ["--processes", "2", "--process-id", "2"], "--process-id"),
    ],
)
def test_flags_that_cannot_go_together_are_one_usage_error(script, argv, flag, tmp_path, capsys, nothing_may_load):
    error = _usage_error(script, [*argv, "--out", str(tmp_path / "out")], capsys)
    assert f"argument {flag}:" in error
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("script", [mlp_iris, cnn_mnist, rnn_sequences, augmentation, distributed, benchmark, lesson])
def test_an_out_folder_under_a_file_is_a_usage_error_before_anything_loads(script, tmp_path, capsys, nothing_may_load):
    (tmp_path / "file").write_text("")
    error = _usage_error(script, ["--out", str(tmp_path / "file" / "out")], capsys)
    assert "argument --out: cannot write into" in error


@pytest.mark.parametrize("script", [cnn_mnist, distributed])
def test_a_checkpoint_folder_that_is_a_file_is_a_usage_error(script, tmp_path, capsys, nothing_may_load):
    (tmp_path / "file").write_text("")
    argv = ["--checkpoint-dir", str(tmp_path / "file"), "--out", str(tmp_path / "out")]
    assert "argument --checkpoint-dir: cannot write into" in _usage_error(script, argv, capsys)


def test_resuming_from_a_checkpoint_past_the_epochs_asked_is_a_usage_error(tmp_path, capsys, nothing_may_load):
    x, _ = distributed.make_data(4, 8, 10, 0)
    state = training.create_train_state(distributed.lesson_model(), x[:1])
    checkpoint.save(tmp_path / "ckpt", state, 3)
    argv = ["--features", "8", "--epochs", "2", "--checkpoint-dir", str(tmp_path / "ckpt"), "--resume"]
    error = _usage_error(distributed, [*argv, "--out", str(tmp_path / "out")], capsys)
    assert "argument --resume: the newest checkpoint" in error and "has trained 3 epochs, past --epochs 2" in error


@pytest.mark.parametrize("script", [cnn_mnist, distributed])
def test_resume_from_a_checkpoint_folder_that_does_not_exist_is_a_usage_error(
    script, tmp_path, capsys, nothing_may_load
):
    argv = ["--checkpoint-dir", str(tmp_path / "missing"), "--resume", "--out", str(tmp_path / "out")]
    error = _usage_error(script, argv, capsys)
    assert "argument --resume: " in error and "does not exist, so there is nothing to resume" in error
    assert not (tmp_path / "missing").exists()


def test_a_config_is_checked_as_its_flags_are():
    with pytest.raises(flags.ConfigError, match=r"batch_size: must be a positive integer, got '0'"):
        mlp_iris.Config(batch_size=0)
    with pytest.raises(flags.ConfigError, match=r"epochs: must be int, got '3'"):
        mlp_iris.Config(epochs="3")
    with pytest.raises(flags.ConfigError, match=r"resume: needs --checkpoint-dir"):
        cnn_mnist.Config(resume=True)


def test_to_argv_gives_the_flags_that_parse_back_to_the_config():
    config = rnn_sequences.RowsConfig(units=8, validation_split=0.25, limit=100, out="somewhere")
    argv = flags.to_argv(config)
    assert argv == [
        "--task",
        "rows",
        "--units",
        "8",
        "--validation-split",
        "0.25",
        "--limit",
        "100",
        "--out",
        "somewhere",
    ]
    parser = flags.parser(rnn_sequences.__doc__, rnn_sequences.RowsConfig())
    assert flags.config(parser, rnn_sequences.RowsConfig, parser.parse_args(argv)) == config


def test_each_task_has_its_own_defaults():
    lesson_toy, rows = rnn_sequences.LessonConfig(), rnn_sequences.RowsConfig()
    assert (lesson_toy.task, lesson_toy.units, lesson_toy.batch_size, lesson_toy.validation_split) == (
        "lesson",
        50,
        1,
        0,
    )
    assert (rows.task, rows.units, rows.batch_size, rows.validation_split) == ("rows", 128, 32, 0.1)


@pytest.fixture
def interrupted_fit(monkeypatch):
    """`training.fit` as it returns after Ctrl-C: the epochs that finished, `history.interrupted` set."""
    fit = training.fit

    def interrupted(*args, **kwargs):
        state, history = fit(*args, **kwargs)
        history.interrupted = True
        return state, history

    monkeypatch.setattr(training, "fit", interrupted)


@pytest.mark.parametrize(
    "script, argv",
    [
        (mlp_iris, ["--epochs", "1"]),
        (rnn_sequences, ["--task", "lesson", "--epochs", "1"]),
        (distributed, ["--samples", "40", "--features", "8", "--epochs", "1"]),
    ],
)
def test_an_interrupted_run_writes_what_ran_and_exits_130(script, argv, tmp_path, interrupted_fit):
    with pytest.raises(SystemExit) as exit_:
        script.main([*argv, "--out", str(tmp_path)])
    assert exit_.value.code == 130
    written = json.loads((tmp_path / "metrics.json").read_text())
    assert written["interrupted"] is True and len(written["history"]["loss"]) == 1
    assert (tmp_path / "curves.png").stat().st_size > 0


def test_an_interrupted_run_stops_before_its_next_fit(tmp_path, interrupted_fit):
    with pytest.raises(SystemExit):
        mlp_iris.main(["--seeds", "3", "--epochs", "1", "--out", str(tmp_path)])
    assert len(json.loads((tmp_path / "metrics.json").read_text())["test_accuracy_per_seed"]) == 1


def test_an_interrupted_benchmark_keeps_what_it_measured(tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(benchmark, "bench_lesson_fits", interrupted)
    monkeypatch.setattr(benchmark.augmentation, "images_per_second", lambda *args, **kwargs: 1.0)
    monkeypatch.setattr(benchmark, "bench_lesson_steps", lambda steps, repeats: {"mlp": {"batch_size": 10}})
    with pytest.raises(SystemExit) as exit_:
        benchmark.main(["--out", str(tmp_path)])
    assert exit_.value.code == 130
    written = json.loads((tmp_path / "metrics.json").read_text())
    assert written["interrupted"] is True and written["steps"] == {"mlp": {"batch_size": 10}}
    assert "lesson_fits" not in written


def test_check_writable_makes_the_folder_and_leaves_it_empty(tmp_path):
    assert results.check_writable(tmp_path / "a" / "b").is_dir()
    assert list((tmp_path / "a" / "b").iterdir()) == []


def test_check_writable_names_a_folder_that_is_a_file(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match=r"path: cannot write into '.*file': it is a file, not a folder"):
        results.check_writable(tmp_path / "file")


def _configs(module):
    return [
        v
        for v in vars(module).values()
        if isinstance(v, type) and issubclass(v, flags.Config) and v is not flags.Config
    ]


@pytest.mark.parametrize("script", [augmentation, benchmark, cnn_mnist, distributed, lesson, mlp_iris, rnn_sequences])
def test_every_script_that_takes_strategy_takes_cpu_devices(script):
    for config in _configs(script):
        fields = {f.name for f in dataclasses.fields(config)}
        assert "strategy" not in fields or "cpu_devices" in fields, config


def test_cnn_mnist_cpu_devices_is_one_usage_error_when_jax_already_runs_with_another_count(
    tmp_path, capsys, nothing_may_load
):
    running = jax.local_device_count()  # starts JAX here, as a script's earlier work would
    line = _usage_error(
        cnn_mnist, ["--strategy", "sharded", "--cpu-devices", str(running - 1), "--out", str(tmp_path)], capsys
    )
    assert f"argument --cpu-devices: JAX already runs in this process with {running} devices" in line


def test_cpu_devices_gives_a_fresh_process_that_many_devices():
    code = "from experiments import cnn_mnist, flags; flags.use_cpu_devices(cnn_mnist.Config(cpu_devices=4)); "
    code += "import jax; print(jax.local_device_count())"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "4", done.stderr


@pytest.mark.parametrize(
    "script, argv",
    [(cnn_mnist, []), (augmentation, []), (rnn_sequences, ["--task", "rows"]), (streaming, [])],
    ids=["cnn_mnist", "augmentation", "rnn_sequences", "streaming"],
)
def test_images_that_are_not_there_are_one_usage_error_of_dataset(script, argv, tmp_path, capsys):
    missing = str(tmp_path / "no-such-folder")
    line = _usage_error(
        script, [*argv, "--dataset", "idx", "--data-dir", missing, "--out", str(tmp_path / "o")], capsys
    )
    assert "argument --dataset: " in line and "no-such-folder" in line
