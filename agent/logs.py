"""Logging for ``fleet-agent``: one line per record, secrets removed, journald-aware.

``configure()`` puts one handler on the root logger, so every logger (the agent's and
third-party ones such as paho's) goes through it. Its `RedactingFilter` formats each record
first (message and arguments together, so a secret split across arguments is seen whole), then
removes from the message, the exception text, the stack text and the ``fields``:

* PEM private key blocks of any key type, also truncated ones (from BEGIN to the end of the
  text) and tails (the base64 lines before an END marker);
* the value of any ``certificateOwnershipToken`` / ``ownership_token`` key, whatever its length;
* token-like runs: 40 or more URL-safe base64 characters with at least one capital letter
  (``secrets.token_urlsafe(32)`` is 43), and long standard-base64 runs that look random. Runs
  without capitals (certificate ids: 64 lowercase hex; snake_case names; ``thing-<hex>`` names)
  and uppercase hex fingerprints are kept;
* every value given to `register_secret`, wherever it appears (also inside a word, and also in
  its JSON, ``repr`` and CRLF spellings; for a multi-line value, each of its lines of 16 or more
  characters).

Each is replaced by ``[redacted]``. The filter works on the record itself, so handlers that run
after it see the redacted record too; it drops ``exc_info`` once the traceback is text.

Text lines look like ``2024-05-01T12:00:00.123Z fleet-agent: warning fleet.agent: message k=v``;
newlines and other control characters (in messages, tracebacks, field values) are written as
``\\n``, ``\\x1b``, ... so one record is always one line and a peer-supplied string cannot start
a line of its own. Under systemd (``JOURNAL_STREAM`` names our stream) the timestamp is left to
journald and each line starts with its sd-daemon priority (``<3>`` error, ``<4>`` warning, ...).
JSON lines carry ``ts``, ``level``, ``logger``, ``msg``, ``exc``/``stack`` when present, and the
``extra={"fields": {...}}`` of the call.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import math
import os
import re
import sys
import threading
from collections.abc import Mapping
from typing import IO, Final, Literal

__all__ = ["RedactingFilter", "configure", "forget_secret", "register_secret"]

REDACTED: Final = "[redacted]"
HANDLER_NAME: Final = "fleet-agent.logs"
_RESERVED: Final = frozenset({"ts", "level", "logger", "msg", "exc", "stack"})
_MARK: Final = "_fleet_logs_scrubbed"

# ------------------------------------------------------------------------ registered secrets

_lock = threading.Lock()
_secrets: dict[str, int] = {}  # value -> how many times registered
_pattern: re.Pattern[str] | None = None
_generation = 0  # changes with the registry: a record scrubbed before is scrubbed again


def _spellings(value: str) -> set[str]:
    """The ways ``value`` can show up in a log line."""
    found = {
        value,
        json.dumps(value)[1:-1],
        json.dumps(value, ensure_ascii=False)[1:-1],
        repr(value)[1:-1],
        value.encode("unicode_escape").decode("ascii"),
    }
    with contextlib.suppress(UnicodeEncodeError):  # lone surrogates
        found.add(repr(value.encode())[2:-1])
    if "\n" in value:
        if "\r\n" not in value:
            found.add(value.replace("\n", "\r\n"))
        found.update(line.strip() for line in value.splitlines() if len(line.strip()) >= 16)
    found.discard("")
    return found


def _rebuild() -> None:
    global _pattern, _generation
    spellings: set[str] = set()
    for value in _secrets:
        spellings |= _spellings(value)
    ordered = sorted(spellings, key=len, reverse=True)  # the longest spelling wins
    _pattern = re.compile("|".join(map(re.escape, ordered))) if ordered else None
    _generation += 1


def register_secret(value: str) -> None:
    """Redact ``value`` from every log line until `forget_secret` (an empty value is ignored).

    Registrations are counted: a value registered twice must be forgotten twice."""
    if not value:
        return
    with _lock:
        _secrets[value] = _secrets.get(value, 0) + 1
        if _secrets[value] == 1:
            _rebuild()


def forget_secret(value: str) -> None:
    """Undo one `register_secret` of ``value`` (no error if it is not registered)."""
    with _lock:
        count = _secrets.get(value)
        if count is None:
            return
        if count > 1:
            _secrets[value] = count - 1
            return
        del _secrets[value]
        _rebuild()


# ------------------------------------------------------------------------------ redaction

_PEM_BEGIN = re.compile(r"-*BEGIN ?[A-Z0-9 ]*PRIVATE KEY-*")
_PEM_END = re.compile(r"-*END ?[A-Z0-9 ]*PRIVATE KEY-*")
# What the base64 body of a PEM block is made of, also when printed with escapes (repr, JSON).
_PEM_BODY = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=\\ \t\r\n")
_OWNERSHIP = re.compile(r"""(?i)(ownership_?token[\\"']*\s*[:=]\s*[\\"']*)[^"'\\\s,;}&]+""")
_URLSAFE_RUN = re.compile(r"[A-Za-z0-9_-]{40,}")
_B64_RUN = re.compile(r"[A-Za-z0-9+/]{40,}={0,2}")
_HARMLESS_RUN = re.compile(r"[a-z0-9_-]+|[0-9A-F]+")


def _redact_pem(text: str) -> str:
    if "PRIVATE KEY" not in text:
        return text
    out: list[str] = []
    pos = 0
    begin = _PEM_BEGIN.search(text)
    end = _PEM_END.search(text)
    while begin is not None or end is not None:
        if begin is not None and (end is None or begin.start() < end.start()):
            # A block: through its END marker, or to the end of the text if it has none.
            while end is not None and end.start() < begin.end():
                end = _PEM_END.search(text, end.end())
            out += (text[pos : begin.start()], REDACTED)
            pos = end.end() if end is not None else len(text)
        else:
            assert end is not None
            # The tail of a key: the body lines before an END marker without a BEGIN.
            start = end.start()
            while start > pos and text[start - 1] in _PEM_BODY:
                start -= 1
            while start < end.start() and text[start] in " \t":
                start += 1
            out += (text[pos:start], REDACTED)
            pos = end.end()
        # Each search resumes where the text is still unread: linear in the text.
        if begin is not None and begin.start() < pos:
            begin = _PEM_BEGIN.search(text, pos)
        if end is not None and end.start() < pos:
            end = _PEM_END.search(text, pos)
    out.append(text[pos:])
    return "".join(out)


def _token_like(run: str) -> bool:
    return _HARMLESS_RUN.fullmatch(run) is None


def _base64_like(run: str) -> bool:
    """Random-looking standard base64 (a key body line, an API secret), not a path or a topic
    such as /var/lib/fleet or aws/things/Device42/shadow/update/accepted: both cases in
    good measure, and a digit, a '+' or padding."""
    body = run.rstrip("=").replace("/", "")
    eighth = len(body) / 8
    return (
        sum(c.isupper() for c in body) >= eighth
        and sum(c.islower() for c in body) >= eighth
        and ("+" in body or run.endswith("=") or any(c.isdigit() for c in body))
    )


def _redact_runs(text: str) -> str:
    """Token-like runs of either base64 alphabet. The spans of both are found in the same text
    and merged, so that no piece of one survives between the redactions of the other."""
    spans = [m.span() for m in _URLSAFE_RUN.finditer(text) if _token_like(m.group())]
    spans += [m.span() for m in _B64_RUN.finditer(text) if _base64_like(m.group())]
    if not spans:
        return text
    out: list[str] = []
    pos = 0
    spans.sort()
    start, end = spans[0]
    for next_start, next_end in spans[1:]:
        if next_start <= end:
            end = max(end, next_end)
            continue
        out += (text[pos:start], REDACTED)
        pos = end
        start, end = next_start, next_end
    out += (text[pos:start], REDACTED, text[end:])
    return "".join(out)


def _redact(text: str) -> str:
    pattern = _pattern
    if pattern is not None:
        text = pattern.sub(REDACTED, text)
    text = _redact_pem(text)
    text = _OWNERSHIP.sub(lambda m: m.group(1) + REDACTED, text)
    return _redact_runs(text)


def _text(value: object) -> str:
    try:
        return str(value)
    except Exception as exc:
        return f"[unprintable {type(value).__name__}: {type(exc).__name__}]"


def _clean_key(key: object) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", _redact(_text(key))) or "_"


def _clean_value(value: object, depth: int = 0) -> object:
    """A JSON-ready copy of a field value, with secrets redacted from every string in it."""
    if value is None or isinstance(value, bool | int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, str):
        return _redact(value)
    if depth < 6 and isinstance(value, Mapping):
        return {_clean_key(k): _clean_value(v, depth + 1) for k, v in value.items()}
    if depth < 6 and isinstance(value, list | tuple | set | frozenset):
        return [_clean_value(v, depth + 1) for v in value]
    return _redact(_text(value))


def _clean_fields(fields: object) -> dict[str, object]:
    if fields is None:
        return {}
    if not isinstance(fields, Mapping):
        return {"fields": _clean_value(fields)}
    return {_clean_key(k): _clean_value(v) for k, v in fields.items()}


_TRACEBACKS = logging.Formatter()


def _scrub(record: logging.LogRecord) -> None:
    """Replace the record's message, arguments, exception, stack and fields by redacted text."""
    if getattr(record, _MARK, None) == _generation:
        return
    generation = _generation
    try:
        try:
            message = record.getMessage()
        except Exception as exc:  # bad arguments: say so without showing them
            message = f"{_text(record.msg)} [log arguments not formatted: {type(exc).__name__}]"
        record.msg = _redact(message)
        record.args = None
        if "message" in record.__dict__:
            record.message = record.msg
        if record.exc_info and not record.exc_text:
            try:
                record.exc_text = _TRACEBACKS.formatException(record.exc_info)
            except Exception as exc:
                record.exc_text = f"[traceback not formatted: {type(exc).__name__}]"
        record.exc_info = None  # no later formatter may render the live exception again
        if record.exc_text:
            record.exc_text = _redact(record.exc_text)
        if record.stack_info:
            record.stack_info = _redact(record.stack_info)
        if "fields" in record.__dict__:
            record.fields = _clean_fields(record.__dict__["fields"])
    except Exception as exc:  # fail closed: never pass on what could not be checked
        record.msg = f"[log record dropped: redaction failed: {type(exc).__name__}]"
        record.args = None
        record.exc_info = record.exc_text = record.stack_info = None
        record.__dict__.pop("fields", None)
    setattr(record, _MARK, generation)


class RedactingFilter(logging.Filter):
    """A handler filter that removes private keys, ownership tokens and registered secrets
    from each record (see the module documentation). Never rejects a record; never raises."""

    def __init__(self) -> None:
        super().__init__()

    def filter(self, record: logging.LogRecord) -> bool:
        _scrub(record)
        return True


# ---------------------------------------------------------------------------- formatting

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_ESCAPES: Final = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
_BARE_VALUE = re.compile(r"[^\s\"=\\]+")


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    escaped = _ESCAPES.get(char)
    if escaped is not None:
        return escaped
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def _one_line(text: str) -> str:
    return _CONTROL.sub(_escape, text)


def _logfmt(value: object) -> str:
    if isinstance(value, str):
        return value if _BARE_VALUE.fullmatch(value) else json.dumps(value, ensure_ascii=False)
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), default=str)


def _priority(levelno: int) -> int:
    """The syslog priority journald should record (sd-daemon(3) prefixes)."""
    if levelno >= logging.CRITICAL:
        return 2
    if levelno >= logging.ERROR:
        return 3
    if levelno >= logging.WARNING:
        return 4
    if levelno >= logging.INFO:
        return 6
    return 7


class _LineFormatter(logging.Formatter):
    def __init__(self, fmt: Literal["text", "json"], program: str, journal: bool) -> None:
        super().__init__()
        self.fmt = fmt
        self.program = program
        self.journal = journal

    def format(self, record: logging.LogRecord) -> str:
        try:
            line = self._line(record)
        except Exception as exc:
            line = _one_line(
                f"{self.program}: error {__name__}: a log record could not be formatted "
                f"({type(exc).__name__})"
            )
        if self.journal:
            line = f"<{_priority(record.levelno)}>{line}"
        return line

    def _line(self, record: logging.LogRecord) -> str:
        _scrub(record)  # a no-op after the filter; makes this formatter safe on its own too
        message = _text(record.msg)
        fields: dict[str, object] = record.__dict__.get("fields") or {}
        level = record.levelname.lower()
        stamp = dt.datetime.fromtimestamp(record.created, dt.timezone.utc)
        ts = stamp.isoformat(timespec="milliseconds").replace("+00:00", "Z")
        if self.fmt == "json":
            document: dict[str, object] = {
                "ts": ts,
                "level": level,
                "logger": record.name,
                "msg": message,
            }
            if record.exc_text:
                document["exc"] = record.exc_text
            if record.stack_info:
                document["stack"] = record.stack_info
            for key, value in fields.items():
                document[f"fields.{key}" if key in _RESERVED else key] = value
            return json.dumps(document, ensure_ascii=True, separators=(",", ":"), default=str)
        text = " ".join([message, *(f"{k}={_logfmt(v)}" for k, v in fields.items())])
        for extra in (record.exc_text, record.stack_info):
            if extra:
                text = f"{text}\n{extra}"
        head = f"{self.program}: {level} {record.name}: "
        if not self.journal:
            head = f"{ts} {head}"
        return _one_line(head + text)


# ---------------------------------------------------------------------------- the handler


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stderr`` is when a record comes (redirections, test capture)."""

    def __init__(self) -> None:
        logging.Handler.__init__(self)

    @property
    def stream(self) -> IO[str]:
        return sys.stderr


def _under_journal(stream: IO[str]) -> bool:
    """True if systemd connected ``stream`` to the journal (``JOURNAL_STREAM=dev:inode``).

    When the stream has no file descriptor to compare, the variable alone decides."""
    value = os.environ.get("JOURNAL_STREAM")
    if not value:
        return False
    try:
        device, inode = (int(part) for part in value.split(":"))
    except ValueError:
        return False
    try:
        info = os.fstat(stream.fileno())
    except (AttributeError, OSError, ValueError):
        return True
    return (info.st_dev, info.st_ino) == (device, inode)


def _level(level: str | int) -> int:
    if isinstance(level, int):
        return level
    number = logging.getLevelName(level.strip().upper())
    if not isinstance(number, int):
        raise ValueError(f"unknown log level {level!r}; use debug, info, warning or error")
    return number


def configure(
    level: str | int,
    *,
    stream: IO[str] | None = None,
    fmt: Literal["text", "json"] = "text",
    program: str = "fleet-agent",
) -> None:
    """Log records of ``level`` and above to ``stream``, one redacted line each.

    ``stream`` None means ``sys.stderr`` as it is at each record. Calling this again replaces
    the handler installed before (other handlers on the root logger are left alone, and are
    not redacted)."""
    if fmt not in ("text", "json"):
        raise ValueError(f"unknown log format {fmt!r}; use text or json")
    number = _level(level)
    handler: logging.Handler = _StderrHandler() if stream is None else logging.StreamHandler(stream)
    handler.set_name(HANDLER_NAME)
    handler.addFilter(RedactingFilter())
    journal = _under_journal(sys.stderr if stream is None else stream)
    handler.setFormatter(_LineFormatter(fmt, program, journal))
    root = logging.getLogger()
    with _lock:
        for old in [h for h in root.handlers if h.get_name() == HANDLER_NAME]:
            root.removeHandler(old)
            old.close()
        root.addHandler(handler)
        root.setLevel(number)
