"""The embedded message store, protected as a session is.

With the directory target, stored messages and the outbox live in SQLite files under
<messages.path>/protected/store/, a directory laid out like a sessions directory with one
"account", and backed up through the same engine as the sessions: encrypted, verified, versioned
generations in <backup.directory>/.messages/ (a name no account can have, so the sessions'
store never lists it). At start, before the files are opened, the restorer decides as it does
for a session: a missing, empty or corrupt store comes back from its newest generation, and an
old copy (a disk put back) never overwrites a newer backup. So losing the disk loses no stored
message and no outbox entry beyond the last backup, taken within seconds of each change.
"""

from __future__ import annotations

import logging
from pathlib import Path

from wadaemon.backup import BackupEngine, BackupResult
from wadaemon.keyring import Keyring
from wadaemon.layout import SessionsLayout
from wadaemon.replica import Replica
from wadaemon.restore import Restorer
from wadaemon.store import DirectoryStore

log = logging.getLogger("wadaemon.messages")

STORE_DIR = "protected"
STORE_ACCOUNT = "store"
BACKUP_DIR = ".messages"


class ProtectedStore:
    def __init__(self, root: Path, backups: Path, keyring: Keyring, keep_generations: int) -> None:
        self.layout = SessionsLayout(root / STORE_DIR)
        self.dir = self.layout.root / STORE_ACCOUNT
        self.backups = backups / BACKUP_DIR
        self.replica = Replica(DirectoryStore(self.backups), keyring, keep_generations)
        self.engine = BackupEngine(self.layout, self.replica)
        self.restorer = Restorer(self.layout, self.replica)

    def open(self) -> str:
        """Before the SQLite files are opened: restore them if they are missing, empty or
        corrupt (or older than their backup); one line saying what was done."""
        self.layout.prepare()
        if self.backups.parent.is_dir():
            self.backups.mkdir(mode=0o700, exist_ok=True)
        elif not self.dir.exists():
            self.dir.mkdir(mode=0o700, parents=True)
            return f"backup directory {self.backups.parent} absent: starting an empty store"
        outcome = self.restorer.restore_account(STORE_ACCOUNT)
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        return outcome.line()

    def backup(self) -> BackupResult:
        """A new generation if the files changed since the last one."""
        return self.engine.backup(STORE_ACCOUNT)
