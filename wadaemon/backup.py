"""One backup of one account: snapshot in the worker, commit to the replica, clean up."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from wadaemon.layout import SessionsLayout, has_files
from wadaemon.replica import CommitResult, Replica
from wadaemon.snapshot import Snapshot, take_snapshot

# A fingerprint newer than this may miss a later change with the same mtime (timestamps are
# coarse), so it is not trusted, as git does with "racily clean" entries.
RACY_NS = 2_000_000_000

Fingerprint = tuple[tuple[str, int, int, int, int], ...]


@dataclass(frozen=True)
class BackupResult:
    account: str
    status: str  # created | unchanged | skipped
    seconds: float
    commit: CommitResult | None = None
    generation: int | None = None
    detail: str = ""
    warnings: tuple[str, ...] = ()

    def line(self) -> str:
        c = self.commit
        if self.status == "skipped":
            return f"{self.account}: skipped: {self.detail}"
        if self.status == "unchanged" or c is None:
            return (
                f"{self.account}: unchanged since generation {self.generation} "
                f"({self.seconds:.2f} s)"
            )
        gc = ""
        if c.collected and (c.collected.dropped_generations or c.collected.deleted_pieces):
            gc = (
                f"; retention dropped {len(c.collected.dropped_generations)} generations and "
                f"{c.collected.deleted_pieces} pieces"
            )
        return (
            f"{self.account}: generation {c.generation}: {c.files} files, {c.size} bytes, "
            f"uploaded {c.uploaded_pieces}/{c.pieces} pieces ({c.uploaded_bytes} bytes) "
            f"in {self.seconds:.2f} s{gc}"
        )


def fingerprint(root: Path) -> tuple[Fingerprint, int]:
    """(path, size, mtime, inode, mode) of every file under root, and the newest mtime (ns).

    Taken with stat(2) only: the daemon never opens a live database. `-shm` files are left
    out: they change when a database is merely read (the snapshot worker's own reads included)
    and hold nothing that is not also in the database and its `-wal`.
    """
    entries = []
    newest = 0
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            if name.endswith("-shm"):
                continue
            full = os.path.join(dirpath, name)
            try:
                st = os.lstat(full)
            except FileNotFoundError:
                continue
            newest = max(newest, st.st_mtime_ns)
            rel = os.path.relpath(full, root)
            entries.append((rel, st.st_size, st.st_mtime_ns, st.st_ino, st.st_mode))
    return tuple(sorted(entries)), newest


class BackupEngine:
    def __init__(self, layout: SessionsLayout, replica: Replica) -> None:
        self.layout = layout
        self.replica = replica
        # account -> (fingerprint of its directory before its last good backup, generation)
        self._clean: dict[str, tuple[Fingerprint, int]] = {}
        # account -> (fingerprint when `refuse` vetoed its snapshot, why): the snapshot's own
        # reads touch -wal/-shm, so without this a vetoed account would be snapshotted forever
        self._vetoed: dict[str, tuple[Fingerprint, str]] = {}

    def backup(
        self,
        account: str,
        *,
        force: bool = False,
        refuse: Callable[[Snapshot], str | None] | None = None,
    ) -> BackupResult:
        """Back up one account now. Raises WadaemonError (snapshot or store failure) on failure.

        A missing or empty account directory is skipped, never committed: an empty generation
        would hide the last good one. Unless `force`, a directory whose files all still have the
        size, mtime and inode they had before the last good backup is not snapshotted again:
        the snapshot's own open of a database touches its -wal/-shm files, which would
        otherwise look like a change and start an endless series of backups. `refuse` may veto
        a snapshot (returning why): it is then skipped, never committed.
        """
        started = time.monotonic()
        source = self.layout.account_dir(account)
        if not source.is_dir() or not has_files(source):
            state = "missing" if not source.is_dir() else "empty"
            return BackupResult(account, "skipped", 0.0, detail=f"local session is {state}")
        before, newest = fingerprint(source)
        clean = self._clean.get(account)
        if not force and clean is not None and clean[0] == before:
            return BackupResult(
                account, "unchanged", time.monotonic() - started, generation=clean[1]
            )
        vetoed = self._vetoed.get(account)
        if not force and vetoed is not None and vetoed[0] == before:
            return BackupResult(account, "skipped", time.monotonic() - started, detail=vetoed[1])
        staging = self.layout.new_temp_dir("snapshot", account)
        try:
            snapshot = take_snapshot(account, source, staging)
            if not snapshot.files:
                return BackupResult(account, "skipped", 0.0, detail="no files to back up")
            veto = refuse(snapshot) if refuse is not None else None
            if veto is not None:
                if time.time_ns() - newest > RACY_NS:
                    self._vetoed[account] = (before, veto)
                return BackupResult(account, "skipped", time.monotonic() - started, detail=veto)
            self._vetoed.pop(account, None)
            commit = self.replica.commit(snapshot)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        if time.time_ns() - newest > RACY_NS:
            self._clean[account] = (before, commit.generation)
        else:
            self._clean.pop(account, None)
        return BackupResult(
            account,
            "created" if commit.created else "unchanged",
            time.monotonic() - started,
            commit,
            generation=commit.generation,
            warnings=snapshot.warnings,
        )
