"""The `kubetune` command line. Thin: each command calls one library function.

Only PyYAML, pydantic and click are imported at start-up; torch and friends load inside `run`.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import click

from kubetune import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="kubetune")
def main() -> None:
    """Fine-tune language models on Kubernetes: FineTuneJob -> GPU Jobs -> Hugging Face Hub."""


@main.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("-q", "--quiet", is_flag=True, help="Print errors only.")
def validate(paths: tuple[str, ...], quiet: bool) -> None:
    """Validate FineTuneJobs in files or folders (multi-document YAML; other kinds are skipped).

    Each error is printed as `file:line: field.path: message`. Exit code 0 when every job is valid.
    """
    from kubetune.api.load import validate_paths

    result = validate_paths(paths)
    for problem in result.problems:
        click.echo(str(problem))
    if result.problems:
        click.echo(f"{len(result.problems)} error(s) in {result.files} file(s)", err=True)
        sys.exit(1)
    if not result.jobs:
        click.echo(f"no FineTuneJob found in {result.files} file(s)", err=True)
        sys.exit(1)
    if not quiet:
        skipped = f", {result.skipped} other document(s) skipped" if result.skipped else ""
        click.echo(f"ok: {len(result.jobs)} FineTuneJob(s) valid in {result.files} file(s){skipped}")


def _load_or_exit(file: str):  # type: ignore[no-untyped-def]
    from kubetune.api.load import InvalidJob, load_job

    try:
        return load_job(file)
    except InvalidJob as e:
        for problem in e.problems:
            click.echo(str(problem), err=True)
        sys.exit(1)


@main.command()
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@click.option("-n", "--namespace", default=None, help="Namespace to render into (default: the job's).")
@click.option("--image", default=None, help="Trainer image (default: the one matching this version).")
def render(file: str, namespace: str | None, image: str | None) -> None:
    """Print the Kubernetes objects the operator creates for FILE, as YAML."""
    from kubetune.render import render as render_objects
    from kubetune.render import to_yaml

    job = _load_or_exit(file)
    if namespace:
        job.metadata.namespace = namespace
    click.echo(to_yaml(render_objects(job, image=image)), nl=False)


@main.command()
def crd() -> None:
    """Print the FineTuneJob CustomResourceDefinition."""
    from kubetune.api.generate import render_crd_yaml

    click.echo(render_crd_yaml(), nl=False)


@main.command()
def schema() -> None:
    """Print the FineTuneJob JSON schema (for editors and CI linters)."""
    from kubetune.api.generate import render_schema_json

    click.echo(render_schema_json(), nl=False)


def _local_gpus() -> int:
    try:
        import torch
    except ImportError:
        raise click.ClickException(
            "the trainer is not installed: pip install 'kubetune[trainer]' (or run `make demo`)"
        ) from None
    return int(torch.cuda.device_count())


@main.command()
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@click.option("--local", is_flag=True, help="Train on this machine (CPU or its GPUs).")
@click.option(
    "-o",
    "--output",
    type=click.Path(file_okay=False),
    default=None,
    help="Output folder (default: out/<job name>). Rerunning resumes from its last checkpoint.",
)
@click.option("--gpus", type=int, default=None, help="GPUs to use (default: all visible; 0 = CPU).")
def run(file: str, local: bool, output: str | None, gpus: int | None) -> None:
    """Run the trainer on FILE, exactly as a cluster Job would.

    With --local it trains here through `accelerate launch`, shows progress, and writes the adapter,
    tokenizer, model card, metrics and samples to the output folder.
    """
    if not local:
        raise click.UsageError(
            "only local runs are built in: add --local, "
            "or `kubectl apply -f FILE` with the operator installed"
        )
    from kubetune.launch import accelerate_argv

    job = _load_or_exit(file)
    out = Path(output or Path("out") / job.metadata.name).resolve()
    count = _local_gpus() if gpus is None else gpus
    env = {
        **os.environ,
        "KUBETUNE_SPEC": str(Path(file).resolve()),
        "KUBETUNE_NUM_NODES": "1",
        "KUBETUNE_GPUS_PER_NODE": str(count),
        "KUBETUNE_DISTRIBUTED": job.spec.training.distributed,
    }
    argv = accelerate_argv(env, ["--output", str(out)])
    # Use this interpreter and the launcher beside it (a venv's bin/ need not be on PATH).
    argv[0] = sys.executable if argv[0] == "python" else str(Path(sys.executable).with_name(argv[0]))
    click.echo(f"kubetune: training {job.metadata.name} on {count or 'no'} GPU(s) -> {out}", err=True)
    sys.exit(subprocess.call(argv, env=env))


@main.command()
@click.option(
    "--kubeconfig",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="Kubeconfig (default: in-cluster, then ~/.kube/config).",
)
@click.option("-n", "--namespace", default=None, help="Watch one namespace (default: all).")
@click.option("--workers", type=int, default=4, show_default=True, help="Objects reconciled in parallel.")
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
def operator(
    kubeconfig: str | None,
    namespace: str | None,
    workers: int,
    image: str | None,
    log_format: str,
    health_addr: str | None,
    metrics_addr: str | None,
    leader_elect: bool,
    leader_election_namespace: str | None,
) -> None:
    """Run the operator: reconcile FineTuneJobs into trainer Jobs and mirror their state."""
    try:
        from kubetune.controller.kube import Kube, load_client
        from kubetune.controller.leader import LeaderElector
        from kubetune.controller.operator import Operator, setup_logging
    except ImportError:
        raise click.ClickException(
            "the operator is not installed: pip install 'kubetune[operator]'"
        ) from None
    setup_logging(log_format)
    api_client = load_client(kubeconfig)
    elector = None
    if leader_elect:
        if not leader_election_namespace:
            raise click.UsageError("--leader-elect needs --leader-election-namespace (or $POD_NAMESPACE)")
        import socket
        import uuid

        identity = f"{socket.gethostname()}_{uuid.uuid4().hex[:8]}"
        elector = LeaderElector(api_client, leader_election_namespace, identity)
    op = Operator(Kube(api_client), namespace=namespace, workers=workers, image=image)
    sys.exit(op.run_forever(health_addr=health_addr, metrics_addr=metrics_addr, elector=elector))


if __name__ == "__main__":
    main()
