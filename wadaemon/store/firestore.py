"""The Firestore backend: Google Cloud Firestore, or its emulator ($FIRESTORE_EMULATOR_HOST).

wa_sessions/{account}                                  the head: generation, digest, key_id,
                                                       state, updated_at, writer, history, mac
                                                       (checked by the replica), switched_at
                                                       (server time)
wa_sessions/{account}/generations/{gen:012d}           an encrypted manifest: blob (its first
                                                       part), parts, size, upload, created_at
wa_sessions/{account}/generations/{gen}/parts/{upload}-{i:04d}
                                                       further parts of a large manifest
wa_sessions/{account}/pieces/{pieceId}                 an encrypted piece: blob, size
accounts/{account}                                     the account's metadata record

firestore.collection_prefix is prepended to the two top-level collections; subcollections live
under a prefixed parent and keep their names, so one index configuration fits every prefix.

Every call has a timeout and retries transient errors for a few seconds only: a dead or
unreachable Firestore gives StoreUnavailable within seconds, and the caller (the backup
scheduler) retries with backoff. The head is switched by compare-and-swap on its update time (a
precondition), not in a transaction: this library's transactions take no per-call timeout and,
with Firestore down, retry for about a minute before failing.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any, TypeVar

from google.api_core import exceptions as gexc
from google.api_core.retry import Retry, if_transient_error
from google.auth import exceptions as auth_exc
from google.auth.credentials import Credentials
from google.cloud.firestore_v1 import SERVER_TIMESTAMP, Client
from google.cloud.firestore_v1 import base_client as _firestore_base_client
from google.cloud.firestore_v1.collection import CollectionReference
from google.cloud.firestore_v1.document import DocumentReference
from google.cloud.firestore_v1.field_path import FieldPath
from google.oauth2 import credentials as user_credentials
from google.oauth2 import service_account

from wadaemon.config import EMULATOR_ENV, Config, firestore_credentials
from wadaemon.errors import ConfigError
from wadaemon.layout import is_account_id
from wadaemon.store.base import (
    Fenced,
    Head,
    HeadConflict,
    NotFound,
    StoreDamaged,
    StoreError,
    StoreUnavailable,
    check_head_switch,
)

log = logging.getLogger(__name__)

SESSIONS = "wa_sessions"
ACCOUNTS = "accounts"
GEN_WIDTH = 12
MANIFEST_PART_BYTES = 900 * 1024  # blob bytes per manifest document (the limit is 1 MiB)
# blob bytes per batched write: Firestore takes 10 MiB per request, its emulator 4 MiB
BATCH_BYTES = 3 * 1024 * 1024
BATCH_DOCS = 400  # documents per batched write
GET_ALL_REFS = 300  # document references per batched read of small fields
# pieces per batched read of their blobs: a piece holds at most 64 KiB, so about BATCH_BYTES
GET_PIECES = 48
WRITE_INTERVAL = 1.0  # seconds between two writes of one head, or of one account record
CALL_TIMEOUT = 10.0  # seconds for one call
UPLOAD_TIMEOUT = 60.0  # seconds for one batch of pieces (written or read), one manifest part
RETRY = Retry(initial=0.25, maximum=2.0, multiplier=2.0, timeout=5.0, predicate=if_transient_error)
SCOPES = ("https://www.googleapis.com/auth/datastore",)

# Errors that say "not now": the caller retries later.
_UNAVAILABLE: tuple[type[Exception], ...] = (
    gexc.ServiceUnavailable,
    gexc.DeadlineExceeded,
    gexc.RetryError,
    gexc.InternalServerError,
    gexc.ResourceExhausted,
    gexc.Aborted,
    gexc.Cancelled,
    auth_exc.TransportError,
)

T = TypeVar("T")

# gRPC waits up to 120 s between two attempts to reconnect a channel that failed; after a long
# outage the daemon would then stay cut off for up to two minutes after Firestore is back (and
# lease holders would renew late). Bound it to a few seconds. The Firestore library builds its
# channels from these two module lists (production, emulator), read when a client connects.
RECONNECT_MAX_S = 5.0
_RECONNECT_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 500),
    ("grpc.min_reconnect_backoff_ms", 500),
    ("grpc.max_reconnect_backoff_ms", int(RECONNECT_MAX_S * 1000)),
]
for _options in (
    getattr(_firestore_base_client, "_DEFAULT_CHANNEL_OPTIONS", None),
    getattr(_firestore_base_client, "_GRPC_MSG_SIZE_OPTIONS", None),
):
    if isinstance(_options, list) and not any(k == _RECONNECT_OPTIONS[0][0] for k, _ in _options):
        _options.extend(_RECONNECT_OPTIONS)


def _chunks(items: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _head_of(raw: dict[str, Any] | None) -> Head | None:
    """The head a session document holds; None without one (no document, or a document that
    holds only the lease fence of an account never backed up)."""
    if raw is None or raw.get("generation") is None:
        return None
    return Head.from_dict(raw)


def _describe(head: Head | None) -> str:
    return "no head" if head is None else f"generation {head.generation}, {head.state}"


def _same_head(raw: dict[str, Any] | None, head: Head) -> bool:
    now = _head_of(raw)
    return now is not None and asdict(now) == asdict(head)


def check_fence(account: str, stored: object, fence: int | None) -> None:
    """Refuse a head switch by a writer whose lease token is below the account's fence."""
    if stored is None or (fence is not None and fence >= int(str(stored))):
        return
    if fence is None:
        raise Fenced(
            f"{account}: its backups are written under leases (fencing token {stored}) and this "
            "writer holds no lease: only the daemon instance that holds the account's lease "
            "commits its backups (wadaemon accounts list shows which one)"
        )
    raise Fenced(
        f"{account}: fencing token {fence} is below the account's {stored}: another instance "
        "acquired its lease since this one did; nothing is committed"
    )


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= 300 else text[:297] + "..."


class FirestoreStore:
    def __init__(
        self,
        project: str,
        database: str = "(default)",
        *,
        credentials: Credentials | None = None,
        collection_prefix: str = "",
        write_interval: float = WRITE_INTERVAL,
    ) -> None:
        self.project = project
        self.database = database
        self.prefix = collection_prefix
        self.emulator_host = os.environ.get(EMULATOR_ENV) or None  # read by the client too
        self.write_interval = write_interval
        self.client = Client(project=project, credentials=credentials, database=database)
        self.counters: Counter[str] = Counter()  # reads, writes, deletes, bytes_written
        self._lock = threading.Lock()
        self._account_locks: dict[str, threading.Lock] = {}
        self._unsent: dict[str, dict[str, bytes]] = {}  # pieces waiting for a batched write
        # account -> (fields, update time) of its session document as a commit read it
        # (read_head for_switch): its head switch tries that version first (see switch_head)
        self._seen: dict[str, tuple[dict[str, Any], Any]] = {}
        self._next_write: dict[tuple[str, str], float] = {}  # (kind, account) -> monotonic time
        self._records: dict[str, dict[str, Any]] = {}  # account fields waiting for their second
        self._timers: dict[str, threading.Timer] = {}

    def describe(self) -> str:
        text = f"firestore project {self.project} database {self.database}"
        if self.prefix:
            text += f" collection prefix {self.prefix!r}"
        if self.emulator_host:
            text += f" (emulator {self.emulator_host})"
        return text

    def close(self) -> None:
        """Write what is pending, then release the connection."""
        try:
            self.flush()
        finally:
            self.client.close()  # type: ignore[no-untyped-call]

    # --- references and calls -----------------------------------------------------------------

    def _session(self, account: str) -> DocumentReference:
        return self.client.collection(self.prefix + SESSIONS).document(account)

    def _generations(self, account: str) -> CollectionReference:
        generations: CollectionReference = self._session(account).collection("generations")
        return generations

    def _generation(self, account: str, generation: int) -> DocumentReference:
        return self._generations(account).document(f"{generation:0{GEN_WIDTH}d}")

    def _pieces(self, account: str) -> CollectionReference:
        pieces: CollectionReference = self._session(account).collection("pieces")
        return pieces

    def _record(self, account: str) -> DocumentReference:
        return self.client.collection(self.prefix + ACCOUNTS).document(account)

    @contextmanager
    def _call(self, what: str) -> Iterator[None]:
        """Turn the client's exceptions into store errors that say what to check."""
        try:
            yield
        except gexc.NotFound as exc:
            raise NotFound(f"{what}: {self.describe()}: {_short(exc)}") from None
        except _UNAVAILABLE as exc:
            if self.emulator_host:
                check = f"is the emulator running at {self.emulator_host}?"
            else:
                check = (
                    "check this host's network path to firestore.googleapis.com, that database "
                    f"{self.database} exists in project {self.project}, and the Google Cloud "
                    "status page"
                )
            raise StoreUnavailable(
                f"{what}: Firestore (project {self.project}) is unavailable: {_short(exc)}; {check}"
            ) from None
        except (gexc.PermissionDenied, gexc.Unauthenticated, auth_exc.RefreshError) as exc:
            raise StoreError(
                f"{what}: Firestore refused the call ({_short(exc)}); check the credentials and "
                f"that their service account has the role roles/datastore.user in project "
                f"{self.project}"
            ) from None
        except (gexc.GoogleAPIError, auth_exc.GoogleAuthError) as exc:
            raise StoreError(f"{what}: {self.describe()}: {_short(exc)}") from None

    def _count(self, **amounts: int) -> None:
        with self._lock:
            self.counters.update(amounts)

    def _pace(self, kind: str, account: str) -> None:
        """Sleep until one write_interval has passed since this store last wrote the document."""
        with self._lock:
            wait = self._next_write.get((kind, account), 0.0) - time.monotonic()
        if wait > 0:
            time.sleep(wait)

    def _wrote(self, kind: str, account: str) -> None:
        with self._lock:
            self._next_write[kind, account] = time.monotonic() + self.write_interval

    # --- accounts and heads -------------------------------------------------------------------

    def list_accounts(self) -> list[str]:
        # a document without a generation holds only a lease fence (an account leased but
        # never backed up): not a backup
        query = self.client.collection(self.prefix + SESSIONS).select(["generation"])
        with self._call("listing the accounts"):
            snaps = list(query.stream(retry=RETRY, timeout=CALL_TIMEOUT))
        self._count(reads=max(1, len(snaps)))
        ids = [s.id for s in snaps if (s.to_dict() or {}).get("generation") is not None]
        return sorted(i for i in ids if is_account_id(i))

    def active_accounts(self) -> list[str]:
        """Accounts whose head is active (not logged out, not removed)."""
        query = self.client.collection(self.prefix + SESSIONS).select(["generation", "state"])
        with self._call("listing the active accounts"):
            snaps = list(query.stream(retry=RETRY, timeout=CALL_TIMEOUT))
        self._count(reads=max(1, len(snaps)))
        found = [s.id for s in snaps if (s.to_dict() or {}).get("state") == "active"]
        return sorted(i for i in found if is_account_id(i))

    def read_head(self, account: str, *, for_switch: bool = False) -> Head | None:
        with self._call(f"{account}: reading the head"):
            snap = self._session(account).get(retry=RETRY, timeout=CALL_TIMEOUT)
        self._count(reads=1)
        raw = snap.to_dict() if snap.exists else None
        # a commit's own read is the version its decision rests on, which its switch tries; any
        # other read leaves the next switch to read the document itself
        self._remember(account, raw if for_switch else None, snap.update_time)
        return _head_of(raw)

    def _remember(self, account: str, raw: dict[str, Any] | None, update_time: Any) -> None:
        with self._lock:
            if raw is None or update_time is None:
                self._seen.pop(account, None)
            else:
                self._seen[account] = (raw, update_time)

    def head_location(self, account: str) -> str:
        return f"the document {self.prefix}{SESSIONS}/{account} in {self.describe()}"

    def switch_head(
        self, account: str, expected: int | None, head: Head, fence: int | None = None
    ) -> None:
        """Compare-and-swap on the document's update time. The document also holds the
        account's lease fence (the highest lease token issued, raised by every acquisition in
        the same atomic write as the lease), so the token check and the swap are one step: an
        acquisition after the read changes the update time and fails the write.

        The version of the document the commit read (read_head for_switch) is tried first,
        without reading it again: the precondition makes that as safe as a fresh read. Any
        write since (a lease acquisition, another writer) sends the switch down the path that
        reads it again, and a head that changed since that version is a conflict even at the
        same generation (a state change), so the commit decides again on a fresh read."""
        self._pace("head", account)
        ref = self._session(account)
        data = {**asdict(head), "history": list(head.history), "switched_at": SERVER_TIMESTAMP}
        with self._lock:
            seen = self._seen.pop(account, None)
        with self._call(f"{account}: switching the head to generation {head.generation}"):
            if (
                seen is not None
                and self._allowed(account, seen[0], expected, head, fence)
                and self._update(account, ref, seen[1], data)
            ):
                return
            snap = ref.get(retry=RETRY, timeout=CALL_TIMEOUT)
            self._count(reads=1)
            raw = snap.to_dict() if snap.exists else None
            if _same_head(raw, head):
                return  # an earlier attempt landed; its answer was lost
            if seen is not None and _head_of(raw) != _head_of(seen[0]):
                # the head itself changed since the version the caller decided on (perhaps a
                # state change at the same generation, which the generation check would miss)
                raise HeadConflict(
                    f"{account}: head is at {_describe(_head_of(raw))}, expected generation "
                    f"{expected} as it was read: it changed since"
                )
            check_fence(account, (raw or {}).get("fence"), fence)
            check_head_switch(account, _head_of(raw), expected, head)
            if raw is not None and self._update(account, ref, snap.update_time, data):
                return
            if raw is None:
                try:
                    ref.create(data, retry=RETRY, timeout=CALL_TIMEOUT)
                    self._count(writes=1)
                    return
                except gexc.AlreadyExists:
                    pass  # created by someone else since we read it, or by our retried call
                finally:
                    self._wrote("head", account)
            again = ref.get(retry=RETRY, timeout=CALL_TIMEOUT)
            self._count(reads=1)
        raw = again.to_dict() if again.exists else None
        now = _head_of(raw)
        if _same_head(raw, head):
            return  # the first attempt landed; its answer was lost
        check_fence(account, (raw or {}).get("fence"), fence)
        raise HeadConflict(
            f"{account}: head is at generation {now.generation if now else None}, "
            f"expected {expected}"
        )

    @staticmethod
    def _allowed(
        account: str, raw: dict[str, Any], expected: int | None, head: Head, fence: int | None
    ) -> bool:
        """Whether the switch passes the fence and the compare-and-swap rule on `raw`."""
        try:
            check_fence(account, raw.get("fence"), fence)
            check_head_switch(account, _head_of(raw), expected, head)
        except StoreError:
            return False  # perhaps stale: decided on a fresh read
        return True

    def _update(
        self, account: str, ref: DocumentReference, update_time: Any, data: dict[str, Any]
    ) -> bool:
        """Write `data` if the document is still the version of `update_time`."""
        try:
            since = self.client.write_option(last_update_time=update_time)
            ref.update(data, option=since, retry=RETRY, timeout=CALL_TIMEOUT)
        except (gexc.FailedPrecondition, gexc.NotFound):
            return False  # written by someone else since, or by our own retried call
        finally:
            self._wrote("head", account)
        self._count(writes=1)
        return True

    # --- pieces -------------------------------------------------------------------------------

    def missing_pieces(self, account: str, piece_ids: Iterable[str]) -> set[str]:
        self._send_pieces(account)
        wanted = sorted(set(piece_ids))
        found: set[str] = set()
        with self._call(f"{account}: looking up {len(wanted)} pieces"):
            for chunk in _chunks(wanted, GET_ALL_REFS):
                refs = [self._pieces(account).document(p) for p in chunk]
                # the field mask keeps the blobs on the server: only existence is wanted
                snaps = self.client.get_all(
                    refs, field_paths=["size"], retry=RETRY, timeout=CALL_TIMEOUT
                )
                found.update(s.id for s in snaps if s.exists)
                self._count(reads=len(refs))
        return set(wanted) - found

    def write_piece(self, account: str, piece_id: str, blob: bytes) -> None:
        """Queue a piece for a batched write; it is sent once a batch is full, and at the
        latest before the next manifest of the account is created (or its account lock is
        released), so a generation never becomes visible before its pieces."""
        ready: dict[str, bytes] = {}
        with self._lock:
            queued = self._unsent.setdefault(account, {})
            full = sum(map(len, queued.values())) + len(blob) > BATCH_BYTES
            if full or len(queued) >= BATCH_DOCS:
                ready, queued = queued, {}  # this batch goes now; the piece starts the next
                self._unsent[account] = queued
            queued[piece_id] = blob
        if ready:
            self._commit_pieces(account, ready)

    def _send_pieces(self, account: str) -> None:
        with self._lock:
            ready = self._unsent.pop(account, None)
        if ready:
            self._commit_pieces(account, ready)

    def _commit_pieces(self, account: str, pieces: Mapping[str, bytes]) -> None:
        batch = self.client.batch()
        for piece_id, blob in pieces.items():
            batch.set(self._pieces(account).document(piece_id), {"blob": blob, "size": len(blob)})
        size = sum(map(len, pieces.values()))
        with self._call(f"{account}: writing {len(pieces)} pieces ({size} bytes)"):
            batch.commit(retry=RETRY, timeout=UPLOAD_TIMEOUT)
        self._count(writes=len(pieces), bytes_written=size)

    def read_piece(self, account: str, piece_id: str) -> bytes:
        self._send_pieces(account)
        with self._call(f"{account}: reading piece {piece_id[:16]}…"):
            snap = self._pieces(account).document(piece_id).get(retry=RETRY, timeout=CALL_TIMEOUT)
        self._count(reads=1)
        if not snap.exists:
            raise NotFound(f"piece {piece_id[:16]}… is missing from {self.describe()}")
        blob = (snap.to_dict() or {}).get("blob")
        if not isinstance(blob, bytes):
            raise StoreDamaged(f"{account}: piece {piece_id[:16]}… has no blob field")
        return blob

    def read_pieces(self, account: str, piece_ids: Iterable[str]) -> dict[str, bytes]:
        """GET_PIECES documents per call (one round trip, the documents streamed back), instead
        of one call per piece; errors as read_piece has them."""
        self._send_pieces(account)
        wanted = list(dict.fromkeys(piece_ids))
        blobs: dict[str, bytes] = {}
        for chunk in _chunks(wanted, GET_PIECES):
            refs = [self._pieces(account).document(p) for p in chunk]
            with self._call(f"{account}: reading {len(chunk)} pieces from {chunk[0][:16]}…"):
                snaps = {
                    s.id: s for s in self.client.get_all(refs, retry=RETRY, timeout=UPLOAD_TIMEOUT)
                }
            self._count(reads=len(refs))
            for piece_id in chunk:
                snap = snaps.get(piece_id)
                if snap is None or not snap.exists:
                    raise NotFound(f"piece {piece_id[:16]}… is missing from {self.describe()}")
                blob = (snap.to_dict() or {}).get("blob")
                if not isinstance(blob, bytes):
                    raise StoreDamaged(f"{account}: piece {piece_id[:16]}… has no blob field")
                blobs[piece_id] = blob
        return blobs

    def list_pieces(self, account: str) -> set[str]:
        self._send_pieces(account)
        query = self._pieces(account).select([FieldPath.document_id()])
        with self._call(f"{account}: listing the pieces"):
            ids = {snap.id for snap in query.stream(retry=RETRY, timeout=CALL_TIMEOUT)}
        self._count(reads=max(1, len(ids)))
        return ids

    def delete_piece(self, account: str, piece_id: str) -> None:
        with self._call(f"{account}: deleting piece {piece_id[:16]}…"):
            self._pieces(account).document(piece_id).delete(retry=RETRY, timeout=CALL_TIMEOUT)
        self._count(deletes=1)

    # --- manifests ----------------------------------------------------------------------------

    def create_manifest(self, account: str, generation: int, blob: bytes) -> bool:
        """Create-only. A blob larger than one document is cut into parts: the extra parts are
        written first under a fresh upload id, then the main document that counts them, so the
        generation is visible only once complete and concurrent writers never mix parts. The
        pieces still queued go in the same atomic batch as the main document when they fit
        (one call for a small change), else before it."""
        ref = self._generation(account, generation)
        size = MANIFEST_PART_BYTES
        parts = [blob[o : o + size] for o in range(0, len(blob), size)] or [b""]
        with self._lock:
            pieces = self._unsent.pop(account, {})
        if (
            sum(map(len, pieces.values())) + len(parts[0]) > BATCH_BYTES
            or len(pieces) >= BATCH_DOCS
        ):
            self._commit_pieces(account, pieces)
            pieces = {}
        upload = secrets.token_hex(8)
        what = f"{account}: creating the manifest of generation {generation}"
        with self._call(what):
            for i, part in enumerate(parts[1:], 1):
                part_ref = ref.collection("parts").document(f"{upload}-{i:04d}")
                part_ref.set({"blob": part}, retry=RETRY, timeout=UPLOAD_TIMEOUT)
                self._count(writes=1, bytes_written=len(part))
            main = {
                "blob": parts[0],
                "parts": len(parts),
                "size": len(blob),
                "upload": upload,
                "created_at": SERVER_TIMESTAMP,
            }
            batch = self.client.batch()
            for piece_id, piece in pieces.items():
                batch.set(
                    self._pieces(account).document(piece_id), {"blob": piece, "size": len(piece)}
                )
            batch.create(ref, main)
            try:
                batch.commit(retry=RETRY, timeout=UPLOAD_TIMEOUT)
                piece_bytes = sum(map(len, pieces.values()))
                self._count(writes=len(pieces) + 1, bytes_written=len(parts[0]) + piece_bytes)
                return True
            except gexc.AlreadyExists:
                pass
            existing = ref.get(field_paths=["upload"], retry=RETRY, timeout=CALL_TIMEOUT)
            self._count(reads=1)
            if existing.exists and (existing.to_dict() or {}).get("upload") == upload:
                return True  # our own batch, retried after it had landed (pieces included)
            with self._lock:  # nothing of the batch was written: the pieces go with the next
                self._unsent[account] = {**pieces, **self._unsent.get(account, {})}
            self._delete_parts(ref, prefix=f"{upload}-")
        return False

    def read_manifest(self, account: str, generation: int) -> bytes:
        ref = self._generation(account, generation)
        what = f"{account}: reading the manifest of generation {generation}"
        with self._call(what):
            snap = ref.get(retry=RETRY, timeout=CALL_TIMEOUT)
            self._count(reads=1)
            if not snap.exists:
                raise NotFound(f"{account}: generation {generation} has no manifest")
            data = snap.to_dict() or {}
            try:
                blob, count, size = bytes(data["blob"]), int(data["parts"]), int(data["size"])
                upload = str(data["upload"])
            except (KeyError, TypeError, ValueError) as exc:
                raise StoreDamaged(f"{what}: malformed manifest document ({exc!r})") from None
            chunks = [blob]
            for i in range(1, count):
                part = ref.collection("parts").document(f"{upload}-{i:04d}")
                psnap = part.get(retry=RETRY, timeout=UPLOAD_TIMEOUT)
                self._count(reads=1)
                piece = (psnap.to_dict() or {}).get("blob") if psnap.exists else None
                if not isinstance(piece, bytes):
                    raise StoreDamaged(f"{what}: part {i + 1} of {count} is missing")
                chunks.append(piece)
        whole = b"".join(chunks)
        if len(whole) != size:
            raise StoreDamaged(f"{what}: {len(whole)} bytes stored, the document says {size}")
        return whole

    def list_generations(self, account: str) -> list[int]:
        # a query returns only documents that exist: parts whose main document was never
        # created (a writer died) do not make a generation
        query = self._generations(account).select([FieldPath.document_id()])
        with self._call(f"{account}: listing the generations"):
            ids = [snap.id for snap in query.stream(retry=RETRY, timeout=CALL_TIMEOUT)]
        self._count(reads=max(1, len(ids)))
        return sorted(int(i) for i in ids if i.isdigit())

    def delete_manifest(self, account: str, generation: int) -> None:
        ref = self._generation(account, generation)
        with self._call(f"{account}: deleting the manifest of generation {generation}"):
            ref.delete(retry=RETRY, timeout=CALL_TIMEOUT)  # invisible first, then its parts
            self._count(deletes=1)
            self._delete_parts(ref)

    def _delete_parts(self, ref: DocumentReference, prefix: str = "") -> None:
        """Delete the parts under a manifest document: all of them (also those of uploads that
        never completed), or those of one upload."""
        refs = [
            r
            for r in ref.collection("parts").list_documents(retry=RETRY, timeout=CALL_TIMEOUT)
            if r.id.startswith(prefix)
        ]
        self._count(reads=max(1, len(refs)))
        for chunk in _chunks(refs, BATCH_DOCS):
            batch = self.client.batch()
            for r in chunk:
                batch.delete(r)
            batch.commit(retry=RETRY, timeout=CALL_TIMEOUT)
            self._count(deletes=len(chunk))

    # --- locking ------------------------------------------------------------------------------

    def account_lock(self, account: str) -> AbstractContextManager[None]:
        """Serialises commits and garbage collections of one account within this process only.

        Instances on other hosts are not excluded: a lease per account, with a fencing token the
        head switch checks, comes in a later version. Until then the head's compare-and-swap
        keeps heads monotonic, but a collection in one instance can delete a manifest or pieces
        that another instance is still committing.
        """
        return self._locked(account)

    @contextmanager
    def _locked(self, account: str) -> Iterator[None]:
        with self._lock:
            lock = self._account_locks.setdefault(account, threading.Lock())
        with lock:
            try:
                yield
            except BaseException:
                with self._lock:  # the failed commit's queued pieces are not needed
                    self._unsent.pop(account, None)
                raise
            self._send_pieces(account)

    # --- account metadata ---------------------------------------------------------------------

    def record_account(self, account: str, fields: Mapping[str, object]) -> None:
        """Merge fields into accounts/{account}, at most one write per write_interval: calls
        within the interval are coalesced (the newest value of each field wins) and written
        when it has passed, by a timer. A failed write keeps its fields pending for the next
        call or flush()."""
        with self._lock:
            pending = self._records.setdefault(account, {})
            pending.update(fields)
            now = time.monotonic()
            at = self._next_write.get(("record", account), now)
            if at > now:
                if account not in self._timers:
                    timer = threading.Timer(at - now, self._record_later, (account,))
                    timer.daemon = True
                    self._timers[account] = timer
                    timer.start()
                return
        self._write_record(account)

    def _record_later(self, account: str) -> None:
        with self._lock:
            self._timers.pop(account, None)
        try:
            self._write_record(account)
        except StoreError as exc:
            log.warning(
                "%s: account record not written (kept for the next write): %s", account, exc
            )

    def _write_record(self, account: str) -> None:
        self._pace("record", account)
        with self._lock:
            fields = self._records.pop(account, None)
        if not fields:
            return
        # each given top-level field replaced whole (the library takes field paths here,
        # although its annotation says bool)
        merge: Any = [FieldPath(key) for key in fields]
        self._wrote("record", account)
        try:
            with self._call(f"{account}: writing the account record"):
                self._record(account).set(fields, merge=merge, retry=RETRY, timeout=CALL_TIMEOUT)
            self._count(writes=1)
        except BaseException:
            with self._lock:  # keep them, under anything newer that arrived meanwhile
                self._records[account] = {**fields, **self._records.get(account, {})}
            raise

    def read_account(self, account: str) -> dict[str, Any] | None:
        with self._call(f"{account}: reading the account record"):
            snap = self._record(account).get(retry=RETRY, timeout=CALL_TIMEOUT)
        self._count(reads=1)
        with self._lock:
            pending = dict(self._records.get(account, {}))
        if not snap.exists and not pending:
            return None
        return {**(snap.to_dict() or {}), **pending}

    def flush(self) -> None:
        """Send queued pieces and write pending account records now (each record still waits
        for the rest of its second, so at most about one second)."""
        with self._lock:
            timers = list(self._timers.values())
            self._timers.clear()
            accounts = list(self._records)
            piece_accounts = list(self._unsent)
        for timer in timers:
            timer.cancel()
        errors: list[StoreError] = []
        for account in piece_accounts:
            try:
                self._send_pieces(account)
            except StoreError as exc:
                errors.append(exc)
        for account in accounts:
            try:
                self._write_record(account)
            except StoreError as exc:
                errors.append(exc)
        if errors:
            raise errors[0]


def _load_credentials(path: Path, where: str) -> Credentials:
    hint = "create a JSON key for a service account with the role roles/datastore.user"
    try:
        kind = json.loads(path.read_text(encoding="utf-8")).get("type")
        # (the google.oauth2 loaders have no type annotations)
        loaded: Credentials
        if kind == "service_account":
            loaded = service_account.Credentials.from_service_account_file(  # type: ignore[no-untyped-call]
                str(path), scopes=SCOPES
            )
            return loaded
        if kind == "authorized_user":  # a person's `gcloud auth application-default login`
            loaded = user_credentials.Credentials.from_authorized_user_file(  # type: ignore[no-untyped-call]
                str(path), scopes=SCOPES
            )
            return loaded
    except (OSError, ValueError, AttributeError, auth_exc.GoogleAuthError) as exc:
        raise ConfigError(
            f"{where}: {path} holds no usable Google credentials ({_short(exc)}); {hint}."
        ) from None
    raise ConfigError(
        f"{where}: {path} holds credentials of type {kind!r}; wadaemon reads service account "
        "keys and authorized-user files here (for other kinds, set "
        f"$GOOGLE_APPLICATION_CREDENTIALS instead); {hint}."
    )


def open_firestore(config: Config, environ: Mapping[str, str] | None = None) -> FirestoreStore:
    """The store a configuration names; credentials problems are configuration errors."""
    env = os.environ if environ is None else environ
    fs = config.firestore
    path, setting = firestore_credentials(fs, env)
    where = config.where("firestore", "credentials_file")
    if setting != "firestore.credentials_file":
        where = setting
    credentials = _load_credentials(path, where) if path is not None else None
    try:
        return FirestoreStore(
            fs.project,
            fs.database,
            credentials=credentials,
            collection_prefix=fs.collection_prefix,
        )
    except auth_exc.DefaultCredentialsError as exc:
        raise ConfigError(
            f"{config.where('firestore', 'credentials_file')}: no Google credentials for "
            f"Firestore project {fs.project} ({_short(exc)}); set firestore.credentials_file to "
            "a service account's JSON key (role roles/datastore.user), or pass it as the systemd "
            "credential firestore-credentials, or set $GOOGLE_APPLICATION_CREDENTIALS. systemd "
            "before 251 (Ubuntu 22.04 has 249) does not look in /etc/credstore: there, add "
            "LoadCredential=firestore-credentials:/etc/credstore/firestore-credentials with "
            "`systemctl edit wadaemon`."
        ) from None
