"""One training run: spec → data → model → SFTTrainer → adapter, samples, metrics, card, Hub.

Each run writes into its own folder, ``<output>/runs/<run>/`` (see :mod:`kubetune.trainer.layout`):
``<output>`` is ``--output`` or ``spec.output.path``, ``<run>`` is ``$KUBETUNE_RUN`` or
``<name>-<spec hash>``. A restart of the same run resumes from its newest complete checkpoint; once
``training-complete.json`` is there, a restart does not train again but evaluates, saves, writes the card
and pushes again.

Every process trains; only the main process writes files other than checkpoints, generates samples,
merges and pushes.

What a run leaves besides its checkpoints: ``adapter/`` (``model/`` for full fine-tuning) and, with
``output.merged``, ``merged/``, each with its model card (``README.md``) and the loss curve it embeds
(``loss.png``); the same card and curve, ``metrics.json`` (with the lineage), ``samples.json`` and
``progress.json`` in the run folder. No pickle goes into those folders (``training_args.bin`` stays in the
checkpoints), and :func:`kubetune.trainer.hub.plan_upload` refuses to push one.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import math
import os
import shutil
import sys
import warnings
from pathlib import Path
from typing import Any

from kubetune.api.v1alpha1 import FineTuneJob
from kubetune.contract import ENV_RUN, ENV_TERMINATION_LOG, TERMINATION_MESSAGE_MAX, progress_line
from kubetune.redact import install_process_redaction, redact, redact_data
from kubetune.trainer import config as cfg
from kubetune.trainer import layout
from kubetune.trainer.errors import OutOfMemory, Preempted, TrainerError
from kubetune.trainer.progress import ProgressFile, write_json_atomic
from kubetune.trainer.resume import PreemptionFlag, checkpoint_step, find_resume_checkpoint
from kubetune.trainer.spec import base_dir as spec_base_dir
from kubetune.trainer.spec import load_job, resolve_output

log = logging.getLogger("kubetune.trainer")

LOSS_CURVE = "loss.png"  # in the run folder, and beside each model card
_TRAINING_ARGS = "training_args.bin"  # transformers.trainer.TRAINING_ARGS_NAME


class _StdoutHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to the *current* ``sys.stdout`` (so redirections and test capture see it)."""

    def __init__(self) -> None:
        super().__init__(sys.stdout)

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stdout
        super().emit(record)


def setup_logging(is_main: bool) -> None:
    if not any(isinstance(h, _StdoutHandler) for h in log.handlers):
        handler = _StdoutHandler()
        handler.setFormatter(logging.Formatter("[kubetune] %(message)s"))
        log.addHandler(handler)
        log.propagate = False
    log.setLevel(logging.INFO if is_main else logging.WARNING)
    import datasets
    import transformers

    tlog = transformers.utils.logging
    tlog.set_verbosity_warning() if is_main else tlog.set_verbosity_error()
    if sys.stdout.isatty() and is_main:
        datasets.enable_progress_bars()
        tlog.enable_progress_bar()
    else:
        datasets.disable_progress_bars()
        tlog.disable_progress_bar()
    # bitsandbytes warns on every 8-bit matmul that its inputs are cast to fp16.
    logging.getLogger("bitsandbytes.autograd._functions").setLevel(logging.ERROR)
    # Library noise: peft/TRL still call transformers' renamed gradient_checkpointing* methods.
    warnings.filterwarnings(
        "ignore", message=r".*gradient_checkpointing.* is deprecated", category=FutureWarning
    )
    # No secret in any log line, warning or traceback: ours and the libraries' (their handlers exist now).
    install_process_redaction(log.name, "transformers", "huggingface_hub", "datasets", "accelerate")


def _losses(log_history: list[dict[str, Any]]) -> list[float]:
    return [float(e["loss"]) for e in log_history if isinstance(e.get("loss"), (int, float))]


def _finished(checkpoint: Path, args: Any) -> bool:
    """Whether ``checkpoint`` is the last step of the training ``args`` describe."""
    import json

    state = json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8"))
    if args.max_steps > 0:
        return int(state.get("global_step", 0)) >= int(args.max_steps)
    return float(state.get("epoch") or 0.0) >= float(args.num_train_epochs) - 1e-6


def _mark_complete(
    run_folder: Path, state: Any, reason: layout.CompletionReason, final: Path, best: str | Path | None
) -> None:
    """Write the completion marker: from now on a restart of this run never trains again."""
    layout.write_completion(
        run_folder,
        layout.Completion.new(
            step=state.global_step,
            max_steps=state.max_steps,
            epoch=float(state.epoch or 0.0),
            reason=reason,
            final_checkpoint=final,
            best_checkpoint=best,
        ),
    )


# What torch and the libraries around it raise when a GPU runs out of memory: torch.OutOfMemoryError,
# sometimes wrapped (or re-raised as a RuntimeError with torch's text, or reported by cuBLAS).
_OOM_TEXT = ("CUDA out of memory", "CUDA error: out of memory", "CUBLAS_STATUS_ALLOC_FAILED")
_PHASE_WORDS = {
    "Loading": "loading the model and data",
    "Training": "training",
    "Evaluating": "evaluating",
    "Saving": "saving (adapter, samples, merged model)",
    "Pushing": "pushing",
}


def find_out_of_memory(exc: BaseException) -> BaseException | None:
    """The CUDA out-of-memory error in ``exc`` or in the exceptions it was raised from, if any."""
    torch = sys.modules.get("torch")
    oom_type = getattr(torch, "OutOfMemoryError", None) if torch is not None else None
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(oom_type, type) and isinstance(current, oom_type):
            return current
        if isinstance(current, RuntimeError) and any(text in str(current) for text in _OOM_TEXT):
            return current
        current = current.__cause__ or current.__context__
    return None


def out_of_memory_message(job: FineTuneJob, oom: BaseException, progress: dict[str, Any]) -> str:
    """What to change when CUDA ran out of memory: the knobs that lower memory use, with their values."""
    t, gpu = job.spec.training, job.spec.resources.gpu_type
    phase = str(progress.get("state") or "Loading")
    where = _PHASE_WORDS.get(phase, phase.lower())
    if phase == "Training" and progress.get("step"):
        where += f" (after step {progress['step']})"
    detail = str(oom).strip().splitlines()[0][:300] if str(oom).strip() else type(oom).__name__
    checkpointing = (
        "turn on training.gradientCheckpointing (now false)"
        if not t.gradient_checkpointing
        else "training.gradientCheckpointing is already on"
    )
    return (
        f"CUDA out of memory while {where}: {detail}. To fit in GPU memory: lower "
        f"training.perDeviceBatchSize (now {t.per_device_batch_size}) and raise "
        f"training.gradientAccumulationSteps (now {t.gradient_accumulation_steps}) to keep the effective "
        f"batch size; lower training.maxSeqLength (now {t.max_seq_length}); {checkpointing}; or ask for a "
        f"GPU with more memory with resources.gpuType (now {repr(gpu) if gpu else 'unset'})."
    )


def _completion_reason(st: Any, args: Any) -> layout.CompletionReason:
    if st.max_steps and st.global_step < st.max_steps:
        return "early_stopping"
    return "max_steps" if args.max_steps > 0 else "epochs"


def run(spec_path: str | Path, output_dir: str | Path | None = None) -> dict[str, Any]:
    spec_file = Path(spec_path)
    job = load_job(spec_file)  # SpecError before any heavy import
    base_dir = spec_base_dir(spec_file)
    out = resolve_output(job.spec, base_dir, output_dir)
    run_name = layout.run_name(job)
    run_folder = layout.run_dir(out, run_name)
    # Rank 0 reports (accelerate launch sets RANK; PartialState, which knows for sure, is not loaded yet).
    progress = ProgressFile(
        run_folder / "progress.json", enabled=os.environ.get("RANK", "0") == "0", run=run_name
    )
    from kubetune.trainer import hub, trackers

    try:
        # No token for output.hub: say so now, not after hours of training. ($KUBETUNE_RUN unset means
        # a local run: then the token of `hf auth login` counts too.)
        token = hub.require_token(job, local=not os.environ.get(ENV_RUN))
        # The same for the trackers of training.reportTo: their packages and Secrets.
        trackers.require_credentials(job)
    except TrainerError as exc:
        with contextlib.suppress(OSError):  # a read-only output folder must not hide the error
            progress.update("Failed", message=redact(str(exc))[:1000])
        raise

    # The data, before the process group exists: prepared already (`kubetune prepare`, the Job's prepare
    # init container), it is only loaded; otherwise the first process to take the cache's lock prepares
    # it while the others wait on the lock, not under an NCCL/gloo timeout.
    setup_logging(True)  # every process says how it got its data; the levels are set per rank below
    try:
        from kubetune.trainer import lineage, modeling
        from kubetune.trainer.prepare import load_or_prepare

        # The base model's commit (or its files' digests), before anything of it loads: the tokenizer,
        # the model and the merge then load that exact commit (modeling.model_source pins it). Once per
        # run: every rank and every restart reads what the first process resolved.
        base_model = lineage.resolve_for_run(job.spec, base_dir, run_folder).as_dict()
        tokenizer = modeling.load_tokenizer(job.spec, base_dir)
        prepared = load_or_prepare(job.spec, base_dir, tokenizer, run_folder=run_folder)
    except BaseException as exc:
        text = str(exc) if isinstance(exc, TrainerError) else f"{type(exc).__name__}: {exc}"
        with contextlib.suppress(OSError):
            progress.update("Failed", message=redact(text)[:1000])
        raise

    from accelerate import PartialState

    # `accelerate launch --cpu` sets ACCELERATE_USE_CPU: train on the CPU even where there are GPUs.
    state = PartialState(cpu=os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes"))
    setup_logging(state.is_main_process)
    progress.enabled = state.is_main_process
    flag = PreemptionFlag().install()
    try:
        if state.is_main_process:
            run_folder.mkdir(parents=True, exist_ok=True)
        log.info("run %s: writing to %s", run_name, run_folder)
        # Every progress line from now on carries the commit (the operator's status.baseModelCommit).
        progress.update("Loading", base_model_commit=base_model.get("commit"))
        return _run(
            job, base_dir, out, run_folder, state, progress, flag, token, tokenizer, prepared, base_model
        )
    except Preempted as exc:
        progress.update("Preempted", eta_seconds=None, **({"step": exc.step} if exc.step is not None else {}))
        raise
    except BaseException as exc:
        oom = None if isinstance(exc, TrainerError) else find_out_of_memory(exc)
        if oom is not None:
            error = OutOfMemory(out_of_memory_message(job, oom, progress.data))
            progress.update("Failed", eta_seconds=None, message=redact(str(error))[:1000])
            raise error from exc
        text = str(exc) if isinstance(exc, TrainerError) else f"{type(exc).__name__}: {exc}"
        progress.update("Failed", eta_seconds=None, message=redact(text)[:1000])
        raise
    finally:
        flag.uninstall()


def _run(
    job: FineTuneJob,
    base_dir: Path,
    out: Path,
    run_folder: Path,
    state: Any,
    progress: ProgressFile,
    flag: PreemptionFlag,
    token: str | None,
    tokenizer: Any,
    prepared: Any,  # kubetune.trainer.prepare.Prepared
    base_model: dict[str, Any],  # kubetune.trainer.lineage.ModelLineage.as_dict()
) -> dict[str, Any]:
    import torch
    from transformers import EarlyStoppingCallback, PrinterCallback, set_seed
    from trl import SFTConfig, SFTTrainer

    from kubetune.trainer import lineage, modeling, packing
    from kubetune.trainer.callbacks import CheckpointCallback, ProgressCallback

    spec = job.spec
    run_name = run_folder.name
    is_main = state.is_main_process
    hw = modeling.hardware(state)
    log.info(
        "FineTuneJob %s: %s of %s on %s (%d process%s)",
        job.metadata.name,
        spec.method.type,
        spec.model.id or spec.model.path,
        "GPU" if hw.cuda else "CPU",
        state.num_processes,
        "" if state.num_processes == 1 else "es",
    )
    if is_main and (out / "checkpoints").is_dir():
        log.warning(
            "%s holds checkpoints of an older kubetune, which wrote every run there; they are not resumed "
            "(nothing says which spec they belong to): each run now has its own folder under %s",
            out / "checkpoints",
            out / layout.RUNS_DIR,
        )
    set_seed(spec.training.seed)

    # Data: prepared (tokenized, truncated, packed) before the process group started; see run().
    log.info("data: %s", prepared.stats.summary())
    has_eval = prepared.eval is not None

    # Model.
    model = modeling.load_model(spec, base_dir, hw)
    # Lineage: the exact commits (or file digests) behind revisions such as "main", and the run.
    run_lineage: dict[str, Any] = {
        "base_model": base_model,
        "datasets": list(prepared.lineage.get("datasets") or []),
        "run": lineage.run_info(job, run_name),
    }
    quantized_layers = modeling.count_quantized_layers(model)
    if quantized_layers:
        log.info("%d linear layers quantized by bitsandbytes", quantized_layers)
    lora = modeling.lora_config(spec, model)
    if lora is not None and base_model.get("commit"):
        # adapter_config.json names the base commit: AutoPeftModel.from_pretrained(adapter) loads the base
        # it was trained on, not whatever the branch points at by then.
        lora.revision = base_model["commit"]

    ckpt_dir = run_folder / "checkpoints"
    sft_kwargs = cfg.sft_config_kwargs(spec, str(ckpt_dir), has_eval=has_eval, hw=hw)
    from kubetune.trainer import trackers

    sft_kwargs.update(trackers.sft_kwargs(job, run_folder, is_main=is_main))  # training.reportTo
    sft_kwargs["include_num_input_tokens_seen"] = "non_padding"
    # The rows are tokenized, truncated and packed already: TRL must not do any of it again.
    sft_kwargs["dataset_kwargs"] = {"skip_prepare_dataset": True}
    args = SFTConfig(**sft_kwargs)
    progress_cb = ProgressCallback(progress, is_main=is_main, tty=sys.stdout.isatty())
    ckpt_cb = CheckpointCallback(flag)
    callbacks: list[Any] = [progress_cb]
    if spec.training.early_stopping_patience is not None and has_eval:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=spec.training.early_stopping_patience))
    callbacks.append(ckpt_cb)  # after early stopping: it saves the step early stopping stops at
    trainer_kwargs: dict[str, Any] = {}
    collator = packing.data_collator(spec, tokenizer, model)
    if collator is not None:
        trainer_kwargs["data_collator"] = collator
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=prepared.train,
        eval_dataset=prepared.eval,
        processing_class=tokenizer,
        peft_config=lora,
        callbacks=callbacks,
        **trainer_kwargs,
    )
    trainer.remove_callback(PrinterCallback)  # our ProgressCallback prints instead
    # TRL casts modulesToSave copies of a quantized model to bf16; without mixed precision they must be
    # float32 again, like the activations they meet.
    modeling.restore_copy_dtypes(trainer.model, spec, hw)
    model = trainer.model
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    log.info("trainable parameters: %d of %d", trainable, total)

    # Resume from the newest complete checkpoint of this run (after a preemption or a failure).
    resume, partial = find_resume_checkpoint(ckpt_dir)
    if is_main:
        for p in partial:
            log.warning("removing incomplete checkpoint %s", p)
            shutil.rmtree(p, ignore_errors=True)
    resumed_from = checkpoint_step(resume) if resume is not None else None
    completion = layout.read_completion(run_folder)
    if flag.requested:
        raise Preempted(
            f"{flag.signal_name} before training started; nothing new to checkpoint", step=resumed_from
        )

    if completion is not None or (resume is not None and _finished(resume, args)):
        # Training is over (the marker, or, for runs of older versions, a checkpoint at the last step):
        # never train again (transformers would run on past max_steps, or past where early stopping
        # stopped). Load the final (or best) weights and go on with evaluation, saving and pushing.
        from transformers import TrainerState

        final = resume
        if completion is not None and checkpoint_step(ckpt_dir / completion.final_checkpoint) is not None:
            final = ckpt_dir / completion.final_checkpoint
        if final is None:
            raise TrainerError(
                f"{run_folder / layout.COMPLETE_MARKER} says training finished at step "
                f"{completion.step if completion else '?'}, but {ckpt_dir} holds no complete checkpoint "
                f"to load its weights from; delete {run_folder} to train this spec again"
            )
        trainer.state = TrainerState.load_from_json(str(final / "trainer_state.json"))
        st = trainer.state
        reason = completion.reason if completion is not None else _completion_reason(st, args)
        best_name = completion.best_checkpoint if completion is not None else None
        if best_name is None and st.best_model_checkpoint:
            best_name = Path(st.best_model_checkpoint).name  # the folder may be mounted elsewhere now
        best = ckpt_dir / best_name if best_name else None
        weights = best if args.load_best_model_at_end and best is not None and best.is_dir() else final
        log.info(
            "training already complete at step %d (%s): not training again; loading the %s weights of "
            "%s, then evaluating, saving and pushing",
            st.global_step,
            reason.replace("_", " "),
            "best" if weights != final else "final",
            weights.name,
        )
        trainer._load_from_checkpoint(str(weights))
        if completion is None and is_main:
            _mark_complete(run_folder, st, reason, final, best_name)
        train_summary: dict[str, Any] = {}
        training_loss = None
    else:
        if resume is not None:
            log.info("resuming from step %d (%s)", resumed_from, resume)
        result = trainer.train(resume_from_checkpoint=str(resume) if resume is not None else None)
        train_summary = dict(result.metrics)
        training_loss = float(result.training_loss)
        st = trainer.state
        # A stop request in the very step early stopping ended training at: training is over all the same.
        stopped_early = any(
            isinstance(c, EarlyStoppingCallback)
            and c.early_stopping_patience_counter >= c.early_stopping_patience
            for c in callbacks
        )
        if ckpt_cb.preempted_at is not None and st.global_step < st.max_steps and not stopped_early:
            raise Preempted(
                f"preempted ({flag.signal_name}) at step {st.global_step}/{st.max_steps}; checkpoint saved, "
                "the next start resumes from it",
                step=st.global_step,
            )
        reason = _completion_reason(st, args)
        final = ckpt_dir / f"checkpoint-{st.global_step}"
        if is_main:
            # Training is over: from now on a restart (a failed push, an evicted pod) never trains again.
            _mark_complete(run_folder, st, reason, final, st.best_model_checkpoint)
        log.info("training complete at step %d (%s)", st.global_step, reason.replace("_", " "))

    def stop_if_requested(before: str, every_process: bool = True) -> None:
        """SIGTERM/SIGINT after training: stop between steps (a restart redoes only what follows)."""
        if ckpt_cb.requested(args) if every_process else flag.requested:
            raise Preempted(
                f"{flag.signal_name or 'a stop request'} before {before}; training is complete (step "
                f"{st.global_step}): the next start evaluates, saves and pushes without training",
                step=st.global_step,
            )

    metrics: dict[str, Any] = {
        "method": spec.method.type,
        "run": run_name,
        "steps": st.global_step,
        "max_steps": st.max_steps,
        "epochs": round(float(st.epoch or 0.0), 4),
        "completion_reason": reason,
        "resumed_from_step": resumed_from,
    }
    losses = _losses(st.log_history)
    if losses:
        metrics["train_loss_first"] = losses[0]
        metrics["train_loss_last"] = losses[-1]
    if training_loss is not None:
        metrics["train_loss_mean"] = training_loss  # of this session's steps
    # Runtime and throughput of this session (after a resume: of the steps it ran).
    for key in ("train_runtime", "train_samples_per_second", "train_steps_per_second"):
        if isinstance(train_summary.get(key), (int, float)):
            metrics[key] = float(train_summary[key])
    tokens = int(getattr(st, "num_input_tokens_seen", 0) or 0) - progress_cb.tokens_at_start
    if metrics.get("train_runtime") and tokens > 0:
        metrics["train_tokens"] = tokens  # non-padding tokens, all processes
        metrics["train_tokens_per_second"] = round(tokens / metrics["train_runtime"], 2)
    metrics["lineage"] = run_lineage
    metrics["trainable_parameters"] = trainable
    metrics["total_parameters"] = total
    metrics["quantized_layers"] = quantized_layers

    if has_eval:
        stop_if_requested("evaluating")
        progress.update("Evaluating", eta_seconds=0)
        last_eval = next((e for e in reversed(st.log_history) if "eval_loss" in e), None)
        if (
            last_eval is not None
            and last_eval.get("step") == st.global_step
            and not args.load_best_model_at_end
        ):
            eval_loss = float(last_eval["eval_loss"])  # just evaluated at the last step
        else:
            eval_loss = float(trainer.evaluate()["eval_loss"])
        metrics["eval_loss"] = eval_loss
        metrics["perplexity"] = math.exp(eval_loss) if eval_loss < 700 else math.inf
    metrics["data"] = prepared.stats.as_dict()
    metrics["prepared"] = prepared.as_dict()

    # Save: every process takes part (FSDP gathers the shards), the main process writes.
    stop_if_requested("saving")
    progress.update("Saving", eta_seconds=0)
    model_dir = run_folder / ("adapter" if spec.method.uses_adapter else "model")
    trainer.save_model(str(model_dir))
    if not is_main:
        return metrics
    # Trainer.save_model pickles the SFTConfig next to the weights (training_args.bin): no pickle goes
    # into what is pushed or handed on. The checkpoints keep theirs, for resuming.
    (model_dir / _TRAINING_ARGS).unlink(missing_ok=True)
    tokenizer.save_pretrained(str(model_dir))  # with its chat template

    samples: list[dict[str, str]] = []
    if spec.samples.prompts:
        if spec.training.distributed == "fsdp" and state.num_processes > 1:
            log.warning("samples skipped: generating from one rank of a sharded (FSDP) model would hang")
        else:
            # What the model says goes into samples.json, the card and the log: never a secret.
            samples = redact_data(modeling.generate_samples(trainer.model, tokenizer, spec, hw))
            for s in samples:
                log.info("sample: %r → %r", s["prompt"], s["completion"])
    write_json_atomic(run_folder / "samples.json", samples)

    del trainer, model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()

    merged_dir = None
    if spec.output.wants_merged and spec.method.uses_adapter:
        # With or without output.hub: the merged model is a result of the run like the adapter.
        merged_dir = run_folder / "merged"
        modeling.merge_adapter(spec, base_dir, model_dir, merged_dir, hw)
        tokenizer.save_pretrained(str(merged_dir))
    elif spec.output.wants_merged:
        log.info("output.merged: nothing to merge for method.type full (%s holds the whole model)", model_dir)

    from kubetune.trainer import plot
    from kubetune.trainer.card import CardKind, render_card

    # The loss curve beside every card, which embeds it by its file name (the Hub shows it so too).
    curve = plot.render_loss_curve(list(st.log_history), run_folder / LOSS_CURVE)
    kind: CardKind = "adapter" if spec.method.uses_adapter else "model"
    cards: list[tuple[Path, CardKind]] = [(run_folder, kind), (model_dir, kind)]
    if merged_dir is not None:
        cards.append((merged_dir, "merged"))
    for folder, card_kind in cards:
        card = render_card(
            spec,
            name=job.metadata.name,
            metrics=metrics,
            samples=samples,
            lineage=run_lineage,
            kind=card_kind,
            loss_curve=LOSS_CURVE if curve is not None else None,
        )
        (folder / "README.md").write_text(card, encoding="utf-8")
        if curve is None:  # no points to draw: no curve of an earlier attempt either
            (folder / LOSS_CURVE).unlink(missing_ok=True)
        elif folder != run_folder:
            shutil.copyfile(curve, folder / LOSS_CURVE)
    write_json_atomic(run_folder / "metrics.json", metrics)

    if spec.output.hub is not None:
        from kubetune.trainer import hub

        stop_if_requested("pushing", every_process=False)  # the other processes are done
        progress.update("Pushing")
        files = hub.plan_upload(
            root_folder=model_dir if (spec.output.push_adapter or not spec.method.uses_adapter) else None,
            extra_files=[
                run_folder / "README.md",
                run_folder / LOSS_CURVE,
                run_folder / "metrics.json",
                run_folder / "samples.json",
            ],
            merged_folder=merged_dir,
        )
        metrics["hub_commit_url"] = hub.push(
            spec.output.hub,
            files,
            commit_message=f"kubetune: {job.metadata.name} ({spec.method.type}, run {run_name})",
            token=token,
        )
        write_json_atomic(run_folder / "metrics.json", metrics)

    progress.update(
        "Succeeded",
        step=metrics["steps"],
        total_steps=metrics["max_steps"],
        loss=metrics.get("train_loss_last"),
        eta_seconds=0,
        base_model_commit=base_model.get("commit"),
        hub_commit_url=metrics.get("hub_commit_url"),
        **({"eval_loss": metrics["eval_loss"]} if "eval_loss" in metrics else {}),
    )
    _leave_final_progress(progress.data)
    log.info("done: %s", run_folder)
    return metrics


def _leave_final_progress(report: dict[str, Any]) -> None:
    """The final progress line as the container's termination message too: the operator reads a pod's
    log only while it runs, so it may never see the line printed just before the trainer exits (the
    one with the Hub commit URL); the Pod's status keeps the termination message."""
    target = os.environ.get(ENV_TERMINATION_LOG)
    line = progress_line(report)
    if not target or len(line.encode()) > TERMINATION_MESSAGE_MAX:
        return
    try:
        Path(target).write_text(line, encoding="utf-8")
    except OSError as exc:
        log.warning("could not write the termination message to %s: %s", target, exc)
