"""`embedq serve`: the API, the dashboard and in-process workers in one process.

Start-up: open the database (the embedded server when no URL is set), apply migrations under
the advisory lock, make sure an admin token exists, then serve. SIGTERM (or Ctrl-C) stops
both gracefully: the server stops accepting connections and finishes its requests, workers
stop claiming and finish or release what they hold. A second signal stops at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
from collections.abc import Callable, Generator

import uvicorn

from embedq import tracing
from embedq.api.app import ACQUIRE_TIMEOUT_S, API_POOL_SIZE, bootstrap_admin, create_app
from embedq.app import App
from embedq.errors import ConfigurationError
from embedq.worker import Worker

log = logging.getLogger("embedq.api")


class _Server(uvicorn.Server):
    """uvicorn without its own signal handlers: `serve` stops it together with the workers."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


async def serve(
    worker_app: App,
    *,
    host: str,
    port: int,
    workers: int,
    announce: Callable[[str, str | None], None],
) -> None:
    """Run until SIGTERM/SIGINT. `announce(url, first_token)` is called once the API listens
    (the token only when one was created now: it is shown that one time)."""
    tracing.setup()
    listening = _bind(host, port)  # before anything starts: a taken port is a clean error
    # The API gets an App (and a pool) of its own with a short acquire time-out, so a busy
    # worker never makes a request wait, and a request fails fast while the database is down.
    api_app = App(**worker_app.overrides)
    api_app.tasks = worker_app.tasks
    await api_app.open(pool_size=API_POOL_SIZE, acquire_timeout_s=ACQUIRE_TIMEOUT_S)
    engines: list[Worker] = []
    try:
        first_token = await bootstrap_admin(api_app)
        asgi = create_app(api_app, manage=False)
        service = asgi.state.service
        if workers:
            await worker_app.open(pool_size=4 * workers + 2)
            service.apps.append(worker_app)
            engines = [
                Worker(
                    worker_app, install_signals=False, name=f"serve-{i}" if workers > 1 else None
                )
                for i in range(workers)
            ]
        config = uvicorn.Config(
            asgi,
            host=host,
            port=port,
            log_config=None,  # our logging setup (text or JSON) stays in charge
            access_log=False,  # the API logs each request itself, with its request id
            lifespan="on",
            timeout_graceful_shutdown=max(1, int(api_app.settings.shutdown_grace_s)),
            server_header=False,
        )
        server = _Server(config)
        loop = asyncio.get_running_loop()
        signalled = False

        def stop() -> None:
            nonlocal signalled
            signalled = True
            if server.should_exit:
                server.force_exit = True
            server.should_exit = True
            for w in engines:
                w.stop()

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop)
        try:
            runners = [
                asyncio.create_task(w.run(), name=f"worker-{i}") for i, w in enumerate(engines)
            ]
            serving = asyncio.create_task(server.serve(sockets=[listening]), name="api")
            while not server.started and not serving.done():
                await asyncio.sleep(0.05)
            if server.started:
                announce(f"http://{_display_host(host)}:{port}", first_token)
            try:
                await serving
            except SystemExit:  # uvicorn exits when it cannot bind; it logged the reason
                for w in engines:
                    w.stop()
                await asyncio.gather(*runners, return_exceptions=True)
                raise ConfigurationError(
                    f"cannot listen on {host}:{port} (in use, or not an address of this "
                    "host); pick another with --port / --host (EMBEDQ_API_PORT, EMBEDQ_API_HOST)"
                ) from None
            if not signalled:  # a second stop() would tell the workers to drop their jobs
                for w in engines:
                    w.stop()
            await asyncio.gather(*runners)
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
    finally:
        await api_app.close()
        if workers:
            await worker_app.close()


def _bind(host: str, port: int) -> socket.socket:
    """The API's listening socket, bound here so that a port in use is a one-line error."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError:
            sock.close()
            raise
    except OSError as exc:
        raise ConfigurationError(
            f"cannot listen on {host}:{port} ({exc.strerror or exc}); pick another with --port "
            "/ --host (EMBEDQ_API_PORT, EMBEDQ_API_HOST), or stop what uses it"
        ) from None
    sock.set_inheritable(True)
    return sock


def _display_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
