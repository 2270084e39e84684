"""One backup of one account: snapshot in the worker, commit to the replica, clean up."""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field, replace
from pathlib import Path

from wadaemon.errors import WadaemonError
from wadaemon.file_entries import PIECE_SIZE
from wadaemon.layout import SessionsLayout, has_files
from wadaemon.replica import CommitResult, Replica, StaleSnapshot
from wadaemon.snapshot import Snapshot, StatKey, WalPosition, take_snapshot

# A fingerprint newer than this may miss a later change with the same mtime (timestamps are
# coarse), so it is not trusted, as git does with "racily clean" entries.
RACY_NS = 2_000_000_000

Fingerprint = tuple[tuple[str, int, int, int, int, int, int], ...]
# A database captured by what changed is not checked with integrity_check (that reads all of
# it); when it changes and its last checked capture is older than this, it is read whole and
# checked again (retention keeps the newest checked generation: Replica.commit).
FULL_CHECK_EVERY_S = 600.0


@dataclass(frozen=True)
class Known:
    """What a committed generation holds, so that the next capture reads only what changed."""

    generation: int
    # files whose stored content stands for them while their stat key is unchanged
    stats: dict[str, StatKey] = field(default_factory=dict)
    # databases by the WAL position their stored content was read at, and size in pages
    since: dict[str, tuple[WalPosition, int]] = field(default_factory=dict)


@dataclass(frozen=True)
class BackupResult:
    account: str
    status: str  # created | unchanged | skipped
    seconds: float
    commit: CommitResult | None = None
    generation: int | None = None
    detail: str = ""
    warnings: tuple[str, ...] = ()
    files_read: int = 0  # files the snapshot read (the others were unchanged since the head)
    notices: tuple[str, ...] = ()  # worth one info line (what is skipped changed back to none)

    def line(self) -> str:
        c = self.commit
        if self.status == "skipped":
            return f"{self.account}: skipped: {self.detail}"
        if self.status == "unchanged" or c is None:
            again = ""
            if c is not None and c.uploaded_pieces:
                again = f"; uploaded {c.uploaded_pieces} damaged pieces again"
            return (
                f"{self.account}: unchanged since generation {self.generation}{again} "
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
    """(path, size, mtime, inode, mode, uid, gid) of every file and directory under root, and
    the newest mtime (ns).

    Taken with stat(2) only: the daemon never opens a live database. `-shm` files are left
    out: they change when a database is merely read (the snapshot worker's own reads included)
    and hold nothing that is not also in the database and its `-wal`.
    """
    entries = []
    newest = 0
    for dirpath, _dirs, files in os.walk(root):
        for name in (".", *files):
            if name.endswith("-shm"):
                continue
            full = os.path.join(dirpath, name)
            try:
                st = os.lstat(full)
            except FileNotFoundError:
                continue
            rel = os.path.relpath(full, root)
            if stat.S_ISDIR(st.st_mode):  # a directory's mtime changes with its entries
                entries.append((rel, 0, 0, st.st_ino, st.st_mode, st.st_uid, st.st_gid))
                continue
            newest = max(newest, st.st_mtime_ns)
            entries.append(
                (rel, st.st_size, st.st_mtime_ns, st.st_ino, st.st_mode, st.st_uid, st.st_gid)
            )
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
        # account -> what its last committed generation holds, by which later captures read
        # only what changed
        self._known: dict[str, Known] = {}
        # account -> when a capture last read every database whole and checked it
        self._checked_at: dict[str, float] = {}
        # account -> the entries skipped (not regular files) last reported: said once per change
        self._skipped: dict[str, frozenset[tuple[str, str]]] = {}

    def backup(
        self,
        account: str,
        *,
        force: bool = False,
        refuse: Callable[[Snapshot], str | None] | None = None,
        reupload: Collection[str] = (),
    ) -> BackupResult:
        """Back up one account now. Raises WadaemonError (snapshot or store failure) on failure.

        A missing or empty account directory is skipped, never committed: an empty generation
        would hide the last good one. Unless `force`, a directory whose files all still have the
        size, mtime and inode they had before the last good backup is not snapshotted again:
        the snapshot's own open of a database touches its -wal/-shm files, which would
        otherwise look like a change and start an endless series of backups. And unless
        `force`, a file whose stat is what it was when the last generation captured it is not
        read again (its stored content stands for it), so the cost follows the change, not the
        number of files. `refuse` may veto a snapshot (returning why): it is then skipped,
        never committed. `reupload`: pieces known to be damaged in the store, uploaded again
        (see Replica.commit); give it with `force`, so that every file is read.
        """
        started = time.monotonic()
        source = self.layout.account_dir(account)
        if source.is_symlink():
            return BackupResult(
                account,
                "skipped",
                0.0,
                detail=f"{source} is a symbolic link, not a directory; never backed up",
            )
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
        known = None if force else self._known.get(account)
        if known is not None and self._full_check_due(account):
            known = Known(known.generation, known.stats)  # every database read whole
        try:
            outcome = self._snapshot_and_commit(account, source, known, refuse, reupload)
        except StaleSnapshot:
            self._known.pop(account, None)
            outcome = self._snapshot_and_commit(account, source, None, refuse, reupload)
        except WadaemonError:
            self._known.pop(account, None)
            raise
        if isinstance(outcome, str):
            if time.time_ns() - newest > RACY_NS:
                self._vetoed[account] = (before, outcome)
            return BackupResult(account, "skipped", time.monotonic() - started, detail=outcome)
        self._vetoed.pop(account, None)
        snapshot, commit = outcome
        if time.time_ns() - newest > RACY_NS:
            self._clean[account] = (before, commit.generation)
        else:
            self._clean.pop(account, None)
        warnings = snapshot.warnings + tuple(
            f"{path}: being written (torn); this generation keeps its last whole content"
            for path in commit.carried
        )
        notices: tuple[str, ...] = ()
        skipped = frozenset(snapshot.skipped)
        if skipped != self._skipped.get(account, frozenset()):
            self._skipped[account] = skipped
            if skipped:
                listed = ", ".join(f"{path} ({what})" for path, what in sorted(skipped))
                warnings += (f"not regular files, never opened nor backed up: {listed}",)
            else:
                notices = ("no entry is skipped any more: every one is a file or a directory",)
        return BackupResult(
            account,
            "created" if commit.created else "unchanged",
            time.monotonic() - started,
            commit,
            generation=commit.generation,
            warnings=warnings,
            files_read=sum(1 for f in snapshot.files if f.status in ("copied", "delta")),
            notices=notices,
        )

    def _full_check_due(self, account: str) -> bool:
        checked = self._checked_at.get(account)
        return checked is None or time.monotonic() - checked > FULL_CHECK_EVERY_S

    def _snapshot_and_commit(
        self,
        account: str,
        source: Path,
        known: Known | None,
        refuse: Callable[[Snapshot], str | None] | None,
        reupload: Collection[str] = (),
    ) -> tuple[Snapshot, CommitResult] | str:
        """Snapshot (not reading the files `known` says are unchanged) and commit; the veto's
        reason instead if `refuse` vetoed the snapshot."""
        descent = self.layout.lineage.read(account)  # before the snapshot: its directory's
        started_ns = time.time_ns()
        snapshot = take_snapshot(
            account,
            source,
            known.stats if known else None,
            known.since if known else None,
            PIECE_SIZE,
        )
        if not snapshot.files:
            return "no files to back up"
        veto = refuse(snapshot) if refuse is not None else None
        if veto is not None:
            return veto
        commit = self.replica.commit(
            snapshot,
            known.generation if known else None,
            reupload,
            parent=descent.generation,
            pending=descent.pending,
            before_switch=lambda g, d, base: self.layout.lineage.record_pending(
                account, replace(descent, generation=base), g, d
            ),
        )
        self.layout.lineage.record(account, commit.generation, descent.inode)
        # Stat keys that may stand for their file's content next time: not for a file modified
        # so shortly before it was read that a later write could keep the same stat (racy).
        previous = known.stats if known else {}
        stats: dict[str, StatKey] = {}
        since: dict[str, tuple[WalPosition, int]] = {}
        for f in snapshot.files:
            if f.status == "reused":
                stats[f.path] = previous[f.path]
            elif f.status == "copied" and f.stat is not None and f.stat[1] < started_ns - RACY_NS:
                stats[f.path] = f.stat
            if f.wal is not None:  # the position this generation's copy of it was read at
                since[f.path] = (f.wal, f.pages)
        self._known[account] = Known(commit.generation, stats, since)
        if all(f.checked for f in snapshot.files):
            self._checked_at[account] = time.monotonic()
        return snapshot, commit
