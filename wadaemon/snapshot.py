"""Consistent snapshots of account directories, taken by the worker child process."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wadaemon.errors import SnapshotError
from wadaemon.manifest import DirEntry
from wadaemon.worker_pool import POOL

WORKER_TIMEOUT_S = 600.0

StatKey = tuple[int, ...]  # size, mtime_ns, inode, mode, uid, gid (see sqlite_worker._stat_key)
WalPosition = tuple[int, ...]  # see wal_image.Position


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
    # copied: the copy is in Snapshot.copies; reused: unchanged since
    # the stat key the caller offered, not read; torn: not whole by its kind's test within the
    # worker's time, not copied
    status: str = "copied"
    stat: StatKey | None = None  # of the file as it was copied (not for SQLite databases)
    torn: str = ""  # why, for status "torn"
    # SQLite databases in WAL mode (wal_capture.py): the position captured, the size in pages
    # and the page size; status "delta": only the pieces in `pieces` were read (the others
    # are those of the generation the capture was asked from)
    wal: WalPosition | None = None
    pages: int = 0
    page_size: int = 0
    pieces: tuple[int, ...] = ()
    # status "delta": the pages (1-based) in `pieces` written since the capture's base, those
    # past its end included; None: not said (each piece read is then stored whole)
    dirty: tuple[int, ...] | None = None
    checked: bool = True  # passed integrity_check (a database read whole)

    @property
    def mode(self) -> int:
        return self.owner.mode


@dataclass(frozen=True)
class Snapshot:
    """A private, consistent copy of one account directory, safe to read from this process."""

    account: str
    files: tuple[SnapshotFile, ...]
    warnings: tuple[str, ...]
    dirs: tuple[DirEntry, ...] = ()  # every directory, the account directory as "."
    # paired devices in each WhatsApp client database (whatsmeow's schema), by relative path
    devices: tuple[tuple[str, int], ...] = ()
    # (relative path, what it is) of entries that are neither regular files nor directories
    # (symlinks, FIFOs, sockets, devices): never opened, never backed up
    skipped: tuple[tuple[str, str], ...] = ()
    # the copies (made in memory by the snapshot worker), by relative path
    copies: Mapping[str, bytes] = field(default_factory=dict)

    def content(self, path: str) -> bytes:
        """The copied content of the file `path` (status "copied")."""
        copy = self.copies.get(path)
        if copy is None:
            raise SnapshotError(
                f"{path}: the snapshot worker sent no copy of it; the backup is retried"
            )
        return copy

    def piece(self, path: str, number: int) -> bytes:
        """Piece `number` of the file `path` captured by what changed (status "delta")."""
        return self.copies[f"{path}#{number}"]

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
    """One request to a snapshot worker (worker_pool.py); its answer."""
    return POOL.call(*args, options=options, timeout=timeout)[0]


def _opt(value: Any) -> int | None:
    return None if value is None else int(value)


def _owner(raw: dict[str, Any]) -> Owner:
    return Owner(int(raw["mode"]), _opt(raw["uid"]), _opt(raw["gid"]))


def take_snapshot(
    account: str,
    source: Path,
    reuse: dict[str, StatKey] | None = None,
    since: dict[str, tuple[WalPosition, int]] | None = None,
    piece_size: int = 64 * 1024,
) -> Snapshot:
    """Copy `source` consistently, in memory (in the snapshot worker). Files whose
    stat key still matches `reuse[path]` are not read: they come back with status "reused".
    Databases with a position in `since` ({path: (position, pages)}) come back as the pieces
    changed since (status "delta") when their WAL still tells."""
    options = {
        "reuse": {p: list(k) for p, k in (reuse or {}).items()},
        "inline": True,
        "since": {p: {"wal": list(w), "pages": n} for p, (w, n) in (since or {}).items()},
        "piece_size": piece_size,
    }
    out, copies = POOL.call("snapshot", str(source), "", options=options, timeout=WORKER_TIMEOUT_S)
    files = tuple(
        SnapshotFile(
            path=f["path"].replace("\\", "/"),
            kind=f["kind"],
            owner=_owner(f),
            status=f.get("status", "copied"),
            stat=tuple(int(x) for x in f["stat"]) if f.get("stat") else None,
            torn=str(f.get("torn", "")),
            wal=tuple(int(x) for x in f["wal"]) if f.get("wal") else None,
            pages=int(f.get("pages", 0)),
            page_size=int(f.get("page_size", 0)),
            pieces=tuple(int(k) for k in f.get("pieces", ())),
            dirty=tuple(int(p) for p in f["dirty"]) if f.get("dirty") is not None else None,
            checked=bool(f.get("checked", True)),
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
    warnings = tuple(out.get("warnings", ()))
    return Snapshot(account, files, warnings, dirs, devices, skipped, copies)


def check_directory(path: Path, *, private_copy: bool = False) -> CheckReport:
    """PRAGMA integrity_check on every SQLite database under `path`, in the worker process."""
    args = ["check", str(path)] + (["--immutable"] if private_copy else [])
    out = run_worker(*args)
    return CheckReport(
        files=int(out["files"]),
        databases=tuple(out["databases"]),
        corrupt=tuple((c["path"], c["detail"]) for c in out["corrupt"]),
    )
