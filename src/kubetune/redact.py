"""Secrets never leave through a message: the one place where token-shaped text is found and redacted.

Every sink that turns data into text a person (or a log store) sees goes through :func:`redact`: the
CLI's problems, the operator's status messages, events and logs, the trainer's logs, errors,
termination message and model card. :func:`find_tokens` is the spec-side check: it looks in mapping
keys as well as values, in bytes (a ``!!binary`` scalar), and in base64 text that decodes to a token.

Standard library only (``re``, ``base64``): `kubetune validate` imports it.
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
import re
from collections.abc import Iterable, Mapping
from typing import Any

# Hugging Face user access tokens (hf_…) and the older organisation API tokens (api_org_…).
TOKEN_RE = re.compile(r"(?:hf_|api_org_)[A-Za-z0-9]{20,}")

# A credential in a header or URL echoed back by a server: `Authorization: Bearer xyz`,
# `"authorization": "Bearer xyz"`, `https://user:xyz@host`.
_HEADER_RE = re.compile(
    r"(?i)(\bauthorization\b['\"]?\s*[:=]\s*['\"]?(?:bearer|token|basic)?\s*)([^\s'\",;}]{6,})"
)
_URL_CREDENTIAL_RE = re.compile(r"(?i)(\b[a-z][a-z0-9+.-]*://[^/\s:@]+:)([^@\s/]+)(@)")
# Runs long enough to hide a base64-encoded token (20 + 3 characters encode to at least 31).
_BASE64_RUN_RE = re.compile(r"[A-Za-z0-9+/_-]{28,}={0,2}")

MASK = "***"

# Values this process knows to be secret (e.g. $HF_TOKEN), whatever their shape.
_KNOWN: set[str] = set()
SECRET_ENV = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")


def add_secret(value: str | None) -> None:
    """Redact ``value`` too, from now on, wherever it appears."""
    if value and len(value.strip()) >= 6:
        _KNOWN.add(value.strip())


def _known(env: Mapping[str, str] | None) -> Iterable[str]:
    env = os.environ if env is None else env
    for name in SECRET_ENV:
        value = env.get(name, "").strip()
        if len(value) >= 6:
            yield value
    yield from _KNOWN


def _decode_base64(text: str) -> str | None:
    padded = text + "=" * (-len(text) % 4)
    for decode in (base64.b64decode, base64.urlsafe_b64decode):
        try:
            return decode(padded.encode("ascii")).decode("latin-1")
        except (binascii.Error, ValueError):
            continue
    return None


def _hides_token(run: str, depth: int = 2) -> bool:
    """A base64 run that decodes (through up to ``depth`` layers) to something holding a token."""
    decoded = _decode_base64(run)
    if decoded is None:
        return False
    if TOKEN_RE.search(decoded):
        return True
    return depth > 1 and any(_hides_token(m.group(), depth - 1) for m in _BASE64_RUN_RE.finditer(decoded))


def contains_token(value: str | bytes, env: Mapping[str, str] | None = None) -> bool:
    """True when ``value`` holds a token: plainly, in bytes, or base64-encoded."""
    text = value.decode("latin-1") if isinstance(value, bytes | bytearray) else value
    if TOKEN_RE.search(text) or any(secret in text for secret in _known(env)):
        return True
    return any(_hides_token(m.group()) for m in _BASE64_RUN_RE.finditer(text))


def redact(text: str, env: Mapping[str, str] | None = None) -> str:
    """``text`` with every token, known secret value, credential header and base64-wrapped token masked."""
    text = TOKEN_RE.sub(lambda m: m.group()[: m.group().index("_") + 1] + MASK, text)  # hf_***
    for secret in sorted(_known(env), key=len, reverse=True):
        text = text.replace(secret, MASK)
    text = _HEADER_RE.sub(lambda m: m.group(1) + MASK, text)
    text = _URL_CREDENTIAL_RE.sub(lambda m: m.group(1) + MASK + m.group(3), text)
    return _BASE64_RUN_RE.sub(lambda m: MASK if _hides_token(m.group()) else m.group(), text)


Loc = tuple[str | int, ...]


def find_tokens(data: Any, loc: Loc = (), *, _depth: int = 0) -> list[Loc]:
    """The location of every key or value in a parsed document that holds a token.

    A key that holds one is reported at its own location (the key is the leak, so the location names
    it through its redacted text)."""
    found: list[Loc] = []
    if _depth > 200:  # the loader bounds nesting long before this; never recurse without end
        return found
    if isinstance(data, dict):
        for k, v in data.items():
            key = k if isinstance(k, str | bytes) else str(k)
            if contains_token(key):
                found.append((*loc, redact(key.decode("latin-1") if isinstance(key, bytes) else key)))
                continue
            found += find_tokens(v, (*loc, str(k)), _depth=_depth + 1)
    elif isinstance(data, list):
        for i, v in enumerate(data):
            found += find_tokens(v, (*loc, i), _depth=_depth + 1)
    elif isinstance(data, str | bytes | bytearray) and contains_token(data):
        found.append(loc)
    return found


class RedactingFilter(logging.Filter):
    """A logging filter that redacts every record's message (and its arguments) before it is written."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a bad format string: keep the raw message, still redacted
            message = str(record.msg)
        record.msg, record.args = redact(message), None
        if record.exc_info and record.exc_info[1] is not None:
            # Render the traceback now, redacted; the formatter then prints it as it is.
            formatter = logging.Formatter()
            record.exc_text = redact(formatter.formatException(record.exc_info))
            record.exc_info = None
        return True


def install_log_redaction(logger: logging.Logger | None = None) -> None:
    """Redact every record that reaches the handlers of ``logger`` (the root logger by default)."""
    target = logger or logging.getLogger()
    for handler in target.handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())
