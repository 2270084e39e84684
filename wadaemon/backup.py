"""One backup of one account: snapshot in the worker, commit to the replica, clean up."""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass

from wadaemon.layout import SessionsLayout, has_files
from wadaemon.replica import CommitResult, Replica
from wadaemon.snapshot import take_snapshot


@dataclass(frozen=True)
class BackupResult:
    account: str
    status: str  # created | unchanged | skipped
    seconds: float
    commit: CommitResult | None = None
    detail: str = ""
    warnings: tuple[str, ...] = ()

    def line(self) -> str:
        c = self.commit
        if self.status == "skipped" or c is None:
            return f"{self.account}: skipped: {self.detail}"
        if self.status == "unchanged":
            return (
                f"{self.account}: unchanged since generation {c.generation} ({self.seconds:.2f} s)"
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


class BackupEngine:
    def __init__(self, layout: SessionsLayout, replica: Replica) -> None:
        self.layout = layout
        self.replica = replica

    def backup(self, account: str) -> BackupResult:
        """Back up one account now. Raises WadaemonError (snapshot or store failure) on failure.

        A missing or empty account directory is skipped, never committed: an empty generation
        would hide the last good one.
        """
        started = time.monotonic()
        source = self.layout.account_dir(account)
        if not source.is_dir() or not has_files(source):
            state = "missing" if not source.is_dir() else "empty"
            return BackupResult(account, "skipped", 0.0, detail=f"local session is {state}")
        staging = self.layout.new_temp_dir("snapshot", account)
        try:
            snapshot = take_snapshot(account, source, staging)
            if not snapshot.files:
                return BackupResult(account, "skipped", 0.0, detail="no files to back up")
            commit = self.replica.commit(snapshot)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        status = "created" if commit.created else "unchanged"
        return BackupResult(
            account, status, time.monotonic() - started, commit, warnings=snapshot.warnings
        )
