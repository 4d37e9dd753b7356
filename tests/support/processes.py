"""Running the project's Python services as real processes in tests."""

from __future__ import annotations

import os
import signal
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.stack import ROOT


@dataclass
class ServiceProcess:
    """One service process; its output goes to ``log_path``."""

    name: str
    args: list[str]
    env: dict[str, str]
    health_url: str
    log_path: Path
    ssl_context: ssl.SSLContext | None = None
    process: subprocess.Popen[bytes] | None = field(default=None, init=False)
    log_offset: int = field(default=0, init=False)
    """Where this run's output starts in ``log_path`` (logs of earlier runs are kept)."""

    def start(
        self, *, wait_s: float = 60.0, ready_path: str | None = None, wait: bool = True
    ) -> ServiceProcess:
        """Spawn the process and wait (unless ``wait`` is false) until it answers its health URL."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        self.log_offset = log.tell()
        self.process = subprocess.Popen(
            [sys.executable, *self.args],
            cwd=ROOT,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        if not wait:
            return self
        url = (
            self.health_url
            if ready_path is None
            else self.health_url.rsplit("/", 1)[0] + ready_path
        )
        self.wait_http(url, wait_s)
        return self

    def wait_http(self, url: str, wait_s: float) -> None:
        deadline = time.monotonic() + wait_s
        last = "no answer"
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with {self.process.returncode}:\n{self.tail()}"
                )
            try:
                with urllib.request.urlopen(url, timeout=2, context=self.ssl_context) as reply:
                    if reply.status == 200:
                        return
            except urllib.error.HTTPError as e:
                last = f"HTTP {e.code}"
            except OSError as e:
                last = str(e)
            time.sleep(0.25)
        raise TimeoutError(
            f"{self.name} not ready at {url} after {wait_s} s ({last}):\n{self.tail()}"
        )

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout_s: float = 20.0) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout_s``; returns the exit code."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)
            self.process.terminate()
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.process.returncode

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)

    def pause(self) -> None:
        os.kill(self.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.pid, signal.SIGCONT)

    def log_text(self) -> str:
        """What this process has logged so far (not earlier runs of the same name)."""
        try:
            with self.log_path.open("rb") as log:
                log.seek(self.log_offset)
                return log.read().decode(errors="replace")
        except OSError:
            return ""

    def tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"
