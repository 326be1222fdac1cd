"""What the trainer leaves behind when it exits non-zero: the termination message (cheap to import).

The Job sets ``$KUBETUNE_TERMINATION_LOG`` to the container's ``terminationMessagePath``
(``/dev/termination-log``); the kubelet copies the file into the Pod's status, where the operator reads
it with :func:`kubetune.contract.parse_termination_message`. Without the variable nothing is written.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path

from kubetune.contract import ENV_TERMINATION_LOG, termination_message
from kubetune.redact import redact


def write_termination_log(
    reason: str, message: str, *, overwrite: bool = True, env: Mapping[str, str] = os.environ
) -> Path | None:
    """Write the termination message (redacted, at most 4096 bytes) to ``$KUBETUNE_TERMINATION_LOG``.

    With ``overwrite=False`` a message already there is kept: under ``accelerate launch`` every process
    of the Pod shares the file, and the rank that hit the actual problem (an out-of-memory, a bad
    column) should not be overwritten by another rank's follow-on error."""
    target = env.get(ENV_TERMINATION_LOG)
    if not target:
        return None
    path = Path(target)
    if not overwrite:
        try:
            if path.stat().st_size > 0:
                return None
        except OSError:
            pass
    try:
        path.write_text(termination_message(reason, redact(message, env)), encoding="utf-8")
    except OSError as exc:
        print(f"kubetune: could not write the termination message to {path}: {exc}", file=sys.stderr)
        return None
    return path
