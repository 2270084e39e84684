"""Consistent snapshots of account directories, taken by the worker child process."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wadaemon.errors import SnapshotError, UnreadableSession
from wadaemon.manifest import DirEntry

WORKER_TIMEOUT_S = 600.0

StatKey = tuple[int, ...]  # size, mtime_ns, inode, mode, uid, gid (see sqlite_worker._stat_key)


@dataclass(frozen=True)
class Owner:
    """A file's or directory's permission bits and numeric owner and group."""

    mode: int
    uid: int | None = None  # None: not recorded (generations made by earlier versions)
    gid: int | None = None


@dataclass(frozen=True)
class SnapshotFile:
    path: str  # relative, with '/' separators
    kind: str  # "sqlite", or a file_kinds name ("json", "file")
    owner: Owner
    # copied: the copy is under Snapshot.root; reused: unchanged since the stat key the caller
    # offered, not read; torn: not whole by its kind's test within the worker's time, not copied
    status: str = "copied"
    stat: StatKey | None = None  # of the file as it was copied (not for SQLite databases)
    torn: str = ""  # why, for status "torn"

    @property
    def mode(self) -> int:
        return self.owner.mode


@dataclass(frozen=True)
class Snapshot:
    """A private, consistent copy of one account directory, safe to read from this process."""

    account: str
    root: Path
    files: tuple[SnapshotFile, ...]
    warnings: tuple[str, ...]
    dirs: tuple[DirEntry, ...] = ()  # every directory, the account directory as "."
    # paired devices in each WhatsApp client database (whatsmeow's schema), by relative path
    devices: tuple[tuple[str, int], ...] = ()
    # (relative path, what it is) of entries that are neither regular files nor directories
    # (symlinks, FIFOs, sockets, devices): never opened, never backed up
    skipped: tuple[tuple[str, str], ...] = ()

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


def run_worker(
    *args: str, timeout: float = WORKER_TIMEOUT_S, options: dict[str, Any] | None = None
) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "wadaemon.sqlite_worker", *args]
    try:
        proc = subprocess.run(
            cmd,
            input=json.dumps(options or {}),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise SnapshotError(f"the snapshot worker took longer than {timeout:.0f} s") from None
    try:
        out: dict[str, Any] = json.loads(proc.stdout) if proc.stdout.strip() else {}
    except json.JSONDecodeError:
        out = {}
    if out.get("unreadable"):
        raise UnreadableSession(str(out["error"]))
    if proc.returncode != 0 or not out or "error" in out:
        detail = (
            out.get("error")
            or proc.stderr.strip().splitlines()[-1:]
            or [f"exit status {proc.returncode}"]
        )
        raise SnapshotError(str(detail if isinstance(detail, str) else detail[0]))
    return out


def _opt(value: Any) -> int | None:
    return None if value is None else int(value)


def _owner(raw: dict[str, Any]) -> Owner:
    return Owner(int(raw["mode"]), _opt(raw["uid"]), _opt(raw["gid"]))


def take_snapshot(
    account: str, source: Path, dest: Path, reuse: dict[str, StatKey] | None = None
) -> Snapshot:
    """Copy `source` consistently into the empty directory `dest`. Files whose stat key still
    matches `reuse[path]` are not read: they come back with status "reused"."""
    out = run_worker(
        "snapshot",
        str(source),
        str(dest),
        options={"reuse": {p: list(k) for p, k in (reuse or {}).items()}},
    )
    files = tuple(
        SnapshotFile(
            path=f["path"].replace("\\", "/"),
            kind=f["kind"],
            owner=_owner(f),
            status=f.get("status", "copied"),
            stat=tuple(int(x) for x in f["stat"]) if f.get("stat") else None,
            torn=str(f.get("torn", "")),
        )
        for f in out["files"]
    )
    dirs = tuple(
        DirEntry(d["path"], int(d["mode"]), _opt(d["uid"]), _opt(d["gid"])) for d in out["dirs"]
    )
    devices = tuple(
        (f["path"].replace("\\", "/"), int(f["devices"]))
        for f in out["files"]
        if f.get("devices") is not None
    )
    skipped = tuple((str(p).replace("\\", "/"), str(what)) for p, what in out.get("skipped", ()))
    return Snapshot(account, dest, files, tuple(out.get("warnings", ())), dirs, devices, skipped)


def check_directory(path: Path, *, private_copy: bool = False) -> CheckReport:
    """PRAGMA integrity_check on every SQLite database under `path`, in the worker process."""
    args = ["check", str(path)] + (["--immutable"] if private_copy else [])
    out = run_worker(*args)
    return CheckReport(
        files=int(out["files"]),
        databases=tuple(out["databases"]),
        corrupt=tuple((c["path"], c["detail"]) for c in out["corrupt"]),
    )
