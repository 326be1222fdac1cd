"""Which tokens carry the loss (``dataset.trainOn``) and chat templates (``dataset.chatTemplate``), on a tiny
in-process tokenizer and a tiny model: the fraction of loss-carrying tokens per format, the assistant
spans of Llama-2-, ChatML- and Falcon-style templates with and without ``{% generation %}`` markers (and
TRL 1.16's ``assistant_only_loss`` as the reference where there are markers), templates saved with the
tokenizer, and a chat run that trains."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest

datasets = pytest.importorskip("datasets")
pytest.importorskip("transformers")

import tiny  # noqa: E402
from kubetune.api.v1alpha1 import BUILTIN_CHAT_TEMPLATES, FineTuneJob, FineTuneJobSpec  # noqa: E402
from kubetune.trainer import data as data_mod  # noqa: E402
from kubetune.trainer import templates  # noqa: E402
from kubetune.trainer.errors import DataError  # noqa: E402

# --------------------------------------------------------------------------------------------------
# Templates of three families, as their models ship them (no markers) and with markers
# --------------------------------------------------------------------------------------------------

# meta-llama/Llama-2-7b-chat-hf's tokenizer_config.json.
LLAMA_2_META = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}"
    "{% endfor %}"
)
# The Falcon chat template (falcon-7b-instruct / Falcon2): newlines between the tags, plain-text roles,
# and no end-of-turn token.
FALCON = (
    "{% for message in messages %}\n{% if message['role'] == 'user' %}\n"
    "{{ 'User: \\n' + message['content'] }}\n"
    "{% elif message['role'] == 'system' %}\n{{ 'System: ' + message['content'] }}\n"
    "{% elif message['role'] == 'assistant' %}\n{{ 'Falcon:\\n'  + message['content']}}\n{% endif %}\n"
    "{% if loop.last and add_generation_prompt %}\n{{ 'Falcon:' }}\n{% endif %}\n{% endfor %}"
)
# The same, with markers around what Falcon writes (and the line end after it).
FALCON_MARKED = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ 'User: \\n' + message['content'] + '\\n' }}"
    "{% elif message['role'] == 'system' %}{{ 'System: ' + message['content'] + '\\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ 'Falcon:\\n' }}"
    "{% generation %}{{ message['content'] + '\\n' }}{% endgeneration %}{% endif %}"
    "{% if loop.last and add_generation_prompt %}{{ 'Falcon:\\n' }}{% endif %}"
    "{% endfor %}"
)


def _llama(content: str, eos: str) -> str:
    return " " + content.strip() + " " + eos


# name → (template, has markers, what the assistant writes for a message's content given EOS, what the
# template writes just before it)
STYLES: dict[str, tuple[str, bool, Any, str]] = {
    "llama-2-meta": (LLAMA_2_META, False, _llama, " [/INST]"),
    "llama-2-builtin": (templates.BUILTIN["llama-2"], True, _llama, " [/INST]"),
    "chatml-plain": (tiny.CHAT_TEMPLATE, False, lambda c, eos: c + "<|im_end|>\n", "<|im_start|>assistant\n"),
    "chatml-builtin": (
        templates.BUILTIN["chatml"],
        True,
        lambda c, eos: c + "<|im_end|>\n",
        "<|im_start|>assistant\n",
    ),
    "falcon": (FALCON, False, lambda c, eos: c + "\n", "Falcon:\n"),
    "falcon-marked": (FALCON_MARKED, True, lambda c, eos: c + "\n", "Falcon:\n"),
    "alpaca-builtin": (templates.BUILTIN["alpaca"], True, lambda c, eos: c + eos, "### Response:\n"),
    "guanaco-builtin": (templates.BUILTIN["guanaco"], True, lambda c, eos: " " + c + eos, "### Assistant:"),
}
FAMILIES = [
    ("llama-2-meta", "llama-2-builtin"),
    ("chatml-plain", "chatml-builtin"),
    ("falcon", "falcon-marked"),
]


def conversations(n: int = 24) -> list[list[dict[str, str]]]:
    """Deterministic chats from the tiny Alpaca rows: one and two exchanges, some with a system message."""
    rows = tiny.alpaca_rows(2 * n, seed=5)
    out = []
    for i in range(n):
        a, b = rows[2 * i], rows[2 * i + 1]
        conv = [
            {"role": "user", "content": (a["instruction"] + " " + a["input"]).strip()},
            {"role": "assistant", "content": a["output"]},
        ]
        if i % 2:
            conv += [
                {"role": "user", "content": (b["instruction"] + " " + b["input"]).strip()},
                {"role": "assistant", "content": b["output"]},
            ]
        if i % 3 == 0:
            conv.insert(0, {"role": "system", "content": "Answer briefly."})
        out.append(conv)
    return out


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return tiny.build_tokenizer()


def with_template(template: str | None) -> Any:
    tok = tiny.build_tokenizer()
    tok.chat_template = template
    return tok


def spec_for(**dataset: Any) -> FineTuneJobSpec:
    return FineTuneJob.model_validate(
        {
            "apiVersion": "kubetune.io/v1alpha1",
            "kind": "FineTuneJob",
            "metadata": {"name": "c"},
            "spec": {"model": {"path": "m"}, "dataset": {"files": ["x.jsonl"], **dataset}},
        }
    ).spec


def formatted(rows: list[dict[str, Any]], tok: Any, **dataset: Any) -> Any:
    spec = spec_for(dedup=False, **dataset)
    ds, _ = data_mod.format_and_clean(datasets.Dataset.from_list(rows), spec.dataset.parts()[0], tok)
    return ds


def fraction(ds: Any) -> float:
    total = sum(len(r) for r in ds["input_ids"])
    return data_mod.loss_tokens(ds) / total


def expected_mask(tok: Any, text: str, pieces: list[str], opener: str) -> list[bool]:
    """Tokens of ``text`` that overlap ``pieces``, each found in order by plain string search right after
    ``opener``: what the assistant wrote, independently of how the trainer finds it."""
    spans, cursor = [], 0
    for piece in pieces:
        start = text.index(opener + piece, cursor) + len(opener)
        spans.append((start, start + len(piece)))
        cursor = start + len(piece)
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    return [any(a < e and b > s for s, e in spans) for a, b in enc["offset_mapping"]]


# --------------------------------------------------------------------------------------------------
# The fraction of loss-carrying tokens, per format and trainOn
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "train_on"),
    [
        ("text", "all"),
        ("alpaca", "completion"),
        ("alpaca", "all"),
        ("completion", "completion"),
        ("completion", "all"),
        ("chat", "assistant"),
        ("chat", "all"),
    ],
)
def test_loss_tokens_match_train_on(fmt: str, train_on: str, tokenizer: Any) -> None:
    alpaca = tiny.alpaca_rows(40, seed=2)
    if fmt == "text":
        rows: list[dict[str, Any]] = [{"text": r["instruction"] + " " + r["output"]} for r in alpaca]
    elif fmt == "alpaca":
        rows = alpaca
    elif fmt == "completion":
        rows = [
            {"question": f"Q: {r['instruction']} {r['input']}\nA:", "answer": " " + r["output"]}
            for r in alpaca
        ]
    else:
        rows = [{"messages": c} for c in conversations(40)]
    fields = {"promptField": "question", "completionField": "answer"} if fmt == "completion" else {}
    ds = formatted(rows, tokenizer, format=fmt, trainOn=train_on, **fields)
    out, dropped = data_mod.tokenize(ds, fmt, tokenizer, 512, train_on=train_on)  # type: ignore[arg-type]
    assert dropped == 0 and len(out) == len(rows)
    share = fraction(out)
    if train_on == "all":
        assert share == 1.0
        assert all(ids == labels for ids, labels in zip(out["input_ids"], out["labels"], strict=True))
        return
    assert 0 < share < 0.5, share
    eos = tokenizer.eos_token
    for i, (ids, labels) in enumerate(zip(out["input_ids"], out["labels"], strict=True)):
        learned = [t for t in labels if t != -100]
        # The learned tokens are one stretch at the end for a completion, the assistant turns for a chat.
        if fmt == "chat":
            text = tokenizer.decode(ids)
            pieces = [m["content"] + "<|im_end|>\n" for m in rows[i]["messages"] if m["role"] == "assistant"]
            opener = "<|im_start|>assistant\n"
            assert [t != -100 for t in labels] == expected_mask(tokenizer, text, pieces, opener)
        else:
            answer = rows[i]["output"] if fmt == "alpaca" else rows[i]["answer"]
            assert tokenizer.decode(learned) == answer + eos
            assert labels[-len(learned) :] == ids[-len(learned) :]
            assert all(t == -100 for t in labels[: -len(learned)])


def test_train_on_defaults_per_format(tokenizer: Any) -> None:
    """Unset, trainOn is the format's default: completion for alpaca, assistant for chat."""
    chats = [{"messages": c} for c in conversations(6)]
    ds = formatted(chats, tokenizer, format="chat")
    default, _ = data_mod.tokenize(ds, "chat", tokenizer, 512)
    assistant, _ = data_mod.tokenize(ds, "chat", tokenizer, 512, train_on="assistant")
    everything, _ = data_mod.tokenize(ds, "chat", tokenizer, 512, train_on="all")
    assert default["labels"] == assistant["labels"] != everything["labels"]
    # The same tokens either way: only what carries the loss differs.
    assert default["input_ids"] == everything["input_ids"]
    assert spec_for(format="chat").dataset.parts()[0].effective_train_on() == "assistant"
    assert spec_for(format="alpaca").dataset.parts()[0].effective_train_on() == "completion"
    with pytest.raises(DataError, match=r"dataset\.trainOn completion does not suit format chat"):
        data_mod.tokenize(ds, "chat", tokenizer, 512, train_on="completion")


def test_truncation_keeps_rows_whose_assistant_turn_starts_in_time(tokenizer: Any) -> None:
    long_question = {"role": "user", "content": "apple river stone " * 30}
    rows = [
        {"messages": [long_question, {"role": "assistant", "content": "too late"}]},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello " * 40}]},
    ]
    ds = formatted(rows, tokenizer, format="chat")
    out, dropped = data_mod.tokenize(ds, "chat", tokenizer, 48)
    assert dropped == 1 and len(out) == 1
    assert len(out[0]["input_ids"]) == 48 and any(t != -100 for t in out[0]["labels"])


def test_conversations_without_an_assistant_reply_are_empty(tokenizer: Any) -> None:
    rows = [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
        {"messages": [{"role": "user", "content": "only a question"}]},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}]},
    ]
    spec = spec_for(format="chat")
    _, stats = data_mod.format_and_clean(datasets.Dataset.from_list(rows), spec.dataset, tokenizer)
    assert (stats.rows_read, stats.empty_dropped, stats.kept) == (3, 2, 1)
    # Training on every token, a question alone is still something to learn.
    spec = spec_for(format="chat", trainOn="all")
    _, stats = data_mod.format_and_clean(datasets.Dataset.from_list(rows), spec.dataset, tokenizer)
    assert (stats.empty_dropped, stats.kept) == (0, 3)


def test_loss_tokens_counts_labels_through_a_selection(tokenizer: Any) -> None:
    ds = formatted(tiny.alpaca_rows(10), tokenizer, format="alpaca")
    out, _ = data_mod.tokenize(ds, "alpaca", tokenizer, 512)
    per_row = [sum(t != -100 for t in labels) for labels in out["labels"]]
    assert data_mod.loss_tokens(out) == sum(per_row)
    picked = out.select([3, 3, 7])  # an indices mapping over the same table: repeats count twice
    assert data_mod.loss_tokens(picked) == 2 * per_row[3] + per_row[7]
    assert data_mod.loss_tokens(out.select([])) == 0


# --------------------------------------------------------------------------------------------------
# format: completion
# --------------------------------------------------------------------------------------------------


def test_completion_format_fields_cleaning_and_errors(tokenizer: Any) -> None:
    rows = [
        {"q": "2 + 2 =", "a": " 4", "other": 1},
        {"q": "2 + 2 =", "a": " 4", "other": 2},  # duplicate
        {"q": "", "a": "a completion alone"},  # no prompt: allowed
        {"q": "no answer", "a": " "},  # nothing to learn
    ]
    spec = spec_for(format="completion", promptField="q", completionField="a")
    ds, stats = data_mod.format_and_clean(datasets.Dataset.from_list(rows), spec.dataset, tokenizer)
    assert ds.column_names == ["prompt", "completion"]
    assert ds["prompt"] == ["2 + 2 =", ""] and ds["completion"] == [" 4", "a completion alone"]
    assert (stats.rows_read, stats.empty_dropped, stats.duplicates_dropped, stats.kept) == (4, 1, 1, 2)
    with pytest.raises(DataError) as err:
        data_mod.format_and_clean(
            datasets.Dataset.from_list([{"q": "x", "answer": "y"}]), spec.dataset, tokenizer
        )
    assert str(err.value) == "dataset.completionField: column 'a' not in dataset; columns are ['q', 'answer']"
    with pytest.raises(DataError, match=r"dataset\.promptField: column 'prompt' not in dataset"):
        plain = spec_for(format="completion")
        data_mod.format_and_clean(datasets.Dataset.from_list([{"completion": "y"}]), plain.dataset, tokenizer)


# --------------------------------------------------------------------------------------------------
# trainOn assistant: Llama-2-, ChatML- and Falcon-style templates, with and without markers
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("style", list(STYLES))
def test_assistant_tokens_are_exactly_the_assistant_turns(style: str) -> None:
    template, marked, writes, opener = STYLES[style]
    tok = with_template(template)
    assert templates.has_generation_markers(template) is marked
    convs = conversations()
    ds = formatted([{"messages": c} for c in convs], tok, format="chat")
    out, dropped = data_mod.tokenize(ds, "chat", tok, 1024, train_on="assistant")
    everything, _ = data_mod.tokenize(ds, "chat", tok, 1024, train_on="all")
    assert dropped == 0 and out["input_ids"] == everything["input_ids"]
    learned_total = 0
    for conv, ids, labels in zip(convs, out["input_ids"], out["labels"], strict=True):
        text = tok.apply_chat_template(conv, tokenize=False)
        assert tok.decode(ids) == text  # every token is the rendering's; nothing added
        pieces = [writes(m["content"], tok.eos_token) for m in conv if m["role"] == "assistant"]
        assert [t != -100 for t in labels] == expected_mask(tok, text, pieces, opener)
        assert tok.decode([t for t in labels if t != -100]) == "".join(pieces)
        learned_total += sum(t != -100 for t in labels)
    assert data_mod.loss_tokens(out) == learned_total
    assert 0 < fraction(out) < 0.5


@pytest.mark.parametrize(("plain", "marked"), FAMILIES)
def test_markers_and_role_masking_agree(plain: str, marked: str) -> None:
    """A family's template without markers (masked by role) and with them learn the same tokens."""
    convs = conversations(12)
    results = []
    for style in (plain, marked):
        tok = with_template(STYLES[style][0])
        ds = formatted([{"messages": c} for c in convs], tok, format="chat")
        results.append(data_mod.tokenize(ds, "chat", tok, 1024)[0])
    assert results[0]["input_ids"] == results[1]["input_ids"]
    assert results[0]["labels"] == results[1]["labels"]


@pytest.mark.trainer
@pytest.mark.parametrize("style", [s for s, (_, marked, _, _) in STYLES.items() if marked])
def test_marked_templates_equal_trl_assistant_only_loss(style: str, tmp_path: Path) -> None:
    """Where the template has markers, the labels are TRL 1.16's own (SFTConfig assistant_only_loss)."""
    pytest.importorskip("trl")
    from trl import SFTConfig, SFTTrainer

    tok = with_template(STYLES[style][0])
    convs = conversations(12)
    convs.append([{"role": "user", "content": "apple " * 60}, {"role": "assistant", "content": "late"}])
    ds = formatted([{"messages": c} for c in convs], tok, format="chat")
    args = SFTConfig(
        output_dir=str(tmp_path / "trl"),
        max_length=96,
        packing=False,
        assistant_only_loss=True,
        report_to="none",
        use_cpu=True,
        bf16=False,
        fp16=False,
    )
    trainer = SFTTrainer(
        model=tiny.build_model("llama", tok), args=args, train_dataset=ds, processing_class=tok
    )
    expected = trainer.train_dataset
    ours, dropped = data_mod.tokenize(ds, "chat", tok, 96, train_on="assistant")
    assert dropped == 1 and len(expected) == len(convs) - 1  # the one whose reply starts past 96 tokens
    assert ours["input_ids"] == expected["input_ids"]
    assert ours["labels"] == expected["labels"]


def test_falcon_without_an_end_token_warns(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="kubetune.trainer")
    for style in ("falcon", "chatml-plain"):
        tok = with_template(STYLES[style][0])
        ds = formatted([{"messages": c} for c in conversations(2)], tok, format="chat")
        caplog.clear()
        data_mod.tokenize(ds, "chat", tok, 256)
        warned = "the model may not learn to stop" in caplog.text
        assert warned is (style == "falcon"), caplog.text


def test_a_template_that_renders_turns_differently_later_is_refused() -> None:
    # EOS only after the conversation's last message: a turn renders differently once another follows.
    last_eos = (
        "{% for m in messages %}{{ '<|' + m['role'] + '|>\\n' + m['content'] }}"
        "{% if loop.last %}{{ eos_token }}{% endif %}{{ '\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
    )
    tok = with_template(last_eos)
    ds = formatted([{"messages": c} for c in conversations(2)], tok, format="chat")
    with pytest.raises(DataError) as err:
        data_mod.tokenize(ds, "chat", tok, 256)
    message = str(err.value)
    assert message.startswith("dataset.trainOn assistant: the chat template has no {% generation %} markers")
    for fix in (
        "dataset.chatTemplate to a built-in",
        "{% generation %} … {% endgeneration %}",
        "trainOn: all",
    ):
        assert fix in message
    # trainOn all does not need the turns.
    out, _ = data_mod.tokenize(ds, "chat", tok, 256, train_on="all")
    assert fraction(out) == 1.0


def test_markers_that_mark_nothing_are_refused() -> None:
    tok = with_template(
        "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}"
        "{% if false %}{% generation %}{% endgeneration %}{% endif %}"
    )
    ds = formatted([{"messages": c} for c in conversations(2)], tok, format="chat")
    with pytest.raises(DataError, match=r"markers mark no text of a conversation"):
        data_mod.tokenize(ds, "chat", tok, 256)


def test_template_errors_name_the_field(tokenizer: Any) -> None:
    rows = [
        {"messages": [{"role": "assistant", "content": "I speak first"}, {"role": "user", "content": "ok"}]}
    ]
    tok = with_template(templates.BUILTIN["llama-2"])  # Meta's alternation check
    with pytest.raises(
        DataError, match=r"^dataset\.chatTemplate: rendering a conversation failed: .*alternate"
    ):
        formatted(rows, tok, format="chat")


# --------------------------------------------------------------------------------------------------
# dataset.chatTemplate: built-ins, inline Jinja, errors, saved with the tokenizer
# --------------------------------------------------------------------------------------------------


def test_builtins() -> None:
    assert tuple(templates.BUILTIN) == BUILTIN_CHAT_TEMPLATES
    conv = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}]
    for name, template in templates.BUILTIN.items():
        assert templates.resolve(name) == template and templates.has_generation_markers(template)
        tok = tiny.build_tokenizer()
        templates.apply(tok, name)
        assert tok.chat_template == template
        prompt = tok.apply_chat_template(conv[:1], tokenize=False, add_generation_prompt=True)
        assert tok.apply_chat_template(conv, tokenize=False).startswith(prompt)
    # A one-turn alpaca chat renders exactly as format alpaca's prompt + completion + EOS.
    tok = with_template(templates.BUILTIN["alpaca"])
    assert (
        tok.apply_chat_template(conv, tokenize=False)
        == data_mod.alpaca_prompt("Name a colour.") + "Blue.</s>"
    )
    tok = with_template(templates.BUILTIN["guanaco"])
    assert (
        tok.apply_chat_template(conv, tokenize=False) == "### Human: Name a colour.### Assistant: Blue.</s>"
    )
    # Meta's BOS before each [INST]; a tokenizer without a BOS token writes none.
    tok = with_template(templates.BUILTIN["llama-2"])
    assert tok.apply_chat_template(conv, tokenize=False) == "<s>[INST] Name a colour. [/INST] Blue. </s>"
    tok.bos_token = None
    templates.apply(tok, "llama-2")
    assert tok.apply_chat_template(conv, tokenize=False) == "[INST] Name a colour. [/INST] Blue. </s>"
    assert templates.resolve("{{ messages }}") == "{{ messages }}"
    assert templates.has_generation_markers({"default": "{%- generation -%}x{% endgeneration %}"})
    assert not templates.has_generation_markers(None)


def test_apply_refuses_broken_templates(caplog: pytest.LogCaptureFixture) -> None:
    tok = tiny.build_tokenizer()
    with pytest.raises(
        DataError, match=r"^dataset\.chatTemplate \(inline template\): Jinja syntax error on line 1"
    ):
        templates.apply(tok, "{% for m in messages %}{{ m['content'] }}")
    with pytest.raises(
        DataError, match=r"^dataset\.chatTemplate \(inline template\): rendering a user/assistant"
    ):
        templates.apply(tok, "{{ raise_exception('no chats here') }}")
    with pytest.raises(DataError, match="renders a conversation as empty text"):
        templates.apply(tok, "{% if false %}{{ messages }}{% endif %}")
    assert tok.chat_template == tiny.CHAT_TEMPLATE  # unchanged by the refusals
    templates.apply(tok, None)
    assert tok.chat_template == tiny.CHAT_TEMPLATE
    # chatml on a tokenizer without its tokens: a warning, not an error.
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.train_from_iterator(["hello world"], trainers.BpeTrainer(vocab_size=300, special_tokens=["</s>"]))
    plain = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="</s>")
    caplog.set_level(logging.WARNING, logger="kubetune.trainer")
    templates.apply(plain, "chatml")
    assert "has no <|im_start|> or <|im_end|> token" in caplog.text


def save_model_without_template(path: Path) -> Path:
    """A tiny base model whose tokenizer has no chat template (a base model, like Llama-2-7b-hf)."""
    tok = tiny.build_tokenizer()
    tok.chat_template = None
    tiny.build_model("llama", tok).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.mark.parametrize("value", ["guanaco", "custom"])
def test_chat_template_round_trips_through_the_saved_tokenizer(value: str, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    from kubetune.trainer import modeling, prepare

    custom = (
        "{% for m in messages %}{{ '<' + m['role'] + '> ' }}{% if m['role'] == 'assistant' %}"
        "{% generation %}{{ m['content'] + eos_token }}{% endgeneration %}"
        "{% else %}{{ m['content'] }}{% endif %}"
        "{{ '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<assistant> ' }}{% endif %}"
    )
    chat_template = custom if value == "custom" else value
    model = save_model_without_template(tmp_path / "base")
    base = FineTuneJob.model_validate(
        {
            "apiVersion": "kubetune.io/v1alpha1",
            "kind": "FineTuneJob",
            "metadata": {"name": "c"},
            "spec": {"model": {"path": str(model)}, "dataset": {"files": ["x.jsonl"], "format": "chat"}},
        }
    )
    spec = base.model_copy(deep=True)
    spec.spec.dataset.chat_template = chat_template
    plain_tok = modeling.load_tokenizer(base.spec, tmp_path)
    assert plain_tok.chat_template is None
    # A base model without a template cannot take chat data; with dataset.chatTemplate it can.
    rows = [{"messages": c} for c in conversations(4)]
    with pytest.raises(DataError, match=r"set dataset\.chatTemplate"):
        data_mod.format_and_clean(datasets.Dataset.from_list(rows), base.spec.dataset, plain_tok)
    tok = modeling.load_tokenizer(spec.spec, tmp_path)
    assert tok.chat_template == templates.resolve(chat_template)
    ds, _ = data_mod.format_and_clean(datasets.Dataset.from_list(rows), spec.spec.dataset, tok)
    out, _ = data_mod.tokenize(ds, "chat", tok, 512)
    assert 0 < fraction(out) < 0.5
    # The prepared-data key changes with the template.
    assert prepare.tokenizer_digest(tok) != prepare.tokenizer_digest(plain_tok)

    tok.save_pretrained(tmp_path / "saved")
    again = AutoTokenizer.from_pretrained(tmp_path / "saved")
    assert again.chat_template == tok.chat_template
    conv = conversations(2)[1]
    assert again.apply_chat_template(conv, tokenize=False) == tok.apply_chat_template(conv, tokenize=False)
    prompt = modeling.sample_input_ids("Name a colour.", spec.spec, again)
    assert prompt == modeling.sample_input_ids("Name a colour.", spec.spec, tok)
    expected_end = "### Assistant:" if value == "guanaco" else "<assistant> "
    assert again.decode(prompt).endswith(expected_end)


def test_sample_prompts_follow_the_format(tokenizer: Any) -> None:
    from kubetune.trainer import modeling

    def decoded(**dataset: Any) -> str:
        return str(tokenizer.decode(modeling.sample_input_ids("Say hi.", spec_for(**dataset), tokenizer)))

    assert decoded(format="alpaca") == data_mod.alpaca_prompt("Say hi.")
    assert decoded(format="completion") == "Say hi."
    assert decoded(format="chat") == "<|im_start|>user\nSay hi.<|im_end|>\n<|im_start|>assistant\n"
    mix = {
        "files": None,
        "sources": [{"files": ["a.jsonl"], "format": "alpaca"}, {"files": ["b.jsonl"], "format": "chat"}],
    }
    assert decoded(**mix).endswith("<|im_start|>assistant\n")  # the template the model is saved with


# --------------------------------------------------------------------------------------------------
# A chat run on a tiny model: a base model without a template, dataset.chatTemplate llama-2
# --------------------------------------------------------------------------------------------------


@pytest.mark.trainer
def test_chat_run_trains_on_assistant_tokens_and_saves_the_template(tmp_path: Path) -> None:
    pytest.importorskip("trl")
    pytest.importorskip("bitsandbytes")
    from transformers import AutoTokenizer

    from kubetune.trainer import run
    from kubetune.trainer.prepare import cache_root

    model = save_model_without_template(tmp_path / "base")
    rows = [{"messages": c} for c in conversations(48)]
    job = tiny.write_job(
        tmp_path / "job",
        model,
        rows,
        dataset={"format": "chat", "chatTemplate": "llama-2", "validation": None},
        method={"type": "lora", "lora": {"r": 8, "alpha": 16, "dropout": 0.0}, "quantization": None},
        training={"maxSteps": 8, "saveSteps": 8, "loggingSteps": 1, "maxSeqLength": 128},
        samples={"prompts": ["What is the capital of Peru?"], "maxNewTokens": 4},
    )
    metrics = run(job)
    assert metrics["steps"] == 8
    out = tiny.run_folder(job)
    state = json.loads((out / "checkpoints" / "checkpoint-8" / "trainer_state.json").read_text())
    losses = [e["loss"] for e in state["log_history"] if "loss" in e]
    assert len(losses) == 8 and sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.3, losses
    # The rows trained on: the assistant's tokens only, a measured share of them.
    prepared = datasets.load_from_disk(str(cache_root() / metrics["prepared"]["key"] / "train"))
    share = fraction(prepared)
    assert 0.05 < share < 0.5, share
    assert metrics["prepared"]["train_loss_tokens"] == data_mod.loss_tokens(prepared)
    for ids, labels in zip(prepared["input_ids"][:5], prepared["labels"][:5], strict=True):
        learned = [t for t, label in zip(ids, labels, strict=True) if label != -100]
        text = AutoTokenizer.from_pretrained(model).decode(learned)
        assert "[INST]" not in text and text.count("</s>") >= 1
    # Saved with the adapter: the pushed model chats the way it was trained.
    saved = AutoTokenizer.from_pretrained(out / "adapter")
    assert saved.chat_template == templates.BUILTIN["llama-2"]
    samples = json.loads((out / "samples.json").read_text())
    assert [s["prompt"] for s in samples] == ["What is the capital of Peru?"]
