"""Consistent snapshots of account directories, taken by the worker child process."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wadaemon.errors import SnapshotError

WORKER_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class SnapshotFile:
    path: str  # relative, with '/' separators
    kind: str  # "sqlite" or "file"
    mode: int


@dataclass(frozen=True)
class Snapshot:
    """A private, consistent copy of one account directory, safe to read from this process."""

    account: str
    root: Path
    files: tuple[SnapshotFile, ...]
    warnings: tuple[str, ...]
    # paired devices in each WhatsApp client database (whatsmeow's schema), by relative path
    devices: tuple[tuple[str, int], ...] = ()

    def device_count(self, path: str) -> int | None:
        return dict(self.devices).get(path)


@dataclass(frozen=True)
class CheckReport:
    files: int
    databases: tuple[str, ...]
    corrupt: tuple[tuple[str, str], ...]  # (path, detail)

    @property
    def healthy(self) -> bool:
        return not self.corrupt

    def describe_corruption(self) -> str:
        return "; ".join(f"{p}: {d}" for p, d in self.corrupt)


def run_worker(*args: str, timeout: float = WORKER_TIMEOUT_S) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "wadaemon.sqlite_worker", *args]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise SnapshotError(f"the snapshot worker took longer than {timeout:.0f} s") from None
    try:
        out: dict[str, Any] = json.loads(proc.stdout) if proc.stdout.strip() else {}
    except json.JSONDecodeError:
        out = {}
    if proc.returncode != 0 or not out or "error" in out:
        detail = (
            out.get("error")
            or proc.stderr.strip().splitlines()[-1:]
            or [f"exit status {proc.returncode}"]
        )
        raise SnapshotError(str(detail if isinstance(detail, str) else detail[0]))
    return out


def take_snapshot(account: str, source: Path, dest: Path) -> Snapshot:
    """Copy `source` consistently into the empty directory `dest`."""
    out = run_worker("snapshot", str(source), str(dest))
    files = tuple(
        SnapshotFile(path=f["path"].replace("\\", "/"), kind=f["kind"], mode=int(f["mode"]))
        for f in out["files"]
    )
    devices = tuple(
        (f["path"].replace("\\", "/"), int(f["devices"]))
        for f in out["files"]
        if f.get("devices") is not None
    )
    return Snapshot(account, dest, files, tuple(out.get("warnings", ())), devices)


def check_directory(path: Path, *, private_copy: bool = False) -> CheckReport:
    """PRAGMA integrity_check on every SQLite database under `path`, in the worker process."""
    args = ["check", str(path)] + (["--immutable"] if private_copy else [])
    out = run_worker(*args)
    return CheckReport(
        files=int(out["files"]),
        databases=tuple(out["databases"]),
        corrupt=tuple((c["path"], c["detail"]) for c in out["corrupt"]),
    )
