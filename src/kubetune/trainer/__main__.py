"""``python -m kubetune.trainer --spec FILE [--output DIR]`` (what the trainer Pods run).

Exit codes (:class:`kubetune.contract.Exit`): 0 done; 2 invalid spec; 3 dataset error; 4 secret missing;
5 CUDA out of memory; 6 another problem a person must fix; 1 unexpected (with a traceback); 143 stopped
by SIGTERM or SIGINT after saving a checkpoint (the next start resumes); 130 a second Ctrl-C (no
checkpoint). On every non-zero exit the termination message (``{"reason", "message"}``) goes to
``$KUBETUNE_TERMINATION_LOG`` when it is set.
"""

from __future__ import annotations

import argparse
import sys
import traceback

from kubetune.contract import REASON_UNEXPECTED, Exit
from kubetune.redact import install_process_redaction, redact
from kubetune.trainer import run
from kubetune.trainer.errors import Preempted, TrainerError
from kubetune.trainer.termination import write_termination_log

INTERRUPTED = 130  # 128 + SIGINT: Ctrl-C twice, stopped without a checkpoint (local runs only)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m kubetune.trainer",
        description="Fine-tune a model as a FineTuneJob says (the kubetune trainer entrypoint).",
    )
    parser.add_argument("--spec", required=True, help="FineTuneJob YAML file (the whole resource)")
    parser.add_argument(
        "--output", help="output root (overrides spec.output.path); the run writes to <output>/runs/<run>/"
    )
    args = parser.parse_args(argv)
    # Before anything can log, warn or fail: no secret in any line this process writes.
    install_process_redaction("kubetune.trainer")
    try:
        run(args.spec, args.output)
    except TrainerError as exc:
        message = redact(str(exc))
        print(f"kubetune: error: {message}", file=sys.stderr, flush=True)
        write_termination_log(exc.reason, message)
        return exc.exit_code
    except Preempted as exc:
        print(f"kubetune: {redact(str(exc))}", file=sys.stderr, flush=True)
        write_termination_log(exc.reason, str(exc))
        return Preempted.exit_code
    except KeyboardInterrupt:
        message = "interrupted (Ctrl-C twice): stopped without saving a checkpoint"
        print(f"kubetune: {message}", file=sys.stderr, flush=True)
        write_termination_log(REASON_UNEXPECTED, message, overwrite=False)
        return INTERRUPTED
    except Exception as exc:
        print(redact(traceback.format_exc()), file=sys.stderr, end="", flush=True)
        # Another process of this Pod may have written the actual cause already: keep it.
        write_termination_log(REASON_UNEXPECTED, f"{type(exc).__name__}: {exc}", overwrite=False)
        return Exit.ERROR
    return Exit.OK


if __name__ == "__main__":
    sys.exit(main())
