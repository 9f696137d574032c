"""Run records: what every experiment writes into its --out directory."""

import dataclasses
import json
import os
import platform
import tempfile
from pathlib import Path
from typing import Any

import flax
import jax
import numpy as np
import optax


def run_info() -> dict[str, Any]:
    """Library versions and devices, so a figure can be traced to what produced it."""
    return {
        "versions": {
            "jax": jax.__version__,
            "flax": flax.__version__,
            "optax": optax.__version__,
            "python": platform.python_version(),
        },
        "devices": [str(d) for d in jax.devices()],
        "processor": platform.processor() or platform.machine(),
    }


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.generic, np.ndarray, jax.Array)):
        return np.asarray(value).tolist()
    return value


def sync(path: str | os.PathLike) -> None:
    """Flush a file's (or a folder's entries') written data to disk: it survives a crash or a power loss."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write `obj` as JSON atomically and durably: a crash mid-write leaves the previous file intact.

    The file is on disk before it takes the name, and the name is on disk before this returns.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(_jsonable(obj), f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:  # a full disk, Ctrl-C: leave no half-written temporary file behind
        Path(tmp).unlink(missing_ok=True)
        raise
    sync(path.parent)
    return path


def write_metrics(out_dir: str | os.PathLike, metrics: dict[str, Any]) -> Path:
    """`out_dir/metrics.json`: the experiment's figures plus `run_info()`."""
    return write_json(Path(out_dir) / "metrics.json", {**metrics, **run_info()})


def check_writable(path: str | os.PathLike) -> Path:
    """Create the folder `path` if needed and write a scratch file in it; a ValueError naming it if that fails.

    Scripts call it on their output and checkpoint folders before training, so a bad folder fails at once
    instead of after the fit.
    """
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".writable-"):
            pass
    except OSError as error:
        reason = "it is a file, not a folder" if path.is_file() else (error.strerror or str(error))
        raise ValueError(f"path: cannot write into {str(path)!r}: {reason}") from error
    return path
