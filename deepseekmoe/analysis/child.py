"""One run of a comparison in a child process (compare --jobs): `python -m deepseekmoe.analysis.child JOB`, JOB
the JSON that `compare.train_child` writes; exits with the trainer's code."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from .compare import train_run


def main(argv: list[str]) -> int:
    job = json.loads(argv[0])
    return train_run(job["preset"], job["seed"], Path(job["run_dir"]), job["recipe"], resume=job["resume"])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
