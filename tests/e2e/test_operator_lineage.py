"""The trainer's lineage in a FineTuneJob's status, through a real API server: the base model commit and
the Hub commit URL come from the trainer's final progress line, which it leaves as its termination message
(the log of a pod is read only while it runs), and they stay after the Job and its pods are gone.

KWOK runs no container: the test plays the kubelet of the trainer's pod and writes its status (Succeeded,
with the termination message a real trainer writes) through the pods/status subresource.
"""

from __future__ import annotations

import json
import time
from typing import Any

import test_operator
from test_operator import SLOW, Cluster, manifest, spec

from kubetune.contract import progress_line
from kubetune_operator.operator import Operator

COMMIT = "0123456789abcdef0123456789abcdef01234567"
HUB_URL = f"https://huggingface.co/org/falcon-qlora/commit/{'a' * 40}"

# test_operator's fixtures: the namespace's cluster (with the hf-token Secret) and a running operator.
cluster = test_operator.cluster
operator = test_operator.operator


def _succeed(c: Cluster, pod: dict[str, Any], message: str) -> None:
    """What the kubelet writes when the trainer container exits 0 with a termination message."""
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    running = pod["status"]["containerStatuses"][0]
    started = (running.get("state") or {}).get("running", {}).get("startedAt") or now
    status = {
        "phase": "Succeeded",
        "conditions": [
            {"type": "Ready", "status": "False", "reason": "PodCompleted", "lastTransitionTime": now},
            {
                "type": "ContainersReady",
                "status": "False",
                "reason": "PodCompleted",
                "lastTransitionTime": now,
            },
        ],
        "containerStatuses": [
            {
                "name": running["name"],
                "image": running["image"],
                "imageID": running.get("imageID") or "",
                "ready": False,
                "restartCount": 0,
                "started": False,
                "state": {
                    "terminated": {
                        "exitCode": 0,
                        "reason": "Completed",
                        "message": message,
                        "startedAt": started,
                        "finishedAt": now,
                    }
                },
            }
        ],
    }
    name = pod["metadata"]["name"]
    c.kubectl(
        "patch",
        "pod",
        name,
        "-n",
        c.ns,
        "--subresource=status",
        "--type=merge",
        "-p",
        json.dumps({"status": status}),
    )


def test_the_commit_and_the_hub_url_reach_the_status_and_outlive_the_job(
    cluster: Cluster, operator: Operator
) -> None:
    cluster.apply(
        manifest(
            "lineage",
            cluster.ns,
            spec(podMetadata={"annotations": SLOW}, runPolicy={"ttlSecondsAfterFinished": 1}),
        )
    )
    cluster.wait_state("lineage", "Running")
    [job] = cluster.jobs("lineage")
    [pod] = cluster.items("pods", f"kubetune.io/run={job['metadata']['name']}")
    final = progress_line(
        {
            "state": "Succeeded",
            "step": 10,
            "total_steps": 10,
            "base_model_commit": COMMIT,
            "hub_commit_url": HUB_URL,
        }
    )
    _succeed(cluster, pod, final)

    done = cluster.wait_state("lineage", "Succeeded")
    assert (done["baseModelCommit"], done["hubCommitUrl"]) == (COMMIT, HUB_URL)
    assert (done["phase"], done["progress"]) == ("Succeeded", "100%")
    table = cluster.kubectl("get", "ftj", "lineage", "-n", cluster.ns, "-o", "yaml").stdout
    assert HUB_URL in table

    # The TTL controller deletes the Job and its pods: the status keeps what the trainer said.
    cluster.wait("the TTL controller to delete the Job", lambda: not cluster.jobs("lineage"), timeout=90)
    cluster.kubectl("annotate", "ftj", "lineage", "-n", cluster.ns, "example.com/poke=1")  # one more pass
    time.sleep(3)
    status = cluster.status("lineage")
    assert (status["state"], status["baseModelCommit"], status["hubCommitUrl"]) == (
        "Succeeded",
        COMMIT,
        HUB_URL,
    )
