"""Lost keys: backups whose head generation is sealed with a key that is not loaded.

A head records the id of the key that sealed its generation's manifest, so one read per
account tells whether the loaded keys can still read the account's current backup: nothing is
decrypted. `wadaemon check-config` and the daemon's `keys` health check both ask here, so that
a replaced or lost key file is found before a restore needs it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from wadaemon.keyring import Keyring
from wadaemon.store.base import Store

FIX = (
    "add the key file that sealed it to encryption.old_key_files, "
    "or put back the key file from your copy"
)


@dataclass(frozen=True)
class SealedHead:
    """Which key sealed an account's current backup."""

    account: str
    key_id: str
    generation: int
    state: str  # active | logged_out (a removed head is no backup to read)

    def describe(self) -> str:
        marked = "" if self.state == "active" else f", marked {self.state}"
        return f"{self.account} (generation {self.generation}{marked})"


def sealed_heads(store: Store, accounts: Iterable[str] | None = None) -> list[SealedHead]:
    """The key of every account's head (all the store's accounts by default); removed heads are
    left out. One head read per account; store errors propagate.

    The heads are read as stored, not authenticated (Replica.read_head): only the key id they
    name is used here, to say which keys must be loaded, and a head naming a key that is not
    loaded cannot be authenticated at all, which is exactly what this reports. Nothing is picked
    or deleted from these heads; a head altered to name a loaded key is refused wherever heads
    are used (restore, verify, backups, collection)."""
    names = store.list_accounts() if accounts is None else accounts
    heads = []
    for account in sorted(set(names)):
        head = store.read_head(account)
        if head is not None and head.state != "removed":
            heads.append(SealedHead(account, head.key_id, head.generation, head.state))
    return heads


def with_unknown_keys(heads: Sequence[SealedHead], keyring: Keyring) -> list[SealedHead]:
    """The heads none of the keyring's keys can read: `with_unknown_keys(sealed_heads(store),
    keyring)` lists every account whose backup a lost key sealed."""
    return [h for h in heads if h.key_id not in keyring.by_id]
