"""Shared fixtures: one real PostgreSQL (embedded, or EMBEDQ_TEST_DATABASE_URL) per session, a
migrated template database, and a fresh database cloned from it for each test."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest

import embedq
from embedq import embedded, migrations

ROOT = Path(__file__).resolve().parent.parent
TEMPLATE = "embedq_template"


def with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{name}"))


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """URL of the server's maintenance database."""
    url = os.environ.get("EMBEDQ_TEST_DATABASE_URL")
    if url:
        yield url
        return
    with tempfile.TemporaryDirectory(prefix="embedq-test-") as tmp:
        yield embedded.start(Path(tmp))


@pytest.fixture(scope="session")
def template_url(pg_url: str) -> str:
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {TEMPLATE}")
        conn.execute(f"CREATE DATABASE {TEMPLATE}")
    url = with_database(pg_url, TEMPLATE)

    async def migrate() -> None:
        async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
            await migrations.upgrade(conn, "embedq")

    asyncio.run(migrate())
    return url


def create_db(pg_url: str, template: str | None = TEMPLATE) -> str:
    name = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(pg_url, autocommit=True) as conn:
        clause = f" TEMPLATE {template}" if template else ""
        conn.execute(f"CREATE DATABASE {name}{clause}")
    return with_database(pg_url, name)


def drop_db(pg_url: str, url: str) -> None:
    name = urlsplit(url).path.strip("/")
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture
def db_url(pg_url: str, template_url: str) -> Iterator[str]:
    """A fresh, migrated database for one test."""
    url = create_db(pg_url)
    yield url
    drop_db(pg_url, url)


@pytest.fixture
def empty_db_url(pg_url: str) -> Iterator[str]:
    """A fresh database with nothing of embedq in it."""
    url = create_db(pg_url, template=None)
    yield url
    drop_db(pg_url, url)


@pytest.fixture
async def app(db_url: str) -> AsyncIterator[embedq.App]:
    a = embedq.App(database_url=db_url, poll_interval_s=0.2, heartbeat_s=0.5, lease_s=5)
    await a.open()
    yield a
    await a.close()


def cli_env(db_url: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EMBEDQ_")}
    env.pop("DATABASE_URL", None)
    env.update({"EMBEDQ_DATABASE_URL": db_url, "PYTHONUNBUFFERED": "1"}, **extra)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "tests"), env.get("PYTHONPATH", "")])
    return env


def run_cli(
    *args: str, env: dict[str, str], timeout: float = 120, input: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the `embedq` CLI as a subprocess, as a user would."""
    return subprocess.run(
        [sys.executable, "-m", "embedq", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        input=input,
    )


async def drain(app: embedq.App, timeout: float = 60, **worker_kw: object) -> embedq.Worker:
    """Run an in-process worker until the queue is empty."""
    w = embedq.Worker(app, install_signals=False, exit_when_idle=True, **worker_kw)  # type: ignore[arg-type]
    await asyncio.wait_for(w.run(), timeout)
    return w
