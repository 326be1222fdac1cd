"""The trainer container's entrypoint: `accelerate launch` of kubetune.trainer on the mounted spec
(or the trainer itself, when the run is a single process).

The Job sets the variables of kubetune.contract (see kubetune.render) and, being Indexed,
JOB_COMPLETION_INDEX, which is this pod's machine rank. `kubetune run --local` builds its command with
the same function.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence

from kubetune.contract import (
    ENV_COMPLETION_INDEX,
    ENV_DISTRIBUTED,
    ENV_GPUS_PER_NODE,
    ENV_MASTER_ADDR,
    ENV_MASTER_PORT,
    ENV_NUM_NODES,
    ENV_SPEC,
    RENDEZVOUS_PORT,
    SPEC_PATH,
)


def accelerate_argv(env: Mapping[str, str], extra_args: Sequence[str] = ()) -> list[str]:
    """The `accelerate launch …` command for this pod (pure: everything comes from `env`)."""
    spec = env.get(ENV_SPEC, SPEC_PATH)
    nodes = int(env.get(ENV_NUM_NODES, "1"))
    gpus = int(env.get(ENV_GPUS_PER_NODE, "1"))
    strategy = env.get(ENV_DISTRIBUTED, "ddp")
    processes = max(gpus, 1) * nodes
    trainer = ["-m", "kubetune.trainer", "--spec", spec, *extra_args]
    if processes == 1:
        # No launcher in between: `accelerate launch` does not forward SIGTERM to a lone child, and the
        # trainer must see it to checkpoint before a preempted pod goes away.
        return ["python", *trainer]
    argv = [
        "accelerate",
        "launch",
        "--num_processes",
        str(processes),
        "--num_machines",
        str(nodes),
        # The trainer picks bf16/fp16 itself from the spec; accelerate must not force another.
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
    ]
    if strategy == "fsdp":
        argv += [
            "--use_fsdp",
            "--fsdp_sharding_strategy",
            "FULL_SHARD",
            "--fsdp_auto_wrap_policy",
            "TRANSFORMER_BASED_WRAP",
            "--fsdp_use_orig_params",
            "true",
            "--fsdp_cpu_ram_efficient_loading",
            "true",
            "--fsdp_sync_module_states",
            "true",
            "--fsdp_state_dict_type",
            "SHARDED_STATE_DICT",
        ]
    elif processes > 1:
        argv.append("--multi_gpu")
    if nodes > 1:
        argv += [
            "--machine_rank",
            env.get(ENV_COMPLETION_INDEX, "0"),
            "--main_process_ip",
            env[ENV_MASTER_ADDR],
            "--main_process_port",
            env.get(ENV_MASTER_PORT, str(RENDEZVOUS_PORT)),
            "--same_network",
        ]
    return [*argv, *trainer]


def main() -> None:
    argv = accelerate_argv(os.environ, sys.argv[1:])
    print("kubetune: " + " ".join(argv), flush=True)
    os.execvp(argv[0], argv)


if __name__ == "__main__":
    main()
