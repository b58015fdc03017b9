"""agent.logs, attacked: every way a private key, an ownership token or a registered secret
could reach a log line, and every way a peer could forge a second line."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import io
import json
import logging
import os
import re
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from agent import logs

pytestmark = pytest.mark.unit

REDACTED = "[redacted]"
TOKEN_LIKE = re.compile(r"[A-Za-z0-9_-]{40,}")  # as in test_agent_e2e.py
STAMP = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z"
log = logging.getLogger("fleet.agent.test")


def _pem(kind: str) -> str:
    if kind == "rsa":
        key: object = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        form = serialization.PrivateFormat.TraditionalOpenSSL  # BEGIN RSA PRIVATE KEY
    elif kind == "ec-traditional":
        key = ec.generate_private_key(ec.SECP384R1())
        form = serialization.PrivateFormat.TraditionalOpenSSL  # BEGIN EC PRIVATE KEY
    else:
        key = ec.generate_private_key(ec.SECP256R1())
        form = serialization.PrivateFormat.PKCS8  # BEGIN PRIVATE KEY, as the keystore writes
    return key.private_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.PEM, form, serialization.NoEncryption()
    ).decode()


@pytest.fixture(scope="module")
def pem() -> str:
    return _pem("pkcs8")


def _cert_id() -> str:
    return hashlib.sha256(secrets.token_bytes(64)).hexdigest()


def _leaks(output: str, secret: str) -> list[str]:
    """Pieces of ``secret`` (16-character windows of each of its lines) found in ``output``."""
    found = []
    for line in secret.splitlines():
        line = line.strip()
        if line.startswith("-----"):
            continue
        for start in range(0, max(1, len(line) - 15), 4):
            window = line[start : start + 16]
            if len(window) == 16 and window in output:
                found.append(window)
    return found


def _assert_hidden(output: str, secret: str) -> None:
    assert secret not in output
    assert not _leaks(output, secret), output
    assert "PRIVATE KEY" not in output


def _records(output: str) -> list[str]:
    assert output.endswith("\n")
    return output[:-1].split("\n")


def _assert_one_line_each(output: str, count: int) -> None:
    lines = _records(output)
    assert len(lines) == count, output
    assert len(output.splitlines()) == count, output  # no \r, \v, \x85, \u2028 ... either
    for line in lines:
        assert re.match(rf"{STAMP} fleet-agent: [a-z]+ [\w.]+: ", line), line


def _handlers() -> list[logging.Handler]:
    return [h for h in logging.getLogger().handlers if h.get_name() == logs.HANDLER_NAME]


@pytest.fixture(autouse=True)
def _restore_root(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    root = logging.getLogger()
    level = root.level
    yield
    for handler in _handlers():
        root.removeHandler(handler)
    root.setLevel(level)


@pytest.fixture
def out() -> io.StringIO:
    stream = io.StringIO()
    logs.configure("debug", stream=stream)
    return stream


# ------------------------------------------------------------------------- private keys


@pytest.mark.parametrize("kind", ["pkcs8", "rsa", "ec-traditional"])
def test_whole_private_key_in_a_message(out: io.StringIO, kind: str) -> None:
    pem = _pem(kind)
    log.error("loaded key %s from disk", pem)
    output = out.getvalue()
    _assert_hidden(output, pem)
    _assert_one_line_each(output, 1)
    assert f"loaded key {REDACTED}" in output
    assert output.rstrip("\n").endswith("from disk")


def test_private_key_as_message_repr_and_bytes(out: io.StringIO, pem: str) -> None:
    log.warning(pem)
    log.warning("%r", pem)
    log.warning("%r", pem.encode())
    log.warning("%s", json.dumps({"key": pem}))
    output = out.getvalue()
    _assert_hidden(output, pem)
    _assert_one_line_each(output, 4)


@pytest.mark.parametrize("cut", [5, 15, 27, 40, 100])
def test_private_key_split_across_arguments(out: io.StringIO, pem: str, cut: int) -> None:
    """Cut inside the BEGIN marker, right after it, inside the body: formatted, then redacted."""
    log.info("part one %s and part two %s", pem[:cut], pem[cut:])
    output = out.getvalue()
    _assert_hidden(output, pem)
    _assert_one_line_each(output, 1)


def test_truncated_private_key(out: io.StringIO, pem: str) -> None:
    log.info("read %d bytes: %s", 120, pem[:120])
    output = out.getvalue()
    _assert_hidden(output, pem[:120])
    assert f"read 120 bytes: {REDACTED}" in output


def test_tail_of_a_private_key(out: io.StringIO, pem: str) -> None:
    tail = pem[len(pem) // 2 :]
    log.info("rest: %s", tail)
    output = out.getvalue()
    _assert_hidden(output, tail)
    assert f"rest: {REDACTED}" in output


def test_key_body_without_markers(out: io.StringIO, pem: str) -> None:
    body = "".join(pem.strip().splitlines()[1:-1])
    log.debug("der=%s", body)
    assert body[:16] not in out.getvalue()
    assert not _leaks(out.getvalue(), body)


def test_tokens_and_base64_next_to_each_other(out: io.StringIO) -> None:
    """Both base64 alphabets in one run: nothing survives between the two redactions."""
    pairs = [
        (secrets.token_urlsafe(32), base64.b64encode(secrets.token_bytes(48)).decode())
        for _ in range(50)
    ]
    for token, blob in pairs:
        log.info("at /srv/%s/%s+%s", token, blob, token)
    output = out.getvalue()
    for token, blob in pairs:
        assert not _leaks(output, token)
        assert not _leaks(output, blob)
    _assert_one_line_each(output, 50)


def test_paths_and_topics_survive(out: io.StringIO) -> None:
    visible = [
        "/var/lib/fleet-agent/shadows/classic.jsonl",
        "/home/operator/deployments/FleetAgentConfiguration/agent.toml",
        "$aws/things/SensorDevice42/shadow/name/configuration/update/accepted",
        "$aws/provisioning-templates/FleetTemplate/provision/json/accepted",
    ]
    for text in visible:
        log.info("using %s", text)
    output = out.getvalue()
    for text in visible:
        assert f"using {text}" in output


def test_exception_carrying_a_private_key(out: io.StringIO, pem: str) -> None:
    try:
        raise ValueError(f"not a certificate: {pem}")
    except ValueError:
        log.exception("loading %s failed", "device.pem")
    output = out.getvalue()
    _assert_hidden(output, pem)
    _assert_one_line_each(output, 1)
    assert "loading device.pem failed\\nTraceback (most recent call last):\\n" in output
    assert f"ValueError: not a certificate: {REDACTED}" in output


def test_chained_exception_given_as_exc_info(out: io.StringIO, pem: str) -> None:
    token = secrets.token_urlsafe(32)
    try:
        try:
            raise KeyError(token)
        except KeyError as inner:
            raise RuntimeError(pem[:200]) from inner
    except RuntimeError as exc:
        log.error("onboarding failed", exc_info=exc)
    output = out.getvalue()
    _assert_hidden(output, pem)
    assert token not in output
    assert "The above exception was the direct cause" in output
    _assert_one_line_each(output, 1)


def test_secret_in_stack_info(out: io.StringIO) -> None:
    token = secrets.token_urlsafe(32)
    code = compile("log.warning('checkpoint', stack_info=True)", f"<{token}>", "exec")
    exec(code, {"log": log})
    output = out.getvalue()
    assert token not in output
    assert "Stack (most recent call last)" in output
    _assert_one_line_each(output, 1)


# ----------------------------------------------------------------------- ownership tokens


def test_register_thing_payload(out: io.StringIO) -> None:
    token = secrets.token_urlsafe(32)
    payload = json.dumps(
        {"certificateOwnershipToken": token, "parameters": {"SerialNumber": "SN-1"}}
    )
    log.debug("publish %s", payload)
    log.debug("publish %r", payload.encode())
    log.debug("nested %s", json.dumps({"payload": payload}))
    output = out.getvalue()
    assert token not in output
    assert not _leaks(output, token)
    assert f'"certificateOwnershipToken": "{REDACTED}"' in output
    assert '"SerialNumber": "SN-1"' in output
    _assert_one_line_each(output, 3)


def test_short_token_in_the_token_field(out: io.StringIO) -> None:
    """Too short to look like a token: the field name gives it away."""
    token = secrets.token_hex(6)
    log.info('{"certificateOwnershipToken":"%s"}', token)
    log.info("ownership_token=%s", token)
    output = out.getvalue()
    assert token not in output
    assert output.count(REDACTED) == 2


def test_bare_tokens(out: io.StringIO) -> None:
    tokens = [secrets.token_urlsafe(32) for _ in range(200)]
    for token in tokens:
        log.info("peer sent:%s.", token)
    output = out.getvalue()
    for token in tokens:
        assert token not in output
    assert not TOKEN_LIKE.search(output)
    assert output.count(f"peer sent:{REDACTED}.") == 200


def test_registered_secret_inside_a_word(out: io.StringIO) -> None:
    secret = secrets.token_hex(32)  # hex: the heuristics keep it, registration does not
    logs.register_secret(secret)
    try:
        log.info("prefix%ssuffix", secret)
        log.info("spelled %r and %s", secret.upper() + secret, json.dumps([secret]))
        output = out.getvalue()
        assert secret not in output
        assert f"prefix{REDACTED}suffix" in output
    finally:
        logs.forget_secret(secret)
    log.info("now %s", secret)
    assert f"now {secret}" in out.getvalue()


def test_registered_key_lines_alone(out: io.StringIO, pem: str) -> None:
    logs.register_secret(pem)
    try:
        for line in pem.splitlines()[1:-1]:
            log.debug("line %s", line)
        log.debug("crlf %s", pem.replace("\n", "\r\n"))
        _assert_hidden(out.getvalue(), pem)
    finally:
        logs.forget_secret(pem)


def test_registration_is_counted() -> None:
    stream = io.StringIO()
    logs.configure("info", stream=stream)
    secret = "Sup3r-" + secrets.token_hex(4)
    logs.register_secret(secret)
    logs.register_secret(secret)
    logs.forget_secret(secret)
    log.info("%s", secret)
    logs.forget_secret(secret)
    logs.forget_secret(secret)  # once more than registered: no error
    log.info("%s", secret)
    assert stream.getvalue().count(secret) == 1
    assert stream.getvalue().count(REDACTED) == 1


# ----------------------------------------------------------------- what must stay visible


def test_certificate_ids_and_prefixes_survive(out: io.StringIO, pem: str) -> None:
    cert_id = _cert_id()
    token = secrets.token_urlsafe(32)
    log.warning("provisioned thing %s (certificate %s…)", "thing-1", cert_id[:12])
    log.info("certificate %s token %s key %s", cert_id, token, pem)
    log.info("thing-%s at /var/lib/fleet-agent/%s.json", cert_id, cert_id)
    log.info("fingerprint %s", cert_id.upper())
    log.info("in test_a_very_long_function_name_that_is_not_a_secret_at_all")
    output = out.getvalue()
    assert f"(certificate {cert_id[:12]}…)" in output
    assert f"certificate {cert_id} token {REDACTED} key {REDACTED}" in output
    assert f"thing-{cert_id} at /var/lib/fleet-agent/{cert_id}.json" in output
    assert cert_id.upper() in output
    assert "test_a_very_long_function_name_that_is_not_a_secret_at_all" in output
    assert token not in output
    _assert_one_line_each(output, 5)


# ------------------------------------------------------------------------- forged lines


@pytest.mark.parametrize("breaker", ["\n", "\r", "\r\n", "\x0b", "\x0c", "\x85", "\u2028"])
def test_peer_string_cannot_forge_a_line(out: io.StringIO, breaker: str) -> None:
    forged = f"hello{breaker}fleet-agent: ERROR fake"
    log.warning("peer said %s", forged)
    log.warning(forged)
    log.warning("fields", extra={"fields": {"peer": forged, f"k{breaker}ey": 1}})
    try:
        raise ValueError(forged)
    except ValueError:
        log.exception("boom")
    output = out.getvalue()
    _assert_one_line_each(output, 4)
    assert breaker not in output.replace("\n", "") or breaker == "\n"
    assert output.count("fleet-agent: ERROR fake") == 4


def test_escapes_are_visible(out: io.StringIO) -> None:
    log.warning("a\nb\tc\x1b[31md")
    assert out.getvalue().endswith("a\\nb\\tc\\x1b[31md\n")


# -------------------------------------------------------------------- third-party loggers


def test_paho_style_logger(out: io.StringIO, pem: str) -> None:
    token = secrets.token_urlsafe(32)
    paho = logging.getLogger("paho.mqtt.client")
    paho.debug(
        "Received PUBLISH (d0, q1, r0, m1), '$aws/certificates/create-from-csr/json/accepted', "
        "...  (%d bytes) %s",
        1234,
        json.dumps({"certificateOwnershipToken": token, "certificatePem": "x", "k": pem}),
    )
    output = out.getvalue()
    assert token not in output
    _assert_hidden(output, pem)
    assert " paho.mqtt.client: " in output
    _assert_one_line_each(output, 1)


def test_filter_alone_on_a_plain_handler(pem: str) -> None:
    """RedactingFilter covers a handler with the standard formatter too."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(logs.RedactingFilter())
    other = logging.getLogger("some.library")
    other.addHandler(handler)
    other.propagate = False
    try:
        try:
            raise OSError(pem)
        except OSError:
            other.exception("oops %s", pem[:60])
    finally:
        other.removeHandler(handler)
        other.propagate = True
    _assert_hidden(stream.getvalue(), pem)
    assert "Traceback" in stream.getvalue()


# ------------------------------------------------------------------------ hostile arguments


class _Sneaky:
    def __init__(self, secret: str) -> None:
        self.secret = secret

    def __str__(self) -> str:
        return self.secret

    def __repr__(self) -> str:
        return f"Sneaky({self.secret!r})"


class _Exploding:
    def __init__(self, secret: str) -> None:
        self.secret = secret

    def __str__(self) -> str:
        raise RuntimeError(self.secret)


def test_arguments_whose_str_is_a_secret(out: io.StringIO, pem: str) -> None:
    token = secrets.token_urlsafe(32)
    log.info("%s / %r", _Sneaky(pem), _Sneaky(token))
    log.info(_Sneaky(token))  # the message itself
    log.info("%(a)s", {"a": _Sneaky(token)})
    output = out.getvalue()
    _assert_hidden(output, pem)
    assert token not in output
    _assert_one_line_each(output, 3)


def test_arguments_that_fail_to_format(
    out: io.StringIO, capsys: pytest.CaptureFixture[str]
) -> None:
    """Logging's own error report prints the arguments on stderr: it must not happen."""
    token = secrets.token_urlsafe(32)
    log.info("value %s", _Exploding(token))
    log.info("number %d", token)
    log.info("two %s %s", token)
    output = out.getvalue()
    assert token not in output
    assert output.count("[log arguments not formatted:") == 3
    _assert_one_line_each(output, 3)
    err = capsys.readouterr().err
    assert "Logging error" not in err
    assert token not in err


# ------------------------------------------------------------------------------- formats


def test_text_fields(out: io.StringIO) -> None:
    log.info(
        "connected",
        extra={"fields": {"thing": "t1", "attempt": 3, "note": "two words", "ok": True, "n": None}},
    )
    line = _records(out.getvalue())[0]
    assert line.endswith(' connected thing=t1 attempt=3 note="two words" ok=true n=null')


def test_json_lines(pem: str) -> None:
    stream = io.StringIO()
    logs.configure("debug", stream=stream, fmt="json")
    token = secrets.token_urlsafe(32)
    cert_id = _cert_id()
    log.info(
        "hello %s",
        "world\u2028again",
        extra={
            "fields": {
                "thing": "t1",
                "attempt": 3,
                "certificate": cert_id,
                "nested": {"a": [1, 2.5, token], "key": pem},
                "ts": "spoofed",
                "nan": float("nan"),
                "obj": _Sneaky(token),
            }
        },
    )
    try:
        raise ValueError(pem)
    except ValueError:
        log.exception("failed\nfleet-agent: ERROR fake")
    output = stream.getvalue()
    assert token not in output
    _assert_hidden(output, pem)
    lines = _records(output)
    assert len(lines) == 2 and len(output.splitlines()) == 2
    first, second = (json.loads(line) for line in lines)
    assert first["msg"] == "hello world\u2028again"
    assert first["level"] == "info" and first["logger"] == "fleet.agent.test"
    stamp = dt.datetime.fromisoformat(first["ts"].replace("Z", "+00:00"))
    assert stamp.utcoffset() == dt.timedelta(0)
    assert abs((dt.datetime.now(dt.timezone.utc) - stamp).total_seconds()) < 60
    assert first["thing"] == "t1" and first["attempt"] == 3 and first["certificate"] == cert_id
    assert first["nested"] == {"a": [1, 2.5, REDACTED], "key": f"{REDACTED}\n"}
    assert first["fields.ts"] == "spoofed" and first["ts"] != "spoofed"
    assert first["nan"] == "nan" and first["obj"] == REDACTED
    assert second["level"] == "error" and second["msg"] == "failed\nfleet-agent: ERROR fake"
    assert second["exc"].startswith("Traceback (most recent call last):")
    assert second["exc"].endswith(f"ValueError: {REDACTED}\n")  # the key's own newline


# --------------------------------------------------------------------------------- journald


def test_journal_priority_prefixes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JOURNAL_STREAM", "8:123456")
    stream = io.StringIO()
    logs.configure("debug", stream=stream)
    log.critical("c")
    log.error("e\nfake")
    log.warning("w")
    log.info("i")
    log.debug("d")
    assert _records(stream.getvalue()) == [
        "<2>fleet-agent: critical fleet.agent.test: c",
        "<3>fleet-agent: error fleet.agent.test: e\\nfake",
        "<4>fleet-agent: warning fleet.agent.test: w",
        "<6>fleet-agent: info fleet.agent.test: i",
        "<7>fleet-agent: debug fleet.agent.test: d",
    ]


def test_journal_json_keeps_the_timestamp(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JOURNAL_STREAM", "8:123456")
    stream = io.StringIO()
    logs.configure("debug", stream=stream, fmt="json")
    log.error("e")
    line = _records(stream.getvalue())[0]
    assert line.startswith("<3>{")
    assert json.loads(line[3:])["ts"]


def test_journal_stream_checked_against_the_real_stream(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """JOURNAL_STREAM inherited by a process whose stderr goes elsewhere: no prefixes."""
    with open(tmp_path / "log", "w") as file:
        info = os.fstat(file.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{info.st_dev}:{info.st_ino + 1}")
        logs.configure("info", stream=file)
        log.error("elsewhere")
        monkeypatch.setenv("JOURNAL_STREAM", f"{info.st_dev}:{info.st_ino}")
        logs.configure("info", stream=file)
        log.error("journal")
    first, second = (tmp_path / "log").read_text().splitlines()
    assert re.match(rf"{STAMP} fleet-agent: error fleet.agent.test: elsewhere$", first)
    assert second == "<3>fleet-agent: error fleet.agent.test: journal"


# ------------------------------------------------------------------------------- configure


def test_configure_twice_leaves_one_handler() -> None:
    first, second = io.StringIO(), io.StringIO()
    logs.configure("debug", stream=first)
    logs.configure("warning", stream=second)
    assert len(_handlers()) == 1
    log.info("hidden")
    log.warning("shown")
    assert first.getvalue() == ""
    assert _records(second.getvalue())[0].endswith("fleet.agent.test: shown")


def test_default_stream_follows_sys_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    logs.configure("INFO")
    log.info("to stderr")
    assert "fleet-agent: info fleet.agent.test: to stderr" in capsys.readouterr().err


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="log level"):
        logs.configure("loud")
    with pytest.raises(ValueError, match="log format"):
        logs.configure("info", fmt="xml")  # type: ignore[arg-type]
    assert _handlers() == []
