"""Named SQL queries loaded from `sql/*.sql` and rendered once per schema.

A file holds blocks headed `-- name: NAME`; `{schema}`, `{channel}`, `{cols}`, `{base_cols}` and
`{queue_filter}` are filled in with psycopg.sql (identifiers quoted), values stay parameters.
"""

from __future__ import annotations

import functools
import re
from importlib import resources

from psycopg import sql

JOB_COLUMNS = (
    "id", "task", "args", "queue", "priority", "attempts", "max_attempts", "run_at",
    "lock_key", "dedup_key", "timeout_s", "worker_id", "lease_expires_at", "last_error",
    "error_kind", "enqueued_at", "started_at",
)  # fmt: skip
_BASE = tuple(c for c in JOB_COLUMNS if c not in ("last_error", "error_kind"))
_HEADER = re.compile(r"^-- name: (\w+)\s*$", re.MULTILINE)


def _blocks(filename: str) -> dict[str, str]:
    text = (resources.files("embedq") / "sql" / filename).read_text()
    parts = _HEADER.split(text)
    return {parts[i]: parts[i + 1].strip() for i in range(1, len(parts), 2)}


def _join(cols: tuple[str, ...]) -> sql.Composable:
    return sql.SQL(", ").join(sql.Identifier(c) for c in cols)


@functools.cache
def load(filename: str, schema: str) -> dict[str, str]:
    """All queries of `filename` rendered for `schema`, as ready-to-execute strings."""
    params = {
        "schema": sql.Identifier(schema),
        "channel": sql.Literal(channel(schema)),
        "cols": _join(JOB_COLUMNS),
        "base_cols": _join(_BASE),
    }
    out: dict[str, str] = {}
    for name, text in _blocks(filename).items():
        if "{queue_filter}" in text:
            variants = {
                name: sql.SQL(""),
                f"{name}_in": sql.SQL("AND j.queue = ANY(%(queues)s::text[])"),
                f"{name}_not_in": sql.SQL("AND j.queue <> ALL(%(skip)s::text[])"),
            }
            for variant, fragment in variants.items():
                out[variant] = sql.SQL(text).format(queue_filter=fragment, **params).as_string()
        else:
            out[name] = sql.SQL(text).format(**params).as_string()
    return out


def channel(schema: str) -> str:
    """The NOTIFY channel on which a schema's new jobs are announced."""
    return f"{schema}_jobs"
