"""A Debian root filesystem booted with systemd as PID 1 in systemd-nspawn, driven with nsenter.

The recipe: `--register=no --keep-unit` (no machined here), `--volatile=overlay` (the cached
tree is never changed), `--private-network` (the container reaches nothing, so everything the
package needs is already in the tree).
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

# the container's commands see this environment, not the host's (pyenv shims, pip settings)
CLEAN_ENV = [
    "env",
    "-i",
    "PATH=/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG=C.UTF-8",
    "TERM=dumb",
    "SYSTEMD_PAGER=",
    "SYSTEMD_COLORS=0",
    "DEBIAN_FRONTEND=noninteractive",
]


class CommandFailed(AssertionError):
    pass


class Container:
    def __init__(self, release: str, rootfs: Path, binds: Sequence[tuple[Path, str]], log: Path):
        self.release = release
        self.rootfs = rootfs
        self.binds = binds
        self.log = log
        self.nspawn: subprocess.Popen[bytes] | None = None
        self.pid1 = 0

    # --- lifecycle ---------------------------------------------------------------------------

    def boot(self, timeout: float = 60.0) -> float:
        """Boot systemd; return the seconds until it said running (or degraded)."""
        started = time.monotonic()
        cmd = [
            "systemd-nspawn",
            "--quiet",
            "--boot",
            "--register=no",
            "--keep-unit",
            "--console=pipe",
            "--volatile=overlay",
            "--private-network",
            f"--machine=wadaemon-{self.release}",
            "-D",
            str(self.rootfs),
        ]
        cmd += [f"--bind-ro={host}:{inside}" for host, inside in self.binds]
        with self.log.open("wb") as out:
            self.nspawn = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.pid1 = wait_for(self._find_pid1, timeout, "systemd to start in the container")
        state = wait_for(self._system_running, timeout, "the container's systemd to be running")
        if state != "running":
            failed = self.run("systemctl", "--failed", "--no-legend", check=False).stdout
            print(f"[{self.release}] system state {state}; failed units:\n{failed}")
        return time.monotonic() - started

    def _find_pid1(self) -> int | None:
        assert self.nspawn is not None
        if self.nspawn.poll() is not None:
            raise RuntimeError(
                f"systemd-nspawn exited with {self.nspawn.returncode}: "
                + self.log.read_text(errors="replace")[-2000:]
            )
        found = subprocess.run(
            ["pgrep", "-P", str(self.nspawn.pid), "-x", "systemd"],
            capture_output=True,
            text=True,
        )
        return int(found.stdout.split()[0]) if found.returncode == 0 else None

    def _system_running(self) -> str | None:
        state = self.run("systemctl", "is-system-running", check=False).stdout.strip()
        return state if state in ("running", "degraded") else None

    def shutdown(self, timeout: float = 20.0) -> None:
        if self.nspawn is None or self.nspawn.poll() is not None:
            return
        self.nspawn.send_signal(signal.SIGTERM)  # nspawn asks the container's systemd to halt
        try:
            self.nspawn.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.nspawn.pid, signal.SIGKILL)
            self.nspawn.wait(10)

    # --- commands ----------------------------------------------------------------------------

    def run(
        self,
        *cmd: str,
        check: bool = True,
        input: str | None = None,
        timeout: float = 120.0,
    ) -> subprocess.CompletedProcess[str]:
        """Run a command inside the container (all its namespaces), as root."""
        assert self.pid1, "the container is not booted"
        result = subprocess.run(
            ["nsenter", "-t", str(self.pid1), "-a", *CLEAN_ENV, *cmd],
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and result.returncode != 0:
            raise CommandFailed(
                f"[{self.release}] {shlex.join(cmd)} exited with {result.returncode}\n"
                f"--- stdout\n{result.stdout}--- stderr\n{result.stderr}"
            )
        return result

    def sh(self, script: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
        return self.run("sh", "-euc", script, **kwargs)

    def write(self, path: str, text: str, mode: str = "0644", owner: str = "root") -> None:
        self.run(
            "install", "-D", "-m", mode, "-o", owner, "-g", owner, "/dev/stdin", path, input=text
        )

    def read(self, path: str) -> str:
        return self.run("cat", path).stdout

    def show(self, unit: str, *props: str) -> dict[str, str]:
        out = self.run("systemctl", "show", unit, *[f"--property={p}" for p in props]).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def cursor(self) -> str:
        """The journal's current end, to read only what comes after it."""
        out = self.run("journalctl", "--quiet", "--lines=0", "--show-cursor").stdout
        return out.strip().removeprefix("-- cursor: ")

    def journal(self, *args: str, after: str | None = None) -> list[dict[str, Any]]:
        """Journal entries as JSON objects (`journalctl -o json ARGS`)."""
        cmd = ["journalctl", "--no-pager", "--output=json", *args]
        if after:
            cmd.append(f"--after-cursor={after}")
        out = self.run(*cmd).stdout
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def messages(self, *args: str, after: str | None = None) -> list[str]:
        return [message(e) for e in self.journal(*args, after=after)]

    def wait_journal(
        self,
        predicate: Callable[[str], bool],
        timeout: float,
        what: str,
        *args: str,
        after: str | None = None,
    ) -> str:
        """Wait until a journal message matches; return it."""

        def find() -> str | None:
            return next((m for m in self.messages(*args, after=after) if predicate(m)), None)

        return wait_for(find, timeout, what)


@dataclass
class Release:
    """One release under test: its package and its booted container."""

    name: str
    deb: Path  # on the host
    container: Container
    deb_inside: str  # the same file, inside the container
    previous_inside: str  # the per-release package of the version before, inside the container
    timings: dict[str, float] = field(default_factory=dict)
    facts: dict[str, str] = field(default_factory=dict)  # shown at the end of the run


def message(entry: dict[str, Any]) -> str:
    """MESSAGE is a string, or a list of bytes when it is not valid UTF-8."""
    value = entry.get("MESSAGE", "")
    if isinstance(value, list):
        return bytes(value).decode("utf-8", "replace")
    return str(value)


def wait_for(probe: Callable[[], T | None], timeout: float, what: str, every: float = 0.2) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value is not None and value is not False:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)
