"""The processes a deployment command starts, each stopped with everything below it, by PID.

Flower's SuperLink and SuperNode start helpers (``flower-superexec``, the apps' processes) in sessions of
their own, so a process group does not hold them: the tree is read with ``psutil`` when stopping, before
any process in it is signalled.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import psutil


def flower_env(flwr_home: Path) -> dict[str, str]:
    """The environment Flower's commands run in: this interpreter's scripts first on PATH (Flower starts
    ``flower-superexec`` by name), their own ``FLWR_HOME``, no dependency installation at run time."""
    scripts = str(Path(sys.executable).parent)
    return {**os.environ, "PATH": scripts + os.pathsep + os.environ.get("PATH", ""),
            "FLWR_HOME": str(flwr_home), "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}


def stop_on_sigterm() -> None:
    """Make SIGTERM (a service manager stopping this command) interrupt it as Ctrl-C does, so that what it
    started is stopped too."""
    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)


def script(name: str) -> str:
    """The path of one of this environment's console scripts (``flower-superlink``, ``flwr``)."""
    return str(Path(sys.executable).parent / name)


class Started:
    """A process this command started; :meth:`stop` ends it and every process below it."""

    def __init__(self, name: str, argv: Sequence[str], env: dict[str, str], log: Path | None) -> None:
        self.name = name
        self.log = log
        out = log.open("ab") if log is not None else None
        self.process = subprocess.Popen(list(argv), env=env, stdout=out, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, start_new_session=True)
        if out is not None:
            out.close()  # the child holds its own descriptor
        self.pid = self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def tree(self) -> list[int]:
        """This process and every process below it, now."""
        try:
            return [self.pid, *(p.pid for p in psutil.Process(self.pid).children(recursive=True))]
        except psutil.NoSuchProcess:
            return []

    def stop(self, grace: float = 10.0) -> list[int]:
        """SIGTERM to the whole tree, SIGKILL to what is left after ``grace`` seconds; the PIDs it held."""
        pids = self.tree()
        procs = []
        for pid in pids:
            try:
                proc = psutil.Process(pid)
                proc.send_signal(signal.SIGTERM)
                procs.append(proc)
            except psutil.NoSuchProcess:
                continue
        _, alive = psutil.wait_procs(procs, timeout=grace)
        for proc in alive:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                continue
        psutil.wait_procs(alive, timeout=grace)
        self.process.poll()  # reap our direct child
        return pids

    def last_lines(self, count: int = 3) -> str:
        """The end of its log (what a failed start said)."""
        if self.log is None or not self.log.is_file():
            return ""
        lines = [line.strip() for line in self.log.read_text(errors="replace").splitlines() if line.strip()]
        return " | ".join(lines[-count:])


def wait_for_port(host: str, port: int, process: Started, timeout: float) -> None:
    """Return once ``host:port`` accepts connections; raise the one-line error if ``process`` ended or
    ``timeout`` passed first."""
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not process.alive():
            raise ValueError(f"{process.name} stopped while starting: {process.last_lines()}")
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return
        except OSError:
            time.sleep(0.3)
    raise ValueError(f"{process.name} did not open {host}:{port} within {timeout:.0f} s: "
                     f"{process.last_lines()}")
