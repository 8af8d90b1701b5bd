"""Resident memory, open file descriptors and OS threads of the serving process, read from /proc (Linux):
what the soak judges for leaks."""

from __future__ import annotations

import os
import threading
import time

__all__ = ["ProcProbe", "rss_bytes", "open_fds", "os_threads", "settled"]


def rss_bytes() -> int:
    """Resident set size of this process (Linux /proc; 0 where unavailable)."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def open_fds() -> int:
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return -1


def settled(read, want: int | None = None, timeout_s: float = 2.0) -> int:
    """``read()`` once it holds still (5 equal reads 10 ms apart) or equals ``want``, within ``timeout_s``: a
    joined thread or a closed socket leaves /proc a moment after the call that ended it returns."""
    end = time.monotonic() + timeout_s
    last, same = read(), 0
    while time.monotonic() < end and last != want and same < 5:
        time.sleep(0.01)
        now = read()
        same = same + 1 if now == last else 0
        last = now
    return last


def os_threads() -> int:
    """OS threads of this process (Python's and the native pools': ONNX Runtime, OpenMP)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Threads:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return threading.active_count()


class ProcProbe:
    """Resident memory, open file descriptors and OS threads of another process (the HTTP server), from
    /proc/PID; ``None`` is this process. What the soak judges is the serving process, not the clients."""

    def __init__(self, pid: int | None = None):
        self.pid = pid

    def rss(self) -> int:
        if self.pid is None:
            return rss_bytes()
        try:
            with open(f"/proc/{self.pid}/statm") as fh:
                return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            return 0

    def fds(self) -> int:
        if self.pid is None:
            return open_fds()
        try:
            return len(os.listdir(f"/proc/{self.pid}/fd"))
        except OSError:
            return -1

    def threads(self) -> int:
        if self.pid is None:
            return os_threads()
        try:
            with open(f"/proc/{self.pid}/status") as fh:
                return next((int(ln.split()[1]) for ln in fh if ln.startswith("Threads:")), -1)
        except OSError:
            return -1
