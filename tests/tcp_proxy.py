"""A TCP proxy for tests that cut a process off from its database and plug it back in.

    proxy = TcpProxy.for_database(pg_url)   # listens on 127.0.0.1:<free port>
    url = proxy.url(db_url)                 # the same database, through the proxy
    proxy.cut()       # every open connection closed, new ones refused
    proxy.stall()     # connections stay open and are accepted, but nothing gets through
    proxy.restore()   # listening and forwarding again, on the same port

It runs an asyncio loop in a daemon thread, so a synchronous test drives it. The upstream is
a TCP address or a Unix socket (the embedded PostgreSQL listens on a socket only); either
way the client sees a plain TCP server.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qs, urlsplit, urlunsplit

T = TypeVar("T")
CHUNK = 64 * 1024


class TcpProxy:
    """Forwards 127.0.0.1:`port` to `upstream`: ('host', port) or the path of a Unix socket."""

    def __init__(self, upstream: tuple[str, int] | Path) -> None:
        self.upstream = upstream
        self.port = free_port()
        self.accepted = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._server: asyncio.Server | None = None
        self._open: set[asyncio.StreamWriter] = set()
        self._flowing = asyncio.Event()
        self.restore()

    @classmethod
    def for_database(cls, url: str) -> TcpProxy:
        """A proxy to the server of a PostgreSQL URL (TCP host, or `?host=/socket/dir`)."""
        parts = urlsplit(url)
        port = parts.port or 5432
        socket_dir = parse_qs(parts.query).get("host", [parts.hostname or ""])[0]
        if socket_dir.startswith("/"):
            return cls(Path(socket_dir) / f".s.PGSQL.{port}")
        return cls((parts.hostname or "localhost", port))

    def url(self, database_url: str) -> str:
        """`database_url` rewritten to go through the proxy (user, password, database kept)."""
        parts = urlsplit(database_url)
        auth = parts.netloc.rpartition("@")[0]
        query = "&".join(
            f"{k}={v}" for k, vs in parse_qs(parts.query).items() if k != "host" for v in vs
        )
        netloc = f"{auth}@127.0.0.1:{self.port}" if auth else f"127.0.0.1:{self.port}"
        return urlunsplit(parts._replace(netloc=netloc, query=query))

    def cut(self) -> None:
        """Close every proxied connection and stop listening: connecting is refused."""
        self._call(self._cut())

    def stall(self) -> None:
        """The database stops answering, as when it hangs or the network drops packets:
        connections stay open and new ones are accepted, but no byte is forwarded either way
        until `restore()`, which delivers what waited (nothing is lost, as with TCP)."""
        self._call(self._set_flowing(False))

    def restore(self) -> None:
        """Listen (on the same port) and forward again."""
        self._call(self._listen())
        self._call(self._set_flowing(True))

    def close(self) -> None:
        self._call(self._cut())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)

    async def _set_flowing(self, flowing: bool) -> None:
        if flowing:
            self._flowing.set()
        else:
            self._flowing.clear()

    async def _listen(self) -> None:
        if self._server is None:
            self._server = await asyncio.start_server(
                self._accept, "127.0.0.1", self.port, reuse_address=True
            )

    async def _cut(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        # Aborting the sockets (not cancelling the tasks) ends each pump as a peer's reset would.
        for w in list(self._open):
            _abort(w)
        self._flowing.set()  # a stalled pump goes on, to find its socket closed
        for _ in range(500):
            if not self._open:
                break
            await asyncio.sleep(0.01)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        self._open.add(writer)
        await self._flowing.wait()
        try:
            if isinstance(self.upstream, Path):
                up_reader, up_writer = await asyncio.open_unix_connection(str(self.upstream))
            else:
                up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            self._open.discard(writer)
            _abort(writer)
            return
        self._open.add(up_writer)
        try:
            await asyncio.gather(self._pump(reader, up_writer), self._pump(up_reader, writer))
        finally:
            for w in (writer, up_writer):
                _abort(w)
                self._open.discard(w)

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(CHUNK):
                await self._flowing.wait()
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            # One side ended: end the other, as a dead server (or client) would.
            _abort(writer)


def _abort(writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(Exception):
        writer.transport.abort()


def free_port() -> int:
    """A TCP port nothing listens on now (on 127.0.0.1)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
