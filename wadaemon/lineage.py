"""Which backup generation each local session descends from.

A backup only moves forward: a local session is committed only as a descendant of the current
head, the generation it was restored from or last committed as. The daemon keeps that per
account beside the sessions, outside the account directories (the program that owns a session
may rewrite its directory at will):

    <sessions_path>/.lineage/<account>.json     {"generation": N, "inode": I}

`inode` is the account directory's: a directory replaced underneath the daemon (an old disk put
back, a copy from another host, a fresh session made while the store was down) has another one,
so its descent is unknown, never taken for granted. A lost disk loses these records with the
sessions: what is then found on disk has unknown descent too.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from wadaemon.fsutil import atomic_write

LINEAGE_DIR = ".lineage"
# The descent of a session found when this version first ran on a sessions directory that an
# earlier version used (which kept no lineage): taken as descending from whatever the head is,
# as that version would have. It holds only until the directory is replaced.
ADOPTED = -1


@dataclass(frozen=True)
class Descent:
    generation: int | None  # None: unknown; ADOPTED: from before lineage was kept
    inode: int | None  # the account directory's now (None: it does not exist)
    # (generation, digest) of a commit of this session that was about to switch the head when
    # the record was written: if the head is that generation, the commit landed (the daemon
    # stopped before recording it), and the session descends from it
    pending: tuple[int, str] | None = None

    def parent_for(self, head_generation: int, head_digest: str) -> int | None:
        """The generation this session descends from, judged against the current head."""
        if self.pending == (head_generation, head_digest):
            return head_generation
        return self.generation

    def describe(self) -> str:
        if self.generation is None:
            return "its descent is unknown (restored or committed by no one here)"
        if self.generation == ADOPTED:
            return "it was found by the first start of this version"
        return f"it descends from generation {self.generation}"


class Lineage:
    def __init__(self, sessions: Path) -> None:
        self.sessions = sessions
        self.root = sessions / LINEAGE_DIR

    def _path(self, account: str) -> Path:
        return self.root / f"{account}.json"

    def _inode(self, account: str) -> int | None:
        try:
            return os.stat(self.sessions / account, follow_symlinks=False).st_ino
        except FileNotFoundError:
            return None

    def read(self, account: str) -> Descent:
        inode = self._inode(account)
        try:
            raw = json.loads(self._path(account).read_bytes())
            recorded = int(raw["inode"])
            generation = None if raw["generation"] is None else int(raw["generation"])
            pending = raw.get("pending")
            pending = (int(pending[0]), str(pending[1])) if pending else None
        except (FileNotFoundError, ValueError, KeyError, TypeError, IndexError):
            return Descent(None, inode)
        if recorded != inode:
            return Descent(None, inode)
        return Descent(generation, inode, pending)

    def record(self, account: str, generation: int, inode: int | None) -> None:
        """The session whose directory had `inode` descends from `generation` now. Nothing is
        written if the record says so already, or names `generation` as its pending commit:
        that commit landed, so the record stands for it (Descent.parent_for, and
        Replica._relation once the head has moved on)."""
        current = self.read(account)
        pending = current.pending[0] if current.pending else None
        if current.inode != inode or generation not in (current.generation, pending):
            self._write(account, Descent(generation, inode))

    def record_pending(self, account: str, descent: Descent, generation: int, digest: str) -> None:
        """A commit of the session `descent` describes is about to make `generation` (with
        `digest`) the head: written before the head is switched, so that the session is known
        to descend from it once the switch landed (a commit writes its lineage once: `record`
        then finds nothing to write), and from `descent.generation` if it did not."""
        self._write(account, Descent(descent.generation, descent.inode, (generation, digest)))

    def _write(self, account: str, descent: Descent) -> None:
        if descent.inode is None:
            return
        self.root.mkdir(mode=0o700, exist_ok=True)
        raw: dict[str, object] = {"generation": descent.generation, "inode": descent.inode}
        if descent.pending is not None:
            raw["pending"] = list(descent.pending)
        atomic_write(self._path(account), json.dumps(raw).encode())

    def forget(self, account: str) -> None:
        self._path(account).unlink(missing_ok=True)

    def start(self, accounts: list[str], used_before: bool) -> list[str]:
        """Create the lineage directory if it is missing. On a sessions directory an earlier
        version used, the sessions found are adopted (see ADOPTED); returns them."""
        if self.root.is_dir():
            return []
        self.root.mkdir(mode=0o700, exist_ok=True)
        if not used_before:
            return []
        for account in accounts:
            self.record(account, ADOPTED, self._inode(account))
        return accounts
