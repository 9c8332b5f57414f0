"""`embedq serve` as a subprocess, for the end-to-end tests of the HTTP service.

    servers = Servers(tmp_path)
    s = servers.start(cli_env(db_url), "--log-format", "json")
    s.wait_ready()
    httpx.get(s.url + "/v1/whoami", headers=s.auth(token))
    assert s.stop() == 0
    servers.cleanup()       # SIGKILLs whatever still runs

stdout and stderr go to files, so a chatty server can never block on a full pipe, and a test
reads both after the fact (the first admin token is printed on stdout, the log on stderr).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from tests.tcp_proxy import free_port
from tests.test_chaos import wait_for

TOKEN = re.compile(r"\beq_[A-Za-z0-9_-]{32,200}\b")


@dataclass
class ServeProc:
    popen: subprocess.Popen[bytes]
    port: int
    stdout_path: Path
    stderr_path: Path
    _files: list[Any] = field(repr=False, default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace")

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def logs(self) -> str:
        return (
            f"--- stdout (pid {self.popen.pid}):\n{self.stdout()[-3000:]}\n"
            f"--- stderr:\n{self.stderr()[-6000:]}"
        )

    def alive(self) -> bool:
        return self.popen.poll() is None

    def wait_ready(self, timeout: float = 60) -> None:
        """Until /health/ready answers 200; fails at once if the process exits."""

        def ready() -> bool:
            if not self.alive():
                raise AssertionError(
                    f"embedq serve exited with {self.popen.returncode} before it was ready\n"
                    + self.logs()
                )
            try:
                return httpx.get(self.url + "/health/ready", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(ready, timeout, f"{self.url}/health/ready to answer 200", self.logs, 0.2)

    def first_token(self, timeout: float = 10) -> str:
        """The admin token printed once on stdout."""
        found = wait_for(
            lambda: TOKEN.search(self.stdout()), timeout, "the first admin token", self.logs
        )
        return found.group(0)

    def stop(self, timeout: float = 45) -> int:
        """SIGTERM, then wait for the exit; its status."""
        self.popen.send_signal(signal.SIGTERM)
        return self.wait(timeout)

    def wait(self, timeout: float) -> int:
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"embedq serve (pid {self.popen.pid}) did not exit within {timeout:g} s\n"
                + self.logs()
            ) from None

    @staticmethod
    def auth(token: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {token}"}


class Servers:
    """Starts `embedq serve` processes and, at cleanup, kills whichever of them still run."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.started: list[ServeProc] = []

    def start(
        self, env: dict[str, str], *global_args: str, data_dir: Path | None = None
    ) -> ServeProc:
        n = len(self.started)
        port = free_port()
        data = data_dir or self.tmp_path / f"data-{n}"
        out, err = self.tmp_path / f"serve-{n}.out", self.tmp_path / f"serve-{n}.err"
        files = [out.open("wb"), err.open("wb")]
        popen = subprocess.Popen(
            [sys.executable, "-m", "embedq", "--data-dir", str(data), *global_args, "serve",
             "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=files[0],
            stderr=files[1],
        )  # fmt: skip
        proc = ServeProc(popen, port, out, err, files)
        self.started.append(proc)
        return proc

    def cleanup(self) -> None:
        for s in self.started:
            if s.popen.poll() is None:
                os.kill(s.popen.pid, signal.SIGKILL)
                s.popen.wait(30)
            for f in s._files:
                f.close()
