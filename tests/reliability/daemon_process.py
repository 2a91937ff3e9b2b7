"""``factkeeper run`` as a child process that a scenario can kill -9, stop, and sample.

The child is the real CLI entry point with the harness's settings, one torch thread, and its
stderr in a log file (a pipe nobody reads fills up after a few hundred log lines and then
blocks the daemon, which would look like a hang under load).
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tests.daemon.harness import daemon_command, subprocess_env


class DaemonProcessError(AssertionError):
    """The child daemon did something a scenario did not expect (exited, hung)."""


class DaemonProcess:
    """One child daemon; use as a context manager so it never outlives the scenario."""

    def __init__(
        self, config: Path, env: Mapping[str, str], log_path: Path, args: Sequence[str] = ()
    ) -> None:
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = log_path.open("ab")
        self._stdout_path = log_path.with_suffix(".stdout")
        self._stdout = self._stdout_path.open("wb")
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            daemon_command(config, *args),
            env=subprocess_env(env),
            stdout=self._stdout,
            stderr=self._log,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill9(self) -> int:
        """SIGKILL: no handler runs, nothing is flushed; returns the exit status."""
        self.proc.send_signal(signal.SIGKILL)
        return self.proc.wait(timeout=30)

    def terminate(self, timeout_s: float = 60.0) -> int:
        """SIGTERM (the daemon finishes its batch, journals, commits, exits); the exit status."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=30)
            raise DaemonProcessError(
                f"daemon ignored SIGTERM for {timeout_s:.0f} s\n{self.log_tail()}"
            ) from None

    def wait(self, timeout_s: float) -> int:
        try:
            return self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise DaemonProcessError(
                f"daemon still running after {timeout_s:.0f} s\n{self.log_tail()}"
            ) from None

    def stats(self) -> dict[str, Any]:
        """The JSON line ``factkeeper run`` prints when it ends normally ({} otherwise)."""
        self._stdout.flush()
        lines = self._stdout_path.read_text().strip().splitlines()
        return json.loads(lines[-1]) if lines else {}

    def log_tail(self, lines: int = 40) -> str:
        self._log.flush()
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def close(self) -> None:
        if self.alive():
            self.kill9()
        self._log.close()
        self._stdout.close()

    def __enter__(self) -> DaemonProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
