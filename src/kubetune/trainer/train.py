"""One training run: spec → data → model → SFTTrainer → adapter, samples, metrics, card, Hub.

Output layout (``<output>`` is ``--output`` or ``spec.output.path``)::

    checkpoints/checkpoint-N/   Trainer checkpoints (resume after preemption)
    adapter/                    the LoRA adapter + tokenizer with chat template + README.md (model/ for full)
    merged/                     base + adapter merged (output.pushMerged)
    progress.json               state, step, total_steps, loss, eta_seconds, epoch, updated_at
    metrics.json  samples.json  README.md (the model card)

Every process trains; only the main process writes files other than checkpoints, generates samples,
merges and pushes.
"""

from __future__ import annotations

import gc
import logging
import math
import os
import shutil
import sys
import warnings
from pathlib import Path
from typing import Any

from kubetune.api.v1alpha1 import HF_TOKEN_RE, FineTuneJob
from kubetune.trainer import config as cfg
from kubetune.trainer.errors import Preempted
from kubetune.trainer.progress import ProgressFile, write_json_atomic
from kubetune.trainer.resume import PreemptionFlag, checkpoint_step, find_resume_checkpoint
from kubetune.trainer.spec import base_dir as spec_base_dir
from kubetune.trainer.spec import load_job, resolve_output

log = logging.getLogger("kubetune.trainer")


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


def _losses(log_history: list[dict[str, Any]]) -> list[float]:
    return [float(e["loss"]) for e in log_history if isinstance(e.get("loss"), (int, float))]


def _finished(checkpoint: Path, args: Any) -> bool:
    """Whether ``checkpoint`` is the last step of the training ``args`` describe."""
    import json

    state = json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8"))
    if args.max_steps > 0:
        return int(state.get("global_step", 0)) >= int(args.max_steps)
    return float(state.get("epoch") or 0.0) >= float(args.num_train_epochs) - 1e-6


def _pack(dataset: Any, block_size: int) -> Any:
    """Concatenate the tokenized (and truncated) rows and cut them into ``block_size`` blocks."""
    from trl.data_utils import pack_dataset

    return pack_dataset(dataset.select_columns(["input_ids", "labels"]), block_size, "wrapped")


def run(spec_path: str | Path, output_dir: str | Path | None = None) -> dict[str, Any]:
    spec_file = Path(spec_path)
    job = load_job(spec_file)  # SpecError before any heavy import
    base_dir = spec_base_dir(spec_file)
    out = resolve_output(job.spec, base_dir, output_dir)

    from accelerate import PartialState

    # `accelerate launch --cpu` sets ACCELERATE_USE_CPU: train on the CPU even where there are GPUs.
    state = PartialState(cpu=os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes"))
    setup_logging(state.is_main_process)
    progress = ProgressFile(out / "progress.json", enabled=state.is_main_process)
    flag = PreemptionFlag().install()
    try:
        if state.is_main_process:
            out.mkdir(parents=True, exist_ok=True)
        progress.update("Loading")
        return _run(job, base_dir, out, state, progress, flag)
    except Preempted as exc:
        progress.update("Preempted", eta_seconds=None, **({"step": exc.step} if exc.step is not None else {}))
        raise
    except BaseException as exc:
        message = HF_TOKEN_RE.sub("hf_***", f"{type(exc).__name__}: {exc}")[:1000]
        progress.update("Failed", eta_seconds=None, message=message)
        raise
    finally:
        flag.uninstall()


def _run(
    job: FineTuneJob,
    base_dir: Path,
    out: Path,
    state: Any,
    progress: ProgressFile,
    flag: PreemptionFlag,
) -> dict[str, Any]:
    import torch
    from transformers import EarlyStoppingCallback, PrinterCallback, set_seed
    from trl import SFTConfig, SFTTrainer

    from kubetune.trainer import data as data_mod
    from kubetune.trainer import modeling
    from kubetune.trainer.callbacks import CheckpointCallback, ProgressCallback

    spec = job.spec
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
    set_seed(spec.training.seed)

    # Data (the main process first: the others then read the datasets cache).
    tokenizer = modeling.load_tokenizer(spec, base_dir)
    with state.main_process_first():
        prepared = data_mod.prepare(spec, base_dir, tokenizer)
    log.info("data: %s", prepared.stats.summary())
    has_eval = prepared.eval is not None

    # Model.
    model = modeling.load_model(spec, base_dir, hw)
    # Lineage: the exact commits (or file digests) behind revisions such as "main".
    lineage: dict[str, Any] = {"base_model_commit": getattr(model.config, "_commit_hash", None)}
    if is_main:
        lineage.update(data_mod.lineage(spec.dataset, base_dir))
    quantized_layers = modeling.count_quantized_layers(model)
    if quantized_layers:
        log.info("%d linear layers quantized by bitsandbytes", quantized_layers)
    lora = modeling.lora_config(spec, model)

    ckpt_dir = out / "checkpoints"
    sft_kwargs = cfg.sft_config_kwargs(spec, str(ckpt_dir), has_eval=has_eval, hw=hw)
    sft_kwargs["include_num_input_tokens_seen"] = "non_padding"
    args = SFTConfig(**sft_kwargs)
    progress_cb = ProgressCallback(progress, is_main=is_main, tty=sys.stdout.isatty())
    ckpt_cb = CheckpointCallback(flag)
    callbacks: list[Any] = [progress_cb, ckpt_cb]
    if spec.training.early_stopping_patience is not None and has_eval:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=spec.training.early_stopping_patience))
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=prepared.train,
        eval_dataset=prepared.eval,
        processing_class=tokenizer,
        peft_config=lora,
        callbacks=callbacks,
    )
    trainer.remove_callback(PrinterCallback)  # our ProgressCallback prints instead
    block_size = cfg.packing_block_size(spec)
    if block_size is not None:
        with state.main_process_first():
            trainer.train_dataset = _pack(trainer.train_dataset, block_size)
            if trainer.eval_dataset is not None:
                trainer.eval_dataset = _pack(trainer.eval_dataset, block_size)
        n_blocks = len(trainer.train_dataset)
        log.info(
            "packed %d rows into %d blocks of %d tokens", prepared.stats.train_rows, n_blocks, block_size
        )
    model = trainer.model
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    log.info("trainable parameters: %d of %d", trainable, total)

    # Resume from the newest complete checkpoint (after a preemption, a failure or a finished run).
    resume, partial = find_resume_checkpoint(ckpt_dir)
    if is_main:
        for p in partial:
            log.warning("removing incomplete checkpoint %s", p)
            shutil.rmtree(p, ignore_errors=True)
    resumed_from = checkpoint_step(resume) if resume is not None else None
    if resume is not None:
        log.info("resuming from step %d (%s)", resumed_from, resume)
    if flag.requested:
        raise Preempted("SIGTERM before training started; nothing new to checkpoint", step=resumed_from)

    if resume is not None and _finished(resume, args):
        # transformers would run one more step past max_steps when resuming a finished run: load the
        # final (or best) weights instead and go on with evaluation, saving and pushing.
        from transformers import TrainerState

        log.info("training had already finished at step %d", resumed_from)
        trainer.state = TrainerState.load_from_json(str(resume / "trainer_state.json"))
        best = trainer.state.best_model_checkpoint
        final = Path(best) if args.load_best_model_at_end and best and Path(best).is_dir() else resume
        trainer._load_from_checkpoint(str(final))
        train_summary: dict[str, Any] = {}
        training_loss = None
    else:
        result = trainer.train(resume_from_checkpoint=str(resume) if resume is not None else None)
        train_summary = dict(result.metrics)
        training_loss = float(result.training_loss)
    st = trainer.state
    if ckpt_cb.preempted_at is not None and st.global_step < st.max_steps:
        raise Preempted(
            f"preempted at step {st.global_step}/{st.max_steps}; checkpoint saved, resume on restart",
            step=st.global_step,
        )

    metrics: dict[str, Any] = {
        "method": spec.method.type,
        "steps": st.global_step,
        "max_steps": st.max_steps,
        "epochs": round(float(st.epoch or 0.0), 4),
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
    metrics["lineage"] = lineage
    metrics["trainable_parameters"] = trainable
    metrics["total_parameters"] = total
    metrics["quantized_layers"] = quantized_layers

    if has_eval:
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

    # Save: every process takes part (FSDP gathers the shards), the main process writes.
    progress.update("Saving", eta_seconds=0)
    model_dir = out / ("adapter" if spec.method.uses_adapter else "model")
    trainer.save_model(str(model_dir))
    if not is_main:
        return metrics
    tokenizer.save_pretrained(str(model_dir))  # with its chat template

    samples: list[dict[str, str]] = []
    if spec.samples.prompts:
        if spec.training.distributed == "fsdp" and state.num_processes > 1:
            log.warning("samples skipped: generating from one rank of a sharded (FSDP) model would hang")
        else:
            samples = modeling.generate_samples(trainer.model, tokenizer, spec, hw)
            for s in samples:
                log.info("sample: %r → %r", s["prompt"], s["completion"])
    write_json_atomic(out / "samples.json", samples)

    del trainer, model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()

    merged_dir = None
    if spec.output.push_merged and spec.method.uses_adapter:
        merged_dir = out / "merged"
        modeling.merge_adapter(spec, base_dir, model_dir, merged_dir, hw)
        tokenizer.save_pretrained(str(merged_dir))

    from kubetune.trainer.card import render_card

    card = render_card(spec, name=job.metadata.name, metrics=metrics, samples=samples)
    for folder in (out, model_dir):
        (folder / "README.md").write_text(card, encoding="utf-8")
    write_json_atomic(out / "metrics.json", metrics)

    if spec.output.hub is not None:
        from kubetune.trainer import hub

        progress.update("Pushing")
        files = hub.plan_upload(
            root_folder=model_dir if (spec.output.push_adapter or not spec.method.uses_adapter) else None,
            extra_files=[out / "README.md", out / "metrics.json", out / "samples.json"],
            merged_folder=merged_dir,
        )
        metrics["hub_commit_url"] = hub.push(
            spec.output.hub, files, commit_message=f"kubetune: {job.metadata.name} ({spec.method.type})"
        )
        write_json_atomic(out / "metrics.json", metrics)

    progress.update(
        "Succeeded",
        step=metrics["steps"],
        total_steps=metrics["max_steps"],
        loss=metrics.get("train_loss_last"),
        eta_seconds=0,
        **({"eval_loss": metrics["eval_loss"]} if "eval_loss" in metrics else {}),
    )
    log.info("done: %s", out)
    return metrics
