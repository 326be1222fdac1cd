"""Simulated faults for kubetune's e2e tests, loaded at interpreter start-up by kubetune_e2e_faults.pth.

Only the e2e faults image has this file (tests/e2e/images/faults/Dockerfile). KUBETUNE_E2E_FAULT picks
the fault:

  cuda-oom   the first `transformers.Trainer.training_step` raises torch.OutOfMemoryError, as a GPU that
             is too small would; the step after it (if the trainer catches the error) runs normally.

Nothing is imported before the trainer imports transformers itself: an import hook patches
transformers.trainer when it is first loaded, so `python -c ...` in this image starts as fast as in the
trainer image.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
from collections.abc import Sequence
from types import ModuleType
from typing import Any

FAULT = os.environ.get("KUBETUNE_E2E_FAULT", "")
OOM_MESSAGE = "CUDA out of memory. Tried to allocate 20.00 GiB (simulated by the kubetune e2e faults image)"
TARGET = "transformers.trainer"


def _patch_training_step(module: ModuleType) -> None:
    trainer = module.Trainer
    original = trainer.training_step
    raised = False

    def training_step(self: Any, *args: Any, **kwargs: Any) -> Any:
        nonlocal raised
        if not raised:
            raised = True
            import torch

            print(f"kubetune-e2e-faults: raising {OOM_MESSAGE!r}", file=sys.stderr, flush=True)
            raise torch.OutOfMemoryError(OOM_MESSAGE)
        return original(self, *args, **kwargs)

    trainer.training_step = training_step


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: wraps the real loader of TARGET so that the patch follows its import."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != TARGET:
            return None
        sys.meta_path.remove(self)  # once, and never while looking the real spec up
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        loader = spec.loader
        exec_module = loader.exec_module

        def exec_and_patch(module: ModuleType) -> None:
            exec_module(module)
            _patch_training_step(module)

        loader.exec_module = exec_and_patch  # type: ignore[method-assign]
        return spec


if FAULT == "cuda-oom":
    sys.meta_path.insert(0, _PatchOnImport())
elif FAULT:
    print(f"kubetune-e2e-faults: unknown KUBETUNE_E2E_FAULT={FAULT!r} (known: cuda-oom)", file=sys.stderr)
