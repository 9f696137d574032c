"""Lesson section 3.2: MirroredStrategy's replacement, the lesson's dense net trained data-parallel.

The lesson fits Dense(64) -> Dense(64) -> Dense(10) on random (1000, 784) data, 5 epochs, batch 32, under
`tf.distribute.MirroredStrategy()`. Here the same fit runs under a strategy from flaxlesson.parallel, on every
device of one process or of several, and is compared with a single-device run of the same global batches.

    python experiments/distributed.py --strategy sharded --out runs/distributed      # every local device
    python experiments/distributed.py --strategy pmap --cpu-devices 8                # 8 virtual CPU devices
    python experiments/distributed.py --processes 2 --cpu-devices 4                  # 2 processes on 127.0.0.1
    python experiments/distributed.py --checkpoint-dir runs/ckpt --resume            # save each epoch, resume
    # several hosts: on each, --coordinator HOST0:PORT --processes N --process-id I (or JAX_* variables)
"""

import argparse
import json
import os
import sys
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from flaxlesson import checkpoint, models, parallel, plots, results, training  # noqa: E402


def make_data(samples: int, features: int, classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The lesson's dummy data: uniform [0, 1) inputs and uniform integer labels, from a seeded generator."""
    rng = np.random.default_rng(seed)
    return rng.random((samples, features), dtype=np.float32), rng.integers(classes, size=samples).astype(np.int32)


def lesson_model(classes: int = 10) -> models.MLP:
    """The lesson's network: Dense(64, relu) -> Dense(64, relu) -> Dense(classes)."""
    return models.MLP(hidden=(64, 64), num_classes=classes)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--strategy", default="sharded", choices=sorted(parallel.STRATEGIES))
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=32, help="the global batch, over all devices")
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--features", type=int, default=784)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cpu-devices", type=int, help="virtual CPU devices per process (for trying on a CPU)")
    # String defaults from the environment go through `type`, so a bad value is a flag error like any other.
    parser.add_argument(
        "--processes",
        type=int,
        default=os.environ.get(parallel.ENV_NUM_PROCESSES) or 1,
        help="processes in the run; without --process-id, start them all here on 127.0.0.1",
    )
    parser.add_argument("--process-id", type=int, default=os.environ.get(parallel.ENV_PROCESS_ID) or None)
    parser.add_argument(
        "--coordinator",
        default=os.environ.get(parallel.ENV_COORDINATOR),
        help="HOST:PORT of process 0 when the processes run on several hosts",
    )
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds the local processes may take")
    parser.add_argument("--checkpoint-dir", help="save the train state here after every epoch")
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --checkpoint-dir")
    parser.add_argument("--out", default="runs/distributed")
    return parser


def _check(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    for name in ("epochs", "batch_size", "samples", "features", "classes", "processes", "cpu_devices"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    if args.process_id is not None and not 0 <= args.process_id < args.processes:
        parser.error(
            f"--process-id must be in [0, {args.processes}) for --processes {args.processes}, got {args.process_id}"
        )
    if not args.timeout > 0:
        parser.error(f"--timeout must be a positive number of seconds, got {args.timeout}")
    if args.resume and not args.checkpoint_dir:
        parser.error("--resume needs --checkpoint-dir")


def _launch(args: argparse.Namespace, argv: list[str]) -> dict:
    """Start every process of the run on this machine (127.0.0.1) and return what process 0 wrote."""
    outputs = parallel.launch_local(
        [str(Path(__file__).resolve()), *argv],
        args.processes,
        devices_per_process=args.cpu_devices or 1,
        timeout=args.timeout,
    )
    print(outputs[0], end="", flush=True)
    return json.loads((Path(args.out) / "metrics.json").read_text())


def _step_seconds(history: training.History, samples: int, batch_size: int) -> float | None:
    """Median seconds per training step over the epochs run (None when none was)."""
    steps = -(-samples // batch_size)
    return float(np.median([samples / sps / steps for sps in history.samples_per_second])) if history.epoch else None


def train(args: argparse.Namespace) -> dict:
    """Fit under the chosen strategy, then (process 0 alone) on one device from the same start; returns the record.

    Every process trains; process 0 also runs the single-device reference and writes metrics.json and the curves.
    """
    x, y = make_data(args.samples, args.features, args.classes, args.seed)
    model = lesson_model(args.classes)
    state = training.create_train_state(model, x[:1], seed=args.seed)
    strategy = parallel.get_strategy(args.strategy)
    lead = jax.process_index() == 0
    state, initial_epoch, callbacks = checkpoint.resume_or_start(
        args.checkpoint_dir, state, resume=args.resume, strategy=strategy
    )
    same = {"epochs": args.epochs, "batch_size": args.batch_size, "seed": args.seed}
    state, history = training.fit(
        state,
        x,
        y,
        initial_epoch=initial_epoch,
        strategy=strategy,
        callbacks=callbacks,
        verbose=2 if lead else 0,
        **same,
    )
    params = jax.device_get(state.params)
    if not lead:
        return {}

    reference, single = training.fit(
        training.create_train_state(model, x[:1], seed=args.seed), x, y, strategy="single", verbose=0, **same
    )
    diff = max(
        float(np.max(np.abs(a - b)))
        for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(jax.device_get(reference.params)), strict=True)
    )
    metrics = {
        "strategy": args.strategy,
        "num_devices": strategy.num_replicas,
        "num_processes": jax.process_count(),
        "device_kind": jax.devices()[0].device_kind,
        "initial_epoch": initial_epoch,
        "step_seconds": _step_seconds(history, args.samples, args.batch_size),
        "single_device_step_seconds": _step_seconds(single, args.samples, args.batch_size),
        "max_abs_param_diff": diff,
        **history.summary(),
        "settings": {k: v for k, v in vars(args).items() if k not in ("coordinator", "process_id")},
    }
    results.write_metrics(args.out, metrics)
    if history.epoch:
        plots.history_curves(
            history,
            f"{args.out}/curves.png",
            title=f"Dense net, {args.strategy} over {strategy.num_replicas} device(s)",
        )
    timing = (
        f"step {metrics['step_seconds'] * 1e3:.2f} ms (one device {metrics['single_device_step_seconds'] * 1e3:.2f} ms)"
        if history.epoch
        else f"nothing left to train after epoch {initial_epoch}"
    )
    print(
        f"{args.strategy}: {metrics['num_devices']} device(s) in {metrics['num_processes']} process(es), {timing}, "
        f"max |params - one-device params| = {diff:.2e} -> {args.out}/metrics.json",
        flush=True,
    )
    return metrics


def main(argv: list[str] | None = None) -> dict:
    """Parse flags, then start the local processes, or join the run as one process and train."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = _parser()
    args = parser.parse_args(argv)
    _check(parser, args)
    if args.processes > 1 and args.process_id is None and not args.coordinator:
        return _launch(args, argv)
    if args.cpu_devices:
        try:
            jax.config.update("jax_num_cpu_devices", args.cpu_devices)
        except RuntimeError:
            if jax.local_device_count() != args.cpu_devices:
                parser.error(
                    f"--cpu-devices {args.cpu_devices}: JAX already runs in this process with "
                    f"{jax.local_device_count()} devices; pass it to a fresh process"
                )
    parallel.initialize(args.coordinator, args.processes, args.process_id)
    try:
        return train(args)
    except checkpoint.CheckpointError as error:
        parser.error(f"--checkpoint-dir: {error}")


if __name__ == "__main__":
    main()
