"""Data preparation as its own cached step (kubetune.trainer.prepare): TRL's tokenization, exactly, the
cache (hit, miss, changed input), the lock, truncation, and a two-process run that only loads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

datasets = pytest.importorskip("datasets")
pytest.importorskip("transformers")

import tiny  # noqa: E402
from kubetune.api.v1alpha1 import FineTuneJob, FineTuneJobSpec  # noqa: E402
from kubetune.trainer import data as data_mod  # noqa: E402
from kubetune.trainer import prepare as prep  # noqa: E402
from kubetune.trainer.errors import DataError  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return tiny.build_tokenizer()


@pytest.fixture(scope="module")
def bos_tokenizer() -> Any:
    """The tiny tokenizer with a post-processor that adds BOS, as Llama's does."""
    from tokenizers import processors

    tok = tiny.build_tokenizer()
    bos = tok.convert_tokens_to_ids("<s>")
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    return tok


def make_spec(files: list[str], training: dict[str, Any] | None = None, **dataset: Any) -> FineTuneJobSpec:
    return FineTuneJob.model_validate(
        {
            "apiVersion": "kubetune.io/v1alpha1",
            "kind": "FineTuneJob",
            "metadata": {"name": "p"},
            "spec": {
                "model": {"path": "m"},
                "dataset": {"files": files, **dataset},
                "training": {"maxSeqLength": 128, **(training or {})},
            },
        }
    ).spec


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


# Rows that reach the corners of TRL's tokenization: an EOS already there, a completion starting with
# the newline the prompt ends with (the tokens merge across the boundary), non-ASCII, long rows that
# truncation cuts, and a prompt that fills maxSeqLength alone (dropped).
TEXT_ROWS = [
    {"text": "The quick brown fox jumps over the lazy dog."},
    {"text": "already ends with eos</s>"},
    {"text": "Grüße aus Köln, 東京 and ünïcödé"},
    {"text": " ".join(["apple river stone"] * 40)},
    {"text": "  leading and trailing spaces  "},
]
ALPACA_ROWS = [
    *tiny.alpaca_rows(12, seed=3),
    {"instruction": "Say hi.", "input": "", "output": "\nhi there"},
    {"instruction": "Answer.", "input": "", "output": " space first</s>"},
    {"instruction": "Count " + "one two three " * 30, "input": "", "output": "many"},  # prompt > 160
    {"instruction": "Long answer.", "input": "x", "output": "word " * 80},
]
CHAT_ROWS = [
    {"messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "olleh"}]},
    {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Capital of Peru?"},
            {"role": "assistant", "content": "Lima."},
            {"role": "user", "content": "And Chile?"},
            {"role": "assistant", "content": "Santiago." * 20},
        ]
    },
    {"messages": [{"from": "human", "value": "Grüße"}, {"from": "gpt", "value": "Hallo"}]},
]


def trl_columns(rows: Any, tokenizer: Any, max_length: int, tmp_path: Path) -> dict[str, list[Any]]:
    """What TRL 1.16's SFTTrainer builds from the formatted (untokenized) rows, as kubetune used to
    hand them to it."""
    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(
        output_dir=str(tmp_path / "trl"),
        max_length=max_length,
        packing=False,
        report_to="none",
        use_cpu=True,
        bf16=False,
        fp16=False,
    )
    trainer = SFTTrainer(
        model=tiny.build_model("llama", tokenizer), args=args, train_dataset=rows, processing_class=tokenizer
    )
    ds = trainer.train_dataset
    return {"input_ids": ds["input_ids"], "labels": ds["labels"]}


@pytest.mark.trainer
@pytest.mark.parametrize("fmt", ["text", "alpaca", "chat"])
@pytest.mark.parametrize("tok_name", ["tokenizer", "bos_tokenizer"])
def test_tokenization_equals_trl(
    fmt: str, tok_name: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    pytest.importorskip("trl")
    tok = request.getfixturevalue(tok_name)
    rows = {"text": TEXT_ROWS, "alpaca": ALPACA_ROWS, "chat": CHAT_ROWS}[fmt]
    write_jsonl(tmp_path / "d.jsonl", rows)
    max_len = 160 if fmt == "alpaca" else 64  # the tiny tokenizer's Alpaca prompt alone is ~70 tokens
    spec = make_spec(["d.jsonl"], format=fmt, dedup=False)
    formatted = data_mod.prepare(spec, tmp_path, tok).train
    expected = trl_columns(formatted, tok, max_len, tmp_path)
    assert len(expected["input_ids"]) >= len(rows) - 1
    # TRL's defaults: the loss on every token of a conversation (test_trainer_chat.py compares
    # trainOn assistant with TRL's assistant_only_loss).
    train_on = "all" if fmt == "chat" else None
    ours, dropped = data_mod.tokenize(formatted, fmt, tok, max_len, train_on=train_on)
    assert ours["input_ids"] == expected["input_ids"]
    assert ours["labels"] == expected["labels"]
    assert dropped == len(formatted) - len(expected["input_ids"])
    if fmt == "alpaca":
        assert dropped == 1  # the prompt that fills maxSeqLength alone
        assert all(-100 in labels for labels in ours["labels"])
        assert any(len(ids) == max_len for ids in ours["input_ids"])  # truncated
    # Several processes give the same rows, in the same order.
    if fmt == "text":
        again, _ = data_mod.tokenize(formatted, fmt, tok, 64, num_proc=2)
        assert again["input_ids"] == ours["input_ids"]


# --------------------------------------------------------------------------------------------------
# The cache
# --------------------------------------------------------------------------------------------------


def alpaca_job(tmp_path: Path, **training: Any) -> FineTuneJobSpec:
    if not (tmp_path / "d.jsonl").exists():
        write_jsonl(tmp_path / "d.jsonl", tiny.alpaca_rows(60))
    return make_spec(["d.jsonl"], training, format="alpaca", validation={"fraction": 0.1})


def test_miss_then_hit_then_changed_inputs(tmp_path: Path, tokenizer: Any, caplog: Any) -> None:
    caplog.set_level("INFO", logger="kubetune.trainer")
    cache = tmp_path / "cache"
    spec = alpaca_job(tmp_path)
    first = prep.load_or_prepare(spec, tmp_path, tokenizer, root=cache)
    assert not first.cache_hit and first.path == cache / first.key
    assert sorted(p.name for p in first.path.iterdir()) == ["eval", "stats.json", "train"]
    assert first.train.column_names == ["input_ids", "labels"]
    assert (len(first.train), len(first.eval)) == (54, 6)
    assert first.tokens["train_tokens"] == sum(len(r) for r in first.train["input_ids"])
    stats = json.loads((first.path / "stats.json").read_text())
    assert stats["data"]["train_rows"] == 54 and stats["inputs"]["training"]["max_seq_length"] == 128
    assert f"data: prepared {first.key}" in caplog.text
    assert not list(cache.glob(".tmp-*"))

    caplog.clear()
    second = prep.load_or_prepare(spec, tmp_path, tokenizer, root=cache)
    assert second.cache_hit and second.key == first.key
    assert second.train["input_ids"] == first.train["input_ids"]
    assert second.eval is not None and second.eval["labels"] == first.eval["labels"]
    n_tokens = first.tokens["train_tokens"]
    assert f"data: cache hit {first.key} (54 train rows, {n_tokens} tokens) at" in caplog.text
    assert "Tokenizing" not in caplog.text and "tokenized" not in caplog.text

    # An edited data file: new digest, new key, tokenized again.
    rows = tiny.alpaca_rows(60)
    rows[0]["output"] = "an edited answer"
    write_jsonl(tmp_path / "d.jsonl", rows)
    edited = prep.load_or_prepare(spec, tmp_path, tokenizer, root=cache)
    assert not edited.cache_hit and edited.key != first.key
    # A new maxSeqLength: a new key too; the old entries stay.
    shorter = prep.load_or_prepare(alpaca_job(tmp_path, maxSeqLength=112), tmp_path, tokenizer, root=cache)
    assert not shorter.cache_hit and shorter.key not in (first.key, edited.key)
    assert max(len(r) for r in shorter.train["input_ids"]) == 112
    assert {p.name for p in cache.iterdir() if p.is_dir()} == {first.key, edited.key, shorter.key}


def test_key_covers_tokenizer_template_and_formatting(tokenizer: Any, bos_tokenizer: Any) -> None:
    spec = make_spec(["d.jsonl"], format="alpaca")
    identity = {"dataset_files_sha256": {"d.jsonl": "0" * 64}}

    def key(s: FineTuneJobSpec, tok: Any) -> str:
        return prep.cache_key(prep.key_inputs(s, identity, tok))

    base = key(spec, tokenizer)
    assert key(spec, tiny.build_tokenizer()) == base  # the same tokenizer built again: same key
    assert key(spec, bos_tokenizer) != base
    templated = tiny.build_tokenizer()
    templated.chat_template = "{{ messages }}"
    assert key(spec, templated) != base
    assert key(make_spec(["d.jsonl"], format="alpaca", dedup=False), tokenizer) != base
    assert key(make_spec(["d.jsonl"], {"seed": 7}, format="alpaca"), tokenizer) != base


def test_all_rows_truncated_away_is_a_dataset_error(tmp_path: Path, tokenizer: Any) -> None:
    write_jsonl(tmp_path / "d.jsonl", [{"instruction": "word " * 40, "input": "", "output": "x"}] * 3)
    spec = make_spec(["d.jsonl"], {"maxSeqLength": 16}, format="alpaca", dedup=False)
    with pytest.raises(DataError) as err:
        prep.load_or_prepare(spec, tmp_path, tokenizer, root=tmp_path / "cache")
    assert "training.maxSeqLength (16 tokens)" in str(err.value) and "all 3 training rows" in str(err.value)
    assert not [p for p in (tmp_path / "cache").iterdir() if not p.name.endswith(".lock")]


def test_some_rows_truncated_away_are_counted(tmp_path: Path, tokenizer: Any, caplog: Any) -> None:
    rows = [*tiny.alpaca_rows(10), {"instruction": "one two three " * 30, "input": "", "output": "x"}]
    write_jsonl(tmp_path / "d.jsonl", rows)
    spec = make_spec(["d.jsonl"], format="alpaca")
    prepared = prep.load_or_prepare(spec, tmp_path, tokenizer, root=tmp_path / "cache")
    assert prepared.tokens["train_dropped_by_truncation"] == 1 and len(prepared.train) == 10
    assert "1 of 11 training rows dropped: truncated to training.maxSeqLength (128 tokens)" in caplog.text
    for labels in prepared.train["labels"]:
        assert len(labels) <= 128 and any(x != -100 for x in labels)


def test_num_proc_defaults() -> None:
    assert prep.default_num_proc(10) == 1
    assert prep.default_num_proc(10, requested=4) == 4
    assert prep.default_num_proc(3, requested=8) == 3
    assert 1 <= prep.default_num_proc(10**7) <= prep.cpu_count()


def test_cache_root(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in (prep.ENV_PREPARED_DIR, "KUBETUNE_WORKDIR", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    assert prep.cache_root() == Path.home() / ".cache/kubetune/prepared"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert prep.cache_root() == tmp_path / "xdg/kubetune/prepared"
    monkeypatch.setenv("KUBETUNE_WORKDIR", "/workspace")
    assert prep.cache_root() == Path("/workspace/.cache/kubetune/prepared")
    monkeypatch.setenv(prep.ENV_PREPARED_DIR, str(tmp_path / "p"))
    assert prep.cache_root() == tmp_path / "p"


# --------------------------------------------------------------------------------------------------
# Several preparers at once: one tokenizes, the others wait and load
# --------------------------------------------------------------------------------------------------


def test_concurrent_preparers_tokenize_once(tmp_path: Path) -> None:
    model = tiny.save_tiny_model(tmp_path / "m")
    job = tiny.write_job(tmp_path / "job", model, tiny.alpaca_rows(40), training={"maxSeqLength": 128})
    script = tmp_path / "preparer.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import sys, time
            sys.path.insert(0, {str(ROOT / "tests")!r})
            from kubetune.trainer import data, prepare

            tokenize = data.tokenize

            def slow_tokenize(*args, **kwargs):
                # Hold the lock until the other preparer blocks on it (a waiter shows in /proc/locks
                # as "->"), so the test does not depend on which process starts first or how fast.
                print("TOKENIZING", flush=True)
                deadline = time.monotonic() + 120
                while time.monotonic() < deadline and "->" not in open("/proc/locks").read():
                    time.sleep(0.05)
                return tokenize(*args, **kwargs)

            data.tokenize = slow_tokenize
            p = prepare.prepare_file(sys.argv[1])
            print("RESULT", p.key, p.cache_hit, round(p.waited_seconds, 2), flush=True)
            """
        )
    )
    env = {**os.environ, prep.ENV_PREPARED_DIR: str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}
    env.pop("RANK", None)
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(job)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    both = "\n".join(outputs)
    assert both.count("TOKENIZING") == 2  # train and validation, by one process
    results = [line.split()[1:] for line in both.splitlines() if line.startswith("RESULT")]
    assert len({key for key, _, _ in results}) == 1
    assert sorted(hit for _, hit, _ in results) == ["False", "True"]
    waiter = next(r for r in results if r[1] == "True")
    assert float(waiter[2]) > 0  # it waited on the lock, then loaded
    assert "which is preparing this dataset" in both and " pid " in both


# --------------------------------------------------------------------------------------------------
# The done-criterion: a two-process CPU run (gloo) whose ranks wait on nothing but the cached dataset
# --------------------------------------------------------------------------------------------------


@pytest.mark.trainer
def test_two_process_run_only_loads_what_the_prepare_step_wrote(tmp_path: Path) -> None:
    pytest.importorskip("trl")
    model = tiny.save_tiny_model(tmp_path / "m")
    job = tiny.write_job(
        tmp_path / "job",
        model,
        method={"type": "lora", "quantization": None},
        dataset={"validation": None},
        training={"maxSteps": 2, "saveSteps": 2, "loggingSteps": 1, "perDeviceBatchSize": 2},
        samples={"prompts": []},
    )
    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "KUBETUNE_RUN", "RANK")}
    env.update(
        {
            prep.ENV_PREPARED_DIR: str(tmp_path / "cache"),
            "HF_HUB_OFFLINE": "1",
            "PYTHONPATH": str(ROOT / "src"),
            "KUBETUNE_TERMINATION_LOG": str(tmp_path / "termination-log"),
        }
    )
    step = subprocess.run(
        [sys.executable, "-m", "kubetune.trainer.prepare", "--spec", str(job)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert step.returncode == 0, step.stdout + step.stderr
    (key,) = [line.split()[3] for line in step.stdout.splitlines() if "data: prepared " in line]
    stats = tmp_path / "cache" / key / "stats.json"
    written = stats.stat().st_mtime_ns

    # `accelerate launch --cpu` starts one process (its multi-CPU launcher needs MPI); torchrun's
    # launcher (--multi_gpu) with ACCELERATE_USE_CPU starts two, joined over gloo.
    env["ACCELERATE_USE_CPU"] = "1"
    launcher = Path(sys.executable).with_name("accelerate")
    argv = [str(launcher), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1"]
    argv += ["--mixed_precision", "no", "--dynamo_backend", "no"]
    argv += ["-m", "kubetune.trainer", "--spec", str(job), "--output", str(tmp_path / "out")]
    run = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=600)
    log = run.stdout + run.stderr
    assert run.returncode == 0, log[-4000:]
    assert "on CPU (2 processes)" in log
    hits = [line for line in log.splitlines() if f"data: cache hit {key} " in line]
    assert sorted(line.split("(rank ")[-1][0] for line in hits) == ["0", "1"], "\n".join(hits)
    # No training process formatted, tokenized or packed anything: both only loaded the cached rows.
    for text in ("data: prepared", "tokenized", "Tokenizing", "Formatting", "waiting for"):
        assert text not in log, text
    assert stats.stat().st_mtime_ns == written
    metrics = json.loads((tiny.run_folder(job, tmp_path / "out") / "metrics.json").read_text())
    assert metrics["prepared"]["key"] == key and metrics["prepared"]["cache_hit"] is True
    assert metrics["steps"] == 2


# --------------------------------------------------------------------------------------------------
# The operator's view of the prepare init container (pure status functions)
# --------------------------------------------------------------------------------------------------


def prepare_pod(init_state: dict[str, Any], phase: str) -> dict[str, Any]:
    return {
        "metadata": {"name": "t-1234-0-abcde", "creationTimestamp": "2026-01-01T00:00:00Z"},
        "status": {
            "phase": phase,
            "initContainerStatuses": [{"name": "prepare", "state": init_state}],
            "containerStatuses": [{"name": "trainer", "state": {"waiting": {"reason": "PodInitializing"}}}],
        },
    }


def test_operator_reports_a_failed_prepare_container_with_its_reason() -> None:
    from kubetune.contract import termination_message
    from kubetune_operator.status import pod_failure

    message = "dataset.format alpaca: column 'instruction' not in dataset; columns are ['text']"
    pod = prepare_pod(
        {"terminated": {"exitCode": 3, "message": termination_message("DatasetError", message)}}, "Failed"
    )
    failure = pod_failure(pod)
    assert (failure.reason, failure.exit_code, failure.from_trainer) == ("DatasetError", 3, True)
    assert failure.message.startswith(message)
    # Without a termination message (a crash): the exit code's reason, naming the step that failed.
    pod = prepare_pod({"terminated": {"exitCode": 3, "message": "Traceback ..."}}, "Failed")
    failure = pod_failure(pod)
    assert failure.reason == "DatasetError"
    assert failure.message.startswith("preparing the data exited with code 3 (dataset error)")


def test_operator_says_a_running_prepare_is_preparing_data() -> None:
    from kubetune_operator.status import image_pull_problem, preparing

    assert preparing([prepare_pod({"running": {"startedAt": "2026-01-01T00:00:05Z"}}, "Pending")]) == (
        "preparing data: pod t-1234-0-abcde is tokenizing the dataset into the workspace's cache "
        "(init container prepare); training starts when it is done"
    )
    assert preparing([prepare_pod({"terminated": {"exitCode": 0}}, "Running")]) is None
    # An image the kubelet cannot pull shows first on the init container.
    pulling = prepare_pod({"waiting": {"reason": "ErrImagePull", "message": "not found"}}, "Pending")
    problem = image_pull_problem([pulling])
    assert problem is not None and "ErrImagePull" in problem.message
