"""Reading the FineTuneJob file the trainer is started with (cheap: no ML imports)."""

from __future__ import annotations

import os
from pathlib import Path

from kubetune.api import load
from kubetune.api.v1alpha1 import FineTuneJob, FineTuneJobSpec
from kubetune.contract import ENV_WORKDIR
from kubetune.trainer.errors import SpecError


def load_job(path: str | Path) -> FineTuneJob:
    """Read and validate a whole FineTuneJob YAML file, with the same checks and messages as
    `kubetune validate` (`file:line: field.path: message`, never echoing a value)."""
    try:
        return load.load_job(path)
    except load.InvalidJob as exc:
        raise SpecError(f"invalid FineTuneJob:\n{exc}") from None


def base_dir(spec_file: Path) -> Path:
    """The folder relative paths in the spec (model.path, dataset.files, output.path) start from."""
    # $KUBETUNE_WORKDIR is set by the Job (to storage.mountPath): relative paths in a mounted spec are
    # relative to the volume, not to the ConfigMap mount the spec file lives in.
    return Path(os.environ.get(ENV_WORKDIR) or spec_file.resolve().parent)


def resolve_output(spec: FineTuneJobSpec, base: Path, override: str | Path | None = None) -> Path:
    """`--output` if given, else `spec.output.path`; relative paths start from `base`."""
    out = Path(override) if override is not None else Path(spec.output.path)
    if not out.is_absolute():
        out = base / out
    return out.resolve()
