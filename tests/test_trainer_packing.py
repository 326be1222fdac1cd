"""training.packing: none, wrapped and bfd datasets, the bfd collator, the attention path per family, and
the proof that bfd has no cross-talk: a packed batch gives every row the loss (and logits) it gets alone.

Tiny random-weight models (tests/tiny.py), on the CPU: nothing is downloaded.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.trainer

torch = pytest.importorskip("torch")
datasets = pytest.importorskip("datasets")
pytest.importorskip("trl")

import tiny  # noqa: E402
from kubetune.api.v1alpha1 import FineTuneJobSpec  # noqa: E402
from kubetune.trainer import config as cfg  # noqa: E402
from kubetune.trainer import packing  # noqa: E402

IGNORE = -100
GPU = cfg.Hardware(cuda=True, bf16_supported=True)


def make_spec(model_path: str = "/models/tiny", **training: Any) -> FineTuneJobSpec:
    return FineTuneJobSpec.model_validate(
        {
            "model": {"path": model_path},
            "dataset": {"files": ["/data/train.jsonl"]},
            "method": {"type": "lora"},
            "training": {"maxSeqLength": 64, **training},
        }
    )


def make_rows(n: int, max_len: int = 64, seed: int = 0, vocab: int = 500) -> Any:
    """Rows as the prepare step hands them over: truncated, a prompt without loss, then the answer."""
    rng = random.Random(seed)
    ids, labels = [], []
    for _ in range(n):
        length = rng.randint(3, max_len)
        row = [rng.randrange(5, vocab) for _ in range(length)]
        prompt = rng.randint(0, length - 1)
        ids.append(row)
        labels.append([IGNORE] * prompt + row[prompt:])
    return datasets.Dataset.from_dict({"input_ids": ids, "labels": labels})


def shared_bins(packed: Any, n: int) -> list[dict[str, Any]]:
    """``n`` bins that hold more than one row each."""
    bins = [ex for ex in packed if len(ex["seq_lengths"]) > 1][:n]
    assert len(bins) == n
    return bins


def split_bins(packed: Any) -> list[tuple[list[int], list[int]]]:
    rows = []
    for ex in packed:
        start = 0
        for n in ex["seq_lengths"]:
            rows.append((ex["input_ids"][start : start + n], ex["labels"][start : start + n]))
            start += n
    return rows


# --------------------------------------------------------------------------------------------------
# The datasets
# --------------------------------------------------------------------------------------------------


def test_none_leaves_rows_alone() -> None:
    rows = make_rows(50)
    assert packing.pack(rows, make_spec()) is rows
    assert packing.data_collator(make_spec(), tokenizer=None) is None  # TRL's padded collator


def test_wrapped_blocks_are_block_size_long() -> None:
    rows = make_rows(300)
    spec = make_spec(blockSize=32)
    assert spec.training.effective_packing() == "wrapped"
    packed = packing.pack(rows, spec)
    lengths = [len(x) for x in packed["input_ids"]]
    # One short block per 1,000-row batch at most (the remainder), as AutoTrain's group_texts.
    assert all(n == 32 for n in lengths[:-1]) and 0 < lengths[-1] <= 32
    flat = [t for r in rows["input_ids"] for t in r]
    assert [t for r in packed["input_ids"] for t in r] == flat  # rows run on across blocks
    assert packing.data_collator(spec, tokenizer=None) is None


def test_bfd_keeps_every_token_and_masks_row_starts() -> None:
    rows = make_rows(400)
    packed = packing.pack(rows, make_spec(packing="bfd"))
    assert len(packed) < len(rows)
    assert all(sum(ex["seq_lengths"]) == len(ex["input_ids"]) <= 64 for ex in packed)
    got = sorted((tuple(i), tuple(lab)) for i, lab in split_bins(packed))
    # Every row, whole; its first label (never a target of the row itself) becomes -100, so that in a
    # flattened batch the previous row's last token has no target across the boundary.
    want = sorted(
        (tuple(i), (IGNORE, *lab[1:])) for i, lab in zip(rows["input_ids"], rows["labels"], strict=True)
    )
    assert got == want
    # Best fit never opens a bin for a row that fits in another: at most one bin is half empty
    # (bench/packing.py measures the fill on realistic lengths).
    assert sum(len(ex["input_ids"]) <= 32 for ex in packed) <= 1


# --------------------------------------------------------------------------------------------------
# The attention path per family
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return tiny.build_tokenizer()


def test_attention_plan_per_family(tokenizer: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    plans = {
        arch: packing.attention_plan(tiny.build_config(arch, tokenizer), cfg.Hardware.cpu())
        for arch in tiny.ARCHITECTURES
    }
    assert plans["llama"] == packing.AttentionPlan(True, "sdpa", "no GPU")
    assert plans["falcon"] == packing.AttentionPlan(True, "sdpa", "no GPU")
    assert not plans["bloom"].padding_free and "without position_ids" in plans["bloom"].reason
    assert plans["llama"].describe() == "packing bfd: padding-free, sdpa with block mask (no GPU)"

    llama = tiny.build_config("llama", tokenizer)
    monkeypatch.setattr(packing.importlib.util, "find_spec", lambda name: None)
    assert packing.attention_plan(llama, GPU).reason == "flash_attn is not installed"
    monkeypatch.setattr(packing.importlib.util, "find_spec", lambda name: object())
    assert packing.attention_plan(llama, GPU).attn_implementation == "flash_attention_2"
    alibi = tiny.build_config("falcon", tokenizer)
    alibi.alibi = True  # Falcon's flash path refuses ALiBi: SDPA with the block mask instead
    assert packing.attention_plan(alibi, GPU) == packing.AttentionPlan(
        True, "sdpa", "falcon has no flash-attention path with ALiBi"
    )


# --------------------------------------------------------------------------------------------------
# No cross-talk
# --------------------------------------------------------------------------------------------------


def model_for(arch: str, tokenizer: Any) -> tuple[Any, packing.AttentionPlan]:
    """A tiny model set up as load_model sets it up for bfd: in training mode, no KV cache."""
    model = tiny.build_model(arch, tokenizer)
    plan = packing.attention_plan(model.config, cfg.Hardware.cpu())
    model.config.use_cache = not plan.padding_free
    model.train()  # the tiny configs have no dropout: training mode is deterministic
    return model, plan


def token_losses(logits: Any, labels: Any) -> Any:
    """Loss of each next-token target, 0 where there is none (shape of labels[:, 1:])."""
    lg, lab = logits[:, :-1].float(), labels[:, 1:]
    loss = torch.nn.functional.cross_entropy(lg.transpose(1, 2), lab.clamp(min=0), reduction="none")
    return loss * (lab != IGNORE)


def alone(model: Any, ids: list[int], labels: list[int]) -> tuple[Any, Any]:
    """(per-token losses, logits) of one row in a batch of one, unpacked, no mask."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits
    return token_losses(logits, torch.tensor([labels]))[0], logits[0]


def row_slices(examples: list[dict[str, Any]], layout: str) -> list[tuple[int, slice]]:
    """(batch row, token slice) of every packed row of ``examples`` once collated in ``layout``."""
    out, flat_start = [], 0
    for i, ex in enumerate(examples):
        start = 0
        for n in ex["seq_lengths"]:
            if layout == "flat":
                out.append((0, slice(flat_start, flat_start + n)))
                flat_start += n
            elif layout == "bins":
                out.append((i, slice(start, start + n)))
            else:
                out.append((len(out), slice(0, n)))
            start += n
    return out


@pytest.mark.parametrize("arch", tiny.ARCHITECTURES)
def test_data_collator_follows_the_attention_plan(arch: str, tokenizer: Any) -> None:
    model, plan = model_for(arch, tokenizer)
    model.kubetune_attention = plan
    collate = packing.data_collator(make_spec(packing="bfd"), tokenizer, model)
    assert isinstance(collate, packing.PackedCollator)
    assert collate.layout == ("rows" if arch == "bloom" else "bins")  # CPU: SDPA with the block mask
    # Without a plan (no model), rows: always correct.
    assert packing.data_collator(make_spec(packing="bfd"), tokenizer).layout == "rows"  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("arch", "layout"),
    [
        ("llama", "flat"),
        ("llama", "bins"),
        ("llama", "rows"),
        ("falcon", "flat"),
        ("falcon", "bins"),
        ("bloom", "rows"),  # the padded fallback bloom takes
    ],
)
def test_packed_batch_loss_equals_each_row_alone(arch: str, layout: str, tokenizer: Any) -> None:
    model, _ = model_for(arch, tokenizer)
    packed = packing.pack(make_rows(40, vocab=len(tokenizer)), make_spec(packing="bfd"))
    examples = shared_bins(packed, 4)
    batch = packing.PackedCollator(tokenizer.pad_token_id, layout)(examples)  # type: ignore[arg-type]
    assert ("attention_mask" in batch) == (layout == "rows")
    with torch.no_grad():
        out = model(**batch)
    losses = token_losses(out.logits, batch["labels"])
    rows = split_bins(datasets.Dataset.from_list(examples))
    slices = row_slices(examples, layout)
    assert len(slices) == len(rows) >= 8
    total, count = 0.0, 0
    for (b, sl), (ids, labels) in zip(slices, rows, strict=True):
        assert batch["input_ids"][b, sl].tolist() == ids
        want, _ = alone(model, ids, labels)
        # The row's own targets; its last token's target (the next row's first label) is -100.
        got = losses[b, sl][: len(ids) - 1]
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
        if sl.stop < losses.size(1):
            assert losses[b, sl.stop - 1] == 0  # no target across the boundary
        total, count = total + float(want.sum()), count + int((torch.tensor(labels[1:]) != IGNORE).sum())
    # The model's own loss is the token-weighted mean of the rows' losses.
    assert out.loss.item() == pytest.approx(total / count, rel=1e-4)


def test_perturbing_one_row_leaves_the_others_logits(tokenizer: Any) -> None:
    model, plan = model_for("llama", tokenizer)
    model.kubetune_attention = plan
    packed = packing.pack(make_rows(40, vocab=len(tokenizer)), make_spec(packing="bfd"))
    collate = packing.data_collator(make_spec(packing="bfd"), tokenizer, model)
    assert isinstance(collate, packing.PackedCollator) and collate.layout == "bins"
    examples = shared_bins(packed, 3)
    batch = collate(examples)
    (_, first), *others = row_slices(examples, "bins")
    others = [(b, sl) for b, sl in others if b == 0]  # the rows that share the first row's bin
    assert others
    changed = {k: v.clone() if torch.is_tensor(v) else v for k, v in batch.items()}
    changed["input_ids"][0, first] = (changed["input_ids"][0, first] + 7) % len(tokenizer)
    with torch.no_grad():
        a, b = model(**batch).logits, model(**changed).logits
    assert not torch.allclose(a[0, first], b[0, first])
    for _, sl in others:
        torch.testing.assert_close(a[0, sl], b[0, sl], rtol=0, atol=1e-5)
    torch.testing.assert_close(a[1:], b[1:], rtol=0, atol=1e-5)  # and the other bins


def test_the_check_sees_cross_talk(tokenizer: Any) -> None:
    """The same packed batch with a KV cache on (transformers then skips the block mask): the rows after
    the first see the earlier ones, and the comparison above would fail."""
    model, plan = model_for("llama", tokenizer)
    model.kubetune_attention = plan
    model.config.use_cache = True
    packed = packing.pack(make_rows(40, vocab=len(tokenizer)), make_spec(packing="bfd"))
    examples = shared_bins(packed, 1)
    batch = packing.PackedCollator(tokenizer.pad_token_id, "bins")(examples)
    _, sl = row_slices(examples, "bins")[1]
    ids = batch["input_ids"][0, sl].tolist()
    with torch.no_grad():
        logits = model(**batch).logits
    assert not torch.allclose(logits[0, sl], alone(model, ids, ids)[1], atol=1e-3)


def test_varlen_batch_has_the_flash_attention_boundaries() -> None:
    examples = [
        {"input_ids": [1, 2, 3, 4, 5], "labels": [1, 2, 3, 4, 5], "seq_lengths": [3, 2]},
        {"input_ids": [6, 7], "labels": [6, 7], "seq_lengths": [2]},
    ]
    flat = packing.PackedCollator(0, "flat")(examples)
    assert flat["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1]]
    assert flat["labels"].tolist() == [[IGNORE, 2, 3, IGNORE, 5, IGNORE, 7]]
    assert flat["cu_seq_lens_q"].tolist() == [0, 3, 5, 7] and flat["max_length_k"] == 3
    bins = packing.PackedCollator(0, "bins")(examples)
    assert bins["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 0, 1, 2]]  # the padding: its own row
    assert bins["input_ids"].tolist() == [[1, 2, 3, 4, 5], [6, 7, 0, 0, 0]]
    assert bins["labels"].tolist() == [[IGNORE, 2, 3, IGNORE, 5], [IGNORE, 7, IGNORE, IGNORE, IGNORE]]
    rows = packing.PackedCollator(0, "rows")(examples)
    assert rows["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0], [1, 1, 0]]


# --------------------------------------------------------------------------------------------------
# load_model and a real run
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-packing")
    return {arch: tiny.save_tiny_model(root / arch, arch) for arch in ("llama", "bloom")}


@pytest.mark.parametrize(
    ("arch", "message"),
    [
        ("llama", "packing bfd: padding-free, sdpa with block mask (no GPU)"),
        (
            "bloom",
            "packing bfd: padded rows, no padding-free (bloom builds its attention mask without "
            "position_ids); packing none with groupByLength pads less for this model",
        ),
    ],
)
def test_load_model_chooses_and_logs_the_path(
    arch: str, message: str, saved: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    from kubetune.trainer import modeling

    spec = make_spec(str(saved[arch]), packing="bfd")
    with caplog.at_level(logging.INFO, logger="kubetune.trainer"):
        model = modeling.load_model(spec, saved[arch], cfg.Hardware.cpu())
    assert [r.getMessage() for r in caplog.records if r.getMessage().startswith("packing")] == [message]
    assert model.kubetune_attention.padding_free == (arch == "llama")
    if arch == "llama":
        assert model.config._attn_implementation == "sdpa" and model.config.use_cache is False


def test_short_qlora_run_with_bfd(saved: dict[str, Path], tmp_path: Path) -> None:
    """A few QLoRA steps through SFTTrainer with kubetune's packed data, collator and SFTConfig kwargs."""
    from trl import SFTConfig, SFTTrainer

    from kubetune.trainer import modeling

    spec = FineTuneJobSpec.model_validate(
        {
            "model": {"path": str(saved["llama"])},
            "dataset": {"files": ["/data/train.jsonl"]},
            "method": {
                "type": "qlora",
                "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
                "quantization": {"computeDtype": "float32"},
            },
            "training": {
                "maxSeqLength": 64,
                "packing": "bfd",
                "maxSteps": 4,
                "perDeviceBatchSize": 2,
                "gradientAccumulationSteps": 1,
                "learningRate": 1e-2,
                "loggingSteps": 1,
                "maxGradNorm": 1.0,
            },
        }
    )
    hw = cfg.Hardware.cpu()
    tok = modeling.load_tokenizer(spec, saved["llama"])
    model = modeling.load_model(spec, saved["llama"], hw)
    data = packing.pack(make_rows(120, vocab=len(tok)), spec)
    kwargs = cfg.sft_config_kwargs(spec, str(tmp_path / "ckpt"), has_eval=False, hw=hw)
    args = SFTConfig(**kwargs, dataset_kwargs={"skip_prepare_dataset": True})
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=data,
        processing_class=tok,
        peft_config=modeling.lora_config(spec, model),
        data_collator=packing.data_collator(spec, tok, model),
    )
    seen: list[dict[str, Any]] = []
    collate = trainer.data_collator
    trainer.data_collator = lambda ex: seen.append(collate(ex)) or seen[-1]  # type: ignore[func-returns-value]
    trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert len(losses) == 4 and all(loss == loss for loss in losses)  # finite, logged every step
    assert seen and all("position_ids" in b and "attention_mask" not in b for b in seen)
    # The trained 4-bit PEFT model, as the trainer calls it: padding-free and padded rows agree.
    examples = shared_bins(data, 2)
    with torch.no_grad():
        free = trainer.compute_loss(trainer.model, packing.PackedCollator(tok.pad_token_id, "bins")(examples))
        rows = trainer.compute_loss(trainer.model, packing.PackedCollator(tok.pad_token_id, "rows")(examples))
    assert free.item() == pytest.approx(rows.item(), rel=1e-4)


def test_real_run_with_bfd(
    saved: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`kubetune run`'s trainer, end to end (prepare step, packing, collator, evaluation) with bfd."""
    from kubetune.trainer import run

    job = tiny.write_job(
        tmp_path,
        saved["llama"],
        training={"packing": "bfd", "maxSteps": 4, "saveSteps": 4, "evalSteps": 4, "loggingSteps": 1},
    )
    metrics = run(job)
    out = capsys.readouterr().out
    assert metrics["steps"] == 4
    assert "packing bfd: padding-free, sdpa with block mask (no GPU)" in out
    assert (tiny.run_folder(job) / "adapter").is_dir()
