"""Secrets never leave through a message: the one place where token-shaped text is found and redacted.

Every sink that turns data into text a person (or a log store) sees goes through :func:`redact`: the
CLI's problems, the operator's status messages, events and logs, the trainer's logs, warnings,
tracebacks, termination message, progress lines and model card. :func:`find_tokens` is the spec-side
check: it looks in mapping keys as well as values, in bytes (a ``!!binary`` scalar), and in base64 text
that decodes (through up to two layers, standard or URL-safe alphabet) to a token.

What counts as a secret:
- a Hugging Face token (``hf_…``, ``api_org_…``), whatever surrounds it;
- a value this process knows to be secret, of any shape: ``$HF_TOKEN`` / ``$HUGGING_FACE_HUB_TOKEN``,
  the trackers' credentials (``$MLFLOW_TRACKING_PASSWORD``, ``$MLFLOW_TRACKING_TOKEN``,
  ``$WANDB_API_KEY``), and whatever :func:`add_secret` registered (the trainer registers its token and
  the trackers' as soon as it reads them);
- the credential of an ``Authorization`` header (``Bearer``, ``token``, ``Basic``), a ``Bearer`` value,
  and the password of a URL (``https://user:pw@host``), as a server may echo them back;
- base64 text that decodes to any of the first two.

Standard library only (``re``, ``base64``): `kubetune validate` imports it.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import logging
import os
import re
import sys
import threading
import traceback
import warnings
from collections.abc import Iterable, Mapping
from types import TracebackType
from typing import Any, TextIO

# Hugging Face user access tokens (hf_…) and the older organisation API tokens (api_org_…).
TOKEN_RE = re.compile(r"(hf_|api_org_)[A-Za-z0-9]{20,}")

# A credential in a header or URL echoed back by a server: `Authorization: Bearer xyz`,
# `"authorization": "Bearer xyz"`, `Bearer xyz` alone, `https://user:xyz@host`.
_HEADER_RE = re.compile(
    r"(?i)(\b(?:proxy-)?authorization\b['\"]?\s*[:=]\s*['\"]?(?:(?:bearer|token|basic)\b)?\s*)"
    r"(?!(?:bearer|token|basic)\b|\*\*\*)([^\s'\",;}]{6,})"
)
# `Bearer <value>` without the header's name: a value of 16+ characters with a digit (not prose).
_BEARER_RE = re.compile(r"(?i)(\bbearer\s+)(?=[A-Za-z0-9._~+/=-]*\d)([A-Za-z0-9._~+/=-]{16,})")
_URL_CREDENTIAL_RE = re.compile(r"(?i)(\b[a-z][a-z0-9+.-]*://[^/\s:@]+:)([^@\s/]+)(@)")
# Runs long enough to hide a base64-encoded token (20 + 3 characters encode to at least 31).
_BASE64_RUN_RE = re.compile(r"[A-Za-z0-9+/_-]{28,}={0,2}")
_MIN_RUN = 28

MASK = "***"
MIN_SECRET_LENGTH = 6  # shorter known values are not masked: they would mask ordinary words

# Values this process knows to be secret (e.g. $HF_TOKEN), whatever their shape.
_KNOWN: set[str] = set()
# The Hub token and the experiment trackers' credentials (kubetune.render.secret_refs fills them from
# Secrets): masked in every process that has them, the prepare init container's included.
SECRET_ENV = (
    "HF_TOKEN",
    "HUGGING_FACE_HUB_TOKEN",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
    "WANDB_API_KEY",
)


def add_secret(value: str | None) -> None:
    """Redact ``value`` too, from now on, wherever it appears (plainly or base64-encoded)."""
    if value and len(value.strip()) >= MIN_SECRET_LENGTH:
        _KNOWN.add(value.strip())


def _known(env: Mapping[str, str] | None) -> list[str]:
    env = os.environ if env is None else env
    found = {
        v.strip() for v in (env.get(name, "") for name in SECRET_ENV) if len(v.strip()) >= MIN_SECRET_LENGTH
    }
    return sorted(found | _KNOWN, key=len, reverse=True)  # longest first: one never hides part of another


def _decode_base64(text: str) -> str | None:
    """``text`` decoded as base64 (the URL-safe alphabet when it uses ``-`` or ``_``), or None."""
    padded = (text.rstrip("=") + "=" * (-len(text.rstrip("=")) % 4)).encode("ascii")
    altchars = b"-_" if ("-" in text or "_" in text) else None
    try:
        return base64.b64decode(padded, altchars=altchars, validate=True).decode("latin-1")
    except (binascii.Error, ValueError):
        return None


def _candidates(run: str) -> Iterable[str]:
    """The run itself, then its ``/``-separated pieces (a base64 value at the end of a URL path)."""
    yield run
    if "/" in run:
        yield from (piece for piece in run.split("/") if len(piece) >= _MIN_RUN)


def _plain(text: str, secrets: Iterable[str]) -> bool:
    return bool(TOKEN_RE.search(text)) or any(secret in text for secret in secrets)


def _hides_token(run: str, depth: int = 2, secrets: Iterable[str] = ()) -> bool:
    """A base64 run that decodes (through up to ``depth`` layers) to something holding a token."""
    secrets = tuple(secrets)
    for candidate in _candidates(run):
        decoded = _decode_base64(candidate)
        if decoded is None:
            continue
        if _plain(decoded, secrets):
            return True
        if depth > 1 and any(
            _hides_token(m.group(), depth - 1, secrets) for m in _BASE64_RUN_RE.finditer(decoded)
        ):
            return True
    return False


def _text(value: str | bytes | bytearray) -> str:
    if isinstance(value, bytes | bytearray):
        # Bytes as they are, and without NULs (a UTF-16 encoding of an ASCII token).
        raw = bytes(value)
        return raw.decode("latin-1") + "\n" + raw.replace(b"\x00", b"").decode("latin-1")
    return value


def contains_token(value: str | bytes | bytearray, env: Mapping[str, str] | None = None) -> bool:
    """True when ``value`` holds a token or a known secret: plainly, in bytes, or base64-encoded."""
    text, secrets = _text(value), _known(env)
    if _plain(text, secrets):
        return True
    return any(_hides_token(m.group(), secrets=secrets) for m in _BASE64_RUN_RE.finditer(text))


def redact(text: str, env: Mapping[str, str] | None = None) -> str:
    """``text`` with every token, known secret value, credential header and base64-wrapped token masked.

    Redact first, then shorten: a token cut in half may no longer look like one."""
    return _redact(text if isinstance(text, str) else str(text), _known(env))


def _redact(text: str, secrets: list[str]) -> str:
    for secret in secrets:
        text = text.replace(secret, MASK)
    text = TOKEN_RE.sub(lambda m: m.group(1) + MASK, text)  # hf_***, api_org_***
    text = _HEADER_RE.sub(lambda m: m.group(1) + MASK, text)
    text = _BEARER_RE.sub(lambda m: m.group(1) + MASK, text)
    text = _URL_CREDENTIAL_RE.sub(lambda m: m.group(1) + MASK + m.group(3), text)
    return _BASE64_RUN_RE.sub(lambda m: MASK if _hides_token(m.group(), secrets=secrets) else m.group(), text)


def redact_data(data: Any, env: Mapping[str, str] | None = None) -> Any:
    """``data`` (JSON-like: dicts, lists, strings) with every string, key included, redacted."""
    return _redact_data(data, _known(env))  # the known secrets looked up once, not per string


def _redact_data(data: Any, secrets: list[str]) -> Any:
    if isinstance(data, str):
        return _redact(data, secrets)
    if isinstance(data, dict):
        return {_redact_data(k, secrets): _redact_data(v, secrets) for k, v in data.items()}
    if isinstance(data, list | tuple):
        return type(data)(_redact_data(v, secrets) for v in data)
    return data


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
    elif isinstance(data, list | tuple):
        for i, v in enumerate(data):
            found += find_tokens(v, (*loc, i), _depth=_depth + 1)
    elif isinstance(data, str | bytes | bytearray) and contains_token(data):
        found.append(loc)
    return found


# --------------------------------------------------------------------------------------------------
# Logs, warnings and tracebacks
# --------------------------------------------------------------------------------------------------


def _redact_record(record: logging.LogRecord) -> logging.LogRecord:
    """The record with its message, arguments, traceback and stack redacted (rendered now)."""
    if getattr(record, "_kubetune_redacted", False):
        return record
    try:
        message = record.getMessage()
    except Exception:  # a bad format string: keep the raw message, still redacted
        message = str(record.msg)
    record.msg, record.args = redact(message), None
    if record.exc_info and record.exc_info[1] is not None:
        # Render the traceback now, redacted; a formatter prints exc_text as it is.
        record.exc_text = redact("".join(traceback.format_exception(*record.exc_info)).rstrip("\n"))
        record.exc_info = None
    elif record.exc_text:
        record.exc_text = redact(record.exc_text)
    if record.stack_info:
        record.stack_info = redact(record.stack_info)
    record._kubetune_redacted = True
    return record


class RedactingFilter(logging.Filter):
    """A logging filter that redacts every record's message (and its arguments) before it is written."""

    def filter(self, record: logging.LogRecord) -> bool:
        _redact_record(record)
        return True


def install_log_redaction(logger: logging.Logger | None = None) -> None:
    """Redact every record that reaches the handlers of ``logger`` (the root logger by default)."""
    target = logger or logging.getLogger()
    for handler in target.handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())


_installed = threading.Lock()
_INSTALLED: set[str] = set()


def install_process_redaction(*loggers: str) -> None:
    """Redact everything this process writes through logging, warnings and uncaught exceptions.

    Idempotent. Every log record is redacted when it is made (a record factory), so handlers that
    libraries add later are covered too; the handlers of the root logger, of ``logging.lastResort`` and
    of each logger named in ``loggers`` get a :class:`RedactingFilter` as well (records made without
    the factory). ``warnings.showwarning``, ``sys.excepthook``, ``threading.excepthook`` and
    ``logging.Handler.handleError`` (which prints the exception being handled when a handler cannot
    write) print redacted text."""
    with _installed:
        if "factory" not in _INSTALLED:
            _INSTALLED.add("factory")
            previous = logging.getLogRecordFactory()

            def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
                return _redact_record(previous(*args, **kwargs))

            logging.setLogRecordFactory(factory)
            _wrap_warnings()
            _wrap_excepthooks()
            logging.Handler.handleError = _handle_logging_error  # type: ignore[method-assign]
    for name in ("", *loggers):
        install_log_redaction(logging.getLogger(name))
    last = logging.lastResort
    if last is not None and not any(isinstance(f, RedactingFilter) for f in last.filters):
        last.addFilter(RedactingFilter())


def _wrap_warnings() -> None:
    show = warnings.showwarning

    def showwarning(
        message: Warning | str,
        category: type[Warning],
        filename: str,
        lineno: int,
        file: TextIO | None = None,
        line: str | None = None,
    ) -> None:
        show(redact(str(message)), category, filename, lineno, file, redact(line) if line else line)

    warnings.showwarning = showwarning


def _wrap_excepthooks() -> None:
    def excepthook(kind: type[BaseException], value: BaseException, tb: TracebackType | None) -> None:
        sys.stderr.write(redact("".join(traceback.format_exception(kind, value, tb))))

    def thread_excepthook(args: threading.ExceptHookArgs) -> None:
        if args.exc_type is SystemExit:
            return
        name = args.thread.name if args.thread is not None else "?"
        text = "".join(traceback.format_exception(args.exc_type, args.exc_value, args.exc_traceback))
        sys.stderr.write(redact(f"Exception in thread {name}:\n{text}"))

    sys.excepthook = excepthook
    threading.excepthook = thread_excepthook


def _handle_logging_error(self: logging.Handler, record: logging.LogRecord) -> None:
    """logging.Handler.handleError, redacted: the exception being handled when a handler fails may be
    one whose text holds a secret (an API error's body)."""
    if not logging.raiseExceptions or sys.stderr is None:
        return
    with contextlib.suppress(Exception):
        kind, value, tb = sys.exc_info()
        text = "".join(traceback.format_exception(kind, value, tb)) if kind is not None else ""
        sys.stderr.write(
            redact(f"--- Logging error ---\n{text}Message: {record.msg!r}\nArguments: {record.args!r}\n")
        )
