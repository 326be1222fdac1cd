"""`kubetune-operator` (also `kubetune operator`): its flags, declared once, here."""

from __future__ import annotations

import sys
from typing import Any

import click

from kubetune_operator.cache import DEFAULT_WATCH_STALL_SECONDS
from kubetune_operator.kube import DEFAULT_BURST, DEFAULT_QPS
from kubetune_operator.operator import DEFAULT_WORKERS
from kubetune_operator.operator import main as run


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--kubeconfig",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="Kubeconfig (default: in-cluster, then ~/.kube/config).",
)
@click.option("-n", "--namespace", default=None, help="Watch one namespace (default: all).")
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=DEFAULT_WORKERS,
    show_default=True,
    help="Objects reconciled in parallel.",
)
@click.option("--image", default=None, help="Trainer image for specs that name none.")
@click.option("--log-format", type=click.Choice(["text", "json"]), default="text", show_default=True)
@click.option("--health-addr", default=None, help="Serve /healthz and /readyz here, e.g. 0.0.0.0:8080.")
@click.option("--metrics-addr", default=None, help="Serve Prometheus /metrics here, e.g. 0.0.0.0:8081.")
@click.option("--leader-elect", is_flag=True, help="Act only while holding the kubetune-operator Lease.")
@click.option(
    "--leader-election-namespace",
    default=None,
    envvar="POD_NAMESPACE",
    help="Namespace of the Lease (default: $POD_NAMESPACE).",
)
@click.option(
    "--image-pull-grace",
    type=click.FloatRange(min=0),
    default=300.0,
    show_default=True,
    help="Seconds a trainer image may fail to pull before the run fails (ImagePullFailed).",
)
@click.option(
    "--secret-precheck/--no-secret-precheck",
    default=True,
    show_default=True,
    help="Check that the Hub token Secret exists (metadata only) before creating a run.",
)
@click.option(
    "--fit-check/--no-fit-check",
    default=True,
    show_default=True,
    help="Refuse a GPU run that cannot fit the memory of its GPU (Unfit) before creating it.",
)
@click.option(
    "--policy-configmap",
    default=None,
    metavar="NAMESPACE/NAME",
    help="The limits on FineTuneJobs (kubetune.policy): checked before each run is created.",
)
@click.option(
    "--qps",
    type=click.FloatRange(min=0),
    default=DEFAULT_QPS,
    show_default=True,
    help="Requests per second to the API server, after the burst (0: unlimited; watches not counted).",
)
@click.option(
    "--burst",
    type=click.IntRange(min=1),
    default=DEFAULT_BURST,
    show_default=True,
    help="Requests the API server may get at once before --qps applies.",
)
@click.option(
    "--watch-stall-seconds",
    type=click.FloatRange(min=1),
    default=DEFAULT_WATCH_STALL_SECONDS,
    show_default=True,
    help="/healthz fails when a watch has heard nothing (no event, no bookmark) for this long.",
)
def main(**options: Any) -> None:
    """Run the operator: reconcile FineTuneJobs into trainer Jobs and mirror their state."""
    sys.exit(run(**options))
