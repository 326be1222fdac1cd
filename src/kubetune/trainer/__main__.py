"""``python -m kubetune.trainer --spec FILE [--output DIR]`` (what the trainer Pods run)."""

from __future__ import annotations

import argparse
import sys

from kubetune.trainer import run
from kubetune.trainer.errors import Preempted, TrainerError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m kubetune.trainer",
        description="Fine-tune a model as a FineTuneJob says (the kubetune trainer entrypoint).",
    )
    parser.add_argument("--spec", required=True, help="FineTuneJob YAML file (the whole resource)")
    parser.add_argument("--output", help="output folder (overrides spec.output.path)")
    args = parser.parse_args(argv)
    try:
        run(args.spec, args.output)
    except TrainerError as exc:
        print(f"kubetune: error: {exc}", file=sys.stderr, flush=True)
        return exc.exit_code
    except Preempted as exc:
        print(f"kubetune: {exc}", file=sys.stderr, flush=True)
        return Preempted.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
