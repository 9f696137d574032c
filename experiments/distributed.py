"""Lesson section 3.2: MirroredStrategy's replacement, the lesson's dense net trained data-parallel.

The lesson fits Dense(64) -> Dense(64) -> Dense(10) on random (1000, 784) data, 5 epochs, batch 32, under
`tf.distribute.MirroredStrategy()`. Here the same fit runs under a strategy from flaxlesson.parallel, on every
device of one process or of several, and is compared with a single-device run of the same global batches.

    python experiments/distributed.py --strategy sharded --out runs/distributed      # every local device
    python experiments/distributed.py --strategy pmap --cpu-devices 8                # 8 virtual CPU devices
    python experiments/distributed.py --processes 2 --cpu-devices 4                  # 2 processes on 127.0.0.1
    python experiments/distributed.py --checkpoint-dir runs/ckpt --resume            # save each epoch, resume
    python experiments/distributed.py --processes 2 --checkpoint-dir runs/ckpt --save-freq 20 --max-restarts 1
    # several hosts: on each, --coordinator HOST0:PORT --processes N --process-id I (or JAX_* variables); each
    # gives up after --startup-timeout seconds (60) without the whole run, process 0 at once if PORT is in use
"""

import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from experiments import flags  # noqa: E402
from flaxlesson import checkpoint, data, launch, models, parallel, plots, results, training, worker  # noqa: E402
from flaxlesson.resume import resume_or_start  # noqa: E402

# Left out of metrics.json's settings: where this process sat in the run, not how the run was set.
PLACEMENT = ("coordinator", "process_id")


def make_data(samples: int, features: int, classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The lesson's dummy data: uniform [0, 1) inputs and uniform integer labels, from a seeded generator."""
    rng = np.random.default_rng(seed)
    return rng.random((samples, features), dtype=np.float32), rng.integers(classes, size=samples).astype(np.int32)


def lesson_model(classes: int = 10) -> models.MLP:
    """The lesson's network: Dense(64, relu) -> Dense(64, relu) -> Dense(classes)."""
    return models.MLP(hidden=(64, 64), num_classes=classes)


@dataclasses.dataclass(frozen=True)
class Config(flags.Config):
    """The section's settings; the defaults are the lesson's (5 epochs, batch 32, 1000 x 784 inputs, 10 classes)."""

    FLAGS = {
        "batch_size": flags.Flag("the global batch, over all devices", flags.positive_int),
        "samples": flags.Flag("samples of dummy data", flags.positive_int),
        "features": flags.Flag("features per sample", flags.positive_int),
        "classes": flags.Flag("classes of the labels and outputs", flags.positive_int),
        "processes": flags.Flag(
            "processes in the run; without --process-id, start them all here on 127.0.0.1", flags.positive_int
        ),
        "process_id": flags.Flag("this process's rank in the run", flags.non_negative_int),
        "coordinator": flags.Flag("HOST:PORT of process 0 when the processes run on several hosts"),
        "timeout": flags.Flag("seconds the local processes may take", flags.positive_float),
        "startup_timeout": flags.Flag(
            "seconds each process waits for the whole run to join before it gives up (JAX's initialization_timeout)",
            flags.positive_float,
        ),
        "max_restarts": flags.Flag(
            "restart the local processes from the newest checkpoint up to this many times when one dies",
            flags.non_negative_int,
        ),
    }

    strategy: str = "sharded"
    epochs: int = 5
    batch_size: int = 32
    steps_per_execution: int | str = 1
    samples: int = 1000
    features: int = 784
    classes: int = 10
    seed: int = 0
    cpu_devices: int | None = None
    processes: int = 1
    process_id: int | None = None
    coordinator: str | None = None
    timeout: float = 600.0
    startup_timeout: float = 60.0
    max_restarts: int = 0
    checkpoint_dir: str | None = None
    save_freq: int | str = "epoch"
    resume: bool = False
    out: str = "runs/distributed"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.process_id is not None and not self.process_id < self.processes:
            raise flags.ConfigError(
                "process_id",
                f"must be in [0, {self.processes}) for --processes {self.processes}, got {self.process_id}",
            )

    @classmethod
    def quick(cls) -> "Config":
        """Tiny settings: one epoch."""
        return cls(epochs=1)


def _launch(config: Config) -> dict:
    """Start every process of the run on this machine (127.0.0.1) and return what process 0 wrote."""
    try:
        outputs = launch.launch_local(
            [str(Path(__file__).resolve()), *flags.to_argv(config)],
            config.processes,
            devices_per_process=config.cpu_devices or 1,
            timeout=config.timeout,
            max_restarts=config.max_restarts,
        )
    except launch.LaunchError as failure:
        survive = "; to survive a dead process, pass --max-restarts N (with --checkpoint-dir, to resume from it)"
        survive = survive if not failure.max_restarts else ""
        raise flags.RunFailed(f"{failure.summary}{survive}\nits last output:\n{failure.output}") from None
    print(outputs[0], end="", flush=True)
    return json.loads((Path(config.out) / "metrics.json").read_text())


def _step_seconds(history: training.History, samples: int, batch_size: int) -> float | None:
    """Median seconds per training step over the epochs run (None when none was)."""
    steps = data.num_batches(samples, batch_size)
    return float(np.median([samples / sps / steps for sps in history.samples_per_second])) if history.epoch else None


def train(config: Config) -> dict:
    """Fit under the chosen strategy, then (process 0 alone) on one device from the same start; returns the record.

    Every process trains; process 0 also runs the single-device reference and writes metrics.json and the curves.
    """
    x, y = make_data(config.samples, config.features, config.classes, config.seed)
    model = lesson_model(config.classes)
    state = training.create_train_state(model, x[:1], seed=config.seed)
    strategy = parallel.get_strategy(config.strategy)
    lead = jax.process_index() == 0
    # A process restarted by the launcher resumes from the newest checkpoint, whatever --resume says.
    restarted = config.checkpoint_dir is not None and worker.restart_attempt() > 0
    resume = config.resume or (restarted and Path(config.checkpoint_dir).is_dir())
    start = resume_or_start(
        config.checkpoint_dir,
        state,
        resume=resume,
        strategy=strategy,
        seed=config.seed,
        save_freq=config.save_freq,
        kind="distributed",
    )
    fit_settings = {
        "epochs": config.epochs,
        "batch_size": config.batch_size,
        "seed": config.seed,
        "steps_per_execution": config.steps_per_execution,
    }
    state, history = training.fit(
        start.state,
        x,
        y,
        initial_epoch=start.initial_epoch,
        initial_step=start.initial_step,
        strategy=strategy,
        callbacks=start.callbacks,
        verbose=2 if lead else 0,
        **fit_settings,
    )
    params = jax.device_get(state.params)
    stopped = flags.interrupted(history)
    if not lead:
        return stopped

    # An interrupted fit stops mid-epoch, where no single-device run of whole epochs can be compared with it.
    single, diff = (training.History(), None) if stopped else _on_one_device(model, x, y, params, config, fit_settings)
    metrics = {
        "strategy": config.strategy,
        "num_devices": strategy.num_replicas,
        "num_processes": jax.process_count(),
        "device_kind": jax.devices()[0].device_kind,
        "initial_epoch": start.initial_epoch,
        "initial_step": start.initial_step,
        "step_seconds": _step_seconds(history, config.samples, config.batch_size),
        "single_device_step_seconds": _step_seconds(single, config.samples, config.batch_size),
        "max_abs_param_diff": diff,
        "params_fingerprint": checkpoint.fingerprint(params),
        **history.summary(),
        "settings": {k: v for k, v in dataclasses.asdict(config).items() if k not in PLACEMENT},
        **stopped,
    }
    results.write_metrics(config.out, metrics)
    if history.epoch:
        plots.history_curves(
            history,
            f"{config.out}/curves.png",
            title=f"Dense net, {config.strategy} over {strategy.num_replicas} device(s)",
        )
    print(
        f"{config.strategy}: {metrics['num_devices']} device(s) in {metrics['num_processes']} process(es), "
        f"{_timing(metrics, history, stopped)} -> {config.out}/metrics.json",
        flush=True,
    )
    return metrics


def _on_one_device(
    model: Any, x: np.ndarray, y: np.ndarray, params: Any, config: Config, fit_settings: dict[str, Any]
) -> tuple[training.History, float]:
    """The same fit on one device from the same start: its History and max |params - its params|."""
    start = training.create_train_state(model, x[:1], seed=config.seed)
    reference, history = training.fit(start, x, y, strategy="single", verbose=0, **fit_settings)
    diff = max(
        float(np.max(np.abs(a - b)))
        for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(jax.device_get(reference.params)), strict=True)
    )
    return history, diff


def _timing(metrics: dict[str, Any], history: training.History, stopped: dict[str, Any]) -> str:
    """The report line's middle: the step times and the difference from one device, or why there are none."""
    diff = metrics["max_abs_param_diff"]
    if stopped:
        return f"interrupted after {len(history.epoch)} whole epoch(s), not compared with one device"
    if history.epoch:
        return (
            f"step {metrics['step_seconds'] * 1e3:.2f} ms (one device "
            f"{metrics['single_device_step_seconds'] * 1e3:.2f} ms), max |params - one-device params| = {diff:.2e}"
        )
    return (
        f"nothing left to train after epoch {metrics['initial_epoch']}, max |params - one-device params| = {diff:.2e}"
    )


def run(config: Config) -> dict:
    """Start the local processes, or join the run as one process and train; what process 0 writes to metrics.json."""
    if config.processes > 1 and config.process_id is None and not config.coordinator:
        return _launch(config)
    flags.use_cpu_devices(config)
    worker.start_heartbeat()  # under launch.launch_local: the beat its launcher watches (a no-op elsewhere)
    # One process given, no JAX_* variables: None lets `initialize` detect a launcher's run (mpirun, SLURM).
    try:
        parallel.initialize(
            config.coordinator,
            config.processes if config.processes > 1 else None,
            config.process_id,
            timeout=config.startup_timeout,
        )
    except (ValueError, TimeoutError) as error:  # a port in use, no coordinator in time
        raise flags.ConfigError("coordinator", str(error).removeprefix("coordinator_address: ")) from None
    try:
        return train(config)
    except checkpoint.CheckpointError as error:
        raise flags.ConfigError("checkpoint_dir", str(error)) from None


def main(argv: list[str] | None = None) -> dict:
    """Flags (the run's placement defaulting to the JAX_* variables) -> Config -> run."""
    parser = flags.parser(__doc__, Config())
    # String defaults go through `type` as typed values do, so a bad variable is a flag error like any other.
    parser.set_defaults(
        processes=os.environ.get(parallel.ENV_NUM_PROCESSES) or 1,
        process_id=os.environ.get(parallel.ENV_PROCESS_ID) or None,
        coordinator=os.environ.get(parallel.ENV_COORDINATOR),
    )
    return flags.execute(parser, run, flags.config(parser, Config, parser.parse_args(argv)))


if __name__ == "__main__":
    flags.setup_logging()
    main()
