"""The lesson's own Keras code (../shared/reference) run in another interpreter, for side-by-side figures."""

import dataclasses
import os
import re
import subprocess
from collections.abc import Sequence
from pathlib import Path

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference"
FASHION_MNIST = "/usr/share/datasets/fashion-mnist"


@dataclasses.dataclass
class KerasRun:
    """RESULT lines by example ('mlp', 'rnn', 'aug', 'dist', 'cnn'), the CNN's last ms/step, and any failures."""

    lines: dict[str, str]
    cnn_ms_per_step: float | None
    errors: str

    def figures(self, example: str) -> dict[str, str]:
        """The `key=value` figures of one example's RESULT line."""
        return dict(re.findall(r"(\w+)=(\S+)", self.lines[example]))


def run(
    python: str, *, cnn_epochs: int, seeds: int, examples: Sequence[str] = ("mlp", "rnn", "aug", "dist")
) -> KerasRun:
    """keras_rest.py on `examples`, then keras_cnn.py for `cnn_epochs` epochs, in `python`; echoes the RESULT lines."""
    env = {
        **os.environ,
        "TF_CPP_MIN_LOG_LEVEL": "2",
        "EPOCHS": str(cnn_epochs),
        "SEEDS": str(seeds),
        "IDX_DIR": os.environ.get("IDX_DIR", FASHION_MNIST),
    }
    lines, ms_per_step, errors = {}, None, ""
    for argv in ([python, str(REFERENCE / "keras_rest.py"), *examples], [python, str(REFERENCE / "keras_cnn.py")]):
        print(f"\n=== Keras reference\n$ {' '.join(argv)}", flush=True)
        done = subprocess.run(argv, env=env, capture_output=True, text=True)
        for line in done.stdout.splitlines():
            if line.startswith("RESULT"):
                print(line, flush=True)
                name = line.split()[1]
                lines["cnn" if name.startswith("framework=") else name] = line
        steps = re.findall(r"^\d+/\d+ - \S+ - (\d+)ms/step", done.stdout, flags=re.M)
        if steps:
            ms_per_step = float(steps[-1])
        if done.returncode:
            errors += f"{' '.join(argv[1:])} exited {done.returncode}: {done.stderr.strip()[-500:]}\n"
    return KerasRun(lines, ms_per_step, errors)
