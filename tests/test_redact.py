"""kubetune.redact: what counts as a secret, where it is found, and that every sink masks it."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import logging
import random
import sys
import threading
import warnings
from collections.abc import Iterator

import pytest

from kubetune import redact as rd
from kubetune.redact import MASK, add_secret, contains_token, find_tokens, redact, redact_data

TOKEN = "hf_" + "A1b2C3d4E5f6G7h8I9j0KlMnOpQrSt"
ORG_TOKEN = "api_org_" + "ZyXwVuTsRqPoNmLkJiHgFeDcBa98"
NO_ENV: dict[str, str] = {}


def b64(text: str | bytes, *, urlsafe: bool = False) -> str:
    raw = text.encode() if isinstance(text, str) else text
    return (base64.urlsafe_b64encode if urlsafe else base64.b64encode)(raw).decode()


@pytest.fixture(autouse=True)
def _no_known_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test starts with no registered secret and no $HF_TOKEN."""
    monkeypatch.setattr(rd, "_KNOWN", set())
    for name in rd.SECRET_ENV:
        monkeypatch.delenv(name, raising=False)


# ---------------------------------------------------------------------------------------------------
# What is found
# ---------------------------------------------------------------------------------------------------


def test_plain_tokens_are_found_and_masked_keeping_their_kind() -> None:
    text = f"push with {TOKEN} failed; org key {ORG_TOKEN}."
    assert contains_token(text, NO_ENV)
    assert redact(text, NO_ENV) == "push with hf_*** failed; org key api_org_***."


def test_a_token_as_a_mapping_key_is_found_at_its_own_location_without_its_text() -> None:
    doc = {"spec": {"training": {TOKEN: 1}, "samples": {"prompts": ["ok", f"use {TOKEN}"]}}}
    locations = find_tokens(doc)
    assert locations == [("spec", "training", "hf_***"), ("spec", "samples", "prompts", 1)]
    assert TOKEN not in json.dumps(locations)


def test_bytes_from_a_binary_tag_are_scanned() -> None:
    assert find_tokens({"spec": {"x": TOKEN.encode()}}) == [("spec", "x")]
    assert find_tokens({"spec": {"x": TOKEN.encode("utf-16")}}) == [("spec", "x")]
    assert find_tokens({"spec": {"x": b"\x00\xff plain bytes"}}) == []


@pytest.mark.parametrize(
    "encoded",
    [
        pytest.param(b64(TOKEN), id="base64"),
        pytest.param(b64(b64(TOKEN)), id="base64-twice"),
        pytest.param(b64(f"user:{TOKEN}"), id="basic-auth-pair"),
        pytest.param(b64(json.dumps({"auths": {"hub": {"password": TOKEN}}})), id="json-in-base64"),
    ],
)
def test_base64_wrapped_tokens_are_found(encoded: str) -> None:
    assert TOKEN not in encoded
    assert contains_token(encoded, NO_ENV) and find_tokens({"v": encoded}) == [("v",)]
    assert redact(f"value={encoded} end", NO_ENV) == f"value={MASK} end"


def test_both_base64_alphabets_whatever_the_alignment() -> None:
    """URL-safe text (with - and _) and standard text (with + and /), the token at any offset."""
    rng = random.Random(8)
    seen = {"urlsafe": 0, "standard": 0}
    for i in range(200):
        raw = rng.randbytes(i % 7) + TOKEN.encode() + rng.randbytes(i % 5)
        for kind, urlsafe, marks in (("urlsafe", True, "-_"), ("standard", False, "+/")):
            text = b64(raw, urlsafe=urlsafe)
            seen[kind] += any(c in text for c in marks)
            assert contains_token(text, NO_ENV), (kind, text)
            assert redact(text, NO_ENV) == MASK
    assert min(seen.values()) > 20  # the alphabets' own characters did occur


def test_base64_at_the_end_of_a_url_path() -> None:
    text = f"GET https://hub.example/api/resolve/{b64(TOKEN)} 404"
    assert contains_token(text, NO_ENV)
    assert TOKEN not in redact(text, NO_ENV) and b64(TOKEN) not in redact(text, NO_ENV)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Authorization: Bearer s3cr3t-Value.9", "Authorization: Bearer ***"),
        ("authorization: token abcdef123456", "authorization: token ***"),
        ("Authorization: Basic dXNlcjpzM2NyM3Q=", "Authorization: Basic ***"),
        ("Proxy-Authorization: Basic dXNlcjpzM2NyM3Q=", "Proxy-Authorization: Basic ***"),
        ('{"authorization": "Bearer s3cr3t-Value.9"}', '{"authorization": "Bearer ***"}'),
        ("{'Authorization': 'Bearer s3cr3t-Value.9'}", "{'Authorization': 'Bearer ***'}"),
        ("headers=Authorization=Bearer%20s3cr3tValue9", "headers=Authorization=Bearer***"),
        ("invalid credentials: Bearer eyJhbGciOiJIUzI1NiJ9.e30.x1y2", "invalid credentials: Bearer ***"),
        (f"echo: Authorization: Bearer {TOKEN}", "echo: Authorization: Bearer ***"),
    ],
)
def test_authorization_header_forms(text: str, expected: str) -> None:
    assert redact(text, NO_ENV) == expected


def test_url_credentials() -> None:
    assert redact("cloning https://me:pa55word@hub.example/org/x.git", NO_ENV) == (
        "cloning https://me:***@hub.example/org/x.git"
    )
    assert redact("see https://hub.example:443/org/x", NO_ENV) == "see https://hub.example:443/org/x"


@pytest.mark.parametrize(
    "secret",
    [
        "s3cr3t-value!",
        "short1",
        "x.y/z==",
        "ключ-секрет",
        "with space inside",
        "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
    ],
)
def test_a_known_secret_of_any_shape(secret: str, monkeypatch: pytest.MonkeyPatch) -> None:
    env = {"HF_TOKEN": f"  {secret}\n"}  # as a Secret's data often has it, with a trailing newline
    assert redact(f"a {secret} b", env) == f"a {MASK} b"
    assert contains_token(secret, env)
    monkeypatch.setenv("HF_TOKEN", secret)
    assert redact(f"<{secret}>") == f"<{MASK}>"  # env=None: the process's own environment
    monkeypatch.delenv("HF_TOKEN")
    add_secret(secret)
    assert redact(f"a {secret} b", NO_ENV) == f"a {MASK} b"


def test_a_known_secret_in_base64_and_longest_first() -> None:
    add_secret("Zq9-odd-shaped-secret")
    add_secret("Zq9-odd")
    assert redact("x Zq9-odd-shaped-secret y", NO_ENV) == f"x {MASK} y"
    wrapped = b64("user:Zq9-odd-shaped-secret-padding")
    assert contains_token(wrapped, NO_ENV) and redact(wrapped, NO_ENV) == MASK


def test_values_too_short_to_be_secrets_are_not_registered() -> None:
    add_secret("abc")
    add_secret(None)
    add_secret("")
    assert redact("abc def", {"HF_TOKEN": "abc"}) == "abc def"


@pytest.mark.parametrize(
    "text",
    [
        hashlib.sha256(b"kubetune").hexdigest(),
        base64.b64encode(hashlib.sha256(b"kubetune").digest()).decode(),
        base64.b64encode(hashlib.sha512(b"kubetune").digest()).decode(),
        "sha256:" + hashlib.sha256(b"image").hexdigest(),
        "meta-llama/Llama-3.1-8B-Instruct",
        "TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T",
        "timdettmers/openassistant-guanaco",
        "hf_hub_download failed; set HF_HUB_ENABLE_HF_TRANSFER=1 to use hf_transfer",
        "output.hub.token: the HF_TOKEN environment variable is not set",
        "the Bearer token is sent in the basic Authorization header",
        "https://huggingface.co/org/model/resolve/main/config.json",
        "0123456789abcdef0123456789abcdef01234567",  # a git commit
        "/workspace/output/runs/falcon-qlora-5d41402abc4b2a76b9719d911017c592/checkpoints",
    ],
)
def test_no_false_positive_on_ordinary_text(text: str) -> None:
    assert not contains_token(text, NO_ENV), text
    assert redact(text, NO_ENV) == text
    assert find_tokens({"spec": {"a": text, text: 1}}) == []


def test_random_base64_blobs_are_left_alone() -> None:
    rng = random.Random(0)
    for size in (24, 48, 300, 3000):
        for urlsafe in (False, True):
            text = b64(rng.randbytes(size), urlsafe=urlsafe)
            assert redact(text, NO_ENV) == text


def test_redact_is_idempotent_and_goes_through_data() -> None:
    once = redact(f"{TOKEN} Authorization: Bearer abcdef123456 {b64(TOKEN)}", NO_ENV)
    assert redact(once, NO_ENV) == once
    data = {"message": f"got {TOKEN}", TOKEN: [f"x{TOKEN}", 3, None], "n": 1}
    out = redact_data(data, NO_ENV)
    assert TOKEN not in json.dumps(out) and out["n"] == 1 and out["hf_***"][1:] == [3, None]


# ---------------------------------------------------------------------------------------------------
# Logs, warnings, tracebacks
# ---------------------------------------------------------------------------------------------------


@pytest.fixture
def process_hooks(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """install_process_redaction() changes process-wide hooks: put them back afterwards."""
    factory = logging.getLogRecordFactory()
    monkeypatch.setattr(rd, "_INSTALLED", set())
    monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)
    monkeypatch.setattr(threading, "excepthook", threading.excepthook)
    monkeypatch.setattr(logging.Handler, "handleError", logging.Handler.handleError)
    last = logging.lastResort
    filters = list(last.filters) if last is not None else []
    try:
        yield
    finally:
        logging.setLogRecordFactory(factory)
        if last is not None:
            last.filters[:] = filters


def _logger(name: str) -> tuple[logging.Logger, io.StringIO]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    logger = logging.getLogger(name)
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(logging.INFO)
    return logger, stream


def test_the_filter_redacts_messages_arguments_and_tracebacks() -> None:
    logger, stream = _logger("kubetune.test.filter")
    rd.install_log_redaction(logger)
    logger.info("token %s and %r", TOKEN, {"authorization": "Bearer abcdef123456"})
    try:
        raise RuntimeError(f"the Hub said: Authorization: Bearer {TOKEN}")
    except RuntimeError:
        logger.exception("push failed")
    out = stream.getvalue()
    assert TOKEN not in out and "abcdef123456" not in out
    assert "token hf_*** and {'authorization': 'Bearer ***'}" in out
    assert "Traceback (most recent call last)" in out and "RuntimeError: the Hub said" in out


def test_process_redaction_covers_handlers_added_later_warnings_and_uncaught_errors(
    process_hooks: None, capsys: pytest.CaptureFixture[str]
) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rd.install_process_redaction()
        rd.install_process_redaction()  # idempotent
        warnings.warn(f"library warning with {TOKEN}", UserWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["library warning with hf_***"]

    logger, stream = _logger("kubetune.test.later")  # a handler made after the install
    logger.warning("late %s", TOKEN)
    assert stream.getvalue() == "WARNING late hf_***\n"

    thread = threading.Thread(target=lambda: (_ for _ in ()).throw(ValueError(f"in a thread {TOKEN}")))
    thread.start()
    thread.join()
    try:
        raise KeyError(TOKEN)
    except KeyError:
        sys.excepthook(*sys.exc_info())  # type: ignore[arg-type]
    # A handler that cannot write prints the exception being handled: an API error's body, say.
    closed = io.StringIO()
    closed.close()
    logger.handlers[0].setStream(closed)  # type: ignore[attr-defined]
    try:
        raise ConnectionError(f"body: {TOKEN}")
    except ConnectionError:
        logger.warning("lost")
    err = capsys.readouterr().err
    assert TOKEN not in err
    assert "ValueError: in a thread hf_***" in err and "KeyError: 'hf_***'" in err
    assert "--- Logging error ---" in err and "ConnectionError: body: hf_***" in err
