"""The whole lesson, section by section, on data that is there offline.

    python experiments/lesson.py --out runs/lesson
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from experiments import cnn_mnist, mlp_iris, rnn_sequences  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/lesson")
    args = parser.parse_args(argv)
    mlp_iris.main(["--out", f"{args.out}/mlp_iris"])
    cnn_mnist.main(["--out", f"{args.out}/cnn_mnist"])
    rnn_sequences.main(["--task", "lesson", "--out", f"{args.out}/rnn_lesson"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
