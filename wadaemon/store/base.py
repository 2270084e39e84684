"""The store interface: everything a backend must do, and nothing more.

Modelled on Litestream's ReplicaClient. A backend keeps, per account, a head (the pointer to the
current generation, switched by compare-and-swap), encrypted generation manifests (created once,
never rewritten) and encrypted pieces (content-addressed by keyed hash). Backends never see
plaintext and never decide anything: the replica does.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Protocol

from wadaemon.errors import WadaemonError

HEAD_STATES = ("active", "logged_out", "removed")


class StoreError(WadaemonError):
    """The store failed or answered something unexpected."""


class StoreUnavailable(StoreError):
    """The store cannot be reached now; retrying later may work."""


class NotFound(StoreError):
    pass


class StoreDamaged(StoreError):
    """An object the store holds is damaged or incomplete (a malformed document, a missing
    part): the generation it belongs to is bad, like one whose piece is missing."""


class HeadConflict(StoreError):
    """The head moved since it was read: another writer committed first."""


class Fenced(HeadConflict):
    """The writer's fencing token is lower than the account's: another instance acquired the
    account's lease since this writer did, so this writer may not switch its head."""


@dataclass(frozen=True)
class Head:
    generation: int
    digest: str
    key_id: str
    state: str
    updated_at: str
    writer: str
    # committed generations, newest first (the current one included): only these are backups;
    # any other manifest is the leftover of a commit that never switched the head
    history: tuple[int, ...] = ()
    # HMAC-SHA256 of mac_input() with the head-MAC subkey of the key named by key_id (hex); ""
    # in heads written before heads were authenticated. Computed and checked by the replica:
    # stores keep it like any other field.
    mac: str = ""
    # the lease token its writer held (Firestore with several instances); None without leases
    token: int | None = None

    def __post_init__(self) -> None:
        if not self.history:
            object.__setattr__(self, "history", (self.generation,))

    def to_bytes(self) -> bytes:
        return json.dumps(vars(self), sort_keys=True).encode()  # the fields are plain values

    def mac_input(self, account: str) -> bytes:
        """What the head's MAC covers: the account id and every field but the MAC itself, as
        canonical JSON. A field added later is covered without further change; while it is None
        it is left out, so that the MACs of heads written before it existed still verify."""
        fields = {k: v for k, v in vars(self).items() if k != "mac" and v is not None}
        canonical = json.dumps(
            {"account": account, "head": fields}, sort_keys=True, separators=(",", ":")
        )
        return b"wadaemon/head\0" + canonical.encode()

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Head:
        try:
            head = cls(
                generation=int(raw["generation"]),
                digest=str(raw["digest"]),
                key_id=str(raw["key_id"]),
                state=str(raw["state"]),
                updated_at=str(raw["updated_at"]),
                writer=str(raw["writer"]),
                history=tuple(int(g) for g in raw.get("history", ())),
                mac=str(raw.get("mac") or ""),
                token=int(raw["token"]) if raw.get("token") is not None else None,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise StoreError(f"malformed head record: {exc!r}") from None
        if head.state not in HEAD_STATES:
            raise StoreError(f"head has unknown state {head.state!r}")
        return head


def check_head_switch(account: str, current: Head | None, expected: int | None, new: Head) -> None:
    """The compare-and-swap rule every backend applies before switching a head."""
    current_gen = current.generation if current else None
    if current_gen != expected:
        raise HeadConflict(f"{account}: head is at generation {current_gen}, expected {expected}")
    if current is not None and new.generation < current.generation:
        raise HeadConflict(
            f"{account}: refusing to move the head back from generation "
            f"{current.generation} to {new.generation}"
        )


class Store(Protocol):
    def describe(self) -> str: ...

    def list_accounts(self) -> list[str]: ...

    def read_head(self, account: str, *, for_switch: bool = False) -> Head | None:
        """The stored head, as it is: the replica authenticates it (Replica.read_head).

        `for_switch`: read by a commit that switches the head only if it is still this one; a
        store may keep the version it read, and its switch_head write on exactly that version
        without reading it again (any write since fails the switch, which then reads again)."""
        ...

    def head_location(self, account: str) -> str:
        """Where the account's head is kept, for messages that tell an operator to look at it."""
        ...

    def switch_head(
        self, account: str, expected: int | None, head: Head, fence: int | None = None
    ) -> None:
        """Set the head if its generation is still `expected` (None: no head yet).

        Raises HeadConflict otherwise, and never moves a head to a lower generation. `fence` is
        the writer's lease token (leases.py): a store that keeps leases raises Fenced, in the
        same atomic step, when the account's token is higher (None: the writer holds no lease,
        refused once the account is driven under leases). Stores without leases ignore it.
        """
        ...

    def missing_pieces(self, account: str, piece_ids: Iterable[str]) -> set[str]: ...

    def write_piece(self, account: str, piece_id: str, blob: bytes) -> None: ...

    def read_piece(self, account: str, piece_id: str) -> bytes: ...

    def read_pieces(self, account: str, piece_ids: Iterable[str]) -> dict[str, bytes]:
        """The blobs of several pieces by id (an id given twice is read once), in as few round
        trips as the backend allows. Raises what read_piece raises for the first missing or
        damaged one: one such piece fails the whole call."""
        ...

    def list_pieces(self, account: str) -> set[str]: ...

    def delete_piece(self, account: str, piece_id: str) -> None: ...

    def create_manifest(self, account: str, generation: int, blob: bytes) -> bool:
        """Store a manifest durably; False if that generation already has one."""
        ...

    def read_manifest(self, account: str, generation: int) -> bytes: ...

    def list_generations(self, account: str) -> list[int]: ...

    def delete_manifest(self, account: str, generation: int) -> None: ...

    def account_lock(self, account: str) -> AbstractContextManager[None]:
        """Held across a commit or a garbage collection, so the two never interleave."""
        ...

    def record_account(self, account: str, fields: Mapping[str, object]) -> None:
        """Merge `fields` into the account's metadata record (status, phone, lastEventAt...).

        Each given top-level field replaces the stored one; fields not given are kept. Values
        are JSON types (str, int, float, bool, None, lists, string-keyed maps). A backend may
        coalesce frequent calls (the newest value of each field wins) and write them later;
        flush() writes whatever is pending.
        """
        ...

    def read_account(self, account: str) -> dict[str, Any] | None:
        """The account's metadata record (with fields still pending a write), None if none."""
        ...

    def flush(self) -> None:
        """Write everything this store still holds back (coalesced metadata); call at shutdown."""
        ...

    def close(self) -> None:
        """flush(), then release connections; the store is not used afterwards."""
        ...
