"""How many NVIDIA GPUs this process may use, found without importing torch.

`kubetune run --local` needs the number to choose between one trainer process and `accelerate launch
--num_processes N`; importing torch for `torch.cuda.device_count()` costs the CLI 1-2 s. The count is
*visible ∩ present*:

- visible: ``NVIDIA_VISIBLE_DEVICES`` (the NVIDIA container runtime's variable: ``all``; ``none``; a list
  of indices or UUIDs; unset, empty, ``void`` or a path say nothing about the count), then
  ``CUDA_VISIBLE_DEVICES`` with CUDA's own rules, as torch parses it: unset means all; a list of indices
  stops at the first one that is not a number or not present (so ``""``, ``-1``, ``none`` mean no GPU);
  a list of UUID prefixes (``GPU-…``, ``MIG-…``) stops at the first that matches no device or more than
  one; a repeated device means no GPU at all;
- present: ``nvidia-smi -L`` (short timeout; a missing binary is fine), else
  ``/proc/driver/nvidia/gpus/*`` (the driver's folder per GPU, in PCI order as nvidia-smi numbers them).

Everything but :func:`run_nvidia_smi` (and :func:`probe`, which calls it) is a pure function of its
arguments, so the rules are tested with fake environments, nvidia-smi outputs and /proc trees. The
trainer still decides which device it uses: this is only the number of processes to start.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

PROC_GPUS = Path("/proc/driver/nvidia/gpus")
NVIDIA_SMI_TIMEOUT = 5.0  # s: nvidia-smi initialises every GPU when persistence mode is off

Visible = list[int] | list[str] | None
"""Devices a variable lets through: ``None`` all of them; indices or UUID prefixes (``[]``: none)."""


@dataclass(frozen=True)
class Gpu:
    """A present GPU: its index (nvidia-smi's, in PCI order), its name and UUID (None where unknown)."""

    index: int
    name: str = ""
    uuid: str | None = None
    mig: tuple[str, ...] = ()
    """UUIDs of its MIG devices (``MIG-…``), as nvidia-smi lists them under it."""


@dataclass(frozen=True)
class GpuCount:
    """The number of GPUs this process may use, and how it was found (for the CLI's message)."""

    count: int
    source: str


def _strtoul(text: str) -> int:
    """The number ``text`` starts with, as C's strtoul reads it (``"1gpu"`` is 1); -1 when none."""
    m = re.match(r"[+-]?\d+", text)
    return int(m.group()) if m else -1


def parse_cuda_visible_devices(value: str | None) -> Visible:
    """``CUDA_VISIBLE_DEVICES`` as CUDA (and torch) read it: ``None`` when unset (every GPU)."""
    if value is None:
        return None
    for prefix in ("GPU-", "MIG-"):
        if value.startswith(prefix):
            uuids: list[str] = []
            for entry in value.split(","):
                if entry in uuids:
                    return []  # a repeated device hides them all
                if not entry.startswith(prefix):
                    break
                uuids.append(entry)
            return uuids
    indices: list[int] = []
    for entry in value.split(","):
        index = _strtoul(entry.strip())
        if index in indices:
            return []
        if index < 0:
            break
        indices.append(index)
    return indices


def parse_nvidia_visible_devices(value: str | None) -> Visible:
    """``NVIDIA_VISIBLE_DEVICES``, the container runtime's choice of GPUs: ``None`` when it sets no limit.

    Unset, empty and ``void`` mean the runtime exposes no GPU, which the present devices already show (and
    on a host the variable does nothing); a path is the device plugin's volume-mounts strategy (the
    devices are mounted, so present ones count); ``all`` is every GPU, ``none`` no GPU."""
    if value is None:
        return None
    value = value.strip()
    if value in ("", "void", "all") or value.startswith("/"):
        return None
    if value == "none":
        return []
    entries = list(dict.fromkeys(e.strip() for e in value.split(",") if e.strip()))
    if all(e.isdigit() for e in entries):
        return [int(e) for e in entries]
    return entries


_SMI_GPU = re.compile(r"^GPU (\d+): (.*?)(?: \(UUID: ([^)]+)\))?\s*$")
_SMI_MIG = re.compile(r"^\s+MIG .*\(UUID: (MIG-[^)]+)\)\s*$")


def parse_nvidia_smi(text: str) -> list[Gpu]:
    """The GPUs of ``nvidia-smi -L`` output (``GPU 0: NVIDIA H100 (UUID: GPU-…)``, MIG devices indented
    below their GPU)."""
    gpus: list[Gpu] = []
    for line in text.splitlines():
        if m := _SMI_GPU.match(line):
            gpus.append(Gpu(index=int(m.group(1)), name=m.group(2), uuid=m.group(3)))
        elif (m := _SMI_MIG.match(line)) and gpus:
            last = gpus[-1]
            gpus[-1] = Gpu(last.index, last.name, last.uuid, (*last.mig, m.group(1)))
    return gpus


def read_proc_gpus(root: Path = PROC_GPUS) -> list[Gpu] | None:
    """The GPUs the driver lists in ``root`` (one folder per PCI address), or None when there is no such
    folder (no NVIDIA driver). A UUID the driver shows as ``GPU-????????-…`` (not yet initialised) is None."""
    try:
        folders = sorted(p for p in root.iterdir() if p.is_dir())
    except OSError:
        return None
    gpus = []
    for index, folder in enumerate(folders):
        fields: dict[str, str] = {}
        try:
            for line in (folder / "information").read_text(errors="replace").splitlines():
                key, sep, val = line.partition(":")
                if sep:
                    fields[key.strip()] = val.strip()
        except OSError:
            pass  # a GPU without its information file is still a GPU
        uuid = fields.get("GPU UUID") or None
        gpus.append(
            Gpu(index=index, name=fields.get("Model", ""), uuid=None if uuid and "?" in uuid else uuid)
        )
    return gpus


Runner = Callable[[Sequence[str], float], str | None]


def run_nvidia_smi(argv: Sequence[str], timeout: float) -> str | None:
    """stdout of ``argv`` (nvidia-smi), or None when it is missing, fails or hangs."""
    try:
        proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    if proc.returncode != 0 and "No devices were found" not in proc.stdout + proc.stderr:
        return None  # no driver, or a broken one: ask /proc
    return proc.stdout


def probe(
    run: Runner = run_nvidia_smi, proc_root: Path = PROC_GPUS, timeout: float = NVIDIA_SMI_TIMEOUT
) -> tuple[list[Gpu], str] | None:
    """The present GPUs and where they were found (nvidia-smi first: in a container it shows only the
    GPUs the runtime mounted), or None when neither nvidia-smi nor the driver's /proc folder answers."""
    out = run(["nvidia-smi", "-L"], timeout)
    if out is not None:
        return parse_nvidia_smi(out), "nvidia-smi"
    gpus = read_proc_gpus(proc_root)
    return (gpus, str(proc_root)) if gpus is not None else None


def _match(prefix: str, uuids: Sequence[str | None]) -> int | None:
    """The index of the one UUID starting with ``prefix``; None when none or several do."""
    hits = [i for i, u in enumerate(uuids) if u is not None and u.startswith(prefix)]
    return hits[0] if len(hits) == 1 else None


def restrict_nvidia(visible: Visible, gpus: list[Gpu]) -> list[Gpu]:
    """The present GPUs ``NVIDIA_VISIBLE_DEVICES`` lets through.

    Its indices and MIG names are the host's, renumbered from 0 inside a container, so they only cap the
    count; UUIDs are the same everywhere and pick the GPUs they name."""
    if visible is None:
        return gpus
    uuids = [e for e in visible if isinstance(e, str) and e.startswith("GPU-")]
    if uuids and len(uuids) == len(visible) and all(g.uuid is not None for g in gpus):
        return [g for g in gpus if g.uuid in uuids]
    return gpus[: len(visible)]


def select(visible: Visible, gpus: list[Gpu]) -> int:
    """How many of ``gpus`` ``CUDA_VISIBLE_DEVICES`` (parsed) lets CUDA enumerate."""
    if visible is None:
        return len(gpus)
    if not visible:
        return 0
    if isinstance(visible[0], str) and visible[0].startswith("MIG-"):
        # CUDA enumerates one MIG device per process, whatever else the list holds.
        return int(_match(visible[0], [u for g in gpus for u in g.mig]) is not None)
    if isinstance(visible[0], str) and any(g.uuid is None for g in gpus):
        return min(len(visible), len(gpus))  # UUIDs unknown (/proc before initialisation): by number
    chosen: list[int] = []
    for entry in visible:
        index = entry if isinstance(entry, int) else _match(entry, [g.uuid for g in gpus])
        if index is None or index >= len(gpus):
            break  # the first device that is not there ends the list
        if index in chosen:
            return 0  # two prefixes of one device: CUDA hides them all
        chosen.append(index)
    return len(chosen)


def count_gpus(
    env: Mapping[str, str] = os.environ,
    *,
    run: Runner = run_nvidia_smi,
    proc_root: Path = PROC_GPUS,
) -> GpuCount:
    """The GPUs this process may use (see the module's docstring), without importing torch."""
    cuda = parse_cuda_visible_devices(env.get("CUDA_VISIBLE_DEVICES"))
    if cuda == []:
        return GpuCount(0, f"CUDA_VISIBLE_DEVICES={env['CUDA_VISIBLE_DEVICES']!r} hides every GPU")
    nvidia = parse_nvidia_visible_devices(env.get("NVIDIA_VISIBLE_DEVICES"))
    if nvidia == []:
        return GpuCount(0, "NVIDIA_VISIBLE_DEVICES=none")
    found = probe(run, proc_root)
    if found is None:
        return GpuCount(0, "no NVIDIA driver: no nvidia-smi, no /proc/driver/nvidia")
    gpus, source = found
    gpus = restrict_nvidia(nvidia, gpus)
    count = select(cuda, gpus)
    limits = [f"{k}={env[k]}" for k in ("NVIDIA_VISIBLE_DEVICES", "CUDA_VISIBLE_DEVICES") if k in env]
    return GpuCount(count, ", ".join([source, *limits]))
