"""Counting GPUs without torch (kubetune.gpus): the variables' rules, nvidia-smi and /proc, and the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

from kubetune.gpus import (
    Gpu,
    GpuCount,
    count_gpus,
    parse_cuda_visible_devices,
    parse_nvidia_smi,
    parse_nvidia_visible_devices,
    probe,
    read_proc_gpus,
    restrict_nvidia,
    run_nvidia_smi,
    select,
)

ROOT = Path(__file__).resolve().parent.parent
U0 = "GPU-4a2c1b9e-1111-2222-3333-444455556666"
U1 = "GPU-4a9d0000-aaaa-bbbb-cccc-ddddeeeeffff"
U2 = "GPU-77770000-aaaa-bbbb-cccc-ddddeeeeffff"
MIG = "MIG-0b1c2d3e-0000-5555-6666-777788889999"
SMI = f"""\
GPU 0: NVIDIA H100 80GB HBM3 (UUID: {U0})
GPU 1: NVIDIA A100-SXM4-40GB (UUID: {U1})
  MIG 3g.20gb     Device  0: (UUID: {MIG})
GPU 2: NVIDIA A100-SXM4-40GB (UUID: {U2})
"""
THREE = parse_nvidia_smi(SMI)


@pytest.mark.parametrize(
    ("value", "parsed"),
    [
        (None, None),  # unset: every GPU
        ("", []),
        ("-1", []),
        ("none", []),
        ("void", []),
        ("all", []),  # not a CUDA word: no number, no GPU (as CUDA and torch read it)
        ("0,1", [0, 1]),
        (" 1, 2", [1, 2]),
        ("1gpu2,2ampere", [1, 2]),  # strtoul: the leading number
        ("0,-1,1", [0]),  # a negative index ends the list
        ("0,x,1", [0]),
        ("0,1,0", []),  # a repeated index hides every GPU
        (f"{U0},{U1}", [U0, U1]),
        (f"{U0},0", [U0]),  # UUIDs and indices do not mix: the list ends
        (f"{U0},{U0}", []),
        (MIG, [MIG]),
    ],
)
def test_cuda_visible_devices(value: str | None, parsed: list[int] | list[str] | None) -> None:
    assert parse_cuda_visible_devices(value) == parsed


@pytest.mark.parametrize(
    ("value", "parsed"),
    [
        (None, None),
        ("", None),  # the runtime exposed nothing: the present devices say so
        ("void", None),
        ("all", None),
        ("/var/run/nvidia-container-devices", None),  # the device plugin's volume-mounts strategy
        ("none", []),
        ("0,1", [0, 1]),
        ("0, 0,1", [0, 1]),
        (f"{U1},{U2}", [U1, U2]),
        ("0:1,0:2", ["0:1", "0:2"]),  # MIG devices by GPU:instance
    ],
)
def test_nvidia_visible_devices(value: str | None, parsed: list[int] | list[str] | None) -> None:
    assert parse_nvidia_visible_devices(value) == parsed


def test_nvidia_smi_output() -> None:
    assert parse_nvidia_smi(SMI) == [
        Gpu(0, "NVIDIA H100 80GB HBM3", U0),
        Gpu(1, "NVIDIA A100-SXM4-40GB", U1, (MIG,)),
        Gpu(2, "NVIDIA A100-SXM4-40GB", U2),
    ]
    assert parse_nvidia_smi("No devices were found\n") == []
    assert parse_nvidia_smi("GPU 0: Tesla T4\n") == [Gpu(0, "Tesla T4", None)]  # old drivers: no UUID


def _proc_gpu(root: Path, bus: str, model: str, uuid: str) -> None:
    folder = root / bus
    folder.mkdir(parents=True)
    (folder / "information").write_text(
        f"Model: \t\t {model}\nIRQ:   \t\t 45\nGPU UUID: \t {uuid}\n"
        f"Bus Location: \t {bus}\nDevice Minor: \t 0\n"
    )


def test_proc_driver_folder(tmp_path: Path) -> None:
    root = tmp_path / "gpus"
    _proc_gpu(root, "0000:41:00.0", "NVIDIA L4", "GPU-????????-????-????-????-????????????")
    _proc_gpu(root, "0000:01:00.0", "NVIDIA L4", U0)
    (root / "0000:81:00.0").mkdir()  # no information file: still a GPU
    assert read_proc_gpus(root) == [
        Gpu(0, "NVIDIA L4", U0),  # PCI order, as nvidia-smi numbers them
        Gpu(1, "NVIDIA L4", None),  # not initialised yet: UUID unknown
        Gpu(2, "", None),
    ]
    assert read_proc_gpus(tmp_path / "absent") is None  # no driver
    (tmp_path / "empty").mkdir()
    assert read_proc_gpus(tmp_path / "empty") == []


@pytest.mark.parametrize(
    ("cuda", "count"),
    [
        (None, 3),
        ("", 0),
        ("2", 1),
        ("0,1,2,3", 3),  # index 3 is not there: the list ends
        ("5,0", 0),
        ("GPU-4a", 0),  # ambiguous prefix (U0 and U1): the list ends before it
        ("GPU-4a2c,GPU-7777", 2),
        (f"{U1},GPU-ffff,{U0}", 1),  # no such GPU: the list ends
        (f"GPU-4a2c,{U0}", 0),  # one GPU twice: none
        (MIG, 1),
        (f"{MIG},{U0}", 1),  # one MIG device per process
        ("MIG-ffff", 0),
    ],
)
def test_select(cuda: str | None, count: int) -> None:
    assert select(parse_cuda_visible_devices(cuda), THREE) == count


def test_select_with_unknown_uuids_counts_by_number() -> None:
    unknown = [Gpu(0), Gpu(1)]
    assert select([U0, U1, U2], unknown) == 2
    assert select([U0], unknown) == 1


def test_nvidia_visible_devices_restrict_the_present_ones() -> None:
    assert restrict_nvidia(None, THREE) == THREE
    assert [g.index for g in restrict_nvidia([U2, U0], THREE)] == [0, 2]
    # Host indices, renumbered inside the container: they cap the count.
    assert len(restrict_nvidia([4, 7], THREE)) == 2
    assert len(restrict_nvidia([U0, U1], [Gpu(0)])) == 1


class FakeSmi:
    def __init__(self, out: str | None) -> None:
        self.out = out
        self.calls: list[list[str]] = []

    def __call__(self, argv: Sequence[str], timeout: float) -> str | None:
        self.calls.append(list(argv))
        assert timeout <= 10
        return self.out


def test_count_from_nvidia_smi_then_proc(tmp_path: Path) -> None:
    smi = FakeSmi(SMI)
    assert count_gpus({}, run=smi, proc_root=tmp_path / "none") == GpuCount(3, "nvidia-smi")
    assert smi.calls == [["nvidia-smi", "-L"]]
    got = count_gpus({"CUDA_VISIBLE_DEVICES": "1,2"}, run=smi, proc_root=tmp_path / "none")
    assert got.count == 2 and got.source == "nvidia-smi, CUDA_VISIBLE_DEVICES=1,2"
    # nvidia-smi missing or failing: the driver's folder.
    _proc_gpu(tmp_path / "gpus", "0000:01:00.0", "NVIDIA L4", U0)
    assert count_gpus({}, run=FakeSmi(None), proc_root=tmp_path / "gpus") == GpuCount(
        1, str(tmp_path / "gpus")
    )
    got = count_gpus({}, run=FakeSmi(None), proc_root=tmp_path / "none")
    assert got.count == 0 and "no NVIDIA driver" in got.source


def test_count_in_a_kubernetes_container(tmp_path: Path) -> None:
    """The device plugin names the pod's GPUs by UUID; the two variables combine."""
    env = {"NVIDIA_VISIBLE_DEVICES": f"{U2},{U1}"}
    assert count_gpus(env, run=FakeSmi(SMI), proc_root=tmp_path).count == 2
    env["CUDA_VISIBLE_DEVICES"] = "1"
    assert count_gpus(env, run=FakeSmi(SMI), proc_root=tmp_path).count == 1
    env["CUDA_VISIBLE_DEVICES"] = U0  # not among the pod's GPUs
    assert count_gpus(env, run=FakeSmi(SMI), proc_root=tmp_path).count == 0


@pytest.mark.parametrize(
    ("env", "reason"),
    [
        ({"CUDA_VISIBLE_DEVICES": ""}, "CUDA_VISIBLE_DEVICES='' hides every GPU"),
        ({"CUDA_VISIBLE_DEVICES": "-1"}, "CUDA_VISIBLE_DEVICES='-1' hides every GPU"),
        ({"NVIDIA_VISIBLE_DEVICES": "none"}, "NVIDIA_VISIBLE_DEVICES=none"),
    ],
)
def test_hidden_gpus_need_no_probe(tmp_path: Path, env: dict[str, str], reason: str) -> None:
    smi = FakeSmi(SMI)
    assert count_gpus(env, run=smi, proc_root=tmp_path) == GpuCount(0, reason)
    assert smi.calls == []


def _fake_smi(folder: Path, script: str) -> Path:
    folder.mkdir(exist_ok=True)
    path = folder / "nvidia-smi"
    path.write_text("#!/bin/sh\n" + script)
    path.chmod(0o755)
    return path


def test_run_nvidia_smi(tmp_path: Path) -> None:
    assert run_nvidia_smi([str(tmp_path / "absent")], 1.0) is None
    ok = _fake_smi(tmp_path / "ok", f"printf '%s' '{SMI}'\n")
    assert run_nvidia_smi([str(ok), "-L"], 5.0) == SMI
    failed = _fake_smi(
        tmp_path / "failed", "echo 'NVIDIA-SMI has failed because it couldn'\"'\"'t communicate'; exit 9\n"
    )
    assert run_nvidia_smi([str(failed)], 5.0) is None
    none = _fake_smi(tmp_path / "none", "echo 'No devices were found'; exit 6\n")
    assert run_nvidia_smi([str(none)], 5.0) == "No devices were found\n"
    hung = _fake_smi(tmp_path / "hung", "exec sleep 30\n")
    assert run_nvidia_smi([str(hung)], 0.5) is None


def test_probe_finds_nvidia_smi_on_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_smi(tmp_path / "bin", f"[ \"$1\" = -L ] || exit 2\nprintf '%s' '{SMI}'\n")
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    assert probe(proc_root=tmp_path / "none") == (THREE, "nvidia-smi")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert probe(proc_root=tmp_path / "none") is None


RUN_IN_CLI = """
import json, sys
from kubetune import cli
calls = []
cli.run_forwarding_signals = lambda argv, env: calls.append((argv, env)) or 0
try:
    cli.main(sys.argv[1:], standalone_mode=False)
except SystemExit:
    pass
heavy = {'torch', 'transformers', 'trl', 'peft', 'datasets', 'bitsandbytes', 'accelerate'}
argv, env = calls[-1]  # the trainer (after the data step, where there is one)
modules = [a[a.index("-m") + 1] for a, _ in calls]
print(json.dumps({"heavy": sorted(heavy & set(sys.modules)), "argv": argv, "modules": modules,
                  "gpus": env["KUBETUNE_GPUS_PER_NODE"], "cpu": env.get("ACCELERATE_USE_CPU")}))
"""


def _run_cli(tmp_path: Path, *args: str, **env: str) -> dict[str, object]:
    import json

    out = subprocess.run(
        [
            sys.executable,
            "-c",
            RUN_IN_CLI,
            "run",
            str(ROOT / "jobs/tiny-local.yaml"),
            "--local",
            "-o",
            str(tmp_path / "out"),
            *args,
        ],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, **env},
        timeout=120,
    )
    result: dict[str, object] = json.loads(out.stdout.strip().splitlines()[-1])
    result["stderr"] = out.stderr
    return result


def test_run_local_counts_gpus_without_torch(tmp_path: Path) -> None:
    """`kubetune run --local` launches one process per visible GPU, and never imports torch itself."""
    _fake_smi(tmp_path / "bin", f"printf '%s' '{SMI}'\n")
    path = f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}"
    got = _run_cli(tmp_path, PATH=path, CUDA_VISIBLE_DEVICES="0,2")
    assert got["heavy"] == []
    assert got["gpus"] == "2" and got["cpu"] is None
    argv = got["argv"]
    assert (
        isinstance(argv, list)
        and "--num_processes" in argv
        and argv[argv.index("--num_processes") + 1] == "2"
    )
    assert "on 2 GPU(s) (nvidia-smi, CUDA_VISIBLE_DEVICES=0,2)" in str(got["stderr"])
    # Two training processes: the data is prepared first, in a process of its own.
    assert got["modules"] == ["kubetune.trainer.prepare", "kubetune.trainer"]

    got = _run_cli(tmp_path, PATH=path, CUDA_VISIBLE_DEVICES="")
    assert got["heavy"] == [] and got["gpus"] == "0"
    argv = got["argv"]
    assert isinstance(argv, list) and argv[1:3] == ["-m", "kubetune.trainer"]  # one process, no launcher
    assert got["modules"] == ["kubetune.trainer"]  # which prepares the data itself: no extra interpreter


def test_run_local_gpus_flag_overrides_the_count(tmp_path: Path) -> None:
    _fake_smi(tmp_path / "bin", f"printf '%s' '{SMI}'\n")
    path = f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}"
    got = _run_cli(tmp_path, "--gpus", "0", PATH=path)
    # CPU even where torch would see a GPU: the trainer reads accelerate's variable.
    assert got["gpus"] == "0" and got["cpu"] == "true" and got["heavy"] == []
    got = _run_cli(tmp_path, "--gpus", "2", PATH=path)
    assert got["gpus"] == "2" and got["cpu"] is None


def test_validate_and_the_cli_import_do_not_load_the_gpu_count() -> None:
    """`kubetune validate` (bench/startup.py) pays nothing for the count: kubetune.gpus loads in `run`."""
    code = (
        "import sys\n"
        "from kubetune.cli import main\n"
        f"main(['validate', '-q', {str(ROOT / 'jobs')!r}], standalone_mode=False)\n"
        "print('kubetune.gpus' in sys.modules, 'torch' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.strip().splitlines()[-1] == "False False"
