"""Chat templates: the built-ins of ``dataset.chatTemplate``, and setting one on a tokenizer.

Each built-in wraps what the assistant writes, its end-of-turn token included, in ``{% generation %}``
… ``{% endgeneration %}``, so ``dataset.trainOn: assistant`` takes its loss mask straight from the
template (transformers' ``return_assistant_tokens_mask``, as TRL's ``assistant_only_loss`` does), and
each renders a conversation's start exactly as a prefix of the whole conversation. The generation
prompt ends where the assistant's text begins, on a token boundary (``[/INST]``, ``### Assistant:``),
so the space that starts a reply is learned as the model will write it.

- ``chatml``: ``<|im_start|>role\\n…<|im_end|>\\n`` (Qwen, OpenHermes, …). A tokenizer without the
  ``<|im_start|>``/``<|im_end|>`` tokens writes them as several plain tokens (a warning says so).
- ``llama-2``: Meta's Llama-2-chat template (``<s>[INST] <<SYS>>…<</SYS>> … [/INST] … </s>``).
- ``alpaca``: the Alpaca prompt of ``format: alpaca`` (a system message replaces its preamble); a
  one-turn conversation renders exactly as an alpaca row does.
- ``guanaco``: ``### Human: …### Assistant: …`` of timdettmers/openassistant-guanaco, with the EOS
  token closing each assistant turn.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from kubetune.api.v1alpha1 import BUILTIN_CHAT_TEMPLATES
from kubetune.trainer.errors import DataError

log = logging.getLogger("kubetune.trainer")

_SYSTEM_FIRST = (
    "{% if messages and messages[0]['role'] == 'system' %}"
    "{% set system_message = messages[0]['content'] %}{% set loop_messages = messages[1:] %}"
    "{% else %}{% set system_message = none %}{% set loop_messages = messages %}{% endif %}"
)

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + '<|im_end|>\\n' }}{% endgeneration %}"
    "{% else %}{{ message['content'] + '<|im_end|>\\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Meta's template (the alternation check, <<SYS>> folded into the first user turn, strip()), with markers;
# a tokenizer without a BOS token writes none.
LLAMA_2 = (
    _SYSTEM_FIRST + "{% set bos = bos_token if bos_token is defined and bos_token else '' %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{% if loop.index0 == 0 and system_message is not none %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}"
    "{{ bos + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{% generation %}{{ ' ' + content.strip() + ' ' + eos_token }}{% endgeneration %}"
    "{% endif %}"
    "{% endfor %}"
)

_ALPACA_PREAMBLE = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request."
)
ALPACA = (
    _SYSTEM_FIRST
    + "{{ (system_message if system_message is not none else '"
    + _ALPACA_PREAMBLE
    + "') + '\\n\\n' }}"
    "{% for message in loop_messages %}"
    "{% if message['role'] == 'user' %}"
    "{% if not loop.first %}{{ '\\n\\n' }}{% endif %}"
    "{{ '### Instruction:\\n' + message['content'] + '\\n\\n' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ '### Response:\\n' }}{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Response:\\n' }}{% endif %}"
)

GUANACO = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] + '\\n\\n' }}"
    "{% elif message['role'] == 'user' %}{{ '### Human: ' + message['content'] }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ '### Assistant:' }}{% generation %}{{ ' ' + message['content'] + eos_token }}{% endgeneration %}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Assistant:' }}{% endif %}"
)

BUILTIN: dict[str, str] = {"chatml": CHATML, "llama-2": LLAMA_2, "alpaca": ALPACA, "guanaco": GUANACO}
assert tuple(BUILTIN) == BUILTIN_CHAT_TEMPLATES, "the API's list of built-ins and this module disagree"

# transformers' own test (render_jinja_template), whitespace-trim variants included.
_GENERATION_RE = re.compile(r"\{%-?\s*generation\s*-?%\}")

# Rendered to check a template before any row is: a conversation every chat template must handle
# (no system message: some templates refuse one).
_PROBE = [
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "Bye"},
]


def resolve(value: str) -> str:
    """The Jinja text of ``dataset.chatTemplate``: a built-in's by name, else ``value`` itself."""
    return BUILTIN.get(value, value)


def has_generation_markers(template: str | dict[str, str] | None) -> bool:
    """Whether the template marks the assistant's text with ``{% generation %}`` (for a template shipped
    as named variants, its ``default``)."""
    if isinstance(template, dict):
        template = template.get("default")
    return bool(template) and _GENERATION_RE.search(template or "") is not None


def apply(tokenizer: Any, chat_template: str | None) -> None:
    """Set ``dataset.chatTemplate`` (a built-in name or inline Jinja) as the tokenizer's chat template,
    so training, the prepared-data key and ``save_pretrained`` all use it. ``None`` keeps the
    tokenizer's own. A template that does not compile, or fails on a plain conversation, is a
    :class:`DataError` naming ``dataset.chatTemplate``."""
    if chat_template is None:
        return
    template = resolve(chat_template)
    what = f"built-in {chat_template!r}" if chat_template in BUILTIN else "inline template"
    check(tokenizer, template, where=f"dataset.chatTemplate ({what})")
    tokenizer.chat_template = template
    if template == CHATML:
        missing = [t for t in ("<|im_start|>", "<|im_end|>") if t not in tokenizer.get_vocab()]
        if missing:
            log.warning(
                "dataset.chatTemplate chatml: this tokenizer has no %s token, so each is written as several "
                "plain tokens and generation stops only at the EOS token %r; for a base model without them "
                "the llama-2, alpaca or guanaco templates end turns with its EOS token",
                " or ".join(missing),
                tokenizer.eos_token,
            )


def check(tokenizer: Any, template: str, where: str = "dataset.chatTemplate") -> None:
    """Compile ``template`` and render a short conversation with it (both ways the trainer renders:
    whole, and up to a generation prompt); a failure is a :class:`DataError` naming ``where``."""
    import jinja2
    from transformers.utils.chat_template_utils import render_jinja_template

    kwargs = dict(tokenizer.special_tokens_map)
    try:
        whole, _ = render_jinja_template(conversations=[_PROBE], chat_template=template, **kwargs)
        render_jinja_template(
            conversations=[_PROBE[:1]], chat_template=template, add_generation_prompt=True, **kwargs
        )
    except jinja2.TemplateSyntaxError as exc:
        raise DataError(f"{where}: Jinja syntax error on line {exc.lineno}: {exc.message}") from None
    except Exception as exc:  # the template's own raise_exception, undefined names, type errors
        raise DataError(
            f"{where}: rendering a user/assistant/user conversation failed: {type(exc).__name__}: {exc}"
        ) from None
    if not whole[0].strip():
        raise DataError(f"{where}: the template renders a conversation as empty text")
