"""The `kubetune` command line. Thin: each command calls one library function.

Only PyYAML, pydantic and click are imported at start-up; torch and friends load inside `run`.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import FrameType

import click

from kubetune import __version__
from kubetune.contract import ENV_PREPARE_NUM_PROC


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="kubetune")
def main() -> None:
    """Fine-tune language models on Kubernetes: FineTuneJob -> GPU Jobs -> Hugging Face Hub."""


@main.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(allow_dash=True))
@click.option("-q", "--quiet", is_flag=True, help="Print errors only.")
def validate(paths: tuple[str, ...], quiet: bool) -> None:
    """Validate FineTuneJobs in files or folders (multi-document YAML, `v1 List`s; other kinds are
    skipped); `-` reads standard input.

    Each error is printed on its own line as `file:line: field.path: message` (line 0: the whole file),
    then a summary. Exit code 0 when every job is valid, 1 when there is a problem, 2 when kubetune
    itself failed. Nothing printed holds a token.
    """
    from kubetune.api.kyaml import REPORT
    from kubetune.api.load import validate_paths
    from kubetune.redact import redact

    try:
        result = validate_paths(paths)
        lines = [str(problem) for problem in result.problems]
    except Exception as e:  # validate_paths catches per file and object; this is the last net
        click.echo(f"kubetune: internal error ({type(e).__name__}); {redact(REPORT)}", err=True)
        sys.exit(2)
    try:
        for line in lines:
            click.echo(line)
        sys.stdout.flush()  # every problem is out, each on its own line, before the summary
        if result.problems:
            click.echo(f"{len(result.problems)} error(s) in {result.files} file(s)", err=True)
            sys.exit(1)
        if not result.jobs:
            click.echo(f"no FineTuneJob found in {result.files} file(s)", err=True)
            sys.exit(1)
        if not quiet:
            skipped = f", {result.skipped} other document(s) skipped" if result.skipped else ""
            click.echo(f"ok: {len(result.jobs)} FineTuneJob(s) valid in {result.files} file(s){skipped}")
    except BrokenPipeError:  # `kubetune validate jobs/ | head -1`: stop quietly, as other tools do
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)


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


@main.command()
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@click.option("-o", "--output", type=click.Choice(["table", "json"]), default="table", show_default=True)
@click.option("--gpu-type", default=None, help="A nvidia.com/gpu.product value (default: resources.gpuType).")
@click.option("--gpu-memory", default=None, help="GPU memory instead of the table's, e.g. 24GiB or 23028MiB.")
@click.option("--dataset-tokens", type=int, default=None, help="Tokens in one epoch, for the epoch time.")
def plan(
    file: str, output: str, gpu_type: str | None, gpu_memory: str | None, dataset_tokens: int | None
) -> None:
    """Estimate FILE's peak GPU memory per GPU, tokens per step and time per step, before submitting it.

    Reads the model's config.json alone (model.path, or model.id from the Hub with HF_TOKEN or the
    `hf auth login` token); counts parameters exactly on the meta device where transformers is installed.
    Exit code 0 when the job fits its GPU (or none is named), 1 when it does not, 2 when it cannot be
    planned.
    """
    import json

    from kubetune import contract
    from kubetune import plan as planner
    from kubetune.api.load import InvalidJob, load_job
    from kubetune.redact import redact
    from kubetune.trainer.spec import base_dir

    try:
        job = load_job(file)
    except InvalidJob as e:
        for problem in e.problems:
            click.echo(str(problem), err=True)
        sys.exit(2)
    try:
        memory = planner.parse_memory(gpu_memory) if gpu_memory else None
        report = planner.plan_job(
            job,
            base_dir(Path(file)),
            gpu_type=gpu_type,
            gpu_memory=memory,
            token=os.environ.get(contract.ENV_HF_TOKEN) or None,
            dataset_tokens=dataset_tokens,
        )
    except (planner.PlanError, ValueError) as e:
        click.echo(f"kubetune: cannot plan {file}: {redact(str(e))}", err=True)
        sys.exit(2)
    if output == "json":
        click.echo(json.dumps(report.as_dict(), indent=2))
    else:
        from rich.console import Console

        Console(width=max(100, Console().width)).print(planner.render(report))
    if report.gated and not report.fits:
        target, est = report.targets[0], report.estimates[0]
        why = planner.unfit_message(est, target.memory_bytes, target.source)
        click.echo(f"kubetune: {job.metadata.name} does not fit: {why}", err=True)
        sys.exit(1)


@main.command()
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@click.option(
    "--num-proc",
    type=click.IntRange(min=1),
    default=None,
    help=f"Tokenizing processes (default: ${ENV_PREPARE_NUM_PROC}, else one per CPU).",
)
def prepare(file: str, num_proc: int | None) -> None:
    """Load, clean, tokenize and pack FILE's data into the prepared-data cache, as the cluster's
    `prepare` init container does; the trainer then only loads it.

    The cache is $KUBETUNE_PREPARED_DIR, else ~/.cache/kubetune/prepared (in the cluster: the
    workspace's .cache/kubetune/prepared); an unchanged input is a cache hit. Exit codes are the
    trainer's (2 invalid spec, 3 dataset error, ...).
    """
    try:
        from kubetune.trainer.prepare import main as prepare_main
    except ImportError:
        raise click.ClickException(
            "the trainer is not installed: pip install 'kubetune[trainer]' (or run `make demo`)"
        ) from None
    sys.exit(prepare_main(["--spec", file, *(["--num-proc", str(num_proc)] if num_proc else [])]))


def _local_gpus(requested: int | None) -> tuple[int, str]:
    """GPUs for a local run and where the number came from: --gpus, or those visible here, counted without
    importing torch (1-2 s the CLI need not pay: the trainer imports it and picks its device itself)."""
    import importlib.util

    if importlib.util.find_spec("torch") is None:
        raise click.ClickException(
            "the trainer is not installed: pip install 'kubetune[trainer]' (or run `make demo`)"
        )
    if requested is not None:
        return requested, "--gpus"
    from kubetune.gpus import count_gpus

    found = count_gpus()
    return found.count, found.source


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def run_forwarding_signals(argv: list[str], env: dict[str, str]) -> int:
    """Run the trainer in its own session and wait for it, as a terminal user expects of Ctrl-C.

    The first SIGINT/SIGTERM (or SIGHUP: the terminal closed) is forwarded once to the trainer's process
    group, which then saves a checkpoint at the end of the current step and exits (143); the second kills
    it at once (SIGKILL). Returns the trainer's exit code (128 + N when a signal N killed it)."""
    proc: subprocess.Popen[bytes] | None = None
    stops = 0

    def forward(signum: int, frame: FrameType | None) -> None:
        nonlocal stops
        stops += 1
        if proc is None:
            return  # not started yet: forwarded right after the start
        if stops == 1:
            click.echo(
                "\nkubetune: stopping: the trainer saves a checkpoint at the end of this step, then exits "
                "(Ctrl-C again kills it at once, without a checkpoint)",
                err=True,
            )
            _signal_group(proc.pid, signal.SIGTERM if signum == signal.SIGHUP else signum)
        else:
            click.echo("kubetune: killing the trainer", err=True)
            _signal_group(proc.pid, signal.SIGKILL)

    handled = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {sig: signal.signal(sig, forward) for sig in handled}
    try:
        # Its own session: a Ctrl-C in the terminal reaches this process only, and is forwarded once.
        proc = subprocess.Popen(argv, env=env, start_new_session=True)
        if stops:
            _signal_group(proc.pid, signal.SIGTERM if stops == 1 else signal.SIGKILL)
        code = proc.wait()
    finally:
        if proc is not None and proc.poll() is None:  # this process is going away: so does the trainer
            _signal_group(proc.pid, signal.SIGKILL)
            proc.wait()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 128 - code if code < 0 else code


@main.command()
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@click.option("--local", is_flag=True, help="Train on this machine (CPU or its GPUs).")
@click.option(
    "-o",
    "--output",
    type=click.Path(file_okay=False),
    default=None,
    help="Output folder (default: out/<job name>); the run writes to <output>/runs/<name>-<spec hash>/. "
    "Rerunning the same spec resumes from its last checkpoint.",
)
@click.option(
    "--gpus",
    type=click.IntRange(min=0),
    default=None,
    help="GPUs to use, one process each (default: those visible, counted by nvidia-smi or the driver's "
    "/proc folder under CUDA_VISIBLE_DEVICES; 0 = the CPU, even where there are GPUs).",
)
def run(file: str, local: bool, output: str | None, gpus: int | None) -> None:
    """Run the trainer on FILE, exactly as a cluster Job would.

    With --local it trains here through `accelerate launch`, shows progress, and writes the adapter,
    tokenizer, model card, metrics and samples to the run's folder under the output folder. Ctrl-C
    saves a checkpoint at the end of the current step and stops (exit code 143); running the same
    command again resumes. Ctrl-C twice stops at once.
    """
    if not local:
        raise click.UsageError(
            "only local runs are built in: add --local, "
            "or `kubectl apply -f FILE` with the operator installed"
        )
    from kubetune import contract
    from kubetune.launch import accelerate_argv
    from kubetune.trainer.errors import SpecError
    from kubetune.trainer.layout import run_dir, run_name

    job = _load_or_exit(file)
    out = Path(output or Path("out") / job.metadata.name).resolve()
    try:
        folder = run_dir(out, run_name(job))
    except SpecError as e:
        raise click.ClickException(str(e)) from None
    count, source = _local_gpus(gpus)
    env = {
        **os.environ,
        contract.ENV_SPEC: str(Path(file).resolve()),
        contract.ENV_NUM_NODES: "1",
        contract.ENV_GPUS_PER_NODE: str(count),
        contract.ENV_DISTRIBUTED: job.spec.training.distributed,
    }
    if gpus == 0:  # the CPU, even where torch sees a GPU (the trainer reads accelerate's variable)
        env["ACCELERATE_USE_CPU"] = "true"
    argv = accelerate_argv(env, ["--output", str(out)])
    # Use this interpreter and the launcher beside it (a venv's bin/ need not be on PATH).
    argv[0] = sys.executable if argv[0] == "python" else str(Path(sys.executable).with_name(argv[0]))
    click.echo(f"kubetune: training {job.metadata.name} on {count or 'no'} GPU(s) ({source})", err=True)
    click.echo(f"kubetune: run folder: {folder}", err=True)
    # Several training processes: the data first, in a process of its own; they then only load it. A
    # lone trainer prepares it itself, first thing (the same cached step): a process for it alone would
    # import torch, transformers and datasets once more (bench/startup_train.py).
    if count > 1:
        prepare_argv = [sys.executable, "-m", "kubetune.trainer.prepare", "--spec", env[contract.ENV_SPEC]]
        code = run_forwarding_signals(prepare_argv, env)
        if code != contract.Exit.OK:
            reason = contract.REASON_BY_EXIT.get(code, "error")
            click.echo(f"kubetune: preparing the data failed (exit code {code}, {reason})", err=True)
            sys.exit(code)
    code = run_forwarding_signals(argv, env)
    if code == contract.Exit.OK:
        click.echo(f"kubetune: done: {folder}", err=True)
    elif code == contract.Exit.PREEMPTED:
        from kubetune.trainer.resume import find_resume_checkpoint

        checkpoint, _ = find_resume_checkpoint(folder / "checkpoints")
        if checkpoint is not None:
            click.echo(
                f"kubetune: stopped with a checkpoint in {checkpoint}; run the same command again to resume",
                err=True,
            )
        else:
            click.echo("kubetune: stopped before the first checkpoint was saved", err=True)
    else:
        reason = contract.REASON_BY_EXIT.get(code, "error")
        click.echo(f"kubetune: the trainer failed (exit code {code}, {reason}); see {folder}", err=True)
    sys.exit(code)


@main.command(
    context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
    add_help_option=False,
)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def operator(args: tuple[str, ...]) -> None:
    """Run the operator (the kubetune-operator package; `kubetune operator --help` for its flags)."""
    try:
        from kubetune_operator.cli import main as run_operator
    except ImportError:
        raise click.ClickException("the operator is not installed: pip install kubetune-operator") from None
    run_operator.main(args=list(args), prog_name="kubetune operator")


if __name__ == "__main__":
    main()
