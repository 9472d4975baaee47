"""Structured JSON logs with a correlation id that follows the work, and no secret in any line.

Every front door binds a correlation id (the API per request from `X-Request-ID`, the scheduler
per run or job) with `bind_correlation_id`; it lives in a contextvar, so every log line written
while that work runs — in services and connectors too, through structlog or the standard
`logging` module — carries it without being passed around.

Redaction is the last line of defence, not the first: code must not log secrets, but if a
password, token or API key reaches a log call anyway (as a field named like a secret, or as a
value that looks like one of our keys or a bearer header) it is replaced before it is written.
"""

from __future__ import annotations

import logging
import re
import sys
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any, TextIO

import structlog
from structlog.contextvars import bind_contextvars, get_contextvars, merge_contextvars, unbind_contextvars

CORRELATION_KEY = "request_id"
REDACTED = "[redacted]"
SECRET_FIELD = re.compile(r"pass(word)?|secret|token|api_?key|authorization|cookie|credential|private", re.I)
SECRET_VALUE = re.compile(
    r"rrc_[A-Za-z0-9]+_[A-Za-z0-9_\-]+"  # our ingest API keys
    r"|(?:sk|rk)_(?:test|live)_[A-Za-z0-9]+"  # Stripe secret / restricted keys
    r"|pat-[a-z0-9]{2,4}-[A-Za-z0-9\-]+"  # HubSpot private app tokens
    r"|(?i:bearer)\s+[A-Za-z0-9._~+/=\-]+"  # any Authorization header value
)
SAFE_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,100}$")
_HANDLER_MARK = "_rrc_json_handler"


def _scrub(value: Any) -> Any:
    if isinstance(value, str):
        return SECRET_VALUE.sub(REDACTED, value)
    if isinstance(value, Mapping):
        return {k: REDACTED if isinstance(k, str) and SECRET_FIELD.search(k) else _scrub(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set):
        return [_scrub(v) for v in value]
    return value


def redact_secrets(_logger: Any, _method: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    """structlog processor: mask fields named like secrets and values shaped like keys or tokens."""
    for key, value in list(event_dict.items()):
        if SECRET_FIELD.search(key) and value is not None:
            event_dict[key] = REDACTED
        else:
            event_dict[key] = _scrub(value)
    return event_dict


def _shared_processors() -> list[Any]:
    return [
        merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
    ]


def configure_logging(level: str | int = "INFO", stream: TextIO | None = None) -> None:
    """Send structlog and standard-library logging to `stream` as one JSON object per line.

    Safe to call again (tests point it at a buffer; a process reconfigures its level): the
    previous handler installed here is replaced, handlers installed by others are left alone.
    """
    shared = _shared_processors()
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            redact_secrets,
            structlog.processors.JSONRenderer(default=str),
        ],
    )
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(formatter)
    setattr(handler, _HANDLER_MARK, True)
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, _HANDLER_MARK, False)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper() if isinstance(level, str) else level)


def ensure_logging(level: str | int = "INFO") -> None:
    """Configure JSON logging unless it already is (a process entry point may have chosen a stream)."""
    if not any(getattr(h, _HANDLER_MARK, False) for h in logging.getLogger().handlers):
        configure_logging(level)


def get_logger(name: str | None = None) -> Any:
    return structlog.stdlib.get_logger(name)


def new_correlation_id() -> str:
    return uuid.uuid4().hex


def clean_correlation_id(candidate: str | None) -> str:
    """Keep a caller's id when it is short and plain (it is echoed into logs and headers), else mint one."""
    if candidate and SAFE_ID.match(candidate):
        return candidate
    return new_correlation_id()


def bind_correlation_id(correlation_id: str | None = None, **fields: Any) -> str:
    """Bind an id (and extra fields) to the current context; returns the id actually bound."""
    cid = clean_correlation_id(correlation_id)
    bind_contextvars(**{CORRELATION_KEY: cid}, **fields)
    return cid


def correlation_id() -> str | None:
    return get_contextvars().get(CORRELATION_KEY)


@contextmanager
def correlation(correlation_id: str | None = None, **fields: Any) -> Iterator[str]:
    """Bind a correlation id for the duration of a block (a scheduler job, a CLI command)."""
    previous = get_contextvars()
    cid = bind_correlation_id(correlation_id, **fields)
    try:
        yield cid
    finally:
        unbind_contextvars(CORRELATION_KEY, *fields)
        restore = {k: v for k, v in previous.items() if k == CORRELATION_KEY or k in fields}
        if restore:
            bind_contextvars(**restore)
