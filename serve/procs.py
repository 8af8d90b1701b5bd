"""Start and stop a server process on 127.0.0.1 (the tests and the load test): a free port, a bounded wait for
``/v2/health/ready``, SIGTERM then a bounded wait, and a check that the port is closed afterwards."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_ports(n: int) -> tuple[int, ...]:
    """``n`` distinct free ports (a server's HTTP, gRPC and metrics ports): every socket is held until all are
    chosen, so the kernel cannot hand the same port out twice (``free_port`` three times in a row can, and then
    tritonserver fails to bind its second front end)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            socks.append(s)
            s.bind(("127.0.0.1", 0))
        return tuple(s.getsockname()[1] for s in socks)
    finally:
        for s in socks:
            s.close()


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def http_status(url: str, timeout: float = 2.0) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return None


def group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes of a process group, from /proc."""
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                rest = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if rest[0] != "Z" and int(rest[2]) == pgid:
            out.append(int(d))
    return out


def group_cpu_seconds(pgid: int) -> float:
    """User + system CPU seconds of a process group's live members (a server and its children)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in group_members(pgid):
        try:
            with open(f"/proc/{pid}/stat") as f:
                rest = f.read().rsplit(")", 1)[1].split()
            total += int(rest[11]) + int(rest[12])
        except OSError:
            continue
    return total / tick


def _group_alive(pgid: int) -> bool:
    return bool(group_members(pgid))


class Server:
    """A server subprocess; ``with Server(cmd, port) as s:`` waits until ready and stops it on exit."""

    def __init__(self, cmd: list[str], port: int, env: dict | None = None, log_path=None,
                 ready_path: str = "/v2/health/ready", ports: tuple = (), cwd=None):
        self.cmd, self.port, self.ready_path, self.cwd = cmd, port, ready_path, cwd
        self.ports = (port,) + tuple(ports)
        self.env = dict(os.environ if env is None else env)
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None
        self._log = None
        self.leftover = False

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 120.0, wait_ready: bool = True) -> "Server":
        self._log = open(self.log_path, "wb") if self.log_path else subprocess.DEVNULL
        # a new session: a signal meant for the server's group never reaches the test runner
        self.proc = subprocess.Popen(self.cmd, env=self.env, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True, cwd=self.cwd)
        if wait_ready:
            self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 120.0, status: int = 200) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode} before it was ready: {self.log()}")
            if http_status(self.url + self.ready_path) == status:
                return
            time.sleep(0.2)
        raise TimeoutError(f"server not ready after {timeout:.0f} s: {self.log()}")

    def log(self, tail: int = 3000) -> str:
        if not self.log_path:
            return "(no log)"
        try:
            with open(self.log_path, "rb") as f:
                return f.read().decode("utf-8", "replace")[-tail:]
        except OSError:
            return "(no log)"

    def signal(self, sig) -> None:
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM and wait; SIGKILL the whole group after ``timeout`` (returns the exit code)."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        # children (tritonserver's backend stubs) must have exited with it: give them a moment, then record and
        # kill what is left of the group (a test asserts ``leftover`` is False)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and _group_alive(self.proc.pid):
            time.sleep(0.2)
        self.leftover = _group_alive(self.proc.pid)
        if self.leftover:
            os.killpg(self.proc.pid, signal.SIGKILL)
        if self._log not in (None, subprocess.DEVNULL):
            self._log.close()
        return self.proc.returncode

    def __enter__(self):
        return self.start() if self.proc is None else self

    def __exit__(self, *exc):
        self.stop()
