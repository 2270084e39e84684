"""Encrypted, incremental, versioned backups of account directories in a store.

Commit protocol (a crash at any point leaves the previous head on a complete generation):
  1. cut every file of a snapshot into pieces and name each by a keyed hash;
  2. upload, sealed, only the pieces the store does not hold yet;
  3. create the sealed manifest of the new generation (never overwriting one);
  4. switch the head to it by compare-and-swap on the generation it replaced;
  5. drop generations beyond retention and pieces that no kept generation references.
Steps 1-5 of one account run under the store's account lock, so a garbage collection can never
delete a piece that a concurrent commit has just decided to reuse.

The head is authenticated: it carries an HMAC (the head-MAC subkey of the key its key_id names)
over the account id and all its other fields. Every head this module uses is read through
Replica.read_head, which checks it. A head that does not authenticate (altered in the store) is
used for nothing: no generation is picked from it, no commit switches it, no collection deletes
anything after it. A head that cannot be authenticated but is not known to be altered (written
by an earlier version without a MAC, naming a key that is not loaded, or missing while
generations remain) is trusted for its generation number only: the commit that replaces it
takes its history from the generations the store lists and collects nothing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import logging
import os
import socket
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import NoReturn

from wadaemon.errors import DecryptError, IntegrityError, WadaemonError
from wadaemon.file_entries import (
    BaseMismatch,
    copied_entry,
    delta_entry,
    read_pieces,
)
from wadaemon.file_kinds import OTHER, kind_of
from wadaemon.keyring import Keyring, blob_key_id
from wadaemon.lineage import ADOPTED, Descent
from wadaemon.manifest import FileEntry, Manifest, PiecePatch
from wadaemon.snapshot import Snapshot
from wadaemon.store.base import Head, NotFound, Store, StoreError, StoreUnavailable

log = logging.getLogger(__name__)

FULL_GC_EVERY_S = 24 * 3600.0
# pieces asked of the store in one call when a file is read back (a restore): with pieces of at
# most 64 KiB, about 3 MiB sealed plus its plaintext is all a read holds at once
READ_BATCH = 48


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def writer_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def piece_context(account: str) -> bytes:
    return b"wadaemon/piece\0" + account.encode()


def manifest_context(account: str, generation: int) -> bytes:
    return b"wadaemon/manifest\0" + account.encode() + b"\0" + str(generation).encode()


class StaleSnapshot(WadaemonError):
    """The files a snapshot did not read are no longer what the store holds: read them again."""


class Conflict(WadaemonError):
    """The local session does not descend from the backup head: committing it would roll the
    backup back or replace it with an unrelated session."""


def conflict_message(account: str, head: int, parent: int | None, relation: str) -> str:
    if relation == "behind":
        why = (
            f"it is generation {parent} unchanged, older than the backup head (an old disk put "
            "back, or another host's copy)"
        )
    else:
        why = Descent(parent, None).describe() + (
            ", and it holds changes the head does not"
            if parent is not None and parent != ADOPTED
            else ", and it differs from the head"
        )
    return (
        f"{account}: the local session does not descend from the backup head (generation "
        f"{head}): {why}. Nothing is committed over the head. Resolve with `wadaemon accounts "
        f"resolve {account} --keep-backup` (restore the head; the local copy goes to "
        f".quarantine/) or `--keep-local` (back up the local copy as the next generation)"
    )


class TornFile(WadaemonError):
    """A file stayed torn and has no whole committed copy to stand for it: retry later."""


class HeadNotAuthentic(WadaemonError):
    """The head's MAC does not verify: it was altered in the store. Nothing uses it."""


class HeadKeyNotLoaded(DecryptError):
    """The head names a key that is not loaded, so it cannot be authenticated (a lost key)."""


# how far a head can be trusted (see Replica.read_head)
AUTHENTICATED = "authenticated"
NO_MAC = "no-mac"  # written by an earlier version
KEY_NOT_LOADED = "key-not-loaded"


@dataclass(frozen=True)
class CommitResult:
    account: str
    generation: int
    created: bool  # False: content equal to the head, nothing written
    files: int
    size: int
    pieces: int
    uploaded_pieces: int = 0
    uploaded_bytes: int = 0
    collected: GcResult | None = None
    carried: tuple[str, ...] = ()  # torn files whose last whole committed content was kept


@dataclass(frozen=True)
class GcResult:
    dropped_generations: tuple[int, ...] = ()
    deleted_pieces: int = 0
    skipped: str = ""


@dataclass
class GenerationInfo:
    generation: int
    is_head: bool
    manifest: Manifest | None = None
    error: str = ""
    key_id: str = field(default="")


class Replica:
    """One account set's backups in one store, sealed with one keyring."""

    def __init__(self, store: Store, keyring: Keyring, keep_generations: int) -> None:
        self.store = store
        self.keyring = keyring
        self.keep_generations = keep_generations
        # account -> (head generation, its pieces): known to be stored while that head stands,
        # so a commit asks the store only about pieces it has not seen in the head.
        self._head_pieces: dict[str, tuple[int, frozenset[str]]] = {}
        self._pieces_of: dict[tuple[str, int], frozenset[str]] = {}  # manifests read or written
        # account -> (generation, its files by path): the last generation committed or read
        self._entries_of: dict[str, tuple[int, dict[str, FileEntry]]] = {}
        self._checked_of: dict[tuple[str, int], bool] = {}  # (account, generation) -> checked
        self._last_full_gc: dict[str, float] = {}  # account -> time.monotonic()
        self._authenticated: set[str] = set()  # accounts whose authenticated head we saw
        self._no_mac_logged: set[str] = set()
        # account -> why its head does not authenticate, while it does not (the daemon's
        # `heads` check); written from worker threads, read by the event loop
        self.head_problems: dict[str, str] = {}
        # account -> the lease token this instance holds for it (None: no lease); every head
        # switch carries it, and a store that keeps leases refuses a lower one (Fenced)
        self.fence: Callable[[str], int | None] = lambda account: None

    # --- the head -----------------------------------------------------------------------------

    def read_head(self, account: str) -> Head | None:
        """The account's head, authenticated: the only way heads are read to be used.

        Raises HeadNotAuthentic if it was altered, HeadKeyNotLoaded if the key it names is not
        loaded. A head written by an earlier version (no MAC) is accepted, and logged once.
        """
        head = self.store.read_head(account)
        if head is not None and self._trust(account, head) == KEY_NOT_LOADED:
            raise HeadKeyNotLoaded(
                f"the backup head of {account} names key {head.key_id}, which is not in the "
                f"keyring ({self.keyring.describe()}), so it cannot be authenticated and "
                f"generation {head.generation} cannot be decrypted; nothing is restored or "
                "deleted from it: add the key file that sealed it to encryption.old_key_files, "
                "or put back the key file from your copy"
            )
        return head

    def _trust(self, account: str, head: Head) -> str:
        """AUTHENTICATED, NO_MAC or KEY_NOT_LOADED; raises HeadNotAuthentic if it was altered."""
        key = self.keyring.by_id.get(head.key_id)
        if key is None:
            return KEY_NOT_LOADED
        if not head.mac:
            if account in self._authenticated:
                self._altered(account, head, "its MAC was removed")
            if account not in self._no_mac_logged:
                self._no_mac_logged.add(account)
                log.warning(
                    "%s: the backup head (generation %d) is not authenticated yet: it was "
                    "written by an earlier version of wadaemon; the next backup or state change "
                    "writes an authenticated one",
                    account,
                    head.generation,
                )
            self.head_problems.pop(account, None)
            return NO_MAC
        if not hmac.compare_digest(head.mac, key.head_mac(head.mac_input(account))):
            self._altered(account, head, "its MAC does not match")
        self._authenticated.add(account)
        self.head_problems.pop(account, None)
        return AUTHENTICATED

    def _altered(self, account: str, head: Head, why: str) -> NoReturn:
        message = (
            f"the backup head of {account} does not authenticate ({why}): it was altered in the "
            f"store, or written by a host that does not hold key {head.key_id} it names; nothing "
            f"is restored or deleted from it, and {account} is not backed up while it stands. "
            f"Put the head back from a copy of the store, or delete it "
            f"({self.store.head_location(account)}): the next backup then writes a new "
            "authenticated head over the generations the store still holds, deleting none. "
            f"Then run `wadaemon verify {account}`"
        )
        self.head_problems[account] = message
        raise HeadNotAuthentic(message)

    def _sign(self, account: str, head: Head) -> Head:
        """The head with its MAC, made with the key its key_id names."""
        key = self.keyring.by_id.get(head.key_id)
        if key is None:
            raise HeadKeyNotLoaded(
                f"{account}: cannot authenticate a head naming key {head.key_id}, which is not "
                f"in the keyring ({self.keyring.describe()})"
            )
        return dataclasses.replace(head, mac=key.head_mac(head.mac_input(account)))

    def _switch(self, account: str, expected: int | None, head: Head) -> Head:
        token = self.fence(account)
        signed = self._sign(account, dataclasses.replace(head, token=token))
        self.store.switch_head(account, expected, signed, token)
        self._authenticated.add(account)
        self.head_problems.pop(account, None)
        return signed

    # --- commit -------------------------------------------------------------------------------

    def commit(
        self,
        snapshot: Snapshot,
        base_generation: int | None = None,
        reupload: Collection[str] = (),
        *,
        parent: int | None,
        pending: tuple[int, str] | None = None,
        before_switch: Callable[[int, str, int | None], None] | None = None,
    ) -> CommitResult:
        """Commit a snapshot as the account's next generation (or nothing if it equals the head).

        `parent` is the generation the local session descends from (lineage.py; None: unknown,
        ADOPTED: found by the first start of this version), and `pending` a commit of it that
        may have landed (Descent.pending). Only a descendant of the current head is committed
        (a fast forward); anything else raises Conflict and writes nothing. `before_switch`
        (generation, digest, what the session descends from until the switch lands) is called
        right before the head is switched.

        Files the snapshot did not read stand for content already stored: a `reused` file is
        the one the generation `base_generation` holds (it must still be the head, else
        StaleSnapshot); a `torn` file keeps the last whole content the head holds (else
        TornFile: nothing is committed and the backup is retried).

        `reupload`: ids of pieces known to be damaged in the store (a restore drill found them):
        those the snapshot's files hold are uploaded again even though the store has them, also
        when nothing else changed.
        """
        account = snapshot.account
        key = self.keyring.current
        copied = self._copied_entries(snapshot)
        dirs = snapshot.dirs

        with self.store.account_lock(account):
            head = self.store.read_head(account, for_switch=True)
            trusted = head is not None and self._trust(account, head) == AUTHENTICATED
            # a head that cannot be authenticated (or is missing while generations remain) is
            # trusted for its generation number only: the new history comes from the listing
            listed = [] if trusted else self.store.list_generations(account)
            carried = self._carried(snapshot, head, base_generation)
            deltas, made = self._delta_entries(snapshot, head, base_generation)
            copied.update(deltas)
            entries = [copied.get(f.path) or carried[f.path] for f in snapshot.files]
            digest = self._digest(entries, snapshot)
            size = sum(e.size for e in entries)
            all_ids = {p for e in entries for p in e.stored_ids()}
            relation, descends = self._relation(account, head, digest, parent, pending)
            # only pieces read now (and page sets made now) can be uploaded again
            fresh = self._fresh_ids(snapshot, copied) | made.keys()
            redo = fresh & set(reupload)
            if relation == "same" and trusted and head is not None:
                uploaded = self._upload(snapshot, copied, redo, made)
                self._head_pieces[account] = (head.generation, frozenset(all_ids))
                return CommitResult(
                    account,
                    head.generation,
                    False,
                    len(entries),
                    size,
                    len(all_ids),
                    len(redo),
                    uploaded,
                )
            if (
                head is not None
                and head.state == "removed"
                and parent is not None
                and parent != ADOPTED
                and parent <= head.generation
            ):
                # a snapshot of the session as it was before the account was removed (a backup
                # that was already running): it must not bring the removed account back
                raise Conflict(
                    f"{account} was removed (its head is a tombstone at generation "
                    f"{head.generation}); a copy of the session from before the removal is not "
                    "backed up"
                )
            if relation in ("behind", "diverged") and head is not None:
                raise Conflict(conflict_message(account, head.generation, descends, relation))
            known = self._head_pieces.get(account)
            candidates = all_ids
            if head is not None and known is not None and known[0] == head.generation:
                candidates = all_ids - known[1]
            # pieces a delta read again hold pages written since its base: new to the store
            # (or stored once more, with the same content), so nobody is asked about them
            new = candidates & (self._reread_ids(snapshot, copied) | made.keys())
            asked = candidates - new
            missing = self.store.missing_pieces(account, asked) if asked else set()
            lost = missing - fresh
            missing |= new
            if lost:
                raise StaleSnapshot(
                    f"{account}: {len(lost)} pieces of files carried from generation "
                    f"{head.generation if head else None} are gone from the store"
                )
            missing |= redo
            uploaded_bytes = self._upload(snapshot, copied, missing, made)
            expected = head.generation if head else None
            generation = max([expected or 0, *listed]) + 1
            manifest = Manifest(
                account,
                generation,
                _now(),
                socket.gethostname(),
                digest,
                tuple(entries),
                dirs=dirs,
                parent=expected if relation in ("ahead", "same") else None,
            )
            while not self.store.create_manifest(
                account, generation, self._seal_manifest(manifest)
            ):
                generation += 1  # a crashed or concurrent writer left a manifest with this number
                manifest = dataclasses.replace(manifest, generation=generation)
            if trusted:
                # a head that is not active (logged out, removed) ended that session's history:
                # its generations hold a dead session and must never be restored behind the new
                old_history = head.history if head and head.state == "active" else ()
            else:
                old_history = tuple(sorted((g for g in listed if g < generation), reverse=True))
            history = (generation, *old_history)[: self.keep_generations]
            if not manifest.checked:
                history += self._last_checked(account, old_history, history)
            if before_switch is not None:
                before_switch(generation, digest, expected if relation == "ahead" else parent)
            switched = self._switch(
                account,
                expected,
                Head(generation, digest, key.key_id, "active", _now(), writer_name(), history),
            )
            self._head_pieces[account] = (generation, frozenset(all_ids))
            self._pieces_of[(account, generation)] = frozenset(all_ids)
            self._checked_of[(account, generation)] = manifest.checked
            self._entries_of[account] = (generation, {e.path: e for e in entries})
            if trusted or not listed:
                fell_off = tuple(g for g in old_history if g not in history)
                collected = self._collect_after_commit(account, fell_off, switched)
            else:
                why = "missing" if head is None else "not authenticated"
                log.warning(
                    "%s: generation %d replaces a head that was %s; its history is the %d "
                    "generations the store holds, and nothing is collected this time",
                    account,
                    generation,
                    why,
                    len(listed),
                )
                collected = GcResult(skipped=f"the head it replaced was {why}")
        return CommitResult(
            account,
            generation,
            True,
            len(entries),
            size,
            len(all_ids),
            len(missing),
            uploaded_bytes,
            collected,
            carried=tuple(sorted(f.path for f in snapshot.files if f.status == "torn")),
        )

    def relation(
        self, snapshot: Snapshot, parent: int | None, pending: tuple[int, str] | None = None
    ) -> tuple[str, Head | None]:
        """How a local session stands to the account's head, without committing anything:
        new (no active head), same (equal content), ahead (descends from it), behind (unchanged
        since an older generation) or diverged; and the head."""
        copied = self._copied_entries(snapshot)
        head = self.read_head(snapshot.account)
        try:
            carried = self._carried(snapshot, head, None)
        except TornFile:
            return ("diverged" if head is not None and head.state == "active" else "new"), head
        entries = [copied.get(f.path) or carried[f.path] for f in snapshot.files]
        digest = self._digest(entries, snapshot)
        return self._relation(snapshot.account, head, digest, parent, pending)[0], head

    def _relation(
        self,
        account: str,
        head: Head | None,
        digest: str,
        parent: int | None,
        pending: tuple[int, str] | None,
    ) -> tuple[str, int | None]:
        """How a session with `digest` that descends from `parent` (and perhaps from the
        `pending` commit of it, see Descent.pending) stands to `head`, and what it descends
        from (`parent`, or the pending commit if it landed)."""
        if head is None or head.state != "active":
            return "new", parent
        parent = Descent(parent, None, pending).parent_for(head.generation, head.digest)
        if pending is not None and parent != pending[0] and pending[0] in head.history:
            # the pending commit landed and the head has moved on since (another writer)
            try:
                if self.load_manifest(account, pending[0]).digest == pending[1]:
                    parent = pending[0]
            except WadaemonError as exc:
                log.warning("%s: cannot read generation %d: %s", account, pending[0], exc)
        if digest == head.digest:
            return "same", parent
        if parent in (head.generation, ADOPTED):
            return "ahead", parent
        if parent is not None and parent < head.generation and parent in head.history:
            try:
                if self.load_manifest(account, parent).digest == digest:
                    return "behind", parent
            except WadaemonError as exc:
                log.warning("%s: cannot read generation %d to compare: %s", account, parent, exc)
        return "diverged", parent

    def _copied_entries(self, snapshot: Snapshot) -> dict[str, FileEntry]:
        key = self.keyring.current
        return {
            f.path: copied_entry(key, f, snapshot.content(f.path))
            for f in snapshot.files
            if f.status == "copied"
        }

    def _delta_entries(
        self, snapshot: Snapshot, head: Head | None, base_generation: int | None
    ) -> tuple[dict[str, FileEntry], dict[str, bytes]]:
        """The entries of the databases captured by what changed since `base_generation`,
        which must still be the head (else StaleSnapshot: the caller reads them whole), and the
        page sets they add ({id: content})."""
        deltas = [f for f in snapshot.files if f.status == "delta"]
        if not deltas:
            return {}, {}
        account = snapshot.account
        if head is None or head.state != "active" or head.generation != base_generation:
            raise StaleSnapshot(
                f"{account}: the head moved from generation {base_generation} to "
                f"{head.generation if head else None}; changed databases must be read whole"
            )
        previous = self._entries(account, head.generation)
        key = self.keyring.current
        out: dict[str, FileEntry] = {}
        made: dict[str, bytes] = {}
        for f in deltas:
            base = previous.get(f.path)
            if base is None:
                raise StaleSnapshot(f"{account}: {f.path} is not in generation {base_generation}")
            try:
                out[f.path], pagesets = delta_entry(key, f, base, snapshot)
            except BaseMismatch as exc:
                raise StaleSnapshot(f"{account}: {exc}") from None
            made.update(pagesets)
        return out, made

    @staticmethod
    def _fresh_ids(snapshot: Snapshot, entries: dict[str, FileEntry]) -> set[str]:
        """Ids of the pieces the snapshot read (it can upload those)."""
        by_path = {f.path: f for f in snapshot.files}
        out: set[str] = set()
        for path, entry in entries.items():
            f = by_path[path]
            if f.status == "delta":
                patched = entry.patch_of()
                out.update(entry.pieces[n] for n in f.pieces if n not in patched)
            else:
                out.update(entry.pieces)
        return out

    @staticmethod
    def _reread_ids(snapshot: Snapshot, entries: dict[str, FileEntry]) -> set[str]:
        """Ids of the pieces of databases captured by what changed that the snapshot read."""
        return {
            entries[f.path].pieces[n]
            for f in snapshot.files
            if f.status == "delta"
            for n in f.pieces
            if n not in entries[f.path].patch_of()
        }

    def _last_checked(
        self, account: str, old_history: tuple[int, ...], history: tuple[int, ...]
    ) -> tuple[int, ...]:
        """The newest generation of `old_history` that passed integrity_check, if `history`
        (newest first, cut to keep_generations) lost it: retention keeps it as well, so a
        database is always restorable from a checked copy (see docs/performance.md)."""
        for g in old_history:
            checked = self._checked_of.get((account, g))
            if checked is None:
                try:
                    checked = self.load_manifest(account, g).checked
                except WadaemonError as exc:
                    log.warning("%s: cannot read generation %d to keep it: %s", account, g, exc)
                    continue
                self._checked_of[(account, g)] = checked
            if checked:
                return () if g in history else (g,)
        return ()

    def _digest(self, entries: list[FileEntry], snapshot: Snapshot) -> str:
        """What decides whether anything changed: every file's content, mode and owners, and
        every directory's."""
        fingerprint: list[object] = [
            [e.path, e.kind, e.mode, e.uid, e.gid, e.size, e.same_content_sha()] for e in entries
        ]
        fingerprint.append([[d.path, d.mode, d.uid, d.gid] for d in snapshot.dirs])
        return self.keyring.current.digest(json.dumps(fingerprint, separators=(",", ":")).encode())

    def _carried(
        self, snapshot: Snapshot, head: Head | None, base_generation: int | None
    ) -> dict[str, FileEntry]:
        """The stored entries that stand for the files the snapshot did not read."""
        reused = [f for f in snapshot.files if f.status == "reused"]
        torn = [f for f in snapshot.files if f.status == "torn"]
        if not reused and not torn:
            return {}
        account = snapshot.account
        active = head is not None and head.state == "active"
        if reused and (not active or head is None or head.generation != base_generation):
            raise StaleSnapshot(
                f"{account}: the head moved from generation {base_generation} to "
                f"{head.generation if head else None}; unchanged files must be read again"
            )
        previous = self._entries(account, head.generation) if active and head else {}
        carried: dict[str, FileEntry] = {}
        for f in reused:
            entry = previous.get(f.path)
            if entry is None:
                raise StaleSnapshot(f"{account}: {f.path} is not in generation {base_generation}")
            carried[f.path] = entry
        for f in torn:
            entry = previous.get(f.path)
            if entry is None or not self._whole(account, entry):
                raise TornFile(
                    f"{account}: {f.path} is being written ({f.torn}) and no whole copy of it "
                    "is backed up yet; nothing committed, the backup is retried"
                )
            carried[f.path] = entry
        return carried

    def _entries(self, account: str, generation: int) -> dict[str, FileEntry]:
        cached = self._entries_of.get(account)
        if cached is None or cached[0] != generation:
            manifest = self.load_manifest(account, generation)
            cached = (generation, {e.path: e for e in manifest.files})
            self._entries_of[account] = cached
        return cached[1]

    def _whole(self, account: str, entry: FileEntry) -> bool:
        """Whether a stored file passes its kind's test (an older version may have committed a
        torn one); read only for kinds that have a test."""
        kind = kind_of(entry.path)
        if kind is OTHER or entry.kind == "sqlite":
            return True
        data = b"".join(self.read_pieces(account, entry.pieces))
        return kind.torn(data) is None

    def set_head_state(self, account: str, state: str) -> Head | None:
        """Mark the head (active, logged_out, removed), keeping its generation and history; the
        head must authenticate, and is written authenticated."""
        with self.store.account_lock(account):
            head = self.read_head(account)
            if head is None or head.state == state:
                return head
            new = dataclasses.replace(head, state=state, updated_at=_now(), writer=writer_name())
            return self._switch(account, head.generation, new)

    def remove_account(self, account: str) -> int:
        """Delete every backup of the account; the head stays as a `removed` tombstone, so that
        no instance restores the account and generation numbers keep increasing. Returns the
        number of objects deleted."""
        deleted = 0
        with self.store.account_lock(account):
            head = self.store.read_head(account)
            if head is not None:
                try:
                    self._trust(account, head)
                except HeadNotAuthentic as exc:  # everything is deleted anyway
                    log.warning("%s: removing the backups all the same: %s", account, exc)
                tomb = dataclasses.replace(
                    head,
                    key_id=self.keyring.current.key_id,  # a tombstone names no sealed generation
                    state="removed",
                    updated_at=_now(),
                    writer=writer_name(),
                    history=(head.generation,),
                )
                self._switch(account, head.generation, tomb)
            for generation in self.store.list_generations(account):
                self.store.delete_manifest(account, generation)
                deleted += 1
            for piece in self.store.list_pieces(account):
                self.store.delete_piece(account, piece)
                deleted += 1
        self._head_pieces.pop(account, None)
        self._entries_of.pop(account, None)
        for key in [k for k in self._pieces_of if k[0] == account]:
            del self._pieces_of[key]
        return deleted

    def _seal_manifest(self, manifest: Manifest) -> bytes:
        return self.keyring.seal(
            manifest.to_bytes(), manifest_context(manifest.account, manifest.generation)
        )

    def _upload(
        self,
        snapshot: Snapshot,
        entries: dict[str, FileEntry],
        missing: set[str],
        made: dict[str, bytes],
    ) -> int:
        uploaded = 0
        todo = set(missing)
        account = snapshot.account
        context = piece_context(account)
        for piece_id, data in made.items():  # page sets (see PiecePatch)
            if piece_id in todo:
                blob = self.keyring.seal(data, context)
                self.store.write_piece(account, piece_id, blob)
                uploaded += len(blob)
                todo.discard(piece_id)
        for f in snapshot.files:
            entry = entries.get(f.path)
            if entry is None or not todo.intersection(entry.pieces):
                continue
            for piece_id, data in read_pieces(snapshot, f, entry):
                if piece_id in todo:
                    blob = self.keyring.seal(data, context)
                    self.store.write_piece(account, piece_id, blob)
                    uploaded += len(blob)
                    todo.discard(piece_id)
        return uploaded

    # --- retention ----------------------------------------------------------------------------
    # After a commit, only the generations that fell off the head's history are dropped, with
    # the pieces no kept generation uses (known from memory, or a few manifest reads): no
    # listing. A full collection (list every manifest and piece, drop leftovers of crashed
    # commits) runs on an account's first commit in this process and then once a day.

    def collect_garbage(self, account: str) -> GcResult:
        with self.store.account_lock(account):
            return self._collect_garbage_locked(account)

    def _collect_after_commit(
        self, account: str, fell_off: tuple[int, ...], switched: Head
    ) -> GcResult:
        """Drop what fell off the history of `switched`, the head this commit just wrote and
        authenticated (under the account lock: it is not read back)."""
        last_full = self._last_full_gc.get(account)
        if last_full is None or time.monotonic() - last_full > FULL_GC_EVERY_S:
            return self._collect_garbage_locked(account)
        if not fell_off:
            return GcResult()
        try:
            kept = set().union(*(self._pieces_in(account, g) for g in switched.history))
            dropping = set().union(*(self._pieces_in(account, g) for g in fell_off))
        except WadaemonError as exc:
            msg = f"cannot read a generation ({exc}); no piece collected"
            log.warning("%s: %s", account, msg)
            return GcResult(skipped=msg)
        for g in fell_off:
            self.store.delete_manifest(account, g)
            self._pieces_of.pop((account, g), None)
        unreferenced = dropping - kept
        for piece_id in unreferenced:
            self.store.delete_piece(account, piece_id)
        return GcResult(fell_off, len(unreferenced))

    def _head_for_collection(self, account: str) -> tuple[Head | None, str]:
        """The head a collection may work from, or (None, why not): only an authenticated head
        decides what is deleted."""
        head = self.store.read_head(account)
        if head is None:
            return None, "no head"
        try:
            trust = self._trust(account, head)
        except HeadNotAuthentic as exc:
            log.error("%s: nothing collected: %s", account, exc)
            return None, str(exc)
        if trust != AUTHENTICATED:
            return None, f"the head is not authenticated ({trust}); nothing collected"
        return head, ""

    def _pieces_in(self, account: str, generation: int) -> frozenset[str]:
        cached = self._pieces_of.get((account, generation))
        if cached is None:
            m = self.load_manifest(account, generation)
            cached = frozenset(p for f in m.files for p in f.stored_ids())
            self._pieces_of[(account, generation)] = cached
        return cached

    def _collect_garbage_locked(self, account: str) -> GcResult:
        """Full collection: drop every manifest that is neither kept nor possibly in flight,
        and every piece no kept generation references."""
        head, skipped = self._head_for_collection(account)
        if head is None:
            return GcResult(skipped=skipped)
        self._last_full_gc[account] = time.monotonic()
        # the newest keep_generations, and after them the newest checked one (see commit)
        keep = [g for g in head.history if g <= head.generation][: self.keep_generations + 1]
        # Manifests below the head and outside its history are leftovers of commits that
        # crashed before switching the head (it has moved past them, so no commit can still
        # make them current). Those above the head are left alone: another writer's commit may
        # be about to switch to them.
        dropped = tuple(
            g for g in self.store.list_generations(account) if g not in keep and g < head.generation
        )
        referenced: set[str] = set()
        try:
            for g in keep:
                referenced.update(self._pieces_in(account, g))
        except WadaemonError as exc:
            msg = f"cannot read a kept generation ({exc}); no piece collected"
            log.warning("%s: %s", account, msg)
            for g in dropped:
                self.store.delete_manifest(account, g)
            return GcResult(dropped, 0, msg)
        for g in dropped:
            self.store.delete_manifest(account, g)
            self._pieces_of.pop((account, g), None)
        unreferenced = self.store.list_pieces(account) - referenced
        for piece_id in unreferenced:
            self.store.delete_piece(account, piece_id)
        return GcResult(dropped, len(unreferenced))

    # --- reading ------------------------------------------------------------------------------

    def load_manifest(self, account: str, generation: int) -> Manifest:
        return self._open_manifest(
            account, generation, self.store.read_manifest(account, generation)
        )

    def _open_manifest(self, account: str, generation: int, blob: bytes) -> Manifest:
        try:
            plain = self.keyring.open(blob, manifest_context(account, generation))
        except DecryptError as exc:
            raise DecryptError(f"generation {generation} manifest: {exc}") from None
        return Manifest.from_bytes(plain, account, generation)

    def read_piece(self, account: str, piece_id: str) -> bytes:
        return self._open_piece(account, piece_id, self.store.read_piece(account, piece_id))

    def read_pieces(self, account: str, piece_ids: Sequence[str]) -> Iterator[bytes]:
        """The content of each piece in order (an id may repeat), each checked as read_piece
        checks it; READ_BATCH ids per store call, one batch held at a time."""
        for start in range(0, len(piece_ids), READ_BATCH):
            chunk = piece_ids[start : start + READ_BATCH]
            blobs = self.store.read_pieces(account, chunk)
            opened: dict[str, bytes] = {}
            for piece_id in chunk:
                data = opened.get(piece_id)
                if data is None:
                    blob = blobs.pop(piece_id, None)
                    if blob is None:  # the store must raise NotFound; it did not
                        raise NotFound(
                            f"piece {piece_id[:16]}… is missing from {self.store.describe()}"
                        )
                    data = opened[piece_id] = self._open_piece(account, piece_id, blob)
                yield data

    def _open_piece(self, account: str, piece_id: str, blob: bytes) -> bytes:
        """Authenticate and decrypt a sealed piece, and check that it holds what its id says."""
        try:
            key = self.keyring.key_for(blob)
            data = self.keyring.open(blob, piece_context(account))
        except DecryptError as exc:
            raise DecryptError(f"piece {piece_id[:16]}…: {exc}") from None
        if key.piece_id(data) != piece_id:
            raise IntegrityError(f"piece {piece_id[:16]}… holds other content than its name says")
        return data

    def damaged_pieces(self, account: str, generation: int) -> list[str]:
        """The pieces of a generation that are missing or fail authentication or their id
        check (the manifest must open). Read READ_BATCH at a time; a batch the store cannot
        return whole (one of its pieces is missing or has no blob) is read again one by one."""
        manifest = self.load_manifest(account, generation)
        ids = sorted({p for f in manifest.files for p in f.stored_ids()})
        damaged = []
        for start in range(0, len(ids), READ_BATCH):
            chunk = ids[start : start + READ_BATCH]
            blobs: dict[str, bytes] | None
            try:
                blobs = self.store.read_pieces(account, chunk)
            except StoreUnavailable:
                raise
            except StoreError:
                blobs = None
            for piece_id in chunk:
                try:
                    if blobs is None or piece_id not in blobs:
                        blob = self.store.read_piece(account, piece_id)
                    else:
                        blob = blobs.pop(piece_id)
                    self._open_piece(account, piece_id, blob)
                except StoreUnavailable:
                    raise
                except (DecryptError, IntegrityError, StoreError):
                    damaged.append(piece_id)
        return damaged

    def write_file(self, account: str, entry: FileEntry, dest: Path) -> None:
        """Rebuild one file from its pieces and patches, checking size and SHA-256 (a patched
        piece: the keyed hash of the piece as patched)."""
        digest = hashlib.sha256()
        size = 0
        patches = entry.patch_of()
        pagesets = list(self.read_pieces(account, entry.pagesets))
        fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as out:
            for n, data in enumerate(self.read_pieces(account, entry.pieces)):
                patch = patches.get(n)
                if patch is not None:
                    data = self._patched(entry, patch, data, pagesets)
                digest.update(data)
                size += len(data)
                out.write(data)
            out.flush()
            os.fsync(out.fileno())
        # an entry without a whole-file SHA-256 is fixed by its piece ids, each checked above
        if size != entry.size or (entry.sha256 and digest.hexdigest() != entry.sha256):
            raise IntegrityError(
                f"{entry.path}: rebuilt file does not match its manifest "
                f"({size} bytes, expected {entry.size}; SHA-256 mismatch)"
            )
        os.chmod(dest, entry.mode & 0o7777)

    def _patched(
        self, entry: FileEntry, patch: PiecePatch, stored: bytes, pagesets: Sequence[bytes]
    ) -> bytes:
        try:
            data = patch.apply(stored, pagesets)
        except ValueError as exc:
            raise IntegrityError(f"{entry.path}: piece {patch.index}: {exc}") from None
        # made with the key that was current at the commit, which sealed the manifest
        if not any(k.piece_id(data) == patch.content_id for k in self.keyring.by_id.values()):
            raise IntegrityError(
                f"{entry.path}: piece {patch.index} as patched does not hold what the manifest "
                "says; this generation cannot be restored, an older one can"
            )
        return data

    def generations(self, account: str) -> list[GenerationInfo]:
        head = self.read_head(account)
        if head is None:
            return []
        out: list[GenerationInfo] = []
        for g in head.history:
            info = GenerationInfo(g, g == head.generation)
            try:
                blob = self.store.read_manifest(account, g)
                info.key_id = blob_key_id(blob)
                info.manifest = self._open_manifest(account, g, blob)
            except (WadaemonError, NotFound, StoreError) as exc:
                info.error = str(exc)
            out.append(info)
        return out
