"""Packing tokenized rows into training sequences (``training.packing``), and the collator that batches them.

- ``none``: rows stay as they are; TRL's collator pads each batch (``groupByLength`` keeps that cheap).
- ``wrapped``: AutoTrain's recipe: rows are concatenated and cut into ``blockSize`` blocks, so a block
  mixes documents inside one attention window (a token sees the tail of the previous document).
- ``bfd``: best-fit-decreasing packs whole rows into bins of at most ``maxSeqLength`` tokens, keeping
  each bin's row lengths (``seq_lengths``). The collator flattens a batch into one padding-free sequence
  with per-row ``position_ids``; the model then attends within each row only: flash-attention varlen
  derives the row boundaries from them, and transformers' mask builder (``find_packed_sequence_indices``)
  turns them into a block-diagonal causal mask for SDPA and eager attention. Families whose forward
  ignores ``position_ids`` for the mask (BLOOM) get the bins split back into padded rows: the same
  loss, without the padding-free speed-up.

The input rows have ``input_ids`` and ``labels`` (``-100``: no loss), already truncated to
``maxSeqLength`` (:mod:`kubetune.trainer.data`). :func:`pack` runs inside the cached prepare step, so
it must not depend on the model; the attention path is chosen when the model is loaded
(:func:`attention_plan`, called by :func:`kubetune.trainer.modeling.load_model`).

``model.attnImplementation`` and ``bfd``: the kernel asked for is the kernel used, and the layout
follows it: ``flash_attention_2`` gets the flattened varlen batch, ``sdpa`` and ``eager`` one row per
bin with the block mask (eager materializes it per head: slower, more memory, the same loss), and a
family that cannot take padding-free batches gets padded rows with that kernel. Unset, ``bfd`` picks
flash-attention where the GPU, the package and the family allow it, else SDPA. A kernel the process or
the family cannot run is refused before any weights load (:mod:`kubetune.trainer.modeling`).
NEFTune scales its noise by the length of the rows it sees: with the flattened layout that is the
whole batch, so the same ``neftuneNoiseAlpha`` adds less noise per token than with padded rows.
"""

from __future__ import annotations

import importlib.util
import inspect
import logging
from dataclasses import dataclass
from typing import Any, Literal

from kubetune.api.v1alpha1 import FineTuneJobSpec
from kubetune.trainer.config import Hardware

log = logging.getLogger("kubetune.trainer")

IGNORE_INDEX = -100
SEQ_LENGTHS = "seq_lengths"

# Families checked by tests/test_trainer_packing.py: a padding-free batch gives each row the logits it
# gets alone. Other families qualify when they use transformers' attention interface (their masks come
# from create_causal_mask with position_ids) and their forward takes position_ids.
PADDING_FREE_FAMILIES = frozenset({"llama", "mistral", "qwen2", "qwen3", "falcon"})
# Verified not to: BLOOM builds its mask from attention_mask alone, so packed rows would see each other.
PADDED_FAMILIES = frozenset({"bloom"})


def pack(dataset: Any, spec: FineTuneJobSpec) -> Any:
    """``dataset`` (``input_ids``, ``labels``) packed as ``training.packing`` says; ``none``: unchanged."""
    t = spec.training
    strategy = t.effective_packing()
    if strategy == "none" or len(dataset) == 0:
        return dataset
    from trl.data_utils import pack_dataset

    rows = dataset.select_columns(["input_ids", "labels"])
    if strategy == "wrapped":
        return pack_dataset(rows, t.effective_block_size(), "wrapped")
    # One batch: bins are filled across the whole split (per 1,000-row batch, each batch would leave
    # its own half-empty bins). Rows are already at most maxSeqLength long, so "bfd" truncates nothing.
    packed = pack_dataset(rows, t.max_seq_length, "bfd", {"batch_size": None})
    return packed.map(_mask_row_starts, batched=True)


def _mask_row_starts(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
    """No loss on the first token of each row: in a flattened batch it would be the next-token target
    of the previous row's last token. (Alone, a row's first label is never a target, so the loss of a
    row is unchanged.)"""
    labels = []
    for row, lengths in zip(batch["labels"], batch[SEQ_LENGTHS], strict=True):
        row = list(row)
        start = 0
        for n in lengths:
            row[start] = IGNORE_INDEX
            start += n
        labels.append(row)
    return {**batch, "labels": labels}


@dataclass(frozen=True)
class AttentionPlan:
    """How ``bfd`` batches reach the model: padding-free (and with which attention), or padded rows."""

    padding_free: bool
    attn_implementation: str | None  # passed to from_pretrained; None: transformers' default
    reason: str

    def describe(self) -> str:
        if self.padding_free:
            kernel = {
                "flash_attention_2": "flash-attention varlen",
                "sdpa": "sdpa with block mask",
                "eager": "eager attention with block mask",
            }.get(self.attn_implementation or "sdpa", str(self.attn_implementation))
            return f"packing bfd: padding-free, {kernel} ({self.reason})"
        kernel = f" ({self.attn_implementation})" if self.attn_implementation else ""
        return (
            f"packing bfd: padded rows{kernel}, no padding-free ({self.reason}); packing none with "
            "groupByLength pads less for this model"
        )


def causal_lm_class(config: Any) -> Any | None:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    try:
        return MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    except KeyError:  # remote code, or not a causal LM transformers knows
        return None


def _takes_position_ids(cls: Any) -> bool:
    return "position_ids" in inspect.signature(cls.forward).parameters


def attention_plan(config: Any, hw: Hardware, requested: str | None = None) -> AttentionPlan:
    """The attention path of ``bfd`` for a model of ``config`` on ``hw`` (before the model is loaded).

    ``requested`` is ``model.attnImplementation``: the kernel is then the one asked for (checked by
    :func:`kubetune.trainer.modeling.check_attn_implementation`), and only the layout follows from it:
    flash-attention gets one flattened varlen row per batch, SDPA and eager one row per bin with the
    block mask from ``position_ids``, and families that cannot take padding-free batches padded rows with
    that kernel. Unset, the fastest correct kernel is chosen here."""
    model_type = getattr(config, "model_type", None)
    cls = causal_lm_class(config)
    if model_type in PADDED_FAMILIES:
        return AttentionPlan(False, requested, f"{model_type} builds its attention mask without position_ids")
    if cls is None:
        return AttentionPlan(
            False, requested, f"{model_type}: not a transformers model class kubetune can check"
        )
    known = model_type in PADDING_FREE_FAMILIES
    if not (known or getattr(cls, "_supports_attention_backend", False)) or not _takes_position_ids(cls):
        return AttentionPlan(False, requested, f"{model_type} cannot mask packed rows from position_ids")
    if requested is not None:
        return AttentionPlan(True, requested, "model.attnImplementation")
    alibi = bool(getattr(config, "alibi", False))  # Falcon's flash path refuses ALiBi
    if hw.cuda and getattr(cls, "_supports_flash_attn", False) and not alibi:
        if importlib.util.find_spec("flash_attn") is not None:
            return AttentionPlan(True, "flash_attention_2", "flash_attn is installed")
        why = "flash_attn is not installed"
    elif hw.cuda:
        why = f"{model_type} has no flash-attention path" + (" with ALiBi" if alibi else "")
    else:
        why = "no GPU"
    impl = "sdpa" if getattr(cls, "_supports_sdpa", False) else "eager"
    return AttentionPlan(True, impl, why)


Layout = Literal["flat", "bins", "rows"]


def data_collator(spec: FineTuneJobSpec, tokenizer: Any, model: Any = None) -> Any | None:
    """The collator for SFTTrainer: ``None`` (TRL's padded one) unless ``packing`` is ``bfd``.

    ``model`` is the loaded model (:func:`kubetune.trainer.modeling.load_model` records its
    :class:`AttentionPlan` on it); without one, the collator pads rows (always correct)."""
    if spec.training.effective_packing() != "bfd":
        return None
    plan: AttentionPlan | None = getattr(model, "kubetune_attention", None) if model is not None else None
    layout: Layout = "rows"
    if plan is not None and plan.padding_free:
        layout = "flat" if plan.attn_implementation == "flash_attention_2" else "bins"
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return PackedCollator(pad_token_id=int(pad), layout=layout)


@dataclass
class PackedCollator:
    """Batches ``bfd`` bins (``input_ids``, ``labels``, ``seq_lengths``), in one of three layouts:

    - ``flat`` (flash-attention varlen): the whole batch as one row, ``position_ids`` restarting at every
      packed row, and the ``cu_seq_lens``/``max_length`` the kernel reads (computed here on the CPU, not
      with a device sync in every layer). TRL's padding-free collator, which TRL refuses to take as a
      custom collator with ``padding_free``: SFTConfig keeps ``padding_free=False`` and passes this one.
    - ``bins`` (SDPA, eager): one row per bin, right-padded (bins are nearly full), ``position_ids``
      restarting at every packed row and for the padding, no attention mask: transformers builds a
      block-diagonal causal mask from them. One row per bin rather than one row for the batch: dense
      masked attention costs the square of the row length.
    - ``rows``: each bin split back into its rows, right-padded, with an attention mask (models whose
      mask ignores ``position_ids``).

    In every layout a token sees only its own row, and every row has the targets it has alone (the
    first label of each packed row is -100, see :func:`pack`), so the loss is the same."""

    pad_token_id: int
    layout: Layout

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        bins: list[list[tuple[list[int], list[int]]]] = []
        for ex in examples:
            ids, labels = list(ex["input_ids"]), list(ex["labels"])
            start, rows = 0, []
            for n in ex.get(SEQ_LENGTHS) or [len(ids)]:
                rows.append((ids[start : start + n], labels[start : start + n]))
                start += n
            bins.append(rows)
        if self.layout == "rows":
            return self._padded([[row] for rows in bins for row in rows], attention_mask=True)
        if self.layout == "bins":
            return self._padded(bins, attention_mask=False)
        flat = [row for rows in bins for row in rows]
        batch = self._padded([flat], attention_mask=False)
        lengths = torch.tensor([len(r) for r, _ in flat])
        cu = torch.cat([torch.zeros(1, dtype=torch.int32), lengths.cumsum(0).to(torch.int32)])
        batch["cu_seq_lens_q"] = batch["cu_seq_lens_k"] = cu
        batch["max_length_q"] = batch["max_length_k"] = int(lengths.max())
        return batch

    def _padded(
        self, batch_rows: list[list[tuple[list[int], list[int]]]], *, attention_mask: bool
    ) -> dict[str, Any]:
        """One tensor row per entry of ``batch_rows`` (its packed rows end to end), right-padded."""
        import torch

        width = max(sum(len(r) for r, _ in rows) for rows in batch_rows)
        shape = (len(batch_rows), width)
        input_ids = torch.full(shape, self.pad_token_id, dtype=torch.long)
        labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
        position_ids = torch.zeros(shape, dtype=torch.long)
        mask = torch.zeros(shape, dtype=torch.long)
        for i, rows in enumerate(batch_rows):
            start = 0
            for ids, lab in rows:
                end = start + len(ids)
                input_ids[i, start:end] = torch.tensor(ids)
                labels[i, start:end] = torch.tensor(lab)
                labels[i, start] = IGNORE_INDEX  # no target across the boundary (pack did it too)
                position_ids[i, start:end] = torch.arange(len(ids))
                start = end
            mask[i, :start] = 1
            position_ids[i, start:] = torch.arange(width - start)  # the padding: a row of its own
        if attention_mask:
            return {"input_ids": input_ids, "labels": labels, "attention_mask": mask}
        return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}


def log_plan(spec: FineTuneJobSpec, plan: AttentionPlan | None) -> None:
    """Say once, at start, how the batches are built."""
    strategy = spec.training.effective_packing()
    if strategy == "bfd" and plan is not None:
        log.info("%s", plan.describe())
    elif strategy == "wrapped":
        log.info(
            "packing wrapped: %d-token blocks, rows share attention windows",
            spec.training.effective_block_size(),
        )
    elif strategy == "none":
        grouped = " of similar length" if spec.training.group_by_length else ""
        log.info("packing none: one row per sequence, padded batches%s", grouped)
