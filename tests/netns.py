"""Several "hosts" on this one machine, for tests that need a network between processes: each
host is a network namespace joined to the root namespace by its own veth pair, so each has
its own link, which a test can cut and restore.

    skip = netns_unavailable()               # a reason to skip, or None
    with Network() as net:
        h1 = net.add_host()                  # namespace eq3fa1h1, 10.x.1.2 <-> 10.x.1.1
        proxy = h1.forward(pg_url)           # 10.x.1.1:<port> in the root namespace -> database
        url = proxy.url(db_url)              # what a process in h1 connects to
        subprocess.Popen(h1.command(sys.executable, "-m", "embedq", "worker"), env=...)
        h1.cut()                             # a partition: every packet dropped, both ways
        h1.restore()                         # the link carries again; TCP delivers what waited

A cut models a real partition, not a clean failure: each end of the veth pair gets a
`blackhole` queueing discipline, which drops every outgoing packet silently (the sender is told
it was sent). Links stay up and routes stay in place, so nobody gets a reset, an ICMP error or
"network unreachable": open connections hang until TCP keepalives or a user timeout give up,
and new ones time out. Where the kernel lacks the blackhole qdisc, the root side of the veth
pair is set down instead: the host's end loses its carrier and drops what it sends, its
routes unchanged; the root side's route goes away, so only the forwarder's replies fail
(softly: TCP retransmits them).

Everything is made by `ip` and `tc` (iproute2) and needs root. `Network.close()` (the context
manager's exit) stops the forwarders and deletes the veth pairs and namespaces, also after a
failure; processes still running in a namespace must be ended first, or they keep it alive
(nameless) until they exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import shutil
import subprocess
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from urllib.parse import parse_qs, urlsplit, urlunsplit

from tests.tcp_proxy import TcpProxy

IP = shutil.which("ip") or "/usr/sbin/ip"
TC = shutil.which("tc") or "/usr/sbin/tc"


def netns_unavailable() -> str | None:
    """Why these tests cannot run here (not root, no `ip netns`, no veth), or None."""
    if os.geteuid() != 0:
        return "network namespaces need root (run the test as root, e.g. in a container)"
    if not Path(IP).exists():
        return f"`ip` (iproute2) not found at {IP}: install iproute2"
    probe = f"eqprobe{uuid.uuid4().hex[:6]}"
    try:
        _run(IP, "netns", "add", probe)
    except subprocess.CalledProcessError as exc:
        return f"`ip netns add` failed: {exc.stderr.strip() or exc}"
    try:
        _run(IP, "link", "add", f"{probe[:9]}a", "type", "veth", "peer", "name", f"{probe[:9]}b")
        _run(IP, "link", "del", f"{probe[:9]}a")
    except subprocess.CalledProcessError as exc:
        return f"cannot create a veth pair: {exc.stderr.strip() or exc}"
    finally:
        with contextlib.suppress(subprocess.CalledProcessError):
            _run(IP, "netns", "del", probe)
    return None


def _run(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True, timeout=30).stdout


class BoundProxy(TcpProxy):
    """A TcpProxy listening on one address of this machine instead of 127.0.0.1: the root
    namespace's end of a host's link, so only that host (and this machine) can reach it."""

    def __init__(self, upstream: tuple[str, int] | Path, address: str) -> None:
        self.address = address
        super().__init__(upstream)

    @classmethod
    def to_database(cls, url: str, address: str) -> BoundProxy:
        """A proxy to the server of a PostgreSQL URL (TCP host, or `?host=/socket/dir`)."""
        parts = urlsplit(url)
        port = parts.port or 5432
        socket_dir = parse_qs(parts.query).get("host", [parts.hostname or ""])[0]
        if socket_dir.startswith("/"):
            return cls(Path(socket_dir) / f".s.PGSQL.{port}", address)
        return cls((parts.hostname or "localhost", port), address)

    async def _listen(self) -> None:
        if self._server is None:
            self._server = await asyncio.start_server(
                self._accept, self.address, self.port, reuse_address=True
            )

    def url(self, database_url: str) -> str:
        parts = urlsplit(super().url(database_url))
        netloc = parts.netloc.replace(f"127.0.0.1:{self.port}", f"{self.address}:{self.port}")
        return urlunsplit(parts._replace(netloc=netloc))


@dataclass
class Host:
    """One namespace and its link: `gateway` (root side) <-> `address` (inside)."""

    name: str
    netns: str
    outside: str  # the veth end in the root namespace
    inside: str  # its peer, in the namespace
    address: str
    gateway: str
    proxies: list[BoundProxy] = field(default_factory=list)
    is_cut: bool = False
    cut_by: str = ""

    def command(self, *argv: str) -> list[str]:
        """`argv` run inside this host's namespace (same files, same user, its own network)."""
        return [IP, "netns", "exec", self.netns, *argv]

    def forward(self, database_url: str) -> BoundProxy:
        """A TCP forwarder on the gateway address to the server of `database_url` (a TCP
        address or a Unix socket): the host's only way to the database, over its link."""
        proxy = BoundProxy.to_database(database_url, self.gateway)
        self.proxies.append(proxy)
        return proxy

    def cut(self) -> None:
        """Partition the host: every packet on its link dropped silently, both directions."""
        if self.is_cut:
            return
        try:
            _run(TC, "qdisc", "replace", "dev", self.outside, "root", "blackhole")
            _run(*self.command(TC, "qdisc", "replace", "dev", self.inside, "root", "blackhole"))
            self.cut_by = "blackhole qdisc on both ends"
        except (subprocess.CalledProcessError, FileNotFoundError):
            self._clear_qdiscs()
            _run(IP, "link", "set", self.outside, "down")
            self.cut_by = "root-side veth down"
        self.is_cut = True

    def restore(self) -> None:
        """The link carries packets again (nothing was reset: TCP resends what was lost)."""
        if not self.is_cut:
            return
        self._clear_qdiscs()
        _run(IP, "link", "set", self.outside, "up")
        self.is_cut = False

    def _clear_qdiscs(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError, FileNotFoundError):
            _run(TC, "qdisc", "del", "dev", self.outside, "root")
        with contextlib.suppress(subprocess.CalledProcessError, FileNotFoundError):
            _run(*self.command(TC, "qdisc", "del", "dev", self.inside, "root"))


class Network:
    """Hosts made by `add_host`, all removed by `close()`. Names carry a random tag, so two
    runs at once do not collide; addresses come from a 10.x.0.0/16 this machine does not use."""

    def __init__(self) -> None:
        self.tag = uuid.uuid4().hex[:4]
        self.hosts: list[Host] = []
        self.subnet = _free_subnet()

    def add_host(self) -> Host:
        i = len(self.hosts) + 1
        if i > 250:
            raise ValueError("at most 250 hosts per Network")
        base = f"eq{self.tag}h{i}"  # interface names are limited to 15 characters
        host = Host(
            name=f"h{i}",
            netns=base,
            outside=f"{base}o",
            inside=f"{base}i",
            address=str(self.subnet.network_address + (i << 8) + 2),
            gateway=str(self.subnet.network_address + (i << 8) + 1),
        )
        self.hosts.append(host)  # before creating anything: close() removes what exists
        _run(IP, "netns", "add", host.netns)
        _run(IP, "link", "add", host.outside, "type", "veth", "peer", "name", host.inside)
        _run(IP, "link", "set", host.inside, "netns", host.netns)
        _run(IP, "addr", "add", f"{host.gateway}/24", "dev", host.outside)
        _run(IP, "link", "set", host.outside, "up")
        _run(*host.command(IP, "addr", "add", f"{host.address}/24", "dev", host.inside))
        _run(*host.command(IP, "link", "set", host.inside, "up"))
        _run(*host.command(IP, "link", "set", "lo", "up"))
        return host

    def close(self) -> None:
        """Stop the forwarders, delete every veth pair and namespace (errors ignored: this
        runs in finalizers, also after a failed setup)."""
        for host in self.hosts:
            for proxy in host.proxies:
                with contextlib.suppress(Exception):
                    proxy.close()
            with contextlib.suppress(subprocess.CalledProcessError):
                _run(IP, "link", "del", host.outside)  # its peer goes with it
            with contextlib.suppress(subprocess.CalledProcessError):
                _run(IP, "netns", "del", host.netns)

    def __enter__(self) -> Network:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _free_subnet() -> ipaddress.IPv4Network:
    """A 10.x.0.0/16 that no address of this machine falls in."""
    used = [
        ipaddress.ip_interface(word).network
        for line in _run(IP, "-o", "-4", "addr", "show").splitlines()
        for word in line.split()[3:4]
    ]
    for second in (*range(231, 250), *range(200, 231)):
        candidate = ipaddress.ip_network(f"10.{second}.0.0/16")
        if not any(candidate.overlaps(u) for u in used):
            return candidate
    raise RuntimeError("no free 10.x.0.0/16 for test hosts")
