from __future__ import annotations

from kubetune.launch import accelerate_argv


def flags(argv: list[str]) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for i, a in enumerate(argv):
        if a.startswith("--"):
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            out[a] = None if nxt is None or nxt.startswith("-") else nxt
    return out


def test_single_gpu() -> None:
    argv = accelerate_argv({"KUBETUNE_SPEC": "/s.yaml", "KUBETUNE_GPUS_PER_NODE": "1"})
    f = flags(argv)
    assert argv[:2] == ["accelerate", "launch"]
    assert f["--num_processes"] == "1" and "--multi_gpu" not in f and "--cpu" not in f
    assert argv[-4:] == ["-m", "kubetune.trainer", "--spec", "/s.yaml"]


def test_cpu() -> None:
    f = flags(accelerate_argv({"KUBETUNE_GPUS_PER_NODE": "0"}))
    assert "--cpu" in f and f["--num_processes"] == "1"


def test_ddp_on_one_node() -> None:
    f = flags(accelerate_argv({"KUBETUNE_GPUS_PER_NODE": "8"}))
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
