"""Which message store and outbox a configuration uses."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from wadaemon.config import Config
from wadaemon.messages.protected_store import STORE_ACCOUNT, STORE_DIR, ProtectedStore
from wadaemon.messages.store import MessageStore, OutboxStore

if TYPE_CHECKING:
    from wadaemon.keyring import Keyring
    from wadaemon.store.base import Store

log = logging.getLogger("wadaemon.messages")


def open_backends(
    config: Config, store: Store | None, keyring: Keyring | None
) -> tuple[MessageStore, OutboxStore, ProtectedStore | None]:
    """The message store and the outbox of this configuration (and, with the directory
    target, what protects the embedded ones: restored here if they were lost)."""
    if config.backup.target == "firestore":
        from wadaemon.messages.firestore_messages import FirestoreMessages
        from wadaemon.messages.firestore_outbox import FirestoreOutbox
        from wadaemon.store.firestore import FirestoreStore

        assert isinstance(store, FirestoreStore)
        return FirestoreMessages(store), FirestoreOutbox(store), None
    from wadaemon.messages.sqlite_messages import SqliteMessages
    from wadaemon.messages.sqlite_outbox import SqliteOutbox

    protected = None
    root = config.messages.path / STORE_DIR / STORE_ACCOUNT
    if config.backup.target == "directory" and keyring is not None:
        b = config.backup
        protected = ProtectedStore(config.messages.path, b.directory, keyring, b.keep_generations)
        log.info("messages: embedded store %s: %s", protected.dir, protected.open())
        root = protected.dir
    else:
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
    return SqliteMessages(root / "messages.db"), SqliteOutbox(root / "outbox.db"), protected
