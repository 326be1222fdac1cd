from __future__ import annotations

from kubetune.api.v1alpha1 import FineTuneJob
from kubetune.contract import ENV_COMPLETION_INDEX, RENDEZVOUS_PORT, SPEC_PATH
from kubetune.launch import accelerate_argv
from kubetune.render import render_job


def flags(argv: list[str]) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for i, a in enumerate(argv):
        if a.startswith("--"):
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            out[a] = None if nxt is None or nxt.startswith("-") else nxt
    return out


def test_one_process_runs_the_trainer_directly() -> None:
    """No launcher in between, so SIGTERM (preemption) reaches the trainer and it checkpoints."""
    for gpus in ("0", "1"):
        argv = accelerate_argv(
            {"KUBETUNE_SPEC": "/s.yaml", "KUBETUNE_GPUS_PER_NODE": gpus}, ["--output", "/o"]
        )
        assert argv == ["python", "-m", "kubetune.trainer", "--spec", "/s.yaml", "--output", "/o"]


def test_ddp_on_one_node() -> None:
    argv = accelerate_argv({"KUBETUNE_SPEC": "/s.yaml", "KUBETUNE_GPUS_PER_NODE": "8"})
    assert argv[:2] == ["accelerate", "launch"]
    assert argv[-4:] == ["-m", "kubetune.trainer", "--spec", "/s.yaml"]
    f = flags(argv)
    assert "--multi_gpu" in f and f["--num_processes"] == "8" and "--machine_rank" not in f


def test_fsdp() -> None:
    f = flags(accelerate_argv({"KUBETUNE_GPUS_PER_NODE": "4", "KUBETUNE_DISTRIBUTED": "fsdp"}))
    assert "--use_fsdp" in f and f["--fsdp_sharding_strategy"] == "FULL_SHARD"


def test_multi_node_rank_comes_from_the_indexed_job() -> None:
    env = {
        "KUBETUNE_NUM_NODES": "4",
        "KUBETUNE_GPUS_PER_NODE": "8",
        "KUBETUNE_MASTER_ADDR": "run-0.run",
        "KUBETUNE_MASTER_PORT": "29500",
        "JOB_COMPLETION_INDEX": "3",
    }
    f = flags(accelerate_argv(env, ["--output", "/o"]))
    assert f["--num_processes"] == "32" and f["--num_machines"] == "4"
    assert f["--machine_rank"] == "3" and f["--main_process_ip"] == "run-0.run"
    assert f["--output"] == "/o"


def test_the_launcher_reads_what_the_renderer_writes() -> None:
    """The rendered Job's environment, plus the index Kubernetes adds, gives the command for that pod
    (both sides spell the names through kubetune.contract)."""
    job = FineTuneJob.model_validate(
        {
            "apiVersion": "kubetune.io/v1alpha1",
            "kind": "FineTuneJob",
            "metadata": {"name": "tune", "namespace": "team-a"},
            "spec": {
                "model": {"id": "org/base"},
                "dataset": {"id": "org/data"},
                "resources": {"gpusPerNode": 4, "nodes": 2},
            },
        }
    )
    rendered = render_job(job)
    container = rendered["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    f = flags(accelerate_argv({**env, ENV_COMPLETION_INDEX: "1"}))
    name = rendered["metadata"]["name"]
    assert f["--spec"] == SPEC_PATH and f["--num_processes"] == "8" and f["--num_machines"] == "2"
    assert f["--machine_rank"] == "1" and f["--main_process_ip"] == f"{name}-0.{name}"
    assert f["--main_process_port"] == str(RENDEZVOUS_PORT)
    assert container["command"] == ["python", "-m", "kubetune.launch"]
